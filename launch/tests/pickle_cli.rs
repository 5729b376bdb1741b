//! PyTorch pickles through the `oxclip` binary (issue 25): `oxclip embed` of each pickled
//! layout equals the embedding of its safetensors twin, OpenAI's `.pt` needs no `--model`,
//! `oxclip export` turns pickles into safetensors, and a pickle that would run code is refused
//! naming what it would run, with nothing of it run.

mod util;

use std::path::{Path, PathBuf};

use util::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn pickles() -> PathBuf {
    fixtures().join("pickle")
}

/// Six small photos.
fn photos(dir: &Path) -> PathBuf {
    let photos = dir.join("photos");
    std::fs::create_dir_all(&photos).expect("mkdir");
    for i in 0..6u32 {
        let img = image::RgbImage::from_fn(20 + 3 * i, 18, |x, y| {
            image::Rgb([(x * 11 + i * 30) as u8, (y * 13) as u8, ((x + y) * 7 + i) as u8])
        });
        img.save(photos.join(format!("{i}.jpg"))).expect("jpeg");
    }
    photos
}

/// `oxclip embed`'s image embeddings of `checkpoint` (with `--model` when given).
fn embed(dir: &Path, photos: &Path, checkpoint: &Path, model: Option<&Path>) -> tch::Tensor {
    let out = dir.join("embeds.safetensors");
    let mut cmd = oxclip();
    cmd.current_dir(dir)
        .args(["embed", "--device", "cpu", "--workers", "1", "--checkpoint"])
        .arg(checkpoint)
        .arg("--images")
        .arg(photos)
        .arg("--out")
        .arg(&out);
    if let Some(model) = model {
        cmd.arg("--model").arg(model);
    }
    run_ok(&mut cmd);
    read_safetensors(&out).remove("image_embeds").expect("image_embeds")
}

fn max_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn embeddings_of_pickles_equal_their_safetensors_twins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let photos = photos(d);
    let tiny = fixtures().join("models/pickle-tiny.yaml");
    let p = pickles();
    for (twin, file) in [
        ("open_clip.safetensors", "open_clip_zip.pt"),
        ("open_clip.safetensors", "open_clip_legacy.pt"),
        ("epoch_3.safetensors", "epoch_3.pt"),
    ] {
        let want = embed(d, &photos, &p.join(twin), Some(&tiny));
        let got = embed(d, &photos, &p.join(file), Some(&tiny));
        assert!(max_diff(&got, &want) <= 1e-6, "{file}: {}", max_diff(&got, &want));
    }

    // Hugging Face directories say their architecture: pytorch_model.bin, and both sharded
    // layouts, against the same model as one safetensors file.
    let hf = d.join("hf_safetensors");
    std::fs::create_dir_all(&hf).expect("mkdir");
    std::fs::copy(p.join("hf/config.json"), hf.join("config.json")).expect("copy");
    std::fs::copy(p.join("hf.safetensors"), hf.join("model.safetensors")).expect("copy");
    let want = embed(d, &photos, &hf, None);
    for dir in ["hf", "hf_sharded_bin", "hf_sharded_safetensors"] {
        let got = embed(d, &photos, &p.join(dir), None);
        assert!(max_diff(&got, &want) <= 1e-6, "{dir}: {}", max_diff(&got, &want));
    }

    // OpenAI's clip.load file: no --model, its architecture read from its shapes; its fp16
    // weights as in its (fp16) safetensors twin under the same architecture.
    let openai = d.join("openai.yaml");
    std::fs::write(
        &openai,
        "embed_dim: 16\nquick_gelu: true\nvision_cfg:\n  image_size: 16\n  layers: 1\n  width: 64\n  patch_size: 8\n\
         text_cfg:\n  context_length: 8\n  vocab_size: 64\n  width: 64\n  heads: 1\n  layers: 1\n",
    )
    .expect("write");
    let got = embed(d, &photos, &p.join("openai_vit.pt"), None);
    let want = embed(d, &photos, &p.join("openai_vit.safetensors"), Some(&openai));
    assert!(max_diff(&got, &want) <= 1e-6, "openai_vit.pt: {}", max_diff(&got, &want));
    // --model is then a check: one that contradicts the file's shapes is named.
    let out = oxclip()
        .current_dir(d)
        .args(["embed", "--device", "cpu", "--checkpoint"])
        .arg(p.join("openai_vit.pt"))
        .arg("--model")
        .arg(&tiny)
        .arg("--images")
        .arg(&photos)
        .arg("--out")
        .arg(d.join("x.safetensors"))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("vision_cfg.width: 64 vs 16"), "{stderr}");
}

/// `oxclip export` of pickles writes safetensors that load as the pickle did: OpenAI's file
/// with the architecture it says, open_clip's training checkpoint with --model.
#[test]
fn export_turns_pickles_into_safetensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let photos = photos(d);
    let p = pickles();
    let tiny = fixtures().join("models/pickle-tiny.yaml");
    for (file, model, format) in [
        ("openai_vit.pt", None, "open_clip"),
        ("openai_vit.pt", None, "hf"),
        ("epoch_3.pt", Some(&tiny), "open_clip"),
    ] {
        let out = d.join(format!("{file}-{format}"));
        let mut cmd = oxclip();
        cmd.args(["export", "--checkpoint"])
            .arg(p.join(file))
            .args(["--format", format, "--out"])
            .arg(&out);
        if let Some(model) = model {
            cmd.arg("--model").arg(model);
        }
        run_ok(&mut cmd);
        let weights = match format {
            "hf" => out.join("model.safetensors"),
            _ => out.join("open_clip_model.safetensors"),
        };
        assert!(weights.is_file(), "{}", weights.display());
        let from_pickle = embed(d, &photos, &p.join(file), model.map(PathBuf::as_path));
        let from_export = embed(d, &photos, &out, None);
        assert!(max_diff(&from_export, &from_pickle) <= 1e-6, "{file} as {format}");
    }
    // The exported open_clip config is the architecture the OpenAI file said.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("openai_vit.pt-open_clip/open_clip_config.json"))
            .expect("read"),
    )
    .expect("json");
    assert_eq!(config["model_cfg"]["quick_gelu"], true);
    assert_eq!(config["model_cfg"]["vision_cfg"]["width"], 64);
}

/// A pickle that would run code, given to `embed`, `export` or `train --init`: refused
/// naming the global, and the file it would have written is not there.
#[test]
fn pickles_that_run_code_are_refused_through_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let photos = photos(d);
    let tiny = fixtures().join("models/pickle-tiny.yaml");
    let evil = pickles().join("evil");
    let runs: [(&str, Vec<std::ffi::OsString>); 3] = [
        (
            "os.system",
            vec![
                "embed".into(),
                "--checkpoint".into(),
                evil.join("os_system.pt").into(),
                "--model".into(),
                tiny.clone().into(),
                "--images".into(),
                photos.clone().into(),
                "--out".into(),
                d.join("e.safetensors").into(),
            ],
        ),
        (
            "subprocess.Popen",
            vec![
                "export".into(),
                "--checkpoint".into(),
                evil.join("subprocess_popen.pt").into(),
                "--model".into(),
                tiny.clone().into(),
                "--format".into(),
                "hf".into(),
                "--out".into(),
                d.join("out").into(),
            ],
        ),
        (
            "builtins.eval",
            vec![
                "export".into(),
                "--checkpoint".into(),
                evil.join("builtins_eval.pt").into(),
                "--model".into(),
                tiny.into(),
                "--format".into(),
                "open_clip".into(),
                "--out".into(),
                d.join("out").into(),
            ],
        ),
    ];
    for (global, args) in runs {
        let out = oxclip().current_dir(d).args(&args).output().expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{global}: succeeded");
        assert!(stderr.contains(&format!("refuses the global {global}")), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    for name in ["os_system", "builtins_eval", "subprocess_popen"] {
        assert!(!d.join(format!("pwned_{name}")).exists(), "{name} ran");
    }
    assert!(!d.join("out").exists(), "nothing exported");
    assert!(!d.join("e.safetensors").exists(), "nothing embedded");
}

/// The run config continuing open_clip's run of tests/fixtures/pickle/continue/ for 10 steps:
/// the same model, data, tokenizer, crop (the identity), constant learning rate and AdamW
/// settings as open_clip_train's, from its epoch_10.pt, with or without its optimizer state.
fn continue_config(dir: &Path, run: &str, optimizer: bool) -> PathBuf {
    let c = pickles().join("continue");
    let text = format!(
        "run_dir: {run_dir}\nmodel: {model}\ndata:\n  train: {csv}\n  tokenizer: {tokenizer}\n  workers: 1\n\
         \x20 augment:\n    scale: [1.0, 1.0]\n    ratio: [1.0, 1.0]\n\
         train:\n  batch_size: 4\n  steps: 10\n  seed: 0\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 5\n\
         optim:\n  lr: 1.0e-3\n  weight_decay: 0.2\n  warmup_steps: 0\n  schedule: const\n\
         init:\n  checkpoint: {epoch}\n  optimizer: {optimizer}\n",
        run_dir = dir.join(run).display(),
        model = c.join("pickle-tiny-continue.json").display(),
        csv = c.join("train.csv").display(),
        tokenizer = c.join("tokenizer").display(),
        epoch = c.join("epoch_10.pt").display(),
    );
    let path = dir.join(format!("{run}.yaml"));
    std::fs::write(&path, text).expect("write");
    path
}

/// Issue 25's acceptance: open_clip_train ran 10 steps and saved epoch_10.pt; oxclip continues
/// it 10 more with `init.optimizer: true` and ends within 1e-4 (of the largest weight) of
/// open_clip's own 20-step run. Without open_clip's moments and step it does not.
#[test]
fn continuing_an_open_clip_run_reaches_its_own_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let open_clip = pickles().join("continue/open_clip_20_steps.safetensors");
    let mut diffs = Vec::new();
    for (run, optimizer) in [("continued", true), ("fresh_moments", false)] {
        run_ok(oxclip().args(["train", "--config"]).arg(continue_config(d, run, optimizer)));
        let ours = d.join(run).join("checkpoints/step_10/model.safetensors");
        diffs.push(max_rel_diff(&ours, &open_clip));
    }
    assert!(diffs[0] <= 1e-4, "continued: {} of the largest weight", diffs[0]);
    assert!(diffs[1] > 1e-3, "without the optimizer state: {}", diffs[1]);
    eprintln!("continued {:.2e}, fresh moments {:.2e}", diffs[0], diffs[1]);
}
