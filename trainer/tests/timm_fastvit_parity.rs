//! The timm `FastVit` trunks (MobileCLIP-S, MobileCLIP2-S) in their train-time form against
//! open_clip 3.3.0 and timm 1.0.31, from golden files written by
//! tests/fixtures/make_timm_fastvit_fixtures.py: every config's trunk facts, full-size
//! features and locking of an MCi0 (BatchNorm attention norms) and an MCi3 (LayerNorm, five
//! stages), and training steps with BatchNorm on the batch's statistics (loss, every gradient,
//! every running statistic after the step).

mod common;

use std::path::PathBuf;

use std::collections::BTreeMap;

use common::golden::{
    build, check_buffers, check_features, check_lock_sets, check_open_clip_step_floored, json,
    max_abs, read, recipe, Row,
};
use oxclip_trainer::model::drop_path;
use oxclip_trainer::model::params::deterministic;
use oxclip_trainer::model::timm_fastvit::architecture;
use oxclip_trainer::model::zoo;
use tch::Kind;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/timm_fastvit").join(name)
}

/// Every MobileCLIP-S / MobileCLIP2-S config: each stage's token mixer (and the attention
/// norm), the norms' eps, the pooling, the classifier and the drop-path rates of the trunk
/// timm builds for it.
#[test]
fn trunks_are_built_as_timm_builds_them() {
    let golden = json(&fixture("arch.json"));
    let golden = golden.as_object().expect("configs");
    assert_eq!(golden.len(), 6);
    for (name, g) in golden {
        let cfg = zoo::builtin(name).unwrap_or_else(|| panic!("{name} is built in"));
        let v = &cfg.vision_cfg;
        let a = architecture(v.timm_model_name.as_deref().expect("timm")).expect("a FastViT");
        let norm = if a.layer_norm { "LayerNorm2d" } else { "BatchNorm2d" };
        let stages: Vec<&str> = (0..a.layers.len())
            .map(|s| if s < a.attention_from { "RepMixer" } else { norm })
            .collect();
        let ours = serde_json::json!({
            "stages": stages, "bn_eps": [1e-5], "ln_eps": if a.layer_norm { vec![1e-5] } else { vec![] },
            "pool": "avg", "trunk_fc": v.timm_proj.is_none(),
        });
        let mut g = g.clone();
        let theirs: Vec<f64> = serde_json::from_value(g["drop_path"].take()).expect("rates");
        g.as_object_mut().expect("entry").remove("drop_path");
        assert_eq!(ours, g, "{name}");
        let rates = drop_path::rates(v.timm_drop_path.unwrap_or(0.0), a.layers.iter().sum());
        assert_eq!(rates, theirs, "{name}");
    }
}

/// MobileCLIP2-S0 and MobileCLIP2-S3 at full size, open_clip's deterministic weights (running
/// statistics included), eval mode: the normalised features; `lock_image_tower`; then the
/// re-parameterised form against timm's `reparameterize_model`.
#[test]
fn full_size_features_locking_and_reparameterisation_match_open_clip() {
    let locks = json(&fixture("lock.json"));
    for name in ["MobileCLIP2-S0", "MobileCLIP2-S3"] {
        let cfg = zoo::builtin(name).expect("built in");
        let (vs, mut clip) = build(&cfg, &recipe(&fixture(&format!("{name}_recipe.json"))));
        let io = read(&fixture(&format!("{name}_io.safetensors")));
        let size = cfg.vision_cfg.image_size;
        check_features(name, &clip, size, &io);
        check_lock_sets(name, &vs, &cfg, &locks[name]);

        clip.prepare_for_inference();
        let images = deterministic(&[2, 3, size, size], 0, 0.0, 1.0, Kind::Float);
        let (fused, _) = tch::no_grad(|| clip.features(&images, &io["text"]));
        let d = max_abs(&fused, &io["image_features_reparam"]);
        let to_unfused = max_abs(&fused, &io["image_features"]);
        println!(
            "{name} re-parameterised: {d:e} from timm's, {to_unfused:e} from the train-time form"
        );
        assert!(d <= 1e-5 && to_unfused <= 1e-5, "{name}: {d}, {to_unfused}");
    }
}

/// A convolution with one weight per output channel (the 1x1 depthwise branches) feeds a
/// BatchNorm that normalises with the batch's statistics in training and so undoes that
/// weight's scale: its gradient is zero in exact arithmetic, and both libraries compute
/// float32 rounding there (open_clip's own float32 step is 1.8e-4 of such a gradient's norm
/// from its float64 step on MobileCLIP2-S3). It is measured against its BatchNorm weight's
/// gradient instead, the scale of the signal through that channel.
fn bn_scale_floor(r: &Row, io: &BTreeMap<String, tch::Tensor>) -> f64 {
    let per_channel = r.shape.len() == 4 && r.shape[1..] == [1, 1, 1];
    match r.name.strip_suffix(".conv.weight") {
        Some(conv) if per_channel => {
            io.get(&format!("norm.{conv}.bn.weight")).map_or(0.0, |t| t.double_value(&[]))
        }
        _ => 0.0,
    }
}

/// One training step (lr 0, CLIP loss, train mode) with a tiny text tower, as open_clip takes
/// it, and every BatchNorm statistic after it: batch statistics normalise, running ones fold
/// them in once.
fn training_step_matches_open_clip(name: &str) {
    let (vs, io) = check_open_clip_step_floored(&fixture(""), name, &bn_scale_floor);
    let buffers = check_buffers(&vs, &io);
    assert!(buffers > 100, "{name}: {buffers} BatchNorm buffers");
    println!("{name}: {buffers} BatchNorm buffers after the step");
}

/// MCi0 at 64 px: RepMixer and BatchNorm-normed attention blocks, squeeze-excite.
#[test]
fn mobileclip2_s0_training_step_matches_open_clip() {
    training_step_matches_open_clip("MobileCLIP2-S0");
}

/// MCi3 at 128 px: five stages, LayerNorm-normed attention, no stem scale branch.
#[test]
fn mobileclip2_s3_training_step_matches_open_clip() {
    training_step_matches_open_clip("MobileCLIP2-S3");
}
