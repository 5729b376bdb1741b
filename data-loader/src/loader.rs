//! [`Loader`], the one API the trainer sees: batches for this rank, and where the loader
//! stands so that a checkpoint can resume it exactly. Two kinds of source, two orders:
//!
//! - **Streamed** (WebDataset shards, local or `pipe:`; Parquet and Arrow tables, a row group
//!   standing for a shard): shards are read sequentially, split
//!   over ranks and workers, shuffled through a buffer. Deterministic for a seed, world size
//!   and worker count; resumable to the sample.
//! - **Indexed** (synthetic scenes, CSV/TSV, JSONL, image folders: a list of samples, each
//!   readable on its own). Independent of the worker count, and W ranks see exactly what one
//!   rank with a W times larger batch sees.
//!
//! The order itself is planned in `plan/` (indexed: `plan/indexed.rs`, the contract
//! distributed exactness relies on; streamed: `plan/stream.rs`); the threads that follow the
//! plan are in `pipeline/`. The loader starts them, hands their batches out in order, and
//! knows where it stands.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::DataError;
use crate::formats::image::DEFAULT_MAX_PIXELS;
use crate::pipeline::indexed::{self, IndexedPipeline, IndexedSpec};
use crate::pipeline::streamed::{self, StreamMsg, StreamPipeline, StreamSpec};
use crate::pipeline::{BufferPool, PREFETCH_BATCHES};
use crate::plan::indexed::Plan;
use crate::plan::stream::{ShardOptions, StreamPlan};
use crate::plan::{check_config, Batch, LoaderConfig, LoaderState};
use crate::skip::SkipCounts;
use crate::sources::shards::ShardSet;
use crate::sources::{DataSource, Dataset};
use crate::tokenizer::Tokenizer;
use crate::transform::{ImageTransform, Preprocess};

/// Deterministic, resumable batches for one rank, from a streamed or an indexed source.
pub struct Loader {
    order: Order,
    tokenizer: Tokenizer,
    cfg: LoaderConfig,
    state: LoaderState,
    /// Started on the first batch request, from `state`; stopped by `restore` and drop.
    pipeline: Option<Running>,
    /// Image buffers of consumed batches, for the pipeline to fill again.
    batch_buffers: BufferPool,
}

/// What decides the order of samples.
enum Order {
    Indexed { dataset: Arc<dyn Dataset>, plan: Arc<Plan> },
    Streamed(Arc<StreamPlan>),
}

/// What the pipeline handed over.
enum Received {
    Batch(Batch),
    /// An eval pass ended; the loader's position for the next pass.
    EndOfPass(LoaderState),
    /// Every stage ended before the pass did: a thread died.
    ThreadsGone,
}

enum Running {
    Indexed(IndexedPipeline),
    Streamed(StreamPipeline),
}

impl Loader {
    /// A loader over a source of either kind; `shards` applies to streamed ones.
    pub fn open(
        source: &DataSource,
        shards: &ShardOptions,
        tokenizer: Tokenizer,
        cfg: LoaderConfig,
    ) -> Result<Self, DataError> {
        match source {
            DataSource::Indexed(dataset) => Self::new(Arc::clone(dataset), tokenizer, cfg),
            DataSource::Shards(set) => Self::streaming(set.clone(), shards, tokenizer, cfg),
        }
    }

    /// A loader over an indexed dataset.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        tokenizer: Tokenizer,
        cfg: LoaderConfig,
    ) -> Result<Self, DataError> {
        let plan = Plan::new(&cfg, dataset.len())?;
        Ok(Self {
            order: Order::Indexed { dataset, plan: Arc::new(plan) },
            tokenizer,
            cfg,
            state: LoaderState::default(),
            pipeline: None,
            batch_buffers: BufferPool::new(PREFETCH_BATCHES + 2),
        })
    }

    /// A loader streaming WebDataset shards.
    pub fn streaming(
        shards: ShardSet,
        options: &ShardOptions,
        tokenizer: Tokenizer,
        cfg: LoaderConfig,
    ) -> Result<Self, DataError> {
        check_config(&cfg)?;
        let plan = StreamPlan::new(
            shards,
            options,
            cfg.rank,
            cfg.world_size,
            cfg.workers.max(1),
            cfg.seed,
            cfg.train,
        )?;
        let state = LoaderState::of_stream(&plan.start());
        Ok(Self {
            order: Order::Streamed(Arc::new(plan)),
            tokenizer,
            cfg,
            state,
            pipeline: None,
            batch_buffers: BufferPool::new(PREFETCH_BATCHES + 2),
        })
    }

    /// Samples this rank reads per epoch, skips included (the first epoch's, for shards:
    /// epochs deal shards anew and may differ by a shard's worth).
    pub fn samples_per_epoch(&self) -> u64 {
        match &self.order {
            Order::Indexed { plan, .. } => plan.batches_per_epoch * plan.batch_size as u64,
            Order::Streamed(plan) => plan.rank_samples(0),
        }
    }

    /// Batches in one epoch for this rank (indexed train: `len / G`; eval: `ceil(len / G)`;
    /// streamed: [`samples_per_epoch`](Self::samples_per_epoch) over the batch size).
    pub fn batches_per_epoch(&self) -> u64 {
        match &self.order {
            Order::Indexed { plan, .. } => plan.batches_per_epoch,
            Order::Streamed(plan) => plan.rank_samples(0) / self.cfg.batch_size as u64,
        }
    }

    /// Samples in the whole source (all ranks).
    pub fn dataset_len(&self) -> u64 {
        match &self.order {
            Order::Indexed { plan, .. } => plan.len as u64,
            Order::Streamed(plan) => plan.shards.total_samples(),
        }
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Samples lost while the source was opened (entries of a list that cannot be used,
    /// shards that cannot be read); report them once, beside the per-batch counts.
    pub fn load_skips(&self) -> SkipCounts {
        match &self.order {
            Order::Indexed { dataset, .. } => dataset.load_skips(),
            Order::Streamed(plan) => plan.shards.open_skips.clone(),
        }
    }

    /// The next batch. Train: endless, rolling over epochs. Eval: the batches of one pass,
    /// then `Err(DataError::EndOfEpoch)` once, after which the next pass starts; prefer
    /// [`next_eval_batch`](Self::next_eval_batch) there.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        match self.next_in_pass()? {
            Some(batch) => Ok(batch),
            None => Err(DataError::EndOfEpoch { epoch: self.state.epoch - 1 }),
        }
    }

    /// The next batch of the pass, or `None` at its end (the call after that starts the next
    /// pass, as epoch + 1).
    pub fn next_eval_batch(&mut self) -> Result<Option<Batch>, DataError> {
        self.next_in_pass()
    }

    /// The next batch, or `None` at the end of an eval pass (a train loader's pass never ends).
    fn next_in_pass(&mut self) -> Result<Option<Batch>, DataError> {
        if let Order::Indexed { plan, .. } = &self.order {
            if !plan.train && self.state.batch_in_epoch >= plan.batches_per_epoch {
                self.stop_pipeline()?;
                self.state = LoaderState::at(self.state.epoch + 1, 0);
                return Ok(None);
            }
        }
        if self.pipeline.is_none() {
            self.pipeline = Some(self.start_pipeline()?);
        }
        let result = match self.pipeline.as_ref() {
            Some(Running::Indexed(p)) => self.received_indexed(p.recv()),
            Some(Running::Streamed(p)) => self.received_streamed(p.recv()),
            None => Err(DataError::Pipeline("the loader pipeline did not start".into())),
        };
        match result {
            Ok(Received::Batch(batch)) => Ok(Some(batch)),
            Ok(Received::EndOfPass(next_pass)) => {
                self.stop_pipeline()?;
                self.state = next_pass;
                Ok(None)
            }
            Ok(Received::ThreadsGone) => {
                // Every stage ended before the pass did: a thread died. Its panic message,
                // if any, is the better error.
                self.stop_pipeline()?;
                Err(DataError::Pipeline(format!(
                    "the loader threads stopped before batch {} of epoch {}",
                    self.state.batch_in_epoch, self.state.epoch
                )))
            }
            Err(e) => {
                // The pipeline reported an error (e.g. too many skips). Tear it down; a later
                // call starts again from the same position.
                let _ = self.stop_pipeline();
                Err(e)
            }
        }
    }

    fn received_indexed(
        &mut self,
        received: Option<Result<Batch, DataError>>,
    ) -> Result<Received, DataError> {
        let Order::Indexed { plan, .. } = &self.order else {
            return Err(DataError::Pipeline("indexed pipeline on a streamed loader".into()));
        };
        match received {
            Some(Ok(batch)) => {
                if batch.position != self.state {
                    return Err(DataError::Pipeline(format!(
                        "pipeline produced batch {:?} while {:?} was due",
                        batch.position, self.state
                    )));
                }
                self.state = plan.advance(&self.state);
                Ok(Received::Batch(batch))
            }
            Some(Err(e)) => Err(e),
            None => Ok(Received::ThreadsGone),
        }
    }

    fn received_streamed(
        &mut self,
        received: Option<Result<StreamMsg, DataError>>,
    ) -> Result<Received, DataError> {
        let Order::Streamed(plan) = &self.order else {
            return Err(DataError::Pipeline("streamed pipeline on an indexed loader".into()));
        };
        match received {
            Some(Ok(StreamMsg::Batch(batch, after))) => {
                self.state = LoaderState::of_stream(&after);
                Ok(Received::Batch(batch))
            }
            Some(Ok(StreamMsg::EndOfPass)) => {
                let mut next = plan.start();
                next.epoch = self.state.epoch + 1;
                Ok(Received::EndOfPass(LoaderState::of_stream(&next)))
            }
            Some(Err(e)) => Err(e),
            None => Ok(Received::ThreadsGone),
        }
    }

    /// Hands a consumed batch's image buffer back for a later batch to be written into
    /// (optional: a dropped batch is simply freed). Saves zeroing and faulting in tens of
    /// megabytes per batch.
    pub fn recycle(&self, batch: Batch) {
        self.batch_buffers.give(batch.images);
    }

    /// The position of the next batch `next_batch` will return: what the caller consumed,
    /// not what is prefetched.
    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    /// Continues from `state` (from [`state`](Self::state), e.g. via a checkpoint): the
    /// following batches are exactly those an uninterrupted loader would have returned.
    /// Prefetched work is dropped. A streamed position saved under another worker count,
    /// world size or set of shards cannot continue exactly; the loader then warns and starts
    /// the next epoch afresh.
    pub fn restore(&mut self, state: &LoaderState) -> Result<(), DataError> {
        let restored = match &self.order {
            Order::Indexed { plan, .. } => {
                if state.stream.is_some() {
                    tracing::warn!(
                        "the saved loader position is for streamed shards, the data now is not; \
                         starting epoch {}",
                        state.epoch + 1
                    );
                    LoaderState::at(state.epoch + 1, 0)
                } else {
                    let end = if plan.train {
                        plan.batches_per_epoch - 1
                    } else {
                        plan.batches_per_epoch
                    };
                    if state.batch_in_epoch > end {
                        return Err(DataError::Restore {
                            epoch: state.epoch,
                            batch_in_epoch: state.batch_in_epoch,
                            message: format!(
                                "an epoch has only {} batches here (dataset of {} samples, \
                                 global batch {}); was the batch size or world size changed?",
                                plan.batches_per_epoch, plan.len, plan.global_batch
                            ),
                        });
                    }
                    state.clone()
                }
            }
            Order::Streamed(plan) => {
                let why = match &state.stream {
                    None => Some("it holds no stream position".to_owned()),
                    Some(cursor) => plan.mismatch(cursor),
                };
                match why {
                    None => state.clone(),
                    Some(why) => {
                        tracing::warn!(
                            "the saved loader position cannot be continued exactly ({why}); \
                             starting epoch {} from its beginning",
                            state.epoch + 1
                        );
                        let mut fresh = plan.start();
                        fresh.epoch = state.epoch + 1;
                        LoaderState::of_stream(&fresh)
                    }
                }
            }
        };
        self.stop_pipeline()?;
        self.state = restored;
        Ok(())
    }

    fn start_pipeline(&self) -> Result<Running, DataError> {
        let mut preprocess =
            self.cfg.preprocess.clone().unwrap_or_else(|| Preprocess::openai(self.cfg.image_size));
        preprocess.size = self.cfg.image_size;
        let transform = if self.cfg.train {
            ImageTransform::train_for(&preprocess)
        } else {
            ImageTransform::eval_for(&preprocess)
        };
        match &self.order {
            Order::Indexed { dataset, plan } => {
                Ok(Running::Indexed(indexed::spawn(IndexedSpec {
                    dataset: Arc::clone(dataset),
                    tokenizer: self.tokenizer.clone(),
                    transform,
                    plan: Arc::clone(plan),
                    context_length: self.cfg.context_length,
                    workers: self.cfg.workers.clamp(1, self.cfg.batch_size),
                    start: self.state.clone(),
                    batch_buffers: self.batch_buffers.clone(),
                })?))
            }
            Order::Streamed(plan) => {
                let start = match &self.state.stream {
                    Some(cursor) => cursor.clone(),
                    None => plan.start(),
                };
                Ok(Running::Streamed(streamed::spawn(StreamSpec {
                    plan: Arc::clone(plan),
                    tokenizer: self.tokenizer.clone(),
                    transform,
                    context_length: self.cfg.context_length,
                    batch_size: self.cfg.batch_size,
                    max_pixels: DEFAULT_MAX_PIXELS,
                    start,
                    batch_buffers: self.batch_buffers.clone(),
                })?))
            }
        }
    }

    fn stop_pipeline(&mut self) -> Result<(), DataError> {
        match self.pipeline.take() {
            Some(Running::Indexed(p)) => p.shutdown(),
            Some(Running::Streamed(p)) => p.shutdown(),
            None => Ok(()),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if let Err(e) = self.stop_pipeline() {
            tracing::error!("data loader shutdown: {e}");
        }
    }
}

/// What [`measure_throughput`] saw.
#[derive(Clone, Debug, PartialEq)]
pub struct Throughput {
    pub batches: u64,
    pub samples: u64,
    pub elapsed: Duration,
    pub samples_per_second: f64,
}

/// Pulls `batches` batches as fast as the loader makes them and reports the rate: a quick
/// check of data speed without a model. Starts wherever the loader stands.
pub fn measure_throughput(loader: &mut Loader, batches: u64) -> Result<Throughput, DataError> {
    let start = Instant::now();
    let mut samples = 0u64;
    let mut done = 0u64;
    while done < batches {
        match loader.next_in_pass()? {
            Some(batch) => {
                samples += batch.batch_size as u64;
                loader.recycle(batch);
            }
            None => continue,
        }
        done += 1;
    }
    let elapsed = start.elapsed();
    Ok(Throughput {
        batches: done,
        samples,
        elapsed,
        samples_per_second: samples as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::skip::SkipReason;
    use crate::sources::{Sample, SyntheticDataset};

    /// A word-level tokenizer over the synthetic captions' words, so these tests need no
    /// vocabulary download.
    pub(crate) fn test_tokenizer() -> Tokenizer {
        let words = "a an of photo drawing picture image rendering large small red green blue yellow \
                     purple orange circle square triangle cross above below to the left right . thing";
        let mut vocab = serde_json::Map::new();
        for (i, w) in ["[UNK]", "<|startoftext|>", "<|endoftext|>"]
            .iter()
            .chain(words.split_whitespace().collect::<Vec<_>>().iter())
            .enumerate()
        {
            vocab.insert((*w).to_owned(), serde_json::json!(i));
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        Tokenizer::from_tokenizer_json_bytes(json.to_string().as_bytes()).unwrap()
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
            seed: 17,
            image_size: 16,
            context_length: 12,
            workers,
            train,
            preprocess: None,
        }
    }

    fn synthetic(len: usize) -> Arc<dyn Dataset> {
        Arc::new(SyntheticDataset::new(len, 5, 20))
    }

    fn take(loader: &mut Loader, n: usize) -> Vec<Batch> {
        (0..n).map(|_| loader.next_batch().unwrap()).collect()
    }

    /// Fails on every index divisible by `every`, like a dataset with broken JPEGs.
    struct Flaky {
        inner: SyntheticDataset,
        every: usize,
    }

    impl Dataset for Flaky {
        fn len(&self) -> usize {
            self.inner.len()
        }
        fn get(&self, index: usize) -> Result<Sample, SkipReason> {
            if index % self.every == 0 {
                Err(SkipReason::UndecodableImage)
            } else {
                self.inner.get(index)
            }
        }
    }

    #[test]
    fn batches_have_the_promised_shapes() {
        let mut loader =
            Loader::new(synthetic(23), test_tokenizer(), cfg(4, 0, 1, 2, true)).unwrap();
        assert_eq!(loader.batches_per_epoch(), 5);
        let b = loader.next_batch().unwrap();
        assert_eq!(b.batch_size, 4);
        assert_eq!(b.images.len(), 4 * 3 * 16 * 16);
        assert_eq!(b.tokens.len(), 4 * 12);
        assert_eq!(b.labels.len(), 4);
        assert!(b.labels.iter().all(|l| (0..24).contains(l)));
        // SOT first, EOT somewhere, zero padding after it.
        assert_eq!(b.tokens[0], 1);
        assert!(b.tokens[..12].contains(&2));
        assert!(b.images.iter().all(|v| v.is_finite() && v.abs() < 3.0));
        assert!(b.skipped.is_empty());
    }

    #[test]
    fn same_seed_same_batches_whatever_the_worker_count() {
        let run = |workers| {
            let mut loader =
                Loader::new(synthetic(20), test_tokenizer(), cfg(3, 0, 1, workers, true)).unwrap();
            take(&mut loader, 9) // 6 batches per epoch: crosses into epoch 1
        };
        let a = run(1);
        assert!(a == run(1));
        assert!(a == run(3));
        assert_eq!(a[6].position, LoaderState::at(1, 0));
        // Each epoch visits distinct samples, in a new order.
        let epoch0: Vec<u64> = a[..6].iter().flat_map(|b| b.indices.clone()).collect();
        let mut sorted = epoch0.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 18);
        let epoch1: Vec<u64> = a[6..9].iter().flat_map(|b| b.indices.clone()).collect();
        assert_ne!(&epoch0[..9], &epoch1[..]);
        // Another seed, other batches.
        let mut other = cfg(3, 0, 1, 2, true);
        other.seed = 18;
        let mut loader = Loader::new(synthetic(20), test_tokenizer(), other).unwrap();
        assert!(loader.next_batch().unwrap().indices != a[0].indices);
    }

    #[test]
    fn an_interrupted_epoch_serves_every_sample_exactly_once_over_all_ranks() {
        // 2 ranks x batch 3 over 20 samples: 3 global batches of 6 per epoch (2 dropped).
        // Stop after one batch, resume from the saved state, finish the epoch.
        let (len, world, n) = (20usize, 2usize, 3usize);
        let mut seen = Vec::new();
        for rank in 0..world {
            let mut first =
                Loader::new(synthetic(len), test_tokenizer(), cfg(n, rank, world, 2, true))
                    .unwrap();
            let per_epoch = first.batches_per_epoch() as usize;
            assert_eq!(per_epoch, len / (n * world));
            seen.extend(first.next_batch().unwrap().indices);
            let state = first.state();
            drop(first);
            let mut resumed =
                Loader::new(synthetic(len), test_tokenizer(), cfg(n, rank, world, 1, true))
                    .unwrap();
            resumed.restore(&state).unwrap();
            for _ in 1..per_epoch {
                seen.extend(resumed.next_batch().unwrap().indices);
            }
        }
        let mut unique = seen.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "a sample was served twice: {seen:?}");
        assert_eq!(seen.len(), (len / (n * world)) * n * world);
    }

    #[test]
    fn restore_continues_exactly_as_if_never_stopped() {
        let mut straight =
            Loader::new(synthetic(14), test_tokenizer(), cfg(4, 0, 1, 2, true)).unwrap();
        let expected = take(&mut straight, 8);

        let mut first =
            Loader::new(synthetic(14), test_tokenizer(), cfg(4, 0, 1, 3, true)).unwrap();
        let head = take(&mut first, 4);
        // Let the pipeline prefetch; the state is still what was consumed.
        std::thread::sleep(Duration::from_millis(100));
        let state = first.state();
        assert_eq!(state, LoaderState::at(1, 1));
        let saved = serde_json::to_string(&state).unwrap();
        drop(first);

        let mut resumed =
            Loader::new(synthetic(14), test_tokenizer(), cfg(4, 0, 1, 1, true)).unwrap();
        resumed.restore(&serde_json::from_str(&saved).unwrap()).unwrap();
        let tail = take(&mut resumed, 4);
        assert!(head.iter().chain(tail.iter()).eq(expected.iter()));

        // Restoring a running loader backwards replays the same batches.
        resumed.restore(&LoaderState::at(0, 2)).unwrap();
        assert!(resumed.next_batch().unwrap() == expected[2]);
        assert!(resumed.restore(&LoaderState::at(0, 3)).is_err());
    }

    #[test]
    fn ranks_split_the_global_batch() {
        let mut single =
            Loader::new(synthetic(30), test_tokenizer(), cfg(6, 0, 1, 2, true)).unwrap();
        let mut rank0 =
            Loader::new(synthetic(30), test_tokenizer(), cfg(3, 0, 2, 2, true)).unwrap();
        let mut rank1 =
            Loader::new(synthetic(30), test_tokenizer(), cfg(3, 1, 2, 1, true)).unwrap();
        assert_eq!(rank0.batches_per_epoch(), single.batches_per_epoch());
        for _ in 0..7 {
            let (s, a, b) = (
                single.next_batch().unwrap(),
                rank0.next_batch().unwrap(),
                rank1.next_batch().unwrap(),
            );
            assert_eq!(a.position, s.position);
            assert_eq!([a.indices.clone(), b.indices.clone()].concat(), s.indices);
            assert!([a.images.clone(), b.images.clone()].concat() == s.images);
            assert_eq!([a.tokens.clone(), b.tokens.clone()].concat(), s.tokens);
            assert_eq!([a.labels.clone(), b.labels.clone()].concat(), s.labels);
        }
    }

    #[test]
    fn unusable_samples_are_replaced_and_counted() {
        let flaky = || -> Arc<dyn Dataset> {
            Arc::new(Flaky { inner: SyntheticDataset::new(40, 5, 20), every: 4 })
        };
        let run = |workers| {
            let mut loader =
                Loader::new(flaky(), test_tokenizer(), cfg(5, 0, 1, workers, true)).unwrap();
            take(&mut loader, 8)
        };
        let batches = run(2);
        assert!(batches == run(1));
        let mut skipped = 0;
        for b in &batches {
            assert_eq!(b.batch_size, 5);
            assert!(b.indices.iter().all(|i| i % 4 != 0));
            skipped += b.skipped.get("undecodable_image").copied().unwrap_or(0);
        }
        assert!(skipped > 0);

        // Nothing usable at all: an error, not a hang or a panic.
        let broken: Arc<dyn Dataset> =
            Arc::new(Flaky { inner: SyntheticDataset::new(10, 5, 20), every: 1 });
        let mut loader = Loader::new(broken, test_tokenizer(), cfg(2, 0, 1, 2, true)).unwrap();
        let err = loader.next_batch().unwrap_err();
        assert!(matches!(err, DataError::TooManySkips { attempts: 10, .. }), "{err}");
    }

    #[test]
    fn eval_keeps_the_last_partial_batch_and_covers_every_sample_once() {
        let dataset = synthetic(11);
        let mut covered = Vec::new();
        for rank in 0..2 {
            let mut loader =
                Loader::new(Arc::clone(&dataset), test_tokenizer(), cfg(3, rank, 2, 2, false))
                    .unwrap();
            assert_eq!(loader.batches_per_epoch(), 2);
            let mut sizes = Vec::new();
            while let Some(b) = loader.next_eval_batch().unwrap() {
                sizes.push(b.batch_size);
                assert_eq!(b.images.len(), b.batch_size * 3 * 16 * 16);
                covered.extend(b.indices);
            }
            assert_eq!(sizes, if rank == 0 { vec![3, 3] } else { vec![3, 2] });
            assert_eq!(loader.state(), LoaderState::at(1, 0));
            // The next pass starts over, identical.
            let again = loader.next_eval_batch().unwrap().unwrap();
            assert_eq!(again.indices, if rank == 0 { vec![0, 1, 2] } else { vec![3, 4, 5] });
        }
        covered.sort();
        assert_eq!(covered, (0..11).collect::<Vec<u64>>());
        // next_batch says where the pass ended.
        let mut loader =
            Loader::new(synthetic(4), test_tokenizer(), cfg(4, 0, 1, 1, false)).unwrap();
        loader.next_batch().unwrap();
        assert!(matches!(loader.next_batch(), Err(DataError::EndOfEpoch { epoch: 0 })));
        assert_eq!(loader.next_batch().unwrap().position.epoch, 1);
    }

    #[test]
    fn bad_configs_are_errors() {
        let tok = test_tokenizer();
        for (c, len) in [
            (cfg(0, 0, 1, 1, true), 10),
            (cfg(4, 2, 2, 1, true), 10),
            (cfg(4, 0, 0, 1, true), 10),
            (cfg(6, 0, 2, 1, true), 10),
            (cfg(4, 0, 1, 1, false), 0),
        ] {
            assert!(Loader::new(synthetic(len), tok.clone(), c.clone()).is_err(), "{c:?}");
        }
    }

    #[test]
    fn a_panicking_dataset_is_an_error_naming_the_thread() {
        struct Panics;
        impl Dataset for Panics {
            fn len(&self) -> usize {
                8
            }
            fn get(&self, _: usize) -> Result<Sample, SkipReason> {
                panic!("dataset bug")
            }
        }
        let mut loader =
            Loader::new(Arc::new(Panics), test_tokenizer(), cfg(2, 0, 1, 2, true)).unwrap();
        let err = loader.next_batch().unwrap_err().to_string();
        assert!(err.contains("worker") && err.contains("dataset bug"), "{err}");
    }

    #[test]
    fn throughput_helper_counts_samples() {
        let mut loader =
            Loader::new(synthetic(12), test_tokenizer(), cfg(4, 0, 1, 2, true)).unwrap();
        let t = measure_throughput(&mut loader, 5).unwrap();
        assert_eq!((t.batches, t.samples), (5, 20));
        assert!(t.samples_per_second > 0.0);
        assert_eq!(loader.state(), LoaderState::at(1, 2));
    }
}
