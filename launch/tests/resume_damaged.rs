//! `--resume auto` past a damaged latest checkpoint: a truncated `model.safetensors` is
//! skipped with a warning naming it, training continues from the previous complete
//! checkpoint and ends with the weights of the run that was never damaged; `--resume PATH`
//! to the damaged one is an error naming the file.

mod util;

use util::*;

#[test]
fn resume_auto_skips_a_truncated_latest_checkpoint_and_ends_with_the_same_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 160, 0, 32);
    let extra = "  checkpoint_every: 4\n  keep_checkpoints: 5\n  eval_every: 0\n";
    let config = tiny_config(dir.path(), &data, 12, extra, false);
    let run = dir.path().join("run");
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let latest = run.join("checkpoints/step_12");
    let model = latest.join("model.safetensors");
    let straight = dir.path().join("straight.safetensors");
    std::fs::copy(&model, &straight).expect("copies");
    assert!(latest.join("manifest.json").is_file());

    // Truncate the latest checkpoint's weights, as a full disk or a cut copy would.
    let file = std::fs::OpenOptions::new().write(true).open(&model).expect("opens");
    let len = file.metadata().expect("meta").len();
    file.set_len(len / 2).expect("truncates");
    drop(file);

    // Named explicitly, the damaged checkpoint is an error, not a silent fallback.
    let out = oxclip()
        .args(["train", "--config"])
        .arg(&config)
        .arg("--resume")
        .arg(&latest)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&model.display().to_string())
            && stderr.contains(&format!("size {} of {len} bytes written", len / 2)),
        "{stderr}"
    );

    // auto skips it, saying which file and why, and continues from step 8.
    let out = run_ok(oxclip().args(["train", "--config"]).arg(&config).args(["--resume", "auto"]));
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let logs = format!("{stdout}{stderr}");
    assert!(
        logs.contains("skipping checkpoint") && logs.contains("step_12: model.safetensors: size"),
        "{logs}"
    );
    assert!(stdout.contains("resumed at step 8, trained 4 more (12 of 12)"), "{stdout}");

    // Bit for bit the weights of the run before the damage.
    let (a, b) = (read_safetensors(&straight), read_safetensors(&model));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs from the uninterrupted run");
    }
}
