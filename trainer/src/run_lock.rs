//! One run per run folder. Two runs writing into one folder (a job started twice, a requeued
//! job whose first copy still runs) would interleave their checkpoints and TensorBoard files,
//! and each `--resume auto` would read the other's. So rank 0 of a run holds an exclusive OS
//! lock (`flock`) on `<run_dir>/.oxclip-run.lock` for as long as it runs, and a second run
//! into that folder stops at once, naming the process that holds it. The kernel releases the
//! lock when the holder exits in any way, kill -9 included, so nothing stale is ever left to
//! clean up; the file itself stays (it is the run's own, and names its last holder). The other
//! ranks of a job take no lock: they write only through rank 0.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Result, TrainError};

pub const LOCK_FILE: &str = ".oxclip-run.lock";

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of an existing `run_dir`; `None` when the folder does not exist yet (no
    /// run can be writing into it; [`RunLock::take`] once it is made closes the race of two
    /// runs creating it at once).
    pub fn take_if_exists(run_dir: &Path) -> Result<Option<RunLock>> {
        if !run_dir.is_dir() {
            return Ok(None);
        }
        Self::take(run_dir).map(Some)
    }

    /// Takes the lock of `run_dir`, which must exist, without waiting: fails naming the
    /// holder when another process has it.
    pub fn take(run_dir: &Path) -> Result<RunLock> {
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a descriptor this function owns for the call; no memory involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(TrainError::Io { path, source: err });
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(in_use(run_dir, holder.trim()));
        }
        let holder =
            format!("pid {} on {}, since {}\n", std::process::id(), hostname(), unix_time());
        file.set_len(0).map_err(io_err(&path))?;
        file.rewind().map_err(io_err(&path))?;
        file.write_all(holder.as_bytes()).map_err(io_err(&path))?;
        file.flush().map_err(io_err(&path))?;
        Ok(RunLock { _file: file })
    }

    /// The lock file of `run_dir`.
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(LOCK_FILE)
    }
}

fn in_use(run_dir: &Path, holder: &str) -> TrainError {
    let holder = if holder.is_empty() { "another process" } else { holder };
    TrainError::RunFolderInUse { path: run_dir.into(), holder: holder.into() }
}

/// This machine's name, for the message a second run gets.
fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "this host".to_owned())
}

/// Seconds since the Unix epoch, UTC: enough to tell two holders apart.
fn unix_time() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("unix time {secs}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_a_dropped_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::take(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in this process
        // contends as another process would.
        let err = RunLock::take(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is in use by another run"), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        let again = RunLock::take(dir.path()).unwrap();
        drop(again);
        assert!(RunLock::take_if_exists(&dir.path().join("absent")).unwrap().is_none());
    }
}
