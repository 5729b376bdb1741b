//! libtorch's post-accumulate-grad hooks (csrc/grad_hooks.cpp), reached through a context
//! pointer whose lifetime and thread-safety the types hold: [`during`] installs the hooks,
//! runs the backward pass, and removes them before it returns (also when the backward pass
//! panics), so no hook can outlive its context; and the context must be `Sync`, because
//! libtorch runs a hook on its autograd thread for the parameter's device (the caller's thread
//! on the CPU, a device thread on CUDA), not on the thread that installed it.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use crate::error::{Result, TrainError};

/// What a hook calls.
pub(super) trait OnGradReady: Sync {
    /// `params[index]`'s gradient has just been accumulated.
    fn grad_ready(&self, index: usize);
    /// [`OnGradReady::grad_ready`] panicked with `message`; it must not panic itself.
    fn hook_panicked(&self, message: String);
}

extern "C" {
    fn oxclip_set_grad_ready_hook(
        param: *mut c_void,
        f: extern "C" fn(*mut c_void, usize),
        ctx: *mut c_void,
        index: usize,
    ) -> i32;
    fn oxclip_clear_grad_ready_hook(param: *mut c_void);
    fn oxclip_set_grad(param: *mut c_void, grad: *mut c_void) -> i32;
}

/// Runs `backward` with a hook on each of `params` that calls `ctx.grad_ready(i)` right after
/// `params[i]`'s gradient is accumulated. Fails, without running `backward`, when libtorch
/// refuses a hook (a parameter that is not a leaf requiring a gradient).
pub(super) fn during<C: OnGradReady>(
    params: &[Tensor],
    ctx: &C,
    backward: impl FnOnce(),
) -> Result<()> {
    let mut armed = Armed { params: &params[..0] };
    for (i, p) in params.iter().enumerate() {
        // SAFETY: `p.as_ptr()` is a live `at::Tensor*` (tch's handle); `ctx` is borrowed for
        // this whole function and `armed` removes every hook installed before the function
        // returns or unwinds, so the hook never sees a dangling context; `C: Sync` makes the
        // call from libtorch's autograd thread sound.
        let refused = unsafe {
            oxclip_set_grad_ready_hook(
                p.as_ptr() as *mut c_void,
                call::<C>,
                ctx as *const C as *mut c_void,
                i,
            )
        };
        if refused != 0 {
            return Err(TrainError::Dist(format!(
                "libtorch refused a gradient hook on trainable parameter #{i} of shape {:?}",
                p.size()
            )));
        }
        armed.params = &params[..=i];
    }
    backward();
    Ok(())
}

/// The installed hooks, removed on drop. Private to [`during`]: it cannot be leaked.
struct Armed<'a> {
    params: &'a [Tensor],
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        for p in self.params {
            // SAFETY: a live tensor handle; the shim ends the process rather than leave a
            // hook it could not remove.
            unsafe { oxclip_clear_grad_ready_hook(p.as_ptr() as *mut c_void) };
        }
    }
}

/// The hook's entry from C++. A panic must not unwind into libtorch's frames: it is caught and
/// handed to the context; should even that panic, the process aborts.
extern "C" fn call<C: OnGradReady>(ctx: *mut c_void, index: usize) {
    // SAFETY: `ctx` is the `&C` that `during` installed this hook with, alive while the hook
    // is (see there).
    let ctx = unsafe { &*(ctx as *const C) };
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| ctx.grad_ready(index))) {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        if catch_unwind(AssertUnwindSafe(|| ctx.hook_panicked(message))).is_err() {
            std::process::abort();
        }
    }
}

/// Sets `param`'s gradient to `grad` (`None`: no gradient), which must have its shape, type
/// and device.
pub(super) fn set_grad(param: &Tensor, grad: Option<&Tensor>) -> Result<()> {
    if let Some(g) = grad {
        if (g.size(), g.kind(), g.device()) != (param.size(), param.kind(), param.device()) {
            return Err(TrainError::Dist(format!(
                "a {:?} {:?} gradient on {:?} for a {:?} {:?} parameter on {:?}",
                g.size(),
                g.kind(),
                g.device(),
                param.size(),
                param.kind(),
                param.device()
            )));
        }
    }
    let grad_ptr = grad.map_or(std::ptr::null_mut(), |g| g.as_ptr() as *mut c_void);
    // SAFETY: live tensor handles (or null for none); the shim copies the handle it is given
    // (a reference-counted tensor) and catches every C++ exception.
    let refused = unsafe { oxclip_set_grad(param.as_ptr() as *mut c_void, grad_ptr) };
    if refused != 0 {
        return Err(TrainError::Dist(format!(
            "libtorch refused to set the gradient of a {:?} parameter",
            param.size()
        )));
    }
    Ok(())
}
