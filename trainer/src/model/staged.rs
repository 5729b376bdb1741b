//! A tower's forward as a sequence of stages (the stem, each residual block, the head), and
//! activation checkpointing on top of it (`train.grad_checkpointing`, open_clip's
//! `--grad-checkpointing`): keep only each stage's input and recompute the stage during the
//! backward pass.
//!
//! Each tower says what its stages are (`stage_count` and `stage` in `vision.rs`, `resnet.rs`,
//! `timm_vit.rs`, `text.rs`) and its plain forward is [`fold`] over them, so there is one
//! forward per tower whether checkpointed or not. [`Stages`] is that shape for the machinery
//! here; the model (`mod.rs`) gives each tower's stages with its L2 normalisation at the end.
//!
//! tch has no custom autograd functions (PyTorch's `torch.utils.checkpoint`), so the backward
//! pass is explicit gradient flow, as the training step already does for micro-batches:
//!
//! - [`checkpointed`] runs the stages one at a time, each on the detached output of the one
//!   before, and keeps each stage's input; a stage's graph is dropped with its output. The
//!   last stage (pooling and projection) keeps its graph: its output is the features the loss
//!   scores, the step back-propagates its surrogate through it, and it is not run twice.
//! - [`Checkpointed::backward`] then walks the other stages in reverse: it re-runs stage `i`
//!   from its saved input (a leaf that requires grad, unless stage `i` is the first to train)
//!   and back-propagates `sum(out * grad_out)`, whose gradient with respect to `out` is
//!   exactly `grad_out`; the input's `.grad()` is the next stage's `grad_out`.
//!
//! Every parameter gets its gradient from exactly one of these backward calls (each belongs
//! to one stage), so the reduction's per-parameter hooks (`grad_sync`) fire once per parameter
//! and the gradients equal those of one backward pass through the whole graph.
//!
//! Stages run with autograd on, also in the first pass: the kernels are the ones the
//! recompute and the plain forward use (CUDA picks attention kernels by whether gradients
//! are needed), and a stage's output says whether the stage has a trainable parameter, so
//! the backward pass stops at the first stage that trains, and a frozen tower (tower locking)
//! costs no backward pass at all. The first pass's peak is one stage's graph, which the
//! recompute needs anyway.
//!
//! Random numbers a stage draws (stochastic depth, a dropout inside a block) must be the same
//! in a recompute. libtorch's generator state is not reachable from tch, so towers whose
//! stages draw say so ([`Stages::draws`]), and every forward of them ([`forward`] and
//! [`checkpointed`] alike) first draws one seed per stage from the generator and re-seeds it
//! before each stage; the backward pass re-seeds each recompute with its stage's seed. The
//! plain and the checkpointed forward of the same generator state then draw the same numbers
//! (gradient caching re-runs a micro-batch under its seed, so its two passes agree too).
//! Randomness a stem needs from outside (patch dropout's kept tokens) comes in with the
//! stage's view as a tensor. BatchNorm's running statistics and the precision of a
//! recompute are the caller's: it wraps [`Stages::run`] (the step re-runs under the same
//! autocast, with BatchNorm not counting the batch again, `Clip::repeating`).

use tch::{Kind, Tensor};

/// A tower's forward cut into stages: `x_{i+1} = run(i, x_i)`, `x_0` the tower's input
/// (images or token ids), the last stage's output the tower's.
pub trait Stages {
    /// At least 1.
    fn count(&self) -> usize;
    /// Stage `i` on its input `x`.
    fn run(&self, i: usize, x: &Tensor) -> Tensor;
    /// Whether the stages draw random numbers (in training: stochastic depth, dropout).
    fn draws(&self) -> bool {
        false
    }
}

/// A seed drawn from libtorch's CPU generator (a CPU value: no device read).
pub fn draw_seed() -> i64 {
    Tensor::randint(i64::MAX, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0])
}

/// One seed per stage when the stages draw random numbers.
fn stage_seeds(stages: &impl Stages) -> Vec<i64> {
    if stages.draws() {
        (0..stages.count()).map(|_| draw_seed()).collect()
    } else {
        Vec::new()
    }
}

/// Stage `i` on `x`, the generator re-seeded with the stage's seed when there are seeds.
fn run_seeded(stages: &impl Stages, seeds: &[i64], i: usize, x: &Tensor) -> Tensor {
    if let Some(&seed) = seeds.get(i) {
        tch::manual_seed(seed);
    }
    stages.run(i, x)
}

/// Block `k`, counted over all stages of a hierarchical trunk (ConvNeXt, Swin: per stage, the
/// downsample that starts it, none for the first, and its blocks), with the downsample that
/// runs just before it: a stage's first block's. timm's parameter groups put the two
/// together, and so one tower stage here holds both.
pub fn nth_block<D, B>(stages: &[(Option<D>, Vec<B>)], k: usize) -> Option<(Option<&D>, &B)> {
    let mut k = k;
    for (downsample, blocks) in stages {
        if let Some(block) = blocks.get(k) {
            return Some((downsample.as_ref().filter(|_| k == 0), block));
        }
        k -= blocks.len();
    }
    None
}

/// timm's per-block parameter groups of a hierarchical trunk whose stages live under `stages`
/// (`visual.trunk.stages`): one group per block, first to last, and what starts stage `s`
/// (`starts(s)`: its downsample, ...) in the group of its first block, as timm's
/// `group_matcher` gives those the first block's ordinal. The same cut as [`nth_block`].
pub fn per_block_groups(
    stages: &str,
    depths: &[i64],
    starts: impl Fn(usize) -> Vec<&'static str>,
) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (s, &depth) in depths.iter().enumerate() {
        for b in 0..depth {
            let mut group = vec![format!("{stages}.{s}.blocks.{b}")];
            if b == 0 {
                group.extend(starts(s).into_iter().map(|m| format!("{stages}.{s}.{m}")));
            }
            out.push(group);
        }
    }
    out
}

/// The plain forward: `run(0, input)`, then each stage on the output of the one before.
pub fn fold(count: usize, input: &Tensor, run: impl Fn(usize, &Tensor) -> Tensor) -> Tensor {
    (0..count).fold(input.shallow_clone(), |x, i| run(i, &x))
}

/// [`fold`] over `stages`, each re-seeded when they draw random numbers (module docs).
pub fn forward(stages: &impl Stages, input: &Tensor) -> Tensor {
    let seeds = stage_seeds(stages);
    fold(stages.count(), input, |i, x| run_seeded(stages, &seeds, i, x))
}

/// What a checkpointed forward keeps of one tower for its backward pass.
#[derive(Debug)]
pub struct Checkpointed {
    /// The inputs of the stages before the last, detached; the first is the tower's input.
    /// Emptied from the end as the backward pass goes.
    inputs: Vec<Tensor>,
    /// The first stage before the last with a trainable parameter; `None`: none has one,
    /// and no gradient needs to go further back than the last stage.
    first_trainable: Option<usize>,
    /// The last stage's input: a leaf that requires grad when `first_trainable` is some.
    last_input: Tensor,
    /// The tower's output, with the last stage's graph.
    output: Tensor,
    /// Each stage's seed, when the stages draw random numbers.
    seeds: Vec<i64>,
}

/// Runs `stages` on `input`, keeping the input of every stage but the last and the last
/// one's graph (see the module docs).
pub fn checkpointed(stages: &impl Stages, input: &Tensor) -> Checkpointed {
    let last = stages.count() - 1;
    let seeds = stage_seeds(stages);
    let mut inputs = Vec::with_capacity(last);
    let mut first_trainable = None;
    let mut x = input.shallow_clone();
    for i in 0..last {
        let out = run_seeded(stages, &seeds, i, &x);
        // Its input needs no gradient, so the output needs one only through a parameter.
        if first_trainable.is_none() && out.requires_grad() {
            first_trainable = Some(i);
        }
        inputs.push(x);
        x = out.detach();
    }
    let last_input = if first_trainable.is_some() { x.set_requires_grad(true) } else { x };
    let output = run_seeded(stages, &seeds, last, &last_input);
    Checkpointed { inputs, first_trainable, last_input, output, seeds }
}

impl Checkpointed {
    /// The tower's output (the features), with the last stage's graph.
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Back-propagates through the stages before the last, once the caller has
    /// back-propagated through [`Checkpointed::output`] (the step's surrogate, so that the
    /// last stage's input holds its gradient). `stages` must compute what the forward's did.
    pub fn backward(mut self, stages: &impl Stages) {
        let Some(first) = self.first_trainable else { return };
        let mut grad_out = self.last_input.grad();
        for i in (first..self.inputs.len()).rev() {
            // An undefined gradient: the output did not reach the loss; nothing flows back.
            if !grad_out.defined() {
                return;
            }
            let Some(x) = self.inputs.pop() else { return };
            // Stage `first` needs no gradient for its input: nothing before it trains.
            let x = if i > first { x.set_requires_grad(true) } else { x };
            let out = run_seeded(stages, &self.seeds, i, &x);
            // d/d out of sum(out * grad_out) is grad_out, exactly (it is multiplied by 1).
            (out * &grad_out).sum(Kind::Float).backward();
            grad_out = if i > first { x.grad() } else { Tensor::new() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// `x -> tanh(x W_i)`, three stages; the weights of the first `frozen` need no gradient.
    struct Chain {
        weights: Vec<Tensor>,
        runs: std::cell::Cell<usize>,
    }

    impl Chain {
        fn new(frozen: usize) -> Self {
            tch::manual_seed(3);
            let weights = (0..3)
                .map(|i| {
                    Tensor::randn([4, 4], (Kind::Double, Device::Cpu))
                        .set_requires_grad(i >= frozen)
                })
                .collect();
            Chain { weights, runs: std::cell::Cell::new(0) }
        }
    }

    impl Stages for Chain {
        fn count(&self) -> usize {
            self.weights.len()
        }
        fn run(&self, i: usize, x: &Tensor) -> Tensor {
            self.runs.set(self.runs.get() + 1);
            x.matmul(&self.weights[i]).tanh()
        }
    }

    fn grads(chain: &Chain) -> Vec<Option<Vec<f64>>> {
        chain
            .weights
            .iter()
            .map(|w| {
                let g = w.grad();
                g.defined().then(|| Vec::<f64>::try_from(g.flatten(0, -1)).unwrap())
            })
            .collect()
    }

    /// The segmented backward gives every weight the gradient of one backward pass, bit for
    /// bit, re-running only the stages from the first that trains up to the last but one.
    #[test]
    fn the_segmented_backward_equals_one_backward_pass() {
        let x = Tensor::randn([5, 4], (Kind::Double, Device::Cpu));
        let g = Tensor::randn([5, 4], (Kind::Double, Device::Cpu));
        for frozen in 0..=3 {
            let plain = Chain::new(frozen);
            let out = forward(&plain, &x);
            if out.requires_grad() {
                (out * &g).sum(Kind::Double).backward();
            }

            let chain = Chain::new(frozen);
            let saved = checkpointed(&chain, &x);
            assert_eq!(chain.runs.get(), 3);
            assert!(saved.output().equal(&forward(&Chain::new(frozen), &x)));
            if saved.output().requires_grad() {
                (saved.output() * &g).sum(Kind::Double).backward();
            }
            saved.backward(&chain);
            // Stages 0 and 1 are re-run from the first that trains; the last never is.
            assert_eq!(chain.runs.get(), 3 + 2usize.saturating_sub(frozen), "frozen {frozen}");
            assert_eq!(grads(&chain), grads(&plain), "frozen {frozen}");
            for (i, w) in chain.weights.iter().enumerate() {
                assert_eq!(w.grad().defined(), i >= frozen, "frozen {frozen}, weight {i}");
            }
        }
    }
}
