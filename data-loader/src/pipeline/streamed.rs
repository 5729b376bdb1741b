//! The streamed topology: per worker a reader and a decoder, then one batcher.
//!
//! ```text
//!   reader w --reads[w]--> worker w --samples[w]--> batcher --batches--> Loader::next_batch
//! ```
//!
//! Reader `w` streams worker `w`'s units (`plan/stream.rs`) shard after shard, sequentially, and
//! sends each sample still encoded, numbered by its read index. Worker `w` follows its
//! shuffle buffer: for each draw it waits for that read (keeping at most the buffer's worth
//! of reads that arrived early), then decodes, augments and tokenizes it. The batcher takes
//! one sample from each worker in turn (a worker that finished the epoch drops out of the
//! turn until every worker has), so the output order depends on the plan alone, never on
//! thread timing. A batch may hold the end of one epoch and the start of the next (train);
//! eval ends with a partial batch.
//!
//! Every batch carries the [`StreamCursor`] after it: per worker the next draw. Restarting
//! the threads from a cursor (`spawn`) continues the same sequence of batches.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::{recv_or_stop, send_or_stop, BufferPool, Pipeline, SkipLog, PREFETCH_BATCHES};
use crate::error::DataError;
use crate::formats::webdataset::RawSample;
use crate::plan::stream::{ShuffleBuffer, StreamCursor, StreamPlan, Unit};
use crate::plan::{Batch, LoaderState, Row, MAX_CONSECUTIVE_SKIPS};
use crate::skip::{SampleError, SkipCounts, SkipReason};
use crate::sources::table::CaptionDraw;
use crate::tokenizer::Tokenizer;
use crate::transform::ImageTransform;

/// Encoded samples a reader may run ahead of its worker's need. Small: the shuffle buffer
/// already holds thousands.
const READ_AHEAD: usize = 64;
/// Decoded samples a worker may hold for the batcher: a little over a batch share, so the
/// batcher's turn-taking never starves a worker.
const SAMPLES_AHEAD: usize = 32;

/// What the streaming pipeline hands the loader.
// The batch travels by value: one message per batch through a channel of two, its 400 bytes
// nothing beside the pixel buffers it points to; a box would add an allocation per batch.
#[allow(clippy::large_enum_variant)]
pub(crate) enum StreamMsg {
    /// A batch and the cursor just after it.
    Batch(Batch, StreamCursor),
    /// Eval only: the pass is over (after its last, possibly partial, batch).
    EndOfPass,
}

pub(crate) type StreamPipeline = Pipeline<Result<StreamMsg, DataError>>;

/// What the loader hands the pipeline.
pub(crate) struct StreamSpec {
    pub plan: Arc<StreamPlan>,
    pub tokenizer: Tokenizer,
    pub transform: ImageTransform,
    pub context_length: usize,
    pub batch_size: usize,
    pub max_pixels: u64,
    pub start: StreamCursor,
    /// Where batch image buffers come back from the trainer.
    pub batch_buffers: BufferPool,
}

/// One read: sample `ordinal` of shard `shard`, the `read`-th of the worker's epoch.
struct Read {
    read: u64,
    shard: u32,
    ordinal: u64,
    sample: Result<RawSample, SampleError>,
    /// The reader already logged this failure (missing samples of a short shard).
    logged: bool,
}

enum ReadMsg {
    Read(Read),
    EndOfEpoch(u64),
}

/// A decoded sample, or a worker's end of epoch.
enum WorkerMsg {
    Sample {
        epoch: u64,
        /// The worker's next draw after this sample.
        draw_after: u64,
        /// The sample, its index global: the shard's offset plus the ordinal.
        row: Row,
        /// Draws that failed since the previous message.
        skipped: SkipCounts,
    },
    EndOfEpoch {
        epoch: u64,
        draws: u64,
        skipped: SkipCounts,
    },
}

/// Where one worker starts: its epoch, draw, and the shuffle buffer as of that draw.
struct WorkerStart {
    epoch: u64,
    draw: u64,
    /// For a resumed epoch: the buffer after `draw` draws and the reads it still holds.
    resumed: Option<(ShuffleBuffer, HashSet<u64>)>,
    /// The first read the reader must deliver.
    first_read: u64,
}

impl WorkerStart {
    fn new(plan: &StreamPlan, cursor: &StreamCursor, worker: usize) -> Self {
        if cursor.done[worker] {
            return Self { epoch: cursor.epoch + 1, draw: 0, resumed: None, first_read: 0 };
        }
        let (epoch, draw) = (cursor.epoch, cursor.draws[worker]);
        if draw == 0 {
            return Self { epoch, draw, resumed: None, first_read: 0 };
        }
        let mut buffer = plan.shuffle_buffer(epoch, worker, plan.reads(epoch, worker));
        buffer.skip(draw);
        let held: HashSet<u64> = buffer.held().iter().copied().collect();
        let first_read = held.iter().copied().fold(buffer.next_read(), u64::min);
        Self { epoch, draw, resumed: Some((buffer, held)), first_read }
    }
}

/// Starts readers, workers and the batcher at `spec.start`.
pub(crate) fn spawn(spec: StreamSpec) -> Result<StreamPipeline, DataError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut pipeline = Pipeline::new(Arc::clone(&stop));
    let workers = spec.plan.workers;
    let skip_log = SkipLog::default();
    let mut sample_rxs = Vec::with_capacity(workers);
    let mut sample_buffers = Vec::with_capacity(workers);
    for w in 0..workers {
        // The batcher hands each worker's sample buffers back to it once copied.
        let buffers = BufferPool::new(SAMPLES_AHEAD + 2);
        sample_buffers.push(buffers.clone());
        let start = WorkerStart::new(&spec.plan, &spec.start, w);
        let (read_tx, read_rx) = bounded::<ReadMsg>(READ_AHEAD);
        let (sample_tx, sample_rx) = bounded::<Result<WorkerMsg, DataError>>(SAMPLES_AHEAD);
        sample_rxs.push(sample_rx);

        let reader = Reader { plan: Arc::clone(&spec.plan), worker: w, stop: Arc::clone(&stop) };
        let (epoch, first_read) = (start.epoch, start.first_read);
        pipeline.start_thread(format!("oxclip-loader-read-{w}"), move || {
            reader.run(epoch, first_read, &read_tx)
        })?;

        let worker = Worker {
            plan: Arc::clone(&spec.plan),
            worker: w,
            tokenizer: spec.tokenizer.clone(),
            transform: spec.transform.clone(),
            context_length: spec.context_length,
            max_pixels: spec.max_pixels,
            buffers,
            stop: Arc::clone(&stop),
            skip_log: skip_log.clone(),
        };
        pipeline.start_thread(format!("oxclip-loader-worker-{w}"), move || {
            worker.run(start, &read_rx, &sample_tx)
        })?;
    }
    let (batch_tx, batch_rx) = bounded(PREFETCH_BATCHES);
    pipeline.set_output(batch_rx);
    let batcher = Batcher {
        train: spec.plan.train,
        batch_size: spec.batch_size,
        image_len: spec.transform.output_len(),
        context_length: spec.context_length,
        batch_buffers: spec.batch_buffers,
        sample_buffers,
        stop: Arc::clone(&stop),
    };
    let cursor = spec.start;
    pipeline.start_thread("oxclip-loader-batch".into(), move || {
        batcher.run(cursor, &sample_rxs, &batch_tx)
    })?;
    Ok(pipeline)
}

/// Reader stage: one worker's units, shard by shard.
struct Reader {
    plan: Arc<StreamPlan>,
    worker: usize,
    stop: Arc<AtomicBool>,
}

impl Reader {
    /// Sends every read of `first_epoch` from `first_read` on, then (train) whole epochs.
    fn run(&self, first_epoch: u64, first_read: u64, tx: &Sender<ReadMsg>) {
        let mut epoch = first_epoch;
        let mut start = first_read;
        loop {
            let mut read = 0u64;
            for unit in self.plan.units(epoch, self.worker) {
                let n = unit.reads();
                if read + n > start && !self.read_unit(unit, epoch, read, start, tx) {
                    return;
                }
                read += n;
            }
            if !send_or_stop(tx, ReadMsg::EndOfEpoch(epoch), &self.stop) || !self.plan.train {
                return;
            }
            epoch += 1;
            start = 0;
        }
    }

    /// Streams one unit whose first read is `first`, sending reads `>= start`. Samples the
    /// shard does not deliver (it ends early or cannot be opened) become skips, so read
    /// indices never shift. False means "stop".
    fn read_unit(
        &self,
        unit: Unit,
        epoch: u64,
        first: u64,
        start: u64,
        tx: &Sender<ReadMsg>,
    ) -> bool {
        let shard = &self.plan.shards.shards[unit.shard as usize];
        let name = shard.location.name();
        let mut next = first; // read index of the unit's next sample
        let mut ordinal = 0u64;
        let mut stopped = false;
        // Eval passes read the same caption of a row with several every time.
        let draw =
            CaptionDraw { seed: self.plan.seed, epoch: if self.plan.train { epoch } else { 0 } };
        let mut stalled = None;
        let timeout = self.plan.shards.read_timeout;
        let read = shard.location.for_each_sample_within(draw, timeout, |sample| {
            if ordinal >= unit.take {
                return ControlFlow::Break(());
            }
            if let Err(e) = &sample {
                if e.reason == SkipReason::StalledShard {
                    stalled = Some(e.message.clone());
                }
            }
            if unit.contains(ordinal) {
                if next >= start {
                    let msg = ReadMsg::Read(Read {
                        read: next,
                        shard: unit.shard,
                        ordinal,
                        sample,
                        logged: false,
                    });
                    if !send_or_stop(tx, msg, &self.stop) {
                        stopped = true;
                        return ControlFlow::Break(());
                    }
                }
                next += 1;
            }
            ordinal += 1;
            ControlFlow::Continue(())
        });
        let failure = match read {
            // The rest of a stalled shard is lost with the sample being read: the same reads
            // whenever the shard stalls, so a resumed epoch skips exactly what it skipped.
            Ok(()) if stalled.is_some() => {
                (SkipReason::StalledShard, stalled.take().unwrap_or_default())
            }
            Ok(()) => {
                let why = if shard.estimated {
                    "holds fewer samples than its share of samples_per_epoch"
                } else {
                    "ends before the sample count of its index"
                };
                (SkipReason::TruncatedShard, why.to_owned())
            }
            Err(message) => (SkipReason::UnreadableShard, message),
        };
        if stopped {
            return false;
        }
        let end = first + unit.reads();
        if next < end {
            tracing::warn!(
                "shard {}: {} sample(s) lost: {}",
                shard.location,
                end - next,
                failure.1
            );
        }
        while next < end {
            let ordinal = unit.stripe + (next - first) * unit.stripes;
            if next >= start {
                let msg = ReadMsg::Read(Read {
                    read: next,
                    shard: unit.shard,
                    ordinal,
                    sample: Err(SampleError {
                        reason: failure.0,
                        shard: name.clone(),
                        key: None,
                        message: failure.1.clone(),
                    }),
                    logged: true,
                });
                if !send_or_stop(tx, msg, &self.stop) {
                    return false;
                }
            }
            next += 1;
        }
        true
    }
}

/// Worker stage: the shuffle buffer's order, decoded, augmented and tokenized.
struct Worker {
    plan: Arc<StreamPlan>,
    worker: usize,
    tokenizer: Tokenizer,
    transform: ImageTransform,
    context_length: usize,
    max_pixels: u64,
    /// Sample buffers the batcher is done with.
    buffers: BufferPool,
    stop: Arc<AtomicBool>,
    skip_log: SkipLog,
}

impl Worker {
    fn run(
        &self,
        start: WorkerStart,
        reads: &Receiver<ReadMsg>,
        out: &Sender<Result<WorkerMsg, DataError>>,
    ) {
        let mut epoch = start.epoch;
        let mut resumed = start.resumed;
        let mut draw = start.draw;
        loop {
            let (mut buffer, held) = match resumed.take() {
                Some(r) => r,
                None => {
                    let n = self.plan.reads(epoch, self.worker);
                    (self.plan.shuffle_buffer(epoch, self.worker, n), HashSet::new())
                }
            };
            // Reads the buffer had taken in before a resume, and had emitted already, are not
            // needed again; the reader starts at the oldest one still held.
            let keep_from = if draw > 0 { buffer.next_read() } else { 0 };
            let wanted = |read: u64| read >= keep_from || held.contains(&read);
            let mut early: HashMap<u64, Read> = HashMap::new();
            let mut skipped = SkipCounts::new();
            let mut consecutive = 0usize;
            while let Some(want) = buffer.draw() {
                draw += 1;
                let read = loop {
                    if let Some(read) = early.remove(&want) {
                        break read;
                    }
                    match recv_or_stop(reads, &self.stop) {
                        Some(ReadMsg::Read(read)) if read.read == want => break read,
                        Some(ReadMsg::Read(read)) => {
                            if wanted(read.read) {
                                early.insert(read.read, read);
                            }
                        }
                        Some(ReadMsg::EndOfEpoch(e)) => {
                            let message = format!(
                                "reader {} ended epoch {e} before read {want} of worker epoch {epoch}",
                                self.worker
                            );
                            let _ =
                                send_or_stop(out, Err(DataError::Pipeline(message)), &self.stop);
                            return;
                        }
                        None => return, // stopping, or the reader died (reported at join)
                    }
                };
                match self.process(&read, epoch) {
                    Ok(row) => {
                        consecutive = 0;
                        let msg = WorkerMsg::Sample {
                            epoch,
                            draw_after: draw,
                            row,
                            skipped: std::mem::take(&mut skipped),
                        };
                        if !send_or_stop(out, Ok(msg), &self.stop) {
                            return;
                        }
                    }
                    Err(error) => {
                        skipped.add(error.reason);
                        if !read.logged {
                            self.log_skip(&error);
                            consecutive += 1;
                        }
                        if consecutive >= MAX_CONSECUTIVE_SKIPS {
                            let e = DataError::TooManySkips {
                                epoch,
                                first_index: (self.plan.offsets[read.shard as usize] + read.ordinal)
                                    as usize,
                                attempts: consecutive,
                                last_reason: error.reason.words(1),
                            };
                            let _ = send_or_stop(out, Err(e), &self.stop);
                            return;
                        }
                    }
                }
            }
            // The reader's end-of-epoch mark follows the last read (after a resume, possibly
            // behind reads that were drawn before the interruption).
            loop {
                match recv_or_stop(reads, &self.stop) {
                    Some(ReadMsg::EndOfEpoch(e)) if e == epoch => break,
                    Some(ReadMsg::Read(read)) if !wanted(read.read) => continue,
                    Some(_) => {
                        let message = format!(
                            "reader {} sent more than the {draw} reads of epoch {epoch}",
                            self.worker
                        );
                        let _ = send_or_stop(out, Err(DataError::Pipeline(message)), &self.stop);
                        return;
                    }
                    None => return,
                }
            }
            let end = WorkerMsg::EndOfEpoch { epoch, draws: draw, skipped };
            if !send_or_stop(out, Ok(end), &self.stop) || !self.plan.train {
                return;
            }
            epoch += 1;
            draw = 0;
        }
    }

    /// One read decoded, augmented and tokenized, or why it cannot be used.
    fn process(&self, read: &Read, epoch: u64) -> Result<Row, SampleError> {
        let raw = read.sample.as_ref().map_err(Clone::clone)?;
        let fail = |reason| SampleError {
            reason,
            shard: self.plan.shards.shards[read.shard as usize].location.name(),
            key: Some(raw.key.clone()),
            message: String::new(),
        };
        let (image, caption) = raw.decode(self.max_pixels).map_err(fail)?;
        let mut rows = self.buffers.filled(self.transform.output_len());
        self.transform.apply(
            &image,
            self.plan.sample_seed(epoch, read.shard, read.ordinal),
            &mut rows,
        );
        let mut tokens = Vec::with_capacity(self.context_length);
        self.tokenizer.encode_into(&caption, self.context_length, &mut tokens);
        Ok(Row {
            image: rows,
            tokens,
            label: raw.label.unwrap_or(-1),
            index: self.plan.offsets[read.shard as usize] + read.ordinal,
            key: raw.key.clone(),
            caption: caption.into_owned(),
            source: raw.source.clone(),
        })
    }

    fn log_skip(&self, error: &SampleError) {
        if let Some(n) = self.skip_log.count() {
            tracing::warn!(skipped_so_far = n, "skipping a sample: {error}");
        }
    }
}

/// Batcher stage: one sample from each worker in turn.
struct Batcher {
    train: bool,
    batch_size: usize,
    image_len: usize,
    context_length: usize,
    batch_buffers: BufferPool,
    sample_buffers: Vec<BufferPool>,
    stop: Arc<AtomicBool>,
}

impl Batcher {
    fn run(
        &self,
        mut cursor: StreamCursor,
        samples: &[Receiver<Result<WorkerMsg, DataError>>],
        out: &Sender<Result<StreamMsg, DataError>>,
    ) {
        let fail = |e: DataError| {
            let _ = send_or_stop(out, Err(e), &self.stop);
        };
        let workers = samples.len();
        loop {
            let mut batch = Batch::empty(
                self.batch_buffers.empty(self.batch_size * self.image_len),
                self.batch_size,
                self.context_length,
                LoaderState::of_stream(&cursor),
            );
            let mut pass_over = false;
            while batch.batch_size < self.batch_size {
                if cursor.done.iter().all(|&d| d) {
                    if !self.train {
                        pass_over = true;
                        break;
                    }
                    cursor.epoch += 1;
                    cursor.batch_in_epoch = 0;
                    cursor.next_worker = 0;
                    cursor.draws.iter_mut().for_each(|d| *d = 0);
                    cursor.done.iter_mut().for_each(|d| *d = false);
                }
                let w = cursor.next_worker;
                cursor.next_worker = (w + 1) % workers;
                if cursor.done[w] {
                    continue;
                }
                let msg = match recv_or_stop(&samples[w], &self.stop) {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => return fail(e),
                    None if self.stop.load(Ordering::Relaxed) => return,
                    None => {
                        return fail(DataError::Pipeline(format!(
                            "loader worker {w} stopped in epoch {}",
                            cursor.epoch
                        )))
                    }
                };
                match msg {
                    WorkerMsg::Sample { epoch, draw_after, row, skipped } => {
                        if epoch != cursor.epoch {
                            return fail(DataError::Pipeline(format!(
                                "worker {w} sent a sample of epoch {epoch} during epoch {}",
                                cursor.epoch
                            )));
                        }
                        cursor.draws[w] = draw_after;
                        self.sample_buffers[w].give(batch.push(row));
                        batch.skipped.merge(&skipped);
                    }
                    WorkerMsg::EndOfEpoch { epoch, draws, skipped } => {
                        if epoch != cursor.epoch {
                            return fail(DataError::Pipeline(format!(
                                "worker {w} ended epoch {epoch} during epoch {}",
                                cursor.epoch
                            )));
                        }
                        cursor.draws[w] = draws;
                        cursor.done[w] = true;
                        batch.skipped.merge(&skipped);
                    }
                }
            }
            if batch.batch_size == 0 && !batch.skipped.is_empty() {
                // Only at the end of an eval pass: nothing left to put them beside.
                tracing::warn!("the last samples of the eval pass were skipped: {}", batch.skipped);
            }
            if batch.batch_size > 0 {
                cursor.batch_in_epoch += 1;
                if !send_or_stop(out, Ok(StreamMsg::Batch(batch, cursor.clone())), &self.stop) {
                    return;
                }
            }
            if pass_over {
                let _ = send_or_stop(out, Ok(StreamMsg::EndOfPass), &self.stop);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use crate::formats::webdataset::ShardWriter;
    use crate::loader::tests::test_tokenizer;
    use crate::loader::Loader;
    use crate::plan::stream::ShardOptions;
    use crate::plan::{Batch, LoaderConfig, LoaderState};
    use crate::sources::shards::{ShardLocation, ShardSet, ShardSource};

    /// `counts[i]` samples in shard `i`, real JPEGs of synthetic scenes with captions and
    /// labels; keys are unique over all shards (`s{shard}-{n}`).
    fn write_shards(dir: &Path, counts: &[usize]) -> Vec<PathBuf> {
        counts
            .iter()
            .enumerate()
            .map(|(s, &n)| {
                let path = dir.join(format!("{s:05}.tar"));
                let mut w = ShardWriter::create(&path).unwrap();
                for i in 0..n {
                    let scene = crate::tools::synth::draw_scene(s as u64, i as u64, 20, true);
                    let mut jpeg = Vec::new();
                    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
                        .encode_image(&scene.image)
                        .unwrap();
                    let cls = scene.label.to_string();
                    w.write_sample(
                        &format!("s{s}-{i:03}"),
                        &[
                            ("jpg", &jpeg),
                            ("txt", scene.caption.as_bytes()),
                            ("cls", cls.as_bytes()),
                        ],
                    )
                    .unwrap();
                }
                w.finish().unwrap();
                path
            })
            .collect()
    }

    fn set(paths: &[PathBuf]) -> ShardSet {
        let source = ShardSource {
            spec: "test".into(),
            shards: paths.iter().cloned().map(ShardLocation::File).collect(),
        };
        ShardSet::resolve_with_cache(&[source], None).unwrap()
    }

    fn cfg(
        batch_size: usize,
        rank: usize,
        world_size: usize,
        workers: usize,
        train: bool,
    ) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            rank,
            world_size,
            seed: 11,
            image_size: 16,
            context_length: 12,
            workers,
            train,
            preprocess: None,
        }
    }

    fn buffer(n: usize) -> ShardOptions {
        ShardOptions { shuffle_buffer: n, ..ShardOptions::default() }
    }

    fn loader(shards: &ShardSet, options: &ShardOptions, c: LoaderConfig) -> Loader {
        Loader::streaming(shards.clone(), options, test_tokenizer(), c).unwrap()
    }

    fn take(loader: &mut Loader, n: usize) -> Vec<Batch> {
        (0..n).map(|_| loader.next_batch().unwrap()).collect()
    }

    /// How often each key was served.
    fn tally<'a>(batches: impl IntoIterator<Item = &'a Batch>) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for b in batches {
            for k in &b.keys {
                *seen.entry(k.clone()).or_insert(0) += 1;
            }
        }
        seen
    }

    #[test]
    fn an_epoch_serves_every_sample_once_over_ranks_and_workers() {
        let dir = tempfile::tempdir().unwrap();
        // 3 shards for 2 ranks x 2 workers: shards are striped.
        let shards = set(&write_shards(dir.path(), &[13, 7, 10]));
        let mut served = BTreeMap::new();
        for rank in 0..2 {
            let mut l = loader(&shards, &buffer(8), cfg(4, rank, 2, 2, true));
            let per_rank = l.samples_per_epoch() as usize;
            let mut batches = Vec::new();
            while batches.iter().map(|b: &Batch| b.batch_size).sum::<usize>() < per_rank {
                let b = l.next_batch().unwrap();
                assert_eq!(b.batch_size, 4);
                assert_eq!(b.images.len(), 4 * 3 * 16 * 16);
                batches.push(b);
            }
            // Exactly the rank's share of epoch 0, then epoch 1 begins.
            let in_epoch0 = per_rank;
            let keys: Vec<String> = batches.iter().flat_map(|b| b.keys.clone()).collect();
            for k in &keys[..in_epoch0] {
                *served.entry(k.clone()).or_insert(0) += 1;
            }
            assert!(l.state().epoch >= 1 || keys.len() == in_epoch0);
        }
        assert_eq!(served.len(), 30, "{served:?}");
        assert!(served.values().all(|&n| n == 1), "{served:?}");
    }

    #[test]
    fn same_config_same_batches_and_shuffled_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let shards = set(&write_shards(dir.path(), &[9, 9, 9, 9, 9]));
        let run = || take(&mut loader(&shards, &buffer(6), cfg(5, 0, 1, 2, true)), 20);
        let a = run();
        assert!(a == run());
        // Two epochs of 45: each a permutation of all keys, in different orders.
        let keys: Vec<String> = a.iter().flat_map(|b| b.keys.clone()).collect();
        let (e0, e1) = (&keys[..45], &keys[45..90]);
        let sorted = |k: &[String]| {
            let mut k = k.to_vec();
            k.sort();
            k
        };
        assert_eq!(sorted(e0), sorted(e1));
        assert_eq!(sorted(e0).windows(2).filter(|w| w[0] == w[1]).count(), 0);
        assert_ne!(e0, e1);
        assert!(a.iter().all(|b| b.labels.iter().all(|l| (0..24).contains(l))));
        // The global index names the sample: shard offset + ordinal.
        let b = &a[0];
        for (k, i) in b.keys.iter().zip(&b.indices) {
            let (s, n) = k[1..].split_once('-').unwrap();
            assert_eq!(*i, s.parse::<u64>().unwrap() * 9 + n.parse::<u64>().unwrap());
        }
    }

    #[test]
    fn restore_continues_exactly_across_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let shards = set(&write_shards(dir.path(), &[11, 6, 8]));
        let c = || cfg(4, 1, 2, 3, true);
        let expected = take(&mut loader(&shards, &buffer(5), c()), 16);
        for stop_after in [1, 3, 5, 7] {
            let mut first = loader(&shards, &buffer(5), c());
            let head = take(&mut first, stop_after);
            std::thread::sleep(std::time::Duration::from_millis(30)); // let it prefetch
            let saved = serde_json::to_string(&first.state()).unwrap();
            drop(first);
            let mut resumed = loader(&shards, &buffer(5), c());
            resumed.restore(&serde_json::from_str(&saved).unwrap()).unwrap();
            let tail = take(&mut resumed, 16 - stop_after);
            assert!(
                head.iter().chain(&tail).eq(expected.iter()),
                "diverged after resuming at batch {stop_after}"
            );
        }
        // Another worker count cannot continue exactly: a fresh next epoch, with a warning.
        let mut first = loader(&shards, &buffer(5), c());
        take(&mut first, 2);
        let state = first.state();
        let mut other = loader(&shards, &buffer(5), cfg(4, 1, 2, 2, true));
        other.restore(&state).unwrap();
        assert_eq!(other.state().epoch, state.epoch + 1);
        assert!(other.state().stream.is_some_and(|c| c.draws == [0, 0]));
    }

    #[test]
    fn bad_samples_and_a_truncated_shard_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[6, 6]);
        // A third shard with faults: corrupt image, no caption, then cut in the middle.
        let bad = dir.path().join("00002.tar");
        let mut w = ShardWriter::create(&bad).unwrap();
        let good = crate::formats::image::test_images::jpeg(12, 12);
        w.write_sample("b-0", &[("jpg", b"not a jpeg"), ("txt", b"a red circle")]).unwrap();
        w.write_sample("b-1", &[("jpg", &good)]).unwrap();
        w.write_sample("b-2", &[("jpg", &good), ("txt", b"a blue square")]).unwrap();
        w.write_sample("b-3", &[("jpg", &good), ("txt", b"a blue cross")]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&bad).unwrap();
        let header = bytes.windows(7).position(|w| w == b"b-3.jpg").unwrap();
        let cut = header + 512 + 100; // inside b-3's image
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let mut all = paths.clone();
        all.push(bad);
        let shards = set(&all);
        assert_eq!(shards.total_samples(), 16);

        let mut eval = loader(&shards, &buffer(1), cfg(5, 0, 1, 2, false));
        let batches: Vec<Batch> = std::iter::from_fn(|| eval.next_eval_batch().unwrap()).collect();
        let seen = tally(&batches);
        assert_eq!(seen.len(), 13, "{seen:?}");
        assert!(seen.values().all(|&n| n == 1));
        assert!(seen.contains_key("b-2"));
        let mut skipped = crate::skip::SkipCounts::new();
        batches.iter().for_each(|b| skipped.merge(&b.skipped));
        assert_eq!(skipped.get("undecodable_image"), Some(&1));
        assert_eq!(skipped.get("missing_caption"), Some(&1));
        assert_eq!(skipped.get("truncated_shard"), Some(&1));
        assert_eq!(batches.iter().map(|b| b.batch_size).sum::<usize>(), 13);
        // The next pass is the same pass again.
        let again: Vec<Batch> = std::iter::from_fn(|| eval.next_eval_batch().unwrap()).collect();
        assert!(again.iter().map(|b| &b.keys).eq(batches.iter().map(|b| &b.keys)));

        // Training goes on, full batches, the bad ones counted each epoch.
        let mut train = loader(&shards, &buffer(4), cfg(4, 0, 1, 2, true));
        let batches = take(&mut train, 8);
        assert!(batches.iter().all(|b| b.batch_size == 4));
        let total: u64 = batches.iter().map(|b| b.skipped.total()).sum();
        assert!(total >= 3, "{total}");
    }

    /// A Hugging Face dataset (tests/fixtures/make_parquet_fixtures.py) as `spec` opens it.
    fn table(spec: &str) -> ShardSet {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_datasets");
        let crate::sources::DataSpec::Table(table) =
            crate::sources::DataSpec::parse(&format!("{}/{spec}", dir.display())).unwrap()
        else {
            panic!("{spec} is not a table")
        };
        crate::sources::open_table(&table, None).unwrap().0
    }

    /// Epoch `epoch`'s keys and captions for each rank of `world` x `workers`.
    fn epoch_rows(
        set: &ShardSet,
        world: usize,
        workers: usize,
        epoch: usize,
    ) -> Vec<Vec<(String, String)>> {
        (0..world)
            .map(|rank| {
                let mut l = loader(set, &buffer(6), cfg(3, rank, world, workers, true));
                let per_rank = l.samples_per_epoch() as usize;
                let mut rows = Vec::new();
                while rows.len() < per_rank * (epoch + 1) {
                    let b = l.next_batch().unwrap();
                    rows.extend(b.keys.into_iter().zip(b.captions));
                }
                rows[per_rank * epoch..per_rank * (epoch + 1)].to_vec()
            })
            .collect()
    }

    /// The COCO-style Parquet file (24 rows in 5 row groups, 5 captions each) and the same
    /// rows saved to disk as Arrow (3 files of one batch, so striped over the 4 streams):
    /// 2 ranks x 2 workers see every row once per epoch, with one of its captions, drawn
    /// anew each epoch.
    #[test]
    fn two_ranks_of_two_workers_see_every_table_row_once_per_epoch() {
        for spec in ["coco/coco.parquet", "coco_arrow"] {
            let set = table(spec);
            assert_eq!(set.total_samples(), 24);
            let mut captions = Vec::new();
            for epoch in 0..2 {
                // Row groups are dealt whole (5 of them: 14 rows to rank 0, 10 to rank 1);
                // the Arrow files' single batches are striped (12 rows each).
                let ranks = epoch_rows(&set, 2, 2, epoch);
                assert_eq!(ranks.iter().map(Vec::len).sum::<usize>(), 24, "{spec}");
                let mut seen: BTreeMap<String, String> = BTreeMap::new();
                for (key, caption) in ranks.into_iter().flatten() {
                    assert!(seen.insert(key.clone(), caption).is_none(), "{spec}: {key} twice");
                }
                assert_eq!(seen.len(), 24, "{spec} epoch {epoch}");
                for (key, caption) in &seen {
                    let row: u64 = key.rsplit('/').next().unwrap().parse().unwrap();
                    let row = if spec == "coco_arrow" {
                        row + 8 * key.contains("00001") as u64 + 16 * key.contains("00002") as u64
                    } else {
                        row
                    };
                    assert!(caption.starts_with(&format!("photo {row}, caption ")), "{caption}");
                }
                captions.push(seen);
            }
            assert_ne!(captions[0], captions[1], "{spec}: the same captions both epochs");
        }
    }

    #[test]
    fn a_table_resumes_mid_epoch_exactly() {
        let set = table("coco_hub?split=train");
        let c = || cfg(3, 0, 1, 2, true);
        let expected = take(&mut loader(&set, &buffer(4), c()), 16);
        for stop_after in [2, 5, 9] {
            let mut first = loader(&set, &buffer(4), c());
            let head = take(&mut first, stop_after);
            let saved = serde_json::to_string(&first.state()).unwrap();
            drop(first);
            let mut resumed = loader(&set, &buffer(4), c());
            resumed.restore(&serde_json::from_str(&saved).unwrap()).unwrap();
            let tail = take(&mut resumed, 16 - stop_after);
            assert!(
                head.iter().chain(&tail).eq(expected.iter()),
                "diverged after resuming at batch {stop_after}"
            );
        }
    }

    /// Bad rows through the loader: every good row once per eval pass, each bad one counted
    /// by its reason (the fixture's `expected.json`).
    #[test]
    fn bad_table_rows_are_skipped_and_counted_by_the_loader() {
        let set = table("bad/bad.parquet");
        let mut eval = loader(&set, &buffer(1), cfg(4, 0, 1, 2, false));
        let batches: Vec<Batch> = std::iter::from_fn(|| eval.next_eval_batch().unwrap()).collect();
        let mut skipped = crate::skip::SkipCounts::new();
        batches.iter().for_each(|b| skipped.merge(&b.skipped));
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/fixtures/hf_datasets/expected.json"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&skipped).unwrap(), expected["bad"]["skipped"]);
        let seen = tally(&batches);
        assert_eq!(seen.len() as u64, expected["bad"]["samples"].as_u64().unwrap());
        assert!(seen.values().all(|&n| n == 1));
        assert!(batches.iter().flat_map(|b| &b.labels).all(|l| (0..3).contains(l)));
    }

    /// Shards written by the Python webdataset library's TarWriter with faults
    /// (tests/fixtures/make_webdataset_fixture.py): through the streaming loader, every good
    /// sample once per pass and every bad one counted by reason, as `expected.json` says.
    #[test]
    fn python_webdataset_shards_stream_with_exact_counts() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/webdataset_py");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let crate::sources::DataSpec::Shards(sources) =
            crate::sources::DataSpec::parse(dir.to_str().unwrap()).unwrap()
        else {
            panic!("not shards")
        };
        let shards = ShardSet::resolve_with_cache(&sources, None).unwrap();
        for (world, workers) in [(1, 1), (1, 3), (2, 2)] {
            let mut seen = BTreeMap::new();
            let mut skipped = crate::skip::SkipCounts::new();
            for rank in 0..world {
                let mut eval = loader(&shards, &buffer(1), cfg(4, rank, world, workers, false));
                while let Some(b) = eval.next_eval_batch().unwrap() {
                    skipped.merge(&b.skipped);
                    for k in b.keys {
                        *seen.entry(k).or_insert(0) += 1;
                    }
                }
            }
            assert_eq!(
                seen.len() as u64,
                expected["samples"].as_u64().unwrap(),
                "{world}x{workers}"
            );
            assert!(seen.values().all(|&n| n == 1), "{seen:?}");
            assert_eq!(
                serde_json::to_value(&skipped).unwrap(),
                expected["skipped"],
                "{world}x{workers}"
            );
        }
    }

    #[test]
    fn pipe_shards_and_resampling_stream_like_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[7, 5]);
        let piped = ShardSource {
            spec: "pipe".into(),
            shards: paths
                .iter()
                .map(|p| ShardLocation::Pipe(format!("cat '{}'", p.display())))
                .collect(),
        };
        let from_pipe = ShardSet::resolve_with_cache(&[piped], None).unwrap();
        let from_files = set(&paths);
        assert_eq!(from_pipe.total_samples(), 12);
        let keys = |s: &ShardSet| {
            let b = take(&mut loader(s, &buffer(3), cfg(4, 0, 1, 2, true)), 6);
            b.iter().flat_map(|b| b.keys.clone()).collect::<Vec<_>>()
        };
        assert_eq!(keys(&from_pipe), keys(&from_files));

        let resampled = ShardOptions { resampled: true, samples_per_epoch: Some(40), ..buffer(3) };
        let mut l = loader(&from_files, &resampled, cfg(4, 0, 1, 2, true));
        assert_eq!(l.samples_per_epoch(), 40);
        let batches = take(&mut l, 11);
        let seen = tally(&batches[..10]);
        // 40 draws from 12 samples: repeats within the virtual epoch, as with webdataset.
        assert!(seen.values().any(|&n| n > 1));
        assert_eq!(l.state().epoch, 1);
        let state = l.state();
        let next = l.next_batch().unwrap();
        let mut resumed = loader(&from_files, &resampled, cfg(4, 0, 1, 2, true));
        resumed.restore(&state).unwrap();
        assert!(resumed.next_batch().unwrap() == next);
        let _ = LoaderState::default();
    }

    #[test]
    fn pipe_shards_without_counts_are_read_by_the_loader_only_given_samples_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        write_shards(dir.path(), &[6, 6]);
        let log = dir.path().join("runs.log");
        // Each run of the command leaves a line in the log, so a read to count shows.
        let spec = format!(
            "pipe:echo run >> '{}'; cat '{}/{{00000..00001}}.tar'",
            log.display(),
            dir.path().display()
        );
        let crate::sources::DataSpec::Shards(sources) =
            crate::sources::DataSpec::parse(&spec).unwrap()
        else {
            panic!("{spec} is not shards")
        };
        assert_eq!(sources[0].shards.len(), 2);
        let runs = || std::fs::read_to_string(&log).map_or(0, |t| t.lines().count());
        let options = |per_epoch| ShardOptions { samples_per_epoch: Some(per_epoch), ..buffer(1) };

        let set = ShardSet::resolve_counted(&sources, &options(12).count_hints(), None).unwrap();
        assert_eq!(runs(), 0, "a shard was read to count it");
        assert!(set.shards.iter().all(|s| s.estimated && s.samples == 6), "{set:?}");
        // One eval pass with one worker reads each shard once, all its samples.
        let mut eval = loader(&set, &options(12), cfg(4, 0, 1, 1, false));
        assert_eq!(eval.samples_per_epoch(), 12);
        let batches: Vec<Batch> = std::iter::from_fn(|| eval.next_eval_batch().unwrap()).collect();
        assert_eq!(tally(&batches).len(), 12);
        assert!(batches.iter().all(|b| b.skipped.is_empty()));
        assert_eq!(runs(), 2);

        // The epoch is samples_per_epoch split over ranks, whatever the shards hold: a share
        // larger than a shard leaves truncated_shard skips, a smaller one its tail unread.
        let over = ShardSet::resolve_counted(&sources, &options(14).count_hints(), None).unwrap();
        let mut eval = loader(&over, &options(14), cfg(5, 0, 1, 1, false));
        let batches: Vec<Batch> = std::iter::from_fn(|| eval.next_eval_batch().unwrap()).collect();
        assert_eq!(tally(&batches).len(), 12);
        let mut skipped = crate::skip::SkipCounts::new();
        batches.iter().for_each(|b| skipped.merge(&b.skipped));
        assert_eq!(skipped.get("truncated_shard"), Some(&2));
        let under = ShardSet::resolve_counted(&sources, &options(8).count_hints(), None).unwrap();
        let rank0 = loader(&under, &options(8), cfg(2, 0, 2, 1, true));
        assert_eq!((rank0.samples_per_epoch(), rank0.batches_per_epoch()), (4, 2));
        assert_eq!(runs(), 4, "only the loader reads the shards");
    }

    /// One of 4 shards is a command that delivers part of its shard, then hangs: the pass
    /// goes on after `read_timeout`, every sample of the other 3 is served once, and the
    /// stalled shard's samples not delivered are `stalled_shard` skips. A pass resumed from a
    /// mid-pass position serves exactly the batches the whole pass served.
    #[test]
    fn a_stalled_pipe_shard_is_skipped_and_the_pass_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[6, 5, 7, 6]);
        let hang = format!("head -c 5000 '{}'; sleep 100000", paths[3].display());
        let mut locations: Vec<ShardLocation> =
            paths[..3].iter().cloned().map(ShardLocation::File).collect();
        locations.push(ShardLocation::Pipe(hang.clone()));
        let sources = [ShardSource { spec: "test".into(), shards: locations }];
        let sizes = dir.path().join("sizes.json");
        std::fs::write(&sizes, serde_json::json!({ format!("pipe:{hang}"): 6 }).to_string())
            .unwrap();
        let options = ShardOptions {
            shard_sizes: Some(sizes),
            read_timeout: Some(std::time::Duration::from_millis(500)),
            ..buffer(4)
        };
        let set = ShardSet::resolve_counted(&sources, &options.count_hints(), None).unwrap();
        assert_eq!(set.total_samples(), 24);
        let mut eval = loader(&set, &options, cfg(4, 0, 1, 2, false));
        let batches: Vec<Batch> = std::iter::from_fn(|| eval.next_eval_batch().unwrap()).collect();
        let seen = tally(&batches);
        for (s, n) in [(0, 6), (1, 5), (2, 7)] {
            for i in 0..n {
                assert_eq!(seen.get(&format!("s{s}-{i:03}")), Some(&1), "s{s}-{i:03}: {seen:?}");
            }
        }
        let delivered = seen.keys().filter(|k| k.starts_with("s3-")).count() as u64;
        let mut skipped = crate::skip::SkipCounts::new();
        batches.iter().for_each(|b| skipped.merge(&b.skipped));
        assert!(delivered < 6, "{seen:?}");
        assert_eq!(skipped.get("stalled_shard"), Some(&(6 - delivered)), "{skipped:?}");
        assert_eq!(skipped.total(), 6 - delivered);

        // Training resumed after the second batch serves the batches the run never stopped
        // served (the shard stalls again where it stalled).
        let mut straight = loader(&set, &options, cfg(4, 0, 1, 2, true));
        let first = take(&mut straight, 2);
        let state = straight.state();
        let rest = take(&mut straight, 4);
        let mut resumed = loader(&set, &options, cfg(4, 0, 1, 2, true));
        resumed.restore(&state).unwrap();
        assert!(take(&mut resumed, 4) == rest, "the resumed run differs");
        assert!(first.iter().chain(&rest).any(|b| b.skipped.contains_key("stalled_shard")));
    }

    #[test]
    fn a_sizes_file_gives_pipe_shards_their_counts() {
        let dir = tempfile::tempdir().unwrap();
        write_shards(dir.path(), &[6, 4]);
        let spec = format!("pipe:cat '{}/{{00000..00001}}.tar'", dir.path().display());
        let crate::sources::DataSpec::Shards(sources) =
            crate::sources::DataSpec::parse(&spec).unwrap()
        else {
            panic!("{spec} is not shards")
        };
        let sizes = dir.path().join("my-sizes.json");
        std::fs::write(&sizes, r#"{"00000.tar": 6, "00001.tar": 4}"#).unwrap();
        let options =
            ShardOptions { shard_sizes: Some(sizes), samples_per_epoch: Some(1000), ..buffer(1) };
        let set = ShardSet::resolve_counted(&sources, &options.count_hints(), None).unwrap();
        let counts: Vec<(u64, bool)> =
            set.shards.iter().map(|s| (s.samples, s.estimated)).collect();
        assert_eq!(counts, [(6, false), (4, false)]);
        let mut eval = loader(&set, &options, cfg(3, 0, 1, 1, false));
        let batches: Vec<Batch> = std::iter::from_fn(|| eval.next_eval_batch().unwrap()).collect();
        assert_eq!(tally(&batches).len(), 10);
        // A sizes file that does not parse is an error naming it.
        std::fs::write(dir.path().join("my-sizes.json"), "{").unwrap();
        let err = ShardSet::resolve_counted(&sources, &options.count_hints(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("my-sizes.json"), "{err}");
    }
}
