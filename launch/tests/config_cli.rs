//! The config is resolved and checked in one place: `oxclip config show` and `oxclip train`
//! refuse the same bad configs with the same first error line, and `train` refuses them
//! before any work (no run directory).

mod util;

use util::*;

const GOOD: &str = "run_dir: run\nmodel: tiny\ndata:\n  train: synthetic:64\ntrain:\n  steps: 2\n  batch_size: 4\n  device: cpu\n";

/// `(name, config text, what the first error line must name)`.
fn bad_configs() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let tiny: String = include_str!("../../configs/models/tiny.yaml")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("  {l}\n"))
        .collect();
    let inline = GOOD.replace("model: tiny\n", &format!("model:\n{tiny}"));
    vec![
        (
            "bad YAML",
            "run_dir: run\nmodel: tiny\ndata: [synthetic:64\ntrain:\n  steps: 2\n".into(),
            vec!["line"],
        ),
        (
            "unknown key",
            GOOD.replace("  steps: 2\n", "  steps: 2\n  bach_size: 4\n"),
            vec!["train", "bach_size", "line 7"],
        ),
        ("unknown section", format!("{GOOD}optimizer: {{}}\n"), vec!["optimizer", "line 9"]),
        ("bad value type", GOOD.replace("steps: 2", "steps: ten"), vec!["train.steps", "line 6"]),
        (
            "batch_size 0",
            GOOD.replace("batch_size: 4", "batch_size: 0"),
            vec!["train.batch_size must be at least 1"],
        ),
        ("steps 0", GOOD.replace("steps: 2", "steps: 0"), vec!["train.steps must be at least 1"]),
        (
            "micro-batch over the batch",
            format!("{GOOD}  micro_batch_size: 8\n"),
            vec!["train.micro_batch_size (8) exceeds train.batch_size (4)"],
        ),
        ("unknown device", GOOD.replace("device: cpu", "device: tpu"), vec!["tpu"]),
        (
            "negative lr",
            format!("{GOOD}optim:\n  lr: -0.1\n"),
            vec!["optim.lr must be a non-negative number, got -0.1"],
        ),
        (
            "beta out of range",
            format!("{GOOD}optim:\n  betas: [0.9, 1.5]\n"),
            vec!["optim.betas[1]"],
        ),
        (
            "cooldown longer than the run",
            format!("{GOOD}optim:\n  schedule: const-cooldown\n  cooldown_steps: 5\n"),
            vec!["optim.cooldown_steps (5) exceeds train.steps (2)"],
        ),
        (
            "unknown model",
            GOOD.replace("model: tiny", "model: ViT-Q-7"),
            vec!["ViT-Q-7", "oxclip model list"],
        ),
        (
            "typo inside an inline model",
            inline.replace("  patch_size:", "  patch_sise:"),
            vec!["model.vision_cfg.patch_sise: unknown field `patch_sise`", "line 8"],
        ),
        (
            "invalid inline model",
            inline.replace("patch_size: 8", "patch_size: 7"),
            vec!["patch_size"],
        ),
        (
            "loss tiling zero",
            format!("{GOOD}loss:\n  tiling: 0\n"),
            vec!["loss.tiling: a tile side must be positive", "line 10"],
        ),
        (
            "loss tiling word",
            format!("{GOOD}loss:\n  tiling: tiled\n"),
            vec!["loss.tiling", "`auto`, `naive` or a tile side"],
        ),
        (
            "loss tiling with the old keys",
            format!("{GOOD}loss:\n  tiling: 64\n  naive: true\n"),
            vec!["loss: `tiling` replaces `tile_size` and `naive`: give `tiling` alone"],
        ),
        ("unknown loss", format!("{GOOD}loss:\n  kind: sigmoid\n"), vec!["loss.kind", "sigmoid"]),
        (
            "zero image_std",
            GOOD.replace(
                "  train: synthetic:64\n",
                "  train: synthetic:64\n  image_std: [0.5, 0, 0.5]\n",
            ),
            vec!["data.image_std"],
        ),
        (
            "missing tokenizer",
            GOOD.replace(
                "  train: synthetic:64\n",
                "  train: synthetic:64\n  tokenizer: no/such/tokenizer.json\n",
            ),
            vec!["data.tokenizer", "no/such/tokenizer.json"],
        ),
    ]
}

/// The first line of stderr, which must be the error.
fn first_error_line(args: &[&str], dir: &std::path::Path) -> String {
    let out = oxclip().current_dir(dir).args(args).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    let first = stderr.lines().next().unwrap_or_default().to_owned();
    assert!(first.starts_with("error: "), "{args:?}: the first line is not the error:\n{stderr}");
    first
}

#[test]
fn config_show_and_train_refuse_the_same_configs_with_the_same_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("good.yaml"), GOOD).expect("write");
    run_ok(oxclip().current_dir(dir.path()).args(["config", "show", "--config", "good.yaml"]));
    for (name, text, needles) in bad_configs() {
        std::fs::write(dir.path().join("bad.yaml"), &text).expect("write");
        let shown = first_error_line(&["config", "show", "--config", "bad.yaml"], dir.path());
        let trained = first_error_line(&["train", "--config", "bad.yaml"], dir.path());
        assert_eq!(shown, trained, "{name}: `config show` and `train` disagree");
        for needle in needles {
            assert!(shown.contains(needle), "{name}: `{needle}` not in: {shown}");
        }
        assert!(shown.contains("bad.yaml"), "{name}: the file is not named: {shown}");
        assert!(
            !dir.path().join("run").exists(),
            "{name}: train started work before refusing the config"
        );
    }
}

/// `--set` overrides and `train`'s own flags go through the same checks.
#[test]
fn overrides_and_flags_are_checked_as_the_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("good.yaml"), GOOD).expect("write");
    let set = ["--config", "good.yaml", "--set", "optim.lr=-1"];
    let shown = first_error_line(&[&["config", "show"][..], &set[..]].concat(), dir.path());
    let trained = first_error_line(&[&["train"][..], &set[..]].concat(), dir.path());
    assert_eq!(shown, trained);
    assert!(shown.contains("optim.lr must be a non-negative number"), "{shown}");
    let threads =
        first_error_line(&["train", "--config", "good.yaml", "--threads", "0"], dir.path());
    assert!(threads.contains("train.threads must be at least 1"), "{threads}");
    assert!(!dir.path().join("run").exists());
}
