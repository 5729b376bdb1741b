//! This rank's NCCL communicator: its creation, non-blocking and polled until a deadline
//! ([`create_comm`]), the abort of one given up ([`abort_within`]), the wait for a
//! non-blocking communicator to take a call ([`settle`]), and the [`Watchdog`] thread that
//! turns a collective that never completes into an error. Nothing here waits on a peer
//! without a deadline.

use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::nccl::sys::{ncclComm_t, ncclResult_t, ncclUniqueId};

use super::dist_err;
use super::library::{CommConfig, CudaEvent, Nccl};
use crate::collectives::WorldEnv;
use crate::error::{Result, TrainError};

/// NCCL collectives run on the GPU and never time out by themselves: a dead or stalled peer
/// leaves the others' kernels waiting forever. As PyTorch's watchdog does, a thread watches
/// an event recorded after each collective; one not done within the timeout, or an
/// asynchronous NCCL error, aborts the communicator (which ends the waiting kernels) and the
/// next collective on this rank returns the error, naming the collective.
pub(super) struct Watchdog {
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

impl Watchdog {
    /// Starts watching `comm` (on device `cuda_index`): the state the group shares with the
    /// thread, and the thread.
    pub(super) fn start(
        nccl: &'static Nccl,
        comm: ncclComm_t,
        cuda_index: c_int,
        timeout: Duration,
    ) -> Result<(Arc<Watchdog>, std::thread::JoinHandle<()>)> {
        let watchdog = Arc::new(Watchdog {
            pending: Mutex::new(VecDeque::new()),
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let (state, comm_ptr) = (Arc::clone(&watchdog), SendPtr(comm as *mut c_void));
        let thread = std::thread::Builder::new()
            .name("oxclip-nccl-watchdog".into())
            .spawn(move || watch(nccl, comm_ptr, cuda_index, timeout, state))
            .map_err(|e| dist_err(format!("cannot start the NCCL watchdog: {e}")))?;
        Ok((watchdog, thread))
    }

    /// Hands the watchdog `event`, recorded after the collective `what` was queued; it
    /// destroys the event once it has seen it complete.
    pub(super) fn follow(&self, what: String, event: CudaEvent) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.push_back((Instant::now(), what, SendPtr(event)));
        }
    }

    /// Why the watchdog aborted the communicator; `None` while it has not.
    pub(super) fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Tells the thread to end at its next look.
    pub(super) fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The watchdog thread: every 100 ms, the events of the collectives in flight and NCCL's
/// asynchronous error; it ends when told to stop or once it has aborted the communicator.
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
                        "{what} did not complete within {}s: a rank died or stalls (raise \
                         dist.timeout_s if it is only slow)",
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
pub(super) fn create_comm(
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
            "rank {} of {}: the NCCL communicator was not created within dist.timeout_s ({}s, \
             counted from the start of the rendezvous): {how} waited for all {} ranks to join it; \
             a rank died or stalls since the rendezvous (raise dist.timeout_s if it is only slow)",
            world.rank,
            world.world_size,
            timeout.as_secs(),
            world.world_size
        ))
    };
    // NCCL_COMM_BLOCKING=1 overrides `blocking = 0`: the init would block this thread.
    let blocking_forced = std::env::var("NCCL_COMM_BLOCKING").is_ok_and(|v| v.trim() == "1");
    let Some(init_config) = nccl.comm_init_rank_config.filter(|_| !blocking_forced) else {
        return create_comm_on_thread(nccl, ranks, rank, id, cuda_index, deadline).map_err(|e| {
            match e {
                Some(e) => e,
                None => late(
                    "ncclCommInitRank (blocking: this NCCL has no non-blocking init, or \
                     NCCL_COMM_BLOCKING=1; it ran on a helper thread, now abandoned: it stays \
                     blocked until the process exits)",
                ),
            }
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
pub(super) const ABORT_WAIT: Duration = Duration::from_secs(10);

/// Aborts `comm` (a communicator whose creation failed or is given up) on a helper thread,
/// waiting at most `wait`: the abort may itself wait on NCCL's own bootstrap sockets, and the
/// rank's error, then its exit, must not wait with it.
pub(super) fn abort_within(nccl: &'static Nccl, comm: ncclComm_t, wait: Duration) {
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

/// A communicator made non-blocking may answer a call with `ncclInProgress` while it still
/// enqueues it: waits (up to `timeout`, dist.timeout_s) until it has. `rank` and `what`
/// (the collective) name it in the error.
pub(super) fn settle(
    nccl: &Nccl,
    comm: ncclComm_t,
    rank: usize,
    timeout: Duration,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut state = ncclResult_t::ncclInProgress;
        // SAFETY: queries the live communicator.
        let queried = unsafe { (nccl.comm_get_async_error)(comm, &mut state) };
        nccl.check("ncclCommGetAsyncError", queried)?;
        match state {
            ncclResult_t::ncclSuccess => return Ok(()),
            ncclResult_t::ncclInProgress if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            ncclResult_t::ncclInProgress => {
                return Err(dist_err(format!(
                    "rank {rank}: NCCL did not enqueue {what} within {}s (raise dist.timeout_s if \
                     it is only slow)",
                    timeout.as_secs()
                )))
            }
            failed => return Err(nccl.error(what, failed)),
        }
    }
}
