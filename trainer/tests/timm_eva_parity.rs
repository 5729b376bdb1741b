//! The timm `Eva` trunks (EVA01, EVA02, Perception Encoder) against open_clip 3.3.0 and timm
//! 1.0.31, from golden files written by tests/fixtures/make_timm_eva_fixtures.py: what the
//! state_dict cannot show, each trunk kind at a small size against timm, EVA02-B-16 and
//! PE-Core-T-16-384 at full size against open_clip (features, rotary tables, locking), and a
//! training step of each (loss and every gradient).

mod common;

use std::path::PathBuf;

use common::golden::{
    build, check_features, check_lock_sets, check_open_clip_step, json, max_abs, read, recipe,
};
use oxclip_trainer::model::params::deterministic;
use oxclip_trainer::model::timm_eva::{architecture, rope_table, EvaMlp, Qkv, TimmEva};
use oxclip_trainer::model::timm_head::TimmProj;
use oxclip_trainer::model::timm_vit::{Ending, Pooled};
use oxclip_trainer::model::{zoo, Clip, ModelConfig, VisionConfig};
use tch::{nn, Device, Kind};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/timm_eva").join(name)
}

fn builtin(name: &str) -> ModelConfig {
    zoo::builtin(name).unwrap_or_else(|| panic!("{name} is built in"))
}

fn pool_name(p: Pooled) -> &'static str {
    match p {
        Pooled::Token => "token",
        Pooled::Avg => "avg",
        Pooled::Max => "max",
        Pooled::AvgMax => "avgmax",
        Pooled::Map => "map",
    }
}

/// The facts of `arch.json` for the trunk `v` names, as oxclip builds it.
fn facts(v: &VisionConfig, shapes: &[(String, Vec<i64>)]) -> serde_json::Value {
    let a = architecture(v.timm_model_name.as_deref().expect("timm")).expect("an Eva trunk");
    let ending = Ending::of(&a.pool_rule(), v).expect("ending");
    let has = |n: &str| shapes.iter().any(|(k, _)| k == n);
    let pos = shapes.iter().find(|(n, _)| n == "visual.trunk.pos_embed").map(|(_, s)| s.clone());
    let grid = v.image_size / a.patch;
    serde_json::json!({
        "block": if a.post_norm { "EvaBlockPostNorm" } else { "EvaBlock" },
        "attn": if a.qkv == Qkv::FusedBias { "AttentionRope" } else { "EvaAttention" },
        "eps": [a.eps],
        "num_prefix_tokens": i64::from(a.class_token),
        "pos_embed": pos,
        "patch_bias": has("visual.trunk.patch_embed.proj.bias"),
        "norm_pre": a.pre_norm,
        "norm": !ending.fc_norm,
        "fc_norm": ending.fc_norm,
        "global_pool": pool_name(ending.pool),
        "trunk_head": TimmProj::of(v).expect("proj") == TimmProj::Classifier,
        "heads": a.heads,
        "qkv_fused": a.qkv != Qkv::Separate,
        "q_bias": a.qkv == Qkv::FusedQvBias,
        "attn_norm": a.qkv == Qkv::Separate,
        "mlp": if a.mlp == EvaMlp::SwiGlu { "SwiGLU" } else { "Mlp" },
        "mlp_hidden": a.mlp_hidden,
        "mlp_norm": a.mlp == EvaMlp::SwiGlu,
        "layer_scale": false,
        "rope": a.rope.map(|r| serde_json::json!({
            "ref_feat_shape": [r.ref_grid, r.ref_grid], "feat_shape": [grid, grid], "grid_offset": r.offset,
            "grid_indexing": if r.xy { "xy" } else { "ij" }, "temperature": 10000.0, "dim": a.width / a.heads,
            "in_pixels": false, "rotate_half": false,
        })),
        "attn_pool": (ending.pool == Pooled::Map).then(|| serde_json::json!({"heads": a.pool_heads, "mlp_hidden": a.pool_mlp_hidden})),
    })
}

/// Every EVA and PE config: the trunk as timm builds it, and its shapes equal open_clip's
/// (zoo_shapes checks those).
#[test]
fn trunks_are_built_as_timm_builds_them() {
    let golden = json(&fixture("arch.json"));
    let golden = golden.as_object().expect("configs");
    assert_eq!(golden.len(), 12);
    for (name, g) in golden {
        let cfg = builtin(name);
        let shapes = Clip::shapes(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&facts(&cfg.vision_cfg, &shapes), g, "{name}");
    }
}

/// Each trunk kind at a small size (2 blocks of width 64, 4 heads), as timm builds it with
/// `num_classes=32` and open_clip's pooling: its output for the same images, and its rotary
/// table, bit for bit where timm's operations are ours.
#[test]
fn small_trunks_match_timm() {
    let sizes = json(&fixture("sizes.json"));
    for (name, s) in sizes.as_object().expect("trunks") {
        let g = &s["arch"];
        let int = |v: &serde_json::Value| v.as_i64().expect("integer");
        let mut a = architecture(name).expect("an Eva trunk");
        (a.depth, a.width, a.heads) =
            (int(&s["depth"]), int(&s["embed_dim"]), int(&s["num_heads"]));
        a.mlp_hidden = int(&g["mlp_hidden"]);
        if let Some(pool) = g["attn_pool"].as_object() {
            a.pool_mlp_hidden = int(&pool["mlp_hidden"]);
        }
        let size = int(&s["image_size"]);
        let cfg: VisionConfig = serde_json::from_value(serde_json::json!({
            "image_size": size, "timm_model_name": name, "timm_pool": s["pool"], "timm_proj": null,
        }))
        .expect("vision_cfg");
        let vs = nn::VarStore::new(Device::Cpu);
        let trunk = TimmEva::with_arch(vs.root() / "visual", a, &cfg, 32).expect("builds");
        let rows = recipe(&fixture(&format!("trunk_{name}_recipe.json")));
        let vars = vs.variables();
        let mut ours: Vec<&String> = vars.keys().collect();
        ours.sort();
        let theirs: Vec<String> = rows.iter().map(|r| format!("visual.trunk.{}", r.name)).collect();
        assert_eq!(ours, theirs.iter().collect::<Vec<_>>(), "{name}: timm's state_dict names");
        tch::no_grad(|| {
            for (i, r) in rows.iter().enumerate() {
                let value = deterministic(&r.shape, i, r.mean, r.std, Kind::Float);
                vars[&theirs[i]].shallow_clone().copy_(&value);
            }
        });
        let io = read(&fixture(&format!("trunk_{name}_io.safetensors")));
        let images = deterministic(&[2, 3, size, size], 0, 0.0, 1.0, Kind::Float);
        let out = tch::no_grad(|| trunk.forward(&images, false, None));
        let scale = io["out"].abs().max().double_value(&[]);
        let diff = max_abs(&out, &io["out"]);
        println!("{name}: output max abs diff {diff:e} (largest value {scale:.3})");
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: output differs by {diff}");
        if let (Some(rope), Some(expected)) = (a.rope, io.get("rope")) {
            let table = rope_table(&rope, size / a.patch, a.width / a.heads, Device::Cpu);
            assert_eq!(max_abs(&table, expected), 0.0, "{name}: rotary table");
        }
    }
}

/// EVA02-B-16 and PE-Core-T-16-384 at full size from their vendored open_clip JSON, open_clip's
/// deterministic weights, eval mode: features and the rotary table; then `lock_image_tower`.
#[test]
fn full_size_features_rope_and_locking_match_open_clip() {
    let locks = json(&fixture("lock.json"));
    for name in ["EVA02-B-16", "PE-Core-T-16-384"] {
        let cfg = builtin(name);
        let (vs, clip) = build(&cfg, &recipe(&fixture(&format!("{name}_recipe.json"))));
        let io = read(&fixture(&format!("{name}_io.safetensors")));
        let a =
            architecture(cfg.vision_cfg.timm_model_name.as_deref().expect("timm")).expect("Eva");
        let size = cfg.vision_cfg.image_size;
        let table =
            rope_table(&a.rope.expect("rotary"), size / a.patch, a.width / a.heads, Device::Cpu);
        assert_eq!(max_abs(&table, &io["rope"]), 0.0, "{name}: rotary table");
        check_features(name, &clip, size, &io);
        check_lock_sets(name, &vs, &cfg, &locks[name]);
    }
}

fn training_step_matches_open_clip(name: &str) {
    check_open_clip_step(&fixture(""), name);
}

/// Rotary embeddings on an xy grid, the MAP head over the class token too.
#[test]
fn pe_core_training_step_matches_open_clip() {
    training_step_matches_open_clip("PE-Core-T-16-384");
}

/// Separate projections, sub-LN, SwiGLU, rotary embeddings rescaled to the 16 x 16 grid.
#[test]
fn eva02_training_step_matches_open_clip() {
    training_step_matches_open_clip("EVA02-B-16");
}
