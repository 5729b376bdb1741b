//! The built-in models, by name: open_clip 3.3's model configs (`configs/models/open_clip/`,
//! the files of its `model_configs/` whose towers oxclip builds, vendored verbatim) under open_clip's
//! names, and oxclip's own small test models (`configs/models/*.yaml`). Embedded in the
//! binary, so a name works from any directory.

use super::config::ModelConfig;
use super::params;
use super::Clip;
use crate::error::Result;

/// Where a built-in model's config comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// open_clip's `model_configs/<name>.json`, verbatim.
    OpenClip,
    /// oxclip's own `configs/models/<name>.yaml` (CPU-sized models for tests and the quickstart).
    Oxclip,
}

macro_rules! open_clip_configs {
    ($($name:literal),* $(,)?) => {
        /// Name and JSON text of every vendored open_clip config, sorted by name.
        const OPEN_CLIP: &[(&str, &str)] = &[
            $(($name, include_str!(concat!("../../../configs/models/open_clip/", $name, ".json")))),*
        ];
    };
}

// The list is checked against the directory by `the_list_is_the_directory`.
open_clip_configs!(
    "EVA01-g-14",
    "EVA01-g-14-plus",
    "EVA02-B-16",
    "EVA02-E-14",
    "EVA02-E-14-plus",
    "EVA02-L-14",
    "EVA02-L-14-336",
    "MobileCLIP-B",
    "MobileCLIP-S1",
    "MobileCLIP-S2",
    "MobileCLIP2-B",
    "MobileCLIP2-L-14",
    "MobileCLIP2-S0",
    "MobileCLIP2-S2",
    "MobileCLIP2-S3",
    "MobileCLIP2-S4",
    "PE-Core-B-16",
    "PE-Core-L-14-336",
    "PE-Core-S-16-384",
    "PE-Core-T-16-384",
    "PE-Core-bigG-14-448",
    "RN101",
    "RN101-quickgelu",
    "RN50",
    "RN50-quickgelu",
    "RN50x16",
    "RN50x16-quickgelu",
    "RN50x4",
    "RN50x4-quickgelu",
    "RN50x64",
    "RN50x64-quickgelu",
    "ViT-B-16",
    "ViT-B-16-SigLIP",
    "ViT-B-16-SigLIP-256",
    "ViT-B-16-SigLIP-384",
    "ViT-B-16-SigLIP-512",
    "ViT-B-16-SigLIP-i18n-256",
    "ViT-B-16-SigLIP2",
    "ViT-B-16-SigLIP2-256",
    "ViT-B-16-SigLIP2-384",
    "ViT-B-16-SigLIP2-512",
    "ViT-B-16-plus",
    "ViT-B-16-plus-240",
    "ViT-B-16-quickgelu",
    "ViT-B-32",
    "ViT-B-32-256",
    "ViT-B-32-SigLIP2-256",
    "ViT-B-32-plus-256",
    "ViT-B-32-quickgelu",
    "ViT-H-14",
    "ViT-H-14-378",
    "ViT-H-14-378-quickgelu",
    "ViT-H-14-CLIPA",
    "ViT-H-14-CLIPA-336",
    "ViT-H-14-quickgelu",
    "ViT-H-14-worldwide",
    "ViT-H-14-worldwide-378",
    "ViT-H-14-worldwide-quickgelu",
    "ViT-H-16",
    "ViT-L-14",
    "ViT-L-14-280",
    "ViT-L-14-336",
    "ViT-L-14-336-quickgelu",
    "ViT-L-14-CLIPA",
    "ViT-L-14-CLIPA-336",
    "ViT-L-14-quickgelu",
    "ViT-L-14-worldwide",
    "ViT-L-14-worldwide-quickgelu",
    "ViT-L-16",
    "ViT-L-16-320",
    "ViT-L-16-SigLIP-256",
    "ViT-L-16-SigLIP-384",
    "ViT-L-16-SigLIP2-256",
    "ViT-L-16-SigLIP2-384",
    "ViT-L-16-SigLIP2-512",
    "ViT-M-16",
    "ViT-M-16-alt",
    "ViT-M-32",
    "ViT-M-32-alt",
    "ViT-S-16",
    "ViT-S-16-alt",
    "ViT-S-32",
    "ViT-S-32-alt",
    "ViT-SO400M-14-SigLIP",
    "ViT-SO400M-14-SigLIP-378",
    "ViT-SO400M-14-SigLIP-384",
    "ViT-SO400M-14-SigLIP2",
    "ViT-SO400M-14-SigLIP2-378",
    "ViT-SO400M-16-SigLIP-i18n-256",
    "ViT-SO400M-16-SigLIP2-256",
    "ViT-SO400M-16-SigLIP2-384",
    "ViT-SO400M-16-SigLIP2-512",
    "ViT-bigG-14",
    "ViT-bigG-14-CLIPA",
    "ViT-bigG-14-CLIPA-336",
    "ViT-bigG-14-quickgelu",
    "ViT-bigG-14-worldwide",
    "ViT-bigG-14-worldwide-378",
    "ViT-e-14",
    "ViT-g-14",
    "ViT-gopt-16-SigLIP2-256",
    "ViT-gopt-16-SigLIP2-384",
    "ViTamin-B",
    "ViTamin-B-LTT",
    "ViTamin-L",
    "ViTamin-L-256",
    "ViTamin-L-336",
    "ViTamin-L-384",
    "ViTamin-L2",
    "ViTamin-L2-256",
    "ViTamin-L2-336",
    "ViTamin-L2-384",
    "ViTamin-S",
    "ViTamin-S-LTT",
    "ViTamin-XL-256",
    "ViTamin-XL-336",
    "ViTamin-XL-384",
    "coca_ViT-B-32",
    "coca_ViT-L-14",
    "coca_base",
    "coca_roberta-ViT-B-32",
    "convnext_base",
    "convnext_base_w",
    "convnext_base_w_320",
    "convnext_large",
    "convnext_large_d",
    "convnext_large_d_320",
    "convnext_small",
    "convnext_tiny",
    "convnext_xlarge",
    "convnext_xxlarge",
    "convnext_xxlarge_320",
    "mt5-base-ViT-B-32",
    "mt5-xl-ViT-H-14",
    "nllb-clip-base",
    "nllb-clip-base-siglip",
    "nllb-clip-large",
    "nllb-clip-large-siglip",
    "roberta-ViT-B-32",
    "swin_base_patch4_window7_224",
    "vit_medium_patch16_gap_256",
    "vit_relpos_medium_patch16_cls_224",
    "xlm-roberta-base-ViT-B-32",
    "xlm-roberta-large-ViT-H-14",
);

/// oxclip's own models, YAML.
const OXCLIP: &[(&str, &str)] = &[
    ("small", include_str!("../../../configs/models/small.yaml")),
    ("tiny", include_str!("../../../configs/models/tiny.yaml")),
    ("tiny-coca", include_str!("../../../configs/models/tiny-coca.yaml")),
];

/// Every built-in name: open_clip's, then oxclip's own.
pub fn names() -> impl Iterator<Item = &'static str> {
    OPEN_CLIP.iter().chain(OXCLIP).map(|(name, _)| *name)
}

/// open_clip's names alone (the models `tests/fixtures/open_clip_zoo_shapes.json` lists).
pub fn open_clip_names() -> impl Iterator<Item = &'static str> {
    OPEN_CLIP.iter().map(|(name, _)| *name)
}

/// Where the built-in `name` comes from; `None` for an unknown name.
pub fn source(name: &str) -> Option<Source> {
    if OPEN_CLIP.iter().any(|(n, _)| *n == name) {
        Some(Source::OpenClip)
    } else if OXCLIP.iter().any(|(n, _)| *n == name) {
        Some(Source::Oxclip)
    } else {
        None
    }
}

/// The built-in model `name` (exact, case-sensitive, as open_clip's names), parsed but not
/// validated; `None` when there is none.
pub fn builtin(name: &str) -> Option<ModelConfig> {
    // ok: every embedded text parses (`every_builtin_parses_and_validates`), so `.ok()` drops nothing.
    if let Some((_, text)) = OPEN_CLIP.iter().find(|(n, _)| *n == name) {
        return serde_json::from_str(text).ok();
    }
    let (_, text) = OXCLIP.iter().find(|(n, _)| *n == name)?;
    serde_yaml::from_str(text).ok()
}

/// Up to `max` built-in names close to `query` (a different case, a typo, `/` for `-`, a
/// part of a name), closest first: what an unknown-model error suggests.
pub fn suggest(query: &str, max: usize) -> Vec<&'static str> {
    let q = query.to_lowercase().replace(['/', '_'], "-");
    let mut scored: Vec<(usize, &'static str)> = names()
        .filter_map(|name| {
            let n = name.to_lowercase();
            let d = edit_distance(&q, &n);
            // A typo's worth of edits, or the query naming a family (`vit-b-16` for its variants).
            let close = d <= (q.len() / 4).max(2) || (q.len() >= 4 && n.starts_with(&q));
            close.then_some((d, name))
        })
        .collect();
    scored.sort();
    // The same name but for case or separators is the one meant.
    if scored.first().is_some_and(|(d, _)| *d == 0) {
        scored.retain(|(d, _)| *d == 0);
    }
    scored.into_iter().take(max).map(|(_, name)| name).collect()
}

/// Levenshtein distance over bytes (the names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Trainable parameters of `config`'s model (buffers excluded, as open_clip counts them),
/// from the shapes alone: nothing is allocated.
pub fn parameter_count(config: &ModelConfig) -> Result<i64> {
    super::validate(config)?;
    let mut built = Ok(());
    let count = params::trainable_numel_of(|root| {
        if let Err(e) = Clip::new(root, config) {
            built = Err(e);
        }
    });
    built.map(|()| count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_the_directory() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/open_clip");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                e.unwrap()
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .collect();
        files.sort();
        let listed: Vec<&str> = open_clip_names().collect();
        assert_eq!(files, listed);
        // All of open_clip 3.3's model configs.
        assert_eq!(listed.len(), 144);
    }

    #[test]
    fn every_builtin_parses_and_validates() {
        for name in names() {
            let cfg = builtin(name).unwrap_or_else(|| panic!("{name} does not parse"));
            super::super::validate(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(builtin("ViT-Z-99").is_none());
        assert_eq!(source("RN50"), Some(Source::OpenClip));
        assert_eq!(source("tiny"), Some(Source::Oxclip));
        let b32 = builtin("ViT-B-32-quickgelu").unwrap();
        assert!(b32.quick_gelu);
        assert_eq!((b32.embed_dim, b32.vision_cfg.patch_size), (512, Some(32)));
    }

    #[test]
    fn suggestions_find_the_intended_name() {
        assert_eq!(suggest("vit-b-32", 3)[0], "ViT-B-32");
        assert_eq!(suggest("ViT-B/32", 3), ["ViT-B-32"]);
        assert_eq!(suggest("ViT-L-14-quickgel", 3)[0], "ViT-L-14-quickgelu");
        assert!(suggest("RN50x", 5).contains(&"RN50x4"));
        assert_eq!(suggest("convnext_bas", 3)[0], "convnext_base");
        assert!(suggest("xyzzy_plugh", 3).is_empty());
    }

    #[test]
    fn parameter_count_excludes_nothing_trainable() {
        // open_clip's ViT-B-32: 151,277,313 parameters.
        assert_eq!(parameter_count(&builtin("ViT-B-32").unwrap()).unwrap(), 151_277_313);
    }
}
