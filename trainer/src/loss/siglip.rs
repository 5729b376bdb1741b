//! The sigmoid loss (SigLIP, Zhai et al. 2023; open_clip `loss.py::SigLipLoss`): every
//! image-caption pair is its own binary classification, positive on the diagonal.
//!
//! With a_ij = s I_i.T_j + b (s = exp(logit_scale), b = logit_bias), z_ij = 1 if i = j else -1,
//! and the owned image rows o:
//!
//!   L_o = 1/N * sum_{i in o} sum_j softplus(-z_ij a_ij)        (softplus(-x) = -log sigmoid(x))
//!
//! open_clip divides each rank's sum by its local batch n and DDP averages the W ranks'
//! gradients: the same 1/N overall, so the sum of the L_o over ranks is the loss it optimises.
//! With G = (sigmoid(a) - E) / N, E the one-hot of the positive pairs:
//!
//!   dL/dI_o = s G T        dL/dT = s G^T I_o
//!   dL/dlogit_scale = sum(G * (a - b))        dL/dlogit_bias = sum(G)
//!
//! No normaliser couples a row's pairs, so [`siglip_loss`] needs one pass over the tiles, not
//! CLIP's two. [`siglip_loss_naive`] is the oracle: the n x N block and autograd.

use std::ops::Range;

use tch::{Kind, Tensor};

use super::{effective_tile, positives, positives_mask, tiles, LossOutput, Matmul};

/// `image`, `text`: (N, d) gathered features; `logit_scale`, `logit_bias`: 0-dim; `rows`: the
/// owned image rows; `tile`: rows and columns per tile (0: automatic). fp32 arithmetic (the
/// products at `matmul`'s precision), fp64 scalar sums; extra memory O(tile^2).
pub fn siglip_loss(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    rows: Range<i64>,
    tile: i64,
    matmul: Matmul,
) -> LossOutput {
    let _no_grad = tch::no_grad_guard();
    let image = image.to_kind(Kind::Float);
    let text = text.to_kind(Kind::Float);
    let device = image.device();
    let (global, dim) = (image.size()[0], image.size()[1]);
    let tile = effective_tile(tile, global);
    let scale = logit_scale.to_kind(Kind::Float).exp();
    let bias = logit_bias.to_kind(Kind::Float);
    let norm = 1.0 / global as f64;
    let text_mm = matmul.input(&text);

    // The 1/N of G rides on the sums and (n, d) products, not on each tile. fp64 totals of
    // fp32 row sums (a tile wide).
    let total =
        |t: &Tensor| t.sum_dim_intlist([1i64].as_slice(), false, Kind::Float).sum(Kind::Double);
    let zero = || Tensor::zeros([], (Kind::Double, device));
    let (mut loss, mut sum_g, mut sum_g_dots) = (zero(), zero(), zero());
    let grad_image = Tensor::zeros([global, dim], (Kind::Float, device));
    let grad_text = Tensor::zeros([global, dim], (Kind::Float, device));
    for r in tiles(rows, tile) {
        let own = image.narrow(0, r.start, r.end - r.start);
        // s folded into the (n, d) rows: the products come out as s I.T.
        let own_scaled = matmul.input(&(&own * &scale));
        let mut grad_own = Tensor::zeros_like(&own);
        for c in tiles(0..global, tile) {
            let others = text_mm.narrow(0, c.start, c.end - c.start);
            let mut logits = matmul.nt(&own_scaled, &others).g_add_(&bias);
            // softplus(-z a): softplus(a) for the negatives, softplus(a) - a for the positives.
            loss += total(&logits.softplus()) - positives(&logits, &r, &c).sum(Kind::Double);
            let g = logits.sigmoid();
            let _ = positives(&g, &r, &c).g_sub_scalar_(1.0);
            sum_g += total(&g);
            // dL/dlogit_scale = sum(G * s I.T): the bias taken off the logits in place rather
            // than sum(G * a) - b sum(G), whose terms cancel to a few digits at b = -10.
            let scaled_dots = logits.g_sub_(&bias);
            sum_g_dots += total(&(&g * &scaled_dots));
            let g = matmul.input(&g);
            grad_own += matmul.mm(&g, &others);
            let _ = grad_text
                .narrow(0, c.start, c.end - c.start)
                .g_add_(&(matmul.mm(&g.tr(), &own_scaled) * norm));
        }
        let _ = grad_image.narrow(0, r.start, r.end - r.start).g_add_(&(grad_own * &scale * norm));
    }
    LossOutput {
        loss: (loss * norm).to_kind(Kind::Float),
        grad_image,
        grad_text,
        grad_logit_scale: (sum_g_dots * norm).to_kind(Kind::Float),
        grad_logit_bias: Some((sum_g * norm).to_kind(Kind::Float)),
    }
}

/// The same loss with the n x N block built at once and its gradients from autograd: the oracle
/// the tiled version is tested against (`loss.tiling: naive`), independent of the formulas above.
pub fn siglip_loss_naive(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    rows: Range<i64>,
) -> LossOutput {
    tch::with_grad(|| {
        let leaf = |t: &Tensor| t.detach().to_kind(Kind::Float).set_requires_grad(true);
        let (image, text, logit_scale, logit_bias) =
            (leaf(image), leaf(text), leaf(logit_scale), leaf(logit_bias));
        let global = image.size()[0];
        let own = image.narrow(0, rows.start, rows.end - rows.start);
        let logits = own.matmul(&text.tr()) * logit_scale.exp() + &logit_bias;
        let signs = positives_mask(rows, 0..global, image.device()) * 2.0 - 1.0;
        // open_clip: -F.logsigmoid(labels * logits).sum() / n per rank, averaged over ranks.
        let loss = -(signs * logits).log_sigmoid().sum(Kind::Float) / global as f64;
        loss.backward();
        LossOutput {
            loss: loss.detach(),
            grad_image: image.grad(),
            grad_text: text.grad(),
            grad_logit_scale: logit_scale.grad(),
            grad_logit_bias: Some(logit_bias.grad()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::loss::{SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT};
    use crate::loss::assert_close;
    use tch::Device;

    fn features(n: i64, d: i64, seed: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let image = crate::model::normalize(&Tensor::randn([n, d], (Kind::Float, Device::Cpu)));
        // Captions correlated with their images, so positives and negatives both matter.
        let text = crate::model::normalize(
            &(&image + Tensor::randn([n, d], (Kind::Float, Device::Cpu)) * 0.7),
        );
        (image, text)
    }

    /// The value open_clip's `SigLipLoss` gives for these features, written out: a fixed
    /// 3 x 3 case small enough to check by hand.
    #[test]
    fn matches_the_definition_on_a_small_case() {
        let image = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 0.6, 0.8]).view([3, 2]);
        let text = Tensor::from_slice(&[0.8f32, 0.6, 0.0, 1.0, 1.0, 0.0]).view([3, 2]);
        let (s, b) = (2.0f64, -1.0f64);
        let mut expected = 0.0;
        for i in 0..3 {
            for j in 0..3 {
                let dot = image.get(i).dot(&text.get(j)).double_value(&[]);
                let z = if i == j { 1.0 } else { -1.0 };
                expected += (1.0 + (-z * (s * dot + b)).exp()).ln();
            }
        }
        expected /= 3.0;
        let out = siglip_loss(
            &image,
            &text,
            &Tensor::from(s.ln() as f32),
            &Tensor::from(b as f32),
            0..3,
            2,
            Matmul::Fp32,
        );
        assert!(
            (out.loss.double_value(&[]) - expected).abs() < 1e-6,
            "{} vs {expected}",
            out.loss.double_value(&[])
        );
    }

    /// Tiled against the autograd oracle for N up to 4096: tiles that divide N, do not, are one
    /// column or all of it; owned rows at the start, middle and end.
    #[test]
    fn tiled_equals_naive() {
        let (ls, lb) = (
            Tensor::from(SIGLIP_LOGIT_SCALE_INIT as f32),
            Tensor::from(SIGLIP_LOGIT_BIAS_INIT as f32),
        );
        for (n_all, d, tiles) in [
            (64, 8, vec![1, 7, 16, 64, 0]),
            (257, 16, vec![7, 100, 257, 0]),
            (4096, 32, vec![1000, 0]),
        ] {
            let (image, text) = features(n_all, d, 5);
            for rows in [0..n_all, 0..16, 20..52, n_all - 9..n_all] {
                let naive = siglip_loss_naive(&image, &text, &ls, &lb, rows.clone());
                for &tile in &tiles {
                    let tiled =
                        siglip_loss(&image, &text, &ls, &lb, rows.clone(), tile, Matmul::Fp32);
                    assert_close(
                        &format!("N {n_all} rows {rows:?} tile {tile}"),
                        &tiled,
                        &naive,
                        1e-5,
                    );
                }
            }
        }
    }

    #[test]
    fn row_blocks_sum_to_the_whole() {
        let (image, text) = features(12, 6, 1);
        let (ls, lb) = (Tensor::from(1.2f32), Tensor::from(-2.0f32));
        let whole = siglip_loss(&image, &text, &ls, &lb, 0..12, 0, Matmul::Fp32);
        let parts: Vec<LossOutput> = [0..5, 5..12]
            .into_iter()
            .map(|r| siglip_loss(&image, &text, &ls, &lb, r, 4, Matmul::Fp32))
            .collect();
        let sum = LossOutput {
            loss: &parts[0].loss + &parts[1].loss,
            grad_image: &parts[0].grad_image + &parts[1].grad_image,
            grad_text: &parts[0].grad_text + &parts[1].grad_text,
            grad_logit_scale: &parts[0].grad_logit_scale + &parts[1].grad_logit_scale,
            grad_logit_bias: Some(
                parts[0].grad_logit_bias.as_ref().unwrap()
                    + parts[1].grad_logit_bias.as_ref().unwrap(),
            ),
        };
        assert_close("two ranks", &sum, &whole, 1e-6);
    }

    /// bf16 products, fp32 everything else: within bf16's rounding of the fp32 result.
    #[test]
    fn bf16_products_stay_close_to_fp32() {
        let (image, text) = features(300, 64, 3);
        let (ls, lb) = (
            Tensor::from(SIGLIP_LOGIT_SCALE_INIT as f32),
            Tensor::from(SIGLIP_LOGIT_BIAS_INIT as f32),
        );
        let fp32 = siglip_loss(&image, &text, &ls, &lb, 0..300, 128, Matmul::Fp32);
        let bf16 = siglip_loss(&image, &text, &ls, &lb, 0..300, 128, Matmul::Bf16);
        crate::loss::assert_bf16_close(&bf16, &fp32);
    }
}
