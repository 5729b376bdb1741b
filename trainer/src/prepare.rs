//! How a model's inputs are prepared: its text tokenizer (the CLIP BPE, or a Hugging Face
//! `tokenizer.json` prepared as open_clip or transformers would) checked against the text
//! tower, and its image preprocessing ([`Preprocess`]). Training, evaluation and every
//! inference command go through here, so they cannot disagree.

use std::path::Path;

use oxclip_data_loader::tokenizer::{Clean, HfOptions};
use oxclip_data_loader::{Preprocess, Tokenizer};

use crate::error::{Result, TrainError};
use crate::model::config::TextPool;
use crate::model::ModelConfig;

/// The preprocessing a model expects when nothing says otherwise: SigLIP's (mean = std =
/// 0.5, squash resize) for SigLIP configs (a timm trunk whose name holds `siglip`), else
/// OpenAI's (its mean/std, shortest-side resize and centre crop), both bicubic at the
/// model's image size.
pub fn default_preprocess(model: &ModelConfig) -> Preprocess {
    let size = model.vision_cfg.image_size as u32;
    let siglip = model
        .vision_cfg
        .timm_model_name
        .as_deref()
        .is_some_and(|n| n.to_ascii_lowercase().contains("siglip"));
    if siglip {
        Preprocess::siglip(size)
    } else {
        Preprocess::openai(size)
    }
}

/// The text tokenizer for `model`, checked against it ([`check_tokenizer`]). `path` (from
/// `--tokenizer` or `data.tokenizer`) is a `tokenizer.json` or a directory holding one; without
/// it, the CLIP BPE. How the text is prepared:
/// - the model's config names a Hugging Face tokenizer (`text_cfg.hf_tokenizer_name` or
///   `tokenizer_kwargs`, open_clip's SigLIP, CLIPA...): as open_clip's `HFTokenizer` with those
///   kwargs (`clean`, default `whitespace`; `strip_sep_token`);
/// - a tokenizer.json without a post-processor (what `oxclip tokenizer train` writes): as
///   open_clip's CLIP `tokenize` (start and end tokens added, zero padding);
/// - any other (a Hugging Face model's tokenizer): as transformers' `AutoTokenizer` with
///   `padding="max_length", truncation=True`.
pub fn text_tokenizer(path: Option<&Path>, model: &ModelConfig) -> Result<Tokenizer> {
    let text = &model.text_cfg;
    let Some(path) = path else {
        if let Some(name) = &text.hf_tokenizer_name {
            return Err(TrainError::Input(format!(
                "the model's text tower reads the Hugging Face tokenizer `{name}` (text_cfg.hf_tokenizer_name); \
                 oxclip never downloads it: give its tokenizer.json (or the directory holding it) with \
                 --tokenizer or data.tokenizer"
            )));
        }
        let tokenizer = Tokenizer::clip_default()?;
        check_tokenizer(&tokenizer, model, "the CLIP BPE")?;
        return Ok(tokenizer);
    };
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_owned() };
    if !file.is_file() {
        return Err(TrainError::Input(format!(
            "tokenizer {}: no such file (expected a tokenizer.json or a directory holding one)",
            file.display()
        )));
    }
    let tokenizer = if text.hf_tokenizer_name.is_some() || text.tokenizer_kwargs.is_some() {
        let kwargs = text.tokenizer_kwargs.clone().unwrap_or_default();
        let clean = match kwargs.clean.as_deref() {
            None => Clean::Whitespace,
            Some(name) => Clean::parse(name).ok_or_else(|| {
                TrainError::ModelConfig(format!("text_cfg.tokenizer_kwargs.clean: `{name}` is not one of canonicalize, whitespace, lower"))
            })?,
        };
        Tokenizer::hugging_face(
            path,
            HfOptions {
                clean: Some(clean),
                strip_sep_token: kwargs.strip_sep_token.unwrap_or(false),
                language: kwargs.language.clone(),
            },
        )?
    } else if !path.is_dir() && has_no_post_processor(&file)? {
        Tokenizer::from_tokenizer_json(&file)?
    } else {
        Tokenizer::hugging_face(path, HfOptions::default())?
    };
    check_tokenizer(&tokenizer, model, &format!("tokenizer {}", path.display()))?;
    Ok(tokenizer)
}

/// A tokenizer without a model (`oxclip tokenizer encode`): the CLIP BPE, a tokenizer.json without a
/// post-processor as open_clip's CLIP `tokenize`, any other as transformers'
/// `AutoTokenizer`.
pub fn standalone_tokenizer(path: Option<&Path>) -> Result<Tokenizer> {
    let Some(path) = path else { return Ok(Tokenizer::clip_default()?) };
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_owned() };
    if !file.is_file() {
        return Err(TrainError::Input(format!(
            "tokenizer {}: no such file (expected a tokenizer.json or a directory holding one)",
            file.display()
        )));
    }
    if !path.is_dir() && has_no_post_processor(&file)? {
        Ok(Tokenizer::from_tokenizer_json(&file)?)
    } else {
        Ok(Tokenizer::hugging_face(path, HfOptions::default())?)
    }
}

fn check_hf_tokenizer(tokenizer: &Tokenizer, model: &ModelConfig, what: &str) -> Result<()> {
    let arch = crate::model::hf_text::check(&model.text_cfg)?;
    let name = model.text_cfg.hf_model_name.as_deref().unwrap_or_default();
    let ids = tokenizer.vocab_size() as i64;
    if ids > arch.vocab_size() {
        return Err(TrainError::Input(format!(
            "{what} produces ids up to {} ({ids} ids) but the text tower ({name}) has {} embeddings: \
             use the tokenizer of {name} (text_cfg.hf_tokenizer_name)",
            ids - 1,
            arch.vocab_size()
        )));
    }
    if tokenizer.pad_id() != arch.pad_token_id() {
        return Err(TrainError::Input(format!(
            "{what} pads with id {} but the text tower ({name}) masks out id {} (pad_token_id): \
             every padding token would be attended to and pooled. Use the tokenizer of {name} \
             (text_cfg.hf_tokenizer_name)",
            tokenizer.pad_id(),
            arch.pad_token_id()
        )));
    }
    Ok(())
}

/// CoCa's decoder predicts every next token of a caption over `text_cfg.vocab_size` ids,
/// and its loss skips the padding the text tower masks: the tokenizer's ids must fit the
/// decoder, and it must pad with the text tower's pad id.
fn check_coca_tokenizer(tokenizer: &Tokenizer, model: &ModelConfig, what: &str) -> Result<()> {
    let text = &model.text_cfg;
    let ids = tokenizer.vocab_size() as i64;
    if ids > text.vocab_size {
        return Err(TrainError::Input(format!(
            "{what} produces ids up to {} ({ids} ids) but CoCa's decoder predicts text_cfg.vocab_size = {} ids: \
             captions with larger ids could not be scored. Set text_cfg.vocab_size to at least {ids} \
             (open_clip's coca_roberta-ViT-B-32 leaves it at CLIP's 49408)",
            ids - 1,
            text.vocab_size
        )));
    }
    if !text.is_hf() && tokenizer.pad_id() != text.pad_id {
        return Err(TrainError::Input(format!(
            "{what} pads with id {} but the CoCa text tower masks and the caption loss skips id {} \
             (text_cfg.pad_id): use the tokenizer the model was trained with, or set text_cfg.pad_id",
            tokenizer.pad_id(),
            text.pad_id
        )));
    }
    Ok(())
}

fn has_no_post_processor(file: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(file).map_err(crate::error::io_err(file))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Input(format!("tokenizer {}: not JSON: {e}", file.display())))?;
    Ok(json.get("post_processor").is_none_or(serde_json::Value::is_null))
}

/// Refuses a tokenizer the text tower cannot read correctly: ids beyond `text_cfg.vocab_size`
/// (the embedding lookup would fail mid-run), or a pooling that would not find the end of the
/// text: `argmax` needs the end token to be the tokenizer's largest id (CLIP's EOT), `eos`
/// needs the tokenizer to end texts with `text_cfg.eos_id`. `last` and `first` read a fixed
/// position and take any tokenizer.
///
/// A Hugging Face text tower attends to and pools every token but its `pad_token_id`: the
/// tokenizer must pad with that id, and its ids must fit the encoder's vocabulary.
pub fn check_tokenizer(tokenizer: &Tokenizer, model: &ModelConfig, what: &str) -> Result<()> {
    let text = &model.text_cfg;
    if model.is_coca() {
        check_coca_tokenizer(tokenizer, model, what)?;
    }
    if text.is_hf() {
        return check_hf_tokenizer(tokenizer, model, what);
    }
    let ids = tokenizer.vocab_size() as i64;
    if ids > text.vocab_size {
        return Err(TrainError::Input(format!(
            "{what} produces ids up to {} ({ids} ids) but the model's text tower has text_cfg.vocab_size {}: \
             use the tokenizer the model was trained with, or a model with vocab_size >= {ids}",
            ids - 1,
            text.vocab_size
        )));
    }
    // CoCa's class embedding is where such a tower pools, whatever the ids.
    let pool = if text.embed_cls { TextPool::Last } else { text.pool_type };
    match pool {
        TextPool::Argmax => {
            if tokenizer.eot_id() != Some(tokenizer.max_id()) {
                let ends = tokenizer
                    .eot_id()
                    .map_or("no end token".to_owned(), |id| format!("end token id {id}"));
                return Err(TrainError::Input(format!(
                    "the model pools each text at its largest token id (text_cfg.pool_type: argmax, CLIP's end of text), \
                     but {what} has {ends} while its largest id is {}: argmax would pool a word or padding. \
                     Use a model whose text_cfg.pool_type is eos (with eos_id), last or first, or a CLIP-style tokenizer",
                    tokenizer.max_id()
                )));
            }
        }
        TextPool::Eos => {
            if tokenizer.eot_id() != Some(text.eos_id) {
                let ends = tokenizer
                    .eot_id()
                    .map_or("no end token".to_owned(), |id| format!("end token id {id}"));
                return Err(TrainError::Input(format!(
                    "the model pools each text at text_cfg.eos_id {} (pool_type: eos), but {what} has {ends}",
                    text.eos_id
                )));
            }
        }
        TextPool::Last | TextPool::First => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers").join(name)
    }

    fn model(json: serde_json::Value) -> ModelConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn tokenizer_mode_and_checks_follow_the_model() {
        let siglip = model(serde_json::json!({"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {"context_length": 16, "vocab_size": 400, "hf_tokenizer_name": "timm/x", "tokenizer_kwargs": {"clean": "canonicalize"},
                         "width": 32, "heads": 2, "layers": 1, "pool_type": "last", "no_causal_mask": true}}));
        let tok = text_tokenizer(Some(&fixture("siglip_sp")), &siglip).unwrap();
        // canonicalize: punctuation and case do not matter.
        assert_eq!(tok.encode("A Photo, of a CAT!", 16), tok.encode("a photo of a cat", 16));
        assert_eq!(default_preprocess(&siglip), Preprocess::siglip(32));
        // Without the file: an error naming the tokenizer and the flag.
        let err = text_tokenizer(None, &siglip).unwrap_err().to_string();
        assert!(err.contains("timm/x") && err.contains("--tokenizer"), "{err}");
        // Too small a vocabulary: both numbers named.
        let mut small = siglip.clone();
        small.text_cfg.vocab_size = 300;
        let err = text_tokenizer(Some(&fixture("siglip_sp")), &small).unwrap_err().to_string();
        assert!(err.contains("400") && err.contains("300"), "{err}");
        // Argmax pooling with a tokenizer whose end token (</s> = 1) is not its largest id.
        let mut argmax = siglip.clone();
        argmax.text_cfg.pool_type = TextPool::Argmax;
        let err = text_tokenizer(Some(&fixture("siglip_sp")), &argmax).unwrap_err().to_string();
        assert!(err.contains("pool_type: argmax") && err.contains("end token id 1"), "{err}");
        // eos pooling at the tokenizer's end token is fine; at another id it is not.
        let mut eos = argmax.clone();
        eos.text_cfg.pool_type = TextPool::Eos;
        eos.text_cfg.eos_id = 1;
        text_tokenizer(Some(&fixture("siglip_sp")), &eos).unwrap();
        eos.text_cfg.eos_id = 5;
        assert!(text_tokenizer(Some(&fixture("siglip_sp")), &eos).is_err());
        // A Hugging Face directory for a model without tokenizer settings: transformers' way,
        // no cleaning (this tokenizer keeps case and punctuation).
        let mut plain = siglip.clone();
        plain.text_cfg.hf_tokenizer_name = None;
        plain.text_cfg.tokenizer_kwargs = None;
        let tok = text_tokenizer(Some(&fixture("siglip_sp")), &plain).unwrap();
        assert_ne!(tok.encode("A Photo, of a CAT!", 16), tok.encode("a photo of a cat", 16));
        assert_eq!(
            default_preprocess(&model(
                serde_json::json!({"embed_dim": 32, "vision_cfg": {"image_size": 64}, "text_cfg": {}})
            )),
            Preprocess::openai(64)
        );
    }

    /// CoCa's decoder predicts every caption token and its loss skips the padding: the
    /// tokenizer's ids must fit `text_cfg.vocab_size`, and it must pad with `text_cfg.pad_id`.
    /// The class embedding is where the tower pools, so an argmax config needs no CLIP ids.
    #[test]
    fn a_coca_tokenizer_fits_the_decoder_and_pads_as_the_tower_masks() {
        let tok = standalone_tokenizer(Some(&fixture("siglip_sp"))).unwrap();
        let mut coca = model(serde_json::json!({"embed_dim": 32, "custom_text": true,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                           "attentional_pool": true, "attn_pooler_heads": 2, "attn_pooler_queries": 4},
            "text_cfg": {"context_length": 16, "vocab_size": 400, "width": 32, "heads": 2, "layers": 1, "embed_cls": true},
            "multimodal_cfg": {"width": 32, "heads": 2, "layers": 1}}));
        coca.text_cfg.pad_id = tok.pad_id();
        check_tokenizer(&tok, &coca, "the tokenizer").unwrap();
        let mut pads = coca.clone();
        pads.text_cfg.pad_id = tok.pad_id() + 1;
        let err = check_tokenizer(&tok, &pads, "the tokenizer").unwrap_err().to_string();
        assert!(err.contains("text_cfg.pad_id") && err.contains("caption loss"), "{err}");
        let mut small = coca.clone();
        small.text_cfg.vocab_size = 300;
        let err = check_tokenizer(&tok, &small, "the tokenizer").unwrap_err().to_string();
        assert!(
            err.contains("CoCa's decoder") && err.contains("300") && err.contains("400"),
            "{err}"
        );
    }
}
