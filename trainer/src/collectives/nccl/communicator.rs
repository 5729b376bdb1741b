//! This rank's NCCL communicator: its creation, non-blocking and polled until a deadline
//! ([`create_comm`]), then its one owner, the [`Communicator`]: every call on the handle
//! under one lock, the abort that takes the handle away ([`abort_within`] bounds the wait),
//! the end at the group's drop, and the watchdog thread ([`Communicator::start_watchdog`])
//! that turns a collective that never completes into an abort. Nothing here waits on a peer
//! without a deadline, except an enqueue on a blocking communicator (see
//! [`Communicator::with`]).

use std::collections::VecDeque;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cudarc::nccl::sys::{ncclComm_t, ncclResult_t, ncclUniqueId};

use super::dist_err;
use super::library::{CommConfig, Nccl};
use crate::collectives::WorldEnv;
use crate::device::cudart::{CudaEvent, Cudart};
use crate::error::{Result, TrainError};

/// An NCCL communicator's handle, as it moves between threads.
pub(super) struct Comm(ncclComm_t);

// SAFETY: NCCL lets a communicator be used from any thread, as long as no two calls on it
// overlap (ncclCommAbort included). A `Comm` is used only while held in a
// `Communicator`'s lock (one call at a time), by a thread that took it out of that lock
// (then it alone has it), or, before it is shared, by the thread that created it.
unsafe impl Send for Comm {}

/// A CUDA event moved to the watchdog thread, which queries and destroys it.
struct PendingEvent(CudaEvent);

// SAFETY: a CUDA event may be queried and destroyed from any thread; the watchdog is the only
// owner of this one (the group hands it over with `into_raw`).
unsafe impl Send for PendingEvent {}

/// The handle while it may be used, and why it was given up once it may not.
struct Held {
    /// `None` from the abort on (or from the group's end): nothing can call NCCL on it then.
    comm: Option<Comm>,
    /// Why it was aborted (the first reason, when several threads give up at once).
    failure: Option<String>,
}

/// The one owner of this rank's communicator, shared by the group and its watchdog thread.
///
/// Every NCCL call on the handle (each collective's enqueue, each `ncclCommGetAsyncError`
/// poll) is made holding `held`'s lock with the handle taken from `Some`; an abort takes the
/// handle out under that lock (leaving `None`, the reason recorded) and only then calls
/// `ncclCommAbort`, which frees it. So no call can overlap or follow an abort: one that comes
/// later finds `None` and fails with the recorded reason.
pub(super) struct Communicator {
    nccl: &'static Nccl,
    cuda: &'static Cudart,
    rank: usize,
    held: Mutex<Held>,
    /// Collectives enqueued and not yet seen complete: (when, what, event), oldest first.
    pending: Mutex<VecDeque<(Instant, String, PendingEvent)>>,
    /// Tells the watchdog thread to end at its next look.
    stop: AtomicBool,
}

impl Communicator {
    /// The owner of `comm`, a communicator just created by this thread (rank `rank`).
    pub(super) fn new(
        nccl: &'static Nccl,
        cuda: &'static Cudart,
        comm: ncclComm_t,
        rank: usize,
    ) -> Arc<Self> {
        Arc::new(Communicator {
            nccl,
            cuda,
            rank,
            held: Mutex::new(Held { comm: Some(Comm(comm)), failure: None }),
            pending: Mutex::new(VecDeque::new()),
            stop: AtomicBool::new(false),
        })
    }

    /// The lock. A poisoned one is still right: what it guards changes in single steps (the
    /// handle taken out, a reason set), never left half done by a panic.
    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pending(&self) -> MutexGuard<'_, VecDeque<(Instant, String, PendingEvent)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error of a call made once the communicator was given up.
    fn given_up(&self, held: &Held) -> TrainError {
        let why = held.failure.as_deref().unwrap_or("the NCCL communicator was closed");
        dist_err(format!("rank {}: {why}", self.rank))
    }

    /// Runs `call` on the live handle with the lock held; fails naming why the communicator was
    /// aborted once it has been.
    ///
    /// A non-blocking communicator answers at once (`ncclInProgress` while NCCL finishes the
    /// enqueue on its own; [`Communicator::enqueue`] polls it with the lock let go between
    /// polls). A blocking one (an NCCL before 2.14, or `NCCL_COMM_BLOCKING=1`) may wait inside
    /// the call, e.g. for a peer that never connects (NCCL connects peers at their first
    /// collective), with the lock held: the watchdog then cannot take the lock, so cannot
    /// abort, until the call returns, and nothing bounds that wait.
    pub(super) fn with<T>(&self, call: impl FnOnce(ncclComm_t) -> T) -> Result<T> {
        let held = self.held();
        match &held.comm {
            Some(comm) => Ok(call(comm.0)),
            None => Err(self.given_up(&held)),
        }
    }

    /// Why the communicator was aborted ("rank R: ..."); `None` while it was not.
    pub(super) fn failure(&self) -> Option<TrainError> {
        let held = self.held();
        held.failure.is_some().then(|| self.given_up(&held))
    }

    /// Takes the handle away, recording `why` (unless a reason is recorded already): every
    /// later call fails naming it. The caller aborts what it got ([`Communicator::abort_taken`]).
    pub(super) fn take(&self, why: String) -> Option<Comm> {
        let mut held = self.held();
        held.failure.get_or_insert(why);
        held.comm.take()
    }

    /// Aborts a handle from [`Communicator::take`], waiting for NCCL at most [`ABORT_WAIT`].
    pub(super) fn abort_taken(&self, comm: Comm) {
        abort_within(self.nccl, comm.0);
    }

    /// Takes the handle away, recording `why`, and aborts it (bounded).
    pub(super) fn abort(&self, why: String) {
        if let Some(comm) = self.take(why) {
            self.abort_taken(comm);
        }
    }

    /// Enqueues one collective, `what`: `call` is given the handle under the lock, and a
    /// non-blocking communicator's `ncclInProgress` is polled until NCCL has taken the call, for
    /// at most `timeout`. A collective that fails to enqueue leaves this rank out of step with
    /// the others for good, so the communicator is aborted and this call and every later one
    /// fail naming why.
    pub(super) fn enqueue(
        &self,
        what: &str,
        timeout: Duration,
        call: impl FnOnce(ncclComm_t) -> ncclResult_t,
    ) -> Result<()> {
        let failed = match self.with(call)? {
            ncclResult_t::ncclSuccess => return Ok(()),
            ncclResult_t::ncclInProgress => match self.settle(what, timeout) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            },
            status => Some(self.nccl.describe(what, status)),
        };
        if let Some(why) = failed {
            tracing::error!("rank {}: {why}; aborting the NCCL communicator", self.rank);
            self.abort(why);
        }
        let held = self.held();
        Err(self.given_up(&held))
    }

    /// Polls until NCCL has enqueued `what` (the state leaves `ncclInProgress`), at most
    /// `timeout`. `Err(Some(why))`: it failed or did not finish in time; `Err(None)`: the
    /// communicator was aborted meanwhile (its reason is recorded already).
    fn settle(&self, what: &str, timeout: Duration) -> std::result::Result<(), Option<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            // One poll per lock: the lock is let go while this sleeps, so the watchdog gets in
            // (and may abort; the next poll then finds no handle).
            let (queried, state) = self
                .with(|comm| {
                    let mut state = ncclResult_t::ncclInProgress;
                    // SAFETY: `comm` is the live handle, held under the lock for this call;
                    // `state` is valid for it.
                    let queried = unsafe { (self.nccl.comm_get_async_error)(comm, &mut state) };
                    (queried, state)
                })
                .map_err(|_| None)?;
            if queried != ncclResult_t::ncclSuccess {
                return Err(Some(self.nccl.describe("ncclCommGetAsyncError", queried)));
            }
            match state {
                ncclResult_t::ncclSuccess => return Ok(()),
                ncclResult_t::ncclInProgress if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                ncclResult_t::ncclInProgress => {
                    return Err(Some(format!(
                        "NCCL did not enqueue {what} within {}s (raise dist.timeout_s if it is \
                         only slow)",
                        timeout.as_secs()
                    )))
                }
                failed => return Err(Some(self.nccl.describe(what, failed))),
            }
        }
    }

    /// Hands the watchdog `event`, recorded after the collective `what` was enqueued; it
    /// destroys the event once it has seen it complete.
    pub(super) fn follow(&self, what: String, event: CudaEvent) {
        self.pending().push_back((Instant::now(), what, PendingEvent(event)));
    }

    /// Tells the watchdog thread to end at its next look.
    pub(super) fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Ends the communicator at the group's end. `clean` (no collective enqueued since a
    /// barrier that every rank passed with its device synchronised) and no asynchronous error:
    /// nothing is pending, so it is destroyed; otherwise `ncclCommDestroy` could wait forever
    /// for collectives a dead or stalled peer never joins, so it is aborted. Either way NCCL is
    /// waited for at most [`ABORT_WAIT`]. Returns whether it was destroyed, in time and without
    /// error (only then is nothing of NCCL's left running on this rank's streams).
    pub(super) fn close(&self, clean: bool) -> bool {
        let Some(comm) = self.held().comm.take() else { return false };
        if clean {
            let mut state = ncclResult_t::ncclInProgress;
            // SAFETY: the handle was taken out of the lock just above: this thread alone has
            // it, and it is live (only an abort or this end frees it, and both take it first).
            let queried = unsafe { (self.nccl.comm_get_async_error)(comm.0, &mut state) };
            if queried == ncclResult_t::ncclSuccess && state == ncclResult_t::ncclSuccess {
                return end_within(self.nccl, comm.0, End::Destroy);
            }
        }
        abort_within(self.nccl, comm.0);
        false
    }

    /// Starts the watchdog thread on device `cuda_index`: NCCL collectives run on the GPU and
    /// never time out by themselves, so a dead or stalled peer leaves the others' kernels
    /// waiting forever. As PyTorch's watchdog does, it watches an event recorded after each
    /// collective; one not done within `timeout`, or an asynchronous NCCL error, aborts the
    /// communicator (which ends the waiting kernels) and the next collective on this rank
    /// returns the error, naming the collective.
    pub(super) fn start_watchdog(
        self: &Arc<Self>,
        cuda_index: c_int,
        timeout: Duration,
    ) -> Result<std::thread::JoinHandle<()>> {
        let state = Arc::clone(self);
        std::thread::Builder::new()
            .name("oxclip-nccl-watchdog".into())
            .spawn(move || state.watch(cuda_index, timeout))
            .map_err(|e| dist_err(format!("cannot start the NCCL watchdog: {e}")))
    }

    /// The watchdog thread: every 100 ms, the events of the collectives in flight and NCCL's
    /// asynchronous error; it ends when told to stop, once it has aborted the communicator, or
    /// once the handle is gone (aborted by another thread, or ended).
    fn watch(&self, cuda_index: c_int, timeout: Duration) {
        // SAFETY: cudaSetDevice takes any ordinal; it selects this thread's device for the
        // event queries (an error here shows in them).
        unsafe {
            (self.cuda.set_device)(cuda_index);
        }
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            let (late, in_flight) = self.check_pending(timeout);
            let polled = self.with(|comm| {
                let mut async_error = ncclResult_t::ncclSuccess;
                // SAFETY: `comm` is the live handle, held under the lock for this call;
                // `async_error` is valid for it.
                unsafe {
                    (self.nccl.comm_get_async_error)(comm, &mut async_error);
                }
                async_error
            });
            let Ok(async_error) = polled else { return };
            let problem = late.or_else(|| {
                let failed = !matches!(
                    async_error,
                    ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress
                );
                failed.then(|| match in_flight {
                    Some(what) => format!("NCCL reported {async_error:?} during {what}"),
                    None => format!("NCCL reported {async_error:?}"),
                })
            });
            if let Some(why) = problem {
                tracing::error!("NCCL watchdog: {why}; aborting the communicator");
                self.abort(why);
                return;
            }
        }
    }

    /// Destroys the events of the collectives seen complete, oldest first. Returns why the
    /// oldest one still in flight is late (older than `timeout`), if it is, and what it is.
    fn check_pending(&self, timeout: Duration) -> (Option<String>, Option<String>) {
        let mut pending = self.pending();
        while let Some((since, what, event)) = pending.front() {
            // SAFETY: the event was created by cudaEventCreateWithFlags and handed over by
            // `follow`; it is destroyed only here, once, after it was seen complete.
            let status = unsafe { (self.cuda.event_query)(event.0) };
            if status == 0 {
                // SAFETY: as above.
                unsafe {
                    (self.cuda.event_destroy)(event.0);
                }
                pending.pop_front();
            } else if since.elapsed() > timeout {
                let late = format!(
                    "{what} did not complete within {}s: a rank died or stalls (raise \
                     dist.timeout_s if it is only slow)",
                    timeout.as_secs()
                );
                return (Some(late), Some(what.clone()));
            } else {
                return (None, Some(what.clone()));
            }
        }
        (None, None)
    }
}

/// Creates this rank's communicator, which completes only once every rank has joined it: a
/// rank that died or stalls since the rendezvous makes this fail at `deadline` (naming what
/// it waited for) instead of waiting forever.
pub(super) fn create_comm(
    nccl: &'static Nccl,
    cuda: &'static Cudart,
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
        return create_comm_on_thread(nccl, cuda, ranks, rank, id, cuda_index, deadline).map_err(
            |e| match e {
                Some(e) => e,
                None => late(
                    "ncclCommInitRank (blocking: this NCCL has no non-blocking init, or \
                     NCCL_COMM_BLOCKING=1; it ran on a helper thread, now abandoned: it stays \
                     blocked until the process exits)",
                ),
            },
        );
    };
    let mut comm: ncclComm_t = std::ptr::null_mut();
    let mut config = CommConfig::non_blocking();
    // SAFETY: every rank calls this with the same id and world size; `config` outlives the
    // call (NCCL copies it).
    let started = unsafe { init_config(&mut comm, ranks, id, rank, &mut config) };
    let abort = |comm: ncclComm_t| abort_within(nccl, comm);
    if !matches!(started, ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress) {
        abort(comm);
        return Err(nccl.error("ncclCommInitRankConfig", started));
    }
    loop {
        let mut state = ncclResult_t::ncclInProgress;
        // SAFETY: `comm` was returned by ncclCommInitRankConfig and is used by this thread
        // alone (not yet shared); polling it is how a non-blocking init is followed, and
        // `state` is valid for the call.
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

/// How long a failing rank waits for `ncclCommAbort` (or the group's `ncclCommDestroy`)
/// before it goes on anyway.
const ABORT_WAIT: Duration = Duration::from_secs(10);

/// How a communicator is ended.
#[derive(Clone, Copy)]
enum End {
    Abort,
    Destroy,
}

/// Aborts `comm` (a communicator whose creation failed or that is given up) on a helper
/// thread, waiting at most [`ABORT_WAIT`]: the abort may itself wait on NCCL's own bootstrap sockets,
/// and the rank's error, then its exit, must not wait with it.
pub(super) fn abort_within(nccl: &'static Nccl, comm: ncclComm_t) {
    end_within(nccl, comm, End::Abort);
}

/// Ends `comm` as `how` says on a helper thread, waiting at most [`ABORT_WAIT`]; whether NCCL
/// returned success in that time. The caller gives up `comm`: it is freed by the call, or left
/// to the helper thread, which the process's exit ends.
fn end_within(nccl: &'static Nccl, comm: ncclComm_t, how: End) -> bool {
    if comm.is_null() {
        return false;
    }
    let end = move |comm: ncclComm_t| {
        // SAFETY: the caller hands over its only copy of the live handle (taken out of the
        // lock, or never shared), so this is the one end of it and nothing uses it after.
        unsafe {
            match how {
                End::Abort => (nccl.comm_abort)(comm),
                End::Destroy => (nccl.comm_destroy)(comm),
            }
        }
    };
    let name = match how {
        End::Abort => "ncclCommAbort",
        End::Destroy => "ncclCommDestroy",
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = Comm(comm);
    let spawned = std::thread::Builder::new().name("oxclip-nccl-end".into()).spawn(move || {
        let handle = handle;
        let _ = tx.send(end(handle.0));
    });
    let status = match spawned {
        Ok(_) => match rx.recv_timeout(ABORT_WAIT) {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    "{name} did not return within {}s; leaving it behind",
                    ABORT_WAIT.as_secs()
                );
                return false;
            }
        },
        // No thread to wait with: end it here, unbounded (the handle was moved into the
        // closure that failed to spawn, and dropped with it; `comm` is the same handle).
        Err(_) => end(comm),
    };
    if status != ncclResult_t::ncclSuccess {
        tracing::warn!("{name} failed: {}", nccl.describe(name, status));
    }
    status == ncclResult_t::ncclSuccess
}

/// For an NCCL without `ncclCommInitRankConfig` (before 2.14): the blocking init on a helper
/// thread, waited for until `deadline`. `Err(None)`: the deadline passed; the thread cannot be
/// stopped and is left behind.
fn create_comm_on_thread(
    nccl: &'static Nccl,
    cuda: &'static Cudart,
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
            // SAFETY: cudaSetDevice takes any ordinal (the device is per thread, so it is set
            // here too); ncclCommInitRank writes the new handle into `comm`, valid for the
            // call, and every rank calls it with the same id and world size.
            let result = unsafe {
                (cuda.set_device)(cuda_index);
                (nccl.comm_init_rank)(&mut comm, ranks, id, rank)
            };
            let _ = tx.send((result, Comm(comm)));
        })
        .map_err(|e| Some(dist_err(format!("cannot start the NCCL init thread: {e}"))))?;
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok((result, comm)) => nccl.check("ncclCommInitRank", result).map(|()| comm.0).map_err(Some),
        Err(_) => Err(None),
    }
}
