//! The run config, in one place: read, resolved, defaulted and checked here, then taken by
//! the trainer as it is ([`crate::train::fit`] takes a [`RunConfig`]).
//!
//! A run config is one YAML file: `run_dir`, the `model`, and one section per part of a run
//! (`data:`, `train:`, `optim:`, `loss:`, `init:`, `dist:`, `eval:`). It goes through two
//! stages, as ripgrep's flags do:
//!
//! 1. [`read`]: the text as written, overrides applied, every left-out key at its default.
//!    Each section is plain data in its own file here (`data.rs`, `train.rs`, `optim.rs`,
//!    `loss.rs`, `dist.rs`, `eval.rs`) with its doc comments, its defaults (written once:
//!    serde fills a missing key from the section's `Default` or the field's `default` function)
//!    and its own checks. Unknown keys and wrong types are errors naming the key and the line
//!    (`yaml.rs`).
//! 2. [`resolve`]: the model reference becomes the model's config (`model.rs`: a built-in
//!    name, a file, a model directory); what the model and the loss decide is filled in (the
//!    image preprocessing and the tokenizer of a model directory, the model's default
//!    preprocessing, SigLIP's bias); then every check that needs several sections.
//!
//! The result, [`RunConfig`], is what `oxclip train` runs and `oxclip config show` prints
//! ([`show`] adds where each key left out came from). Both go through [`load`], so they accept
//! and refuse the same configs with the same messages.

pub mod data;
pub mod dist;
pub mod eval;
pub mod loss;
pub mod model;
pub mod optim;
mod read;
mod show;
pub mod train;
mod yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::model::ModelConfig;
pub use data::DataConfig;
pub use dist::{Backend, DistConfig, ReduceDtype, Shard};
pub use eval::{EvalConfig, EvalDataset};
pub use loss::{LossConfig, LossKind, Tiling};
pub use model::{model_from_file, resolve_model, ModelRef};
pub use optim::OptimConfig;
pub use read::parse_override;
pub use train::{Precision, TrainConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("override {key}: {message}")]
    Override { key: String, message: String },
    #[error("{}", model::unknown_model(.0))]
    UnknownModel(String),
}

/// A resolved run config: the model as its config, every key at the value the run uses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunConfig {
    /// Where checkpoints, TensorBoard events, results.jsonl and config.yaml go.
    pub run_dir: PathBuf,
    /// The model's config (resolved from a built-in name, a file or a model directory).
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub loss: LossConfig,
    /// Where a fresh run's weights come from (fine-tuning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<InitConfig>,
    /// How ranks talk to each other in a multi-process run.
    pub dist: DistConfig,
    /// Benchmark sets evaluated with `data.val` every `train.eval_every` steps.
    #[serde(skip_serializing_if = "EvalConfig::is_empty")]
    pub eval: EvalConfig,
}

/// `init:`, starting weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// Anything weights come in: a run folder (its newest checkpoint), a `checkpoints/` or
    /// `checkpoints/step_N` folder, a model directory (open_clip's or Hugging Face's, pickled
    /// or sharded weights included), one of OpenAI's `.pt` files, or a weights file with
    /// open_clip's or Hugging Face's names: safetensors, or a PyTorch pickle (open_clip's
    /// `epoch_N.pt`, `pytorch_model.bin`), read without running it.
    pub checkpoint: PathBuf,
    /// Also take the optimizer state of `checkpoint`, an open_clip training checkpoint
    /// (`epoch_N.pt`): its AdamW moments and step, so the run continues open_clip's. The
    /// learning-rate schedule is this run's own, from its step 0. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optimizer: bool,
}

/// Values given over the file's, applied before the config is resolved and checked, so a bad
/// one is refused as the key would be: dotted keys with YAML values (see [`parse_override`]),
/// then the three keys a command may set directly.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub set: Vec<(String, serde_yaml::Value)>,
    pub run_dir: Option<PathBuf>,
    pub threads: Option<usize>,
    pub init: Option<PathBuf>,
}

/// Where a resolved key's value came from, when the file did not say it.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Given over the file (an override).
    Overridden,
    /// The model, named in the file: built in, or read from this file or directory.
    BuiltIn,
    ModelFile(PathBuf),
    ModelDirectory(PathBuf),
    /// What the model expects when nothing says otherwise (its image preprocessing).
    ModelDefault,
    /// What `loss.kind` asks of the model (SigLIP's bias and starting temperature).
    Loss,
}

/// Reads, resolves and checks the run config at `path`.
pub fn load(path: &Path, overrides: &Overrides) -> Result<RunConfig, ConfigError> {
    load_with_origins(path, overrides).map(|(config, _)| config)
}

/// [`load`], printed as YAML with a comment on each key the file did not set saying where its
/// value came from (`# default`, `# from the model directory ...`).
pub fn show(path: &Path, overrides: &Overrides) -> Result<String, ConfigError> {
    let (config, origins) = load_with_origins(path, overrides)?;
    Ok(show::annotate(&config.to_yaml(), &origins))
}

/// What [`show`] annotates: the keys the file set, and where the others came from.
struct Origins {
    written: BTreeSet<String>,
    derived: BTreeMap<String, Origin>,
}

fn load_with_origins(
    path: &Path,
    overrides: &Overrides,
) -> Result<(RunConfig, Origins), ConfigError> {
    let (config, origins) = read_and_resolve(path, overrides)?;
    config
        .check()
        .map_err(|e| ConfigError::Invalid { path: path.into(), message: e.to_string() })?;
    Ok((config, origins))
}

/// Stages 1 and 2 ([`read`], [`resolve`]), before the checks.
fn read_and_resolve(
    path: &Path,
    overrides: &Overrides,
) -> Result<(RunConfig, Origins), ConfigError> {
    let (written, in_file, on_command_line) = read::read(path, overrides)?;
    let (config, mut derived) = resolve(written, path)?;
    for key in on_command_line {
        derived.insert(key, Origin::Overridden);
    }
    Ok((config, Origins { written: in_file, derived }))
}

/// The model reference resolved to its config, and what the model and the loss decide filled
/// in where the file is silent; returns the origin of each value so filled.
fn resolve(
    written: read::Written,
    path: &Path,
) -> Result<(RunConfig, BTreeMap<String, Origin>), ConfigError> {
    let mut origins = BTreeMap::new();
    let read::Written { run_dir, model, mut data, train, optim, loss, init, dist, eval } = written;
    let mut model = match model {
        ModelRef::Inline(model) => *model,
        ModelRef::Name(name) => {
            let named = model::resolve_named(&name).map_err(|e| match e {
                // The name is the config's `model:`; say in which file.
                ConfigError::UnknownModel(_) => {
                    ConfigError::Invalid { path: path.into(), message: format!("model: {e}") }
                }
                other => other,
            })?;
            // A model directory also says how its text and images are prepared, unless the
            // config does.
            if let Some(dir) = &named.directory {
                let tokenizer = dir.tokenizer.as_ref().and_then(|t| t.tokenizer_json.as_ref());
                if let (None, Some(file)) = (&data.tokenizer, tokenizer) {
                    data.tokenizer = Some(file.display().to_string());
                    origins.insert("data.tokenizer".into(), named.origin.clone());
                }
                fill_preprocess(&mut data, &dir.preprocess, &named.origin, &mut origins);
            }
            origins.insert("model".into(), named.origin);
            named.model
        }
    };
    let preprocess = crate::prepare::default_preprocess(&model);
    fill_preprocess(&mut data, &preprocess, &Origin::ModelDefault, &mut origins);
    for key in loss.complete_model(&mut model) {
        origins.insert(format!("model.{key}"), Origin::Loss);
    }
    let config = RunConfig { run_dir, model, data, train, optim, loss, init, dist, eval };
    Ok((config, origins))
}

/// Sets each of `data:`'s image keys left out to `preprocess`'s value, noting `origin`.
fn fill_preprocess(
    data: &mut DataConfig,
    preprocess: &oxclip_data_loader::transform::Preprocess,
    origin: &Origin,
    origins: &mut BTreeMap<String, Origin>,
) {
    let left_out = [
        ("image_mean", data.image_mean.is_none()),
        ("image_std", data.image_std.is_none()),
        ("resize_mode", data.resize_mode.is_none()),
        ("interpolation", data.interpolation.is_none()),
    ];
    for (key, _) in left_out.iter().filter(|(_, empty)| *empty) {
        origins.insert(format!("data.{key}"), origin.clone());
    }
    data.image_mean.get_or_insert(preprocess.mean);
    data.image_std.get_or_insert(preprocess.std);
    data.resize_mode.get_or_insert(preprocess.resize_mode);
    data.interpolation.get_or_insert(preprocess.interpolation);
}

impl RunConfig {
    /// Every check of the sections, alone and together: `train` and `oxclip config show` call
    /// it through [`load`], and [`crate::train::fit`] again before it starts.
    pub fn validate(&self) -> Result<(), TrainError> {
        crate::model::validate(&self.model)?;
        self.train.validate()?;
        let (rate, key) = self.train.patch_dropout(&self.model);
        train::check_patch_dropout(key, rate, &self.model)?;
        self.optim.validate(self.train.steps)?;
        self.loss.validate(&self.model)?;
        self.dist.validate()?;
        self.data.shard_options()?;
        self.data.preprocess(&self.model).map(|_| ())
    }

    /// [`RunConfig::validate`], and the tokenizer read and checked against the text tower.
    fn check(&self) -> Result<(), TrainError> {
        self.validate()?;
        self.data.tokenizer(&self.model).map(|_| ())
    }

    /// The resolved config as YAML, every key at its value: what `<run_dir>/config.yaml` and
    /// every checkpoint hold, and what [`load`] reads back to the same config.
    pub fn to_yaml(&self) -> String {
        // ok: serialising plain structs of numbers, strings and lists cannot fail.
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::zoo;

    const GOOD: &str =
        "run_dir: runs/x\nmodel: tiny\ndata:\n  train: synthetic:64\ntrain:\n  steps: 10\n";

    fn set(args: &[&str]) -> Overrides {
        let set = args.iter().map(|a| parse_override(a).expect("an override")).collect();
        Overrides { set, ..Overrides::default() }
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.yaml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn loads_defaults_and_resolves_the_model() {
        let (_d, path) = write(GOOD);
        let cfg = load(&path, &Overrides::default()).expect("loads");
        assert_eq!(cfg.train.batch_size, 256);
        assert_eq!(cfg.optim.lr, 5e-4);
        assert_eq!(cfg.optim.betas, [0.9, 0.98]);
        assert_eq!(cfg.model.embed_dim, 64);
        // The resolved YAML loads back to the same config.
        let (_d2, again) = write(&cfg.to_yaml());
        assert_eq!(load(&again, &Overrides::default()).expect("reloads"), cfg);
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let (_d, path) = write(&GOOD.replace("  steps: 10\n", "  steps: 10\n  bach_size: 4\n"));
        let msg = load(&path, &Overrides::default()).expect_err("rejects").to_string();
        assert!(msg.contains("train"), "{msg}");
        assert!(msg.contains("bach_size"), "{msg}");
        assert!(msg.contains("line 7"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_key_and_line() {
        let (_d, path) = write(&GOOD.replace("steps: 10", "steps: ten"));
        let msg = load(&path, &Overrides::default()).expect_err("rejects").to_string();
        assert!(msg.contains("train.steps"), "{msg}");
        assert!(msg.contains("line 6"), "{msg}");
    }

    /// `train.grad_checkpointing` is a bool; anything else is refused when the config is
    /// read, before any work, naming the key (and the line, from a file).
    #[test]
    fn grad_checkpointing_is_a_bool_and_other_values_name_the_key() {
        let (_d, path) = write(GOOD);
        assert!(!load(&path, &Overrides::default()).expect("loads").train.grad_checkpointing);
        let on = load(&path, &set(&["train.grad_checkpointing=true"])).expect("loads");
        assert!(on.train.grad_checkpointing);
        let msg = load(&path, &set(&["train.grad_checkpointing=maybe"]))
            .expect_err("rejects")
            .to_string();
        assert!(msg.contains("train.grad_checkpointing") && msg.contains("boolean"), "{msg}");
        let (_d, path) =
            write(&GOOD.replace("  steps: 10\n", "  steps: 10\n  grad_checkpointing: maybe\n"));
        let msg = load(&path, &Overrides::default()).expect_err("rejects").to_string();
        assert!(msg.contains("train.grad_checkpointing") && msg.contains("line 7"), "{msg}");
    }

    #[test]
    fn overrides_set_nested_keys_with_yaml_values() {
        let (_d, path) = write(GOOD);
        let cfg = load(
            &path,
            &set(&["train.batch_size=8", "optim.betas=[0.9, 0.95]", "optim.grad_clip_norm=1.0"]),
        )
        .expect("loads");
        assert_eq!(cfg.train.batch_size, 8);
        assert_eq!(cfg.optim.betas, [0.9, 0.95]);
        assert_eq!(cfg.optim.grad_clip_norm, Some(1.0));
        let msg = load(&path, &set(&["train.bogus=1"])).expect_err("rejects").to_string();
        assert!(msg.contains("train.bogus") || msg.contains("bogus"), "{msg}");
        assert!(parse_override("novalue").is_err());
    }

    #[test]
    fn missing_file_and_unknown_model_are_named() {
        let msg = load(Path::new("/nonexistent/run.yaml"), &Overrides::default())
            .expect_err("rejects")
            .to_string();
        assert!(msg.contains("/nonexistent/run.yaml"), "{msg}");
        let (_d, path) = write(&GOOD.replace("model: tiny", "model: ViT-Z-99"));
        let msg = load(&path, &Overrides::default()).expect_err("rejects").to_string();
        assert!(msg.contains("ViT-Z-99"), "{msg}");
    }

    #[test]
    fn builtin_models_resolve_and_unknown_names_get_suggestions() {
        for name in zoo::names() {
            resolve_model(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let msg = resolve_model("vit-b-32").expect_err("names are exact").to_string();
        assert!(
            msg.contains("did you mean ViT-B-32") && msg.contains("oxclip model list"),
            "{msg}"
        );
        assert!(msg.lines().count() == 1 && msg.len() < 200, "{msg}");
    }

    #[test]
    fn model_files_yaml_open_clip_json_and_open_clip_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b32 = zoo::builtin("ViT-B-32").expect("built-in");
        let json_text = include_str!("../../../configs/models/open_clip/ViT-B-32.json");
        let json = dir.path().join("ViT-B-32.json");
        std::fs::write(&json, json_text).expect("write");
        assert_eq!(model_from_file(&json).expect("open_clip JSON"), b32);
        assert_eq!(resolve_model(json.to_str().expect("utf-8")).expect("by path"), b32);
        let hub = dir.path().join("open_clip_config.json");
        std::fs::write(
            &hub,
            format!(
                r#"{{"model_cfg": {json_text}, "preprocess_cfg": {{"mean": [0.5, 0.5, 0.5]}}}}"#
            ),
        )
        .expect("write");
        assert_eq!(model_from_file(&hub).expect("open_clip_config.json"), b32);
        let yaml = dir.path().join("m.yaml");
        std::fs::write(&yaml, serde_yaml::to_string(&b32).expect("yaml")).expect("write");
        assert_eq!(model_from_file(&yaml).expect("YAML"), b32);

        std::fs::write(&json, json_text.replace("\"patch_size\"", "\"patch_sise\""))
            .expect("write");
        let msg = model_from_file(&json).expect_err("unknown field").to_string();
        assert!(
            msg.contains("vision_cfg")
                && msg.contains("patch_sise")
                && msg.contains("ViT-B-32.json"),
            "{msg}"
        );
        std::fs::write(
            &hub,
            r#"{"model_cfg": {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"heds": 2}}}"#,
        )
        .expect("write");
        let msg = model_from_file(&hub).expect_err("unknown field").to_string();
        assert!(msg.contains("model_cfg.text_cfg") && msg.contains("heds"), "{msg}");
    }

    #[test]
    fn siglip_gives_the_model_its_bias_and_micro_batches_are_checked() {
        let (_d, path) = write(GOOD);
        let cfg = load(&path, &set(&["loss.kind=siglip"])).expect("loads");
        let model = &cfg.model;
        assert_eq!(model.init_logit_bias, Some(-10.0));
        assert!((model.init_logit_scale.expect("scale") - 10f64.ln()).abs() < 1e-12);
        // A model config's own values win.
        let (_d, path) = write(&GOOD.replace(
            "model: tiny",
            &format!("model:\n{}  init_logit_bias: -5.0\n", indent(&tiny_yaml())),
        ));
        let cfg = load(&path, &set(&["loss.kind=siglip"])).expect("loads");
        assert_eq!(cfg.model.init_logit_bias, Some(-5.0));
        // CLIP models have no bias.
        let (_d, path) = write(GOOD);
        assert_eq!(load(&path, &Overrides::default()).expect("loads").model.init_logit_bias, None);

        for (micro, message) in [
            ("0", "train.micro_batch_size must be at least 1"),
            ("300", "train.micro_batch_size (300) exceeds train.batch_size (256)"),
        ] {
            let err = load(&path, &set(&[&format!("train.micro_batch_size={micro}")]))
                .expect_err("refused")
                .to_string();
            assert!(err.contains(message), "{err}");
        }
    }

    /// A mapping under `model:` is read as the model itself, so its errors name the key path
    /// and the line (not "did not match any variant of untagged enum ModelRef").
    #[test]
    fn a_typo_inside_an_inline_model_names_its_key_and_line() {
        let inline =
            GOOD.replace("model: tiny", &format!("model:\n{}", indent(&tiny_yaml()).trim_end()));
        let (_d, path) = write(&inline);
        let cfg = load(&path, &Overrides::default()).expect("the inline model loads");
        assert_eq!(cfg.model, zoo::builtin("tiny").expect("built-in"));
        for (from, to, says) in [
            ("  patch_size: 8", "  patch_sise: 8", ["model.vision_cfg", "patch_sise", "line 8"]),
            ("embed_dim: 64", "embed_dims: 64", ["model", "embed_dims", "line 3"]),
            (
                "  layers: 2\n    width: 64\n    patch",
                "  layers: two\n    width: 64\n    patch",
                ["model.vision_cfg.layers", "invalid type", "line 6"],
            ),
        ] {
            assert!(inline.contains(from), "{from}");
            let (_d, path) = write(&inline.replacen(from, to, 1));
            let msg = load(&path, &Overrides::default()).expect_err("rejects").to_string();
            for needle in says {
                assert!(msg.contains(needle), "`{needle}` not in: {msg}");
            }
            assert!(!msg.contains("untagged"), "{msg}");
        }
        // Neither a name nor a mapping.
        let (_d, path) = write(&GOOD.replace("model: tiny", "model: [tiny]"));
        let msg = load(&path, &Overrides::default()).expect_err("rejects").to_string();
        assert!(
            msg.contains("model")
                && msg.contains("a built-in model name")
                && msg.contains("line 2"),
            "{msg}"
        );
    }

    /// A model directory's preprocessing, the built-in model's, the loss's bias and the
    /// overrides each say where they came from; keys the file wrote say nothing.
    #[test]
    fn show_says_where_each_value_came_from() {
        let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_siglip_tiny");
        let text = GOOD.replace("model: tiny", &format!("model: {}", hf.display()));
        let (_d, path) = write(&text);
        let (config, origins) =
            read_and_resolve(&path, &set(&["train.batch_size=8", "loss.kind=siglip"])).unwrap();
        let shown = show::annotate(&config.to_yaml(), &origins);
        let line = |key: &str| {
            shown
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{key}:")))
                .unwrap_or_else(|| panic!("no {key} in:\n{shown}"))
        };
        let from_dir = format!("# from the model directory {}", hf.display());
        assert!(line("model").ends_with(&from_dir), "{shown}");
        assert!(line("image_mean").ends_with(&from_dir), "{shown}");
        assert!(line("resize_mode").ends_with(&format!("squash  {from_dir}")), "{shown}");
        assert!(line("batch_size").ends_with("8  # set on the command line"), "{shown}");
        assert!(shown.contains("\ntrain:\n"), "{shown}");
        assert!(line("steps").ends_with("steps: 10"), "{shown}");
        assert!(line("seed").ends_with("# default"), "{shown}");
        assert!(line("bucket_mb").ends_with("25.0  # default"), "{shown}");
        // The model's own keys are the directory's, not defaults.
        assert!(line("embed_dim").trim_start().starts_with("embed_dim: "), "{shown}");
        assert!(!line("embed_dim").contains('#'), "{shown}");
        // The comments change nothing: the shown YAML is the resolved config.
        let a: serde_yaml::Value = serde_yaml::from_str(&config.to_yaml()).unwrap();
        let b: serde_yaml::Value = serde_yaml::from_str(&shown).unwrap();
        assert_eq!(a, b);

        // A built-in model: its default preprocessing, and SigLIP's bias from the loss.
        let (_d, path) = write(GOOD);
        let (config, origins) = read_and_resolve(&path, &set(&["loss.kind=siglip"])).unwrap();
        let shown = show::annotate(&config.to_yaml(), &origins);
        assert!(shown.contains("model:  # the built-in model of that name\n"), "{shown}");
        assert!(shown.contains("resize_mode: shortest  # the model's default\n"), "{shown}");
        assert!(
            shown.contains("init_logit_bias: -10.0  # what loss.kind asks of the model\n"),
            "{shown}"
        );
    }

    /// The rate comes from `train.force_patch_dropout` when set (0 too: it switches the
    /// model's value off), else from the model; out of [0, 1), or on a ResNet, is refused
    /// naming the key that set it.
    #[test]
    fn patch_dropout_is_the_models_unless_forced_and_is_checked() {
        let with_model_rate = |rate: &str| {
            let model = indent(&tiny_yaml()).replace(
                "  patch_size: 8\n",
                &format!("  patch_size: 8\n    patch_dropout: {rate}\n"),
            );
            GOOD.replace("model: tiny", &format!("model:\n{}", model.trim_end()))
        };
        let (_d, path) = write(&with_model_rate("0.3"));
        let cfg = load(&path, &Overrides::default()).expect("loads");
        assert_eq!(cfg.train.patch_dropout(&cfg.model), (0.3, "vision_cfg.patch_dropout"));
        for (force, expected) in [("0.75", 0.75), ("0", 0.0)] {
            let cfg =
                load(&path, &set(&[&format!("train.force_patch_dropout={force}")])).expect("loads");
            assert_eq!(
                cfg.train.patch_dropout(&cfg.model),
                (expected, "train.force_patch_dropout")
            );
        }
        let (_d, plain) = write(GOOD);
        let cfg = load(&plain, &Overrides::default()).expect("loads");
        assert_eq!(cfg.train.patch_dropout(&cfg.model), (0.0, "vision_cfg.patch_dropout"));

        for bad in ["1.0", "-0.1", ".nan"] {
            let msg = load(&plain, &set(&[&format!("train.force_patch_dropout={bad}")]))
                .expect_err("out of range")
                .to_string();
            assert!(msg.contains("train.force_patch_dropout must be in [0, 1)"), "{msg}");
            let (_d, path) = write(&with_model_rate(bad));
            let msg = load(&path, &Overrides::default()).expect_err("out of range").to_string();
            assert!(msg.contains("vision_cfg.patch_dropout must be in [0, 1)"), "{msg}");
        }

        // A ModifiedResNet has no patch tokens: either key is refused, 0 is not.
        let (_d, rn) = write(&GOOD.replace("model: tiny", "model: RN50"));
        let msg =
            load(&rn, &set(&["train.force_patch_dropout=0.5"])).expect_err("ResNet").to_string();
        assert!(
            msg.contains("train.force_patch_dropout (0.5)") && msg.contains("ModifiedResNet"),
            "{msg}"
        );
        load(&rn, &set(&["train.force_patch_dropout=0"])).expect("0 is off");
        let mut resnet = zoo::builtin("RN50").expect("built-in");
        resnet.vision_cfg.patch_dropout = 0.5;
        let msg = resnet.validate().expect_err("ResNet").to_string();
        assert!(
            msg.contains("vision_cfg.patch_dropout (0.5)") && msg.contains("ModifiedResNet"),
            "{msg}"
        );
        // ConvNeXt has none either, and vit_relpos's relative positions span the whole grid:
        // refused when the config loads, not at the first step.
        for (model, tower) in [
            ("convnext_tiny", "ConvNeXt"),
            ("vit_relpos_medium_patch16_cls_224", "relative-position ViT"),
        ] {
            let (_d, path) = write(&GOOD.replace("model: tiny", &format!("model: {model}")));
            let msg = load(&path, &set(&["train.force_patch_dropout=0.5"]))
                .expect_err("no patch tokens to drop")
                .to_string();
            assert!(
                msg.contains("train.force_patch_dropout (0.5)") && msg.contains(tower),
                "{msg}"
            );
        }
        let (_d, eva) = write(&GOOD.replace("model: tiny", "model: EVA02-B-16"));
        load(&eva, &set(&["train.force_patch_dropout=0.5"])).expect("an EVA trunk drops patches");
    }

    fn tiny_yaml() -> String {
        include_str!("../../../configs/models/tiny.yaml")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    fn indent(text: &str) -> String {
        text.lines().map(|l| format!("  {l}\n")).collect()
    }
}
