//! Files in and out: weights and model directories in other libraries' layouts.
//!
//! open_clip's state-dict names are the canonical naming: the model (`crate::model`) is built
//! on them, checkpoints and `oxclip export --format open_clip` write them, and every other
//! layout is a translation to and from them here, never a second model. This module builds on
//! `model` and `model` knows nothing of it.
//!
//! One file per source format:
//! - `safetensors.rs`: the container every layout shares (read, write);
//! - `pickle/`: PyTorch's pickled files (`torch.save`'s zip and legacy formats, TorchScript
//!   archives), read without running anything of them;
//! - `hf_clip.rs`, `hf_siglip.rs`: Hugging Face `CLIPModel` and `SiglipModel` tensor names
//!   <-> open_clip's, both ways;
//! - `hf_text.rs`: a Hugging Face text model's own weights (`XLMRobertaModel`, ...) into a
//!   model's Hugging Face text tower (`hf_model_pretrained`);
//! - `hugging_face.rs`: a Hugging Face directory's `config.json` and
//!   `preprocessor_config.json` <-> the model config and image preprocessing, both ways;
//! - `open_clip.rs`: open_clip's hub layout, `open_clip_config.json`, both ways;
//! - `open_clip_train.rs`: open_clip's training checkpoints (`epoch_N.pt`): their AdamW
//!   state by parameter name;
//! - `openai.rs`: OpenAI's own files (`clip.load`'s TorchScript archives), whose architecture
//!   is read from their tensors' shapes;
//! - `json.rs`: the typed key reads those translations share.
//!
//! On top of them, one file per job: `weights.rs` loads a weights file into a model, whichever
//! layout its names are in (the one place layouts are told apart by name), and saves one;
//! `pretrained.rs` reads a model directory, whichever layout it is in ([`Source`]), with its
//! tokenizer files; `export.rs` writes a model as either directory, checking that the target
//! holds it.
//!
//! A new layout: a file of its own with its names both ways (`is_*`, `from_*`, `to_*`, tested
//! against a golden list of names and shapes, as `hf_siglip.rs` is) and, when it comes as a
//! directory, its config files both ways; then its detection in [`weights::load_weights`], a
//! [`Source`] variant and its case in [`pretrained::Pretrained::read`], and a
//! [`export::Format`] if oxclip writes it.

pub mod export;
pub mod hf_clip;
pub mod hf_siglip;
pub mod hf_text;
pub mod hugging_face;
mod json;
pub mod open_clip;
pub mod open_clip_train;
pub mod openai;
pub mod pickle;
pub mod pretrained;
pub mod safetensors;
pub mod weights;

/// Which layout a model directory is in: where a [`pretrained::Pretrained`]'s config came
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// transformers' `CLIPModel`.
    HfClip,
    /// transformers' `SiglipModel`.
    HfSiglip,
    /// open_clip's hub layout.
    OpenClip,
    /// OpenAI's `clip.load` files: a TorchScript archive whose tensors' shapes say the model.
    OpenAi,
}
