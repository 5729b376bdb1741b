//! Contrastive losses as plain functions of gathered features: each returns this rank's part of
//! the loss and the gradients for the features and the temperature (and bias), with no autograd
//! graph, so the step can exchange and back-propagate them explicitly (docs/training.md, "The step").
//!
//! [`clip`] is the softmax loss of CLIP, [`siglip`] the pairwise sigmoid loss of SigLIP. Both
//! are tiled by default (memory O(tile^2) beyond the features, whatever the batch); each keeps
//! a naive version that builds the whole n x N block, the oracle the tiled one is tested against.

pub mod clip;
pub mod siglip;

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::config::{LossConfig, LossKind, Tiling};
use crate::error::{Result, TrainError};

/// One rank's share of a contrastive loss over the global batch, and its gradients.
#[derive(Debug)]
pub struct LossOutput {
    /// This rank's part; the global loss is the sum over ranks. 0-dim, fp32.
    pub loss: Tensor,
    /// d loss / d image features: (N, d), non-zero beyond the owned rows.
    pub grad_image: Tensor,
    /// d loss / d text features: (N, d).
    pub grad_text: Tensor,
    /// d loss / d logit_scale (the log of the scale). 0-dim.
    pub grad_logit_scale: Tensor,
    /// d loss / d logit_bias, for losses that have a bias (SigLIP). 0-dim.
    pub grad_logit_bias: Option<Tensor>,
}

impl LossOutput {
    /// The loss and every gradient times `w`.
    fn weighted(self, w: f64) -> LossOutput {
        LossOutput {
            loss: self.loss * w,
            grad_image: self.grad_image * w,
            grad_text: self.grad_text * w,
            grad_logit_scale: self.grad_logit_scale * w,
            grad_logit_bias: self.grad_logit_bias.map(|g| g * w),
        }
    }
}

/// Which loss a run optimises and how it is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSpec {
    pub kind: LossKind,
    pub tiling: Tiling,
    /// Precision of the similarity and gradient products of the tiled loss.
    pub matmul: Matmul,
    /// CoCa's weights (`loss.kind: coca`); `None` for a contrastive loss alone.
    pub coca: Option<CocaWeights>,
}

/// How CoCa weighs its two losses (open_clip's `CoCaLoss`): the total is
/// `contrastive * clip loss + caption * caption loss`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CocaWeights {
    pub contrastive: f64,
    pub caption: f64,
}

impl LossSpec {
    /// The loss `loss:` asks for; its products in bf16 when `bf16_matmul` (amp_bf16 on CUDA).
    pub fn new(loss: &LossConfig, bf16_matmul: bool) -> Self {
        LossSpec {
            kind: loss.kind,
            tiling: loss.tiling,
            matmul: if bf16_matmul { Matmul::Bf16 } else { Matmul::Fp32 },
            coca: (loss.kind == LossKind::Coca).then_some(CocaWeights {
                contrastive: loss.coca_contrastive_loss_weight,
                caption: loss.coca_caption_loss_weight,
            }),
        }
    }

    /// The tile side; `None` for the naive blocks.
    fn tile(&self) -> Option<i64> {
        match self.tiling {
            Tiling::Auto => Some(clip::AUTO_TILE),
            Tiling::Tile(side) => Some(side as i64),
            Tiling::Naive => None,
        }
    }

    /// This rank's part of the loss for the owned `rows` of the gathered (N, d) features.
    /// `logit_bias` is the model's bias, required by SigLIP and ignored by CLIP.
    pub fn compute(
        &self,
        image: &Tensor,
        text: &Tensor,
        logit_scale: &Tensor,
        logit_bias: Option<&Tensor>,
        rows: Range<i64>,
    ) -> Result<LossOutput> {
        Ok(match self.kind {
            LossKind::Clip => match self.tile() {
                Some(tile) => clip::clip_loss(image, text, logit_scale, rows, tile, self.matmul),
                None => clip::clip_loss_naive(image, text, logit_scale, rows),
            },
            LossKind::Coca => {
                let clip = LossSpec { kind: LossKind::Clip, coca: None, ..*self };
                let out = clip.compute(image, text, logit_scale, logit_bias, rows)?;
                match self.coca.map(|w| w.contrastive).filter(|&w| w != 1.0) {
                    Some(w) => out.weighted(w),
                    None => out,
                }
            }
            LossKind::Siglip => {
                let bias = logit_bias.ok_or_else(|| {
                    TrainError::Config(
                        "loss.kind siglip needs a model with a logit_bias (model.init_logit_bias)"
                            .into(),
                    )
                })?;
                match self.tile() {
                    Some(tile) => {
                        siglip::siglip_loss(image, text, logit_scale, bias, rows, tile, self.matmul)
                    }
                    None => siglip::siglip_loss_naive(image, text, logit_scale, bias, rows),
                }
            }
        })
    }
}

/// The precision of the loss's matrix products. Log-sum-exps, sigmoids and every
/// accumulation stay fp32 (scalars fp64) either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Matmul {
    #[default]
    Fp32,
    /// bf16 inputs, as autocast runs open_clip's logits on CUDA. On CUDA the GEMM writes fp32
    /// (`mm(..., out_dtype=float32)`), so only the inputs are rounded; elsewhere the bf16
    /// product is widened.
    Bf16,
}

impl Matmul {
    /// `t` in the products' input precision. Converting once, before a loop of products,
    /// saves one conversion per product; `mm` leaves converted inputs as they are.
    pub fn input(self, t: &Tensor) -> Tensor {
        match self {
            Matmul::Fp32 => t.to_kind(Kind::Float),
            Matmul::Bf16 => t.to_kind(Kind::BFloat16),
        }
    }

    /// `a @ b` as fp32.
    pub fn mm(self, a: &Tensor, b: &Tensor) -> Tensor {
        match self {
            Matmul::Fp32 => a.matmul(b),
            Matmul::Bf16 => {
                let (a, b) = (a.to_kind(Kind::BFloat16), b.to_kind(Kind::BFloat16));
                if a.device().is_cuda() {
                    if let Ok(product) = a.f_mm_dtype(&b, Kind::Float) {
                        return product;
                    }
                }
                a.mm(&b).to_kind(Kind::Float)
            }
        }
    }

    /// `a @ b^T` as fp32: rows of `a` against rows of `b`.
    pub fn nt(self, a: &Tensor, b: &Tensor) -> Tensor {
        self.mm(a, &b.tr())
    }
}

/// (rows x columns) one-hot of the positive pairs: 1 where the global row index equals the
/// global column index.
fn positives_mask(rows: Range<i64>, columns: Range<i64>, device: tch::Device) -> Tensor {
    let r = Tensor::arange_start(rows.start, rows.end, (Kind::Int64, device)).unsqueeze(1);
    let c = Tensor::arange_start(columns.start, columns.end, (Kind::Int64, device)).unsqueeze(0);
    c.eq_tensor(&r).to_kind(Kind::Float)
}

/// The positive pairs of the (rows x columns) tile `block`, as a view: global row i meets
/// global column i on the diagonal at offset `rows.start - columns.start` (empty when the
/// tile holds none). Touching only these entries saves a tile-sized one-hot per tile.
fn positives(block: &Tensor, rows: &Range<i64>, columns: &Range<i64>) -> Tensor {
    block.diagonal(rows.start - columns.start, 0, 1)
}

/// `[start, end)` split into consecutive pieces of at most `tile`.
fn tiles(range: Range<i64>, tile: i64) -> impl Iterator<Item = Range<i64>> {
    let tile = tile.max(1);
    (range.start..range.end).step_by(tile as usize).map(move |s| s..(s + tile).min(range.end))
}

/// The tile side actually used for `tile` (0: automatic) over `global` columns.
pub fn effective_tile(tile: i64, global: i64) -> i64 {
    if tile <= 0 { clip::AUTO_TILE } else { tile }.min(global.max(1))
}

/// Test helper: `a` and `b` agree in the loss and every gradient, each within `tolerance` of
/// `b`'s largest magnitude.
#[cfg(test)]
pub(crate) fn assert_close(what: &str, a: &LossOutput, b: &LossOutput, tolerance: f64) {
    for (name, rel) in relative_errors(what, a, b) {
        assert!(rel <= tolerance, "{what}: {name} differs by {rel}");
    }
}

/// bf16 products against fp32 ones, each output held to its own bound. The loss averages its
/// N^2 terms' roundings away: measured 6e-6 (CLIP) and 9e-6 (SigLIP) relative at N = 300,
/// held at 3e-5 (at N = 16,384 it is under 1e-6, docs/benchmarks.md). Each feature gradient
/// is one row's sum of bf16 products, within about bf16's 2^-8 of the largest: measured 4e-3
/// and 6e-3, held at 1e-2. The temperature's and bias's gradients are sums over every pair:
/// measured 5e-5, held at 2e-4.
#[cfg(test)]
pub(crate) fn assert_bf16_close(bf16: &LossOutput, fp32: &LossOutput) {
    for (name, rel) in relative_errors("bf16", bf16, fp32) {
        let bound = match name {
            "loss" => 3e-5,
            "grad_image" | "grad_text" => 1e-2,
            _ => 2e-4,
        };
        assert!(rel <= bound, "bf16 products: {name} differs from fp32 by {rel} (bound {bound})");
    }
}

/// Per output (the loss, each gradient): `max |a - b| / max |b|`.
#[cfg(test)]
pub(crate) fn relative_errors(
    what: &str,
    a: &LossOutput,
    b: &LossOutput,
) -> Vec<(&'static str, f64)> {
    let max_rel = |x: &Tensor, y: &Tensor| {
        let (x, y) = (x.to_kind(Kind::Double), y.to_kind(Kind::Double));
        (&x - &y).abs().max().double_value(&[]) / y.abs().max().double_value(&[]).max(1e-12)
    };
    let mut pairs = vec![
        ("loss", &a.loss, &b.loss),
        ("grad_image", &a.grad_image, &b.grad_image),
        ("grad_text", &a.grad_text, &b.grad_text),
        ("grad_logit_scale", &a.grad_logit_scale, &b.grad_logit_scale),
    ];
    assert_eq!(
        a.grad_logit_bias.is_some(),
        b.grad_logit_bias.is_some(),
        "{what}: one has a bias gradient, the other not"
    );
    if let (Some(x), Some(y)) = (&a.grad_logit_bias, &b.grad_logit_bias) {
        pairs.push(("grad_logit_bias", x, y));
    }
    pairs.into_iter().map(|(name, x, y)| (name, max_rel(x, y))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The diagonal view marks exactly the entries the one-hot marks, for tiles above, on,
    /// below and away from the global diagonal, and writes through to the tile.
    #[test]
    fn positives_view_matches_the_one_hot() {
        for (rows, columns) in
            [(4..8, 6..9), (6..9, 4..8), (0..5, 0..5), (0..3, 5..9), (5..9, 0..3)]
        {
            let block = Tensor::zeros(
                [rows.end - rows.start, columns.end - columns.start],
                (Kind::Float, tch::Device::Cpu),
            );
            let _ = positives(&block, &rows, &columns).g_add_scalar_(1.0);
            let expected = positives_mask(rows.clone(), columns.clone(), tch::Device::Cpu);
            assert!(block.equal(&expected), "rows {rows:?}, columns {columns:?}");
        }
    }
}
