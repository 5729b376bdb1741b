//! Autocast for the CPU or CUDA on the calling thread, entered and left as `torch.autocast`
//! does it (csrc/autocast.cpp). tch's `autocast` drives CUDA alone, and does not restore the
//! previous state when its closure panics; this guard does both.
//!
//! libtorch keeps autocast's switch and dtype per thread and per device type, and counts
//! nested entries: the outermost exit drops the cache of weights cast to the lower precision
//! (each weight is cast once per forward, however often it is used). The guard restores
//! whatever was set before it, on drop, also while a panic unwinds.

use std::ffi::{c_char, c_int, CStr};
use std::marker::PhantomData;

use tch::{Device, Kind};

use crate::error::{Result, TrainError};

extern "C" {
    fn oxclip_autocast_enter(
        device_type: c_int,
        dtype: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn oxclip_autocast_exit(device_type: c_int, prev_enabled: c_int, prev_dtype: c_int);
    fn oxclip_autocast_state(device_type: c_int, dtype: *mut c_int) -> c_int;
}

/// c10::DeviceType's values for the two device types autocast runs on here.
const DEVICE_TYPE_CPU: c_int = 0;
const DEVICE_TYPE_CUDA: c_int = 1;

/// The precision autocast runs eligible ops (matrix products, convolutions, attention) in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowPrecision {
    Bf16,
    Fp16,
}

impl LowPrecision {
    pub fn kind(self) -> Kind {
        match self {
            LowPrecision::Bf16 => Kind::BFloat16,
            LowPrecision::Fp16 => Kind::Half,
        }
    }

    /// Its c10::ScalarType value (tch keeps its own mapping private).
    fn scalar_type(self) -> c_int {
        match self {
            LowPrecision::Bf16 => 15,
            LowPrecision::Fp16 => 5,
        }
    }
}

/// Autocast in one precision for one device type, checked when made ([`Autocast::new`]); enter
/// it around a forward pass with [`Autocast::enter`] or [`Autocast::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autocast {
    device_type: c_int,
    dtype: LowPrecision,
}

impl Autocast {
    /// Autocast in `dtype` for `device`'s type (every CUDA device shares one switch, as in
    /// libtorch). Enters and leaves it once, so that libtorch's refusal, were there one, is an
    /// error now rather than a failure inside a step.
    pub fn new(device: Device, dtype: LowPrecision) -> Result<Self> {
        let device_type = match device {
            Device::Cpu => DEVICE_TYPE_CPU,
            Device::Cuda(_) => DEVICE_TYPE_CUDA,
            other => {
                return Err(TrainError::Device(format!(
                    "autocast runs on the CPU and CUDA, not on {other:?}"
                )))
            }
        };
        let autocast = Autocast { device_type, dtype };
        drop(autocast.try_enter()?);
        Ok(autocast)
    }

    pub fn dtype(self) -> LowPrecision {
        self.dtype
    }

    /// Switches autocast on for this thread until the guard is dropped.
    pub fn enter(self) -> AutocastGuard {
        // `new` entered this very autocast once: libtorch's setters refuse nothing it accepted.
        self.try_enter().unwrap_or_else(|e| panic!("autocast accepted once, refused now: {e}"))
    }

    /// `f` under this autocast.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        let _guard = self.enter();
        f()
    }

    fn try_enter(self) -> Result<AutocastGuard> {
        let (mut prev_enabled, mut prev_dtype) = (0, 0);
        let mut err = [0 as c_char; 512];
        // SAFETY: the out-pointers and the message buffer are valid for the call, its length
        // is the buffer's; the shim catches every C++ exception and changes nothing on failure.
        let failed = unsafe {
            oxclip_autocast_enter(
                self.device_type,
                self.dtype.scalar_type(),
                &mut prev_enabled,
                &mut prev_dtype,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if failed != 0 {
            // SAFETY: the shim NUL-terminated the message within the buffer.
            let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(TrainError::Device(format!("libtorch refused autocast: {message}")));
        }
        Ok(AutocastGuard {
            device_type: self.device_type,
            prev_enabled,
            prev_dtype,
            _thread_bound: PhantomData,
        })
    }
}

/// Autocast switched on for this thread; dropping it restores the state before it.
#[must_use = "autocast is on only while the guard lives"]
#[derive(Debug)]
pub struct AutocastGuard {
    device_type: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
    /// The state it restores is this thread's: the guard must not move to another.
    _thread_bound: PhantomData<*const ()>,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: the values `oxclip_autocast_enter` read on this thread (the guard is not
        // Send); the shim restores them and cannot fail for them.
        unsafe { oxclip_autocast_exit(self.device_type, self.prev_enabled, self.prev_dtype) }
    }
}

/// The precision autocast runs in for `device`'s type on this thread, `None` when it is off
/// (or `device` is neither the CPU nor CUDA). A dtype other than the two lower precisions is
/// reported as `Kind::Float`.
pub fn active(device: Device) -> Option<Kind> {
    let device_type = match device {
        Device::Cpu => DEVICE_TYPE_CPU,
        Device::Cuda(_) => DEVICE_TYPE_CUDA,
        _ => return None,
    };
    let mut dtype: c_int = -1;
    // SAFETY: a valid out-pointer; the shim reads two thread-locals and catches everything.
    let on = unsafe { oxclip_autocast_state(device_type, &mut dtype) };
    (on == 1).then(|| {
        [LowPrecision::Bf16, LowPrecision::Fp16]
            .into_iter()
            .find(|p| p.scalar_type() == dtype)
            .map_or(Kind::Float, LowPrecision::kind)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    fn linear_kind() -> Kind {
        let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        x.linear(&w, None::<Tensor>).kind()
    }

    /// Under the guard a linear layer on fp32 inputs computes in the lower precision, outside
    /// it in fp32 again; nested guards restore the outer one's dtype.
    #[test]
    fn the_cpu_guard_runs_a_linear_in_the_lower_precision_and_restores_fp32() {
        assert_eq!(active(Device::Cpu), None);
        assert_eq!(linear_kind(), Kind::Float);
        let bf16 = Autocast::new(Device::Cpu, LowPrecision::Bf16).unwrap();
        let fp16 = Autocast::new(Device::Cpu, LowPrecision::Fp16).unwrap();
        bf16.run(|| {
            assert_eq!(active(Device::Cpu), Some(Kind::BFloat16));
            assert_eq!(linear_kind(), Kind::BFloat16);
            fp16.run(|| {
                assert_eq!(linear_kind(), Kind::Half);
                assert_eq!(active(Device::Cpu), Some(Kind::Half));
            });
            assert_eq!(linear_kind(), Kind::BFloat16);
        });
        assert_eq!(active(Device::Cpu), None);
        assert_eq!(linear_kind(), Kind::Float);
    }

    /// A panic inside the guarded closure leaves autocast as it found it.
    #[test]
    fn a_panic_under_the_guard_restores_the_state() {
        let bf16 = Autocast::new(Device::Cpu, LowPrecision::Bf16).unwrap();
        let result = std::panic::catch_unwind(|| {
            bf16.run(|| {
                assert_eq!(linear_kind(), Kind::BFloat16);
                panic!("inside the forward pass");
            })
        });
        assert!(result.is_err());
        assert_eq!(active(Device::Cpu), None);
        assert_eq!(linear_kind(), Kind::Float);
    }

    /// CUDA's switch is its own, set and restored on a machine without a GPU as well (it is a
    /// thread-local flag), and leaves the CPU's alone.
    #[test]
    fn the_cuda_guard_sets_and_restores_cudas_switch_only() {
        let cuda = Autocast::new(Device::Cuda(0), LowPrecision::Bf16).unwrap();
        cuda.run(|| {
            assert_eq!(active(Device::Cuda(0)), Some(Kind::BFloat16));
            assert_eq!(active(Device::Cpu), None);
            assert_eq!(linear_kind(), Kind::Float);
        });
        assert_eq!(active(Device::Cuda(0)), None);
    }
}
