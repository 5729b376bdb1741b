//! `dist:`, how ranks talk to each other. The world itself (rank, world size, where rank 0
//! listens) comes from the environment, as torchrun, SLURM or `oxclip launch` set it.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// `dist:`. Every default is written once, in the [`Default`] impl, which serde fills missing
/// keys from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    /// `auto` (NCCL on CUDA, else cpu), `nccl` or `cpu`. Default `auto`.
    pub backend: Backend,
    /// How long a collective or the start-up rendezvous waits for a peer before the run
    /// fails, naming the collective. Must exceed the longest pause of one rank (rank 0's
    /// zero-shot evaluation, a checkpoint write). Default 600.
    pub timeout_s: u64,
    /// Sum each bucket of gradients as soon as the backward pass has produced it, while the
    /// pass goes on (PyTorch DDP's overlap); false: all of them after it. Default true.
    pub overlap: bool,
    /// Gradient bucket size in MB (1e6 bytes, fp32): DDP's `bucket_cap_mb`, and its default
    /// of 25.
    pub bucket_mb: f64,
    /// `fp32`, or `bf16` (DDP's bf16 compression hook: half the bytes, the sum rounded to
    /// bf16). Features are exchanged in their own precision either way. Default `fp32`.
    pub grad_reduce_dtype: ReduceDtype,
    /// `none`, `optimizer` (ZeRO-1: gradients summed in full on every rank, AdamW state split
    /// over ranks) or `gradients` (ZeRO-2: each rank receives only its share of the summed
    /// gradients, by reduce-scatter). Needs more than one rank. Default `none`.
    pub shard: Shard,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            timeout_s: 600,
            overlap: true,
            bucket_mb: 25.0,
            grad_reduce_dtype: ReduceDtype::Fp32,
            shard: Shard::None,
        }
    }
}

impl DistConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.bucket_mb > 0.0 && self.bucket_mb.is_finite()) {
            return Err(TrainError::Config(format!(
                "dist.bucket_mb must be a positive number of MB, got {}",
                self.bucket_mb
            )));
        }
        Ok(())
    }

    /// The checks that need the world: sharding over one rank would only cost.
    pub fn validate_for_world(&self, world_size: usize) -> Result<()> {
        if self.shard != Shard::None && world_size < 2 {
            return Err(TrainError::Config(format!(
                "dist.shard: {} splits the optimizer state over ranks, and this run has one; \
                 launch several ranks (oxclip launch --nproc-per-node N) or set dist.shard: none",
                self.shard.name()
            )));
        }
        Ok(())
    }
}

/// Which backend a run uses (`dist.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// NCCL on CUDA, otherwise cpu.
    Auto,
    Nccl,
    Cpu,
}

/// The precision gradients travel in (`dist.grad_reduce_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceDtype {
    Fp32,
    /// Half the bytes; the sum is rounded to bf16 (8 significant bits) before the update.
    Bf16,
}

/// What a rank keeps of the optimizer state and the summed gradients (`dist.shard`), as ZeRO
/// stages 1 and 2 (torch's ZeroRedundancyOptimizer, FSDP's `SHARD_GRAD_OP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shard {
    /// Every rank holds everything (DDP).
    None,
    /// ZeRO-1: AdamW's moments of 1/N of the parameters per rank; gradients summed in full.
    Optimizer,
    /// ZeRO-2: as `optimizer`, and each rank receives only its 1/N of the summed gradients.
    Gradients,
}

impl Shard {
    pub fn name(self) -> &'static str {
        match self {
            Shard::None => "none",
            Shard::Optimizer => "optimizer",
            Shard::Gradients => "gradients",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dist_gradient_reduction_keys() {
        let dist: DistConfig = serde_yaml::from_str("backend: cpu\n").unwrap();
        assert!(dist.overlap);
        assert_eq!((dist.bucket_mb, dist.grad_reduce_dtype), (25.0, ReduceDtype::Fp32));
        assert_eq!(dist, DistConfig { backend: Backend::Cpu, ..DistConfig::default() });
        let bf16: DistConfig =
            serde_yaml::from_str("overlap: false\nbucket_mb: 0.5\ngrad_reduce_dtype: bf16\n")
                .unwrap();
        assert_eq!(
            (bf16.overlap, bf16.bucket_mb, bf16.grad_reduce_dtype),
            (false, 0.5, ReduceDtype::Bf16)
        );
        bf16.validate().unwrap();

        let zero: DistConfig = serde_yaml::from_str("bucket_mb: 0\n").unwrap();
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("dist.bucket_mb"), "{err}");
        let err = serde_yaml::from_str::<DistConfig>("grad_reduce_dtype: fp16\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("grad_reduce_dtype") && err.contains("fp16"), "{err}");
        let err = serde_yaml::from_str::<DistConfig>("bucket_mbs: 4\n").unwrap_err().to_string();
        assert!(err.contains("bucket_mbs"), "{err}");
    }

    #[test]
    fn dist_shard_names_the_zero_stage_and_needs_two_ranks() {
        assert_eq!(DistConfig::default().shard, Shard::None);
        let dist: DistConfig = serde_yaml::from_str("shard: gradients\n").unwrap();
        assert_eq!(dist.shard, Shard::Gradients);
        dist.validate_for_world(2).unwrap();
        let err = dist.validate_for_world(1).unwrap_err().to_string();
        assert!(err.contains("dist.shard: gradients") && err.contains("one"), "{err}");
        DistConfig::default().validate_for_world(1).unwrap();
        let err = serde_yaml::from_str::<DistConfig>("shard: params\n").unwrap_err().to_string();
        assert!(err.contains("shard") && err.contains("params"), "{err}");
    }
}
