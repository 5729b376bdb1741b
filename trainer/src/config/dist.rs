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
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            timeout_s: 600,
            overlap: true,
            bucket_mb: 25.0,
            grad_reduce_dtype: ReduceDtype::Fp32,
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
}
