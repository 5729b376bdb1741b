//! A weights file into a model and back. [`read_weights`] reads any weights file oxclip knows
//! (safetensors; PyTorch's pickles, read by `pickle/` without running them: `torch.save`'s
//! zip and legacy formats, OpenAI's TorchScript archives; a sharded checkpoint's
//! `*.index.json`), tells the layout apart by its names and renames them to open_clip's (the
//! model's own) before the model checks and takes them; [`save_weights`] writes the model's
//! names as they are.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde_json::Value;
use tch::{nn, Kind, Tensor};

use super::json::read_json;
use super::openai::OPENAI_EXTRA_KEYS;
use super::pickle::{self, TorchFile};
use super::safetensors::{looks_safetensors, read_safetensors};
use super::{hf_clip, hf_siglip};
use crate::error::{Result, TrainError};
use crate::model::{self, Clip, ModelConfig};

/// A model of architecture `config` with the weights of `path` (see [`read_weights`]) on
/// `device`. A file with a `logit_bias` (trained with the sigmoid loss) gets a model with one,
/// whatever the config says, so a SigLIP checkpoint loads under its plain architecture name.
pub fn load(
    config: &ModelConfig,
    path: &Path,
    device: tch::Device,
) -> Result<(nn::VarStore, Clip)> {
    let loaded = read_weights(path)?;
    let mut config = config.clone();
    if config.init_logit_bias.is_none() && loaded.contains_key("logit_bias") {
        config.init_logit_bias = Some(0.0); // the file's value replaces it
    }
    let vs = nn::VarStore::new(device);
    let model = Clip::new(&vs.root(), &config)?;
    model::load_state_dict(&vs, loaded, path)?;
    Ok((vs, model))
}

/// Loads weights into `vs` from `path` ([`read_weights`]); converts dtype (fp16 / bf16 files
/// load) and refuses any mismatch, naming every missing, unexpected or mis-shaped tensor.
pub fn load_weights(vs: &nn::VarStore, path: &Path) -> Result<()> {
    model::load_state_dict(vs, read_weights(path)?, path)
}

/// The weights of `path` in open_clip's names: from open_clip's layout (an oxclip checkpoint,
/// `open_clip_model.safetensors`, a `torch.save` of open_clip's `state_dict()`, open_clip's
/// training checkpoint `epoch_N.pt`, with DDP's `module.` prefixes stripped), OpenAI's
/// (`clip.load`'s TorchScript files: open_clip's names and three integers, dropped), or
/// Hugging Face's `CLIPModel` / `SiglipModel` (`model.safetensors`, `pytorch_model.bin`, their
/// sharded indexes), told apart by their names.
pub fn read_weights(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut loaded = read_tensors(path)?;
    let bad = |e: TrainError| TrainError::Weights { path: path.into(), message: e.to_string() };
    if hf_siglip::is_siglip(loaded.keys()) {
        loaded = hf_siglip::from_hf(loaded).map_err(bad)?;
    } else if hf_clip::is_hf(loaded.keys()) {
        loaded = hf_clip::from_hf(loaded).map_err(bad)?;
    } else if !loaded.is_empty() && loaded.keys().all(|k| k.starts_with("module.")) {
        // Saved from inside DistributedDataParallel, as open_clip's own checkpoints are.
        loaded = loaded.into_iter().map(|(k, v)| (k["module.".len()..].to_owned(), v)).collect();
    }
    for key in OPENAI_EXTRA_KEYS {
        if loaded.get(key).is_some_and(|t| t.dim() == 0 && !t.is_floating_point()) {
            loaded.remove(key);
        }
    }
    Ok(loaded)
}

/// The tensors of a weights file as it names them: a safetensors file, a PyTorch pickle
/// (`.pt`, `.pth`, `.bin`, `.ckpt`, or anything that starts as one), or the `*.index.json` of
/// a sharded checkpoint (its shards, each either).
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if name.ends_with(".index.json") {
        return read_sharded(path);
    }
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    let pickled_name = ["pt", "pth", "bin", "ckpt"].contains(&ext.as_str());
    if !looks_safetensors(path) && (pickled_name || pickle::looks_pickled(path)) {
        return TorchFile::open(path)?.state_dict();
    }
    read_safetensors(path)
}

/// A sharded checkpoint, as transformers writes one: `{"weight_map": {tensor: shard file}}`
/// beside its shards. Every tensor the map lists must be in its shard.
fn read_sharded(index: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bad = |message: String| TrainError::Weights { path: index.into(), message };
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no weight_map: not a sharded checkpoint's index".into()))?;
    let dir = match index.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut shards: Vec<&str> = Vec::new();
    for (name, file) in map {
        let file =
            file.as_str().ok_or_else(|| bad(format!("weight_map.{name} is not a file name")))?;
        // A shard beside the index: a plain relative path, never out of its folder.
        let plain = Path::new(file).components().all(|c| matches!(c, Component::Normal(_)));
        if !plain || file.ends_with(".index.json") {
            return Err(bad(format!("weight_map.{name} names {file:?}, not a shard beside it")));
        }
        if !shards.contains(&file) {
            shards.push(file);
        }
    }
    let mut out = BTreeMap::new();
    for shard in &shards {
        out.extend(read_tensors(&dir.join(shard))?);
    }
    if let Some((name, file)) = map.iter().find(|(name, _)| !out.contains_key(*name)) {
        let file = file.as_str().unwrap_or_default();
        return Err(bad(format!("{name} is not in {file}, where the index puts it")));
    }
    Ok(out)
}

/// Writes `vs` as fp32 safetensors with open_clip's keys.
pub fn save_weights(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let tensors: Vec<(String, Tensor)> = vars
        .into_iter()
        .map(|(k, v)| {
            // Integer buffers (BatchNorm's num_batches_tracked) keep their kind.
            let kind = if v.is_floating_point() { Kind::Float } else { v.kind() };
            Ok((k, v.f_to_kind(kind)?.f_to_device(tch::Device::Cpu)?.f_contiguous()?))
        })
        .collect::<Result<_>>()?;
    Tensor::write_safetensors(&tensors, path)
        .map_err(|e| TrainError::Weights { path: path.into(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny;
    use tch::Device;

    /// A Hugging Face CLIPModel file (tests/fixtures/make_hf_fixtures.py) loads through the
    /// name mapping and gives transformers' embeddings, in fp32 and from an fp16 copy.
    #[test]
    fn hugging_face_weights_give_transformers_embeddings() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let cfg: ModelConfig =
            serde_yaml::from_str(include_str!("../../../tests/fixtures/models/parity-tiny.yaml"))
                .unwrap();
        let io: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(fixtures.join("hf_tiny/io.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let dir = tempfile::tempdir().unwrap();
        let half = dir.path().join("model-fp16.safetensors");
        let tensors: Vec<(String, Tensor)> =
            Tensor::read_safetensors(fixtures.join("hf_tiny/model.safetensors"))
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.to_kind(Kind::Half)))
                .collect();
        Tensor::write_safetensors(&tensors, &half).unwrap();
        for (file, tolerance) in [(fixtures.join("hf_tiny/model.safetensors"), 1e-5), (half, 5e-3)]
        {
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Clip::new(&vs.root(), &cfg).unwrap();
            load_weights(&vs, &file).unwrap();
            let (i, t) = tch::no_grad(|| model.features(&io["pixel_values"], &io["input_ids"]));
            let di = (i - &io["image_embeds"]).abs().max().double_value(&[]);
            let dt = (t - &io["text_embeds"]).abs().max().double_value(&[]);
            assert!(di < tolerance && dt < tolerance, "{}: image {di}, text {dt}", file.display());
        }
    }

    /// Another architecture's weights: the message counts the mismatches and names a few,
    /// rather than every one of hundreds; a folder or a non-safetensors file reads as a sentence.
    #[test]
    fn mismatched_or_unreadable_weights_read_as_short_sentences() {
        let dir = tempfile::tempdir().unwrap();
        let small: ModelConfig =
            serde_yaml::from_str(include_str!("../../../configs/models/small.yaml")).unwrap();
        let vs_small = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(&vs_small.root(), &small).unwrap();
        let path = dir.path().join("small.safetensors");
        save_weights(&vs_small, &path).unwrap();
        let (vs, _) = tiny();
        let err = load_weights(&vs, &path).unwrap_err().to_string();
        assert!(err.len() < 1200, "{} characters: {err}", err.len());
        assert!(
            err.contains("more)") && err.contains("tensors") && err.contains("does not match"),
            "{err}"
        );
        for (bad, needle) in [
            (dir.path().to_path_buf(), "Is a directory"),
            (dir.path().join("x.safetensors"), "not a safetensors file"),
        ] {
            if needle.starts_with("not") {
                std::fs::write(&bad, b"0123456789abcdef").unwrap();
            }
            let err = load_weights(&vs, &bad).unwrap_err().to_string();
            assert!(
                err.contains(needle) && !err.contains("Os {") && !err.contains("IoError"),
                "{err}"
            );
        }
    }

    fn pickle_fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pickle")
    }

    fn pickle_tiny() -> ModelConfig {
        serde_yaml::from_str(include_str!("../../../tests/fixtures/models/pickle-tiny.yaml"))
            .unwrap()
    }

    /// `a` and `b` hold the same names, and equal tensors of the same dtype.
    fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, what: &str) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}");
        for (name, t) in a {
            assert_eq!(t.kind(), b[name].kind(), "{what}: {name}");
            assert!(t.equal(&b[name]), "{what}: {name} differs");
        }
    }

    /// Every pickled layout reads, in open_clip's names, as the same tensors as its
    /// safetensors twin, and loads into the model: open_clip's state dict (zip, legacy, an old
    /// hub repo's open_clip_pytorch_model.bin), its training checkpoint (module. stripped),
    /// Hugging Face's pytorch_model.bin and both kinds of sharded index (through hf_clip's
    /// names).
    #[test]
    fn pickled_and_sharded_weights_read_as_their_twins() {
        let f = pickle_fixtures();
        let hub = tempfile::tempdir().unwrap();
        std::fs::copy(f.join("open_clip_zip.pt"), hub.path().join("open_clip_pytorch_model.bin"))
            .unwrap();
        let config = serde_json::json!({"model_cfg": pickle_tiny(), "preprocess_cfg": {}});
        std::fs::write(hub.path().join("open_clip_config.json"), config.to_string()).unwrap();
        let hub = super::super::pretrained::Pretrained::read(hub.path()).unwrap();
        let cases = [
            ("open_clip.safetensors", f.join("open_clip_zip.pt")),
            ("open_clip.safetensors", f.join("open_clip_legacy.pt")),
            ("open_clip.safetensors", hub.weights.clone()),
            ("epoch_3.safetensors", f.join("epoch_3.pt")),
            ("hf.safetensors", f.join("hf/pytorch_model.bin")),
            ("hf.safetensors", f.join("hf_sharded_bin/pytorch_model.bin.index.json")),
            ("hf.safetensors", f.join("hf_sharded_safetensors/model.safetensors.index.json")),
        ];
        for (twin, file) in cases {
            let want = read_weights(&f.join(twin)).unwrap();
            let got = read_weights(&file).unwrap();
            assert_same(&got, &want, &file.display().to_string());
            let vs = nn::VarStore::new(Device::Cpu);
            let _ = Clip::new(&vs.root(), &pickle_tiny()).unwrap();
            load_weights(&vs, &file).unwrap();
        }
        // The hub directory and the Hugging Face ones say their own architecture.
        assert_eq!(hub.model, pickle_tiny());
        for dir in ["hf", "hf_sharded_bin", "hf_sharded_safetensors"] {
            let p = super::super::pretrained::Pretrained::read(&f.join(dir)).unwrap();
            load(&p.model, &p.weights, Device::Cpu).unwrap();
        }
    }

    /// OpenAI's clip.load file: its architecture from its shapes (no config given), its fp16
    /// weights loaded into an fp32 model give open_clip's own `load_openai_model` embeddings,
    /// and the same tensors as its safetensors twin.
    #[test]
    fn openai_files_load_without_a_config() {
        let f = pickle_fixtures();
        let file = f.join("openai_vit.pt");
        let p = super::super::pretrained::Pretrained::openai(&file).unwrap();
        assert!(p.model.quick_gelu);
        assert_eq!(
            (p.model.vision_cfg.width, p.model.text_cfg.heads, p.model.vision_cfg.image_size),
            (64, 1, 16)
        );
        assert_same(
            &read_weights(&file).unwrap(),
            &read_weights(&f.join("openai_vit.safetensors")).unwrap(),
            "openai_vit.pt",
        );
        let (_, model) = load(&p.model, &file, Device::Cpu).unwrap();
        let io: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(f.join("openai_vit_io.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let (i, t) = tch::no_grad(|| model.features(&io["images"], &io["text"]));
        let di = (i - &io["image_features"]).abs().max().double_value(&[]);
        let dt = (t - &io["text_features"]).abs().max().double_value(&[]);
        assert!(di < 1e-5 && dt < 1e-5, "image {di}, text {dt}");
    }

    /// A sharded index that names a shard outside its folder, or a tensor its shard lacks.
    #[test]
    fn sharded_indexes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("model.safetensors.index.json");
        for (map, needle) in [
            (serde_json::json!({"a": "../elsewhere.safetensors"}), "not a shard beside it"),
            (serde_json::json!({"a": "/etc/passwd"}), "not a shard beside it"),
            (serde_json::json!({"missing": "w.safetensors"}), "missing is not in w.safetensors"),
        ] {
            let (vs, _) = tiny();
            save_weights(&vs, &dir.path().join("w.safetensors")).unwrap();
            std::fs::write(&index, serde_json::json!({"weight_map": map}).to_string()).unwrap();
            let err = read_weights(&index).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn weights_round_trip_through_safetensors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        tch::manual_seed(1);
        let (vs, _) = tiny();
        save_weights(&vs, &path).expect("saves");
        tch::manual_seed(2);
        let (other, _) = tiny();
        load_weights(&other, &path).expect("loads");
        let a = vs.variables();
        for (name, t) in other.variables() {
            assert!(t.equal(&a[&name]), "{name}");
        }
    }
}
