//! A rank that never comes, or comes and then stops, ends the others within `dist.timeout_s`:
//! real `oxclip train` processes on the CPU backend, started by hand as torchrun or SLURM
//! would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), with the missing or silent peer either
//! absent, a real rank frozen with SIGSTOP, or a stand-in that speaks only the rendezvous.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use oxclip_trainer::collectives::rendezvous::{greeting, GREETING_LEN};
use util::*;

/// dist.timeout_s of every run here.
const TIMEOUT_S: u64 = 3;
/// Start-up before the rendezvous (libtorch, config) and exit after the error: generous, as
/// the machine running the tests may be busy; a hang would still blow far past it.
const SLACK: Duration = Duration::from_secs(12);
/// The job token every rank here shares (OXCLIP_RDZV_TOKEN).
const TOKEN: &str = "dist-timeout-test";

/// A tiny model on synthetic data, long enough never to finish on its own.
fn config(dir: &Path) -> PathBuf {
    let text = format!(
        "run_dir: {run}\nmodel: tiny\ndata:\n  train: synthetic:256\n  workers: 1\ntrain:\n  batch_size: 4\n  steps: 100000\n  seed: 7\n  precision: fp32\n  device: cpu\n  threads: 1\n  log_every: 2\n  checkpoint_every: 0\n  eval_every: 0\noptim:\n  lr: 1.0e-4\n  warmup_steps: 2\ndist:\n  backend: cpu\n  timeout_s: {TIMEOUT_S}\n",
        run = dir.join("run").display(),
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// `oxclip train` as rank `rank` of a 2-rank world whose rank 0 serves on `port`.
fn rank(config: &Path, rank: usize, port: u16) -> Command {
    train_as_rank(config, rank, 2, port, TOKEN)
}

/// Waits for `child` and checks that it failed within the timeout plus slack, counted from
/// `since`; returns its stderr.
fn fails_in_time(child: Child, since: Instant) -> String {
    let out: Output = child.wait_with_output().expect("rank ends");
    let took = since.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the rank succeeded alone:\n{stderr}");
    assert!(took <= Duration::from_secs(TIMEOUT_S) + SLACK, "took {took:?}:\n{stderr}");
    stderr
}

#[test]
fn rank_0_alone_exits_naming_the_rank_that_never_joined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let started = Instant::now();
    let stderr =
        fails_in_time(rank(&config(dir.path()), 0, port).spawn().expect("rank 0 starts"), started);
    assert!(
        stderr.contains(&format!(
            "rank(s) 1 never joined rank 0 on 127.0.0.1:{port} (dist.timeout_s)"
        )),
        "{stderr}"
    );
    // It did wait for the timeout, not fail for some other reason first.
    assert!(started.elapsed() >= Duration::from_secs(TIMEOUT_S), "{:?}", started.elapsed());
}

#[test]
fn rank_1_alone_exits_naming_rank_0s_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let started = Instant::now();
    let stderr =
        fails_in_time(rank(&config(dir.path()), 1, port).spawn().expect("rank 1 starts"), started);
    assert!(
        stderr.contains(&format!(
            "rank 1 could not join rank 0 at 127.0.0.1:{port} within dist.timeout_s"
        )),
        "{stderr}"
    );
    assert!(started.elapsed() >= Duration::from_secs(TIMEOUT_S), "{:?}", started.elapsed());
}

/// Joins rank 0 at `port` as rank 1 (the greeting, then rank 0's OK once the world is
/// complete) and returns the open, silent connection.
fn join_as_rank_1(port: u16) -> TcpStream {
    let mut stream = connect_when_listening(port, Duration::from_secs(30));
    stream.write_all(&greeting(1, 2, TOKEN)).expect("greeting");
    let mut ok = [0u8; 2];
    stream.read_exact(&mut ok).expect("rank 0 answers");
    assert_eq!(&ok, b"OK");
    stream
}

#[test]
fn a_peer_that_joins_and_never_makes_its_first_collective_ends_rank_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let rank0 = rank(&config(dir.path()), 0, port).spawn().expect("rank 0 starts");
    let peer = join_as_rank_1(port);
    let joined = Instant::now();
    let stderr = fails_in_time(rank0, joined);
    drop(peer);
    // The first collective is the start-up config check, a byte gather.
    assert!(
        stderr.contains(&format!("rank 0 in GatherBytes #1: nothing from rank 1 for {TIMEOUT_S}s")),
        "{stderr}"
    );
}

#[test]
fn a_rank_0_that_welcomes_and_then_stays_silent_ends_rank_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let rank1 = rank(&config(dir.path()), 1, port).spawn().expect("rank 1 starts");
    let (mut stream, _) = listener.accept().expect("rank 1 connects");
    let mut hello = [0u8; GREETING_LEN];
    stream.read_exact(&mut hello).expect("greeting");
    assert_eq!(hello, greeting(1, 2, TOKEN));
    stream.write_all(b"OK").expect("welcome");
    let joined = Instant::now();
    let stderr = fails_in_time(rank1, joined);
    drop(stream);
    assert!(
        stderr.contains(&format!("rank 1 in GatherBytes #1: nothing from rank 0 for {TIMEOUT_S}s")),
        "{stderr}"
    );
}

#[test]
fn a_real_rank_frozen_right_after_joining_ends_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let port = free_port();
    let rank0 = rank(&config, 0, port).spawn().expect("rank 0 starts");
    let mut rank1 = rank(&config, 1, port).spawn().expect("rank 1 starts");
    // Freeze rank 1 (SIGSTOP) as soon as it says it joined: alive, connected, silent.
    let mut lines = BufReader::new(rank1.stderr.take().expect("stderr")).lines();
    let joined = lines.by_ref().map_while(Result::ok).any(|l| l.contains("rank 1 of 2 joined"));
    assert!(joined, "rank 1 never joined");
    let stop =
        Command::new("kill").args(["-STOP", &rank1.id().to_string()]).status().expect("kill");
    assert!(stop.success());
    let stopped = Instant::now();
    let stderr = fails_in_time(rank0, stopped);
    let _ = rank1.kill();
    let _ = rank1.wait();
    // Rank 1 may have sent a frame or two before it froze: rank 0 names whichever
    // collective it then waits in.
    assert!(stderr.contains(&format!("nothing from rank 1 for {TIMEOUT_S}s")), "{stderr}");
}

#[test]
fn the_silent_peer_script_speaks_the_rendezvous() {
    // scripts/silent_peer.py stands in for a rank that joins and then never creates the NCCL
    // communicator (scripts/gpu-check.sh). Here, on the cpu backend, its one byte gather is
    // rank 0's config check: rank 0 reads it as rank 1's config, and refuses it at once.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let rank0 = rank(&config(dir.path()), 0, port).spawn().expect("rank 0 starts");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/silent_peer.py");
    let peer = Command::new("python3")
        .arg(script)
        .args([&port.to_string(), "1", "2", "1"])
        .env("OXCLIP_RDZV_TOKEN", TOKEN)
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let stderr = fails_in_time(rank0, Instant::now());
    assert!(stderr.contains("rank 1's config differs from rank 0's"), "{stderr}");
    assert!(!stderr.contains("nothing from rank 1"), "{stderr}");
    let peer = peer.wait_with_output().expect("the peer ends");
    let said = String::from_utf8_lossy(&peer.stderr);
    assert!(peer.status.success() && said.contains("exchange 1 answered (op 4, #1)"), "{said}");
}

#[test]
fn a_silent_stray_connection_does_not_hold_the_rendezvous() {
    // Something connects to rank 0's port and says nothing (a port probe); rank 1 joins after
    // it. Rank 0 takes rank 1 at once, without waiting the stray's greeting out (each greeting
    // is read on its own thread), and gets as far as its first collective.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let rank0 = rank(&config(dir.path()), 0, port).spawn().expect("rank 0 starts");
    let stray = connect_when_listening(port, Duration::from_secs(30));
    let peer = join_as_rank_1(port);
    let stderr = fails_in_time(rank0, Instant::now());
    drop(peer);
    // Had rank 0 waited the stray out before taking rank 1, it would have refused it ("NO")
    // while the world was still forming; it never got that far with it.
    let mut heard = Vec::new();
    let mut stray = stray;
    let _ = stray.read_to_end(&mut heard);
    assert!(heard.is_empty(), "the stray was answered: {:?}", String::from_utf8_lossy(&heard));
    assert!(stderr.contains("rank 1 joined from 127.0.0.1:"), "{stderr}");
    assert!(
        stderr.contains(&format!("rank 0 in GatherBytes #1: nothing from rank 1 for {TIMEOUT_S}s")),
        "{stderr}"
    );
}
