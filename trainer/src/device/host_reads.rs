//! Counting the reads of tensor values into host memory, the CPU-GPU synchronisations a
//! training step must not make except where it logs (docs/training.md, step 7). libtorch's own
//! observer hook (csrc/host_reads.cpp) sees every `item()` (tch's `double_value`,
//! `int64_value`) and every device-to-CPU copy (`to_device(Cpu)`, and the copy inside tch's
//! `Vec::try_from` and `f64::try_from` of a device tensor) that an operator makes on the
//! counting thread, whoever calls it, so a read added anywhere on the step's path shows up,
//! not only one that goes through some helper.
//!
//! What it cannot see: `Vec::try_from` and `f64::try_from` of a tensor that is already on the
//! CPU read its memory without an operator. On a CPU run that is every tensor, so there only
//! `item()` reads are seen; on CUDA the copy that such a read needs is seen too. Reads made on other threads (a
//! communication thread) are not counted; libtorch's autograd runs a CPU backward pass on the
//! calling thread and carries the callback to its device threads.

/// What [`HostReads::finish`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCounts {
    /// `item()` calls outside the fused optimizer kernel: one value each.
    pub scalar_reads: u64,
    /// Copies from a device to the CPU (none can happen on a CPU run).
    pub device_to_host_copies: u64,
    /// `item()` calls inside `_fused_adamw_`: its CPU kernel reads each step counter from
    /// memory that is already the host's; its CUDA kernel reads it on the device instead.
    pub in_fused_optimizer: u64,
}

impl ReadCounts {
    /// The reads that would wait for a GPU: everything but the CPU fused kernel's own.
    pub fn syncs(&self) -> u64 {
        self.scalar_reads + self.device_to_host_copies
    }
}

extern "C" {
    fn oxclip_host_reads_start() -> u64;
    fn oxclip_host_reads_stop(
        handle: u64,
        scalar_reads: *mut u64,
        device_to_host_copies: *mut u64,
        in_fused_optimizer: *mut u64,
    );
}

/// A count running on this thread, from [`HostReads::start`] to [`HostReads::finish`]. For tests
/// and investigations; while none runs, nothing is recorded. Counts do not nest: one thread
/// runs one at a time.
#[derive(Debug)]
pub struct HostReads {
    handle: u64,
    /// The count belongs to the thread that started it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl HostReads {
    /// Starts counting on this thread, from zero. `None` while another count runs on this
    /// thread, or when libtorch refused the callback.
    pub fn start() -> Option<Self> {
        // SAFETY: takes and returns plain values; the shim catches every C++ exception.
        let handle = unsafe { oxclip_host_reads_start() };
        (handle != 0).then_some(HostReads { handle, _not_send: std::marker::PhantomData })
    }

    /// Stops counting and returns what was counted.
    pub fn finish(self) -> ReadCounts {
        let counts = self.stop();
        std::mem::forget(self);
        counts
    }

    fn stop(&self) -> ReadCounts {
        let mut c = ReadCounts::default();
        // SAFETY: `handle` came from `oxclip_host_reads_start` on this thread (the type is not
        // `Send`) and is stopped once (`finish` forgets `self`, `drop` runs otherwise); the
        // pointers are to live locals.
        unsafe {
            oxclip_host_reads_stop(
                self.handle,
                &mut c.scalar_reads,
                &mut c.device_to_host_copies,
                &mut c.in_fused_optimizer,
            )
        };
        c
    }
}

impl Drop for HostReads {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn counts_item_reads_on_this_thread_only() {
        let t = Tensor::arange(4, (Kind::Float, Device::Cpu));
        let count = HostReads::start().expect("callback installed");
        assert!(HostReads::start().is_none(), "counts do not nest");
        let _ = (&t * 2.0).sum(Kind::Float).exp();
        let _ = t.double_value(&[1]);
        let _ = t.sum(Kind::Float).int64_value(&[]);
        let elsewhere = t.copy();
        std::thread::spawn(move || elsewhere.double_value(&[2])).join().expect("joins");
        assert_eq!(
            count.finish(),
            ReadCounts { scalar_reads: 2, device_to_host_copies: 0, in_fused_optimizer: 0 }
        );
        // Stopped: a new count starts from zero.
        let count = HostReads::start().expect("callback installed");
        assert_eq!(count.finish(), ReadCounts::default());
    }
}
