//! `oxclip export`: a checkpoint as a directory open_clip or Hugging Face loads as is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use oxclip_trainer::checkpoint;
use oxclip_trainer::model::export::{export, Format};
use oxclip_trainer::model::ModelConfig;

use crate::config;

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
    let (weights_file, step_dir) = locate(&args.checkpoint)?;
    let cfg = match (&args.model, &step_dir) {
        (Some(name), _) => config::resolve_model(name)?,
        (None, Some(dir)) => model_of_checkpoint(dir)?,
        (None, None) => bail!("{} is a bare weights file: say which architecture it is with --model", weights_file.display()),
    };
    // Load through the model, so the export is exactly what training would start from and
    // any mismatch is reported by name.
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = oxclip_trainer::model::Clip::new(&vs.root(), &cfg)?;
    oxclip_trainer::model::load_weights(&vs, &weights_file)?;
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

/// The weights file and, when there is one, the checkpoint directory it belongs to.
fn locate(path: &Path) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    if path.is_file() {
        let dir = path.parent().filter(|d| d.join("trainer_state.json").is_file()).map(Path::to_path_buf);
        return Ok((path.to_path_buf(), dir));
    }
    if path.join("model.safetensors").is_file() {
        return Ok((path.join("model.safetensors"), Some(path.to_path_buf())));
    }
    if path.is_dir() {
        let dir = checkpoint::latest_valid(path)?
            .with_context(|| format!("{} holds no complete checkpoint (checkpoints/step_N/model.safetensors)", path.display()))?;
        return Ok((dir.join("model.safetensors"), Some(dir)));
    }
    bail!("{} does not exist", path.display())
}

/// The model section of the run config saved in a checkpoint.
fn model_of_checkpoint(dir: &Path) -> anyhow::Result<ModelConfig> {
    let state = checkpoint::read_state(dir)?;
    let run: serde_yaml::Value = serde_yaml::from_str(&state.config).with_context(|| format!("{}: the saved run config", dir.display()))?;
    let model = run.get("model").with_context(|| format!("{}: the saved run config has no model", dir.display()))?;
    match model {
        serde_yaml::Value::String(name) => Ok(config::resolve_model(name)?),
        other => Ok(serde_yaml::from_value(other.clone()).with_context(|| format!("{}: the saved model config", dir.display()))?),
    }
}
