//! `oxclip data ...`.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use oxclip_data_loader::sources::{self, shards};
use oxclip_data_loader::tools;
use oxclip_data_loader::tools::pack::{PackConfig, PackSource};
use oxclip_data_loader::tools::synth::{write_synth, SynthConfig};
use oxclip_data_loader::{DataError, DataSpec, SkipCounts};

use crate::progress::progress_bar;

#[derive(Args)]
pub struct PackArgs {
    /// The source: `csv:FILE[?img_key=COL&caption_key=COL]` (or a .csv/.tsv path),
    /// `folder:DIR`, `jsonl:FILE[?img_key=KEY&caption_key=KEY]` (or a .jsonl path), or a
    /// Hugging Face dataset: `parquet:PATH` or `arrow:DIR`
    /// (`[?split=NAME&image_key=COL&caption_key=COL&label_key=COL]`).
    #[arg(long)]
    pub from: String,
    /// Output directory for 00000.tar ... and index.json: new, empty, or an earlier pack's
    /// output (whose shards this pack replaces). A folder holding anything else is refused.
    #[arg(long)]
    pub out: PathBuf,
    /// Write into an --out folder that holds files pack did not write, beside them: shard
    /// names skip every name taken there, and none of those files is overwritten or removed.
    #[arg(long)]
    pub beside_existing: bool,
    /// Samples per shard.
    #[arg(long, default_value_t = 10_000)]
    pub shard_size: u64,
    /// Downscale images whose longer side exceeds this many pixels (re-encoded as JPEG);
    /// others keep their original bytes.
    #[arg(long, value_name = "PX")]
    pub max_side: Option<u32>,
    /// Threads that read, decode and re-encode (default: the machine's cores, at most 16).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args)]
pub struct StatsArgs {
    /// What to read: any data spec (shards, csv:, folder:, jsonl:, parquet:, arrow:,
    /// synthetic:N).
    pub spec: String,
    /// Print exactly one JSON line: {"samples": N, "skipped": {"reason": N}, "shards": N}.
    #[arg(long)]
    pub json: bool,
    /// Threads that read and decode (default: the machine's cores, at most 16).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds a shard read may wait for a byte before the shard counts as a
    /// `stalled_shard` (as `data.read_timeout_s`; 0: wait for ever).
    #[arg(long, default_value_t = shards::DEFAULT_READ_TIMEOUT_S)]
    pub read_timeout_s: f64,
}

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
    /// Seed of the scenes drawn: the same seed writes the same shards.
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

pub fn pack(args: PackArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.shard_size > 0, "--shard-size must be at least 1");
    anyhow::ensure!(
        args.max_side.is_none_or(|px| (1..=65_535).contains(&px)),
        "--max-side must be 1 to 65535 pixels"
    );
    let spec = DataSpec::parse(&args.from)?;
    let files;
    let table;
    let source: PackSource<'_> = match (&spec, sources::open_files(&spec)) {
        (_, Some(opened)) => {
            files = opened?;
            PackSource::Files(&files)
        }
        (DataSpec::Table(spec), None) => {
            table = sources::open_table(spec, None)?.0;
            PackSource::Table(&table)
        }
        (_, None) => anyhow::bail!(
            "--from {}: pack reads csv:FILE, folder:DIR, jsonl:FILE, parquet:PATH or arrow:DIR; shards are already packed (`oxclip data stats` reads them)",
            args.from
        ),
    };
    let cfg = PackConfig {
        shard_size: args.shard_size,
        max_side: args.max_side,
        threads: args.threads.unwrap_or_else(tools::stats::default_threads).max(1),
        beside_existing: args.beside_existing,
        ..PackConfig::default()
    };
    let bar = progress_bar("pack", "samples");
    let summary = tools::pack::pack(source, &args.out, &cfg, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let resized = if summary.resized > 0 {
        format!(" ({} downscaled to --max-side)", summary.resized)
    } else {
        String::new()
    };
    println!(
        "packed {} samples into {} shards in {}{resized}",
        summary.samples,
        summary.shards,
        args.out.display()
    );
    println!("skipped {}", describe_skips(&summary.skipped));
    Ok(())
}

pub fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let spec = DataSpec::parse(&args.spec)?;
    let threads = args.threads.unwrap_or_else(tools::stats::default_threads).max(1);
    let bar = progress_bar("stats", "samples");
    let read_timeout = shards::read_timeout(Some(args.read_timeout_s))
        .map_err(|e| anyhow::anyhow!("--read-timeout-s: {e}"))?;
    let result = tools::stats::stats(&spec, threads, read_timeout, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let nothing_usable =
        || DataError::NoUsableSample { what: spec.to_string(), skipped: result.skipped.clone() };
    if args.json {
        // The counts stay on stdout, exactly one line, even when they make this an error.
        println!("{}", serde_json::to_string(&result)?);
        if result.samples == 0 {
            return Err(nothing_usable().into());
        }
    } else if result.samples == 0 {
        return Err(nothing_usable().into());
    } else {
        let shards =
            if result.shards > 0 { format!(" in {} shards", result.shards) } else { String::new() };
        println!("{}: {} usable samples{shards}", args.spec, result.samples);
        println!("skipped {}", describe_skips(&result.skipped));
    }
    Ok(())
}

/// `3 (undecodable_image: 2, empty_caption: 1)`, or `0`.
fn describe_skips(skips: &SkipCounts) -> String {
    if skips.total() == 0 {
        return "0".into();
    }
    let reasons: Vec<String> = skips.iter().map(|(reason, n)| format!("{reason}: {n}")).collect();
    format!("{} ({})", skips.total(), reasons.join(", "))
}

/// Shows a bar while shards are counted at start-up (any command that opens shards without
/// counts): the data loader reports (shards counted, shards to count).
pub fn show_shard_counting() {
    let bar: std::sync::Mutex<Option<ProgressBar>> = std::sync::Mutex::new(None);
    shards::on_count_progress(move |done, total| {
        let Ok(mut slot) = bar.lock() else { return };
        let shown = slot.get_or_insert_with(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "counting shard samples [{bar:40}] {pos}/{len} shards (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        shown.set_length(total);
        shown.set_position(done);
        if done >= total {
            shown.finish_and_clear();
            *slot = None;
        }
    });
}
