//! Files in and out: weights and model directories in other libraries' layouts.
//!
//! open_clip's state-dict names are the canonical naming: the model (`crate::model`) is built
//! on them, checkpoints and `oxclip export --format open_clip` write them, and every other
//! layout is a translation to and from them here, never a second model. This module builds on
//! `model` and `model` knows nothing of it.
//!
//! One file per source format:
//! - `safetensors.rs`: the container every layout shares (read, write, pickles refused);
//! - `weights.rs`: a weights file into a model, whichever layout its names are in, and back;
//! - `hf_clip.rs`, `hf_siglip.rs`: Hugging Face `CLIPModel` and `SiglipModel` tensor names
//!   <-> open_clip's, both ways;
//! - `pretrained.rs`: model directories, Hugging Face's and open_clip's hub layout;
//! - `export.rs`: writing a model as either of them.
//!
//! A new layout: its names both ways in a file of its own (`is_*`, `from_*`, `to_*`, tested
//! both ways against a golden list of names and shapes, as `hf_siglip.rs`), its detection in
//! [`weights::load_weights`], and, when it comes as a directory with its own config, that
//! config's translation beside the others and a `Format` of `export.rs`.

pub mod export;
pub mod hf_clip;
pub mod hf_siglip;
pub mod pretrained;
pub mod safetensors;
pub mod weights;
