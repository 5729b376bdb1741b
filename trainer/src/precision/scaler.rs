//! The dynamic loss scale of fp16 training (`train.precision: amp`), as `torch.amp.GradScaler`
//! keeps it: fp16 gradients below 2^-24 flush to zero, so the backward pass runs on the loss
//! times a large scale; the parameter gradients are divided by it again before clipping and the
//! update. A step whose gradients hold an inf or NaN (the scale was too large) is skipped and
//! the scale halved; after `growth_interval` steps in a row without one it doubles.
//!
//! Where the step uses it (step.rs): the scale multiplies the backward surrogate, which scales
//! every parameter gradient as scaling the loss would; the ranks sum the scaled gradients (an
//! inf or NaN on one rank makes the sum inf or NaN on all, so every rank finds the same);
//! [`GradScaler::unscale`] divides them and sets `found_inf`; clipping sees true gradients;
//! AdamW skips its update when `found_inf` is set; [`GradScaler::update`] moves the scale.
//!
//! Everything stays on the device: the scale, the count of steps since the last inf, the flag
//! and the count of skipped steps are device tensors, moved by libtorch's own GradScaler
//! kernels (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`), so no step
//! waits for the host. They are read at the logging cadence and when a checkpoint is saved.

use std::ffi::{c_char, c_int, c_void, CStr};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

extern "C" {
    fn oxclip_amp_unscale(
        grads: *const *mut c_void,
        n: usize,
        found_inf: *mut c_void,
        inv_scale: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// torch.amp.GradScaler's settings; [`Default`] is torch's defaults, which open_clip uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    /// Steps in a row without inf/NaN after which the scale grows.
    pub growth_interval: i64,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        GradScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// What a checkpoint keeps of the scaler (`trainer_state.json`'s `grad_scaler`), read from
/// the device: torch's `scale` and `_growth_tracker`, and the steps skipped so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    pub scale: f32,
    /// Steps since the last inf/NaN (or the last growth).
    pub growth_tracker: i32,
    /// Steps skipped for inf/NaN gradients since the run began.
    pub skipped_steps: u64,
}

/// The loss scale and its bookkeeping, on the training device.
#[derive(Debug)]
pub struct GradScaler {
    config: GradScalerConfig,
    /// fp32, 0-dim.
    scale: Tensor,
    /// int32, 0-dim.
    growth_tracker: Tensor,
    /// fp32, 0-dim: 1 when the last unscaled gradients held an inf or NaN.
    found_inf: Tensor,
    /// fp64, 0-dim (exact far beyond any run's step count).
    skipped: Tensor,
}

impl GradScaler {
    pub fn new(device: Device, config: GradScalerConfig) -> Self {
        GradScaler {
            config,
            scale: Tensor::full([], config.init_scale, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([], (Kind::Int, device)),
            found_inf: Tensor::zeros([], (Kind::Float, device)),
            skipped: Tensor::zeros([], (Kind::Double, device)),
        }
    }

    /// The current scale (fp32, 0-dim, on the device): what the backward surrogate is
    /// multiplied by.
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// Whether the last [`unscale`](Self::unscale) found an inf or NaN (fp32, 0-dim: 1 or 0).
    pub fn found_inf(&self) -> &Tensor {
        &self.found_inf
    }

    /// Divides `grads` by the scale in place and sets [`found_inf`](Self::found_inf) when any
    /// holds an inf or NaN (`GradScaler.unscale_`). The gradients must be on the scaler's
    /// device, in fp32 (torch refuses to unscale fp16 gradients too).
    pub fn unscale(&mut self, grads: &[Tensor]) -> Result<&Tensor> {
        let _no_grad = tch::no_grad_guard();
        let _ = self.found_inf.zero_();
        // As torch: the reciprocal in fp64, then fp32.
        let inv_scale = self.scale.to_kind(Kind::Double).reciprocal().to_kind(Kind::Float);
        let ptrs: Vec<*mut c_void> = grads.iter().map(|g| g.as_ptr() as *mut c_void).collect();
        let mut err = [0 as c_char; 512];
        // SAFETY: live tensor handles for the call's duration; the message buffer is valid for
        // its length; the shim copies the handles and catches every C++ exception.
        let failed = unsafe {
            oxclip_amp_unscale(
                ptrs.as_ptr(),
                ptrs.len(),
                self.found_inf.as_ptr() as *mut c_void,
                inv_scale.as_ptr() as *mut c_void,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if failed != 0 {
            // SAFETY: the shim NUL-terminated the message within the buffer.
            let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(TrainError::Device(format!(
                "unscaling the gradients (train.precision amp): {message}"
            )));
        }
        Ok(&self.found_inf)
    }

    /// After the optimizer step: halves the scale and restarts the count when the step was
    /// skipped, else counts it and doubles the scale every `growth_interval` steps (unless
    /// that overflows fp32), as `GradScaler.update`; and counts a skipped step.
    pub fn update(&mut self) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let GradScalerConfig { growth_factor, backoff_factor, growth_interval, .. } = self.config;
        let _ = self.scale.f_internal_amp_update_scale_(
            &self.growth_tracker,
            &self.found_inf,
            growth_factor,
            backoff_factor,
            growth_interval,
        )?;
        let _ = self.skipped.f_add_(&self.found_inf)?;
        Ok(())
    }

    /// The state as a checkpoint keeps it (a wait for the device).
    pub fn state(&self) -> Result<GradScalerState> {
        Ok(GradScalerState {
            scale: self.scale.f_double_value(&[])? as f32,
            growth_tracker: self.growth_tracker.f_int64_value(&[])? as i32,
            skipped_steps: self.skipped.f_double_value(&[])? as u64,
        })
    }

    /// Continues from `state` (a checkpoint's): the next step runs at its scale.
    pub fn load_state(&mut self, state: &GradScalerState) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let _ = self.scale.f_fill_(f64::from(state.scale))?;
        let _ = self.growth_tracker.f_fill_(i64::from(state.growth_tracker))?;
        let _ = self.skipped.f_fill_(state.skipped_steps as f64)?;
        let _ = self.found_inf.f_zero_()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaler(growth_interval: i64) -> GradScaler {
        GradScaler::new(Device::Cpu, GradScalerConfig { growth_interval, ..Default::default() })
    }

    /// One scaler step on gradients `grads` (scaled copies are made from them): unscale, then
    /// update. Returns whether it found an inf/NaN.
    fn step(s: &mut GradScaler, grads: &[Tensor]) -> bool {
        let found = s.unscale(grads).unwrap().double_value(&[]) != 0.0;
        s.update().unwrap();
        found
    }

    fn finite() -> Vec<Tensor> {
        vec![Tensor::from_slice(&[1.0f32, -2.0]), Tensor::from_slice(&[3.0f32])]
    }

    fn state(s: &GradScaler) -> (f32, i32, u64) {
        let st = s.state().unwrap();
        (st.scale, st.growth_tracker, st.skipped_steps)
    }

    #[test]
    fn starts_at_torchs_defaults() {
        let s = GradScaler::new(Device::Cpu, GradScalerConfig::default());
        assert_eq!(state(&s), (65536.0, 0, 0));
        assert_eq!(
            GradScalerConfig::default(),
            GradScalerConfig {
                init_scale: 65536.0,
                growth_factor: 2.0,
                backoff_factor: 0.5,
                growth_interval: 2000
            }
        );
    }

    /// Unscaling divides by the scale exactly (a power of two) and leaves the flag down.
    #[test]
    fn unscale_divides_by_the_scale_and_flags_nothing_when_finite() {
        let mut s = scaler(2000);
        let grads: Vec<Tensor> = finite().iter().map(|g| g * 65536.0).collect();
        let found = s.unscale(&grads).unwrap().double_value(&[]);
        assert_eq!(found, 0.0);
        for (g, want) in grads.iter().zip(finite()) {
            assert!(g.equal(&want), "{g:?} vs {want:?}");
        }
    }

    /// The state machine of torch's `_amp_update_scale_`: a doubling after every
    /// `growth_interval` finite steps in a row (3 here, the same path as 2000), a halving and
    /// a fresh count on inf or NaN, in any one of several gradients; skips counted.
    #[test]
    fn grows_after_the_interval_and_backs_off_on_inf_or_nan() {
        let mut s = scaler(3);
        assert!(!step(&mut s, &finite()));
        assert_eq!(state(&s), (65536.0, 1, 0));
        assert!(!step(&mut s, &finite()));
        assert_eq!(state(&s), (65536.0, 2, 0));
        assert!(!step(&mut s, &finite()));
        assert_eq!(state(&s), (131072.0, 0, 0), "doubles on the 3rd finite step");
        assert!(!step(&mut s, &finite()));
        assert_eq!(state(&s), (131072.0, 1, 0));
        let inf = vec![Tensor::from_slice(&[1.0f32]), Tensor::from_slice(&[f32::INFINITY, 1.0])];
        assert!(step(&mut s, &inf));
        assert_eq!(state(&s), (65536.0, 0, 1), "halves and restarts the count");
        let nan = vec![Tensor::from_slice(&[f32::NAN]), Tensor::from_slice(&[1.0f32])];
        assert!(step(&mut s, &nan));
        assert_eq!(state(&s), (32768.0, 0, 2));
        let neg_inf = vec![Tensor::from_slice(&[f32::NEG_INFINITY])];
        assert!(step(&mut s, &neg_inf));
        assert_eq!(state(&s), (16384.0, 0, 3));
        // The flag is per step: finite gradients after an inf find none.
        for _ in 0..3 {
            assert!(!step(&mut s, &finite()));
        }
        assert_eq!(state(&s), (32768.0, 0, 3));
    }

    /// Growth stops where the doubled scale would overflow fp32 (the count restarts), as in
    /// torch; backing off from there works as anywhere.
    #[test]
    fn the_scale_never_grows_to_inf() {
        let mut s = scaler(1);
        s.load_state(&GradScalerState {
            scale: 2f32.powi(127),
            growth_tracker: 0,
            skipped_steps: 0,
        })
        .unwrap();
        assert!(!step(&mut s, &finite()));
        assert_eq!(state(&s), (2f32.powi(127), 0, 0));
        assert!(step(&mut s, &[Tensor::from_slice(&[f32::INFINITY])]));
        assert_eq!(state(&s), (2f32.powi(126), 0, 1));
    }

    /// Every halving is exact, and the scale stays positive as long as fp32 can hold it: from
    /// 2^16, 165 inf steps in a row reach fp32's smallest subnormal, 2^-149, still a scale that
    /// grows back. (The 166th would round it to 0, as in torch: the training loop stops a run
    /// whose scale reaches 0, see `train::log_step`.)
    #[test]
    fn backoff_halves_exactly_down_to_the_smallest_fp32() {
        let mut s = scaler(2000);
        let inf = [Tensor::from_slice(&[f32::INFINITY])];
        for k in 1..=165 {
            assert!(step(&mut s, &inf));
            let (scale, _, skipped) = state(&s);
            // (f32's powi overflows on the way to subnormals; f64 holds them exactly.)
            assert_eq!(scale, 2f64.powi(16 - k) as f32, "after {k} skips");
            assert!(scale > 0.0);
            assert_eq!(skipped, k as u64);
        }
        assert!(step(&mut s, &inf));
        assert_eq!(state(&s).0, 0.0, "torch's kernel rounds the next halving to 0");
    }

    /// A checkpointed state continues where it stopped: the same scales follow.
    #[test]
    fn a_loaded_state_continues_the_same_sequence() {
        let mut a = scaler(2);
        let inf = [Tensor::from_slice(&[f32::INFINITY])];
        for grads in [&finite()[..], &inf[..], &finite()[..]] {
            step(&mut a, grads);
        }
        let saved = a.state().unwrap();
        assert_eq!(saved, GradScalerState { scale: 32768.0, growth_tracker: 1, skipped_steps: 1 });
        let json = serde_json::to_string(&saved).unwrap();
        let mut b = scaler(2);
        b.load_state(&serde_json::from_str(&json).unwrap()).unwrap();
        for grads in [&finite()[..], &finite()[..], &inf[..], &finite()[..]] {
            assert_eq!(step(&mut a, grads), step(&mut b, grads));
            assert_eq!(state(&a), state(&b));
        }
        // 2 finite steps double the scale, the inf halves it again.
        assert_eq!(state(&b), (32768.0, 1, 2));
    }

    #[test]
    fn a_gradient_of_another_dtype_is_an_error_naming_the_precision() {
        let mut s = scaler(2000);
        let err = s.unscale(&[Tensor::from_slice(&[1i64])]).unwrap_err().to_string();
        assert!(err.contains("train.precision amp"), "{err}");
    }
}
