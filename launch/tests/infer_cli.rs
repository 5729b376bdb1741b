//! `oxclip tokenizer encode`, `embed` and `classify` end to end on the real binary.

mod util;

use util::*;

/// `oxclip tokenizer encode` gives open_clip's ids for every case of the golden file, into a
/// file or on stdout.
#[test]
fn tokenize_matches_open_clip() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/tokenizer_golden.json"))
            .expect("golden");
    let cases = golden["cases"].as_array().expect("cases");
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().expect("text")).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, output) = (dir.path().join("texts.json"), dir.path().join("ids.json"));
    std::fs::write(&input, serde_json::to_string(&texts).expect("json")).expect("write");
    run_ok(
        oxclip()
            .args(["tokenizer", "encode", "--texts-file"])
            .arg(&input)
            .arg("--out")
            .arg(&output),
    );
    let ids: Vec<Vec<i64>> =
        serde_json::from_str(&std::fs::read_to_string(&output).expect("read")).expect("ids");
    assert_eq!(ids.len(), cases.len());
    for (got, case) in ids.iter().zip(cases) {
        let want: Vec<i64> = serde_json::from_value(case["ids"].clone()).expect("ids");
        assert_eq!(got, &want, "{}", case["text"]);
    }
    let printed = run_ok(oxclip().args(["tokenizer", "encode", "--texts-file"]).arg(&input));
    let printed_ids: Vec<Vec<i64>> = serde_json::from_slice(&printed.stdout).expect("ids");
    assert_eq!(printed_ids, ids);
    // Bad input is an error naming the file.
    std::fs::write(&input, "{\"not\": \"a list\"}").expect("write");
    let out =
        oxclip().args(["tokenizer", "encode", "--texts-file"]).arg(&input).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("texts.json"));
}

#[test]
fn embed_and_classify_with_a_trained_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 64, 0, 32);
    let config = tiny_config(dir.path(), &data, 2, "  eval_every: 0\n", false);
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let run = dir.path().join("run");

    // Some images of the run's kind, as files.
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    for i in 0..3u8 {
        let img =
            image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 60 * i]));
        img.save(images.join(format!("{i}.png"))).expect("png");
    }
    let texts = dir.path().join("texts.json");
    std::fs::write(&texts, r#"["a red circle", "a blue square above a green cross"]"#)
        .expect("write");
    let out = dir.path().join("embeds.safetensors");
    run_ok(
        oxclip()
            .args(["embed", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--images")
            .arg(&images)
            .arg("--texts-file")
            .arg(&texts)
            .arg("--out")
            .arg(&out),
    );
    let embeds = read_safetensors(&out);
    assert_eq!(embeds["image_embeds"].size(), [3, 64]);
    assert_eq!(embeds["text_embeds"].size(), [2, 64]);
    for t in embeds.values() {
        let norms = t.norm_scalaropt_dim(2, [1], false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
    }

    let out = run_ok(
        oxclip()
            .args(["classify", "--json", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--image")
            .arg(images.join("0.png"))
            .args(["--labels", "a red circle", "a blue square", "a green cross"]),
    );
    let probs: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(probs.len(), 3);
    let sum: f64 = probs.values().map(|v| v.as_f64().expect("number")).sum();
    assert!((sum - 1.0).abs() < 1e-6, "{sum}");

    // A missing image is an error naming it.
    let bad = oxclip()
        .args(["classify", "--device", "cpu", "--checkpoint"])
        .arg(&run)
        .args(["--image", "nope.png", "--labels", "x", "y"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nope.png"));

    // A CLIP model has no decoder to caption with, and bad search flags are refused before
    // the model loads.
    for (flags, says) in [
        (&[][..], "only CoCa models caption"),
        (&["--num-beams", "6", "--num-beam-groups", "4"][..], "num_beam_groups"),
        (&["--seq-len", "3", "--min-seq-len", "5"][..], "seq_len"),
    ] {
        let refused = oxclip()
            .args(["caption", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--image")
            .arg(&images)
            .args(flags)
            .output()
            .expect("runs");
        assert!(!refused.status.success(), "{flags:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(says) && stderr.lines().count() <= 2, "{flags:?}: {stderr}");
    }
}

#[test]
fn eval_zero_shot_on_class_folders_and_retrieval_on_pairs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 64, 32, 32);
    let config = tiny_config(dir.path(), &data, 2, "  eval_every: 0\n", false);
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let run = dir.path().join("run");

    // A folder per class, the folder names the class names: 7 classes, so top-5 is not every
    // class and can miss.
    let classes = dir.path().join("classes");
    let names = [
        "red circle",
        "blue square",
        "green cross",
        "yellow circle",
        "purple square",
        "orange cross",
        "grey circle",
    ];
    let colours = [
        [220, 30, 30],
        [30, 30, 220],
        [30, 200, 30],
        [230, 220, 40],
        [150, 40, 170],
        [240, 140, 20],
        [128, 128, 128],
    ];
    let mut images = Vec::new();
    for (name, rgb) in names.iter().zip(colours) {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([rgb[0] ^ (x as u8 * 3), rgb[1], rgb[2] ^ (y as u8 * 2)])
        });
        let path = classes.join(name).join("0.png");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        img.save(&path).expect("png");
        images.push(path);
    }
    // What eval must answer, known before it runs: with the one template `{}` a class's
    // embedding is its name's, so each image's rank among the names is `classify`'s ranking.
    let (mut top1, mut top5) = (0usize, 0usize);
    for (label, image) in images.iter().enumerate() {
        let out = run_ok(
            oxclip()
                .args(["classify", "--json", "--device", "cpu", "--checkpoint"])
                .arg(&run)
                .arg("--image")
                .arg(image)
                .arg("--labels")
                .args(names),
        );
        let probs: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&out.stdout).expect("json");
        let p = |name: &str| probs[name].as_f64().expect("number");
        let rank = names.iter().filter(|n| p(n) > p(names[label])).count();
        top1 += usize::from(rank == 0);
        top5 += usize::from(rank < 5);
    }
    let templates = dir.path().join("templates.txt");
    std::fs::write(&templates, "{}\n").expect("write");
    let out = run_ok(
        oxclip()
            .args(["eval", "--json", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--zero-shot")
            .arg(&classes)
            .arg("--templates")
            .arg(&templates),
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["zero_shot"]["samples"], 7, "{result}");
    let (got1, got5) = (
        result["zero_shot"]["top1"].as_f64().expect("top1"),
        result["zero_shot"]["top5"].as_f64().expect("top5"),
    );
    assert!(
        (got1 - top1 as f64 / 7.0).abs() < 1e-9,
        "eval top-1 {got1}, classify says {top1}/7: {result}"
    );
    assert!(
        (got5 - top5 as f64 / 7.0).abs() < 1e-9,
        "eval top-5 {got5}, classify says {top5}/7: {result}"
    );
    assert!(got1 <= got5, "{result}");

    let out = run_ok(
        oxclip()
            .args(["eval", "--json", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--retrieval")
            .arg(data.join("val")),
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let r = &result["retrieval"];
    assert_eq!(r["pairs"], 32, "{result}");
    for key in [
        "image_to_text_R@1",
        "image_to_text_R@5",
        "image_to_text_R@10",
        "image_to_text_mean_rank",
        "image_to_text_median_rank",
        "text_to_image_R@1",
        "text_to_image_R@5",
        "text_to_image_R@10",
        "text_to_image_mean_rank",
        "text_to_image_median_rank",
    ] {
        assert!(r[key].is_number(), "{key}: {result}");
    }
    assert!(
        r["image_to_text_R@10"].as_f64().expect("R@10")
            >= r["image_to_text_R@1"].as_f64().expect("R@1")
    );

    // Labelled shards need the class names.
    let out = oxclip()
        .args(["eval", "--device", "cpu", "--checkpoint"])
        .arg(&run)
        .arg("--zero-shot")
        .arg(data.join("val"))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--classnames"));
}

#[test]
fn index_then_search_by_text_and_by_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 64, 32, 32);
    let config = tiny_config(dir.path(), &data, 2, "  eval_every: 0\n", false);
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let index = dir.path().join("val.index");
    run_ok(
        oxclip()
            .args(["index", "--device", "cpu", "--checkpoint"])
            .arg(dir.path().join("run"))
            .arg("--data")
            .arg(data.join("val"))
            .arg("--out")
            .arg(&index),
    );

    let out = run_ok(
        oxclip()
            .args(["search", "--json", "--device", "cpu", "--top", "4", "--index"])
            .arg(&index)
            .args(["--text", "a red circle"]),
    );
    let hits: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(hits.len(), 4);
    let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().expect("score")).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(hits.iter().all(|h| h["key"].is_string() && h["caption"].is_string()));

    // An image query: one of the indexed images finds captions, its own among the scores.
    let image = dir.path().join("query.png");
    image::RgbImage::from_pixel(32, 32, image::Rgb([220, 30, 30])).save(&image).expect("png");
    let out = run_ok(
        oxclip()
            .args(["search", "--json", "--device", "cpu", "--index"])
            .arg(&index)
            .arg("--image")
            .arg(&image),
    );
    let hits: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(hits.len(), 5);

    let not_an_index = dir.path().join("run.yaml");
    let out = oxclip()
        .args(["search", "--index"])
        .arg(&not_an_index)
        .args(["--text", "x"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("run.yaml"));
}

#[test]
fn tokenizer_train_writes_a_tokenizer_that_tokenize_uses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 200, 0, 16);
    let out = dir.path().join("tokenizer.json");
    // 200 synthetic captions hold about 85 merges: 590 is within reach, and written exactly.
    let printed = run_ok(
        oxclip()
            .args(["tokenizer", "train", "--vocab-size", "590", "--data"])
            .arg(data.join("train"))
            .arg("--out")
            .arg(&out),
    );
    assert!(String::from_utf8_lossy(&printed.stdout)
        .contains("trained on 200 captions (0 skipped): 590 tokens"));
    let texts = dir.path().join("texts.json");
    std::fs::write(&texts, r#"["a large red circle above a small blue square"]"#).expect("write");
    let ids = run_ok(
        oxclip()
            .args(["tokenizer", "encode", "--context-length", "16", "--tokenizer"])
            .arg(&out)
            .arg("--texts-file")
            .arg(&texts),
    );
    let ids: Vec<Vec<i64>> = serde_json::from_slice(&ids.stdout).expect("ids");
    let row = &ids[0];
    let eot = *row.iter().max().expect("ids");
    // SOT first, EOT (the largest id) after a handful of whole-word tokens, zero padding.
    assert_eq!(row[0], eot - 1);
    let end = row.iter().position(|&i| i == eot).expect("eot");
    assert!((6..=12).contains(&end), "{row:?}");
    assert!(row[end + 1..].iter().all(|&i| i == 0));
}
