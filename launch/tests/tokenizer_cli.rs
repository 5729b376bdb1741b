//! Hugging Face tokenizers through the real `oxclip` binary: a model trained and used with a
//! SentencePiece tokenizer.json, and the tokenizer/model mismatches refused before any step
//! or any embedding, with both numbers named.

mod util;

use std::path::{Path, PathBuf};

use util::{max_abs_diff, oxclip, run_ok, synth};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers").join(name)
}

/// The tiny test model with SigLIP's text side: a 400-id vocabulary (the fixture
/// tokenizer's), bidirectional, pooled at the last position.
fn model_yaml(dir: &Path, vocab_size: u32, pool_type: &str) -> PathBuf {
    let text = format!(
        "embed_dim: 64\nvision_cfg:\n  image_size: 32\n  layers: 2\n  width: 64\n  patch_size: 8\n  head_width: 32\n\
         text_cfg:\n  context_length: 16\n  vocab_size: {vocab_size}\n  width: 64\n  heads: 2\n  layers: 2\n  pool_type: {pool_type}\n  no_causal_mask: true\n"
    );
    let path = dir.join(format!("model-{vocab_size}-{pool_type}.yaml"));
    std::fs::write(&path, text).expect("write model");
    path
}

fn run_config(dir: &Path, synth: &Path, model: &Path, tokenizer: &Path, run: &str) -> PathBuf {
    let text = format!(
        "run_dir: {run}\nmodel: {model}\ndata:\n  train: {train}\n  workers: 2\n  tokenizer: {tokenizer}\n\
         train:\n  batch_size: 8\n  steps: 2\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  eval_every: 0\n\
         optim:\n  lr: 1.0e-3\n  warmup_steps: 1\n",
        run = dir.join(run).display(),
        model = model.display(),
        train = synth.join("train").display(),
        tokenizer = tokenizer.display(),
    );
    let path = dir.join(format!("{run}.yaml"));
    std::fs::write(&path, text).expect("write config");
    path
}

fn fails_with(cmd: &mut std::process::Command, needles: &[&str]) -> String {
    let out = cmd.output().expect("oxclip runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} succeeded\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
    stderr
}

#[test]
fn a_sentencepiece_tokenizer_trains_embeds_and_mismatches_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 32, 0, 32);
    let tokenizer = fixture("siglip_sp");

    // Trains with the tokenizer directory, then embeds with it.
    let model = model_yaml(dir.path(), 400, "last");
    run_ok(oxclip().args(["train", "--config"]).arg(run_config(
        dir.path(),
        &data,
        &model,
        &tokenizer,
        "run",
    )));
    let run = dir.path().join("run");
    let texts = dir.path().join("texts.json");
    std::fs::write(&texts, r#"["a red circle", "a blue square above a green cross"]"#)
        .expect("write");
    let out = dir.path().join("embeds.safetensors");
    run_ok(
        oxclip()
            .args(["embed", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--tokenizer")
            .arg(&tokenizer)
            .arg("--texts-file")
            .arg(&texts)
            .arg("--out")
            .arg(&out),
    );
    assert!(out.is_file());

    // Without --tokenizer the checkpoint's own (the run's data.tokenizer) is used.
    let remembered = dir.path().join("remembered.safetensors");
    run_ok(
        oxclip()
            .args(["embed", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--texts-file")
            .arg(&texts)
            .arg("--out")
            .arg(&remembered),
    );
    assert!(
        max_abs_diff(&out, &remembered) == 0.0,
        "the run's tokenizer is the one it trained with"
    );

    // The same model read with a tokenizer of 500 ids, for a 400-id embedding table.
    fails_with(
        oxclip()
            .args(["embed", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--tokenizer")
            .arg(fixture("gemma_sp"))
            .arg("--texts-file")
            .arg(&texts)
            .arg("--out")
            .arg(dir.path().join("no.safetensors")),
        &["500", "400", "vocab_size"],
    );
    assert!(!dir.path().join("no.safetensors").exists());

    // Training a model whose vocabulary is smaller than the tokenizer's: refused before any step.
    let small = model_yaml(dir.path(), 300, "last");
    fails_with(
        oxclip().args(["train", "--config"]).arg(run_config(
            dir.path(),
            &data,
            &small,
            &tokenizer,
            "small",
        )),
        &["400", "300", "data.tokenizer"],
    );
    assert!(!dir.path().join("small/checkpoints").exists());

    // Argmax pooling with a tokenizer whose end token (</s>, id 1) is not its largest id.
    let argmax = model_yaml(dir.path(), 400, "argmax");
    fails_with(
        oxclip().args(["train", "--config"]).arg(run_config(
            dir.path(),
            &data,
            &argmax,
            &tokenizer,
            "argmax",
        )),
        &["argmax", "end token id 1"],
    );

    // `tokenizer encode` prepares it as transformers does: `</s>` last, padded with its pad id (1).
    let ids = run_ok(
        oxclip()
            .args(["tokenizer", "encode", "--context-length", "8", "--tokenizer"])
            .arg(&tokenizer)
            .arg("--texts-file")
            .arg(&texts),
    );
    let ids: Vec<Vec<i64>> = serde_json::from_slice(&ids.stdout).expect("ids");
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tokenizer.join("golden.json")).expect("golden"),
    )
    .expect("json");
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|row| row.len() == 8 && row.contains(&1)));
    assert_eq!(golden["pad_id"], 1);
}
