//! A checkpoint write that fails mid-file (here: a file size limit, RLIMIT_FSIZE, which a test
//! can set where it cannot mount a small file system; the write then fails with EFBIG as it
//! would with ENOSPC on a full disk): the run stops at once with one sentence naming the file
//! and the OS's cause, leaves no `step_<N>` folder and no temporary folder for the failed
//! write, keeps the earlier checkpoint whole, and `--resume auto` without the limit continues
//! from it to the weights, moments and data position of the run never interrupted.

mod util;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use util::*;

/// `cmd` with every file it writes limited to `bytes`.
fn with_file_size_limit(cmd: &mut Command, bytes: u64) -> &mut Command {
    // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn config(dir: &Path, data: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let extra = "  checkpoint_every: 4\n  keep_checkpoints: 5\n  eval_every: 0\n";
    tiny_config(dir, data, 12, extra, false)
}

#[test]
fn a_checkpoint_write_failing_mid_file_stops_the_run_and_resume_ends_as_if_never_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 160, 0, 32);

    // The run never interrupted.
    let straight = config(&dir.path().join("straight"), &data);
    run_ok(oxclip().args(["train", "--config"]).arg(&straight));
    let straight_ckpts = dir.path().join("straight/run/checkpoints");
    let model_bytes =
        std::fs::metadata(straight_ckpts.join("step_4/model.safetensors")).expect("model").len();
    let optimizer_bytes = std::fs::metadata(straight_ckpts.join("step_4/optimizer.safetensors"))
        .expect("optimizer")
        .len();
    assert!(optimizer_bytes > model_bytes + 4096, "{model_bytes} {optimizer_bytes}");

    // The same run as far as its first checkpoint: training is deterministic, so that
    // checkpoint is the one it would have written (the kill -9 resume tests show as much).
    let cut = config(&dir.path().join("cut"), &data);
    let ckpts = dir.path().join("cut/run/checkpoints");
    std::fs::create_dir_all(ckpts.join("step_4")).expect("mkdir");
    for entry in std::fs::read_dir(straight_ckpts.join("step_4")).expect("step_4") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, ckpts.join("step_4").join(path.file_name().expect("name")))
            .expect("copies");
    }

    // Resumed where every file may hold the model but not the optimizer state: writing
    // step 8's optimizer.safetensors fails part-way.
    let limit = (model_bytes + optimizer_bytes) / 2;
    let out = with_file_size_limit(
        oxclip().args(["train", "--config"]).arg(&cut).args(["--resume", "auto"]),
        limit,
    )
    .output()
    .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let failed = ckpts.join(".step_8.tmp/optimizer.safetensors");
    let sentence = format!(
        "checkpoint step 8: writing {} failed: File too large (os error 27); earlier \
         checkpoints are intact, raise the file size limit (`ulimit -f`)",
        failed.display()
    );
    assert!(stderr.contains(&sentence), "{stderr}");
    assert!(stderr.contains("resume with --resume auto"), "{stderr}");
    assert!(!stderr.contains("libtorch") && !stderr.contains("C++"), "{stderr}");
    // Stopped at once: never trained on to the next save (step 12).
    assert!(!String::from_utf8_lossy(&out.stdout).contains("trained 12"), "{stderr}");
    // Nothing of the failed write is left, and no step_8 that resume could pick.
    let mut left: Vec<String> = std::fs::read_dir(&ckpts)
        .expect("checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["step_4"]);
    for file in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        assert_eq!(
            std::fs::read(ckpts.join("step_4").join(file)).expect("reads"),
            std::fs::read(straight_ckpts.join("step_4").join(file)).expect("reads"),
            "{file} of step 4 changed"
        );
    }

    // Without the limit, --resume auto continues from step 4 to the same end.
    let out = run_ok(oxclip().args(["train", "--config"]).arg(&cut).args(["--resume", "auto"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("resumed at step 4, trained 8 more (12 of 12)"), "{stdout}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(ckpts.join("step_12").join(file)).expect("reads")
                == std::fs::read(straight_ckpts.join("step_12").join(file)).expect("reads"),
            "{file} of step 12 differs from the uninterrupted run's"
        );
    }
    assert_eq!(
        trainer_state(&ckpts.join("step_12")),
        trainer_state(&straight_ckpts.join("step_12"))
    );
}

/// Under `dist.shard` every rank writes its own optimizer shard. Rank 1's failing (its files
/// limited below a shard's size) ends the job on both ranks with rank 1's sentence, and rank 0
/// never writes a manifest or renames a checkpoint missing a shard.
#[test]
fn a_rank_whose_shard_write_fails_ends_the_job_without_a_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let config = dir.path().join("run.yaml");
    std::fs::write(
        &config,
        format!(
            "run_dir: {}\nmodel: tiny\ndata:\n  train: synthetic:64\n  workers: 1\ntrain:\n  batch_size: 8\n  steps: 4\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 1\n  checkpoint_every: 2\n  eval_every: 0\noptim:\n  lr: 1.0e-3\n  warmup_steps: 1\ndist:\n  backend: cpu\n  timeout_s: 60\n  shard: optimizer\n",
            run.display()
        ),
    )
    .expect("config");
    let port = free_port().to_string();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let mut cmd = oxclip();
            cmd.args(["train", "--config"])
                .arg(&config)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            if rank == 1 {
                // A shard is half of 27 MB of moments.
                with_file_size_limit(&mut cmd, 4 << 20);
            }
            cmd.spawn().expect("rank starts")
        })
        .collect();
    let outs: Vec<_> = ranks.into_iter().map(|c| c.wait_with_output().expect("ends")).collect();
    let stderr: Vec<String> =
        outs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
    assert!(outs.iter().all(|o| !o.status.success()), "{stderr:#?}");
    let shard = run.join("checkpoints/.step_2.tmp/optimizer-00001-of-00002.safetensors");
    let sentence = format!(
        "checkpoint step 2: writing {} failed: File too large (os error 27)",
        shard.display()
    );
    assert!(stderr[1].contains(&sentence), "{}", stderr[1]);
    // Rank 0 ends with rank 1's cause, not a timeout.
    assert!(stderr[0].contains("File too large"), "{}", stderr[0]);
    assert!(!shard.exists(), "rank 1's partial shard is left");
    let mut manifests = Vec::new();
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(run.join("checkpoints")).expect("checkpoints") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step_")) {
            steps.push(path.clone());
        }
        if path.join("manifest.json").exists() {
            manifests.push(path);
        }
    }
    assert!(steps.is_empty() && manifests.is_empty(), "{steps:?} {manifests:?}");
}
