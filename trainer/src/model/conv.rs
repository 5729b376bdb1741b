//! A 2-D convolution with a bias and timm's symmetric padding, (k - 1) / 2: what the
//! convolutional timm trunks built from parts use (ViTamin's stem, FastViT), each with its
//! own initialisation, and what a re-parameterisation fuses branches into.

use tch::nn::{self, Init};
use tch::Tensor;

use super::params::param;

#[derive(Debug)]
pub struct Conv2d {
    /// (out, in / groups, k, k)
    pub weight: Tensor,
    /// (out,)
    pub bias: Tensor,
    stride: i64,
    groups: i64,
}

impl Conv2d {
    /// `weight` and `bias` under `p`, `inp` to `out` channels with a `k` x `k` kernel.
    pub fn new(
        p: &nn::Path,
        (inp, out, k): (i64, i64, i64),
        stride: i64,
        groups: i64,
        weight: Init,
        bias: Init,
    ) -> Self {
        Conv2d {
            weight: param(p, "weight", &[out, inp / groups, k, k], weight),
            bias: param(p, "bias", &[out], bias),
            stride,
            groups,
        }
    }

    /// A convolution of tensors already computed (not variables).
    pub fn of(weight: Tensor, bias: Tensor, stride: i64, groups: i64) -> Self {
        Conv2d { weight, bias, stride, groups }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let pad = (self.weight.size()[3] - 1) / 2;
        let s = [self.stride, self.stride];
        x.conv2d(&self.weight, Some(&self.bias), s, [pad, pad], [1, 1], self.groups)
    }
}
