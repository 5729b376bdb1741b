//! `oxclip tokenizer encode` (texts to ids, as open_clip's `tokenize`) and `oxclip tokenizer
//! train` (a CLIP-style BPE from a dataset's captions).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use oxclip_data_loader::tokenizer::{train_clip_bpe, TrainStage};
use oxclip_data_loader::{DataSource, DataSpec, Tokenizer};

use super::args::read_texts;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Token ids of texts, exactly as open_clip.tokenize gives them (a JSON list of lists).
    Encode(EncodeArgs),
    /// Train a CLIP-style BPE tokenizer on a dataset's captions.
    Train(TrainArgs),
}

pub fn run(command: TokenizerCommand) -> anyhow::Result<()> {
    match command {
        TokenizerCommand::Encode(args) => encode(args),
        TokenizerCommand::Train(args) => train(args),
    }
}

#[derive(Args)]
pub struct EncodeArgs {
    /// A JSON file with a list of texts.
    #[arg(long)]
    pub texts_file: PathBuf,
    /// Where to write the ids, a JSON list of lists; standard output if not given.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tokens per text, start and end of text included; shorter texts are padded (with 0, or
    /// a Hugging Face tokenizer's pad token), longer ones cut keeping the end token (CLIP's 77).
    #[arg(long, default_value_t = 77)]
    pub context_length: usize,
    /// A tokenizer.json, or a Hugging Face model directory holding one, instead of the CLIP
    /// BPE (one without a post-processor, as `oxclip tokenizer train` writes, is used as the
    /// CLIP BPE is; any other as transformers' AutoTokenizer: its own specials and pad token).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn encode(args: EncodeArgs) -> anyhow::Result<()> {
    if args.context_length < 2 {
        bail!("--context-length must be at least 2 (start and end of text)");
    }
    let tokenizer = oxclip_trainer::prepare::standalone_tokenizer(args.tokenizer.as_deref())?;
    let texts = read_texts(&args.texts_file)?;
    let ids: Vec<Vec<i64>> =
        texts.iter().map(|t| tokenizer.encode(t, args.context_length)).collect();
    let json = serde_json::to_string(&ids)?;
    match &args.out {
        Some(path) => std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

#[derive(Args)]
pub struct TrainArgs {
    /// Whose captions to learn from: any data spec (shards are streamed, images not decoded).
    #[arg(long)]
    pub data: String,
    /// Vocabulary size, the 512 byte symbols and the 2 special tokens included
    /// (OpenAI's CLIP: 49408). Captions too few to yield this many are an error saying how
    /// many they do yield.
    #[arg(long, default_value_t = 32000)]
    pub vocab_size: usize,
    /// A pair of symbols is merged only if it occurs at least this often in the captions.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// The tokenizer.json to write (then `data.tokenizer: PATH`, and the model's
    /// `text_cfg.vocab_size` = the vocabulary size).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let source = DataSource::open(&DataSpec::parse(&args.data)?, 0)?;
    let (captions, skipped) = source.captions()?;
    if captions.is_empty() {
        bail!("{}: no captions to learn from ({} skipped: {skipped})", args.data, skipped.total());
    }
    let bar = progress_bar(captions.len() as u64);
    let trained = train_clip_bpe(&captions, args.vocab_size, args.min_frequency, &|p| {
        let message = match (p.stage, p.done == p.total) {
            (TrainStage::Symbols, _) => "finding word-end symbols",
            (TrainStage::Merges, false) => "counting words",
            (TrainStage::Merges, true) => "learning merges",
        };
        bar.set_message(message);
        bar.set_position(p.done);
    });
    bar.finish_and_clear();
    let trained = trained?;
    if trained.vocab_size < args.vocab_size {
        bail!(
            "the {} captions of {} yield {} tokens ({} merges of pairs seen at least --min-frequency {} times), \
             not the --vocab-size {} asked; nothing written. Ask for --vocab-size {} or fewer, lower --min-frequency, \
             or train on more captions",
            captions.len(),
            args.data,
            trained.vocab_size,
            trained.merges,
            args.min_frequency,
            args.vocab_size,
            trained.vocab_size,
        );
    }
    std::fs::write(&args.out, trained.json)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let tok = Tokenizer::from_tokenizer_json(&args.out)?;
    println!(
        "trained on {} captions ({} skipped): {} tokens -> {}",
        captions.len(),
        skipped.total(),
        tok.vocab_size(),
        args.out.display()
    );
    Ok(())
}

/// A bar on stderr over the captions read in each pass (hidden when stderr is not a
/// terminal, as `oxclip data pack`'s).
fn progress_bar(captions: u64) -> ProgressBar {
    let bar = ProgressBar::new(captions);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} captions ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}
