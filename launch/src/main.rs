//! `oxclip`: the command line over the trainer and the data loader. Only this crate knows
//! about flags, terminals, progress bars and exit codes.
//!
//! Floors, bottom up, each using only those below (`tests/module_layers.rs` checks it):
//! 0. `dist` (this process's place in the world, from the environment torchrun, SLURM or
//!    `oxclip launch` set) and `progress` (progress bars);
//! 1. `commands`: one file per command group, the flags several share in `commands/args.rs`;
//! 2. this file: the command tree, the error printing and the exit code.

mod commands;
mod dist;
mod progress;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Rust's allocations go to mimalloc; libtorch's stay with glibc ([`tune_glibc_malloc`]). The
/// loader decodes and batches on threads that every evaluation starts anew, and glibc serves
/// a new thread from an arena that keeps the peak of whatever ran on it before: a long run's
/// resident memory rose by tens of megabytes at each evaluation (docs/benchmarks.md, "Memory
/// over a long run"). mimalloc hands a finished thread's pages to the threads after it, and
/// runs the loader 9% faster.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "oxclip", version, about = "CLIP pre-training, fine-tuning and evaluation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a CLIP model from a YAML run config.
    Train(commands::train::TrainArgs),
    /// Start this node's ranks of a multi-process run (as torchrun does):
    /// `oxclip launch --nproc-per-node 8 -- train --config run.yaml`.
    Launch(commands::launch::LaunchArgs),
    /// Zero-shot classification or image-text retrieval metrics of a checkpoint.
    Eval(commands::eval::EvalArgs),
    /// L2-normalised image and text embeddings into a safetensors file.
    Embed(commands::embed::EmbedArgs),
    /// Zero-shot classify one image among the given labels.
    Classify(commands::embed::ClassifyArgs),
    /// Captions of images by a CoCa model (beam search, top-k or top-p, as open_clip's
    /// `generate`).
    Caption(commands::embed::CaptionArgs),
    /// Embed a dataset once for `search`.
    Index(commands::search::IndexArgs),
    /// The indexed images best matching a text, or captions best matching an image.
    Search(commands::search::SearchArgs),
    /// Texts to token ids (`encode`), and training a new BPE on captions (`train`).
    Tokenizer {
        #[command(subcommand)]
        command: commands::tokenizer::TokenizerCommand,
    },
    /// Write a checkpoint as a directory open_clip or Hugging Face loads:
    /// `oxclip export --checkpoint runs/x --format hf --out exported/`.
    Export(commands::export::ExportArgs),
    /// The built-in models (`oxclip model list`) and what a model config builds
    /// (`oxclip model show ViT-B-32 --json`).
    Model {
        #[command(subcommand)]
        command: commands::model::ModelCommand,
    },
    /// Inspect run configs.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Prepare datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Measure throughput.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a run config resolved: defaults filled in, overrides applied, the model inline.
    Show(ConfigShowArgs),
}

#[derive(Args)]
struct ConfigShowArgs {
    /// The run config (YAML) to resolve.
    #[arg(long)]
    config: PathBuf,
    /// Override a key: `--set train.batch_size=64` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write WebDataset shards of procedurally drawn scenes with captions, plus a held-out
    /// split, class names and prompt templates for zero-shot evaluation.
    Synth(commands::data::SynthArgs),
    /// Write WebDataset shards (plus index.json) from a CSV/TSV, JSONL or image folder,
    /// skipping and counting inputs that cannot be used.
    Pack(commands::data::PackArgs),
    /// Read every sample of a data spec as training would and count the usable and skipped
    /// ones.
    Stats(commands::data::StatsArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training steps (forward, loss, backward, AdamW) on random inputs.
    Train(commands::bench::BenchTrainArgs),
    /// The training data path (decode, RandomResizedCrop, normalise, tokenize, batch) without
    /// a model.
    Loader(commands::bench::BenchLoaderArgs),
    /// The CLIP or SigLIP loss and its gradients alone, tiled or naive: time and peak memory.
    Loss(commands::bench::BenchLossArgs),
    /// The AdamW update alone: the fused kernel against the per-parameter loop it replaced.
    Optim(commands::bench::BenchOptimArgs),
}

/// libtorch's activations are large allocations that glibc serves with a fresh mmap each time
/// once they pass its dynamic threshold, so every one paid for zeroing and faulting in its
/// pages again. Fixing the threshold at the highest value glibc accepts (32 MiB, half its
/// arena heap size) and trimming the heap only above 1 GiB free lets freed buffers be reused.
/// Memory kept for reuse must be kept in few places: glibc opens up to eight arenas per core,
/// each holding its own peak, so libtorch's threads share two (unless `MALLOC_ARENA_MAX` says
/// otherwise). Batch buffers, larger than the threshold, are reused explicitly
/// (`Loader::recycle`).
fn tune_glibc_malloc() {
    const MMAP_ABOVE: libc::c_int = 32 << 20;
    const TRIM_ABOVE: libc::c_int = 1 << 30;
    const ARENAS: libc::c_int = 2;
    let arenas_set_by_user = std::env::var_os("MALLOC_ARENA_MAX").is_some();
    // SAFETY: mallopt only tunes glibc's allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_ABOVE);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_ABOVE);
        if !arenas_set_by_user {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

fn main() -> ExitCode {
    tune_glibc_malloc();
    oxclip_trainer::preempt::ignore_file_size_signal();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OXCLIP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    commands::data::show_shard_counting();
    // Before any tensor exists: lets a CPU-built binary drive CUDA where libtorch_cuda.so is.
    oxclip_trainer::device::load_cuda_backend();

    let result = match cli.command {
        Command::Launch(args) => match commands::launch::run(args) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Train(args) => commands::train::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Embed(args) => commands::embed::embed(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Classify(args) => commands::embed::classify(args),
        Command::Caption(args) => commands::embed::caption(args),
        Command::Tokenizer { command } => commands::tokenizer::run(command),
        Command::Index(args) => commands::search::index(args),
        Command::Search(args) => commands::search::search(args),
        Command::Model { command } => commands::model::run(command),
        Command::Config { command: ConfigCommand::Show(args) } => {
            commands::train::config_overrides(&args.overrides)
                .and_then(|o| Ok(oxclip_trainer::config::show(&args.config, &o)?))
                .map(|yaml| print!("{yaml}"))
        }
        Command::Data { command: DataCommand::Synth(args) } => commands::data::synth(args),
        Command::Data { command: DataCommand::Pack(args) } => commands::data::pack(args),
        Command::Data { command: DataCommand::Stats(args) } => commands::data::stats(args),
        Command::Bench { command: BenchCommand::Train(args) } => commands::bench::train(args),
        Command::Bench { command: BenchCommand::Loader(args) } => commands::bench::loader(args),
        Command::Bench { command: BenchCommand::Loss(args) } => commands::bench::loss(args),
        Command::Bench { command: BenchCommand::Optim(args) } => commands::bench::optim(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            // A message that already quotes its cause (`#[error("...: {0}")]`) is not
            // followed by the same text again.
            let mut shown = err.to_string();
            for cause in err.chain().skip(1) {
                let text = cause.to_string();
                if !shown.contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                shown = text;
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag of every command, and every command, says what it does in `--help`.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!(
                        "{path} --{}",
                        arg.get_long().unwrap_or(arg.get_id().as_str())
                    ));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{name} (the command itself)"));
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "oxclip", &mut missing);
        assert!(missing.is_empty(), "flags or commands without help text:\n{}", missing.join("\n"));
    }
}
