//! Freezing towers for fine-tuning, as open_clip's `lock_image_tower` / `lock_text_tower`
//! (LiT, Zhai et al. 2022): every parameter of the tower stops training except those of its
//! last N groups. The groups, first to last, are open_clip's:
//!
//! - image: {conv1, class_embedding, positional_embedding, ln_pre}, each residual block but
//!   the last, {last block, ln_post}, {proj}; CoCa's attentional pooler is in no group and
//!   stays frozen whatever the count, as open_clip's `VisionTransformer.lock` leaves it;
//! - text: {token_embedding, positional_embedding, CoCa's cls_emb}, each residual block but
//!   the last, {last block, ln_final}, {text_projection}; CoCa's decoder never locks;
//! - a timm trunk, as open_clip's `TimmModel.lock`: timm's groups (for a ViT: the stem, each
//!   block but the last, {last block, norm}, then {attn_pool, fc_norm, the trunk's own
//!   classifier} where there are any; `timm_vit::lock_groups`); `visual.head` is never
//!   frozen, and `unlocked: 0` freezes the whole trunk, its classifier included;
//! - a Hugging Face text tower, as open_clip's `HFTextEncoder.lock`: {embeddings}, then each
//!   layer (`hf_text::HfTextArch::lock_groups`); `text.proj` and the encoder's pooler are
//!   never frozen except that `unlocked: 0` freezes the whole encoder, pooler included. Its
//!   `LayerNorm`s freeze only under `freeze_layer_norm` (open_clip's
//!   `--lock-text-freeze-layer-norm`); open_clip's own text transformer has no such switch
//!   and freezes them with the rest.
//!
//! Frozen parameters get `requires_grad = false`, so backward skips them and the optimizer
//! never sees them (no state, no weight decay).

use tch::nn;

use super::config::{ModelConfig, VisionTowerKind};
use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Image,
    Text,
}

/// The tower's groups of parameter names (exact names, or prefixes ending in `.`).
fn groups(cfg: &ModelConfig, tower: Tower) -> Vec<Vec<String>> {
    if let (Tower::Image, VisionTowerKind::Timm(name)) = (tower, cfg.vision_cfg.tower()) {
        if super::timm_eva::architecture(name).is_some() {
            return super::timm_eva::lock_groups(&cfg.vision_cfg);
        }
        if super::timm_convnext::architecture(name).is_some() {
            return super::timm_convnext::lock_groups(&cfg.vision_cfg);
        }
        if super::timm_swin::architecture(name).is_some() {
            return super::timm_swin::lock_groups(&cfg.vision_cfg);
        }
        if super::timm_fastvit::architecture(name).is_some() {
            return super::timm_fastvit::lock_groups(&cfg.vision_cfg);
        }
        return super::timm_vit::lock_groups(&cfg.vision_cfg);
    }
    let t = cfg.text_prefix();
    let (first, blocks, layers, last, proj) = match tower {
        Tower::Image => (
            vec![
                "visual.conv1".to_owned(),
                "visual.class_embedding".into(),
                "visual.positional_embedding".into(),
                "visual.ln_pre".into(),
            ],
            "visual.transformer.resblocks".to_owned(),
            cfg.vision_cfg.vit_layers(),
            "visual.ln_post".to_owned(),
            "visual.proj".to_owned(),
        ),
        Tower::Text => (
            vec![
                format!("{t}token_embedding"),
                format!("{t}positional_embedding"),
                format!("{t}cls_emb"),
            ],
            format!("{t}transformer.resblocks"),
            cfg.text_cfg.layers,
            format!("{t}ln_final"),
            format!("{t}text_projection"),
        ),
    };
    let mut out = vec![first];
    for i in 0..layers.saturating_sub(1) {
        out.push(vec![format!("{blocks}.{i}")]);
    }
    out.push(vec![format!("{blocks}.{}", layers - 1), last]);
    out.push(vec![proj]);
    out
}

/// A group entry names a tensor, or a module whose tensors all start with it and a dot.
fn in_group(name: &str, group: &[String]) -> bool {
    group.iter().any(|g| {
        name == g || name.strip_prefix(g.as_str()).is_some_and(|rest| rest.starts_with('.'))
    })
}

/// Freezes `tower` except its last `unlocked` groups (0: all of it), LayerNorms included.
/// Returns the number of parameters (tensors) frozen.
pub fn lock(vs: &nn::VarStore, cfg: &ModelConfig, tower: Tower, unlocked: usize) -> Result<usize> {
    lock_with(vs, cfg, tower, unlocked, true)
}

/// [`lock`], where `freeze_layer_norm: false` leaves a Hugging Face text tower's `LayerNorm`s
/// training (open_clip's `lock_text_freeze_layer_norm`; the default of its training script).
pub fn lock_with(
    vs: &nn::VarStore,
    cfg: &ModelConfig,
    tower: Tower,
    unlocked: usize,
    freeze_layer_norm: bool,
) -> Result<usize> {
    if let (Tower::Image, VisionTowerKind::ResNet(_)) = (tower, cfg.vision_cfg.tower()) {
        return lock_resnet(vs, unlocked);
    }
    if tower == Tower::Text && cfg.text_cfg.is_hf() {
        return lock_hf_text(vs, cfg, unlocked, freeze_layer_norm);
    }
    let groups = groups(cfg, tower);
    let keep = &groups[groups.len().saturating_sub(unlocked)..];
    // Frozen whatever `unlocked` says: open_clip freezes the whole tower, then unlocks groups.
    let always = match tower {
        Tower::Image => vec!["visual.attn_pool".to_owned()],
        Tower::Text => Vec::new(),
    };
    let mut frozen = 0;
    for (name, var) in vs.variables() {
        let member = groups.iter().any(|g| in_group(&name, g));
        if (member && !keep.iter().any(|g| in_group(&name, g))) || in_group(&name, &always) {
            let _ = var.set_requires_grad(false);
            frozen += 1;
        }
    }
    Ok(frozen)
}

/// open_clip's `HFTextEncoder.lock`: `unlocked: 0` freezes the whole encoder, else the
/// groups before the last `unlocked`; a parameter under a module named `LayerNorm` only
/// with `freeze_layer_norm`.
fn lock_hf_text(
    vs: &nn::VarStore,
    cfg: &ModelConfig,
    unlocked: usize,
    freeze_layer_norm: bool,
) -> Result<usize> {
    let arch = super::hf_text::check(&cfg.text_cfg)?;
    let root = format!("{}transformer", cfg.text_prefix());
    let frozen_groups: Vec<String> = if unlocked == 0 {
        vec![root]
    } else {
        let groups = arch.lock_groups();
        let end = groups.len().saturating_sub(unlocked);
        groups[..end].iter().map(|g| format!("{root}.{g}")).collect()
    };
    let mut frozen = 0;
    for (name, var) in vs.variables() {
        let layer_norm = name.split('.').any(|part| part == "LayerNorm");
        if in_group(&name, &frozen_groups) && (freeze_layer_norm || !layer_norm) {
            let _ = var.set_requires_grad(false);
            frozen += 1;
        }
    }
    Ok(frozen)
}

/// open_clip's `ModifiedResNet.lock` freezes the whole tower and refuses partial locking:
/// its stages have no agreed grouping. BatchNorm's running statistics are buffers, not
/// parameters: in training mode they still follow the data, as in open_clip without
/// `--lock-image-freeze-bn-stats`.
fn lock_resnet(vs: &nn::VarStore, unlocked: usize) -> Result<usize> {
    if unlocked > 0 {
        return Err(TrainError::Config(format!(
            "train.lock_image_unlocked_groups is {unlocked}, but a ModifiedResNet image tower \
             (RN50, RN101, RN50x4, ...) locks whole, as in open_clip; set it to 0 or leave the image tower unlocked"
        )));
    }
    let mut frozen = 0;
    for (name, var) in vs.variables() {
        if name.starts_with("visual.") && var.requires_grad() {
            let _ = var.set_requires_grad(false);
            frozen += 1;
        }
    }
    Ok(frozen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Clip;
    use tch::Device;

    fn tiny() -> (nn::VarStore, ModelConfig) {
        let cfg: ModelConfig =
            serde_yaml::from_str(include_str!("../../../configs/models/tiny.yaml")).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(&vs.root(), &cfg).unwrap();
        (vs, cfg)
    }

    fn trainable(vs: &nn::VarStore) -> Vec<String> {
        let mut names: Vec<String> =
            vs.variables().into_iter().filter(|(_, v)| v.requires_grad()).map(|(n, _)| n).collect();
        names.sort();
        names
    }

    #[test]
    fn groups_cover_each_tower_exactly_once() {
        let (vs, cfg) = tiny();
        for tower in [Tower::Image, Tower::Text] {
            let groups = groups(&cfg, tower);
            assert_eq!(
                groups.len(),
                2 + cfg.vision_cfg.vit_layers().max(cfg.text_cfg.layers) as usize
            );
            for (name, _) in vs.variables() {
                let hits = groups.iter().filter(|g| in_group(&name, g)).count();
                let of_tower = match tower {
                    Tower::Image => name.starts_with("visual."),
                    Tower::Text => !name.starts_with("visual.") && name != "logit_scale",
                };
                assert_eq!(hits, usize::from(of_tower), "{tower:?} {name}");
            }
        }
    }

    #[test]
    fn locking_leaves_only_the_last_groups_trainable() {
        let (vs, cfg) = tiny();
        lock(&vs, &cfg, Tower::Image, 1).unwrap();
        let names = trainable(&vs);
        assert!(names.contains(&"visual.proj".to_owned()));
        assert!(!names.iter().any(|n| n.starts_with("visual.") && n != "visual.proj"), "{names:?}");
        assert!(
            names.contains(&"token_embedding.weight".to_owned())
                && names.contains(&"logit_scale".to_owned())
        );

        let (vs, cfg) = tiny();
        lock(&vs, &cfg, Tower::Text, 2).unwrap();
        let names = trainable(&vs);
        assert!(
            names.contains(&"text_projection".to_owned())
                && names.contains(&"ln_final.weight".to_owned())
        );
        assert!(names.iter().any(|n| n.starts_with("transformer.resblocks.1.")));
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("transformer.resblocks.0.")
                    || n.starts_with("token_embedding")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.starts_with("visual.")));
    }
}
