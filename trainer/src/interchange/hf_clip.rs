//! Hugging Face `CLIPModel` weights <-> open_clip names. Our model uses
//! open_clip's layout; these two functions translate whole state dicts:
//!
//! - `q_proj`, `k_proj`, `v_proj` are the three row blocks of open_clip's `in_proj_weight`
//!   (and `in_proj_bias`);
//! - HF's `visual_projection` and `text_projection` are `nn.Linear` weights (out x in), the
//!   transposes of open_clip's `visual.proj` and `text_projection` (in x out);
//! - the rest is renaming (`layer_norm1` -> `ln_1`, `mlp.fc1` -> `mlp.c_fc`,
//!   `pre_layrnorm` (sic) -> `visual.ln_pre`, ...).

use std::collections::{BTreeMap, BTreeSet};

use tch::Tensor;

use crate::error::{Result, TrainError};

/// Whether a state dict is in Hugging Face layout.
pub fn is_hf(names: impl IntoIterator<Item = impl AsRef<str>>) -> bool {
    names.into_iter().any(|n| {
        let n = n.as_ref();
        n.starts_with("text_model.")
            || n.starts_with("vision_model.")
            || n == "visual_projection.weight"
    })
}

/// The per-block renames, HF suffix -> open_clip suffix (q/k/v handled apart).
const BLOCK_RENAMES: [(&str, &str); 10] = [
    ("self_attn.out_proj.weight", "attn.out_proj.weight"),
    ("self_attn.out_proj.bias", "attn.out_proj.bias"),
    ("layer_norm1.weight", "ln_1.weight"),
    ("layer_norm1.bias", "ln_1.bias"),
    ("layer_norm2.weight", "ln_2.weight"),
    ("layer_norm2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"),
    ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"),
    ("mlp.fc2.bias", "mlp.c_proj.bias"),
];

/// Whole-tensor renames, HF -> open_clip (the projections are transposed as well).
const RENAMES: [(&str, &str); 13] = [
    ("logit_scale", "logit_scale"),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
    ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
    ("vision_model.post_layernorm.weight", "visual.ln_post.weight"),
    ("vision_model.post_layernorm.bias", "visual.ln_post.bias"),
    ("text_projection.weight", "text_projection"),
];

/// The two towers' block prefixes: (HF, open_clip).
const TOWERS: [(&str, &str); 2] = [
    ("text_model.encoder.layers", "transformer.resblocks"),
    ("vision_model.encoder.layers", "visual.transformer.resblocks"),
];

/// The block indices present under `prefix` (`prefix.{i}.…`).
fn blocks<'a>(names: impl Iterator<Item = &'a String>, prefix: &str) -> BTreeSet<u64> {
    names
        .filter_map(|n| n.strip_prefix(prefix)?.strip_prefix('.')?.split('.').next()?.parse().ok())
        .collect()
}

/// Removes block `h`'s `self_attn.{q,k,v}_proj.{kind}` from `hf` and returns them stacked
/// as one fused projection (open_clip's `in_proj_*`, timm's `qkv`); `None` when the block has
/// none, an error when it has only some.
pub(crate) fn fuse_qkv(
    hf: &mut BTreeMap<String, Tensor>,
    h: &str,
    kind: &str,
) -> Result<Option<Tensor>> {
    let parts: Vec<Option<Tensor>> = ["q", "k", "v"]
        .iter()
        .map(|p| hf.remove(&format!("{h}.self_attn.{p}_proj.{kind}")))
        .collect();
    match parts.as_slice() {
        [Some(q), Some(k), Some(v)] => Ok(Some(Tensor::cat(&[q, k, v], 0))),
        [None, None, None] => Ok(None),
        _ => Err(TrainError::ModelConfig(format!(
            "{h}.self_attn: the file has only some of q_proj, k_proj, v_proj ({kind})"
        ))),
    }
}

/// HF `CLIPModel` tensors -> open_clip names. Tensors HF keeps that open_clip has no use for
/// (`position_ids` buffers) are dropped; anything else unknown is kept under its own name, so
/// the loader's check names it as unexpected.
pub fn from_hf(mut hf: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    hf.retain(|k, _| !k.ends_with("position_ids"));
    for (from, to) in RENAMES {
        if let Some(t) = hf.remove(from) {
            out.insert(to.to_owned(), t);
        }
    }
    if let Some(t) = hf.remove("visual_projection.weight") {
        out.insert("visual.proj".to_owned(), t.tr().contiguous());
    }
    if let Some(t) = out.remove("text_projection") {
        out.insert("text_projection".to_owned(), t.tr().contiguous());
    }
    for (hf_prefix, oc_prefix) in TOWERS {
        for i in blocks(hf.keys(), hf_prefix) {
            let (h, o) = (format!("{hf_prefix}.{i}"), format!("{oc_prefix}.{i}"));
            for (from, to) in BLOCK_RENAMES {
                if let Some(t) = hf.remove(&format!("{h}.{from}")) {
                    out.insert(format!("{o}.{to}"), t);
                }
            }
            for kind in ["weight", "bias"] {
                if let Some(fused) = fuse_qkv(&mut hf, &h, kind)? {
                    out.insert(format!("{o}.attn.in_proj_{kind}"), fused);
                }
            }
        }
    }
    out.extend(hf);
    Ok(out)
}

/// open_clip names -> HF `CLIPModel` tensors, the inverse of [`from_hf`].
pub fn to_hf(mut oc: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    if oc.contains_key("logit_bias") {
        return Err(TrainError::ModelConfig(
            "the model has a logit_bias (trained with loss.kind siglip), which a Hugging Face CLIPModel cannot hold \
             (and transformers' SiglipModel is another architecture); export with --format open_clip, whose CLIP takes \
             init_logit_bias"
                .into(),
        ));
    }
    let mut out = BTreeMap::new();
    if let Some(t) = oc.remove("visual.proj") {
        out.insert("visual_projection.weight".to_owned(), t.tr().contiguous());
    }
    if let Some(t) = oc.remove("text_projection") {
        out.insert("text_projection.weight".to_owned(), t.tr().contiguous());
    }
    for (hf, to) in RENAMES {
        if let Some(t) = oc.remove(to) {
            out.insert(hf.to_owned(), t);
        }
    }
    for (hf_prefix, oc_prefix) in TOWERS {
        for i in blocks(oc.keys(), oc_prefix) {
            let (h, o) = (format!("{hf_prefix}.{i}"), format!("{oc_prefix}.{i}"));
            for (from, to) in BLOCK_RENAMES {
                if let Some(t) = oc.remove(&format!("{o}.{to}")) {
                    out.insert(format!("{h}.{from}"), t);
                }
            }
            for kind in ["weight", "bias"] {
                if let Some(t) = oc.remove(&format!("{o}.attn.in_proj_{kind}")) {
                    let parts = t.chunk(3, 0);
                    for (p, part) in ["q", "k", "v"].iter().zip(parts) {
                        out.insert(format!("{h}.self_attn.{p}_proj.{kind}"), part.contiguous());
                    }
                }
            }
        }
    }
    if let Some(left) = oc.keys().next() {
        return Err(TrainError::ModelConfig(format!("{left} has no Hugging Face CLIPModel name")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_goes_both_ways() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/hf_tiny/model.safetensors");
        let hf: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(&dir).unwrap().into_iter().collect();
        assert!(is_hf(hf.keys()));
        let oc = from_hf(hf.iter().map(|(k, v)| (k.clone(), v.copy())).collect()).unwrap();
        assert!(!is_hf(oc.keys()));
        assert_eq!(oc["transformer.resblocks.0.attn.in_proj_weight"].size(), [144, 48]);
        assert_eq!(oc["visual.proj"].size(), [64, 32]);
        let back = to_hf(oc).unwrap();
        assert_eq!(back.keys().collect::<Vec<_>>(), hf.keys().collect::<Vec<_>>());
        for (k, v) in &hf {
            assert!(back[k].equal(v), "{k}");
        }
        // Half a q/k/v triple is an error, not a silent drop.
        let mut broken: BTreeMap<String, Tensor> =
            hf.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
        broken.remove("text_model.encoder.layers.1.self_attn.k_proj.weight");
        let err = from_hf(broken).unwrap_err().to_string();
        assert!(err.contains("text_model.encoder.layers.1.self_attn"), "{err}");
    }
}
