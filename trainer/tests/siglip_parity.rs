//! SigLIP / SigLIP 2 parity with open_clip 3.3.0 and timm 1.0.31, against golden files written
//! by tests/fixtures/make_siglip_fixtures.py: state_dict names and shapes of every timm trunk
//! open_clip's configs name, ViT-B-16-SigLIP's features with deterministic full-size weights,
//! tower locking, and one training step of a SigLIP model (loss and every gradient).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::golden::{self, build, check_gradients, max_abs, Row};
use oxclip_trainer::model::config::Activation;
use oxclip_trainer::model::lock::{lock, Tower};
use oxclip_trainer::model::params::deterministic;
use oxclip_trainer::model::timm_vit::{architecture, NORM_EPS};
use oxclip_trainer::model::Clip;
use oxclip_trainer::model::ModelConfig;
use tch::{Kind, Tensor};

fn fixtures() -> PathBuf {
    common::fixtures().join("siglip")
}

fn json(name: &str) -> serde_json::Value {
    golden::json(&fixtures().join(name))
}

fn read(name: &str) -> BTreeMap<String, Tensor> {
    golden::read(&fixtures().join(name))
}

fn recipe(name: &str) -> Vec<Row> {
    golden::recipe(&fixtures().join(name))
}

fn config(name: &str) -> ModelConfig {
    serde_json::from_value(json(name)).expect("open_clip's JSON parses as a model config")
}

/// Every timm trunk open_clip 3.3's configs name (B/16, B/32, L/16, SO400M/14 and /16, gopt):
/// the image tower's names and shapes equal open_clip's `create_model(NAME).state_dict()`.
#[test]
fn timm_trunks_have_open_clips_names_and_shapes() {
    let golden = json("timm_shapes.json");
    let golden = golden.as_object().expect("configs");
    assert_eq!(golden.len(), 16);
    for (name, entry) in golden {
        let cfg: ModelConfig = serde_json::from_value(entry["config"].clone())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected: Vec<(String, Vec<i64>)> =
            serde_json::from_value(entry["visual"].clone()).expect("visual shapes");
        let ours: Vec<(String, Vec<i64>)> = Clip::shapes(&cfg)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .into_iter()
            .filter(|(n, _)| n.starts_with("visual."))
            .collect();
        assert_eq!(ours, expected, "{name} ({})", entry["timm_model_name"]);
        // What the shapes cannot show: the activation and the norms' eps.
        let trunk = entry["timm_model_name"].as_str().expect("timm name");
        let a = architecture(trunk).expect("built");
        let act = match a.act {
            Activation::Gelu => "GELU",
            Activation::GeluTanh => "GELUTanh",
            Activation::QuickGelu => "QuickGELU",
            Activation::Relu => "ReLU",
        };
        let arch = &entry["arch"];
        let ours = serde_json::json!({
            "img_size": a.img_size, "patch": a.patch, "width": a.width, "depth": a.depth, "heads": a.heads,
            "mlp_hidden": a.mlp_hidden, "act": [act], "eps": [NORM_EPS], "pool_heads": a.heads, "latent": [1, 1, a.width],
        });
        assert_eq!(&ours, arch, "{trunk}");
        assert_eq!(
            cfg.vision_cfg.image_size, a.img_size,
            "{name}: open_clip's config and timm's default size agree"
        );
    }
}

/// ViT-B-16-SigLIP at full size from its open_clip JSON, open_clip's deterministic weights,
/// eval mode: normalised features within 1e-4; then `lock_image_tower` as open_clip.
#[test]
fn vit_b_16_siglip_matches_open_clip_features_and_locking() {
    let cfg = config("ViT-B-16-SigLIP.json");
    let (vs, clip) = build(&cfg, &recipe("vit_b_16_recipe.json"));
    let io = read("vit_b_16_io.safetensors");
    let images = deterministic(&[2, 3, 224, 224], 0, 0.0, 1.0, Kind::Float);
    let (img, txt) = tch::no_grad(|| clip.features(&images, &io["text"]));
    let (di, dt) = (max_abs(&img, &io["image_features"]), max_abs(&txt, &io["text_features"]));
    println!("ViT-B-16-SigLIP: image features max abs diff {di:e}, text {dt:e}");
    assert!(di <= 1e-4 && dt <= 1e-4, "image {di}, text {dt}");

    let golden = json("lock.json");
    for (unlocked, names) in golden["trainable_visual"].as_object().expect("groups") {
        for (_, var) in vs.variables() {
            let _ = var.set_requires_grad(true);
        }
        lock(&vs, &cfg, Tower::Image, unlocked.parse().expect("count")).expect("locks");
        let mut ours: Vec<String> = vs
            .variables()
            .into_iter()
            .filter(|(n, v)| n.starts_with("visual.") && v.requires_grad())
            .map(|(n, _)| n)
            .collect();
        ours.sort();
        let expected: Vec<String> = serde_json::from_value(names.clone()).expect("names");
        assert_eq!(ours, expected, "unlocked groups {unlocked}");
    }
}

/// One training step (lr 0) of a SigLIP model with a real timm trunk: open_clip's
/// `create_model("ViT-B-16-SigLIP", force_image_size=32, text_cfg=<tiny>)`, i.e.
/// vit_base_patch16_siglip_224 at 32 px (4 patch positions, as timm's `set_input_size`)
/// and a tiny bidirectional, last-token-pooled text tower. Those are keys open_clip's JSON
/// accepts (tests/fixtures/siglip/step_tiny.json), so nothing is built only for the test.
/// The trunk's 86M gradients are compared through their norms and two fixed projections each
/// (the fixture cannot hold them all): relative error <= 1e-4 of the gradient's norm.
#[test]
fn siglip_step_with_a_timm_trunk_matches_open_clip_gradients() {
    use oxclip_trainer::config::{LossConfig, LossKind, Tiling};

    let mut cfg = config("step_tiny.json");
    let loss =
        LossConfig { kind: LossKind::Siglip, tiling: Tiling::Tile(4), ..LossConfig::default() };
    loss.complete_model(&mut cfg);
    let rows = recipe("step_recipe.json");
    let (vs, clip) = build(&cfg, &rows);
    clip.set_training(true);
    let io = read("step_io.safetensors");
    let step = common::step_config(LossKind::Siglip, None, false);
    let out = common::step_at_lr0(&vs, &clip, &io["images"], &io["text"], step);
    let dl = max_abs(&out.loss, &io["loss"]);
    assert!(
        dl <= 1e-4 * io["loss"].abs().double_value(&[]).max(1e-3),
        "loss {} vs {}",
        out.loss.double_value(&[]),
        io["loss"].double_value(&[])
    );
    let worst = check_gradients(&vs, &rows, &io, 1e-4);
    println!(
        "SigLIP step: loss diff {dl:e}; worst gradient relative error {:e} ({})",
        worst.0, worst.1
    );
    let vars = vs.variables();
    assert_eq!(rows.len(), vars.len(), "every parameter compared, logit_bias included");
}

#[test]
fn unknown_timm_names_list_the_supported_ones() {
    let mut cfg = config("ViT-B-16-SigLIP.json");
    cfg.vision_cfg.timm_model_name = Some("vit_huge_patch14_clip_224".into());
    let err = Clip::shapes(&cfg).expect_err("refused").to_string();
    assert!(
        err.contains("vit_huge_patch14_clip_224")
            && err.contains("vit_so400m_patch14_siglip_384")
            && err.contains("eva02_base_patch16_clip_224")
            && err.contains("convnext_xxlarge"),
        "{err}"
    );
}
