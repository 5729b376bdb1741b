//! `oxclip eval`: zero-shot classification and image-text retrieval of a checkpoint, the
//! numbers the field reports, computed as open_clip computes them.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::builder::RangedU64ValueParser;
use clap::Args;

use oxclip_data_loader::{DataSource, DataSpec};
use oxclip_trainer::eval::{self, benchmark, EvalResult};
use oxclip_trainer::train::read_templates;
use oxclip_trainer::collectives::SingleProcess;

use super::embed::ModelArgs;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Zero-shot classification data: `classes:DIR` or a plain directory with a folder per
    /// class, or any spec whose samples carry a class index: shards (`KEY.cls`), a CSV or
    /// JSONL with a `label` column (`csv:FILE?label_key=COLUMN` for another name);
    /// `imagenet1k:DIR` (ImageNet's `val/` folder or labelled shards, class names built in);
    /// a clip_benchmark dataset directory (`wds:DIR`, or a directory with `classnames.txt` or
    /// `test/`), scored as classification or retrieval by what it holds.
    #[arg(long, conflicts_with = "retrieval", required_unless_present = "retrieval")]
    pub zero_shot: Option<String>,
    /// Class names, one per line (line i names class i). For a folder per class the folder
    /// names are used when this is not given; when given, it must name as many classes.
    #[arg(long)]
    pub classnames: Option<PathBuf>,
    /// Prompt templates, one per line with `{}` for the class name; default OpenAI's 80.
    #[arg(long)]
    pub templates: Option<String>,
    /// Image-caption pairs for retrieval: any data spec (shards, CSV, JSONL, folder).
    #[arg(long)]
    pub retrieval: Option<String>,
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

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let (spec_text, retrieval) = match (&args.zero_shot, &args.retrieval) {
        (Some(data), None) => (data.clone(), false),
        (None, Some(data)) => (data.clone(), true),
        _ => bail!("give exactly one of --zero-shot DATA and --retrieval DATA"),
    };
    let templates = args.templates.as_deref().map(|t| read_templates(Some(t))).transpose()?;
    if let Some(set) = benchmark::resolve(&spec_text, templates)? {
        return run_benchmark(&args, &spec_text, &set);
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
        let set = eval::open_zero_shot(&spec, args.classnames.as_deref(), 0)?;
        (set.source, Some((set.classnames, read_templates(args.templates.as_deref())?)))
    };
    let opened = args.model.open(true)?;
    let tokenizer = opened.text_tokenizer()?;
    let device = opened.device;
    let (_vs, model) = opened.load()?;
    let classifier = match &zero_shot {
        Some((names, templates)) => Some(eval::zero_shot_classifier(&model, &tokenizer, names, templates, device)?),
        None => None,
    };
    let mut loader = eval::eval_loader_with(&source, tokenizer, &opened.config, &opened.preprocess, args.batch_size, args.workers, &SingleProcess)?;
    let bar = super::progress_bar("eval", "samples");
    bar.set_length(source.len());
    let result = eval::evaluate_with_progress(&model, &mut loader, classifier.as_ref(), retrieval, device, &SingleProcess, &mut |n| bar.inc(n))
        .with_context(|| format!("evaluating {spec_text}"))?;
    bar.finish_and_clear();
    print_result(&result, args.json);
    Ok(())
}

/// ImageNet-1k or a clip_benchmark directory: what the set holds decides the task, whichever
/// of --zero-shot and --retrieval named it.
fn run_benchmark(args: &EvalArgs, spec_text: &str, set: &benchmark::Benchmark) -> anyhow::Result<()> {
    if args.classnames.is_some() {
        bail!("{spec_text} names its own classes (classnames.txt, or the built-in ImageNet-1k list); leave out --classnames");
    }
    let source = eval::open_benchmark(set, 0)?;
    let opened = args.model.open(true)?;
    let tokenizer = opened.text_tokenizer()?;
    let device = opened.device;
    let (_vs, model) = opened.load()?;
    let mut loader = eval::eval_loader_with(&source, tokenizer.clone(), &opened.config, &opened.preprocess, args.batch_size, args.workers, &SingleProcess)?;
    let bar = super::progress_bar("eval", "samples");
    bar.set_length(source.len());
    let result = match &set.task {
        benchmark::Task::Classification { classnames, templates } => {
            let classifier = eval::zero_shot_classifier(&model, &tokenizer, classnames, templates, device)?;
            eval::evaluate_with_progress(&model, &mut loader, Some(&classifier), false, device, &SingleProcess, &mut |n| bar.inc(n))
        }
        benchmark::Task::Retrieval => eval::evaluate_multi_caption(&model, &mut loader, &tokenizer, device, &SingleProcess, &mut |n| bar.inc(n))
            .map(|r| EvalResult { zero_shot: None, retrieval: Some(r) }),
    }
    .with_context(|| format!("evaluating {spec_text}"))?;
    bar.finish_and_clear();
    print_result(&result, args.json);
    Ok(())
}

fn print_result(result: &EvalResult, json: bool) {
    if json {
        let mut out = serde_json::Map::new();
        if let Some(zs) = &result.zero_shot {
            out.insert(
                "zero_shot".into(),
                serde_json::json!({"top1": zs.top1, "top5": zs.top5, "mean_per_class_recall": zs.mean_per_class_recall, "samples": zs.samples}),
            );
        }
        if let Some(r) = &result.retrieval {
            let mut m: serde_json::Map<String, serde_json::Value> = r.metrics.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
            m.insert("pairs".into(), serde_json::json!(r.pairs));
            out.insert("retrieval".into(), serde_json::Value::Object(m));
        }
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
