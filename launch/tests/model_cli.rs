//! `oxclip model list` and `oxclip model show` through the real binary: open_clip's names and
//! shapes (tests/fixtures/open_clip_zoo_shapes.json, from open_clip 3.3), configs from files,
//! and clear errors.

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oxclip_trainer::model::{zoo, ModelConfig};
use util::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// open_clip's state_dict names and shapes of `model`, the fixture's `[0-11]` ranges expanded.
fn golden(model: &str) -> BTreeMap<String, Vec<i64>> {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/open_clip_zoo_shapes.json"))
        .expect("fixture");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut out = BTreeMap::new();
    for t in json[model]["tensors"].as_array().expect("model in the fixture") {
        let (name, shape): (String, Vec<i64>) =
            serde_json::from_value(t.clone()).expect("[name, shape]");
        match name.find("[0-") {
            None => {
                out.insert(name, shape);
            }
            Some(start) => {
                let end = start + name[start..].find(']').expect("]");
                for i in 0..=name[start + 3..end].parse::<usize>().expect("range") {
                    out.insert(format!("{}{i}{}", &name[..start], &name[end + 1..]), shape.clone());
                }
            }
        }
    }
    out
}

fn show_json(args: &[&str]) -> serde_json::Value {
    let out = run_ok(oxclip().args(["model", "show"]).args(args).arg("--json"));
    serde_json::from_slice(&out.stdout).expect("show --json prints JSON")
}

fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let out = oxclip().args(args).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: `{needle}` not in:\n{stderr}");
    }
    stderr
}

#[test]
fn show_json_gives_open_clips_state_dict_and_a_config_that_round_trips() {
    for name in ["ViT-B-32", "ViT-L-14-CLIPA-336", "ViT-M-16-alt"] {
        let value = show_json(&[name]);
        let params: BTreeMap<String, Vec<i64>> =
            serde_json::from_value(value["parameters"].clone()).expect("name -> shape");
        assert_eq!(params, golden(name), "{name}");
        let config: ModelConfig = serde_json::from_value(value["config"].clone())
            .expect("config parses as a model config");
        assert_eq!(Some(config), zoo::builtin(name), "{name}");
    }
    let value = show_json(&["ViT-B-32"]);
    assert_eq!(value["parameters"]["visual.conv1.weight"], serde_json::json!([768, 3, 32, 32]));
    assert_eq!(value["config"]["vision_cfg"]["patch_size"], 32);
}

#[test]
fn show_reads_open_clip_json_and_open_clip_config_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b16 =
        std::fs::read_to_string(repo().join("configs/models/open_clip/ViT-B-16-quickgelu.json"))
            .expect("vendored");
    let as_is = dir.path().join("ViT-B-16-quickgelu.json");
    std::fs::write(&as_is, &b16).expect("write");
    let hub = dir.path().join("open_clip_config.json");
    std::fs::write(
        &hub,
        format!(r#"{{"model_cfg": {b16}, "preprocess_cfg": {{"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}}}"#),
    )
    .expect("write");
    let expected = golden("ViT-B-16-quickgelu");
    for file in [&as_is, &hub] {
        let path = file.to_str().expect("utf-8");
        let value = show_json(&[path]);
        let params: BTreeMap<String, Vec<i64>> =
            serde_json::from_value(value["parameters"].clone()).expect("params");
        assert_eq!(params, expected, "{path}");
        assert_eq!(value["config"]["quick_gelu"], true, "{path}");
        // The summary: the parameter count open_clip gives (149,620,737 for ViT-B-16).
        let out = run_ok(oxclip().args(["model", "show", path]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("149,620,737") && text.contains("ViT 12x768 patch 16"), "{text}");
    }
}

#[test]
fn list_prints_every_built_in_name_with_its_parameter_count() {
    let out = run_ok(oxclip().args(["model", "list"]));
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> =
        text.lines().map(|l| l.split_whitespace().next().expect("a name")).collect();
    assert_eq!(names, zoo::names().collect::<Vec<_>>());
    assert_eq!(names.len(), 147);
    let line = |name: &str| {
        text.lines().find(|l| l.split_whitespace().next() == Some(name)).expect("listed").to_owned()
    };
    assert!(line("ViT-B-32").contains("151.3M"), "{}", line("ViT-B-32"));
    assert!(line("ViT-e-14").contains("4581.1M"), "{}", line("ViT-e-14"));
    // open_clip's count for MobileCLIP-B: 149,777,153 (its MCi stem's BatchNorm buffers excluded).
    assert!(line("MobileCLIP-B").contains("149.8M"), "{}", line("MobileCLIP-B"));
}

#[test]
fn unknown_names_and_fields_are_clear_errors() {
    let stderr = fails_with(
        &["model", "show", "ViT-B/32"],
        &["ViT-B/32", "did you mean ViT-B-32", "oxclip model list"],
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    fails_with(
        &["model", "show", "no-such-model", "--json"],
        &["no-such-model", "oxclip model list"],
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let b32 = std::fs::read_to_string(repo().join("configs/models/open_clip/ViT-B-32.json"))
        .expect("vendored");
    let typo = dir.path().join("typo.json");
    std::fs::write(&typo, b32.replace("\"heads\"", "\"n_heads\"")).expect("write");
    fails_with(
        &["model", "show", typo.to_str().expect("utf-8")],
        &["typo.json", "text_cfg", "unknown field `n_heads`"],
    );
    let hub = dir.path().join("open_clip_config.json");
    std::fs::write(
        &hub,
        format!(r#"{{"model_cfg": {}}}"#, b32.replace("\"patch_size\"", "\"patch\"")),
    )
    .expect("write");
    fails_with(
        &["model", "show", hub.to_str().expect("utf-8"), "--json"],
        &["model_cfg.vision_cfg", "unknown field `patch`"],
    );
    let coca = dir.path().join("coca.json");
    std::fs::write(
        &coca,
        b32.replacen("{", r#"{"multimodal_cfg": {"width": 512, "heads": 8, "layers": 12},"#, 1),
    )
    .expect("write");
    fails_with(
        &["model", "show", coca.to_str().expect("utf-8")],
        &["coca.json", "multimodal_cfg.width 512 must equal vision_cfg.width, 768", "decoder"],
    );
    let yaml = dir.path().join("bad.yaml");
    std::fs::write(&yaml, "embed_dim: 8\nvision_cfg: {image_size: 32, layers: 1, width: 32, patch_size: 8}\ntext_cfg: {heads: 2, widht: 4}\n")
        .expect("write");
    fails_with(&["model", "show", yaml.to_str().expect("utf-8")], &["bad.yaml", "widht", "line 3"]);
}

/// The per-tower counts add up to the total: BatchNorm's statistics (RN50's, MobileCLIP's MCi
/// stem's) are tensors of the state_dict but not parameters.
#[test]
fn show_counts_parameters_not_buffers() {
    for (name, line) in [
        ("RN50", "102,007,137 (logit_scale 1, text 63,690,240, visual 38,316,896)"),
        ("MobileCLIP-B", "149,777,153 (logit_scale 1, text 63,428,096, visual 86,349,056)"),
    ] {
        let out = run_ok(oxclip().args(["model", "show", name]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(line), "{name}: {text}");
    }
}
