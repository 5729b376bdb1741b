//! CUDA streams and events, as the NCCL group orders its work with them: the legacy default
//! stream libtorch computes on, the communication stream of the overlapped gradient
//! reduction, [`Event`]s recorded on either (a [`Mark`](crate::collectives::Mark) holds one),
//! and one stream waiting on the device for another's event. All through [`Cudart`].

use std::ffi::c_int;

use cudarc::nccl::sys::cudaStream_t;

use super::dist_err;
use crate::device::cudart::{CudaEvent, Cudart};
use crate::error::Result;

/// `cudaEventDisableTiming`: events only to ask "done yet?" and to order streams.
const EVENT_DISABLE_TIMING: u32 = 2;
/// `cudaStreamNonBlocking`: a stream that does not synchronise with the legacy default
/// stream. A blocking stream would wait for, and be waited for by, every kernel libtorch
/// queues on the default stream, serialising communication with compute again.
const STREAM_NON_BLOCKING: u32 = 1;

/// A recorded CUDA event, destroyed when dropped: CUDA releases it once the device has
/// passed it, so dropping it right after a stream was told to wait for it is fine (the wait
/// keeps the point it was given).
#[derive(Debug)]
pub(in crate::collectives) struct Event(CudaEvent);

// SAFETY: a cudaEvent_t may be recorded, waited for and destroyed from any thread; this one
// is only passed back to such calls, by one owner at a time.
unsafe impl Send for Event {}

impl Event {
    /// The handle, no longer destroyed on drop: whoever takes it destroys it.
    pub(super) fn into_raw(self) -> CudaEvent {
        std::mem::ManuallyDrop::new(self).0
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // An Event exists only once cudart was loaded (it made it), so this finds it.
        if let Ok(cuda) = Cudart::get() {
            // SAFETY: the event was created by cudaEventCreateWithFlags in `record`, and this
            // owner destroys it once (`into_raw` hands it on without dropping).
            unsafe {
                (cuda.event_destroy)(self.0);
            }
        }
    }
}

/// A stream handle that the group keeps outside its communicator's lock: the communication
/// stream, created once in `connect` and destroyed at most once, by the group's `Drop`.
#[derive(Clone, Copy)]
pub(super) struct StreamHandle(pub(super) cudaStream_t);

// SAFETY: the CUDA runtime API is thread-safe: a stream may be used from any thread, by several
// at once (each call is ordered by CUDA). This handle is only passed to cudart calls (and to
// NCCL's enqueue, under the communicator's lock), never dereferenced, and destroyed only by
// the group's `Drop`, which has the group to itself.
unsafe impl Send for StreamHandle {}
// SAFETY: as above.
unsafe impl Sync for StreamHandle {}

/// The legacy default stream, which libtorch computes on.
pub(super) fn default_stream() -> cudaStream_t {
    std::ptr::null_mut()
}

/// A new non-blocking stream on the calling thread's current device; `Err`: the CUDA error.
pub(super) fn create(cuda: &Cudart) -> std::result::Result<cudaStream_t, c_int> {
    let mut stream: cudaStream_t = std::ptr::null_mut();
    // SAFETY: cudaStreamCreateWithFlags writes the new stream's handle into `stream`, valid
    // for the call.
    let status = unsafe { (cuda.stream_create)(&mut stream, STREAM_NON_BLOCKING) };
    if status != 0 {
        return Err(status);
    }
    Ok(stream)
}

/// Creates an event and records it on `stream`, after everything queued there so far.
pub(super) fn record(cuda: &Cudart, stream: cudaStream_t, what: &str) -> Result<Event> {
    let mut event: CudaEvent = std::ptr::null_mut();
    // SAFETY: cudaEventCreateWithFlags writes the new event's handle into `event`, valid for
    // the call.
    let created = unsafe { (cuda.event_create)(&mut event, EVENT_DISABLE_TIMING) };
    if created != 0 {
        return Err(dist_err(format!("CUDA error {created} creating an event for {what}")));
    }
    let event = Event(event);
    // SAFETY: the event was just created; `stream` is the legacy default stream or the
    // group's communication stream, both live while the group is.
    let status = unsafe { (cuda.event_record)(event.0, stream) };
    if status != 0 {
        return Err(dist_err(format!("CUDA error {status} recording an event for {what}")));
    }
    Ok(event)
}

/// Makes `stream` wait (on the device, not the host) until `event` has passed.
pub(super) fn wait(cuda: &Cudart, stream: cudaStream_t, event: &Event, what: &str) -> Result<()> {
    // SAFETY: the event is alive while `event` is (it owns it); `stream` is the legacy
    // default stream or the group's communication stream, both live while the group is.
    let status = unsafe { (cuda.stream_wait_event)(stream, event.0, 0) };
    if status != 0 {
        return Err(dist_err(format!("CUDA error {status} ordering streams around {what}")));
    }
    Ok(())
}

/// Selects device `cuda_index` on the calling thread (CUDA's current device is per thread).
pub(super) fn set_device(cuda: &Cudart, cuda_index: c_int) -> Result<()> {
    // SAFETY: cudaSetDevice takes any ordinal (an invalid one is an error code).
    let status = unsafe { (cuda.set_device)(cuda_index) };
    if status != 0 {
        return Err(dist_err(format!(
            "cudaSetDevice({cuda_index}) failed with CUDA error {status}"
        )));
    }
    Ok(())
}
