//! A shard whose reads stall (a `pipe:` command that writes part of a shard, then hangs, as a
//! stalled object store does) becomes a `stalled_shard` skip after `data.read_timeout_s`: the
//! run goes on, every sample of the other shards is seen in the epoch, the hung command is
//! killed, and `data stats` counts the stall once.

mod util;

use std::collections::BTreeSet;
use std::time::Instant;

use util::*;

#[test]
fn a_pipe_shard_that_hangs_is_skipped_as_stalled_and_the_epoch_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 4 shards of 100 samples; the fourth is read through a command that delivers its first
    // 5000 bytes and never ends (the `sleep` it leaves holds the pipe open).
    let data = synth(dir.path(), 400, 0, 32);
    let shards = data.join("train");
    let hang = format!("sleep 100000 & head -c 5000 {}/00003.tar", shards.display());
    let spec = format!("{}/{{00000..00002}}.tar :: pipe:{hang}", shards.display());
    let sizes = dir.path().join("sizes.json");
    std::fs::write(&sizes, r#"{"00003.tar": 100}"#).expect("sizes");

    // `data stats`: the stall counts once, and the other shards' samples are all usable.
    let started = Instant::now();
    let out =
        run_ok(oxclip().args(["data", "stats", "--json", "--read-timeout-s", "1"]).arg(&spec));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    eprintln!("data stats with a stalled shard: {:?}", started.elapsed());
    assert_eq!(stats["skipped"], serde_json::json!({"stalled_shard": 1}), "{stats}");
    assert_eq!(stats["shards"], 3, "{stats}");
    assert_eq!(stats["samples"], 300, "{stats}");

    // Training: 19 steps of 16 go past the epoch's ~300 usable samples.
    let config = dir.path().join("run.yaml");
    let run = dir.path().join("run");
    std::fs::write(
        &config,
        format!(
            "run_dir: {run}\nmodel: tiny\ndata:\n  train: '{spec}'\n  shard_sizes: {sizes}\n  workers: 2\n  shuffle_buffer: 50\n  log_keys: true\n  read_timeout_s: 1\ntrain:\n  batch_size: 16\n  steps: 19\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 5\n  checkpoint_every: 0\n  eval_every: 0\noptim:\n  lr: 1.0e-3\n  warmup_steps: 3\n",
            run = run.display(),
            sizes = sizes.display(),
        ),
    )
    .expect("config");
    let started = Instant::now();
    let out = run_ok(oxclip().args(["train", "--config"]).arg(&config));
    eprintln!("19 steps with a stalled shard: {:?}", started.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no byte for 1 s (data.read_timeout_s): the command was killed"),
        "{stderr}"
    );
    // The run's count of skips by reason: the stalled shard's samples not delivered (and the
    // one sample whose members the stall cut in two, as a truncation would: missing_caption).
    let counted = stderr
        .lines()
        .find_map(|l| l.split("sample(s) skipped (").nth(1))
        .unwrap_or_else(|| panic!("no count of skips: {stderr}"));
    let counts: Vec<(&str, u64)> = counted
        .trim_end_matches(')')
        .split(", ")
        .map(|c| c.split_once(": ").map(|(r, n)| (r, n.parse().expect("count"))).expect("r: n"))
        .collect();
    let stalled = counts.iter().find(|(r, _)| *r == "stalled_shard").map(|c| c.1);
    assert!(stalled.is_some_and(|n| n >= 90), "{counted}");
    assert!(
        counts.iter().all(|(r, n)| *r == "stalled_shard" || (*r == "missing_caption" && *n == 1)),
        "{counted}"
    );

    // Every sample of the three file shards is seen, each once within epoch 0 (the first
    // 18 steps hold 288 of its samples; the 19th starts epoch 1).
    let keys = std::fs::read_to_string(run.join("keys-rank0.tsv")).expect("key log");
    let mut seen = BTreeSet::new();
    let mut epoch0 = Vec::new();
    for line in keys.lines() {
        let (step, served) = line.split_once('\t').expect("step<TAB>keys");
        let step: u64 = step.parse().expect("step number");
        for key in served.split(' ') {
            seen.insert(key.to_owned());
            if step <= 18 {
                epoch0.push(key.to_owned());
            }
        }
    }
    let distinct: BTreeSet<&String> = epoch0.iter().collect();
    assert_eq!(distinct.len(), epoch0.len(), "a sample was served twice in epoch 0");
    // synth names samples by their index: shards 0-2 hold 0..300.
    let missing: Vec<String> =
        (0..300).map(|i| format!("{i:09}")).filter(|k| !seen.contains(k)).collect();
    assert!(missing.is_empty(), "not seen: {missing:?}");
    let piped = seen.iter().filter(|k| k.as_str() >= "000000300").count();
    assert!(piped < 100, "{piped} samples of the stalled shard seen");
}
