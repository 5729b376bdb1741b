//! The OpenAI CLIP BPE as a Hugging Face tokenizer, built from open_clip's
//! `bpe_simple_vocab_16e6.txt.gz`: the byte symbols, the merges, the two special tokens.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::DataError;

/// Start-of-text id in the CLIP vocabulary.
pub const CLIP_SOT: i64 = 49406;
/// End-of-text id in the CLIP vocabulary.
pub const CLIP_EOT: i64 = 49407;
/// 256 byte symbols + 256 with `</w>` + 48,894 merges + SOT + EOT.
pub const CLIP_VOCAB_SIZE: usize = 49408;
/// Number of merges open_clip reads: `lines[1 : 49152 - 256 - 2 + 1]`.
pub(super) const CLIP_MERGES: usize = 49152 - 256 - 2;
/// File name of the vocabulary, as shipped in the open-clip-torch wheel.
pub const CLIP_VOCAB_FILE: &str = "bpe_simple_vocab_16e6.txt.gz";
/// open_clip's split pattern, without its special-token alternatives (see the module doc).
pub(super) const CLIP_SPLIT_PATTERN: &str =
    r"(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Where the CLIP vocabulary lives: `$OXCLIP_VOCAB`, else
/// `$OXCLIP_CACHE/bpe_simple_vocab_16e6.txt.gz`, else
/// `~/.cache/oxclip/bpe_simple_vocab_16e6.txt.gz`. Errors (saying to run `make setup`)
/// when the chosen file is absent.
pub fn default_clip_vocab_path() -> Result<PathBuf, DataError> {
    let path = if let Some(p) = std::env::var_os("OXCLIP_VOCAB").filter(|p| !p.is_empty()) {
        PathBuf::from(p)
    } else if let Some(dir) = std::env::var_os("OXCLIP_CACHE").filter(|p| !p.is_empty()) {
        PathBuf::from(dir).join(CLIP_VOCAB_FILE)
    } else {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache").join("oxclip").join(CLIP_VOCAB_FILE)
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(DataError::VocabMissing { path })
    }
}

pub(super) fn read_gz_text(path: &Path) -> Result<String, DataError> {
    if !path.is_file() {
        return Err(DataError::VocabMissing { path: path.to_owned() });
    }
    let file = std::fs::File::open(path)
        .map_err(|source| DataError::Read { path: path.to_owned(), source })?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).map_err(|e| {
        DataError::Tokenizer {
            path: path.to_owned(),
            message: format!("not a gzipped UTF-8 text file: {e}"),
        }
    })?;
    Ok(text)
}

/// GPT-2/CLIP `bytes_to_unicode`: the printable Latin-1 bytes map to themselves, the others
/// to 256 + n in byte order. Returned in the order of the Python dict (printable first), which
/// is the order of the first 256 vocabulary entries.
pub(super) fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut pairs: Vec<(u8, char)> = (0u32..256)
        .filter(|&b| printable(b))
        .filter_map(|b| Some((u8::try_from(b).ok()?, char::from_u32(b)?)))
        .collect();
    let mut n = 0u32;
    for b in 0u32..256 {
        if !printable(b) {
            if let (Ok(byte), Some(c)) = (u8::try_from(b), char::from_u32(256 + n)) {
                pairs.push((byte, c));
            }
            n += 1;
        }
    }
    pairs
}

/// The CLIP BPE as a Hugging Face tokenizer.json value (no normalizer: we pre-clean).
pub(super) fn clip_tokenizer_json(vocab_file: &str) -> Result<Value, String> {
    let lines: Vec<&str> = vocab_file.split('\n').collect();
    if lines.len() < CLIP_MERGES + 1 {
        return Err(format!(
            "expected at least {} merge lines after the header, found {}",
            CLIP_MERGES,
            lines.len().saturating_sub(1)
        ));
    }
    let mut vocab = Map::new();
    let push = |token: String, vocab: &mut Map<String, Value>| {
        let id = vocab.len();
        vocab.insert(token, json!(id));
    };
    let symbols: Vec<char> = bytes_to_unicode().into_iter().map(|(_, c)| c).collect();
    for c in &symbols {
        push(c.to_string(), &mut vocab);
    }
    for c in &symbols {
        push(format!("{c}</w>"), &mut vocab);
    }
    let mut merges = Vec::with_capacity(CLIP_MERGES);
    for (i, line) in lines[1..=CLIP_MERGES].iter().enumerate() {
        let mut parts = line.split_whitespace();
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("line {}: expected two symbols, got {line:?}", i + 2));
        };
        push(format!("{a}{b}"), &mut vocab);
        merges.push(json!([a, b]));
    }
    push("<|startoftext|>".into(), &mut vocab);
    push("<|endoftext|>".into(), &mut vocab);
    if vocab.len() != CLIP_VOCAB_SIZE {
        return Err(format!(
            "built {} distinct vocabulary entries, expected {CLIP_VOCAB_SIZE} (duplicate merges?)",
            vocab.len()
        ));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": { "Regex": CLIP_SPLIT_PATTERN },
                    "behavior": "Removed",
                    "invert": true
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": false,
                    "trim_offsets": false,
                    "use_regex": false
                }
            ]
        },
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": "</w>",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges
        }
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::tokenizer::tests::vocab_path;
    use crate::tokenizer::Tokenizer;

    fn padded(ids: &[i64], ctx: usize) -> Vec<i64> {
        let mut v = ids.to_vec();
        v.resize(ctx, 0);
        v
    }

    #[test]
    fn bytes_to_unicode_matches_gpt2() {
        let table = bytes_to_unicode();
        assert_eq!(table.len(), 256);
        assert_eq!(table[0], (b'!', '!'));
        assert_eq!(table[93], (b'~', '~'));
        assert_eq!(table[94], (0xa1, '\u{a1}'));
        // The first non-printable byte (0) maps to U+0100, space (32) to U+0120.
        assert_eq!(table[188], (0, '\u{100}'));
        assert!(table.contains(&(b' ', '\u{120}')));
        let chars: std::collections::HashSet<char> = table.iter().map(|p| p.1).collect();
        assert_eq!(chars.len(), 256);
    }

    #[test]
    fn clip_vocab_size_and_specials() {
        let path = vocab_path();
        let tok = Tokenizer::clip_from_bpe_gz(&path).unwrap();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!(tok.inner.token_to_id("<|startoftext|>"), Some(49406));
        assert_eq!(tok.inner.token_to_id("<|endoftext|>"), Some(49407));
        assert_eq!(tok.inner.token_to_id("a</w>"), Some(320));
    }

    #[test]
    fn tokenizer_json_round_trip() {
        // Write the CLIP BPE as a tokenizer.json and read it back through the generic path.
        let text = read_gz_text(&vocab_path()).unwrap();
        let mut json = clip_tokenizer_json(&text).unwrap();
        json["added_tokens"] = json!([
            {"id": 49406, "content": "<|startoftext|>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true},
            {"id": 49407, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true}
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let tok = Tokenizer::from_tokenizer_json(&path).unwrap();
        assert_eq!(tok.sot_id(), Some(CLIP_SOT));
        assert_eq!(tok.eot_id(), Some(CLIP_EOT));
        assert_eq!(
            tok.encode("a photo of a cat", 10),
            padded(&[49406, 320, 1125, 539, 320, 2368, 49407], 10)
        );
        let missing = Tokenizer::from_tokenizer_json(&dir.path().join("nope.json")).unwrap_err();
        assert!(missing.to_string().contains("nope.json"));
    }

    #[test]
    fn missing_vocab_says_make_setup() {
        let err = Tokenizer::clip_from_bpe_gz(Path::new("/nonexistent/bpe.txt.gz")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("make setup") && msg.contains("/nonexistent/bpe.txt.gz"), "{msg}");
    }
}
