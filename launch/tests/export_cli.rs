//! `oxclip export` end to end: a trained checkpoint as open_clip and Hugging Face directories,
//! and back; a pickle that would run code refused at `--init`.

mod util;

use util::*;

#[test]
fn exports_round_trip_and_malicious_pickles_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 64, 0, 32);
    let config = tiny_config(dir.path(), &data, 2, "  eval_every: 0\n", false);
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let run = dir.path().join("run");

    let (oc, hf, back) = (dir.path().join("oc"), dir.path().join("hf"), dir.path().join("back"));
    run_ok(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(&run)
            .args(["--format", "open_clip", "--out"])
            .arg(&oc),
    );
    run_ok(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(run.join("checkpoints/step_2"))
            .args(["--format", "hf", "--out"])
            .arg(&hf),
    );
    for f in ["open_clip_model.safetensors", "open_clip_config.json"] {
        assert!(oc.join(f).is_file(), "{f}");
    }
    for f in ["model.safetensors", "config.json", "preprocessor_config.json"] {
        assert!(hf.join(f).is_file(), "{f}");
    }
    let oc_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(oc.join("open_clip_config.json")).expect("json"),
    )
    .expect("json");
    assert_eq!(oc_config["model_cfg"]["embed_dim"], 64);

    // The Hugging Face directory says its architecture (config.json): no --model needed, and
    // it comes back as the same weights. A bare copy of its weights file needs --model.
    run_ok(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(hf.join("model.safetensors"))
            .args(["--format", "open_clip", "--out"])
            .arg(&back),
    );
    assert_eq!(
        max_abs_diff(
            &oc.join("open_clip_model.safetensors"),
            &back.join("open_clip_model.safetensors")
        ),
        0.0
    );
    let back_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(back.join("open_clip_config.json")).expect("json"),
    )
    .expect("json");
    assert_eq!(back_cfg["model_cfg"], oc_config["model_cfg"]);
    assert_eq!(back_cfg["preprocess_cfg"], oc_config["preprocess_cfg"]);
    let bare_file = dir.path().join("bare.safetensors");
    std::fs::copy(hf.join("model.safetensors"), &bare_file).expect("copy");
    let bare = oxclip()
        .args(["export", "--checkpoint"])
        .arg(&bare_file)
        .args(["--format", "open_clip", "--out"])
        .arg(dir.path().join("b"))
        .output()
        .expect("runs");
    assert!(!bare.status.success());
    assert!(String::from_utf8_lossy(&bare.stderr).contains("--model"));
    run_ok(
        oxclip()
            .args(["export", "--model", "tiny", "--checkpoint"])
            .arg(&bare_file)
            .args(["--format", "open_clip", "--out"])
            .arg(dir.path().join("b")),
    );
    // A --model that contradicts the directory: the differing keys, directory's value first.
    let stderr = fails(
        oxclip()
            .args(["export", "--model", "small", "--checkpoint"])
            .arg(&hf)
            .args(["--format", "open_clip", "--out"])
            .arg(dir.path().join("c")),
        &["--model contradicts", "embed_dim: 64 vs 128", "more)"],
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // config.json of another architecture is named as such.
    let bert = dir.path().join("bert");
    std::fs::create_dir_all(&bert).expect("mkdir");
    std::fs::copy(hf.join("model.safetensors"), bert.join("model.safetensors")).expect("copy");
    std::fs::write(
        bert.join("config.json"),
        r#"{"architectures": ["BertModel"], "model_type": "bert"}"#,
    )
    .expect("write");
    fails(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(&bert)
            .args(["--format", "hf", "--out"])
            .arg(dir.path().join("d")),
        &["config.json", "architectures [\"BertModel\"]", "CLIPModel"],
    );
    assert_eq!(
        max_abs_diff(
            &oc.join("open_clip_model.safetensors"),
            &run.join("checkpoints/step_2/model.safetensors")
        ),
        0.0
    );

    // Fine-tuning from the Hugging Face export starts from exactly those weights.
    let init = dir.path().join("init");
    run_ok(
        oxclip()
            .args(["train", "--config"])
            .arg(config_path(dir.path()))
            .arg("--run-dir")
            .arg(&init)
            .arg("--init")
            .arg(hf.join("model.safetensors"))
            .args(["--set", "train.steps=1", "--set", "optim.lr=0"]),
    );
    assert!(
        max_abs_diff(
            &oc.join("open_clip_model.safetensors"),
            &init.join("checkpoints/step_1/model.safetensors")
        ) <= 1e-6
    );

    // A pickle that would run code is refused at --init, naming it, and nothing of it runs.
    let evil = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pickle/evil/os_system.pt");
    let out = oxclip()
        .current_dir(dir.path())
        .args(["train", "--config"])
        .arg(config_path(dir.path()))
        .arg("--run-dir")
        .arg(dir.path().join("p"))
        .arg("--init")
        .arg(&evil)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refuses the global os.system"), "{stderr}");
    assert!(!dir.path().join("pwned_os_system").exists());
}

fn config_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("run.yaml")
}

fn fails(cmd: &mut std::process::Command, needles: &[&str]) -> String {
    let out = cmd.output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Os {") && !stderr.contains("IoError"),
        "{stderr}"
    );
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` not in:\n{stderr}");
    }
    stderr
}

/// One rule for every flag that takes weights: a run folder, its checkpoints/ folder, a step
/// folder, oxclip's own open_clip and Hugging Face exports, a safetensors file; what does not
/// fit is described by what it holds.
#[test]
fn every_weights_flag_takes_runs_checkpoints_and_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 64, 0, 32);
    let config = tiny_config(
        dir.path(),
        &data,
        2,
        "  eval_every: 0\n  checkpoint_every: 1\n  keep_checkpoints: 3\n",
        false,
    );
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let run = dir.path().join("run");
    let weights = run.join("checkpoints/step_2/model.safetensors");
    let export = |from: &std::path::Path, format: &str, out: &str, extra: &[&str]| {
        let out = run_ok(
            oxclip()
                .arg("export")
                .args(extra)
                .arg("--checkpoint")
                .arg(from)
                .args(["--format", format, "--out"])
                .arg(dir.path().join(out)),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // export says what it exported; the checkpoints/ folder means its newest step.
    let stdout = export(&run.join("checkpoints"), "open_clip", "oc", &[]);
    let oc = dir.path().join("oc");
    assert!(
        stdout.contains(&format!(
            "exported step 2 of {} to {} (open_clip)",
            run.display(),
            oc.display()
        )),
        "{stdout}"
    );
    assert_eq!(max_abs_diff(&oc.join("open_clip_model.safetensors"), &weights), 0.0);
    // open_clip and Hugging Face directories carry their architecture.
    let stdout = export(&oc, "hf", "hf", &[]);
    assert!(stdout.contains("open_clip export") && stdout.contains("(hf)"), "{stdout}");
    let hf = dir.path().join("hf");
    let stdout = export(&hf, "open_clip", "x", &[]);
    assert!(stdout.contains("Hugging Face export"), "{stdout}");
    assert_eq!(max_abs_diff(&dir.path().join("x/open_clip_model.safetensors"), &weights), 0.0);
    // --model takes an open_clip_config.json (our own export's) as a model config.
    export(
        &hf,
        "open_clip",
        "back",
        &["--model", &oc.join("open_clip_config.json").to_string_lossy()],
    );
    assert_eq!(max_abs_diff(&dir.path().join("back/open_clip_model.safetensors"), &weights), 0.0);

    // --init takes a run folder and an export folder.
    for (name, from) in
        [("from-run", run.clone()), ("from-oc", oc.clone()), ("from-hf", hf.clone())]
    {
        let to = dir.path().join(name);
        run_ok(
            oxclip()
                .args(["train", "--config"])
                .arg(&config)
                .arg("--run-dir")
                .arg(&to)
                .arg("--init")
                .arg(&from)
                .args(["--set", "train.steps=1", "--set", "optim.lr=0"]),
        );
        assert!(
            max_abs_diff(&weights, &to.join("checkpoints/step_1/model.safetensors")) <= 1e-6,
            "{name}"
        );
    }

    // init.checkpoint: a directory whose config contradicts the run's model is refused by key.
    fails(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(dir.path().join("contra"))
            .arg("--init")
            .arg(&hf)
            .args(["--set", "model=small"]),
        &["init.checkpoint", "the run's model contradicts", "embed_dim: 64 vs 128"],
    );

    // --resume: `auto` is named when the path is not there; an export has nothing to resume.
    fails(
        oxclip().args(["train", "--config"]).arg(&config).args(["--resume", "yes"]),
        &["--resume yes", "auto"],
    );
    fails(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(dir.path().join("r"))
            .arg("--resume")
            .arg(&oc),
        &["open_clip export", "--init"],
    );
    // --resume into another run folder from a run folder works.
    let out = run_ok(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(dir.path().join("r2"))
            .arg("--resume")
            .arg(&run)
            .args(["--set", "train.steps=3"]),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resumed at step 2, trained 1 more (3 of 3)")
    );

    // A folder that is none of these: what it holds, in a few names and a count.
    let junk = dir.path().join("junk");
    std::fs::create_dir_all(&junk).expect("mkdir");
    for i in 0..10 {
        std::fs::write(junk.join(format!("photo{i}.jpg")), b"x").expect("write");
    }
    fails(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(&junk)
            .args(["--format", "hf", "--out"])
            .arg(dir.path().join("y")),
        &["photo0.jpg", "(10 entries)", "not a run folder"],
    );

    // Weights of another architecture: counted, a few named, not hundreds.
    let stderr = fails(
        oxclip()
            .args(["export", "--model", "small", "--checkpoint"])
            .arg(&run)
            .args(["--format", "hf", "--out"])
            .arg(dir.path().join("z")),
        &["tensors", "more)", "does not match"],
    );
    assert!(stderr.len() < 1500, "{} bytes:\n{stderr}", stderr.len());
}
