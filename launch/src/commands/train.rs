//! `oxclip train`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Args;

use oxclip_trainer::config::{self, Overrides};
use oxclip_trainer::device;
use oxclip_trainer::train::{fit, Resume};

#[derive(Args)]
pub struct TrainArgs {
    /// The run config (YAML).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a key: `--set train.batch_size=64` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Overrides `run_dir`.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// `auto`: continue from the newest valid checkpoint of the run directory (or start fresh
    /// if there is none); or a checkpoint to continue from: a run folder, its `checkpoints/`
    /// folder or a `checkpoints/step_N` folder.
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
    /// Initial weights for a fresh run; overrides `init.checkpoint`. A run folder (its newest
    /// checkpoint), a `checkpoints/` or `checkpoints/step_N` folder, a model directory, one of
    /// OpenAI's `.pt` files, or a weights file with open_clip or Hugging Face names
    /// (safetensors, or a PyTorch pickle such as `epoch_N.pt`, read without running it).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Threads for libtorch on the CPU (overrides train.threads).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `--set dotted.key=value` flags as the config's overrides.
pub fn config_overrides(set: &[String]) -> anyhow::Result<Overrides> {
    let set = set
        .iter()
        .map(|arg| config::parse_override(arg).map_err(|message| anyhow!("--set {arg}: {message}")))
        .collect::<anyhow::Result<_>>()?;
    Ok(Overrides { set, ..Overrides::default() })
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        run_dir: args.run_dir,
        threads: args.threads,
        init: args.init,
        ..config_overrides(&args.overrides)?
    };
    let cfg = config::load(&args.config, &overrides)?;
    let resume = match args.resume.as_deref() {
        None => Resume::No,
        Some("auto") => Resume::Auto,
        Some(path) if !Path::new(path).exists() => bail!(
            "--resume {path}: no such file or folder; --resume takes `auto` (the newest checkpoint of the run directory) \
             or the path of a run folder, its checkpoints/ folder or a checkpoints/step_N folder"
        ),
        Some(path) => Resume::From(PathBuf::from(path)),
    };
    let world = crate::dist::world_from_env()?;
    let rank = world.as_ref().map_or(0, |w| w.rank);
    let summary = fit(&cfg, &resume, world.as_ref())
        .with_context(|| format!("training {}", cfg.run_dir.display()))?;
    if rank != 0 {
        return Ok(());
    }
    let loss = summary.final_loss.map(|l| format!("; final loss {l:.4}")).unwrap_or_default();
    if let Some(who) = &summary.preempted {
        // A clean stop: exit 0, so that a requeued job simply runs again with --resume auto.
        println!(
            "stopped for preemption after step {} of {} ({who}){loss}",
            summary.steps, summary.total_steps
        );
        if let Some(ckpt) = &summary.last_checkpoint {
            println!("checkpoint: {}", ckpt.display());
        }
        println!("to continue, run the same command with --resume auto");
        println!("tensorboard --logdir {}", cfg.run_dir.join("tensorboard").display());
        return Ok(());
    }
    match summary.resumed_at {
        Some(at) if summary.final_loss.is_none() => {
            // A finished run asked to continue: say so, and that nothing was written.
            if at == summary.total_steps {
                println!("already at step {at} of {}; nothing to train", summary.total_steps);
            } else {
                println!(
                    "the checkpoint is at step {at}, past train.steps ({}); nothing to train",
                    summary.total_steps
                );
            }
            return Ok(());
        }
        Some(at) => println!(
            "resumed at step {at}, trained {} more ({} of {}) on {}{loss}",
            summary.steps - at,
            summary.steps,
            summary.total_steps,
            device::name(summary.device)
        ),
        None => {
            println!("trained {} steps on {}{loss}", summary.steps, device::name(summary.device))
        }
    }
    if let Some(zs) = summary.zero_shot {
        println!(
            "zero-shot {}: top-1 {:.1}%, top-5 {:.1}% on {} held-out images",
            cfg.data.val_name,
            100.0 * zs.top1,
            100.0 * zs.top5,
            zs.samples
        );
    }
    if let Some(ckpt) = summary.last_checkpoint {
        println!("checkpoint: {}", ckpt.display());
    }
    println!("tensorboard --logdir {}", cfg.run_dir.join("tensorboard").display());
    Ok(())
}
