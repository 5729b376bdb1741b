//! Any Hugging Face `tokenizer.json`: as the CLIP BPE is used (`from_tokenizer_json`), or
//! prepared as transformers' `AutoTokenizer` and open_clip's `HFTokenizer` do
//! (`hugging_face`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::{Clean, Tokenizer};
use crate::error::DataError;

/// How a Hugging Face tokenizer's rows are prepared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HfOptions {
    /// open_clip's `clean` before tokenizing; `None` for transformers' `AutoTokenizer`, which
    /// takes the text as given.
    pub clean: Option<Clean>,
    /// open_clip's `strip_sep_token` (CLIPA's BERT tokenizer): the `[SEP]` id becomes 0.
    pub strip_sep_token: bool,
    /// open_clip's `language` (`HFTokenizer.set_language`): the source-language code a
    /// tokenizer with one (NLLB's `eng_Latn`, `deu_Latn`, ...) marks every text with, as
    /// transformers' `set_src_lang_special_tokens`.
    pub language: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HfPrep {
    clean: Option<Clean>,
    /// The id `strip_sep_token` replaces by 0.
    sep_to_zero: Option<i64>,
    pub(super) pad_id: i64,
    pad_left: bool,
    truncate_left: bool,
    /// Special tokens the post-processor adds to one text: the room truncation leaves them.
    added: usize,
}

/// The tokenizers library's reading of a tokenizer.json, or why it cannot be one. The bytes
/// are read as JSON first: tokenizers 0.22 panics (`expect("Helper")` in `decoders/mod.rs`)
/// when the file's JSON breaks inside its `decoder` (cut short, a key that is not a string, a
/// lone surrogate escape), where it should return an error; once the whole file is valid JSON
/// its decoder fallback takes any value, so it cannot. Read into a `Value`, not skipped over:
/// serde_json checks string escapes only when it keeps the string.
fn parse_tokenizer_json(bytes: &[u8]) -> Result<tokenizers::Tokenizer, String> {
    serde_json::from_slice::<Value>(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| e.to_string())
}

/// transformers' `set_src_lang_special_tokens` (NLLB, M2M-100, mBART): the post-processor
/// becomes `language $A </s>` (`$A </s> language` under the config's `legacy_behaviour`).
/// Only a tokenizer whose config names its source language (`src_lang`) has one to set.
fn set_source_language(
    inner: &mut tokenizers::Tokenizer,
    config: &Value,
    token: &dyn Fn(&str) -> Option<String>,
    language: &str,
) -> Result<(), String> {
    if config.get("src_lang").and_then(Value::as_str).is_none() {
        return Err(format!(
            "text_cfg.tokenizer_kwargs.language is {language:?}, but this tokenizer has no source language \
             to set (no src_lang in its tokenizer_config.json; NLLB's has one)"
        ));
    }
    let code = inner.token_to_id(language).ok_or_else(|| {
        format!(
            "text_cfg.tokenizer_kwargs.language {language:?} is not a token of this tokenizer \
             (NLLB's language codes look like eng_Latn, deu_Latn, zho_Hans)"
        )
    })?;
    let eos = token("eos_token").ok_or("it has no eos_token to end each text with")?;
    let eos_id =
        inner.token_to_id(&eos).ok_or(format!("its eos_token {eos:?} is not in the vocabulary"))?;
    let legacy = config.get("legacy_behaviour").and_then(Value::as_bool).unwrap_or(false);
    let (single, pair) = if legacy {
        (format!("$A {eos} {language}"), format!("$A $B {eos} {language}"))
    } else {
        (format!("{language} $A {eos}"), format!("{language} $A $B {eos}"))
    };
    let template = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single(single.as_str())
        .and_then(|b| b.try_pair(pair.as_str()))
        .map_err(|e| format!("cannot set the source language: {e}"))?
        .special_tokens(vec![(language.to_owned(), code), (eos, eos_id)])
        .build()
        .map_err(|e| format!("cannot set the source language: {e}"))?;
    inner.with_post_processor(Some(template));
    Ok(())
}

impl Tokenizer {
    /// Any Hugging Face `tokenizer.json`. Its own normalizer and pre-tokenizer apply (no CLIP
    /// cleaning). Start and end tokens are `<|startoftext|>`/`<|endoftext|>` (or open_clip's
    /// `<start_of_text>`/`<end_of_text>`, or `<s>`/`</s>`, or `[CLS]`/`[SEP]`) when the file has
    /// them; [`encode`](Self::encode) adds them itself, so the file's post-processor, padding
    /// and truncation are switched off.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path)
            .map_err(|e| DataError::Tokenizer { path: path.to_owned(), message: e.to_string() })?;
        Self::from_tokenizer_json_bytes(&bytes).map_err(|e| match e {
            DataError::Tokenizer { message, .. } => {
                DataError::Tokenizer { path: path.to_owned(), message }
            }
            other => other,
        })
    }

    /// [`from_tokenizer_json`](Self::from_tokenizer_json) from the file's contents.
    pub fn from_tokenizer_json_bytes(json: &[u8]) -> Result<Self, DataError> {
        let err = |message: String| DataError::Tokenizer {
            path: PathBuf::from("<tokenizer.json>"),
            message,
        };
        let mut inner = parse_tokenizer_json(json).map_err(err)?;
        inner.with_truncation(None).map_err(|e| err(format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        let find = |name: &str| inner.token_to_id(name).map(i64::from);
        let pairs: [(&str, &str); 4] = [
            ("<|startoftext|>", "<|endoftext|>"),
            ("<start_of_text>", "<end_of_text>"),
            ("<s>", "</s>"),
            ("[CLS]", "[SEP]"),
        ];
        let (mut sot, mut eot) = (None, None);
        for (s, e) in pairs {
            if let (Some(s), Some(e)) = (find(s), find(e)) {
                (sot, eot) = (Some(s), Some(e));
                break;
            }
        }
        if eot.is_none() {
            eot = ["<|endoftext|>", "<end_of_text>", "</s>", "[SEP]"].iter().find_map(|n| find(n));
        }
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self { inner: Arc::new(inner), sot, eot, clip_clean: false, vocab_size, hf: None })
    }

    /// A Hugging Face tokenizer prepared as transformers'
    /// `AutoTokenizer(texts, padding="max_length", truncation=True, max_length=N)` does (and
    /// open_clip's `HFTokenizer`, which calls it after its `clean`): the file's normalizer,
    /// pre-tokenizer and post-processor (its special tokens), the text truncated so that the
    /// specials still fit, padded with the pad token. `path` is a model directory (its
    /// `tokenizer.json` and, when present, `tokenizer_config.json` and
    /// `special_tokens_map.json`) or a `tokenizer.json` (those two read beside it).
    ///
    /// The pad token is the config's `pad_token`, else the one tokenizer.json pads with;
    /// padding and truncation sides come from the config's `padding_side`/`truncation_side`
    /// (transformers' class default for Gemma tokenizers is the left).
    pub fn hugging_face(path: &Path, options: HfOptions) -> Result<Self, DataError> {
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_owned())
        } else {
            (path.to_owned(), path.parent().map(Path::to_owned).unwrap_or_default())
        };
        let err = |message: String| DataError::Tokenizer { path: file.clone(), message };
        let bytes = std::fs::read(&file).map_err(|e| err(format!("cannot read it: {e}")))?;
        let mut inner = parse_tokenizer_json(&bytes).map_err(err)?;
        let file_pad = inner.get_padding().map(|p| (p.pad_token.clone(), p.pad_id));
        inner.with_truncation(None).map_err(|e| err(format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);

        let read_json = |name: &str| -> Result<Option<Value>, DataError> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p)
                .map_err(|e| DataError::Tokenizer { path: p.clone(), message: e.to_string() })?;
            serde_json::from_str(&text).map(Some).map_err(|e| DataError::Tokenizer {
                path: p.clone(),
                message: format!("not JSON: {e}"),
            })
        };
        let config = read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let special_map = read_json("special_tokens_map.json")?.unwrap_or(Value::Null);
        // A special token is written as a string or as an AddedToken object.
        let token = |key: &str| -> Option<String> {
            [&config, &special_map].iter().find_map(|v| match v.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            })
        };
        if let Some(language) = &options.language {
            set_source_language(&mut inner, &config, &token, language).map_err(err)?;
        }
        let id_of = |name: &str| -> Result<i64, DataError> {
            inner
                .token_to_id(name)
                .map(i64::from)
                .ok_or_else(|| err(format!("its special token {name:?} is not in the vocabulary")))
        };
        let pad_id = match (token("pad_token"), file_pad) {
            (Some(name), _) => id_of(&name)?,
            (None, Some((_, id))) => i64::from(id),
            (None, None) => {
                return Err(err(
                    "it has no pad token (no `pad_token` in tokenizer_config.json, no padding in tokenizer.json): \
                     rows cannot be padded to the context length"
                        .into(),
                ))
            }
        };
        let side = |key: &str| config.get(key).and_then(Value::as_str).map(str::to_owned);
        let class = side("tokenizer_class").unwrap_or_default();
        let pad_left = match side("padding_side") {
            Some(s) => s == "left",
            None => class.starts_with("GemmaTokenizer"),
        };
        let truncate_left = side("truncation_side").as_deref() == Some("left");
        let sep_to_zero = match (options.strip_sep_token, token("sep_token")) {
            (true, Some(name)) => inner.token_to_id(&name).map(i64::from),
            _ => None,
        };
        let added = inner.get_post_processor().map_or(0, |p| {
            use tokenizers::PostProcessor;
            p.added_tokens(false)
        });
        // The specials around a text: the first is the start token when the template puts one
        // before the text, the last the end token when one follows it.
        let (mut sot, mut eot) = (None, None);
        if let Ok(body) = inner.encode_fast("a", false) {
            let n = body.get_ids().len();
            if let Ok(full) = inner.post_process(body, None, true) {
                let (ids, mask) = (full.get_ids(), full.get_special_tokens_mask());
                if full.len() > n {
                    if mask.first() == Some(&1) {
                        sot = ids.first().map(|&i| i64::from(i));
                    }
                    if mask.last() == Some(&1) {
                        eot = ids.last().map(|&i| i64::from(i));
                    }
                }
            }
        }
        if eot.is_none() {
            eot = token("eos_token").and_then(|name| inner.token_to_id(&name)).map(i64::from);
        }
        // Ids are not always dense (added tokens may sit anywhere): the bound is the largest.
        let vocab_size = inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1);
        Ok(Self {
            inner: Arc::new(inner),
            sot,
            eot,
            clip_clean: false,
            vocab_size,
            hf: Some(HfPrep {
                clean: options.clean,
                sep_to_zero,
                pad_id,
                pad_left,
                truncate_left,
                added,
            }),
        })
    }

    /// transformers' `padding="max_length", truncation=True`: the text's tokens cut to leave
    /// room for the specials (from the right unless the config says left), the
    /// post-processor's specials added, then the pad id up to the length.
    pub(super) fn encode_hf(
        &self,
        prep: HfPrep,
        text: &str,
        context_length: usize,
        out: &mut Vec<i64>,
    ) {
        let cleaned = prep.clean.map(|c| c.apply(text));
        let text = cleaned.as_deref().unwrap_or(text);
        let ids: Vec<i64> = match self.inner.encode_fast(text, false) {
            Ok(mut body) => {
                let room = context_length.saturating_sub(prep.added);
                if body.len() > room {
                    let side = if prep.truncate_left {
                        tokenizers::TruncationDirection::Left
                    } else {
                        tokenizers::TruncationDirection::Right
                    };
                    body.truncate(room, 0, side);
                }
                match self.inner.post_process(body, None, true) {
                    Ok(enc) => enc.get_ids().iter().map(|&id| i64::from(id)).collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, "tokenizer could not add its special tokens; encoding the text as empty");
                        Vec::new()
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "tokenizer rejected a text; encoding it as empty");
                Vec::new()
            }
        };
        let ids = &ids[..ids.len().min(context_length)];
        let pad = context_length - ids.len();
        let start = out.len();
        if prep.pad_left {
            out.extend(std::iter::repeat_n(prep.pad_id, pad));
        }
        out.extend_from_slice(ids);
        if !prep.pad_left {
            out.extend(std::iter::repeat_n(prep.pad_id, pad));
        }
        if let Some(sep) = prep.sep_to_zero {
            for id in &mut out[start..] {
                if *id == sep {
                    *id = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod hf_tests {
    use super::*;

    /// tests/fixtures/tokenizers/NAME (tests/fixtures/make_hf_tokenizer_fixtures.py).
    fn fixture(name: &str) -> (PathBuf, Value) {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers").join(name);
        let golden =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        (dir, golden)
    }

    /// Texts whose ids differ from `expected`, with both rows.
    fn mismatches(tok: &Tokenizer, golden: &Value, expected: &Value) -> Vec<String> {
        let ctx = golden["context_length"].as_u64().unwrap() as usize;
        let texts: Vec<&str> =
            golden["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        let want: Vec<Vec<i64>> = serde_json::from_value(expected.clone()).unwrap();
        assert_eq!(texts.len(), want.len());
        assert!(texts.len() >= 30);
        let got = tok.encode_batch(&texts, ctx);
        texts
            .iter()
            .zip(&want)
            .zip(got.chunks(ctx))
            .filter(|((_, w), g)| w.as_slice() != *g)
            .map(|((t, w), g)| format!("{t:?}\n  python {w:?}\n  rust   {g:?}"))
            .collect()
    }

    fn check(name: &str, key: &str, options: HfOptions) {
        let (dir, golden) = fixture(name);
        let tok = Tokenizer::hugging_face(&dir, options).unwrap();
        let expected =
            if key == "transformers" { &golden["transformers"] } else { &golden["open_clip"][key] };
        let bad = mismatches(&tok, &golden, expected);
        assert!(
            bad.is_empty(),
            "{name}/{key}: {} of 30 texts differ:\n{}",
            bad.len(),
            bad.join("\n")
        );
        assert_eq!(tok.pad_id(), golden["pad_id"].as_i64().unwrap());
        assert_eq!(tok.vocab_size() as u64, golden["vocab_size"].as_u64().unwrap());
    }

    const ALL: [(&str, Option<Clean>); 4] = [
        ("transformers", None),
        ("canonicalize", Some(Clean::Canonicalize)),
        ("whitespace", Some(Clean::Whitespace)),
        ("lower", Some(Clean::Lower)),
    ];

    #[test]
    fn sentencepiece_unigram_matches_transformers_and_open_clip() {
        for (key, clean) in ALL {
            check("siglip_sp", key, HfOptions { clean, strip_sep_token: false, language: None });
        }
    }

    #[test]
    fn gemma_bpe_matches_transformers_and_open_clip() {
        for (key, clean) in ALL {
            check("gemma_sp", key, HfOptions { clean, strip_sep_token: false, language: None });
        }
    }

    #[test]
    fn bert_wordpiece_matches_transformers_and_open_clip() {
        for (key, clean) in ALL {
            check("bert_wp", key, HfOptions { clean, strip_sep_token: false, language: None });
        }
        check(
            "bert_wp",
            "whitespace_strip_sep",
            HfOptions { clean: Some(Clean::Whitespace), strip_sep_token: true, language: None },
        );
    }

    #[test]
    fn truncation_keeps_the_end_token_and_pads_with_the_pad_id() {
        let (dir, _) = fixture("siglip_sp");
        let tok = Tokenizer::hugging_face(&dir, HfOptions::default()).unwrap();
        let long = "a photo of a cat ".repeat(40);
        let ids = tok.encode(&long, 16);
        assert_eq!((ids.len(), ids[15], tok.eot_id()), (16, 1, Some(1)));
        assert_eq!(tok.sot_id(), None);
        let short = tok.encode("cat", 16);
        assert_eq!(&short[short.len() - 3..], &[1, 1, 1]);
        // A tokenizer.json given as a file reads the tokenizer_config.json beside it.
        let by_file =
            Tokenizer::hugging_face(&dir.join("tokenizer.json"), HfOptions::default()).unwrap();
        assert_eq!(by_file.encode(&long, 16), ids);
        let (gemma, _) = fixture("gemma_sp");
        let gemma = Tokenizer::hugging_face(&gemma, HfOptions::default()).unwrap();
        assert_eq!((gemma.sot_id(), gemma.eot_id(), gemma.pad_id()), (Some(2), Some(1), 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bert() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tokenizers/bert_wp/tokenizer.json");
        std::fs::read_to_string(path).expect("fixture")
    }

    /// Issue 26 (fuzzing): a tokenizer.json whose JSON breaks inside its `decoder` made the
    /// tokenizers library panic; it is an error naming the place instead, by both loaders.
    #[test]
    fn issue_26_a_file_cut_inside_its_decoder_is_an_error_not_a_panic() {
        let text = bert();
        let decoder = text.find("\"decoder\"").expect("has a decoder");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenizer.json");
        for cut in [decoder + 20, decoder + 40, decoder + 55] {
            let err = Tokenizer::from_tokenizer_json_bytes(&text.as_bytes()[..cut])
                .expect_err("a cut file is refused")
                .to_string();
            assert!(err.contains("not valid JSON") && err.contains("EOF"), "{err}");
            std::fs::write(&path, &text.as_bytes()[..cut]).expect("writes");
            let err = Tokenizer::hugging_face(&path, HfOptions::default())
                .expect_err("a cut file is refused")
                .to_string();
            assert!(err.contains("tokenizer.json") && err.contains("not valid JSON"), "{err}");
        }
        // A key that is not a string, inside the decoder.
        let broken = text.replacen("\"prefix\"", "7", 1);
        let err = Tokenizer::from_tokenizer_json_bytes(broken.as_bytes()).expect_err("refused");
        assert!(err.to_string().contains("key must be a string"), "{err}");
        // An escape that is no character (a lone surrogate), inside the decoder.
        let broken = text.replacen("\"##\"", "\"\\ud800\"", 1);
        let err = Tokenizer::from_tokenizer_json_bytes(broken.as_bytes()).expect_err("refused");
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        Tokenizer::from_tokenizer_json_bytes(text.as_bytes()).expect("the whole file loads");
    }
}
