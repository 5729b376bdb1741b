//! The training loop, nanoGPT's shape: schedule, step, metrics, checkpoint and eval, each a
//! call. Counters and the loader position live in one `TrainerState` that checkpoints save.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use oxclip_data_loader::{DataSource, DataSpec, Loader, LoaderConfig, LoaderState, Tokenizer};
use tch::{nn, Device, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::collectives::{self, Collectives, DistSettings};
use crate::config::{DataConfig, LossConfig, OptimConfig, Precision, TrainConfig};
use crate::device;
use crate::error::{io_err, Result, TrainError};
use crate::eval::{self, ZeroShotResult};
use crate::metrics::MetricsWriter;
use crate::model::{Clip, ModelConfig};
use crate::optim::{AdamW, AdamWConfig};
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

/// A fully resolved training run.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub run_dir: PathBuf,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub loss: LossConfig,
    /// The resolved config as YAML: written to `<run_dir>/config.yaml` and into checkpoints.
    pub resolved_config: String,
    pub resume: Resume,
    /// Initial weights for a fresh run (fine-tuning): anything [`weights_path::locate`]
    /// accepts (a run, a checkpoint, an export, a safetensors file in either layout).
    pub init_checkpoint: Option<PathBuf>,
    /// This process's rank and how to reach the others; a single process by default.
    pub dist: DistSettings,
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
}

/// The zero-shot task evaluated during and after training.
struct ValTask {
    name: String,
    source: DataSource,
    /// Class names and prompt templates, when the set is labelled for zero-shot.
    zero_shot: Option<(Vec<String>, Vec<String>)>,
}

pub fn fit(job: &TrainJob) -> Result<TrainSummary> {
    job.model.validate()?;
    job.train.validate()?;
    job.optim.validate(job.train.steps)?;
    job.loss.validate(&job.model)?;
    // An evaluation set that cannot be scored fails the run now, not at its first eval.
    let val_task = val_task(&job.data, job.train.seed)?;
    if let Some(threads) = job.train.threads {
        tch::set_num_threads(threads as i32);
    }
    let device = match (device::resolve(device::parse(&job.train.device)?)?, &job.dist.world) {
        // Each rank of a node on its own GPU: `cuda` means `cuda:LOCAL_RANK`.
        (Device::Cuda(0), Some(world)) => Device::Cuda(world.local_rank),
        (device, _) => device,
    };
    let comm = collectives::connect(&job.dist, device)?;
    let comm = comm.as_ref();
    let is_rank0 = comm.rank() == 0;
    check_same_config(comm, &job.resolved_config)?;
    let cfg = &job.train;
    let global_batch = (cfg.batch_size * comm.world_size()) as u64;

    let resume_from = resume_dir(job)?;
    let resumed_at = match &resume_from {
        Some(dir) => Some(checkpoint::read_state(dir)?.step),
        None => None,
    };
    if let Some(at) = resumed_at.filter(|&at| at >= cfg.steps) {
        // A finished run resumed: nothing to load, train, evaluate or write.
        return Ok(TrainSummary {
            steps: at,
            total_steps: cfg.steps,
            resumed_at,
            final_loss: None,
            zero_shot: None,
            last_checkpoint: None,
            device,
        });
    }

    // Initial weights from a directory with its own config: the run's model must be that one,
    // checked before anything is built.
    let init = match (&job.init_checkpoint, &resume_from) {
        (Some(path), None) => {
            let found = weights_path::locate(path).map_err(|e| TrainError::Config(format!("init.checkpoint (--init) {e}")))?;
            if let Some(dir) = found.pretrained()? {
                if let Some(msg) = crate::model::pretrained::contradiction(&dir.dir, &dir.model, "the run's model", &job.model) {
                    return Err(TrainError::Config(format!("init.checkpoint (--init): {msg}")));
                }
            }
            Some(found)
        }
        _ => None,
    };

    // Model and optimizer: the seed fixes the initial weights.
    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(device);
    let model = Clip::new(&vs.root(), &job.model)?;
    // Frozen towers (fine-tuning): before the optimizer, which then never sees them.
    for (on, tower, unlocked) in [
        (cfg.lock_image, crate::model::lock::Tower::Image, cfg.lock_image_unlocked_groups),
        (cfg.lock_text, crate::model::lock::Tower::Text, cfg.lock_text_unlocked_layers),
    ] {
        if on {
            let frozen = crate::model::lock::lock(&vs, &job.model, tower, unlocked)?;
            tracing::info!("{tower:?} tower locked: {frozen} tensors frozen, its last {unlocked} group(s) train");
        }
    }
    if cfg.lock_image && cfg.lock_image_freeze_bn_stats {
        model.freeze_batch_norm();
    }
    let mut optimizer = AdamW::new(
        vs.variables().into_iter().collect(),
        AdamWConfig { betas: (job.optim.betas[0], job.optim.betas[1]), eps: job.optim.eps, weight_decay: job.optim.weight_decay },
    );
    tracing::info!("model: {} parameters on {}", crate::model::num_params(&vs), device::name(device));
    if let Some(found) = &init {
        crate::model::load_weights(&vs, &found.weights())?;
        tracing::info!("initial weights from {} ({})", found.weights().display(), found.describe());
    }

    let tokenizer = load_tokenizer(&job.data, &job.model)?;
    let preprocess = job.data.preprocess(&job.model)?;
    let train_set = DataSource::open_with(&DataSpec::parse(&job.data.train)?, cfg.seed, &job.data.shard_options().count_hints())?;
    let mut loader = Loader::open(
        &train_set,
        &job.data.shard_options(),
        tokenizer.clone(),
        LoaderConfig {
            batch_size: cfg.batch_size,
            rank: comm.rank(),
            world_size: comm.world_size(),
            seed: cfg.seed,
            image_size: job.model.vision_cfg.image_size as u32,
            context_length: job.model.text_cfg.context_length as usize,
            workers: job.data.workers,
            train: true,
            preprocess: Some(preprocess.clone()),
        },
    )?;
    // Samples already found bad while opening the shards count towards `data/skipped`.
    let load_skips: u64 = loader.load_skips().values().sum();
    if load_skips > 0 {
        tracing::warn!("{load_skips} bad sample(s) skipped while reading {}: {}", job.data.train, loader.load_skips());
    }
    tracing::info!(
        "training data: {} samples; this rank reads {} per epoch, {} batches",
        loader.dataset_len(),
        loader.samples_per_epoch(),
        loader.batches_per_epoch()
    );

    let mut state = TrainerState {
        step: 0,
        samples_seen: 0,
        seed: cfg.seed,
        loader: loader.state(),
        rank_loaders: Vec::new(),
        config: job.resolved_config.clone(),
    };
    if let Some(dir) = &resume_from {
        state = checkpoint::load(dir, &vs, &mut optimizer)?;
        let position = match state.rank_loaders.get(comm.rank()) {
            Some(mine) if state.rank_loaders.len() == comm.world_size() => mine.clone(),
            _ => state.loader.clone(),
        };
        loader.restore(&position)?;
        let changes = config_changes(&state.config, &job.resolved_config);
        if is_rank0 && !changes.is_empty() {
            tracing::warn!(
                "resuming {} with a config that differs from the checkpoint's: {}",
                dir.display(),
                changes.join("; ")
            );
        }
        tracing::info!("resumed from {} at step {}", dir.display(), state.step);
    }

    // Only now, with the model, the weights and the data open on every rank, does the run
    // directory get written: a run that fails to start leaves nothing behind.
    comm.barrier()?;
    fs::create_dir_all(&job.run_dir).map_err(io_err(&job.run_dir))?;
    if is_rank0 {
        let config_path = job.run_dir.join("config.yaml");
        fs::write(&config_path, &job.resolved_config).map_err(io_err(&config_path))?;
    }
    let mut key_log = if job.data.log_keys { Some(KeyLog::open(&job.run_dir, comm.rank())?) } else { None };

    // Identical weights everywhere, whatever each rank initialised or loaded.
    broadcast_weights(comm, &vs)?;

    // Only rank 0 writes events and checkpoints.
    let mut metrics = if is_rank0 { Some(MetricsWriter::new(&job.run_dir)?) } else { None };
    let schedule = Schedule {
        kind: job.optim.schedule,
        base_lr: job.optim.lr,
        warmup_steps: job.optim.warmup_steps,
        total_steps: cfg.steps,
        cooldown_steps: job.optim.cooldown_steps,
        cooldown_power: job.optim.cooldown_power,
        cooldown_end_lr: job.optim.cooldown_end_lr,
    };
    let amp_bf16 = cfg.precision == Precision::AmpBf16 && device.is_cuda();
    let step_cfg = StepConfig {
        autocast_bf16: amp_bf16,
        grad_clip_norm: job.optim.grad_clip_norm,
        loss: job.loss.spec(amp_bf16),
        micro_batch: cfg.micro_batch_size,
    };
    if step_cfg.autocast_bf16 {
        device::use_bf16_autocast();
    }
    if cfg.precision == Precision::AmpBf16 && !device.is_cuda() {
        tracing::info!("precision amp_bf16 runs as fp32 on the CPU");
    }

    let mut interval = Interval { skipped_total: load_skips, ..Interval::default() };
    let mut final_loss = None;
    let mut last_checkpoint = None;
    let mut last_zero_shot = None;
    let (image_size, context_length) = (job.model.vision_cfg.image_size, job.model.text_cfg.context_length);
    model.set_training(true);
    while state.step < cfg.steps {
        let started = Instant::now();
        let batch = loader.next_batch()?;
        let b = batch.batch_size as i64;
        let images = host_to_device(Tensor::from_slice(&batch.images).view([b, 3, image_size, image_size]), device)?;
        let tokens = host_to_device(Tensor::from_slice(&batch.tokens).view([b, context_length]), device)?;
        if let Some(log) = key_log.as_mut() {
            log.write(state.step + 1, &batch.keys)?;
        }
        let skipped: u64 = batch.skipped.values().sum();
        loader.recycle(batch);
        let data_secs = started.elapsed().as_secs_f64();

        let lr = schedule.lr(state.step);
        let out = step::train_step(&model, &mut optimizer, comm, &images, &tokens, lr, step_cfg)?;
        state.step += 1;
        state.samples_seen += global_batch;
        interval.add(data_secs, started.elapsed().as_secs_f64(), skipped);

        // Reading the loss waits for the device; do it only when logging.
        if state.step % cfg.log_every == 0 || state.step == cfg.steps {
            let loss = out.loss.double_value(&[]);
            if !loss.is_finite() {
                return Err(TrainError::NonFiniteLoss { step: state.step, loss });
            }
            final_loss = Some(loss);
            let scale = model.logit_scale.exp().double_value(&[]);
            let bias = model.logit_bias.as_ref().map(|b| b.double_value(&[]));
            // Skips are counted per rank; the log shows the run's total.
            interval.skipped_total_all_ranks = collectives::all_gather_u64(comm, interval.skipped_total)?.iter().sum();
            state.loader = loader.state(); // for the epoch in the log line
            if let Some(metrics) = metrics.as_mut() {
                log_train(metrics, &state, cfg.steps, loss, (scale, bias), lr, global_batch, comm.world_size(), &interval, out.grad_norm)?;
            }
            interval.reset();
        }
        let last = state.step == cfg.steps;
        if last || (cfg.checkpoint_every > 0 && state.step % cfg.checkpoint_every == 0) {
            state.loader = loader.state();
            state.rank_loaders = gather_loader_states(comm, &state.loader)?;
            if let Some(metrics) = metrics.as_mut() {
                last_checkpoint = Some(checkpoint::save(&job.run_dir, &vs, &optimizer, &state, cfg.keep_checkpoints)?);
                metrics.flush()?;
            }
        }
        // Every rank embeds its share of the eval set; rank 0 logs the whole set's numbers.
        if let Some(task) = &val_task {
            if last || (cfg.eval_every > 0 && state.step % cfg.eval_every == 0) {
                model.set_training(false);
                let result = evaluate(&model, task, &tokenizer, &preprocess, device, job.data.workers, comm)?;
                model.set_training(true);
                let mut scalars: Vec<(String, f64)> = Vec::new();
                if let Some(zs) = &result.zero_shot {
                    let prefix = format!("val/{}-zeroshot", task.name);
                    scalars.push((format!("{prefix}-top1"), zs.top1));
                    scalars.push((format!("{prefix}-top5"), zs.top5));
                    if is_rank0 { tracing::info!(
                        "step {} | zero-shot {}: top-1 {:.2}% top-5 {:.2}% ({} images)",
                        state.step, task.name, 100.0 * zs.top1, 100.0 * zs.top5, zs.samples
                    ); }
                    last_zero_shot = Some(*zs);
                }
                if let Some(r) = &result.retrieval {
                    scalars.extend(r.metrics.iter().map(|(name, v)| (format!("val/{name}"), *v)));
                    if is_rank0 { tracing::info!(
                        "step {} | retrieval {}: image->text R@1 {:.2}% text->image R@1 {:.2}% ({} pairs)",
                        state.step,
                        task.name,
                        100.0 * r.get("image_to_text_R@1").unwrap_or(0.0),
                        100.0 * r.get("text_to_image_R@1").unwrap_or(0.0),
                        r.pairs
                    ); }
                }
                if let Some(metrics) = metrics.as_mut() {
                    let refs: Vec<(&str, f64)> = scalars.iter().map(|(n, v)| (n.as_str(), *v)).collect();
                    metrics.log(state.step, &refs)?;
                    metrics.flush()?;
                }
            }
        }
    }
    if let Some(metrics) = metrics.as_mut() {
        metrics.flush()?;
    }
    // Nobody leaves while rank 0 still writes the last checkpoint or evaluates.
    comm.barrier()?;
    Ok(TrainSummary {
        steps: state.step,
        total_steps: cfg.steps,
        resumed_at,
        final_loss,
        zero_shot: last_zero_shot,
        last_checkpoint,
        device,
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
    let json = serde_json::to_vec(mine).map_err(|e| TrainError::Dist(format!("loader position: {e}")))?;
    comm.all_gather_bytes(&json)?
        .iter()
        .map(|bytes| serde_json::from_slice(bytes).map_err(|e| TrainError::Dist(format!("a rank's loader position: {e}"))))
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
        let file = fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        Ok(Self { file, path })
    }

    fn write(&mut self, step: u64, keys: &[String]) -> Result<()> {
        use std::io::Write;
        let line = format!("{step}\t{}\n", keys.join(" "));
        self.file.write_all(line.as_bytes()).map_err(io_err(&self.path))
    }
}

/// Moves a batch tensor to the training device. On CUDA it goes through page-locked memory
/// (libtorch's caching host allocator) so the copy is asynchronous and overlaps the step.
fn host_to_device(host: Tensor, device: Device) -> Result<Tensor> {
    if !device.is_cuda() {
        return Ok(host);
    }
    let kind = host.kind();
    Ok(host.f_pin_memory(device)?.f_to_device_(device, kind, true, false)?)
}

/// Picks the checkpoint to resume from, refusing to silently train over an existing run.
fn resume_dir(job: &TrainJob) -> Result<Option<PathBuf>> {
    match &job.resume {
        Resume::From(path) => match weights_path::locate(path) {
            Ok(Found::Checkpoint { dir }) => {
                checkpoint::read_state(&dir)?;
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
        Resume::Auto => checkpoint::latest_valid(&job.run_dir),
        Resume::No => {
            if !checkpoint::list(&job.run_dir)?.is_empty() {
                return Err(TrainError::Config(format!(
                    "{} already holds checkpoints; pass --resume auto to continue it, or choose another --run-dir",
                    checkpoint::checkpoints_dir(&job.run_dir).display()
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
    let (Ok(old), Ok(new)) = (serde_yaml::from_str::<serde_yaml::Value>(old), serde_yaml::from_str::<serde_yaml::Value>(new)) else {
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
    let mut out: Vec<String> =
        changes.into_iter().take(SHOWN).map(|(key, old, new)| format!("{key}: {} -> {}", show(old), show(new))).collect();
    if count > SHOWN {
        out.push(format!("and {} more", count - SHOWN));
    }
    out
}

type Change<'a> = (String, Option<&'a serde_yaml::Value>, Option<&'a serde_yaml::Value>);

fn diff_values<'a>(key: &str, old: Option<&'a serde_yaml::Value>, new: Option<&'a serde_yaml::Value>, out: &mut Vec<Change<'a>>) {
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

/// `data.tokenizer` (or the CLIP BPE) for `model`, checked against its text tower
/// ([`crate::prepare::text_tokenizer`]).
pub fn load_tokenizer(data: &DataConfig, model: &ModelConfig) -> Result<Tokenizer> {
    crate::prepare::text_tokenizer(data.tokenizer.as_deref().map(Path::new), model).map_err(|e| match e {
        TrainError::Input(message) => TrainError::Config(format!("data.tokenizer: {message}")),
        other => other,
    })
}

/// The held-out set, checked as `oxclip eval` checks it ([`eval::open_zero_shot`]) when it is
/// scored zero-shot: with `data.classnames`, or as a folder per class (`classes:DIR`).
fn val_task(data: &DataConfig, seed: u64) -> Result<Option<ValTask>> {
    let Some(val) = &data.val else { return Ok(None) };
    let spec = DataSpec::parse(val)?;
    let classnames = data.classnames.as_deref().map(Path::new);
    let (source, zero_shot) = if classnames.is_some() || matches!(spec, DataSpec::Classes(_)) {
        let set = eval::open_zero_shot(&spec, classnames, seed)?;
        (set.source, Some((set.classnames, read_templates(data.templates.as_deref())?)))
    } else {
        (DataSource::open(&spec, seed)?, None)
    };
    Ok(Some(ValTask { name: data.val_name.clone(), source, zero_shot }))
}

/// A templates file's prompts, or OpenAI's 80 ImageNet templates; each must hold `{}`.
pub fn read_templates(path: Option<&str>) -> Result<Vec<String>> {
    let templates = match path {
        Some(path) => read_lines(Path::new(path))?,
        None => eval::OPENAI_IMAGENET_TEMPLATES.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(bad) = templates.iter().find(|t| !t.contains("{}")) {
        return Err(TrainError::Config(format!("template `{bad}` has no `{{}}` for the class name")));
    }
    Ok(templates)
}

/// Non-empty, trimmed lines of a text file.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let lines: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if lines.is_empty() {
        return Err(TrainError::Config(format!("{} is empty", path.display())));
    }
    Ok(lines)
}

fn evaluate(
    model: &Clip,
    task: &ValTask,
    tokenizer: &Tokenizer,
    preprocess: &oxclip_data_loader::Preprocess,
    device: Device,
    workers: usize,
    comm: &dyn Collectives,
) -> Result<eval::EvalResult> {
    let classifier = match &task.zero_shot {
        Some((classnames, templates)) => Some(eval::zero_shot_classifier(model, tokenizer, classnames, templates, device)?),
        None => None,
    };
    let mut loader = eval::eval_loader_with(&task.source, tokenizer.clone(), &model.config, preprocess, 256, workers, comm)?;
    eval::evaluate(model, &mut loader, classifier.as_ref(), true, device, comm)
}

/// Timings accumulated between two log lines.
#[derive(Debug, Default)]
struct Interval {
    steps: u64,
    data_secs: f64,
    batch_secs: f64,
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
    }

    fn add(&mut self, data_secs: f64, batch_secs: f64, skipped: u64) {
        self.steps += 1;
        self.data_secs += data_secs;
        self.batch_secs += batch_secs;
        self.skipped_total += skipped;
    }
}

#[allow(clippy::too_many_arguments)]
fn log_train(
    metrics: &mut MetricsWriter,
    state: &TrainerState,
    total_steps: u64,
    loss: f64,
    (scale, bias): (f64, Option<f64>),
    lr: f64,
    global_batch: u64,
    world_size: usize,
    interval: &Interval,
    grad_norm: Option<f64>,
) -> Result<()> {
    let steps = interval.steps.max(1) as f64;
    let (data_time, batch_time) = (interval.data_secs / steps, interval.batch_secs / steps);
    let samples_per_second = global_batch as f64 / batch_time.max(1e-9);
    let mut scalars = vec![
        ("train/loss", loss),
        ("train/contrastive_loss", loss),
        ("train/scale", scale),
        ("train/lr", lr),
        ("train/samples_per_second", samples_per_second),
        ("train/samples_per_second_per_gpu", samples_per_second / world_size as f64),
        ("train/data_time", data_time),
        ("train/batch_time", batch_time),
        ("data/skipped", interval.skipped_total_all_ranks as f64),
    ];
    if let Some(norm) = grad_norm {
        scalars.push(("train/grad_norm", norm));
    }
    // SigLIP's learnable bias (open_clip does not log it; it is the other half of the story).
    if let Some(bias) = bias {
        scalars.push(("train/logit_bias", bias));
    }
    metrics.log(state.step, &scalars)?;
    tracing::info!(
        "step {}/{} epoch {} | loss {:.4} | scale {:.2} | lr {:.3e} | {:.0} samples/s | data {:.3}s batch {:.3}s",
        state.step, total_steps, state.loader.epoch, loss, scale, lr, samples_per_second, data_time, batch_time
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
        let new = same.replace("lr: 0.001", "lr: 0.002").replace("- 0.98", "- 0.95") + "init:\n  checkpoint: w.safetensors\n";
        assert_eq!(
            config_changes(old, &new),
            vec!["optim.lr: 0.001 -> 0.002", "optim.betas: [0.9,0.98] -> [0.9,0.95]", "init: (not set) -> {\"checkpoint\":\"w.safetensors\"}"]
        );
        // Fewer steps than the checkpoint's is a change worth a word.
        assert_eq!(config_changes(old, &old.replace("steps: 10", "steps: 5")), vec!["train.steps: 10 -> 5"]);
    }
}
