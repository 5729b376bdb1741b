//! open_clip's training checkpoints (`epoch_N.pt`, open_clip_train/main.py): a pickled
//! `{"epoch", "name", "state_dict", "optimizer", "scaler"?}`. The weights are read as any
//! pickled state dict (`weights.rs`); here is the optimizer, torch's `AdamW.state_dict()`,
//! as oxclip's named state (`exp_avg.<name>`, `exp_avg_sq.<name>`, `step`, what
//! `optim::AdamW::load_state_tensors` takes), so a run continues open_clip's.
//!
//! torch keys a state by the parameter's index, numbered through the parameter groups in
//! order; open_clip makes two groups from `model.named_parameters()`: the gains and biases
//! without weight decay (`p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or
//! "logit_scale" in n`, oxclip's `optim::decays` too), then the rest, each in
//! `named_parameters()` order. That order is the module tree's, which the checkpoint's own
//! `state_dict` keeps (an `OrderedDict`, parameters in the same order, buffers between them),
//! so the indices are named from the file itself, whatever the architecture.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tch::{Kind, Tensor};

use super::pickle::{TorchFile, Value};
use crate::error::{Result, TrainError};

/// The AdamW state of the open_clip checkpoint at `path` by parameter name, for the
/// parameters `trainable` names (this run's; they must be the ones open_clip trained). The
/// step is the one every parameter's state agrees on.
pub fn optimizer_state(
    path: &Path,
    trainable: &BTreeSet<String>,
) -> Result<BTreeMap<String, Tensor>> {
    let bad = |message: String| TrainError::Weights { path: path.into(), message };
    let file = TorchFile::open(path)?;
    let Value::Dict(root) = file.root() else {
        return Err(bad("not an open_clip training checkpoint (a dict with an optimizer)".into()));
    };
    let root = root.borrow();
    let Some(Value::Dict(optimizer)) = root.get("optimizer") else {
        return Err(bad(
            "holds no optimizer state (open_clip's epoch_N.pt has it under `optimizer`)".into(),
        ));
    };
    let optimizer = optimizer.borrow();
    // The trained parameters in named_parameters() order, split as open_clip splits them.
    let order: Vec<(String, usize)> = file
        .tensor_refs()?
        .into_iter()
        .map(|(name, t)| (name.strip_prefix("module.").unwrap_or(&name).to_owned(), t.size.len()))
        .filter(|(name, _)| trainable.contains(name))
        .collect();
    if order.len() != trainable.len() {
        let found: BTreeSet<&String> = order.iter().map(|(n, _)| n).collect();
        let missing: Vec<&String> =
            trainable.iter().filter(|n| !found.contains(n)).take(3).collect();
        return Err(bad(format!(
            "its state_dict lacks {} of the parameters this run trains (e.g. {missing:?})",
            trainable.len() - order.len()
        )));
    }
    let (no_decay, decay): (Vec<_>, Vec<_>) =
        order.into_iter().partition(|(name, dims)| !crate::optim::decays_shape(name, *dims));
    let groups = match optimizer.get("param_groups") {
        Some(Value::List(groups)) => groups.borrow().clone(),
        _ => return Err(bad("its optimizer has no param_groups list".into())),
    };
    let expected = [no_decay, decay];
    if groups.len() != 2 {
        return Err(bad(format!(
            "its optimizer has {} parameter groups; open_clip makes two (no decay, decay)",
            groups.len()
        )));
    }
    let states = match optimizer.get("state") {
        Some(Value::Dict(states)) => states.clone(),
        _ => return Err(bad("its optimizer has no state dict".into())),
    };
    let states = states.borrow();
    let mut out = BTreeMap::new();
    let mut step: Option<f64> = None;
    for (g, (group, names)) in groups.iter().zip(&expected).enumerate() {
        let Value::Dict(group) = group else {
            return Err(bad(format!("param_groups[{g}] is not a dict")));
        };
        let ids = match group.borrow().get("params") {
            Some(Value::List(ids)) => ids.borrow().clone(),
            _ => return Err(bad(format!("param_groups[{g}] has no params list"))),
        };
        if ids.len() != names.len() {
            return Err(bad(format!(
                "param_groups[{g}] holds {} parameters, and this run's model has {} {}: the model or the frozen towers differ from open_clip's run",
                ids.len(),
                names.len(),
                if g == 0 { "gains and biases (no weight decay)" } else { "weights with decay" }
            )));
        }
        for (id, (name, _)) in ids.iter().zip(names) {
            let Value::Int(id) = id else {
                return Err(bad(format!("param_groups[{g}] holds a non-integer id")));
            };
            let state = match states.get_int(*id) {
                Some(Value::Dict(state)) => state.clone(),
                Some(_) => {
                    return Err(bad(format!("the state of parameter {id} ({name}) is not a dict")))
                }
                // Never stepped (no gradient yet): torch has no state, the moments are zero.
                None => continue,
            };
            let state = state.borrow();
            for key in ["exp_avg", "exp_avg_sq"] {
                let Some(Value::Tensor(t)) = state.get(key) else {
                    return Err(bad(format!("the state of parameter {id} ({name}) has no {key}")));
                };
                out.insert(format!("{key}.{name}"), file.tensor(t)?);
            }
            let this = match state.get("step") {
                Some(Value::Tensor(t)) => {
                    file.tensor(t)?.f_to_kind(Kind::Double)?.f_double_value(&[])?
                }
                Some(Value::Int(n)) => *n as f64,
                Some(Value::Float(x)) => *x,
                _ => return Err(bad(format!("the state of parameter {id} ({name}) has no step"))),
            };
            if step.is_some_and(|s| s != this) {
                return Err(bad(format!(
                    "its parameters were stepped different numbers of times ({} and {this})",
                    step.unwrap_or_default()
                )));
            }
            step = Some(this);
        }
    }
    out.insert("step".into(), Tensor::from(step.unwrap_or(0.0) as i64));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Clip, ModelConfig};

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pickle")
    }

    fn pickle_tiny() -> ModelConfig {
        serde_yaml::from_str(include_str!("../../../tests/fixtures/models/pickle-tiny.yaml"))
            .unwrap()
    }

    fn trainable(cfg: &ModelConfig) -> BTreeSet<String> {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = Clip::new(&vs.root(), cfg).unwrap();
        vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).map(|(n, _)| n).collect()
    }

    /// open_clip_train's AdamW after 3 steps (tests/fixtures/make_pickle_fixtures.py), named:
    /// every moment and the step equal what open_clip's optimizer held for each parameter.
    #[test]
    fn open_clip_moments_are_named_from_the_checkpoint() {
        let cfg = pickle_tiny();
        let got = optimizer_state(&fixtures().join("epoch_3.pt"), &trainable(&cfg)).unwrap();
        let want: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(fixtures().join("epoch_3_optimizer.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
        for (name, t) in &want {
            assert!(got[name].equal(t), "{name}");
        }
        assert_eq!(i64::try_from(&got["step"]).unwrap(), 3);
        // Loaded into oxclip's AdamW, it is the state it reports.
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = Clip::new(&vs.root(), &cfg).unwrap();
        let config = crate::optim::AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 };
        let mut adamw = crate::optim::AdamW::new(vs.variables().into_iter().collect(), config);
        adamw.load_state_tensors(&got).unwrap();
        assert_eq!(adamw.steps_taken(), 3);
    }

    /// A run that trains other parameters than open_clip's (a frozen tower), or a file
    /// without an optimizer, is refused with what differs.
    #[test]
    fn mismatched_runs_and_plain_state_dicts_are_refused() {
        let cfg = pickle_tiny();
        let mut fewer = trainable(&cfg);
        fewer.retain(|n| !n.starts_with("visual."));
        let err = optimizer_state(&fixtures().join("epoch_3.pt"), &fewer).unwrap_err().to_string();
        assert!(err.contains("param_groups[0] holds") && err.contains("frozen towers"), "{err}");
        let err = optimizer_state(&fixtures().join("open_clip_zip.pt"), &trainable(&cfg))
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no optimizer state"), "{err}");
    }
}
