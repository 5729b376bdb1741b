//! `oxclip embed` over a folder with unreadable images: they are skipped, named and counted,
//! as the training loader skips samples, and every other image is embedded in its place.

mod util;

use std::path::{Path, PathBuf};

use util::*;

/// A tiny model trained for 2 steps, and its run directory.
fn trained(dir: &Path) -> PathBuf {
    let data = synth(dir, 32, 0, 32);
    let config = tiny_config(dir, &data, 2, "  eval_every: 0\n", false);
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    dir.join("run")
}

/// The `images` list an `oxclip embed` output file keeps in its metadata (row order).
fn image_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).expect("read");
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors");
    let meta = header.metadata().clone().expect("metadata");
    serde_json::from_str(&meta["images"]).expect("a JSON list")
}

#[test]
fn embed_skips_and_names_unreadable_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = trained(d);

    // 50 JPEGs, two of them broken: one is text, one a JPEG cut after its first bytes.
    let photos = d.join("photos");
    std::fs::create_dir_all(&photos).expect("mkdir");
    let mut good = Vec::new();
    for i in 0..50u32 {
        let path = photos.join(format!("{i:02}.jpg"));
        let img = image::RgbImage::from_fn(40 + i, 30, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 7 + i) as u8, (i * 5) as u8])
        });
        img.save(&path).expect("jpeg");
        if i == 17 {
            std::fs::write(&path, b"this is not an image").expect("write");
        } else if i == 33 {
            let bytes = std::fs::read(&path).expect("read");
            std::fs::write(&path, &bytes[..24]).expect("write");
        } else {
            good.push(path);
        }
    }
    assert_eq!(good.len(), 48);

    let out = d.join("embeds.safetensors");
    let done = run_ok(
        oxclip()
            .args([
                "embed",
                "--device",
                "cpu",
                "--batch-size",
                "8",
                "--workers",
                "3",
                "--checkpoint",
            ])
            .arg(&run)
            .arg("--images")
            .arg(&photos)
            .arg("--out")
            .arg(&out),
    );
    let stderr = String::from_utf8_lossy(&done.stderr);
    let stdout = String::from_utf8_lossy(&done.stdout);
    for broken in ["17.jpg", "33.jpg"] {
        assert!(
            stderr.contains(&photos.join(broken).display().to_string()),
            "{broken} not named:\n{stderr}"
        );
    }
    assert!(stderr.contains("2 of 50 image(s) skipped"), "{stderr}");
    assert!(stdout.contains("48 image(s) (2 skipped), 0 text(s)"), "{stdout}");

    let embeds = read_safetensors(&out);
    assert_eq!(embeds["image_embeds"].size(), [48, 64]);
    let names = image_names(&out);
    let want: Vec<String> = good.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(names, want, "the rows are the readable files, in sorted order");

    // Each row is its own file's embedding: the 48 good files alone, in other batches and on
    // one thread, give the same rows.
    let alone = d.join("alone.safetensors");
    run_ok(
        oxclip()
            .args([
                "embed",
                "--device",
                "cpu",
                "--batch-size",
                "5",
                "--workers",
                "1",
                "--checkpoint",
            ])
            .arg(&run)
            .arg("--images")
            .args(&good)
            .arg("--out")
            .arg(&alone),
    );
    assert_eq!(image_names(&alone), want);
    let diff = (&embeds["image_embeds"] - &read_safetensors(&alone)["image_embeds"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "max abs diff {diff}");
    // Distinct images give distinct rows: a shifted row would not match its file's.
    let first_two = (embeds["image_embeds"].get(0) - embeds["image_embeds"].get(1))
        .abs()
        .max()
        .double_value(&[]);
    assert!(first_two > 1e-4, "{first_two}");

    // Nothing usable at all is an error, and no file is written.
    let bad = d.join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(bad.join("a.jpg"), b"nope").expect("write");
    let none = d.join("none.safetensors");
    let failed = oxclip()
        .args(["embed", "--device", "cpu", "--checkpoint"])
        .arg(&run)
        .arg("--images")
        .arg(&bad)
        .arg("--out")
        .arg(&none)
        .output()
        .expect("runs");
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("none of the 1 image(s) could be used") && stderr.contains("a.jpg"),
        "{stderr}"
    );
    assert!(!none.exists());
}
