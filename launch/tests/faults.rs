//! A fault on one rank of four, injected by the test build (trainer/src/fault.rs, the
//! `fault-injection` feature) while the backward pass runs: a bucket's flatten fails, a gradient
//! hook panics, a bucket's sum fails to start, a bucket's gradients are missing, or the rank is
//! killed. Real `oxclip train`
//! processes on the CPU backend, started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR,
//! MASTER_PORT), so each rank's own exit and message is seen.
//!
//! - A failure or a lost peer: every rank exits non-zero well within `dist.timeout_s`, naming
//!   the cause (never a timeout); and `--resume auto` afterwards ends with the weights and
//!   optimizer state of the run that never failed.
//! - Missing gradients: every rank sums zeros for them and the run ends normally.
//! - Always: each rank's log of the gradient sums it started (bucket and size, per reduction)
//!   agrees with every other rank's up to where a rank stopped: no rank summed one bucket with
//!   another's.
//!
//! `OXCLIP_FAULT_RUNS=N` repeats every case N times (scripts/fault-soak.sh runs 20).

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use util::*;

const RANKS: usize = 4;
/// dist.timeout_s: a rank that waits it out has not been told the cause.
const TIMEOUT_S: u64 = 60;
const STEPS: u64 = 6;
/// The reduction (1-based, in the process that fails) and bucket the fault strikes.
const FAULT_STEP: u64 = 4;

/// The tiny model, 4 ranks, small buckets (so several launch during the backward pass), a
/// checkpoint every 2 steps.
fn config(dir: &Path) -> PathBuf {
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: synthetic:512\n  workers: 1\ntrain:\n  batch_size: 4\n  steps: {STEPS}\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 1\n  checkpoint_every: 2\n  eval_every: 0\noptim:\n  lr: 1.0e-3\n  warmup_steps: 2\ndist:\n  backend: cpu\n  timeout_s: {TIMEOUT_S}\n  overlap: true\n  bucket_mb: 0.05\n",
        run = dir.join("run").display(),
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// What each rank did: exit success, stderr.
struct Ranks {
    outputs: Vec<Output>,
    took: Duration,
}

impl Ranks {
    fn stderr(&self, rank: usize) -> String {
        String::from_utf8_lossy(&self.outputs[rank].stderr).into_owned()
    }
}

/// Runs the 4 ranks of `config` to their end, with `fault` (an `OXCLIP_FAULT` spec) if any.
fn run_ranks(config: &Path, fault: Option<&str>, resume: bool) -> Ranks {
    let started = Instant::now();
    let outputs = torchrun_ranks(RANKS, fault, |cmd| {
        cmd.args(["train", "--config"]).arg(config);
        if resume {
            cmd.args(["--resume", "auto"]);
        }
        cmd.env("OXCLIP_LOG", "info,oxclip_trainer::grad_sync=trace");
    });
    Ranks { outputs, took: started.elapsed() }
}

/// A rank's gradient sums as its log lists them: (reduction, bucket, values).
fn sums(stderr: &str) -> Vec<(u64, u64, u64)> {
    stderr
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find("reduction ")? + "reduction ".len()..];
            let (reduction, rest) = rest.split_once(": bucket ")?;
            let (bucket, rest) = rest.split_once(" of ")?;
            let values = rest.strip_suffix(" values")?;
            Some((reduction.parse().ok()?, bucket.parse().ok()?, values.trim().parse().ok()?))
        })
        .collect()
}

/// Every rank's sums agree with every other's up to the shorter of the two, and each rank
/// summed at least `at_least`.
fn sums_pair_up(ranks: &Ranks, at_least: usize) {
    let all: Vec<_> = (0..RANKS).map(|r| sums(&ranks.stderr(r))).collect();
    for (r, mine) in all.iter().enumerate() {
        assert!(
            mine.len() >= at_least,
            "rank {r} logged {} sums:\n{}",
            mine.len(),
            ranks.stderr(r)
        );
        for (q, theirs) in all.iter().enumerate() {
            let n = mine.len().min(theirs.len());
            assert_eq!(mine[..n], theirs[..n], "ranks {r} and {q} summed different buckets");
        }
    }
}

/// Every rank failed, within the timeout (it was told, it did not wait it out), each message
/// naming `cause`; but `killed`, which could say nothing.
fn all_fail_naming(ranks: &Ranks, cause: &str, killed: Option<usize>, case: &str) {
    for rank in 0..RANKS {
        let stderr = ranks.stderr(rank);
        assert!(!ranks.outputs[rank].status.success(), "{case}: rank {rank} succeeded:\n{stderr}");
        if Some(rank) != killed {
            assert!(
                stderr.contains(cause),
                "{case}: rank {rank} does not name {cause:?}:\n{stderr}"
            );
        }
    }
    assert!(ranks.took < Duration::from_secs(TIMEOUT_S), "{case}: took {:?}", ranks.took);
}

fn checkpoint(dir: &Path, file: &str) -> PathBuf {
    dir.join(format!("run/checkpoints/step_{STEPS}/{file}"))
}

/// After a failed run: `--resume auto` to the end, and the same weights and optimizer state
/// as the run that never failed.
fn resumes_to_the_reference(dir: &Path, config: &Path, reference: &Path, case: &str) {
    let resumed = run_ranks(config, None, true);
    for rank in 0..RANKS {
        assert!(
            resumed.outputs[rank].status.success(),
            "{case}: resumed rank {rank} failed:\n{}",
            resumed.stderr(rank)
        );
    }
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let diff = max_abs_diff(&checkpoint(dir, file), &checkpoint(reference, file));
        assert_eq!(diff, 0.0, "{case}: {file} differs from the uninterrupted run's");
    }
}

#[test]
fn a_fault_on_one_rank_ends_every_rank_naming_it_and_the_run_resumes_exactly() {
    let runs: usize =
        std::env::var("OXCLIP_FAULT_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let reference = tempfile::tempdir().expect("tempdir");
    let uninterrupted = run_ranks(&config(reference.path()), None, false);
    for rank in 0..RANKS {
        assert!(
            uninterrupted.outputs[rank].status.success(),
            "rank {rank}:\n{}",
            uninterrupted.stderr(rank)
        );
    }
    sums_pair_up(&uninterrupted, 3 * STEPS as usize);

    let mut survived = BTreeMap::new();
    for run in 0..runs {
        for (kind, rank, cause) in [
            ("flatten-fails", 2, "rank 2: flattening gradient bucket 1 failed (injected fault)"),
            ("hook-panics", 1, "rank 1: a gradient hook panicked: injected fault"),
            (
                "collective-fails",
                0,
                "rank 0: the all-reduce of gradient bucket 1 failed to start (injected fault)",
            ),
            ("vanish", 3, "rank 3 closed its connection: it exited"),
        ] {
            let case = format!("{kind} (run {run})");
            let dir = tempfile::tempdir().expect("tempdir");
            let config = config(dir.path());
            let fault = format!("{kind}:rank={rank}:step={FAULT_STEP}:bucket=1");
            let failed = run_ranks(&config, Some(&fault), false);
            all_fail_naming(&failed, cause, (kind == "vanish").then_some(rank), &case);
            sums_pair_up(&failed, 3);
            resumes_to_the_reference(dir.path(), &config, reference.path(), &case);
            *survived.entry(kind).or_insert(0) += 1;
        }

        // Missing gradients are summed as zeros: the run goes on, every rank in step.
        let dir = tempfile::tempdir().expect("tempdir");
        let fault = format!("undefined-grads:rank=2:step={FAULT_STEP}:bucket=1");
        let ranks = run_ranks(&config(dir.path()), Some(&fault), false);
        for rank in 0..RANKS {
            assert!(ranks.outputs[rank].status.success(), "rank {rank}:\n{}", ranks.stderr(rank));
        }
        sums_pair_up(&ranks, 3 * STEPS as usize);
        *survived.entry("undefined-grads").or_insert(0) += 1;
    }
    eprintln!("faults survived: {survived:?}");
}
