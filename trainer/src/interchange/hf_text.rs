//! A Hugging Face text model's own weights into a model's Hugging Face text tower: what
//! open_clip's `HFTextEncoder` does with `hf_model_pretrained: true` (transformers'
//! `AutoModel.from_pretrained(hf_model_name)`), from the directory `hf_model_name` names,
//! since oxclip never downloads.
//!
//! The files are transformers' own: `model.safetensors` / `pytorch_model.bin` (or a sharded
//! index) of the base model or of a model with a head on it, as the hub holds them:
//! - BERT family: `XLMRobertaModel` (`embeddings.*`, `encoder.*`, `pooler.*`) or
//!   `XLMRobertaForMaskedLM` (the same under `roberta.`, and an `lm_head.*`);
//! - mT5: `MT5ForConditionalGeneration` / `MT5Model` / `MT5EncoderModel` (`encoder.*`, the
//!   input embedding tied to `shared.weight`, which a file may hold alone);
//! - NLLB: `M2M100ForConditionalGeneration` (`model.encoder.*`, `model.shared.weight`) or
//!   `M2M100Model` (`encoder.*`, `shared.weight`).
//!
//! Decoders and heads are left out; a text tower has no use for them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{nn, Tensor};

use super::pretrained::hf_weights_in;
use super::weights::read_tensors;
use crate::error::{Result, TrainError};
use crate::model::hf_text::HfTextArch;
use crate::model::{self, ModelConfig};

/// The weights file of the text model `cfg.text_cfg.hf_model_name` names, when it is a
/// directory holding one.
pub fn pretrained_text_weights(cfg: &ModelConfig) -> Option<PathBuf> {
    let name = cfg.text_cfg.hf_model_name.as_deref()?;
    let dir = Path::new(name);
    if dir.is_dir() {
        hf_weights_in(dir)
    } else {
        None
    }
}

/// Loads the text model's own weights (see the module) into the tower's encoder,
/// `<text>.transformer.*`; `text.proj` keeps its initial weights, as in open_clip. A
/// missing, unexpected or mis-shaped tensor is refused, except a BERT pooler the file lacks,
/// which keeps its initial weights, as transformers leaves it. Returns the file read.
pub fn load_pretrained_text(vs: &nn::VarStore, cfg: &ModelConfig) -> Result<PathBuf> {
    let name = cfg.text_cfg.hf_model_name.as_deref().unwrap_or_default();
    let Some(path) = pretrained_text_weights(cfg) else {
        return Err(TrainError::Input(format!(
            "text_cfg.hf_model_pretrained is true: the text tower starts from {name}'s pretrained weights, \
             as in open_clip, but oxclip never downloads them. Set text_cfg.hf_model_name to the directory of \
             the text model (its config.json and model.safetensors or pytorch_model.bin), start from a CLIP \
             checkpoint (init.checkpoint), or set text_cfg.hf_model_pretrained: false to train the text tower \
             from random weights"
        )));
    };
    let root = format!("{}transformer.", cfg.text_prefix());
    let mut vars: std::collections::HashMap<String, Tensor> =
        vs.variables().into_iter().filter(|(k, _)| k.starts_with(&root)).collect();
    let arch = crate::model::hf_text::check(&cfg.text_cfg)?;
    let mut loaded = encoder_tensors(read_tensors(&path)?, &arch, &root);
    let pooler = format!("{root}pooler.");
    let has_pooler = vars.keys().any(|k| k.starts_with(&pooler));
    if has_pooler && !loaded.keys().any(|k| k.starts_with(&pooler)) {
        tracing::warn!(
            "{} has no pooler; the text tower's pooler (hf_pooler_type: cls_pooler) keeps its initial weights",
            path.display()
        );
        vars.retain(|k, _| !k.starts_with(&pooler));
    } else if !has_pooler {
        // open_clip builds the encoder without transformers' pooler unless it pools with it.
        loaded.retain(|k, _| !k.starts_with(&pooler));
    }
    model::load_variables(&vars, &loaded, &path)?;
    Ok(path)
}

/// Where a transformers file keeps the encoder: the prefixes of the whole model's files (the
/// first the file uses is taken; none: the base model saved alone), the encoder's own
/// top-level modules, and the names the input embedding is tied to.
fn layout(
    arch: &HfTextArch,
) -> (&'static [&'static str], &'static [&'static str], &'static [&'static str]) {
    match arch {
        HfTextArch::Bert(..) => {
            (&["roberta.", "bert."], &["embeddings.", "encoder.", "pooler."], &[])
        }
        HfTextArch::T5(..) => {
            (&["encoder."], &["embed_tokens.", "block.", "final_layer_norm."], &["shared.weight"])
        }
        HfTextArch::M2m100(_) => (
            &["model.encoder.", "encoder."],
            &["embed_tokens.", "layers.", "layer_norm."],
            &["model.shared.weight", "shared.weight"],
        ),
    }
}

/// The encoder's tensors of a transformers file under `root`: the whole model's prefix
/// dropped, decoders, heads and buffers left out, a tied input embedding under the encoder's
/// name, old LayerNorm names (`gamma`, `beta`) renamed as transformers renames them.
fn encoder_tensors(
    mut file: BTreeMap<String, Tensor>,
    arch: &HfTextArch,
    root: &str,
) -> BTreeMap<String, Tensor> {
    let (prefixes, modules, tied) = layout(arch);
    let embedding = match arch {
        HfTextArch::Bert(..) => None,
        HfTextArch::T5(..) | HfTextArch::M2m100(_) => Some("embed_tokens.weight"),
    };
    let shared = tied.iter().find_map(|name| file.remove(*name));
    let prefix = prefixes.iter().find(|p| file.keys().any(|k| k.starts_with(**p)));
    let mut out: BTreeMap<String, Tensor> = file
        .into_iter()
        .filter_map(|(key, t)| {
            let key = match prefix {
                Some(p) => key.strip_prefix(*p)?.to_owned(),
                None => key,
            };
            let buffer = ["position_ids", "token_type_ids"].iter().any(|b| key.ends_with(b))
                || key.contains("embed_positions");
            if buffer || !modules.iter().any(|m| key.starts_with(m)) {
                return None;
            }
            let key = match key.rsplit_once('.') {
                Some((module, "gamma")) if module.ends_with("LayerNorm") => {
                    format!("{module}.weight")
                }
                Some((module, "beta")) if module.ends_with("LayerNorm") => format!("{module}.bias"),
                _ => key,
            };
            Some((format!("{root}{key}"), t))
        })
        .collect();
    if let (Some(name), Some(shared)) = (embedding, shared) {
        out.entry(format!("{root}{name}")).or_insert(shared);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names [`encoder_tensors`] keeps under `root` of a file of `names`, for the text
    /// model `model`.
    fn kept(model: &str, names: &[&str], root: &str) -> Vec<String> {
        let file = names
            .iter()
            .map(|k| (k.to_string(), Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu))))
            .collect();
        let arch = HfTextArch::resolve(model).unwrap();
        encoder_tensors(file, &arch, root).into_keys().collect()
    }

    #[test]
    fn a_masked_lm_file_gives_its_encoder() {
        let names = [
            "roberta.embeddings.word_embeddings.weight",
            "roberta.embeddings.position_ids",
            "roberta.encoder.layer.0.output.LayerNorm.gamma",
            "roberta.encoder.layer.0.output.LayerNorm.beta",
            "lm_head.dense.weight",
            "lm_head.bias",
        ];
        assert_eq!(
            kept("xlm-roberta-base", &names, "text.transformer."),
            [
                "text.transformer.embeddings.word_embeddings.weight",
                "text.transformer.encoder.layer.0.output.LayerNorm.bias",
                "text.transformer.encoder.layer.0.output.LayerNorm.weight",
            ]
        );
    }

    #[test]
    fn an_nllb_file_gives_its_encoder_with_the_shared_embedding() {
        let names = [
            "model.shared.weight",
            "model.encoder.embed_positions.weights",
            "model.encoder.layers.0.fc1.weight",
            "model.encoder.layer_norm.weight",
            "model.decoder.layers.0.fc1.weight",
            "lm_head.weight",
        ];
        assert_eq!(
            kept("facebook/nllb-200-distilled-600M", &names, "text."),
            ["text.embed_tokens.weight", "text.layer_norm.weight", "text.layers.0.fc1.weight"]
        );
    }
}
