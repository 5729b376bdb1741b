//! `oxclip embed`, `oxclip classify` and `oxclip caption`: a trained model used directly.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail};
use clap::builder::RangedU64ValueParser;
use clap::{Args, ValueEnum};

use oxclip_trainer::generate::{GenerateOptions, Strategy};
use oxclip_trainer::infer::image_files;
use oxclip_trainer::interchange::safetensors::write_safetensors;
use oxclip_trainer::TrainError;

use super::args::{read_texts, ModelArgs};
use crate::progress::progress_bar;

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image files or directories (searched recursively for .jpg/.jpeg/.png/.webp, sorted).
    /// A file that cannot be read or decoded is skipped, named on stderr and counted.
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// A JSON file with a list of texts.
    #[arg(long)]
    pub texts_file: Option<PathBuf>,
    /// Where to write `image_embeds` (n x d) and `text_embeds` (m x d), L2-normalised fp32;
    /// the file's metadata lists the image paths and texts in row order.
    #[arg(long)]
    pub out: PathBuf,
    /// Images or texts embedded at a time.
    #[arg(long, default_value_t = 64, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_size: usize,
    /// Threads decoding and transforming images.
    #[arg(long, default_value_t = 4, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub workers: usize,
}

pub fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    if args.images.is_empty() && args.texts_file.is_none() {
        bail!("nothing to embed: give --images and/or --texts-file");
    }
    // Inputs first: nothing is loaded, and no file written, for a folder without images.
    let images = image_files(&args.images)?;
    let texts = match &args.texts_file {
        Some(path) => read_texts(path)?,
        None => Vec::new(),
    };
    if let (Some(path), true) = (&args.texts_file, texts.is_empty()) {
        bail!("{} holds no texts (an empty list)", path.display());
    }
    let embedder = args.model.open(args.texts_file.is_some())?.embedder()?;
    let mut tensors = std::collections::BTreeMap::new();
    let mut metadata = HashMap::new();
    let mut embedded_images = 0;
    if !args.images.is_empty() {
        let bar = progress_bar("embed", "images");
        bar.set_length(images.len() as u64);
        let embedded =
            embedder.embed_images(&images, args.batch_size, args.workers, &mut |n| bar.inc(n))?;
        bar.finish_and_clear();
        // Each unusable file by name, then how many, as the loader reports skipped samples.
        for (_, why) in &embedded.skipped {
            tracing::warn!("skipped: {why}");
        }
        if !embedded.skipped.is_empty() {
            tracing::warn!(
                "{} of {} image(s) skipped ({}); {} embedded",
                embedded.skipped.len(),
                images.len(),
                embedded.skip_counts,
                embedded.kept.len()
            );
        }
        embedded_images = embedded.kept.len();
        tensors.insert("image_embeds".to_owned(), embedded.embeds);
        let names: Vec<String> = embedded.kept.iter().map(|p| p.display().to_string()).collect();
        metadata.insert("images".to_owned(), serde_json::to_string(&names)?);
    }
    if args.texts_file.is_some() {
        tensors.insert("text_embeds".to_owned(), embedder.embed_texts(&texts, args.batch_size)?);
        metadata.insert("texts".to_owned(), serde_json::to_string(&texts)?);
    }
    write_safetensors(&tensors, Some(metadata), &args.out)?;
    let skipped = images.len() - embedded_images;
    let skipped = if skipped > 0 { format!(" ({skipped} skipped)") } else { String::new() };
    println!(
        "{embedded_images} image(s){skipped}, {} text(s) -> {}",
        texts.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image to classify.
    #[arg(long)]
    pub image: PathBuf,
    /// Candidate labels (each a text: "a photo of a dog", or just "dog"), none empty or
    /// repeated. A CLIP model's probabilities sum to 1 over them, so it needs at least two; a
    /// SigLIP model's are each label's own.
    #[arg(long, num_args = 1.., required = true)]
    pub labels: Vec<String>,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

pub fn classify(args: ClassifyArgs) -> anyhow::Result<()> {
    let embedder = args.model.open(true)?.embedder()?;
    let probs = embedder.classify(&args.image, &args.labels).map_err(|e| match e {
        TrainError::Labels(why) => anyhow!("--labels: {why}"),
        other => other.into(),
    })?;
    let mut ranked: Vec<(&String, f64)> = args.labels.iter().zip(probs).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    if args.json {
        let map: serde_json::Map<String, serde_json::Value> =
            ranked.iter().map(|(l, p)| ((*l).clone(), serde_json::json!(p))).collect();
        println!("{}", serde_json::Value::Object(map));
    } else {
        for (label, p) in ranked {
            println!("{:6.2}%  {label}", 100.0 * p);
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct CaptionArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image files or directories (searched recursively for .jpg/.jpeg/.png/.webp, sorted).
    #[arg(long, num_args = 1.., required = true)]
    pub image: Vec<PathBuf>,
    /// How the words are chosen: `beam-search` (open_clip's default), `top-k` or `top-p`
    /// (sampling; `top-k` with `--top-k 1` is greedy).
    #[arg(long, value_enum, default_value_t = Generation::BeamSearch)]
    pub generation: Generation,
    /// Beams per image (beam search).
    #[arg(long, default_value_t = 6)]
    pub num_beams: usize,
    /// Groups the beams are searched in (beam search); must divide `--num-beams`.
    #[arg(long, default_value_t = 3)]
    pub num_beam_groups: usize,
    /// Sampling keeps the k most likely tokens (`--generation top-k`).
    #[arg(long, default_value_t = 1)]
    pub top_k: usize,
    /// Sampling drops the least likely tokens whose probabilities add up to at most 1 - p
    /// (`--generation top-p`).
    #[arg(long, default_value_t = 0.1)]
    pub top_p: f64,
    /// Sampling divides the logits by it.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// The most tokens of a caption, start and end included.
    #[arg(long, default_value_t = 30)]
    pub seq_len: usize,
    /// No end token before this many tokens.
    #[arg(long, default_value_t = 5)]
    pub min_seq_len: usize,
    /// Above 1, tokens already in the caption become less likely.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Seed of the sampling (top-k, top-p): the same seed gives the same captions.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Images captioned at a time.
    #[arg(long, default_value_t = 16, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_size: usize,
    /// Print one JSON object per image (`image`, `caption`, `ids`) instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// `CoCa.generate`'s `generation_type`.
#[derive(Clone, Copy, ValueEnum)]
pub enum Generation {
    BeamSearch,
    TopK,
    TopP,
}

pub fn caption(args: CaptionArgs) -> anyhow::Result<()> {
    let images = image_files(&args.image)?;
    let strategy = match args.generation {
        Generation::BeamSearch => Strategy::BeamSearch {
            num_beams: args.num_beams,
            num_beam_groups: args.num_beam_groups,
        },
        Generation::TopK => Strategy::TopK { k: args.top_k },
        Generation::TopP => Strategy::TopP { p: args.top_p },
    };
    let opts = GenerateOptions {
        strategy,
        seq_len: args.seq_len,
        temperature: args.temperature,
        min_seq_len: args.min_seq_len,
        repetition_penalty: args.repetition_penalty,
        ..GenerateOptions::default()
    };
    // The options first: a bad flag is refused before the model is loaded.
    opts.validate()?;
    let embedder = args.model.open(true)?.embedder()?;
    tch::manual_seed(args.seed);
    let bar = progress_bar("caption", "images");
    bar.set_length(images.len() as u64);
    let mut captions = Vec::with_capacity(images.len());
    for chunk in images.chunks(args.batch_size) {
        captions.extend(embedder.caption_image_files(chunk, args.batch_size, &opts)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    for (path, caption) in images.iter().zip(captions) {
        if args.json {
            let line = serde_json::json!({
                "image": path.display().to_string(),
                "caption": caption.text,
                "ids": caption.ids,
            });
            println!("{line}");
        } else {
            println!("{}\t{}", path.display(), caption.text);
        }
    }
    Ok(())
}
