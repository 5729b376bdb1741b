//! `oxclip bench ...`: throughput as one JSON line, to compare against a baseline measured in
//! the same run (`scripts/bench_open_clip.py` for the training step).

use std::time::Instant;

use clap::Args;
use serde::Serialize;

use oxclip_data_loader::{DataSource, DataSpec, Loader, LoaderConfig, ShardOptions};

use oxclip_trainer::bench::{bench_train, TrainBench};
use oxclip_trainer::device;

use crate::config;

#[derive(Args)]
pub struct BenchTrainArgs {
    /// A built-in model name or a model YAML.
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
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
    /// bf16 autocast for the towers (CUDA only).
    #[arg(long)]
    pub amp_bf16: bool,
}

pub fn train(args: BenchTrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    if let Some(t) = args.threads {
        anyhow::ensure!(t > 0, "--threads must be at least 1");
        tch::set_num_threads(t as i32);
    }
    let model = config::resolve_model(&args.model)?;
    let device = device::resolve(device::parse(&args.device)?)?;
    let result = bench_train(&TrainBench {
        model_name: &args.model,
        model: &model,
        batch_size: args.batch_size,
        steps: args.steps,
        warmup_steps: args.warmup,
        device,
        autocast_bf16: args.amp_bf16 && device.is_cuda(),
    })?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

#[derive(Args)]
pub struct BenchLoaderArgs {
    /// A data spec: shards, a directory of shards, `synthetic:N`.
    #[arg(long)]
    pub data: String,
    /// Decode/augment threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
    skipped: u64,
}

/// Times the training data path: the train transform and tokenization, batches as the trainer
/// receives them. Opening the source (reading shard indexes) is not timed.
pub fn loader(args: BenchLoaderArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let data = DataSource::open(&DataSpec::parse(&args.data)?, args.seed)?;
    let tokenizer = oxclip_data_loader::Tokenizer::clip_from_bpe_gz(&oxclip_data_loader::tokenizer::default_clip_vocab_path()?)?;
    let mut loader = Loader::open(
        &data,
        &ShardOptions::default(),
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
        },
    )?;
    let mut skipped = loader.next_batch()?.skipped.values().sum::<u64>();
    let batches = args.samples.div_ceil(args.batch_size as u64).max(1);
    let started = Instant::now();
    for _ in 0..batches {
        // As the trainer does: take the batch, hand its buffer back.
        let batch = loader.next_batch()?;
        skipped += batch.skipped.values().sum::<u64>();
        loader.recycle(batch);
    }
    let seconds = started.elapsed().as_secs_f64();
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
    /// Build the whole N x N blocks instead (the oracle), for comparison.
    #[arg(long)]
    pub naive: bool,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

#[derive(Serialize)]
struct LossBenchResult {
    bench: &'static str,
    batch: i64,
    dim: i64,
    tile: Option<i64>,
    device: String,
    seconds: f64,
    /// The process's peak resident memory (VmHWM), start-up included.
    peak_rss_bytes: Option<u64>,
    loss: f64,
}

/// The process's peak resident set size, from /proc/self/status (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One evaluation of the CLIP loss and all its gradients on random unit features: time, peak
/// memory and the loss, for the tiled version or the N x N oracle.
pub fn loss(args: BenchLossArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch > 0 && args.dim > 0, "--batch and --dim must be positive");
    let device = device::resolve(device::parse(&args.device)?)?;
    tch::manual_seed(args.seed);
    let unit = |t: tch::Tensor| oxclip_trainer::model::normalize(&t);
    let image = unit(tch::Tensor::randn([args.batch, args.dim], (tch::Kind::Float, device)));
    let text = unit(&image + tch::Tensor::randn([args.batch, args.dim], (tch::Kind::Float, device)) * 0.5);
    let logit_scale = tch::Tensor::from((1.0f64 / 0.07).ln() as f32).to_device(device);
    let started = Instant::now();
    let out = if args.naive {
        oxclip_trainer::loss::clip::clip_loss_naive(&image, &text, &logit_scale, 0..args.batch)
    } else {
        oxclip_trainer::loss::clip::clip_loss(&image, &text, &logit_scale, 0..args.batch, args.tile)
    };
    let loss = out.loss.double_value(&[]);
    let _ = out.grad_image.sum(tch::Kind::Float).double_value(&[]);
    let seconds = started.elapsed().as_secs_f64();
    let result = LossBenchResult {
        bench: "loss",
        batch: args.batch,
        dim: args.dim,
        tile: (!args.naive).then_some(if args.tile <= 0 { oxclip_trainer::loss::clip::AUTO_TILE } else { args.tile }),
        device: format!("{device:?}"),
        seconds,
        peak_rss_bytes: peak_rss_bytes(),
        loss,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
