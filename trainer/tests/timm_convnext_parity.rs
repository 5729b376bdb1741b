//! The timm `ConvNeXt` trunks against open_clip 3.3.0 and timm 1.0.31, from golden files written
//! by tests/fixtures/make_timm_convnext_fixtures.py: every `convnext_*` config's trunk, the
//! full-size convnext_tiny's features and locking, and training steps with open_clip's linear
//! and MLP heads (loss and every gradient).

mod common;

use std::path::PathBuf;

use common::golden::{
    build, check_features, check_lock_sets, check_open_clip_step, json, read, recipe,
};
use oxclip_trainer::model::drop_path;
use oxclip_trainer::model::timm_convnext::architecture;
use oxclip_trainer::model::zoo;

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
    check_features(name, &clip, 224, &io);
    check_lock_sets(name, &vs, &cfg, &json(&fixture("lock.json"))[name]);
}

/// One training step (lr 0, CLIP loss, train mode, 64 px) with a tiny text tower, as open_clip
/// takes it (`common::golden::check_open_clip_step`).
fn training_step_matches_open_clip(name: &str) {
    check_open_clip_step(&fixture(""), name);
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
