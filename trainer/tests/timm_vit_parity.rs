//! The timm ViT trunks beyond SigLIP's (MobileCLIP's MCi, CLIP's pre-norm ViT-L/14, the
//! average-pooled and the relative-position ViT-M, ViTamin) against open_clip 3.3.0 and timm 1.0.31,
//! from golden files written by tests/fixtures/make_timm_vit_fixtures.py: what the state_dict
//! cannot show, full-size features with deterministic weights, tower locking, and training
//! steps (loss, every gradient, BatchNorm's running statistics).

mod common;

use std::path::PathBuf;

use common::golden::{
    build, check_buffers, check_features, check_lock_sets, check_open_clip_step, json, read, recipe,
};
use oxclip_trainer::model::drop_path;
use oxclip_trainer::model::timm_head::TimmProj;
use oxclip_trainer::model::timm_vit::{architecture, Ending, MlpKind, Pooled, Stem, REL_POS_DROP};
use oxclip_trainer::model::{zoo, Clip, ModelConfig};
use tch::Kind;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/timm_vit").join(name)
}

fn builtin(name: &str) -> ModelConfig {
    zoo::builtin(name).unwrap_or_else(|| panic!("{name} is built in"))
}

/// For each config: the norms' eps, activation, prefix tokens, where the positions and norms
/// sit, the pooling open_clip leaves the trunk with, the classifier, LayerScale, the
/// drop-path rates and the relative-position MLP, as timm builds them.
#[test]
fn trunks_are_built_as_timm_builds_them() {
    let golden = json(&fixture("arch.json"));
    let golden = golden.as_object().expect("configs");
    assert_eq!(golden.len(), 20);
    for (name, g) in golden {
        let cfg = builtin(name);
        let v = &cfg.vision_cfg;
        let a = architecture(v.timm_model_name.as_deref().expect("timm")).expect("built");
        let ending = Ending::of(&a.pool_rule(), v).expect("ending");
        let shapes = Clip::shapes(&cfg).expect("shapes");
        let pos = shapes.iter().find(|(n, _)| n == "visual.trunk.pos_embed").map(|(_, s)| s);
        let rel_pos_hidden = a.rel_pos_hidden();
        let act = if rel_pos_hidden.is_some() { vec!["GELU", "ReLU"] } else { vec!["GELU"] };
        let pool = match ending.pool {
            Pooled::Token => "token",
            Pooled::Avg => "avg",
            Pooled::Max => "max",
            Pooled::AvgMax => "avgmax",
            Pooled::Map => "map",
        };
        let ours = serde_json::json!({
            "trunk": if rel_pos_hidden.is_some() { "VisionTransformerRelPos" } else { "VisionTransformer" },
            "embed": if a.stem == Stem::Patch { "PatchEmbed" } else { "HybridEmbed" },
            "mlp": if a.mlp == MlpKind::GeGlu { "GeGluMlp" } else { "Mlp" },
            "eps": [a.eps],
            "bn_eps": if a.stem == Stem::MciConv { vec![1e-5] } else { vec![] },
            "act": act,
            "num_prefix_tokens": i64::from(a.class_token),
            "no_embed_class": a.no_embed_class,
            "pos_embed": pos,
            "norm_pre": a.pre_norm,
            "norm": !ending.fc_norm,
            "fc_norm": ending.fc_norm,
            "global_pool": pool,
            "trunk_head": TimmProj::of(v).expect("proj") == TimmProj::Classifier,
            "heads": a.heads,
            "qkv_bias": a.qkv_bias,
            "layer_scale": a.init_values.is_some(),
            "rel_pos_hidden": rel_pos_hidden,
            "rel_pos_drop": rel_pos_hidden.map(|_| REL_POS_DROP),
        });
        let mut g = g.clone();
        let theirs: Vec<f64> = serde_json::from_value(g["drop_path"].take()).expect("rates");
        g.as_object_mut().expect("entry").remove("drop_path");
        assert_eq!(ours, g, "{name}");
        // Within a float32 ulp: JSON's decimal text of a float32 may read back one f64 ulp off.
        let rates = drop_path::rates(v.timm_drop_path.unwrap_or(0.0), a.depth);
        assert_eq!(rates.len(), theirs.len(), "{name}");
        for (i, (r, t)) in rates.iter().zip(&theirs).enumerate() {
            assert!((r - t).abs() <= 1e-9, "{name}: block {i}'s drop-path rate {r}, timm {t}");
        }
    }
}

/// Each config at full size from its vendored open_clip JSON, open_clip's deterministic
/// weights, eval mode: the normalised features; then `lock_image_tower` as open_clip.
#[test]
fn full_size_features_and_locking_match_open_clip() {
    let locks = json(&fixture("lock.json"));
    let names = [
        "MobileCLIP-B",
        "vit_medium_patch16_gap_256",
        "vit_relpos_medium_patch16_cls_224",
        "MobileCLIP2-L-14",
        "ViTamin-S",
    ];
    for name in names {
        let cfg = builtin(name);
        let (vs, clip) = build(&cfg, &recipe(&fixture(&format!("{name}_recipe.json"))));
        let io = read(&fixture(&format!("{name}_io.safetensors")));
        check_features(name, &clip, cfg.vision_cfg.image_size, &io);
        check_lock_sets(name, &vs, &cfg, &locks[name]);
    }
}

/// One training step (lr 0, CLIP loss, train mode) of `name` with a tiny text tower, as
/// open_clip takes it (`common::golden::check_open_clip_step`), and the BatchNorm buffers after it.
fn training_step_matches_open_clip(name: &str) {
    let (vs, io) = check_open_clip_step(&fixture(""), name);
    let buffers = check_buffers(&vs, &io);
    println!("{name}: {buffers} BatchNorm buffers after the step");
}

/// The MCi stem's BatchNorm in train mode: batch statistics, running ones folded in once.
#[test]
fn mobileclip_b_training_step_matches_open_clip() {
    training_step_matches_open_clip("MobileCLIP-B");
}

/// LayerScale, qkv without a bias, average pooling, open_clip's linear head (at 32 px).
#[test]
fn vit_medium_gap_training_step_matches_open_clip() {
    training_step_matches_open_clip("vit_medium_patch16_gap_256");
}

/// ViTamin's MbConv stem (LayerNorm2d, depthwise convolutions, the pooled shortcut), GeGLU
/// MLPs, average pooling with fc_norm, open_clip's linear head (at 64 px).
#[test]
fn vitamin_s_training_step_matches_open_clip() {
    training_step_matches_open_clip("ViTamin-S");
}

/// MobileCLIP-B exports in open_clip's layout, its stem's BatchNorm counters included, and
/// loads back bit for bit; transformers has no class for it, so `--format hf` is refused with
/// the way out, and nothing is written.
#[test]
fn mobileclip_exports_to_open_clip_only() {
    use oxclip_trainer::interchange::export::{export, Format};
    use oxclip_trainer::interchange::weights::load_weights;

    let cfg: ModelConfig =
        serde_json::from_value(json(&fixture("step_MobileCLIP-B.json"))).expect("open_clip's JSON");
    let (vs, _clip) = build(&cfg, &recipe(&fixture("step_MobileCLIP-B_recipe.json")));
    let weights: std::collections::BTreeMap<String, tch::Tensor> =
        vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = || weights.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
    let files = export(copy(), &cfg, None, Format::OpenClip, dir.path()).expect("exports");
    let other = tch::nn::VarStore::new(tch::Device::Cpu);
    let _ = Clip::new(&other.root(), &cfg).expect("builds");
    load_weights(&other, &files[0]).expect("loads back");
    for (name, t) in other.variables() {
        assert!(t.kind() == weights[&name].kind() && t.equal(&weights[&name]), "{name}");
    }
    let counter = &other.variables()["visual.trunk.patch_embed.backbone.0.bn.num_batches_tracked"];
    assert_eq!(counter.kind(), Kind::Int64);
    let hf = dir.path().join("hf");
    let err =
        export(copy(), &cfg, None, Format::HuggingFace, &hf).expect_err("no HF class").to_string();
    assert!(err.contains("vit_base_mci_224") && err.contains("--format open_clip"), "{err}");
    assert!(!hf.exists(), "nothing written");
}
