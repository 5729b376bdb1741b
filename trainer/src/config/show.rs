//! `oxclip config show`'s notes: the resolved YAML with a comment on each key the file did not
//! set, saying where its value came from.
//!
//! The notes go on the YAML text serde_yaml writes, read line by line: a key line is
//! `<indent>key: value` or `<indent>key:` (a mapping or list follows), two spaces per level,
//! lists as `- ` items at their key's indent. Items of lists are not annotated (their key is).

use super::{Origin, Origins};

/// `yaml` (a resolved config) with `  # ...` after each key that `origins` did not see
/// written.
pub(super) fn annotate(yaml: &str, origins: &Origins) -> String {
    let mut out = String::with_capacity(yaml.len() * 2);
    // The key path down to the current line, one entry per indent level.
    let mut path: Vec<(usize, String)> = Vec::new();
    // Inside a list item (and its nested lines) that started at this indent.
    let mut in_list: Option<usize> = None;
    for line in yaml.lines() {
        out.push_str(line);
        let indent = line.len() - line.trim_start().len();
        let content = line.trim_start();
        if let Some(list_indent) = in_list {
            if indent > list_indent || (indent == list_indent && content.starts_with("- ")) {
                out.push('\n');
                continue;
            }
            in_list = None;
        }
        if content.starts_with("- ") || content == "-" {
            in_list = Some(indent);
            out.push('\n');
            continue;
        }
        let Some(key) = key_of(content) else {
            out.push('\n');
            continue;
        };
        while path.last().is_some_and(|(i, _)| *i >= indent) {
            path.pop();
        }
        path.push((indent, key.to_owned()));
        let dotted: Vec<&str> = path.iter().map(|(_, k)| k.as_str()).collect();
        if let Some(note) = note(&dotted.join("."), origins) {
            out.push_str("  # ");
            out.push_str(&note);
        }
        out.push('\n');
    }
    out
}

/// The key of a `key: value` or `key:` line; `None` for anything else (a continued string).
fn key_of(content: &str) -> Option<&str> {
    let (key, rest) = content.split_once(':')?;
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (plain && (rest.is_empty() || rest.starts_with(' '))).then_some(key)
}

/// The note for a key: where a derived value came from, `default` for a key neither the file
/// nor resolution set, nothing for a key the file set.
fn note(key: &str, origins: &Origins) -> Option<String> {
    if let Some(origin) = origins.derived.get(key) {
        return Some(match origin {
            Origin::Overridden => "set on the command line".to_owned(),
            Origin::BuiltIn => "the built-in model of that name".to_owned(),
            Origin::ModelFile(path) => format!("from the model file {}", path.display()),
            Origin::ModelDirectory(dir) => format!("from the model directory {}", dir.display()),
            Origin::ModelDefault => "the model's default".to_owned(),
            Origin::Loss => "what loss.kind asks of the model".to_owned(),
        });
    }
    // Inside a model the file named (not wrote), every key is the model's own.
    if key.starts_with("model.") && !origins.written.iter().any(|w| w.starts_with("model.")) {
        return None;
    }
    // A key the file wrote, or a mapping the file wrote part of.
    if origins.written.contains(key) {
        return None;
    }
    Some("default".to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn keys_left_out_say_where_their_values_came_from() {
        let yaml = "run_dir: runs/x\nmodel:\n  embed_dim: 64\n  vision_cfg:\n    layers: 2\n\
                    data:\n  train: synthetic:64\n  image_mean:\n  - 0.5\n  - 0.5\n  - 0.5\n\
                    train:\n  steps: 10\n  batch_size: 256\neval:\n  datasets:\n  - name: a\n    \
                    spec: b\n";
        let written: BTreeSet<String> = [
            "run_dir",
            "model",
            "data",
            "data.train",
            "train",
            "train.steps",
            "eval",
            "eval.datasets",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let derived = BTreeMap::from([
            ("model".to_owned(), Origin::ModelDirectory(PathBuf::from("hf/clip"))),
            ("data.image_mean".to_owned(), Origin::ModelDirectory(PathBuf::from("hf/clip"))),
            ("train.batch_size".to_owned(), Origin::Overridden),
        ]);
        let shown = annotate(yaml, &Origins { written, derived });
        let expected = "run_dir: runs/x\nmodel:  # from the model directory hf/clip\n  \
                        embed_dim: 64\n  vision_cfg:\n    layers: 2\ndata:\n  train: synthetic:64\n  \
                        image_mean:  # from the model directory hf/clip\n  - 0.5\n  - 0.5\n  - 0.5\n\
                        train:\n  steps: 10\n  batch_size: 256  # set on the command line\neval:\n  \
                        datasets:\n  - name: a\n    spec: b\n";
        assert_eq!(shown, expected);
        // Still YAML, and the same YAML.
        let a: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let b: serde_yaml::Value = serde_yaml::from_str(&shown).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn unwritten_keys_are_defaults() {
        let written: BTreeSet<String> = ["train", "train.steps"].map(String::from).into();
        let origins = Origins { written, derived: BTreeMap::new() };
        assert_eq!(
            annotate("train:\n  steps: 3\n  seed: 0\noptim:\n  lr: 0.0005\n", &origins),
            "train:\n  steps: 3\n  seed: 0  # default\noptim:  # default\n  lr: 0.0005  # default\n"
        );
    }
}
