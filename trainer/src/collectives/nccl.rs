//! The `nccl` backend: CUDA tensors reduced and gathered by NCCL, on the legacy default
//! stream that libtorch computes on, so no extra synchronisation is needed.
//!
//! NCCL is opened at run time, so the binary builds and runs where there is none. The types
//! are cudarc's; the functions are looked up here rather than through cudarc's loader, which
//! tries `libnccl.so` and `libnccl.so.<CUDA major>` but not `libnccl.so.2`, the name NCCL
//! installs and PyTorch's wheels load (once libtorch_cuda.so is in the process, so is NCCL,
//! and opening it again returns that copy). `OXCLIP_NCCL=/path/to/libnccl.so.2` points
//! elsewhere.
//!
//! The rendezvous (NCCL's unique id), byte gathers and barriers go through a [`TcpGroup`].
//! A watchdog thread turns a collective that never completes into an error (see
//! [`Watchdog`]).

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId};
use tch::{Device, Kind, Tensor};

use super::tcp::TcpGroup;
use super::{Collectives, WorldEnv};
use crate::error::{Result, TrainError};

type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> ncclResult_t;
type CommInitRank = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> ncclResult_t;
type AllGather = unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, cudaStream_t) -> ncclResult_t;
type AllReduce =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) -> ncclResult_t;
type ReduceScatter =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) -> ncclResult_t;
type Broadcast =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> ncclResult_t;
type CommDestroy = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;
type GetErrorString = unsafe extern "C" fn(ncclResult_t) -> *const c_char;
type CommAbort = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;
type CommGetAsyncError = unsafe extern "C" fn(ncclComm_t, *mut ncclResult_t) -> ncclResult_t;
type CudaSetDevice = unsafe extern "C" fn(c_int) -> c_int;
/// `cudaEvent_t` is an opaque pointer.
type CudaEvent = *mut c_void;
type CudaEventCreateWithFlags = unsafe extern "C" fn(*mut CudaEvent, u32) -> c_int;
type CudaEventRecord = unsafe extern "C" fn(CudaEvent, cudaStream_t) -> c_int;
type CudaEventQuery = unsafe extern "C" fn(CudaEvent) -> c_int;
type CudaEventDestroy = unsafe extern "C" fn(CudaEvent) -> c_int;
/// `cudaEventDisableTiming`: events only to ask "done yet?".
const EVENT_DISABLE_TIMING: u32 = 2;

/// The NCCL functions oxclip calls, from one opened library.
struct Nccl {
    _lib: libloading::Library,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_gather: AllGather,
    all_reduce: AllReduce,
    reduce_scatter: ReduceScatter,
    broadcast: Broadcast,
    comm_destroy: CommDestroy,
    comm_abort: CommAbort,
    comm_get_async_error: CommGetAsyncError,
    get_error_string: GetErrorString,
    cuda_set_device: CudaSetDevice,
    event_create: CudaEventCreateWithFlags,
    event_record: CudaEventRecord,
    event_query: CudaEventQuery,
    event_destroy: CudaEventDestroy,
    _cudart: libloading::Library,
}

fn dist_err(message: String) -> TrainError {
    TrainError::Dist(message)
}

/// Opens the first of `names` that loads.
fn open_first(names: &[String]) -> std::result::Result<libloading::Library, String> {
    let mut errors = Vec::new();
    for name in names {
        // SAFETY: loading a shared library runs its initialisers; NCCL's and cudart's are
        // the same ones libtorch_cuda.so runs when it loads them.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return Ok(lib),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    Err(errors.join("; "))
}

impl Nccl {
    fn load() -> std::result::Result<Nccl, String> {
        let mut names: Vec<String> = std::env::var("OXCLIP_NCCL").ok().filter(|p| !p.is_empty()).into_iter().collect();
        names.extend(["libnccl.so.2".to_owned(), "libnccl.so".to_owned()]);
        Self::load_from(&names)
    }

    /// NCCL from the first of `names` that opens, with the CUDA runtime beside it.
    fn load_from(names: &[String]) -> std::result::Result<Nccl, String> {
        let lib = open_first(names).map_err(|e| {
            format!(
                "NCCL not found ({e}); install it (e.g. `pip install nvidia-nccl-cu13`, or it comes with \
                 PyTorch's CUDA wheels), set OXCLIP_NCCL=/path/to/libnccl.so.2, or use dist.backend: cpu"
            )
        })?;
        let cudart = open_first(&["libcudart.so.13", "libcudart.so.12", "libcudart.so"].map(String::from))
            .map_err(|e| format!("the CUDA runtime is not loadable: {e}"))?;
        // SAFETY: the symbol types are NCCL's and cudart's C signatures (nccl.h,
        // cuda_runtime_api.h), with cudarc's definitions of the argument types.
        unsafe {
            macro_rules! sym {
                ($lib:expr, $name:literal) => {
                    *$lib.get(concat!($name, "\0").as_bytes()).map_err(|e| format!("{}: {e}", $name))?
                };
            }
            Ok(Nccl {
                get_unique_id: sym!(lib, "ncclGetUniqueId"),
                comm_init_rank: sym!(lib, "ncclCommInitRank"),
                all_gather: sym!(lib, "ncclAllGather"),
                all_reduce: sym!(lib, "ncclAllReduce"),
                reduce_scatter: sym!(lib, "ncclReduceScatter"),
                broadcast: sym!(lib, "ncclBroadcast"),
                comm_destroy: sym!(lib, "ncclCommDestroy"),
                comm_abort: sym!(lib, "ncclCommAbort"),
                comm_get_async_error: sym!(lib, "ncclCommGetAsyncError"),
                get_error_string: sym!(lib, "ncclGetErrorString"),
                cuda_set_device: sym!(cudart, "cudaSetDevice"),
                event_create: sym!(cudart, "cudaEventCreateWithFlags"),
                event_record: sym!(cudart, "cudaEventRecord"),
                event_query: sym!(cudart, "cudaEventQuery"),
                event_destroy: sym!(cudart, "cudaEventDestroy"),
                _lib: lib,
                _cudart: cudart,
            })
        }
    }

    fn get() -> Result<&'static Nccl> {
        static NCCL: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
        NCCL.get_or_init(Nccl::load).as_ref().map_err(|e| dist_err(e.clone()))
    }

    fn check(&self, what: &str, result: ncclResult_t) -> Result<()> {
        if result == ncclResult_t::ncclSuccess {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(result)) }.to_string_lossy().into_owned();
        Err(dist_err(format!("NCCL {what}: {text} ({result:?})")))
    }
}

/// Ranks joined by an NCCL communicator, one GPU each.
pub struct NcclGroup {
    nccl: &'static Nccl,
    comm: ncclComm_t,
    device: Device,
    rank: usize,
    world_size: usize,
    /// Rendezvous, byte gathers and barriers.
    bootstrap: TcpGroup,
    watchdog: Arc<Watchdog>,
    watchdog_thread: Option<std::thread::JoinHandle<()>>,
    seq: std::cell::Cell<u64>,
}

/// NCCL collectives run on the GPU and never time out by themselves: a dead or stalled peer
/// leaves the others' kernels waiting forever. As PyTorch's watchdog does, a thread watches
/// an event recorded after each collective; one not done within the timeout, or an
/// asynchronous NCCL error, aborts the communicator (which ends the waiting kernels) and the
/// next collective on this rank returns the error, naming the collective.
struct Watchdog {
    /// Collectives enqueued and not yet seen complete: (when, what, event), oldest first.
    pending: Mutex<VecDeque<(Instant, String, SendPtr)>>,
    /// Why the communicator was aborted.
    failed: Mutex<Option<String>>,
    stop: AtomicBool,
}

/// A CUDA or NCCL handle moved to the watchdog thread; CUDA and NCCL allow using them from
/// any thread.
#[derive(Clone, Copy)]
struct SendPtr(*mut c_void);
// SAFETY: see above; the handles are only passed back to CUDA/NCCL calls.
unsafe impl Send for SendPtr {}

fn watch(nccl: &'static Nccl, comm: SendPtr, cuda_index: c_int, timeout: Duration, state: Arc<Watchdog>) {
    // SAFETY: selects this thread's device for the event queries.
    unsafe {
        (nccl.cuda_set_device)(cuda_index);
    }
    let comm = comm.0 as ncclComm_t;
    while !state.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let mut problem = None;
        if let Ok(mut pending) = state.pending.lock() {
            while let Some((since, what, event)) = pending.front() {
                // SAFETY: the event was created by cudaEventCreateWithFlags and is destroyed
                // only here, once.
                let status = unsafe { (nccl.event_query)(event.0) };
                if status == 0 {
                    unsafe {
                        (nccl.event_destroy)(event.0);
                    }
                    pending.pop_front();
                } else if since.elapsed() > timeout {
                    problem = Some(format!(
                        "{what} did not complete within {}s: a rank died or stalls (raise dist.timeout_s if it is only slow)",
                        timeout.as_secs()
                    ));
                    break;
                } else {
                    break;
                }
            }
        }
        let mut async_error = ncclResult_t::ncclSuccess;
        // SAFETY: queries the live communicator.
        unsafe {
            (nccl.comm_get_async_error)(comm, &mut async_error);
        }
        if problem.is_none() && !matches!(async_error, ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress) {
            problem = Some(format!("NCCL reported {async_error:?}"));
        }
        if let Some(message) = problem {
            tracing::error!("NCCL watchdog: {message}; aborting the communicator");
            if let Ok(mut failed) = state.failed.lock() {
                *failed = Some(message);
            }
            // SAFETY: aborting a live communicator from another thread is what it is for.
            unsafe {
                (nccl.comm_abort)(comm);
            }
            return;
        }
    }
}

impl NcclGroup {
    /// Joins the world on `device` (this rank's GPU): rank 0 makes NCCL's unique id and hands
    /// it to the others over the TCP rendezvous.
    pub fn connect(world: &WorldEnv, device: Device, timeout: Duration) -> Result<Self> {
        let Device::Cuda(index) = device else {
            return Err(dist_err(format!("the NCCL backend needs a CUDA device, the run is on {}; use dist.backend: cpu", crate::device::name(device))));
        };
        let nccl = Nccl::get()?;
        let bootstrap = TcpGroup::connect(world, timeout)?;
        let mut id = MaybeUninit::<ncclUniqueId>::zeroed();
        if world.rank == 0 {
            // SAFETY: ncclGetUniqueId fills the id it is given.
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
        let cuda_index = c_int::try_from(index).map_err(|_| dist_err(format!("CUDA device {index}")))?;
        // SAFETY: cudaSetDevice takes a device ordinal; NCCL binds the communicator to it.
        let status = unsafe { (nccl.cuda_set_device)(cuda_index) };
        if status != 0 {
            return Err(dist_err(format!("cudaSetDevice({index}) failed with CUDA error {status}")));
        }
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let (ranks, rank) = (c_int::try_from(world.world_size).unwrap_or(c_int::MAX), world.rank as c_int);
        // SAFETY: every rank calls ncclCommInitRank with the same id and world size.
        nccl.check("ncclCommInitRank", unsafe { (nccl.comm_init_rank)(&mut comm, ranks, id, rank) })?;
        tracing::info!("rank {} of {}: NCCL communicator on cuda:{index}", world.rank, world.world_size);
        let watchdog = Arc::new(Watchdog { pending: Mutex::new(VecDeque::new()), failed: Mutex::new(None), stop: AtomicBool::new(false) });
        let (state, comm_ptr) = (Arc::clone(&watchdog), SendPtr(comm as *mut c_void));
        let watchdog_thread = std::thread::Builder::new()
            .name("oxclip-nccl-watchdog".into())
            .spawn(move || watch(nccl, comm_ptr, cuda_index, timeout, state))
            .map_err(|e| dist_err(format!("cannot start the NCCL watchdog: {e}")))?;
        Ok(Self {
            nccl,
            comm,
            device,
            rank: world.rank,
            world_size: world.world_size,
            bootstrap,
            watchdog,
            watchdog_thread: Some(watchdog_thread),
            seq: std::cell::Cell::new(0),
        })
    }

    /// Fails if the watchdog aborted the communicator.
    fn healthy(&self) -> Result<()> {
        match self.watchdog.failed.lock().ok().and_then(|f| f.clone()) {
            Some(message) => Err(dist_err(format!("rank {}: {message}", self.rank))),
            None => Ok(()),
        }
    }

    /// Runs one NCCL call, then hands the watchdog an event that completes with it.
    fn collective(&self, what: &str, call: impl FnOnce() -> ncclResult_t) -> Result<()> {
        self.healthy()?;
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        self.nccl.check(what, call())?;
        let mut event: CudaEvent = std::ptr::null_mut();
        // SAFETY: creates and records an event on the stream the collective was queued on.
        let status = unsafe {
            let created = (self.nccl.event_create)(&mut event, EVENT_DISABLE_TIMING);
            if created == 0 {
                (self.nccl.event_record)(event, Self::null_stream())
            } else {
                created
            }
        };
        if status != 0 {
            return Err(dist_err(format!("CUDA error {status} recording the end of {what}")));
        }
        if let Ok(mut pending) = self.watchdog.pending.lock() {
            pending.push_back((Instant::now(), format!("{what} #{seq}"), SendPtr(event)));
        }
        Ok(())
    }

    /// The tensor as NCCL sees it: contiguous, on this rank's GPU, of a type NCCL reduces.
    fn prepared(&self, tensor: &Tensor) -> Result<(Tensor, ncclDataType_t)> {
        if tensor.device() != self.device {
            return Err(dist_err(format!("a {:?} tensor given to the NCCL backend on {:?}", tensor.device(), self.device)));
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

    fn null_stream() -> cudaStream_t {
        std::ptr::null_mut()
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        self.watchdog.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.watchdog_thread.take() {
            let _ = thread.join();
        }
        // An aborted communicator is already gone.
        if self.healthy().is_ok() {
            // SAFETY: the communicator was created by ncclCommInitRank and is destroyed once.
            unsafe {
                (self.nccl.comm_destroy)(self.comm);
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
        // SAFETY: both buffers are contiguous CUDA memory on this rank's device, the output
        // world_size times the input's element count.
        self.collective("all_gather", || unsafe {
            (self.nccl.all_gather)(input.data_ptr(), output.data_ptr(), input.numel(), dtype, self.comm, Self::null_stream())
        })?;
        Ok(output)
    }

    fn reduce_scatter(&self, tensor: &Tensor) -> Result<Tensor> {
        let (input, dtype) = self.prepared(tensor)?;
        let mut shape = input.size();
        if shape.is_empty() || shape[0] % self.world_size as i64 != 0 {
            return Err(dist_err(format!("reduce_scatter of {:?} over {} ranks", shape, self.world_size)));
        }
        shape[0] /= self.world_size as i64;
        let output = Tensor::empty(shape.as_slice(), (input.kind(), self.device));
        // SAFETY: contiguous CUDA buffers; the output holds 1/world_size of the input.
        self.collective("reduce_scatter", || unsafe {
            (self.nccl.reduce_scatter)(
                input.data_ptr(),
                output.data_ptr(),
                output.numel(),
                dtype,
                ncclRedOp_t::ncclSum,
                self.comm,
                Self::null_stream(),
            )
        })?;
        Ok(output)
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let (buffer, dtype) = self.prepared(tensor)?;
        // SAFETY: in place on a contiguous CUDA buffer.
        self.collective("all_reduce", || unsafe {
            (self.nccl.all_reduce)(buffer.data_ptr(), buffer.data_ptr(), buffer.numel(), dtype, ncclRedOp_t::ncclSum, self.comm, Self::null_stream())
        })?;
        if buffer.data_ptr() != tensor.data_ptr() {
            let _ = tensor.copy_(&buffer);
        }
        Ok(())
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let (buffer, dtype) = self.prepared(tensor)?;
        // SAFETY: in place on a contiguous CUDA buffer.
        self.collective("broadcast", || unsafe {
            (self.nccl.broadcast)(buffer.data_ptr(), buffer.data_ptr(), buffer.numel(), dtype, root as c_int, self.comm, Self::null_stream())
        })?;
        if buffer.data_ptr() != tensor.data_ptr() {
            let _ = tensor.copy_(&buffer);
        }
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.bootstrap.all_gather_bytes(bytes)
    }

    fn barrier(&self) -> Result<()> {
        self.healthy()?;
        // Work queued on the GPU counts: finish it before meeting the others.
        tch::Cuda::synchronize(match self.device {
            Device::Cuda(i) => i as i64,
            _ => 0,
        });
        self.bootstrap.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_a_gpu_and_says_so_when_nccl_is_missing() {
        let world = WorldEnv { rank: 0, world_size: 2, local_rank: 0, local_world_size: 2, master_addr: "127.0.0.1".into(), master_port: 1 };
        let err = NcclGroup::connect(&world, Device::Cpu, Duration::from_millis(10)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("needs a CUDA device"), "{err}");
        // A library that cannot be opened (whether or not this machine has NCCL elsewhere)
        // gets a message that says what to do.
        let missing = Nccl::load_from(&["/nonexistent/oxclip-test/libnccl.so.2".to_owned()]).err().unwrap_or_default();
        assert!(missing.contains("NCCL not found"), "{missing}");
        assert!(missing.contains("OXCLIP_NCCL") && missing.contains("dist.backend: cpu"), "{missing}");
        // The message names every file tried, in order, with the loader's reason.
        let tried = ["/nonexistent/oxclip-test/a/libnccl.so.2", "/nonexistent/oxclip-test/b/libnccl.so"].map(String::from);
        let both = Nccl::load_from(&tried).err().unwrap_or_default();
        let (a, b) = (both.find(tried[0].as_str()), both.find(tried[1].as_str()));
        assert!(a.is_some() && b.is_some() && a < b, "{both}");
        // A library that opens but is not NCCL (the C library) is refused, and not as missing:
        // load_from does not take the first file that opens on trust.
        let not_nccl = Nccl::load_from(&["libc.so.6".to_owned()]).err().unwrap_or_default();
        assert!(!not_nccl.is_empty() && !not_nccl.contains("NCCL not found"), "{not_nccl}");
        assert!(not_nccl.contains("ncclGetUniqueId") || not_nccl.contains("CUDA runtime"), "{not_nccl}");
    }
}
