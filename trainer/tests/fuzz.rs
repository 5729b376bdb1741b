//! Issue 26, part 6: every reader of untrusted files, fuzzed. Each test below feeds one parser,
//! through the public call the program makes on a file, thousands of inputs derived from valid
//! files (built here or taken from tests/fixtures): their systematic truncations, then seeded
//! random mutations (see `fuzz/engine.rs`). None may panic, hang or make a single allocation
//! over `engine::ALLOCATION_BOUND`; everything else it must refuse with an error value.
//!
//! This binary is `make test`'s bounded run (a few seconds per parser); `scripts/fuzz.sh` runs
//! it longer with `OXCLIP_FUZZ_SCALE`. The data loader's parsers are reached through the
//! trainer's own dependency on `oxclip-data-loader`, so one binary holds every target and one
//! counting allocator sees them all.

#[path = "fuzz/engine.rs"]
mod engine;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use engine::fuzz;
use oxclip_data_loader::formats::index::ShardIndex;
use oxclip_data_loader::formats::webdataset::{for_each_sample, ShardWriter};
use oxclip_data_loader::sources::spec::{CsvSpec, JsonlSpec};
use oxclip_data_loader::sources::{csv, jsonl};
use oxclip_data_loader::tokenizer::HfOptions;
use oxclip_data_loader::Tokenizer;
use oxclip_trainer::checkpoint::{self, Depth, TrainerState};
use oxclip_trainer::config::{self, Overrides};
use oxclip_trainer::interchange::pretrained::Pretrained;
use oxclip_trainer::interchange::weights::read_weights;
use oxclip_trainer::model::{Clip, ModelConfig};
use oxclip_trainer::optim::{AdamW, AdamWConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let path = path.as_ref();
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A folder for one target's files; kept alive by the closure that uses it. In memory where
/// the system has a tmpfs: ext4 flushes a file rewritten after truncation when it is closed
/// (`auto_da_alloc`), which on a disk made each input wait for a write many times longer
/// than its parse.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// Whether `needle` occurs in `bytes`: how a target picks, from the input alone (so that an
/// iteration reproduces by itself), which of its readings an input gets.
fn mentions(bytes: &[u8], needle: &[u8]) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// Data loader: WebDataset shards and their index.json.

/// Shards as `data pack` writes them (images, captions, class indices, JSON metadata, a key
/// inside a folder, a sample without its image) and one written by Python's webdataset.
fn shard_seeds() -> Vec<Vec<u8>> {
    let dir = scratch();
    let png = read(fixtures().join("cli_parity/exact32.png"));
    let jpg = read(fixtures().join("cli_parity/photo45x37.jpg"));
    let mut seeds = Vec::new();
    let samples: [&[(&str, &str, &[u8])]; 2] = [
        &[
            ("000000", "png", &png),
            ("000000", "txt", b"a small red square"),
            ("000000", "json", br#"{"source": "photos/1.png"}"#),
            ("000001", "jpg", &jpg),
            ("000001", "txt", b"a photo"),
            ("000001", "cls", b"3"),
        ],
        &[
            ("sub/000002", "jpg", &jpg),
            ("sub/000002", "cls", b"7\n"),
            ("000003", "txt", b"no image here"),
            ("000004", "png", &png),
            ("000004", "seg.png", &png),
            ("000004", "txt", "caf\u{e9} \u{1f431}".as_bytes()),
        ],
    ];
    for (n, members) in samples.iter().enumerate() {
        let path = dir.path().join(format!("{n}.tar"));
        let mut writer = ShardWriter::create(&path).expect("creates");
        let mut i = 0;
        while i < members.len() {
            let key = members[i].0;
            let group: Vec<(&str, &[u8])> =
                members[i..].iter().take_while(|m| m.0 == key).map(|m| (m.1, m.2)).collect();
            i += group.len();
            writer.write_sample(key, &group).expect("writes");
        }
        writer.finish().expect("finishes");
        seeds.push(read(&path));
    }
    seeds.push(read(fixtures().join("webdataset_py/00001.tar")));
    seeds
}

#[test]
fn tar_shards() {
    let dir = scratch();
    let path = dir.path().join("shard.tar");
    fuzz("tar_shard", shard_seeds(), 50000, move |bytes| {
        write(&path, bytes);
        // As the loader reads a shard: every sample, and each usable one decoded (within a
        // small pixel budget, as `data.max_pixels` bounds it).
        let (mut samples, mut skipped) = (0, 0);
        for_each_sample(&path, |item| {
            match item.map(|raw| raw.decode(1 << 20).map(|_| ())) {
                Ok(Ok(())) => samples += 1,
                _ => skipped += 1,
            }
            std::ops::ControlFlow::Continue(())
        });
        // A skipped sample is a value too (the loader counts it); an input is accepted when
        // some sample survives.
        if samples > 0 {
            Ok(())
        } else {
            Err(format!("{samples} samples, {skipped} skipped"))
        }
    });
}

#[test]
fn shard_index_json() {
    let dir = scratch();
    let seeds = vec![
        br#"{"shards": [{"name": "00000.tar", "samples": 100}, {"name": "00001.tar", "samples": 7}], "samples": 107, "written_by": "oxclip data pack"}"#.to_vec(),
        b"{\n  \"shards\": [\n    {\n      \"name\": \"train/0.tar\",\n      \"samples\": 18446744073709551615\n    }\n  ]\n}\n".to_vec(),
    ];
    let root = dir.path().to_owned();
    fuzz("shard_index_json", seeds, 30000, move |bytes| {
        write(&root.join("index.json"), bytes);
        ShardIndex::read(&root).map(|_| ())
    });
}

// ---------------------------------------------------------------------------------------------
// Data loader: CSV and JSONL sources, tokenizer.json.

#[test]
fn csv_source() {
    let dir = scratch();
    let seeds = vec![
        read(fixtures().join("pickle/continue/train.csv")),
        b"\xef\xbb\xbffilepath,title,label\nimgs/a.jpg,\"a cat, sitting\",0\n/abs/b.png,\"say \"\"hi\"\"\",1\n,no image,2\nc.jpg,,3\nd.jpg,short,4\n".to_vec(),
    ];
    let path = dir.path().join("train.csv");
    let specs = [None, Some("label".to_owned())].map(|label_key| CsvSpec {
        path: path.clone(),
        img_key: "filepath".into(),
        caption_key: "title".into(),
        separator: None,
        label_key,
    });
    fuzz("csv_source", seeds, 50000, move |bytes| {
        write(&path, bytes);
        // A file that speaks of labels is read as a labelled list, as zero-shot evaluation
        // reads one, the others as captioned training lists.
        csv::load(&specs[usize::from(mentions(bytes, b"label"))]).map(|_| ())
    });
}

#[test]
fn jsonl_source() {
    let dir = scratch();
    let seeds = vec![
        b"{\"image\": \"imgs/0001.jpg\", \"caption\": \"a dog\"}\n{\"image\": \"b.png\", \"caption\": \"two\\nlines \\u00e9\"}\n\n{\"image\": 5}\n[1, 2]\n".to_vec(),
        b"{\"image\": \"x.jpg\", \"caption\": \"c\", \"label\": \"12\"}\r\n{\"image\": \"y.jpg\", \"label\": 0, \"extra\": {\"deep\": [[[]]]}}\n".to_vec(),
    ];
    let path = dir.path().join("train.jsonl");
    let specs = [None, Some("label".to_owned())].map(|label_key| JsonlSpec {
        path: path.clone(),
        img_key: "image".into(),
        caption_key: "caption".into(),
        label_key,
    });
    fuzz("jsonl_source", seeds, 50000, move |bytes| {
        write(&path, bytes);
        jsonl::load(&specs[usize::from(mentions(bytes, b"label"))]).map(|_| ())
    });
}

#[test]
fn tokenizer_json() {
    let dir = scratch();
    let seeds = vec![
        read(fixtures().join("pickle/continue/tokenizer/tokenizer.json")),
        read(fixtures().join("tokenizers/bert_wp/tokenizer.json")),
        read(fixtures().join("tokenizers/gemma_sp/tokenizer.json")),
    ];
    let path = dir.path().join("tokenizer.json");
    fuzz("tokenizer_json", seeds, 20000, move |bytes| {
        write(&path, bytes);
        // Both ways the loader opens one (as the CLIP BPE is used, and as transformers'
        // AutoTokenizer prepares rows, which needs a pad token), then a text through each
        // that opens, as a batch would go; accepted when either opens.
        let plain = Tokenizer::from_tokenizer_json(&path);
        let prepared = Tokenizer::hugging_face(&path, HfOptions::default());
        for tokenizer in [&plain, &prepared].into_iter().flatten() {
            let ids = tokenizer.encode("A photo of a caf\u{e9}, <|endoftext|> [SEP] 42!", 16);
            assert_eq!(ids.len(), 16, "encode pads or truncates to the context length");
        }
        match (plain, prepared) {
            (Err(e), Err(_)) => Err(e),
            _ => Ok(()),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Trainer: safetensors, checkpoints and their manifests, sharded indexes, pickles.

/// A safetensors file written by hand: every dtype oxclip loads, a scalar, an empty tensor,
/// metadata, and one dtype it refuses to load is left out (the seed must be accepted).
fn handmade_safetensors() -> Vec<u8> {
    let tensors: [(&str, &str, &[usize], usize); 6] = [
        ("logit_scale", "F32", &[], 4),
        ("a.weight", "F32", &[2, 3], 4),
        ("b.bias", "BF16", &[4], 2),
        ("c.ids", "I64", &[3, 1], 8),
        ("d.mask", "BOOL", &[2, 2], 1),
        ("e.empty", "F16", &[0, 5], 2),
    ];
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0;
    for (name, dtype, shape, width) in tensors {
        let bytes = shape.iter().product::<usize>() * width;
        let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
        header += &format!(
            ",\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            shape.join(","),
            offset + bytes
        );
        offset += bytes;
    }
    header += "}";
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend((0..offset).map(|i| if i % 4 == 3 { 0x3f } else { (i * 7) as u8 & 0x01 }));
    out
}

#[test]
fn safetensors_weights() {
    let dir = scratch();
    let seeds = vec![handmade_safetensors(), read(fixtures().join("pickle/views.safetensors"))];
    let path = dir.path().join("model.safetensors");
    fuzz("safetensors", seeds, 50000, move |bytes| {
        write(&path, bytes);
        read_weights(&path).map(|_| ())
    });
}

/// A real checkpoint, written by `checkpoint::save` for a model small enough that every
/// mutation lands near a header: its folder, and the names of its files.
fn tiny_checkpoint(run_dir: &Path) -> PathBuf {
    tch::manual_seed(0);
    let cfg: ModelConfig = serde_yaml::from_str(
        "embed_dim: 8\nvision_cfg: {image_size: 8, layers: 1, width: 16, patch_size: 4, head_width: 8}\n\
         text_cfg: {context_length: 4, vocab_size: 8, width: 16, heads: 2, layers: 1}\n",
    )
    .expect("parses");
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = Clip::new(&vs.root(), &cfg).expect("builds");
    let opt = AdamW::new(
        vs.variables().into_iter().collect(),
        AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 },
    );
    let state = TrainerState {
        step: 3,
        samples_seen: 12,
        seed: 1,
        loader: oxclip_data_loader::LoaderState::at(0, 3),
        rank_loaders: Vec::new(),
        grad_scaler: None,
        config: "model: tiny\n".into(),
    };
    checkpoint::save(run_dir, &vs, &opt, &state, 1).expect("saves")
}

/// Copies the files of `from` into a fresh folder `to`, leaving out `skip`.
fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("lists") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if !skip.iter().any(|s| name == *s) {
            std::fs::copy(entry.path(), to.join(&name)).expect("copies");
        }
    }
}

#[test]
fn checkpoint_manifest() {
    let dir = scratch();
    let saved = tiny_checkpoint(&dir.path().join("run"));
    let manifest = read(saved.join(checkpoint::MANIFEST_FILE));
    // A second manifest seed listing optimizer shards (the dist.shard layout).
    let sharded = dir.path().join("sharded");
    copy_dir(&saved, &sharded, &[checkpoint::OPTIMIZER_FILE, checkpoint::MANIFEST_FILE]);
    let optimizer = read(saved.join(checkpoint::OPTIMIZER_FILE));
    for rank in 0..2 {
        write(&sharded.join(checkpoint::shard_file(rank, 2)), &optimizer);
    }
    let text = String::from_utf8(manifest.clone()).expect("utf-8");
    let record = |name: &str| {
        let start = text.find(&format!("\"{name}\"")).expect("listed");
        let end = start + text[start..].find('}').expect("record ends") + 1;
        text[start..end].to_owned()
    };
    let shard_records: Vec<String> = (0..2)
        .map(|r| {
            record(checkpoint::OPTIMIZER_FILE)
                .replace(checkpoint::OPTIMIZER_FILE, &checkpoint::shard_file(r, 2))
        })
        .collect();
    let sharded_manifest =
        text.replace(&record(checkpoint::OPTIMIZER_FILE), &shard_records.join(",\n    "));
    write(&sharded.join(checkpoint::MANIFEST_FILE), sharded_manifest.as_bytes());
    checkpoint::verify(&sharded, Depth::Checksums).expect("the sharded seed verifies");
    let seeds = vec![manifest, sharded_manifest.into_bytes()];
    fuzz("checkpoint_manifest", seeds, 30000, move |bytes| {
        // A manifest naming shards goes beside shards. Resume runs `check` (checksums and the
        // trainer state); a save runs `verify` at sizes over the checkpoints it keeps.
        let dir = if mentions(bytes, b"-of-") { &sharded } else { &saved };
        write(&dir.join(checkpoint::MANIFEST_FILE), bytes);
        checkpoint::verify(dir, Depth::Sizes)?;
        checkpoint::check(dir)
    });
}

#[test]
fn checkpoint_safetensors_header() {
    // A checkpoint from before manifests: resume checks each safetensors file's length against
    // its own header, so the header is read from the (damaged) file.
    let dir = scratch();
    let saved = tiny_checkpoint(&dir.path().join("run"));
    let old = dir.path().join("old");
    copy_dir(&saved, &old, &[checkpoint::MANIFEST_FILE]);
    let model = old.join(checkpoint::MODEL_FILE);
    let seeds = vec![read(&model), handmade_safetensors()];
    fuzz("checkpoint_header", seeds, 30000, move |bytes| {
        write(&model, bytes);
        checkpoint::check(&old)
    });
}

#[test]
fn trainer_state_json() {
    let dir = scratch();
    let saved = tiny_checkpoint(&dir.path().join("run"));
    let seeds = vec![read(saved.join(checkpoint::STATE_FILE))];
    fuzz("trainer_state_json", seeds, 30000, move |bytes| {
        write(&saved.join(checkpoint::STATE_FILE), bytes);
        checkpoint::read_state(&saved).map(|_| ())
    });
}

#[test]
fn sharded_index_json() {
    // transformers' sharded checkpoint: the index beside its three shards, read as `--init`
    // reads it (every shard, then Hugging Face's names turned into open_clip's).
    let dir = scratch();
    let from = fixtures().join("pickle/hf_sharded_safetensors");
    copy_dir(&from, dir.path(), &[]);
    let index = dir.path().join("model.safetensors.index.json");
    let seeds = vec![read(&index)];
    fuzz("sharded_index_json", seeds, 10000, move |bytes| {
        write(&index, bytes);
        read_weights(&index).map(|_| ())
    });
}

#[test]
fn pickle_weights() {
    let dir = scratch();
    let pickle = fixtures().join("pickle");
    let seeds = vec![read(pickle.join("views_zip.pt")), read(pickle.join("views_legacy.pt"))];
    let path = dir.path().join("weights.pt");
    fuzz("pickle", seeds, 15000, move |bytes| {
        write(&path, bytes);
        read_weights(&path).map(|_| ())
    });
}

// ---------------------------------------------------------------------------------------------
// Trainer: the run config, as `oxclip train --config` reads and checks it.

#[test]
fn run_config_yaml() {
    let dir = scratch();
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let path = dir.path().join("run.yaml");
    // A small tokenizer.json given over the file's, as `--set data.tokenizer=...` would: the
    // CLIP BPE the configs otherwise load takes a good part of a second to read, which would
    // be most of this target's time and none of its parsing.
    let tokenizer = fixtures().join("pickle/continue/tokenizer/tokenizer.json");
    let overrides = Overrides {
        set: vec![("data.tokenizer".into(), tokenizer.display().to_string().into())],
        ..Overrides::default()
    };
    // Every shipped example that stands on its own (no file beside it that a copy would lose).
    let mut seeds = Vec::new();
    let mut names = BTreeMap::new();
    for name in [
        "quickstart.yaml",
        "examples/pretrain.yaml",
        "examples/finetune.yaml",
        "examples/siglip.yaml",
        "examples/two-ranks.yaml",
        "finetune/vit-b-32-csv.yaml",
        "pretrain/vit-b-32-webdataset.yaml",
    ] {
        let bytes = read(configs.join(name));
        write(&path, &bytes);
        if config::load(&path, &overrides).is_ok() {
            names.insert(name, bytes.len());
            seeds.push(bytes);
        }
    }
    assert!(names.len() >= 3, "too few shipped configs load as they are: {names:?}");
    fuzz("run_config_yaml", seeds, 30000, move |bytes| {
        write(&path, bytes);
        config::load(&path, &overrides).map(|_| ())
    });
}

// ---------------------------------------------------------------------------------------------
// Trainer: a model directory's own config (Hugging Face's `config.json`, open_clip's
// `open_clip_config.json`), as `--init DIR` and `model: DIR` read it.

#[test]
fn model_dir_config_json() {
    let dir = scratch();
    let seeds = vec![
        read(fixtures().join("hf_tiny/config.json")),
        read(fixtures().join("hf_siglip_tiny/config.json")),
        read(fixtures().join("hf_clip_quickgelu_tiny/config.json")),
        read(fixtures().join("clip_benchmark/model/open_clip_config.json")),
    ];
    // The weights beside it are only named, never read, when the config is.
    let weights = dir.path().join("model.safetensors");
    write(&weights, b"");
    let (hf, open_clip) =
        (dir.path().join("config.json"), dir.path().join("open_clip_config.json"));
    fuzz("model_dir_config_json", seeds, 50000, move |bytes| {
        if mentions(bytes, b"model_cfg") {
            write(&open_clip, bytes);
            Pretrained::open_clip(&open_clip, &weights).map(|_| ())
        } else {
            write(&hf, bytes);
            Pretrained::hugging_face(&hf, &weights).map(|_| ())
        }
    });
}
