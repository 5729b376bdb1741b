pub mod bench;
pub mod data;
pub mod embed;
pub mod eval;
pub mod export;
pub mod launch;
pub mod model;
pub mod search;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use oxclip_trainer::checkpoint;
use oxclip_trainer::model::ModelConfig;
use oxclip_trainer::weights_path::{self, Found};

use crate::config;

/// The weights file `checkpoint` names and its architecture. `checkpoint` is anything
/// [`weights_path::locate`] accepts (a run folder, its `checkpoints/` folder, a step folder,
/// an `oxclip export` folder, a safetensors file); `model` (a built-in name, a model YAML or an
/// `open_clip_config.json`) overrides or, where the weights do not say, supplies the
/// architecture a checkpoint's saved run config or an open_clip export's config gives.
pub fn weights_and_model(checkpoint: &Path, model: Option<&str>) -> anyhow::Result<(PathBuf, ModelConfig)> {
    Ok(located_weights_and_model(checkpoint, model)?.1)
}

/// [`weights_and_model`], with what was found.
pub fn located_weights_and_model(checkpoint: &Path, model: Option<&str>) -> anyhow::Result<(Found, (PathBuf, ModelConfig))> {
    let found = weights_path::locate(checkpoint)?;
    let cfg = match (model, &found) {
        (Some(name), _) => config::resolve_model(name)?,
        (None, Found::Checkpoint { dir }) => model_of_checkpoint(dir)?,
        (None, Found::OpenClip { config: Some(config), .. }) => config::model_from_file(config)?,
        (None, Found::OpenClip { weights, config: None }) => {
            bail!("{} has no open_clip_config.json beside it: say which architecture it is with --model", weights.display())
        }
        (None, Found::HuggingFace { weights, config }) => bail!(
            "{} is a Hugging Face export; oxclip does not read the architecture from its {} yet: say which it is with \
             --model (a built-in name or a model YAML; for an oxclip export, the model of the run it came from)",
            weights.display(),
            config.display()
        ),
        (None, Found::File(file)) => bail!("{} is a bare weights file: say which architecture it is with --model", file.display()),
    };
    let weights = found.weights();
    Ok((found, (weights, cfg)))
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
