//! Checkpoints: `<run_dir>/checkpoints/step_<N>/` holding `model.safetensors` (open_clip keys),
//! `optimizer.safetensors` (AdamW moments and step) and `trainer_state.json` (counters, loader
//! position, seed, the resolved config). A checkpoint is written under a temporary name and
//! renamed into place, so a directory named `step_<N>` is always complete.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use oxclip_data_loader::LoaderState;
use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use crate::error::{io_err, Result, TrainError};
use crate::model;
use crate::optim::AdamW;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

/// Everything besides tensors that a resumed run needs to continue as if never stopped.
/// There is no global RNG state to save: after initialisation nothing draws from it, and the
/// loader derives every random choice from (seed, epoch, sample index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Samples consumed over all ranks.
    pub samples_seen: u64,
    pub seed: u64,
    /// Position of the next training batch (rank 0's).
    pub loader: LoaderState,
    /// Every rank's position, in rank order, when the run had several ranks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_loaders: Vec<LoaderState>,
    /// The resolved run config, as written to `<run_dir>/config.yaml`.
    pub config: String,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes a checkpoint for `state.step` and keeps only the newest `keep`.
pub fn save(run_dir: &Path, vs: &nn::VarStore, optimizer: &AdamW, state: &TrainerState, keep: usize) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    fs::create_dir_all(&root).map_err(io_err(&root))?;
    let name = format!("step_{}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let dst = root.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;

    model::save_weights(vs, &tmp.join(MODEL_FILE))?;
    let opt_state: Vec<(String, Tensor)> = optimizer
        .state_tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.f_to_device(tch::Device::Cpu)?.f_contiguous()?)))
        .collect::<Result<_>>()?;
    let opt_path = tmp.join(OPTIMIZER_FILE);
    Tensor::write_safetensors(&opt_state, &opt_path)
        .map_err(|e| TrainError::Checkpoint { path: opt_path.clone(), message: e.to_string() })?;
    let state_path = tmp.join(STATE_FILE);
    let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    fs::write(&state_path, json).map_err(io_err(&state_path))?;
    for file in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
        let path = tmp.join(file);
        fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io_err(&path))?;
    }

    if dst.exists() {
        fs::remove_dir_all(&dst).map_err(io_err(&dst))?;
    }
    fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    fs::File::open(&root).and_then(|f| f.sync_all()).map_err(io_err(&root))?;
    prune(&root, keep)?;
    Ok(dst)
}

/// The complete checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list_in(&checkpoints_dir(run_dir))
}

/// The `step_<N>` directories of a `checkpoints/` folder, oldest first.
pub fn list_in(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step_").and_then(|s| s.parse::<u64>().ok()) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let run_dir = root.parent().unwrap_or(root);
    let all = list(run_dir)?;
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        fs::remove_dir_all(path).map_err(io_err(path))?;
    }
    Ok(())
}

/// Reads a checkpoint's trainer state without touching tensors.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint { path, message: e.to_string() })
}

/// The newest checkpoint whose files are all present and whose state parses; older ones are
/// tried when a newer one is damaged (each skip is logged).
pub fn latest_valid(run_dir: &Path) -> Result<Option<PathBuf>> {
    latest_valid_in(&checkpoints_dir(run_dir))
}

/// [`latest_valid`] among the `step_<N>` directories of a `checkpoints/` folder.
pub fn latest_valid_in(root: &Path) -> Result<Option<PathBuf>> {
    for (_, dir) in list_in(root)?.into_iter().rev() {
        let complete = [MODEL_FILE, OPTIMIZER_FILE].iter().all(|f| dir.join(f).is_file());
        match (complete, read_state(&dir)) {
            (true, Ok(_)) => return Ok(Some(dir)),
            (false, _) => tracing::warn!("skipping {}: files are missing", dir.display()),
            (_, Err(e)) => tracing::warn!("skipping {}: {e}", dir.display()),
        }
    }
    Ok(None)
}

/// Restores weights and optimizer state from `dir`; returns the trainer state.
pub fn load(dir: &Path, vs: &nn::VarStore, optimizer: &mut AdamW) -> Result<TrainerState> {
    let state = read_state(dir)?;
    let missing: Vec<&str> = [MODEL_FILE, OPTIMIZER_FILE].into_iter().filter(|f| !dir.join(f).is_file()).collect();
    if !missing.is_empty() {
        // Weights alone (an export, or a copy without the optimizer) can start a fresh run, not continue one.
        return Err(TrainError::Checkpoint {
            path: dir.into(),
            message: format!("has no {}, so training cannot continue from it; --init starts a fresh run from its weights", missing.join(" or ")),
        });
    }
    model::load_weights(vs, &dir.join(MODEL_FILE))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let opt_state: BTreeMap<String, Tensor> = model::read_safetensors(&opt_path)?;
    optimizer
        .load_state_tensors(&opt_state)
        .map_err(|e| TrainError::Checkpoint { path: opt_path, message: e.to_string() })?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Clip, ModelConfig};
    use crate::optim::AdamWConfig;
    use tch::{Device, Kind};

    fn setup(seed: i64) -> (nn::VarStore, Clip, AdamW) {
        tch::manual_seed(seed);
        let cfg: ModelConfig = serde_yaml::from_str(include_str!("../../configs/models/tiny.yaml")).expect("parses");
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg).expect("builds");
        let opt = AdamW::new(vs.variables().into_iter().collect(), AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 });
        (vs, model, opt)
    }

    fn state(step: u64) -> TrainerState {
        TrainerState { step, samples_seen: step * 4, seed: 3, loader: LoaderState::at(1, 2), rank_loaders: Vec::new(), config: "x: 1\n".into() }
    }

    #[test]
    fn round_trip_restores_weights_moments_and_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vs, model, mut opt) = setup(0);
        // One real update so the moments are non-zero.
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        model.encode_image(&images).sum(Kind::Float).backward();
        opt.step(1e-3);
        let saved = save(dir.path(), &vs, &opt, &state(5), 3).expect("saves");
        assert_eq!(saved, dir.path().join("checkpoints/step_5"));

        let (vs2, _, mut opt2) = setup(9);
        let restored = load(&saved, &vs2, &mut opt2).expect("loads");
        assert_eq!(restored, state(5));
        assert_eq!(opt2.steps_taken(), 1);
        let a = vs.variables();
        for (name, t) in vs2.variables() {
            assert!(t.equal(&a[&name]), "{name}");
        }
        let (s1, s2) = (opt.state_tensors(), opt2.state_tensors());
        for ((k1, t1), (k2, t2)) in s1.iter().zip(&s2) {
            assert_eq!(k1, k2);
            assert!(t1.equal(t2), "{k1}");
        }
    }

    #[test]
    fn keeps_the_newest_and_skips_damaged_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vs, _, opt) = setup(0);
        for step in [2, 4, 6] {
            save(dir.path(), &vs, &opt, &state(step), 2).expect("saves");
        }
        let steps: Vec<u64> = list(dir.path()).expect("lists").into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![4, 6]);
        // A damaged newest checkpoint (as a crash mid-copy by hand could leave) is passed over.
        fs::remove_file(dir.path().join("checkpoints/step_6").join(OPTIMIZER_FILE)).expect("rm");
        assert_eq!(latest_valid(dir.path()).expect("ok"), Some(dir.path().join("checkpoints/step_4")));
        fs::write(dir.path().join("checkpoints/step_4").join(STATE_FILE), "{").expect("write");
        assert_eq!(latest_valid(dir.path()).expect("ok"), None);
        // Leftover temporary directories are not checkpoints.
        fs::create_dir_all(dir.path().join("checkpoints/.step_8.tmp")).expect("mkdir");
        assert!(list(dir.path()).expect("lists").iter().all(|(s, _)| *s != 8));
    }
}
