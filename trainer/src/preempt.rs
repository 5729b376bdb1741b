//! Preemption: a cluster announces the end of a job with a signal (SLURM's `--signal`, its
//! SIGTERM before the kill) and a run must then stop cleanly: checkpoint, then exit 0, so
//! that `--resume auto` continues where it stopped. The handler only records the signal; the
//! training loop asks [`agree`] at every step boundary, so all ranks stop after the same step
//! whichever of them was signalled (a rank stopping alone would hang the others in their
//! next collective).

use std::sync::atomic::{AtomicI32, Ordering};

use crate::collectives::Collectives;
use crate::config::train::{signal_number, SIGNALS};
use crate::error::{Result, TrainError};

/// The first preemption signal this process got, 0 for none. Later ones change nothing: the
/// run is already stopping, and a second SIGTERM during the checkpoint must not cut it short.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only an atomic store: nothing else is async-signal-safe here.
    let _ = RECEIVED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
}

/// The name of signal `signal`, as `SIGTERM`, or its number.
pub fn name(signal: libc::c_int) -> String {
    SIGNALS
        .iter()
        .find(|&&(_, s)| s == signal)
        .map_or_else(|| format!("signal {signal}"), |(n, _)| n.to_string())
}

/// Installs the handler for each named signal: from now on they stop the run at the next
/// step boundary instead of killing the process. The names were checked with the run config
/// (`TrainConfig::validate`); a name that is none of [`SIGNALS`] is passed over.
pub fn install(names: &[String]) -> Result<()> {
    for signal in names.iter().filter_map(|n| signal_number(n)) {
        // SAFETY: the handler only stores to an atomic. glibc's signal() restarts interrupted
        // system calls, so a signal arriving during a read or a collective does not fail it.
        let previous =
            unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            return Err(TrainError::Config(format!(
                "train.preempt_signals: cannot install a handler for {}",
                name(signal)
            )));
        }
    }
    Ok(())
}

/// Ignores SIGXFSZ, which the kernel sends a process writing past its file size limit
/// (`ulimit -f`, RLIMIT_FSIZE) and whose default action kills it, core and all, mid-write.
/// Ignored, the write fails with EFBIG instead, which the checkpoint writer turns into a
/// sentence naming the file, as it does for a full disk. Called once at start-up.
pub fn ignore_file_size_signal() {
    // SAFETY: setting a standard signal's disposition to SIG_IGN runs no code of ours.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// The signal this process got, 0 for none.
pub fn received() -> libc::c_int {
    RECEIVED.load(Ordering::SeqCst)
}

/// Which ranks got a preemption signal, and which signal, as every rank sees it: empty when
/// none did. One small all-gather (a byte per rank) when there are several ranks; every rank
/// must call it at the same step boundary.
pub fn agree(comm: &dyn Collectives) -> Result<Vec<(usize, libc::c_int)>> {
    agree_on(comm, received())
}

/// [`agree`] with this rank's signal given (0 for none).
fn agree_on(comm: &dyn Collectives, mine: libc::c_int) -> Result<Vec<(usize, libc::c_int)>> {
    let flags: Vec<libc::c_int> = if comm.world_size() == 1 {
        vec![mine]
    } else {
        // Signal numbers fit in a byte (1..=64).
        comm.all_gather_bytes(&[mine as u8])?
            .iter()
            .map(|b| b.first().copied().unwrap_or(0) as libc::c_int)
            .collect()
    };
    Ok(flags.into_iter().enumerate().filter(|&(_, s)| s != 0).collect())
}

/// "rank 1 got SIGTERM, rank 3 got SIGUSR1".
pub fn describe(signalled: &[(usize, libc::c_int)]) -> String {
    signalled
        .iter()
        .map(|&(rank, s)| format!("rank {rank} got {}", name(s)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_named_and_ranks_described() {
        assert_eq!(name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(
            describe(&[(1, libc::SIGTERM), (3, libc::SIGUSR1)]),
            "rank 1 got SIGTERM, rank 3 got SIGUSR1"
        );
    }

    #[test]
    fn every_rank_learns_which_rank_got_which_signal_in_one_round() {
        use crate::collectives::tcp::TcpGroup;
        use crate::collectives::WorldEnv;
        use std::time::{Duration, Instant};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let ranks: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world = WorldEnv::on_loopback(rank, 3, port);
                    let group =
                        TcpGroup::connect(&world, Duration::from_secs(20)).expect("connects");
                    // What a step boundary costs when nobody was signalled.
                    let rounds = 200;
                    let started = Instant::now();
                    for _ in 0..rounds {
                        assert!(agree_on(&group, 0).expect("agrees").is_empty());
                    }
                    let per_round = started.elapsed() / rounds;
                    let mine = if rank == 1 { libc::SIGTERM } else { 0 };
                    (agree_on(&group, mine).expect("agrees"), per_round)
                })
            })
            .collect();
        for handle in ranks {
            let (seen, per_round) = handle.join().expect("rank thread");
            assert_eq!(seen, vec![(1, libc::SIGTERM)]);
            eprintln!("one agreement round over 3 ranks (TCP, one host): {per_round:?}");
        }
    }

    #[test]
    fn a_signal_is_recorded_instead_of_ending_the_process_and_the_first_one_counts() {
        install(&["SIGUSR2".into(), "SIGHUP".into()]).expect("installs");
        assert_eq!(received(), 0);
        // SAFETY: raising a signal whose handler only stores to an atomic.
        unsafe {
            libc::raise(libc::SIGUSR2);
            libc::raise(libc::SIGHUP);
        }
        assert_eq!(received(), libc::SIGUSR2);
    }
}
