//! What several commands take, in one place so that no command imports another: the flags
//! naming a model ([`ModelArgs`], opened through [`super::open_model`]) and the JSON texts
//! file of `--texts-file` ([`read_texts`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

/// Where the model comes from, shared by the commands that use one.
#[derive(Args)]
pub struct ModelArgs {
    /// A run directory, a `checkpoints/step_N` directory, a model directory, one of OpenAI's
    /// `.pt` files, or a weights file (open_clip or Hugging Face layout; safetensors, or a
    /// PyTorch pickle such as `epoch_N.pt`, read without running it).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The architecture (built-in name or model YAML); needed for a bare weights file. A
    /// Hugging Face or open_clip directory, or an OpenAI `.pt` file, says its own; one that
    /// contradicts it is an error.
    #[arg(long)]
    pub model: Option<String>,
    /// A tokenizer.json, or a Hugging Face model directory holding one, instead of the CLIP
    /// BPE: prepared as the model's config says (open_clip's `tokenizer_kwargs`, else as
    /// transformers' AutoTokenizer); refused when its ids exceed the model's vocabulary or
    /// the text tower would pool at the wrong token.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (the first GPU if there is one, else the CPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl ModelArgs {
    /// The model, its tokenizer, preprocessing and device ([`super::open_model`]).
    /// `text`: whether texts will be embedded (a tokenizer is then required).
    pub fn open(&self, text: bool) -> anyhow::Result<super::OpenedModel> {
        super::open_model(
            &self.checkpoint,
            self.model.as_deref(),
            self.tokenizer.as_deref(),
            &self.device,
            text,
        )
    }
}

/// A JSON file holding a list of strings.
pub(crate) fn read_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of strings", path.display()))
}
