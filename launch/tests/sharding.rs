//! `dist.shard` (ZeRO-1/2) in real `oxclip launch` runs on the CPU backend: 4 ranks of 8
//! sharded against one process of 32, the optimizer shards each rank writes, and resuming a
//! sharded checkpoint on another number of ranks (4 -> 2, 2 -> 4) as an unsharded run resumes.

mod util;

use std::path::{Path, PathBuf};

use util::*;

const STEPS: u64 = 20;

/// The tiny model on `synthetic:512` (an indexed source: global batch k holds the same samples
/// whatever the number of ranks), global batch 32, clipping on, a checkpoint at step 10.
fn config(dir: &Path) -> PathBuf {
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: synthetic:512\n  workers: 1\ntrain:\n  batch_size: 32\n  steps: {STEPS}\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 5\n  checkpoint_every: 10\n  keep_checkpoints: 5\n  eval_every: 0\noptim:\n  lr: 1.0e-3\n  warmup_steps: 2\n  grad_clip_norm: 1.0\ndist:\n  backend: cpu\n  timeout_s: 60\n  bucket_mb: 1\n",
        run = dir.join("run").display(),
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// `oxclip train` on `ranks` processes (one without `launch`), rank batch 32 / ranks, into
/// `run`, with `extra` arguments; its output.
fn train(config: &Path, ranks: usize, run: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = if ranks > 1 { launcher(ranks, &[]) } else { oxclip() };
    let batch = format!("train.batch_size={}", 32 / ranks);
    cmd.args(["train", "--config"]).arg(config).arg("--run-dir").arg(run);
    cmd.args(["--set", &batch]).args(extra);
    run_ok(&mut cmd)
}

fn step_file(run: &Path, step: u64, file: &str) -> PathBuf {
    run.join(format!("checkpoints/step_{step}/{file}"))
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len()
}

#[test]
fn four_sharded_ranks_train_and_resume_on_two_as_one_unsharded_rank_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let single = dir.path().join("single");
    train(&config, 1, &single, &[]);

    // 4 x 8, ZeRO-2: the weights of 1 x 32, each rank a quarter of the moments.
    let zero2 = dir.path().join("zero2");
    let out = train(&config, 4, &zero2, &["--set", "dist.shard=gradients"]);
    let model = "model.safetensors";
    let rel = max_rel_diff(&step_file(&single, STEPS, model), &step_file(&zero2, STEPS, model));
    eprintln!("4 x 8 sharded vs 1 x 32: {rel:.2e} of the largest weight");
    assert!(rel <= 1e-5, "4 x 8 sharded differs from 1 x 32 by {rel}");
    let whole = size(&step_file(&single, STEPS, "optimizer.safetensors"));
    for rank in 0..4 {
        let shard =
            size(&step_file(&zero2, STEPS, &format!("optimizer-{rank:05}-of-00004.safetensors")));
        // A quarter of the moments, plus each shard's own header and the padding of the last
        // chunk of each bucket.
        assert!(shard.abs_diff(whole / 4) <= whole / 100, "rank {rank}: {shard} of {whole} bytes");
    }
    assert!(!step_file(&zero2, STEPS, "optimizer.safetensors").exists());
    // Each rank says what it holds.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = stderr
        .lines()
        .filter(|l| l.contains("of AdamW moments on this rank (dist.shard: gradients)"))
        .count();
    assert_eq!(said, 4, "{stderr}");

    // Resumed from step 10: the unsharded run from its own checkpoint, the sharded one on 2
    // ranks, and the sharded checkpoint by one unsharded process.
    let unsharded = dir.path().join("unsharded-resume");
    train(
        &config,
        1,
        &unsharded,
        &["--resume", step_file(&single, 10, "").to_str().expect("utf-8")],
    );
    let from = step_file(&zero2, 10, "");
    let from = from.to_str().expect("utf-8");
    let on_two = dir.path().join("4-to-2");
    train(&config, 2, &on_two, &["--set", "dist.shard=gradients", "--resume", from]);
    let on_one = dir.path().join("4-to-1");
    train(&config, 1, &on_one, &["--resume", from]);
    let reference = step_file(&unsharded, STEPS, model);
    for run in [&on_two, &on_one] {
        let rel = max_rel_diff(&reference, &step_file(run, STEPS, model));
        eprintln!("{}: {rel:.2e} of the largest weight from the unsharded resume", run.display());
        assert!(rel <= 1e-5, "{}: {rel}", run.display());
    }
}

#[test]
fn two_zero1_ranks_resume_on_four_zero2_ranks_as_one_unsharded_rank_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let single = dir.path().join("single");
    train(&config, 1, &single, &["--set", "train.steps=10"]);
    let zero1 = dir.path().join("zero1");
    train(&config, 2, &zero1, &["--set", "dist.shard=optimizer", "--set", "train.steps=10"]);
    assert!(step_file(&zero1, 10, "optimizer-00001-of-00002.safetensors").is_file());

    let unsharded = dir.path().join("unsharded-resume");
    train(
        &config,
        1,
        &unsharded,
        &["--resume", step_file(&single, 10, "").to_str().expect("utf-8")],
    );
    let on_four = dir.path().join("2-to-4");
    let from = step_file(&zero1, 10, "");
    train(
        &config,
        4,
        &on_four,
        &["--set", "dist.shard=gradients", "--resume", from.to_str().expect("utf-8")],
    );
    let model = "model.safetensors";
    let rel =
        max_rel_diff(&step_file(&unsharded, STEPS, model), &step_file(&on_four, STEPS, model));
    eprintln!("2 -> 4 sharded resume vs the unsharded resume: {rel:.2e} of the largest weight");
    assert!(rel <= 1e-5, "{rel}");
}

#[test]
fn sharding_a_single_rank_is_refused_before_any_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let run = dir.path().join("never");
    let out = oxclip()
        .args(["train", "--config"])
        .arg(&config)
        .arg("--run-dir")
        .arg(&run)
        .args(["--set", "dist.shard=optimizer"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("dist.shard: optimizer") && stderr.contains("has one"), "{stderr}");
    assert!(!run.exists(), "a refused run left {}", run.display());
}
