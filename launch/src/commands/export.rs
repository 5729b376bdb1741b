//! `oxclip export`: a checkpoint as a directory open_clip or Hugging Face loads as is.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use oxclip_trainer::model::export::{export, Format};

use super::weights_and_model;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    /// `open_clip_model.safetensors` + `open_clip_config.json`.
    #[value(name = "open_clip")]
    OpenClip,
    /// `model.safetensors` + `config.json` + `preprocessor_config.json` for `CLIPModel`.
    Hf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A run directory (its newest valid checkpoint), a `checkpoints/step_N` directory, or a
    /// weights file (open_clip or Hugging Face layout).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// The directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The architecture (a built-in name or a model YAML), when the checkpoint does not say
    /// (a bare weights file).
    #[arg(long)]
    pub model: Option<String>,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let (weights_file, cfg) = weights_and_model(&args.checkpoint, args.model.as_deref())?;
    // Load through the model, so the export is exactly what training would start from and
    // any mismatch is reported by name.
    let (vs, model) = oxclip_trainer::model::load(&cfg, &weights_file, tch::Device::Cpu)?;
    let cfg = model.config.clone(); // with the bias of a SigLIP file
    let weights: BTreeMap<String, tch::Tensor> = vs.variables().into_iter().collect();
    let format = match args.format {
        ExportFormat::OpenClip => Format::OpenClip,
        ExportFormat::Hf => Format::HuggingFace,
    };
    let files = export(weights, &cfg, format, &args.out)?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

