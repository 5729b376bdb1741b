//! Only the job joins its rendezvous: while a real 3-rank `oxclip train` world forms on the
//! CPU backend (ranks started as torchrun would, sharing `OXCLIP_RDZV_TOKEN`), strangers
//! connect to rank 0's port: a rank of another job, a program speaking something else, one
//! announcing a 4 GB message, one claiming a rank that has already joined, and one that says
//! nothing. Each is refused and told why, rank 0 logs each with its address, its memory does
//! not grow, and the real ranks form the world and train to the end.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxclip_trainer::collectives::rendezvous::{greeting, GREETING_LEN};
use util::*;

const TOKEN: &str = "rendezvous-test-job";

fn rank(config: &Path, rank: usize, port: u16) -> Command {
    train_as_rank(config, rank, 3, port, TOKEN)
}

/// Collects `child`'s stderr lines as they come.
fn tail_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let seen = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("stderr");
    let into = Arc::clone(&seen);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut seen = into.lock().expect("lock");
            seen.push_str(&line);
            seen.push('\n');
        }
    });
    seen
}

fn wait_for(log: &Mutex<String>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log.lock().expect("lock").contains(what) {
        assert!(Instant::now() < deadline, "never logged {what:?}:\n{}", log.lock().expect("lock"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to rank 0, sends `bytes`, and returns what rank 0 answers before it closes.
fn stranger(port: u16, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    stream.write_all(bytes).expect("sends");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Rank 0's peak resident memory so far, in kB (`VmHWM`).
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of kB")
}

#[test]
fn strangers_are_refused_while_the_job_forms_and_trains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("run.yaml");
    std::fs::write(
        &config,
        format!(
            "run_dir: {}\nmodel: tiny\ndata:\n  train: synthetic:64\n  workers: 1\ntrain:\n  batch_size: 2\n  steps: 3\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 1\n  checkpoint_every: 0\n  eval_every: 0\noptim:\n  lr: 1.0e-4\n  warmup_steps: 1\ndist:\n  backend: cpu\n  timeout_s: 120\n",
            dir.path().join("run").display()
        ),
    )
    .expect("config");
    let port = free_port();
    let mut rank0 = rank(&config, 0, port).spawn().expect("rank 0 starts");
    let log0 = tail_stderr(&mut rank0);
    let silent = connect_when_listening(port, Duration::from_secs(60));
    let before = peak_rss_kb(rank0.id());

    let another_job = stranger(port, &greeting(1, 3, "another-job"));
    assert!(another_job.starts_with("NO") && another_job.contains("another job"), "{another_job}");
    let http = b"GET / HTTP/1.1\r\nHost: example\r\nUser-Agent: health-check/1.0\r\n\r\n";
    let garbage = stranger(port, http);
    assert!(garbage.contains("not an oxclip rank"), "{garbage}");
    // A collective's frame header (op, sequence, length) announcing 4 GB, then its start.
    let mut huge = vec![2u8];
    huge.extend_from_slice(&1u64.to_le_bytes());
    huge.extend_from_slice(&(4u64 << 30).to_le_bytes());
    huge.resize(GREETING_LEN + 4096, 0xab);
    let announced = stranger(port, &huge);
    assert!(announced.contains("not an oxclip rank"), "{announced}");
    let as_rank_0 = stranger(port, &greeting(0, 3, TOKEN));
    assert!(as_rank_0.contains("claims rank 0"), "{as_rank_0}");

    // Rank 1 joins; a second process claiming rank 1 is refused, rank 1 is kept.
    let mut rank1 = rank(&config, 1, port).spawn().expect("rank 1 starts");
    let log1 = tail_stderr(&mut rank1);
    wait_for(&log0, "rank 1 joined from 127.0.0.1:");
    let twice = stranger(port, &greeting(1, 3, TOKEN));
    assert!(twice.contains("rank 1, which has already joined"), "{twice}");
    wait_for(&log0, "sent no greeting");
    let after = peak_rss_kb(rank0.id());

    let mut rank2 = rank(&config, 2, port).spawn().expect("rank 2 starts");
    let log2 = tail_stderr(&mut rank2);
    for (child, log) in [(&mut rank0, &log0), (&mut rank1, &log1), (&mut rank2, &log2)] {
        let status = child.wait().expect("rank ends");
        // The reader thread may still be catching up on the last lines.
        std::thread::sleep(Duration::from_millis(100));
        assert!(status.success(), "a rank failed:\n{}", log.lock().expect("lock"));
    }
    drop(silent);
    let log0 = log0.lock().expect("lock").clone();
    assert_eq!(log0.matches("refused a connection from 127.0.0.1:").count(), 6, "{log0}");
    assert!(log0.contains("sent no greeting"), "{log0}");
    assert!(log0.contains("step 3"), "{log0}");
    // Nothing a stranger said was held beyond its greeting's 48 bytes.
    assert!(
        after <= before + 16 * 1024,
        "rank 0's peak memory went from {before} kB to {after} kB"
    );
    eprintln!("rank 0 peak resident memory: {before} kB before the strangers, {after} kB after");
}
