//! One file per command group, each an `Args` struct and the function that runs it; what
//! several of them take (the model flags, a texts file) is in [`args`], so that no command
//! imports another. Here: how every command opens a model ([`open_model`]).

pub mod args;
pub mod bench;
pub mod data;
pub mod embed;
pub mod eval;
pub mod export;
pub mod launch;
pub mod model;
pub mod search;
pub mod tokenizer;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tch::{nn, Device};

use oxclip_data_loader::{Preprocess, Tokenizer};
use oxclip_trainer::checkpoint;
use oxclip_trainer::config::{self, DataConfig};
use oxclip_trainer::device;
use oxclip_trainer::infer::Embedder;
use oxclip_trainer::interchange::pretrained;
use oxclip_trainer::model::{Clip, ModelConfig};
use oxclip_trainer::prepare;
use oxclip_trainer::weights_path::{self, Found};

/// The weights file `checkpoint` names and its architecture. `checkpoint` is anything
/// [`weights_path::locate`] accepts (a run folder, its `checkpoints/` folder, a step folder,
/// a Hugging Face or open_clip model directory, one of OpenAI's `.pt` files, a safetensors
/// file or a PyTorch pickle). A model directory says its own architecture (`config.json`,
/// `open_clip_config.json`), as a checkpoint's saved run config and an OpenAI file's tensor
/// shapes do; `model` (a built-in name, a model YAML or an `open_clip_config.json`) is then
/// optional, and an error naming the differing keys where it contradicts the directory. A
/// bare weights file needs `model`.
fn located_weights_and_model(
    checkpoint: &Path,
    model: Option<&str>,
) -> anyhow::Result<(Found, (PathBuf, ModelConfig))> {
    let found = weights_path::locate(checkpoint)?;
    let pretrained = found.pretrained()?;
    let cfg = match (model, &found, pretrained) {
        (Some(name), _, Some(dir)) => {
            let given = config::resolve_model(name)?;
            if let Some(msg) = pretrained::contradiction(&dir.dir, &dir.model, "--model", &given) {
                bail!("{msg}");
            }
            dir.model
        }
        (Some(name), _, None) => config::resolve_model(name)?,
        (None, _, Some(dir)) => dir.model,
        (None, Found::Checkpoint { dir }, None) => model_of_checkpoint(dir)?,
        (None, Found::OpenClip { weights, .. }, None) => {
            bail!("{} has no open_clip_config.json beside it: say which architecture it is with --model", weights.display())
        }
        (
            None,
            Found::HuggingFace { weights, .. } | Found::OpenAi { weights } | Found::File(weights),
            None,
        ) => {
            bail!(
                "{} is a bare weights file: say which architecture it is with --model",
                weights.display()
            )
        }
    };
    let weights = found.weights();
    Ok((found, (weights, cfg)))
}

/// A model as every command opens it: its weights, its architecture, how its text and
/// images are prepared, each from the most specific source there is, and the device it runs
/// on.
pub struct OpenedModel {
    /// What `--checkpoint` turned out to be.
    pub found: Found,
    pub weights: PathBuf,
    pub config: ModelConfig,
    /// `None` only where no text is to be embedded and no tokenizer fits the text tower.
    pub tokenizer: Option<Tokenizer>,
    /// The tokenizer file used (`None`: the CLIP BPE), for records such as an index.
    pub tokenizer_path: Option<PathBuf>,
    pub preprocess: Preprocess,
    pub device: Device,
}

impl OpenedModel {
    /// The weights loaded into the architecture, on the device.
    pub fn load(&self) -> anyhow::Result<(nn::VarStore, Clip)> {
        Ok(oxclip_trainer::interchange::weights::load(&self.config, &self.weights, self.device)?)
    }

    /// [`OpenedModel::load`] for a command that only runs the model: in eval mode, its image
    /// tower fused where it can be (`Clip::prepare_for_inference`).
    pub fn load_for_inference(&self) -> anyhow::Result<(nn::VarStore, Clip)> {
        let (vs, mut model) = self.load()?;
        model.prepare_for_inference();
        Ok((vs, model))
    }

    /// The tokenizer, which a command embedding text cannot do without.
    pub fn text_tokenizer(&self) -> anyhow::Result<Tokenizer> {
        self.tokenizer.clone().context("no tokenizer for the model's text tower: give --tokenizer")
    }

    /// The model loaded, ready to embed images and (with a tokenizer) texts.
    pub fn embedder(self) -> anyhow::Result<Embedder> {
        Ok(Embedder::new(&self.config, &self.weights, self.tokenizer, self.device)?
            .with_preprocess(&self.preprocess)?)
    }
}

/// Opens `checkpoint` ([`located_weights_and_model`]). The tokenizer is `tokenizer` (`--tokenizer`),
/// else a model directory's `tokenizer.json`, else the run's `data.tokenizer` for a checkpoint,
/// else the CLIP BPE; images are prepared as the model directory's preprocessing config, or
/// the run's `data.*` keys for a checkpoint, or the model's defaults; `device` is the
/// `--device` flag's value.
/// Without `text` (images only), a tokenizer that does not fit the text tower is left out
/// rather than refused, unless `tokenizer` asked for it.
pub fn open_model(
    checkpoint: &Path,
    model: Option<&str>,
    tokenizer: Option<&Path>,
    device: &str,
    text: bool,
) -> anyhow::Result<OpenedModel> {
    let (found, (weights, config)) = located_weights_and_model(checkpoint, model)?;
    let (found_tokenizer, preprocess) = inputs_of(&found, &config)?;
    let tokenizer_path = tokenizer.map(Path::to_owned).or(found_tokenizer);
    open_recorded(
        found,
        weights,
        config,
        tokenizer_path,
        tokenizer.is_some(),
        preprocess,
        device,
        text,
    )
}

/// A model whose weights, architecture, tokenizer file and preprocessing are already known
/// (an index records them): the tokenizer read and checked against the text tower, the
/// device chosen. `asked`: the tokenizer was given on the command line, so one that does not
/// fit is refused even without `text`.
#[allow(clippy::too_many_arguments)] // the parts of an OpenedModel, each named at the call
pub fn open_recorded(
    found: Found,
    weights: PathBuf,
    config: ModelConfig,
    tokenizer_path: Option<PathBuf>,
    asked: bool,
    preprocess: Preprocess,
    device: &str,
    text: bool,
) -> anyhow::Result<OpenedModel> {
    let tokenizer = match prepare::text_tokenizer(tokenizer_path.as_deref(), &config) {
        Ok(t) => Some(t),
        Err(_) if !text && !asked => None,
        Err(e) => return Err(e.into()),
    };
    let device = device::select(device, "--device")?;
    Ok(OpenedModel { found, weights, config, tokenizer, tokenizer_path, preprocess, device })
}

/// The tokenizer file and image preprocessing that came with what was found: a model
/// directory's own, or a checkpoint's run config's (`data.tokenizer`, `data.image_*`), else
/// none and the model's defaults.
fn inputs_of(found: &Found, config: &ModelConfig) -> anyhow::Result<(Option<PathBuf>, Preprocess)> {
    if let Some(dir) = found.pretrained()? {
        return Ok((dir.tokenizer.and_then(|t| t.tokenizer_json), dir.preprocess));
    }
    if let Found::Checkpoint { dir } = found {
        if let Some(data) = data_of_checkpoint(dir) {
            return Ok((data.tokenizer.as_ref().map(PathBuf::from), data.preprocess(config)?));
        }
    }
    Ok((None, prepare::default_preprocess(config)))
}

/// The `data:` section of the run config saved in a checkpoint, when it reads as one.
fn data_of_checkpoint(dir: &Path) -> Option<DataConfig> {
    let state = checkpoint::read_state(dir).ok()?;
    let run: serde_yaml::Value = serde_yaml::from_str(&state.config).ok()?;
    serde_yaml::from_value(run.get("data")?.clone()).ok()
}

/// The model section of the run config saved in a checkpoint.
fn model_of_checkpoint(dir: &Path) -> anyhow::Result<ModelConfig> {
    let state = checkpoint::read_state(dir)?;
    let run: serde_yaml::Value = serde_yaml::from_str(&state.config)
        .with_context(|| format!("{}: the saved run config", dir.display()))?;
    let model = run
        .get("model")
        .with_context(|| format!("{}: the saved run config has no model", dir.display()))?;
    match model {
        serde_yaml::Value::String(name) => Ok(config::resolve_model(name)?),
        other => Ok(serde_yaml::from_value(other.clone())
            .with_context(|| format!("{}: the saved model config", dir.display()))?),
    }
}
