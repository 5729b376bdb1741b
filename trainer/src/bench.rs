//! `oxclip bench train`: the training step on random inputs, the same work as open_clip's step
//! (forward, contrastive loss, backward, AdamW), so the two can be timed side by side
//! (`scripts/bench_open_clip.py` is the other side).

use std::time::Instant;

use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

use crate::collectives::SingleProcess;
use crate::config::Precision;
use crate::error::Result;
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
    pub seconds: f64,
    pub samples_per_second: f64,
    /// CPU time (user and system, every thread) the timed steps took: on a machine others
    /// load too, a measure of the work that wall time is not.
    pub cpu_seconds: Option<f64>,
    /// The process's peak resident memory (VmHWM), start-up included: on the CPU, the
    /// step's activation memory shows here.
    pub peak_rss_bytes: Option<u64>,
    /// On CUDA: device memory in use after the steps (libtorch's cache holds its peak).
    pub cuda_memory_bytes: Option<u64>,
}

/// The CPU time this process has used so far, every thread, user and system (getrusage).
pub fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage writes the struct it is given; zeroed is a valid `rusage`.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0).then_some(usage)
    }?;
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
}

pub fn bench_train(b: &TrainBench) -> Result<TrainBenchResult> {
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(b.device);
    let model = Clip::new(&vs.root(), b.model)?;
    if b.precision.weights_kind() == Kind::BFloat16 {
        vs.bfloat16();
    }
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
    let cfg = StepConfig::new(
        b.precision,
        b.device,
        &crate::config::LossConfig::default(),
        None,
        b.micro_batch_size,
    )?;
    let mut scaler =
        b.precision.scales_loss().then(|| GradScaler::new(b.device, GradScalerConfig::default()));
    let grad_sync =
        crate::grad_sync::GradSync::for_var_store(&vs, &crate::config::DistConfig::default())?;

    let mut run = |steps: u64| -> Result<(f64, Option<f64>)> {
        let started = Instant::now();
        let cpu_started = process_cpu_seconds();
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
                cfg,
                scaler.as_mut(),
            )?);
        }
        // Wait for the device before stopping the clock.
        if let Some(out) = last {
            let _ = out.loss.double_value(&[]);
        }
        let cpu = process_cpu_seconds().zip(cpu_started).map(|(end, start)| end - start);
        Ok((started.elapsed().as_secs_f64(), cpu))
    };
    run(b.warmup_steps)?;
    let (seconds, cpu_seconds) = run(b.steps)?;
    Ok(TrainBenchResult {
        bench: "train",
        model: b.model_name.to_string(),
        device: crate::device::name(b.device),
        batch_size: b.batch_size,
        precision: b.precision.name(),
        steps: b.steps,
        threads: tch::get_num_threads(),
        micro_batch_size: b.micro_batch_size,
        seconds,
        samples_per_second: (b.batch_size as u64 * b.steps) as f64 / seconds,
        cpu_seconds,
        peak_rss_bytes: peak_rss_bytes(),
        cuda_memory_bytes: crate::device::cuda_memory_in_use(b.device),
    })
}
