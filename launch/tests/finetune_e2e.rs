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
    let images = dir.join(name);
    std::fs::create_dir_all(&images).expect("mkdir");
    let mut rows = vec!["filepath\ttitle".to_owned()];
    let mut state = seed;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % 60) as i32 - 30
    };
    for (c, (color, rgb)) in COLORS.iter().enumerate() {
        for i in 0..per_color {
            let img = image::RgbImage::from_fn(36, 36, |_, _| {
                let jitter = noise();
                image::Rgb(rgb.map(|v| (v as i32 + jitter).clamp(0, 255) as u8))
            });
            let file = format!("{c}_{i}.png");
            img.save(images.join(&file)).expect("png");
            rows.push(format!("{name}/{file}\ta photo of something {color}"));
        }
    }
    let csv = dir.join(format!("{name}.csv"));
    std::fs::write(&csv, rows.join("\n") + "\n").expect("csv");
    csv
}

fn image_to_text_r1(checkpoint: &[&str], data: &Path) -> f64 {
    let out = run_ok(oxclip().args(["eval", "--json", "--device", "cpu"]).args(checkpoint).arg("--retrieval").arg(data));
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
    run_ok(oxclip().args(["export", "--checkpoint"]).arg(dir.path().join("run")).args(["--format", "open_clip", "--out"]).arg(&exported));
    let weights = exported.join("open_clip_model.safetensors");

    // Other images: colours, captioned; a held-out set drawn apart.
    let train_csv = colour_csv(dir.path(), "train", 24, 1);
    let val_csv = colour_csv(dir.path(), "val", 4, 2);
    let weights_arg = weights.to_string_lossy().into_owned();
    let before = image_to_text_r1(&["--model", "tiny", "--checkpoint", &weights_arg], &val_csv);

    let finetuned = dir.path().join("finetuned");
    run_ok(oxclip().args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&finetuned).arg("--init").arg(&weights)
        .arg("--set").arg(format!("data.train={}", train_csv.display()))
        .args(["--set", "train.steps=40", "--set", "train.batch_size=32", "--set", "optim.lr=2e-3", "--set", "optim.warmup_steps=4"]));
    let after = image_to_text_r1(&["--checkpoint", &finetuned.to_string_lossy()], &val_csv);
    eprintln!("held-out image->text R@1: {before} before, {after} after fine-tuning");
    assert!(after > before, "held-out image->text R@1: {before} before, {after} after fine-tuning");
    assert!(after >= 0.5, "fine-tuning learnt little: R@1 {after}");
}
