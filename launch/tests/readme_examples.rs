//! The README's "Using it" block, run line by line as a user would, from a copy of the
//! repository's `configs/` in a temporary directory, with the real `oxclip` on PATH.
//!
//! Sizes are shrunk (fewer samples and steps) so that the whole block runs in a minute or two:
//! the example configs' step counts are rewritten in the copy, and each line gets the
//! substitutions of `SMALLER`. Every substitution must apply somewhere, so a README edit that
//! drops one fails here instead of silently running at full size. Lines marked as needing a
//! GPU and the `tensorboard` line (not ours) are the only ones skipped.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

/// Substitutions applied to README lines: (as written, as the test runs it).
const SMALLER: &[(&str, &str)] = &[
    ("--samples 4000 --val-samples 480", "--samples 256 --val-samples 48"),
    ("--set train.steps=300", "--set train.steps=6"),
    (
        "train.batch_size=1024 --set train.micro_batch_size=64",
        "train.batch_size=32 --set train.micro_batch_size=8",
    ),
    ("--batch-size 64 --steps 10", "--batch-size 8 --steps 2"),
    ("--batch 16384", "--batch 512"),
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("launch/ has a parent").to_path_buf()
}

/// The shell lines of the first ```sh block after `## Using it`, with their comments.
fn using_it_lines(readme: &str) -> Vec<String> {
    let section = readme.split("## Using it").nth(1).expect("README has a `## Using it` section");
    let block = section.split("```sh\n").nth(1).expect("a ```sh block in `## Using it`");
    let block = block.split("```").next().expect("the block ends");
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Rewrites an example config's sizes in place: a handful of steps, small batches.
fn shrink_example(path: &Path) {
    let text = std::fs::read_to_string(path).expect("read example");
    let mut cfg: serde_yaml::Value = serde_yaml::from_str(&text).expect("example parses");
    let train = cfg.get_mut("train").and_then(|t| t.as_mapping_mut()).expect("a train section");
    // The two-rank example keeps the others' global batch.
    let per_rank = if path.ends_with("two-ranks.yaml") { 8 } else { 16 };
    for (key, value) in [
        ("steps", 4),
        ("eval_every", 2),
        ("checkpoint_every", 2),
        ("log_every", 1),
        ("batch_size", per_rank),
    ] {
        train.insert(key.into(), value.into());
    }
    std::fs::write(path, serde_yaml::to_string(&cfg).expect("yaml")).expect("write example");
}

#[test]
fn readme_using_it_block_runs_as_written_at_small_sizes() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let lines = using_it_lines(&readme);
    assert!(lines.len() >= 15, "the block shrank to {} lines: {lines:?}", lines.len());

    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&repo_root().join("configs"), &dir.path().join("configs"));
    let examples: Vec<PathBuf> = std::fs::read_dir(dir.path().join("configs/examples"))
        .expect("configs/examples")
        .map(|e| e.expect("entry").path())
        .collect();
    for example in &examples {
        shrink_example(example);
    }

    let bin_dir = Path::new(env!("CARGO_BIN_EXE_oxclip")).parent().expect("bin dir").to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut used = vec![false; SMALLER.len()];
    let mut ran = 0;
    for line in &lines {
        if line.contains("needs a GPU") || line.starts_with("tensorboard ") {
            continue;
        }
        // The PATH line points at the repository's build; the test's PATH already has it.
        if line.starts_with("export PATH=") {
            continue;
        }
        let mut command = line.clone();
        for (i, (from, to)) in SMALLER.iter().enumerate() {
            if command.contains(from) {
                command = command.replace(from, to);
                used[i] = true;
            }
        }
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &command])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("OXCLIP_LOG", "warn")
            .output()
            .expect("bash runs");
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "README line failed:\n  {line}\nran as:\n  {command}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{line}:\n{stderr}");
        ran += 1;
    }
    for ((from, _), used) in SMALLER.iter().zip(&used) {
        assert!(used, "`{from}` is no longer in the README block: update SMALLER");
    }
    assert!(ran >= 15, "only {ran} lines ran");

    // What the lines were meant to leave behind.
    let d = dir.path();
    for file in [
        "runs/pretrain/checkpoints/step_6/model.safetensors",
        "runs/bigbatch/checkpoints/step_4/model.safetensors",
        "runs/siglip/checkpoints/step_4/model.safetensors",
        "runs/two-ranks/checkpoints/step_4/model.safetensors",
        "runs/finetune/checkpoints/step_4/model.safetensors",
        "exported/hf/config.json",
        "exported/open_clip/open_clip_config.json",
        "embeds.safetensors",
        "val.index",
        "shards/index.json",
    ] {
        assert!(d.join(file).is_file(), "{file} was not written");
    }
    let siglip = read_safetensors(&d.join("runs/siglip/checkpoints/step_4/model.safetensors"));
    assert!(siglip.contains_key("logit_bias"), "the SigLIP example trained without a logit_bias");
    let embeds = read_safetensors(&d.join("embeds.safetensors"));
    assert_eq!(embeds["image_embeds"].size()[0], 48, "one embedding per extracted photo");
}
