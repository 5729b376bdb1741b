//! Shared helpers for the end-to-end tests: run the real `oxclip` binary in a temporary
//! directory, read TensorBoard event files back, compare safetensors files.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn oxclip() -> Command {
    Command::new(env!("CARGO_BIN_EXE_oxclip"))
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("oxclip runs");
    assert!(
        out.status.success(),
        "{:?} failed\nstdout:\n{}\nstderr:\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `oxclip bench train` on the tiny model, batch 4, one CPU thread, `steps` timed steps after
/// `warmup`, with `extra` flags: its one JSON line.
pub fn bench_train_tiny(steps: u32, warmup: u32, extra: &[&str]) -> serde_json::Value {
    let (steps, warmup) = (steps.to_string(), warmup.to_string());
    let out = run_ok(
        oxclip()
            .args(["bench", "train", "--model", "tiny", "--batch-size", "4", "--steps", &steps])
            .args(["--warmup", &warmup, "--device", "cpu", "--threads", "1"])
            .args(extra),
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

/// `ranks` `oxclip` processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
/// MASTER_PORT on a free port), each given its arguments by `args`, with `fault` (a test
/// build's `OXCLIP_FAULT` spec) or none; stdout dropped, stderr kept. Every rank's output,
/// once all have exited.
pub fn torchrun_ranks(
    ranks: usize,
    fault: Option<&str>,
    args: impl Fn(&mut Command),
) -> Vec<Output> {
    let port = free_port();
    let children: Vec<_> = (0..ranks)
        .map(|rank| {
            let mut cmd = oxclip();
            args(&mut cmd);
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", ranks.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env_remove("OXCLIP_FAULT")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            if let Some(fault) = fault {
                cmd.env("OXCLIP_FAULT", fault);
            }
            cmd.spawn().expect("rank starts")
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().expect("rank ends")).collect()
}

/// Writes synthetic shards once per test directory.
pub fn synth(dir: &Path, samples: u64, val_samples: u64, image_size: u32) -> PathBuf {
    let out = dir.join("synth");
    run_ok(oxclip().args(["data", "synth", "--out"]).arg(&out).args([
        "--samples",
        &samples.to_string(),
        "--val-samples",
        &val_samples.to_string(),
        "--image-size",
        &image_size.to_string(),
        "--shard-size",
        "100",
    ]));
    out
}

/// A run config for the tiny model on synthetic shards, with zero-shot evaluation on the
/// held-out split when `zero_shot` is set.
pub fn tiny_config(
    dir: &Path,
    synth: &Path,
    steps: u64,
    extra_train: &str,
    zero_shot: bool,
) -> PathBuf {
    let val = if zero_shot {
        format!(
            "  val: {val}\n  val_name: synth\n  classnames: {classes}\n  templates: {templates}\n",
            val = synth.join("val").display(),
            classes = synth.join("classnames.txt").display(),
            templates = synth.join("templates.txt").display(),
        )
    } else {
        String::new()
    };
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: {train}\n{val}  workers: 2\ntrain:\n  batch_size: 16\n  steps: {steps}\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 2\n{extra_train}optim:\n  lr: 1.0e-3\n  warmup_steps: 3\n",
        run = dir.join("run").display(),
        train = synth.join("train").display(),
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Every scalar in the TensorBoard event files of `dir`: tag -> [(step, value)].
pub fn read_tensorboard(dir: &Path) -> BTreeMap<String, Vec<(i64, f32)>> {
    use protobuf::Message;
    let mut scalars: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("tensorboard dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("events.out.tfevents"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no event files in {}", dir.display());
    for file in files {
        let bytes = std::fs::read(&file).expect("read events");
        let mut pos = 0;
        // TFRecord framing: u64 length, u32 length crc, data, u32 data crc.
        while pos + 12 <= bytes.len() {
            let len = u64::from_le_bytes(bytes[pos..pos + 8].try_into().expect("8 bytes")) as usize;
            let data = &bytes[pos + 12..pos + 12 + len];
            pos += 12 + len + 4;
            let event =
                tensorboard_proto::event::Event::parse_from_bytes(data).expect("event parses");
            for value in event.get_summary().get_value() {
                scalars
                    .entry(value.get_tag().to_string())
                    .or_default()
                    .push((event.get_step(), value.get_simple_value()));
            }
        }
    }
    scalars
}

pub fn read_safetensors(path: &Path) -> BTreeMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Largest absolute difference between two state dicts with the same keys.
pub fn max_abs_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (read_safetensors(a), read_safetensors(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter().map(|(k, t)| (t - &b[k]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

/// `max |a - b| / max |b|` over every parameter of two state dicts with the same keys.
pub fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (read_safetensors(a), read_safetensors(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let diff = a.iter().map(|(k, t)| (t - &b[k]).abs().max().double_value(&[])).fold(0.0, f64::max);
    let scale = b.values().map(|t| t.abs().max().double_value(&[])).fold(0.0, f64::max);
    diff / scale.max(1e-12)
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A connection to `port` on loopback once something listens there (a rank 0 starting up),
/// retried for up to `within`.
pub fn connect_when_listening(port: u16, within: Duration) -> std::net::TcpStream {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            return stream;
        }
        assert!(Instant::now() < deadline, "rank 0 never listened on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `oxclip launch --nproc-per-node NPROC [FLAGS] --master-port FREE --`: the command to append
/// the ranks' subcommand to.
pub fn launcher(nproc: usize, flags: &[&str]) -> Command {
    let mut cmd = oxclip();
    cmd.args(["launch", "--nproc-per-node", &nproc.to_string()]).args(flags).args([
        "--master-port",
        &free_port().to_string(),
        "--",
    ]);
    cmd
}

/// The keys each step of a run with `data.log_keys` saw on `rank`, from `RUN/keys-rank{rank}.tsv`;
/// a step logged twice (repeated after a resume) counts with its last line.
pub fn keys_by_step(run: &Path, rank: usize) -> BTreeMap<u64, Vec<String>> {
    let text = std::fs::read_to_string(run.join(format!("keys-rank{rank}.tsv"))).expect("key log");
    let mut steps = BTreeMap::new();
    for line in text.lines() {
        let (step, keys) = line.split_once('\t').expect("step<TAB>keys");
        let keys: Vec<String> = keys.split(' ').map(String::from).collect();
        steps.insert(step.parse::<u64>().expect("step"), keys);
    }
    steps
}

/// `oxclip train --config CONFIG --run-dir RUN`, killed with SIGKILL once the checkpoint of
/// step `kill_at` exists (before step `steps` does), then resumed with `--resume auto` to the end.
pub fn train_killed_then_resumed(config: &Path, run: &Path, kill_at: u64, steps: u64) {
    let train = || {
        let mut cmd = oxclip();
        cmd.args(["train", "--config"]).arg(config).arg("--run-dir").arg(run);
        cmd
    };
    let mut child = train()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawns");
    let checkpoint = run.join(format!("checkpoints/step_{kill_at}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !checkpoint.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
    child.wait().expect("reaped");
    assert!(checkpoint.exists(), "no checkpoint of step {kill_at} before the deadline");
    assert!(
        !run.join(format!("checkpoints/step_{steps}")).exists(),
        "the run finished before it was killed"
    );
    run_ok(train().args(["--resume", "auto"]));
}

/// `oxclip bench loader` over `data` with 2 workers, batch 8, 32-pixel images, `samples`
/// samples: its one JSON line.
pub fn bench_loader(data: &str, samples: u32) -> serde_json::Value {
    let samples = samples.to_string();
    let out = run_ok(oxclip().args(["bench", "loader", "--data", data, "--workers", "2"]).args([
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--samples",
        &samples,
    ]));
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

/// Child processes of `pid`, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: the comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            kids.push(child);
        }
    }
    kids
}

/// The process among the launcher's children whose environment says `RANK=rank`.
pub fn rank_pid(launcher: u32, rank: usize) -> u32 {
    let want = format!("RANK={rank}");
    let found = children(launcher).into_iter().find(|pid| {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        environ.split(|&b| b == 0).any(|var| var == want.as_bytes())
    });
    found.unwrap_or_else(|| panic!("no rank {rank} among the children of {launcher}"))
}

/// Sends `sig` (`-TERM`, `-KILL`, ...) to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    assert!(std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success());
}

/// `oxclip train --config CONFIG` as rank `rank` of a `world`-rank job started by hand, as
/// torchrun would (rank 0 serving on loopback `port`, every rank given the job token
/// `token`), logging at info; stdout dropped, stderr piped.
pub fn train_as_rank(config: &Path, rank: usize, world: usize, port: u16, token: &str) -> Command {
    let mut cmd = oxclip();
    cmd.args(["train", "--config"])
        .arg(config)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OXCLIP_RDZV_TOKEN", token)
        .env("OXCLIP_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// A checkpoint's `trainer_state.json` without the resolved config, which names the run
/// folder: what two runs into different folders must agree on.
pub fn trainer_state(step_dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(step_dir.join("trainer_state.json")).expect("state");
    let mut state: serde_json::Value = serde_json::from_str(&text).expect("json");
    state.as_object_mut().expect("object").remove("config");
    state
}
