//! Patch dropout (FLIP: Li et al., "Scaling Language-Image Pre-training via Masking",
//! arXiv 2212.00794): in training, each image keeps a random subset of its patch tokens and
//! the image tower runs on those alone, so a step at rate p costs about (1 - p) of the image
//! tower's work. Evaluation never drops.
//!
//! Two halves, both here:
//!
//! - The draw ([`PatchDropout::kept`], [`draw`]): which patches each sample keeps, as open_clip's
//!   `PatchDropout` (open_clip/transformer.py) and timm's (timm/layers/patch_dropout.py, what
//!   open_clip's timm towers use): `max(1, int(num_patches * (1 - p)))` patches per sample, a
//!   uniformly random subset in a random order. The random numbers are not libtorch's
//!   generator, whose state no checkpoint holds: each score is a hash of (run seed, step,
//!   global sample index, patch), so the kept patches of a sample are the same whatever the
//!   world size, the per-rank batch or the micro-batch split, a resumed run draws exactly what
//!   the uninterrupted one drew, and a forward that is run again (gradient caching's second
//!   pass, activation checkpointing's recompute) sees the same tokens because it is handed the
//!   same indices.
//! - The gather ([`keep_patches`]): the towers' stems call it after the positional embedding,
//!   before ln_pre, as open_clip does. Prefix tokens (the ViT's class token; SigLIP's timm
//!   trunk has none) stay in front, then the kept patches in the order given.
//!
//! The training step draws once per step for its whole local batch and hands each
//! micro-batch its rows; every other caller of the towers passes no indices.

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Patch dropout as the training step applies it: the rate and the run's seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PatchDropout {
    /// Fraction of patch tokens dropped, in (0, 1).
    pub prob: f64,
    /// `train.seed`: with the step and the sample index, it fixes every draw.
    pub seed: u64,
}

impl PatchDropout {
    /// The patches samples `first_sample .. first_sample + n` of step `step` keep: a (n, keep)
    /// int64 tensor on `device` of positions among the `num_patches` patch tokens (the class
    /// token not counted), row i drawn for global sample `first_sample + i`.
    pub fn kept(
        &self,
        step: u64,
        first_sample: u64,
        n: i64,
        num_patches: i64,
        device: Device,
    ) -> Result<Tensor> {
        let keep = kept_count(num_patches, self.prob);
        let rows: Vec<i64> = (0..n.max(0) as u64)
            .flat_map(|i| draw(self.seed, step, first_sample + i, num_patches, keep))
            .collect();
        let host = Tensor::from_slice(&rows).view([n, keep]);
        // Page-locked and asynchronous on CUDA: no wait for the work queued before.
        crate::device::host_to_device(host, device)
    }
}

/// Patch tokens kept of `num_patches` at rate `prob`: open_clip's and timm's
/// `max(1, int(num_patches * (1 - prob)))`, the float product rounded toward zero as Python's
/// `int` does.
pub fn kept_count(num_patches: i64, prob: f64) -> i64 {
    ((num_patches as f64 * (1.0 - prob)) as i64).clamp(1, num_patches.max(1))
}

/// The `keep` patches sample `sample` keeps in step `step`: the positions of its `keep`
/// largest scores, largest first (open_clip's `randn(...).topk(keep).indices` order). Score
/// j is [`score`]`(seed, step, sample, j)`; two equal scores (a 2^-64 chance) order by position,
/// so the draw is a function of its arguments alone.
pub fn draw(seed: u64, step: u64, sample: u64, num_patches: i64, keep: i64) -> Vec<i64> {
    let base = sample_key(seed, step, sample);
    let mut scored: Vec<(u64, i64)> =
        (0..num_patches).map(|j| (splitmix64(base ^ j as u64), j)).collect();
    let keep = keep.clamp(0, num_patches) as usize;
    let by_score = |a: &(u64, i64), b: &(u64, i64)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    if keep < scored.len() && keep > 0 {
        scored.select_nth_unstable_by(keep - 1, by_score);
    }
    scored.truncate(keep);
    scored.sort_unstable_by(by_score);
    scored.into_iter().map(|(_, j)| j).collect()
}

/// Patch `patch`'s score in sample `sample` of step `step`: a 64-bit hash, uniform and
/// independent across its arguments for the purpose of a draw.
pub fn score(seed: u64, step: u64, sample: u64, patch: i64) -> u64 {
    splitmix64(sample_key(seed, step, sample) ^ patch as u64)
}

/// Tags the seed so that patch dropout's stream differs from anything else hashed from it.
const STREAM: u64 = 0x7061_7463_6864_726f; // "patchdro"

/// One key per (seed, step, sample), each argument mixed in turn.
fn sample_key(seed: u64, step: u64, sample: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed ^ STREAM) ^ step) ^ sample)
}

/// SplitMix64's output function (Steele, Lea and Flood, "Fast splittable pseudorandom number
/// generators", 2014): a bijection on u64 whose every output bit depends on every input bit.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// tokens: (B, prefix + P, W) -> (B, prefix + keep, W): the `prefix` leading tokens (the class
/// token), then the patch tokens `kept` ((B, keep) positions among the P) lists, in its order.
pub fn keep_patches(tokens: &Tensor, prefix: i64, kept: &Tensor) -> Tensor {
    let size = tokens.size();
    let (b, l, w) = (size[0], size[1], size[2]);
    let keep = kept.size()[1];
    let index = kept.to_kind(Kind::Int64).unsqueeze(-1).expand([b, keep, w], false);
    let patches = tokens.narrow(1, prefix, l - prefix).gather(1, &index, false);
    if prefix == 0 {
        return patches;
    }
    Tensor::cat(&[tokens.narrow(1, 0, prefix), patches], 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_count_is_open_clips_formula() {
        // int() rounds toward zero; at least one patch is always kept.
        for (patches, prob, kept) in [
            (196, 0.5, 98),
            (196, 0.75, 49),
            (49, 0.5, 24),
            (36, 0.3, 25),
            (16, 0.4, 9),
            (36, 0.99, 1),
            (4, 0.9, 1),
            (1, 0.5, 1),
            (196, 0.0, 196),
        ] {
            assert_eq!(kept_count(patches, prob), kept, "{patches} patches at {prob}");
        }
    }

    #[test]
    fn draws_are_distinct_positions_in_score_order_and_depend_on_every_argument() {
        let kept = draw(7, 3, 11, 196, 98);
        assert_eq!(kept.len(), 98);
        let mut sorted = kept.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 98, "a position kept twice");
        assert!(sorted.iter().all(|&j| (0..196).contains(&j)));
        // Largest score first, and no dropped patch outscores a kept one.
        let scores: Vec<u64> = kept.iter().map(|&j| score(7, 3, 11, j)).collect();
        assert!(scores.windows(2).all(|w| w[0] > w[1]), "not in score order");
        let lowest_kept = *scores.last().unwrap();
        assert!((0..196).filter(|j| !kept.contains(j)).all(|j| score(7, 3, 11, j) < lowest_kept));
        // Not the identity order, and each argument changes the draw.
        assert_ne!(kept, (0..98).collect::<Vec<_>>());
        assert_eq!(draw(7, 3, 11, 196, 98), kept);
        for other in [draw(8, 3, 11, 196, 98), draw(7, 4, 11, 196, 98), draw(7, 3, 12, 196, 98)] {
            assert_ne!(other, kept);
        }
        // Keeping fewer keeps the first of the same order.
        assert_eq!(draw(7, 3, 11, 196, 10), kept[..10]);
    }

    /// Each patch is kept about (1 - p) of the time, and its place in the kept order is
    /// uniform: no position is favoured.
    #[test]
    fn every_patch_is_equally_likely_to_be_kept() {
        let (patches, keep, samples) = (16, 4, 20_000u64);
        let mut kept = [0u32; 16];
        let mut first = [0u32; 16];
        for s in 0..samples {
            let d = draw(1, 0, s, patches, keep);
            first[d[0] as usize] += 1;
            for j in d {
                kept[j as usize] += 1;
            }
        }
        let expect = samples as f64 * keep as f64 / patches as f64; // 5000
        for (j, &k) in kept.iter().enumerate() {
            // 6 standard deviations of a binomial(20000, 1/4): about 370.
            assert!((k as f64 - expect).abs() < 370.0, "patch {j} kept {k} times, not ~{expect}");
        }
        let expect_first = samples as f64 / patches as f64; // 1250
        for (j, &k) in first.iter().enumerate() {
            assert!((k as f64 - expect_first).abs() < 210.0, "patch {j} first {k} times");
        }
    }

    #[test]
    fn kept_rows_are_the_samples_own_draws_whatever_the_split() {
        let pd = PatchDropout { prob: 0.5, seed: 42 };
        let whole = pd.kept(9, 0, 32, 49, Device::Cpu).unwrap();
        assert_eq!(whole.size(), [32, 24]);
        assert_eq!(whole.kind(), Kind::Int64);
        // Rank 1 of 2 (samples 16..32), or a micro-batch of 5 from sample 20: the same rows.
        assert!(pd.kept(9, 16, 16, 49, Device::Cpu).unwrap().equal(&whole.narrow(0, 16, 16)));
        assert!(pd.kept(9, 20, 5, 49, Device::Cpu).unwrap().equal(&whole.narrow(0, 20, 5)));
        let row: Vec<i64> = Vec::try_from(whole.get(20)).unwrap();
        assert_eq!(row, draw(42, 9, 20, 49, 24));
        // Another step draws anew.
        assert!(!pd.kept(10, 0, 32, 49, Device::Cpu).unwrap().equal(&whole));
    }

    #[test]
    fn keep_patches_keeps_the_class_token_first_then_the_listed_patches_in_order() {
        // Token t of image b holds the value 100 b + t in every channel.
        let (b, l, w) = (2, 5, 3);
        let values = (Tensor::arange(b, (Kind::Float, Device::Cpu)).view([b, 1, 1]) * 100.0
            + Tensor::arange(l, (Kind::Float, Device::Cpu)).view([1, l, 1]))
        .expand([b, l, w], true)
        .contiguous();
        let kept = Tensor::from_slice(&[3i64, 0, 2, 1]).view([2, 2]);
        let out = keep_patches(&values, 1, &kept);
        assert_eq!(out.size(), [2, 3, 3]);
        let firsts: Vec<f32> = Vec::try_from(out.select(2, 0).flatten(0, -1)).unwrap();
        // Class token (position 0), then patches 3, 0 (tokens 4, 1); image 1: 2, 1 (tokens 3, 2).
        assert_eq!(firsts, [0.0, 4.0, 1.0, 100.0, 103.0, 102.0]);
        assert!(out.select(2, 0).equal(&out.select(2, 2)));
        // No prefix (SigLIP's trunk): only the patches.
        let out = keep_patches(&values, 0, &kept);
        let firsts: Vec<f32> = Vec::try_from(out.select(2, 0).flatten(0, -1)).unwrap();
        assert_eq!(firsts, [3.0, 0.0, 102.0, 101.0]);
    }

    /// The gradient flows to the kept tokens only, once each.
    #[test]
    fn the_gradient_reaches_exactly_the_kept_tokens() {
        let x = Tensor::randn([2, 5, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let kept = Tensor::from_slice(&[3i64, 0, 2, 1]).view([2, 2]);
        keep_patches(&x, 1, &kept).sum(Kind::Float).backward();
        let per_token: Vec<f32> = Vec::try_from(x.grad().select(2, 0).flatten(0, -1)).unwrap();
        assert_eq!(per_token, [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
    }
}
