//! The chaos soak: a 2-rank `oxclip launch` run on shards (CPU backend) is hit, at steps drawn
//! from a seed, by one fault after another: SIGKILL to a rank, SIGKILL to the launcher, SIGTERM
//! to a rank, SIGTERM to the launcher, or a damaged newest checkpoint (the job stopped by a
//! SIGKILL to a rank, then a checkpoint file cut short, as a full disk or a cut copy leaves
//! it). After each, the same command is run again with `--resume auto`. At the end the
//! weights, the optimizer state, the loader positions and every batch each rank saw equal an
//! uninterrupted run's, bit for bit.
//!
//! `make test` runs a short soak: one fault of each kind over 30 steps. The long one is
//! `scripts/chaos-soak.sh` (the same test with `OXCLIP_CHAOS_STEPS`, `OXCLIP_CHAOS_FAULTS`
//! and `OXCLIP_CHAOS_SEED` raised); both print how many faults of each kind the run survived.

mod util;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use util::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillRank,
    KillLauncher,
    TermRank,
    TermLauncher,
    DamageCheckpoint,
}

const KINDS: [Fault; 5] = [
    Fault::KillRank,
    Fault::KillLauncher,
    Fault::TermRank,
    Fault::TermLauncher,
    Fault::DamageCheckpoint,
];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A tiny model on 4 synthetic shards, 2 ranks of batch 4, a checkpoint every 3 steps, every
/// batch's keys logged.
fn config(dir: &Path, steps: u64) -> PathBuf {
    let data = synth(dir, 400, 0, 32);
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: {train}\n  workers: 2\n  log_keys: true\n  shuffle_buffer: 40\ntrain:\n  batch_size: 4\n  steps: {steps}\n  seed: 11\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 1\n  checkpoint_every: 3\n  keep_checkpoints: 4\n  eval_every: 0\noptim:\n  lr: 1.0e-3\n  warmup_steps: 3\ndist:\n  backend: cpu\n  timeout_s: 60\n",
        run = dir.join("run").display(),
        train = data.join("train").display(),
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A running launcher and the last step its rank 0 logged.
struct Job {
    launcher: Child,
    step: Arc<AtomicU64>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Job {
    fn start(config: &Path, run: &Path, steps: u64) -> Job {
        let mut launcher = launcher(2, &["--grace-s", "5"])
            .args(["train", "--config"])
            .arg(config)
            .arg("--run-dir")
            .arg(run)
            .args(["--resume", "auto"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("launcher starts");
        let step = Arc::new(AtomicU64::new(0));
        let marker = format!("/{steps} epoch");
        let mut readers = Vec::new();
        let pipes: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(launcher.stdout.take().expect("stdout")),
            Box::new(launcher.stderr.take().expect("stderr")),
        ];
        for pipe in pipes {
            let (step, marker) = (Arc::clone(&step), marker.clone());
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    // "[rank 0] ... step 7/30 epoch 0 | loss ..."
                    let Some((head, _)) = line.split_once(&marker) else { continue };
                    if !line.starts_with("[rank 0]") {
                        continue;
                    }
                    let digits = head.rsplit(' ').next().unwrap_or_default();
                    if let Ok(n) = digits.parse::<u64>() {
                        step.fetch_max(n, Ordering::SeqCst);
                    }
                }
            }));
        }
        Job { launcher, step, readers }
    }

    /// Waits until rank 0 has logged step `step`; false if the launcher exited first.
    fn reach(&mut self, step: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.step.load(Ordering::SeqCst) < step {
            if self.launcher.try_wait().expect("launcher status").is_some() {
                return false;
            }
            assert!(Instant::now() < deadline, "step {step} never came");
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn end(mut self) -> std::process::ExitStatus {
        let status = self.launcher.wait().expect("launcher ends");
        for reader in self.readers {
            let _ = reader.join();
        }
        status
    }
}

/// Waits until no process in `pids` is left (the ranks of a launcher killed with SIGKILL get
/// SIGTERM from the kernel, checkpoint and stop).
fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while pids.iter().any(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
        // A zombie has no command line; it is gone but for its parent's wait.
        let alive = pids
            .iter()
            .any(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()));
        if !alive {
            return;
        }
        assert!(Instant::now() < deadline, "ranks {pids:?} outlived their launcher");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Cuts the newest complete checkpoint's weights in half, as a full disk would leave them.
fn damage_newest_checkpoint(run: &Path) -> Option<PathBuf> {
    let newest = std::fs::read_dir(run.join("checkpoints"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step_")?.parse::<u64>().ok()?;
            e.path().join("manifest.json").exists().then_some((step, e.path()))
        })
        .max()?
        .1;
    let weights = newest.join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("weights");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("cut short");
    Some(newest)
}

#[test]
fn a_run_hit_by_every_kind_of_fault_ends_as_if_never_stopped() {
    let steps = env_number("OXCLIP_CHAOS_STEPS", 30);
    let faults = env_number("OXCLIP_CHAOS_FAULTS", KINDS.len() as u64).max(KINDS.len() as u64);
    let seed = env_number("OXCLIP_CHAOS_SEED", 1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Every kind at least once, the rest drawn; each at its own step, in order.
    let mut kinds: Vec<Fault> = KINDS.to_vec();
    kinds.extend((KINDS.len() as u64..faults).map(|_| KINDS[rng.gen_range(0..KINDS.len())]));
    kinds.shuffle(&mut rng);
    let mut at: Vec<u64> = (0..kinds.len()).map(|_| rng.gen_range(2..steps - 3)).collect();
    at.sort_unstable();

    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), steps);
    let straight = dir.path().join("straight");
    assert!(Job::start(&config, &straight, steps).end().success(), "the uninterrupted run failed");

    let run = dir.path().join("chaos");
    let mut survived: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut job = Job::start(&config, &run, steps);
    for (fault, step) in kinds.into_iter().zip(at) {
        // A fault drawn for a step the job has already passed strikes as soon as it can.
        if !job.reach(step) {
            break;
        }
        let pid = job.launcher.id();
        let ranks = [rank_pid(pid, 0), rank_pid(pid, 1)];
        let victim = ranks[rng.gen_range(0..2)];
        match fault {
            Fault::KillRank | Fault::DamageCheckpoint => signal(victim, "-KILL"),
            Fault::TermRank => signal(victim, "-TERM"),
            Fault::TermLauncher => signal(pid, "-TERM"),
            Fault::KillLauncher => signal(pid, "-KILL"),
        }
        let status = job.end();
        wait_gone(&ranks);
        match fault {
            // Preemption: a checkpoint after the same step on both ranks, and exit 0.
            Fault::TermRank | Fault::TermLauncher => assert!(status.success(), "{fault:?}"),
            _ => assert!(!status.success(), "{fault:?}: the launcher exited 0"),
        }
        if fault == Fault::DamageCheckpoint {
            damage_newest_checkpoint(&run);
        }
        *survived.entry(fault).or_default() += 1;
        eprintln!("chaos: {fault:?} at step {step} survived");
        job = Job::start(&config, &run, steps);
    }
    assert!(job.end().success(), "the last resume failed");

    let last = |run: &Path| run.join(format!("checkpoints/step_{steps}"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (
            read_safetensors(&last(&straight).join(file)),
            read_safetensors(&last(&run).join(file)),
        );
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, t) in &a {
            assert!(t.equal(&b[name]), "{file}: {name} differs from the uninterrupted run's");
        }
    }
    assert_eq!(trainer_state(&last(&straight)), trainer_state(&last(&run)));
    for rank in 0..2 {
        let (a, b) = (keys_by_step(&straight, rank), keys_by_step(&run, rank));
        assert_eq!(a.len() as u64, steps);
        assert_eq!(a, b, "rank {rank} saw other batches");
    }
    let counts: Vec<String> = survived.iter().map(|(k, n)| format!("{k:?} {n}")).collect();
    eprintln!("chaos soak, seed {seed}, {steps} steps: survived {}", counts.join(", "));
    assert_eq!(survived.len(), KINDS.len(), "not every kind struck: {counts:?}");
}
