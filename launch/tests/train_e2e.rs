//! `oxclip data synth` + `oxclip train` end to end on real shards: metrics, TensorBoard
//! events read back, checkpoints, zero-shot evaluation, and exact resume after `kill -9`.

mod util;

use util::*;

#[test]
fn trains_logs_tensorboard_and_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 320, 48, 32);
    let config = tiny_config(
        dir.path(),
        &data,
        20,
        "  checkpoint_every: 10\n  keep_checkpoints: 1\n  eval_every: 10\n",
        true,
    );
    let out = run_ok(oxclip().args(["train", "--config"]).arg(&config));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed = printed_zero_shot(&stdout);

    let run = dir.path().join("run");
    assert!(run.join("config.yaml").is_file());
    // keep_checkpoints: 1 leaves only the last.
    assert_eq!(checkpoint_names(&run), vec!["step_20".to_string()]);
    for f in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        assert!(run.join("checkpoints/step_20").join(f).is_file(), "{f}");
    }

    let tb = read_tensorboard(&run.join("tensorboard"));
    for tag in [
        "train/loss",
        "train/contrastive_loss",
        "train/scale",
        "train/lr",
        "train/samples_per_second",
        "train/samples_per_second_per_gpu",
        "train/data_time",
        "train/batch_time",
        "val/synth-zeroshot-top1",
        "val/synth-zeroshot-top5",
        "val/image_to_text_R@1",
        "val/text_to_image_mean_rank",
    ] {
        assert!(tb.contains_key(tag), "missing {tag}; have {:?}", tb.keys().collect::<Vec<_>>());
    }
    let loss = &tb["train/loss"];
    assert_eq!(loss.len(), 10);
    assert_eq!(loss.last().map(|p| p.0), Some(20));
    let (first, last) = (loss[0].1, loss[loss.len() - 1].1);
    assert!(last < first, "loss did not fall: {first} -> {last}");
    assert_eq!(tb["val/synth-zeroshot-top1"].iter().map(|p| p.0).collect::<Vec<_>>(), vec![10, 20]);
    // The printed accuracy is the one logged at the last step, and the one `oxclip eval`
    // computes independently from the saved checkpoint on the same held-out images.
    let logged =
        (tb["val/synth-zeroshot-top1"][1].1 as f64, tb["val/synth-zeroshot-top5"][1].1 as f64);
    assert!(
        (printed.0 - 100.0 * logged.0).abs() < 0.051
            && (printed.1 - 100.0 * logged.1).abs() < 0.051,
        "printed {printed:?}, logged {logged:?}"
    );
    let eval = run_ok(
        oxclip()
            .args(["eval", "--json", "--device", "cpu", "--checkpoint"])
            .arg(&run)
            .arg("--zero-shot")
            .arg(data.join("val"))
            .arg("--classnames")
            .arg(data.join("classnames.txt"))
            .arg("--templates")
            .arg(data.join("templates.txt")),
    );
    let eval: serde_json::Value = serde_json::from_slice(&eval.stdout).expect("eval json");
    let zs = &eval["zero_shot"];
    assert_eq!(zs["samples"], 48, "{eval}");
    for (key, logged) in [("top1", logged.0), ("top5", logged.1)] {
        let computed = zs[key].as_f64().expect("a number");
        assert!(
            (computed - logged).abs() < 1e-6,
            "{key}: eval {computed}, training logged {logged}"
        );
    }

    let results = std::fs::read_to_string(run.join("results.jsonl")).expect("results.jsonl");
    let rows: Vec<serde_json::Value> =
        results.lines().map(|l| serde_json::from_str(l).expect("json row")).collect();
    assert!(rows.iter().any(|r| r["step"] == 20 && r.get("train/loss").is_some()));

    // Training over an existing run without --resume is refused, not silently overwritten.
    let again = oxclip().args(["train", "--config"]).arg(&config).output().expect("runs");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume auto"));
}

#[test]
fn resume_after_kill_9_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 320, 0, 32);
    let steps = 40;
    let extra = "  checkpoint_every: 4\n  keep_checkpoints: 20\n  eval_every: 0\n";
    let config = tiny_config(dir.path(), &data, steps, extra, false);
    // Log every batch's keys, to check what each run saw.
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("  workers: 2\n", "  workers: 2\n  log_keys: true\n  shuffle_buffer: 50\n"),
    )
    .expect("config");

    let straight = dir.path().join("straight");
    run_ok(oxclip().args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&straight));

    // Start the same run, kill -9 it once a checkpoint exists, resume.
    let killed = dir.path().join("killed");
    train_killed_then_resumed(&config, &killed, 8, steps);
    let last = format!("checkpoints/step_{steps}/model.safetensors");
    let diff = max_abs_diff(&straight.join(&last), &killed.join(&last));
    assert!(diff <= 1e-6, "resumed weights differ by {diff}");
    let opt = format!("checkpoints/step_{steps}/optimizer.safetensors");
    assert!(max_abs_diff(&straight.join(&opt), &killed.join(&opt)) <= 1e-6);

    // Both runs saw the same batches, and the interrupted one saw every sample of the first
    // epoch (320 samples / 16 per step = steps 1..=20) exactly once.
    let (a, b) = (keys_by_step(&straight, 0), keys_by_step(&killed, 0));
    assert!(a.values().chain(b.values()).all(|keys| keys.len() == 16));
    assert_eq!(a.len(), steps as usize);
    assert_eq!(a, b);
    let mut epoch0: Vec<&String> = (1..=20u64).flat_map(|s| &b[&s]).collect();
    assert_eq!(epoch0.len(), 320);
    epoch0.sort();
    epoch0.dedup();
    assert_eq!(epoch0.len(), 320, "a sample was served twice in the epoch");
}

#[test]
fn resume_from_a_given_checkpoint_and_init_from_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 160, 0, 32);
    let config =
        tiny_config(dir.path(), &data, 6, "  checkpoint_every: 3\n  eval_every: 0\n", false);
    let first = dir.path().join("first");
    run_ok(oxclip().args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&first));

    // --resume PATH continues from step 3 of the first run into a new directory.
    let second = dir.path().join("second");
    run_ok(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(&second)
            .arg("--resume")
            .arg(first.join("checkpoints/step_3")),
    );
    assert!(
        max_abs_diff(
            &first.join("checkpoints/step_6/model.safetensors"),
            &second.join("checkpoints/step_6/model.safetensors")
        ) <= 1e-6
    );

    // --init starts a fresh run from those weights: step 0's weights equal the file's.
    let third = dir.path().join("third");
    run_ok(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(&third)
            .arg("--init")
            .arg(first.join("checkpoints/step_6/model.safetensors"))
            .args(["--set", "train.steps=1", "--set", "optim.lr=0"]),
    );
    assert!(
        max_abs_diff(
            &first.join("checkpoints/step_6/model.safetensors"),
            &third.join("checkpoints/step_1/model.safetensors")
        ) <= 1e-6
    );
}

#[test]
fn a_locked_image_tower_does_not_move() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 64, 0, 32);
    let config = tiny_config(dir.path(), &data, 2, "  eval_every: 0\n", false);
    let first = dir.path().join("first");
    run_ok(oxclip().args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&first));
    let start = first.join("checkpoints/step_2/model.safetensors");
    let locked = dir.path().join("locked");
    run_ok(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(&locked)
            .arg("--init")
            .arg(&start)
            .args([
                "--set",
                "train.lock_image=true",
                "--set",
                "train.lock_image_unlocked_groups=1",
            ]),
    );
    let (a, b) = (
        read_safetensors(&start),
        read_safetensors(&locked.join("checkpoints/step_2/model.safetensors")),
    );
    for (name, t) in &a {
        let moved = (t - &b[name]).abs().max().double_value(&[]) > 0.0;
        // Only the image tower's last group (the projection) and the text side train.
        let trains = !name.starts_with("visual.") || name == "visual.proj";
        assert_eq!(moved, trains, "{name}");
    }
}

/// The default step (tiled loss, here 64 x 64 tiles, and gradient caching in micro-batches of
/// 32) trains to the weights of the naive oracle on whole batches of 128, for both losses.
#[test]
fn tiled_loss_and_micro_batches_train_to_the_weights_of_the_naive_whole_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 384, 0, 32);
    let config = tiny_config(dir.path(), &data, 3, "  eval_every: 0\n", false);
    let weights = "checkpoints/step_3/model.safetensors";
    for kind in ["clip", "siglip"] {
        let (tiled, naive) =
            (dir.path().join(format!("{kind}-tiled")), dir.path().join(format!("{kind}-naive")));
        let common = ["--set", "optim.lr=1e-4", "--set", "train.batch_size=128", "--set"];
        let kind_set = format!("loss.kind={kind}");
        run_ok(
            oxclip()
                .args(["train", "--config"])
                .arg(&config)
                .arg("--run-dir")
                .arg(&tiled)
                .args(common)
                .arg(&kind_set)
                .args(["--set", "loss.tile_size=64", "--set", "train.micro_batch_size=32"]),
        );
        run_ok(
            oxclip()
                .args(["train", "--config"])
                .arg(&config)
                .arg("--run-dir")
                .arg(&naive)
                .args(common)
                .arg(&kind_set)
                .args(["--set", "loss.naive=true"]),
        );
        let rel = max_rel_diff(&tiled.join(weights), &naive.join(weights));
        assert!(rel <= 1e-5, "{kind}: tiled with micro-batches and naive differ by {rel}");

        // SigLIP's bias is a parameter of the model, in the resolved config and the checkpoint.
        let resolved = std::fs::read_to_string(tiled.join("config.yaml")).expect("config.yaml");
        let tensors = read_safetensors(&tiled.join(weights));
        assert_eq!(resolved.contains("init_logit_bias: -10"), kind == "siglip", "{resolved}");
        assert_eq!(tensors.contains_key("logit_bias"), kind == "siglip");
        let logged = read_tensorboard(&tiled.join("tensorboard"));
        assert_eq!(
            logged.contains_key("train/logit_bias"),
            kind == "siglip",
            "{:?}",
            logged.keys()
        );
        if kind == "siglip" {
            let scale = tensors["logit_scale"].double_value(&[]);
            assert!(
                (scale - 10f64.ln()).abs() < 0.01,
                "SigLIP's logit_scale starts at ln 10, is {scale}"
            );
            let bias = logged["train/logit_bias"][0].1;
            assert!((bias + 10.0).abs() < 0.01, "SigLIP's logit_bias starts at -10, logged {bias}");
        }
    }
}

/// (top-1 %, top-5 %, images) from the `zero-shot NAME: top-1 X%, top-5 Y% on N held-out
/// images` line `train` prints at the end.
fn printed_zero_shot(stdout: &str) -> (f64, f64) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("zero-shot synth: top-1 "))
        .unwrap_or_else(|| panic!("no zero-shot line:\n{stdout}"));
    let numbers: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.trim_matches('.').parse().ok())
        .collect();
    // "top-1 X%, top-5 Y% on N": the 1 and 5 of the names come first.
    assert_eq!(numbers.len(), 5, "{line}");
    assert_eq!(numbers[4], 48.0, "{line}");
    (numbers[1], numbers[3])
}

fn checkpoint_names(run: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .expect("checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Resuming says where it started and how far it went; a finished run is left alone; the
/// config warning names the keys that changed, and extending `train.steps` is not one.
#[test]
fn resume_says_what_it_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 160, 0, 32);
    let config = tiny_config(dir.path(), &data, 10, "  eval_every: 0\n", false);
    let run = dir.path().join("run");
    run_ok(oxclip().args(["train", "--config"]).arg(&config));
    assert_eq!(checkpoint_names(&run), vec!["step_10"]);
    let written = std::fs::metadata(run.join("checkpoints/step_10/model.safetensors"))
        .expect("meta")
        .modified()
        .expect("mtime");

    // A finished run: nothing to train, exit 0, no NaN, nothing written.
    let out = run_ok(oxclip().args(["train", "--config"]).arg(&config).args(["--resume", "auto"]));
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("already at step 10 of 10; nothing to train"), "{stdout}");
    assert!(!stdout.contains("NaN") && !stderr.contains("NaN"), "{stdout}{stderr}");
    assert_eq!(checkpoint_names(&run), vec!["step_10"]);
    let after = std::fs::metadata(run.join("checkpoints/step_10/model.safetensors"))
        .expect("meta")
        .modified()
        .expect("mtime");
    assert_eq!(written, after, "the checkpoint was rewritten");

    // Extending the run, as the docs do: no warning.
    let out = run_ok(oxclip().args(["train", "--config"]).arg(&config).args([
        "--resume",
        "auto",
        "--set",
        "train.steps=14",
    ]));
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("resumed at step 10, trained 4 more (14 of 14)"), "{stdout}");
    assert!(!stderr.contains("differs"), "{stderr}");

    // Another learning rate: named, with both values; the extension still is not.
    let out = run_ok(oxclip().args(["train", "--config"]).arg(&config).args([
        "--resume",
        "auto",
        "--set",
        "train.steps=16",
        "--set",
        "optim.lr=0.002",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("differs from the checkpoint's: optim.lr: 0.001 -> 0.002"), "{stderr}");
    assert!(!stderr.contains("train.steps"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("resumed at step 14, trained 2 more (16 of 16)"));
}

/// Patch dropout on (issue 24): `kill -9` after a checkpoint and `--resume auto` end with the
/// weights and optimizer state of the uninterrupted run, bit for bit (the draws are a function
/// of the seed, the step and the sample, not of libtorch's generator); patch dropout really
/// changed the training; and a final unmasked phase, resumed with
/// `train.force_patch_dropout: 0`, is allowed and named as a change.
#[test]
fn resume_after_kill_9_with_patch_dropout_is_bit_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 320, 0, 32);
    let steps = 24;
    let extra = concat!(
        "  force_patch_dropout: 0.5\n",
        "  checkpoint_every: 4\n  keep_checkpoints: 20\n  eval_every: 0\n"
    );
    let config = tiny_config(dir.path(), &data, steps, extra, false);

    let straight = dir.path().join("straight");
    let out =
        run_ok(oxclip().args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&straight));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("patch dropout 0.5 (train.force_patch_dropout)"), "{said}");
    let unmasked = dir.path().join("unmasked");
    run_ok(
        oxclip()
            .args(["train", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(&unmasked)
            .args(["--set", "train.force_patch_dropout=0"]),
    );

    let killed = dir.path().join("killed");
    train_killed_then_resumed(&config, &killed, 4, steps);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let last = format!("checkpoints/step_{steps}/{file}");
        let (a, b) =
            (read_safetensors(&straight.join(&last)), read_safetensors(&killed.join(&last)));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, t) in &a {
            assert!(t.equal(&b[name]), "{file}: {name} differs from the uninterrupted run's");
        }
    }
    let last = format!("checkpoints/step_{steps}/model.safetensors");
    let moved = max_rel_diff(&straight.join(&last), &unmasked.join(&last));
    assert!(moved > 1e-4, "patch dropout changed the weights by only {moved:.1e}");

    // The final unmasked phase: 4 more steps without patch dropout.
    let out = run_ok(
        oxclip().args(["train", "--config"]).arg(&config).arg("--run-dir").arg(&straight).args([
            "--resume",
            "auto",
            "--set",
            "train.steps=28",
            "--set",
            "train.force_patch_dropout=0",
        ]),
    );
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("resumed at step 24, trained 4 more (28 of 28)"), "{stdout}");
    assert!(stderr.contains("train.force_patch_dropout: 0.5 -> 0"), "{stderr}");
    assert!(!stderr.contains("patch dropout 0.5 ("), "{stderr}");
}

/// A CoCa (the built-in tiny-coca) trained with `loss.kind: coca`: both parts of the loss are
/// logged as open_clip names them and sum to train/loss, the caption loss falls, zero-shot
/// evaluation runs on the contrastive towers, and `oxclip caption` captions from the run.
#[test]
fn coca_trains_with_its_caption_loss_and_captions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 160, 16, 32);
    let config = tiny_config(dir.path(), &data, 16, "  eval_every: 16\n", true);
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replace("model: tiny\n", "model: tiny-coca\nloss:\n  kind: coca\n");
    std::fs::write(&config, text).expect("write config");
    run_ok(oxclip().args(["train", "--config"]).arg(&config));

    let run = dir.path().join("run");
    let tb = read_tensorboard(&run.join("tensorboard"));
    for tag in
        ["train/loss", "train/contrastive_loss", "train/caption_loss", "val/synth-zeroshot-top1"]
    {
        assert!(tb.contains_key(tag), "missing {tag}; have {:?}", tb.keys().collect::<Vec<_>>());
    }
    for ((total, contrastive), caption) in
        tb["train/loss"].iter().zip(&tb["train/contrastive_loss"]).zip(&tb["train/caption_loss"])
    {
        let sum = contrastive.1 + caption.1;
        assert!(
            (total.1 - sum).abs() <= 1e-4 * total.1.abs(),
            "step {}: {total:?} vs {sum}",
            total.0
        );
    }
    let caption = &tb["train/caption_loss"];
    let (first, last) = (caption[0].1, caption[caption.len() - 1].1);
    assert!(last < first, "the caption loss did not fall: {first} -> {last}");

    let images = dir.path().join("images");
    std::fs::create_dir(&images).expect("mkdir");
    for (i, color) in [[220u8, 30, 30], [30, 200, 40], [20, 40, 230]].into_iter().enumerate() {
        let img = image::RgbImage::from_fn(40, 36, |x, y| {
            image::Rgb([color[0] ^ (x as u8 * 3), color[1], color[2] ^ (y as u8 * 5)])
        });
        img.save(images.join(format!("{i}.png"))).expect("png");
    }
    let caption = |checkpoint: &std::path::Path| {
        let out = run_ok(
            oxclip()
                .args(["caption", "--device", "cpu", "--json", "--seq-len", "8", "--checkpoint"])
                .arg(checkpoint)
                .arg("--image")
                .arg(&images),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let stdout = caption(&run);
    let lines: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for line in &lines {
        let ids = line["ids"].as_array().expect("ids");
        assert_eq!(ids.first().and_then(|v| v.as_i64()), Some(49406), "{line}");
        assert!(ids.len() <= 8, "{line}");
    }

    // Exported as an open_clip hub directory, it captions as the run does, no --model needed;
    // transformers has no CoCa, so a Hugging Face export is refused and writes nothing.
    let exported = dir.path().join("exported");
    run_ok(
        oxclip()
            .args(["export", "--format", "open_clip", "--checkpoint"])
            .arg(&run)
            .arg("--out")
            .arg(&exported),
    );
    assert_eq!(caption(&exported), stdout);
    let hf = dir.path().join("hf");
    let refused = oxclip()
        .args(["export", "--format", "hf", "--checkpoint"])
        .arg(&run)
        .arg("--out")
        .arg(&hf)
        .output()
        .expect("runs");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("transformers has no CoCa"));
    assert!(!hf.exists(), "a refused export leaves nothing behind");

    // A CLIP model is not a captioner, and a CoCa model trains with its caption loss only.
    let clip = dir.path().join("clip.yaml");
    std::fs::write(
        &clip,
        std::fs::read_to_string(&config)
            .expect("config")
            .replace("model: tiny-coca\n", "model: tiny\n")
            .replace("/run\n", "/run-clip\n"),
    )
    .expect("write");
    let refused = oxclip().args(["train", "--config"]).arg(&clip).output().expect("runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("loss.kind coca") && stderr.contains("multimodal_cfg"), "{stderr}");
}
