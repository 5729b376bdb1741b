//! The SigLIP / SigLIP 2 image towers as open_clip builds them: a timm `VisionTransformer`
//! trunk (timm 1.0) under `visual.trunk.`, wrapped by open_clip's `TimmModel`, whose head
//! (`visual.head.`) is empty for `timm_proj: none` and a Linear for `timm_proj: linear`.
//!
//! The trunk: a patch-embedding convolution with a bias, learned positions for the patches
//! only (no class token), pre-LN blocks with a fused `qkv`, a final `norm`, then timm's
//! `AttentionPoolLatent` ("MAP" head): one learned latent query attends over every token,
//! `x = proj(attention)`, `x = x + mlp(norm(x))`, and the latent's row is the feature. In
//! training, patch dropout (timm's `patch_drop`, open_clip's `patch_dropout`) keeps some patch
//! tokens after the positions (`patch_dropout.rs`; no class token to keep in front).
//!
//! Only the sixteen timm names open_clip 3.3's SigLIP configs use are built; their
//! architectures are the `@register_model` definitions of timm's `vision_transformer.py`,
//! in [`ARCHITECTURES`].

use tch::nn::{self, Init};
use tch::Tensor;

use super::config::VisionConfig;
use super::params::param;
use super::patch_dropout::keep_patches;
use super::staged;
use super::transformer::{Activation, LayerNorm, Linear};
use crate::error::{Result, TrainError};

/// One timm ViT definition: what its `@register_model` function passes to
/// `_create_vision_transformer` (and the input size of its pretrained config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimmArch {
    pub name: &'static str,
    /// The pretrained config's input size; open_clip's configs use the same `image_size`.
    pub img_size: i64,
    pub patch: i64,
    pub width: i64,
    pub depth: i64,
    pub heads: i64,
    /// `int(width * mlp_ratio)`: the blocks' and the MAP head's MLP width.
    pub mlp_hidden: i64,
    /// `nn.GELU` unless the definition says `act_layer='gelu_tanh'`.
    pub act: Activation,
}

/// timm's `LayerNorm` default (every norm of these trunks, the MAP head's included).
pub const NORM_EPS: f64 = 1e-6;

// One row of the table below, each argument named by its column.
#[allow(clippy::too_many_arguments)]
const fn arch(
    name: &'static str,
    img_size: i64,
    patch: i64,
    width: i64,
    depth: i64,
    heads: i64,
    mlp_hidden: i64,
    act: Activation,
) -> TimmArch {
    TimmArch { name, img_size, patch, width, depth, heads, mlp_hidden, act }
}

use Activation::{Gelu, GeluTanh};

/// `class_token=False, global_pool='map'` for all of them; so400m's `mlp_ratio=3.7362` makes
/// int(1152 * 3.7362) = 4304.
pub const ARCHITECTURES: [TimmArch; 16] = [
    arch("vit_base_patch16_siglip_224", 224, 16, 768, 12, 12, 3072, Gelu),
    arch("vit_base_patch16_siglip_256", 256, 16, 768, 12, 12, 3072, Gelu),
    arch("vit_base_patch16_siglip_384", 384, 16, 768, 12, 12, 3072, Gelu),
    arch("vit_base_patch16_siglip_512", 512, 16, 768, 12, 12, 3072, Gelu),
    arch("vit_base_patch32_siglip_256", 256, 32, 768, 12, 12, 3072, GeluTanh),
    arch("vit_large_patch16_siglip_256", 256, 16, 1024, 24, 16, 4096, Gelu),
    arch("vit_large_patch16_siglip_384", 384, 16, 1024, 24, 16, 4096, Gelu),
    arch("vit_large_patch16_siglip_512", 512, 16, 1024, 24, 16, 4096, GeluTanh),
    arch("vit_so400m_patch14_siglip_224", 224, 14, 1152, 27, 16, 4304, Gelu),
    arch("vit_so400m_patch14_siglip_378", 378, 14, 1152, 27, 16, 4304, Gelu),
    arch("vit_so400m_patch14_siglip_384", 384, 14, 1152, 27, 16, 4304, Gelu),
    arch("vit_so400m_patch16_siglip_256", 256, 16, 1152, 27, 16, 4304, GeluTanh),
    arch("vit_so400m_patch16_siglip_384", 384, 16, 1152, 27, 16, 4304, GeluTanh),
    arch("vit_so400m_patch16_siglip_512", 512, 16, 1152, 27, 16, 4304, GeluTanh),
    arch("vit_giantopt_patch16_siglip_256", 256, 16, 1536, 40, 16, 6144, GeluTanh),
    arch("vit_giantopt_patch16_siglip_384", 384, 16, 1536, 40, 16, 6144, GeluTanh),
];

/// oxclip's own CPU-sized SigLIP trunk (not a timm model: open_clip cannot build it), for
/// tests and first experiments as the `tiny` model is for CLIP: small enough to commit as a
/// Hugging Face SiglipModel directory (tests/fixtures/hf_siglip_tiny;
/// make_hf_siglip_fixtures.py registers it in timm to make that fixture).
pub const TINY: TimmArch = arch("vit_oxtiny_patch8_siglip_32", 32, 8, 32, 2, 2, 128, GeluTanh);

/// The trunks oxclip builds: open_clip's [`ARCHITECTURES`] and [`TINY`].
pub fn architectures() -> Vec<TimmArch> {
    let mut all = ARCHITECTURES.to_vec();
    all.push(TINY);
    all
}

/// The architecture of a timm model name, or an error listing the names oxclip builds.
pub fn architecture(name: &str) -> Result<TimmArch> {
    architectures().into_iter().find(|a| a.name == name).ok_or_else(|| {
        let names: Vec<&str> = ARCHITECTURES.iter().map(|a| a.name).collect();
        TrainError::ModelConfig(format!(
            "vision_cfg.timm_model_name {name:?} is not a timm model oxclip builds; it builds the SigLIP trunks: {}",
            names.join(", ")
        ))
    })
}

/// timm's initialisation of `nn.Linear` in a ViT (`init_weights_vit_timm`): weights
/// trunc_normal(std 0.02) truncated at +-2 (i.e. +-100 std: a plain normal), biases zero.
fn timm_linear(p: nn::Path, in_dim: i64, out_dim: i64) -> Linear {
    Linear::with_bias_init(
        p,
        in_dim,
        out_dim,
        Init::Randn { mean: 0.0, stdev: 0.02 },
        Init::Const(0.0),
    )
}

/// timm's `Attention`: fused `qkv` (with a bias), scaled dot-product attention, `proj`.
#[derive(Debug)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub proj: Linear,
    heads: i64,
}

impl SelfAttention {
    /// x: (B, N, C) -> (B, N, C).
    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        // (B, N, 3C) -> (3, B, H, N, C/H)
        let qkv = self
            .qkv
            .forward(x)
            .view([b, n, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let out = Tensor::scaled_dot_product_attention(
            &qkv.get(0),
            &qkv.get(1),
            &qkv.get(2),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.proj.forward(&out.transpose(1, 2).reshape([b, n, c]))
    }
}

/// timm's `Mlp`: fc1, activation, fc2.
#[derive(Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(p: nn::Path, width: i64, hidden: i64, act: Activation) -> Self {
        Mlp {
            fc1: timm_linear(&p / "fc1", width, hidden),
            fc2: timm_linear(&p / "fc2", hidden, width),
            act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)))
    }
}

/// timm's `Block`: x + attn(norm1(x)), then x + mlp(norm2(x)).
#[derive(Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: SelfAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x));
        &x + self.mlp.forward(&self.norm2.forward(&x))
    }
}

/// timm's `AttentionPoolLatent` with one latent query, `q` and `kv` projections (biases),
/// no q/k norm, and the output `proj`, `norm`, `mlp` (out_features = width).
#[derive(Debug)]
pub struct AttentionPoolLatent {
    /// (1, 1, width)
    pub latent: Tensor,
    pub q: Linear,
    pub kv: Linear,
    pub proj: Linear,
    pub norm: LayerNorm,
    pub mlp: Mlp,
    heads: i64,
}

impl AttentionPoolLatent {
    fn new(p: nn::Path, a: &TimmArch) -> Self {
        let w = a.width;
        AttentionPoolLatent {
            // timm: trunc_normal_tf_(std = latent_dim^-0.5), truncated at +-2 std; a plain
            // normal here (its spread is about 14% larger).
            latent: param(
                &p,
                "latent",
                &[1, 1, w],
                Init::Randn { mean: 0.0, stdev: (w as f64).powf(-0.5) },
            ),
            q: timm_linear(&p / "q", w, w),
            kv: timm_linear(&p / "kv", w, 2 * w),
            proj: timm_linear(&p / "proj", w, w),
            norm: LayerNorm::new(&p / "norm", w, NORM_EPS),
            mlp: Mlp::new(&p / "mlp", w, a.mlp_hidden, a.act),
            heads: a.heads,
        }
    }

    /// x: (B, N, C) -> (B, C).
    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let dh = c / self.heads;
        // (B, 1, C) -> (B, H, 1, Dh)
        let q = self
            .q
            .forward(&self.latent.expand([b, -1, -1], false))
            .view([b, 1, self.heads, dh])
            .transpose(1, 2);
        // (B, N, 2C) -> (2, B, H, N, Dh)
        let kv = self.kv.forward(x).view([b, n, 2, self.heads, dh]).permute([2, 0, 3, 1, 4]);
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &kv.get(0),
            &kv.get(1),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let x = self.proj.forward(&out.transpose(1, 2).reshape([b, 1, c]));
        // The residual is around the MLP only: the attention output replaces the latent.
        let x = &x + self.mlp.forward(&self.norm.forward(&x));
        x.select(1, 0)
    }
}

/// open_clip's `TimmModel.head` after the trunk.
#[derive(Debug)]
pub enum TimmHead {
    /// `timm_proj: none`: the trunk's width is the embedding.
    None,
    /// `timm_proj: linear`: `head.proj` (bias under `timm_proj_bias`), after a dropout of
    /// `timm_drop` in training.
    Linear { weight: Tensor, bias: Option<Tensor>, drop: f64 },
}

/// The timm ViT trunk and open_clip's head. Variables live under `p` (`visual.`).
#[derive(Debug)]
pub struct TimmVit {
    pub arch: TimmArch,
    /// `patch_embed.proj`: (width, 3, patch, patch) and its bias.
    pub patch_weight: Tensor,
    pub patch_bias: Tensor,
    /// (1, grid^2, width)
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub attn_pool: AttentionPoolLatent,
    pub head: TimmHead,
}

impl TimmVit {
    /// The trunk named by `cfg.timm_model_name`, with positions for `cfg.image_size`: timm's
    /// default size when they agree (every open_clip config), and what open_clip's
    /// `force_image_size` (timm's `set_input_size`) gives otherwise. The grid is
    /// `image_size / patch` rounded down, as timm's `PatchEmbed` (SO400M/14 at 384: 27).
    pub fn new(p: nn::Path, cfg: &VisionConfig, embed_dim: i64) -> Result<Self> {
        let name = cfg.timm_model_name.as_deref().unwrap_or_default();
        let mut a = architecture(name)?;
        // open_clip hands timm the name alone, so its activation is the definition's; a
        // config (or a Hugging Face SigLIP checkpoint, whose v1 towers use tanh GELU where
        // timm's definitions say erf) may say otherwise through act_kwargs.
        if cfg.act_kwargs.is_some() {
            a.act = cfg.activation(false)?;
        }
        let err = |m: String| Err(TrainError::ModelConfig(m));
        if cfg.timm_pool != "map" {
            return err(format!(
                "vision_cfg.timm_pool {:?} is not built for timm towers; oxclip builds \"map\" (the SigLIP attention-pool head)",
                cfg.timm_pool
            ));
        }
        if cfg.timm_drop_path.is_some_and(|d| d > 0.0) {
            return err("vision_cfg.timm_drop_path (stochastic depth) is not built yet; remove it or set it to 0".into());
        }
        let head = match cfg.timm_proj.as_str() {
            "none" => {
                if embed_dim != a.width {
                    return err(format!(
                        "vision_cfg.timm_proj: none needs embed_dim ({embed_dim}) equal to the width of {name} ({})",
                        a.width
                    ));
                }
                TimmHead::None
            }
            "linear" => {
                // open_clip's nn.Linear keeps PyTorch's default initialisation.
                let hp = &p / "head" / "proj";
                let init = Linear::default_init(a.width);
                TimmHead::Linear {
                    weight: param(&hp, "weight", &[embed_dim, a.width], init),
                    bias: cfg.timm_proj_bias.then(|| param(&hp, "bias", &[embed_dim], init)),
                    drop: cfg.timm_drop,
                }
            }
            other => {
                return err(format!(
                    "vision_cfg.timm_proj {other:?} is not built for timm towers; oxclip builds \"none\" and \"linear\""
                ))
            }
        };
        if cfg.image_size < a.patch {
            return err(format!(
                "vision_cfg.image_size {} is smaller than {name}'s patch ({})",
                cfg.image_size, a.patch
            ));
        }
        let t = &p / "trunk";
        let grid = cfg.image_size / a.patch;
        let w = a.width;
        // PyTorch's default Conv2d initialisation (timm leaves the patch embedding to it).
        let fan_in = (3 * a.patch * a.patch) as f64;
        let conv = Init::Uniform { lo: -fan_in.powf(-0.5), up: fan_in.powf(-0.5) };
        let pe = &t / "patch_embed" / "proj";
        let blocks = (0..a.depth)
            .map(|i| {
                let b = &t / "blocks" / i;
                Block {
                    norm1: LayerNorm::new(&b / "norm1", w, NORM_EPS),
                    attn: SelfAttention {
                        qkv: timm_linear(&b / "attn" / "qkv", w, 3 * w),
                        proj: timm_linear(&b / "attn" / "proj", w, w),
                        heads: a.heads,
                    },
                    norm2: LayerNorm::new(&b / "norm2", w, NORM_EPS),
                    mlp: Mlp::new(&b / "mlp", w, a.mlp_hidden, a.act),
                }
            })
            .collect();
        Ok(TimmVit {
            arch: a,
            patch_weight: param(&pe, "weight", &[w, 3, a.patch, a.patch], conv),
            patch_bias: param(&pe, "bias", &[w], conv),
            // timm: trunc_normal_(std=.02), truncated at +-2 (+-100 std).
            pos_embed: param(
                &t,
                "pos_embed",
                &[1, grid * grid, w],
                Init::Randn { mean: 0.0, stdev: 0.02 },
            ),
            blocks,
            norm: LayerNorm::new(&t / "norm", w, NORM_EPS),
            attn_pool: AttentionPoolLatent::new(&t / "attn_pool", &a),
            head,
        })
    }

    /// Patch tokens per image.
    pub fn num_patches(&self) -> i64 {
        self.pos_embed.size()[1]
    }

    /// images: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised. `train` turns on
    /// the head's dropout; `kept`: (B, keep) patch positions each image keeps (patch dropout),
    /// or `None` for all of them.
    pub fn forward(&self, images: &Tensor, train: bool, kept: Option<&Tensor>) -> Tensor {
        staged::fold(self.stage_count(), images, |i, x| self.stage(i, x, train, kept))
    }

    /// The stages of [`TimmVit::forward`] (model/staged.rs): the patch embedding, each
    /// block, the head (norm, attention pool, open_clip's head).
    pub fn stage_count(&self) -> usize {
        self.blocks.len() + 2
    }

    /// Stage `i` on its input: images for the first, (B, g*g, W) after it (fewer under patch
    /// dropout: the first keeps the patches `kept` lists). Only the head draws random numbers
    /// (its dropout, under `train`).
    pub fn stage(&self, i: usize, x: &Tensor, train: bool, kept: Option<&Tensor>) -> Tensor {
        if i == 0 {
            let p = self.arch.patch;
            // (B, W, g, g) -> (B, g*g, W)
            let x = x.conv2d(&self.patch_weight, Some(&self.patch_bias), [p, p], [0, 0], [1, 1], 1);
            let x = x.flatten(2, 3).transpose(1, 2);
            let x = &x + self.pos_embed.to_kind(x.kind());
            match kept {
                // timm's patch_drop, after the positions, before norm_pre (none in SigLIP).
                Some(kept) => keep_patches(&x, 0, kept),
                None => x,
            }
        } else if let Some(block) = self.blocks.get(i - 1) {
            block.forward(x)
        } else {
            self.head(x, train)
        }
    }

    /// (B, g*g, W) -> (B, embed_dim).
    fn head(&self, x: &Tensor, train: bool) -> Tensor {
        let pooled = self.attn_pool.forward(&self.norm.forward(x));
        match &self.head {
            TimmHead::None => pooled,
            TimmHead::Linear { weight, bias, drop } => {
                pooled.dropout(*drop, train).linear(weight, bias.as_ref())
            }
        }
    }
}

/// open_clip's `TimmModel.lock` groups (timm's `group_matcher` for a ViT, as
/// `group_parameters` orders them): {patch_embed, pos_embed}, each block but the last,
/// {last block, norm} (`norm`'s ordinal is timm's MATCH_PREV_GROUP), then the unmatched
/// rest, {attn_pool}. `visual.head` is in none: `TimmModel.lock` only freezes the trunk.
/// Names relative to the model root.
pub fn lock_groups(name: &str) -> Vec<Vec<String>> {
    let Ok(a) = architecture(name) else { return Vec::new() };
    let t = "visual.trunk";
    let mut out = vec![vec![format!("{t}.patch_embed"), format!("{t}.pos_embed")]];
    out.extend((0..a.depth - 1).map(|i| vec![format!("{t}.blocks.{i}")]));
    out.push(vec![format!("{t}.blocks.{}", a.depth - 1), format!("{t}.norm")]);
    out.push(vec![format!("{t}.attn_pool")]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::model::Clip;

    fn siglip(name: &str, image_size: i64, embed_dim: i64) -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "embed_dim": embed_dim, "init_logit_bias": -10, "custom_text": true,
            "vision_cfg": {"image_size": image_size, "timm_model_name": name, "timm_model_pretrained": false,
                           "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1,
                         "no_causal_mask": true, "proj_bias": true, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}
        }))
        .unwrap()
    }

    #[test]
    fn unknown_names_and_unbuilt_options_are_clear_errors() {
        let err =
            Clip::shapes(&siglip("vit_huge_patch14_clip_224", 224, 768)).unwrap_err().to_string();
        assert!(
            err.contains("vit_huge_patch14_clip_224")
                && err.contains("vit_giantopt_patch16_siglip_384"),
            "{err}"
        );
        let err =
            Clip::shapes(&siglip("vit_base_patch16_siglip_224", 224, 512)).unwrap_err().to_string();
        assert!(err.contains("embed_dim (512)") && err.contains("768"), "{err}");
        let mut cfg = siglip("vit_base_patch16_siglip_224", 224, 768);
        cfg.vision_cfg.timm_pool = "avg".into();
        assert!(Clip::shapes(&cfg).unwrap_err().to_string().contains("timm_pool \"avg\""));
    }

    /// SO400M/14 at 384 px: timm's grid rounds down (27 x 27 = 729 positions); a linear head
    /// adds `visual.head.proj`.
    #[test]
    fn positions_follow_image_size_and_linear_head_adds_a_projection() {
        let find = |shapes: &[(String, Vec<i64>)], n: &str| {
            shapes.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone())
        };
        let shapes = Clip::shapes(&siglip("vit_so400m_patch14_siglip_384", 384, 1152)).unwrap();
        assert_eq!(find(&shapes, "visual.trunk.pos_embed"), Some(vec![1, 729, 1152]));
        assert_eq!(find(&shapes, "visual.trunk.attn_pool.mlp.fc1.weight"), Some(vec![4304, 1152]));
        assert!(find(&shapes, "visual.trunk.blocks.26.attn.qkv.bias").is_some());
        let mut cfg = siglip("vit_base_patch16_siglip_224", 32, 512);
        cfg.vision_cfg.timm_proj = "linear".into();
        let shapes = Clip::shapes(&cfg).unwrap();
        assert_eq!(find(&shapes, "visual.trunk.pos_embed"), Some(vec![1, 4, 768]));
        assert_eq!(find(&shapes, "visual.head.proj.weight"), Some(vec![512, 768]));
        assert_eq!(find(&shapes, "visual.head.proj.bias"), None);
    }

    #[test]
    fn lock_groups_follow_timms_group_matcher() {
        let groups = lock_groups("vit_base_patch16_siglip_224");
        assert_eq!(groups.len(), 1 + 12 + 1);
        assert_eq!(groups[0], ["visual.trunk.patch_embed", "visual.trunk.pos_embed"]);
        assert_eq!(groups[12], ["visual.trunk.blocks.11", "visual.trunk.norm"]);
        assert_eq!(groups[13], ["visual.trunk.attn_pool"]);
    }

    /// Every trunk of the table is the one timm builds (hf_siglip_names.json, from timm).
    #[test]
    fn the_trunk_table_is_timms() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join("hf_siglip_names.json")).unwrap(),
        )
        .unwrap();
        let timm = golden["timm_trunks"].as_object().unwrap();
        assert_eq!(timm.len(), ARCHITECTURES.len());
        for t in ARCHITECTURES {
            let g = &timm[t.name];
            let want = (
                g["patch"].as_i64(),
                g["width"].as_i64(),
                g["depth"].as_i64(),
                g["heads"].as_i64(),
                g["mlp"].as_i64(),
                g["image"].as_i64(),
            );
            assert_eq!(
                (
                    Some(t.patch),
                    Some(t.width),
                    Some(t.depth),
                    Some(t.heads),
                    Some(t.mlp_hidden),
                    Some(t.img_size)
                ),
                want,
                "{}",
                t.name
            );
            assert_eq!(t.act == Activation::GeluTanh, g["act"] == "GELUTanh", "{}", t.name);
            assert_eq!(g["eps"], 1e-6);
        }
    }
}
