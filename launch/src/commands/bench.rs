//! `oxclip bench ...`: throughput as one JSON line, to compare against a baseline measured in
//! the same run (`scripts/bench_open_clip.py` for the training step).

use clap::Args;

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
