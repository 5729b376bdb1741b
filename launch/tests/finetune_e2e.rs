//! The fine-tuning path end to end through the CLI: a checkpoint exported in open_clip layout,
//! fine-tuned on a CSV dataset of other images, gets better held-out retrieval than it
//! started with.

mod util;

use std::path::Path;

use util::*;

const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 200, 40]),
    ("blue", [30, 50, 220]),
    ("yellow", [230, 220, 40]),
    ("purple", [140, 40, 180]),
    ("orange", [240, 140, 20]),
    ("black", [15, 15, 15]),
    ("white", [240, 240, 240]),
];

/// `per_color` noisy PNGs of each colour with the caption "a photo of something COLOR",
/// and a CSV (open_clip's `filepath`, `title`, tab-separated) listing them.
fn colour_csv(dir: &Path, name: &str, per_color: usize, seed: u64) -> std::path::PathBuf {
    captioned_colour_csv(dir, name, per_color, seed, |c, _| {
        format!("a photo of something {}", COLORS[c].0)
    })
}

/// [`colour_csv`] with the caption of the `i`-th image of colour `c` from `caption`.
fn captioned_colour_csv(
    dir: &Path,
    name: &str,
    per_color: usize,
    seed: u64,
    caption: impl Fn(usize, usize) -> String,
) -> std::path::PathBuf {
    let images = dir.join(name);
    std::fs::create_dir_all(&images).expect("mkdir");
    let mut rows = vec!["filepath\ttitle".to_owned()];
    let mut state = seed;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % 60) as i32 - 30
    };
    for (c, (_, rgb)) in COLORS.iter().enumerate() {
        for i in 0..per_color {
            let img = image::RgbImage::from_fn(36, 36, |_, _| {
                let jitter = noise();
                image::Rgb(rgb.map(|v| (v as i32 + jitter).clamp(0, 255) as u8))
            });
            let file = format!("{c}_{i}.png");
            img.save(images.join(&file)).expect("png");
            rows.push(format!("{name}/{file}\t{}", caption(c, i)));
        }
    }
    let csv = dir.join(format!("{name}.csv"));
    std::fs::write(&csv, rows.join("\n") + "\n").expect("csv");
    csv
}

/// A run config on the CPU over a CSV, in what the runs here differ: batches of 32, fp32,
/// one thread.
struct Run<'a> {
    run_dir: &'a Path,
    model: &'a Path,
    /// `init.checkpoint`: the weights the run starts from.
    init: Option<&'a Path>,
    train: &'a Path,
    tokenizer: Option<&'a Path>,
    steps: u32,
    seed: u32,
    lr: &'a str,
    warmup: u32,
    /// The `loss:` section, empty for the default.
    loss: &'a str,
}

const SIGLIP: &str = "loss:\n  kind: siglip\n";

impl<'a> Run<'a> {
    /// 40 steps from a model directory, which gives the architecture, the weights and the
    /// tokenizer.
    fn fine_tune(run_dir: &'a Path, dir: &'a Path, train: &'a Path) -> Self {
        Run {
            run_dir,
            model: dir,
            init: Some(dir),
            train,
            tokenizer: None,
            steps: 40,
            seed: 5,
            lr: "2.0e-3",
            warmup: 4,
            loss: "",
        }
    }

    /// Writes the config to `path`, which it returns.
    fn write(&self, path: &Path) -> std::path::PathBuf {
        let init =
            self.init.map_or(String::new(), |d| format!("init:\n  checkpoint: {}\n", d.display()));
        let tokenizer =
            self.tokenizer.map_or(String::new(), |t| format!("  tokenizer: {}\n", t.display()));
        let yaml = format!(
            "run_dir: {}\nmodel: {}\n{init}data:\n  train: {}\n{tokenizer}  workers: 2\n\
             train:\n  batch_size: 32\n  steps: {}\n  seed: {}\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 1\n\
             optim:\n  lr: {}\n  warmup_steps: {}\n{}",
            self.run_dir.display(),
            self.model.display(),
            self.train.display(),
            self.steps,
            self.seed,
            self.lr,
            self.warmup,
            self.loss,
        );
        std::fs::write(path, yaml).expect("run yaml");
        path.to_owned()
    }
}

fn image_to_text_r1(checkpoint: &[&str], data: &Path) -> f64 {
    let out = run_ok(
        oxclip()
            .args(["eval", "--json", "--device", "cpu"])
            .args(checkpoint)
            .arg("--retrieval")
            .arg(data),
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    result["retrieval"]["image_to_text_R@1"].as_f64().expect("R@1")
}

#[test]
fn fine_tuning_an_exported_checkpoint_on_a_csv_improves_retrieval() {
    let dir = tempfile::tempdir().expect("tempdir");
    // "Pre-training": the tiny model on synthetic shapes for a few steps, exported as open_clip.
    let data = synth(dir.path(), 256, 0, 32);
    let config = tiny_config(dir.path(), &data, 12, "  eval_every: 0\n", false);
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let exported = dir.path().join("exported");
    run_ok(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(dir.path().join("run"))
            .args(["--format", "open_clip", "--out"])
            .arg(&exported),
    );
    let weights = exported.join("open_clip_model.safetensors");

    // Other images: colours, captioned; a held-out set drawn apart.
    let train_csv = colour_csv(dir.path(), "train", 24, 1);
    let val_csv = colour_csv(dir.path(), "val", 4, 2);
    let weights_arg = weights.to_string_lossy().into_owned();
    let before = image_to_text_r1(&["--model", "tiny", "--checkpoint", &weights_arg], &val_csv);

    let finetuned = dir.path().join("finetuned");
    run_ok(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(&finetuned)
            .arg("--init")
            .arg(&weights)
            .arg("--set")
            .arg(format!("data.train={}", train_csv.display()))
            .args([
                "--set",
                "train.steps=40",
                "--set",
                "train.batch_size=32",
                "--set",
                "optim.lr=2e-3",
                "--set",
                "optim.warmup_steps=4",
            ]),
    );
    let after = image_to_text_r1(&["--checkpoint", &finetuned.to_string_lossy()], &val_csv);
    eprintln!("held-out image->text R@1: {before} before, {after} after fine-tuning");
    assert!(after > before, "held-out image->text R@1: {before} before, {after} after fine-tuning");
    assert!(after >= 0.5, "fine-tuning learnt little: R@1 {after}");
}

/// A SigLIP model fine-tuned from its Hugging Face directory: the directory (a `SiglipModel`
/// written by `oxclip export --format hf`, with a SentencePiece `tokenizer.json` beside it)
/// gives the architecture, the tokenizer and the image preparation (`model: DIR`, `init.checkpoint: DIR`);
/// the sigmoid loss falls, held-out retrieval improves, and the run exports back as a
/// `SiglipModel` directory.
#[test]
fn a_siglip_model_fine_tunes_from_its_hugging_face_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokenizer = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tokenizers/siglip_sp/tokenizer.json");
    // The starting point: oxclip's CPU-sized SigLIP (the timm-style trunk with its MAP head,
    // a bidirectional text tower pooled at the last token), briefly trained, as a SiglipModel.
    let model = dir.path().join("siglip-tiny.yaml");
    std::fs::write(
        &model,
        "embed_dim: 32\ninit_logit_bias: -10\ncustom_text: true\n\
         vision_cfg:\n  image_size: 32\n  timm_model_name: vit_oxtiny_patch8_siglip_32\n  timm_pool: map\n  timm_proj: none\n\
         text_cfg:\n  context_length: 16\n  vocab_size: 400\n  width: 32\n  heads: 2\n  layers: 2\n  no_causal_mask: true\n  \
         proj_bias: true\n  pool_type: last\n  norm_kwargs: {eps: 1.0e-6}\n  act_kwargs: {approximate: tanh}\n",
    )
    .expect("model yaml");
    let train_csv = colour_csv(dir.path(), "train", 24, 1);
    let val_csv = colour_csv(dir.path(), "val", 4, 2);
    let start = dir.path().join("start");
    let config = Run {
        run_dir: &start,
        model: &model,
        init: None,
        train: &train_csv,
        tokenizer: Some(&tokenizer),
        steps: 4,
        seed: 3,
        lr: "1.0e-3",
        warmup: 2,
        loss: SIGLIP,
    }
    .write(&dir.path().join("run.yaml"));
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let hf = dir.path().join("hf");
    run_ok(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(&start)
            .args(["--format", "hf", "--out"])
            .arg(&hf),
    );
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer.with_file_name(file), hf.join(file))
            .expect("tokenizer into the directory");
    }
    let before = image_to_text_r1(&["--checkpoint", &hf.to_string_lossy()], &val_csv);

    // The fine-tune names only the directory: model, tokenizer and preprocessing come from it.
    let finetuned = dir.path().join("finetuned");
    let run = Run { loss: SIGLIP, ..Run::fine_tune(&finetuned, &hf, &train_csv) }
        .write(&dir.path().join("finetune.yaml"));
    run_ok(oxclip().args(["train", "--config"]).arg(&run));
    let resolved = std::fs::read_to_string(finetuned.join("config.yaml")).expect("resolved config");
    assert!(
        resolved.contains("tokenizer.json") && resolved.contains("resize_mode: squash"),
        "{resolved}"
    );
    let losses = &read_tensorboard(&finetuned.join("tensorboard"))["train/loss"];
    let mean =
        |xs: &[(i64, f32)]| xs.iter().map(|(_, v)| f64::from(*v)).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
    assert!(
        last < first,
        "the sigmoid loss did not fall: {first} over the first 5 steps, {last} over the last 5"
    );
    let after = image_to_text_r1(&["--checkpoint", &finetuned.to_string_lossy()], &val_csv);
    eprintln!("SigLIP from its HF directory: loss {first:.3} -> {last:.3}; held-out image->text R@1 {before} -> {after}");
    assert!(after > before, "held-out image->text R@1: {before} before, {after} after fine-tuning");

    let back = dir.path().join("back");
    run_ok(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(&finetuned)
            .args(["--format", "hf", "--out"])
            .arg(&back),
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(back.join("config.json")).expect("config.json"),
    )
    .expect("json");
    assert_eq!(config["architectures"][0], "SiglipModel");
    // The tokenizer travels with the export: the directory is ready for embed, eval, transformers.
    assert!(back.join("tokenizer.json").is_file() && back.join("tokenizer_config.json").is_file());
    let after_export = image_to_text_r1(&["--checkpoint", &back.to_string_lossy()], &val_csv);
    assert_eq!(after_export, after, "the exported directory scores as the run it came from");
}

/// The colours of [`COLORS`] in German and French, for captions in three languages.
const COLORS_DE_FR: [(&str, &str); 8] = [
    ("rotes", "rouge"),
    ("grünes", "verte"),
    ("blaues", "bleue"),
    ("gelbes", "jaune"),
    ("lila", "violette"),
    ("oranges", "orange"),
    ("schwarzes", "noire"),
    ("weißes", "blanche"),
];

/// A CLIP with a Hugging Face XLM-R text tower, from its open_clip hub directory: the
/// directory (open_clip_config.json naming the text model, the weights, the XLM-R tokenizer)
/// gives the architecture and the tokenizer; fine-tuned on captions in English, German and
/// French, held-out retrieval improves, and the run exports back to open_clip's layout, whose
/// names and shapes are open_clip's own for this model.
#[test]
fn a_multilingual_model_fine_tunes_from_its_open_clip_hub_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let text_model = fixtures.join("hf_text/tiny_xlmr");
    // The model as open_clip's JSON: the text tower is the XLM-R directory, whose own weights
    // (an XLMRobertaForMaskedLM file) it starts from (hf_model_pretrained, open_clip's default).
    let model = dir.path().join("xlmr-tiny.json");
    let open_clip_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("hf_text/mean_mlp.json")).expect("json"),
    )
    .expect("json");
    let mut model_json = open_clip_json.clone();
    model_json["text_cfg"]["hf_model_name"] = text_model.display().to_string().into();
    model_json["text_cfg"]["hf_tokenizer_name"] = text_model.display().to_string().into();
    std::fs::write(&model, model_json.to_string()).expect("model json");
    let caption = |language: usize, c: usize| {
        let (de, fr) = COLORS_DE_FR[c];
        match language {
            0 => format!("a {} photo", COLORS[c].0),
            1 => format!("ein {de} Foto"),
            _ => format!("une photo {fr}"),
        }
    };
    // Training captions take turns in the three languages; each held-out set is in one.
    // Short, the colour early: the tiny tokenizer spends a token on about every two
    // characters, and a caption cut at the context length before its colour would make every
    // caption of a set the same, which scores R@1 = 1 whatever the model.
    let train_csv = captioned_colour_csv(dir.path(), "train", 24, 1, |c, i| caption(i % 3, c));
    let languages = ["en", "de", "fr"];
    let val_csvs: Vec<_> = (0..3)
        .map(|l| {
            captioned_colour_csv(
                dir.path(),
                &format!("val_{}", languages[l]),
                4,
                2 + l as u64,
                |c, _| caption(l, c),
            )
        })
        .collect();
    let recall = |checkpoint: &Path| -> Vec<f64> {
        let checkpoint = checkpoint.to_string_lossy();
        val_csvs.iter().map(|csv| image_to_text_r1(&["--checkpoint", &checkpoint], csv)).collect()
    };

    // The starting point: a few steps from the text model's own weights, exported as open_clip's
    // hub layout (open_clip_config.json, open_clip_model.safetensors, the tokenizer).
    let start = dir.path().join("start");
    let config = Run {
        run_dir: &start,
        model: &model,
        init: None,
        train: &train_csv,
        tokenizer: Some(&text_model),
        steps: 2,
        seed: 3,
        lr: "1.0e-4",
        warmup: 1,
        loss: "",
    }
    .write(&dir.path().join("run.yaml"));
    let out = run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("text tower's initial weights from"), "{log}");
    let hub = dir.path().join("hub");
    run_ok(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(&start)
            .args(["--format", "open_clip", "--out"])
            .arg(&hub),
    );
    assert!(hub.join("tokenizer.json").is_file(), "the tokenizer travels with the export");
    // transformers has no CLIP class with an XLM-R text tower: refused with a sentence.
    let refused = oxclip()
        .args(["export", "--checkpoint"])
        .arg(&start)
        .args(["--format", "hf", "--out"])
        .arg(dir.path().join("hf"))
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("--format open_clip"), "{err}");
    let before = recall(&hub);

    // The fine-tune names only the hub directory: model and tokenizer come from it.
    let finetuned = dir.path().join("finetuned");
    let run = Run::fine_tune(&finetuned, &hub, &train_csv).write(&dir.path().join("finetune.yaml"));
    run_ok(oxclip().args(["train", "--config"]).arg(&run));
    let after = recall(&finetuned);
    eprintln!(
        "XLM-R CLIP from its open_clip hub directory: held-out image->text R@1 (en, de, fr) {before:?} -> {after:?}"
    );
    let mean = |r: &[f64]| r.iter().sum::<f64>() / r.len() as f64;
    assert!(mean(&after) > mean(&before), "held-out R@1: {before:?} before, {after:?} after");
    assert!(
        after.iter().all(|&r| r >= 0.5),
        "fine-tuning learnt little in some language: R@1 {after:?}"
    );

    // Back to open_clip's layout: open_clip's state_dict names and shapes for this model (the
    // fixture's recipe lists them, from open_clip itself), and it scores as the run.
    let back = dir.path().join("back");
    run_ok(
        oxclip()
            .args(["export", "--checkpoint"])
            .arg(&finetuned)
            .args(["--format", "open_clip", "--out"])
            .arg(&back),
    );
    let recipe: Vec<(String, Vec<i64>, f64, f64, String)> = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("hf_text/mean_mlp_recipe.json")).expect("recipe"),
    )
    .expect("rows");
    let weights =
        tch::Tensor::read_safetensors(back.join("open_clip_model.safetensors")).expect("weights");
    let mut ours: Vec<(String, Vec<i64>)> =
        weights.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    ours.sort();
    let expected: Vec<(String, Vec<i64>)> = recipe.into_iter().map(|(n, s, ..)| (n, s)).collect();
    assert_eq!(ours, expected, "open_clip's state_dict names and shapes");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(back.join("open_clip_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(config["model_cfg"]["text_cfg"]["hf_model_name"], text_model.display().to_string());
    assert!(back.join("tokenizer.json").is_file());
    assert_eq!(recall(&back), after, "the exported directory scores as the run it came from");
}
