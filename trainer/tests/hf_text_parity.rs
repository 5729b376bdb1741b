//! Hugging Face text towers (XLM-RoBERTa) against open_clip 3.3.0's `HFTextEncoder` over
//! transformers 4.57.1, from golden files written by tests/fixtures/make_hf_text_fixtures.py:
//! the tokenizer's ids for captions in four languages, a tiny tower's features under each
//! pooler and projection, `lock_text` with and without frozen LayerNorms, a training step
//! (loss and every gradient), and xlm-roberta-base-ViT-B-32 at full size.

mod common;

use std::path::PathBuf;

use common::golden::{
    build, check_features, check_step, check_trainable_sets, json, key_bias_floor, max_abs, read,
    recipe,
};
use oxclip_trainer::model::lock::{lock_with, Tower};
use oxclip_trainer::model::{zoo, ModelConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_text").join(name)
}

/// The fixture's config `name`, its `hf_model_name` (a directory such as `tiny_xlmr`,
/// relative to the fixtures) made absolute.
fn config(name: &str) -> ModelConfig {
    let mut cfg: ModelConfig =
        serde_json::from_value(json(&fixture(&format!("{name}.json")))).expect("open_clip's JSON");
    let dir = cfg.text_cfg.hf_model_name.as_deref().expect("a Hugging Face text tower");
    cfg.text_cfg.hf_model_name = Some(fixture(dir).display().to_string());
    cfg
}

/// The fixture's ids (tokens*.json) against the tokenizer of `dir`, prepared for `cfg`.
fn check_tokens(
    golden: &str,
    dir: &str,
    cfg: &ModelConfig,
) -> oxclip_data_loader::tokenizer::Tokenizer {
    let golden = json(&fixture(golden));
    let tokenizer =
        oxclip_trainer::prepare::text_tokenizer(Some(&fixture(dir)), cfg).expect("checks");
    let ctx = golden["context_length"].as_u64().expect("length") as usize;
    let texts = golden["texts"].as_array().expect("texts");
    let ids = golden["ids"].as_array().expect("ids");
    assert_eq!(texts.len(), ids.len());
    for (text, expected) in texts.iter().zip(ids) {
        let expected: Vec<i64> = serde_json::from_value(expected.clone()).expect("ids");
        assert_eq!(tokenizer.encode(text.as_str().expect("text"), ctx), expected, "{dir}: {text}");
    }
    tokenizer
}

/// `lock_text_tower(n, freeze_layer_norm)` as open_clip, for each `"n,freeze"` of the fixture.
fn check_text_lock_sets(cfg: &ModelConfig, vs: &tch::nn::VarStore, golden: &str) {
    let expected = json(&fixture(golden));
    check_trainable_sets(&format!("{golden}: lock_text"), vs, "text.", &expected, |key| {
        let (n, freeze) = key.split_once(',').expect("n,freeze");
        lock_with(vs, cfg, Tower::Text, n.parse().expect("n"), freeze == "true").expect("locks");
    });
}

#[test]
fn the_tokenizer_pads_with_the_towers_pad_id_as_open_clip() {
    let cfg = config("mean_mlp");
    let tokenizer = check_tokens("tokens.json", "tiny_xlmr", &cfg);
    // CLIP's BPE has more ids than the tower has embeddings.
    let clip_bpe = oxclip_data_loader::tokenizer::Tokenizer::clip_default().expect("the CLIP BPE");
    let err = oxclip_trainer::prepare::check_tokenizer(&clip_bpe, &cfg, "the CLIP BPE")
        .expect_err("ids beyond the vocabulary")
        .to_string();
    assert!(err.contains("49407") && err.contains("302 embeddings"), "{err}");
    // A tower masking out another id than the tokenizer pads with would attend to padding.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut hf: serde_json::Value = json(&fixture("tiny_xlmr/config.json"));
    hf["pad_token_id"] = 0.into();
    std::fs::write(dir.path().join("config.json"), hf.to_string()).expect("written");
    let mut other = cfg.clone();
    other.text_cfg.hf_model_name = Some(dir.path().display().to_string());
    let err = oxclip_trainer::prepare::check_tokenizer(&tokenizer, &other, "tiny_xlmr")
        .expect_err("a tokenizer padding with another id")
        .to_string();
    assert!(err.contains("pads with id 1") && err.contains("masks out id 0"), "{err}");
}

/// Mean, CLS (transformers' pooler layer) and first-token pooling, MLP and linear
/// projections: names and shapes, then features within 1e-5 of open_clip's.
#[test]
fn features_match_open_clip_for_each_pooler_and_projection() {
    for name in ["mean_mlp", "cls_linear", "cls_last_linear"] {
        let cfg = config(name);
        let (_vs, clip) = build(&cfg, &recipe(&fixture(&format!("{name}_recipe.json"))));
        let io = read(&fixture(&format!("{name}_io.safetensors")));
        check_features(name, &clip, 32, &io);
    }
}

/// open_clip's max_pooler cannot run (PyTorch refuses its integer mask); oxclip pools the
/// maximum over the caption's tokens, checked against that computed from transformers' hidden
/// states.
#[test]
fn max_pooling_takes_the_maximum_over_the_captions_tokens() {
    let mut cfg = config("mean_mlp");
    cfg.text_cfg.hf_pooler_type = "max_pooler".into();
    let (_vs, clip) = build(&cfg, &recipe(&fixture("mean_mlp_recipe.json")));
    let io = read(&fixture("mean_mlp_io.safetensors"));
    let ours = tch::no_grad(|| clip.encode_text(&io["text"]));
    let ours = &ours / ours.norm_scalaropt_dim(2, [-1], true);
    let diff = max_abs(&ours, &io["max_text_features"]);
    println!("max pooling: max abs diff {diff:e}");
    assert!(diff <= 1e-5, "max pooling differs by {diff}");
}

/// `lock_text_tower(n, freeze_layer_norm)` as open_clip: the embeddings, then each layer;
/// `n: 0` freezes the whole encoder; LayerNorms stay trainable unless frozen explicitly.
#[test]
fn lock_text_freezes_open_clips_groups_and_layer_norms() {
    let cfg = config("mean_mlp");
    let (vs, _clip) = build(&cfg, &recipe(&fixture("mean_mlp_recipe.json")));
    check_text_lock_sets(&cfg, &vs, "lock.json");
}

/// One training step against open_clip's (ClipLoss, train mode, dropout 0 in the tiny
/// config): loss within 1e-5, every gradient within 1e-4 of its norm. The padding rows of
/// both embedding tables get none, as transformers' `padding_idx`.
#[test]
fn a_training_step_matches_open_clip() {
    let cfg = config("step_mean_mlp");
    let (vs, _io) = check_step(&cfg, &fixture(""), "mean_mlp", &key_bias_floor);
    let vars = vs.variables();
    for table in ["word_embeddings", "position_embeddings"] {
        let grad = vars[&format!("text.transformer.embeddings.{table}.weight")].grad();
        assert_eq!(grad.get(1).abs().max().double_value(&[]), 0.0, "{table}: the padding row");
    }
}

/// xlm-roberta-base-ViT-B-32 as the zoo has it: its text tower from the built-in copy of
/// xlm-roberta-base's config.json (250,002 tokens, 12 layers of 768), features within 1e-5.
#[test]
fn xlm_roberta_base_vit_b_32_at_full_size_matches_open_clip() {
    let name = "xlm-roberta-base-ViT-B-32";
    let cfg = zoo::builtin(name).expect("built in");
    let (_vs, clip) = build(&cfg, &recipe(&fixture(&format!("{name}_recipe.json"))));
    let io = read(&fixture(&format!("{name}_io.safetensors")));
    check_features(name, &clip, 224, &io);
    // A caption's padding changes nothing: the same ids padded to twice the length.
    let text = &io["text"];
    let padded = tch::Tensor::cat(&[text, &text.ones_like()], 1);
    let (a, b) = tch::no_grad(|| (clip.encode_text(text), clip.encode_text(&padded)));
    let diff = max_abs(&a, &b);
    assert!(diff <= 1e-5, "padding moved the features by {diff}");
}

/// `hf_model_pretrained: true`: the encoder starts from the text model directory's own
/// weights (an XLMRobertaForMaskedLM file, as the hub holds xlm-roberta-base), exactly the
/// tensors open_clip loads through transformers; the projection keeps its initial weights.
#[test]
fn pretrained_text_weights_load_as_open_clip_loads_them() {
    use oxclip_trainer::interchange::hf_text::load_pretrained_text;
    let mut cfg = config("mean_mlp");
    cfg.text_cfg.hf_model_pretrained = true;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _clip = oxclip_trainer::model::Clip::new(&vs.root(), &cfg).expect("builds");
    let proj_before = vs.variables()["text.proj.0.weight"].copy();
    let path = load_pretrained_text(&vs, &cfg).expect("loads");
    assert!(path.ends_with("tiny_xlmr/model.safetensors"), "{}", path.display());
    let expected = read(&fixture("pretrained_text.safetensors"));
    let vars = vs.variables();
    let ours: Vec<&String> = vars.keys().filter(|k| k.starts_with("text.transformer.")).collect();
    assert_eq!(ours.len(), expected.len());
    for (name, t) in &expected {
        assert_eq!(max_abs(&vars[name], t), 0.0, "{name}");
    }
    assert_eq!(max_abs(&vars["text.proj.0.weight"], &proj_before), 0.0);

    // A name oxclip would have to download from is refused with what to do instead.
    let zoo = zoo::builtin("xlm-roberta-base-ViT-B-32").expect("built in");
    let err = load_pretrained_text(&vs, &zoo).expect_err("nothing to load from").to_string();
    assert!(err.contains("never downloads") && err.contains("hf_model_pretrained: false"), "{err}");
}

/// mT5 (T5's encoder: RMS norms, unscaled attention with relative-position buckets, gated
/// GELU) and NLLB (M2M-100's: scaled embeddings, sinusoidal positions, pre-LN, layer drop off
/// in the fixture) against open_clip: their tokenizers' ids (`$A </s>` padded with 0;
/// `eng_Latn $A </s>` padded with 1), features, locking and a training step each.
#[test]
fn mt5_and_nllb_towers_match_open_clip() {
    for name in ["mt5", "nllb"] {
        let cfg = config(name);
        let dir = cfg.text_cfg.hf_model_name.clone().expect("a directory");
        let tiny =
            std::path::Path::new(&dir).file_name().expect("name").to_string_lossy().into_owned();
        check_tokens(&format!("tokens_{name}.json"), &tiny, &cfg);
        let (vs, clip) = build(&cfg, &recipe(&fixture(&format!("{name}_recipe.json"))));
        check_features(name, &clip, 32, &read(&fixture(&format!("{name}_io.safetensors"))));
        check_text_lock_sets(&cfg, &vs, &format!("lock_{name}.json"));
        let step_cfg = config(&format!("step_{name}"));
        check_step(&step_cfg, &fixture(""), name, &key_bias_floor);
    }
}

/// `tokenizer_kwargs.language` (open_clip's `HFTokenizer(language=...)`): NLLB's captions
/// start with that language's code, as transformers' `src_lang` marks them. (open_clip 3.3's
/// own has no effect under transformers 4.57; the fixture script checks that.) A code the
/// tokenizer lacks, or a tokenizer without a source language, is refused.
#[test]
fn nllb_marks_captions_with_the_source_language_asked_for() {
    use oxclip_trainer::model::config::TokenizerKwargs;
    let language = |cfg: &mut ModelConfig, code: &str| {
        cfg.text_cfg.tokenizer_kwargs =
            Some(TokenizerKwargs { language: Some(code.into()), ..Default::default() });
    };
    let mut cfg = config("nllb");
    language(&mut cfg, "deu_Latn");
    check_tokens("tokens_nllb_deu.json", "tiny_nllb", &cfg);

    language(&mut cfg, "klingon");
    let err = oxclip_trainer::prepare::text_tokenizer(Some(&fixture("tiny_nllb")), &cfg)
        .expect_err("no such code")
        .to_string();
    assert!(err.contains("\"klingon\" is not a token"), "{err}");
    let mut xlmr = config("mean_mlp");
    language(&mut xlmr, "deu_Latn");
    let err = oxclip_trainer::prepare::text_tokenizer(Some(&fixture("tiny_xlmr")), &xlmr)
        .expect_err("no source language")
        .to_string();
    assert!(err.contains("no source language"), "{err}");
}

/// mt5-base-ViT-B-32 and nllb-clip-base as the zoo has them: their text towers from the
/// built-in copies of google/mt5-base's and facebook/nllb-200-distilled-600M's config.json
/// (T5's 32 buckets to 128 on 16-token captions, NLLB's sinusoids at width 1024), features
/// within 1e-5 of open_clip's.
#[test]
fn mt5_base_and_nllb_clip_base_at_full_size_match_open_clip() {
    for name in ["mt5-base-ViT-B-32", "nllb-clip-base"] {
        let cfg = zoo::builtin(name).expect("built in");
        let (_vs, clip) = build(&cfg, &recipe(&fixture(&format!("{name}_recipe.json"))));
        check_features(name, &clip, 224, &read(&fixture(&format!("{name}_io.safetensors"))));
    }
}
