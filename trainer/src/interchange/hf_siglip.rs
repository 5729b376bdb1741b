//! Hugging Face `SiglipModel` weights <-> open_clip names (a `CustomTextCLIP` whose image
//! tower is a timm ViT trunk with a MAP head). Checked against both libraries by
//! tests/fixtures/make_hf_siglip_fixtures.py, which loads the renamed weights into open_clip
//! `strict=True` and compares the embeddings. What differs besides the names:
//!
//! - `q_proj`, `k_proj`, `v_proj` are the row blocks of one fused tensor: timm's `attn.qkv`
//!   in the image tower, open_clip's `attn.in_proj_*` in the text tower;
//! - the MAP head's `nn.MultiheadAttention.in_proj_*` is [q; k; v]; timm keeps `q` apart and
//!   `kv` = [k; v], so q is the first width rows and kv the rest;
//! - HF's position embedding is an `nn.Embedding` (N, D), timm's `pos_embed` is (1, N, D);
//! - HF's `logit_scale` and `logit_bias` have shape (1,), open_clip's are scalars;
//! - the text head is an `nn.Linear` on both sides (`text_model.head` = open_clip's
//!   `text.text_projection` with a bias): no transpose, unlike CLIPModel's projections.

use std::collections::{BTreeMap, BTreeSet};

use tch::Tensor;

use crate::error::{Result, TrainError};

/// Whether a Hugging Face state dict is a `SiglipModel`'s (rather than a `CLIPModel`'s): only
/// SigLIP has the towers' `head`s.
pub fn is_siglip(names: impl IntoIterator<Item = impl AsRef<str>>) -> bool {
    names.into_iter().any(|n| {
        let n = n.as_ref();
        n.starts_with("vision_model.head.") || n.starts_with("text_model.head.")
    })
}

/// Whole-tensor renames, HF -> open_clip, same shape.
const RENAMES: [(&str, &str); 19] = [
    ("vision_model.embeddings.patch_embedding.weight", "visual.trunk.patch_embed.proj.weight"),
    ("vision_model.embeddings.patch_embedding.bias", "visual.trunk.patch_embed.proj.bias"),
    ("vision_model.post_layernorm.weight", "visual.trunk.norm.weight"),
    ("vision_model.post_layernorm.bias", "visual.trunk.norm.bias"),
    ("vision_model.head.probe", "visual.trunk.attn_pool.latent"),
    ("vision_model.head.attention.out_proj.weight", "visual.trunk.attn_pool.proj.weight"),
    ("vision_model.head.attention.out_proj.bias", "visual.trunk.attn_pool.proj.bias"),
    ("vision_model.head.layernorm.weight", "visual.trunk.attn_pool.norm.weight"),
    ("vision_model.head.layernorm.bias", "visual.trunk.attn_pool.norm.bias"),
    ("vision_model.head.mlp.fc1.weight", "visual.trunk.attn_pool.mlp.fc1.weight"),
    ("vision_model.head.mlp.fc1.bias", "visual.trunk.attn_pool.mlp.fc1.bias"),
    ("vision_model.head.mlp.fc2.weight", "visual.trunk.attn_pool.mlp.fc2.weight"),
    ("vision_model.head.mlp.fc2.bias", "visual.trunk.attn_pool.mlp.fc2.bias"),
    ("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "text.positional_embedding"),
    ("text_model.final_layer_norm.weight", "text.ln_final.weight"),
    ("text_model.final_layer_norm.bias", "text.ln_final.bias"),
    ("text_model.head.weight", "text.text_projection.weight"),
    ("text_model.head.bias", "text.text_projection.bias"),
];

const VISION_POS: (&str, &str) =
    ("vision_model.embeddings.position_embedding.weight", "visual.trunk.pos_embed");
const SCALARS: [&str; 2] = ["logit_scale", "logit_bias"];
const HEAD_IN_PROJ: &str = "vision_model.head.attention.in_proj";
const POOL: &str = "visual.trunk.attn_pool";

/// One tower's blocks: HF prefix, open_clip prefix, the fused q/k/v name (`{kind}` is
/// `weight` or `bias`), and the per-block renames HF suffix -> open_clip suffix.
struct Tower {
    hf: &'static str,
    oc: &'static str,
    qkv: &'static str,
    renames: [(&'static str, &'static str); 10],
}

const TOWERS: [Tower; 2] = [
    Tower {
        hf: "vision_model.encoder.layers",
        oc: "visual.trunk.blocks",
        qkv: "attn.qkv.{kind}",
        renames: [
            ("self_attn.out_proj.weight", "attn.proj.weight"),
            ("self_attn.out_proj.bias", "attn.proj.bias"),
            ("layer_norm1.weight", "norm1.weight"),
            ("layer_norm1.bias", "norm1.bias"),
            ("layer_norm2.weight", "norm2.weight"),
            ("layer_norm2.bias", "norm2.bias"),
            ("mlp.fc1.weight", "mlp.fc1.weight"),
            ("mlp.fc1.bias", "mlp.fc1.bias"),
            ("mlp.fc2.weight", "mlp.fc2.weight"),
            ("mlp.fc2.bias", "mlp.fc2.bias"),
        ],
    },
    Tower {
        hf: "text_model.encoder.layers",
        oc: "text.transformer.resblocks",
        qkv: "attn.in_proj_{kind}",
        renames: [
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
        ],
    },
];

/// The block indices present under `prefix` (`prefix.{i}.…`).
fn blocks<'a>(names: impl Iterator<Item = &'a String>, prefix: &str) -> BTreeSet<u64> {
    names
        .filter_map(|n| n.strip_prefix(prefix)?.strip_prefix('.')?.split('.').next()?.parse().ok())
        .collect()
}

/// HF `SiglipModel` tensors -> open_clip names. `position_ids` buffers are dropped; anything
/// else unknown keeps its name, so the loader names it as unexpected.
pub fn from_hf(mut hf: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    hf.retain(|k, _| !k.ends_with("position_ids"));
    for (from, to) in RENAMES {
        if let Some(t) = hf.remove(from) {
            out.insert(to.to_owned(), t);
        }
    }
    if let Some(t) = hf.remove(VISION_POS.0) {
        out.insert(VISION_POS.1.to_owned(), t.unsqueeze(0));
    }
    for name in SCALARS {
        if let Some(t) = hf.remove(name) {
            out.insert(name.to_owned(), t.reshape([] as [i64; 0]));
        }
    }
    for kind in ["weight", "bias"] {
        if let Some(t) = hf.remove(&format!("{HEAD_IN_PROJ}_{kind}")) {
            let width = t.size()[0] / 3;
            out.insert(format!("{POOL}.q.{kind}"), t.narrow(0, 0, width).contiguous());
            out.insert(format!("{POOL}.kv.{kind}"), t.narrow(0, width, 2 * width).contiguous());
        }
    }
    for tower in &TOWERS {
        for i in blocks(hf.keys(), tower.hf) {
            let (h, o) = (format!("{}.{i}", tower.hf), format!("{}.{i}", tower.oc));
            for (from, to) in tower.renames {
                if let Some(t) = hf.remove(&format!("{h}.{from}")) {
                    out.insert(format!("{o}.{to}"), t);
                }
            }
            for kind in ["weight", "bias"] {
                if let Some(fused) = super::hf_clip::fuse_qkv(&mut hf, &h, kind)? {
                    out.insert(format!("{o}.{}", tower.qkv.replace("{kind}", kind)), fused);
                }
            }
        }
    }
    out.extend(hf);
    Ok(out)
}

/// open_clip names -> HF `SiglipModel` tensors, the inverse of [`from_hf`].
pub fn to_hf(mut oc: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (hf, to) in RENAMES {
        if let Some(t) = oc.remove(to) {
            out.insert(hf.to_owned(), t);
        }
    }
    if let Some(t) = oc.remove(VISION_POS.1) {
        out.insert(VISION_POS.0.to_owned(), t.squeeze_dim(0));
    }
    for name in SCALARS {
        if let Some(t) = oc.remove(name) {
            out.insert(name.to_owned(), t.reshape([1]));
        }
    }
    for kind in ["weight", "bias"] {
        match (oc.remove(&format!("{POOL}.q.{kind}")), oc.remove(&format!("{POOL}.kv.{kind}"))) {
            (Some(q), Some(kv)) => {
                out.insert(format!("{HEAD_IN_PROJ}_{kind}"), Tensor::cat(&[q, kv], 0));
            }
            (None, None) => {}
            _ => {
                return Err(TrainError::ModelConfig(format!(
                    "{POOL}: the model has only one of q.{kind}, kv.{kind}"
                )))
            }
        }
    }
    for tower in &TOWERS {
        for i in blocks(oc.keys(), tower.oc) {
            let (h, o) = (format!("{}.{i}", tower.hf), format!("{}.{i}", tower.oc));
            for (from, to) in tower.renames {
                if let Some(t) = oc.remove(&format!("{o}.{to}")) {
                    out.insert(format!("{h}.{from}"), t);
                }
            }
            for kind in ["weight", "bias"] {
                if let Some(t) = oc.remove(&format!("{o}.{}", tower.qkv.replace("{kind}", kind))) {
                    for (p, part) in ["q", "k", "v"].iter().zip(t.chunk(3, 0)) {
                        out.insert(format!("{h}.self_attn.{p}_proj.{kind}"), part.contiguous());
                    }
                }
            }
        }
    }
    if let Some(left) = oc.keys().next() {
        return Err(TrainError::ModelConfig(format!(
            "{left} has no Hugging Face SiglipModel name"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interchange::hf_clip::is_hf;

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    fn shapes(map: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<i64>> {
        map.iter().map(|(k, v)| (k.clone(), v.size())).collect()
    }

    /// transformers' SiglipModel file -> open_clip's names and shapes exactly (as open_clip
    /// 3.3 + timm build the same model, hf_siglip_names.json), and back to the file bit for bit.
    #[test]
    fn siglip_names_and_shapes_match_both_libraries() {
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("hf_siglip_names.json")).unwrap(),
        )
        .unwrap();
        let want = |lib: &str| -> BTreeMap<String, Vec<i64>> {
            serde_json::from_value(golden[lib].clone()).unwrap()
        };
        let hf: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(fixtures().join("hf_siglip_tiny/model.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(shapes(&hf), want("transformers"));
        assert!(is_hf(hf.keys()) && is_siglip(hf.keys()));
        let oc = from_hf(hf.iter().map(|(k, v)| (k.clone(), v.copy())).collect()).unwrap();
        assert_eq!(shapes(&oc), want("open_clip"));
        assert!(!is_siglip(oc.keys()) && !is_hf(oc.keys()));
        // Values: q is the head's first rows, the text projection is not transposed.
        let w = hf["vision_model.head.attention.in_proj_weight"].size()[1];
        assert!(oc["visual.trunk.attn_pool.q.weight"]
            .equal(&hf["vision_model.head.attention.in_proj_weight"].narrow(0, 0, w)));
        assert!(oc["visual.trunk.blocks.1.attn.qkv.bias"]
            .narrow(0, w, w)
            .equal(&hf["vision_model.encoder.layers.1.self_attn.k_proj.bias"]));
        assert!(oc["text.text_projection.weight"].equal(&hf["text_model.head.weight"]));

        let back = to_hf(oc).unwrap();
        assert_eq!(shapes(&back), shapes(&hf));
        for (k, v) in &hf {
            assert!(back[k].equal(v), "{k}");
        }
        let mut broken: BTreeMap<String, Tensor> =
            hf.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
        broken.remove("vision_model.encoder.layers.0.self_attn.v_proj.weight");
        let err = from_hf(broken).unwrap_err().to_string();
        assert!(err.contains("vision_model.encoder.layers.0.self_attn"), "{err}");
    }

    #[test]
    fn clip_files_are_not_siglip() {
        let hf: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(fixtures().join("hf_tiny/model.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        assert!(!is_siglip(hf.keys()));
    }
}
