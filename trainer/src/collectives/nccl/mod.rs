//! The `nccl` backend: CUDA tensors reduced and gathered by NCCL, on the legacy default
//! stream that libtorch computes on, so no extra synchronisation is needed; except the
//! overlapped gradient reduction ([`Collectives::all_reduce_start`]), which runs on a
//! communication stream of its own, ordered against the default stream by events.
//!
//! NCCL is opened at run time, so the binary builds and runs where there is none. The types
//! are cudarc's; the functions are looked up by [`library`], not cudarc's loader.
//!
//! The rendezvous (NCCL's unique id), byte gathers and barriers go through a [`TcpGroup`].
//! Nothing waits on a peer without a deadline: the communicator is created non-blocking and
//! polled until `dist.timeout_s` after the rendezvous began, and a watchdog thread turns a
//! collective that never completes into an abort. The communicator handle has one owner
//! ([`communicator::Communicator`]), behind one lock: no NCCL call can overlap or follow its
//! abort. NCCL itself cannot tell that two ranks called different collectives, so each rank
//! keeps a trace of its own, compared across ranks at every host exchange.
//!
//! One file per job, each using only those listed before it:
//!
//! - [`library`]: NCCL opened (which file), its C signatures and `ncclConfig_t`'s layout, the
//!   function table [`library::Nccl`];
//! - [`stream`]: CUDA streams and events, and the device selection, through the CUDA
//!   runtime's table ([`Cudart`], in `crate::device::cudart`, which the device memory report
//!   shares);
//! - [`communicator`]: the communicator's creation (non-blocking, with a deadline), its owner
//!   [`communicator::Communicator`] (every call under one lock, the abort, the end) and the
//!   watchdog thread;
//! - [`trace`]: the [`trace::Trace`] of the collectives made and its comparison at every
//!   host exchange, with the message naming how the ranks diverged;
//! - this file: [`NcclGroup`], the [`Collectives`] made of the above.

mod communicator;
mod library;
pub(super) mod stream;
mod trace;

use std::ffi::{c_char, c_int};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId,
};
use tch::{Device, Kind, Tensor};

use super::tcp::TcpGroup;
use super::{Collectives, WorldEnv};
use crate::device::cudart::Cudart;
use crate::error::{Result, TrainError};
use communicator::{abort_within, create_comm, Communicator};
use library::Nccl;
use stream::{default_stream, StreamHandle};
use trace::{Call, CollOp, HostOp, Trace};

fn dist_err(message: String) -> TrainError {
    TrainError::Dist(message)
}

/// Ranks joined by an NCCL communicator, one GPU each.
///
/// `Sync` by construction (the `as_sync` below needs it, so the compiler checks it): the
/// communicator is behind its owner's lock, the communication stream is a handle CUDA lets
/// any thread use, the trace is behind a lock. What `Sync` does not give, NCCL's requirement
/// that every rank issue the same collectives in the same order, `as_sync`'s contract does:
/// during the backward pass only the gradient reducer's communication thread issues
/// collectives, and the owner issues none until it has joined that thread.
pub struct NcclGroup {
    nccl: &'static Nccl,
    cuda: &'static Cudart,
    comm: Arc<Communicator>,
    device: Device,
    cuda_index: c_int,
    /// The communication stream the overlapped gradient reduction runs on (non-blocking,
    /// created once); every other collective stays on the default stream.
    stream: StreamHandle,
    rank: usize,
    world_size: usize,
    /// Rendezvous, byte gathers and barriers.
    bootstrap: TcpGroup,
    watchdog_thread: Option<std::thread::JoinHandle<()>>,
    /// The NCCL collectives made so far, compared across ranks at every host exchange. Behind
    /// a lock because the gradient reducer's communication thread issues collectives too
    /// (only it, in bucket order, while the backward pass runs: the order stays the same on
    /// every rank).
    trace: Mutex<Trace>,
    /// Whether nothing can be pending in NCCL: set by a barrier that every rank passed after
    /// this one's device had finished its work, cleared by every collective's enqueue and by an
    /// abort. Only then may the end destroy the communicator (ncclCommDestroy waits for what
    /// is pending, forever if a peer is gone); otherwise it aborts it.
    clean: AtomicBool,
    timeout: Duration,
}

impl NcclGroup {
    /// Joins the world on `device` (this rank's GPU): rank 0 makes NCCL's unique id and hands
    /// it to the others over the TCP rendezvous.
    pub fn connect(world: &WorldEnv, device: Device, timeout: Duration) -> Result<Self> {
        // The rendezvous and the communicator's creation share one dist.timeout_s.
        let deadline = Instant::now() + timeout;
        let Device::Cuda(index) = device else {
            return Err(dist_err(format!(
                "the NCCL backend needs a CUDA device, the run is on {}; use dist.backend: cpu",
                crate::device::name(device)
            )));
        };
        let nccl = Nccl::get()?;
        let cuda = Cudart::get()?;
        let bootstrap = TcpGroup::connect(world, timeout)?;
        let mut id = MaybeUninit::<ncclUniqueId>::zeroed();
        if world.rank == 0 {
            // SAFETY: ncclGetUniqueId writes a whole ncclUniqueId into the pointer it is given,
            // valid for the call.
            nccl.check("ncclGetUniqueId", unsafe { (nccl.get_unique_id)(id.as_mut_ptr()) })?;
        }
        // SAFETY: all-zero bytes are a valid ncclUniqueId (a plain byte array), and rank 0's
        // was initialised just above.
        let mut id = unsafe { id.assume_init() };
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        let ids = bootstrap.all_gather_bytes(&bytes)?;
        for (dst, src) in id.internal.iter_mut().zip(&ids[0]) {
            *dst = *src as c_char;
        }
        let cuda_index =
            c_int::try_from(index).map_err(|_| dist_err(format!("CUDA device {index}")))?;
        // NCCL binds the communicator to the calling thread's current device.
        stream::set_device(cuda, cuda_index)?;
        let comm = create_comm(nccl, cuda, world, id, cuda_index, deadline, timeout)?;
        tracing::info!(
            "rank {} of {}: NCCL communicator on cuda:{index}",
            world.rank,
            world.world_size
        );
        // On the device set just above.
        let stream = match stream::create(cuda) {
            Ok(stream) => StreamHandle(stream),
            Err(status) => {
                abort_within(nccl, comm);
                return Err(dist_err(format!(
                    "cudaStreamCreateWithFlags on cuda:{index} failed with CUDA error {status}"
                )));
            }
        };
        let mut group = Self {
            nccl,
            cuda,
            comm: Communicator::new(nccl, cuda, comm, world.rank),
            device,
            cuda_index,
            stream,
            rank: world.rank,
            world_size: world.world_size,
            bootstrap,
            watchdog_thread: None,
            trace: Mutex::new(Trace::default()),
            // Nothing enqueued yet.
            clean: AtomicBool::new(true),
            timeout,
        };
        // Should it fail, dropping the group ends the communicator and the stream.
        group.watchdog_thread = Some(group.comm.start_watchdog(cuda_index, timeout)?);
        Ok(group)
    }

    /// Fails if the communicator was aborted (by the watchdog, a failed enqueue, or `abort`).
    fn healthy(&self) -> Result<()> {
        match self.comm.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The collectives made so far. A poisoned lock still holds the last complete trace.
    fn trace(&self) -> std::sync::MutexGuard<'_, Trace> {
        self.trace.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs one NCCL call (given the communicator's handle, under its lock), queued on
    /// `stream`, then hands the watchdog an event recorded on `stream` after it.
    fn collective(
        &self,
        stream: cudaStream_t,
        op: CollOp,
        kind: Kind,
        elements: usize,
        call: impl FnOnce(ncclComm_t) -> ncclResult_t,
    ) -> Result<()> {
        self.healthy()?;
        let trace = {
            let mut trace = self.trace();
            *trace = trace.then(Call::new(op, kind, elements));
            *trace
        };
        let what = format!("{} #{} ({})", op.name(), trace.count, trace.last.describe_values());
        // Before the call: from here on something may be pending.
        self.clean.store(false, Ordering::SeqCst);
        self.comm.enqueue(&what, self.timeout, call)?;
        let event = stream::record(self.cuda, stream, &what)?;
        // The watchdog destroys it once it has seen it complete.
        self.comm.follow(what, event.into_raw());
        Ok(())
    }

    /// A host exchange: `bytes` from every rank over the rendezvous connection, with each
    /// rank's [`Trace`] riding along, compared before anything is returned.
    fn host_exchange(&self, host: HostOp, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.healthy()?;
        let trace = *self.trace();
        trace::traced_exchange(&self.bootstrap, trace, host, bytes)
    }

    /// The tensor as NCCL sees it: contiguous, on this rank's GPU, of a type NCCL reduces.
    /// Sums the contiguous CUDA `buffer` over ranks in place on `stream` (`op`: an all-reduce,
    /// or a reduce-scatter leaving this rank's chunk of the sum where its own chunk of the
    /// input was, NCCL's in-place form). The caller keeps `buffer` alive and untouched until
    /// `stream` has done it: allocated for `stream` (the default stream), or held until an
    /// event after it.
    fn sum_in_place(
        &self,
        buffer: &Tensor,
        dtype: ncclDataType_t,
        op: CollOp,
        stream: cudaStream_t,
    ) -> Result<()> {
        self.collective(stream, op, buffer.kind(), buffer.numel(), |comm| {
            // SAFETY: a contiguous CUDA buffer of this rank's device that outlives the
            // collective (the caller's contract above); for the reduce-scatter the output is
            // this rank's chunk of it. `comm` is the live handle, under the communicator's
            // lock.
            unsafe {
                match op {
                    CollOp::ReduceScatter => {
                        let count = buffer.numel() / self.world_size;
                        let recv = (buffer.data_ptr() as *mut u8)
                            .add(self.rank * count * buffer.kind().elt_size_in_bytes());
                        (self.nccl.reduce_scatter)(
                            buffer.data_ptr(),
                            recv.cast(),
                            count,
                            dtype,
                            ncclRedOp_t::ncclSum,
                            comm,
                            stream,
                        )
                    }
                    _ => (self.nccl.all_reduce)(
                        buffer.data_ptr(),
                        buffer.data_ptr(),
                        buffer.numel(),
                        dtype,
                        ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    ),
                }
            }
        })
    }

    /// A gradient bucket's sum (`op`: all-reduce or reduce-scatter, in place) queued on the
    /// communication stream after `ready`, and an event after it.
    fn start_in_place(
        &self,
        tensor: &mut Tensor,
        ready: super::Mark,
        op: CollOp,
    ) -> Result<super::Mark> {
        stream::set_device(self.cuda, self.cuda_index)?;
        let (buffer, dtype) = self.prepared(tensor)?;
        if buffer.data_ptr() != tensor.data_ptr() {
            // `contiguous` would have copied on this thread's default stream, unordered with
            // the communication stream; the reducer's buckets are flat and never need it.
            return Err(dist_err(
                "a bucket's sum needs a contiguous tensor (a flat gradient bucket)".into(),
            ));
        }
        let world = self.world_size as i64;
        if op == CollOp::ReduceScatter && buffer.numel() as i64 % world != 0 {
            return Err(dist_err(format!(
                "a reduce-scatter of {} values over {world} ranks: not a whole chunk each",
                buffer.numel()
            )));
        }
        if let Some(event) = &ready.0 {
            stream::wait(self.cuda, self.stream.0, event, "a gradient bucket's sum")?;
        }
        // The caller keeps `tensor` alive and untouched until it has waited for the mark
        // returned below (or hands it to `retire`).
        self.sum_in_place(&buffer, dtype, op, self.stream.0)?;
        Ok(super::Mark(Some(stream::record(self.cuda, self.stream.0, "a gradient bucket's sum")?)))
    }

    fn prepared(&self, tensor: &Tensor) -> Result<(Tensor, ncclDataType_t)> {
        if tensor.device() != self.device {
            return Err(dist_err(format!(
                "a {:?} tensor given to the NCCL backend on {:?}",
                tensor.device(),
                self.device
            )));
        }
        let dtype = match tensor.kind() {
            Kind::Float => ncclDataType_t::ncclFloat32,
            Kind::Double => ncclDataType_t::ncclFloat64,
            Kind::Half => ncclDataType_t::ncclFloat16,
            Kind::BFloat16 => ncclDataType_t::ncclBfloat16,
            Kind::Int => ncclDataType_t::ncclInt32,
            Kind::Int64 => ncclDataType_t::ncclInt64,
            other => return Err(dist_err(format!("NCCL cannot reduce {other:?} tensors"))),
        };
        Ok((tensor.contiguous(), dtype))
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        self.comm.request_stop();
        if let Some(thread) = self.watchdog_thread.take() {
            // A watchdog that aborted may still wait for ncclCommAbort (up to ABORT_WAIT):
            // leave it to the process's exit. Otherwise it ends within one look (100 ms, or
            // ABORT_WAIT should it abort right now).
            if self.comm.failure().is_none() {
                let _ = thread.join();
            }
        }
        // Destroyed only when nothing can be pending (a clean barrier last), else aborted;
        // both bounded. The stream goes only with a communicator destroyed in time: after an
        // abort (or an end left behind) NCCL's kernels on it may not be over, so it is leaked
        // to the process's exit.
        if self.comm.close(self.clean.load(Ordering::SeqCst)) {
            // SAFETY: the stream was created in `connect`, is used only through the group, and
            // is destroyed once, here, at the group's end (no other thread can use the group
            // now); CUDA lets any work still queued on it finish first.
            unsafe {
                (self.cuda.stream_destroy)(self.stream.0);
            }
        }
    }
}

impl Collectives for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        let (input, dtype) = self.prepared(tensor)?;
        let mut shape = input.size();
        if shape.is_empty() {
            shape = vec![1];
        }
        shape[0] *= self.world_size as i64;
        let output = Tensor::empty(shape.as_slice(), (input.kind(), self.device));
        self.collective(
            default_stream(),
            CollOp::AllGather,
            input.kind(),
            input.numel(),
            |comm| {
                // SAFETY: both buffers are contiguous CUDA memory on this rank's device, the output
                // world_size times the input's element count, both alive until the call
                // returns and, as tensors libtorch's allocator gave the default stream, not
                // reused before the work queued there (this collective) is done; `comm` is
                // the live handle, under the communicator's lock.
                unsafe {
                    (self.nccl.all_gather)(
                        input.data_ptr(),
                        output.data_ptr(),
                        input.numel(),
                        dtype,
                        comm,
                        default_stream(),
                    )
                }
            },
        )?;
        Ok(output)
    }

    fn reduce_scatter(&self, tensor: &Tensor) -> Result<Tensor> {
        let (input, dtype) = self.prepared(tensor)?;
        let mut shape = input.size();
        if shape.is_empty() || shape[0] % self.world_size as i64 != 0 {
            return Err(dist_err(format!(
                "reduce_scatter of {:?} over {} ranks",
                shape, self.world_size
            )));
        }
        shape[0] /= self.world_size as i64;
        let output = Tensor::empty(shape.as_slice(), (input.kind(), self.device));
        self.collective(
            default_stream(),
            CollOp::ReduceScatter,
            input.kind(),
            input.numel(),
            |comm| {
                // SAFETY: contiguous CUDA buffers on this rank's device, the output holding
                // 1/world_size of the input, allocated for the default stream this runs on
                // (so not reused before it is done); `comm` is the live handle, under the
                // communicator's lock.
                unsafe {
                    (self.nccl.reduce_scatter)(
                        input.data_ptr(),
                        output.data_ptr(),
                        output.numel(),
                        dtype,
                        ncclRedOp_t::ncclSum,
                        comm,
                        default_stream(),
                    )
                }
            },
        )?;
        Ok(output)
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let (buffer, dtype) = self.prepared(tensor)?;
        // Allocated for the default stream this runs on, so not reused before it is done.
        self.sum_in_place(&buffer, dtype, CollOp::AllReduce, default_stream())?;
        if buffer.data_ptr() != tensor.data_ptr() {
            tensor.copy_(&buffer);
        }
        Ok(())
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let (buffer, dtype) = self.prepared(tensor)?;
        self.collective(
            default_stream(),
            CollOp::Broadcast,
            buffer.kind(),
            buffer.numel(),
            |comm| {
                // SAFETY: in place on a contiguous CUDA buffer of this rank's device, allocated
                // for the default stream this runs on (so not reused before it is done);
                // `comm` is the live handle, under the communicator's lock; NCCL checks the
                // root against the world size.
                unsafe {
                    (self.nccl.broadcast)(
                        buffer.data_ptr(),
                        buffer.data_ptr(),
                        buffer.numel(),
                        dtype,
                        root as c_int,
                        comm,
                        default_stream(),
                    )
                }
            },
        )?;
        if buffer.data_ptr() != tensor.data_ptr() {
            tensor.copy_(&buffer);
        }
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.host_exchange(HostOp::Bytes, bytes)
    }

    fn as_sync(&self) -> Option<&(dyn Collectives + Sync)> {
        Some(self)
    }

    /// Called in the gradient hook, on libtorch's autograd thread for this device, right
    /// after the bucket was flattened (and cast to bf16) there. That thread queues its work on
    /// the default stream: the autograd engine runs each backward op on the stream its forward
    /// op ran on, and oxclip never sets a stream, so every forward op, the hook's cat and cast
    /// included, ran on the legacy default stream. An event recorded there now therefore
    /// passes once the flat bucket is written.
    fn ready_mark(&self) -> Result<super::Mark> {
        self.healthy()?;
        stream::set_device(self.cuda, self.cuda_index)?;
        Ok(super::Mark(Some(stream::record(
            self.cuda,
            default_stream(),
            "a gradient bucket's flatten",
        )?)))
    }

    /// On the communication thread: the communication stream waits (on the device) for
    /// `ready`, the all-reduce is queued on it, and the returned mark is an event after it.
    /// The compute stream goes on meanwhile: the backward pass and the all-reduce overlap.
    /// NCCL needs a communicator's collectives to run in the same order on every rank, on the
    /// device too (two in flight at once on two streams could each wait for the other's
    /// peers): they do. This one waits for an event recorded after every collective the step
    /// queued on the default stream before the backward pass; the communication stream runs
    /// the buckets one after the other; and the default stream waits for every bucket's done
    /// event before the next step's collectives.
    fn all_reduce_start(&self, tensor: &mut Tensor, ready: super::Mark) -> Result<super::Mark> {
        self.start_in_place(tensor, ready, CollOp::AllReduce)
    }

    /// As `all_reduce_start`, with NCCL's in-place reduce-scatter: this rank's chunk of the
    /// sum lands where its own chunk of the input was (`recvbuff = sendbuff + rank * count`).
    fn reduce_scatter_start(&self, tensor: &mut Tensor, ready: super::Mark) -> Result<super::Mark> {
        self.start_in_place(tensor, ready, CollOp::ReduceScatter)
    }

    /// The default stream (compute) waits for the all-reduce's event; the host does not.
    fn wait_for(&self, done: &super::Mark) -> Result<()> {
        self.healthy()?;
        match &done.0 {
            Some(event) => {
                stream::set_device(self.cuda, self.cuda_index)?;
                stream::wait(
                    self.cuda,
                    default_stream(),
                    event,
                    "the end of a gradient bucket's all-reduce",
                )
            }
            None => Ok(()),
        }
    }

    fn barrier(&self) -> Result<()> {
        self.healthy()?;
        // Work queued on the GPU counts: finish it before meeting the others.
        tch::Cuda::synchronize(i64::from(self.cuda_index));
        // A synchronisation that returned because the watchdog aborted (which ends the
        // kernels) finished nothing: no clean barrier.
        self.healthy()?;
        self.host_exchange(HostOp::Barrier, &[])?;
        // Every rank got here with its device's work done, and the communicator live: nothing
        // of NCCL's is pending. Only the caller issues collectives now (`as_sync`'s contract),
        // so none can slip in between the checks and this.
        self.clean.store(self.comm.failure().is_none(), Ordering::SeqCst);
        Ok(())
    }

    /// The compute stream waits for `done` (no health check: this runs on error paths and
    /// after an abort), then `buffer` goes back to libtorch's caching allocator, which hands
    /// its memory to later compute only, so only after the all-reduce. Where nothing can say
    /// when NCCL stops writing `buffer` (the communicator was aborted: its kernels may still
    /// run, and a wait on them could stall the compute stream for good; or the wait could not
    /// be queued; or there is no event to wait for), it is leaked.
    fn retire(&self, done: super::Mark, buffer: Tensor) {
        let ordered = match &done.0 {
            // Under the lock: the communicator is live when the wait is queued; an abort that
            // comes after ends the all-reduce's kernel, which passes the event.
            Some(event) => self
                .comm
                .with(|_| {
                    stream::set_device(self.cuda, self.cuda_index).is_ok()
                        && stream::wait(self.cuda, default_stream(), event, "a retired bucket")
                            .is_ok()
                })
                .unwrap_or(false),
            None => false,
        };
        if ordered {
            drop(buffer);
        } else {
            tracing::warn!(
                "rank {}: leaking a gradient bucket of {} bytes that NCCL may still write",
                self.rank,
                buffer.numel() * buffer.kind().elt_size_in_bytes()
            );
            std::mem::forget(buffer);
        }
    }

    /// Records `cause`, takes the communicator away (every later collective here fails naming
    /// it), tells the other ranks through the rendezvous connection, then aborts NCCL, waiting
    /// for it at most ABORT_WAIT: the others first, as NCCL's abort may itself wait on a dead
    /// peer.
    fn abort(&self, cause: &str) {
        self.clean.store(false, Ordering::SeqCst);
        let taken = self.comm.take(format!("this rank stopped: {cause}"));
        self.bootstrap.abort(cause);
        if let Some(comm) = taken {
            self.comm.abort_taken(comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_needs_a_cuda_device() {
        let world = WorldEnv::on_loopback(0, 2, 1);
        let err = NcclGroup::connect(&world, Device::Cpu, Duration::from_millis(10))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("needs a CUDA device"), "{err}");
    }
}
