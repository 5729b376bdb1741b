//! `oxclip data ...`.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use oxclip_data_loader::synth::{write_synth, SynthConfig};

#[derive(Args)]
pub struct SynthArgs {
    /// Output directory: train/ and val/ shards, classnames.txt, templates.txt.
    #[arg(long)]
    pub out: PathBuf,
    /// Training samples.
    #[arg(long, default_value_t = 20_000)]
    pub samples: u64,
    /// Held-out single-object samples for zero-shot evaluation.
    #[arg(long, default_value_t = 2_000)]
    pub val_samples: u64,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    /// Samples per shard.
    #[arg(long, default_value_t = 2_000)]
    pub shard_size: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn synth(args: SynthArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.samples > 0, "--samples must be at least 1");
    anyhow::ensure!(args.shard_size > 0, "--shard-size must be at least 1");
    anyhow::ensure!(args.image_size >= 16, "--image-size must be at least 16 pixels");
    let cfg = SynthConfig {
        samples: args.samples,
        val_samples: args.val_samples,
        image_size: args.image_size,
        shard_size: args.shard_size,
        seed: args.seed,
    };
    let bar = ProgressBar::new(args.samples + args.val_samples);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} samples ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("synth");
    let summary = write_synth(&args.out, &cfg, &mut |n| bar.set_position(n))?;
    bar.finish_and_clear();
    println!("wrote {} to {}", summary, args.out.display());
    Ok(())
}
