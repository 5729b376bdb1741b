//! `eval:`, the benchmark sets evaluated with `data.val` during and after training.

use serde::{Deserialize, Serialize};

/// `eval:` — sets evaluated every `train.eval_every` steps (and at the end) besides
/// `data.val`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Each logged under `val/<name>-...`; see docs/evaluation.md.
    #[serde(default)]
    pub datasets: Vec<EvalDataset>,
}

/// One set of `eval.datasets`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalDataset {
    /// Names its TensorBoard tags (`val/<name>-zeroshot-top1`) and its entry in
    /// `<run_dir>/eval/<step>.json`.
    pub name: String,
    /// A set that names its own classes: `imagenet1k:DIR`, `wds:DIR` or a clip_benchmark
    /// dataset directory.
    pub spec: String,
}

impl EvalConfig {
    /// No sets: the section is left out of a resolved config.
    pub fn is_empty(&self) -> bool {
        self.datasets.is_empty()
    }
}
