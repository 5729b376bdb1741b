//! The timm `ConvNeXt` trunks against open_clip 3.3.0 and timm 1.0.31, from golden files written
//! by tests/fixtures/make_timm_convnext_fixtures.py: every `convnext_*` config's trunk, the
//! full-size convnext_tiny's features and locking, and training steps with open_clip's linear
//! and MLP heads (loss and every gradient).

mod common;

use std::path::PathBuf;

use common::golden::{build, check_gradients, json, max_abs, read, recipe};
use oxclip_trainer::config::LossKind;
use oxclip_trainer::model::drop_path;
use oxclip_trainer::model::lock::{lock, Tower};
use oxclip_trainer::model::params::deterministic;
use oxclip_trainer::model::timm_convnext::architecture;
use oxclip_trainer::model::{zoo, ModelConfig};
use tch::Kind;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/timm_convnext").join(name)
}

/// Every `convnext_*` config: depths, widths, eps, pooling, the head and the drop-path rates
/// of the trunk timm builds for it.
#[test]
fn trunks_are_built_as_timm_builds_them() {
    let golden = json(&fixture("arch.json"));
    let golden = golden.as_object().expect("configs");
    assert_eq!(golden.len(), 11);
    for (name, g) in golden {
        let cfg = zoo::builtin(name).unwrap_or_else(|| panic!("{name} is built in"));
        let v = &cfg.vision_cfg;
        let a = architecture(v.timm_model_name.as_deref().expect("timm")).expect("a ConvNeXt");
        let ours = serde_json::json!({
            "depths": a.depths, "dims": a.dims, "eps": [a.eps], "ls": [true, true, true, true], "pool": "avg",
            "head_norm": true, "trunk_fc": v.timm_proj.is_none(),
        });
        let mut g = g.clone();
        let theirs: Vec<f64> = serde_json::from_value(g["drop_path"].take()).expect("rates");
        g.as_object_mut().expect("entry").remove("drop_path");
        assert_eq!(ours, g, "{name}");
        let rates = drop_path::rates(v.timm_drop_path.unwrap_or(0.0), a.depths.iter().sum());
        assert_eq!(rates.len(), theirs.len(), "{name}");
        for (r, t) in rates.iter().zip(&theirs) {
            assert!((r - t).abs() <= 1e-9, "{name}: drop-path rate {r}, timm {t}");
        }
    }
}

/// convnext_tiny at full size, open_clip's deterministic weights, eval mode: the normalised
/// features; then `lock_image_tower` as open_clip.
#[test]
fn convnext_tiny_matches_open_clip_features_and_locking() {
    let name = "convnext_tiny";
    let cfg = zoo::builtin(name).expect("built in");
    let (vs, clip) = build(&cfg, &recipe(&fixture(&format!("{name}_recipe.json"))));
    let io = read(&fixture(&format!("{name}_io.safetensors")));
    let images = deterministic(&[2, 3, 224, 224], 0, 0.0, 1.0, Kind::Float);
    let (img, txt) = tch::no_grad(|| clip.features(&images, &io["text"]));
    let (di, dt) = (max_abs(&img, &io["image_features"]), max_abs(&txt, &io["text_features"]));
    let cosine = (&img * &io["image_features"]).sum_dim_intlist(-1, false, Kind::Double);
    let cosine = cosine.min().double_value(&[]);
    println!("{name}: image features max abs diff {di:e} (cosine >= {cosine}), text {dt:e}");
    assert!(di <= 1e-5 && dt <= 1e-5 && cosine >= 0.9999, "image {di}, text {dt}");

    let locks = json(&fixture("lock.json"));
    let params: Vec<(String, tch::Tensor)> =
        vs.variables().into_iter().filter(|(_, v)| v.requires_grad()).collect();
    for (unlocked, expected) in locks[name].as_object().expect("groups") {
        for (_, var) in &params {
            let _ = var.set_requires_grad(true);
        }
        lock(&vs, &cfg, Tower::Image, unlocked.parse().expect("count")).expect("locks");
        let mut ours: Vec<String> = params
            .iter()
            .filter(|(n, v)| n.starts_with("visual.") && v.requires_grad())
            .map(|(n, _)| n.clone())
            .collect();
        ours.sort();
        let expected: Vec<String> = serde_json::from_value(expected.clone()).expect("names");
        assert_eq!(ours, expected, "unlocked groups {unlocked}");
    }
}

/// One training step (lr 0, CLIP loss, train mode, 64 px) with a tiny text tower, as open_clip
/// takes it: the loss and every gradient within 1e-4 of its norm.
fn training_step_matches_open_clip(name: &str) {
    let cfg: ModelConfig = serde_json::from_value(json(&fixture(&format!("step_{name}.json"))))
        .expect("open_clip's JSON");
    let rows = recipe(&fixture(&format!("step_{name}_recipe.json")));
    let (vs, clip) = build(&cfg, &rows);
    clip.set_training(true);
    let io = read(&fixture(&format!("step_{name}_io.safetensors")));
    let images = deterministic(&[4, 3, 64, 64], 1, 0.0, 1.0, Kind::Float);
    let step = common::step_config(LossKind::Clip, None, false);
    let out = common::step_at_lr0(&vs, &clip, &images, &io["text"], step);
    let dl = max_abs(&out.loss, &io["loss"]);
    assert!(dl <= 1e-5, "loss {} vs {}", out.loss.double_value(&[]), io["loss"].double_value(&[]));
    let worst = check_gradients(&vs, &rows, &io, 1e-4);
    println!("{name} step: loss diff {dl:e}, worst gradient {:e} ({})", worst.0, worst.1);
}

/// open_clip's linear head.
#[test]
fn convnext_tiny_training_step_matches_open_clip() {
    training_step_matches_open_clip("convnext_tiny");
}

/// open_clip's MLP head (`timm_proj: mlp`).
#[test]
fn convnext_large_d_training_step_matches_open_clip() {
    training_step_matches_open_clip("convnext_large_d");
}
