//! `oxclip bench train`: the training step on random inputs, the same work as open_clip's step
//! (forward, contrastive loss, backward, AdamW), so the two can be timed side by side
//! (`scripts/bench_open_clip.py` is the other side). `oxclip bench optim`: the AdamW update
//! alone, the fused kernel against the per-parameter loop it replaced.

use std::time::Instant;

use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

use crate::collectives::SingleProcess;
use crate::config::{LossKind, Precision};
use crate::error::Result;
use crate::model::patch_dropout::PatchDropout;
use crate::model::{Clip, ModelConfig};
use crate::optim::AdamW;
use crate::precision::{GradScaler, GradScalerConfig};
use crate::step::{self, StepConfig};

#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchResult {
    pub bench: &'static str,
    pub model: String,
    /// As [`crate::device::name`] writes it (`cpu`, `cuda:0`), like every other message.
    pub device: String,
    pub batch_size: usize,
    /// As `train.precision` writes it.
    pub precision: &'static str,
    pub steps: u64,
    pub threads: i32,
    pub micro_batch_size: Option<usize>,
    pub patch_dropout: f64,
    pub grad_checkpointing: bool,
    pub seconds: f64,
    /// CPU time (user + system, every thread) the process spent in the timed steps: on a
    /// shared machine it follows the step's work more closely than the wall clock does.
    pub cpu_seconds: Option<f64>,
    pub samples_per_second: f64,
    /// The process's peak resident memory (VmHWM), start-up included: on the CPU, the
    /// step's activation memory shows here.
    pub peak_rss_bytes: Option<u64>,
    /// On CUDA: device memory in use after the steps (libtorch's cache holds its peak).
    pub cuda_memory_bytes: Option<u64>,
}

/// CPU time of the process so far, user and system, all threads (`getrusage`).
pub fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: an all-zero `rusage` is a valid value (integers only); `getrusage` writes into
    // the struct it is given and nothing else.
    let (rc, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage), usage)
    };
    if rc != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// The process's peak resident set size, from /proc/self/status (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub struct TrainBench<'a> {
    pub model_name: &'a str,
    pub model: &'a ModelConfig,
    pub batch_size: usize,
    pub steps: u64,
    pub warmup_steps: u64,
    pub device: Device,
    /// As `train.precision`, and set up as a training run sets it up.
    pub precision: Precision,
    /// Gradient caching: samples per tower forward.
    pub micro_batch_size: Option<usize>,
    /// Patch dropout rate in [0, 1) (`--patch-dropout`; 0: off).
    pub patch_dropout: f64,
    /// Activation checkpointing (`train.grad_checkpointing`).
    pub grad_checkpointing: bool,
}

pub fn bench_train(b: &TrainBench) -> Result<TrainBenchResult> {
    crate::config::train::check_patch_dropout("--patch-dropout", b.patch_dropout, b.model)?;
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(b.device);
    let model = Clip::new(&vs.root(), b.model)?;
    if b.precision.weights_kind() == Kind::BFloat16 {
        vs.bfloat16();
    }
    // The step as a run takes it (patch dropout and BatchNorm follow the mode).
    model.set_training(true);
    // open_clip's defaults, as a run config without `optim:` has them.
    let optim = crate::config::OptimConfig::default();
    let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), optim.adamw());
    let n = b.batch_size as i64;
    let size = b.model.vision_cfg.image_size;
    let ctx = b.model.text_cfg.context_length;
    let vocab = b.model.text_cfg.vocab_size;
    let images = Tensor::randn([n, 3, size, size], (Kind::Float, b.device));
    // Random ids below the EOT id, then EOT (the largest id) at a random position per row.
    let tokens = Tensor::randint(vocab - 1, [n, ctx], (Kind::Int64, b.device));
    let eot_at = Tensor::randint(ctx, [n, 1], (Kind::Int64, b.device));
    let tokens = tokens.scatter_value(1, &eot_at, vocab - 1);
    // The loss a run of the model takes: CoCa's scores its decoder too.
    let kind = if b.model.is_coca() { LossKind::Coca } else { LossKind::Clip };
    let loss = crate::config::LossConfig { kind, ..Default::default() };
    let cfg = StepConfig {
        patch_dropout: (b.patch_dropout > 0.0)
            .then_some(PatchDropout { prob: b.patch_dropout, seed: 0 }),
        grad_checkpointing: b.grad_checkpointing,
        ..StepConfig::new(b.precision, b.device, &loss, None, b.micro_batch_size)?
    };
    let mut scaler =
        b.precision.scales_loss().then(|| GradScaler::new(b.device, GradScalerConfig::default()));
    let grad_sync =
        crate::grad_sync::GradSync::for_var_store(&vs, &crate::config::DistConfig::default())?;

    let mut step_number = 0;
    let mut run = |steps: u64| -> Result<f64> {
        let started = Instant::now();
        let mut last = None;
        for _ in 0..steps {
            last = Some(step::train_step(
                &model,
                &mut optimizer,
                &SingleProcess,
                &grad_sync,
                &images,
                &tokens,
                optim.lr,
                step_number,
                cfg,
                scaler.as_mut(),
            )?);
            step_number += 1;
        }
        // Wait for the device before stopping the clock.
        if let Some(out) = last {
            let _ = out.loss.double_value(&[]);
        }
        Ok(started.elapsed().as_secs_f64())
    };
    run(b.warmup_steps)?;
    let cpu_before = process_cpu_seconds();
    let seconds = run(b.steps)?;
    let cpu_seconds = process_cpu_seconds().zip(cpu_before).map(|(after, before)| after - before);
    Ok(TrainBenchResult {
        bench: "train",
        model: b.model_name.to_string(),
        device: crate::device::name(b.device),
        batch_size: b.batch_size,
        precision: b.precision.name(),
        steps: b.steps,
        threads: tch::get_num_threads(),
        micro_batch_size: b.micro_batch_size,
        patch_dropout: b.patch_dropout,
        grad_checkpointing: b.grad_checkpointing,
        seconds,
        cpu_seconds,
        samples_per_second: (b.batch_size as u64 * b.steps) as f64 / seconds,
        peak_rss_bytes: peak_rss_bytes(),
        cuda_memory_bytes: crate::device::cuda_memory_in_use(b.device),
    })
}

/// An AdamW update `oxclip bench optim` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimImpl {
    /// The per-parameter loop ([`AdamW::step_per_parameter`]), the update before the fused one.
    Loop,
    /// libtorch's multi-tensor `_fused_adamw_`, one call per weight-decay group ([`AdamW::step`]),
    /// what training runs.
    Fused,
}

pub struct OptimBench<'a> {
    pub model_name: &'a str,
    pub model: &'a ModelConfig,
    pub device: Device,
    /// Timed in turn within each round, so that both see the same machine.
    pub impls: &'a [OptimImpl],
    pub steps: u64,
    pub warmup_steps: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OptimBenchResult {
    pub bench: &'static str,
    pub model: String,
    pub device: String,
    pub threads: i32,
    /// Trainable parameters, and the tensors holding them.
    pub params: i64,
    pub tensors: usize,
    pub steps: u64,
    /// Median seconds of one update, per implementation timed.
    pub loop_step_secs: Option<f64>,
    pub fused_step_secs: Option<f64>,
    /// `loop_step_secs / fused_step_secs`, when both were timed.
    pub speedup: Option<f64>,
}

/// The optimizer step alone (step 7's AdamW update, open_clip's default settings and decay
/// groups) over a model's parameters with random gradients, each implementation in turn within
/// a round, over the same state. On CUDA each timing waits for the device; there the loop's
/// also includes its one read of the update counter.
pub fn bench_optim(b: &OptimBench) -> Result<OptimBenchResult> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(b.device);
    let _model = Clip::new(&vs.root(), b.model)?;
    let optim = crate::config::OptimConfig::default();
    let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), optim.adamw());
    let trainable = vs.trainable_variables();
    // Gradients as backward leaves them: d/dp sum(p * r) = r.
    let surrogate = trainable.iter().fold(Tensor::zeros([], (Kind::Float, b.device)), |acc, p| {
        acc + (p * p.randn_like().detach() * 1e-3).sum(Kind::Float)
    });
    surrogate.backward();
    let wait = || {
        if let Device::Cuda(index) = b.device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    let mut secs: Vec<(OptimImpl, Vec<f64>)> = b.impls.iter().map(|&i| (i, Vec::new())).collect();
    for round in 0..b.warmup_steps + b.steps {
        for (which, times) in &mut secs {
            wait();
            let started = Instant::now();
            match which {
                OptimImpl::Loop => optimizer.step_per_parameter(optim.lr),
                OptimImpl::Fused => optimizer.step(optim.lr, None)?,
            }
            wait();
            if round >= b.warmup_steps {
                times.push(started.elapsed().as_secs_f64());
            }
        }
    }
    let median = |which: OptimImpl| {
        secs.iter().find(|(i, _)| *i == which).map(|(_, times)| {
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            sorted[sorted.len() / 2]
        })
    };
    let (loop_step_secs, fused_step_secs) = (median(OptimImpl::Loop), median(OptimImpl::Fused));
    Ok(OptimBenchResult {
        bench: "optim",
        model: b.model_name.to_string(),
        device: crate::device::name(b.device),
        threads: tch::get_num_threads(),
        params: trainable.iter().map(|p| p.numel() as i64).sum(),
        tensors: trainable.len(),
        steps: b.steps,
        loop_step_secs,
        fused_step_secs,
        speedup: loop_step_secs.zip(fused_step_secs).map(|(l, f)| l / f),
    })
}
