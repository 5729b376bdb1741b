pub mod bench;
pub mod data;
pub mod embed;
pub mod eval;
pub mod export;
pub mod launch;
pub mod search;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use oxclip_trainer::checkpoint;
use oxclip_trainer::model::ModelConfig;

use crate::config;

/// The weights file `checkpoint` names and its architecture: `checkpoint` is a run directory
/// (its newest complete checkpoint), a `checkpoints/step_N` directory, or a weights file;
/// `model` (a built-in name or a model YAML) overrides or, for a bare file, supplies the
/// architecture the checkpoint's saved run config gives.
pub fn weights_and_model(checkpoint: &Path, model: Option<&str>) -> anyhow::Result<(PathBuf, ModelConfig)> {
    let (weights_file, step_dir) = locate(checkpoint)?;
    let cfg = match (model, &step_dir) {
        (Some(name), _) => config::resolve_model(name)?,
        (None, Some(dir)) => model_of_checkpoint(dir)?,
        (None, None) => bail!("{} is a bare weights file: say which architecture it is with --model", weights_file.display()),
    };
    Ok((weights_file, cfg))
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
