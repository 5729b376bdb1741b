//! Stochastic depth, timm's `DropPath`: in training, each sample skips a residual branch with
//! probability `p` (the branch's output is zeroed for that sample) and the samples that keep it
//! scale it by 1 / (1 - p), so its expectation is unchanged; evaluation keeps every branch.
//! A trunk's rates rise linearly from 0 at its first block to `timm_drop_path` at its last
//! (timm's `calculate_drop_path_rates`).

use tch::{Device, Kind, Tensor};

/// timm's per-block rates, `torch.linspace(0, max, depth)` in float32, taken from libtorch's
/// own kernel: its float32 values depend on how it splits the range (counting up for the first
/// half, down for the second, in vector-wide runs), so only the same kernel gives timm's rates
/// bit for bit.
pub fn rates(max: f64, depth: i64) -> Vec<f64> {
    if depth <= 0 {
        return Vec::new();
    }
    let rates = Tensor::linspace(0.0, max, depth, (Kind::Float, Device::Cpu));
    // ok: a CPU float tensor always converts.
    Vec::<f32>::try_from(&rates).map(|v| v.into_iter().map(f64::from).collect()).unwrap_or_default()
}

/// `x` (B, ...) with each sample's branch kept with probability 1 - `p` and scaled by its
/// inverse; `x` itself outside training or at `p` = 0.
pub fn drop_path(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return x.shallow_clone();
    }
    let keep = 1.0 - p;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    let mask = Tensor::empty(shape.as_slice(), (x.kind(), x.device())).bernoulli_float_(keep);
    x * (mask / keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_torch_linspace_in_float32() {
        let r = rates(0.1, 24);
        assert_eq!(r.len(), 24);
        assert_eq!(r[0], 0.0);
        assert_eq!(r[23], f64::from(0.1f32));
        let torch = Tensor::linspace(0.0, 0.1, 24, (Kind::Float, Device::Cpu));
        let torch: Vec<f64> =
            Vec::<f32>::try_from(&torch).unwrap().into_iter().map(f64::from).collect();
        assert_eq!(r, torch);
        assert!(rates(0.3, 1) == [0.0] && rates(0.3, 0).is_empty());
    }

    #[test]
    fn a_dropped_sample_is_zero_and_a_kept_one_is_scaled() {
        tch::manual_seed(3);
        let x = Tensor::ones([2000, 3, 4], (Kind::Float, Device::Cpu));
        let y = drop_path(&x, 0.25, true);
        let per_sample = y.sum_dim_intlist(&[1i64, 2][..], false, Kind::Float) / 12.0;
        let values: Vec<f32> = Vec::try_from(&per_sample).unwrap();
        assert!(values.iter().all(|v| *v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let dropped = values.iter().filter(|v| **v == 0.0).count() as f64 / 2000.0;
        assert!((dropped - 0.25).abs() < 0.04, "{dropped}");
        assert!(drop_path(&x, 0.25, false).equal(&x));
    }
}
