//! TorchScript archives (`torch.jit.save`, as OpenAI's `clip.load` files are) read as a state
//! dict. Their `data.pkl` pickles the module tree: each module an object of its TorchScript
//! class (`__torch__.model.CLIP`, `__torch__.torch.nn.modules.linear.Linear`, ...) whose
//! attributes are its parameters, buffers, submodules and plain values. The machine builds
//! those objects as plain holders of attributes (their classes' code, in `code/`, is never
//! read); here the tree is walked into dotted names, as `state_dict()` names them, keeping the
//! tensors and dropping the rest (`training` flags, hooks, numbers).

use std::rc::Rc;

use super::unpickle::{self, TensorRef, Value};

/// Deeper than any model's module tree; a tree that goes on is a cycle.
const MAX_DEPTH: usize = 64;

/// Every tensor attribute of the module tree under `root`, by dotted path.
pub(super) fn attributes(root: &Value) -> Result<Vec<(String, Rc<TensorRef>)>, String> {
    if !matches!(root, Value::Object(_)) {
        return Err(format!(
            "a TorchScript archive whose data.pkl holds {}, not a module",
            unpickle::kind(root)
        ));
    }
    let mut out = Vec::new();
    walk(root, "", 0, &mut out)?;
    Ok(out)
}

fn walk(
    v: &Value,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, Rc<TensorRef>)>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("a module tree deeper than {MAX_DEPTH} at {prefix} (a cycle?)"));
    }
    match v {
        Value::Tensor(t) => out.push((prefix.to_owned(), t.clone())),
        Value::Object(object) => {
            for (k, v) in &object.borrow().attributes.items {
                let Value::Str(name) = k else { continue };
                let path =
                    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") };
                walk(v, &path, depth + 1, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}
