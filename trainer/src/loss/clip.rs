//! The CLIP loss (Radford et al. 2021; open_clip `loss.py::ClipLoss`), symmetric cross-entropy
//! over the scaled image-text similarities, computed for the rows a rank owns.
//!
//! With image features I and text features T (N x d, L2-normalised), s = exp(logit_scale) and
//! the owned rows o:
//!
//!   L_o = 1/(2N) * sum_{i in o} [ lse_j(s I_i.T_j) - s I_i.T_i + lse_j(s T_i.I_j) - s T_i.I_i ]
//!
//! Summed over a partition of the rows this is open_clip's `(CE(logits, y) + CE(logits.T, y)) / 2`.
//! With P = softmax of the image rows' logits and Q that of the text rows', E the one-hot labels:
//!
//!   dL/dI_o += s (P - E) T / 2N        dL/dT += s (P - E)^T I_o / 2N
//!   dL/dT_o += s (Q - E) I / 2N        dL/dI += s (Q - E)^T T_o / 2N
//!   dL/dlogit_scale = sum((P - E) * logits_I + (Q - E) * logits_T) / 2N
//!
//! [`clip_loss`] computes all of this tile by tile over the columns (Inf-CL's idea): a first
//! pass merges each row's log-sum-exp over the tiles (logaddexp of the tiles' own), a second
//! pass forms `softmax - onehot` one tile at a time and accumulates the gradients. Extra
//! memory is O(tile^2) (rows are taken a tile at a time as well) instead of O(n x N).
//! [`clip_loss_naive`] builds the two n x N blocks at once; it is the test oracle
//! (`loss.tiling: naive`).

use std::ops::Range;

use tch::{Kind, Tensor};

use super::{effective_tile, positives, tiles, LossOutput, Matmul};

/// Tile side for `loss.tiling: auto`: a 4096 x 4096 fp32 block is 64 MB.
pub const AUTO_TILE: i64 = 4096;

/// `image`, `text`: (N, d) gathered features; `logit_scale`: 0-dim; `rows`: the owned rows;
/// `tile`: rows and columns per tile (0: [`AUTO_TILE`]). Computes in fp32 whatever the
/// features' precision (the products at `matmul`'s). Equal to [`clip_loss_naive`] up to
/// rounding. The owned rows are taken `tile` at a time too (the loss is a sum over rows), so
/// the extra memory is O(tile^2) on top of the O(N d) features and gradients, whatever the batch.
pub fn clip_loss(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    rows: Range<i64>,
    tile: i64,
    matmul: Matmul,
) -> LossOutput {
    let _no_grad = tch::no_grad_guard();
    let image = image.to_kind(Kind::Float);
    let text = text.to_kind(Kind::Float);
    let device = image.device();
    let global = image.size()[0];
    let tile = effective_tile(tile, global);
    // The two scalars sum thousands of tile partials whose terms largely cancel: fp64.
    let mut acc = LossOutput {
        loss: Tensor::zeros([], (Kind::Double, device)),
        grad_image: Tensor::zeros([global, image.size()[1]], (Kind::Float, device)),
        grad_text: Tensor::zeros([global, image.size()[1]], (Kind::Float, device)),
        grad_logit_scale: Tensor::zeros([], (Kind::Double, device)),
        grad_logit_bias: None,
    };
    let features = Features {
        image: &image,
        text: &text,
        image_mm: matmul.input(&image),
        text_mm: matmul.input(&text),
    };
    let scale = logit_scale.to_kind(Kind::Float).exp();
    for block in tiles(rows, tile) {
        add_row_block(&features, &scale, block, tile, matmul, &mut acc);
    }
    acc.loss = acc.loss.to_kind(Kind::Float);
    acc.grad_logit_scale = acc.grad_logit_scale.to_kind(Kind::Float);
    acc
}

/// The gathered features, fp32 and in the products' precision (converted once per call).
struct Features<'a> {
    image: &'a Tensor,
    text: &'a Tensor,
    image_mm: Tensor,
    text_mm: Tensor,
}

/// Adds the loss and gradients of the owned rows `rows` to `acc`, a tile of columns at a time.
/// The tile-sized work is what costs (N^2 elements against N d for the rest), so each tile
/// gets one product and as few element-wise passes as the math allows.
fn add_row_block(
    f: &Features,
    scale: &Tensor,
    rows: Range<i64>,
    tile: i64,
    matmul: Matmul,
    acc: &mut LossOutput,
) {
    let global = f.image.size()[0];
    let n = rows.end - rows.start;
    let norm = 1.0 / (2 * global) as f64;
    let columns: Vec<Range<i64>> = tiles(0..global, tile).collect();
    let image_own = f.image.narrow(0, rows.start, n);
    let text_own = f.text.narrow(0, rows.start, n);
    // s folded into the (n, d) rows: the products come out as logits.
    let image_scaled = matmul.input(&(&image_own * scale));
    let text_scaled = matmul.input(&(&text_own * scale));
    let directions = [(&image_scaled, &f.text_mm), (&text_scaled, &f.image_mm)];
    let tile_of = |t: &Tensor, c: &Range<i64>| t.narrow(0, c.start, c.end - c.start);

    // Pass 1: each owned row's log-sum-exp over all columns, merged tile by tile.
    let lse: Vec<Tensor> = directions
        .iter()
        .map(|(own, others)| {
            let first = Tensor::full([n], f64::NEG_INFINITY, (Kind::Float, f.image.device()));
            columns.iter().fold(first, |lse, c| {
                lse.logaddexp(&matmul.nt(own, &tile_of(others, c)).logsumexp([1], false))
            })
        })
        .collect();
    let positives_sum = (&image_own * &text_own).sum(Kind::Double) * scale.to_kind(Kind::Double);
    acc.loss += (lse[0].sum(Kind::Double) + lse[1].sum(Kind::Double) - positives_sum * 2.0) * norm;

    // Pass 2: D = (softmax - onehot) / 2N a tile at a time, into the feature and scale
    // gradients: image rows against each tile of captions, then caption rows against images.
    // exp(logit - lse) / 2N is exp(logit - (lse - ln 2N)): the normaliser rides in the shift.
    let shifts: Vec<Tensor> = lse.iter().map(|l| (l - norm.ln()).unsqueeze(1)).collect();
    let mut grad_own = [Tensor::zeros_like(&image_own), Tensor::zeros_like(&text_own)];
    let grad_others = [acc.grad_text.shallow_clone(), acc.grad_image.shallow_clone()];
    for c in &columns {
        for (k, (own_scaled, others)) in directions.iter().enumerate() {
            let others = tile_of(others, c);
            let logits = matmul.nt(own_scaled, &others);
            let d = (&logits - &shifts[k]).exp_();
            let _ = positives(&d, &rows, c).g_sub_scalar_(norm);
            // Row sums in fp32 (a tile wide), the total in fp64.
            acc.grad_logit_scale += (&d * &logits)
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                .sum(Kind::Double);
            let d = matmul.input(&d);
            grad_own[k] += matmul.mm(&d, &others) * scale;
            let _ = tile_of(&grad_others[k], c).g_add_(&matmul.mm(&d.tr(), own_scaled));
        }
    }
    let [grad_own_image, grad_own_text] = grad_own;
    let _ = acc.grad_image.narrow(0, rows.start, n).g_add_(&grad_own_image);
    let _ = acc.grad_text.narrow(0, rows.start, n).g_add_(&grad_own_text);
}

/// The same loss and gradients with the two n x N blocks built at once: the oracle the tiled
/// version is tested against (`loss.tiling: naive`).
pub fn clip_loss_naive(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    rows: Range<i64>,
) -> LossOutput {
    let _no_grad = tch::no_grad_guard();
    let image = image.to_kind(Kind::Float);
    let text = text.to_kind(Kind::Float);
    let scale = logit_scale.to_kind(Kind::Float).exp();
    let global = image.size()[0];
    let n = rows.end - rows.start;
    let norm = 1.0 / (2 * global) as f64;

    let image_own = image.narrow(0, rows.start, n);
    let text_own = text.narrow(0, rows.start, n);
    // (n, N): image rows against every caption, caption rows against every image.
    let logits_image = image_own.matmul(&text.tr()) * &scale;
    let logits_text = text_own.matmul(&image.tr()) * &scale;

    let positives =
        (&image_own * &text_own).sum_dim_intlist([1i64].as_slice(), false, Kind::Float) * &scale;
    let loss = (logits_image.logsumexp([1], false).sum(Kind::Float)
        + logits_text.logsumexp([1], false).sum(Kind::Float)
        - positives.sum(Kind::Float) * 2.0)
        * norm;

    // (softmax - onehot) / 2N for both directions.
    let labels =
        Tensor::arange_start(rows.start, rows.end, (Kind::Int64, image.device())).unsqueeze(1);
    let minus_one = Tensor::full([n, 1], -1.0, (Kind::Float, image.device()));
    let d_image = logits_image.softmax(1, Kind::Float).scatter_add(1, &labels, &minus_one) * norm;
    let d_text = logits_text.softmax(1, Kind::Float).scatter_add(1, &labels, &minus_one) * norm;

    let grad_logit_scale =
        (&d_image * &logits_image).sum(Kind::Float) + (&d_text * &logits_text).sum(Kind::Float);

    // Every row receives the other direction's term; the owned rows add their own (narrow()
    // is a view, so the in-place add writes through).
    let grad_image = d_text.tr().matmul(&text_own) * &scale;
    let grad_text = d_image.tr().matmul(&image_own) * &scale;
    let _ = grad_image.narrow(0, rows.start, n).g_add_(&(d_image.matmul(&text) * &scale));
    let _ = grad_text.narrow(0, rows.start, n).g_add_(&(d_text.matmul(&image) * &scale));

    LossOutput { loss, grad_image, grad_text, grad_logit_scale, grad_logit_bias: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::assert_close;
    use tch::Device;

    fn features(n: i64, d: i64, seed: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let opts = (Kind::Double, Device::Cpu);
        let i = Tensor::randn([n, d], opts);
        let t = Tensor::randn([n, d], opts);
        (crate::model::normalize(&i), crate::model::normalize(&t))
    }

    /// The reference: full N x N logits, open_clip's two cross-entropies, autograd.
    fn autograd_reference(
        image: &Tensor,
        text: &Tensor,
        logit_scale: f64,
    ) -> (f64, Tensor, Tensor, f64) {
        let image = image.detach().set_requires_grad(true);
        let text = text.detach().set_requires_grad(true);
        let ls = Tensor::from(logit_scale).to_kind(Kind::Double).set_requires_grad(true);
        let logits = image.matmul(&text.tr()) * ls.exp();
        let labels = Tensor::arange(image.size()[0], (Kind::Int64, Device::Cpu));
        let ce = |l: &Tensor| l.log_softmax(1, Kind::Double).nll_loss(&labels);
        let loss = (ce(&logits) + ce(&logits.tr())) / 2.0;
        loss.backward();
        (loss.double_value(&[]), image.grad(), text.grad(), ls.grad().double_value(&[]))
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).abs().max().double_value(&[]);
        diff / b.abs().max().double_value(&[]).max(1e-12)
    }

    #[test]
    fn matches_autograd_on_the_full_matrix() {
        let (image, text) = features(16, 8, 0);
        let (loss, gi, gt, gs) = autograd_reference(&image, &text, 2.3);
        let out = clip_loss(&image, &text, &Tensor::from(2.3), 0..16, 5, Matmul::Fp32);
        assert!((out.loss.double_value(&[]) - loss).abs() < 1e-5 * loss.abs());
        assert!(max_rel(&out.grad_image.to_kind(Kind::Double), &gi) < 1e-5);
        assert!(max_rel(&out.grad_text.to_kind(Kind::Double), &gt) < 1e-5);
        assert!((out.grad_logit_scale.double_value(&[]) - gs).abs() < 1e-5 * gs.abs().max(1e-3));
    }

    #[test]
    fn row_blocks_sum_to_the_whole() {
        // What W ranks compute, each for its own rows, adds up to the one-process loss.
        let (image, text) = features(12, 6, 1);
        let ls = Tensor::from(1.7);
        let whole = clip_loss(&image, &text, &ls, 0..12, 0, Matmul::Fp32);
        let parts: Vec<LossOutput> = [0..4, 4..8, 8..12]
            .into_iter()
            .map(|r| clip_loss(&image, &text, &ls, r, 5, Matmul::Fp32))
            .collect();
        let sum =
            |f: &dyn Fn(&LossOutput) -> Tensor| parts.iter().map(f).reduce(|a, b| a + b).unwrap();
        assert!(max_rel(&sum(&|p| p.loss.shallow_clone()), &whole.loss) < 1e-6);
        assert!(max_rel(&sum(&|p| p.grad_image.shallow_clone()), &whole.grad_image) < 1e-6);
        assert!(max_rel(&sum(&|p| p.grad_text.shallow_clone()), &whole.grad_text) < 1e-6);
        assert!(
            max_rel(&sum(&|p| p.grad_logit_scale.shallow_clone()), &whole.grad_logit_scale) < 1e-6
        );
    }

    /// Tiled against the oracle for N up to 4096, for tiles that divide N, do not, straddle
    /// the owned rows, are one column, or all of it; owned rows at the start, middle and end.
    #[test]
    fn tiled_equals_naive() {
        for (n_all, d, tiles) in [
            (64, 8, vec![1, 7, 16, 100, 64, 0]),
            (257, 16, vec![7, 16, 100, 257, 0]),
            (4096, 32, vec![1000, 0]),
        ] {
            let (image, text) = features(n_all, d, 4);
            let (image, text) = (image.to_kind(Kind::Float), text.to_kind(Kind::Float));
            let ls = Tensor::from(3.1f32);
            for rows in [0..n_all, 0..16, 20..52, n_all - 9..n_all] {
                let naive = clip_loss_naive(&image, &text, &ls, rows.clone());
                for &tile in &tiles {
                    let tiled = clip_loss(&image, &text, &ls, rows.clone(), tile, Matmul::Fp32);
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

    /// bf16 products (what CUDA runs under amp_bf16), fp32 log-sum-exps: within bf16's
    /// rounding of the fp32 result.
    #[test]
    fn bf16_products_stay_close_to_fp32() {
        let (image, text) = features(300, 64, 6);
        let (image, text) = (image.to_kind(Kind::Float), text.to_kind(Kind::Float));
        let ls = Tensor::from(2.66f32);
        let fp32 = clip_loss(&image, &text, &ls, 0..300, 128, Matmul::Fp32);
        let bf16 = clip_loss(&image, &text, &ls, 0..300, 128, Matmul::Bf16);
        crate::loss::assert_bf16_close(&bf16, &fp32);
    }

    #[test]
    fn perfect_alignment_at_high_scale_has_near_zero_loss() {
        let (image, _) = features(8, 16, 2);
        let out = clip_loss(
            &image,
            &image,
            &Tensor::from(crate::model::LOGIT_SCALE_MAX),
            0..8,
            3,
            Matmul::Fp32,
        );
        assert!(out.loss.double_value(&[]) < 1.0, "loss {}", out.loss.double_value(&[]));
    }
}
