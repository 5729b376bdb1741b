//! `oxclip data pack` and `oxclip data stats` end to end: a CSV of real JPEG and PNG files
//! (quoted captions with commas, a corrupt image, a missing file, an empty caption) packed
//! into shards, the counts read back with `data stats --json`, and `oxclip train` run on the
//! packed shards.

mod util;

use std::path::Path;

use serde_json::{json, Value};
use util::*;

/// A real 40 px JPEG or PNG (by `path`'s extension), encoded by the image crate.
fn write_image(path: &Path, i: u64) {
    let scene = oxclip_data_loader::synth::draw_scene(3, i, 40, false);
    scene.image.save(path).expect("write image");
}

/// `dir/src/`: 36 good images (every 4th a PNG), a corrupt `.jpg`, and `list.csv` naming
/// them plus a missing file and an empty caption. Returns the CSV's path.
fn csv_dataset(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("img")).expect("mkdir");
    let mut csv = String::from("filepath,title\n");
    for i in 0..36 {
        let name = if i % 4 == 0 { format!("img/{i}.png") } else { format!("img/{i}.jpg") };
        write_image(&src.join(&name), i);
        csv.push_str(&format!("{name},\"picture {i}, with a comma, and \"\"quotes\"\"\"\n"));
    }
    std::fs::write(src.join("img/corrupt.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").expect("write");
    csv.push_str("img/corrupt.jpg,a corrupt image\nimg/missing.jpg,no such file\nimg/1.jpg,\n");
    std::fs::write(src.join("list.csv"), csv).expect("write csv");
    src.join("list.csv")
}

fn stats_json(spec: &str) -> Value {
    let out = run_ok(oxclip().args(["data", "stats", "--json", spec]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "not one JSON line:\n{stdout}");
    serde_json::from_str(lines[0]).expect("stats JSON")
}

#[test]
fn pack_a_csv_then_stats_and_train_on_the_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = csv_dataset(dir.path());
    let csv_spec = format!("csv:{}", csv.display());

    // The source itself: every bad row counted by reason.
    let expected_skips = json!({"empty_caption": 1, "missing_image": 1, "undecodable_image": 1});
    assert_eq!(stats_json(&csv_spec), json!({"samples": 36, "skipped": expected_skips, "shards": 0}));

    let shards = dir.path().join("shards");
    let out = run_ok(oxclip().args(["data", "pack", "--from", &csv_spec, "--out"]).arg(&shards).args(["--shard-size", "10"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("packed 36 samples into 4 shards"), "{stdout}");
    assert!(stdout.contains("skipped 3 (empty_caption: 1, missing_image: 1, undecodable_image: 1)"), "{stdout}");
    let index: Value = serde_json::from_str(&std::fs::read_to_string(shards.join("index.json")).expect("index.json")).expect("index JSON");
    assert_eq!(index["samples"], 36);
    assert_eq!(index["shards"][0], json!({"name": "00000.tar", "samples": 10}));
    assert_eq!(index["shards"][3], json!({"name": "00003.tar", "samples": 6}));

    // The shards hold only the good samples.
    let packed = stats_json(shards.to_str().expect("utf-8 path"));
    assert_eq!(packed, json!({"samples": 36, "skipped": {}, "shards": 4}));
    let human = run_ok(oxclip().args(["data", "stats"]).arg(&shards));
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("36 usable samples in 4 shards") && human.contains("skipped 0"), "{human}");

    // Two training steps of the tiny model on the packed shards.
    let config = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: {train}\n  workers: 2\ntrain:\n  batch_size: 16\n  steps: 2\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 1\n  eval_every: 0\noptim:\n  lr: 1.0e-3\n  warmup_steps: 1\n",
        run = dir.path().join("run").display(),
        train = shards.display(),
    );
    let config_path = dir.path().join("run.yaml");
    std::fs::write(&config_path, config).expect("write config");
    let out = run_ok(oxclip().args(["train", "--config"]).arg(&config_path));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("trained 2 steps"), "{stdout}");
}

#[test]
fn pack_resizes_with_max_side_and_reads_folders_and_jsonl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let folder = d.join("folder");
    std::fs::create_dir_all(folder.join("sub")).expect("mkdir");
    for i in 0..3 {
        write_image(&folder.join(format!("sub/{i}.jpg")), i);
        std::fs::write(folder.join(format!("sub/{i}.txt")), format!("folder image {i}\n")).expect("write");
    }
    write_image(&folder.join("no_caption.png"), 9);
    let stats = stats_json(&format!("folder:{}", folder.display()));
    assert_eq!(stats, json!({"samples": 3, "skipped": {"missing_caption": 1}, "shards": 0}));

    let out = d.join("small");
    let packed = run_ok(oxclip().args(["data", "pack", "--from"]).arg(&folder).arg("--out").arg(&out).args(["--max-side", "16"]));
    assert!(String::from_utf8_lossy(&packed.stdout).contains("packed 3 samples into 1 shards"));
    assert!(String::from_utf8_lossy(&packed.stdout).contains("3 downscaled"));
    assert_eq!(stats_json(out.to_str().expect("utf-8")), json!({"samples": 3, "skipped": {}, "shards": 1}));

    let jsonl = folder.join("data.jsonl");
    std::fs::write(&jsonl, "{\"image\": \"sub/0.jpg\", \"caption\": \"first\"}\n{\"image\": \"sub/1.jpg\", \"caption\": \n{\"image\": \"sub/2.jpg\", \"caption\": \"third\"}\n").expect("write");
    assert_eq!(stats_json(jsonl.to_str().expect("utf-8")), json!({"samples": 2, "skipped": {"bad_record": 1}, "shards": 0}));

    // Packing shards, or a CSV without the columns, fails with a message, not a panic.
    let again = oxclip().args(["data", "pack", "--from"]).arg(&out).arg("--out").arg(d.join("x")).output().expect("runs");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("pack reads csv:FILE"));
    std::fs::write(d.join("cols.csv"), "path,text\nsub/0.jpg,x\n").expect("write");
    let bad = oxclip().args(["data", "stats"]).arg(d.join("cols.csv")).output().expect("runs");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("cols.csv") && stderr.contains("`path`, `text`"), "{stderr}");
}
