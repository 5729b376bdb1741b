//! The flat buckets whose sums were started, owned until their results are copied back.
//!
//! Under NCCL a bucket's memory comes from libtorch's caching allocator, for the compute
//! stream, while the communication stream's all-reduce reads and writes it: freed before the
//! compute stream is ordered after that all-reduce, the allocator could hand the memory to the
//! next kernel while NCCL still writes it. So a started bucket is let go in one of two ways
//! only: on success, after the compute stream waits for its sum and the sum is copied back; on
//! any other path (an error, a panic in the backward pass or on the communication thread)
//! through [`Collectives::retire`], which frees it once the sum can no longer touch it, or
//! never. [`InFlight`]'s `Drop` does the latter for every bucket still held.

use std::collections::VecDeque;

use tch::Tensor;

use crate::collectives::{Collectives, Mark};
use crate::error::Result;

/// Started buckets, in launch order: (bucket, flat tensor, where its sum is done).
pub(super) struct InFlight<'a> {
    comm: &'a (dyn Collectives + Sync),
    started: VecDeque<(usize, Tensor, Mark)>,
}

impl<'a> InFlight<'a> {
    pub(super) fn new(comm: &'a (dyn Collectives + Sync)) -> Self {
        InFlight { comm, started: VecDeque::new() }
    }

    pub(super) fn push(&mut self, bucket: usize, flat: Tensor, done: Mark) {
        self.started.push_back((bucket, flat, done));
    }

    pub(super) fn len(&self) -> usize {
        self.started.len()
    }

    /// Orders the caller's compute after each sum, then `copy(bucket, sum)`; a bucket is
    /// dropped only after both (its copy is queued after the wait), and on an error the ones
    /// left, this one included, are retired.
    pub(super) fn copy_back(
        mut self,
        mut copy: impl FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        while let Some((bucket, flat, done)) = self.started.front() {
            self.comm.wait_for(done)?;
            copy(*bucket, flat)?;
            self.started.pop_front();
        }
        Ok(())
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        for (_, flat, done) in self.started.drain(..) {
            self.comm.retire(done, flat);
        }
    }
}
