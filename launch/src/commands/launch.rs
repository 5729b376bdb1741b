//! `oxclip launch`: starts this node's ranks of a multi-process run, as torchrun does.
//!
//! Each rank is this binary running the given command with torchrun's environment (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, and on one node a
//! fresh `OXCLIP_RDZV_TOKEN` so that only these ranks can join the rendezvous). Output lines
//! are prefixed with the rank. When a rank fails, the others are ended (SIGTERM, then SIGKILL
//! after a grace period) and the launcher exits with the failed rank's status; nothing is left
//! running. SIGINT is passed on and ends the ranks the same way. SIGTERM, SIGUSR1 and SIGUSR2
//! are preemption: passed on once, after which the ranks checkpoint at their next step
//! boundary and exit 0 (`train.preempt_signals`), and the launcher waits for that, up to
//! `--preempt-grace-s`. A rank that exits 0 never ends the others: after a preemption they
//! all do. The launcher exits 0 when every rank did.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::RngCore;

#[derive(Args)]
pub struct LaunchArgs {
    /// Ranks to start on this node (one per GPU).
    #[arg(long)]
    pub nproc_per_node: usize,
    /// Nodes in the run.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes; node 0 hosts rank 0.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, reachable from every node.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port rank 0 serves the rendezvous on.
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// Seconds the other ranks get to exit after one failed or SIGINT came, before SIGKILL.
    #[arg(long, default_value_t = 10)]
    pub grace_s: u64,
    /// Seconds the ranks get to write their checkpoint and exit after SIGTERM, SIGUSR1 or
    /// SIGUSR2 (preemption), before SIGKILL: a step plus writing a checkpoint. Keep it below
    /// the warning the cluster gives (SLURM's `--signal=...@SECONDS`).
    #[arg(long, default_value_t = 300)]
    pub preempt_grace_s: u64,
    /// The oxclip command every rank runs, after `--`: `-- train --config run.yaml`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The signal that asked us to stop, 0 for none.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

struct Rank {
    rank: usize,
    child: Child,
    /// How it ended, once it has.
    status: Option<std::process::ExitStatus>,
}

/// Has the kernel send the rank SIGTERM if this launcher dies without ending it (kill -9, the
/// OOM killer): the rank then checkpoints and stops as on preemption, instead of training on
/// unsupervised and holding the run folder against the next launch.
fn end_with_launcher(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl,
    // getppid and raise, which are async-signal-safe; it touches no memory but a copied pid.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before the request above took effect.
            if libc::getppid() != launcher {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
}

/// Runs the ranks; returns the exit code for the launcher.
pub fn run(args: LaunchArgs) -> anyhow::Result<u8> {
    if args.nproc_per_node == 0 || args.nnodes == 0 {
        bail!("--nproc-per-node and --nnodes must be at least 1");
    }
    if args.node_rank >= args.nnodes {
        bail!("--node-rank {} is not below --nnodes {}", args.node_rank, args.nnodes);
    }
    let exe =
        std::env::current_exe().context("cannot find the oxclip binary to start the ranks with")?;
    let world_size = args.nnodes * args.nproc_per_node;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2] {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }

    // On one node this launcher starts every rank, so a fresh secret keeps every other
    // process out of the rendezvous; across nodes the launchers must agree on one, which the
    // job's own ids (or the user's OXCLIP_RDZV_TOKEN) give.
    let mut job_token = None;
    if !crate::dist::names_its_job() {
        if args.nnodes == 1 {
            let mut secret = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            job_token = Some(secret.iter().map(|b| format!("{b:02x}")).collect::<String>());
        } else {
            tracing::warn!(
                "no job token for the rendezvous: set {} to one secret on every node's \
                 launcher (SLURM and torchrun jobs get one from their job id)",
                crate::dist::TOKEN_ENV
            );
        }
    }

    let mut ranks = Vec::new();
    let mut printers: Vec<JoinHandle<()>> = Vec::new();
    for local_rank in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local_rank;
        let mut command = Command::new(&exe);
        if let Some(token) = &job_token {
            command.env(crate::dist::TOKEN_ENV, token);
        }
        end_with_launcher(&mut command);
        let spawned = command
            .args(&args.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", args.master_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                end_all(&mut ranks, args.grace_s);
                return Err(e)
                    .with_context(|| format!("cannot start rank {rank} ({})", exe.display()));
            }
        };
        if let Some(out) = child.stdout.take() {
            printers.push(prefix_lines(out, rank, false));
        }
        if let Some(err) = child.stderr.take() {
            printers.push(prefix_lines(err, rank, true));
        }
        ranks.push(Rank { rank, child, status: None });
    }

    let code = supervise(&mut ranks, args.grace_s, args.preempt_grace_s);
    for printer in printers {
        let _ = printer.join();
    }
    Ok(code)
}

/// Waits for the ranks; on the first failure or SIGINT, ends the rest; on a preemption signal,
/// passes it on and waits up to `preempt_grace_s` for the ranks' checkpoint. The exit code: 0
/// if every rank succeeded, else the first failed rank's code (128 + signal if it was killed).
fn supervise(ranks: &mut [Rank], grace_s: u64, preempt_grace_s: u64) -> u8 {
    let mut preempt_deadline: Option<Instant> = None;
    loop {
        match STOP_SIGNAL.swap(0, Ordering::SeqCst) {
            0 => {}
            libc::SIGINT => {
                eprintln!("oxclip launch: got SIGINT, stopping {} rank(s)", ranks.len());
                forward(ranks, libc::SIGINT);
                end_all(ranks, grace_s);
                return 128 + libc::SIGINT as u8;
            }
            signal if preempt_deadline.is_none() => {
                eprintln!(
                    "oxclip launch: got signal {signal}, passing it on; waiting up to {preempt_grace_s}s (--preempt-grace-s) for the ranks to checkpoint and exit"
                );
                forward(ranks, signal);
                preempt_deadline = Some(Instant::now() + Duration::from_secs(preempt_grace_s));
            }
            // Passed on already: the ranks stop at their next step boundary either way.
            signal => eprintln!(
                "oxclip launch: got signal {signal} again; still waiting for the ranks' checkpoint"
            ),
        }
        if preempt_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            eprintln!("oxclip launch: ranks still running {preempt_grace_s}s after the preemption signal (--preempt-grace-s); killing them");
            end_all(ranks, 0);
            return 1;
        }
        let mut running = 0;
        for r in ranks.iter_mut() {
            if r.status.is_none() {
                match r.child.try_wait() {
                    Ok(Some(status)) => {
                        r.status = Some(status);
                        if !status.success() {
                            let code = exit_code(status);
                            eprintln!(
                                "oxclip launch: rank {} failed ({status}); stopping the others",
                                r.rank
                            );
                            end_all(ranks, grace_s);
                            return code;
                        }
                    }
                    Ok(None) => running += 1,
                    Err(e) => {
                        eprintln!("oxclip launch: cannot wait for rank {}: {e}", r.rank);
                        end_all(ranks, grace_s);
                        return 1;
                    }
                }
            }
        }
        if running == 0 {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1).max(1),
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        _ => 1,
    }
}

fn forward(ranks: &[Rank], signal: i32) {
    for r in ranks.iter().filter(|r| r.status.is_none()) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(r.child.id() as libc::pid_t, signal);
        }
    }
}

/// SIGTERM to every rank still running, SIGKILL to those still there after `grace_s`, and
/// reaps them all.
fn end_all(ranks: &mut [Rank], grace_s: u64) {
    forward(ranks, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(grace_s);
    for r in ranks.iter_mut() {
        while r.status.is_none() {
            match r.child.try_wait() {
                Ok(Some(status)) => r.status = Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = r.child.kill();
                    r.status = r.child.wait().ok();
                    break;
                }
            }
        }
    }
}

/// Copies `pipe` line by line to our stdout (or stderr), each line prefixed `[rank N] `.
fn prefix_lines(pipe: impl Read + Send + 'static, rank: usize, to_stderr: bool) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches('\n');
                    let _ = if to_stderr {
                        writeln!(std::io::stderr().lock(), "[rank {rank}] {text}")
                    } else {
                        writeln!(std::io::stdout().lock(), "[rank {rank}] {text}")
                    };
                }
            }
        }
    })
}
