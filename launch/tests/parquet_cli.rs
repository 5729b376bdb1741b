//! Hugging Face datasets (Parquet and Arrow, tests/fixtures/make_parquet_fixtures.py) through
//! the real binary: `data stats` and `data pack` count bad rows by reason, a ClassLabel set
//! is scored zero-shot with no class names file exactly as the same images in a folder per
//! class, training resumes after `kill -9` exactly, two ranks of two workers see every row
//! once per epoch, and `eval --retrieval` and `index` read tables.

mod util;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use util::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_datasets")
}

fn fixture(rel: &str) -> String {
    format!("{}/{rel}", fixtures().display())
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("json")
}

fn stats_json(spec: &str) -> Value {
    let out = run_ok(oxclip().args(["data", "stats", "--json", spec]));
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn stats_and_pack_count_bad_rows_by_reason() {
    let bad = expected()["bad"].clone();
    let stats = stats_json(&fixture("bad/bad.parquet"));
    assert_eq!(stats, json!({"samples": bad["samples"], "skipped": bad["skipped"], "shards": 0}));
    assert_eq!(stats_json(&format!("parquet:{}?split=train", fixture("coco_hub")))["samples"], 20);
    assert_eq!(stats_json(&fixture("coco_arrow"))["samples"], 24);

    let dir = tempfile::tempdir().expect("tempdir");
    let shards = dir.path().join("shards");
    let out = run_ok(
        oxclip()
            .args(["data", "pack", "--from", &fixture("bad/bad.parquet"), "--out"])
            .arg(&shards)
            .args(["--shard-size", "4"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("packed 6 samples into 2 shards"), "{stdout}");
    assert!(
        stdout.contains(
            "skipped 4 (bad_label: 1, missing_caption: 1, missing_image: 1, undecodable_image: 1)"
        ),
        "{stdout}"
    );
    assert_eq!(
        stats_json(shards.to_str().expect("utf-8")),
        json!({"samples": 6, "skipped": {}, "shards": 2})
    );

    // A folder of several splits names them; nothing is read until one is chosen.
    let out = oxclip().args(["data", "stats", &fixture("coco_hub")]).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("holds the splits test, train"), "{stderr}");
}

/// A tiny model trained for 2 steps, and its run directory.
fn trained(dir: &Path) -> PathBuf {
    let data = synth(dir, 32, 0, 32);
    let config = tiny_config(dir, &data, 2, "  eval_every: 0\n", false);
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    dir.join("run")
}

#[test]
fn a_class_label_set_scores_as_the_same_images_in_class_folders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = trained(d);
    std::fs::write(d.join("templates.txt"), "a photo of a {}.\n{}\n").expect("write");
    let eval = |spec: &str, extra: &[&str]| {
        let mut cmd = oxclip();
        cmd.args(["eval", "--json", "--device", "cpu", "--batch-size", "5", "--checkpoint"])
            .arg(&run)
            .args(["--zero-shot", spec, "--templates"])
            .arg(d.join("templates.txt"))
            .args(extra);
        cmd
    };
    let result = |spec: &str| -> Value {
        serde_json::from_slice(&run_ok(&mut eval(spec, &[])).stdout).expect("json")
    };
    let folder = result(&format!("classes:{}", fixture("classlabel/folder")));
    assert_eq!(folder["zero_shot"]["samples"], 12, "{folder}");
    // No class names file: the ClassLabel's names (blue, green, red) are the class names.
    for spec in [fixture("classlabel/classlabel.parquet"), fixture("classlabel/arrow")] {
        assert_eq!(result(&spec), folder, "{spec}");
    }

    // A names file of another length than the ClassLabel's is refused before any work.
    std::fs::write(d.join("four.txt"), "a\nb\nc\nd\n").expect("write");
    let classnames = d.join("four.txt");
    let out = eval(&fixture("classlabel/classlabel.parquet"), &["--classnames"])
        .arg(&classnames)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("names 3 classes but the class names given name 4"),
        "{stderr}"
    );
    // A caption set without labels has nothing to score zero-shot.
    let out = eval(&fixture("coco/coco.parquet"), &[]).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("has no label column"), "{stderr}");

    // Retrieval and index read tables: one of each row's captions, every row.
    let out = run_ok(
        oxclip()
            .args(["eval", "--json", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .args(["--retrieval", &fixture("coco/coco.parquet")]),
    );
    let retrieval: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(retrieval["retrieval"]["pairs"], 24, "{retrieval}");
    let index = d.join("index.safetensors");
    run_ok(
        oxclip()
            .args(["index", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .args(["--data", &format!("parquet:{}?split=test", fixture("coco_hub")), "--out"])
            .arg(&index),
    );
    assert_eq!(read_safetensors(&index)["image_embeds"].size()[0], 4);
}

/// A run config for the tiny model on a table, 2 loader workers, `log_keys` on; `data` adds
/// to the `data:` section, `tail` sections after `optim:`.
fn table_config(
    dir: &Path,
    train: &str,
    batch: usize,
    steps: u64,
    data: &str,
    tail: &str,
) -> PathBuf {
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: {train}\n  workers: 2\n  log_keys: true\n  shuffle_buffer: 10\n{data}train:\n  batch_size: {batch}\n  steps: {steps}\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 2\n  checkpoint_every: 4\n  keep_checkpoints: 20\n  eval_every: 0\noptim:\n  lr: 1.0e-3\n  warmup_steps: 3\n{tail}",
        run = dir.join("run").display(),
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn training_on_parquet_resumes_after_kill_9_as_if_never_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 24 rows of five captions in 5 row groups; 6 steps of 4 an epoch, 40 steps.
    let steps = 40;
    let config = table_config(dir.path(), &fixture("coco/coco.parquet"), 4, steps, "", "");
    let straight = dir.path().join("straight");
    run_ok(oxclip().args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&straight));

    // Step 8 is mid-epoch (the second epoch's second batch).
    let killed = dir.path().join("killed");
    train_killed_then_resumed(&config, &killed, 8, steps);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let last = format!("checkpoints/step_{steps}/{file}");
        let diff = max_abs_diff(&straight.join(&last), &killed.join(&last));
        assert!(diff <= 1e-6, "resumed {file} differs by {diff}");
    }
    let (a, b) = (keys_by_step(&straight, 0), keys_by_step(&killed, 0));
    assert_eq!(a.len(), steps as usize);
    assert_eq!(a, b);
    for epoch in 0..6u64 {
        let mut rows: Vec<&String> = (1..=6).flat_map(|s| &a[&(epoch * 6 + s)]).collect();
        rows.sort();
        rows.dedup();
        assert_eq!(rows.len(), 24, "epoch {epoch}: a row served twice");
    }
}

#[test]
fn two_ranks_of_two_workers_see_every_row_once_per_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The Arrow copy: 3 record batches of 8 for 4 streams, so each is striped in two; 12 rows
    // per rank per epoch, 4 steps of 3. The ClassLabel set is scored at the end with no class
    // names file.
    let val = format!(
        "  val: parquet:{}\n  val_name: colours\n",
        fixture("classlabel/classlabel.parquet")
    );
    let dist = "dist:\n  backend: cpu\n  timeout_s: 60\n";
    let config =
        table_config(dir.path(), &format!("arrow:{}", fixture("coco_arrow")), 3, 8, &val, dist);
    let run = dir.path().join("run");
    let out = run_ok(
        launcher(2, &[]).args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&run),
    );
    let ranks = [keys_by_step(&run, 0), keys_by_step(&run, 1)];
    for epoch in 0..2u64 {
        let mut rows: Vec<&String> = ranks
            .iter()
            .flat_map(|steps| (1..=4).flat_map(move |s| &steps[&(epoch * 4 + s)]))
            .collect();
        assert_eq!(rows.len(), 24);
        rows.sort();
        rows.dedup();
        assert_eq!(rows.len(), 24, "epoch {epoch}: a row served twice: {ranks:?}");
    }
    // Scored zero-shot at the end, over all 12 images, by the ClassLabel's names.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("[rank 0] zero-shot colours: top-1 "));
    assert!(line.is_some_and(|l| l.ends_with("on 12 held-out images")), "{stdout}");
}

#[test]
fn bench_loader_reads_a_table_and_reports_its_cpu_time() {
    let line = bench_loader(&fixture("coco/coco.parquet"), 48);
    assert_eq!((line["samples"].as_u64(), line["skipped"].as_u64()), (Some(48), Some(0)));
    let cpu = line["cpu_seconds"].as_f64().expect("cpu_seconds");
    let per_cpu = line["samples_per_cpu_second"].as_f64().expect("samples_per_cpu_second");
    assert!(cpu > 0.0 && (per_cpu * cpu - 48.0).abs() < 1e-6, "{line}");
}
