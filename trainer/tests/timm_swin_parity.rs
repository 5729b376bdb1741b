//! The timm `SwinTransformer` trunk against open_clip 3.3.0 and timm 1.0.31, from golden files
//! written by tests/fixtures/make_timm_swin_fixtures.py: each block's window and shift at two
//! image sizes, the full-size model's features and locking, and a training step at 72 px
//! (windows scaled to the grid, padded windows, odd grids merged) with open_clip's linear
//! head (loss and every gradient).

mod common;

use std::path::PathBuf;

use common::golden::{
    build, check_features, check_lock_sets, check_open_clip_step, json, read, recipe,
};
use oxclip_trainer::model::drop_path;
use oxclip_trainer::model::timm_swin::{architecture, DEFAULT_DROP_PATH};
use oxclip_trainer::model::zoo;

const NAME: &str = "swin_base_patch4_window7_224";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/timm_swin").join(name)
}

/// Windows and shifts per block at 224 px (the definition's) and 72 px (set_input_size's),
/// eps, pooling and the default drop-path rates, as timm builds them.
#[test]
fn blocks_are_windowed_as_timm_windows_them() {
    let golden = json(&fixture("arch.json"));
    let cfg = zoo::builtin(NAME).expect("built in");
    let a = architecture(NAME).expect("a Swin");
    for (size, g) in golden[NAME].as_object().expect("sizes") {
        let size: i64 = size.parse().expect("an image size");
        let mut grid = size / a.patch;
        let target = a.window_for(grid);
        let (mut windows, mut shifts) = (Vec::new(), Vec::new());
        for (s, &depth) in a.depths.iter().enumerate() {
            if s > 0 {
                grid = (grid + 1) / 2;
            }
            for b in 0..depth {
                let window = target.min(grid);
                let shift = if b % 2 == 1 && grid > target { target / 2 } else { 0 };
                windows.push([window, window]);
                shifts.push([shift, shift]);
            }
        }
        let ours = serde_json::json!({
            "windows": windows, "shifts": shifts, "eps": [1e-5], "pool": "avg",
            "trunk_fc": cfg.vision_cfg.timm_proj.is_none(),
        });
        let mut g = g.clone();
        let theirs: Vec<f64> = serde_json::from_value(g["drop_path"].take()).expect("rates");
        g.as_object_mut().expect("entry").remove("drop_path");
        assert_eq!(ours, g, "{size} px");
        // The step's config sets timm_drop_path 0; the built-in leaves timm's default.
        let max = if size == 224 { DEFAULT_DROP_PATH } else { 0.0 };
        let rates = drop_path::rates(max, a.depths.iter().sum());
        assert_eq!(rates.len(), theirs.len());
        for (r, t) in rates.iter().zip(&theirs) {
            assert!((r - t).abs() <= 1e-9, "{size} px: drop-path rate {r}, timm {t}");
        }
    }
}

/// The full-size model, open_clip's deterministic weights, eval mode: the normalised
/// features; then `lock_image_tower` as open_clip.
#[test]
fn swin_base_matches_open_clip_features_and_locking() {
    let cfg = zoo::builtin(NAME).expect("built in");
    let (vs, clip) = build(&cfg, &recipe(&fixture(&format!("{NAME}_recipe.json"))));
    let io = read(&fixture(&format!("{NAME}_io.safetensors")));
    check_features(NAME, &clip, 224, &io);
    check_lock_sets(NAME, &vs, &cfg, &json(&fixture("lock.json"))[NAME]);
}

/// One training step (lr 0, CLIP loss, train mode, 72 px) with a tiny text tower, as open_clip
/// takes it (`common::golden::check_open_clip_step`).
#[test]
fn swin_base_training_step_matches_open_clip() {
    check_open_clip_step(&fixture(""), NAME);
}
