//! `oxclip embed` against open_clip on real image files, full-size models with deterministic
//! weights (tests/fixtures/make_cli_parity_fixtures.py; RN50, ViT-B-16-SigLIP, and one model
//! of each timm trunk family: FastViT, EVA02, PE-Core, ConvNeXt, ViTamin, Swin): an exact-size
//! PNG (no resize) and the
//! captions match to 1e-4; a JPEG that both sides decode and resize their own way matches to
//! a cosine of 0.999, while the two images' embeddings stay far apart (so the test can tell a
//! wrong preprocessing from a right one). `oxclip caption` on the same two files gives
//! open_clip's CoCa captions (coca_ViT-B-32, greedy and beam search) id for id.

mod util;

use std::path::{Path, PathBuf};

use oxclip_trainer::model::params::deterministic;
use tch::{Kind, Tensor};
use util::{oxclip, read_safetensors, run_ok};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The fixture's weights, rebuilt from its recipe, written where `oxclip` can load them.
fn write_weights(recipe: &serde_json::Value, path: &Path) {
    let rows = recipe.as_array().expect("recipe rows");
    let tensors: Vec<(String, Tensor)> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let name = row[0].as_str().expect("name").to_owned();
            let shape: Vec<i64> = serde_json::from_value(row[1].clone()).expect("shape");
            let kind = match row[4].as_str().expect("dtype") {
                "float32" => Kind::Float,
                "int64" => Kind::Int64,
                other => panic!("{name}: dtype {other}"),
            };
            let (mean, std) = (row[2].as_f64().expect("mean"), row[3].as_f64().expect("std"));
            (name, deterministic(&shape, i, mean, std, kind))
        })
        .collect();
    Tensor::write_safetensors(&tensors, path).expect("write weights");
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    (&a * &b).sum(Kind::Double).double_value(&[])
        / (a.norm().double_value(&[]) * b.norm().double_value(&[]))
}

fn check(model: &str, extra: &[&str]) {
    check_with(model, "exact.png", extra);
}

/// [`check`] with `exact`, a PNG of the model's own size, as the image that needs no resize.
fn check_with(model: &str, exact: &str, extra: &[&str]) {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("cli_parity/{model}.json")))
            .expect("fixture"),
    )
    .expect("json");
    let expected = read_safetensors(&fixtures().join(format!("cli_parity/{model}.safetensors")));
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("model.safetensors");
    write_weights(&golden["recipe"], &weights);
    let out = dir.path().join("embeds.safetensors");
    let parity = fixtures().join("cli_parity");
    run_ok(
        oxclip()
            .args(["embed", "--device", "cpu", "--model", model, "--checkpoint"])
            .arg(&weights)
            .arg("--images")
            .arg(parity.join(exact))
            .arg(parity.join("photo.jpg"))
            .arg("--texts-file")
            .arg(parity.join("texts.json"))
            .args(extra)
            .arg("--out")
            .arg(&out),
    );
    let ours = read_safetensors(&out);
    let (images, want_images) = (&ours["image_embeds"], &expected["image_embeds"]);
    let text_diff = (&ours["text_embeds"] - &expected["text_embeds"]).abs().max().double_value(&[]);
    assert!(text_diff <= 1e-4, "{model}: texts differ by {text_diff}");
    let exact_diff = (images.get(0) - want_images.get(0)).abs().max().double_value(&[]);
    assert!(exact_diff <= 1e-4, "{model}: the exact-size PNG differs by {exact_diff}");
    let jpeg = cosine(&images.get(1), &want_images.get(1));
    let apart = cosine(&want_images.get(0), &want_images.get(1));
    eprintln!("{model}: texts {text_diff:.1e}, exact-size PNG {exact_diff:.1e}, JPEG cosine {jpeg:.6} (the two images: {apart:.4})");
    assert!(jpeg >= 0.999, "{model}: the resized JPEG's cosine is {jpeg}");
    assert!(
        apart < 0.99,
        "{model}: the two images embed too alike ({apart}) for the JPEG check to mean anything"
    );
}

#[test]
fn rn50_embeds_as_open_clip() {
    check("RN50", &[]);
}

/// A FastViT tower (MCi0, 256 px), which `oxclip embed` re-parameterises before it runs.
#[test]
fn mobileclip2_s0_embeds_as_open_clip() {
    check_with("MobileCLIP2-S0", "exact256.png", &[]);
}

/// One model per other timm trunk family, each on the PNG of its own size.
#[test]
fn eva02_embeds_as_open_clip() {
    check_with("EVA02-B-16", "exact.png", &[]);
}

/// 384 px, 32-token captions.
#[test]
fn pe_core_embeds_as_open_clip() {
    check_with("PE-Core-T-16-384", "exact384.png", &[]);
}

#[test]
fn convnext_embeds_as_open_clip() {
    check_with("convnext_tiny", "exact.png", &[]);
}

#[test]
fn vitamin_embeds_as_open_clip() {
    check_with("ViTamin-S", "exact.png", &[]);
}

#[test]
fn swin_embeds_as_open_clip() {
    check_with("swin_base_patch4_window7_224", "exact.png", &[]);
}

#[test]
fn vit_b_16_siglip_embeds_as_open_clip_with_a_sentencepiece_tokenizer() {
    let tokenizer = fixtures().join("tokenizers/siglip_sp");
    check("ViT-B-16-SigLIP", &["--tokenizer", tokenizer.to_str().expect("utf-8 path")]);
}

/// A Hugging Face XLM-R text tower (xlm-roberta-base's config.json built in), its captions
/// through an XLM-R SentencePiece tokenizer.json, against open_clip's HFTextEncoder.
#[test]
fn xlm_roberta_base_vit_b_32_embeds_as_open_clip_with_its_tokenizer() {
    let tokenizer = fixtures().join("hf_text/tiny_xlmr");
    check("xlm-roberta-base-ViT-B-32", &["--tokenizer", tokenizer.to_str().expect("utf-8 path")]);
}

/// A transformers model directory, no `--model`: architecture and image preparation come from
/// its `config.json` and `preprocessor_config.json`; the images go through transformers'
/// image processor on the Python side. These tiny directories have no tokenizer that fits
/// their text towers, so they embed images only (which must not need one).
fn check_directory(name: &str) {
    let expected = read_safetensors(&fixtures().join(format!("cli_parity/{name}.safetensors")));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("embeds.safetensors");
    let parity = fixtures().join("cli_parity");
    run_ok(
        oxclip()
            .args(["embed", "--device", "cpu", "--checkpoint"])
            .arg(fixtures().join(name))
            .arg("--images")
            .arg(parity.join("exact32.png"))
            .arg(parity.join("photo45x37.jpg"))
            .arg("--out")
            .arg(&out),
    );
    let (images, want) = (&read_safetensors(&out)["image_embeds"], &expected["image_embeds"]);
    let exact_diff = (images.get(0) - want.get(0)).abs().max().double_value(&[]);
    let jpeg = cosine(&images.get(1), &want.get(1));
    let apart = cosine(&want.get(0), &want.get(1));
    eprintln!("{name}: exact-size PNG {exact_diff:.1e}, JPEG cosine {jpeg:.6} (the two images: {apart:.4})");
    assert!(exact_diff <= 1e-4, "{name}: the exact-size PNG differs by {exact_diff}");
    assert!(jpeg >= 0.999, "{name}: the resized JPEG's cosine is {jpeg}");
    assert!(
        apart < 0.99,
        "{name}: the two images embed too alike ({apart}) for the JPEG check to mean anything"
    );
    // Texts do need a tokenizer: the CLIP BPE's 49,408 ids do not fit, and the error says so.
    let texts = oxclip()
        .args(["embed", "--device", "cpu", "--checkpoint"])
        .arg(fixtures().join(name))
        .arg("--texts-file")
        .arg(parity.join("texts.json"))
        .arg("--out")
        .arg(dir.path().join("texts.safetensors"))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&texts.stderr);
    assert!(
        !texts.status.success()
            && stderr.contains("49408")
            && stderr.contains("vocab_size")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(!dir.path().join("texts.safetensors").exists());
}

#[test]
fn a_siglip_model_directory_embeds_as_transformers() {
    check_directory("hf_siglip_tiny");
}

#[test]
fn a_quick_gelu_clip_model_directory_embeds_as_transformers_without_model() {
    check_directory("hf_clip_quickgelu_tiny");
}

/// `oxclip caption` against open_clip's `CoCa.generate` (coca_ViT-B-32, full size, weights
/// from the fixture's recipe), greedy (`top_k` with k = 1) and beam search (its defaults: 6
/// beams in 3 groups), both images in one batch, at the fixture's `seq_len` (kept short: every
/// step reruns both text towers over the caption so far). The ids and texts of each caption are
/// open_clip's exactly, for the PNG and for the JPEG alike (each side decodes and resizes the
/// JPEG its own way, which still picks the same words); the two images' greedy captions differ,
/// so the image does steer the decoder.
#[test]
fn coca_vit_b_32_captions_as_open_clip() {
    let model = "coca_ViT-B-32";
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("cli_parity/{model}.json")))
            .expect("fixture"),
    )
    .expect("json");
    let seq_len = golden["seq_len"].as_u64().expect("seq_len").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("model.safetensors");
    write_weights(&golden["recipe"], &weights);
    let parity = fixtures().join("cli_parity");
    let caption = |extra: &[&str]| -> Vec<serde_json::Value> {
        let out = run_ok(
            oxclip()
                .args(["caption", "--device", "cpu", "--model", model, "--checkpoint"])
                .arg(&weights)
                .arg("--image")
                .arg(parity.join("exact.png"))
                .arg(parity.join("photo.jpg"))
                .args(["--json", "--seq-len", &seq_len])
                .args(extra),
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
            .collect()
    };
    for (key, extra) in
        [("greedy", &["--generation", "top-k", "--top-k", "1"][..]), ("beam_search", &[])]
    {
        let ours = caption(extra);
        let want = golden[key].as_array().expect("captions");
        assert_eq!(ours.len(), want.len(), "{key}: {ours:?}");
        for (ours, want) in ours.iter().zip(want) {
            let file = want["image"].as_str().expect("image");
            assert!(ours["image"].as_str().expect("image").ends_with(file), "{key}: {ours}");
            eprintln!("{model} {key} {file}: {} {}", ours["ids"], ours["caption"]);
            assert_eq!(ours["ids"], want["ids"], "{key} {file}: ids");
            assert_eq!(ours["caption"], want["caption"], "{key} {file}: text");
        }
    }
    let greedy = golden["greedy"].as_array().expect("captions");
    assert_ne!(greedy[0]["ids"], greedy[1]["ids"], "the two images caption alike");
    assert!(greedy.iter().all(|c| !c["caption"].as_str().expect("text").is_empty()));
}
