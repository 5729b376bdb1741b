//! The loader's threads, following a plan (`plan/`). Two topologies, one file each, each
//! wired in one function (`spawn`):
//!
//! ```text
//!   indexed:  planner --jobs[w]--> worker w --chunks[w]--> batcher --batches--> Loader
//!   streamed: reader w --reads[w]--> worker w --samples[w]--> batcher --batches--> Loader
//! ```
//!
//! This module is the plumbing both share: the [`Pipeline`] that owns the threads and the
//! output channel, stop-aware sends and receives, the buffer pool batches are recycled
//! through, and rate-limited skip logging. Bounded channels give back-pressure: at most
//! [`PREFETCH_BATCHES`] finished batches wait for the trainer.
//! Both batchers assemble a batch the same way, through `Batch::empty` and `Batch::push`
//! (`plan/`), whatever order their samples come in.
//!
//! Shutdown: [`Pipeline::shutdown`] raises the stop flag and drops the batch receiver; every
//! blocking send or receive wakes up within [`POLL`] to look at the flag, each stage returns,
//! and every thread is joined. A stage that panicked is reported as an error naming it.

pub mod indexed;
pub mod streamed;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};

use crate::error::DataError;

/// Finished batches waiting for the trainer. Two hide one slow batch without holding much
/// memory (a 256 x 3 x 224 x 224 batch is 154 MB of floats).
pub(crate) const PREFETCH_BATCHES: usize = 2;
/// How often a blocked stage looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Skips logged in full before only every [`SKIP_LOG_EVERY`]-th one is.
const SKIP_LOG_FIRST: u64 = 10;
const SKIP_LOG_EVERY: u64 = 1000;

/// Float buffers handed back to be filled again (batches by the trainer through
/// [`Loader::recycle`](crate::Loader::recycle), decoded samples by the batcher): a reused
/// buffer's pages are written without being zeroed and faulted in anew, which on a fast loader
/// is a tenth of the work. Bounded; what does not fit is freed.
#[derive(Clone)]
pub(crate) struct BufferPool {
    tx: Sender<Vec<f32>>,
    rx: Receiver<Vec<f32>>,
}

impl BufferPool {
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = bounded(capacity);
        Self { tx, rx }
    }

    /// An empty buffer with room for `capacity` floats.
    pub fn empty(&self, capacity: usize) -> Vec<f32> {
        match self.rx.try_recv() {
            Ok(mut v) => {
                v.clear();
                v.reserve(capacity);
                v
            }
            Err(_) => Vec::with_capacity(capacity),
        }
    }

    /// A buffer of `len` floats whose contents the caller overwrites.
    pub fn filled(&self, len: usize) -> Vec<f32> {
        match self.rx.try_recv() {
            Ok(v) if v.len() == len => v,
            _ => vec![0.0; len],
        }
    }

    pub fn give(&self, buffer: Vec<f32>) {
        let _ = self.tx.try_send(buffer);
    }
}

/// The running threads of one loader, from one start position, and the receiving end of
/// their output (`T`: what the topology's last stage sends).
pub(crate) struct Pipeline<T> {
    batches: Option<Receiver<T>>,
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<()>)>,
}

impl<T> Pipeline<T> {
    /// No threads yet; `stop` is the flag every stage watches.
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Pipeline { batches: None, stop, threads: Vec::new() }
    }

    /// The channel the last stage sends into.
    pub fn set_output(&mut self, rx: Receiver<T>) {
        self.batches = Some(rx);
    }

    pub fn start_thread(
        &mut self,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), DataError> {
        match std::thread::Builder::new().name(name.clone()).spawn(body) {
            Ok(handle) => {
                self.threads.push((name, handle));
                Ok(())
            }
            Err(e) => {
                // Stop what already runs; `self` is dropped by the caller's `?`.
                Err(DataError::Pipeline(format!("cannot start thread {name}: {e}")))
            }
        }
    }

    /// The next batch, or `None` when every stage has ended (end of an eval pass, or a
    /// thread died).
    pub fn recv(&self) -> Option<T> {
        self.batches.as_ref()?.recv().ok()
    }

    /// Stops and joins every thread. Errors if one of them panicked.
    pub fn shutdown(mut self) -> Result<(), DataError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), DataError> {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.batches.take());
        let mut panicked = Vec::new();
        for (name, handle) in self.threads.drain(..) {
            if let Err(payload) = handle.join() {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                panicked.push(format!("{name} panicked: {message}"));
            }
        }
        if panicked.is_empty() {
            Ok(())
        } else {
            Err(DataError::Pipeline(panicked.join("; ")))
        }
    }
}

impl<T> Drop for Pipeline<T> {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::error!("data loader shutdown: {e}");
        }
    }
}

/// Skips seen by all workers of a pipeline, so that a broken dataset cannot flood the log:
/// the first [`SKIP_LOG_FIRST`] are logged, then every [`SKIP_LOG_EVERY`]-th.
#[derive(Clone, Default)]
pub(crate) struct SkipLog(Arc<AtomicU64>);

impl SkipLog {
    /// Counts one skip; `Some(skips so far)` when this one should be logged.
    pub fn count(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= SKIP_LOG_FIRST || n % SKIP_LOG_EVERY == 0).then_some(n)
    }
}

/// Sends unless the stop flag rises or the receiver is gone; false means "stop".
pub(crate) fn send_or_stop<T>(tx: &Sender<T>, mut msg: T, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        match tx.send_timeout(msg, POLL) {
            Ok(()) => return true,
            Err(SendTimeoutError::Timeout(back)) => msg = back,
            Err(SendTimeoutError::Disconnected(_)) => return false,
        }
    }
}

/// Receives unless the stop flag rises or every sender is gone.
pub(crate) fn recv_or_stop<T>(rx: &Receiver<T>, stop: &AtomicBool) -> Option<T> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        match rx.recv_timeout(POLL) {
            Ok(msg) => return Some(msg),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}
