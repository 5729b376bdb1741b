//! The loader's threads: a planner, `W` workers and a batcher, joined by bounded channels.
//!
//! ```text
//!   planner --jobs[w]--> worker w --chunks[w]--> batcher --batches--> Loader::next_batch
//! ```
//!
//! The planner cuts each batch into `W` contiguous chunks and sends chunk `w` to worker `w`;
//! the batcher takes chunk 0, 1, ..., W-1 of each batch in turn. Every worker sees its jobs in
//! batch order and the batcher reads the workers round-robin, so the output order is the
//! planner's order whatever the thread timing. Bounded channels give back-pressure: the
//! planner runs at most [`JOBS_PER_WORKER`] batches ahead of the slowest worker, and at most
//! [`PREFETCH_BATCHES`] finished batches wait for the trainer.
//!
//! Shutdown: [`Pipeline::shutdown`] raises the stop flag and drops the batch receiver; every
//! blocking send or receive wakes up within [`POLL`] to look at the flag, each stage returns,
//! and every thread is joined. A stage that panicked is reported as an error naming it.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};

use crate::dataset::Dataset;
use crate::error::DataError;
use crate::loader::{Batch, LoaderState, Plan, MAX_CONSECUTIVE_SKIPS};
use crate::skip::SkipCounts;
use crate::tokenizer::Tokenizer;
use crate::transform::ImageTransform;

/// Finished batches waiting for the trainer. Two hide one slow batch without holding much
/// memory (a 256 x 3 x 224 x 224 batch is 154 MB of floats).
pub(crate) const PREFETCH_BATCHES: usize = 2;
/// Jobs queued per worker: how far the planner runs ahead. Jobs are small (a range and an
/// `Arc` of the epoch order).
const JOBS_PER_WORKER: usize = 2;
/// Finished chunks a worker may hold for the batcher; one, since chunks are large.
const CHUNKS_PER_WORKER: usize = 1;
/// How often a blocked stage looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Skips logged in full before only every [`SKIP_LOG_EVERY`]-th one is.
pub(crate) const SKIP_LOG_FIRST: u64 = 10;
pub(crate) const SKIP_LOG_EVERY: u64 = 1000;

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

/// What the loader hands the pipeline.
pub(crate) struct PipelineSpec {
    pub dataset: Arc<dyn Dataset>,
    pub tokenizer: Tokenizer,
    pub transform: ImageTransform,
    pub plan: Arc<Plan>,
    pub context_length: usize,
    pub workers: usize,
    pub start: LoaderState,
    /// Where batch image buffers come back from the trainer.
    pub batch_buffers: BufferPool,
}

/// One worker's share of one batch.
struct Job {
    position: LoaderState,
    /// The epoch's order (train), or `None` for dataset order (eval).
    order: Option<Arc<Vec<usize>>>,
    /// Epoch positions of the rows, a contiguous part of the batch.
    rows: Range<usize>,
}

/// A worker's finished rows of one batch.
struct Chunk {
    position: LoaderState,
    images: Vec<f32>,
    tokens: Vec<i64>,
    labels: Vec<i64>,
    indices: Vec<u64>,
    keys: Vec<String>,
    sources: Vec<Option<String>>,
    captions: Vec<String>,
    skipped: SkipCounts,
}

/// The running threads of one loader, from one start position, and the receiving end of
/// their output (`Result<Batch, DataError>` here; the streaming pipeline sends more).
pub(crate) struct Pipeline<T = Result<Batch, DataError>> {
    batches: Option<Receiver<T>>,
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<()>)>,
}

impl Pipeline {
    /// Creates every channel and thread, in order: planner, workers, batcher.
    pub fn spawn(spec: PipelineSpec) -> Result<Self, DataError> {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = spec.workers.max(1);
        let mut pipeline = Pipeline::new(Arc::clone(&stop));
        let (job_txs, job_rxs): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| bounded::<Job>(JOBS_PER_WORKER))
            .unzip();
        let (chunk_txs, chunk_rxs): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| bounded::<Result<Chunk, DataError>>(CHUNKS_PER_WORKER))
            .unzip();
        let (batch_tx, batch_rx) = bounded::<Result<Batch, DataError>>(PREFETCH_BATCHES);
        pipeline.set_output(batch_rx);

        let (plan, start, planner_stop) = (
            Arc::clone(&spec.plan),
            spec.start.clone(),
            Arc::clone(&stop),
        );
        pipeline.start_thread("oxclip-loader-plan".into(), move || {
            plan_jobs(&plan, start, &job_txs, &planner_stop)
        })?;

        let skips_seen = Arc::new(AtomicU64::new(0));
        for (w, (jobs, chunks)) in job_rxs.into_iter().zip(chunk_txs).enumerate() {
            let worker = Worker {
                dataset: Arc::clone(&spec.dataset),
                tokenizer: spec.tokenizer.clone(),
                transform: spec.transform.clone(),
                plan: Arc::clone(&spec.plan),
                context_length: spec.context_length,
                stop: Arc::clone(&stop),
                skips_seen: Arc::clone(&skips_seen),
            };
            pipeline.start_thread(format!("oxclip-loader-worker-{w}"), move || {
                worker.run(&jobs, &chunks)
            })?;
        }

        let (batcher_stop, batch_size, ctx) =
            (Arc::clone(&stop), spec.plan.batch_size, spec.context_length);
        let image_len = spec.transform.output_len();
        let buffers = spec.batch_buffers.clone();
        pipeline.start_thread("oxclip-loader-batch".into(), move || {
            assemble_batches(
                &chunk_rxs,
                &batch_tx,
                &batcher_stop,
                &buffers,
                batch_size,
                image_len,
                ctx,
            )
        })?;
        Ok(pipeline)
    }
}

impl<T> Pipeline<T> {
    /// No threads yet; `stop` is the flag every stage watches.
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Pipeline {
            batches: None,
            stop,
            threads: Vec::new(),
        }
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
                Err(DataError::Pipeline(format!(
                    "cannot start thread {name}: {e}"
                )))
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

/// Planner stage: from `start`, cut each batch into one contiguous chunk per worker and
/// send chunk w to worker w. Train never ends; eval ends after the pass.
fn plan_jobs(plan: &Plan, start: LoaderState, jobs: &[Sender<Job>], stop: &AtomicBool) {
    let mut position = start;
    let mut order: Option<(u64, Arc<Vec<usize>>)> = None;
    let workers = jobs.len();
    loop {
        if !plan.train && position.batch_in_epoch >= plan.batches_per_epoch {
            return;
        }
        let epoch_order = if plan.train {
            if order.as_ref().is_none_or(|(e, _)| *e != position.epoch) {
                order = plan.order(position.epoch).map(|o| (position.epoch, o));
            }
            order.as_ref().map(|(_, o)| Arc::clone(o))
        } else {
            None
        };
        let rows = plan.rows(position.batch_in_epoch);
        let n = rows.len();
        for (w, tx) in jobs.iter().enumerate() {
            let job = Job {
                position: position.clone(),
                order: epoch_order.clone(),
                rows: rows.start + w * n / workers..rows.start + (w + 1) * n / workers,
            };
            if !send_or_stop(tx, job, stop) {
                return;
            }
        }
        position = plan.advance(&position);
    }
}

/// Worker stage: decode, augment and tokenize the rows of each job.
struct Worker {
    dataset: Arc<dyn Dataset>,
    tokenizer: Tokenizer,
    transform: ImageTransform,
    plan: Arc<Plan>,
    context_length: usize,
    stop: Arc<AtomicBool>,
    /// Skips seen by all workers, for rate-limited logging.
    skips_seen: Arc<AtomicU64>,
}

impl Worker {
    fn run(&self, jobs: &Receiver<Job>, chunks: &Sender<Result<Chunk, DataError>>) {
        while let Some(job) = recv_or_stop(jobs, &self.stop) {
            let Some(chunk) = self.process(&job) else {
                return; // stopped mid-job
            };
            if !send_or_stop(chunks, chunk, &self.stop) {
                return;
            }
        }
    }

    /// The job's rows, or `None` if the stop flag rose meanwhile.
    fn process(&self, job: &Job) -> Option<Result<Chunk, DataError>> {
        let image_len = self.transform.output_len();
        let rows = job.rows.len();
        let mut chunk = Chunk {
            position: job.position.clone(),
            images: vec![0.0; rows * image_len],
            tokens: Vec::with_capacity(rows * self.context_length),
            labels: Vec::with_capacity(rows),
            indices: Vec::with_capacity(rows),
            keys: Vec::with_capacity(rows),
            sources: Vec::with_capacity(rows),
            captions: Vec::with_capacity(rows),
            skipped: SkipCounts::new(),
        };
        let epoch = job.position.epoch;
        let mut filled = 0;
        for position in job.rows.clone() {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let sample = match &job.order {
                // Train: replace an unusable sample by the next usable one in the order.
                Some(order) => {
                    let mut found = None;
                    for attempt in 0..MAX_CONSECUTIVE_SKIPS.min(self.plan.len) {
                        let index = order[(position + attempt) % order.len()];
                        match self.dataset.get(index) {
                            Ok(sample) => {
                                found = Some((index, sample));
                                break;
                            }
                            Err(reason) => {
                                chunk.skipped.add(reason);
                                self.log_skip(index, reason);
                                if attempt + 1 == MAX_CONSECUTIVE_SKIPS.min(self.plan.len) {
                                    return Some(Err(DataError::TooManySkips {
                                        epoch,
                                        first_index: order[position % order.len()],
                                        attempts: attempt + 1,
                                        last_reason: reason.words(1),
                                    }));
                                }
                            }
                        }
                    }
                    found
                }
                // Eval: dataset order; an unusable sample is dropped from the batch.
                None => match self.dataset.get(position) {
                    Ok(sample) => Some((position, sample)),
                    Err(reason) => {
                        chunk.skipped.add(reason);
                        self.log_skip(position, reason);
                        None
                    }
                },
            };
            let Some((index, sample)) = sample else {
                continue;
            };
            let out = &mut chunk.images[filled * image_len..(filled + 1) * image_len];
            self.transform
                .apply(&sample.image, self.plan.sample_seed(epoch, index), out);
            self.tokenizer
                .encode_into(&sample.caption, self.context_length, &mut chunk.tokens);
            chunk.labels.push(sample.label.unwrap_or(-1));
            chunk.indices.push(index as u64);
            chunk.keys.push(sample.key);
            chunk.sources.push(sample.source);
            chunk.captions.push(sample.caption);
            filled += 1;
        }
        chunk.images.truncate(filled * image_len);
        Some(Ok(chunk))
    }

    fn log_skip(&self, index: usize, reason: crate::SkipReason) {
        let n = self.skips_seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= SKIP_LOG_FIRST || n % SKIP_LOG_EVERY == 0 {
            tracing::warn!(
                skipped_so_far = n,
                "skipping {}: {reason}",
                self.dataset.describe(index)
            );
        }
    }
}

/// Batcher stage: take chunk w of each batch from worker w, in order, and join them.
fn assemble_batches(
    chunks: &[Receiver<Result<Chunk, DataError>>],
    batches: &Sender<Result<Batch, DataError>>,
    stop: &AtomicBool,
    buffers: &BufferPool,
    batch_size: usize,
    image_len: usize,
    context_length: usize,
) {
    loop {
        let mut batch = Batch {
            images: buffers.empty(batch_size * image_len),
            tokens: Vec::with_capacity(batch_size * context_length),
            labels: Vec::with_capacity(batch_size),
            batch_size: 0,
            skipped: SkipCounts::new(),
            indices: Vec::with_capacity(batch_size),
            keys: Vec::with_capacity(batch_size),
            sources: Vec::with_capacity(batch_size),
            captions: Vec::with_capacity(batch_size),
            position: LoaderState::default(),
        };
        for (w, rx) in chunks.iter().enumerate() {
            let chunk = match recv_or_stop(rx, stop) {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => {
                    let _ = send_or_stop(batches, Err(e), stop);
                    return;
                }
                // All workers done at a batch boundary: the planner finished (eval) or the
                // pipeline is stopping. The loader tells the two apart.
                None if w == 0 => return,
                None => {
                    let e = DataError::Pipeline(format!(
                        "loader worker {w} stopped in the middle of a batch"
                    ));
                    let _ = send_or_stop(batches, Err(e), stop);
                    return;
                }
            };
            if w == 0 {
                batch.position = chunk.position.clone();
            } else if chunk.position != batch.position {
                let e = DataError::Pipeline(format!(
                    "worker {w} delivered batch {:?} while assembling {:?}",
                    chunk.position, batch.position
                ));
                let _ = send_or_stop(batches, Err(e), stop);
                return;
            }
            batch.images.extend_from_slice(&chunk.images);
            batch.tokens.extend_from_slice(&chunk.tokens);
            batch.labels.extend_from_slice(&chunk.labels);
            batch.indices.extend_from_slice(&chunk.indices);
            batch.keys.extend(chunk.keys);
            batch.sources.extend(chunk.sources);
            batch.captions.extend(chunk.captions);
            batch.skipped.merge(&chunk.skipped);
        }
        batch.batch_size = batch.labels.len();
        if !send_or_stop(batches, Ok(batch), stop) {
            return;
        }
    }
}
