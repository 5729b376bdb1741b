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
    let scene = oxclip_data_loader::tools::synth::draw_scene(3, i, 40, false);
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
    std::fs::write(src.join("img/corrupt.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg")
        .expect("write");
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
    assert_eq!(
        stats_json(&csv_spec),
        json!({"samples": 36, "skipped": expected_skips, "shards": 0})
    );

    let shards = dir.path().join("shards");
    let out = run_ok(
        oxclip()
            .args(["data", "pack", "--from", &csv_spec, "--out"])
            .arg(&shards)
            .args(["--shard-size", "10"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("packed 36 samples into 4 shards"), "{stdout}");
    assert!(
        stdout.contains("skipped 3 (empty_caption: 1, missing_image: 1, undecodable_image: 1)"),
        "{stdout}"
    );
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(shards.join("index.json")).expect("index.json"),
    )
    .expect("index JSON");
    assert_eq!(index["samples"], 36);
    assert_eq!(index["shards"][0], json!({"name": "00000.tar", "samples": 10}));
    assert_eq!(index["shards"][3], json!({"name": "00003.tar", "samples": 6}));

    // The shards hold only the good samples.
    let packed = stats_json(shards.to_str().expect("utf-8 path"));
    assert_eq!(packed, json!({"samples": 36, "skipped": {}, "shards": 4}));
    let human = run_ok(oxclip().args(["data", "stats"]).arg(&shards));
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("36 usable samples in 4 shards") && human.contains("skipped 0"),
        "{human}"
    );

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

    // The packed shards kept each image's file name, and search shows it, not the key.
    let index = dir.path().join("shards.index");
    run_ok(
        oxclip()
            .args(["index", "--device", "cpu", "--checkpoint"])
            .arg(dir.path().join("run"))
            .arg("--data")
            .arg(&shards)
            .arg("--out")
            .arg(&index),
    );
    let out = run_ok(
        oxclip()
            .args(["search", "--device", "cpu", "--top", "3", "--index"])
            .arg(&index)
            .args(["--text", "picture 3"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for line in lines {
        let name = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            name.starts_with("img/") && (name.ends_with(".jpg") || name.ends_with(".png")),
            "{stdout}"
        );
    }
    let out = run_ok(
        oxclip()
            .args(["search", "--json", "--device", "cpu", "--top", "1", "--index"])
            .arg(&index)
            .args(["--text", "picture 3"]),
    );
    let hits: Vec<Value> = serde_json::from_slice(&out.stdout).expect("search JSON");
    assert!(hits[0]["key"].as_str().is_some_and(|k| k.len() == 9), "{hits:?}");
    assert!(hits[0]["source"].as_str().is_some_and(|s| s.starts_with("img/")), "{hits:?}");
}

#[test]
fn pack_resizes_with_max_side_and_reads_folders_and_jsonl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let folder = d.join("folder");
    std::fs::create_dir_all(folder.join("sub")).expect("mkdir");
    for i in 0..3 {
        write_image(&folder.join(format!("sub/{i}.jpg")), i);
        std::fs::write(folder.join(format!("sub/{i}.txt")), format!("folder image {i}\n"))
            .expect("write");
    }
    write_image(&folder.join("no_caption.png"), 9);
    let stats = stats_json(&format!("folder:{}", folder.display()));
    assert_eq!(stats, json!({"samples": 3, "skipped": {"missing_caption": 1}, "shards": 0}));

    let out = d.join("small");
    let packed = run_ok(
        oxclip()
            .args(["data", "pack", "--from"])
            .arg(&folder)
            .arg("--out")
            .arg(&out)
            .args(["--max-side", "16"]),
    );
    assert!(String::from_utf8_lossy(&packed.stdout).contains("packed 3 samples into 1 shards"));
    assert!(String::from_utf8_lossy(&packed.stdout).contains("3 downscaled"));
    assert_eq!(
        stats_json(out.to_str().expect("utf-8")),
        json!({"samples": 3, "skipped": {}, "shards": 1})
    );

    let jsonl = folder.join("data.jsonl");
    std::fs::write(&jsonl, "{\"image\": \"sub/0.jpg\", \"caption\": \"first\"}\n{\"image\": \"sub/1.jpg\", \"caption\": \n{\"image\": \"sub/2.jpg\", \"caption\": \"third\"}\n").expect("write");
    assert_eq!(
        stats_json(jsonl.to_str().expect("utf-8")),
        json!({"samples": 2, "skipped": {"bad_record": 1}, "shards": 0})
    );

    // Packing shards, or a CSV without the columns, fails with a message, not a panic.
    let again = oxclip()
        .args(["data", "pack", "--from"])
        .arg(&out)
        .arg("--out")
        .arg(d.join("x"))
        .output()
        .expect("runs");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("pack reads csv:FILE"));
    std::fs::write(d.join("cols.csv"), "path,text\nsub/0.jpg,x\n").expect("write");
    let bad = oxclip().args(["data", "stats"]).arg(d.join("cols.csv")).output().expect("runs");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("cols.csv") && stderr.contains("`path`, `text`"), "{stderr}");
}

/// Runs `oxclip ARGS`, expects it to fail, and returns its stderr (checked for no panic).
fn run_fails(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("oxclip runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "succeeded:\n{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Each file of `dir` (not below it) and its bytes.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry"))
        .map(|e| {
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read"))
        })
        .collect()
}

#[test]
fn pack_never_overwrites_or_removes_files_it_did_not_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = csv_dataset(dir.path());
    let csv_spec = format!("csv:{}", csv.display());
    // An img2dataset-like folder: real shards pack did not write, and another archive.
    let synth = synth(dir.path(), 20, 0, 16);
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    std::fs::copy(synth.join("train/00000.tar"), foreign.join("00000.tar")).expect("copy");
    std::fs::copy(synth.join("train/00000.tar"), foreign.join("00007.tar")).expect("copy");
    std::fs::write(foreign.join("myarchive.tar"), b"my own archive, not a shard").expect("write");
    let before = snapshot(&foreign);

    let stderr = run_fails(
        oxclip()
            .args(["data", "pack", "--from", &csv_spec, "--out"])
            .arg(&foreign)
            .args(["--shard-size", "5"]),
    );
    assert!(
        stderr.contains(
            "3 file(s) that `data pack` did not write: 00000.tar, 00007.tar, myarchive.tar"
        ) && stderr.contains("--beside-existing"),
        "{stderr}"
    );
    assert_eq!(snapshot(&foreign), before, "pack changed the folder it refused");

    // Beside them: 36 samples in 8 shards under names none of them has, all three unchanged.
    let out = run_ok(
        oxclip()
            .args(["data", "pack", "--beside-existing", "--from", &csv_spec, "--out"])
            .arg(&foreign)
            .args(["--shard-size", "5"]),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("packed 36 samples into 8 shards"));
    let after = snapshot(&foreign);
    for (name, bytes) in &before {
        assert_eq!(after.get(name), Some(bytes), "{name} changed");
    }
    let index: Value = serde_json::from_slice(&after["index.json"]).expect("index JSON");
    let names: Vec<&str> = index["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "00001.tar",
            "00002.tar",
            "00003.tar",
            "00004.tar",
            "00005.tar",
            "00006.tar",
            "00008.tar",
            "00009.tar"
        ]
    );

    // Pack's own earlier output is replaced: the shards its index listed and this pack does
    // not write again go, nothing else does.
    let own = dir.path().join("own");
    run_ok(
        oxclip()
            .args(["data", "pack", "--from", &csv_spec, "--out"])
            .arg(&own)
            .args(["--shard-size", "5"]),
    );
    assert!(own.join("00007.tar").exists());
    let out = run_ok(
        oxclip()
            .args(["data", "pack", "--from", &csv_spec, "--out"])
            .arg(&own)
            .args(["--shard-size", "10"]),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("packed 36 samples into 4 shards"));
    let left: Vec<String> = snapshot(&own).into_keys().collect();
    assert_eq!(left, ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "index.json"]);
    assert_eq!(
        stats_json(own.to_str().expect("utf-8")),
        json!({"samples": 36, "skipped": {}, "shards": 4})
    );
    // Repacked beside foreign files: pack's earlier shards go, the foreign ones stay.
    run_ok(
        oxclip()
            .args(["data", "pack", "--beside-existing", "--from", &csv_spec, "--out"])
            .arg(&foreign)
            .args(["--shard-size", "20"]),
    );
    let after = snapshot(&foreign);
    let left: Vec<&str> = after.keys().map(String::as_str).collect();
    assert_eq!(
        left,
        ["00000.tar", "00001.tar", "00002.tar", "00007.tar", "index.json", "myarchive.tar"]
    );
    for (name, bytes) in &before {
        assert_eq!(after.get(name), Some(bytes), "{name} changed");
    }
}

#[test]
fn one_unreadable_shard_is_one_count_and_nothing_usable_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Random bytes under a .tar name (a fixed generator, so the test is repeatable).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let garbage_tar = d.join("garbage.tar");
    std::fs::write(&garbage_tar, &garbage).expect("write");
    let out = oxclip().args(["data", "stats", "--json"]).arg(&garbage_tar).output().expect("runs");
    assert!(!out.status.success());
    // The counts still come out as one JSON line: one shard, one count.
    let counts: Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert_eq!(counts, json!({"samples": 0, "skipped": {"unreadable_shard": 1}, "shards": 0}));
    let stderr = run_fails(oxclip().args(["data", "stats"]).arg(&garbage_tar));
    assert!(
        stderr.contains("no usable sample in")
            && stderr.contains("garbage.tar")
            && stderr.contains("skipped: 1 unreadable shard"),
        "{stderr}"
    );
    assert!(!stderr.contains("truncated") && !stderr.contains("SkipCounts"), "{stderr}");

    // A real shard cut in the middle of its third sample: two usable, one truncated.
    let synth = synth(d, 10, 0, 16);
    let whole = std::fs::read(synth.join("train/00000.tar")).expect("read");
    let members: Vec<usize> = tar_member_offsets(&whole);
    let cut = d.join("cut");
    std::fs::create_dir_all(&cut).expect("mkdir");
    std::fs::write(cut.join("00000.tar"), &whole[..members[4] + 700]).expect("write");
    assert_eq!(
        stats_json(cut.join("00000.tar").to_str().expect("utf-8")),
        json!({"samples": 2, "skipped": {"truncated_shard": 1}, "shards": 1})
    );

    // Training and pack refuse a source with nothing usable, with the reasons.
    let config = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: {train}\ntrain:\n  batch_size: 2\n  steps: 1\n  precision: fp32\n  device: cpu\n",
        run = d.join("run").display(),
        train = garbage_tar.display(),
    );
    std::fs::write(d.join("run.yaml"), config).expect("write");
    let stderr = run_fails(oxclip().args(["train", "--config"]).arg(d.join("run.yaml")));
    assert!(
        stderr.contains("no usable sample in") && stderr.contains("1 unreadable shard"),
        "{stderr}"
    );
    std::fs::write(d.join("none.csv"), "filepath,title\nmissing.jpg,gone\n,no image\n")
        .expect("write");
    let stderr = run_fails(
        oxclip()
            .args(["data", "pack", "--from"])
            .arg(d.join("none.csv"))
            .arg("--out")
            .arg(d.join("none")),
    );
    assert!(
        stderr.contains("no usable sample in") && stderr.contains("2 missing images"),
        "{stderr}"
    );
    assert!(!d.join("none").exists(), "a failed pack left its output folder");
}

/// Byte offset of each member header of an uncompressed tar.
fn tar_member_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 0;
    while at + 512 <= bytes.len() && bytes[at] != 0 {
        offsets.push(at);
        let size_field = std::str::from_utf8(&bytes[at + 124..at + 136]).expect("size field");
        let size =
            usize::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
                .expect("octal size");
        at += 512 + size.div_ceil(512) * 512;
    }
    offsets
}

#[test]
fn jsonl_with_other_key_names_is_an_error_naming_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_image(&d.join("a.jpg"), 1);
    std::fs::write(d.join("data.jsonl"), "{\"url\": \"a.jpg\", \"text\": \"a picture\"}\n{\"url\": \"a.jpg\", \"text\": \"again\"}\n").expect("write");
    for cmd in [vec!["data", "stats"], vec!["data", "pack", "--out", "unused", "--from"]] {
        let stderr = run_fails(oxclip().current_dir(d).args(cmd).arg("data.jsonl"));
        assert!(
            stderr.contains("data.jsonl")
                && stderr.contains("the key `image` or `caption`")
                && stderr.contains("has `text`, `url`")
                && stderr.contains("img_key="),
            "{stderr}"
        );
    }
    assert!(!d.join("unused").exists());
}

#[test]
fn a_gif_is_unsupported_not_undecodable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_image(&d.join("a.jpg"), 1);
    // A valid 1 x 1 GIF89a, one white pixel.
    let gif = b"GIF89a\x01\0\x01\0\x80\0\0\xff\xff\xff\0\0\0!\xf9\x04\x01\0\0\0\0,\0\0\0\0\x01\0\x01\0\0\x02\x02D\x01\0;";
    std::fs::write(d.join("anim.gif"), gif).expect("write");
    std::fs::write(d.join("list.csv"), "filepath,title\na.jpg,a picture\nanim.gif,a gif\n")
        .expect("write");
    let spec = d.join("list.csv");
    assert_eq!(
        stats_json(spec.to_str().expect("utf-8")),
        json!({"samples": 1, "skipped": {"unsupported_image": 1}, "shards": 0})
    );
    std::fs::write(d.join("gifs.csv"), "filepath,title\nanim.gif,a gif\n").expect("write");
    let stderr = run_fails(oxclip().args(["data", "stats"]).arg(d.join("gifs.csv")));
    assert!(
        stderr.contains(
            "skipped: 1 image in an unsupported format (only JPEG, PNG and WebP are read)"
        ) && !stderr.contains("undecodable"),
        "{stderr}"
    );
}

/// `dir/captions.jsonl`: the 2000 varied captions of the tokenizer corpus (mixed case,
/// punctuation, digits, accents, several scripts), or its first `n`.
fn caption_corpus(dir: &Path, n: usize) -> std::path::PathBuf {
    let corpus =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer_corpus.json");
    let corpus: Value = serde_json::from_str(&std::fs::read_to_string(corpus).expect("corpus"))
        .expect("corpus JSON");
    let lines: Vec<String> = corpus["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .filter_map(|t| t.as_str())
        .filter(|t| !t.trim().is_empty())
        .take(n)
        .map(|t| json!({"image": "unused.jpg", "caption": t}).to_string())
        .collect();
    let path = dir.join(format!("captions{n}.jsonl"));
    std::fs::write(&path, lines.join("\n")).expect("write");
    path
}

#[test]
fn tokenizer_train_writes_the_vocab_size_asked_or_says_why_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let corpus = caption_corpus(d, 2000);
    let out = d.join("tokenizer.json");
    let printed = run_ok(
        oxclip()
            .args(["tokenizer", "train", "--vocab-size", "600", "--data"])
            .arg(&corpus)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        String::from_utf8_lossy(&printed.stdout).contains(": 600 tokens"),
        "{}",
        String::from_utf8_lossy(&printed.stdout)
    );
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("tokenizer.json"))
            .expect("JSON");
    let vocab = written["model"]["vocab"].as_object().expect("vocab");
    let added = written["added_tokens"].as_array().expect("added tokens");
    assert_eq!(vocab.len() + added.len(), 600);
    // Every byte symbol, alone and ending a word, is there whatever the captions.
    assert_eq!(vocab.keys().filter(|k| k.chars().count() == 5 && k.ends_with("</w>")).count(), 256);
    let ids: Vec<u64> = added.iter().map(|t| t["id"].as_u64().expect("id")).collect();
    assert_eq!(ids, [598, 599]);

    // Forty captions cannot fill 5000 entries: an error with both numbers, nothing written.
    let few = caption_corpus(d, 40);
    let small = d.join("small.json");
    let stderr = run_fails(
        oxclip()
            .args(["tokenizer", "train", "--vocab-size", "5000", "--data"])
            .arg(&few)
            .arg("--out")
            .arg(&small),
    );
    assert!(
        stderr.contains("the 40 captions")
            && stderr.contains("not the --vocab-size 5000 asked")
            && stderr.contains("--min-frequency"),
        "{stderr}"
    );
    assert!(!small.exists());
}
