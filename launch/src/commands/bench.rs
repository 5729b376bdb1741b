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
