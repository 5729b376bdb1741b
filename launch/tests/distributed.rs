//! Multi-process training on the CPU backend, through `oxclip launch`: the same weights as one
//! process on the same global batches, and no hang or leftover process when a rank dies.

mod util;

use std::path::Path;
use std::time::{Duration, Instant};

use util::*;

/// A tiny-model run on `synthetic:512` (an indexed source: global batch k is the same samples
/// whatever the number of ranks), rank batch 8.
fn config(dir: &Path, steps: u64, timeout_s: u64) -> std::path::PathBuf {
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: synthetic:512\n  workers: 1\ntrain:\n  batch_size: 8\n  steps: {steps}\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 2\n  checkpoint_every: 0\noptim:\n  lr: 1.0e-4\n  warmup_steps: 2\ndist:\n  backend: cpu\n  timeout_s: {timeout_s}\n",
        run = dir.join("run").display(),
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn four_ranks_of_8_end_with_the_weights_of_one_rank_of_32() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), 6, 120);
    let single = dir.path().join("single");
    run_ok(oxclip().args(["train", "--config"]).arg(&config).args(["--set", "train.batch_size=32", "--run-dir"]).arg(&single));

    let multi = dir.path().join("multi");
    let out = run_ok(
        oxclip()
            .args(["launch", "--nproc-per-node", "4", "--master-port", &free_port().to_string(), "--", "train", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(&multi),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[rank 0] trained 6 steps"), "{stdout}");
    // Only rank 0 reports and writes.
    assert!(!stdout.contains("[rank 1] trained"), "{stdout}");

    let weights = "checkpoints/step_6/model.safetensors";
    // Relative to the largest weight: per tensor the comparison is ill-posed for the attention
    // key biases, whose gradient is zero in exact arithmetic, so that Adam turns the rounding
    // noise of any summation order into updates of order lr.
    let rel = max_rel_diff(&single.join(weights), &multi.join(weights));
    assert!(rel <= 1e-5, "4 x 8 differs from 1 x 32 by {rel}");
    let opt = "checkpoints/step_6/optimizer.safetensors";
    assert!(multi.join(opt).is_file());
    // The checkpoint carries every rank's loader position.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(multi.join("checkpoints/step_6/trainer_state.json")).expect("state"),
    )
    .expect("json");
    assert_eq!(state["rank_loaders"].as_array().map(Vec::len), Some(4), "{state}");

    // The losses logged are the global batch's, so they match the single process's.
    let (a, b) = (read_tensorboard(&single.join("tensorboard")), read_tensorboard(&multi.join("tensorboard")));
    for ((sa, la), (sb, lb)) in a["train/loss"].iter().zip(&b["train/loss"]) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() <= 1e-4 * la.abs(), "step {sa}: {la} vs {lb}");
    }
}

/// Child processes of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: the comm may hold spaces, so split after the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            kids.push(child);
        }
    }
    kids
}

#[test]
fn a_rank_killed_with_sigkill_ends_the_launch_without_leftovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), 100_000, 20);
    let mut launcher = oxclip()
        .args(["launch", "--nproc-per-node", "2", "--grace-s", "5", "--master-port", &free_port().to_string(), "--", "train", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("launch starts");
    // Wait until both ranks train (rank 0 has written its first events).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.path().join("run/results.jsonl").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(dir.path().join("run/results.jsonl").exists(), "the run never got going");
    let ranks = children(launcher.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let victim = *ranks.iter().max().expect("a rank");
    let killed = std::process::Command::new("kill").args(["-9", &victim.to_string()]).status().expect("kill");
    assert!(killed.success());

    let started = Instant::now();
    let status = loop {
        if let Some(status) = launcher.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the launcher did not end after a rank died");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    for pid in ranks {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "rank process {pid} is still there");
    }
}
