//! One run per run folder: while a run trains, a second `oxclip train` into its folder (fresh or
//! `--resume auto`) stops at once naming the holder; once the holder is killed with SIGKILL,
//! a new run starts in the folder straight away (the kernel released the lock).

mod util;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::*;

/// The tiny model on synthetic data, enough steps that the first run is still training when
/// the others try the folder; nothing logged or saved along the way.
fn config(dir: &Path, steps: u64) -> std::path::PathBuf {
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: synthetic:4096\n  workers: 1\ntrain:\n  batch_size: 4\n  steps: {steps}\n  seed: 7\n  device: cpu\n  threads: 1\n  log_every: 1000000\n  checkpoint_every: 0\n  eval_every: 0\n",
        run = dir.join("run").display(),
    );
    let path = dir.join(format!("run-{steps}.yaml"));
    std::fs::write(&path, text).expect("write config");
    path
}

fn train(config: &Path, extra: &[&str]) -> Command {
    let mut cmd = oxclip();
    cmd.args(["train", "--config"]).arg(config).args(extra);
    cmd
}

/// Waits until the run folder's lock file names `child` (it holds the lock).
fn wait_for_holder(run: &Path, child: &mut Child) {
    let lock = run.join(".oxclip-run.lock");
    let wanted = format!("pid {}", child.id());
    let started = Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.contains(&wanted)) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the first run ended ({status}) before taking the folder");
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the first run never took the folder"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_second_run_into_a_folder_in_use_stops_naming_the_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let long = config(dir.path(), 1_000_000);
    let run = dir.path().join("run");
    // Both orders: the holder started fresh, then resumed into the folder it left.
    for holder in [&[][..], &["--resume", "auto"][..]] {
        let mut first = train(&long, holder)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("first run starts");
        wait_for_holder(&run, &mut first);

        for extra in [&[][..], &["--resume", "auto"][..]] {
            let started = Instant::now();
            let out = train(&long, extra).output().expect("second run");
            let took = started.elapsed();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{holder:?} {extra:?}: trained alongside the first");
            assert!(stderr.contains("is in use by another run"), "{extra:?}: {stderr}");
            assert!(stderr.contains(&format!("pid {}", first.id())), "{extra:?}: {stderr}");
            eprintln!(
                "holder {holder:?}, second {extra:?}: refused after {:.2} s",
                took.as_secs_f64()
            );
            // At once: before any model, data or rendezvous (the bound is loose for a loaded
            // machine).
            assert!(took < Duration::from_secs(20), "{extra:?}: took {took:?}");
            assert!(first.try_wait().expect("poll").is_none(), "the refusal stopped the first run");
        }
        // kill -9 leaves no stale lock: the next holder takes the folder at once.
        first.kill().expect("SIGKILL");
        first.wait().expect("reaped");
    }

    let short = config(dir.path(), 2);
    let out = run_ok(&mut train(&short, &["--resume", "auto"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("trained 2 steps"));
}
