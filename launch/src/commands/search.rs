//! `oxclip index` and `oxclip search`: embed a dataset once, then find the images that best
//! match a text, or the captions that best match an image.
//!
//! An index is one safetensors file: `image_embeds` and `text_embeds` (n x d, L2-normalised
//! fp32, row i = sample i), with the sample keys, captions, the weights file and the model
//! config in its metadata, so that `search` embeds queries with the same model.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::builder::RangedU64ValueParser;
use clap::Args;
use tch::{Kind, Tensor};

use oxclip_data_loader::{DataSource, DataSpec};
use oxclip_trainer::collectives::SingleProcess;
use oxclip_trainer::eval::pass;
use oxclip_trainer::interchange::safetensors::write_safetensors;
use oxclip_trainer::model::{normalize, ModelConfig};

use super::args::ModelArgs;
use crate::progress::progress_bar;

#[derive(Args)]
pub struct IndexArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to index: any data spec (shards, CSV, JSONL, a folder with captions, Parquet,
    /// Arrow).
    #[arg(long)]
    pub data: String,
    /// The index file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Samples embedded at a time.
    #[arg(long, default_value_t = 256, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_size: usize,
    /// Threads decoding and transforming images.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
}

pub fn index(args: IndexArgs) -> anyhow::Result<()> {
    let opened = args.model.open(true)?;
    let (cfg, weights, device) = (opened.config.clone(), opened.weights.clone(), opened.device);
    let (_vs, model) = opened.load_for_inference()?;
    let source = DataSource::open(&DataSpec::parse(&args.data)?, 0)?;
    let mut loader = pass::eval_loader_with(
        &source,
        opened.text_tokenizer()?,
        &cfg,
        &opened.preprocess,
        args.batch_size,
        args.workers,
        &SingleProcess,
    )?;
    let progress = progress_bar("index", "samples");
    progress.set_length(source.len());
    let (size, context) = (cfg.vision_cfg.image_size, cfg.text_cfg.context_length);
    let (mut images, mut texts, mut keys, mut captions) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sources = Vec::new();
    let _guard = tch::no_grad_guard();
    while let Some(batch) = loader.next_eval_batch()? {
        let (pixels, tokens) =
            oxclip_trainer::device::batch_to_device(&batch, size, context, device)?;
        images.push(
            normalize(&model.encode_image(&pixels).to_kind(Kind::Float))
                .to_device(tch::Device::Cpu),
        );
        texts.push(
            normalize(&model.encode_text(&tokens).to_kind(Kind::Float)).to_device(tch::Device::Cpu),
        );
        progress.inc((batch.batch_size as u64 + batch.skipped.total()).max(1));
        keys.extend(batch.keys);
        captions.extend(batch.captions);
        sources.extend(batch.sources);
    }
    progress.finish_and_clear();
    if keys.is_empty() {
        bail!("{}: no usable samples to index", args.data);
    }
    let tensors = BTreeMap::from([
        ("image_embeds".to_owned(), Tensor::cat(&images, 0)),
        ("text_embeds".to_owned(), Tensor::cat(&texts, 0)),
    ]);
    let mut metadata = HashMap::from([
        ("keys".to_owned(), serde_json::to_string(&keys)?),
        ("captions".to_owned(), serde_json::to_string(&captions)?),
        // The original file of each sample (packed shards, CSV, JSONL, folders), or null.
        ("sources".to_owned(), serde_json::to_string(&sources)?),
        (
            "weights".to_owned(),
            weights.canonicalize().unwrap_or(weights.clone()).display().to_string(),
        ),
        ("model".to_owned(), serde_json::to_string(&cfg)?),
        ("preprocess".to_owned(), serde_json::to_string(&opened.preprocess)?),
    ]);
    if let Some(path) = &opened.tokenizer_path {
        metadata.insert(
            "tokenizer".to_owned(),
            path.canonicalize().unwrap_or(path.clone()).display().to_string(),
        );
    }
    write_safetensors(&tensors, Some(metadata), &args.out)?;
    println!("indexed {} samples of {} -> {}", keys.len(), args.data, args.out.display());
    Ok(())
}

#[derive(Args)]
pub struct SearchArgs {
    /// An index written by `oxclip index`.
    #[arg(long)]
    pub index: PathBuf,
    /// Find the images that best match this text.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    pub text: Option<String>,
    /// Find the captions that best match this image.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// How many results to print, best first (at most the number indexed).
    #[arg(long, default_value_t = 5, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub top: usize,
    /// The tokenizer.json (or Hugging Face model directory holding one) the index's model
    /// reads, if not the CLIP BPE; checked against the model as `oxclip embed` checks it.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Where the query is embedded: `cpu`, `cuda`, `cuda:N` or `auto` (the first GPU if there
    /// is one, else the CPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print one JSON list.
    #[arg(long)]
    pub json: bool,
}

pub fn search(args: SearchArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.index)
        .with_context(|| format!("cannot read {}", args.index.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors index", args.index.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |name: &str| {
        meta.get(name).cloned().with_context(|| {
            format!("{} is not an `oxclip index` file (no {name})", args.index.display())
        })
    };
    let keys: Vec<String> = serde_json::from_str(&field("keys")?)?;
    let captions: Vec<String> = serde_json::from_str(&field("captions")?)?;
    // Indexes written before sources were kept have none.
    let sources: Vec<Option<String>> =
        meta.get("sources").and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    let cfg: ModelConfig = serde_json::from_str(&field("model")?)?;
    let weights = PathBuf::from(field("weights")?);
    // The index records how its model's inputs were prepared; older indexes, the defaults.
    let tokenizer_path =
        args.tokenizer.clone().or_else(|| meta.get("tokenizer").map(PathBuf::from));
    let preprocess = match meta.get("preprocess") {
        Some(p) => serde_json::from_str(p)
            .with_context(|| format!("{}: its preprocess record", args.index.display()))?,
        None => oxclip_trainer::prepare::default_preprocess(&cfg),
    };
    let found = oxclip_trainer::weights_path::Found::File(weights.clone());
    let embedder = super::open_recorded(
        found,
        weights.clone(),
        cfg,
        tokenizer_path,
        args.tokenizer.is_some(),
        preprocess,
        &args.device,
        true,
    )?
    .embedder()
    .with_context(|| format!("the index's model ({})", weights.display()))?;
    let tensors: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(&args.index)?.into_iter().collect();
    let (query, targets) = match (&args.text, &args.image) {
        (Some(text), None) => {
            (embedder.embed_texts(std::slice::from_ref(text), 1)?, &tensors["image_embeds"])
        }
        (None, Some(image)) => {
            (embedder.embed_image_files(std::slice::from_ref(image), 1)?, &tensors["text_embeds"])
        }
        _ => bail!("give exactly one of --text and --image"),
    };
    let scores = query.matmul(&targets.tr()).view([-1]);
    let k = args.top.min(keys.len()) as i64;
    let (values, indices) = scores.topk(k, 0, true, true);
    let values = Vec::<f32>::try_from(&values)?;
    let indices = Vec::<i64>::try_from(&indices)?;
    let source = |i: usize| sources.get(i).cloned().flatten();
    let hits: Vec<(f32, &String, &String, Option<String>)> = values
        .iter()
        .zip(&indices)
        .map(|(s, &i)| (*s, &keys[i as usize], &captions[i as usize], source(i as usize)))
        .collect();
    if args.json {
        let list: Vec<serde_json::Value> = hits.iter().map(|(s, k, c, src)| serde_json::json!({"score": s, "key": k, "source": src, "caption": c})).collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        // The original file name where the data kept one, else the sample key.
        for (score, key, caption, src) in hits {
            println!("{score:.4}  {}  {caption}", src.as_deref().unwrap_or(key));
        }
    }
    Ok(())
}
