//! `train.precision: amp` in real `oxclip train` processes, two ranks on the CPU backend: an inf
//! put into one gradient on rank 1 (the test build's `inf-grad` fault, trainer/src/fault.rs)
//! reaches rank 0 through the gradient sum, and that step is skipped and the loss scale halved
//! (TensorBoard's `train/loss_scale` and `train/skipped_steps`); a run stopped after it and
//! resumed ends with the same weights, AdamW state and loss scale as the run never stopped.

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use util::*;

const RANKS: usize = 2;
const STEPS: u64 = 5;
/// The reduction (1-based) whose first bucket gets the inf, on rank 1.
const FAULT_STEP: u64 = 3;
const FAULT: &str = "inf-grad:rank=1:step=3:bucket=0";

/// The tiny model under amp, a checkpoint every 2 steps, metrics every step; the gradient
/// sums overlap the backward pass (where the fault strikes). The learning rate is constant
/// after its warmup, so a run of `steps` extended later trains as one of more steps.
fn config(dir: &Path, steps: u64) -> PathBuf {
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: synthetic:512\n  workers: 1\ntrain:\n  batch_size: 4\n  steps: {steps}\n  seed: 7\n  precision: amp\n  device: cpu\n  threads: 1\n  log_every: 1\n  checkpoint_every: 2\n  keep_checkpoints: 10\n  eval_every: 0\noptim:\n  lr: 1.0e-3\n  warmup_steps: 2\n  schedule: const\ndist:\n  backend: cpu\n  timeout_s: 60\n  overlap: true\n  bucket_mb: 0.05\n",
        run = dir.join("run").display(),
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs both ranks of `config` to their end with `fault` (an `OXCLIP_FAULT` spec) if any and
/// `extra` arguments; fails the test unless both exit 0.
fn run_ranks(config: &Path, fault: Option<&str>, extra: &[&str]) -> Vec<Output> {
    let outputs = torchrun_ranks(RANKS, fault, |cmd| {
        cmd.args(["train", "--config"]).arg(config).args(extra);
    });
    for (rank, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "rank {rank} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    outputs
}

/// `tag`'s value at each step 1..=STEPS, from the run's TensorBoard events (a resumed run
/// appends: the last value of a step counts).
fn per_step(dir: &Path, tag: &str) -> Vec<f32> {
    let scalars = read_tensorboard(&dir.join("run/tensorboard"));
    let values: BTreeMap<i64, f32> = scalars
        .get(tag)
        .unwrap_or_else(|| panic!("no {tag} in {scalars:?}"))
        .iter()
        .copied()
        .collect();
    (1..=STEPS as i64)
        .map(|s| *values.get(&s).unwrap_or_else(|| panic!("{tag}: no step {s}")))
        .collect()
}

fn checkpoint(dir: &Path, file: &str) -> PathBuf {
    dir.join(format!("run/checkpoints/step_{STEPS}/{file}"))
}

fn grad_scaler(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(checkpoint(dir, "trainer_state.json")).expect("state");
    let state: serde_json::Value = serde_json::from_str(&text).expect("json");
    state["grad_scaler"].clone()
}

#[test]
fn an_inf_on_one_rank_skips_that_step_everywhere_and_resume_keeps_the_scale() {
    let plain = tempfile::tempdir().expect("tempdir");
    run_ranks(&config(plain.path(), STEPS), None, &[]);
    let faulty = tempfile::tempdir().expect("tempdir");
    run_ranks(&config(faulty.path(), STEPS), Some(FAULT), &[]);

    let (scale, skipped) = (
        per_step(faulty.path(), "train/loss_scale"),
        per_step(faulty.path(), "train/skipped_steps"),
    );
    let (plain_scale, plain_skipped) =
        (per_step(plain.path(), "train/loss_scale"), per_step(plain.path(), "train/skipped_steps"));
    eprintln!("loss scale per step: {plain_scale:?} (skipped {plain_skipped:?}); with an inf at step {FAULT_STEP}: {scale:?} (skipped {skipped:?})");
    // Up to the fault both runs are the same run.
    let before = FAULT_STEP as usize - 1;
    assert_eq!(scale[..before], plain_scale[..before]);
    assert_eq!(skipped[..before], plain_skipped[..before]);
    // The inf rank 1 put into its gradient skips the step on rank 0, which logs: one more
    // skipped step, the scale halved.
    let at = FAULT_STEP as usize - 1;
    assert_eq!(skipped[at], skipped[at - 1] + 1.0, "step {FAULT_STEP} was not skipped");
    assert_eq!(scale[at], scale[at - 1] / 2.0, "the scale did not halve at step {FAULT_STEP}");
    // Without the inf, that step ran (or the test would show nothing).
    assert_eq!(plain_skipped[at], plain_skipped[at - 1], "step {FAULT_STEP} overflowed by itself");
    // AdamW counted one update fewer in the run with the skipped step.
    let adam_steps = |dir: &Path| {
        read_safetensors(&checkpoint(dir, "optimizer.safetensors"))["step"].int64_value(&[])
    };
    assert_eq!(adam_steps(faulty.path()), adam_steps(plain.path()) - 1);
    assert_eq!(
        adam_steps(faulty.path()),
        STEPS as i64 - skipped[STEPS as usize - 1] as i64,
        "AdamW's steps are the steps not skipped"
    );
    assert_eq!(
        grad_scaler(faulty.path())["scale"].as_f64(),
        Some(f64::from(scale[STEPS as usize - 1]))
    );

    // Stopped after step 4 (the inf at step 3 behind it) and resumed without the fault: the
    // same weights, moments and loss scale as the run never stopped.
    let resumed = tempfile::tempdir().expect("tempdir");
    run_ranks(&config(resumed.path(), STEPS - 1), Some(FAULT), &[]);
    let set = format!("train.steps={STEPS}");
    run_ranks(&config(resumed.path(), STEPS - 1), None, &["--resume", "auto", "--set", &set]);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let diff =
            max_abs_diff(&checkpoint(resumed.path(), file), &checkpoint(faulty.path(), file));
        assert_eq!(diff, 0.0, "{file} differs from the uninterrupted run's");
    }
    assert_eq!(grad_scaler(resumed.path()), grad_scaler(faulty.path()));
    assert_eq!(per_step(resumed.path(), "train/loss_scale"), scale);
}

/// Under `dist.shard: gradients` the inf reaches only the rank that owns that element of the
/// summed gradient (rank 0): every rank still skips the step, as the ranks agree on the inf
/// before updating, so the sharded run logs and ends as the replicated one does.
#[test]
fn an_inf_in_one_ranks_share_skips_the_sharded_step_everywhere() {
    let replicated = tempfile::tempdir().expect("tempdir");
    run_ranks(&config(replicated.path(), STEPS), Some(FAULT), &[]);
    let sharded = tempfile::tempdir().expect("tempdir");
    run_ranks(&config(sharded.path(), STEPS), Some(FAULT), &["--set", "dist.shard=gradients"]);
    for tag in ["train/loss_scale", "train/skipped_steps"] {
        assert_eq!(per_step(sharded.path(), tag), per_step(replicated.path(), tag), "{tag}");
    }
    let at = FAULT_STEP as usize - 1;
    let skipped = per_step(sharded.path(), "train/skipped_steps");
    assert_eq!(skipped[at], skipped[at - 1] + 1.0, "step {FAULT_STEP} was not skipped");
    let (a, b) = (
        checkpoint(replicated.path(), "model.safetensors"),
        checkpoint(sharded.path(), "model.safetensors"),
    );
    let rel = max_rel_diff(&a, &b);
    assert!(rel <= 1e-6, "sharded amp differs from replicated amp by {rel}");
}
