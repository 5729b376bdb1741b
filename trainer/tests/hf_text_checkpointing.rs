//! Activation checkpointing over Hugging Face text towers that draw random numbers in
//! training: XLM-R's dropouts, and NLLB's with its layer drop, which skips whole layers. The
//! recomputed stages must replay the forward's draws, so the loss and every gradient are the
//! forward's, bit for bit, with and without micro-batches. One test alone in its process:
//! libtorch's generator is the process's, and a test beside it drawing from it would change
//! the draws between the two runs.

mod common;

use std::collections::BTreeMap;

use common::{step_at_lr0, step_config};
use oxclip_trainer::config::LossKind;
use oxclip_trainer::model::{Clip, ModelConfig};
use tch::{nn, Device, Kind, Tensor};

/// A tiny CLIP whose text tower is the Hugging Face encoder of `config` (a config.json
/// written under `dir`).
fn model(dir: &std::path::Path, name: &str, config: serde_json::Value) -> ModelConfig {
    let text = dir.join(name);
    std::fs::create_dir(&text).expect("mkdir");
    std::fs::write(text.join("config.json"), config.to_string()).expect("config.json");
    serde_json::from_value(serde_json::json!({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"hf_model_name": text, "hf_model_pretrained": false, "context_length": 8}
    }))
    .expect("model config")
}

/// The model of `cfg` holding `weights`, in training mode.
fn training_model(cfg: &ModelConfig, weights: &BTreeMap<String, Tensor>) -> (nn::VarStore, Clip) {
    let vs = nn::VarStore::new(Device::Cpu);
    let clip = Clip::new(&vs.root(), cfg).expect("builds");
    tch::no_grad(|| {
        for (name, var) in vs.variables() {
            var.shallow_clone().copy_(&weights[&name]);
        }
    });
    clip.set_training(true);
    (vs, clip)
}

/// One step (lr 0) from the same weights and generator state: the loss and each gradient
/// there is (a layer that layer drop skipped has none).
fn step(
    cfg: &ModelConfig,
    weights: &BTreeMap<String, Tensor>,
    batch: (&Tensor, &Tensor),
    micro: Option<usize>,
    checkpointing: bool,
) -> (Tensor, BTreeMap<String, Tensor>) {
    let (vs, clip) = training_model(cfg, weights);
    tch::manual_seed(29);
    let out = step_at_lr0(
        &vs,
        &clip,
        batch.0,
        batch.1,
        step_config(LossKind::Clip, micro, checkpointing),
    );
    let grads = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.grad().defined())
        .map(|(k, v)| (k, v.grad().copy()))
        .collect();
    (out.loss, grads)
}

#[test]
fn checkpointing_replays_the_encoders_dropout_and_layer_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let xlmr = model(
        dir.path(),
        "xlmr",
        serde_json::json!({"model_type": "xlm-roberta", "vocab_size": 50, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
            "max_position_embeddings": 12, "type_vocab_size": 1, "layer_norm_eps": 1e-5}),
    );
    let nllb = model(
        dir.path(),
        "nllb",
        serde_json::json!({"model_type": "m2m_100", "vocab_size": 50, "d_model": 16,
            "encoder_layers": 3, "encoder_attention_heads": 2, "encoder_ffn_dim": 24,
            "activation_dropout": 0.1, "encoder_layerdrop": 0.5}),
    );
    let mut layers_dropped = 0;
    for (name, cfg) in [("XLM-R", &xlmr), ("NLLB", &nllb)] {
        tch::manual_seed(23);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(&vs.root(), cfg).expect("builds");
        let weights: BTreeMap<String, Tensor> =
            vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
        let images = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
        // Any ids, the padding id (1) among them, which the encoders mask out.
        let tokens = Tensor::randint_low(0, 50, [8, 8], (Kind::Int64, Device::Cpu));
        for micro in [None, Some(3)] {
            let plain = step(cfg, &weights, (&images, &tokens), micro, false);
            let ckpt = step(cfg, &weights, (&images, &tokens), micro, true);
            assert!(plain.0.equal(&ckpt.0), "{name}, micro {micro:?}: loss");
            assert_eq!(
                plain.1.keys().collect::<Vec<_>>(),
                ckpt.1.keys().collect::<Vec<_>>(),
                "{name}, micro {micro:?}: which parameters have a gradient"
            );
            for (param, g) in &plain.1 {
                assert!(g.equal(&ckpt.1[param]), "{name}, micro {micro:?}: {param}");
            }
            if !plain.1.contains_key("text.transformer.layers.0.fc1.weight") {
                layers_dropped += 1;
            }
        }
        // Dropout is on: another generator state gives another loss.
        tch::manual_seed(31);
        let (vs, clip) = training_model(cfg, &weights);
        let other =
            step_at_lr0(&vs, &clip, &images, &tokens, step_config(LossKind::Clip, None, false));
        let first = step(cfg, &weights, (&images, &tokens), None, false);
        assert!(!other.loss.equal(&first.0), "{name}: the step draws nothing");
    }
    // NLLB's layer drop skipped its first layer in a step: the replay of a skip was tested.
    assert!(layers_dropped > 0, "layer drop never skipped the first layer");
}
