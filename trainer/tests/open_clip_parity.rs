//! Parity with open_clip 3.3.0: parameter names and shapes, forward features, the loss and
//! every parameter gradient, against golden files written by tests/fixtures/make_fixtures.py.

use std::collections::BTreeMap;
use std::path::PathBuf;

use oxclip_trainer::interchange::weights::load_weights;
use oxclip_trainer::loss::clip::clip_loss;
use oxclip_trainer::loss::siglip::siglip_loss;
use oxclip_trainer::loss::Matmul;
use oxclip_trainer::model::{self, Clip, ModelConfig};
use tch::{nn, Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model_config(path: &str) -> ModelConfig {
    let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path))
        .expect("model yaml");
    serde_yaml::from_str(&text).expect("model yaml parses")
}

fn read(path: PathBuf) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn assert_state_dict_matches(model_yaml: &str, fixture: &str) {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = Clip::new(&vs.root(), &model_config(model_yaml)).expect("builds");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(fixture)).expect("fixture"))
            .expect("json");
    let expected: BTreeMap<String, Vec<i64>> = golden["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .map(|t| {
            (
                t[0].as_str().expect("name").to_string(),
                serde_json::from_value(t[1].clone()).expect("shape"),
            )
        })
        .collect();
    let ours: BTreeMap<String, Vec<i64>> =
        vs.variables().into_iter().map(|(k, v)| (k, v.size())).collect();
    assert_eq!(ours, expected);
    assert_eq!(model::num_params(&vs), golden["num_params"].as_i64().expect("num_params"));
}

#[test]
fn tiny_has_open_clips_names_and_shapes() {
    assert_state_dict_matches("../configs/models/tiny.yaml", "open_clip_tiny_state_dict.json");
}

/// Loads open_clip weights, checks features, loss and all gradients of the loss.
fn check_parity(dir: &str, quick_gelu: bool) {
    let mut cfg = model_config("../tests/fixtures/models/parity-tiny.yaml");
    cfg.quick_gelu = quick_gelu;
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Clip::new(&vs.root(), &cfg).expect("builds");
    load_weights(&vs, &fixtures().join(dir).join("model.safetensors"))
        .expect("loads open_clip weights");
    let io = read(fixtures().join(dir).join("io.safetensors"));

    let (image, text) = model.features(&io["images"], &io["text"]);
    assert!(
        max_abs(&image, &io["image_features"]) < 1e-5,
        "image features differ by {}",
        max_abs(&image, &io["image_features"])
    );
    assert!(
        max_abs(&text, &io["text_features"]) < 1e-5,
        "text features differ by {}",
        max_abs(&text, &io["text_features"])
    );

    // Loss and gradients the way the step computes them: features -> loss and feature
    // gradients -> surrogate backward.
    let n = image.size()[0];
    let out = clip_loss(
        &image.detach(),
        &text.detach(),
        &model.logit_scale.detach(),
        0..n,
        3,
        Matmul::Fp32,
    );
    assert!(
        max_abs(&out.loss, &io["loss"]) < 1e-5,
        "loss {} vs {}",
        out.loss.double_value(&[]),
        io["loss"].double_value(&[])
    );
    let surrogate = (&image * out.grad_image).sum(Kind::Float)
        + (&text * out.grad_text).sum(Kind::Float)
        + &model.logit_scale * out.grad_logit_scale;
    surrogate.backward();
    for (name, var) in vs.variables() {
        let expected = &io[&format!("grad.{name}")];
        let scale = expected.abs().max().double_value(&[]).max(1e-3);
        let diff = max_abs(&var.grad(), expected);
        assert!(diff / scale < 1e-4, "{name}: gradient differs by {diff} (scale {scale})");
    }
}

#[test]
fn tiny_model_matches_open_clip_features_loss_and_gradients() {
    check_parity("parity_tiny", false);
}

#[test]
fn quick_gelu_model_matches_open_clip() {
    check_parity("parity_tiny_quickgelu", true);
}

#[test]
fn clip_loss_matches_open_clip_loss_and_autograd() {
    let f = read(fixtures().join("clip_loss.safetensors"));
    let out = clip_loss(
        &f["image_features"],
        &f["text_features"],
        &f["logit_scale"],
        0..12,
        5,
        Matmul::Fp32,
    );
    assert!(max_abs(&out.loss, &f["loss"]) < 1e-5);
    assert!(max_abs(&out.grad_image, &f["grad_image_features"]) < 1e-6);
    assert!(max_abs(&out.grad_text, &f["grad_text_features"]) < 1e-6);
    assert!(max_abs(&out.grad_logit_scale, &f["grad_logit_scale"]) < 1e-5);
}

/// One oxclip training step with the sigmoid loss, through `step::train_step` itself (tiled
/// loss; whole batch, then gradient caching in micro-batches of 4 and 2), gives open_clip's
/// SigLIP loss and every parameter gradient, the bias's included.
#[test]
fn siglip_step_matches_open_clip_gradients() {
    use oxclip_trainer::collectives::SingleProcess;
    use oxclip_trainer::config::{LossConfig, LossKind, Tiling};
    use oxclip_trainer::optim::{AdamW, AdamWConfig};
    use oxclip_trainer::step::{train_step, StepConfig};

    let dir = fixtures().join("parity_tiny_siglip");
    let io = read(dir.join("io.safetensors"));
    let mut cfg = model_config("../tests/fixtures/models/parity-tiny.yaml");
    let loss =
        LossConfig { kind: LossKind::Siglip, tiling: Tiling::Tile(4), ..LossConfig::default() };
    loss.complete_model(&mut cfg);
    for micro_batch in [None, Some(4), Some(2)] {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg).expect("builds");
        load_weights(&vs, &dir.join("model.safetensors")).expect("loads open_clip weights");
        let mut optimizer = AdamW::new(
            vs.variables().into_iter().collect(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 },
        );
        let grad_sync =
            oxclip_trainer::grad_sync::GradSync::for_var_store(&vs, &Default::default())
                .expect("buckets");
        let step = StepConfig {
            autocast: None,
            grad_clip_norm: None,
            loss: oxclip_trainer::loss::LossSpec::new(&loss, false),
            micro_batch,
            patch_dropout: None,
            grad_checkpointing: false,
        };
        // lr 0: the step computes the gradients and leaves the weights alone.
        let out = train_step(
            &model,
            &mut optimizer,
            &SingleProcess,
            &grad_sync,
            &io["images"],
            &io["text"],
            0.0,
            0,
            step,
            None,
        )
        .expect("step");
        assert!(
            max_abs(&out.loss, &io["loss"]) < 1e-5,
            "{micro_batch:?}: loss {} vs {}",
            out.loss.double_value(&[]),
            io["loss"].double_value(&[])
        );
        let mut names = 0;
        for (name, var) in optimizer.variables() {
            let expected = &io[&format!("grad.{name}")];
            let scale = expected.abs().max().double_value(&[]).max(1e-3);
            let diff = max_abs(&var.grad(), expected);
            assert!(
                diff / scale < 1e-4,
                "{micro_batch:?}, {name}: gradient differs by {diff} (scale {scale})"
            );
            names += 1;
        }
        assert_eq!(
            names,
            vs.variables().len(),
            "every parameter has a gradient, logit_bias included"
        );
    }
}

/// open_clip's `SigLipLoss` (one process) on the same features: value and every gradient.
#[test]
fn siglip_loss_matches_open_clip_siglip_loss_and_autograd() {
    let f = read(fixtures().join("siglip_loss.safetensors"));
    for tile in [5, 0] {
        let out = siglip_loss(
            &f["image_features"],
            &f["text_features"],
            &f["logit_scale"],
            &f["logit_bias"],
            0..12,
            tile,
            Matmul::Fp32,
        );
        assert!(max_abs(&out.loss, &f["loss"]) < 1e-5, "tile {tile}");
        assert!(max_abs(&out.grad_image, &f["grad_image_features"]) < 1e-6, "tile {tile}");
        assert!(max_abs(&out.grad_text, &f["grad_text_features"]) < 1e-6, "tile {tile}");
        assert!(max_abs(&out.grad_logit_scale, &f["grad_logit_scale"]) < 1e-5, "tile {tile}");
        let bias = out.grad_logit_bias.expect("SigLIP has a bias gradient");
        assert!(max_abs(&bias, &f["grad_logit_bias"]) < 1e-5, "tile {tile}");
    }
}

#[test]
fn loading_reports_missing_unexpected_and_misshaped_tensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.safetensors");
    let src = read(fixtures().join("parity_tiny/model.safetensors"));
    let mut tensors: Vec<(String, Tensor)> =
        src.into_iter().filter(|(k, _)| k != "logit_scale" && k != "visual.proj").collect();
    tensors.push(("visual.proj".into(), Tensor::zeros([3, 3], (Kind::Float, Device::Cpu))));
    tensors.push(("extra.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
    Tensor::write_safetensors(&tensors, &path).expect("write");
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = Clip::new(&vs.root(), &model_config("../tests/fixtures/models/parity-tiny.yaml"))
        .expect("builds");
    let msg = load_weights(&vs, &path).expect_err("rejects").to_string();
    assert!(msg.contains("missing 1 tensor: logit_scale"), "{msg}");
    assert!(msg.contains("unexpected 1 tensor: extra.weight"), "{msg}");
    assert!(
        msg.contains("mis-shaped 1 tensor: visual.proj (file [3, 3], model [64, 32])"),
        "{msg}"
    );
}
