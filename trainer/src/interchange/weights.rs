//! A weights file into a model and back. [`load_weights`] reads a safetensors file in any
//! layout oxclip knows, tells the layout apart by its names and renames them to open_clip's
//! (the model's own) before the model checks and takes them; [`save_weights`] writes the
//! model's names as they are.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn, Kind, Tensor};

use super::safetensors::{has_tensor, read_safetensors, refuse_pickles};
use super::{hf_clip, hf_siglip};
use crate::error::{Result, TrainError};
use crate::model::{self, Clip, ModelConfig};

/// A model of architecture `config` with the weights of `path` (see [`load_weights`]) on
/// `device`. A file with a `logit_bias` (trained with the sigmoid loss) gets a model with one,
/// whatever the config says, so a SigLIP checkpoint loads under its plain architecture name.
pub fn load(
    config: &ModelConfig,
    path: &Path,
    device: tch::Device,
) -> Result<(nn::VarStore, Clip)> {
    let mut config = config.clone();
    if config.init_logit_bias.is_none() && has_tensor(path, "logit_bias") {
        config.init_logit_bias = Some(0.0); // the file's value replaces it
    }
    let vs = nn::VarStore::new(device);
    let model = Clip::new(&vs.root(), &config)?;
    load_weights(&vs, path)?;
    Ok((vs, model))
}

/// Loads weights into `vs` from a safetensors file in open_clip layout (an oxclip checkpoint,
/// `open_clip_model.safetensors`) or Hugging Face `CLIPModel` / `SiglipModel` layout
/// (`model.safetensors`), told apart by their names; converts dtype (fp16 / bf16 files load)
/// and refuses any mismatch, naming every missing, unexpected or mis-shaped tensor. Pickled
/// checkpoints are refused with the conversion to run.
pub fn load_weights(vs: &nn::VarStore, path: &Path) -> Result<()> {
    refuse_pickles(path)?;
    let mut loaded = read_safetensors(path)?;
    if hf_siglip::is_siglip(loaded.keys()) {
        loaded = hf_siglip::from_hf(loaded)
            .map_err(|e| TrainError::Weights { path: path.into(), message: e.to_string() })?;
    } else if hf_clip::is_hf(loaded.keys()) {
        loaded = hf_clip::from_hf(loaded)
            .map_err(|e| TrainError::Weights { path: path.into(), message: e.to_string() })?;
    } else if loaded.keys().all(|k| k.starts_with("module.")) {
        // Saved from inside DistributedDataParallel, as open_clip's own checkpoints are.
        loaded = loaded.into_iter().map(|(k, v)| (k["module.".len()..].to_owned(), v)).collect();
    }
    model::load_state_dict(vs, loaded, path)
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

    #[test]
    fn pickles_are_refused_with_the_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("epoch_32.pt");
        std::fs::write(&path, b"PK\x03\x04 a torch.save zip").unwrap();
        let (vs, _) = tiny();
        let err = load_weights(&vs, &path).unwrap_err().to_string();
        assert!(
            err.contains("pickled")
                && err.contains("save_file")
                && err.contains("epoch_32.pt.safetensors"),
            "{err}"
        );
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
