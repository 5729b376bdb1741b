//! `oxclip eval` on clip_benchmark's webdataset layout and on ImageNet-1k: the numbers
//! clip_benchmark itself reports on the same model and data, and clear refusals of sets
//! that cannot be scored.

mod util;

use std::path::{Path, PathBuf};
use std::process::Output;

use oxclip_data_loader::webdataset::ShardWriter;
use util::*;

/// tests/fixtures/clip_benchmark, written by tests/fixtures/make_clip_benchmark_fixture.py.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/clip_benchmark")
}

fn eval_json(data_flag: &str, data: &str) -> serde_json::Value {
    let out = run_ok(
        oxclip()
            .args(["eval", "--json", "--device", "cpu", "--batch-size", "64", "--checkpoint"])
            .arg(fixture().join("model"))
            .arg(data_flag)
            .arg(data),
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Fails with a message holding every one of `expect`, without a panic or a Rust debug dump.
fn fails_saying(out: &Output, expect: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure, got stdout:\n{}", String::from_utf8_lossy(&out.stdout));
    for e in expect {
        assert!(stderr.contains(e), "`{e}` not in:\n{stderr}");
    }
    assert!(!stderr.contains("panicked") && !stderr.contains("Os {") && !stderr.contains("Error("), "{stderr}");
}

/// Within 0.2 points (0.002) of clip_benchmark's number.
fn close(name: &str, ours: &serde_json::Value, theirs: &serde_json::Value) {
    let (ours, theirs) = (ours.as_f64().expect(name), theirs.as_f64().expect(name));
    assert!((ours - theirs).abs() <= 0.002, "{name}: oxclip {ours} vs clip_benchmark {theirs}");
}

#[test]
fn clip_benchmark_numbers_are_reproduced() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json")).expect("json");

    // A directory holding classnames.txt is a clip_benchmark set as it is.
    let digits = fixture().join("digits");
    let result = eval_json("--zero-shot", digits.to_str().expect("utf-8"));
    let (zs, cb) = (&result["zero_shot"], &expected["digits"]);
    assert_eq!(zs["samples"], 200, "{result}");
    close("top1", &zs["top1"], &cb["acc1"]);
    close("top5", &zs["top5"], &cb["acc5"]);
    close("mean_per_class_recall", &zs["mean_per_class_recall"], &cb["mean_per_class_recall"]);

    // `wds:DIR` names one too; dataset_type.txt makes it a retrieval set.
    let retrieval = fixture().join("digits_retrieval");
    let result = eval_json("--retrieval", &format!("wds:{}", retrieval.display()));
    let (r, cb) = (&result["retrieval"], &expected["digits_retrieval"]);
    assert_eq!(r["pairs"], 60, "{result}");
    for k in [1, 5, 10] {
        for direction in ["image_retrieval", "text_retrieval"] {
            let name = format!("{direction}_recall@{k}");
            close(&name, &r[&name], &cb[&name]);
        }
    }
}

fn shard(path: &Path, samples: &[(&str, &[(&str, &[u8])])]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let mut writer = ShardWriter::create(path).expect("shard");
    for (key, members) in samples {
        writer.write_sample(key, members).expect("sample");
    }
    writer.finish().expect("finish");
}

#[test]
fn unscorable_benchmark_sets_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let model = fixture().join("model");
    let eval = |flag: &str, data: &Path| {
        oxclip().args(["eval", "--json", "--device", "cpu", "--checkpoint"]).arg(&model).arg(flag).arg(data).output().expect("runs")
    };
    let mut image = Vec::new();
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10]))
        .write_to(&mut std::io::Cursor::new(&mut image), image::ImageFormat::Png)
        .expect("png");

    // Labelled shards without classnames.txt: the missing file is named.
    let no_names = d.join("no_names");
    shard(&no_names.join("test/0.tar"), &[("a", &[("png", image.as_slice()), ("cls", b"0".as_slice())])]);
    std::fs::write(no_names.join("test/nshards.txt"), "1\n").expect("write");
    let out = eval("--zero-shot", &PathBuf::from(format!("wds:{}", no_names.display())));
    fails_saying(&out, &[&no_names.join("classnames.txt").display().to_string(), "is missing"]);

    // Class names but shards without `cls`: the shards are named.
    let no_labels = d.join("no_labels");
    shard(&no_labels.join("test/0.tar"), &[("a", &[("png", image.as_slice()), ("txt", b"a red square".as_slice())])]);
    std::fs::write(no_labels.join("classnames.txt"), "red\nblue\n").expect("write");
    let out = eval("--zero-shot", &no_labels);
    fails_saying(&out, &[&no_labels.join("test").display().to_string(), "carries a class label", "KEY.cls"]);

    // nshards.txt naming shards that are not there.
    std::fs::write(no_labels.join("test/nshards.txt"), "2\n").expect("write");
    let out = eval("--zero-shot", &no_labels);
    fails_saying(&out, &["1.tar"]);

    // ImageNet with a folder per class, but not 1000 of them.
    for class in ["n01440764", "n01443537"] {
        let path = d.join("imagenet/val").join(class).join("0.png");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &image).expect("write");
    }
    let out = eval("--zero-shot", &PathBuf::from(format!("imagenet1k:{}", d.join("imagenet").display())));
    fails_saying(&out, &["has 2 class folders", "1000"]);
}

/// `--suite DIR` evaluates every dataset directory under DIR (the model folder beside them is
/// not one) with one model load; its numbers are the single-set ones, and the average is
/// over top-1 and retrieval's mean recall@1.
#[test]
fn a_suite_is_every_set_and_their_average() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json")).expect("json");
    let out = run_ok(
        oxclip().args(["eval", "--json", "--device", "cpu", "--checkpoint"]).arg(fixture().join("model")).arg("--suite").arg(fixture()),
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let datasets = result["datasets"].as_object().expect("datasets");
    assert_eq!(datasets.keys().collect::<Vec<_>>(), ["digits", "digits_retrieval"], "{result}");
    close("top1", &datasets["digits"]["zero_shot"]["top1"], &expected["digits"]["acc1"]);
    let cb = &expected["digits_retrieval"];
    let mean_r1 = (cb["image_retrieval_recall@1"].as_f64().expect("r@1") + cb["text_retrieval_recall@1"].as_f64().expect("r@1")) / 2.0;
    close("mean_recall@1", &datasets["digits_retrieval"]["main_metric"]["value"], &serde_json::json!(mean_r1));
    let average = (expected["digits"]["acc1"].as_f64().expect("acc1") + mean_r1) / 2.0;
    close("average", &result["average"], &serde_json::json!(average));

    // A suite file: `name=spec` lines; a line without `=` is named.
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("suite.txt");
    std::fs::write(&list, format!("# one set\ndigits-again=wds:{}\n", fixture().join("digits").display())).expect("write");
    let out = run_ok(oxclip().args(["eval", "--device", "cpu", "--checkpoint"]).arg(fixture().join("model")).arg("--suite").arg(&list));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("digits-again") && table.contains("mean_per_class_recall") && table.contains("average"), "{table}");
    std::fs::write(&list, "digits\n").expect("write");
    let out = oxclip().args(["eval", "--device", "cpu", "--checkpoint"]).arg(fixture().join("model")).arg("--suite").arg(&list).output().expect("runs");
    fails_saying(&out, &["suite.txt, line 1", "name=spec"]);
}

