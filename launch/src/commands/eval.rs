//! `oxclip eval`: zero-shot classification and image-text retrieval of a checkpoint, the
//! numbers the field reports, computed as open_clip computes them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::builder::RangedU64ValueParser;
use clap::Args;

use oxclip_data_loader::{DataSource, DataSpec, Tokenizer};
use oxclip_trainer::collectives::{self, Collectives, SingleProcess};
use oxclip_trainer::config::DistConfig;
use oxclip_trainer::eval::benchmark;
use oxclip_trainer::eval::pass::{self, EvalResult};
use oxclip_trainer::eval::sets::{self, read_templates};
use oxclip_trainer::model::Clip;

use super::args::ModelArgs;
use crate::progress::progress_bar;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Zero-shot classification data: `classes:DIR` or a plain directory with a folder per
    /// class, or any spec whose samples carry a class index: shards (`KEY.cls`), a CSV or
    /// JSONL with a `label` column (`csv:FILE?label_key=COLUMN` for another name), a
    /// Hugging Face dataset (`parquet:PATH`, `arrow:DIR`) whose `label` is a ClassLabel (its
    /// names are the class names) or a column of class indices; `imagenet1k:DIR` (ImageNet's `val/` folder or labelled shards, class names built in);
    /// a clip_benchmark dataset directory (`wds:DIR`, or a directory with `classnames.txt` or
    /// `test/`), scored as classification or retrieval by what it holds.
    #[arg(long, conflicts_with = "retrieval", required_unless_present_any = ["retrieval", "suite"])]
    pub zero_shot: Option<String>,
    /// Class names, one per line (line i names class i). For a folder per class (or a
    /// ClassLabel column) the folder names (its names) are used when this is not given; when
    /// given, it must name as many classes.
    #[arg(long)]
    pub classnames: Option<PathBuf>,
    /// Prompt templates, one per line with `{}` for the class name; default OpenAI's 80.
    #[arg(long)]
    pub templates: Option<String>,
    /// Image-caption pairs for retrieval: any data spec (shards, CSV, JSONL, folder, Parquet,
    /// Arrow), or a
    /// clip_benchmark retrieval set.
    #[arg(long)]
    pub retrieval: Option<String>,
    /// Several sets at once: every clip_benchmark dataset directory under DIR (one holding
    /// `classnames.txt` or `test/` shards), or a file of `name=spec` lines (`imagenet1k:DIR`,
    /// `wds:DIR`, a dataset directory). Prints a table and the suite average.
    #[arg(long, conflicts_with_all = ["zero_shot", "retrieval", "classnames"])]
    pub suite: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Images embedded at a time.
    #[arg(long, default_value_t = 256, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_size: usize,
    /// Threads decoding and transforming images.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
}

pub fn run(mut args: EvalArgs) -> anyhow::Result<()> {
    let ranks = Ranks::join(&mut args.model.device)?;
    if let Some(suite) = &args.suite {
        return run_suite(&args, suite, &ranks);
    }
    let (spec_text, retrieval) = match (&args.zero_shot, &args.retrieval) {
        (Some(data), None) => (data.clone(), false),
        (None, Some(data)) => (data.clone(), true),
        _ => bail!("give exactly one of --zero-shot DATA and --retrieval DATA"),
    };
    let templates = args.templates.as_deref().map(|t| read_templates(Some(t))).transpose()?;
    if let Some(set) = benchmark::resolve(&spec_text, templates)? {
        return run_benchmark(&args, &spec_text, &set, &ranks);
    }
    // clap lets a `requires` pass when the required flag conflicts with one given.
    if retrieval && (args.classnames.is_some() || args.templates.is_some()) {
        bail!("--classnames and --templates are for --zero-shot; --retrieval scores captions, not classes");
    }
    // The data is opened and checked before the model is loaded: a set that cannot be scored
    // fails at once.
    let mut spec = DataSpec::parse(&spec_text)?;
    let (source, zero_shot) = if retrieval {
        let source = DataSource::open(&spec, 0)?;
        if source.is_empty() {
            bail!("{spec_text} holds no image-caption pairs to evaluate");
        }
        (source, None)
    } else {
        // A plain directory of images is a folder per class here.
        if let DataSpec::Folder(dir) = &spec {
            spec = DataSpec::Classes(dir.clone());
        }
        let set = sets::open_zero_shot(&spec, args.classnames.as_deref(), 0)?;
        (set.source, Some((set.classnames, read_templates(args.templates.as_deref())?)))
    };
    let opened = args.model.open(true)?;
    let tokenizer = opened.text_tokenizer()?;
    let device = opened.device;
    let (_vs, model) = opened.load_for_inference()?;
    let classifier = match &zero_shot {
        Some((names, templates)) => {
            Some(pass::zero_shot_classifier(&model, &tokenizer, names, templates, device)?)
        }
        None => None,
    };
    let mut loader = pass::eval_loader_with(
        &source,
        tokenizer,
        &opened.config,
        &opened.preprocess,
        args.batch_size,
        args.workers,
        ranks.comm(),
    )?;
    let bar = ranks.progress_bar(source.len());
    let result = pass::evaluate_with_progress(
        &model,
        &mut loader,
        classifier.as_ref(),
        retrieval,
        device,
        ranks.comm(),
        &mut |n| bar.inc(n),
    )
    .with_context(|| format!("evaluating {spec_text}"))?;
    bar.finish_and_clear();
    if ranks.prints() {
        print_result(&result, args.json);
    }
    Ok(())
}

/// ImageNet-1k or a clip_benchmark directory: what the set holds decides the task, whichever
/// of --zero-shot and --retrieval named it.
fn run_benchmark(
    args: &EvalArgs,
    spec_text: &str,
    set: &benchmark::Benchmark,
    ranks: &Ranks,
) -> anyhow::Result<()> {
    if args.classnames.is_some() {
        bail!("{spec_text} names its own classes (classnames.txt, or the built-in ImageNet-1k list); leave out --classnames");
    }
    let source = benchmark::open_benchmark(set, 0)?;
    let opened = args.model.open(true)?;
    let tokenizer = opened.text_tokenizer()?;
    let (_vs, model) = opened.load_for_inference()?;
    let result = evaluate_benchmark(args, &opened, &model, &tokenizer, set, &source, "eval", ranks)
        .with_context(|| format!("evaluating {spec_text}"))?;
    if ranks.prints() {
        print_result(&result, args.json);
    }
    Ok(())
}

/// One benchmark set through the model, with a progress bar.
// The set, the model and the ranks' share, each named at the call.
#[allow(clippy::too_many_arguments)]
fn evaluate_benchmark(
    args: &EvalArgs,
    opened: &super::OpenedModel,
    model: &Clip,
    tokenizer: &Tokenizer,
    set: &benchmark::Benchmark,
    source: &DataSource,
    label: &str,
    ranks: &Ranks,
) -> anyhow::Result<EvalResult> {
    let device = opened.device;
    let mut loader = pass::eval_loader_with(
        source,
        tokenizer.clone(),
        &opened.config,
        &opened.preprocess,
        args.batch_size,
        args.workers,
        ranks.comm(),
    )?;
    let bar = ranks.progress_bar(source.len());
    bar.set_message(label.to_owned());
    let result = match &set.task {
        benchmark::Task::Classification { classnames, templates } => {
            let classifier =
                pass::zero_shot_classifier(model, tokenizer, classnames, templates, device)?;
            pass::evaluate_with_progress(
                model,
                &mut loader,
                Some(&classifier),
                false,
                device,
                ranks.comm(),
                &mut |n| bar.inc(n),
            )?
        }
        benchmark::Task::Retrieval => EvalResult {
            zero_shot: None,
            retrieval: Some(pass::evaluate_multi_caption(
                model,
                &mut loader,
                tokenizer,
                device,
                ranks.comm(),
                &mut |n| bar.inc(n),
            )?),
        },
    };
    bar.finish_and_clear();
    Ok(result)
}

/// (name, spec) of every set of a suite: the dataset directories under `path` (sorted), or
/// the `name=spec` lines of a file (blank lines and `#` comments left out).
fn suite_entries(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    if path.is_dir() {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| benchmark::is_dataset_dir(p))
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            bail!("{} holds no dataset directory (one with classnames.txt or test/ shards, clip_benchmark's layout)", path.display());
        }
        return Ok(dirs
            .iter()
            .map(|d| (benchmark::short_name(&d.to_string_lossy()), d.display().to_string()))
            .collect());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the suite file {}", path.display()))?;
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, spec)) = line.split_once('=') else {
            bail!("{}, line {}: `{line}` is not `name=spec` (e.g. `imagenet1k=imagenet1k:/data/imagenet`)", path.display(), i + 1);
        };
        entries.push((name.trim().to_owned(), spec.trim().to_owned()));
    }
    if entries.is_empty() {
        bail!("{} lists no dataset (`name=spec` lines)", path.display());
    }
    Ok(entries)
}

/// The number a suite averages: top-1 for classification, the mean of both directions'
/// recall@1 for retrieval (DataComp's choice).
fn main_metric(result: &EvalResult) -> Option<(&'static str, f64)> {
    if let Some(zs) = &result.zero_shot {
        return Some(("acc1", zs.top1));
    }
    let r = result.retrieval.as_ref()?;
    Some((
        "mean_recall@1",
        (r.get("image_retrieval_recall@1")? + r.get("text_retrieval_recall@1")?) / 2.0,
    ))
}

/// Every set of the suite, checked before the model is loaded, then evaluated one after
/// the other; a table (or `--json`) with the suite average of the main metrics.
fn run_suite(args: &EvalArgs, suite: &Path, ranks: &Ranks) -> anyhow::Result<()> {
    let templates = args.templates.as_deref().map(|t| read_templates(Some(t))).transpose()?;
    let mut sets = Vec::new();
    for (name, spec) in suite_entries(suite)? {
        let set = benchmark::resolve(&spec, templates.clone())
            .with_context(|| format!("suite dataset `{name}`"))?
            .with_context(|| format!("suite dataset `{name}`: `{spec}` is not imagenet1k:DIR, wds:DIR or a clip_benchmark dataset directory"))?;
        let source = benchmark::open_benchmark(&set, 0)
            .with_context(|| format!("suite dataset `{name}`"))?;
        sets.push((name, set, source));
    }
    let opened = args.model.open(true)?;
    let tokenizer = opened.text_tokenizer()?;
    let (_vs, model) = opened.load_for_inference()?;
    let mut rows = Vec::new();
    for (name, set, source) in &sets {
        let result =
            evaluate_benchmark(args, &opened, &model, &tokenizer, set, source, name, ranks)
                .with_context(|| format!("evaluating `{name}`"))?;
        rows.push((name.clone(), result));
    }
    if !ranks.prints() {
        return Ok(());
    }
    let mains: Vec<f64> = rows.iter().filter_map(|(_, r)| main_metric(r).map(|(_, v)| v)).collect();
    let average = mains.iter().sum::<f64>() / mains.len().max(1) as f64;
    if args.json {
        let mut datasets = serde_json::Map::new();
        for (name, result) in &rows {
            let mut entry = result_json(result);
            if let Some((metric, value)) = main_metric(result) {
                entry.insert(
                    "main_metric".into(),
                    serde_json::json!({"name": metric, "value": value}),
                );
            }
            datasets.insert(name.clone(), serde_json::Value::Object(entry));
        }
        println!(
            "{}",
            serde_json::json!({"datasets": datasets, "average": average, "count": mains.len()})
        );
        return Ok(());
    }
    println!("{:24} {:28} {:>8}", "dataset", "metric", "value");
    for (name, result) in &rows {
        let mut metrics: Vec<(String, f64)> = Vec::new();
        if let Some(zs) = &result.zero_shot {
            metrics.extend([
                ("acc1".to_owned(), zs.top1),
                ("acc5".to_owned(), zs.top5),
                ("mean_per_class_recall".to_owned(), zs.mean_per_class_recall),
            ]);
        }
        if let Some(r) = &result.retrieval {
            metrics.extend(r.metrics.iter().cloned());
        }
        if let Some((metric, value)) = main_metric(result) {
            if metric != "acc1" {
                metrics.push((metric.to_owned(), value));
            }
        }
        for (metric, value) in metrics {
            println!("{name:24} {metric:28} {value:>8.4}");
        }
    }
    println!("{:24} {:28} {average:>8.4}", "average", format!("main metric, {} sets", mains.len()));
    Ok(())
}

fn result_json(result: &EvalResult) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    if let Some(zs) = &result.zero_shot {
        out.insert(
            "zero_shot".into(),
            serde_json::json!({"top1": zs.top1, "top5": zs.top5, "mean_per_class_recall": zs.mean_per_class_recall, "samples": zs.samples}),
        );
    }
    if let Some(r) = &result.retrieval {
        let mut m: serde_json::Map<String, serde_json::Value> =
            r.metrics.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
        m.insert("pairs".into(), serde_json::json!(r.pairs));
        out.insert("retrieval".into(), serde_json::Value::Object(m));
    }
    out
}

fn print_result(result: &EvalResult, json: bool) {
    if json {
        let out = result_json(result);
        println!("{}", serde_json::Value::Object(out));
        return;
    }
    if let Some(zs) = &result.zero_shot {
        println!(
            "zero-shot: top-1 {:.2}%  top-5 {:.2}%  mean per-class recall {:.2}%  ({} images)",
            100.0 * zs.top1,
            100.0 * zs.top5,
            100.0 * zs.mean_per_class_recall,
            zs.samples
        );
    }
    if let Some(r) = &result.retrieval {
        println!("retrieval over {} pairs:", r.pairs);
        for (name, value) in &r.metrics {
            println!("  {name:28} {value:.4}");
        }
    }
}

/// The processes an evaluation is spread over: the ranks a launcher started (`oxclip launch`,
/// torchrun, srun), each embedding its share of every set, the counts and features summed or
/// gathered over them; or a single process. Rank 0 prints and shows progress.
struct Ranks {
    comm: Box<dyn Collectives>,
}

impl Ranks {
    /// Joins the world the environment describes, and sets `device` to this rank's (`cuda`
    /// means `cuda:LOCAL_RANK`, as for training).
    fn join(device: &mut String) -> anyhow::Result<Ranks> {
        let Some(world) = crate::dist::world_from_env()? else {
            return Ok(Ranks { comm: Box::new(SingleProcess) });
        };
        let cuda_count =
            if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let placement = oxclip_trainer::device::Placement {
            rank: world.rank,
            local_rank: world.local_rank,
            local_world_size: world.local_world_size,
        };
        let rank_device = oxclip_trainer::device::for_rank(
            device,
            Some(&placement),
            cuda_count,
            visible.as_deref(),
        )?;
        *device = oxclip_trainer::device::name(rank_device);
        // Evaluation runs no training step, so `dist:`'s defaults (auto backend, its timeout).
        Ok(Ranks { comm: collectives::connect(Some(&world), &DistConfig::default(), rank_device)? })
    }

    fn comm(&self) -> &dyn Collectives {
        self.comm.as_ref()
    }

    fn prints(&self) -> bool {
        self.comm.rank() == 0
    }

    /// A bar over this rank's share of `samples`; hidden off rank 0.
    fn progress_bar(&self, samples: u64) -> indicatif::ProgressBar {
        if !self.prints() {
            return indicatif::ProgressBar::hidden();
        }
        let bar = progress_bar("eval", "samples");
        bar.set_length(samples.div_ceil(self.comm.world_size() as u64));
        bar
    }
}
