//! The indexed topology: a planner, `W` workers and a batcher, joined by bounded channels.
//!
//! ```text
//!   planner --jobs[w]--> worker w --chunks[w]--> batcher --batches--> Loader::next_batch
//! ```
//!
//! The planner cuts each batch into `W` contiguous chunks and sends chunk `w` to worker `w`;
//! the batcher takes chunk 0, 1, ..., W-1 of each batch in turn. Every worker sees its jobs in
//! batch order and the batcher reads the workers round-robin, so the output order is the
//! planner's order whatever the thread timing. The planner runs at most [`JOBS_PER_WORKER`]
//! batches ahead of the slowest worker.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::{recv_or_stop, send_or_stop, BufferPool, Pipeline, SkipLog, PREFETCH_BATCHES};
use crate::error::DataError;
use crate::plan::indexed::Plan;
use crate::plan::{Batch, LoaderState, Row, MAX_CONSECUTIVE_SKIPS};
use crate::skip::{SkipCounts, SkipReason};
use crate::sources::Dataset;
use crate::tokenizer::Tokenizer;
use crate::transform::ImageTransform;

/// Jobs queued per worker: how far the planner runs ahead. Jobs are small (a range and an
/// `Arc` of the epoch order).
const JOBS_PER_WORKER: usize = 2;
/// Finished chunks a worker may hold for the batcher; one, since chunks are large.
const CHUNKS_PER_WORKER: usize = 1;

/// The indexed pipeline's threads and its output.
pub(crate) type IndexedPipeline = Pipeline<Result<Batch, DataError>>;

/// What the loader hands the pipeline.
pub(crate) struct IndexedSpec {
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
    rows: Vec<Row>,
    skipped: SkipCounts,
}

/// Creates every channel and thread, in order: planner, workers, batcher.
pub(crate) fn spawn(spec: IndexedSpec) -> Result<IndexedPipeline, DataError> {
    let stop = Arc::new(AtomicBool::new(false));
    let workers = spec.workers.max(1);
    let mut pipeline = Pipeline::new(Arc::clone(&stop));
    let (job_txs, job_rxs): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| bounded::<Job>(JOBS_PER_WORKER)).unzip();
    let (chunk_txs, chunk_rxs): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| bounded::<Result<Chunk, DataError>>(CHUNKS_PER_WORKER)).unzip();
    let (batch_tx, batch_rx) = bounded::<Result<Batch, DataError>>(PREFETCH_BATCHES);
    pipeline.set_output(batch_rx);

    let (plan, start, planner_stop) =
        (Arc::clone(&spec.plan), spec.start.clone(), Arc::clone(&stop));
    pipeline.start_thread("oxclip-loader-plan".into(), move || {
        plan_jobs(&plan, start, &job_txs, &planner_stop)
    })?;

    let skip_log = SkipLog::default();
    for (w, (jobs, chunks)) in job_rxs.into_iter().zip(chunk_txs).enumerate() {
        let worker = Worker {
            dataset: Arc::clone(&spec.dataset),
            tokenizer: spec.tokenizer.clone(),
            transform: spec.transform.clone(),
            plan: Arc::clone(&spec.plan),
            context_length: spec.context_length,
            stop: Arc::clone(&stop),
            skip_log: skip_log.clone(),
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
        assemble_batches(&chunk_rxs, &batch_tx, &batcher_stop, &buffers, batch_size, image_len, ctx)
    })?;
    Ok(pipeline)
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
    skip_log: SkipLog,
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
        let mut chunk = Chunk {
            position: job.position.clone(),
            rows: Vec::with_capacity(job.rows.len()),
            skipped: SkipCounts::new(),
        };
        let epoch = job.position.epoch;
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
            let mut image = vec![0.0; image_len];
            self.transform.apply(&sample.image, self.plan.sample_seed(epoch, index), &mut image);
            let mut tokens = Vec::with_capacity(self.context_length);
            self.tokenizer.encode_into(&sample.caption, self.context_length, &mut tokens);
            chunk.rows.push(Row {
                image,
                tokens,
                label: sample.label.unwrap_or(-1),
                index: index as u64,
                key: sample.key,
                caption: sample.caption,
                source: sample.source,
            });
        }
        Some(Ok(chunk))
    }

    fn log_skip(&self, index: usize, reason: SkipReason) {
        if let Some(n) = self.skip_log.count() {
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
        let mut batch = Batch::empty(
            buffers.empty(batch_size * image_len),
            batch_size,
            context_length,
            LoaderState::default(),
        );
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
            for row in chunk.rows {
                batch.push(row);
            }
            batch.skipped.merge(&chunk.skipped);
        }
        if !send_or_stop(batches, Ok(batch), stop) {
            return;
        }
    }
}
