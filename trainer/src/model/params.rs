//! How every model file creates its parameters and buffers, so one switch can build any
//! architecture as shapes alone: `oxclip model show` lists ViT-e's 4.4 billion parameters
//! without allocating them.
//!
//! Model constructors call [`param`] and [`buffer`] (never `nn::Path::var` directly) and
//! initialise through the `Init` they pass, never by writing into a tensor afterwards: in
//! shapes-only mode a parameter is a zero-stride view that cannot be written.

use std::cell::Cell;

use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

thread_local! {
    static SHAPES_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// A trainable parameter `name` under `p`, drawn from `init`.
pub fn param(p: &nn::Path, name: &str, dims: &[i64], init: Init) -> Tensor {
    if SHAPES_ONLY.with(Cell::get) {
        return p.add(name, placeholder(dims, Kind::Float), true);
    }
    p.var(name, dims, init)
}

/// A state_dict entry that is not trained (BatchNorm's running statistics), holding `value`.
pub fn buffer(
    p: &nn::Path,
    name: &str,
    value: impl FnOnce() -> Tensor,
    dims: &[i64],
    kind: Kind,
) -> Tensor {
    if SHAPES_ONLY.with(Cell::get) {
        return p.add(name, placeholder(dims, kind), false);
    }
    p.add(name, value().to_device(p.device()), false)
}

/// PyTorch's default Conv2d initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight
/// and bias (timm leaves most convolutions to it).
pub fn torch_conv_init(fan_in: i64) -> Init {
    let bound = (fan_in as f64).powf(-0.5);
    Init::Uniform { lo: -bound, up: bound }
}

/// A tensor of the right size that owns one element.
fn placeholder(dims: &[i64], kind: Kind) -> Tensor {
    Tensor::zeros([], (kind, Device::Cpu)).expand(dims, false)
}

/// Runs `build` with every [`param`] and [`buffer`] a placeholder, then returns each
/// variable's name and shape, sorted by name.
pub fn shapes_of<T>(build: impl FnOnce(&nn::Path) -> T) -> Vec<(String, Vec<i64>)> {
    let vs = shapes_only(build);
    let mut out: Vec<(String, Vec<i64>)> =
        vs.variables().into_iter().map(|(name, t)| (name, t.size())).collect();
    out.sort();
    out
}

/// [`shapes_of`] for the trainable parameters alone (no BatchNorm statistics).
pub fn parameter_shapes_of<T>(build: impl FnOnce(&nn::Path) -> T) -> Vec<(String, Vec<i64>)> {
    let vs = shapes_only(build);
    let mut out: Vec<(String, Vec<i64>)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(name, t)| (name, t.size()))
        .collect();
    out.sort();
    out
}

/// Runs `build` as [`shapes_of`] does and counts the elements of its trainable parameters
/// (buffers excluded).
pub fn trainable_numel_of<T>(build: impl FnOnce(&nn::Path) -> T) -> i64 {
    shapes_only(build).trainable_variables().iter().map(|t| t.size().iter().product::<i64>()).sum()
}

fn shapes_only<T>(build: impl FnOnce(&nn::Path) -> T) -> nn::VarStore {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            SHAPES_ONLY.with(|s| s.set(false));
        }
    }
    SHAPES_ONLY.with(|s| s.set(true));
    let _reset = Reset;
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = build(&vs.root());
    vs
}

/// Deterministic pseudo-random weights for parity tests against Python, identical in both
/// (tests/fixtures/golden_weights.py computes the same): element j of the i-th tensor is
/// `mean + std * sqrt(12) * (frac(sin((j + 1) * 12.9898 + (i + 1) * 78.233) * 43758.5453) - 0.5)`,
/// in float64, then cast. Uniform-like with the given mean and standard deviation, so weights
/// keep the scale of the architecture's own initialisation without shipping the weights.
pub fn deterministic(dims: &[i64], index: usize, mean: f64, std: f64, kind: Kind) -> Tensor {
    let n: i64 = dims.iter().product();
    if std == 0.0 || n == 0 {
        return Tensor::full(dims, mean, (kind, Device::Cpu));
    }
    let j = Tensor::arange_start(1, n + 1, (Kind::Double, Device::Cpu));
    let y = (j * 12.9898 + (index as f64 + 1.0) * 78.233).sin() * 43758.5453;
    let x = &y - y.floor();
    ((x - 0.5) * (std * 12f64.sqrt()) + mean).to_kind(kind).reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_only_allocates_nothing_and_restores_the_mode() {
        let shapes =
            shapes_of(|p| param(&(p / "big"), "weight", &[100_000, 100_000], Init::Const(1.0)));
        assert_eq!(shapes, vec![("big.weight".to_owned(), vec![100_000, 100_000])]);
        let vs = nn::VarStore::new(Device::Cpu);
        let t = param(&vs.root(), "w", &[2, 3], Init::Const(1.5));
        assert_eq!(t.sum(Kind::Float).double_value(&[]), 9.0);
    }

    #[test]
    fn deterministic_weights_have_the_asked_mean_and_spread() {
        let t = deterministic(&[200, 300], 7, 0.25, 0.02, Kind::Float);
        assert!((t.mean(Kind::Double).double_value(&[]) - 0.25).abs() < 1e-3);
        assert!((t.std(true).double_value(&[]) - 0.02).abs() < 1e-3);
        assert!(t.equal(&deterministic(&[200, 300], 7, 0.25, 0.02, Kind::Float)));
        assert!(!t.equal(&deterministic(&[200, 300], 8, 0.25, 0.02, Kind::Float)));
    }
}
