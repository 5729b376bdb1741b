//! Streaming shards: which shards each worker of each rank reads in an epoch, and in what
//! order it hands out their samples. Pure bookkeeping over sample counts (see
//! `sources/shards.rs`), no I/O; the threads that follow the plan live in `pipeline/streamed.rs`.
//!
//! An epoch, for `S = world_size x workers` streams:
//!
//! - **Units.** The shard order is shuffled from `(seed, epoch)` (train) or kept (eval). With
//!   at least `S` shards a unit is a shard. With fewer, each shard is cut into
//!   `k = ceil(S / shards)` stripes (sample `o` of a shard belongs to stripe `o mod k`), so
//!   that no stream idles and no sample is served twice. Units are dealt round-robin to
//!   ranks, then to each rank's workers.
//! - **Resampled** (train only): instead, each worker draws whole shards with replacement,
//!   weighted by their source's upsampling factor, until it has its share of
//!   `samples_per_epoch`; the last draw is cut short. Draws come from
//!   `(seed, epoch, rank, worker)`.
//! - **Reads.** A worker reads its units' samples in order, sequentially: read `j` is the
//!   `j`-th sample of that concatenation.
//! - **Draws.** A shuffle buffer of `shuffle_buffer` samples sits between reads and output:
//!   fill it, then repeatedly emit a random one and refill ([`ShuffleBuffer`], seeded from
//!   `(seed, epoch, rank, worker)`). Eval uses a buffer of one: read order.
//!
//! The emitted order depends only on the counts, the seed, the epoch, the rank, the world
//! size and the worker count. So a worker's position is one number, its next draw, and the
//! buffer's contents at that draw are recomputed from it ([`ShuffleBuffer::skip`]): resume
//! re-reads at most the buffer's span of shards, decodes nothing twice, and continues with
//! exactly the samples the uninterrupted run would have produced.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::seed::mix;
use crate::sources::shards::{CountHints, ShardSet};

/// Stream tags, so that the shard shuffle, the resampling and the sample shuffle draw from
/// unrelated random streams.
const SHARD_ORDER: u64 = 0x7368_6172_6473; // "shards"
const RESAMPLE: u64 = 0x7265_7361_6d70; // "resamp"
const SAMPLE_ORDER: u64 = 0x7361_6d70_6c65; // "sample"

/// How shards are streamed (the `data:` keys of a run config that concern shards).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardOptions {
    /// Samples each worker holds to shuffle within (open_clip: 5000). 1 reads in order.
    pub shuffle_buffer: usize,
    /// Draw shards with replacement for each epoch (open_clip's `--dataset-resampled`).
    pub resampled: bool,
    /// Relative sampling weight of each `::` source, with `resampled` (open_clip's
    /// `--train-data-upsampling-factors`). Default: 1 for every source.
    pub upsampling_factors: Option<Vec<f64>>,
    /// Samples in a (virtual) epoch with `resampled` (open_clip's `--train-num-samples`).
    /// Default: the samples in all shards. Also what `pipe:` shards without a count are
    /// assumed to hold together, so that they are not read once to count them.
    pub samples_per_epoch: Option<u64>,
    /// A sizes file (`{"00000.tar": n}`, webdataset's `sizes.json`) giving shard counts.
    pub shard_sizes: Option<std::path::PathBuf>,
    /// How long a shard read may wait for a byte before the shard is skipped as stalled
    /// (`data.read_timeout_s`); `None`: for ever.
    pub read_timeout: Option<std::time::Duration>,
}

/// open_clip's `_SAMPLE_SHUFFLE_SIZE`.
pub const DEFAULT_SHUFFLE_BUFFER: usize = 5000;

impl Default for ShardOptions {
    fn default() -> Self {
        Self {
            shuffle_buffer: DEFAULT_SHUFFLE_BUFFER,
            resampled: false,
            upsampling_factors: None,
            samples_per_epoch: None,
            shard_sizes: None,
            read_timeout: crate::sources::shards::default_read_timeout(),
        }
    }
}

impl ShardOptions {
    /// What of these options spares reading shards to count them, and the read deadline.
    pub fn count_hints(&self) -> CountHints {
        CountHints {
            sizes_file: self.shard_sizes.clone(),
            samples_per_epoch: self.samples_per_epoch,
            read_timeout: self.read_timeout,
        }
    }
}

/// A worker's share of one shard: the samples `o < take` with `o mod stripes == stripe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Unit {
    pub shard: u32,
    pub stripe: u64,
    pub stripes: u64,
    /// Samples of the shard considered (its count, or fewer for a resampled draw cut short).
    pub take: u64,
}

impl Unit {
    /// Samples this unit contributes.
    pub fn reads(&self) -> u64 {
        if self.take > self.stripe {
            (self.take - self.stripe).div_ceil(self.stripes)
        } else {
            0
        }
    }

    /// Whether sample `ordinal` of the shard is in this unit.
    pub fn contains(&self, ordinal: u64) -> bool {
        ordinal < self.take && ordinal % self.stripes == self.stripe
    }
}

/// The validated numbers the stream threads share.
#[derive(Clone, Debug)]
pub(crate) struct StreamPlan {
    pub shards: ShardSet,
    /// Global index of each shard's first sample.
    pub offsets: Vec<u64>,
    pub rank: usize,
    pub world_size: usize,
    pub workers: usize,
    pub seed: u64,
    pub shuffle_buffer: usize,
    pub train: bool,
    /// With resampling: each shard's weight and each worker's samples per epoch.
    resampling: Option<Resampling>,
}

#[derive(Clone, Debug)]
struct Resampling {
    /// Cumulative shard weights, for drawing by bisection.
    cumulative: Vec<f64>,
    per_worker: u64,
}

impl StreamPlan {
    pub fn new(
        shards: ShardSet,
        options: &ShardOptions,
        rank: usize,
        world_size: usize,
        workers: usize,
        seed: u64,
        train: bool,
    ) -> Result<Self, DataError> {
        let total = shards.total_samples();
        if total == 0 {
            return Err(DataError::Config(format!(
                "the shards of `{}` hold no readable samples",
                shards.sources.join("::")
            )));
        }
        if u32::try_from(shards.shards.len()).is_err() {
            return Err(DataError::Config("more than 2^32 shards".into()));
        }
        if options.shuffle_buffer == 0 {
            return Err(DataError::Config(
                "shuffle_buffer must be at least 1 (1 reads in order)".into(),
            ));
        }
        let streams = (world_size * workers) as u64;
        let resampling = if options.resampled && train {
            let factors = match &options.upsampling_factors {
                Some(f) if f.len() != shards.sources.len() => {
                    return Err(DataError::Config(format!(
                        "upsampling_factors has {} value(s) but the data has {} `::` source(s)",
                        f.len(),
                        shards.sources.len()
                    )))
                }
                Some(f) => f.clone(),
                None => vec![1.0; shards.sources.len()],
            };
            if let Some(bad) = factors.iter().find(|f| !f.is_finite() || **f < 0.0) {
                return Err(DataError::Config(format!(
                    "upsampling factor {bad} is not a finite number >= 0"
                )));
            }
            let mut acc = 0.0;
            let cumulative = shards
                .shards
                .iter()
                .map(|s| {
                    // An empty shard is never drawn: it would give nothing.
                    if s.samples > 0 {
                        acc += factors[s.source];
                    }
                    acc
                })
                .collect();
            if acc <= 0.0 {
                return Err(DataError::Config(
                    "every upsampling factor of a source with samples is 0".into(),
                ));
            }
            let per_epoch = options.samples_per_epoch.unwrap_or(total);
            if per_epoch == 0 {
                return Err(DataError::Config("samples_per_epoch must be positive".into()));
            }
            Some(Resampling { cumulative, per_worker: per_epoch.div_ceil(streams) })
        } else {
            if options.upsampling_factors.is_some() && train {
                return Err(DataError::Config(
                    "upsampling_factors needs resampled: true (as in open_clip)".into(),
                ));
            }
            None
        };
        Ok(Self {
            offsets: shards.offsets(),
            shards,
            rank,
            world_size,
            workers,
            seed,
            shuffle_buffer: if train { options.shuffle_buffer } else { 1 },
            train,
            resampling,
        })
    }

    /// The units worker `worker` of this rank reads in `epoch`, in order.
    pub fn units(&self, epoch: u64, worker: usize) -> Vec<Unit> {
        if let Some(r) = &self.resampling {
            return self.resampled_units(r, epoch, worker);
        }
        let n = self.shards.shards.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        if self.train {
            shuffle(&mut order, mix(&[self.seed, epoch, SHARD_ORDER]));
        }
        let streams = self.world_size * self.workers;
        let stripes = if n >= streams { 1 } else { streams.div_ceil(n) } as u64;
        let mut units = Vec::new();
        let mut i = 0usize;
        for &shard in &order {
            for stripe in 0..stripes {
                // Deal to ranks first, then to the rank's workers.
                if i % self.world_size == self.rank
                    && (i / self.world_size) % self.workers == worker
                {
                    units.push(Unit {
                        shard,
                        stripe,
                        stripes,
                        take: self.shards.shards[shard as usize].samples,
                    });
                }
                i += 1;
            }
        }
        units
    }

    fn resampled_units(&self, r: &Resampling, epoch: u64, worker: usize) -> Vec<Unit> {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[
            self.seed,
            epoch,
            self.rank as u64,
            worker as u64,
            RESAMPLE,
        ]));
        let total = r.cumulative.last().copied().unwrap_or(0.0);
        let mut units = Vec::new();
        let mut left = r.per_worker;
        while left > 0 {
            let x = rng.gen::<f64>() * total;
            let shard = r.cumulative.partition_point(|&c| c <= x).min(r.cumulative.len() - 1);
            let samples = self.shards.shards[shard].samples;
            if samples == 0 {
                continue; // only reachable through rounding at a boundary
            }
            let take = samples.min(left);
            left -= take;
            units.push(Unit { shard: shard as u32, stripe: 0, stripes: 1, take });
        }
        units
    }

    /// The shuffle buffer of worker `worker` for `epoch`, over `reads` samples.
    pub fn shuffle_buffer(&self, epoch: u64, worker: usize, reads: u64) -> ShuffleBuffer {
        ShuffleBuffer::new(
            reads,
            self.shuffle_buffer,
            mix(&[self.seed, epoch, self.rank as u64, worker as u64, SAMPLE_ORDER]),
        )
    }

    /// The seed of a sample's augmentation: where it is stored, never who reads it.
    pub fn sample_seed(&self, epoch: u64, shard: u32, ordinal: u64) -> u64 {
        mix(&[self.seed, epoch, self.offsets[shard as usize] + ordinal])
    }

    /// Samples worker `worker` reads in `epoch` (before skips).
    pub fn reads(&self, epoch: u64, worker: usize) -> u64 {
        self.units(epoch, worker).iter().map(Unit::reads).sum()
    }

    /// Samples this rank reads in `epoch` (before skips).
    pub fn rank_samples(&self, epoch: u64) -> u64 {
        (0..self.workers).map(|w| self.reads(epoch, w)).sum()
    }

    /// A fresh cursor at the start of epoch 0.
    pub fn start(&self) -> StreamCursor {
        StreamCursor {
            epoch: 0,
            batch_in_epoch: 0,
            next_worker: 0,
            draws: vec![0; self.workers],
            done: vec![false; self.workers],
            rank: self.rank,
            world_size: self.world_size,
            fingerprint: self.shards.fingerprint(),
        }
    }

    /// Why `cursor` cannot continue this plan exactly, if it cannot.
    pub fn mismatch(&self, cursor: &StreamCursor) -> Option<String> {
        if cursor.draws.len() != self.workers || cursor.done.len() != self.workers {
            Some(format!(
                "it was saved with {} loader workers, this run has {}",
                cursor.draws.len(),
                self.workers
            ))
        } else if (cursor.rank, cursor.world_size) != (self.rank, self.world_size) {
            Some(format!(
                "it was saved by rank {} of {}, this is rank {} of {}",
                cursor.rank, cursor.world_size, self.rank, self.world_size
            ))
        } else if cursor.fingerprint != self.shards.fingerprint() {
            Some("the shards or their sample counts changed since".into())
        } else if cursor.next_worker >= self.workers {
            Some("its next worker is out of range".into())
        } else {
            None
        }
    }
}

/// Fisher-Yates from a seed.
fn shuffle(items: &mut [u32], seed: u64) {
    use rand::seq::SliceRandom;
    items.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
}

/// Where a streaming loader stands, as consumed by the trainer: the epoch, then per worker
/// the next draw and whether it finished the epoch, and whose sample comes next. Saved in
/// checkpoints inside [`LoaderState`](crate::LoaderState).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamCursor {
    pub epoch: u64,
    /// Batches completed since this epoch's first sample was taken (informational).
    pub batch_in_epoch: u64,
    pub next_worker: usize,
    pub draws: Vec<u64>,
    pub done: Vec<bool>,
    pub rank: usize,
    pub world_size: usize,
    /// [`ShardSet::fingerprint`] of the data it belongs to.
    pub fingerprint: u64,
}

/// A shuffle buffer over read indices `0..reads`, as webdataset's `shuffle` stage holds
/// samples: fill to `capacity`, then emit a uniformly drawn entry and refill, and drain at
/// the end. It tracks indices only; the worker keeps the samples themselves.
#[derive(Clone, Debug)]
pub(crate) struct ShuffleBuffer {
    reads: u64,
    capacity: usize,
    next_read: u64,
    held: Vec<u64>,
    rng: ChaCha8Rng,
}

impl ShuffleBuffer {
    fn new(reads: u64, capacity: usize, seed: u64) -> Self {
        Self {
            reads,
            capacity: capacity.max(1),
            next_read: 0,
            held: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The read index emitted by the next draw, or `None` when the epoch is exhausted.
    pub fn draw(&mut self) -> Option<u64> {
        while self.held.len() < self.capacity && self.next_read < self.reads {
            self.held.push(self.next_read);
            self.next_read += 1;
        }
        if self.held.is_empty() {
            return None;
        }
        let k = self.rng.gen_range(0..self.held.len());
        Some(self.held.swap_remove(k))
    }

    /// Advances past `draws` draws without emitting them (resume).
    pub fn skip(&mut self, draws: u64) {
        for _ in 0..draws {
            if self.draw().is_none() {
                break;
            }
        }
    }

    /// Reads taken into the buffer so far: every read below this has been drawn or is held.
    pub fn next_read(&self) -> u64 {
        self.next_read
    }

    /// Read indices in the buffer, not yet emitted.
    pub fn held(&self) -> &[u64] {
        &self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::skip::SkipCounts;
    use crate::sources::shards::{Shard, ShardLocation};

    fn set(counts: &[u64]) -> ShardSet {
        ShardSet {
            shards: counts
                .iter()
                .enumerate()
                .map(|(i, &samples)| Shard {
                    location: ShardLocation::File(format!("{i:05}.tar").into()),
                    samples,
                    source: 0,
                    estimated: false,
                })
                .collect(),
            sources: vec!["test".into()],
            open_skips: SkipCounts::new(),
            read_timeout: None,
        }
    }

    /// (shard, ordinal) of every sample all streams read in `epoch`.
    fn coverage(counts: &[u64], world: usize, workers: usize, epoch: u64) -> Vec<(u32, u64)> {
        let mut seen = Vec::new();
        for rank in 0..world {
            let plan = StreamPlan::new(
                set(counts),
                &ShardOptions::default(),
                rank,
                world,
                workers,
                7,
                true,
            )
            .unwrap();
            for w in 0..workers {
                let units = plan.units(epoch, w);
                assert!(!units.is_empty() || counts.iter().sum::<u64>() < (world * workers) as u64);
                for u in units {
                    seen.extend((0..u.take).filter(|&o| u.contains(o)).map(|o| (u.shard, o)));
                }
            }
        }
        seen.sort_unstable();
        seen
    }

    #[test]
    fn every_sample_is_read_once_per_epoch_whatever_the_shard_count() {
        for (counts, world, workers) in [
            (vec![10, 10, 10, 10, 10, 10, 10, 10], 2, 2), // shards >= streams
            (vec![7, 3, 9], 2, 4),                        // fewer shards: stripes
            (vec![25], 3, 2),                             // one shard, six streams
            (vec![4, 0, 5], 1, 3),                        // an empty shard
        ] {
            let all: Vec<(u32, u64)> = counts
                .iter()
                .enumerate()
                .flat_map(|(s, &n)| (0..n).map(move |o| (s as u32, o)))
                .collect();
            for epoch in 0..3 {
                assert_eq!(
                    coverage(&counts, world, workers, epoch),
                    all,
                    "{counts:?} {world}x{workers}"
                );
            }
        }
    }

    #[test]
    fn stripes_keep_every_stream_busy() {
        // 3 shards of 30 over 8 streams: 3 stripes each, 9 units, every stream gets one or two.
        for rank in 0..2 {
            let plan =
                StreamPlan::new(set(&[30, 30, 30]), &ShardOptions::default(), rank, 2, 4, 1, true)
                    .unwrap();
            for w in 0..4 {
                let reads: u64 = plan.units(0, w).iter().map(Unit::reads).sum();
                assert!((10..=20).contains(&reads), "rank {rank} worker {w}: {reads}");
            }
        }
    }

    #[test]
    fn epochs_shuffle_shard_order_and_eval_keeps_it() {
        let counts = [5u64; 12];
        let plan =
            StreamPlan::new(set(&counts), &ShardOptions::default(), 0, 1, 1, 3, true).unwrap();
        let order = |e| plan.units(e, 0).iter().map(|u| u.shard).collect::<Vec<_>>();
        assert_ne!(order(0), order(1));
        assert_eq!(order(0), order(0));
        let eval =
            StreamPlan::new(set(&counts), &ShardOptions::default(), 0, 1, 1, 3, false).unwrap();
        let in_order: Vec<u32> = eval.units(0, 0).iter().map(|u| u.shard).collect();
        assert_eq!(in_order, (0..12).collect::<Vec<_>>());
        assert_eq!(eval.shuffle_buffer, 1);
    }

    #[test]
    fn the_shuffle_buffer_permutes_locally_and_resumes_from_a_count() {
        let plan = StreamPlan::new(
            set(&[100, 100]),
            &ShardOptions { shuffle_buffer: 16, ..Default::default() },
            0,
            1,
            1,
            9,
            true,
        )
        .unwrap();
        let mut buf = plan.shuffle_buffer(0, 0, 200);
        let mut out = Vec::new();
        while let Some(r) = buf.draw() {
            // Never further ahead than the buffer reaches.
            assert!(r < out.len() as u64 + 16);
            out.push(r);
        }
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..200).collect::<Vec<_>>());
        assert_ne!(out, sorted, "shuffled");

        let mut resumed = plan.shuffle_buffer(0, 0, 200);
        resumed.skip(57);
        let held: Vec<u64> = resumed.held().to_vec();
        assert_eq!(held.len(), 15, "full, less the one just drawn");
        assert!(held.iter().all(|r| !out[..57].contains(r)));
        let rest: Vec<u64> = std::iter::from_fn(|| resumed.draw()).collect();
        assert_eq!(rest, out[57..]);
    }

    #[test]
    fn resampling_follows_the_weights_and_fills_the_epoch() {
        let mut shards = set(&[10, 10, 10, 10]);
        shards.sources = vec!["a".into(), "b".into()];
        shards.shards[2].source = 1;
        shards.shards[3].source = 1;
        let options = ShardOptions {
            resampled: true,
            upsampling_factors: Some(vec![1.0, 3.0]),
            samples_per_epoch: Some(4000),
            ..Default::default()
        };
        let plan = StreamPlan::new(shards.clone(), &options, 0, 1, 2, 5, true).unwrap();
        let mut from_b = 0u64;
        let mut total = 0u64;
        for w in 0..2 {
            for u in plan.units(0, w) {
                total += u.reads();
                if u.shard >= 2 {
                    from_b += u.reads();
                }
            }
        }
        assert_eq!(total, 4000);
        let share = from_b as f64 / total as f64;
        assert!((0.65..0.85).contains(&share), "{share}");
        assert_ne!(plan.units(0, 0), plan.units(1, 0));
        assert_ne!(plan.units(0, 0), plan.units(0, 1));

        let wrong = ShardOptions { upsampling_factors: Some(vec![1.0]), ..options.clone() };
        assert!(StreamPlan::new(shards.clone(), &wrong, 0, 1, 2, 5, true).is_err());
        let unsampled = ShardOptions { resampled: false, ..options };
        assert!(StreamPlan::new(shards, &unsampled, 0, 1, 2, 5, true).is_err());
        assert!(StreamPlan::new(set(&[0, 0]), &ShardOptions::default(), 0, 1, 1, 5, true).is_err());
    }
}
