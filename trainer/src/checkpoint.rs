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
    /// Position of the next training batch.
    pub loader: LoaderState,
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
    let root = checkpoints_dir(run_dir);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(&root).map_err(io_err(&root))? {
        let entry = entry.map_err(io_err(&root))?;
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
    for (_, dir) in list(run_dir)?.into_iter().rev() {
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
    model::load_weights(vs, &dir.join(MODEL_FILE))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let opt_state: BTreeMap<String, Tensor> = Tensor::read_safetensors(&opt_path)
        .map_err(|e| TrainError::Checkpoint { path: opt_path.clone(), message: e.to_string() })?
        .into_iter()
        .collect();
    optimizer
        .load_state_tensors(&opt_state)
        .map_err(|e| TrainError::Checkpoint { path: opt_path, message: e.to_string() })?;
    Ok(state)
}
