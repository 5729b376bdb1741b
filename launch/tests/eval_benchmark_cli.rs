//! `oxclip eval` on clip_benchmark's webdataset layout and on ImageNet-1k: the numbers
//! clip_benchmark itself reports on the same model and data, and clear refusals of sets
//! that cannot be scored.

mod util;

use std::path::{Path, PathBuf};
use std::process::Output;

use oxclip_data_loader::formats::webdataset::ShardWriter;
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
    assert!(
        !out.status.success(),
        "expected a failure, got stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for e in expect {
        assert!(stderr.contains(e), "`{e}` not in:\n{stderr}");
    }
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Os {") && !stderr.contains("Error("),
        "{stderr}"
    );
}

/// Within 0.2 points (0.002) of clip_benchmark's number.
fn close(name: &str, ours: &serde_json::Value, theirs: &serde_json::Value) {
    let (ours, theirs) = (ours.as_f64().expect(name), theirs.as_f64().expect(name));
    assert!((ours - theirs).abs() <= 0.002, "{name}: oxclip {ours} vs clip_benchmark {theirs}");
}

#[test]
fn clip_benchmark_numbers_are_reproduced() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json"),
    )
    .expect("json");

    // A directory holding classnames.txt is a clip_benchmark set as it is.
    let digits = fixture().join("digits");
    let result = eval_json("--zero-shot", digits.to_str().expect("utf-8"));
    let (zs, cb) = (&result["zero_shot"], &expected["digits"]);
    assert_eq!(zs["samples"], 210, "{result}");
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

/// A sample's key and its members (extension, bytes).
type Sample<'a> = (&'a str, &'a [(&'a str, &'a [u8])]);

fn shard(path: &Path, samples: &[Sample]) {
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
        oxclip()
            .args(["eval", "--json", "--device", "cpu", "--checkpoint"])
            .arg(&model)
            .arg(flag)
            .arg(data)
            .output()
            .expect("runs")
    };
    let mut image = Vec::new();
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10]))
        .write_to(&mut std::io::Cursor::new(&mut image), image::ImageFormat::Png)
        .expect("png");

    // Labelled shards without classnames.txt: the missing file is named.
    let no_names = d.join("no_names");
    shard(
        &no_names.join("test/0.tar"),
        &[("a", &[("png", image.as_slice()), ("cls", b"0".as_slice())])],
    );
    std::fs::write(no_names.join("test/nshards.txt"), "1\n").expect("write");
    let out = eval("--zero-shot", &PathBuf::from(format!("wds:{}", no_names.display())));
    fails_saying(&out, &[&no_names.join("classnames.txt").display().to_string(), "is missing"]);

    // Class names but shards without `cls`: the shards are named.
    let no_labels = d.join("no_labels");
    shard(
        &no_labels.join("test/0.tar"),
        &[("a", &[("png", image.as_slice()), ("txt", b"a red square".as_slice())])],
    );
    std::fs::write(no_labels.join("classnames.txt"), "red\nblue\n").expect("write");
    let out = eval("--zero-shot", &no_labels);
    fails_saying(
        &out,
        &[&no_labels.join("test").display().to_string(), "carries a class label", "KEY.cls"],
    );

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
    let out =
        eval("--zero-shot", &PathBuf::from(format!("imagenet1k:{}", d.join("imagenet").display())));
    fails_saying(&out, &["has 2 class folders", "1000"]);
}

/// `--suite DIR` evaluates every dataset directory under DIR (the model folder beside them is
/// not one) with one model load; its numbers are the single-set ones, and the average is
/// over top-1 and retrieval's mean recall@1.
#[test]
fn a_suite_is_every_set_and_their_average() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let out = run_ok(
        oxclip()
            .args(["eval", "--json", "--device", "cpu", "--checkpoint"])
            .arg(fixture().join("model"))
            .arg("--suite")
            .arg(fixture()),
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let datasets = result["datasets"].as_object().expect("datasets");
    assert_eq!(datasets.keys().collect::<Vec<_>>(), ["digits", "digits_retrieval"], "{result}");
    close("top1", &datasets["digits"]["zero_shot"]["top1"], &expected["digits"]["acc1"]);
    let cb = &expected["digits_retrieval"];
    let mean_r1 = (cb["image_retrieval_recall@1"].as_f64().expect("r@1")
        + cb["text_retrieval_recall@1"].as_f64().expect("r@1"))
        / 2.0;
    close(
        "mean_recall@1",
        &datasets["digits_retrieval"]["main_metric"]["value"],
        &serde_json::json!(mean_r1),
    );
    let average = (expected["digits"]["acc1"].as_f64().expect("acc1") + mean_r1) / 2.0;
    close("average", &result["average"], &serde_json::json!(average));

    // A suite file: `name=spec` lines; a line without `=` is named.
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("suite.txt");
    std::fs::write(
        &list,
        format!("# one set\ndigits-again=wds:{}\n", fixture().join("digits").display()),
    )
    .expect("write");
    let out = run_ok(
        oxclip()
            .args(["eval", "--device", "cpu", "--checkpoint"])
            .arg(fixture().join("model"))
            .arg("--suite")
            .arg(&list),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("digits-again")
            && table.contains("mean_per_class_recall")
            && table.contains("average"),
        "{table}"
    );
    std::fs::write(&list, "digits\n").expect("write");
    let out = oxclip()
        .args(["eval", "--device", "cpu", "--checkpoint"])
        .arg(fixture().join("model"))
        .arg("--suite")
        .arg(&list)
        .output()
        .expect("runs");
    fails_saying(&out, &["suite.txt, line 1", "name=spec"]);
}

/// `oxclip launch --nproc-per-node 2 -- eval --suite`: each rank embeds its share of every set
/// and rank 0 alone prints the numbers of the whole sets, the single process's up to a flipped
/// prediction (another batch split rounds the features differently).
#[test]
fn a_suite_over_two_ranks_scores_the_whole_sets_once() {
    let suite = |cmd: &mut std::process::Command| {
        cmd.args(["eval", "--json", "--device", "cpu", "--batch-size", "16", "--checkpoint"])
            .arg(fixture().join("model"))
            .arg("--suite")
            .arg(fixture());
    };
    let mut single = oxclip();
    suite(&mut single);
    let single: serde_json::Value =
        serde_json::from_slice(&run_ok(&mut single).stdout).expect("json");
    let mut launched = launcher(2, &[]);
    suite(&mut launched);
    let out = run_ok(&mut launched);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed: Vec<&str> = stdout.lines().filter(|l| l.contains("\"datasets\"")).collect();
    assert_eq!(printed.len(), 1, "one rank prints the result:\n{stdout}");
    assert!(printed[0].starts_with("[rank 0] "), "{stdout}");
    let two: serde_json::Value =
        serde_json::from_str(printed[0].trim_start_matches("[rank 0] ")).expect("json");
    let (a, b) =
        (&single["datasets"]["digits"]["zero_shot"], &two["datasets"]["digits"]["zero_shot"]);
    assert_eq!(a["samples"], b["samples"], "every image once: {two}");
    // The same weights, the same images: the same predictions, whichever rank embeds which
    // image (the fixture's smallest margins, in expected.json, are far above the rounding a
    // different batch makes).
    for key in ["top1", "top5", "mean_per_class_recall"] {
        let (x, y) = (a[key].as_f64().expect("number"), b[key].as_f64().expect("number"));
        assert!((x - y).abs() <= 1e-9, "{key}: 1 rank {x}, 2 ranks {y}");
    }
    let (a, b) = (
        &single["datasets"]["digits_retrieval"]["retrieval"],
        &two["datasets"]["digits_retrieval"]["retrieval"],
    );
    assert_eq!(a["pairs"], b["pairs"], "{two}");
    for k in [1, 5, 10] {
        for direction in ["image_retrieval", "text_retrieval"] {
            let key = format!("{direction}_recall@{k}");
            let (x, y) = (a[&key].as_f64().expect("number"), b[&key].as_f64().expect("number"));
            assert!((x - y).abs() <= 1e-9, "{key}: 1 rank {x}, 2 ranks {y}");
        }
    }
}

/// `eval.datasets` with two sets (classification and retrieval) on a 2-step run evaluated
/// every step: both logged under `val/<name>-...` at each eval step and written to
/// `RUN/eval/<step>.json`.
#[test]
fn eval_datasets_are_evaluated_during_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let data = synth(d, 32, 0, 32);
    let config = tiny_config(d, &data, 2, "  eval_every: 1\n", false);
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "eval:\n  datasets:\n    - name: digits\n      spec: {}\n    - name: digits-ret\n      spec: wds:{}\n",
        fixture().join("digits").display(),
        fixture().join("digits_retrieval").display()
    ));
    std::fs::write(&config, text).expect("write");
    run_ok(oxclip().args(["train", "--config"]).arg(&config));

    let run = d.join("run");
    let scalars = read_tensorboard(&run.join("tensorboard"));
    for tag in [
        "val/digits-zeroshot-top1",
        "val/digits-zeroshot-top5",
        "val/digits-zeroshot-mean-per-class-recall",
        "val/digits-ret-image_retrieval_recall@1",
        "val/digits-ret-text_retrieval_recall@10",
    ] {
        let steps: Vec<i64> = scalars
            .get(tag)
            .unwrap_or_else(|| panic!("no {tag} in {:?}", scalars.keys()))
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(steps, [1, 2], "{tag}");
    }
    for step in [1, 2] {
        let path = run.join("eval").join(format!("{step}.json"));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("eval json"))
                .expect("json");
        assert_eq!(report["step"], step, "{report}");
        assert_eq!(report["datasets"]["digits"]["zero_shot"]["samples"], 210, "{report}");
        assert_eq!(report["datasets"]["digits-ret"]["retrieval"]["pairs"], 60, "{report}");
        let top1 = report["datasets"]["digits"]["zero_shot"]["top1"].as_f64().expect("top1");
        assert!((0.0..=1.0).contains(&top1), "{report}");
    }

    // A set that cannot be scored fails the run before its first step, naming the entry.
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!("    - name: bad\n      spec: wds:{}\n", d.join("nowhere").display()));
    std::fs::write(
        &config,
        text.replace(
            &format!("run_dir: {}", run.display()),
            &format!("run_dir: {}", d.join("run2").display()),
        ),
    )
    .expect("write");
    let out = oxclip().args(["train", "--config"]).arg(&config).output().expect("runs");
    fails_saying(&out, &["eval.datasets `bad`", "nowhere"]);
}

/// `eval.datasets` over 3 ranks (210 and 60 images) scores every image of both sets once, as
/// one process does. The run starts from the clip_benchmark fixture's weights (a model that
/// tells the digits apart: 79% top-1) at a learning rate of 0, so both runs evaluate those
/// weights exactly: the same numbers, and clip_benchmark's. They evaluate after both steps:
/// the second evaluation, the kept loaders' second pass over each set, scores the same.
#[test]
fn eval_datasets_over_ranks_score_the_whole_sets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let config = d.join("run.yaml");
    std::fs::write(
        &config,
        format!(
            "run_dir: {run}\nmodel: {model}\ninit:\n  checkpoint: {model}\ndata:\n  train: synthetic:512\n  workers: 1\ntrain:\n  batch_size: 8\n  steps: 2\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 2\n  checkpoint_every: 0\n  eval_every: 1\noptim:\n  lr: 0.0\n  warmup_steps: 2\ndist:\n  backend: cpu\n  timeout_s: 120\neval:\n  datasets:\n    - name: digits\n      spec: {digits}\n    - name: ret\n      spec: {ret}\n",
            run = d.join("run").display(),
            model = fixture().join("model").display(),
            digits = fixture().join("digits").display(),
            ret = fixture().join("digits_retrieval").display(),
        ),
    )
    .expect("write config");
    let single = d.join("single");
    run_ok(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .args(["--set", "train.batch_size=24", "--run-dir"])
            .arg(&single),
    );
    let multi = d.join("multi");
    run_ok(launcher(3, &[]).args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&multi));
    let read = |run: &Path, step: u64| -> serde_json::Value {
        let path = run.join(format!("eval/{step}.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("eval json")).expect("json")
    };
    let (a, b) = (read(&single, 2), read(&multi, 2));
    for (run, second) in [(&single, &a), (&multi, &b)] {
        let first = read(run, 1);
        assert_eq!(first["datasets"], second["datasets"], "{}: steps 1 and 2", run.display());
    }
    assert_eq!(b["datasets"]["digits"]["zero_shot"]["samples"], 210, "{b}");
    assert_eq!(b["datasets"]["ret"]["retrieval"]["pairs"], 60, "{b}");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let mut keys = vec![
        (["digits", "zero_shot", "top1"].map(String::from), ["digits", "acc1"].map(String::from)),
        (
            ["digits", "zero_shot", "mean_per_class_recall"].map(String::from),
            ["digits", "mean_per_class_recall"].map(String::from),
        ),
    ];
    for k in [1, 5, 10] {
        for direction in ["image_retrieval", "text_retrieval"] {
            let name = format!("{direction}_recall@{k}");
            keys.push((
                ["ret".into(), "retrieval".into(), name.clone()],
                ["digits_retrieval".into(), name],
            ));
        }
    }
    for ([set, kind, key], [cb_set, cb_key]) in &keys {
        let (x, y) = (
            a["datasets"][set][kind][key].as_f64().expect("single"),
            b["datasets"][set][kind][key].as_f64().expect("multi"),
        );
        assert!((x - y).abs() <= 1e-9, "{set} {key}: 1 rank {x}, 3 ranks {y}");
        close(key, &b["datasets"][set][kind][key], &expected[cb_set][cb_key]);
    }
}
