//! The collective operations the step needs, behind one trait. One process is a world of one,
//! so the step has no world-size branch; the NCCL and multi-process CPU backends implement the
//! same trait.

use tch::Tensor;

use crate::error::Result;

pub trait Collectives {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Concatenates every rank's (n, ...) tensor along dim 0, in rank order: (W n, ...).
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor>;
    /// Sums (W n, ...) over ranks and returns this rank's (n, ...) rows.
    fn reduce_scatter(&self, tensor: &Tensor) -> Result<Tensor>;
    /// Sums in place over ranks.
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()>;
    /// Copies root's tensor into every rank's, in place.
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
}

/// A world of one process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.shallow_clone())
    }
    fn reduce_scatter(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.shallow_clone())
    }
    fn all_reduce_sum(&self, _tensor: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
