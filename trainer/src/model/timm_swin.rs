//! The timm `SwinTransformer` trunk open_clip's `swin_base_patch4_window7_224` config names
//! (timm 1.0's `swin_transformer.py`, Liu et al. 2021), under `visual.trunk.`, with open_clip's
//! `TimmModel` head after it (`timm_head.rs`). Tokens stay on their (H, W) grid, channels last:
//!
//! - `patch_embed`: a 4x4 convolution of stride 4, then a LayerNorm;
//! - four stages (`layers`); each after the first starts with `downsample`, timm's
//!   `PatchMerging` (each 2x2 neighbourhood's channels concatenated, a LayerNorm, a linear map
//!   to twice the width without a bias);
//! - a block: LayerNorm, window attention, the shortcut; LayerNorm, MLP, the shortcut (both
//!   branches under stochastic depth). The attention runs inside 7x7 windows, with a learned
//!   bias per head and relative offset (`relative_position_bias_table`); every second block
//!   first rolls the grid by half a window, and its attention masks the pairs the roll brought
//!   together (timm's -100). A stage whose grid is no larger than the window uses the whole
//!   grid as its window and never shifts; a grid the window does not divide is padded with
//!   zeros after the norm, as timm does;
//! - the final `norm`, then timm's `ClassifierHead`: a global pooling of the grid and, when
//!   the trunk's classifier projects (`timm_proj: null`), `head.fc`.
//!
//! Every LayerNorm is PyTorch's (eps 1e-5). open_clip's config leaves `timm_drop_path` unset,
//! so the trunk trains with timm's default stochastic depth, 0.1 at the last block. There are
//! no patch tokens to drop (`model::patchless_tower`).

use tch::nn;
use tch::Tensor;

use super::config::VisionConfig;
use super::drop_path::{self, drop_path};
use super::params::{param, torch_conv_init};
use super::staged;
use super::timm_head::{drop_path_rate, MapPool, TimmHead, TimmProj};
use super::timm_vit::{fused_qkv_attention, timm_linear, Mlp, TIMM_WEIGHT};
use super::transformer::{Activation, LayerNorm, Linear};
use crate::error::{Result, TrainError};

/// One timm Swin definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwinArch {
    pub name: &'static str,
    /// The definition's input size, for which `window` is set.
    pub img_size: i64,
    pub patch: i64,
    pub window: i64,
    /// The first stage's width; each later stage doubles it.
    pub embed_dim: i64,
    pub depths: [i64; 4],
    pub heads: [i64; 4],
}

/// The Swin trunks of open_clip 3.3's configs.
pub const ARCHITECTURES: [SwinArch; 1] = [SwinArch {
    name: "swin_base_patch4_window7_224",
    img_size: 224,
    patch: 4,
    window: 7,
    embed_dim: 128,
    depths: [2, 2, 18, 2],
    heads: [4, 8, 16, 32],
}];

/// The architecture of a Swin timm name, if it is one.
pub fn architecture(name: &str) -> Option<SwinArch> {
    ARCHITECTURES.iter().find(|a| a.name == name).copied()
}

/// timm's `SwinTransformer(drop_path_rate=0.1)` default, which open_clip keeps when
/// `timm_drop_path` is unset.
pub const DEFAULT_DROP_PATH: f64 = 0.1;
/// PyTorch's `nn.LayerNorm` default, which timm's Swin uses throughout.
const EPS: f64 = 1e-5;
/// What timm adds to the logits of a pair the shift brought together.
const SHIFT_MASK: f64 = -100.0;

impl SwinArch {
    /// Stage `s`'s width.
    pub fn dim(&self, s: usize) -> i64 {
        self.embed_dim << s
    }

    /// The window for a first-stage grid of `grid`: the definition's at its own size, scaled
    /// with the grid otherwise, as timm's `set_input_size` (open_clip's `force_image_size`)
    /// keeps each stage's window-to-grid ratio.
    pub fn window_for(&self, grid: i64) -> i64 {
        (self.window * grid / (self.img_size / self.patch)).max(1)
    }
}

/// Each query-key pair's row in a `window` x `window` relative-position table
/// (timm's `get_relative_position_index`), flattened.
fn relative_position_index(window: i64) -> Vec<i64> {
    let n = window * window;
    let side = 2 * window - 1;
    let mut index = Vec::with_capacity((n * n) as usize);
    for q in 0..n {
        for k in 0..n {
            let (dh, dw) = (q / window - k / window, q % window - k % window);
            index.push((dh + window - 1) * side + dw + window - 1);
        }
    }
    index
}

/// timm's shifted-window mask over a `padded` x `padded` grid: (windows, N, N), 0 for a pair
/// in the same region before the roll, -100 otherwise. The regions along each axis are the
/// cells before the last window, the last window but its shifted tail, and the tail.
fn shift_mask(padded: i64, window: i64, shift: i64) -> Vec<f32> {
    let region = |i: i64| {
        if i < padded - window {
            0
        } else if i < padded - shift {
            1
        } else {
            2
        }
    };
    let per_side = padded / window;
    let n = window * window;
    let mut mask = Vec::with_capacity((per_side * per_side * n * n) as usize);
    for wh in 0..per_side {
        for ww in 0..per_side {
            let label =
                |t: i64| 3 * region(wh * window + t / window) + region(ww * window + t % window);
            for q in 0..n {
                for k in 0..n {
                    mask.push(if label(q) == label(k) { 0.0 } else { SHIFT_MASK as f32 });
                }
            }
        }
    }
    mask
}

/// timm's `WindowAttention`: fused `qkv` with a bias, a relative-position bias per head, `proj`.
#[derive(Debug)]
pub struct WindowAttention {
    pub qkv: Linear,
    pub proj: Linear,
    /// ((2w - 1)^2, heads)
    pub relative_position_bias_table: Tensor,
    /// (N * N,): non-persistent in timm.
    index: Tensor,
    heads: i64,
}

impl WindowAttention {
    fn new(p: nn::Path, dim: i64, heads: i64, window: i64) -> Self {
        let side = 2 * window - 1;
        WindowAttention {
            qkv: timm_linear(&p / "qkv", dim, 3 * dim),
            proj: timm_linear(&p / "proj", dim, dim),
            relative_position_bias_table: param(
                &p,
                "relative_position_bias_table",
                &[side * side, heads],
                TIMM_WEIGHT,
            ),
            index: Tensor::from_slice(&relative_position_index(window)).to_device(p.device()),
            heads,
        }
    }

    /// x: (B * windows, N, C); `mask`: (windows, N, N) for a shifted block.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let size = x.size();
        let (b, n) = (size[0], size[1]);
        let h = self.heads;
        // (1, heads, N, N)
        let bias = self
            .relative_position_bias_table
            .index_select(0, &self.index)
            .view([n, n, h])
            .permute([2, 0, 1])
            .unsqueeze(0);
        let bias = match mask {
            Some(mask) => {
                let windows = mask.size()[0];
                (mask.unsqueeze(1) + bias)
                    .unsqueeze(0)
                    .expand([b / windows, windows, h, n, n], false)
                    .reshape([b, h, n, n])
            }
            None => bias,
        };
        let qkv = self.qkv.forward(x);
        self.proj.forward(&fused_qkv_attention(&qkv, h, Some(&bias)))
    }
}

/// timm's `SwinTransformerBlock` at a fixed grid.
#[derive(Debug)]
pub struct SwinBlock {
    pub norm1: LayerNorm,
    pub attn: WindowAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    window: i64,
    shift: i64,
    /// (windows, N, N) when the block shifts.
    mask: Option<Tensor>,
    drop_path: f64,
}

impl SwinBlock {
    /// A block over a `grid` x `grid` map with windows of `target` (the whole grid when it is no
    /// larger), shifted by half a window when `shifted` (every second block) and the grid is
    /// larger than the window.
    fn new(
        p: nn::Path,
        dim: i64,
        heads: i64,
        target: i64,
        grid: i64,
        shifted: bool,
        rate: f64,
    ) -> Self {
        let window = target.min(grid);
        let shift = if shifted && grid > target { target / 2 } else { 0 };
        let padded = (grid + window - 1) / window * window;
        let mask = (shift > 0).then(|| {
            let n = window * window;
            let windows = (padded / window) * (padded / window);
            Tensor::from_slice(&shift_mask(padded, window, shift))
                .view([windows, n, n])
                .to_device(p.device())
        });
        SwinBlock {
            norm1: LayerNorm::new(&p / "norm1", dim, EPS),
            attn: WindowAttention::new(&p / "attn", dim, heads, window),
            norm2: LayerNorm::new(&p / "norm2", dim, EPS),
            mlp: Mlp::new(&p / "mlp", dim, 4 * dim, Activation::Gelu),
            window,
            shift,
            mask,
            drop_path: rate,
        }
    }

    /// (B, H, W, C) -> the same.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let size = x.size();
        let (b, h, w, c) = (size[0], size[1], size[2], size[3]);
        let (win, s) = (self.window, self.shift);
        let y = self.norm1.forward(x);
        let y = if s > 0 { y.roll([-s, -s], [1, 2]) } else { y };
        let (pad_h, pad_w) = ((win - h % win) % win, (win - w % win) % win);
        let y = y.constant_pad_nd([0, 0, 0, pad_w, 0, pad_h]);
        let (hp, wp) = (h + pad_h, w + pad_w);
        let windows = y
            .view([b, hp / win, win, wp / win, win, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([-1, win * win, c]);
        let mask = self.mask.as_ref().map(|m| m.to_kind(x.kind()));
        let y = self.attn.forward(&windows, mask.as_ref());
        let y = y
            .view([b, hp / win, wp / win, win, win, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([b, hp, wp, c])
            .narrow(1, 0, h)
            .narrow(2, 0, w);
        let y = if s > 0 { y.roll([s, s], [1, 2]) } else { y };
        let x = x + drop_path(&y, self.drop_path, train);
        &x + drop_path(&self.mlp.forward(&self.norm2.forward(&x)), self.drop_path, train)
    }
}

/// timm's `PatchMerging`: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C).
#[derive(Debug)]
pub struct PatchMerging {
    pub norm: LayerNorm,
    pub reduction_weight: Tensor,
}

impl PatchMerging {
    fn new(p: nn::Path, dim: i64, out: i64) -> Self {
        PatchMerging {
            norm: LayerNorm::new(&p / "norm", 4 * dim, EPS),
            reduction_weight: param(&(&p / "reduction"), "weight", &[out, 4 * dim], TIMM_WEIGHT),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, h, w, c) = (size[0], size[1], size[2], size[3]);
        let x = x.constant_pad_nd([0, 0, 0, w % 2, 0, h % 2]);
        let (h, w) = ((h + 1) / 2, (w + 1) / 2);
        // timm's order: the column offset, then the row offset, then the channel.
        let x = x.reshape([b, h, 2, w, 2, c]).permute([0, 1, 3, 4, 2, 5]).flatten(3, 5);
        self.norm.forward(&x).linear(&self.reduction_weight, None::<Tensor>)
    }
}

/// The Swin trunk and open_clip's head. Variables live under `p` (`visual.`).
#[derive(Debug)]
pub struct TimmSwin {
    pub arch: SwinArch,
    pub patch_weight: Tensor,
    pub patch_bias: Tensor,
    pub patch_norm: LayerNorm,
    /// Per stage: its downsample (none for the first) and its blocks.
    pub stages: Vec<(Option<PatchMerging>, Vec<SwinBlock>)>,
    pub norm: LayerNorm,
    pub pool: MapPool,
    pub head: TimmHead,
}

impl TimmSwin {
    /// The trunk `cfg.timm_model_name` names, for `cfg.image_size` (the windows follow the
    /// grid: [`SwinArch::window_for`]), pooled as [`MapPool::of`] says.
    pub fn new(p: nn::Path, cfg: &VisionConfig, embed_dim: i64) -> Result<Self> {
        let name = cfg.timm_model_name.as_deref().unwrap_or_default();
        let a = architecture(name).ok_or_else(|| {
            TrainError::ModelConfig(format!(
                "vision_cfg.timm_model_name {name:?} is not a Swin Transformer oxclip builds"
            ))
        })?;
        let pool = MapPool::of(cfg)?;
        let rates =
            drop_path::rates(drop_path_rate(cfg, DEFAULT_DROP_PATH)?, a.depths.iter().sum());
        if cfg.image_size < a.patch {
            return Err(TrainError::ModelConfig(format!(
                "vision_cfg.image_size {} is smaller than {name}'s patch ({})",
                cfg.image_size, a.patch
            )));
        }
        let t = &p / "trunk";
        let mut grid = cfg.image_size / a.patch;
        let window = a.window_for(grid);
        let mut rate = rates.iter();
        let stages = (0..4)
            .map(|s| {
                let sp = &t / "layers" / s;
                let dim = a.dim(s);
                let downsample = (s > 0).then(|| {
                    grid = (grid + 1) / 2;
                    PatchMerging::new(&sp / "downsample", a.dim(s - 1), dim)
                });
                let blocks = (0..a.depths[s])
                    .map(|i| {
                        let r = rate.next().copied().unwrap_or(0.0);
                        let bp = &sp / "blocks" / i;
                        SwinBlock::new(bp, dim, a.heads[s], window, grid, i % 2 == 1, r)
                    })
                    .collect();
                (downsample, blocks)
            })
            .collect();
        let width = a.dim(3);
        let pe = &t / "patch_embed";
        let conv = &pe / "proj";
        let init = torch_conv_init(3 * a.patch * a.patch);
        Ok(TimmSwin {
            arch: a,
            patch_weight: param(&conv, "weight", &[a.embed_dim, 3, a.patch, a.patch], init),
            patch_bias: param(&conv, "bias", &[a.embed_dim], init),
            patch_norm: LayerNorm::new(&pe / "norm", a.embed_dim, EPS),
            stages,
            norm: LayerNorm::new(&t / "norm", width, EPS),
            pool,
            head: TimmHead::new(&p, cfg, width, embed_dim, |out| {
                timm_linear(&t / "head" / "fc", width, out)
            })?,
        })
    }

    /// Whether training draws random numbers before the head (stochastic depth).
    pub fn draws_in_stages(&self) -> bool {
        self.blocks().any(|b| b.drop_path > 0.0)
    }

    fn blocks(&self) -> impl Iterator<Item = &SwinBlock> {
        self.stages.iter().flat_map(|(_, blocks)| blocks)
    }

    /// images: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised.
    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        staged::fold(self.stage_count(), images, |i, x| self.stage(i, x, train))
    }

    /// The patch embedding, each block (a stage's downsample runs with its first block, as
    /// timm's groups have it), the head (model/staged.rs).
    pub fn stage_count(&self) -> usize {
        self.blocks().count() + 2
    }

    /// Stage `i` on its input: images for the first, (B, H, W, C) grids after it.
    pub fn stage(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        if i == 0 {
            let p = [self.arch.patch, self.arch.patch];
            let x = x.conv2d(&self.patch_weight, Some(&self.patch_bias), p, [0, 0], [1, 1], 1);
            return self.patch_norm.forward(&x.permute([0, 2, 3, 1]));
        }
        if let Some((downsample, block)) = staged::nth_block(&self.stages, i - 1) {
            let x = match downsample {
                Some(d) => d.forward(x),
                None => x.shallow_clone(),
            };
            return block.forward(&x, train);
        }
        // timm's `norm`, then `ClassifierHead`'s pooling over (H, W); then open_clip's head.
        let pooled = self.pool.reduce(&self.norm.forward(x), [1, 2]);
        self.head.forward(&pooled, train)
    }
}

/// open_clip's `TimmModel.lock` groups for the Swin `cfg` names, as timm's `group_matcher` and
/// `group_parameters` order them: {patch_embed}, each block (a stage's downsample with its
/// first block; `norm` with the last, timm's MATCH_PREV_GROUP), then the unmatched classifier
/// when the trunk's projects. Empty for another trunk.
pub fn lock_groups(cfg: &VisionConfig) -> Vec<Vec<String>> {
    let Some(a) = architecture(cfg.timm_model_name.as_deref().unwrap_or_default()) else {
        return Vec::new();
    };
    let t = "visual.trunk";
    let mut out = vec![vec![format!("{t}.patch_embed")]];
    let downsample = |s: usize| if s > 0 { vec!["downsample"] } else { vec![] };
    out.extend(staged::per_block_groups(&format!("{t}.layers"), &a.depths, downsample));
    if let Some(last) = out.last_mut() {
        last.push(format!("{t}.norm"));
    }
    if TimmProj::of(cfg).is_ok_and(|p| p == TimmProj::Classifier) {
        out.push(vec![format!("{t}.head")]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params;

    /// timm's index for a 2x2 window: offsets (dh, dw) in -1..=1 at rows (dh+1)*3 + dw+1.
    #[test]
    fn relative_index_is_timms() {
        assert_eq!(relative_position_index(2), [4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]);
    }

    /// A 4x4 grid, windows of 2, shift 1: the first window holds one region; the last holds
    /// four (the cells wrapped from each edge), each token seeing only its own.
    #[test]
    fn the_shift_mask_separates_wrapped_regions() {
        let mask = shift_mask(4, 2, 1);
        assert_eq!(mask.len(), 4 * 16);
        assert!(mask[..16].iter().all(|&v| v == 0.0));
        let last = &mask[48..];
        for q in 0..4 {
            for k in 0..4 {
                let want = if q == k { 0.0 } else { SHIFT_MASK as f32 };
                assert_eq!(last[q * 4 + k], want, "pair ({q}, {k})");
            }
        }
    }

    fn swin(pool: &str, proj: &str, drop_path: Option<f64>) -> VisionConfig {
        serde_json::from_value(serde_json::json!({
            "timm_model_name": "swin_base_patch4_window7_224", "timm_pool": pool, "timm_proj": proj,
            "timm_drop_path": drop_path, "image_size": 224
        }))
        .unwrap()
    }

    #[test]
    fn unbuilt_options_are_clear_errors() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let err =
            |c: &VisionConfig, dim: i64| TimmSwin::new(vs.root(), c, dim).unwrap_err().to_string();
        let e = err(&swin("token", "linear", None), 640);
        assert!(e.contains("\"token\"") && e.contains("\"avg\""), "{e}");
        let e = err(&swin("", "none", None), 1024);
        assert!(e.contains("unpooled"), "{e}");
        let e = err(&swin("", "linear", Some(1.0)), 640);
        assert!(e.contains("timm_drop_path"), "{e}");
    }

    /// Unset, timm_drop_path is timm's Swin default; the head projects the last stage's width.
    #[test]
    fn defaults_follow_timm_and_open_clip() {
        let cfg = swin("", "linear", None);
        let shapes = params::shapes_of(|p| TimmSwin::new(p / "visual", &cfg, 640).map(|_| ()));
        assert!(shapes.iter().any(|(n, s)| n == "visual.head.proj.weight" && s == &[640, 1024]));
        // 7x7 windows: a table of 13 x 13 offsets per head; the last stage's 7x7 grid is one
        // window, so nothing there shifts.
        assert!(shapes
            .iter()
            .any(|(n, s)| n == "visual.trunk.layers.0.blocks.1.attn.relative_position_bias_table"
                && s == &[169, 4]));
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let t = TimmSwin::new(vs.root() / "visual", &cfg, 640).unwrap();
        let shifts: Vec<i64> = t.blocks().map(|b| b.shift).collect();
        assert_eq!(&shifts[..6], &[0, 3, 0, 3, 0, 3]);
        assert_eq!(&shifts[22..], &[0, 0]);
        let rates: Vec<f64> = t.blocks().map(|b| b.drop_path).collect();
        assert_eq!(rates.last().copied(), Some(f64::from(0.1f32)));
        // At 72 px the 18-cell grid takes windows of 7 * 18 / 56 = 2.
        let mut small = swin("", "linear", None);
        small.image_size = 72;
        let t = TimmSwin::new(vs.root() / "small", &small, 640).unwrap();
        let windows: Vec<i64> = t.blocks().map(|b| b.window).collect();
        assert!(windows.iter().all(|&w| w == 2), "{windows:?}");
    }
}
