//! `oxclip export`: a checkpoint as a directory open_clip or Hugging Face loads as is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use oxclip_trainer::checkpoint;
use oxclip_trainer::model::export::{export, Format};
use oxclip_trainer::weights_path::Found;

use super::located_weights_and_model;

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
    /// `checkpoints/step_N` folder, an `oxclip export` folder, or a weights file (open_clip or
    /// Hugging Face layout).
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
    let (found, (weights_file, cfg)) = located_weights_and_model(&args.checkpoint, args.model.as_deref())?;
    // Load through the model, so the export is exactly what training would start from and
    // any mismatch is reported by name.
    let (vs, model) = oxclip_trainer::model::load(&cfg, &weights_file, tch::Device::Cpu)?;
    let cfg = model.config.clone(); // with the bias of a SigLIP file
    let weights: BTreeMap<String, tch::Tensor> = vs.variables().into_iter().collect();
    let format = match args.format {
        ExportFormat::OpenClip => Format::OpenClip,
        ExportFormat::Hf => Format::HuggingFace,
    };
    // A model directory's own preprocessing travels with it; otherwise the family's.
    let preprocess = found.pretrained()?.map(|p| p.preprocess);
    let files = export(weights, &cfg, preprocess.as_ref(), format, &args.out)?;
    for f in files {
        println!("{}", f.display());
    }
    let what = match &found {
        Found::Checkpoint { dir } => {
            let step = checkpoint::read_state(dir)?.step;
            // A step folder sits at RUN/checkpoints/step_N.
            match dir.parent().and_then(Path::parent) {
                Some(run) if !run.as_os_str().is_empty() => format!("step {step} of {}", run.display()),
                _ => format!("step {step} ({})", dir.display()),
            }
        }
        other => format!("{} ({})", weights_file.display(), other.describe()),
    };
    let name = match args.format {
        ExportFormat::OpenClip => "open_clip",
        ExportFormat::Hf => "hf",
    };
    println!("exported {what} to {} ({name})", args.out.display());
    Ok(())
}

