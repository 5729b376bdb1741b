//! `oxclip export`: a checkpoint as a directory open_clip or Hugging Face loads as is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};

use oxclip_trainer::checkpoint;
use oxclip_trainer::interchange::export::{export_into, ExportDir, Format};
use oxclip_trainer::weights_path::Found;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    /// `open_clip_model.safetensors` + `open_clip_config.json`.
    #[value(name = "open_clip")]
    OpenClip,
    /// `model.safetensors` + `config.json` + `preprocessor_config.json` for `CLIPModel` or `SiglipModel`.
    Hf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A run folder (its newest complete checkpoint), its `checkpoints/` folder, a
    /// `checkpoints/step_N` folder, a model directory, one of OpenAI's `.pt` files, or a
    /// weights file (open_clip or Hugging Face layout; safetensors or a PyTorch pickle).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Which loader the directory is for: `open_clip` or `hf` (transformers' `CLIPModel`, or
    /// `SiglipModel` for a SigLIP model).
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// The directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The architecture (a built-in name, a model YAML or an `open_clip_config.json`), when
    /// the checkpoint does not say (a bare weights file); for a Hugging Face or open_clip
    /// directory, a check: one that contradicts the directory's config is an error.
    #[arg(long)]
    pub model: Option<String>,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    // Images only: a tokenizer that does not fit the text tower is still copied, not refused.
    let opened = super::open_model(&args.checkpoint, args.model.as_deref(), None, "cpu", false)?;
    // Load through the model, so the export is exactly what training would start from and
    // any mismatch is reported by name.
    let (vs, model) = opened.load()?;
    let cfg = model.config.clone(); // with the bias of a SigLIP file
    let weights: BTreeMap<String, tch::Tensor> = vs.variables().into_iter().collect();
    let format = match args.format {
        ExportFormat::OpenClip => Format::OpenClip,
        ExportFormat::Hf => Format::HuggingFace,
    };
    // The preprocessing and tokenizer the model was used with travel with it (a model
    // directory's own, or the run's), so the export loads ready to use.
    // Written as a whole or not at all, never over a file an export did not write.
    let mut out = ExportDir::open(&args.out)?;
    export_into(&mut out, weights, &cfg, Some(&opened.preprocess), format)?;
    if let Some(tokenizer) = &opened.tokenizer_path {
        copy_tokenizer(tokenizer, &mut out)?;
    }
    for f in out.commit()? {
        println!("{}", f.display());
    }
    let what = match &opened.found {
        Found::Checkpoint { dir } => {
            let step = checkpoint::read_state(dir)?.step;
            // A step folder sits at RUN/checkpoints/step_N.
            match dir.parent().and_then(Path::parent) {
                Some(run) if !run.as_os_str().is_empty() => {
                    format!("step {step} of {}", run.display())
                }
                _ => format!("step {step} ({})", dir.display()),
            }
        }
        other => format!("{} ({})", opened.weights.display(), other.describe()),
    };
    let name = match args.format {
        ExportFormat::OpenClip => "open_clip",
        ExportFormat::Hf => "hf",
    };
    println!("exported {what} to {} ({name})", args.out.display());
    Ok(())
}

/// Copies a Hugging Face tokenizer (`tokenizer.json`, or a directory holding one, with its
/// `tokenizer_config.json` and `special_tokens_map.json` when present) into `out`. A
/// tokenizer.json without a post-processor (`oxclip tokenizer train`'s, used as CLIP's
/// `tokenize`) stays out: transformers would read it without the start and end tokens.
fn copy_tokenizer(tokenizer: &Path, out: &mut ExportDir) -> anyhow::Result<()> {
    let dir = if tokenizer.is_dir() {
        tokenizer.to_owned()
    } else {
        tokenizer.parent().map(Path::to_owned).unwrap_or_default()
    };
    let json =
        if tokenizer.is_dir() { tokenizer.join("tokenizer.json") } else { tokenizer.to_owned() };
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("reading the tokenizer {}", json.display()))?;
    let parsed: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", json.display()))?;
    if parsed.get("post_processor").is_none_or(serde_json::Value::is_null) {
        return Ok(());
    }
    for (from, name) in [
        (json, "tokenizer.json"),
        (dir.join("tokenizer_config.json"), "tokenizer_config.json"),
        (dir.join("special_tokens_map.json"), "special_tokens_map.json"),
    ] {
        if from.is_file() {
            let to = out.stage(name)?;
            std::fs::copy(&from, &to).with_context(|| {
                format!("copying the tokenizer {} to {}", from.display(), out.path(name).display())
            })?;
        }
    }
    Ok(())
}
