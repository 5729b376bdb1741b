//! `oxclip eval`, `classify`, `embed` and `search` refusing inputs they cannot use honestly,
//! on the real binary: each a non-zero exit with a message naming the problem.

mod util;

use std::path::{Path, PathBuf};
use std::process::Output;

use util::*;

/// A tiny model trained for 2 steps, and its run directory.
fn trained(dir: &Path) -> PathBuf {
    let data = synth(dir, 32, 0, 32);
    let config = tiny_config(dir, &data, 2, "  eval_every: 0\n", false);
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    dir.join("run")
}

fn png(path: &Path, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    image::RgbImage::from_pixel(32, 32, image::Rgb(rgb)).save(path).expect("png");
}

/// A folder per class, `n` classes of two images each; returns the folder.
fn class_folders(dir: &Path, n: usize) -> PathBuf {
    let classes = dir.join("classes");
    for class in 0..n {
        for j in 0..2u8 {
            png(
                &classes.join(format!("class{class}")).join(format!("{j}.png")),
                [40 * class as u8, 30 * j, 100],
            );
        }
    }
    classes
}

/// Fails with a message holding every one of `expect`, without a panic or a Rust debug dump.
fn fails_saying(out: &Output, expect: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
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
    stderr
}

#[test]
fn zero_shot_refuses_what_it_cannot_score() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = trained(d);
    let eval = || {
        let mut cmd = oxclip();
        cmd.args(["eval", "--json", "--device", "cpu", "--checkpoint"]).arg(&run);
        cmd
    };
    let classes = class_folders(d, 4);
    let lines = |name: &str, n: usize| {
        let path = d.join(name);
        std::fs::write(&path, (0..n).map(|i| format!("thing {i}\n")).collect::<String>())
            .expect("write");
        path
    };
    let (two, four, many) = (lines("two.txt", 2), lines("four.txt", 4), lines("many.txt", 24));

    // Class names that do not match the class folders, either way.
    for (names, count) in [(&two, "2"), (&many, "24")] {
        let out = eval()
            .arg("--zero-shot")
            .arg(&classes)
            .arg("--classnames")
            .arg(names)
            .output()
            .expect("runs");
        let stderr = fails_saying(
            &out,
            &[&format!("names {count} classes"), "has 4 class folders", "classes"],
        );
        assert!(
            stderr.contains(&names.display().to_string())
                && stderr.contains(&classes.display().to_string()),
            "{stderr}"
        );
    }
    // As many names as folders is scored, over every image.
    let out = run_ok(eval().arg("--zero-shot").arg(&classes).arg("--classnames").arg(&four));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["zero_shot"]["samples"], 8, "{result}");

    // A CSV without labels: the column looked for and how to name another.
    std::fs::write(d.join("val.csv"), "filepath,title\nclasses/class0/0.png,a thing\n")
        .expect("write");
    let out = eval()
        .arg("--zero-shot")
        .arg(d.join("val.csv"))
        .arg("--classnames")
        .arg(&four)
        .output()
        .expect("runs");
    fails_saying(
        &out,
        &["val.csv", "no label column `label`", "label_key=COLUMN", "`filepath`, `title`"],
    );
    // The same CSV with a label column named otherwise, named in the spec, is scored.
    std::fs::write(
        d.join("val.csv"),
        "filepath,cls\nclasses/class0/0.png,0\nclasses/class3/1.png,3\n",
    )
    .expect("write");
    let out = run_ok(
        eval()
            .arg("--zero-shot")
            .arg(format!("csv:{}?label_key=cls", d.join("val.csv").display()))
            .arg("--classnames")
            .arg(&four),
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["zero_shot"]["samples"], 2, "{result}");
    // ... but not against two class names: label 3 is beyond them.
    let out = eval()
        .arg("--zero-shot")
        .arg(format!("csv:{}?label_key=cls", d.join("val.csv").display()))
        .arg("--classnames")
        .arg(&two)
        .output()
        .expect("runs");
    fails_saying(
        &out,
        &[
            "val.csv, line 3: label 3 is outside the class list",
            "two.txt names 2 classes (labels 0 to 1)",
        ],
    );
    // A label that is no class index, in a CSV or a JSONL file.
    std::fs::write(
        d.join("bad.csv"),
        "filepath,label\nclasses/class0/0.png,0\nclasses/class0/1.png,dog\n",
    )
    .expect("write");
    let out = eval()
        .arg("--zero-shot")
        .arg(d.join("bad.csv"))
        .arg("--classnames")
        .arg(&four)
        .output()
        .expect("runs");
    fails_saying(&out, &["bad.csv: line 3: label `dog` is not a class index"]);
    std::fs::write(d.join("val.jsonl"), "{\"image\": \"classes/class0/0.png\", \"label\": -2}\n")
        .expect("write");
    let out = eval()
        .arg("--zero-shot")
        .arg(d.join("val.jsonl"))
        .arg("--classnames")
        .arg(&four)
        .output()
        .expect("runs");
    fails_saying(&out, &["val.jsonl: line 1: label `-2` is not a class index"]);

    // Rows whose images are all missing: nothing to score is an error, never a 0%.
    std::fs::write(d.join("gone.csv"), "filepath,label\ngone/a.png,0\ngone/b.png,1\n")
        .expect("write");
    let out = eval()
        .arg("--zero-shot")
        .arg(d.join("gone.csv"))
        .arg("--classnames")
        .arg(&four)
        .output()
        .expect("runs");
    let stderr = fails_saying(&out, &["no sample could be evaluated", "missing_image 2"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("0.00"), "{stderr}");

    // `--classnames` belongs to zero-shot.
    let out = eval()
        .arg("--retrieval")
        .arg(&classes)
        .arg("--classnames")
        .arg(&four)
        .output()
        .expect("runs");
    fails_saying(&out, &["--zero-shot"]);

    // Shards without class labels, or with labels beyond the class names: refused before
    // the model is loaded, naming the shard and the sample.
    let out = eval()
        .arg("--zero-shot")
        .arg(d.join("synth/train"))
        .arg("--classnames")
        .arg(&four)
        .output()
        .expect("runs");
    fails_saying(&out, &["carries a class label", "KEY.cls"]);
    let labelled = synth(&d.join("labelled"), 8, 24, 32);
    let out = eval()
        .arg("--zero-shot")
        .arg(labelled.join("val"))
        .arg("--classnames")
        .arg(&two)
        .output()
        .expect("runs");
    fails_saying(
        &out,
        &[
            "00000.tar, sample",
            "is outside the class list",
            "two.txt names 2 classes (labels 0 to 1)",
        ],
    );
    let out = run_ok(
        eval()
            .arg("--zero-shot")
            .arg(labelled.join("val"))
            .arg("--classnames")
            .arg(labelled.join("classnames.txt")),
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["zero_shot"]["samples"], 24, "{result}");

    // Training refuses the same val set at start: before any step, no run folder written.
    let config = std::fs::read_to_string(d.join("run.yaml"))
        .expect("config")
        .replace(
            &format!("run_dir: {}", run.display()),
            &format!("run_dir: {}", d.join("run2").display()),
        )
        .replace(
            "data:\n",
            &format!(
                "data:\n  val: {}\n  classnames: {}\n",
                d.join("val.csv").display(),
                four.display()
            ),
        );
    std::fs::write(d.join("run2.yaml"), config).expect("write");
    let out = oxclip().args(["train", "--config"]).arg(d.join("run2.yaml")).output().expect("runs");
    fails_saying(&out, &["val.csv", "no label column `label`"]);
    assert!(!d.join("run2").join("checkpoints").exists());
}

/// The zero-shot numbers of `oxclip eval` recomputed from `oxclip embed`'s embeddings of the
/// same images and class names (one template, `{}`, so a class's embedding is its name's):
/// top-1 and top-5 over 6 classes, where top-5 is not everything.
#[test]
fn zero_shot_accuracy_equals_the_ranks_of_the_embeddings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = trained(d);
    let classes = class_folders(d, 6);
    let names: Vec<String> = (0..6).map(|i| format!("class{i}")).collect();
    std::fs::write(d.join("templates.txt"), "{}\n").expect("write");
    std::fs::write(d.join("names.json"), serde_json::to_string(&names).expect("json"))
        .expect("write");

    let out = run_ok(
        oxclip()
            .args(["eval", "--json", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--zero-shot")
            .arg(&classes)
            .arg("--templates")
            .arg(d.join("templates.txt")),
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let zs = &result["zero_shot"];
    assert_eq!(zs["samples"], 12, "{result}");

    let embeds = d.join("embeds.safetensors");
    run_ok(
        oxclip()
            .args(["embed", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--images")
            .arg(&classes)
            .arg("--texts-file")
            .arg(d.join("names.json"))
            .arg("--out")
            .arg(&embeds),
    );
    let tensors = read_safetensors(&embeds);
    let scores = tensors["image_embeds"].matmul(&tensors["text_embeds"].tr());
    let (mut top1, mut top5) = (0, 0);
    for i in 0..12i64 {
        // Images are listed sorted: class0/0, class0/1, class1/0, ...
        let label = i / 2;
        let row: Vec<f32> = Vec::try_from(&scores.get(i)).expect("row");
        let rank = row.iter().filter(|&&s| s > row[label as usize]).count();
        top1 += usize::from(rank == 0);
        top5 += usize::from(rank < 5);
    }
    let close = |key: &str, hits: usize| {
        (zs[key].as_f64().expect("number") - hits as f64 / 12.0).abs() < 1e-9
    };
    assert!(
        close("top1", top1) && close("top5", top5),
        "eval {zs}, embeddings: top-1 {top1}/12, top-5 {top5}/12"
    );
    assert!(zs["top1"].as_f64() <= zs["top5"].as_f64());
}

#[test]
fn inference_refuses_inputs_in_its_own_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = trained(d);
    let image = d.join("photos/a.png");
    png(&image, [200, 20, 20]);
    let classify = || {
        let mut cmd = oxclip();
        cmd.args(["classify", "--device", "cpu", "--checkpoint"]).arg(&run);
        cmd
    };

    // A GIF (valid, 1x1) is an unsupported format, and no "training config".
    let gif = d.join("photos/anim.gif");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;").expect("write");
    let out =
        classify().arg("--image").arg(&gif).args(["--labels", "a", "b"]).output().expect("runs");
    let stderr = fails_saying(&out, &["anim.gif", "unsupported image format (.gif)"]);
    assert!(!stderr.contains("training config") && !stderr.contains("undecodable"), "{stderr}");

    // Labels that cannot rank anything.
    let out = classify().arg("--image").arg(&image).args(["--labels", ""]).output().expect("runs");
    fails_saying(&out, &["--labels: label 1 is empty"]);
    let out =
        classify().arg("--image").arg(&image).args(["--labels", "a dog"]).output().expect("runs");
    fails_saying(&out, &["at least 2 labels", "100%"]);
    let out = classify()
        .arg("--image")
        .arg(&image)
        .args(["--labels", "a dog", "a cat", "a dog"])
        .output()
        .expect("runs");
    fails_saying(&out, &["`a dog` is given twice"]);

    // A device that is not there: the advice is this command's flag.
    let out = oxclip()
        .args(["classify", "--device", "cuda:99", "--checkpoint"])
        .arg(&run)
        .arg("--image")
        .arg(&image)
        .args(["--labels", "a", "b"])
        .output()
        .expect("runs");
    let stderr = fails_saying(&out, &["cuda:99 requested", "--device cpu"]);
    assert!(!stderr.contains("train.device"), "{stderr}");
    let out = oxclip()
        .args(["classify", "--device", "gpu", "--checkpoint"])
        .arg(&run)
        .arg("--image")
        .arg(&image)
        .args(["--labels", "a", "b"])
        .output()
        .expect("runs");
    let stderr = fails_saying(&out, &["--device gpu is not one of auto, cpu, cuda, cuda:N"]);
    assert!(!stderr.contains("training config"), "{stderr}");

    // A folder without images: an error naming it, and no file written.
    let empty = d.join("emptydir");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let written = d.join("embeds.safetensors");
    let out = oxclip()
        .args(["embed", "--device", "cpu", "--checkpoint"])
        .arg(&run)
        .arg("--images")
        .arg(&empty)
        .arg("--out")
        .arg(&written)
        .output()
        .expect("runs");
    fails_saying(&out, &["emptydir holds no images"]);
    assert!(!written.exists());

    // `search --top 0` is refused by the parser.
    let index = d.join("val.index");
    let out = oxclip()
        .args(["search", "--top", "0", "--index"])
        .arg(&index)
        .args(["--text", "x"])
        .output()
        .expect("runs");
    fails_saying(&out, &["--top"]);
}
