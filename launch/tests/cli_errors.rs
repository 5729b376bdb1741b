//! Bad input exits non-zero with a message naming what is wrong, and never panics.

mod util;

use util::*;

fn fails_with(args: &[&str], dir: &std::path::Path, needles: &[&str]) {
    let out = oxclip().current_dir(dir).args(args).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: `{needle}` not in:\n{stderr}");
    }
}

const GOOD: &str = "run_dir: run\nmodel: tiny\ndata:\n  train: synthetic:64\ntrain:\n  steps: 2\n  batch_size: 4\n  device: cpu\n";

#[test]
fn config_errors_name_the_key_line_or_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        std::fs::write(dir.path().join(name), text).expect("write");
    };
    write("unknown.yaml", &GOOD.replace("  steps: 2\n", "  steps: 2\n  bach_size: 4\n"));
    fails_with(
        &["train", "--config", "unknown.yaml"],
        dir.path(),
        &["train", "bach_size", "line 7"],
    );
    write("type.yaml", &GOOD.replace("steps: 2", "steps: [1, 2]"));
    fails_with(&["train", "--config", "type.yaml"], dir.path(), &["train.steps", "line 6"]);
    write("top.yaml", &format!("{GOOD}optimizer: {{}}\n"));
    fails_with(&["config", "show", "--config", "top.yaml"], dir.path(), &["optimizer", "line 9"]);
    fails_with(&["train", "--config", "missing.yaml"], dir.path(), &["missing.yaml"]);
    write("nodata.yaml", &GOOD.replace("synthetic:64", "no/such/shards"));
    fails_with(&["train", "--config", "nodata.yaml"], dir.path(), &["no/such/shards"]);
    write("model.yaml", &GOOD.replace("model: tiny", "model: ViT-Q-7"));
    fails_with(&["train", "--config", "model.yaml"], dir.path(), &["ViT-Q-7"]);
    write("badmodel.yaml", "embed_dim: 8\nvision_cfg: {image_size: 30, layers: 1, width: 32, patch_size: 8}\ntext_cfg: {context_length: 8, vocab_size: 100, width: 32, heads: 2, layers: 1}\n");
    write("usesbad.yaml", &GOOD.replace("model: tiny", "model: badmodel.yaml"));
    fails_with(&["train", "--config", "usesbad.yaml"], dir.path(), &["patch_size", "image_size"]);
    write("device.yaml", &GOOD.replace("device: cpu", "device: tpu"));
    fails_with(&["train", "--config", "device.yaml"], dir.path(), &["tpu"]);
    write("good.yaml", GOOD);
    fails_with(
        &["train", "--config", "good.yaml", "--set", "train.steps=zero"],
        dir.path(),
        &["train.steps"],
    );
    fails_with(&["train", "--config", "good.yaml", "--set", "train"], dir.path(), &["--set train"]);
}

/// Patch dropout on a ModifiedResNet, or out of [0, 1): refused naming the key, before the
/// run directory exists or the bench builds a model.
#[test]
fn patch_dropout_errors_name_the_key_before_any_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        std::fs::write(dir.path().join(name), text).expect("write");
    };
    write("rn.yaml", &GOOD.replace("model: tiny", "model: RN50"));
    fails_with(
        &["train", "--config", "rn.yaml", "--set", "train.force_patch_dropout=0.5"],
        dir.path(),
        &["train.force_patch_dropout (0.5)", "ModifiedResNet"],
    );
    write(
        "rnmodel.yaml",
        "embed_dim: 8\n\
         vision_cfg: {image_size: 64, layers: [1, 1, 1, 1], width: 8, patch_dropout: 0.5}\n\
         text_cfg: {context_length: 8, vocab_size: 100, width: 32, heads: 2, layers: 1}\n",
    );
    write("usesrn.yaml", &GOOD.replace("model: tiny", "model: rnmodel.yaml"));
    fails_with(
        &["train", "--config", "usesrn.yaml"],
        dir.path(),
        &["vision_cfg.patch_dropout (0.5)", "ModifiedResNet"],
    );
    write("good.yaml", GOOD);
    fails_with(
        &["train", "--config", "good.yaml", "--set", "train.force_patch_dropout=1"],
        dir.path(),
        &["train.force_patch_dropout must be in [0, 1)"],
    );
    assert!(!dir.path().join("run").exists(), "a refused run wrote its directory");
    fails_with(
        &["bench", "train", "--model", "RN50", "--device", "cpu", "--patch-dropout", "0.5"],
        dir.path(),
        &["--patch-dropout (0.5)", "ModifiedResNet"],
    );
}

#[test]
fn config_show_prints_the_resolved_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("good.yaml"), GOOD).expect("write");
    let out = run_ok(oxclip().current_dir(dir.path()).args([
        "config",
        "show",
        "--config",
        "good.yaml",
        "--set",
        "optim.lr=0.001",
    ]));
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("yaml");
    assert_eq!(yaml["optim"]["lr"].as_f64(), Some(0.001));
    assert_eq!(yaml["optim"]["betas"][1].as_f64(), Some(0.98));
    assert_eq!(yaml["model"]["embed_dim"].as_i64(), Some(64));
    assert_eq!(yaml["train"]["batch_size"].as_i64(), Some(4));
}

#[test]
fn bench_train_prints_one_json_line() {
    let out = run_ok(oxclip().args([
        "bench",
        "train",
        "--model",
        "tiny",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ]));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(line["samples_per_second"].as_f64().expect("number") > 0.0);
    assert_eq!(line["batch_size"], 8);
    assert_eq!(line["precision"], "fp32");
}

/// `--precision` takes `train.precision`'s values, each a step that runs, and refuses others
/// naming the flag and the values it takes.
#[test]
fn bench_train_runs_each_precision() {
    for precision in ["amp", "amp_bf16", "pure_bf16"] {
        let line = bench_train_tiny(1, 0, &["--precision", precision]);
        assert_eq!(line["precision"], precision);
        assert!(line["samples_per_second"].as_f64().expect("number") > 0.0);
    }
    let out = oxclip()
        .args(["bench", "train", "--model", "tiny", "--precision", "pure_fp16"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--precision") && stderr.contains("amp_bf16"), "{stderr}");
}

#[test]
fn bench_loader_prints_one_json_line() {
    let line = bench_loader("synthetic:64", 32);
    assert!(line["samples_per_second"].as_f64().expect("number") > 0.0);
    assert_eq!(line["samples"], 32);
    assert_eq!(line["skipped"], 0);
}

/// A run that fails to start, early (the data) or late (the initial weights, after the
/// model is built), leaves no run directory behind.
#[test]
fn a_run_that_fails_to_start_leaves_no_run_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("nodata.yaml"), GOOD.replace("synthetic:64", "no/such/shards"))
        .expect("write");
    fails_with(&["train", "--config", "nodata.yaml"], dir.path(), &["no/such/shards"]);
    assert!(!dir.path().join("run").exists(), "a failed start left run/ behind");

    std::fs::write(dir.path().join("good.yaml"), GOOD).expect("write");
    std::fs::create_dir_all(dir.path().join("notes")).expect("mkdir");
    std::fs::write(dir.path().join("notes/readme.txt"), "x").expect("write");
    fails_with(
        &["train", "--config", "good.yaml", "--init", "notes"],
        dir.path(),
        &["notes", "readme.txt", "--init"],
    );
    assert!(!dir.path().join("run").exists(), "a failed start left run/ behind");
}

/// A Hugging Face text tower that oxclip would have to download for (its tokenizer, its
/// pretrained text weights, the sizes of an unknown text model) is refused with what to do
/// instead, and leaves no run directory behind.
#[test]
fn hugging_face_text_towers_say_what_to_give_instead_of_a_download() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tiny_xlmr = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hf_text/tiny_xlmr")
        .display()
        .to_string();
    let write = |name: &str, text: &str| {
        std::fs::write(dir.path().join(name), text).expect("write");
    };
    let xlmr = GOOD.replace("model: tiny", "model: xlm-roberta-base-ViT-B-32");
    write("notok.yaml", &xlmr);
    fails_with(
        &["train", "--config", "notok.yaml"],
        dir.path(),
        &["xlm-roberta-base", "never downloads", "data.tokenizer"],
    );
    write(
        "noweights.yaml",
        &xlmr.replace("data:\n", &format!("data:\n  tokenizer: {tiny_xlmr}\n")),
    );
    fails_with(
        &["train", "--config", "noweights.yaml"],
        dir.path(),
        &["hf_model_pretrained", "never downloads", "hf_model_pretrained: false"],
    );
    assert!(!dir.path().join("run").exists(), "a failed start left run/ behind");
    write(
        "unknown.json",
        r#"{"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
            "text_cfg": {"hf_model_name": "someone/some-bert"}}"#,
    );
    fails_with(
        &["model", "show", "unknown.json"],
        dir.path(),
        &["someone/some-bert", "xlm-roberta-base", "never downloads"],
    );
}
