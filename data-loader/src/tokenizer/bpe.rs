//! Loading the CLIP BPE and reading its tokens back as text.

use std::path::Path;
use std::sync::Arc;

use super::vocab::{
    bytes_to_unicode, clip_tokenizer_json, default_clip_vocab_path, read_gz_text, CLIP_EOT,
    CLIP_SOT, CLIP_VOCAB_SIZE,
};
use super::Tokenizer;
use crate::error::DataError;

impl Tokenizer {
    /// The OpenAI CLIP BPE from open_clip's `bpe_simple_vocab_16e6.txt.gz`.
    pub fn clip_from_bpe_gz(path: &Path) -> Result<Self, DataError> {
        let text = read_gz_text(path)?;
        let json = clip_tokenizer_json(&text)
            .map_err(|message| DataError::Tokenizer { path: path.to_owned(), message })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| {
                DataError::Tokenizer {
                    path: path.to_owned(),
                    message: format!("building the BPE failed: {e}"),
                }
            })?;
        Ok(Self {
            inner: Arc::new(inner),
            sot: Some(CLIP_SOT),
            eot: Some(CLIP_EOT),
            clip_clean: true,
            vocab_size: CLIP_VOCAB_SIZE,
            hf: None,
        })
    }

    /// The CLIP BPE from [`default_clip_vocab_path`].
    pub fn clip_default() -> Result<Self, DataError> {
        Self::clip_from_bpe_gz(&default_clip_vocab_path()?)
    }
}

/// open_clip's `decode` of CLIP BPE tokens: byte symbols back to bytes, `</w>` to a space.
pub(super) fn decode_words(inner: &tokenizers::Tokenizer, ids: &[u32]) -> String {
    let decoder = byte_decoder();
    let mut bytes = Vec::new();
    for &id in ids {
        let Some(token) = inner.id_to_token(id) else {
            continue;
        };
        let (body, end_of_word) = match token.strip_suffix("</w>") {
            Some(body) => (body, true),
            None => (token.as_str(), false),
        };
        bytes.extend(body.chars().filter_map(&decoder));
        if end_of_word {
            bytes.push(b' ');
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn byte_decoder() -> impl Fn(char) -> Option<u8> {
    let table: std::collections::HashMap<char, u8> =
        bytes_to_unicode().into_iter().map(|(b, c)| (c, b)).collect();
    move |c| table.get(&c).copied()
}
