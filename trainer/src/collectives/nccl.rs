//! The `nccl` backend: CUDA tensors reduced and gathered by NCCL, on the legacy default
//! stream that libtorch computes on, so no extra synchronisation is needed; except the
//! overlapped gradient reduction ([`Collectives::all_reduce_start`]), which runs on a
//! communication stream of its own, ordered against the default stream by events.
//!
//! NCCL is opened at run time, so the binary builds and runs where there is none. The types
//! are cudarc's; the functions are looked up here rather than through cudarc's loader, which
//! tries `libnccl.so` and `libnccl.so.<CUDA major>` but not `libnccl.so.2`, the name NCCL
//! installs and PyTorch's wheels load (once libtorch_cuda.so is in the process, so is NCCL,
//! and opening it again returns that copy). `OXCLIP_NCCL=/path/to/libnccl.so.2` points
//! elsewhere.
//!
//! The rendezvous (NCCL's unique id), byte gathers and barriers go through a [`TcpGroup`].
//! Nothing waits on a peer without a deadline: the communicator is created non-blocking and
//! polled until `dist.timeout_s` after the rendezvous began ([`create_comm`]), and a watchdog
//! thread turns a collective that never completes into an error (see [`Watchdog`]). NCCL
//! itself cannot tell that two ranks called different collectives, so each rank keeps a
//! [`Trace`] of its own, compared across ranks at every host exchange.
//!
//! cudart is the copy libtorch already loaded when there is one ([`open_cudart`]): a second
//! copy would have its own device state.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId,
};
use tch::{Device, Kind, Tensor};

use super::tcp::TcpGroup;
use super::{Collectives, WorldEnv};
use crate::error::{Result, TrainError};

type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> ncclResult_t;
type CommInitRank =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> ncclResult_t;
type CommInitRankConfig = unsafe extern "C" fn(
    *mut ncclComm_t,
    c_int,
    ncclUniqueId,
    c_int,
    *mut CommConfig,
) -> ncclResult_t;
type AllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type ReduceScatter = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type Broadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
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
type CudaStreamCreateWithFlags = unsafe extern "C" fn(*mut cudaStream_t, u32) -> c_int;
type CudaStreamWaitEvent = unsafe extern "C" fn(cudaStream_t, CudaEvent, u32) -> c_int;
type CudaStreamDestroy = unsafe extern "C" fn(cudaStream_t) -> c_int;
/// `cudaEventDisableTiming`: events only to ask "done yet?" and to order streams.
const EVENT_DISABLE_TIMING: u32 = 2;
/// `cudaStreamNonBlocking`: a stream that does not synchronise with the legacy default
/// stream. A blocking stream would wait for, and be waited for by, every kernel libtorch
/// queues on the default stream, serialising communication with compute again.
const STREAM_NON_BLOCKING: u32 = 1;

/// `ncclConfig_t` as NCCL 2.18 lays it out (nccl.h). NCCL copies only the first `size` bytes
/// over its own `NCCL_CONFIG_INITIALIZER` defaults and ignores what its `version` predates,
/// so this prefix works with any NCCL from 2.14 (the first with `blocking`) on: a newer one
/// keeps its defaults for the fields added since.
#[repr(C)]
struct CommConfig {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

/// `NCCL_CONFIG_UNDEF_INT`: "NCCL's default" for an int field.
const CONFIG_UNDEF_INT: c_int = c_int::MIN;

impl CommConfig {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: init returns at once and is polled, so
    /// the wait for the other ranks has a deadline.
    fn non_blocking() -> Self {
        Self {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            // NCCL_VERSION(2, 18, 0).
            version: 21800,
            blocking: 0,
            cga_cluster_size: CONFIG_UNDEF_INT,
            min_ctas: CONFIG_UNDEF_INT,
            max_ctas: CONFIG_UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: CONFIG_UNDEF_INT,
        }
    }
}

/// The NCCL functions oxclip calls, from one opened library.
struct Nccl {
    _lib: libloading::Library,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    /// NCCL 2.14 and later; without it, the blocking init runs on a helper thread.
    comm_init_rank_config: Option<CommInitRankConfig>,
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
    stream_create: CudaStreamCreateWithFlags,
    stream_wait_event: CudaStreamWaitEvent,
    stream_destroy: CudaStreamDestroy,
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

/// The CUDA runtime's names, newest first, for a process that has none loaded yet.
const CUDART_NAMES: [&str; 3] = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"];

/// The paths of the shared objects in this process, in load order.
fn loaded_objects() -> Vec<String> {
    unsafe extern "C" fn add(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the Vec passed below, `info` is valid for this call, and
        // `dlpi_name` is NUL-terminated or null.
        unsafe {
            let paths = &mut *(data as *mut Vec<String>);
            let name = (*info).dlpi_name;
            if !name.is_null() {
                paths.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
        }
        0
    }
    let mut paths: Vec<String> = Vec::new();
    // SAFETY: the callback only reads `info` and appends to `paths`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(Some(add), &mut paths as *mut Vec<String> as *mut c_void);
    }
    paths
}

/// The first CUDA runtime among `loaded` (shared object paths): `libcudart.so.13`, or a
/// wheel's or libtorch's renamed copy such as `libcudart-9335f6a2.so.12`, never another
/// library whose name merely starts so.
fn pick_cudart(loaded: &[String]) -> Option<&str> {
    loaded.iter().map(String::as_str).find(|path| {
        let name = path.rsplit('/').next().unwrap_or(path);
        name.strip_prefix("libcudart").is_some_and(|rest| {
            (rest.starts_with(".so") || rest.starts_with('-')) && rest.contains(".so")
        })
    })
}

/// The CUDA runtime libtorch already loaded, when there is one (opening that very file adds
/// no second copy, whose device state and streams would be separate from libtorch's); else
/// the first of `names` that loads.
fn open_cudart(
    loaded: &[String],
    names: &[String],
) -> std::result::Result<libloading::Library, String> {
    if let Some(path) = pick_cudart(loaded) {
        // SAFETY: the library is already initialised in this process; this only adds a
        // reference to it.
        return unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("the CUDA runtime loaded at {path} cannot be reopened: {e}"));
    }
    tracing::debug!(
        "no CUDA runtime in the process yet; loading it by name ({})",
        names.join(", ")
    );
    open_first(names).map_err(|e| format!("the CUDA runtime is not loadable: {e}"))
}

impl Nccl {
    fn load() -> std::result::Result<Nccl, String> {
        let mut names: Vec<String> =
            std::env::var("OXCLIP_NCCL").ok().filter(|p| !p.is_empty()).into_iter().collect();
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
        let cudart = open_cudart(&loaded_objects(), &CUDART_NAMES.map(String::from))?;
        // SAFETY: the symbol types are NCCL's and cudart's C signatures (nccl.h,
        // cuda_runtime_api.h), with cudarc's definitions of the argument types.
        unsafe {
            macro_rules! sym {
                ($lib:expr, $name:literal) => {
                    *$lib
                        .get(concat!($name, "\0").as_bytes())
                        .map_err(|e| format!("{}: {e}", $name))?
                };
            }
            Ok(Nccl {
                get_unique_id: sym!(lib, "ncclGetUniqueId"),
                comm_init_rank: sym!(lib, "ncclCommInitRank"),
                comm_init_rank_config: lib.get(b"ncclCommInitRankConfig\0").ok().map(|f| *f),
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
                stream_create: sym!(cudart, "cudaStreamCreateWithFlags"),
                stream_wait_event: sym!(cudart, "cudaStreamWaitEvent"),
                stream_destroy: sym!(cudart, "cudaStreamDestroy"),
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
        Err(self.error(what, result))
    }

    fn error(&self, what: &str, result: ncclResult_t) -> TrainError {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(result)) }
            .to_string_lossy()
            .into_owned();
        dist_err(format!("NCCL {what}: {text} ({result:?})"))
    }
}

/// A recorded CUDA event, destroyed when dropped: CUDA releases it once the device has
/// passed it, so dropping it right after a stream was told to wait for it is fine (the wait
/// keeps the point it was given).
#[derive(Debug)]
pub struct Event(CudaEvent);

// SAFETY: a cudaEvent_t may be recorded, waited for and destroyed from any thread; this one
// is only passed back to such calls, by one owner at a time.
unsafe impl Send for Event {}

impl Drop for Event {
    fn drop(&mut self) {
        // An Event exists only once NCCL (with cudart) was loaded, so this finds it.
        if let Ok(nccl) = Nccl::get() {
            // SAFETY: created by cudaEventCreateWithFlags, destroyed once, here.
            unsafe {
                (nccl.event_destroy)(self.0);
            }
        }
    }
}

/// Ranks joined by an NCCL communicator, one GPU each.
pub struct NcclGroup {
    nccl: &'static Nccl,
    comm: ncclComm_t,
    device: Device,
    cuda_index: c_int,
    /// The communication stream the overlapped gradient reduction runs on (non-blocking,
    /// created once); every other collective stays on the default stream.
    stream: cudaStream_t,
    rank: usize,
    world_size: usize,
    /// Rendezvous, byte gathers and barriers.
    bootstrap: TcpGroup,
    watchdog: Arc<Watchdog>,
    watchdog_thread: Option<std::thread::JoinHandle<()>>,
    /// The NCCL collectives made so far, compared across ranks at every host exchange. Behind
    /// a lock because the gradient reducer's communication thread issues collectives too
    /// (only it, in bucket order, while the backward pass runs: the order stays the same on
    /// every rank).
    trace: Mutex<Trace>,
    timeout: Duration,
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

fn watch(
    nccl: &'static Nccl,
    comm: SendPtr,
    cuda_index: c_int,
    timeout: Duration,
    state: Arc<Watchdog>,
) {
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
        if problem.is_none()
            && !matches!(async_error, ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress)
        {
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

/// Creates this rank's communicator, which completes only once every rank has joined it: a
/// rank that died or stalls since the rendezvous makes this fail at `deadline` (naming what
/// it waited for) instead of waiting forever.
fn create_comm(
    nccl: &'static Nccl,
    world: &WorldEnv,
    id: ncclUniqueId,
    cuda_index: c_int,
    deadline: Instant,
    timeout: Duration,
) -> Result<ncclComm_t> {
    let ranks = c_int::try_from(world.world_size).map_err(|_| {
        dist_err(format!("a world of {} ranks is too large for NCCL", world.world_size))
    })?;
    let rank = c_int::try_from(world.rank)
        .map_err(|_| dist_err(format!("rank {} is too large for NCCL", world.rank)))?;
    let late = |how: &str| {
        dist_err(format!(
            "rank {} of {}: the NCCL communicator was not created within dist.timeout_s ({}s, counted from the start of the \
             rendezvous): {how} waited for all {} ranks to join it; a rank died or stalls since the rendezvous (raise \
             dist.timeout_s if it is only slow)",
            world.rank,
            world.world_size,
            timeout.as_secs(),
            world.world_size
        ))
    };
    // NCCL_COMM_BLOCKING=1 overrides `blocking = 0`: the init would block this thread.
    let blocking_forced = std::env::var("NCCL_COMM_BLOCKING").is_ok_and(|v| v.trim() == "1");
    let Some(init_config) = nccl.comm_init_rank_config.filter(|_| !blocking_forced) else {
        return create_comm_on_thread(nccl, ranks, rank, id, cuda_index, deadline).map_err(|e| match e {
            Some(e) => e,
            None => late(
                "ncclCommInitRank (blocking: this NCCL has no non-blocking init, or NCCL_COMM_BLOCKING=1; it ran on a helper \
                 thread, now abandoned: it stays blocked until the process exits)",
            ),
        });
    };
    let mut comm: ncclComm_t = std::ptr::null_mut();
    let mut config = CommConfig::non_blocking();
    // SAFETY: every rank calls this with the same id and world size; `config` outlives the
    // call (NCCL copies it).
    let started = unsafe { init_config(&mut comm, ranks, id, rank, &mut config) };
    let abort = |comm: ncclComm_t| abort_within(nccl, comm, ABORT_WAIT);
    if !matches!(started, ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress) {
        abort(comm);
        return Err(nccl.error("ncclCommInitRankConfig", started));
    }
    loop {
        let mut state = ncclResult_t::ncclInProgress;
        // SAFETY: `comm` was returned by ncclCommInitRankConfig; polling it is how a
        // non-blocking init is followed.
        let queried = unsafe { (nccl.comm_get_async_error)(comm, &mut state) };
        if queried != ncclResult_t::ncclSuccess {
            abort(comm);
            return Err(nccl.error("ncclCommGetAsyncError", queried));
        }
        match state {
            ncclResult_t::ncclSuccess => return Ok(comm),
            ncclResult_t::ncclInProgress if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            ncclResult_t::ncclInProgress => {
                abort(comm);
                return Err(late(
                    "ncclCommInitRankConfig (non-blocking, polled, aborted at the deadline)",
                ));
            }
            failed => {
                abort(comm);
                return Err(nccl.error("ncclCommInitRankConfig", failed));
            }
        }
    }
}

/// How long a failing rank waits for `ncclCommAbort` before it reports the error anyway.
const ABORT_WAIT: Duration = Duration::from_secs(10);

/// Aborts `comm` (a communicator whose creation failed or is given up) on a helper thread,
/// waiting at most `wait`: the abort may itself wait on NCCL's own bootstrap sockets, and the
/// rank's error, then its exit, must not wait with it.
fn abort_within(nccl: &'static Nccl, comm: ncclComm_t, wait: Duration) {
    if comm.is_null() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = SendPtr(comm as *mut c_void);
    let spawned = std::thread::Builder::new().name("oxclip-nccl-abort".into()).spawn(move || {
        let handle = handle;
        // SAFETY: ends the communicator, once; nothing else uses it.
        unsafe {
            (nccl.comm_abort)(handle.0 as ncclComm_t);
        }
        let _ = tx.send(());
    });
    match spawned {
        Ok(_) => {
            if rx.recv_timeout(wait).is_err() {
                tracing::warn!(
                    "ncclCommAbort did not return within {}s; leaving it behind",
                    wait.as_secs()
                );
            }
        }
        // SAFETY: as above, on this thread.
        Err(_) => unsafe {
            (nccl.comm_abort)(comm);
        },
    }
}

/// For an NCCL without `ncclCommInitRankConfig` (before 2.14): the blocking init on a helper
/// thread, waited for until `deadline`. `Err(None)`: the deadline passed; the thread cannot be
/// stopped and is left behind.
fn create_comm_on_thread(
    nccl: &'static Nccl,
    ranks: c_int,
    rank: c_int,
    id: ncclUniqueId,
    cuda_index: c_int,
    deadline: Instant,
) -> std::result::Result<ncclComm_t, Option<TrainError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("oxclip-nccl-init".into())
        .spawn(move || {
            let mut comm: ncclComm_t = std::ptr::null_mut();
            // SAFETY: the device is per thread, so it is set here too; every rank calls
            // ncclCommInitRank with the same id and world size.
            let result = unsafe {
                (nccl.cuda_set_device)(cuda_index);
                (nccl.comm_init_rank)(&mut comm, ranks, id, rank)
            };
            let _ = tx.send((result, SendPtr(comm as *mut c_void)));
        })
        .map_err(|e| Some(dist_err(format!("cannot start the NCCL init thread: {e}"))))?;
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok((result, comm)) => {
            nccl.check("ncclCommInitRank", result).map(|()| comm.0 as ncclComm_t).map_err(Some)
        }
        Err(_) => Err(None),
    }
}

/// The NCCL collectives, as a [`Trace`] records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum CollOp {
    AllGather = 1,
    ReduceScatter = 2,
    AllReduce = 3,
    Broadcast = 4,
}

impl CollOp {
    fn name(self) -> &'static str {
        match self {
            CollOp::AllGather => "all_gather",
            CollOp::ReduceScatter => "reduce_scatter",
            CollOp::AllReduce => "all_reduce",
            CollOp::Broadcast => "broadcast",
        }
    }

    fn from_u8(v: u8) -> Option<CollOp> {
        [CollOp::AllGather, CollOp::ReduceScatter, CollOp::AllReduce, CollOp::Broadcast]
            .into_iter()
            .find(|op| *op as u8 == v)
    }
}

/// The host exchange a rank is at when the traces are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum HostOp {
    Bytes = 1,
    Barrier = 2,
}

impl HostOp {
    fn describe(v: u8) -> &'static str {
        match v {
            1 => "a byte exchange (all_gather_bytes)",
            2 => "a barrier",
            _ => "an unknown host exchange",
        }
    }
}

const DTYPES: [(Kind, &str); 6] = [
    (Kind::Float, "float32"),
    (Kind::Double, "float64"),
    (Kind::Half, "float16"),
    (Kind::BFloat16, "bfloat16"),
    (Kind::Int, "int32"),
    (Kind::Int64, "int64"),
];

/// A small, stable code for a tensor kind (its index in [`DTYPES`], 255 for others).
fn kind_code(kind: Kind) -> u8 {
    DTYPES.iter().position(|(k, _)| *k == kind).map_or(u8::MAX, |i| i as u8)
}

/// One NCCL collective: its operation, dtype and element count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Call {
    op: u8,
    dtype: u8,
    elements: u64,
}

impl Call {
    fn describe_values(&self) -> String {
        let dtype = DTYPES.get(self.dtype as usize).map_or("?", |(_, name)| name);
        format!("{} {dtype} values", self.elements)
    }

    fn describe(&self) -> String {
        match CollOp::from_u8(self.op) {
            Some(op) => format!("{} of {}", op.name(), self.describe_values()),
            None => "none yet".into(),
        }
    }
}

/// The NCCL collectives a rank has made: how many, a running hash of every one's operation,
/// dtype and element count (FNV-1a, the same on every machine), and the last one. Updating it
/// costs nothing on the GPU; ranks compare theirs at each host exchange, which goes over TCP
/// anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Trace {
    count: u64,
    hash: u64,
    last: Call,
}

impl Default for Trace {
    fn default() -> Self {
        Self { count: 0, hash: 0xcbf2_9ce4_8422_2325, last: Call::default() }
    }
}

/// Bytes of [`Trace::header`]: host op, count, hash, last op, last dtype, last element count.
const HEADER_LEN: usize = 1 + 8 + 8 + 1 + 1 + 8;

impl Trace {
    fn then(self, call: Call) -> Trace {
        let mut hash = self.hash;
        for byte in [call.op, call.dtype].into_iter().chain(call.elements.to_le_bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        Trace { count: self.count + 1, hash, last: call }
    }

    fn header(&self, host: HostOp) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = host as u8;
        out[1..9].copy_from_slice(&self.count.to_le_bytes());
        out[9..17].copy_from_slice(&self.hash.to_le_bytes());
        out[17] = self.last.op;
        out[18] = self.last.dtype;
        out[19..27].copy_from_slice(&self.last.elements.to_le_bytes());
        out
    }

    /// A header and what follows it: ((host op, trace), body).
    fn parse(bytes: &[u8]) -> Option<((u8, Trace), &[u8])> {
        if bytes.len() < HEADER_LEN {
            return None;
        }
        let u64_at =
            |i: usize| bytes.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let trace = Trace {
            count: u64_at(1)?,
            hash: u64_at(9)?,
            last: Call { op: bytes[17], dtype: bytes[18], elements: u64_at(19)? },
        };
        Some(((bytes[0], trace), &bytes[HEADER_LEN..]))
    }
}

/// `bytes` from every rank over `bootstrap`, each rank's `trace` riding along in front; fails
/// on every rank alike when the traces differ.
fn traced_exchange(
    bootstrap: &TcpGroup,
    trace: Trace,
    host: HostOp,
    bytes: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let mut payload = trace.header(host).to_vec();
    payload.extend_from_slice(bytes);
    let parts = bootstrap.all_gather_bytes(&payload)?;
    let mut headers = Vec::with_capacity(parts.len());
    let mut bodies = Vec::with_capacity(parts.len());
    for (r, part) in parts.into_iter().enumerate() {
        let (header, body) = Trace::parse(&part).ok_or_else(|| {
            dist_err(format!(
                "rank {r} sent a host exchange without its NCCL trace (another oxclip version?)"
            ))
        })?;
        headers.push(header);
        bodies.push(body.to_vec());
    }
    match diverged(&headers) {
        Some(message) => Err(dist_err(format!("rank {}: {message}", bootstrap.rank()))),
        None => Ok(bodies),
    }
}

/// Which ranks' traces (index = rank) differ from rank 0's, said as tcp.rs says a diverged
/// collective; `None` when all agree.
fn diverged(traces: &[(u8, Trace)]) -> Option<String> {
    let (host0, t0) = traces.first()?;
    let mut found = Vec::new();
    for (r, (host, t)) in traces.iter().enumerate().skip(1) {
        if t != t0 {
            found.push(if t.count == t0.count {
                format!(
                    "rank {r}'s {} NCCL collectives differ from rank 0's (the last: {} on rank {r}, {} on rank 0)",
                    t.count,
                    t.last.describe(),
                    t0.last.describe()
                )
            } else {
                format!(
                    "rank {r} has made {} NCCL collectives (the last: {}) while rank 0 has made {} (the last: {})",
                    t.count,
                    t.last.describe(),
                    t0.count,
                    t0.last.describe()
                )
            });
        } else if host != host0 {
            found.push(format!(
                "rank {r} is at {} while rank 0 is at {}",
                HostOp::describe(*host),
                HostOp::describe(*host0)
            ));
        }
    }
    if found.is_empty() {
        return None;
    }
    let more = found.len().saturating_sub(3);
    found.truncate(3);
    let mut message = found.join("; ");
    if more > 0 {
        message.push_str(&format!("; and {more} more rank(s)"));
    }
    Some(format!("{message}: the ranks took different paths (different configs or data?); found at a host exchange"))
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
        let cuda_index =
            c_int::try_from(index).map_err(|_| dist_err(format!("CUDA device {index}")))?;
        // SAFETY: cudaSetDevice takes a device ordinal; NCCL binds the communicator to it.
        let status = unsafe { (nccl.cuda_set_device)(cuda_index) };
        if status != 0 {
            return Err(dist_err(format!(
                "cudaSetDevice({index}) failed with CUDA error {status}"
            )));
        }
        let comm = create_comm(nccl, world, id, cuda_index, deadline, timeout)?;
        tracing::info!(
            "rank {} of {}: NCCL communicator on cuda:{index}",
            world.rank,
            world.world_size
        );
        let mut stream: cudaStream_t = std::ptr::null_mut();
        // SAFETY: creates a stream on the device set just above.
        let status = unsafe { (nccl.stream_create)(&mut stream, STREAM_NON_BLOCKING) };
        if status != 0 {
            abort_within(nccl, comm, ABORT_WAIT);
            return Err(dist_err(format!(
                "cudaStreamCreateWithFlags on cuda:{index} failed with CUDA error {status}"
            )));
        }
        let watchdog = Arc::new(Watchdog {
            pending: Mutex::new(VecDeque::new()),
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let (state, comm_ptr) = (Arc::clone(&watchdog), SendPtr(comm as *mut c_void));
        let watchdog_thread = std::thread::Builder::new()
            .name("oxclip-nccl-watchdog".into())
            .spawn(move || watch(nccl, comm_ptr, cuda_index, timeout, state))
            .map_err(|e| dist_err(format!("cannot start the NCCL watchdog: {e}")))?;
        Ok(Self {
            nccl,
            comm,
            device,
            cuda_index,
            stream,
            rank: world.rank,
            world_size: world.world_size,
            bootstrap,
            watchdog,
            watchdog_thread: Some(watchdog_thread),
            trace: Mutex::new(Trace::default()),
            timeout,
        })
    }

    /// Fails if the watchdog aborted the communicator.
    fn healthy(&self) -> Result<()> {
        match self.watchdog.failed.lock().ok().and_then(|f| f.clone()) {
            Some(message) => Err(dist_err(format!("rank {}: {message}", self.rank))),
            None => Ok(()),
        }
    }

    /// The collectives made so far. A poisoned lock still holds the last complete trace.
    fn trace(&self) -> std::sync::MutexGuard<'_, Trace> {
        self.trace.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates an event and records it on `stream`, after everything queued there so far.
    fn record(&self, stream: cudaStream_t, what: &str) -> Result<Event> {
        let mut event: CudaEvent = std::ptr::null_mut();
        // SAFETY: creates an event and records it on a live stream of this rank's device.
        let created = unsafe { (self.nccl.event_create)(&mut event, EVENT_DISABLE_TIMING) };
        if created != 0 {
            return Err(dist_err(format!("CUDA error {created} creating an event for {what}")));
        }
        let event = Event(event);
        // SAFETY: as above.
        let status = unsafe { (self.nccl.event_record)(event.0, stream) };
        if status != 0 {
            return Err(dist_err(format!("CUDA error {status} recording an event for {what}")));
        }
        Ok(event)
    }

    /// Makes `stream` wait (on the device, not the host) until `event` has passed.
    fn stream_wait(&self, stream: cudaStream_t, event: &Event, what: &str) -> Result<()> {
        // SAFETY: both are live handles of this rank's device.
        let status = unsafe { (self.nccl.stream_wait_event)(stream, event.0, 0) };
        if status != 0 {
            return Err(dist_err(format!("CUDA error {status} ordering streams around {what}")));
        }
        Ok(())
    }

    /// Selects this rank's device on the calling thread (CUDA's current device is per thread).
    fn set_device(&self) -> Result<()> {
        // SAFETY: cudaSetDevice takes a device ordinal.
        let status = unsafe { (self.nccl.cuda_set_device)(self.cuda_index) };
        if status != 0 {
            return Err(dist_err(format!(
                "cudaSetDevice({}) failed with CUDA error {status}",
                self.cuda_index
            )));
        }
        Ok(())
    }

    /// Runs one NCCL call, queued on `stream`, then hands the watchdog an event recorded on
    /// `stream` after it.
    fn collective(
        &self,
        stream: cudaStream_t,
        op: CollOp,
        kind: Kind,
        elements: usize,
        call: impl FnOnce() -> ncclResult_t,
    ) -> Result<()> {
        self.healthy()?;
        let trace = {
            let mut trace = self.trace();
            *trace = trace.then(Call {
                op: op as u8,
                dtype: kind_code(kind),
                elements: elements as u64,
            });
            *trace
        };
        let what = format!("{} #{} ({})", op.name(), trace.count, trace.last.describe_values());
        let queued = call();
        if queued == ncclResult_t::ncclInProgress {
            self.settle(&what)?;
        } else {
            self.nccl.check(&what, queued)?;
        }
        let event = self.record(stream, &what)?;
        // The watchdog destroys it once it has seen it complete.
        let event = std::mem::ManuallyDrop::new(event);
        if let Ok(mut pending) = self.watchdog.pending.lock() {
            pending.push_back((Instant::now(), what, SendPtr(event.0)));
        }
        Ok(())
    }

    /// A communicator made non-blocking may answer a call with `ncclInProgress` while it
    /// still enqueues it: waits (up to dist.timeout_s) until it has.
    fn settle(&self, what: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut state = ncclResult_t::ncclInProgress;
            // SAFETY: queries the live communicator.
            let queried = unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut state) };
            self.nccl.check("ncclCommGetAsyncError", queried)?;
            match state {
                ncclResult_t::ncclSuccess => return Ok(()),
                ncclResult_t::ncclInProgress if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                ncclResult_t::ncclInProgress => {
                    return Err(dist_err(format!(
                        "rank {}: NCCL did not enqueue {what} within {}s (raise dist.timeout_s if it is only slow)",
                        self.rank,
                        self.timeout.as_secs()
                    )))
                }
                failed => return Err(self.nccl.error(what, failed)),
            }
        }
    }

    /// A host exchange: `bytes` from every rank over the rendezvous connection, with each
    /// rank's [`Trace`] riding along, compared before anything is returned.
    fn host_exchange(&self, host: HostOp, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.healthy()?;
        let trace = *self.trace();
        traced_exchange(&self.bootstrap, trace, host, bytes)
    }

    /// The tensor as NCCL sees it: contiguous, on this rank's GPU, of a type NCCL reduces.
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

    fn null_stream() -> cudaStream_t {
        std::ptr::null_mut()
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        self.watchdog.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.watchdog_thread.take() {
            // After a failure the watchdog may still be inside ncclCommAbort, which can wait on
            // a dead peer: leave it to the process's exit rather than wait with it.
            if self.healthy().is_ok() {
                let _ = thread.join();
            }
        }
        // An aborted communicator is already gone.
        if self.healthy().is_ok() {
            // SAFETY: the communicator was created by ncclCommInitRank and is destroyed once;
            // the stream was created in `connect` and is destroyed once (CUDA lets the work
            // queued on it finish first).
            unsafe {
                (self.nccl.comm_destroy)(self.comm);
                (self.nccl.stream_destroy)(self.stream);
            }
        }
    }
}

// SAFETY: what makes the group !Sync is the communicator and stream handles. An NCCL
// communicator must not be used by two threads at once; `as_sync`'s contract gives it one
// thread at a time (during the backward pass only the gradient reducer's communication
// thread issues collectives, and the owner issues none until it has joined that thread).
// `ready_mark` and `wait_for` touch only events and the default stream, which CUDA allows
// from any thread. The trace is behind a lock, the watchdog's state behind its own.
unsafe impl Sync for NcclGroup {}

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
        self.collective(
            Self::null_stream(),
            CollOp::AllGather,
            input.kind(),
            input.numel(),
            || unsafe {
                (self.nccl.all_gather)(
                    input.data_ptr(),
                    output.data_ptr(),
                    input.numel(),
                    dtype,
                    self.comm,
                    Self::null_stream(),
                )
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
        // SAFETY: contiguous CUDA buffers; the output holds 1/world_size of the input.
        self.collective(
            Self::null_stream(),
            CollOp::ReduceScatter,
            input.kind(),
            input.numel(),
            || unsafe {
                (self.nccl.reduce_scatter)(
                    input.data_ptr(),
                    output.data_ptr(),
                    output.numel(),
                    dtype,
                    ncclRedOp_t::ncclSum,
                    self.comm,
                    Self::null_stream(),
                )
            },
        )?;
        Ok(output)
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let (buffer, dtype) = self.prepared(tensor)?;
        // SAFETY: in place on a contiguous CUDA buffer.
        self.collective(
            Self::null_stream(),
            CollOp::AllReduce,
            buffer.kind(),
            buffer.numel(),
            || unsafe {
                (self.nccl.all_reduce)(
                    buffer.data_ptr(),
                    buffer.data_ptr(),
                    buffer.numel(),
                    dtype,
                    ncclRedOp_t::ncclSum,
                    self.comm,
                    Self::null_stream(),
                )
            },
        )?;
        if buffer.data_ptr() != tensor.data_ptr() {
            let _ = tensor.copy_(&buffer);
        }
        Ok(())
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let (buffer, dtype) = self.prepared(tensor)?;
        // SAFETY: in place on a contiguous CUDA buffer.
        self.collective(
            Self::null_stream(),
            CollOp::Broadcast,
            buffer.kind(),
            buffer.numel(),
            || unsafe {
                (self.nccl.broadcast)(
                    buffer.data_ptr(),
                    buffer.data_ptr(),
                    buffer.numel(),
                    dtype,
                    root as c_int,
                    self.comm,
                    Self::null_stream(),
                )
            },
        )?;
        if buffer.data_ptr() != tensor.data_ptr() {
            let _ = tensor.copy_(&buffer);
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
        self.set_device()?;
        Ok(super::Mark(Some(self.record(Self::null_stream(), "a gradient bucket's flatten")?)))
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
        self.set_device()?;
        let (buffer, dtype) = self.prepared(tensor)?;
        if buffer.data_ptr() != tensor.data_ptr() {
            // `contiguous` would have copied on this thread's default stream, unordered with
            // the communication stream; the reducer's buckets are flat and never need it.
            return Err(dist_err(
                "all_reduce_start needs a contiguous tensor (a flat gradient bucket)".into(),
            ));
        }
        if let Some(event) = &ready.0 {
            self.stream_wait(self.stream, event, "a gradient bucket's all-reduce")?;
        }
        // SAFETY: in place on a contiguous CUDA buffer that the caller keeps alive until it
        // has waited for the returned mark.
        self.collective(
            self.stream,
            CollOp::AllReduce,
            buffer.kind(),
            buffer.numel(),
            || unsafe {
                (self.nccl.all_reduce)(
                    buffer.data_ptr(),
                    buffer.data_ptr(),
                    buffer.numel(),
                    dtype,
                    ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream,
                )
            },
        )?;
        Ok(super::Mark(Some(self.record(self.stream, "a gradient bucket's all-reduce")?)))
    }

    /// The default stream (compute) waits for the all-reduce's event; the host does not.
    fn wait_for(&self, done: super::Mark) -> Result<()> {
        self.healthy()?;
        match &done.0 {
            Some(event) => {
                self.set_device()?;
                self.stream_wait(
                    Self::null_stream(),
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
        tch::Cuda::synchronize(match self.device {
            Device::Cuda(i) => i as i64,
            _ => 0,
        });
        self.host_exchange(HostOp::Barrier, &[]).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_a_gpu_and_says_so_when_nccl_is_missing() {
        let world = WorldEnv {
            rank: 0,
            world_size: 2,
            local_rank: 0,
            local_world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
        };
        let err = NcclGroup::connect(&world, Device::Cpu, Duration::from_millis(10))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("needs a CUDA device"), "{err}");
        // A library that cannot be opened (whether or not this machine has NCCL elsewhere)
        // gets a message that says what to do.
        let missing = Nccl::load_from(&["/nonexistent/oxclip-test/libnccl.so.2".to_owned()])
            .err()
            .unwrap_or_default();
        assert!(missing.contains("NCCL not found"), "{missing}");
        assert!(
            missing.contains("OXCLIP_NCCL") && missing.contains("dist.backend: cpu"),
            "{missing}"
        );
        // The message names every file tried, in order, with the loader's reason.
        let tried =
            ["/nonexistent/oxclip-test/a/libnccl.so.2", "/nonexistent/oxclip-test/b/libnccl.so"]
                .map(String::from);
        let both = Nccl::load_from(&tried).err().unwrap_or_default();
        let (a, b) = (both.find(tried[0].as_str()), both.find(tried[1].as_str()));
        assert!(a.is_some() && b.is_some() && a < b, "{both}");
        // A library that opens but is not NCCL (the C library) is refused, and not as missing:
        // load_from does not take the first file that opens on trust.
        let not_nccl = Nccl::load_from(&["libc.so.6".to_owned()]).err().unwrap_or_default();
        assert!(!not_nccl.is_empty() && !not_nccl.contains("NCCL not found"), "{not_nccl}");
        assert!(
            not_nccl.contains("ncclGetUniqueId") || not_nccl.contains("CUDA runtime"),
            "{not_nccl}"
        );
    }

    #[test]
    fn the_cuda_runtime_already_loaded_is_the_one_opened() {
        let paths = |list: &[&str]| list.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        // libtorch's renamed copy, loaded first, wins over a system one loaded later.
        let loaded = paths(&[
            "",
            "linux-vdso.so.1",
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/opt/libtorch/lib/libcudart-9335f6a2.so.12",
            "/usr/local/cuda/lib64/libcudart.so.13",
        ]);
        assert_eq!(pick_cudart(&loaded), Some("/opt/libtorch/lib/libcudart-9335f6a2.so.12"));
        assert_eq!(
            pick_cudart(&paths(&["/x/libc.so.6", "/venv/nvidia/cuda_runtime/lib/libcudart.so.13"])),
            Some("/venv/nvidia/cuda_runtime/lib/libcudart.so.13")
        );
        assert_eq!(pick_cudart(&paths(&["libcudart.so"])), Some("libcudart.so"));
        // Names that only start like it, or no runtime at all: none.
        assert_eq!(
            pick_cudart(&paths(&[
                "/x/libcudart_static.a",
                "/x/libcudartx.so.1",
                "/x/libcudart",
                "/libcudart.so.13/libc.so.6"
            ])),
            None
        );
        assert_eq!(pick_cudart(&[]), None);

        // The walk over this process's objects agrees with the kernel's map of it.
        let walked = loaded_objects();
        assert!(walked.iter().any(|p| p.contains("libc.so")), "{walked:?}");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mapped: Vec<String> =
            maps.lines().filter_map(|l| l.split_whitespace().nth(5)).map(String::from).collect();
        assert_eq!(pick_cudart(&walked).is_some(), pick_cudart(&mapped).is_some(), "{walked:?}");

        // Nothing loaded and nothing loadable: the error says what was tried.
        let err = open_cudart(&[], &["/nonexistent/oxclip-test/libcudart.so.13".to_owned()])
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("the CUDA runtime is not loadable")
                && err.contains("/nonexistent/oxclip-test/libcudart.so.13"),
            "{err}"
        );
        // A loaded path is opened as it is (here a stand-in: the C library, loaded in every process).
        let libc_path = walked.iter().find(|p| p.contains("/libc.so")).cloned().unwrap();
        let renamed = [libc_path.replace("libc.so.6", "libcudart-0000.so.6")];
        let err = open_cudart(&renamed, &[]).err().unwrap_or_default();
        assert!(err.contains("libcudart-0000.so.6") && err.contains("cannot be reopened"), "{err}");
    }

    #[test]
    fn comm_config_has_nccl_h_layout() {
        // ncclConfig_t's fields up to splitShare, at nccl.h's offsets on a 64-bit target.
        use std::mem::{offset_of, size_of};
        assert_eq!(
            [
                offset_of!(CommConfig, magic),
                offset_of!(CommConfig, version),
                offset_of!(CommConfig, blocking),
                offset_of!(CommConfig, max_ctas)
            ],
            [8, 12, 16, 28]
        );
        assert_eq!(
            [
                offset_of!(CommConfig, net_name),
                offset_of!(CommConfig, split_share),
                size_of::<CommConfig>()
            ],
            [32, 40, 48]
        );
        let c = CommConfig::non_blocking();
        assert_eq!(
            (c.size, c.magic, c.version, c.blocking, c.min_ctas),
            (48, 0xcafebeef, 21800, 0, i32::MIN)
        );
    }

    fn trace(calls: &[(CollOp, Kind, u64)]) -> Trace {
        calls.iter().fold(Trace::default(), |t, &(op, kind, n)| {
            t.then(Call { op: op as u8, dtype: kind_code(kind), elements: n })
        })
    }

    #[test]
    fn diverged_nccl_collectives_are_named_at_the_next_host_exchange() {
        let common = [(CollOp::Broadcast, Kind::Float, 8), (CollOp::AllGather, Kind::BFloat16, 64)];
        let t0 = trace(&common);
        // The header survives the trip through the byte exchange, with the body after it.
        let mut wire = t0.header(HostOp::Bytes).to_vec();
        wire.extend_from_slice(b"body");
        let ((host, back), body) = Trace::parse(&wire).unwrap();
        assert_eq!((host, back, body), (HostOp::Bytes as u8, t0, &b"body"[..]));
        assert!(Trace::parse(&wire[..HEADER_LEN - 1]).is_none());

        // All ranks on the same path: nothing to say.
        assert_eq!(diverged(&[(1, t0), (1, t0), (1, t0)]), None);

        // Rank 2 made one all-reduce more.
        let extra = trace(&[common[0], common[1], (CollOp::AllReduce, Kind::Float, 1024)]);
        let msg = diverged(&[(1, t0), (1, t0), (1, extra)]).unwrap();
        assert!(
            msg.starts_with(
                "rank 2 has made 3 NCCL collectives (the last: all_reduce of 1024 float32 values) \
                 while rank 0 has made 2 (the last: all_gather of 64 bfloat16 values)"
            ),
            "{msg}"
        );
        assert!(!msg.contains("rank 1"), "{msg}");

        // Same count, another size earlier on: the running hash tells them apart.
        let other = trace(&[(CollOp::Broadcast, Kind::Float, 9), common[1]]);
        let msg = diverged(&[(1, t0), (1, other)]).unwrap();
        assert!(msg.starts_with("rank 1's 2 NCCL collectives differ from rank 0's"), "{msg}");
        // The same ops in another order differ too.
        let swapped = trace(&[common[1], common[0]]);
        assert!(diverged(&[(1, t0), (1, swapped)]).is_some());

        // Same collectives, different host exchange.
        let msg = diverged(&[(HostOp::Bytes as u8, t0), (HostOp::Barrier as u8, t0)]).unwrap();
        assert!(
            msg.starts_with("rank 1 is at a barrier while rank 0 is at a byte exchange"),
            "{msg}"
        );
        assert!(msg.ends_with("found at a host exchange"), "{msg}");
    }

    #[test]
    fn traces_ride_along_the_host_exchange_between_real_ranks() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let on_ranks = |traces: [Trace; 2], hosts: [HostOp; 2]| {
            let handles: Vec<_> = (0..2)
                .map(|r| {
                    std::thread::spawn(move || {
                        let world = WorldEnv {
                            rank: r,
                            world_size: 2,
                            local_rank: r,
                            local_world_size: 2,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                        };
                        let group = TcpGroup::connect(&world, Duration::from_secs(20)).unwrap();
                        traced_exchange(&group, traces[r], hosts[r], format!("rank{r}").as_bytes())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        };
        let same = trace(&[(CollOp::AllReduce, Kind::Float, 100)]);
        // Same path: every rank gets every rank's bytes, without the headers.
        for got in on_ranks([same, same], [HostOp::Bytes, HostOp::Bytes]) {
            assert_eq!(got.unwrap(), vec![b"rank0".to_vec(), b"rank1".to_vec()]);
        }
        // Rank 1 made one NCCL collective more: both ranks fail, naming it.
        let more =
            trace(&[(CollOp::AllReduce, Kind::Float, 100), (CollOp::AllGather, Kind::Half, 6)]);
        for (r, got) in
            on_ranks([same, more], [HostOp::Barrier, HostOp::Barrier]).into_iter().enumerate()
        {
            let err = got.unwrap_err();
            assert!(
                err.contains(&format!("rank {r}: rank 1 has made 2 NCCL collectives (the last: all_gather of 6 float16 values) while rank 0 has made 1")),
                "{err}"
            );
        }
    }
}
