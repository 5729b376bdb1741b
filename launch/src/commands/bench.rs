//! `oxclip bench ...`: throughput as one JSON line, to compare against a baseline measured in
//! the same run (`scripts/bench_open_clip.py` for the training step).

use std::time::Instant;

use clap::Args;
use serde::Serialize;

use oxclip_data_loader::{DataSource, DataSpec, Loader, LoaderConfig, ShardOptions};

use oxclip_trainer::bench::{
    bench_optim, bench_train, peak_rss_bytes, OptimBench, OptimImpl, TrainBench,
};
use oxclip_trainer::config::loss::{SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT};
use oxclip_trainer::config::{self, LossKind, Precision, Tiling};
use oxclip_trainer::device;
use oxclip_trainer::loss::{LossSpec, Matmul};

#[derive(Args)]
pub struct BenchTrainArgs {
    /// A built-in model name or a model YAML.
    #[arg(long)]
    pub model: String,
    /// Samples per step (random images and token ids).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Timed steps, after the warm-up ones.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// libtorch CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `fp32`, `amp` (fp16 autocast and a loss scale), `amp_bf16` (bf16 autocast) or
    /// `pure_bf16` (bf16 weights and optimizer state), as `train.precision`.
    #[arg(long, default_value = "fp32", value_parser = parse_precision)]
    pub precision: Precision,
    /// Gradient caching: run the towers this many samples at a time.
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    /// Patch dropout (FLIP): the fraction of patch tokens each image drops, in [0, 1); 0 is
    /// off. ViT and timm towers only.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub patch_dropout: f64,
    /// Activation checkpointing (`train.grad_checkpointing`): keep only each tower stage's
    /// input and recompute the stage in the backward pass.
    #[arg(long)]
    pub grad_checkpointing: bool,
}

/// What every model benchmark sets up first: libtorch's CPU threads, the model config, the
/// device.
fn model_on_device(
    model: &str,
    device: &str,
    threads: Option<usize>,
) -> anyhow::Result<(oxclip_trainer::model::ModelConfig, tch::Device)> {
    if let Some(t) = threads {
        anyhow::ensure!(t > 0, "--threads must be at least 1");
        tch::set_num_threads(t as i32);
    }
    Ok((config::resolve_model(model)?, device::select(device, "--device")?))
}

pub fn train(args: BenchTrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    if let Some(m) = args.micro_batch_size {
        anyhow::ensure!(
            m > 0 && m <= args.batch_size,
            "--micro-batch-size must be between 1 and --batch-size"
        );
    }
    let (model, device) = model_on_device(&args.model, &args.device, args.threads)?;
    args.precision.check_device(device, "--precision")?;
    let result = bench_train(&TrainBench {
        model_name: &args.model,
        model: &model,
        batch_size: args.batch_size,
        steps: args.steps,
        warmup_steps: args.warmup,
        device,
        precision: args.precision,
        micro_batch_size: args.micro_batch_size,
        patch_dropout: args.patch_dropout,
        grad_checkpointing: args.grad_checkpointing,
    })?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// `--precision` as `train.precision` reads it.
fn parse_precision(text: &str) -> Result<Precision, String> {
    serde_yaml::from_str(text)
        .map_err(|_| format!("`{text}` is not a precision; use fp32, amp, amp_bf16 or pure_bf16"))
}

#[derive(Args)]
pub struct BenchOptimArgs {
    /// A built-in model name or a model YAML.
    #[arg(long)]
    pub model: String,
    /// `loop` or `fused`; both, timed in turn, when not given.
    #[arg(long = "impl", value_enum)]
    pub implementation: Option<ImplArg>,
    /// Timed updates of each, after the warm-up ones.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Untimed updates first.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// libtorch CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImplArg {
    Loop,
    Fused,
}

/// Times the AdamW update alone over a model's parameters: the fused kernel training runs and
/// the per-parameter loop it replaced.
pub fn optim(args: BenchOptimArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    let (model, device) = model_on_device(&args.model, &args.device, args.threads)?;
    let impls: &[OptimImpl] = match args.implementation {
        Some(ImplArg::Loop) => &[OptimImpl::Loop],
        Some(ImplArg::Fused) => &[OptimImpl::Fused],
        None => &[OptimImpl::Loop, OptimImpl::Fused],
    };
    let result = bench_optim(&OptimBench {
        model_name: &args.model,
        model: &model,
        device,
        impls,
        steps: args.steps,
        warmup_steps: args.warmup,
    })?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

#[derive(Args)]
pub struct BenchLoaderArgs {
    /// A data spec: shards, a directory of shards, `synthetic:N`, a table (`parquet:`,
    /// `arrow:`), any other.
    #[arg(long)]
    pub data: String,
    /// Decode/augment threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Output side in pixels (RandomResizedCrop target).
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Tokens per caption.
    #[arg(long, default_value_t = 77)]
    pub context_length: usize,
    /// Samples to time (after one untimed warm-up batch).
    #[arg(long, default_value_t = 2048)]
    pub samples: u64,
    /// Seed of the shuffle and of the random crops.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds a shard read may wait for a byte (`data.read_timeout_s`; 0: for ever, which
    /// reads shard files without the reading thread a deadline needs).
    #[arg(long, default_value_t = oxclip_data_loader::sources::shards::DEFAULT_READ_TIMEOUT_S)]
    pub read_timeout_s: f64,
}

#[derive(Serialize)]
struct LoaderBenchResult {
    bench: &'static str,
    data: String,
    workers: usize,
    batch_size: usize,
    image_size: u32,
    samples: u64,
    seconds: f64,
    samples_per_second: f64,
    samples_per_second_per_worker: f64,
    /// CPU time of the whole process over the timed batches (every loader thread), and the
    /// samples per CPU-second: the work per sample, which a loaded machine distorts less than
    /// the wall time.
    cpu_seconds: Option<f64>,
    samples_per_cpu_second: Option<f64>,
    skipped: u64,
}

/// Times the training data path: the train transform and tokenization, batches as the trainer
/// receives them. Opening the source (reading shard indexes) is not timed.
pub fn loader(args: BenchLoaderArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let read_timeout = oxclip_data_loader::sources::shards::read_timeout(Some(args.read_timeout_s))
        .map_err(|e| anyhow::anyhow!("--read-timeout-s: {e}"))?;
    let options = ShardOptions { read_timeout, ..ShardOptions::default() };
    let data =
        DataSource::open_with(&DataSpec::parse(&args.data)?, args.seed, &options.count_hints())?;
    let tokenizer = oxclip_data_loader::Tokenizer::clip_from_bpe_gz(
        &oxclip_data_loader::tokenizer::default_clip_vocab_path()?,
    )?;
    let mut loader = Loader::open(
        &data,
        &options,
        tokenizer,
        LoaderConfig {
            batch_size: args.batch_size,
            rank: 0,
            world_size: 1,
            seed: args.seed,
            image_size: args.image_size,
            context_length: args.context_length,
            workers: args.workers,
            train: true,
            preprocess: None,
        },
    )?;
    let mut skipped = loader.next_batch()?.skipped.values().sum::<u64>();
    let batches = args.samples.div_ceil(args.batch_size as u64).max(1);
    let started = Instant::now();
    let cpu_before = oxclip_trainer::bench::process_cpu_seconds();
    for _ in 0..batches {
        // As the trainer does: take the batch, hand its buffer back.
        let batch = loader.next_batch()?;
        skipped += batch.skipped.values().sum::<u64>();
        loader.recycle(batch);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = oxclip_trainer::bench::process_cpu_seconds()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let samples = batches * args.batch_size as u64;
    let samples_per_second = samples as f64 / seconds;
    let result = LoaderBenchResult {
        bench: "loader",
        data: args.data,
        workers: args.workers,
        batch_size: args.batch_size,
        image_size: args.image_size,
        samples,
        seconds,
        samples_per_second,
        samples_per_second_per_worker: samples_per_second / args.workers as f64,
        cpu_seconds,
        samples_per_cpu_second: cpu_seconds.filter(|&c| c > 0.0).map(|c| samples as f64 / c),
        skipped,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

#[derive(Args)]
pub struct BenchLossArgs {
    /// Global batch N: the loss scores N x N image-text pairs.
    #[arg(long)]
    pub batch: i64,
    /// Embedding width d.
    #[arg(long, default_value_t = 512)]
    pub dim: i64,
    /// Tile side (0: automatic, 4096).
    #[arg(long, default_value_t = 0)]
    pub tile: i64,
    /// `clip` (softmax) or `siglip` (sigmoid).
    #[arg(long, value_enum, default_value_t = KindArg::Clip)]
    pub kind: KindArg,
    /// Build the whole N x N blocks instead (the oracle), for comparison.
    #[arg(long)]
    pub naive: bool,
    /// bf16 inputs to the products, as training under amp_bf16 on CUDA runs them.
    #[arg(long)]
    pub bf16: bool,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Seed of the random features scored.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    Clip,
    Siglip,
}

#[derive(Serialize)]
struct LossBenchResult {
    bench: &'static str,
    kind: &'static str,
    batch: i64,
    dim: i64,
    tile: Option<i64>,
    matmul: &'static str,
    /// As [`device::name`] writes it (`cpu`, `cuda:0`), like every other message.
    device: String,
    seconds: f64,
    /// The process's peak resident memory (VmHWM), start-up included.
    peak_rss_bytes: Option<u64>,
    /// On CUDA: device memory in use afterwards (libtorch's cache holds its peak).
    cuda_memory_bytes: Option<u64>,
    loss: f64,
}

/// One evaluation of the loss and all its gradients on random unit features: time, peak
/// memory and the loss, for the tiled version or the N x N oracle.
pub fn loss(args: BenchLossArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch > 0 && args.dim > 0, "--batch and --dim must be positive");
    anyhow::ensure!(
        !(args.naive && args.bf16),
        "--bf16 applies to the tiled loss, not the --naive oracle"
    );
    let device = device::select(&args.device, "--device")?;
    tch::manual_seed(args.seed);
    let unit = |t: tch::Tensor| oxclip_trainer::model::normalize(&t);
    let image = unit(tch::Tensor::randn([args.batch, args.dim], (tch::Kind::Float, device)));
    let text =
        unit(&image + tch::Tensor::randn([args.batch, args.dim], (tch::Kind::Float, device)) * 0.5);
    let (kind, scale, bias) = match args.kind {
        KindArg::Clip => (LossKind::Clip, oxclip_trainer::model::LOGIT_SCALE_INIT, None),
        KindArg::Siglip => {
            (LossKind::Siglip, SIGLIP_LOGIT_SCALE_INIT, Some(SIGLIP_LOGIT_BIAS_INIT))
        }
    };
    let logit_scale = tch::Tensor::from(scale as f32).to_device(device);
    let logit_bias = bias.map(|b| tch::Tensor::from(b as f32).to_device(device));
    let matmul = if args.bf16 { Matmul::Bf16 } else { Matmul::Fp32 };
    let spec = LossSpec {
        kind,
        tiling: Tiling::from_flags(args.tile.max(0) as usize, args.naive),
        matmul,
        coca: None,
    };
    let started = Instant::now();
    let out = spec.compute(&image, &text, &logit_scale, logit_bias.as_ref(), 0..args.batch)?;
    let loss = out.loss.double_value(&[]);
    // Reading the gradients waits for the device.
    let _ = (out.grad_image.sum(tch::Kind::Float) + out.grad_text.sum(tch::Kind::Float))
        .double_value(&[]);
    let seconds = started.elapsed().as_secs_f64();
    let result = LossBenchResult {
        bench: "loss",
        kind: match args.kind {
            KindArg::Clip => "clip",
            KindArg::Siglip => "siglip",
        },
        batch: args.batch,
        dim: args.dim,
        tile: (!args.naive).then(|| oxclip_trainer::loss::effective_tile(args.tile, args.batch)),
        matmul: if args.bf16 { "bf16" } else { "fp32" },
        device: device::name(device),
        seconds,
        peak_rss_bytes: peak_rss_bytes(),
        cuda_memory_bytes: device::cuda_memory_in_use(device),
        loss,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
