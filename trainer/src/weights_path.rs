//! What a path given for weights is. Every flag and key that takes weights (`--checkpoint`,
//! `--init`, `init.checkpoint`, `--resume`) goes through [`locate`], so they all accept the
//! same things: a run folder, its `checkpoints/` folder, a `checkpoints/step_N` folder, a
//! model directory in open_clip's hub layout or Hugging Face's (`CLIPModel`, `SiglipModel`;
//! what `oxclip export` writes too, and what those libraries publish: pickled
//! `pytorch_model.bin` / `open_clip_pytorch_model.bin`, sharded `*.index.json`), one of
//! OpenAI's own `clip.load` files, or a weights file (safetensors, or a PyTorch pickle such as
//! open_clip's `epoch_N.pt`, read without running it).
//! What was found is an enum, so a caller can say what it needs of each (the architecture,
//! an optimizer state) and new kinds of folder join the same rule.

use std::path::{Path, PathBuf};

use crate::checkpoint::{self, MODEL_FILE, STATE_FILE};
use crate::error::{io_err, Result, TrainError};
use crate::interchange::hugging_face::{HF_CONFIG, HF_WEIGHTS, HF_WEIGHTS_FILES};
use crate::interchange::open_clip::{OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS_FILES};
use crate::interchange::pickle;
use crate::interchange::pretrained::{hf_weights_in, open_clip_weights_in, Pretrained};

/// Where the weights of a path are, and what came with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// An oxclip checkpoint (`checkpoints/step_N/`): named itself (or its `model.safetensors`),
    /// or the newest complete one of a run folder or a `checkpoints/` folder. It carries the
    /// run config (so the architecture) and, when complete, the optimizer state.
    Checkpoint { dir: PathBuf },
    /// open_clip layout: `open_clip_model.safetensors` (or the pickled
    /// `open_clip_pytorch_model.bin`), with `open_clip_config.json` (whose `model_cfg` is the
    /// architecture) when it sits beside it.
    OpenClip { weights: PathBuf, config: Option<PathBuf> },
    /// Hugging Face layout (`CLIPModel`, `SiglipModel`): `model.safetensors`,
    /// `pytorch_model.bin` or a sharded checkpoint's `*.index.json`, beside a `config.json`.
    HuggingFace { weights: PathBuf, config: PathBuf },
    /// One of OpenAI's `clip.load` files (a TorchScript archive): its tensors' shapes are its
    /// architecture.
    OpenAi { weights: PathBuf },
    /// A weights file on its own (safetensors, or a PyTorch pickle such as open_clip's
    /// `epoch_N.pt`): the architecture has to be given.
    File(PathBuf),
}

impl Found {
    /// The file holding the weights (for a sharded checkpoint, its index).
    pub fn weights(&self) -> PathBuf {
        match self {
            Found::Checkpoint { dir } => dir.join(MODEL_FILE),
            Found::OpenClip { weights, .. }
            | Found::HuggingFace { weights, .. }
            | Found::OpenAi { weights }
            | Found::File(weights) => weights.clone(),
        }
    }

    /// The directory's own config, translated (architecture, preprocessing, tokenizer files),
    /// for a Hugging Face `CLIPModel` / `SiglipModel` directory or an open_clip directory with
    /// its `open_clip_config.json`, or the architecture an OpenAI file's shapes say; `None` for
    /// a checkpoint (its run config says) or a bare file.
    pub fn pretrained(&self) -> Result<Option<Pretrained>> {
        match self {
            Found::HuggingFace { weights, config } => {
                Pretrained::hugging_face(config, weights).map(Some)
            }
            Found::OpenClip { weights, config: Some(config) } => {
                Pretrained::open_clip(config, weights).map(Some)
            }
            Found::OpenAi { weights } => Pretrained::openai(weights).map(Some),
            _ => Ok(None),
        }
    }

    /// What it is, for messages: "an oxclip checkpoint", ...
    pub fn describe(&self) -> &'static str {
        match self {
            Found::Checkpoint { .. } => "an oxclip checkpoint",
            Found::OpenClip { .. } => "an open_clip export",
            Found::HuggingFace { .. } => "a Hugging Face export",
            Found::OpenAi { .. } => "an OpenAI CLIP file (TorchScript)",
            Found::File(_) => "a weights file",
        }
    }
}

/// Finds the weights `path` names; see the module doc for what it accepts. When nothing fits,
/// the error lists what the folder holds.
pub fn locate(path: &Path) -> Result<Found> {
    let fail = |message: String| TrainError::WeightsPath { path: path.into(), message };
    if path.is_file() {
        return Ok(file(path));
    }
    if !path.is_dir() {
        return Err(fail("no such file or folder".into()));
    }
    if path.join(STATE_FILE).is_file() {
        if !path.join(MODEL_FILE).is_file() {
            return Err(fail(format!(
                "a checkpoint without its {MODEL_FILE} (an incomplete copy?)"
            )));
        }
        return Ok(Found::Checkpoint { dir: path.into() });
    }
    if let Some(weights) = open_clip_weights_in(path) {
        return Ok(file(&weights));
    }
    if let (true, Some(weights)) = (path.join(HF_CONFIG).is_file(), hf_weights_in(path)) {
        return Ok(file(&weights));
    }
    // A run folder (its `checkpoints/`) or the `checkpoints/` folder itself.
    let checkpoints = checkpoint::checkpoints_dir(path);
    let root = if checkpoints.is_dir() {
        Some(checkpoints)
    } else if path.file_name().is_some_and(|n| n == "checkpoints")
        || !checkpoint::list_in(path)?.is_empty()
    {
        Some(path.to_path_buf())
    } else {
        None
    };
    if let Some(root) = root {
        return match checkpoint::latest_valid_in(&root)? {
            Some(dir) => Ok(Found::Checkpoint { dir }),
            None => Err(fail(format!(
                "holds no complete checkpoint (step_N/ with {MODEL_FILE}, optimizer.safetensors and {STATE_FILE}); {} holds {}",
                root.display(),
                listing(&root)?
            ))),
        };
    }
    if path.join(HF_WEIGHTS).is_file() {
        return Ok(Found::File(path.join(HF_WEIGHTS)));
    }
    Err(fail(format!(
        "not a run folder, a checkpoints/ folder, a checkpoints/step_N folder, a model directory (open_clip's, \
         Hugging Face's, or one `oxclip export` wrote), or a weights file; it holds {}",
        listing(path)?
    )))
}

/// A file: a checkpoint's or an export's weights when its name and neighbours say so (so
/// their architecture is found too), else a weights file on its own.
fn file(path: &Path) -> Found {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name == MODEL_FILE && dir.join(STATE_FILE).is_file() {
        return Found::Checkpoint { dir: dir.into() };
    }
    if OPEN_CLIP_WEIGHTS_FILES.contains(&name.as_str()) {
        let config = dir.join(OPEN_CLIP_CONFIG);
        return Found::OpenClip {
            weights: path.into(),
            config: config.is_file().then_some(config),
        };
    }
    if HF_WEIGHTS_FILES.contains(&name.as_str()) && dir.join(HF_CONFIG).is_file() {
        return Found::HuggingFace { weights: path.into(), config: dir.join(HF_CONFIG) };
    }
    if pickle::is_torchscript(path) {
        return Found::OpenAi { weights: path.into() };
    }
    Found::File(path.into())
}

/// "a.txt, b/, c.json (3 entries)", the first few names in order, folders marked with `/`.
fn listing(dir: &Path) -> Result<String> {
    const SHOWN: usize = 6;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let slash = if entry.path().is_dir() { "/" } else { "" };
        names.push(format!("{}{slash}", entry.file_name().to_string_lossy()));
    }
    if names.is_empty() {
        return Ok("nothing (an empty folder)".into());
    }
    names.sort();
    let count = names.len();
    let more = if count > SHOWN { ", ..." } else { "" };
    let plural = if count == 1 { "entry" } else { "entries" };
    Ok(format!(
        "{}{more} ({count} {plural})",
        names.into_iter().take(SHOWN).collect::<Vec<_>>().join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interchange::open_clip::OPEN_CLIP_WEIGHTS;
    use std::fs;

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, b"x").expect("write");
    }

    fn step(run: &Path, n: u64, complete: bool) -> PathBuf {
        let dir = run.join(format!("checkpoints/step_{n}"));
        touch(&dir.join(MODEL_FILE));
        if complete {
            touch(&dir.join("optimizer.safetensors"));
            let state = crate::checkpoint::TrainerState {
                step: n,
                samples_seen: n,
                seed: 1,
                loader: oxclip_data_loader::LoaderState::at(0, n),
                rank_loaders: Vec::new(),
                grad_scaler: None,
                config: String::new(),
            };
            fs::write(dir.join(STATE_FILE), serde_json::to_string(&state).expect("json"))
                .expect("write");
            // Its placeholder files are what it was written with, as far as resume checks.
            crate::checkpoint::write_manifest(&dir).expect("manifest");
        }
        dir
    }

    #[test]
    fn every_kind_of_path_is_recognised() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let run = tmp.path().join("run");
        step(&run, 10, true);
        let newest = step(&run, 20, true);
        step(&run, 30, false); // an interrupted copy: passed over
        let newest_found = Found::Checkpoint { dir: newest.clone() };
        assert_eq!(locate(&run).expect("run"), newest_found);
        assert_eq!(locate(&run.join("checkpoints")).expect("checkpoints/"), newest_found);
        assert_eq!(locate(&newest).expect("step"), newest_found);
        assert_eq!(locate(&newest.join(MODEL_FILE)).expect("its file"), newest_found);

        let oc = tmp.path().join("oc");
        touch(&oc.join(OPEN_CLIP_WEIGHTS));
        touch(&oc.join(OPEN_CLIP_CONFIG));
        let found = Found::OpenClip {
            weights: oc.join(OPEN_CLIP_WEIGHTS),
            config: Some(oc.join(OPEN_CLIP_CONFIG)),
        };
        assert_eq!(locate(&oc).expect("open_clip"), found);
        assert_eq!(locate(&oc.join(OPEN_CLIP_WEIGHTS)).expect("open_clip file"), found);

        let hf = tmp.path().join("hf");
        touch(&hf.join(HF_WEIGHTS));
        touch(&hf.join(HF_CONFIG));
        let found = Found::HuggingFace { weights: hf.join(HF_WEIGHTS), config: hf.join(HF_CONFIG) };
        assert_eq!(locate(&hf).expect("hf"), found);
        assert_eq!(locate(&hf.join(HF_WEIGHTS)).expect("hf file"), found);

        let bare = tmp.path().join("w.safetensors");
        touch(&bare);
        assert_eq!(locate(&bare).expect("file"), Found::File(bare.clone()));
    }

    /// The weights files those libraries publish besides safetensors: each found in its
    /// directory, in transformers' and open_clip's order of preference; an OpenAI file
    /// (TorchScript) known as such, a torch.save file as a bare weights file.
    #[test]
    fn pickled_and_sharded_weights_are_found() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let hf = tmp.path().join("hf");
        touch(&hf.join(HF_CONFIG));
        for name in HF_WEIGHTS_FILES.iter().rev() {
            touch(&hf.join(name));
            let found = Found::HuggingFace { weights: hf.join(name), config: hf.join(HF_CONFIG) };
            assert_eq!(locate(&hf).expect("hf"), found, "{name}");
            assert_eq!(locate(&hf.join(name)).expect("hf file"), found, "{name}");
        }
        let oc = tmp.path().join("oc");
        touch(&oc.join("open_clip_pytorch_model.bin"));
        let found =
            Found::OpenClip { weights: oc.join("open_clip_pytorch_model.bin"), config: None };
        assert_eq!(locate(&oc).expect("open_clip"), found);

        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pickle");
        let openai = fixtures.join("openai_vit.pt");
        assert_eq!(locate(&openai).expect("openai"), Found::OpenAi { weights: openai.clone() });
        let epoch = fixtures.join("epoch_3.pt");
        assert_eq!(locate(&epoch).expect("epoch"), Found::File(epoch.clone()));
    }

    #[test]
    fn what_does_not_fit_is_described() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = locate(&tmp.path().join("nope")).expect_err("missing").to_string();
        assert!(err.contains("nope") && err.contains("no such file or folder"), "{err}");

        let other = tmp.path().join("other");
        for i in 0..9 {
            touch(&other.join(format!("f{i}.txt")));
        }
        fs::create_dir_all(other.join("sub")).expect("mkdir");
        let err = locate(&other).expect_err("nothing fits").to_string();
        assert!(
            err.contains("f0.txt, f1.txt")
                && err.contains("(10 entries)")
                && !err.contains("f8.txt"),
            "{err}"
        );

        // A config.json without weights is no model directory.
        let bare = tmp.path().join("bare");
        touch(&bare.join(HF_CONFIG));
        let err = locate(&bare).expect_err("no weights").to_string();
        assert!(err.contains("config.json (1 entry)"), "{err}");

        let run = tmp.path().join("run");
        step(&run, 5, false);
        let err = locate(&run).expect_err("incomplete").to_string();
        assert!(err.contains("no complete checkpoint") && err.contains("step_5/"), "{err}");
    }
}
