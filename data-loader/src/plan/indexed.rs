//! The order of an indexed source (synthetic scenes, CSV/TSV, JSONL, image folders: a list
//! of samples, each readable on its own). Independent of the worker count, and W ranks see
//! exactly what one rank with a W times larger batch sees. The contract distributed
//! exactness relies on:
//!
//! - The global batch is `G = batch_size * world_size`. In train mode epoch `e` visits the
//!   dataset in the order `perm_e`, a permutation of `0..len` seeded from `(seed, e)`; global
//!   batch `k` is `perm_e[k*G .. (k+1)*G]` and the last partial global batch is dropped, so
//!   an epoch has `len / G` batches. Rank `r` takes rows `r*batch_size .. (r+1)*batch_size`
//!   of it. So W ranks together see exactly the batches one rank with `batch_size * W` sees.
//! - A sample's augmentation is seeded from `(seed, epoch, sample index)`: never from rank,
//!   worker or timing.
//! - Train: a sample that cannot be used (see [`SkipReason`]) at position `p` of the epoch is
//!   replaced by the first usable one of `perm_e[p+1], perm_e[p+2], ...` (wrapping around),
//!   with that sample's own augmentation seed. Every failed attempt is counted in
//!   [`Batch::skipped`]. The batch keeps its size, and the outcome depends only on the data.
//!   More than [`MAX_CONSECUTIVE_SKIPS`] failures in a row is an error: the data is broken,
//!   not noisy.
//! - Eval: dataset order, the eval transform, the last partial batch kept (a rank may get
//!   fewer rows, or none, in the last batch; every rank gets the same number of batches).
//!   Unusable samples are dropped from their batch and counted, not replaced, so metrics are
//!   computed on real samples only.
//!
//! The work itself (decode, augment, tokenize on `workers` threads, a couple of batches
//! ahead) happens in `pipeline/indexed.rs`; its output order depends only on the above.
//!
//! [`MAX_CONSECUTIVE_SKIPS`]: super::MAX_CONSECUTIVE_SKIPS
//! [`SkipReason`]: crate::skip::SkipReason
//! [`Batch::skipped`]: super::Batch::skipped

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{check_config, LoaderConfig, LoaderState};
use crate::error::DataError;
use crate::seed::mix;

/// The validated numbers every stage agrees on.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub len: usize,
    pub batch_size: usize,
    pub rank: usize,
    pub global_batch: usize,
    pub batches_per_epoch: u64,
    pub seed: u64,
    pub train: bool,
}

impl Plan {
    pub fn new(cfg: &LoaderConfig, len: usize) -> Result<Self, DataError> {
        check_config(cfg)?;
        let global_batch = cfg
            .batch_size
            .checked_mul(cfg.world_size)
            .ok_or_else(|| DataError::Config("batch_size * world_size overflows".into()))?;
        let batches_per_epoch =
            if cfg.train { len / global_batch } else { len.div_ceil(global_batch) } as u64;
        if batches_per_epoch == 0 {
            return Err(DataError::Config(if cfg.train {
                format!(
                    "the dataset has {len} samples, fewer than one global batch of {global_batch} \
                     (batch_size {} x world_size {})",
                    cfg.batch_size, cfg.world_size
                )
            } else {
                "the eval dataset is empty".into()
            }));
        }
        Ok(Self {
            len,
            batch_size: cfg.batch_size,
            rank: cfg.rank,
            global_batch,
            batches_per_epoch,
            seed: cfg.seed,
            train: cfg.train,
        })
    }

    /// Train: the epoch's permutation of `0..len`. Eval: `None` (dataset order).
    pub fn order(&self, epoch: u64) -> Option<Arc<Vec<usize>>> {
        self.train.then(|| {
            let mut order: Vec<usize> = (0..self.len).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(&[self.seed, epoch, 0x7065_726d])));
            Arc::new(order)
        })
    }

    /// The epoch positions this rank's rows of batch `batch_in_epoch` come from.
    pub fn rows(&self, batch_in_epoch: u64) -> std::ops::Range<usize> {
        let start = batch_in_epoch as usize * self.global_batch + self.rank * self.batch_size;
        let end = start + self.batch_size;
        if self.train {
            start..end
        } else {
            start.min(self.len)..end.min(self.len)
        }
    }

    /// The position after `pos`. Train rolls over into the next epoch; eval stops at
    /// `batches_per_epoch`.
    pub fn advance(&self, pos: &LoaderState) -> LoaderState {
        let next = pos.batch_in_epoch + 1;
        if self.train && next >= self.batches_per_epoch {
            LoaderState::at(pos.epoch + 1, 0)
        } else {
            LoaderState::at(pos.epoch, next)
        }
    }

    /// The seed of sample `index`'s augmentation in `epoch`.
    pub fn sample_seed(&self, epoch: u64, index: usize) -> u64 {
        mix(&[self.seed, epoch, index as u64])
    }
}
