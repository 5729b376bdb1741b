//! `oxclip export` end to end: a trained checkpoint as open_clip and Hugging Face directories,
//! and back; pickled weights refused at `--init`.

mod util;

use util::*;

#[test]
fn exports_round_trip_and_pickles_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 64, 0, 32);
    let config = tiny_config(dir.path(), &data, 2, "  eval_every: 0\n", false);
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let run = dir.path().join("run");

    let (oc, hf, back) = (dir.path().join("oc"), dir.path().join("hf"), dir.path().join("back"));
    run_ok(oxclip().args(["export", "--checkpoint"]).arg(&run).args(["--format", "open_clip", "--out"]).arg(&oc));
    run_ok(oxclip().args(["export", "--checkpoint"]).arg(run.join("checkpoints/step_2")).args(["--format", "hf", "--out"]).arg(&hf));
    for f in ["open_clip_model.safetensors", "open_clip_config.json"] {
        assert!(oc.join(f).is_file(), "{f}");
    }
    for f in ["model.safetensors", "config.json", "preprocessor_config.json"] {
        assert!(hf.join(f).is_file(), "{f}");
    }
    let oc_config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(oc.join("open_clip_config.json")).expect("json")).expect("json");
    assert_eq!(oc_config["model_cfg"]["embed_dim"], 64);

    // A bare Hugging Face file needs --model; with it, it comes back as the same weights.
    let bare = oxclip().args(["export", "--checkpoint"]).arg(hf.join("model.safetensors")).args(["--format", "open_clip", "--out"]).arg(&back).output().expect("runs");
    assert!(!bare.status.success());
    assert!(String::from_utf8_lossy(&bare.stderr).contains("--model"));
    run_ok(oxclip().args(["export", "--model", "tiny", "--checkpoint"]).arg(hf.join("model.safetensors")).args(["--format", "open_clip", "--out"]).arg(&back));
    assert_eq!(max_abs_diff(&oc.join("open_clip_model.safetensors"), &back.join("open_clip_model.safetensors")), 0.0);
    assert_eq!(max_abs_diff(&oc.join("open_clip_model.safetensors"), &run.join("checkpoints/step_2/model.safetensors")), 0.0);

    // Fine-tuning from the Hugging Face export starts from exactly those weights.
    let init = dir.path().join("init");
    run_ok(oxclip().args(["train", "--config"]).arg(&config_path(dir.path())).arg("--run-dir").arg(&init)
        .arg("--init").arg(hf.join("model.safetensors")).args(["--set", "train.steps=1", "--set", "optim.lr=0"]));
    assert!(max_abs_diff(&oc.join("open_clip_model.safetensors"), &init.join("checkpoints/step_1/model.safetensors")) <= 1e-6);

    let pickle = dir.path().join("epoch_1.pt");
    std::fs::write(&pickle, b"PK\x03\x04 torch.save").expect("write");
    let out = oxclip().args(["train", "--config"]).arg(&config_path(dir.path())).arg("--run-dir").arg(dir.path().join("p")).arg("--init").arg(&pickle).output().expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pickled") && stderr.contains("save_file"), "{stderr}");
}

fn config_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("run.yaml")
}
