//! AdamW (Loshchilov & Hutter) with its state as plain named tensors that a checkpoint saves
//! and restores exactly, and gradient clipping: step 7 of the training step. The update is
//! `torch.optim.AdamW(fused=True)`'s: libtorch's multi-tensor `_fused_adamw_` kernel (CPU and
//! CUDA) updates every parameter of a weight-decay group in one call, the groups being
//! open_clip's (decayed or not). Clipping is `torch.nn.utils.clip_grad_norm_(foreach=True)`'s:
//! per-tensor norms and the scaling in one call each. tch lacks these TensorList operators;
//! csrc/optim.cpp calls them.
//!
//! Under `dist.shard` (ZeRO-1/2) a rank's optimizer holds only the parameter elements it owns,
//! as pieces (views of ranges of the flattened parameters, which the gradient reducer hands out); the update is
//! the same elementwise kernel on them. Its state then carries each piece's first element
//! (`start.<param>`), and a state of whole parameters or of pieces loads into an optimizer of
//! either kind, whatever the ranges: a run resumes on another world size, sharded or not.
//!
//! Nothing here reads a value back to the host during a step (on CUDA each read would wait for
//! the GPU): the update counter lives on the device as torch's fused path keeps it, the
//! clipping coefficient is computed there, and the norm is handed back as a tensor for the
//! log to read when it logs.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

/// open_clip `main.py`: no weight decay on gains, biases, LayerNorms and the temperature
/// (`p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n`).
pub fn decays(name: &str, tensor: &Tensor) -> bool {
    decays_shape(name, tensor.dim())
}

/// [`decays`] of a parameter with `dims` dimensions.
pub fn decays_shape(name: &str, dims: usize) -> bool {
    let excluded = dims < 2
        || name.contains("bn")
        || name.contains("ln")
        || name.contains("bias")
        || name.contains("logit_scale");
    !excluded
}

#[derive(Debug)]
struct Param {
    name: String,
    var: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    weight_decay: f64,
    /// A piece (`dist.shard`): its first element in the flattened parameter, and the
    /// parameter's shape. `None`: `var` is the whole parameter.
    piece: Option<(i64, Vec<i64>)>,
}

/// Sums a tensor over ranks in place (`dist.shard`'s partial gradient norms).
pub type SumOverRanks<'a> = dyn Fn(&mut Tensor) -> Result<()> + 'a;

/// What a sharded optimizer updates: elements `start ..` of parameter `name` (of `shape`),
/// held as `view` (1-D, sharing the parameter's memory).
pub struct PieceOf {
    pub name: String,
    pub shape: Vec<i64>,
    pub start: i64,
    pub view: Tensor,
    /// open_clip's rule ([`decays`]) applied to the whole parameter.
    pub decays: bool,
}

#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    /// Indices into `params` by weight decay, each group one kernel call: open_clip's two
    /// parameter groups.
    groups: Vec<(f64, Vec<usize>)>,
    config: AdamWConfig,
    /// Updates taken so far (the bias-correction exponent), a 0-dim fp32 tensor on the
    /// parameters' device, as torch's fused AdamW keeps its `state_steps`: counted there, and
    /// taken back there when a step is skipped, without the host knowing. fp32 counts exactly
    /// to 2^24 updates; by then both bias corrections are 1 to double precision anyway.
    step: Tensor,
}

impl AdamW {
    /// Optimises the trainable variables given by name; state starts at zero.
    pub fn new(variables: BTreeMap<String, Tensor>, config: AdamWConfig) -> Self {
        let params: Vec<Param> = variables
            .into_iter()
            .filter(|(_, var)| var.requires_grad())
            .map(|(name, var)| {
                let weight_decay = if decays(&name, &var) { config.weight_decay } else { 0.0 };
                Param::new(name, var, weight_decay, None)
            })
            .collect();
        Self::over(params, config)
    }

    /// Optimises this rank's pieces of the parameters (`dist.shard`); state starts at zero.
    pub fn over_pieces(pieces: Vec<PieceOf>, config: AdamWConfig) -> Self {
        let params = pieces
            .into_iter()
            .map(|p| {
                let weight_decay = if p.decays { config.weight_decay } else { 0.0 };
                Param::new(p.name, p.view, weight_decay, Some((p.start, p.shape)))
            })
            .collect();
        Self::over(params, config)
    }

    fn over(params: Vec<Param>, config: AdamWConfig) -> Self {
        let mut groups: Vec<(f64, Vec<usize>)> = Vec::new();
        for (i, p) in params.iter().enumerate() {
            match groups.iter_mut().find(|(wd, _)| *wd == p.weight_decay) {
                Some((_, members)) => members.push(i),
                None => groups.push((p.weight_decay, vec![i])),
            }
        }
        let device = params.first().map_or(Device::Cpu, |p| p.var.device());
        let step = Tensor::zeros([], (Kind::Float, device));
        AdamW { params, groups, config, step }
    }

    /// Bytes of AdamW moments this optimizer holds (both moments of every parameter or piece).
    pub fn state_bytes(&self) -> u64 {
        self.params
            .iter()
            .map(|p| 2 * p.exp_avg.numel() as u64 * p.exp_avg.kind().elt_size_in_bytes() as u64)
            .sum()
    }

    /// Updates taken so far. Reads the device (a wait for it on CUDA): for checkpoints, logs and
    /// tests, never once a step.
    pub fn steps_taken(&self) -> u64 {
        self.step.double_value(&[]) as u64
    }

    /// Names of the parameters with weight decay, for inspection and tests.
    pub fn decayed(&self) -> Vec<&str> {
        self.params.iter().filter(|p| p.weight_decay > 0.0).map(|p| p.name.as_str()).collect()
    }

    pub fn variables(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.var.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// Rescales gradients so their global L2 norm is at most `max_norm`, and returns the norm
    /// before clipping as a 0-dim fp32 tensor on the device, for the log to read when it logs:
    /// `torch.nn.utils.clip_grad_norm_(foreach=True)`. As there, the gradients are always
    /// multiplied, by `min(max_norm / (norm + 1e-6), 1)`, so that no host branch waits for the
    /// norm; multiplying by exactly 1 changes no bit. The coefficient is computed in double
    /// precision, as the host did it when it read the norm, so the clipped gradients are those
    /// of that version bit for bit. A non-finite norm makes every gradient NaN, as in torch
    /// (the loss check at the next log step, or the GradScaler's skipped step, then applies).
    ///
    /// `over_ranks`: under `dist.shard` each rank holds the gradients of its own pieces only;
    /// the function sums the squared partial norms over ranks (every rank must call it, with
    /// or without gradients), and the norm is the square root of that sum.
    pub fn clip_grad_norm(
        &mut self,
        max_norm: f64,
        over_ranks: Option<&SumOverRanks>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> =
            self.params.iter().map(|p| p.var.grad()).filter(|g| g.defined()).collect();
        let mut total = Tensor::f_zeros([], (Kind::Float, self.step.device()))?;
        if !grads.is_empty() {
            shim::total_norm(&grads, &total)?;
        }
        if let Some(sum) = over_ranks {
            let mut squares = total.f_square()?;
            sum(&mut squares)?;
            total = squares.f_sqrt()?;
        } else if grads.is_empty() {
            return Ok(total);
        }
        let options = (Kind::Double, total.device());
        let coef = Tensor::f_full([], max_norm, options)?
            .f_div(&total.f_to_kind(Kind::Double)?.f_add_scalar(1e-6)?)?
            .f_clamp_max(1.0)?
            .f_to_kind(Kind::Float)?;
        shim::foreach_mul_(&grads, &coef)?;
        Ok(total)
    }

    /// One AdamW update at learning rate `lr`: torch.optim.AdamW(fused=True)'s step, one
    /// `_fused_adamw_` call per weight-decay group. `found_inf` (a tensor on any device, as the
    /// GradScaler's: nonzero or NaN anywhere skips) skips the update inside the kernel: weights,
    /// moments and the update counter stay as they were, and the host learns nothing. A
    /// parameter without a gradient is left alone, as torch does.
    pub fn step(&mut self, lr: f64, found_inf: Option<&Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let (beta1, beta2) = self.config.betas;
        let skip = match found_inf {
            Some(f) => Some(
                f.f_ne(0.0)?.f_any()?.f_to_kind(Kind::Float)?.f_to_device(self.step.device())?,
            ),
            None => None,
        };
        let mut groups = Vec::with_capacity(self.groups.len());
        for (weight_decay, members) in &self.groups {
            let mut lists = GroupLists::default();
            for &i in members {
                let p = &self.params[i];
                let grad = p.var.grad();
                if !grad.defined() {
                    continue;
                }
                if !p.var.is_contiguous() {
                    return Err(TrainError::Torch(tch::TchError::Torch(format!(
                        "AdamW updates parameters in place as flat memory, and `{}` is not \
                         contiguous",
                        p.name
                    ))));
                }
                // The kernel takes gradients in the parameter's type and layout; backward
                // gives them so, a conversion is the exception.
                let grad = if grad.kind() != p.var.kind() || !grad.is_contiguous() {
                    grad.f_to_kind(p.var.kind())?.f_contiguous()?
                } else {
                    grad
                };
                lists.push(p, grad);
            }
            if !lists.params.is_empty() {
                groups.push((*weight_decay, lists));
            }
        }
        // torch's order (adam.py, `_fused_adam`): count this update, update, and take the
        // count back where the kernel skipped.
        let _ = self.step.f_add_scalar_(1.0)?;
        for (weight_decay, lists) in &groups {
            let hyper =
                shim::Hyper { lr, beta1, beta2, weight_decay: *weight_decay, eps: self.config.eps };
            shim::fused_adamw_(lists, &self.step, hyper, skip.as_ref())?;
        }
        if let Some(skip) = &skip {
            let _ = self.step.f_sub_(skip)?;
        }
        Ok(())
    }

    /// The per-parameter loop that the fused kernel replaced (torch's single-tensor AdamW,
    /// decoupled decay first, then bias-corrected Adam): the tests' oracle and the baseline of
    /// `oxclip bench optim`. Training never calls it. It reads the update counter to the host.
    pub fn step_per_parameter(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        let _ = self.step.g_add_scalar_(1.0);
        let step = self.step.double_value(&[]) as i32;
        let (beta1, beta2) = self.config.betas;
        let bias_correction1 = 1.0 - beta1.powi(step);
        let bias_correction2_sqrt = (1.0 - beta2.powi(step)).sqrt();
        let step_size = lr / bias_correction1;
        for p in &mut self.params {
            let grad = p.var.grad();
            if !grad.defined() {
                continue;
            }
            let grad = grad.to_kind(p.exp_avg.kind());
            let mut var = p.var.shallow_clone();
            if p.weight_decay != 0.0 {
                let _ = var.g_mul_scalar_(1.0 - lr * p.weight_decay);
            }
            // exp_avg += (1 - beta1) (grad - exp_avg); exp_avg_sq = beta2 exp_avg_sq + (1 - beta2) grad^2
            let _ = p.exp_avg.lerp_(&grad, 1.0 - beta1);
            let _ = p.exp_avg_sq.g_mul_scalar_(beta2).addcmul_(&grad, &(&grad * (1.0 - beta2)));
            // param -= step_size * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps)
            let mut denom = p.exp_avg_sq.sqrt();
            let _ = denom.g_div_scalar_(bias_correction2_sqrt).g_add_scalar_(self.config.eps);
            let _ = var.addcdiv_(&(&p.exp_avg * (-step_size)), &denom);
        }
    }

    /// The state as named tensors: `exp_avg.<param>`, `exp_avg_sq.<param>`, and `step`, an int64
    /// scalar (on the device: a checkpoint's copy to the host reads it). A piece's moments are
    /// 1-D, with `start.<param>` (int64) its first element in the flattened parameter.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(3 * self.params.len() + 1);
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.shallow_clone()));
            if let Some((start, _)) = &p.piece {
                out.push((format!("start.{}", p.name), Tensor::from(*start)));
            }
        }
        out.push(("step".to_string(), self.step.to_kind(Kind::Int64)));
        out
    }

    /// Restores what `state_tensors` saved; every parameter's state must be present.
    pub fn load_state_tensors(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut loading = self.start_loading();
        loading.take(self, state)?;
        loading.finish(self)
    }

    /// Loads state saved in parts (the shards of a sharded run, or one whole state), each
    /// given to [`Loading::take`] in turn, then [`Loading::finish`]: every element this
    /// optimizer holds must be covered once, whichever ranges the parts hold.
    pub fn start_loading(&self) -> Loading {
        Loading { covered: vec![0; self.params.len()], step: None }
    }
}

/// A state being loaded part by part ([`AdamW::start_loading`]).
pub struct Loading {
    /// Per parameter (or piece), elements filled so far.
    covered: Vec<i64>,
    step: Option<i64>,
}

impl Loading {
    /// Copies what `state` holds of this optimizer's parameters' moments: for each, the
    /// elements where the saved range (a whole parameter, or a piece at `start.<param>`) and
    /// this optimizer's overlap.
    pub fn take(&mut self, opt: &mut AdamW, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let invalid = |message: String| TrainError::Config(message);
        if let Some(step) = state.get("step") {
            let step = match i64::try_from(step) {
                Ok(n) if n >= 0 => n,
                _ => {
                    return Err(invalid(format!(
                        "optimizer state `step` must be one non-negative integer, got a {:?} \
                         tensor of shape {:?}",
                        step.kind(),
                        step.size()
                    )))
                }
            };
            if self.step.is_some_and(|s| s != step) {
                return Err(invalid(format!(
                    "optimizer state parts disagree on `step`: {} and {step}",
                    self.step.unwrap_or_default()
                )));
            }
            self.step = Some(step);
        }
        let _guard = tch::no_grad_guard();
        for (i, p) in opt.params.iter_mut().enumerate() {
            let (mine, shape) = match &p.piece {
                Some((start, shape)) => (*start, shape.clone()),
                None => (0, p.var.size()),
            };
            let numel: i64 = shape.iter().product();
            let len = p.exp_avg.numel() as i64;
            for (key, dst) in [("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)] {
                let key = format!("{key}.{}", p.name);
                let Some(src) = state.get(&key) else { continue };
                let saved = match state.get(&format!("start.{}", p.name)) {
                    Some(start) => i64::try_from(start).map_err(|_| {
                        invalid(format!("optimizer state `start.{}` is not one integer", p.name))
                    })?,
                    None if src.size() != shape => {
                        return Err(invalid(format!(
                            "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                            src.size(),
                            shape
                        )))
                    }
                    None => 0,
                };
                let saved_len = src.numel() as i64;
                if saved < 0 || saved + saved_len > numel {
                    return Err(invalid(format!(
                        "optimizer state `{key}` holds elements {saved}..{} of a parameter of {numel}",
                        saved + saved_len
                    )));
                }
                let (lo, hi) = (mine.max(saved), (mine + len).min(saved + saved_len));
                if lo >= hi {
                    continue;
                }
                let src = src.f_reshape([-1])?.f_narrow(0, lo - saved, hi - lo)?;
                dst.f_view([-1])?
                    .f_narrow(0, lo - mine, hi - lo)?
                    .f_copy_(&src.f_to_device(dst.device())?.f_to_kind(dst.kind())?)?;
                if key.starts_with("exp_avg.") {
                    self.covered[i] += hi - lo;
                }
            }
        }
        Ok(())
    }

    /// Checks that every element was loaded once and the step found, and sets the counter.
    pub fn finish(self, opt: &mut AdamW) -> Result<()> {
        let missing = |key: &str| TrainError::Config(format!("optimizer state lacks `{key}`"));
        for (p, &covered) in opt.params.iter().zip(&self.covered) {
            let len = p.exp_avg.numel() as i64;
            if covered == 0 && len > 0 {
                return Err(missing(&format!("exp_avg.{}", p.name)));
            }
            if covered != len {
                return Err(TrainError::Config(format!(
                    "optimizer state covers {covered} of the {len} elements of `{}` this rank \
                     holds: its parts overlap or leave a gap",
                    p.name
                )));
            }
        }
        let step = self.step.ok_or_else(|| missing("step"))?;
        let _ = opt.step.f_fill_(step as f64)?;
        Ok(())
    }
}

impl Param {
    fn new(name: String, var: Tensor, weight_decay: f64, piece: Option<(i64, Vec<i64>)>) -> Self {
        Param {
            exp_avg: var.zeros_like(),
            exp_avg_sq: var.zeros_like(),
            name,
            var,
            weight_decay,
            piece,
        }
    }
}

/// One group's lists for the kernel, index for index.
#[derive(Default)]
struct GroupLists {
    params: Vec<Tensor>,
    grads: Vec<Tensor>,
    exp_avgs: Vec<Tensor>,
    exp_avg_sqs: Vec<Tensor>,
}

impl GroupLists {
    fn push(&mut self, p: &Param, grad: Tensor) {
        self.params.push(p.var.shallow_clone());
        self.grads.push(grad);
        self.exp_avgs.push(p.exp_avg.shallow_clone());
        self.exp_avg_sqs.push(p.exp_avg_sq.shallow_clone());
    }
}

/// The calls into csrc/optim.cpp.
mod shim {
    use super::*;

    extern "C" {
        fn oxclip_fused_adamw_(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            exp_avgs: *const *mut c_void,
            exp_avg_sqs: *const *mut c_void,
            n: usize,
            step: *mut c_void,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            found_inf: *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        fn oxclip_total_norm(
            tensors: *const *mut c_void,
            n: usize,
            out: *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        fn oxclip_foreach_mul_(
            tensors: *const *mut c_void,
            n: usize,
            factor: *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
    }

    pub(super) struct Hyper {
        pub lr: f64,
        pub beta1: f64,
        pub beta2: f64,
        pub weight_decay: f64,
        pub eps: f64,
    }

    fn handles(tensors: &[Tensor]) -> Vec<*mut c_void> {
        tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect()
    }

    fn handle(t: &Tensor) -> *mut c_void {
        t.as_ptr() as *mut c_void
    }

    /// Runs `call` with an error buffer; its refusal becomes an error naming `what`.
    fn checked(what: &str, call: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
        let mut err = [0 as c_char; 1024];
        if call(err.as_mut_ptr(), err.len()) == 0 {
            return Ok(());
        }
        // SAFETY: the shim wrote a NUL-terminated message within the buffer (or left it all
        // zeros).
        let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        Err(TrainError::Torch(tch::TchError::Torch(format!("{what}: {message}"))))
    }

    pub(super) fn fused_adamw_(
        lists: &GroupLists,
        step: &Tensor,
        h: Hyper,
        found_inf: Option<&Tensor>,
    ) -> Result<()> {
        let (p, g) = (handles(&lists.params), handles(&lists.grads));
        let (m, v) = (handles(&lists.exp_avgs), handles(&lists.exp_avg_sqs));
        let found_inf = found_inf.map_or(std::ptr::null_mut(), handle);
        checked("the fused AdamW update", |err, err_len| {
            // SAFETY: four arrays of `p.len()` live tensor handles, borrowed (with `step` and
            // `found_inf`, or null) for the call; the shim copies the reference-counted
            // handles it needs and catches every C++ exception.
            unsafe {
                oxclip_fused_adamw_(
                    p.as_ptr(),
                    g.as_ptr(),
                    m.as_ptr(),
                    v.as_ptr(),
                    p.len(),
                    handle(step),
                    h.lr,
                    h.beta1,
                    h.beta2,
                    h.weight_decay,
                    h.eps,
                    found_inf,
                    err,
                    err_len,
                )
            }
        })
    }

    /// The L2 norm of `tensors` together (each norm in fp32), into the 0-dim fp32 `out`.
    pub(super) fn total_norm(tensors: &[Tensor], out: &Tensor) -> Result<()> {
        let t = handles(tensors);
        checked("the gradient norm", |err, err_len| {
            // SAFETY: `t.len()` live tensor handles and `out`, borrowed for the call; the shim
            // catches every C++ exception.
            unsafe { oxclip_total_norm(t.as_ptr(), t.len(), handle(out), err, err_len) }
        })
    }

    /// Multiplies each of `tensors` in place by the 0-dim `factor`.
    pub(super) fn foreach_mul_(tensors: &[Tensor], factor: &Tensor) -> Result<()> {
        let t = handles(tensors);
        checked("the gradient clipping", |err, err_len| {
            // SAFETY: `t.len()` live tensor handles and `factor`, borrowed for the call; the
            // shim catches every C++ exception.
            unsafe { oxclip_foreach_mul_(t.as_ptr(), t.len(), handle(factor), err, err_len) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::host_reads::HostReads;
    use tch::{nn, Device};

    #[test]
    fn open_clip_decay_rule() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg: crate::model::ModelConfig =
            serde_yaml::from_str(include_str!("../../configs/models/tiny.yaml"))
                .expect("tiny.yaml parses");
        let _model = crate::model::Clip::new(&vs.root(), &cfg).expect("model builds");
        let opt = AdamW::new(
            vs.variables().into_iter().collect(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 },
        );
        let decayed: Vec<&str> = opt.decayed();
        for name in [
            "visual.conv1.weight",
            "visual.proj",
            "text_projection",
            "token_embedding.weight",
            "positional_embedding",
            "visual.positional_embedding",
            "transformer.resblocks.0.attn.in_proj_weight",
            "visual.transformer.resblocks.1.mlp.c_fc.weight",
        ] {
            assert!(decayed.contains(&name), "{name} should decay");
        }
        for name in [
            "logit_scale",
            "visual.class_embedding",
            "ln_final.weight",
            "visual.ln_pre.weight",
            "transformer.resblocks.0.attn.in_proj_bias",
            "transformer.resblocks.0.ln_1.weight",
            "transformer.resblocks.0.mlp.c_fc.bias",
        ] {
            assert!(!decayed.contains(&name), "{name} should not decay");
        }
    }

    #[test]
    fn matches_torch_adamw_update_by_hand() {
        // Two steps on one weight matrix, checked against the closed form of torch.optim.AdamW.
        let w = Tensor::from_slice(&[1.0f64, -2.0, 0.5, 3.0]).view([2, 2]).set_requires_grad(true);
        let mut opt = AdamW::new(
            [("w".to_string(), w.shallow_clone())].into(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.1 },
        );
        let g = Tensor::from_slice(&[0.1f64, -0.2, 0.3, 0.0]).view([2, 2]);
        let (mut p, mut m, mut v) = (w.detach().copy(), g.zeros_like(), g.zeros_like());
        for t in 1..=2 {
            opt.zero_grad();
            (&w * &g).sum(Kind::Double).backward();
            opt.step(0.01, None).unwrap();
            p = &p * (1.0 - 0.01 * 0.1);
            m = &m * 0.9 + &g * 0.1;
            v = &v * 0.98 + &g * &g * 0.02;
            let mhat = &m / (1.0 - 0.9f64.powi(t));
            let vhat = &v / (1.0 - 0.98f64.powi(t));
            p = &p - mhat / (vhat.sqrt() + 1e-6) * 0.01;
        }
        let diff = (w.detach() - p).abs().max().double_value(&[]);
        assert!(diff < 1e-9, "diff {diff}");
        assert_eq!(opt.steps_taken(), 2);
    }

    #[test]
    fn clip_grad_norm_rescales_to_the_limit() {
        let w = Tensor::zeros([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(
            [("w".to_string(), w.shallow_clone())].into(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.0 },
        );
        (&w * Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0])).sum(Kind::Float).backward();
        let norm = opt.clip_grad_norm(1.0, None).unwrap().double_value(&[]);
        assert!((norm - 5.0).abs() < 1e-5);
        let clipped = w.grad().norm().double_value(&[]);
        assert!((clipped - 1.0).abs() < 1e-4, "{clipped}");
    }

    /// `clip_grad_norm` as it was before it ran on the device: the norm read to the host, the
    /// gradients multiplied only when the coefficient is below 1.
    fn clip_on_the_host(opt: &AdamW, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> =
            opt.params.iter().map(|p| p.var.grad()).filter(|g| g.defined()).collect();
        let norms: Vec<Tensor> =
            grads.iter().map(|g| g.to_kind(Kind::Float).norm().unsqueeze(0)).collect();
        let total = Tensor::cat(&norms, 0).norm().double_value(&[]);
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            for mut g in grads {
                let _ = g.g_mul_scalar_(coef);
            }
        }
        total
    }

    fn tiny_model(vs: &nn::VarStore) -> crate::model::Clip {
        let cfg: crate::model::ModelConfig =
            serde_yaml::from_str(include_str!("../../configs/models/tiny.yaml")).unwrap();
        crate::model::Clip::new(&vs.root(), &cfg).unwrap()
    }

    /// The symmetric CLIP loss of a batch by plain autograd: real gradients for every parameter.
    fn clip_loss(model: &crate::model::Clip, images: &Tensor, tokens: &Tensor) -> Tensor {
        let (image, text) = model.features(images, tokens);
        let logits = image.mm(&text.tr()) * model.logit_scale.exp();
        let labels = Tensor::arange(images.size()[0], (Kind::Int64, Device::Cpu));
        (logits.cross_entropy_for_logits(&labels) + logits.tr().cross_entropy_for_logits(&labels))
            / 2.0
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The acceptance test of the fused step: 20 steps of the tiny model, the fused kernel and
    /// on-device clipping against the per-parameter loop and the host clipping they replaced,
    /// both fed the same real gradients each step; without clipping, with clipping that never
    /// bites, and with clipping at every step. Weight decay in two groups.
    #[test]
    fn fused_step_and_device_clipping_equal_the_per_parameter_loop_over_20_steps() {
        tch::manual_seed(3);
        let batches: Vec<(Tensor, Tensor)> = (0..20)
            .map(|_| {
                (
                    Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu)),
                    Tensor::randint_low(1, 49000, [8, 32], (Kind::Int64, Device::Cpu)),
                )
            })
            .collect();
        let config = AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 };
        let (fused_vs, loop_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
        let (fused_model, loop_model) = (tiny_model(&fused_vs), tiny_model(&loop_vs));
        let start: BTreeMap<String, Tensor> =
            fused_vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
        for clip in [None, Some(1e6), Some(0.05)] {
            tch::no_grad(|| {
                for vs in [&fused_vs, &loop_vs] {
                    for (name, var) in vs.variables() {
                        var.shallow_clone().copy_(&start[&name]);
                    }
                }
            });
            let mut fused = AdamW::new(fused_vs.variables().into_iter().collect(), config);
            let mut looped = AdamW::new(loop_vs.variables().into_iter().collect(), config);
            assert_eq!(fused.groups.len(), 2);
            let mut worst_clipped = 0.0f64;
            for (images, tokens) in &batches {
                fused.zero_grad();
                clip_loss(&fused_model, images, tokens).backward();
                looped.zero_grad();
                clip_loss(&loop_model, images, tokens).backward();
                tch::no_grad(|| {
                    for ((_, f), (_, l)) in fused.variables().zip(looped.variables()) {
                        l.grad().copy_(&f.grad());
                    }
                });
                if let Some(max_norm) = clip {
                    let norm = fused.clip_grad_norm(max_norm, None).unwrap().double_value(&[]);
                    let host = clip_on_the_host(&looped, max_norm);
                    assert_eq!(norm, host, "the norm, device vs host");
                    // Active (0.05) at every step, or never (1e6).
                    assert_eq!(norm > max_norm, max_norm < 1.0, "norm {norm}, max {max_norm}");
                    for ((name, f), (_, l)) in fused.variables().zip(looped.variables()) {
                        let diff = largest_difference(&f.grad(), &l.grad());
                        worst_clipped = worst_clipped.max(diff);
                        assert_eq!(diff, 0.0, "clip {clip:?}: {name}'s clipped gradient");
                    }
                }
                fused.step(1e-3, None).unwrap();
                looped.step_per_parameter(1e-3);
            }
            assert_eq!((fused.steps_taken(), looped.steps_taken()), (20, 20));
            let largest =
                fused.variables().map(|(_, w)| w.abs().max().double_value(&[])).fold(0.0, f64::max);
            let mut worst = 0.0f64;
            for ((name, f), (_, l)) in fused.variables().zip(looped.variables()) {
                let diff = largest_difference(f, l);
                worst = worst.max(diff);
                assert!(
                    diff <= 1e-6 * largest,
                    "clip {clip:?}: {name} differs by {diff} (largest weight {largest})"
                );
                let moved = largest_difference(f, &start[name]);
                assert!(moved > 0.0, "{name} did not train");
            }
            for ((key, f), (_, l)) in fused.state_tensors().iter().zip(&looped.state_tensors()) {
                let diff = largest_difference(f, l);
                let scale = l.abs().max().double_value(&[]).max(1e-30);
                assert!(diff <= 1e-5 * scale, "clip {clip:?}: {key} differs by {diff} of {scale}");
            }
            eprintln!(
                "clip {clip:?}: after 20 steps the weights differ by at most {:.2e} of the \
                 largest weight; clipped gradients by {worst_clipped:.1e}",
                worst / largest
            );
        }
    }

    /// Values drawn from `seed` without libtorch's generator, which the test threads share.
    fn values(shape: &[i64], seed: i64) -> Tensor {
        let n: i64 = shape.iter().product();
        ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.731 + seed as f64).sin() * 2.0)
            .view(shape)
    }

    /// Two parameters, one in each weight-decay group.
    fn two_params(seed: i64) -> (Tensor, Tensor, AdamW) {
        let w = values(&[3, 4], seed).set_requires_grad(true);
        let b = values(&[4], seed + 1).set_requires_grad(true);
        let opt = AdamW::new(
            [("w".to_string(), w.shallow_clone()), ("b".to_string(), b.shallow_clone())].into(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.1 },
        );
        (w, b, opt)
    }

    fn set_grads(w: &Tensor, b: &Tensor, seed: i64) {
        for p in [w, b] {
            let mut g = p.grad();
            if !g.defined() {
                (p * 0.0).sum(Kind::Float).backward();
                g = p.grad();
            }
            g.copy_(&values(&p.size(), seed));
        }
    }

    fn snapshot(w: &Tensor, b: &Tensor, opt: &AdamW) -> Vec<Tensor> {
        let mut all = vec![w.detach().copy(), b.detach().copy()];
        all.extend(opt.state_tensors().into_iter().map(|(_, t)| t.copy()));
        all
    }

    /// A step flagged by the GradScaler (1, or any nonzero or NaN value) leaves weights,
    /// moments and the update counter exactly as they were, even with non-finite gradients; a
    /// zero flag is a normal step.
    #[test]
    fn found_inf_skips_the_update_exactly() {
        let (w, b, mut opt) = two_params(1);
        let (w2, b2, mut reference) = two_params(1);
        for s in 0..3 {
            set_grads(&w, &b, 10 + s);
            set_grads(&w2, &b2, 10 + s);
            opt.step(1e-2, None).unwrap();
            reference.step(1e-2, None).unwrap();
        }
        let before = snapshot(&w, &b, &opt);
        let _ = w.grad().fill_(f64::INFINITY);
        let _ = b.grad().fill_(f64::NAN);
        for flag in [1.0f32, 2.0, -1.0, f32::NAN, f32::INFINITY] {
            opt.step(1e-2, Some(&Tensor::from_slice(&[flag]))).unwrap();
            for (a, z) in snapshot(&w, &b, &opt).iter().zip(&before) {
                assert!(a.equal(z), "flag {flag}: something changed");
            }
        }
        assert_eq!(opt.steps_taken(), 3);
        set_grads(&w, &b, 20);
        set_grads(&w2, &b2, 20);
        opt.step(1e-2, Some(&Tensor::zeros([1], (Kind::Float, Device::Cpu)))).unwrap();
        reference.step(1e-2, None).unwrap();
        for (a, z) in snapshot(&w, &b, &opt).iter().zip(&snapshot(&w2, &b2, &reference)) {
            assert!(a.equal(z), "a zero flag is a normal step");
        }
        assert_eq!(opt.steps_taken(), 4);
    }

    /// Neither clipping nor the update reads a value back to the host, skipped or not.
    #[test]
    fn clipping_and_the_update_read_nothing_back() {
        let (w, b, mut opt) = two_params(2);
        set_grads(&w, &b, 3);
        let skip = Tensor::ones([1], (Kind::Float, Device::Cpu));
        let count = HostReads::start().expect("counting");
        for found_inf in [None, Some(&skip)] {
            let norm = opt.clip_grad_norm(0.1, None).unwrap();
            opt.step(1e-3, found_inf).unwrap();
            assert_eq!(norm.size(), Vec::<i64>::new());
        }
        let counts = count.finish();
        assert_eq!(counts.syncs(), 0, "{counts:?}");
        // The CPU kernel's own reads of the counter (one per tensor, in the update taken;
        // the skipped one returns before reading).
        assert_eq!(counts.in_fused_optimizer, 2, "{counts:?}");
    }

    /// Checkpoints written before the fused step (the counter an int64 scalar on the CPU) load,
    /// and the update goes on from them as the per-parameter loop would; what is saved now has
    /// the same names, types and shapes.
    #[test]
    fn loads_the_state_written_before_the_fused_step() {
        let (w, b, mut opt) = two_params(4);
        let (w2, b2, mut reference) = two_params(4);
        let mut old: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, shape) in [("w", vec![3, 4]), ("b", vec![4])] {
            let m = values(&shape, 5) * 0.1;
            let v = values(&shape, 6).square() * 0.01;
            old.insert(format!("exp_avg.{name}"), m);
            old.insert(format!("exp_avg_sq.{name}"), v);
        }
        old.insert("step".into(), Tensor::from(7i64));
        opt.load_state_tensors(&old).unwrap();
        reference.load_state_tensors(&old).unwrap();
        assert_eq!(opt.steps_taken(), 7);
        for (key, t) in opt.state_tensors() {
            let o = &old[&key];
            assert_eq!((t.kind(), t.size()), (o.kind(), o.size()), "{key}");
            assert!(t.equal(o), "{key}");
        }
        set_grads(&w, &b, 6);
        set_grads(&w2, &b2, 6);
        opt.step(1e-2, None).unwrap();
        reference.step_per_parameter(1e-2);
        assert_eq!(opt.steps_taken(), 8);
        for (a, z) in [(&w, &w2), (&b, &b2)] {
            let diff = largest_difference(a, z);
            assert!(diff <= 1e-7, "{diff}");
        }
        let bad: BTreeMap<String, Tensor> =
            [("step".to_string(), Tensor::from_slice(&[1i64, 2]))].into();
        let err = opt.load_state_tensors(&bad).unwrap_err().to_string();
        assert!(err.contains("`step` must be one non-negative integer"), "{err}");
    }

    /// pure_bf16: parameters, gradients and moments all bf16. The kernel computes in fp32 and
    /// rounds once, so it ends within bf16's rounding of the fp32 update of the same values.
    #[test]
    fn bf16_parameters_gradients_and_moments() {
        let (w, b, mut fp32) = two_params(7);
        let w16 = w.detach().to_kind(Kind::BFloat16).set_requires_grad(true);
        let b16 = b.detach().to_kind(Kind::BFloat16).set_requires_grad(true);
        tch::no_grad(|| {
            w.shallow_clone().copy_(&w16);
            b.shallow_clone().copy_(&b16);
        });
        let mut bf16 = AdamW::new(
            [("w".to_string(), w16.shallow_clone()), ("b".to_string(), b16.shallow_clone())].into(),
            fp32.config,
        );
        for s in 0..3 {
            set_grads(&w, &b, 30 + s);
            (&w16 * w.grad().to_kind(Kind::BFloat16)).sum(Kind::Float).backward();
            (&b16 * b.grad().to_kind(Kind::BFloat16)).sum(Kind::Float).backward();
            tch::no_grad(|| {
                w.grad().copy_(&w16.grad());
                b.grad().copy_(&b16.grad());
            });
            fp32.step(1e-2, None).unwrap();
            bf16.step(1e-2, None).unwrap();
            bf16.zero_grad();
        }
        for (_, t) in bf16.state_tensors().iter().filter(|(k, _)| k != "step") {
            assert_eq!(t.kind(), Kind::BFloat16);
        }
        for (lo, hi) in [(&w16, &w), (&b16, &b)] {
            assert_eq!(lo.kind(), Kind::BFloat16);
            let diff = largest_difference(&lo.to_kind(Kind::Float), hi);
            let scale = hi.abs().max().double_value(&[]);
            assert!(diff <= 3.0 * scale / 256.0, "{diff} of {scale}");
        }
    }

    /// Pieces of `w` (12 elements) at `cuts`: what rank r of a sharded run would hold.
    fn pieces(w: &Tensor, cuts: &[(i64, i64)]) -> Vec<AdamW> {
        cuts.iter()
            .map(|&(start, len)| {
                let view = w.detach().view([-1]).narrow(0, start, len);
                AdamW::over_pieces(
                    vec![PieceOf {
                        name: "w".into(),
                        shape: vec![3, 4],
                        start,
                        view,
                        decays: true,
                    }],
                    AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.1 },
                )
            })
            .collect()
    }

    /// A state saved whole loads into pieces, pieces of one cut load into pieces of another and
    /// into a whole optimizer: the moments land element for element; a gap is an error.
    #[test]
    fn state_moves_between_whole_parameters_and_pieces_of_any_cut() {
        let (w, b, mut whole) = two_params(8);
        set_grads(&w, &b, 9);
        whole.step(1e-2, None).unwrap();
        let saved: BTreeMap<String, Tensor> =
            whole.state_tensors().into_iter().filter(|(k, _)| !k.ends_with(".b")).collect();
        let m = saved["exp_avg.w"].view([-1]);
        // Whole -> 3 pieces (a cut of 3 ranks: 4 elements each).
        let mut three = pieces(&w, &[(0, 4), (4, 4), (8, 4)]);
        for (r, opt) in three.iter_mut().enumerate() {
            opt.load_state_tensors(&saved).unwrap();
            let (_, piece) = opt.state_tensors().into_iter().next().unwrap();
            assert!(piece.equal(&m.narrow(0, 4 * r as i64, 4)), "rank {r}");
            assert_eq!(opt.steps_taken(), 1);
        }
        // 3 pieces -> 2 pieces (6 elements each), each taking from every file.
        let parts: Vec<BTreeMap<String, Tensor>> =
            three.iter().map(|o| o.state_tensors().into_iter().collect()).collect();
        for (r, mut opt) in pieces(&w, &[(0, 6), (6, 6)]).into_iter().enumerate() {
            let mut loading = opt.start_loading();
            for part in &parts {
                loading.take(&mut opt, part).unwrap();
            }
            loading.finish(&mut opt).unwrap();
            let (_, piece) = opt.state_tensors().into_iter().next().unwrap();
            assert!(piece.equal(&m.narrow(0, 6 * r as i64, 6)), "rank {r} of 2");
        }
        // 3 pieces -> whole.
        let mut back = AdamW::new(
            [("w".to_string(), w.shallow_clone())].into(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.1 },
        );
        let mut loading = back.start_loading();
        for part in &parts {
            loading.take(&mut back, part).unwrap();
        }
        loading.finish(&mut back).unwrap();
        let state: BTreeMap<String, Tensor> = back.state_tensors().into_iter().collect();
        assert!(state["exp_avg.w"].equal(&saved["exp_avg.w"]));
        assert!(state["exp_avg_sq.w"].equal(&saved["exp_avg_sq.w"]));
        // Two of the three parts leave a gap.
        let mut loading = back.start_loading();
        for part in &parts[..2] {
            loading.take(&mut back, part).unwrap();
        }
        let err = loading.finish(&mut back).unwrap_err().to_string();
        assert!(err.contains("covers 8 of the 12 elements of `w`"), "{err}");
    }
}
