//! Training a CLIP-style BPE on a dataset's captions.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

use super::vocab::CLIP_SPLIT_PATTERN;
use crate::error::DataError;

/// A CLIP-style BPE tokenizer trained on `texts` (for runs from scratch on a language or
/// domain the OpenAI vocabulary serves badly), as a `tokenizer.json` string that
/// `data.tokenizer` and [`Tokenizer::from_tokenizer_json`](super::Tokenizer::from_tokenizer_json)
/// load. `progress` hears where it is ([`TrainProgress`]), for a progress bar.
///
/// The same scheme as CLIP's: NFC, whitespace collapsed, lowercased (a `tokenizers`
/// normalizer, so the file is self-contained; HTML unescaping and ftfy's fixes are not part
/// of it), CLIP's split pattern, byte-level symbols, `</w>` ending each word; then
/// `<|startoftext|>` and `<|endoftext|>` as the last two ids, so the text tower's
/// pooling at the largest id finds the end of text. `vocab_size` counts the 512 byte
/// symbols (with and without `</w>`, all of them whatever the texts) and the two special
/// tokens. The result has exactly `vocab_size` entries unless the texts yield too few merges
/// at `min_frequency`: then [`TrainedBpe::vocab_size`] is smaller, for the caller to report.
pub fn train_clip_bpe(
    texts: &[String],
    vocab_size: usize,
    min_frequency: u64,
    progress: &(dyn Fn(TrainProgress) + Sync),
) -> Result<TrainedBpe, DataError> {
    use tokenizers::models::bpe::BpeTrainerBuilder;
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    let err = |message: String| DataError::Tokenizer {
        path: PathBuf::from("<trained tokenizer>"),
        message,
    };
    if vocab_size < 512 + 2 + 1 {
        return Err(err(format!("vocab_size {vocab_size} is too small: the 512 byte symbols and 2 special tokens come first")));
    }
    let base = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Strip", "strip_left": true, "strip_right": true},
                {"type": "Lowercase"}
            ]
        },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]
        },
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {}, "merges": []
        }
    });
    let alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    let total = texts.len() as u64;
    let train = |target: usize, stage: TrainStage| -> Result<tokenizers::Tokenizer, DataError> {
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(base.to_string().as_bytes())
            .map_err(|e| err(e.to_string()))?;
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(target)
            .min_frequency(min_frequency)
            .show_progress(false)
            .initial_alphabet(alphabet.iter().copied().collect())
            .end_of_word_suffix("</w>".into())
            .build()
            .into();
        // The trainer reads the texts on several threads and learns the merges in one call
        // that reports nothing: texts read is the progress there is to show.
        let read = AtomicU64::new(0);
        progress(TrainProgress { stage, done: 0, total });
        let texts = texts.iter().map(|text| {
            let done = read.fetch_add(1, Ordering::Relaxed) + 1;
            if done % 4096 == 0 || done == total {
                progress(TrainProgress { stage, done, total });
            }
            text.as_str()
        });
        tokenizer.train(&mut trainer, texts).map_err(|e| err(e.to_string()))?;
        Ok(tokenizer)
    };
    // The trainer holds a symbol ending a word only when the texts end a word with it; the
    // others are added after training (else such a word would lose its last byte), so the
    // merges get what remains of `vocab_size`. The first pass, without merges, finds them.
    let symbols = train(0, TrainStage::Symbols)?.get_vocab(false);
    let missing: Vec<String> = alphabet
        .iter()
        .map(|c| format!("{c}</w>"))
        .filter(|symbol| !symbols.contains_key(symbol))
        .collect();
    let tokenizer = train(vocab_size - 2 - missing.len(), TrainStage::Merges)?;
    let mut json: serde_json::Value =
        serde_json::from_str(&tokenizer.to_string(false).map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?;
    let Some(vocab) = json.pointer_mut("/model/vocab").and_then(serde_json::Value::as_object_mut)
    else {
        return Err(err("the trained tokenizer has no model vocabulary".into()));
    };
    for (id, symbol) in (vocab.len()..).zip(missing) {
        vocab.insert(symbol, json!(id));
    }
    let merges =
        json.pointer("/model/merges").and_then(serde_json::Value::as_array).map_or(0, Vec::len);
    let mut tokenizer = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
        .map_err(|e| err(e.to_string()))?;
    tokenizer.add_special_tokens(&[
        tokenizers::AddedToken::from("<|startoftext|>", true),
        tokenizers::AddedToken::from("<|endoftext|>", true),
    ]);
    Ok(TrainedBpe {
        vocab_size: tokenizer.get_vocab_size(true),
        merges,
        json: tokenizer.to_string(true).map_err(|e| err(e.to_string()))?,
    })
}

/// Which pass of [`train_clip_bpe`] runs: both read every text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainStage {
    /// Finding which byte symbols end a word in the texts.
    Symbols,
    /// Counting the words, then learning the merges.
    Merges,
}

/// Where [`train_clip_bpe`] is: `done` of the `total` texts read in `stage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainProgress {
    /// The pass.
    pub stage: TrainStage,
    /// Texts read so far in this pass.
    pub done: u64,
    /// Texts in all.
    pub total: u64,
}

/// What [`train_clip_bpe`] learnt.
#[derive(Clone, Debug)]
pub struct TrainedBpe {
    /// The `tokenizer.json` text.
    pub json: String,
    /// Entries in its vocabulary, the special tokens included: the size asked for, or fewer
    /// when the texts do not hold enough pairs seen `min_frequency` times.
    pub vocab_size: usize,
    /// Merges learnt.
    pub merges: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    #[test]
    fn a_trained_bpe_loads_and_ends_with_the_largest_id() {
        let texts: Vec<String> = (0..300)
            .map(|i| {
                format!(
                    "A photo of a {} {} on the  Beach",
                    ["red", "blue", "green"][i % 3],
                    ["dog", "cat", "car", "tree"][i % 4]
                )
            })
            .collect();
        // Thirteen distinct words hold fewer than 86 merges: the result says how many it got.
        let most = train_clip_bpe(&texts, 600, 2, &|_| {}).unwrap().vocab_size;
        assert!((515..600).contains(&most), "{most}");
        // Whatever can be had is had exactly, the 512 byte symbols always among it.
        let trained = train_clip_bpe(&texts, most, 2, &|_| {}).unwrap();
        assert_eq!((trained.vocab_size, trained.merges), (most, most - 514));
        let tok = Tokenizer::from_tokenizer_json_bytes(trained.json.as_bytes()).unwrap();
        assert_eq!(tok.vocab_size(), most);
        assert_eq!(train_clip_bpe(&texts, 520, 2, &|_| {}).unwrap().vocab_size, 520);
        let (sot, eot) = (tok.sot_id().unwrap(), tok.eot_id().unwrap());
        assert_eq!(eot as usize + 1, tok.vocab_size());
        assert_eq!(sot + 1, eot);
        let ids = tok.encode("a photo of a red dog", 16);
        assert_eq!(ids[0], sot);
        let end = ids.iter().position(|&i| i == eot).unwrap();
        // Frequent words became single tokens; the largest id is the end of text.
        assert!(end <= 7, "{ids:?}");
        assert_eq!(ids.iter().copied().max(), Some(eot));
        assert!(ids[end + 1..].iter().all(|&i| i == 0));
        // Case and spacing do not matter; unseen words still encode (byte symbols).
        assert_eq!(tok.encode("A  PHOTO of a red DOG", 16), ids);
        let unseen = tok.encode("zebra ñ 🦓", 32);
        assert!(unseen.iter().filter(|&&i| i != 0).count() > 3);
        assert!(train_clip_bpe(&texts, 100, 2, &|_| {}).is_err());
    }

    #[test]
    fn progress_reads_every_text_in_both_passes() {
        let texts: Vec<String> =
            (0..10_000).map(|i| format!("caption number {} of {}", i % 97, i % 13)).collect();
        let heard = std::sync::Mutex::new(Vec::new());
        train_clip_bpe(&texts, 600, 2, &|p| heard.lock().unwrap().push(p)).unwrap();
        let heard = heard.into_inner().unwrap();
        for stage in [TrainStage::Symbols, TrainStage::Merges] {
            let done: Vec<u64> =
                heard.iter().filter(|p| p.stage == stage).map(|p| p.done).collect();
            assert_eq!(done.first(), Some(&0), "{stage:?}");
            assert_eq!(done.iter().max(), Some(&10_000), "{stage:?}");
            assert!(done.len() >= 3, "{stage:?}: {done:?}");
        }
        assert!(heard.iter().all(|p| p.total == 10_000));
        // The symbol pass ends before the merge pass starts.
        let last_symbols = heard.iter().rposition(|p| p.stage == TrainStage::Symbols).unwrap();
        assert!(heard[last_symbols + 1..].iter().all(|p| p.stage == TrainStage::Merges));
    }
}
