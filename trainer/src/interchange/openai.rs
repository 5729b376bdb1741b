//! OpenAI's own CLIP files, as `clip.load` downloads them (`ViT-B-32.pt`, `RN50.pt`, ...):
//! TorchScript archives (read by `pickle/`) whose state dict has open_clip's names (open_clip
//! took them from OpenAI), fp16 for most weights, plus three integer tensors
//! (`input_resolution`, `context_length`, `vocab_size`) that open_clip drops. They say nothing
//! of their architecture but their tensors' shapes; [`model_from_openai_shapes`] reads it
//! from them as open_clip's `build_model_from_openai_state_dict` does (open_clip/model.py):
//! a ViT when `visual.proj` is there, else a ModifiedResNet; widths, block counts, patch and
//! image size, context length and vocabulary from the shapes; 64-wide attention heads;
//! QuickGELU, which OpenAI trained with.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::ModelConfig;

/// The integer tensors of OpenAI's state dicts that are no weights (open_clip pops them).
pub const OPENAI_EXTRA_KEYS: [&str; 3] = ["input_resolution", "context_length", "vocab_size"];

/// The architecture of an OpenAI CLIP state dict with these tensor shapes (validated by the
/// caller). The message says which tensor is missing or odd.
pub fn model_from_openai_shapes(
    shapes: &BTreeMap<String, Vec<i64>>,
) -> Result<ModelConfig, String> {
    let dim = |name: &str, axis: isize| -> Result<i64, String> {
        let shape =
            shapes.get(name).ok_or_else(|| format!("no {name}: not an OpenAI CLIP state dict"))?;
        let at = if axis < 0 { shape.len() as isize + axis } else { axis };
        usize::try_from(at)
            .ok()
            .and_then(|a| shape.get(a))
            .copied()
            .ok_or_else(|| format!("{name} has shape {shape:?}, not a CLIP weight's"))
    };
    // Distinct block indices under `prefix` (the third dotted part, as open_clip counts).
    let blocks = |prefix: &str| -> usize {
        shapes
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.split('.').next())
            .collect::<BTreeSet<_>>()
            .len()
    };
    let grid_of = |tokens: i64, name: &str| -> Result<i64, String> {
        let grid = ((tokens - 1).max(0) as f64).sqrt().round() as i64;
        if grid * grid + 1 != tokens {
            return Err(format!("{name} has {tokens} positions, not a square grid and one more"));
        }
        Ok(grid)
    };
    let vision_cfg = if shapes.contains_key("visual.proj") {
        let width = dim("visual.conv1.weight", 0)?;
        let layers = shapes
            .keys()
            .filter(|k| k.starts_with("visual.") && k.ends_with(".attn.in_proj_weight"))
            .count();
        let patch = dim("visual.conv1.weight", -1)?;
        let grid = grid_of(dim("visual.positional_embedding", 0)?, "visual.positional_embedding")?;
        serde_json::json!({
            "image_size": patch * grid,
            "layers": layers,
            "width": width,
            "patch_size": patch,
        })
    } else {
        let layers: Vec<usize> = (1..=4).map(|b| blocks(&format!("visual.layer{b}."))).collect();
        let width = dim("visual.layer1.0.conv1.weight", 0)?;
        let pos = "visual.attnpool.positional_embedding";
        let output_width = grid_of(dim(pos, 0)?, pos)?;
        serde_json::json!({
            "image_size": output_width * 32,
            "layers": layers,
            "width": width,
            "patch_size": null,
        })
    };
    let text_width = dim("ln_final.weight", 0)?;
    let json = serde_json::json!({
        "embed_dim": dim("text_projection", 1)?,
        "quick_gelu": true,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": dim("positional_embedding", 0)?,
            "vocab_size": dim("token_embedding.weight", 0)?,
            "width": text_width,
            "heads": text_width / 64,
            "layers": blocks("transformer.resblocks."),
        },
    });
    serde_json::from_value(json).map_err(|e| format!("the shapes give no model config: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interchange::pretrained::differences;
    use crate::model::{zoo, Clip};

    /// The shapes of each model OpenAI published give open_clip's config of it, QuickGELU
    /// included, both tower kinds.
    #[test]
    fn openai_models_are_read_from_their_shapes() {
        for name in [
            "RN50",
            "RN101",
            "RN50x4",
            "RN50x16",
            "RN50x64",
            "ViT-B-32",
            "ViT-B-16",
            "ViT-L-14",
            "ViT-L-14-336",
        ] {
            let want = zoo::builtin(&format!("{name}-quickgelu"))
                .or_else(|| zoo::builtin(name).map(|c| ModelConfig { quick_gelu: true, ..c }))
                .unwrap();
            let mut shapes: BTreeMap<String, Vec<i64>> =
                Clip::shapes(&want).unwrap().into_iter().collect();
            for key in OPENAI_EXTRA_KEYS {
                shapes.insert(key.into(), vec![]);
            }
            let got = model_from_openai_shapes(&shapes).unwrap();
            got.validate().unwrap();
            assert!(differences(&got, &want).is_empty(), "{name}: {:?}", differences(&got, &want));
        }
    }

    #[test]
    fn other_state_dicts_are_not_taken_for_openai_ones() {
        let shapes: BTreeMap<String, Vec<i64>> =
            [("visual.proj".to_owned(), vec![768, 512])].into_iter().collect();
        let err = model_from_openai_shapes(&shapes).unwrap_err();
        assert!(err.contains("no visual.conv1.weight"), "{err}");
    }
}
