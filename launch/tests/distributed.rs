//! Multi-process training on the CPU backend, through `oxclip launch`: the same weights as one
//! process on the same global batches, and no hang or leftover process when a rank dies.

mod util;

use std::path::Path;
use std::time::{Duration, Instant};

use util::*;

/// A tiny-model run on `synthetic:512` (an indexed source: global batch k is the same samples
/// whatever the number of ranks), rank batch 8.
fn config(dir: &Path, steps: u64, timeout_s: u64) -> std::path::PathBuf {
    // Held-out synthetic scenes, labelled with 24 classes: zero-shot and retrieval at the end.
    let classnames = dir.join("classnames.txt");
    std::fs::write(&classnames, (0..24).map(|i| format!("class {i}\n")).collect::<String>())
        .expect("classnames");
    let templates = dir.join("templates.txt");
    std::fs::write(&templates, "a photo of a {}.\na drawing of the {}.\n").expect("templates");
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: synthetic:512\n  val: synthetic:70\n  classnames: {classes}\n  templates: {templates}\n  workers: 1\ntrain:\n  batch_size: 8\n  steps: {steps}\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 2\n  checkpoint_every: 0\n  eval_every: 0\noptim:\n  lr: 1.0e-4\n  warmup_steps: 2\ndist:\n  backend: cpu\n  timeout_s: {timeout_s}\n",
        run = dir.join("run").display(),
        classes = classnames.display(),
        templates = templates.display(),
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
    run_ok(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .args(["--set", "train.batch_size=32", "--run-dir"])
            .arg(&single),
    );

    let multi = dir.path().join("multi");
    let out = run_ok(
        launcher(4, &[]).args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&multi),
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
        &std::fs::read_to_string(multi.join("checkpoints/step_6/trainer_state.json"))
            .expect("state"),
    )
    .expect("json");
    assert_eq!(state["rank_loaders"].as_array().map(Vec::len), Some(4), "{state}");

    // The final evaluation, spread over 4 ranks (70 samples: uneven shares), scores the whole
    // held-out set as the single process does.
    for tag in ["val/image_to_text_R@1", "val/text_to_image_mean_rank", "val/val-zeroshot-top1"] {
        let (a, b) = (
            &read_tensorboard(&single.join("tensorboard"))[tag],
            &read_tensorboard(&multi.join("tensorboard"))[tag],
        );
        assert_eq!(a.len(), 1, "{tag}");
        assert!((a[0].1 - b[0].1).abs() <= 1.0 / 70.0 + 1e-6, "{tag}: {} vs {}", a[0].1, b[0].1);
    }

    // The losses logged are the global batch's, so they match the single process's.
    let (a, b) = (
        read_tensorboard(&single.join("tensorboard")),
        read_tensorboard(&multi.join("tensorboard")),
    );
    for ((sa, la), (sb, lb)) in a["train/loss"].iter().zip(&b["train/loss"]) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() <= 1e-4 * la.abs(), "step {sa}: {la} vs {lb}");
    }
}

#[test]
fn a_rank_killed_with_sigkill_ends_the_launch_without_leftovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), 100_000, 20);
    let mut launcher = launcher(2, &["--grace-s", "5"])
        .args(["train", "--config"])
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
    let killed = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    let started = Instant::now();
    let status = loop {
        if let Some(status) = launcher.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the launcher did not end after a rank died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    for pid in ranks {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "rank process {pid} is still there");
    }
}

#[test]
fn a_stalled_rank_fails_the_others_within_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), 100_000, 3);
    let launcher = launcher(2, &["--grace-s", "2"])
        .args(["train", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("launch starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.path().join("run/results.jsonl").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ranks = children(launcher.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    // Freeze rank 1 (SIGSTOP): alive, connected, silent.
    let victim = *ranks.iter().max().expect("a rank");
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &victim.to_string()])
        .status()
        .expect("kill")
        .success());
    let started = Instant::now();
    let output = launcher.wait_with_output().expect("launcher ends");
    assert!(!output.status.success());
    // dist.timeout_s is 3: the collective fails after it, then the launcher ends the rest.
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nothing from rank 1 for 3s"), "{stderr}");
    for pid in ranks {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "rank process {pid} is still there");
    }
}

#[test]
fn ranks_with_different_configs_refuse_to_train() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), 4, 30);
    let port = free_port().to_string();
    let rank = |r: &str, lr: &str| {
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .args(["--set", &format!("optim.lr={lr}")])
            .env("RANK", r)
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("rank starts")
    };
    let (a, b) = (rank("0", "1e-4"), rank("1", "2e-4"));
    for child in [a, b] {
        let out = child.wait_with_output().expect("rank ends");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("rank 1's config differs from rank 0's"), "{stderr}");
    }
}

#[test]
fn a_rank_asking_for_another_ranks_gpu_stops_naming_itself_before_joining() {
    // Rank 1 of a 2-rank node asks for cuda:0, its neighbour's GPU. Whatever this machine has
    // (no GPU, one, or several) the device check refuses it before the rendezvous, so no
    // peer is needed and the error names the rank and its place on the node.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), 4, 30);
    let out = oxclip()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", "train.device=cuda:0"])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "1")
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .expect("rank runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rank 1 (local rank 1 of 2)"), "{stderr}");
    assert!(!stderr.contains("could not join rank 0"), "{stderr}");
}

#[test]
fn two_ranks_on_shards_resume_each_rank_where_it_stood() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 300, 0, 32);
    let config = tiny_config(
        dir.path(),
        &data,
        10,
        "  checkpoint_every: 4\n  keep_checkpoints: 5\n  eval_every: 0\n",
        false,
    );
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("  workers: 2\n", "  workers: 2\n  shuffle_buffer: 40\n  log_keys: true\ndist:\n  backend: cpu\n  timeout_s: 60\n"))
        .expect("config");
    let launch = |run: &Path, resume: Option<&Path>| {
        let mut cmd = launcher(2, &[]);
        cmd.args(["train", "--config"]).arg(&config).arg("--run-dir").arg(run);
        if let Some(from) = resume {
            cmd.arg("--resume").arg(from);
        }
        run_ok(&mut cmd);
    };
    let straight = dir.path().join("straight");
    launch(&straight, None);
    // Continue the straight run's step-4 checkpoint in a new directory: each rank gets its own
    // stream position back, so every rank sees the batches it saw the first time.
    let resumed = dir.path().join("resumed");
    launch(&resumed, Some(&straight.join("checkpoints/step_4")));
    let weights = "checkpoints/step_10/model.safetensors";
    assert!(max_abs_diff(&straight.join(weights), &resumed.join(weights)) <= 1e-6);
    for rank in 0..2 {
        let keys = |run: &Path| {
            std::fs::read_to_string(run.join(format!("keys-rank{rank}.tsv")))
                .expect("key log")
                .lines()
                .filter(|l| {
                    l.split('\t').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s > 4)
                })
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let (a, b) = (keys(&straight), keys(&resumed));
        assert_eq!(a.len(), 6);
        assert_eq!(a, b, "rank {rank}");
    }
}
