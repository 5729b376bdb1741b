//! Step 6, the gradient reduction, overlapped with the backward pass as PyTorch DDP does it.
//!
//! Every rank's loss is a part of the global mean, so summing the parameter gradients over
//! ranks gives the full-batch gradient. Summed only after the whole backward pass, the
//! reduction adds its full time to every step; across nodes that is a third of a ViT-B-32 step
//! (docs/scaling.md). Here the parameters are cut into buckets of `dist.bucket_mb` in reverse
//! registration order (the order the backward pass roughly produces their gradients; a
//! parameter larger than a bucket is a bucket of its own), and a hook that libtorch runs right
//! after a parameter's gradient is accumulated (csrc/grad_hooks.cpp) counts the bucket down.
//! When the bucket is complete it is flattened and handed to a communication thread that sums
//! it over ranks while the backward pass goes on. Buckets are launched strictly in index order
//! (bucket i waits until 0..i are launched), so every rank issues the same collectives in the
//! same order whatever order its hooks fire in. Gradients the backward pass did not produce
//! (a parameter outside the graph) are reduced after it returns, as before: a bucket holds the
//! gradients that are defined by then. The step then waits for the tail and copies the sums
//! back into the `.grad`s; that wait is the exposed communication time, `train/comm_time`.
//!
//! The arithmetic is the collective's: each bucket is summed element by element, so cutting the
//! gradients into other buckets, or launching them earlier, changes no bit (the `cpu` backend
//! sums in rank order; NCCL's ring order depends on the world, not on the buckets).
//!
//! `dist.grad_reduce_dtype: bf16` is DDP's `bf16_compress_hook`: each bucket is cast to bf16,
//! summed over ranks, and cast back to fp32, half the bytes for a bf16 rounding of the sum.
//!
//! Overlap needs a group that a second thread may use ([`Collectives::as_sync`]); with one that
//! cannot (NCCL today), or `dist.overlap: false`, every bucket is reduced after the backward pass.

use std::ffi::c_void;
use std::ops::Range;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::collectives::Collectives;
pub use crate::collectives::{ReduceConfig, ReduceDtype};
use crate::error::{Result, TrainError};

/// What one reduction did, for the log and the tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reduced {
    /// Seconds the step waited for the reduction after the backward pass returned.
    pub exposed_secs: f64,
    /// Buckets reduced (empty ones are skipped).
    pub buckets: usize,
    /// Of those, launched while the backward pass was running.
    pub launched_in_backward: usize,
}

/// The bucket layout over a model's trainable parameters, fixed when the run starts.
pub struct GradSync {
    /// Trainable parameters in reverse registration order.
    params: Vec<Tensor>,
    /// Each bucket's range of `params`.
    buckets: Vec<Range<usize>>,
    cfg: ReduceConfig,
}

impl GradSync {
    /// `params`: the trainable tensors in the order the model registered them (as
    /// `VarStore::trainable_variables` lists them); those that need no gradient are left out,
    /// as the optimizer leaves them out.
    pub fn new(params: Vec<Tensor>, cfg: ReduceConfig) -> Result<Self> {
        cfg.validate()?;
        let params: Vec<Tensor> = params.into_iter().rev().filter(Tensor::requires_grad).collect();
        let cap = (cfg.bucket_mb * 1e6 / 4.0).max(1.0) as i64;
        let mut buckets = Vec::new();
        let mut start = 0;
        while start < params.len() {
            let (mut end, mut elements) = (start, 0);
            while end < params.len() && (end == start || elements + params[end].numel() as i64 <= cap) {
                elements += params[end].numel() as i64;
                end += 1;
            }
            buckets.push(start..end);
            start = end;
        }
        Ok(Self { params, buckets, cfg })
    }

    /// The layout over `vs`'s trainable variables, in their registration order.
    pub fn for_var_store(vs: &tch::nn::VarStore, cfg: ReduceConfig) -> Result<Self> {
        Self::new(vs.trainable_variables(), cfg)
    }

    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Runs `backward` (the last, or only, backward pass of the step) and sums every
    /// parameter's gradient over ranks, overlapped with `backward` when configured and
    /// possible.
    pub fn reduce(&self, comm: &dyn Collectives, backward: impl FnOnce()) -> Result<Reduced> {
        if comm.world_size() == 1 {
            backward();
            return Ok(Reduced::default());
        }
        match comm.as_sync().filter(|_| self.cfg.overlap) {
            Some(comm) => self.reduce_overlapped(comm, backward),
            None => {
                backward();
                let started = Instant::now();
                let mut reduced = Reduced::default();
                for b in 0..self.buckets.len() {
                    if let Some(mut flat) = self.flatten(b)? {
                        comm.all_reduce_sum(&mut flat)?;
                        self.unflatten(b, &flat)?;
                        reduced.buckets += 1;
                    }
                }
                reduced.exposed_secs = started.elapsed().as_secs_f64();
                Ok(reduced)
            }
        }
    }

    fn reduce_overlapped(&self, comm: &(dyn Collectives + Sync), backward: impl FnOnce()) -> Result<Reduced> {
        let (tx, rx) = mpsc::channel::<(usize, Tensor)>();
        let mut bucket_of = vec![0; self.params.len()];
        for (b, range) in self.buckets.iter().enumerate() {
            bucket_of[range.clone()].fill(b);
        }
        std::thread::scope(|scope| {
            let communicator = scope.spawn(move || -> Result<Vec<(usize, Tensor)>> {
                let mut done = Vec::new();
                for (b, mut flat) in rx {
                    comm.all_reduce_sum(&mut flat)?;
                    done.push((b, flat));
                }
                Ok(done)
            });
            // Inside the scope: should `backward` panic, the sender goes with it and the
            // communication thread ends instead of keeping the scope waiting.
            let ctx = HookCtx {
                sync: self,
                state: Mutex::new(Launcher {
                    waiting: self.buckets.iter().map(|r| r.len()).collect(),
                    fired: vec![false; self.params.len()],
                    bucket_of,
                    next: 0,
                    tx: Some(tx),
                    launched: 0,
                    error: None,
                }),
            };
            // Not armed (a parameter libtorch refuses): the backward pass still runs and every
            // bucket goes after it, so the ranks stay in step; the error is reported below.
            let hooks = Hooks::arm(&self.params, &ctx);
            backward();
            let armed = hooks.map(drop);
            let launched_in_backward = {
                let mut state = ctx.lock();
                let launched = state.launched;
                // What the backward pass left: the buckets not yet complete, in order.
                while state.next < self.buckets.len() {
                    state.launch_next(self);
                }
                state.tx = None; // ends the communication thread's loop
                launched
            };
            let started = Instant::now();
            let done = communicator.join().map_err(|_| TrainError::Dist("the gradient communication thread panicked".into()))?;
            armed?;
            if let Some(e) = ctx.lock().error.take() {
                return Err(e);
            }
            let done = done?;
            for (b, flat) in &done {
                self.unflatten(*b, flat)?;
            }
            Ok(Reduced { exposed_secs: started.elapsed().as_secs_f64(), buckets: done.len(), launched_in_backward })
        })
    }

    /// Bucket `b`'s defined gradients as one flat tensor of the reduction's dtype; `None` when
    /// none is defined.
    fn flatten(&self, b: usize) -> Result<Option<Tensor>> {
        let mut parts = Vec::new();
        for p in &self.params[self.buckets[b].clone()] {
            let g = p.grad();
            if g.defined() {
                parts.push(g.f_to_kind(Kind::Float)?.f_flatten(0, -1)?);
            }
        }
        if parts.is_empty() {
            return Ok(None);
        }
        let flat = Tensor::f_cat(&parts, 0)?;
        Ok(Some(match self.cfg.dtype {
            ReduceDtype::Fp32 => flat,
            ReduceDtype::Bf16 => flat.f_to_kind(Kind::BFloat16)?,
        }))
    }

    /// Copies the summed `flat` back into bucket `b`'s defined gradients.
    fn unflatten(&self, b: usize, flat: &Tensor) -> Result<()> {
        let mut offset = 0;
        for p in &self.params[self.buckets[b].clone()] {
            let mut g = p.grad();
            if g.defined() {
                let n = g.numel() as i64;
                g.f_copy_(&flat.f_narrow(0, offset, n)?.f_view_as(&g)?)?;
                offset += n;
            }
        }
        Ok(())
    }
}

/// The buckets' countdown, shared with the hooks (which run on autograd's thread for the
/// device: the caller's on CPU, a device thread on CUDA).
struct Launcher {
    /// Per bucket, its parameters whose gradients are not ready yet.
    waiting: Vec<usize>,
    /// Per parameter, whether its hook ran (a parameter reached twice counts once).
    fired: Vec<bool>,
    bucket_of: Vec<usize>,
    /// The next bucket to launch; all before it are launched.
    next: usize,
    tx: Option<mpsc::Sender<(usize, Tensor)>>,
    /// Buckets launched so far.
    launched: usize,
    /// The first error of a flatten in a hook, reported after the backward pass.
    error: Option<TrainError>,
}

impl Launcher {
    fn launch_next(&mut self, sync: &GradSync) {
        let b = self.next;
        self.next += 1;
        match sync.flatten(b) {
            Ok(Some(flat)) => {
                // A closed channel: the communication thread failed; join reports why.
                if let Some(tx) = &self.tx {
                    let _ = tx.send((b, flat));
                }
                self.launched += 1;
            }
            Ok(None) => {}
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    fn grad_ready(&mut self, sync: &GradSync, index: usize) {
        if index >= self.fired.len() || std::mem::replace(&mut self.fired[index], true) {
            return;
        }
        let b = self.bucket_of[index];
        self.waiting[b] -= 1;
        while self.next < self.waiting.len() && self.waiting[self.next] == 0 {
            self.launch_next(sync);
        }
    }
}

/// What a hook reaches through its context pointer. The hooks read `sync`'s parameters while
/// the thread that owns them is inside `backward`, so nothing reads them concurrently.
struct HookCtx<'a> {
    sync: &'a GradSync,
    state: Mutex<Launcher>,
}

impl HookCtx<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Launcher> {
        // A poisoned lock means a hook panicked mid-update; its state is still the best we have.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

extern "C" {
    fn oxclip_set_grad_ready_hook(param: *mut c_void, f: extern "C" fn(*mut c_void, usize), ctx: *mut c_void, index: usize) -> i32;
    fn oxclip_clear_grad_ready_hook(param: *mut c_void);
}

extern "C" fn grad_ready(ctx: *mut c_void, index: usize) {
    // SAFETY: `ctx` is the `HookCtx` `Hooks::arm` was given; the hooks are removed before it
    // is dropped. A panic must not unwind into libtorch's C++ frames.
    let ctx = unsafe { &*(ctx as *const HookCtx) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.lock().grad_ready(ctx.sync, index)));
}

/// The hooks installed on every parameter, removed when dropped (also when the backward pass
/// panics), so none outlives the reduction that owns its context.
struct Hooks<'a> {
    params: &'a [Tensor],
}

impl<'a> Hooks<'a> {
    fn arm(params: &'a [Tensor], ctx: &HookCtx) -> Result<Self> {
        let mut hooks = Hooks { params: &params[..0] };
        for (i, p) in params.iter().enumerate() {
            // SAFETY: `p.as_ptr()` is a live `torch::Tensor*`; `ctx` outlives the hooks (see
            // `grad_ready`).
            let refused = unsafe { oxclip_set_grad_ready_hook(p.as_ptr() as *mut c_void, grad_ready, ctx as *const HookCtx as *mut c_void, i) };
            if refused != 0 {
                return Err(TrainError::Dist(format!("libtorch refused a gradient hook on trainable parameter #{i} of shape {:?}", p.size())));
            }
            hooks.params = &params[..=i];
        }
        Ok(hooks)
    }
}

impl Drop for Hooks<'_> {
    fn drop(&mut self) {
        for p in self.params {
            // SAFETY: as in `arm`.
            unsafe { oxclip_clear_grad_ready_hook(p.as_ptr() as *mut c_void) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_reverse_registration_order_and_a_large_parameter_is_its_own() {
        let p = |n: i64| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let frozen = Tensor::zeros([5], (Kind::Float, tch::Device::Cpu));
        // 0.0001 MB = 25 floats.
        let cfg = ReduceConfig { bucket_mb: 1e-4, ..ReduceConfig::default() };
        let sync = GradSync::new(vec![p(10), p(10), frozen, p(40), p(5), p(20)], cfg).unwrap();
        let sizes: Vec<Vec<i64>> = sync.buckets.iter().map(|r| sync.params[r.clone()].iter().map(|t| t.numel() as i64).collect()).collect();
        assert_eq!(sizes, vec![vec![20, 5], vec![40], vec![10, 10]]);
        let err = GradSync::new(Vec::new(), ReduceConfig { bucket_mb: 0.0, ..cfg }).err().unwrap().to_string();
        assert!(err.contains("dist.bucket_mb"), "{err}");
    }

    #[test]
    fn hooks_fire_during_backward_in_bucket_order_and_are_removed() {
        let p = |n: i64| Tensor::ones([n], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let params = vec![p(3), p(3), p(3)];
        let sync = GradSync::new(params.iter().map(Tensor::shallow_clone).collect(), ReduceConfig { bucket_mb: 1e-6, ..ReduceConfig::default() }).unwrap();
        assert_eq!(sync.bucket_count(), 3);
        let (tx, rx) = mpsc::channel();
        let ctx = HookCtx {
            sync: &sync,
            state: Mutex::new(Launcher { waiting: vec![1; 3], fired: vec![false; 3], bucket_of: vec![0, 1, 2], next: 0, tx: Some(tx), launched: 0, error: None }),
        };
        {
            let _hooks = Hooks::arm(&sync.params, &ctx).unwrap();
            // The last-registered parameter is bucket 0; its gradient alone launches it.
            (&params[2] * 2.0).sum(Kind::Float).backward();
            assert_eq!(ctx.lock().launched, 1);
            let (b, flat) = rx.try_recv().unwrap();
            assert_eq!((b, Vec::<f32>::try_from(&flat).unwrap()), (0, vec![2.0; 3]));
            // The first-registered parameter (bucket 2) waits for bucket 1.
            (&params[0] * 3.0).sum(Kind::Float).backward();
            assert_eq!(ctx.lock().launched, 1);
            (&params[1] * 4.0).sum(Kind::Float).backward();
            assert_eq!(ctx.lock().launched, 3);
            let order: Vec<usize> = rx.try_iter().map(|(b, _)| b).collect();
            assert_eq!(order, vec![1, 2]);
        }
        // Removed: another backward launches nothing.
        {
            let mut state = ctx.lock();
            state.fired = vec![false; 3];
            state.waiting = vec![1; 3];
            state.next = 0;
        }
        (&params[2] * 4.0).sum(Kind::Float).backward();
        assert_eq!(ctx.lock().launched, 3);
    }

    /// A model of 8 layers whose backward pass takes [`LAYER_SECS`] per layer, the time
    /// slept rather than computed, so that 4 ranks sharing a small machine keep pace: each
    /// layer's weight (256 KiB, a bucket of its own) gets its gradient after its layer's time,
    /// the last layer's first, as a real backward pass produces them.
    const LAYERS: usize = 8;
    const LAYER_SECS: f64 = 0.03;
    const STEPS: usize = 5;

    fn chain_weights() -> Vec<Tensor> {
        (0..LAYERS)
            .map(|l| ((Tensor::arange(256 * 256, (Kind::Float, tch::Device::Cpu)) * (0.37 + l as f64)).sin() * 0.5).view([256, 256]).set_requires_grad(true))
            .collect()
    }

    fn chain_backward(weights: &[Tensor], rank: usize) {
        for (l, w) in weights.iter().enumerate().rev() {
            std::thread::sleep(std::time::Duration::from_secs_f64(LAYER_SECS));
            let x = (Tensor::arange(256 * 256, (Kind::Float, tch::Device::Cpu)) * (1.3 + (rank + l) as f64)).cos().view([256, 256]);
            (w.tanh() * x).sum(Kind::Float).backward();
        }
    }

    /// Runs `f(rank, group)` on 4 ranks in threads.
    fn on_four_ranks<T: Send + 'static>(gbps: Option<f64>, f: impl Fn(usize, &crate::collectives::tcp::TcpGroup) -> T + Send + Sync + Copy + 'static) -> Vec<T> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let handles: Vec<_> = (0..4)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world = crate::collectives::WorldEnv { rank, world_size: 4, local_rank: rank, local_world_size: 4, master_addr: "127.0.0.1".into(), master_port: port };
                    let comm = crate::collectives::tcp::TcpGroup::connect(&world, std::time::Duration::from_secs(60)).unwrap().with_sim_link(gbps);
                    f(rank, &comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// [`STEPS`] SGD steps of the chain on 4 ranks: per rank, each step's exposed communication
    /// time, the buckets launched during backward, and the final weights.
    fn train_chain(overlap: bool, gbps: f64) -> Vec<(Vec<f64>, usize, Vec<Vec<f32>>)> {
        on_four_ranks(Some(gbps), move |rank, comm| {
            let weights = chain_weights();
            let sync = GradSync::new(weights.iter().map(Tensor::shallow_clone).collect(), ReduceConfig { overlap, bucket_mb: 0.25, dtype: ReduceDtype::Fp32 }).unwrap();
            assert_eq!(sync.bucket_count(), LAYERS);
            let (mut exposed, mut launched) = (Vec::new(), 0);
            for _ in 0..STEPS {
                let reduced = sync.reduce(comm, || chain_backward(&weights, rank)).unwrap();
                exposed.push(reduced.exposed_secs);
                launched += reduced.launched_in_backward;
                tch::no_grad(|| {
                    for w in &weights {
                        let mut g = w.grad();
                        let _ = w.shallow_clone().g_sub_(&(&g * 0.1));
                        let _ = g.zero_();
                    }
                });
            }
            (exposed, launched, weights.iter().map(|w| Vec::<f32>::try_from(w.detach().flatten(0, -1)).unwrap()).collect())
        })
    }

    /// The scaling model's check (docs/scaling.md): on a simulated link on which each
    /// bucket's all-reduce takes half a layer's backward time, the overlap hides all but the
    /// last bucket, so the step waits at most half as long after the backward pass (about an
    /// eighth, in theory); and the weights are the same, bit for bit.
    #[test]
    fn the_overlap_hides_a_simulated_link() {
        // A ring all-reduce sends 2 (W - 1) / W of the bytes: 1.5 x 256 KiB per bucket.
        let gbps = 1.5 * (256 * 256 * 4) as f64 / (0.5 * LAYER_SECS) / 1e9;
        let after = train_chain(false, gbps);
        let overlapped = train_chain(true, gbps);
        // A rank whose backward pass ends early (4 ranks share a small machine here) also
        // waits for the others'; the last one waits for the reduction alone: per step, the
        // smallest wait over the ranks; the median over the steps.
        let exposed = |runs: &[(Vec<f64>, usize, Vec<Vec<f32>>)]| {
            let mut waits: Vec<f64> = (0..STEPS).map(|s| runs.iter().map(|r| r.0[s]).fold(f64::MAX, f64::min)).collect();
            waits.sort_by(f64::total_cmp);
            waits[STEPS / 2]
        };
        let (without, with) = (exposed(&after), exposed(&overlapped));
        eprintln!("link {gbps:.4} GB/s: exposed communication per step {:.1} ms after backward, {:.1} ms overlapped", without * 1e3, with * 1e3);
        assert!(with <= 0.5 * without, "exposed communication per step: {with} s overlapped vs {without} s after backward");
        for (rank, ((_, launched, weights), (_, _, reference))) in overlapped.iter().zip(&after).enumerate() {
            assert!(*launched > 0, "rank {rank}: no bucket launched during backward");
            assert_eq!(weights, reference, "rank {rank}: final weights");
            assert_eq!(weights, &overlapped[0].2, "rank {rank}");
        }
    }
}
