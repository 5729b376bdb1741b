//! CoCa against open_clip 3.3 (tests/fixtures/make_coca_fixtures.py): three tiny models with
//! deterministic weights, one per shape open_clip's CoCa configs take (the attentional pooler
//! of coca_ViT-B-32, the plain ViT tokens of coca_base, the Hugging Face text tower of
//! coca_roberta-ViT-B-32): names and shapes, features, the towers' tokens, the decoder's
//! logits, the caption loss, greedy and beam-search captions, one training step (the same
//! with micro-batches and activation checkpointing), and what locking leaves trainable.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::golden::{
    build, check_gradients_floored, check_trainable_sets, json, key_bias_floor, max_abs, read,
    recipe,
};
use oxclip_trainer::config::LossKind;
use oxclip_trainer::generate::{GenerateOptions, Strategy};
use oxclip_trainer::model::coca::{caption, caption_label_count};
use oxclip_trainer::model::lock::{lock_with, Tower};
use oxclip_trainer::model::params::deterministic;
use oxclip_trainer::model::{Clip, ModelConfig};
use tch::{nn, Kind, Tensor};

const VARIANTS: [&str; 3] = ["attn_pool", "plain", "hf"];

fn dir() -> PathBuf {
    common::fixtures().join("coca")
}

/// The variant's open_clip config; the hf one's text model directory made absolute.
fn config(v: &str) -> ModelConfig {
    let mut cfg: ModelConfig =
        serde_json::from_value(json(&dir().join(format!("{v}.json")))).expect("open_clip's JSON");
    if let Some(name) = &cfg.text_cfg.hf_model_name {
        let path = common::fixtures().join("hf_text").join(name);
        cfg.text_cfg.hf_model_name = Some(path.display().to_string());
    }
    cfg
}

/// (sot, eos, pad) of the variant's tokens.
fn specials(v: &str) -> (i64, i64, i64) {
    if v == "hf" {
        (0, 2, 1)
    } else {
        (62, 63, 0)
    }
}

fn images() -> Tensor {
    deterministic(&[4, 3, 32, 32], 0, 0.0, 1.0, Kind::Float)
}

fn model(v: &str) -> (nn::VarStore, Clip, BTreeMap<String, Tensor>) {
    let cfg = config(v);
    let (vs, clip) = build(&cfg, &recipe(&dir().join(format!("{v}_recipe.json"))));
    (vs, clip, read(&dir().join(format!("{v}_io.safetensors"))))
}

fn close(label: &str, ours: &Tensor, theirs: &Tensor, tolerance: f64) {
    assert_eq!(ours.size(), theirs.size(), "{label}: shape");
    let diff = max_abs(ours, theirs);
    println!("{label}: max abs diff {diff:e}");
    assert!(diff <= tolerance, "{label}: {diff} > {tolerance}");
}

/// Rows of a fixture's token tensor as lists.
fn token_rows(t: &Tensor) -> Vec<Vec<i64>> {
    let (rows, cols) = (t.size()[0], t.size()[1]);
    let flat = Vec::<i64>::try_from(t.reshape([-1])).expect("ids");
    (0..rows as usize).map(|r| flat[r * cols as usize..(r + 1) * cols as usize].to_vec()).collect()
}

#[test]
fn features_tokens_logits_and_caption_loss_match_open_clip() {
    for v in VARIANTS {
        let (_vs, clip, io) = model(v);
        let text = &io["text"];
        let images = images();
        tch::no_grad(|| {
            let (image_features, text_features) = clip.features(&images, text);
            close(&format!("{v} image features"), &image_features, &io["image_features"], 1e-5);
            close(&format!("{v} text features"), &text_features, &io["text_features"], 1e-5);
            let (_, image_tokens) = clip.encode_image_tokens(&images);
            close(&format!("{v} image tokens"), &image_tokens, &io["image_embs"], 1e-5);
            let logits = clip.caption_logits(&images, text).expect("CoCa");
            close(&format!("{v} logits"), &logits, &io["logits"], 1e-5);
            // The step's caption loss: summed over the labels, over their count.
            let out = clip.forward_outputs(&images, text, None);
            let count = caption_label_count(text, clip.pad_id());
            let loss = out.caption_nll.expect("a caption loss") / count;
            close(&format!("{v} caption loss"), &loss, &io["caption_loss"], 1e-5);
        });
    }
}

#[test]
fn greedy_and_beam_search_captions_equal_open_clips() {
    for v in VARIANTS {
        let (_vs, clip, io) = model(v);
        let (sot_id, eos_id, pad_id) = specials(v);
        let opts = |strategy, fixed_output_length| GenerateOptions {
            strategy,
            seq_len: 12,
            min_seq_len: 3,
            sot_id,
            eos_id,
            pad_id,
            fixed_output_length,
            ..GenerateOptions::default()
        };
        let greedy = opts(Strategy::TopK { k: 1 }, false);
        let beam = opts(Strategy::BeamSearch { num_beams: 6, num_beam_groups: 3 }, false);
        let fixed = opts(Strategy::BeamSearch { num_beams: 6, num_beam_groups: 3 }, true);
        let images = images();
        let last = images.narrow(0, 3, 1);
        for (key, images, opts) in [
            ("greedy", &images, &greedy),
            ("beam", &images, &beam),
            ("beam_fixed", &images, &fixed),
            ("beam_single", &last, &beam),
            ("beam_fixed_single", &last, &fixed),
        ] {
            let ours = caption(&clip, images, opts).expect("captions");
            assert_eq!(ours, token_rows(&io[key]), "{v} {key}");
        }
        let greedy = token_rows(&io["greedy"]);
        assert!(greedy.iter().any(|c| c != &greedy[0]), "{v}: the captions differ by image");
        // Longer captions than the text tower reads are refused, not a crash.
        if v != "hf" {
            let long = GenerateOptions { seq_len: 14, ..beam.clone() };
            let err = caption(&clip, &images, &long).unwrap_err().to_string();
            assert!(err.contains("at most 12") && err.contains("--seq-len"), "{err}");
            caption(&clip, &images, &GenerateOptions { seq_len: 13, ..beam.clone() })
                .expect("13 tokens: the tower reads 12");
        }
    }
}

/// One training step with CoCaLoss (caption weight 2, contrastive 1): the loss, its two parts
/// and every gradient as open_clip's; the same with two micro-batches of two (the caption loss
/// is a mean over the whole batch's labels, which the rows hold unequally many of) and with
/// activation checkpointing.
#[test]
fn a_training_step_matches_open_clip() {
    for v in VARIANTS {
        let io = read(&dir().join(format!("step_{v}_io.safetensors")));
        let rows = recipe(&dir().join(format!("step_{v}_recipe.json")));
        for (micro, checkpointing) in [(None, false), (Some(2), false), (Some(3), true)] {
            let label = format!("{v} (micro-batch {micro:?}, checkpointing {checkpointing})");
            let (vs, clip) = build(&config(v), &rows);
            clip.set_training(true);
            let out = common::step_at_lr0(
                &vs,
                &clip,
                &images(),
                &io["text"],
                common::step_config(LossKind::Coca, micro, checkpointing),
            );
            let (contrastive, caption) = out.coca_parts.expect("CoCa's two parts");
            close(&format!("{label} loss"), &out.loss, &io["loss"], 1e-5);
            close(&format!("{label} contrastive"), &contrastive, &io["contrastive_loss"], 1e-5);
            close(&format!("{label} caption"), &caption, &io["caption_loss"], 1e-5);
            let worst = check_gradients_floored(&vs, &rows, &io, 1e-4, &key_bias_floor);
            println!("{label}: worst gradient {:e} ({})", worst.0, worst.1);
        }
    }
}

/// lock_image_tower / lock_text_tower as open_clip's towers lock: the attentional pooler
/// stays frozen, cls_emb goes with the embeddings, the decoder never locks.
#[test]
fn locking_leaves_open_clips_sets_trainable() {
    for v in VARIANTS {
        let (vs, _clip, _) = model(v);
        let cfg = config(v);
        let expected = json(&dir().join(format!("lock_{v}.json")));
        check_trainable_sets(&format!("{v} image"), &vs, "visual.", &expected["image"], |n| {
            lock_with(&vs, &cfg, Tower::Image, n.parse().expect("count"), true).expect("locks");
        });
        check_trainable_sets(&format!("{v} text"), &vs, "text.", &expected["text"], |n| {
            lock_with(&vs, &cfg, Tower::Text, n.parse().expect("count"), true).expect("locks");
        });
        for tower in [Tower::Image, Tower::Text] {
            lock_with(&vs, &cfg, tower, 0, true).expect("locks");
        }
        let decoder: Vec<bool> = vs
            .variables()
            .into_iter()
            .filter(|(n, _)| n.starts_with("text_decoder."))
            .map(|(_, t)| t.requires_grad())
            .collect();
        assert!(!decoder.is_empty() && decoder.iter().all(|&t| t), "{v}: the decoder trains");
    }
}
