//! Golden files of the parity tests: JSON and safetensors under tests/fixtures/, the
//! deterministic-weight recipes golden_weights.py writes, and the gradient summaries of a
//! training-step fixture (norm and two fixed projections per parameter).

use std::collections::BTreeMap;
use std::path::Path;

use oxclip_trainer::model::params::deterministic;
use oxclip_trainer::model::{Clip, ModelConfig};
use tch::{nn, Device, Kind, Tensor};

pub fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// One row of `[[name, shape, mean, std, dtype]]`, as golden_weights.recipe writes it.
pub struct Row {
    pub name: String,
    pub shape: Vec<i64>,
    pub mean: f64,
    pub std: f64,
    pub kind: Kind,
}

/// A recipe's rows, sorted by name.
pub fn recipe(path: &Path) -> Vec<Row> {
    let rows: Vec<(String, Vec<i64>, f64, f64, String)> =
        serde_json::from_value(json(path)).expect("recipe rows");
    rows.into_iter()
        .map(|(name, shape, mean, std, dtype)| {
            let kind = match dtype.as_str() {
                "float32" => Kind::Float,
                "int64" => Kind::Int64,
                other => panic!("{name}: dtype {other}"),
            };
            Row { name, shape, mean, std, kind }
        })
        .collect()
}

/// The model of `cfg` holding the recipe's deterministic weights (index = position in the
/// sorted recipe), after checking that `Clip::shapes` lists exactly the recipe's tensors.
pub fn build(cfg: &ModelConfig, rows: &[Row]) -> (nn::VarStore, Clip) {
    let expected: Vec<(String, Vec<i64>)> =
        rows.iter().map(|r| (r.name.clone(), r.shape.clone())).collect();
    assert_eq!(
        Clip::shapes(cfg).expect("shapes"),
        expected,
        "open_clip's state_dict names and shapes"
    );
    let vs = nn::VarStore::new(Device::Cpu);
    let clip = Clip::new(&vs.root(), cfg).expect("builds");
    let vars = vs.variables();
    tch::no_grad(|| {
        for (i, r) in rows.iter().enumerate() {
            let value = deterministic(&r.shape, i, r.mean, r.std, Kind::Double).to_kind(r.kind);
            vars[&r.name].shallow_clone().copy_(&value);
        }
    });
    (vs, clip)
}

/// Compares every trainable parameter's gradient in `vs` with the fixture's `norm.<name>`,
/// `dot1.<name>`, `dot2.<name>` (the gradient's L2 norm and its sums against
/// deterministic(shape, 100000 + i / 200000 + i, 0, 1), i its recipe row): each within
/// `tolerance` of the gradient's norm. Returns the worst relative error and where.
pub fn check_gradients(
    vs: &nn::VarStore,
    rows: &[Row],
    io: &BTreeMap<String, Tensor>,
    tolerance: f64,
) -> (f64, String) {
    let vars = vs.variables();
    let mut worst = (0.0f64, String::new());
    let mut compared = 0;
    for (i, r) in rows.iter().enumerate() {
        let Some(norm) = io.get(&format!("norm.{}", r.name)) else {
            assert!(!vars[&r.name].requires_grad(), "{}: trainable but not in the fixture", r.name);
            continue;
        };
        let grad = vars[&r.name].grad();
        assert!(grad.defined(), "{} has no gradient", r.name);
        let grad = grad.to_kind(Kind::Double);
        let norm = norm.double_value(&[]);
        let scale = norm.max(1e-8);
        let ours = [
            grad.norm().double_value(&[]),
            (&grad * deterministic(&r.shape, 100_000 + i, 0.0, 1.0, Kind::Double))
                .sum(Kind::Double)
                .double_value(&[]),
            (&grad * deterministic(&r.shape, 200_000 + i, 0.0, 1.0, Kind::Double))
                .sum(Kind::Double)
                .double_value(&[]),
        ];
        for (key, value) in ["norm", "dot1", "dot2"].iter().zip(ours) {
            let expected = io[&format!("{key}.{}", r.name)].double_value(&[]);
            let rel = (value - expected).abs() / scale;
            if rel > worst.0 {
                worst = (rel, format!("{key}.{}", r.name));
            }
            assert!(
                rel <= tolerance,
                "{}: {key} {value} vs open_clip {expected} (gradient norm {norm})",
                r.name
            );
        }
        compared += 1;
    }
    assert!(compared > 0, "no gradient compared");
    worst
}
