//! The training loop, nanoGPT's shape: schedule, step, metrics, checkpoint and eval, each a
//! call. Counters and the loader position live in one `TrainerState` that checkpoints save.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use oxclip_data_loader::{
    DataSource, DataSpec, Loader, LoaderConfig, LoaderState, Preprocess, SkipCounts, Tokenizer,
};
use tch::{nn, Device, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::collectives::{self, Collectives, WorldEnv};
use crate::config::{DataConfig, RunConfig};
use crate::device;
use crate::error::{io_err, Result, TrainError};
use crate::eval::metrics::ZeroShotResult;
use crate::eval::{benchmark, pass, sets};
use crate::grad_sync::GradSync;
use crate::metrics::MetricsWriter;
use crate::model::patch_dropout::PatchDropout;
use crate::model::Clip;
use crate::optim::AdamW;
use crate::precision::{GradScaler, GradScalerConfig, GradScalerState};
use crate::run_lock::RunLock;
use crate::schedule::Schedule;
use crate::step::{self, StepConfig};
use crate::weights_path::{self, Found};

/// Where a run starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Fresh weights; refuses a run directory that already holds checkpoints.
    No,
    /// The newest valid checkpoint of the run directory, or fresh if there is none.
    Auto,
    /// A given checkpoint directory.
    From(PathBuf),
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The step the run stands at now.
    pub steps: u64,
    /// `train.steps`, the step the run was asked to reach.
    pub total_steps: u64,
    /// The checkpoint's step when the run was resumed; `None` for a fresh run.
    pub resumed_at: Option<u64>,
    /// The loss of the last step; `None` when no step ran (a finished run resumed).
    pub final_loss: Option<f64>,
    pub zero_shot: Option<ZeroShotResult>,
    pub last_checkpoint: Option<PathBuf>,
    pub device: Device,
    /// Set when a preemption signal stopped the run before `total_steps`: which rank got
    /// which signal. The checkpoint at `steps` is written and durable.
    pub preempted: Option<String>,
}

/// The sets evaluated during and after training: `data.val`, then `eval.datasets`.
struct ValTask {
    sets: Vec<ValSet>,
}

/// One evaluation set.
struct ValSet {
    name: String,
    source: DataSource,
    /// Class names and prompt templates, when the set is labelled for zero-shot.
    zero_shot: Option<(Vec<String>, Vec<String>)>,
    /// A clip_benchmark retrieval set (several captions per image), scored as clip_benchmark
    /// does; otherwise `data.val`'s pairs are scored as open_clip does.
    multi_caption: bool,
    /// A set of `eval.datasets`: its tags all carry its name, and a classification set is not
    /// scored for retrieval (its captions are class indices).
    benchmark: bool,
    /// Opened at the first evaluation and kept: each evaluation is its next pass (the same
    /// samples in the same order), filling the batch buffers the last one handed back instead
    /// of allocating tens of megabytes anew on fresh threads (docs/benchmarks.md, "Memory
    /// over a long run").
    loader: Option<Loader>,
}

/// Everything a run holds while it trains: built by [`prepare`], advanced by [`fit`]'s loop.
struct Run<'a> {
    cfg: &'a RunConfig,
    device: Device,
    comm: Box<dyn Collectives>,
    vs: nn::VarStore,
    model: Clip,
    optimizer: AdamW,
    loader: Loader,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    val_task: Option<ValTask>,
    /// The counters and loader position a checkpoint saves.
    state: TrainerState,
    resumed_at: Option<u64>,
    schedule: Schedule,
    step_cfg: StepConfig,
    /// The loss scale under `precision: amp`.
    scaler: Option<GradScaler>,
    /// The gradient buckets over the model's parameters.
    grad_sync: GradSync,
    /// Rank 0's TensorBoard writer; `None` on the other ranks, which write nothing.
    metrics: Option<MetricsWriter>,
    key_log: Option<KeyLog>,
    interval: Interval,
    /// The samples this rank skipped since the run (or resume) started, by reason, as the
    /// run's last log line gives them.
    skips: SkipCounts,
    /// Rank 0's checkpoints go to disk on its thread while training goes on.
    writer: checkpoint::Writer,
    /// Rank 0's hold on the run folder (run_lock), released as the run ends.
    _run_lock: Option<RunLock>,
}

/// What the loop reports at its end.
#[derive(Default)]
struct Outcome {
    final_loss: Option<f64>,
    zero_shot: Option<ZeroShotResult>,
    last_checkpoint: Option<PathBuf>,
    preempted: Option<String>,
}

/// Trains the run `cfg` describes to `train.steps`, from where `resume` says, as one rank of
/// `world` (`None`: a single process): nanoGPT's loop, each part a function.
pub fn fit(cfg: &RunConfig, resume: &Resume, world: Option<&WorldEnv>) -> Result<TrainSummary> {
    // Before anything slow (the rendezvous, loading): a signal from now on stops the run at a
    // step boundary instead of killing it.
    crate::preempt::install(&cfg.train.preempt_signals)?;
    let mut run = match prepare(cfg, resume, world)? {
        Start::Train(run) => run,
        Start::Finished(summary) => return Ok(summary),
    };
    // A rank that fails tells the others why: their collective then ends with this rank's
    // cause, not with a timeout or a closed connection.
    let trained = train_steps(&mut run).and_then(|outcome| finish(&mut run, outcome));
    if let Err(e) = &trained {
        run.comm.abort(&e.to_string());
    }
    trained
}

/// The steps from where the run stands to `train.steps` (or a preemption).
fn train_steps(run: &mut Run) -> Result<Outcome> {
    let cfg = run.cfg;
    let steps = cfg.train.steps;
    let mut outcome = Outcome::default();
    run.model.set_training(true);
    while run.state.step < steps {
        let started = Instant::now();
        let (images, tokens, skipped) = next_batch(run)?;
        let data_secs = started.elapsed().as_secs_f64();
        let lr = run.schedule.lr(run.state.step);
        let out = step::train_step(
            &run.model,
            &mut run.optimizer,
            run.comm.as_ref(),
            &run.grad_sync,
            &images,
            &tokens,
            lr,
            run.state.step,
            run.step_cfg,
            run.scaler.as_mut(),
        )?;
        run.state.step += 1;
        run.state.samples_seen += run.global_batch();
        run.interval.add(data_secs, started.elapsed().as_secs_f64(), out.comm_secs, skipped);

        let (step, last) = (run.state.step, run.state.step == steps);
        if last || every(step, cfg.train.log_every) {
            outcome.final_loss = Some(log_step(run, &out, lr)?);
        }
        // A background checkpoint write that failed (a full disk) stops the run now.
        run.writer.check()?;
        let saved = last || every(step, cfg.train.checkpoint_every);
        if saved {
            outcome.last_checkpoint = save_checkpoint(run)?.or(outcome.last_checkpoint);
        }
        if run.val_task.is_some() && (last || every(step, cfg.train.eval_every)) {
            outcome.zero_shot = evaluate(run)?.or(outcome.zero_shot);
        }
        if !last && stop_for_preemption(run, saved, &mut outcome)? {
            break;
        }
    }
    Ok(outcome)
}

/// Whether any rank was signalled to stop; if so, every rank checkpoints this step (unless it
/// just did). Asked every step, so that all ranks stop after the same one whichever was signalled.
fn stop_for_preemption(run: &mut Run, saved: bool, outcome: &mut Outcome) -> Result<bool> {
    let signalled = crate::preempt::agree(run.comm.as_ref())?;
    if signalled.is_empty() {
        return Ok(false);
    }
    let who = crate::preempt::describe(&signalled);
    tracing::warn!(
        "preempted after step {} of {} ({who}): checkpointing, then stopping",
        run.state.step,
        run.cfg.train.steps
    );
    if !saved {
        outcome.last_checkpoint = save_checkpoint(run)?.or(outcome.last_checkpoint.take());
    }
    outcome.preempted = Some(who);
    Ok(true)
}

/// `step` is a multiple of `n` (never, for 0).
fn every(step: u64, n: u64) -> bool {
    n > 0 && step.is_multiple_of(n)
}

/// What [`prepare`] found: a run to train, or a finished run resumed (nothing to load,
/// train, evaluate or write).
enum Start<'a> {
    Train(Box<Run<'a>>),
    Finished(TrainSummary),
}

/// Checks the config, joins the other ranks, builds the model, opens the data and restores a
/// checkpoint, then writes the run directory.
fn prepare<'a>(cfg: &'a RunConfig, resume: &Resume, world: Option<&WorldEnv>) -> Result<Start<'a>> {
    cfg.validate()?;
    // One run per run folder: rank 0 holds its lock from here to the end (a folder made later
    // is locked as it is made, in start_run_dir). Taken first, so that a second run into a
    // folder in use stops before it opens anything.
    let mut run_lock = match world.is_none_or(|w| w.rank == 0) {
        true => RunLock::take_if_exists(&cfg.run_dir)?,
        false => None,
    };
    // What config.yaml and every checkpoint hold, and what the ranks must agree on.
    let resolved = cfg.to_yaml();
    // An evaluation set that cannot be scored fails the run now, not at its first eval.
    let val_task = val_task(&cfg.data, &cfg.eval, cfg.train.seed)?;
    if let Some(threads) = cfg.train.threads {
        tch::set_num_threads(threads as i32);
    }
    let device = training_device(cfg, world)?;
    cfg.train.precision.check_device(device, "train.precision")?;
    let step_cfg = step_config(cfg, device)?;
    cfg.dist.validate_for_world(world.map_or(1, |w| w.world_size))?;
    let comm = collectives::connect(world, &cfg.dist, device)?;
    check_same_config(comm.as_ref(), &resolved)?;

    let resume_from = resume_dir(cfg, resume)?;
    let resumed_at =
        resume_from.as_deref().map(checkpoint::read_state).transpose()?.map(|s| s.step);
    if let Some(at) = resumed_at.filter(|&at| at >= cfg.train.steps) {
        let total_steps = cfg.train.steps;
        let summary = TrainSummary {
            steps: at,
            total_steps,
            resumed_at,
            final_loss: None,
            zero_shot: None,
            last_checkpoint: None,
            device,
            preempted: None,
        };
        return Ok(Start::Finished(summary));
    }
    let init = init_weights(cfg, resume_from.is_some())?;
    let (vs, model) = build_model(cfg, device, init.as_ref())?;
    let mut grad_sync = GradSync::for_var_store(&vs, &cfg.dist)?;
    grad_sync.split(comm.rank(), comm.world_size())?;
    let mut optimizer = optimizer_for(&vs, &grad_sync, cfg)?;
    if let (Some(found), true) = (&init, cfg.init.as_ref().is_some_and(|i| i.optimizer)) {
        init_optimizer(&vs, &mut optimizer, found)?;
    }
    let tokenizer = cfg.data.tokenizer(&cfg.model)?;
    let preprocess = cfg.data.preprocess(&cfg.model)?;
    let mut loader = open_loader(cfg, comm.as_ref(), &tokenizer, &preprocess)?;
    let skips = loader.load_skips();
    let load_skips = skips.total();
    let mut scaler = cfg
        .train
        .precision
        .scales_loss()
        .then(|| GradScaler::new(device, GradScalerConfig::default()));
    let state = match &resume_from {
        Some(dir) => restore(&resolved, dir, comm.as_ref(), &vs, &mut optimizer, &mut loader)?,
        None => TrainerState {
            step: 0,
            samples_seen: 0,
            seed: cfg.train.seed,
            loader: loader.state(),
            rank_loaders: Vec::new(),
            grad_scaler: None,
            config: resolved.clone(),
        },
    };
    if let Some(scaler) = scaler.as_mut() {
        match &state.grad_scaler {
            Some(saved) => scaler.load_state(saved)?,
            None if resume_from.is_some() => tracing::info!(
                "the checkpoint holds no loss scale (it was not written by a train.precision amp \
                 run): starting at {}",
                GradScalerConfig::default().init_scale
            ),
            None => {}
        }
    }
    let (metrics, key_log) = start_run_dir(cfg, &resolved, comm.as_ref(), &mut run_lock)?;
    // Identical weights everywhere, whatever each rank initialised or loaded.
    broadcast_weights(comm.as_ref(), &vs)?;
    Ok(Start::Train(Box::new(Run {
        cfg,
        device,
        comm,
        vs,
        model,
        optimizer,
        loader,
        tokenizer,
        preprocess,
        val_task,
        state,
        resumed_at,
        schedule: schedule(cfg),
        step_cfg,
        scaler,
        grad_sync,
        metrics,
        key_log,
        interval: Interval { skipped_total: load_skips, ..Interval::default() },
        skips,
        writer: checkpoint::Writer::default(),
        _run_lock: run_lock,
    })))
}

/// `train.device`, resolved for this rank (see [`device::for_rank`]): the one place a training
/// run picks its GPU, before the collectives bind to it.
fn training_device(cfg: &RunConfig, world: Option<&WorldEnv>) -> Result<Device> {
    let cuda_count = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let placement = world.map(|w| device::Placement {
        rank: w.rank,
        local_rank: w.local_rank,
        local_world_size: w.local_world_size,
    });
    device::for_rank(&cfg.train.device, placement.as_ref(), cuda_count, visible.as_deref())
}

/// Initial weights of a fresh run (fine-tuning). From a directory with its own config, the
/// run's model must be that one, checked before anything is built.
fn init_weights(cfg: &RunConfig, resuming: bool) -> Result<Option<Found>> {
    let Some(path) = cfg.init.as_ref().map(|i| &i.checkpoint).filter(|_| !resuming) else {
        return Ok(None);
    };
    let found = weights_path::locate(path)
        .map_err(|e| TrainError::Config(format!("init.checkpoint (--init) {e}")))?;
    if let Some(dir) = found.pretrained()? {
        if let Some(msg) = crate::interchange::pretrained::contradiction(
            &dir.dir,
            &dir.model,
            "the run's model",
            &cfg.model,
        ) {
            return Err(TrainError::Config(format!("init.checkpoint (--init): {msg}")));
        }
    }
    Ok(Some(found))
}

/// The model (its initial weights fixed by the seed, or loaded from `init`) and its frozen
/// towers.
fn build_model(
    cfg: &RunConfig,
    device: Device,
    init: Option<&Found>,
) -> Result<(nn::VarStore, Clip)> {
    let train = &cfg.train;
    tch::manual_seed(train.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let model = Clip::new(&vs.root(), &cfg.model)?;
    // pure_bf16: every float weight and buffer in bf16 (open_clip's `model.to(bfloat16)`),
    // before the optimizer (built after), whose moments then are bf16 too; weights loaded
    // below convert.
    if train.precision.weights_kind() == tch::Kind::BFloat16 {
        vs.bfloat16();
    }
    // Frozen towers (fine-tuning): before the optimizer, which then never sees them.
    for (on, tower, unlocked) in [
        (train.lock_image, crate::model::lock::Tower::Image, train.lock_image_unlocked_groups),
        (train.lock_text, crate::model::lock::Tower::Text, train.lock_text_unlocked_layers),
    ] {
        if on {
            let frozen = crate::model::lock::lock_with(
                &vs,
                &cfg.model,
                tower,
                unlocked,
                train.lock_text_freeze_layer_norm,
            )?;
            tracing::info!("{tower:?} tower locked: {frozen} tensors frozen, its last {unlocked} group(s) train");
        }
    }
    if train.lock_image && train.lock_image_freeze_bn_stats {
        model.freeze_batch_norm();
    }
    tracing::info!(
        "model: {} parameters on {}",
        crate::model::num_params(&vs),
        device::name(device)
    );
    if let Some(found) = init {
        crate::interchange::weights::load_weights(&vs, &found.weights())?;
        tracing::info!("initial weights from {} ({})", found.weights().display(), found.describe());
    } else if cfg.model.text_cfg.is_hf() && cfg.model.text_cfg.hf_model_pretrained {
        // open_clip's hf_model_pretrained: the text tower starts from the text model's weights.
        let path = crate::interchange::hf_text::load_pretrained_text(&vs, &cfg.model)?;
        tracing::info!("text tower's initial weights from {}", path.display());
    }
    Ok((vs, model))
}

/// `init.optimizer`: open_clip's AdamW state from the training checkpoint the run starts
/// from, its moments named by `interchange::open_clip_train` for the parameters this run
/// trains, and its step (so bias correction goes on where open_clip's stopped).
fn init_optimizer(vs: &nn::VarStore, optimizer: &mut AdamW, found: &Found) -> Result<()> {
    let trainable = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(name, _)| name)
        .collect();
    let path = found.weights();
    crate::interchange::open_clip_train::optimizer_state(&path, &trainable)
        .and_then(|state| optimizer.load_state_tensors(&state))
        .map_err(|e| TrainError::Config(format!("init.optimizer: {e}")))?;
    tracing::info!(
        "optimizer state from {} (open_clip's AdamW after {} steps)",
        path.display(),
        optimizer.steps_taken()
    );
    Ok(())
}

/// AdamW over what trains: every trainable parameter, or under `dist.shard` this rank's
/// pieces of them. Says how many bytes of state this rank holds.
fn optimizer_for(vs: &nn::VarStore, grad_sync: &GradSync, cfg: &RunConfig) -> Result<AdamW> {
    let optimizer = grad_sync.adamw(vs, cfg.optim.adamw())?;
    tracing::info!(
        "optimizer: {:.1} MB of AdamW moments on this rank (dist.shard: {})",
        optimizer.state_bytes() as f64 / 1e6,
        cfg.dist.shard.name()
    );
    Ok(optimizer)
}

/// This rank's training loader over `data.train`.
fn open_loader(
    cfg: &RunConfig,
    comm: &dyn Collectives,
    tokenizer: &Tokenizer,
    preprocess: &Preprocess,
) -> Result<Loader> {
    let shard_options = cfg.data.shard_options()?;
    let train_set = DataSource::open_with(
        &DataSpec::parse(&cfg.data.train)?,
        cfg.train.seed,
        &shard_options.count_hints(),
    )?;
    let loader = Loader::open(
        &train_set,
        &shard_options,
        tokenizer.clone(),
        LoaderConfig {
            batch_size: cfg.train.batch_size,
            rank: comm.rank(),
            world_size: comm.world_size(),
            seed: cfg.train.seed,
            image_size: cfg.model.vision_cfg.image_size as u32,
            context_length: cfg.model.text_cfg.context_length as usize,
            workers: cfg.data.workers,
            train: true,
            preprocess: Some(preprocess.clone()),
        },
    )?;
    // Samples already found bad while opening the shards count towards `data/skipped`.
    let load_skips: u64 = loader.load_skips().values().sum();
    if load_skips > 0 {
        tracing::warn!(
            "{load_skips} bad sample(s) skipped while reading {}: {}",
            cfg.data.train,
            loader.load_skips()
        );
    }
    tracing::info!(
        "training data: {} samples; this rank reads {} per epoch, {} batches",
        loader.dataset_len(),
        loader.samples_per_epoch(),
        loader.batches_per_epoch()
    );
    Ok(loader)
}

/// Loads the checkpoint in `dir` into the model, the optimizer and this rank's loader
/// position, and says which config keys changed since it was written.
fn restore(
    resolved: &str,
    dir: &Path,
    comm: &dyn Collectives,
    vs: &nn::VarStore,
    optimizer: &mut AdamW,
    loader: &mut Loader,
) -> Result<TrainerState> {
    let state = checkpoint::load(dir, vs, optimizer)?;
    let position = match state.rank_loaders.get(comm.rank()) {
        Some(mine) if state.rank_loaders.len() == comm.world_size() => mine.clone(),
        _ => state.loader.clone(),
    };
    loader.restore(&position)?;
    let changes = config_changes(&state.config, resolved);
    if comm.rank() == 0 && !changes.is_empty() {
        tracing::warn!(
            "resuming {} with a config that differs from the checkpoint's: {}",
            dir.display(),
            changes.join("; ")
        );
    }
    tracing::info!("resumed from {} at step {}", dir.display(), state.step);
    Ok(state)
}

/// Writes the run directory and its config, and opens the writers: only now, with the model,
/// the weights and the data open on every rank, so a run that fails to start leaves nothing
/// behind. Only rank 0 writes events and checkpoints, and holds the folder's lock: taken here
/// if the folder did not exist when the run started (`run_lock`).
fn start_run_dir(
    cfg: &RunConfig,
    resolved: &str,
    comm: &dyn Collectives,
    run_lock: &mut Option<RunLock>,
) -> Result<(Option<MetricsWriter>, Option<KeyLog>)> {
    comm.barrier()?;
    fs::create_dir_all(&cfg.run_dir).map_err(io_err(&cfg.run_dir))?;
    let is_rank0 = comm.rank() == 0;
    if is_rank0 && run_lock.is_none() {
        *run_lock = Some(RunLock::take(&cfg.run_dir)?);
    }
    if is_rank0 {
        let config_path = cfg.run_dir.join("config.yaml");
        fs::write(&config_path, resolved).map_err(io_err(&config_path))?;
    }
    let key_log =
        if cfg.data.log_keys { Some(KeyLog::open(&cfg.run_dir, comm.rank())?) } else { None };
    let metrics = if is_rank0 { Some(MetricsWriter::new(&cfg.run_dir)?) } else { None };
    Ok((metrics, key_log))
}

fn schedule(cfg: &RunConfig) -> Schedule {
    let optim = &cfg.optim;
    Schedule {
        kind: optim.schedule,
        base_lr: optim.lr,
        warmup_steps: optim.warmup_steps,
        total_steps: cfg.train.steps,
        cooldown_steps: optim.cooldown_steps,
        cooldown_power: optim.cooldown_power,
        cooldown_end_lr: optim.cooldown_end_lr,
    }
}

/// The step's settings, chosen once: the towers' autocast and the loss's products as
/// `train.precision` says, on the CPU as on CUDA, and patch dropout.
fn step_config(cfg: &RunConfig, device: Device) -> Result<StepConfig> {
    Ok(StepConfig {
        patch_dropout: patch_dropout(cfg),
        grad_checkpointing: cfg.train.grad_checkpointing,
        ..StepConfig::new(
            cfg.train.precision,
            device,
            &cfg.loss,
            cfg.optim.grad_clip_norm,
            cfg.train.micro_batch_size,
        )?
    })
}

/// `train.force_patch_dropout`, else the model's `vision_cfg.patch_dropout`, said once at the
/// start; `None` when it is 0.
fn patch_dropout(cfg: &RunConfig) -> Option<PatchDropout> {
    let (prob, key) = cfg.train.patch_dropout(&cfg.model);
    if prob > 0.0 {
        tracing::info!(
            "patch dropout {prob} ({key}): each image drops that fraction of its patch tokens \
             in training"
        );
    } else if cfg.model.vision_cfg.patch_dropout > 0.0 {
        tracing::info!(
            "patch dropout off ({key}: {prob}, over the model's vision_cfg.patch_dropout)"
        );
    }
    (prob > 0.0).then_some(PatchDropout { prob, seed: cfg.train.seed })
}

impl Run<'_> {
    fn global_batch(&self) -> u64 {
        (self.cfg.train.batch_size * self.comm.world_size()) as u64
    }
}

/// The next batch on the device (images, tokens) and the bad samples skipped to fill it;
/// its keys go to the key log.
fn next_batch(run: &mut Run) -> Result<(Tensor, Tensor, u64)> {
    let batch = run.loader.next_batch()?;
    let model = &run.cfg.model;
    let (images, tokens) = crate::device::batch_to_device(
        &batch,
        model.vision_cfg.image_size,
        model.text_cfg.context_length,
        run.device,
    )?;
    if let Some(log) = run.key_log.as_mut() {
        log.write(run.state.step + 1, &batch.keys)?;
    }
    let skipped: u64 = batch.skipped.values().sum();
    run.skips.merge(&batch.skipped);
    run.loader.recycle(batch);
    Ok((images, tokens, skipped))
}

/// Reads the step's loss (a wait for the device, hence only when logging), fails on a
/// non-finite one, and logs the interval since the last log line. Returns the loss.
fn log_step(run: &mut Run, out: &step::StepOutput, lr: f64) -> Result<f64> {
    let loss = out.loss.double_value(&[]);
    // amp: the loss scale, and whether the logged step was skipped for inf/NaN gradients.
    let amp = match &run.scaler {
        Some(s) => Some((s.state()?, s.found_inf().double_value(&[]) != 0.0)),
        None => None,
    };
    if !loss.is_finite() {
        match amp {
            // A step whose fp16 forward overflowed is skipped and the scale backed off; should
            // every step overflow, the scale falls to 0 and the run stops below.
            Some((_, true)) => tracing::warn!(
                "step {}: the loss is not finite ({loss}) in fp16; the step was skipped",
                run.state.step
            ),
            _ => return Err(TrainError::NonFiniteLoss { step: run.state.step, loss }),
        }
    }
    if let Some((s, _)) = amp.filter(|(s, _)| !(s.scale > 0.0 && s.scale.is_finite())) {
        return Err(TrainError::LossScale {
            step: run.state.step,
            scale: s.scale,
            skipped: s.skipped_steps,
        });
    }
    let scale = run.model.logit_scale.exp().double_value(&[]);
    let bias = run.model.logit_bias.as_ref().map(|b| b.double_value(&[]));
    let coca_parts =
        out.coca_parts.as_ref().map(|(c, cap)| (c.double_value(&[]), cap.double_value(&[])));
    let grad_norm = out.grad_norm.as_ref().map(|n| n.double_value(&[]));
    // Skips are counted per rank; the log shows the run's total.
    run.interval.skipped_total_all_ranks =
        collectives::all_gather_u64(run.comm.as_ref(), run.interval.skipped_total)?.iter().sum();
    run.state.loader = run.loader.state(); // for the epoch in the log line
    let (global_batch, world_size) = (run.global_batch(), run.comm.world_size());
    if let Some(metrics) = run.metrics.as_mut() {
        let loss_scale = amp.map(|(s, _)| s);
        let values = LogValues { loss, coca_parts, scale, bias, lr, grad_norm, loss_scale };
        log_train(
            metrics,
            &run.state,
            run.cfg.train.steps,
            &values,
            global_batch,
            world_size,
            &run.interval,
        )?;
    }
    run.interval.reset();
    Ok(loss)
}

/// Every rank's loader position into the state; rank 0 copies the checkpoint to host memory
/// and hands it to the background writer (after the previous write, whose error, if any, is
/// this save's), and returns the directory it is being written to.
fn save_checkpoint(run: &mut Run) -> Result<Option<PathBuf>> {
    run.state.loader = run.loader.state();
    run.state.grad_scaler = run.scaler.as_ref().map(GradScaler::state).transpose()?;
    run.state.rank_loaders = gather_loader_states(run.comm.as_ref(), &run.state.loader)?;
    let sharded = run.grad_sync.is_sharded();
    let snapshot = match run.metrics {
        Some(_) => {
            // The previous write first: one host copy of the checkpoint in memory at a time.
            run.writer.wait()?;
            if sharded {
                checkpoint::start_sharded(&run.cfg.run_dir, run.state.step)?;
            }
            let whole = (!sharded).then_some(&run.optimizer);
            Some(checkpoint::snapshot(&run.vs, whole, &run.state)?)
        }
        None => None,
    };
    if sharded {
        // Each rank writes its own shard, once rank 0 has made the folder.
        run.comm.barrier()?;
        let (rank, world) = (run.comm.rank(), run.comm.world_size());
        checkpoint::write_shard(&run.cfg.run_dir, run.state.step, rank, world, &run.optimizer)?;
    }
    // The weights copied are only as good as the step's sums. Under NCCL a copy can wait on an
    // all-reduce a dead peer never finishes, and return once the watchdog has aborted it, with
    // weights updated from sums that were cut short: only a barrier that every rank passes
    // after its device work says they were not.
    run.comm.barrier()?;
    let (Some(snapshot), Some(metrics)) = (snapshot, run.metrics.as_mut()) else {
        return Ok(None);
    };
    let dir = run.writer.start(&run.cfg.run_dir, snapshot, run.cfg.train.keep_checkpoints)?;
    metrics.flush()?;
    Ok(Some(dir))
}

/// Every rank embeds its share of each eval set; rank 0 logs the whole sets' numbers, and
/// with `eval.datasets` writes them all to `<run_dir>/eval/<step>.json`. Returns the first
/// set's zero-shot result (`data.val`'s when there is one).
fn evaluate(run: &mut Run) -> Result<Option<ZeroShotResult>> {
    let Some(task) = run.val_task.as_mut() else { return Ok(None) };
    run.model.set_training(false);
    let results: Result<Vec<pass::EvalResult>> = task
        .sets
        .iter_mut()
        .map(|set| {
            evaluate_task(
                &run.model,
                set,
                &run.tokenizer,
                &run.preprocess,
                run.device,
                run.cfg.data.workers,
                run.comm.as_ref(),
            )
        })
        .collect();
    run.model.set_training(true);
    let results = results?;
    let (step, is_rank0) = (run.state.step, run.comm.rank() == 0);
    let mut scalars: Vec<(String, f64)> = Vec::new();
    let mut report = serde_json::Map::new();
    for (set, result) in task.sets.iter().zip(&results) {
        let mut entry = serde_json::Map::new();
        if let Some(zs) = &result.zero_shot {
            let prefix = format!("val/{}-zeroshot", set.name);
            scalars.push((format!("{prefix}-top1"), zs.top1));
            scalars.push((format!("{prefix}-top5"), zs.top5));
            if set.benchmark {
                scalars.push((format!("{prefix}-mean-per-class-recall"), zs.mean_per_class_recall));
            }
            entry.insert("zero_shot".into(), serde_json::json!({"top1": zs.top1, "top5": zs.top5, "mean_per_class_recall": zs.mean_per_class_recall, "samples": zs.samples}));
            if is_rank0 {
                tracing::info!(
                    "step {step} | zero-shot {}: top-1 {:.2}% top-5 {:.2}% ({} images)",
                    set.name,
                    100.0 * zs.top1,
                    100.0 * zs.top5,
                    zs.samples
                );
            }
        }
        if let Some(r) = &result.retrieval {
            // open_clip's tags for data.val's pairs; a benchmark set's carry its name.
            let prefix =
                if set.benchmark { format!("val/{}-", set.name) } else { "val/".to_owned() };
            scalars.extend(r.metrics.iter().map(|(name, v)| (format!("{prefix}{name}"), *v)));
            let mut m: serde_json::Map<String, serde_json::Value> =
                r.metrics.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
            m.insert("pairs".into(), serde_json::json!(r.pairs));
            entry.insert("retrieval".into(), serde_json::Value::Object(m));
            let r1 = |a: &str, b: &str| 100.0 * (r.get(a).or(r.get(b)).unwrap_or(0.0));
            if is_rank0 {
                tracing::info!(
                "step {step} | retrieval {}: image->text R@1 {:.2}% text->image R@1 {:.2}% ({} pairs)",
                set.name,
                r1("image_to_text_R@1", "text_retrieval_recall@1"),
                r1("text_to_image_R@1", "image_retrieval_recall@1"),
                r.pairs
            );
            }
        }
        report.insert(set.name.clone(), serde_json::Value::Object(entry));
    }
    if let Some(metrics) = run.metrics.as_mut() {
        let refs: Vec<(&str, f64)> = scalars.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        metrics.log(step, &refs)?;
        metrics.flush()?;
    }
    if is_rank0 && !run.cfg.eval.datasets.is_empty() {
        write_eval_report(&run.cfg.run_dir, step, report)?;
    }
    Ok(results.first().and_then(|r| r.zero_shot))
}

/// `<run_dir>/eval/<step>.json`: `{"step": N, "datasets": {name: {"zero_shot": {...}} |
/// {"retrieval": {...}}}}`, written to a temporary file and renamed, so a reader never sees
/// half of it.
fn write_eval_report(
    run_dir: &Path,
    step: u64,
    datasets: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let dir = run_dir.join("eval");
    std::fs::create_dir_all(&dir).map_err(crate::error::io_err(&dir))?;
    let path = dir.join(format!("{step}.json"));
    let tmp = dir.join(format!(".{step}.json.tmp"));
    let text =
        serde_json::to_string_pretty(&serde_json::json!({"step": step, "datasets": datasets}))
            .map_err(|e| TrainError::Input(format!("{}: {e}", path.display())))?;
    std::fs::write(&tmp, text + "\n").map_err(crate::error::io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(crate::error::io_err(&path))?;
    Ok(())
}

/// Waits for the last checkpoint to be on disk, flushes the metrics and waits for every rank:
/// nobody leaves while rank 0 still writes the last checkpoint or evaluates.
fn finish(run: &mut Run, outcome: Outcome) -> Result<TrainSummary> {
    if run.skips.total() > 0 {
        let reasons: Vec<String> = run.skips.iter().map(|(r, n)| format!("{r}: {n}")).collect();
        tracing::info!(
            "rank {}: {} sample(s) skipped ({})",
            run.comm.rank(),
            run.skips.total(),
            reasons.join(", ")
        );
    }
    run.writer.wait()?;
    if let Some(metrics) = run.metrics.as_mut() {
        metrics.flush()?;
    }
    run.comm.barrier()?;
    Ok(TrainSummary {
        steps: run.state.step,
        total_steps: run.cfg.train.steps,
        resumed_at: run.resumed_at,
        final_loss: outcome.final_loss,
        zero_shot: outcome.zero_shot,
        last_checkpoint: outcome.last_checkpoint,
        device: run.device,
        preempted: outcome.preempted,
    })
}

/// Fails on every rank when any rank's resolved config differs from rank 0's: ranks that
/// disagree on the model, data or schedule would train something nobody asked for.
fn check_same_config(comm: &dyn Collectives, resolved: &str) -> Result<()> {
    let configs = comm.all_gather_bytes(resolved.as_bytes())?;
    if let Some(rank) = configs.iter().position(|c| c != &configs[0]) {
        return Err(TrainError::Dist(format!(
            "rank {rank}'s config differs from rank 0's; every rank must run the same config (and the same --set overrides)"
        )));
    }
    Ok(())
}

/// Copies rank 0's weights into every rank.
fn broadcast_weights(comm: &dyn Collectives, vs: &nn::VarStore) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let _no_grad = tch::no_grad_guard();
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, var) in variables.iter_mut() {
        comm.broadcast(var, 0)?;
    }
    Ok(())
}

/// Every rank's loader position, in rank order (empty for a single process).
fn gather_loader_states(comm: &dyn Collectives, mine: &LoaderState) -> Result<Vec<LoaderState>> {
    if comm.world_size() == 1 {
        return Ok(Vec::new());
    }
    let json =
        serde_json::to_vec(mine).map_err(|e| TrainError::Dist(format!("loader position: {e}")))?;
    comm.all_gather_bytes(&json)?
        .iter()
        .map(|bytes| {
            serde_json::from_slice(bytes)
                .map_err(|e| TrainError::Dist(format!("a rank's loader position: {e}")))
        })
        .collect()
}

/// `RUN/keys-rank<R>.tsv`: one line per step, `step<TAB>key key ...`. Each line goes out in
/// one write on an append-only file, so a killed run leaves whole lines; a resumed run
/// appends the steps it repeats, and the last line of a step is the one that counted.
struct KeyLog {
    file: fs::File,
    path: PathBuf,
}

impl KeyLog {
    fn open(run_dir: &Path, rank: usize) -> Result<Self> {
        let path = run_dir.join(format!("keys-rank{rank}.tsv"));
        let file =
            fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        Ok(Self { file, path })
    }

    fn write(&mut self, step: u64, keys: &[String]) -> Result<()> {
        use std::io::Write;
        let line = format!("{step}\t{}\n", keys.join(" "));
        self.file.write_all(line.as_bytes()).map_err(io_err(&self.path))
    }
}

/// Picks the checkpoint to resume from, refusing to silently train over an existing run.
fn resume_dir(cfg: &RunConfig, resume: &Resume) -> Result<Option<PathBuf>> {
    match resume {
        Resume::From(path) => match weights_path::locate(path) {
            Ok(Found::Checkpoint { dir }) => {
                // A checkpoint named explicitly is never swapped for another: damage is an error.
                checkpoint::check(&dir).map_err(|damage| damage.into_error(&dir))?;
                Ok(Some(dir))
            }
            Ok(other) => Err(TrainError::Config(format!(
                "resume from {}: {} holds weights but no optimizer state or step to continue from; \
                 init.checkpoint (--init) starts a fresh run from its weights",
                path.display(),
                other.describe()
            ))),
            Err(e) => Err(TrainError::Config(format!("resume from {e}"))),
        },
        Resume::Auto => checkpoint::latest_valid(&cfg.run_dir),
        Resume::No => {
            if !checkpoint::list(&cfg.run_dir)?.is_empty() {
                return Err(TrainError::Config(format!(
                    "{} already holds checkpoints; pass --resume auto to continue it, or choose another --run-dir",
                    checkpoint::checkpoints_dir(&cfg.run_dir).display()
                )));
            }
            Ok(None)
        }
    }
}

/// The keys whose values differ between the checkpoint's resolved config and this run's, as
/// `dotted.key: old -> new`, from comparing the two as YAML trees. Two changes are what
/// resuming is for and go unmentioned: a larger `train.steps` (extending the run) and another
/// `run_dir` (`--resume PATH` into a new directory).
fn config_changes(old: &str, new: &str) -> Vec<String> {
    const SHOWN: usize = 12;
    let (Ok(old), Ok(new)) = (
        serde_yaml::from_str::<serde_yaml::Value>(old),
        serde_yaml::from_str::<serde_yaml::Value>(new),
    ) else {
        return vec!["the checkpoint's config is not readable YAML".into()];
    };
    let mut changes = Vec::new();
    diff_values("", Some(&old), Some(&new), &mut changes);
    changes.retain(|(key, old, new)| match key.as_str() {
        "run_dir" => false,
        "train.steps" => !matches!((old.and_then(|v| v.as_u64()), new.and_then(|v| v.as_u64())), (Some(a), Some(b)) if b > a),
        _ => true,
    });
    let count = changes.len();
    let mut out: Vec<String> = changes
        .into_iter()
        .take(SHOWN)
        .map(|(key, old, new)| format!("{key}: {} -> {}", show(old), show(new)))
        .collect();
    if count > SHOWN {
        out.push(format!("and {} more", count - SHOWN));
    }
    out
}

type Change<'a> = (String, Option<&'a serde_yaml::Value>, Option<&'a serde_yaml::Value>);

fn diff_values<'a>(
    key: &str,
    old: Option<&'a serde_yaml::Value>,
    new: Option<&'a serde_yaml::Value>,
    out: &mut Vec<Change<'a>>,
) {
    use serde_yaml::Value;
    if let (Some(Value::Mapping(a)), Some(Value::Mapping(b))) = (old, new) {
        let keys = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k)));
        for k in keys {
            let name = match k {
                Value::String(s) => s.clone(),
                other => show(Some(other)),
            };
            let path = if key.is_empty() { name } else { format!("{key}.{name}") };
            diff_values(&path, a.get(k), b.get(k), out);
        }
    } else if old != new {
        out.push((key.to_owned(), old, new));
    }
}

/// A config value on one line: scalars as YAML writes them, lists and maps as JSON.
fn show(value: Option<&serde_yaml::Value>) -> String {
    use serde_yaml::Value;
    match value {
        None => "(not set)".into(),
        Some(Value::Null) => "null".into(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => serde_json::to_string(other).unwrap_or_else(|_| "(a nested value)".into()),
    }
}

/// The held-out set, checked as `oxclip eval` checks it ([`sets::open_zero_shot`]) when it is
/// scored zero-shot: with `data.classnames`, or when it names its own classes (a folder per
/// class, a table with a `ClassLabel` column: [`sets::names_its_classes`]); then
/// every set of `eval.datasets`, checked as `oxclip eval` checks a benchmark set.
fn val_task(
    data: &DataConfig,
    sets: &crate::config::EvalConfig,
    seed: u64,
) -> Result<Option<ValTask>> {
    let mut task = ValTask { sets: Vec::new() };
    if let Some(val) = &data.val {
        let spec = DataSpec::parse(val)?;
        let classnames = data.classnames.as_deref().map(Path::new);
        let (source, zero_shot) = if classnames.is_some() || sets::names_its_classes(&spec)? {
            let set = sets::open_zero_shot(&spec, classnames, seed)?;
            (set.source, Some((set.classnames, sets::read_templates(data.templates.as_deref())?)))
        } else {
            (DataSource::open(&spec, seed)?, None)
        };
        task.sets.push(ValSet {
            name: data.val_name.clone(),
            source,
            zero_shot,
            multi_caption: false,
            benchmark: false,
            loader: None,
        });
    }
    for entry in &sets.datasets {
        let context =
            |e: TrainError| TrainError::Config(format!("eval.datasets `{}`: {e}", entry.name));
        if task.sets.iter().any(|s| s.name == entry.name) {
            return Err(TrainError::Config(format!(
                "eval.datasets: the name `{}` is used twice (data.val_name or another entry); each set's tags need their own",
                entry.name
            )));
        }
        let set = benchmark::resolve(&entry.spec, None).map_err(context)?.ok_or_else(|| {
            TrainError::Config(format!(
                "eval.datasets `{}`: `{}` is not imagenet1k:DIR, wds:DIR or a clip_benchmark dataset directory \
                 (one holding classnames.txt or test/ shards)",
                entry.name, entry.spec
            ))
        })?;
        let source = benchmark::open_benchmark(&set, seed).map_err(context)?;
        let (zero_shot, multi_caption) = match set.task {
            benchmark::Task::Classification { classnames, templates } => {
                (Some((classnames, templates)), false)
            }
            benchmark::Task::Retrieval => (None, true),
        };
        task.sets.push(ValSet {
            name: entry.name.clone(),
            source,
            zero_shot,
            multi_caption,
            benchmark: true,
            loader: None,
        });
    }
    Ok((!task.sets.is_empty()).then_some(task))
}

fn evaluate_task(
    model: &Clip,
    set: &mut ValSet,
    tokenizer: &Tokenizer,
    preprocess: &Preprocess,
    device: Device,
    workers: usize,
    comm: &dyn Collectives,
) -> Result<pass::EvalResult> {
    let loader = match &mut set.loader {
        Some(loader) => loader,
        None => set.loader.insert(pass::eval_loader_with(
            &set.source,
            tokenizer.clone(),
            &model.config,
            preprocess,
            256,
            workers,
            comm,
        )?),
    };
    if set.multi_caption {
        let retrieval =
            pass::evaluate_multi_caption(model, loader, tokenizer, device, comm, &mut |_| {})?;
        return Ok(pass::EvalResult { zero_shot: None, retrieval: Some(retrieval) });
    }
    let classifier = match &set.zero_shot {
        Some((classnames, templates)) => {
            Some(pass::zero_shot_classifier(model, tokenizer, classnames, templates, device)?)
        }
        None => None,
    };
    pass::evaluate(model, loader, classifier.as_ref(), !set.benchmark, device, comm)
}

/// Timings accumulated between two log lines.
#[derive(Debug, Default)]
struct Interval {
    steps: u64,
    data_secs: f64,
    batch_secs: f64,
    /// Waiting for the gradient reduction after the backward pass (`StepOutput::comm_secs`).
    comm_secs: f64,
    /// Bad samples this rank skipped since the run (or resume) started; never reset.
    skipped_total: u64,
    /// The same, summed over ranks at the last log step.
    skipped_total_all_ranks: u64,
}

impl Interval {
    fn reset(&mut self) {
        self.steps = 0;
        self.data_secs = 0.0;
        self.batch_secs = 0.0;
        self.comm_secs = 0.0;
    }

    fn add(&mut self, data_secs: f64, batch_secs: f64, comm_secs: f64, skipped: u64) {
        self.steps += 1;
        self.data_secs += data_secs;
        self.batch_secs += batch_secs;
        self.comm_secs += comm_secs;
        self.skipped_total += skipped;
    }
}

/// What a log line reports of one step.
#[derive(Clone, Copy)]
struct LogValues {
    loss: f64,
    /// CoCa: the weighted contrastive and caption losses `loss` sums.
    coca_parts: Option<(f64, f64)>,
    /// exp(logit_scale), and SigLIP's logit_bias.
    scale: f64,
    bias: Option<f64>,
    lr: f64,
    grad_norm: Option<f64>,
    /// Under amp: the loss scale and the steps skipped so far.
    loss_scale: Option<GradScalerState>,
}

fn log_train(
    metrics: &mut MetricsWriter,
    state: &TrainerState,
    total_steps: u64,
    values: &LogValues,
    global_batch: u64,
    world_size: usize,
    interval: &Interval,
) -> Result<()> {
    let LogValues { loss, coca_parts, scale, bias, lr, grad_norm, loss_scale } = *values;
    // open_clip logs each part of its loss under its name, and the whole as train/loss.
    let (contrastive, caption) = match coca_parts {
        Some((contrastive, caption)) => (contrastive, Some(caption)),
        None => (loss, None),
    };
    let steps = interval.steps.max(1) as f64;
    let (data_time, batch_time, comm_time) =
        (interval.data_secs / steps, interval.batch_secs / steps, interval.comm_secs / steps);
    let samples_per_second = global_batch as f64 / batch_time.max(1e-9);
    let mut scalars = vec![
        ("train/loss", loss),
        ("train/contrastive_loss", contrastive),
        ("train/scale", scale),
        ("train/lr", lr),
        ("train/samples_per_second", samples_per_second),
        ("train/samples_per_second_per_gpu", samples_per_second / world_size as f64),
        ("train/data_time", data_time),
        ("train/batch_time", batch_time),
        ("train/comm_time", comm_time),
        ("data/skipped", interval.skipped_total_all_ranks as f64),
    ];
    if let Some(caption) = caption {
        scalars.push(("train/caption_loss", caption));
    }
    if let Some(norm) = grad_norm {
        scalars.push(("train/grad_norm", norm));
    }
    // SigLIP's learnable bias (open_clip does not log it; it is the other half of the story).
    if let Some(bias) = bias {
        scalars.push(("train/logit_bias", bias));
    }
    // amp's loss scale and the steps it skipped (open_clip logs neither).
    if let Some(s) = loss_scale {
        scalars.push(("train/loss_scale", f64::from(s.scale)));
        scalars.push(("train/skipped_steps", s.skipped_steps as f64));
    }
    metrics.log(state.step, &scalars)?;
    if let Some(s) = loss_scale {
        tracing::info!(
            "step {} | loss scale {} | {} step(s) skipped for inf/NaN gradients so far",
            state.step,
            s.scale,
            s.skipped_steps
        );
    }
    tracing::info!(
        "step {}/{} epoch {} | loss {:.4} | scale {:.2} | lr {:.3e} | {:.0} samples/s | data {:.3}s batch {:.3}s comm {:.3}s",
        state.step, total_steps, state.loader.epoch, loss, scale, lr, samples_per_second, data_time, batch_time, comm_time
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::config_changes;

    #[test]
    fn config_changes_name_dotted_keys_old_and_new_but_not_an_extension() {
        let old = "run_dir: runs/a\ntrain:\n  steps: 10\n  batch_size: 16\noptim:\n  lr: 0.001\n  betas:\n  - 0.9\n  - 0.98\n";
        let same = old.replace("runs/a", "runs/b").replace("steps: 10", "steps: 14");
        assert!(config_changes(old, &same).is_empty(), "{:?}", config_changes(old, &same));
        let new = same.replace("lr: 0.001", "lr: 0.002").replace("- 0.98", "- 0.95")
            + "init:\n  checkpoint: w.safetensors\n";
        assert_eq!(
            config_changes(old, &new),
            vec![
                "optim.lr: 0.001 -> 0.002",
                "optim.betas: [0.9,0.98] -> [0.9,0.95]",
                "init: (not set) -> {\"checkpoint\":\"w.safetensors\"}"
            ]
        );
        // Fewer steps than the checkpoint's is a change worth a word.
        assert_eq!(
            config_changes(old, &old.replace("steps: 10", "steps: 5")),
            vec!["train.steps: 10 -> 5"]
        );
    }
}
