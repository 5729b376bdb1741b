//! ZeRO-1/2 (`dist.shard`) over the gradient buckets: which part of each bucket a rank owns,
//! how a bucket is laid out so that a reduce-scatter hands each rank its part, and the
//! all-gather of the updated parameters.
//!
//! A bucket of N gradient values is cut into W chunks of C = ceil(N / W) (the last padded
//! with zeros); rank r owns chunk r of every bucket, so each rank's share is spread over the
//! whole model and the reduction keeps its overlap with the backward pass. Within its chunk a
//! rank owns whole or partial parameters: [`Piece`]s, each a contiguous range of one
//! parameter's flattened elements, held as a view of the parameter itself. The optimizer
//! updates those views in place, which is the whole update of the elements this rank owns;
//! the all-gather then copies every rank's pieces into every rank's parameters, so that the
//! replicated weights stay bit-identical across ranks, as without sharding.
//!
//! The flat bucket a reduce-scatter sums is W rows of C gradient values followed by the
//! bucket's P flags (1 where this rank has the parameter's gradient): each rank's row of the
//! sum then carries its values and the flags summed over every rank. The flags cost W x P
//! values, a few hundred bytes.
//!
//! Sharding changes which rank computes an update, not its arithmetic: AdamW is elementwise,
//! the sums are the collective's, and the gradient norm for clipping is the square root of
//! the ranks' partial sums of squares (a different order of summation, so it may differ from
//! the replicated norm in its last bits).

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::collectives::Collectives;
use crate::error::{Result, TrainError};

/// Rank `rank`'s share of every bucket over `world` ranks.
#[derive(Debug)]
pub(super) struct Split {
    pub(super) rank: usize,
    pub(super) world: usize,
    /// Per bucket, the chunk length C: ceil(N / W).
    pub(super) chunks: Vec<i64>,
    /// Per bucket, the total of its parameters' elements N.
    pub(super) numels: Vec<i64>,
    /// This rank's pieces, bucket after bucket.
    pub(super) pieces: Vec<Piece>,
}

/// The elements `start .. start + len` of a parameter's flattened values that one rank owns,
/// at `at` in its chunk of `bucket`.
#[derive(Debug)]
pub struct Piece {
    /// Index into the reducer's parameter list.
    pub param: usize,
    pub bucket: usize,
    pub start: i64,
    pub len: i64,
    pub(super) at: i64,
    /// `param.view(-1)[start .. start + len]`, sharing its storage.
    pub view: Tensor,
}

impl Split {
    pub(super) fn new(
        params: &[Tensor],
        buckets: &[Range<usize>],
        rank: usize,
        world: usize,
    ) -> Result<Split> {
        if world < 2 || rank >= world {
            return Err(TrainError::Config(format!(
                "dist.shard needs a world of 2 or more ranks, got rank {rank} of {world}"
            )));
        }
        if let Some(first) = params.first() {
            if let Some(other) = params.iter().find(|p| p.kind() != first.kind()) {
                return Err(TrainError::Config(format!(
                    "dist.shard needs every trainable parameter in one type: {:?} and {:?} found",
                    first.kind(),
                    other.kind()
                )));
            }
        }
        let _guard = tch::no_grad_guard();
        let w = world as i64;
        let (mut chunks, mut numels, mut pieces) = (Vec::new(), Vec::new(), Vec::new());
        for (b, range) in buckets.iter().enumerate() {
            let numel: i64 = params[range.clone()].iter().map(|p| p.numel() as i64).sum();
            let chunk = (numel + w - 1) / w;
            let mine = rank as i64 * chunk..(rank as i64 + 1) * chunk;
            let mut offset = 0;
            for i in range.clone() {
                let p = &params[i];
                let n = p.numel() as i64;
                let (lo, hi) = (offset.max(mine.start), (offset + n).min(mine.end));
                if lo < hi {
                    if !p.is_contiguous() {
                        return Err(TrainError::Config(format!(
                            "dist.shard updates parameters as flat memory, and trainable \
                             parameter #{i} of shape {:?} is not contiguous",
                            p.size()
                        )));
                    }
                    let view = p.f_detach()?.f_view([-1])?.f_narrow(0, lo - offset, hi - lo)?;
                    pieces.push(Piece {
                        param: i,
                        bucket: b,
                        start: lo - offset,
                        len: hi - lo,
                        at: lo - mine.start,
                        view,
                    });
                }
                offset += n;
            }
            chunks.push(chunk);
            numels.push(numel);
        }
        Ok(Split { rank, world, chunks, numels, pieces })
    }

    /// Bucket `b`'s gradients `grads` (N values) and flags (P values) as the W rows that a
    /// reduce-scatter sums: row r is chunk r of the gradients (zero-padded), then the flags.
    pub(super) fn rows(&self, b: usize, grads: Vec<Tensor>, flags: &Tensor) -> Result<Tensor> {
        let (w, chunk) = (self.world as i64, self.chunks[b]);
        let pad = w * chunk - self.numels[b];
        let mut parts = grads;
        if pad > 0 {
            let like =
                parts.first().map_or((Kind::Float, flags.device()), |g| (g.kind(), g.device()));
            parts.push(Tensor::f_zeros([pad], like)?);
        }
        let values = Tensor::f_cat(&parts, 0)?.f_view([w, chunk])?;
        let p = flags.numel() as i64;
        let flags = flags.f_to_kind(values.kind())?.f_view([1, p])?.f_expand([w, p], false)?;
        Ok(Tensor::f_cat(&[values, flags], 1)?.f_flatten(0, -1)?)
    }

    /// This rank's row of a summed bucket `b` laid out by [`Split::rows`]: (its C values, the
    /// P flags).
    pub(super) fn my_row(&self, b: usize, summed: &Tensor, p: i64) -> Result<(Tensor, Tensor)> {
        let chunk = self.chunks[b];
        let row = summed.f_view([self.world as i64, chunk + p])?.f_get(self.rank as i64)?;
        Ok((row.f_narrow(0, 0, chunk)?, row.f_narrow(0, chunk, p)?))
    }

    /// Every rank's chunk of a summed bucket `b` laid out by [`Split::rows`], as the bucket's N
    /// values (a copy): the all-reduced gradients of ZeRO-1.
    pub(super) fn all_rows(&self, b: usize, summed: &Tensor, p: i64) -> Result<Tensor> {
        let chunk = self.chunks[b];
        Ok(summed
            .f_view([self.world as i64, chunk + p])?
            .f_narrow(1, 0, chunk)?
            .f_reshape([-1])?
            .f_narrow(0, 0, self.numels[b])?)
    }

    /// The pieces of bucket `b`.
    pub(super) fn pieces_of(&self, b: usize) -> impl Iterator<Item = &Piece> {
        self.pieces.iter().filter(move |p| p.bucket == b)
    }

    /// Copies every rank's updated pieces into every rank's parameters: per bucket, this
    /// rank's chunk (its pieces, zero-padded) all-gathered, and the bucket's N values copied
    /// into its parameters.
    pub(super) fn gather(
        &self,
        comm: &dyn Collectives,
        params: &[Tensor],
        buckets: &[Range<usize>],
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (b, range) in buckets.iter().enumerate() {
            let Some(first) = params.get(range.start) else { continue };
            let mut parts: Vec<Tensor> =
                self.pieces_of(b).map(|p| p.view.shallow_clone()).collect();
            let filled: i64 = parts.iter().map(|t| t.numel() as i64).sum();
            if filled < self.chunks[b] {
                parts.push(Tensor::f_zeros(
                    [self.chunks[b] - filled],
                    (first.kind(), first.device()),
                )?);
            }
            let gathered = comm.all_gather(&Tensor::f_cat(&parts, 0)?)?;
            let mut offset = 0;
            for p in &params[range.clone()] {
                let n = p.numel() as i64;
                p.f_detach()?.f_view([-1])?.f_copy_(&gathered.f_narrow(0, offset, n)?)?;
                offset += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn params(sizes: &[i64]) -> Vec<Tensor> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                Tensor::arange(n, (Kind::Float, Device::Cpu))
                    .f_add_scalar(100.0 * i as f64)
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn each_rank_owns_one_chunk_of_every_bucket_and_together_all_of_it() {
        // Buckets of 7 (3 + 4) and 5 values over 3 ranks: chunks of 3 and 2.
        let ps = params(&[3, 4, 5]);
        let buckets = [0..2, 2..3];
        let mut covered = [0u8; 12];
        let mut seen = Vec::new();
        for rank in 0..3 {
            let split = Split::new(&ps, &buckets, rank, 3).unwrap();
            assert_eq!(split.chunks, [3, 2]);
            for piece in &split.pieces {
                let base = [0, 3, 7][piece.param] as usize;
                for e in piece.start..piece.start + piece.len {
                    covered[base + e as usize] += 1;
                }
                // The view is the parameter's own memory.
                assert_eq!(
                    piece.view,
                    ps[piece.param].view([-1]).narrow(0, piece.start, piece.len)
                );
                seen.push((rank, piece.param, piece.start, piece.len, piece.at));
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "{covered:?}");
        // Rank 0: param 0 whole; rank 1: param 1 [0, 3); rank 2: param 1 [3, 4) and nothing
        // more of bucket 0 (its chunk is padding after that); bucket 1's 5 values: 2, 2, 1.
        assert_eq!(
            seen,
            [
                (0, 0, 0, 3, 0),
                (0, 2, 0, 2, 0),
                (1, 1, 0, 3, 0),
                (1, 2, 2, 2, 0),
                (2, 1, 3, 1, 0),
                (2, 2, 4, 1, 0)
            ]
        );
    }

    #[test]
    fn rows_put_each_ranks_chunk_and_the_flags_in_its_row() {
        let ps = params(&[3, 4]);
        let split = Split::new(&ps, &[Range { start: 0, end: 2 }], 1, 3).unwrap();
        let grads = vec![ps[0].shallow_clone(), ps[1].shallow_clone()];
        let flags = Tensor::from_slice(&[1.0f32, 0.0]);
        let rows = split.rows(0, grads, &flags).unwrap();
        // The bucket is 0 1 2 100 101 102 103: 3 rows of (3 values + 2 flags), chunks
        // [0 1 2] [100 101 102] [103 0 0].
        let expect: Vec<f32> =
            vec![0., 1., 2., 1., 0., 100., 101., 102., 1., 0., 103., 0., 0., 1., 0.];
        assert_eq!(Vec::<f32>::try_from(&rows).unwrap(), expect);
        let (mine, flags) = split.my_row(0, &rows, 2).unwrap();
        assert_eq!(Vec::<f32>::try_from(&mine).unwrap(), [100., 101., 102.]);
        assert_eq!(Vec::<f32>::try_from(&flags).unwrap(), [1., 0.]);
        let all = split.all_rows(0, &rows, 2).unwrap();
        assert_eq!(Vec::<f32>::try_from(&all).unwrap(), [0., 1., 2., 100., 101., 102., 103.]);
    }

    #[test]
    fn one_rank_or_mixed_types_are_refused() {
        let ps = params(&[3]);
        assert!(Split::new(&ps, &[Range { start: 0, end: 1 }], 0, 1)
            .unwrap_err()
            .to_string()
            .contains("2 or more"));
        let mixed = vec![ps[0].shallow_clone(), ps[0].to_kind(Kind::BFloat16)];
        let err = Split::new(&mixed, &[Range { start: 0, end: 2 }], 0, 2).unwrap_err().to_string();
        assert!(err.contains("one type"), "{err}");
    }
}
