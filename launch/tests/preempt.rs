//! Preemption through `oxclip launch` on the CPU backend: SIGTERM to one rank or to the
//! launcher stops every rank after the same step with a checkpoint and exit code 0, and
//! `--resume auto` then ends with the weights of a run never stopped, bit for bit (the same
//! ranks, the same reduction order, the exact loader positions and optimizer state: nothing
//! is recomputed differently, so nothing may differ). `kill -9` in the middle of a background
//! checkpoint write leaves a temporary folder that resume never picks.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use util::*;

const STEPS: u64 = 16;

/// A 2-rank tiny-model run on `synthetic:512`, rank batch 8, a checkpoint every 4 steps.
fn config(dir: &Path) -> PathBuf {
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: synthetic:512\n  workers: 1\ntrain:\n  batch_size: 8\n  steps: {STEPS}\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 4\n  checkpoint_every: 4\n  keep_checkpoints: 10\n  eval_every: 0\noptim:\n  lr: 1.0e-3\n  warmup_steps: 2\ndist:\n  backend: cpu\n  timeout_s: 60\n",
        run = dir.join("run").display(),
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// `oxclip launch --nproc-per-node 2 -- train --config CONFIG --run-dir RUN EXTRA...`, its
/// output collected on a thread (so that full pipes never stall the ranks); the launcher's pid.
fn launch(
    config: &Path,
    run: &Path,
    extra: &[&str],
    writer_delay_ms: Option<u64>,
) -> (u32, std::thread::JoinHandle<Output>) {
    let mut cmd = launcher(2, &["--grace-s", "5"]);
    cmd.args(["train", "--config"])
        .arg(config)
        .arg("--run-dir")
        .arg(run)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ms) = writer_delay_ms {
        // Test hook: the checkpoint writer sleeps this long before each file.
        cmd.env("OXCLIP_TEST_CHECKPOINT_DELAY_MS", ms.to_string());
    }
    let child: Child = cmd.spawn().expect("launch starts");
    let pid = child.id();
    (pid, std::thread::spawn(move || child.wait_with_output().expect("launcher ends")))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The run never stopped, shared by the tests: its final weights and optimizer state.
fn reference() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &RUN.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        let run = dir.path().join("straight");
        let (_, out) = launch(&config, &run, &[], None);
        let out = out.join().expect("joins");
        assert!(out.status.success(), "{:?}", text(&out));
        (dir, run)
    })
    .1
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what}: {} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The step both ranks say they stopped after, and that it is the same for both.
fn preempted_step(stderr: &str) -> u64 {
    let step_of = |rank: usize| -> u64 {
        let line = stderr
            .lines()
            .find(|l| {
                l.starts_with(&format!("[rank {rank}]")) && l.contains("preempted after step")
            })
            .unwrap_or_else(|| panic!("rank {rank} never said it was preempted:\n{stderr}"));
        let after = line.split("preempted after step ").nth(1).expect("step");
        after.split_whitespace().next().and_then(|s| s.parse().ok()).expect("a step number")
    };
    let step = step_of(0);
    assert_eq!(step_of(1), step, "the ranks stopped after different steps:\n{stderr}");
    step
}

/// `--resume auto` to the end, and the final weights and moments equal the reference's bit for
/// bit. Returns the resumed run's stdout and stderr.
fn resume_matches_the_reference(config: &Path, run: &Path) -> (String, String) {
    let (_, out) = launch(config, run, &["--resume", "auto"], None);
    let out = out.join().expect("joins");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let last = format!("checkpoints/step_{STEPS}/{file}");
        let (a, b) =
            (read_safetensors(&reference().join(&last)), read_safetensors(&run.join(&last)));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, t) in &a {
            assert!(t.equal(&b[name]), "{file}: {name} differs from the uninterrupted run's");
        }
    }
    (stdout, stderr)
}

/// Stops a run with SIGTERM (to `target(launcher)`), checks the clean stop (the report names
/// the signalled ranks: `signalled` is part of it) and the resume.
fn preempt_and_resume(target: impl Fn(u32) -> u32, signalled: &str) {
    reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let run = dir.path().join("run");
    // A slow writer keeps the run going long enough for the signal to land mid-run.
    let (launcher, out) = launch(&config, &run, &[], Some(150));
    wait_for(&run.join("checkpoints/step_4"), "the first checkpoint");
    signal(target(launcher), "-TERM");
    let out = out.join().expect("joins");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "the launcher exited with {}\n{stdout}\n{stderr}", out.status);
    let step = preempted_step(&stderr);
    assert!(step < STEPS, "stopped at the end anyway");
    assert!(
        stdout.contains(&format!("[rank 0] stopped for preemption after step {step} of {STEPS} ("))
            && stdout.contains(signalled),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("[rank 0] to continue, run the same command with --resume auto"),
        "{stdout}"
    );
    // The checkpoint of that step is whole, with both ranks' loader positions.
    let ckpt = run.join(format!("checkpoints/step_{step}"));
    assert!(ckpt.join("manifest.json").is_file(), "{}", ckpt.display());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("trainer_state.json")).expect("state"),
    )
    .expect("json");
    assert_eq!(state["step"].as_u64(), Some(step));
    assert_eq!(state["rank_loaders"].as_array().map(Vec::len), Some(2), "{state}");
    // TensorBoard was flushed: the last logged step before the stop is on disk.
    let logged = read_tensorboard(&run.join("tensorboard"));
    assert!(
        logged["train/loss"].iter().any(|&(s, _)| s as u64 == step / 4 * 4),
        "{:?}",
        logged["train/loss"]
    );

    let (stdout, _) = resume_matches_the_reference(&config, &run);
    assert!(
        stdout.contains(&format!("[rank 0] resumed at step {step}, trained {} more", STEPS - step)),
        "{stdout}"
    );
}

#[test]
fn sigterm_to_one_rank_stops_both_after_the_same_step_with_exit_0_and_resume_is_exact() {
    preempt_and_resume(|launcher| rank_pid(launcher, 1), "(rank 1 got SIGTERM)");
}

#[test]
fn sigterm_to_the_launcher_stops_every_rank_cleanly_and_resume_is_exact() {
    // The launcher passes it to both ranks; a step boundary may fall between the two.
    preempt_and_resume(|launcher| launcher, "got SIGTERM");
}

#[test]
fn kill_9_during_a_background_write_then_a_truncated_latest_resumes_from_the_one_before() {
    reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let run = dir.path().join("run");
    let ckpts = run.join("checkpoints");
    // 400 ms before each file: between the model and the optimizer file of step 12 there is
    // a window wide enough to kill the writer in.
    let (launcher, out) = launch(&config, &run, &[], Some(400));
    wait_for(&ckpts.join(".step_12.tmp/model.safetensors"), "the write of step 12");
    signal(rank_pid(launcher, 0), "-9");
    let out = out.join().expect("joins");
    assert!(!out.status.success(), "{:?}", text(&out));
    // The killed write left its temporary folder, never a step_12.
    assert!(
        ckpts.join(".step_12.tmp").is_dir() && !ckpts.join(".step_12.tmp/manifest.json").exists()
    );
    assert!(!ckpts.join("step_12").exists());
    assert!(ckpts.join("step_8/manifest.json").is_file());

    // Then the latest complete checkpoint is damaged as well.
    let model = ckpts.join("step_8/model.safetensors");
    let file = std::fs::OpenOptions::new().write(true).open(&model).expect("opens");
    let len = file.metadata().expect("meta").len();
    file.set_len(len / 2).expect("truncates");
    drop(file);

    let (stdout, stderr) = resume_matches_the_reference(&config, &run);
    assert!(
        stderr.contains("skipping checkpoint")
            && stderr.contains("step_8: model.safetensors: size"),
        "{stderr}"
    );
    assert!(stdout.contains("[rank 0] resumed at step 4, trained 12 more"), "{stdout}");
}
