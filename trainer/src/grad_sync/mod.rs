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
//! same order whatever order its hooks fire in ([`launch`]). A bucket whose gradients never
//! arrive (parameters outside this rank's graph) is launched when the backward pass returns,
//! its missing gradients summed as zeros, as DDP does; a failure in a hook stops all launching,
//! and the step fails (and tells the other ranks why) instead of pairing its buckets with the
//! wrong ones. The step then waits for the tail and copies the sums back into the `.grad`s;
//! that wait is the exposed communication time, `train/comm_time`. Buckets whose sums were
//! started live in an [`in_flight::InFlight`] until then, which on any error or panic lets
//! each go only once its collective can no longer write it.
//!
//! Each bucket carries one flag per parameter, 1 where this rank has the gradient: summed with
//! the gradients, it says which parameters some rank has a gradient for. Those every rank then
//! holds (a rank without one takes the sum), and the others no rank does, so every rank's
//! optimizer updates the same parameters (DDP's unused-parameter map).
//!
//! The arithmetic is the collective's: each bucket is summed element by element, so cutting the
//! gradients into other buckets, or launching them earlier, changes no bit (the `cpu` backend
//! sums in rank order; NCCL's ring order depends on the world, not on the buckets).
//!
//! `dist.grad_reduce_dtype: bf16` is DDP's `bf16_compress_hook`: each bucket is cast to bf16,
//! summed over ranks, and cast back to fp32, half the bytes for a bf16 rounding of the sum.
//!
//! A parameter listed twice (tied weights) is reduced once.
//!
//! `dist.shard` (ZeRO-1/2, [`shard`]) splits every bucket over the ranks: each rank owns one
//! chunk of each, and its optimizer updates only that. Under `gradients` a bucket is
//! reduce-scattered instead of all-reduced (each rank receives its chunk of the sum: half the
//! bytes on the wire of a ring all-reduce), and its gradients are freed as soon as it is
//! flattened; under `optimizer` it is all-reduced as without sharding. Either way the step
//! ends with [`GradSync::gather`], which all-gathers the updated chunks into every rank's
//! parameters.
//!
//! Overlap needs a group that a second thread may use ([`Collectives::as_sync`]); with one that
//! cannot, or `dist.overlap: false`, every bucket is reduced after the backward pass.
//!
//! When the backend launches and how it orders its device work are the backend's: the hook
//! marks the point the bucket's flatten has reached ([`Collectives::ready_mark`]), the
//! communication thread starts the sum after it ([`Collectives::all_reduce_start`]), and the
//! step orders its copy back after each sum ([`Collectives::wait_for`]). On the `cpu` backend
//! the sum blocks the communication thread and the marks are empty; under NCCL the sum is
//! queued on a communication stream and the marks are CUDA events, so "waits for the tail"
//! means the host queues the waits and the GPU does them.

mod hooks;
mod in_flight;
pub mod launch;
mod shard;

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::collectives::{Collectives, Mark};
use crate::config::{DistConfig, ReduceDtype, Shard};
use crate::error::{Result, TrainError};
use crate::fault::{self, Fault};
use crate::optim::{self, AdamW, AdamWConfig, PieceOf};
use in_flight::InFlight;
use launch::{Countdown, Sink};
pub use shard::Piece;
use shard::Split;

/// What one reduction did, for the log and the tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reduced {
    /// Seconds the step waited for the reduction after the backward pass returned.
    pub exposed_secs: f64,
    /// Buckets reduced.
    pub buckets: usize,
    /// Of those, launched while the backward pass was running.
    pub launched_in_backward: usize,
}

/// The bucket layout over a model's trainable parameters, fixed when the run starts.
pub struct GradSync {
    /// Trainable parameters in reverse registration order, each once.
    params: Vec<Tensor>,
    /// Each bucket's range of `params`.
    buckets: Vec<Range<usize>>,
    /// `dist.overlap`: reduce buckets during the backward pass.
    overlap: bool,
    /// `dist.grad_reduce_dtype`.
    dtype: ReduceDtype,
    /// Reductions so far, for the faults a test build injects (crate::fault).
    reductions: AtomicU64,
    /// `dist.shard`.
    shard: Shard,
    /// Under `dist.shard`, this rank's share of each bucket, once [`GradSync::split`] ran.
    split: Option<Split>,
    /// Per bucket, whether this rank had every gradient of it when it was flattened: under
    /// `dist.shard: gradients` they are freed there, so the copy back cannot look.
    complete: Vec<AtomicBool>,
}

impl GradSync {
    /// `params`: the trainable tensors in the order the model registered them (as
    /// `VarStore::trainable_variables` lists them); those that need no gradient are left out,
    /// as the optimizer leaves them out, and one listed twice (tied) is kept once.
    /// Buckets hold `dist.bucket_mb` of fp32 gradients.
    pub fn new(params: Vec<Tensor>, dist: &DistConfig) -> Result<Self> {
        dist.validate()?;
        let mut seen = HashSet::new();
        let params: Vec<Tensor> = params
            .into_iter()
            .rev()
            .filter(Tensor::requires_grad)
            .filter(|p| p.numel() == 0 || seen.insert(p.data_ptr() as usize))
            .collect();
        let cap = (dist.bucket_mb * 1e6 / 4.0).max(1.0) as i64;
        let mut buckets = Vec::new();
        let mut start = 0;
        while start < params.len() {
            let (mut end, mut elements) = (start, 0);
            while end < params.len()
                && (end == start || elements + params[end].numel() as i64 <= cap)
            {
                elements += params[end].numel() as i64;
                end += 1;
            }
            buckets.push(start..end);
            start = end;
        }
        Ok(Self {
            params,
            complete: buckets.iter().map(|_| AtomicBool::new(false)).collect(),
            buckets,
            overlap: dist.overlap,
            dtype: dist.grad_reduce_dtype,
            reductions: AtomicU64::new(0),
            shard: dist.shard,
            split: None,
        })
    }

    /// Under `dist.shard`, gives rank `rank` of `world` its chunk of every bucket (nothing
    /// otherwise). Must run before the first [`GradSync::reduce`].
    pub fn split(&mut self, rank: usize, world: usize) -> Result<()> {
        if self.shard != Shard::None {
            self.split = Some(Split::new(&self.params, &self.buckets, rank, world)?);
        }
        Ok(())
    }

    /// Under `dist.shard`, the parameter elements this rank owns and updates, bucket after
    /// bucket; empty otherwise.
    pub fn pieces(&self) -> &[Piece] {
        self.split.as_ref().map_or(&[], |s| s.pieces.as_slice())
    }

    /// The AdamW a run gets: over every trainable variable of `vs`, or under `dist.shard`
    /// over this rank's pieces of them, named, with open_clip's decay rule applied to their
    /// whole parameters.
    pub fn adamw(&self, vs: &tch::nn::VarStore, config: AdamWConfig) -> Result<AdamW> {
        let Some(split) = &self.split else {
            return Ok(AdamW::new(vs.variables().into_iter().collect(), config));
        };
        let names: std::collections::HashMap<usize, String> =
            vs.variables().into_iter().map(|(name, t)| (t.data_ptr() as usize, name)).collect();
        let pieces = split
            .pieces
            .iter()
            .map(|piece| {
                let param = &self.params[piece.param];
                let name = names.get(&(param.data_ptr() as usize)).ok_or_else(|| {
                    TrainError::Config(format!(
                        "a trainable parameter of shape {:?} has no name in the model",
                        param.size()
                    ))
                })?;
                Ok(PieceOf {
                    decays: optim::decays(name, param),
                    name: name.clone(),
                    shape: param.size(),
                    start: piece.start,
                    view: piece.view.shallow_clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW::over_pieces(pieces, config))
    }

    /// Whether this rank holds only its share of the gradients and optimizer (`dist.shard`).
    pub fn is_sharded(&self) -> bool {
        self.split.is_some()
    }

    /// The trainable parameters, in the reducer's order (a [`Piece`]'s `param` indexes it).
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Sums a value each rank computed over its own pieces (a squared gradient norm, the amp
    /// scaler's inf flag) over ranks, in place; with every gradient on every rank (no
    /// `dist.shard`) each rank's value is already the whole one, and nothing is done.
    pub fn sum_over_shards(&self, comm: &dyn Collectives, value: &mut Tensor) -> Result<()> {
        match self.split {
            Some(_) => comm.all_reduce_sum(value),
            None => Ok(()),
        }
    }

    /// Under `dist.shard`, after the optimizer updated this rank's pieces: every rank's
    /// updated pieces into every rank's parameters, and the step's gradients freed (the next
    /// backward pass starts from none). Nothing otherwise.
    pub fn gather(&self, comm: &dyn Collectives) -> Result<()> {
        let Some(split) = &self.split else { return Ok(()) };
        split.gather(comm, &self.params, &self.buckets)?;
        for t in self.params.iter().chain(split.pieces.iter().map(|p| &p.view)) {
            hooks::set_grad(t, None)?;
        }
        Ok(())
    }

    /// The layout over `vs`'s trainable variables, in their registration order.
    pub fn for_var_store(vs: &tch::nn::VarStore, dist: &DistConfig) -> Result<Self> {
        Self::new(vs.trainable_variables(), dist)
    }

    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Runs `backward` (the last, or only, backward pass of the step) and sums every
    /// parameter's gradient over ranks, overlapped with `backward` when configured and
    /// possible.
    pub fn reduce(&self, comm: &dyn Collectives, backward: impl FnOnce()) -> Result<Reduced> {
        if self.shard != Shard::None && self.split.is_none() {
            return Err(TrainError::Dist(format!(
                "dist.shard: {} needs GradSync::split before the first reduction",
                self.shard.name()
            )));
        }
        if comm.world_size() == 1 {
            backward();
            return Ok(Reduced::default());
        }
        let reduction = self.reductions.fetch_add(1, Ordering::Relaxed) + 1;
        match comm.as_sync().filter(|_| self.overlap) {
            Some(comm) => self.reduce_overlapped(comm, reduction, backward),
            None => {
                backward();
                let started = Instant::now();
                for b in 0..self.buckets.len() {
                    let mut flat = self.flatten(b)?;
                    if self.scatters() {
                        comm.wait_for(&comm.reduce_scatter_start(&mut flat, Mark::none())?)?;
                    } else {
                        comm.all_reduce_sum(&mut flat)?;
                    }
                    self.unflatten(b, &flat)?;
                }
                Ok(Reduced {
                    exposed_secs: started.elapsed().as_secs_f64(),
                    buckets: self.buckets.len(),
                    launched_in_backward: 0,
                })
            }
        }
    }

    fn reduce_overlapped(
        &self,
        comm: &(dyn Collectives + Sync),
        reduction: u64,
        backward: impl FnOnce(),
    ) -> Result<Reduced> {
        let (tx, rx) = mpsc::channel::<Flat>();
        let scatters = self.scatters();
        std::thread::scope(|scope| {
            // Starts each bucket's sum as it comes; a bucket whose start failed may already be
            // queued on the device, so it is retired, not dropped.
            let communicator = scope.spawn(move || {
                let mut in_flight = InFlight::new(comm);
                for Flat { bucket, mut flat, ready } in rx {
                    // Every rank's list of these lines is the same, up to where one stopped
                    // (launch/tests/faults.rs compares them).
                    tracing::trace!(
                        "rank {}: reduction {reduction}: bucket {bucket} of {} values",
                        comm.rank(),
                        flat.numel()
                    );
                    let started = match fault::in_bucket(comm.rank(), reduction, bucket) {
                        Some(Fault::CollectiveFails) => Err(TrainError::Dist(format!(
                            "rank {}: the all-reduce of gradient bucket {bucket} failed to start \
                             (injected fault)",
                            comm.rank()
                        ))),
                        _ if scatters => comm.reduce_scatter_start(&mut flat, ready),
                        _ => comm.all_reduce_start(&mut flat, ready),
                    };
                    match started {
                        Ok(done) => in_flight.push(bucket, flat, done),
                        Err(e) => {
                            comm.retire(Mark::none(), flat);
                            return (in_flight, Err(e));
                        }
                    }
                }
                (in_flight, Ok(()))
            });
            // Inside the scope: should `backward` panic, the context and its sender go with it
            // and the communication thread ends instead of keeping the scope waiting; what it
            // started is retired as its `InFlight` is dropped.
            let sizes: Vec<usize> = self.buckets.iter().map(|r| r.len()).collect();
            let ctx = HookCtx {
                countdown: Mutex::new(Countdown::new(
                    &sizes,
                    Launcher { sync: ForBackward(self), comm, tx, reduction },
                )),
                rank: comm.rank(),
            };
            let armed = hooks::during(&self.params, &ctx, backward);
            let (launched, finished) = {
                let mut countdown = ctx.lock();
                let finished = countdown.finish();
                (countdown.launched_in_backward(), finished)
            };
            let started = Instant::now();
            let (in_flight, communicated) = communicator.join().map_err(|_| {
                TrainError::Dist("the gradient communication thread panicked".into())
            })?;
            // A peer's failure (the cause it sent) first: a hook's own failure may only be
            // that the communication thread had stopped for it.
            communicated?;
            armed?;
            finished?;
            let buckets = in_flight.len();
            in_flight.copy_back(|b, flat| self.unflatten(b, flat))?;
            Ok(Reduced {
                exposed_secs: started.elapsed().as_secs_f64(),
                buckets,
                launched_in_backward: launched,
            })
        })
    }

    /// `dist.shard: gradients`: buckets are reduce-scattered, not all-reduced.
    fn scatters(&self) -> bool {
        self.shard == Shard::Gradients
    }

    /// Bucket `b` as one flat tensor of the reduction's dtype: each parameter's gradient (zeros
    /// where this rank has none), then one flag per parameter, 1 where it has one; under
    /// `dist.shard`, in the rows a reduce-scatter hands out ([`Split::rows`]). Under
    /// `dist.shard: gradients` the gradients are freed once copied.
    fn flatten(&self, b: usize) -> Result<Tensor> {
        let params = &self.params[self.buckets[b].clone()];
        let mut parts = Vec::with_capacity(params.len() + 1);
        let mut has = Vec::with_capacity(params.len());
        for p in params {
            let g = p.grad();
            has.push(g.defined());
            parts.push(if g.defined() {
                g.f_to_kind(Kind::Float)?.f_flatten(0, -1)?
            } else {
                Tensor::f_zeros([p.numel() as i64], (Kind::Float, p.device()))?
            });
        }
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        let complete = has.iter().all(|&h| h);
        self.complete[b].store(complete, Ordering::Relaxed);
        let flags = if complete {
            Tensor::f_ones([params.len() as i64], (Kind::Float, device))?
        } else {
            let flags: Vec<f32> = has.iter().map(|&h| f32::from(u8::from(h))).collect();
            Tensor::f_from_slice(&flags)?.f_to_device(device)?
        };
        let flat = match &self.split {
            Some(split) => split.rows(b, parts, &flags)?,
            None => {
                parts.push(flags);
                Tensor::f_cat(&parts, 0)?
            }
        };
        if self.scatters() {
            for p in params {
                hooks::set_grad(p, None)?;
            }
        }
        Ok(match self.dtype {
            ReduceDtype::Fp32 => flat,
            ReduceDtype::Bf16 => flat.f_to_kind(Kind::BFloat16)?,
        })
    }

    /// Copies the summed `flat` back: without `dist.shard`, into bucket `b`'s gradients; under
    /// it, this rank's chunk into its pieces' gradients (and, under `optimizer`, every chunk
    /// into the parameters' gradients first, as without sharding).
    fn unflatten(&self, b: usize, flat: &Tensor) -> Result<()> {
        let range = self.buckets[b].clone();
        let count = range.len() as i64;
        let Some(split) = &self.split else {
            let values = flat.numel() as i64 - count;
            return self.copy_sums(
                b,
                &flat.f_narrow(0, 0, values)?,
                &flat.f_narrow(0, values, count)?,
            );
        };
        let (mine, flags) = split.my_row(b, flat, count)?;
        if !self.scatters() {
            self.copy_sums(b, &split.all_rows(b, flat, count)?, &flags)?;
            for piece in split.pieces_of(b) {
                let g = self.params[piece.param].grad();
                let grad = match g.defined() {
                    true => Some(g.f_view([-1])?.f_narrow(0, piece.start, piece.len)?),
                    false => None,
                };
                hooks::set_grad(&piece.view, grad.as_ref())?;
            }
            return Ok(());
        }
        // This rank's chunk, copied out of the bucket so that the bucket can go.
        let kind = self.params[range.start].kind();
        let mut own = Tensor::f_empty([mine.numel() as i64], (kind, mine.device()))?;
        own.f_copy_(&mine)?;
        let mine = own;
        // Read from the device only when this rank lacked a gradient: a rare path.
        let some_rank_has: Option<Vec<f32>> = match self.complete[b].load(Ordering::Relaxed) {
            true => None,
            false => Some(Vec::<f32>::try_from(flags.f_to_kind(Kind::Float)?)?),
        };
        for piece in split.pieces_of(b) {
            let has = some_rank_has.as_ref().is_none_or(|f| f[piece.param - range.start] > 0.0);
            let grad = match has {
                true => Some(mine.f_narrow(0, piece.at, piece.len)?),
                false => None,
            };
            hooks::set_grad(&piece.view, grad.as_ref())?;
        }
        Ok(())
    }

    /// Copies bucket `b`'s summed gradient values `sums` into its parameters' gradients: into
    /// the gradient where this rank has one, as a new gradient where it has none but another
    /// rank had (`flags`, summed, says which).
    fn copy_sums(&self, b: usize, sums: &Tensor, flags: &Tensor) -> Result<()> {
        let params = &self.params[self.buckets[b].clone()];
        // Read from the device only when this rank lacks a gradient: a rare path.
        let mut some_rank_has: Option<Vec<f32>> = None;
        let mut offset = 0;
        for (i, p) in params.iter().enumerate() {
            let n = p.numel() as i64;
            let sum = sums.f_narrow(0, offset, n)?;
            offset += n;
            let mut g = p.grad();
            if g.defined() {
                g.f_copy_(&sum.f_view_as(&g)?)?;
                continue;
            }
            let flags = match &some_rank_has {
                Some(flags) => flags,
                None => some_rank_has.insert(Vec::<f32>::try_from(flags.f_to_kind(Kind::Float)?)?),
            };
            if flags[i] > 0.0 {
                let mut grad = p.f_empty_like()?;
                grad.f_copy_(&sum.f_view(p.size().as_slice())?)?;
                hooks::set_grad(p, Some(&grad))?;
            }
        }
        Ok(())
    }

    /// The fault a test build injects at bucket `b`'s launch, applied (crate::fault).
    fn inject(&self, rank: usize, reduction: u64, b: usize) -> Result<()> {
        match fault::in_bucket(rank, reduction, b) {
            None => Ok(()),
            Some(Fault::FlattenFails) => Err(TrainError::Dist(format!(
                "rank {rank}: flattening gradient bucket {b} failed (injected fault)"
            ))),
            Some(Fault::HookPanics) => panic!("injected fault: gradient bucket {b}'s hook panics"),
            Some(Fault::UndefinedGrads) => {
                for p in &self.params[self.buckets[b].clone()] {
                    hooks::set_grad(p, None)?;
                }
                Ok(())
            }
            Some(Fault::Vanish) => fault::vanish(),
            Some(Fault::InfGrad) => {
                let grad = self.params[self.buckets[b].clone()]
                    .iter()
                    .map(Tensor::grad)
                    .find(Tensor::defined)
                    .ok_or_else(|| TrainError::Dist(format!("bucket {b} has no gradient")))?;
                let _ = grad.f_flatten(0, -1)?.f_get(0)?.f_fill_(f64::INFINITY)?;
                Ok(())
            }
            // The communication thread's (reduce_overlapped).
            Some(Fault::CollectiveFails) => Ok(()),
        }
    }
}

/// How many times each of `params`' gradient hooks fired during `backward`: for the tests of
/// what runs under [`GradSync::reduce`] (the step's backward passes), which must accumulate
/// each parameter's gradient once.
#[cfg(test)]
pub(crate) fn hook_counts(params: &[Tensor], backward: impl FnOnce()) -> Result<Vec<usize>> {
    use std::sync::atomic::AtomicUsize;
    struct Counts(Vec<AtomicUsize>);
    impl hooks::OnGradReady for Counts {
        fn grad_ready(&self, index: usize) {
            self.0[index].fetch_add(1, Ordering::Relaxed);
        }
        fn hook_panicked(&self, message: String) {
            eprintln!("a counting hook panicked: {message}");
        }
    }
    let counts = Counts(params.iter().map(|_| AtomicUsize::new(0)).collect());
    hooks::during(params, &counts, backward)?;
    Ok(counts.0.into_iter().map(AtomicUsize::into_inner).collect())
}

/// A flat bucket on its way to the communication thread, with the point its flatten reached.
struct Flat {
    bucket: usize,
    flat: Tensor,
    ready: Mark,
}

/// The buckets' launches, driven by the hooks (which run on autograd's thread for the device:
/// the caller's on CPU, a device thread on CUDA).
struct HookCtx<'a> {
    countdown: Mutex<Countdown<Launcher<'a>>>,
    rank: usize,
}

impl<'a> HookCtx<'a> {
    fn lock(&self) -> MutexGuard<'_, Countdown<Launcher<'a>>> {
        // Poisoned: a hook panicked mid-update; `hook_panicked` has stopped the launches.
        self.countdown.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl hooks::OnGradReady for HookCtx<'_> {
    fn grad_ready(&self, index: usize) {
        self.lock().grad_ready(index);
    }

    fn hook_panicked(&self, message: String) {
        let rank = self.rank;
        self.lock()
            .fail(TrainError::Dist(format!("rank {rank}: a gradient hook panicked: {message}")));
    }
}

/// A bucket's launch: flattened, marked, and handed to the communication thread.
struct Launcher<'a> {
    sync: ForBackward<'a>,
    comm: &'a (dyn Collectives + Sync),
    tx: mpsc::Sender<Flat>,
    /// This reduction's number, for the faults a test build injects.
    reduction: u64,
}

impl Sink for Launcher<'_> {
    type Error = TrainError;

    fn launch(&mut self, bucket: usize) -> Result<()> {
        let sync = self.sync.0;
        sync.inject(self.comm.rank(), self.reduction, bucket)?;
        let flat = sync.flatten(bucket)?;
        // The mark right after the flatten, on the thread that queued it.
        let ready = self.comm.ready_mark()?;
        self.tx
            .send(Flat { bucket, flat, ready })
            .map_err(|_| TrainError::Dist("the gradient communication thread stopped".into()))
    }
}

/// The layout, lent to the hooks for one backward pass.
struct ForBackward<'a>(&'a GradSync);

// SAFETY: `GradSync` is not `Sync` only because tch's `Tensor` handles are not. The hooks use
// them on libtorch's autograd thread while the thread that owns them waits in `backward`
// (`hooks::during`), one hook at a time (behind the countdown's lock), and only through
// libtorch calls (reading a gradient, flattening it), which libtorch's own hooks make from
// that thread too.
unsafe impl Send for ForBackward<'_> {}
unsafe impl Sync for ForBackward<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_reverse_registration_order_and_a_large_parameter_is_its_own() {
        let p =
            |n: i64| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let frozen = Tensor::zeros([5], (Kind::Float, tch::Device::Cpu));
        // 0.0001 MB = 25 floats.
        let cfg = DistConfig { bucket_mb: 1e-4, ..DistConfig::default() };
        let sync = GradSync::new(vec![p(10), p(10), frozen, p(40), p(5), p(20)], &cfg).unwrap();
        let sizes: Vec<Vec<i64>> = sync
            .buckets
            .iter()
            .map(|r| sync.params[r.clone()].iter().map(|t| t.numel() as i64).collect())
            .collect();
        assert_eq!(sizes, vec![vec![20, 5], vec![40], vec![10, 10]]);
        let err = GradSync::new(Vec::new(), &DistConfig { bucket_mb: 0.0, ..cfg })
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("dist.bucket_mb"), "{err}");
    }

    /// Leaf parameters of ones, one per size, that need gradients.
    fn ones(sizes: &[i64]) -> Vec<Tensor> {
        sizes
            .iter()
            .map(|&n| Tensor::ones([n], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true))
            .collect()
    }

    /// One bucket per parameter (each holds more than 1e-6 MB).
    fn bucket_each(params: &[Tensor], overlap: bool) -> GradSync {
        GradSync::new(
            params.iter().map(Tensor::shallow_clone).collect(),
            &DistConfig { overlap, bucket_mb: 1e-6, ..DistConfig::default() },
        )
        .unwrap()
    }

    /// The sum of scalar `terms`: a loss.
    fn total(terms: impl Iterator<Item = Tensor>) -> Tensor {
        terms.fold(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)), |a, b| a + b)
    }

    /// A backend whose all-reduce, like NCCL's on its stream, is only queued by
    /// `all_reduce_start` and done later: here in `wait_for` (the sum of two ranks holding the
    /// same gradients, so a doubling), in the order the sums were started.
    #[derive(Default)]
    struct Deferred {
        log: Mutex<Vec<String>>,
        queued: Mutex<std::collections::VecDeque<Tensor>>,
        /// The start (0-based) that fails, as a collective can mid-backward.
        fail_start: Option<usize>,
    }

    impl Collectives for Deferred {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_gather(&self, _: &Tensor) -> Result<Tensor> {
            Err(TrainError::Dist("not in this test".into()))
        }
        fn reduce_scatter(&self, _: &Tensor) -> Result<Tensor> {
            Err(TrainError::Dist("not in this test".into()))
        }
        fn all_reduce_sum(&self, _: &mut Tensor) -> Result<()> {
            Err(TrainError::Dist(
                "the overlapped path starts sums, it does not block on them".into(),
            ))
        }
        fn broadcast(&self, _: &mut Tensor, _: usize) -> Result<()> {
            Err(TrainError::Dist("not in this test".into()))
        }
        fn all_gather_bytes(&self, _: &[u8]) -> Result<Vec<Vec<u8>>> {
            Err(TrainError::Dist("not in this test".into()))
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn as_sync(&self) -> Option<&(dyn Collectives + Sync)> {
            Some(self)
        }
        fn ready_mark(&self) -> Result<Mark> {
            self.log.lock().unwrap().push("ready".into());
            Ok(Mark::none())
        }
        fn all_reduce_start(&self, tensor: &mut Tensor, _ready: Mark) -> Result<Mark> {
            let mut log = self.log.lock().unwrap();
            let starts = log.iter().filter(|l| l.starts_with("start")).count();
            if self.fail_start == Some(starts) {
                log.push(format!("failed {}", tensor.numel()));
                return Err(TrainError::Dist("the link went down".into()));
            }
            log.push(format!("start {}", tensor.numel()));
            self.queued.lock().unwrap().push_back(tensor.shallow_clone());
            Ok(Mark::none())
        }
        fn retire(&self, _done: Mark, buffer: Tensor) {
            self.log.lock().unwrap().push(format!("retire {}", buffer.numel()));
        }
        fn wait_for(&self, _done: &Mark) -> Result<()> {
            self.log.lock().unwrap().push("wait".into());
            let mut t =
                self.queued.lock().unwrap().pop_front().expect("a wait for a sum never started");
            let _ = t.g_mul_scalar_(2.0);
            Ok(())
        }
    }

    #[test]
    fn each_bucket_is_marked_before_its_sum_starts_and_copied_back_only_after_its_wait() {
        let params = ones(&[3, 4, 5]);
        for dtype in [ReduceDtype::Fp32, ReduceDtype::Bf16] {
            let sync = GradSync::new(
                params.iter().map(Tensor::shallow_clone).collect(),
                &DistConfig {
                    overlap: true,
                    bucket_mb: 1e-6,
                    grad_reduce_dtype: dtype,
                    ..DistConfig::default()
                },
            )
            .unwrap();
            let comm = Deferred::default();
            let loss = || {
                total(
                    params.iter().enumerate().map(|(i, w)| (w * (i as f64 + 1.5)).sum(Kind::Float)),
                )
            };
            let reduced = sync.reduce(&comm, || loss().backward()).unwrap();
            assert_eq!((reduced.buckets, reduced.launched_in_backward), (3, 3));
            // Buckets in reverse registration order, each marked before its start; the waits
            // all come after the starts (the host only queues them).
            let log = comm.log.lock().unwrap().clone();
            let starts: Vec<&str> =
                log.iter().filter(|l| l.starts_with("start")).map(String::as_str).collect();
            // Each bucket's gradients and one flag.
            assert_eq!(starts, ["start 6", "start 5", "start 4"], "{log:?}");
            for (k, start) in starts.iter().enumerate() {
                let at = log.iter().position(|l| l == start).unwrap();
                assert!(log[..at].iter().filter(|l| *l == "ready").count() > k, "{log:?}");
            }
            assert_eq!(log.iter().filter(|l| *l == "wait").count(), 3, "{log:?}");
            assert!(comm.queued.lock().unwrap().is_empty());
            // Copied back after the sum was done: twice the local gradients, in either dtype
            // (these values are exact in bf16).
            for (i, w) in params.iter().enumerate() {
                let mut g = w.grad();
                assert_eq!(
                    Vec::<f32>::try_from(&g).unwrap(),
                    vec![2.0 * (i as f32 + 1.5); w.numel()],
                    "{dtype:?} parameter {i}"
                );
                let _ = g.zero_();
            }
        }
    }

    /// A parameter listed twice (tied weights): one place in one bucket, so its one hook
    /// counts its bucket down and every bucket still launches during the backward pass (a
    /// second listing would hold a hook that replaced the first, and a bucket waiting for a
    /// gradient that is never reported would only go after the pass).
    #[test]
    fn a_tied_parameter_is_bucketed_once_and_keeps_its_overlap() {
        let [shared, other]: [Tensor; 2] = ones(&[3, 4]).try_into().unwrap();
        let sync = GradSync::new(
            vec![shared.shallow_clone(), other.shallow_clone(), shared.shallow_clone()],
            &DistConfig { overlap: true, bucket_mb: 1e-6, ..DistConfig::default() },
        )
        .unwrap();
        assert_eq!((sync.params.len(), sync.bucket_count()), (2, 2));
        let comm = Deferred::default();
        let reduced = sync
            .reduce(&comm, || {
                ((&shared * 2.0).sum(Kind::Float) + other.sum(Kind::Float)).backward()
            })
            .unwrap();
        assert_eq!((reduced.buckets, reduced.launched_in_backward), (2, 2));
        assert_eq!(Vec::<f32>::try_from(shared.grad()).unwrap(), vec![4.0; 3]);
        assert_eq!(Vec::<f32>::try_from(other.grad()).unwrap(), vec![2.0; 4]);
    }

    /// A sum that fails to start mid-backward, and a backward pass that panics: every bucket
    /// already started is retired (freed only once its collective is done, or never), none is
    /// dropped while it may be in flight, and none is copied back.
    #[test]
    fn started_buckets_are_retired_on_every_error_path() {
        let params = ones(&[3, 4, 5]);
        let sync = bucket_each(&params, true);
        let loss = || total(params.iter().map(|w| w.sum(Kind::Float)));

        let comm = Deferred { fail_start: Some(1), ..Deferred::default() };
        let err = sync.reduce(&comm, || loss().backward()).unwrap_err().to_string();
        assert!(err.contains("the link went down"), "{err}");
        let log: Vec<String> =
            comm.log.lock().unwrap().iter().filter(|l| *l != "ready").cloned().collect();
        // Bucket 0 (5 + 1 values) started, bucket 1 failed to; the started one is retired
        // (not waited for, not copied back); nothing is launched after the failure... except
        // that the hook may have flattened bucket 2 before it learnt of it: never started.
        assert_eq!(log[..2], ["start 6".to_owned(), "failed 5".to_owned()], "{log:?}");
        assert!(log.contains(&"retire 6".to_owned()), "{log:?}");
        assert!(!log.iter().any(|l| l == "wait" || l == "start 4"), "{log:?}");
        for w in &params {
            assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), vec![1.0; w.numel()]);
            let _ = w.grad().zero_();
        }

        let comm = Deferred::default();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sync.reduce(&comm, || {
                loss().backward();
                panic!("out of memory in the backward pass");
            })
        }));
        assert!(panicked.is_err());
        let log = comm.log.lock().unwrap().clone();
        let started = log.iter().filter(|l| l.starts_with("start")).count();
        let retired = log.iter().filter(|l| l.starts_with("retire")).count();
        assert_eq!((started, retired), (3, 3), "{log:?}");
        assert!(!log.iter().any(|l| l == "wait"), "{log:?}");
    }

    /// A group on one of four ranks (`fail_rank`) that fails, or panics in, its `n`-th
    /// `ready_mark` (the call each bucket's launch makes in its hook, right after the flatten),
    /// and records the size of every sum it starts.
    struct FaultyRank<'a> {
        inner: &'a crate::collectives::tcp::TcpGroup,
        fail_rank: usize,
        at: usize,
        panics: bool,
        marks: std::sync::atomic::AtomicUsize,
        started: Mutex<Vec<usize>>,
    }

    impl Collectives for FaultyRank<'_> {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
            self.inner.all_gather(t)
        }
        fn reduce_scatter(&self, t: &Tensor) -> Result<Tensor> {
            self.inner.reduce_scatter(t)
        }
        fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
            self.inner.all_reduce_sum(t)
        }
        fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
            self.inner.broadcast(t, root)
        }
        fn all_gather_bytes(&self, b: &[u8]) -> Result<Vec<Vec<u8>>> {
            self.inner.all_gather_bytes(b)
        }
        fn barrier(&self) -> Result<()> {
            self.inner.barrier()
        }
        fn as_sync(&self) -> Option<&(dyn Collectives + Sync)> {
            Some(self)
        }
        fn ready_mark(&self) -> Result<Mark> {
            let n = self.marks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.rank() == self.fail_rank && n == self.at {
                if self.panics {
                    panic!("a kernel launch failed");
                }
                return Err(TrainError::Dist("out of memory flattening a bucket".into()));
            }
            Ok(Mark::none())
        }
        fn all_reduce_start(&self, t: &mut Tensor, ready: Mark) -> Result<Mark> {
            self.started.lock().unwrap().push(t.numel());
            self.inner.all_reduce_start(t, ready)
        }
        fn abort(&self, cause: &str) {
            self.inner.abort(cause)
        }
    }

    /// A launch that fails, or a hook that panics, on one of four ranks: that rank launches
    /// nothing after it, the others' sums all pair bucket for bucket with its own (their
    /// started sizes agree up to where it stopped), and once it aborts (as the training loop
    /// does on any error), every rank fails at once naming its cause, rather than summing the
    /// wrong buckets or waiting out the timeout.
    #[test]
    fn a_failure_in_one_ranks_hook_stops_every_rank_with_its_cause() {
        for panics in [false, true] {
            let results = on_four_ranks(None, move |_, group| {
                let params = ones(&[8, 9, 10, 11]);
                let sync = bucket_each(&params, true);
                let comm = FaultyRank {
                    inner: group,
                    fail_rank: 2,
                    at: 1,
                    panics,
                    marks: Default::default(),
                    started: Mutex::new(Vec::new()),
                };
                let started = Instant::now();
                let backward = || total(params.iter().map(|w| w.sum(Kind::Float))).backward();
                let err = match sync.reduce(&comm, backward) {
                    Ok(_) => String::new(),
                    Err(e) => {
                        comm.abort(&e.to_string());
                        e.to_string()
                    }
                };
                let sizes = comm.started.lock().unwrap().clone();
                (err, sizes, started.elapsed())
            });
            let cause = if panics {
                "rank 2: a gradient hook panicked: a kernel launch failed"
            } else {
                "out of memory flattening a bucket"
            };
            let (_, stopped_at, _) = &results[2];
            assert_eq!(stopped_at, &[12], "rank 2 started bucket 0 only");
            for (rank, (err, sizes, took)) in results.iter().enumerate() {
                assert!(err.contains(cause), "panics {panics}, rank {rank}: {err}");
                if rank != 2 {
                    assert!(err.contains("rank 2 stopped"), "rank {rank}: {err}");
                }
                assert_eq!(sizes[..1], [12], "rank {rank}: {sizes:?}");
                assert!(*took < std::time::Duration::from_secs(30), "rank {rank}: {took:?}");
            }
        }
    }

    /// Parameters outside one rank's graph: that rank sums zeros for them (it does not skip
    /// their bucket, which would pair every later bucket with the wrong one), every rank then
    /// holds the same sum, and a parameter no rank reached keeps no gradient anywhere.
    #[test]
    fn gradients_a_rank_lacks_are_summed_as_zeros_and_every_rank_holds_the_sum() {
        for overlap in [false, true] {
            let grads = on_four_ranks(None, move |rank, group| {
                let params = ones(&[3, 4, 5, 6]);
                let sync = bucket_each(&params, overlap);
                // Rank 1 does not reach parameter 1; no rank reaches parameter 3.
                let backward = || {
                    total(
                        params[..3]
                            .iter()
                            .enumerate()
                            .filter(|&(i, _)| !(rank == 1 && i == 1))
                            .map(|(i, w)| (w * (rank * 10 + i + 1) as f64).sum(Kind::Float)),
                    )
                    .backward()
                };
                sync.reduce(group, backward).unwrap();
                params
                    .iter()
                    .map(|w| {
                        let g = w.grad();
                        g.defined().then(|| Vec::<f32>::try_from(g).unwrap())
                    })
                    .collect::<Vec<_>>()
            });
            let sum = |i: usize, ranks: &[usize]| {
                ranks.iter().map(|r| (r * 10 + i + 1) as f32).sum::<f32>()
            };
            let expected = vec![
                Some(vec![sum(0, &[0, 1, 2, 3]); 3]),
                Some(vec![sum(1, &[0, 2, 3]); 4]),
                Some(vec![sum(2, &[0, 1, 2, 3]); 5]),
                None,
            ];
            for (rank, g) in grads.iter().enumerate() {
                assert_eq!(g, &expected, "overlap {overlap}, rank {rank}");
            }
        }
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
            .map(|l| {
                ((Tensor::arange(256 * 256, (Kind::Float, tch::Device::Cpu)) * (0.37 + l as f64))
                    .sin()
                    * 0.5)
                    .view([256, 256])
                    .set_requires_grad(true)
            })
            .collect()
    }

    fn chain_backward(weights: &[Tensor], rank: usize) {
        for (l, w) in weights.iter().enumerate().rev() {
            std::thread::sleep(std::time::Duration::from_secs_f64(LAYER_SECS));
            let x = (Tensor::arange(256 * 256, (Kind::Float, tch::Device::Cpu))
                * (1.3 + (rank + l) as f64))
                .cos()
                .view([256, 256]);
            (w.tanh() * x).sum(Kind::Float).backward();
        }
    }

    /// Runs `f(rank, group)` on 4 ranks in threads.
    fn on_four_ranks<T: Send + 'static>(
        gbps: Option<f64>,
        f: impl Fn(usize, &crate::collectives::tcp::TcpGroup) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let handles: Vec<_> = (0..4)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world = crate::collectives::WorldEnv::on_loopback(rank, 4, port);
                    let comm = crate::collectives::tcp::TcpGroup::connect(
                        &world,
                        std::time::Duration::from_secs(60),
                    )
                    .unwrap()
                    .with_sim_link(gbps);
                    f(rank, &comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// [`STEPS`] SGD steps of the chain on 4 ranks: per rank, each step's exposed communication
    /// time, the buckets launched during backward, and the final weights.
    /// One rank's run of [`train_chain`]: its exposed wait per step, the buckets started during
    /// the backward pass, and its final weights.
    type RankRun = (Vec<f64>, usize, Vec<Vec<f32>>);

    fn train_chain(overlap: bool, gbps: f64) -> Vec<RankRun> {
        on_four_ranks(Some(gbps), move |rank, comm| {
            let weights = chain_weights();
            let sync = GradSync::new(
                weights.iter().map(Tensor::shallow_clone).collect(),
                &DistConfig { overlap, bucket_mb: 0.25, ..DistConfig::default() },
            )
            .unwrap();
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
            (
                exposed,
                launched,
                weights
                    .iter()
                    .map(|w| Vec::<f32>::try_from(w.detach().flatten(0, -1)).unwrap())
                    .collect(),
            )
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
        let exposed = |runs: &[RankRun]| {
            let mut waits: Vec<f64> =
                (0..STEPS).map(|s| runs.iter().map(|r| r.0[s]).fold(f64::MAX, f64::min)).collect();
            waits.sort_by(f64::total_cmp);
            waits[STEPS / 2]
        };
        let (without, with) = (exposed(&after), exposed(&overlapped));
        eprintln!("link {gbps:.4} GB/s: exposed communication per step {:.1} ms after backward, {:.1} ms overlapped", without * 1e3, with * 1e3);
        assert!(
            with <= 0.5 * without,
            "exposed communication per step: {with} s overlapped vs {without} s after backward"
        );
        for (rank, ((_, launched, weights), (_, _, reference))) in
            overlapped.iter().zip(&after).enumerate()
        {
            assert!(*launched > 0, "rank {rank}: no bucket launched during backward");
            assert_eq!(weights, reference, "rank {rank}: final weights");
            assert_eq!(weights, &overlapped[0].2, "rank {rank}");
        }
    }
}
