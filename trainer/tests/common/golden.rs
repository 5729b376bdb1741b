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
    check_gradients_floored(vs, rows, io, tolerance, &|_, _| 0.0)
}

/// What [`check_gradients`] measures a parameter's error against at least, given its row and
/// the fixture: for a gradient that is zero in exact arithmetic, rounding is all either
/// library computes, and its own norm is no scale.
pub type GradientFloor = dyn Fn(&Row, &BTreeMap<String, Tensor>) -> f64;

/// A key's bias adds the same amount to each of a query's scores, which softmax cancels: its
/// exact gradient is 0 and both libraries compute rounding. Its scale is its weight's gradient.
pub fn key_bias_floor(row: &Row, io: &BTreeMap<String, Tensor>) -> f64 {
    let layer =
        row.name.strip_suffix(".key.bias").or_else(|| row.name.strip_suffix(".k_proj.bias"));
    let weight = |layer: &str| {
        let name = if row.name.ends_with(".k_proj.bias") { "k_proj" } else { "key" };
        io[&format!("norm.{layer}.{name}.weight")].double_value(&[])
    };
    layer.map_or(0.0, weight)
}

/// [`check_gradients`], each parameter's error scale at least `floor` of it.
pub fn check_gradients_floored(
    vs: &nn::VarStore,
    rows: &[Row],
    io: &BTreeMap<String, Tensor>,
    tolerance: f64,
    floor: &GradientFloor,
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
        let scale = norm.max(floor(r, io)).max(1e-8);
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

/// The normalised features of `clip` for deterministic([2, 3, S, S], 0, 0, 1) images and the
/// fixture's `text`, against its `image_features` and `text_features`: within 1e-5, cosine at
/// least 0.9999. Prints the differences.
pub fn check_features(label: &str, clip: &Clip, image_size: i64, io: &BTreeMap<String, Tensor>) {
    let images = deterministic(&[2, 3, image_size, image_size], 0, 0.0, 1.0, Kind::Float);
    let (img, txt) = tch::no_grad(|| clip.features(&images, &io["text"]));
    let (di, dt) = (max_abs(&img, &io["image_features"]), max_abs(&txt, &io["text_features"]));
    let cosine = (&img * &io["image_features"]).sum_dim_intlist(-1, false, Kind::Double);
    let cosine = cosine.min().double_value(&[]);
    println!("{label}: image features max abs diff {di:e} (cosine >= {cosine}), text {dt:e}");
    assert!(di <= 1e-5 && dt <= 1e-5 && cosine >= 0.9999, "{label}: image {di}, text {dt}");
}

/// `lock_image_tower` as open_clip: for each `{"n": [names]}` of `expected`, the visual
/// parameters `lock(n)` leaves trainable (buffers never train, so only parameters count).
pub fn check_lock_sets(
    label: &str,
    vs: &nn::VarStore,
    cfg: &ModelConfig,
    expected: &serde_json::Value,
) {
    use oxclip_trainer::model::lock::{lock, Tower};
    check_trainable_sets(&format!("{label}, unlocked groups"), vs, "visual.", expected, |n| {
        lock(vs, cfg, Tower::Image, n.parse().expect("count")).expect("locks");
    });
}

/// For each `{key: [names]}` of `expected`, from every parameter trainable, `lock(key)`, then
/// the parameters under `prefix` still trainable against `names`; every parameter trainable
/// again after.
pub fn check_trainable_sets(
    label: &str,
    vs: &nn::VarStore,
    prefix: &str,
    expected: &serde_json::Value,
    lock: impl Fn(&str),
) {
    let params: Vec<(String, Tensor)> =
        vs.variables().into_iter().filter(|(_, v)| v.requires_grad()).collect();
    let groups = expected.as_object().expect("{lock: names}");
    for (key, names) in groups {
        for (_, var) in &params {
            let _ = var.set_requires_grad(true);
        }
        lock(key);
        let mut ours: Vec<String> = params
            .iter()
            .filter(|(n, v)| n.starts_with(prefix) && v.requires_grad())
            .map(|(n, _)| n.clone())
            .collect();
        ours.sort();
        let names: Vec<String> = serde_json::from_value(names.clone()).expect("names");
        assert_eq!(ours, names, "{label} {key}");
    }
    for (_, var) in &params {
        let _ = var.set_requires_grad(true);
    }
}

/// The training-step fixture `step_<name>` of `dir` (tower_fixtures.py's `clip_step`): the
/// config, the weights, one step at lr 0 on deterministic([4, 3, S, S], 1, 0, 1) images, the
/// loss within 1e-5 and every gradient within 1e-4 of its norm. Returns the model's variables
/// and the fixture, for what else it holds.
pub fn check_open_clip_step(dir: &Path, name: &str) -> (nn::VarStore, BTreeMap<String, Tensor>) {
    check_open_clip_step_floored(dir, name, &|_, _| 0.0)
}

/// [`check_open_clip_step`] with [`check_gradients_floored`]'s `floor`.
pub fn check_open_clip_step_floored(
    dir: &Path,
    name: &str,
    floor: &GradientFloor,
) -> (nn::VarStore, BTreeMap<String, Tensor>) {
    let cfg: ModelConfig = serde_json::from_value(json(&dir.join(format!("step_{name}.json"))))
        .expect("open_clip's JSON");
    check_step(&cfg, dir, name, floor)
}

/// [`check_open_clip_step_floored`] for the model `cfg` (the fixture's config, as the caller
/// has adapted it).
pub fn check_step(
    cfg: &ModelConfig,
    dir: &Path,
    name: &str,
    floor: &GradientFloor,
) -> (nn::VarStore, BTreeMap<String, Tensor>) {
    use oxclip_trainer::config::LossKind;
    let rows = recipe(&dir.join(format!("step_{name}_recipe.json")));
    let (vs, clip) = build(cfg, &rows);
    clip.set_training(true);
    let io = read(&dir.join(format!("step_{name}_io.safetensors")));
    let size = cfg.vision_cfg.image_size;
    let images = deterministic(&[4, 3, size, size], 1, 0.0, 1.0, Kind::Float);
    let step = super::step_config(LossKind::Clip, None, false);
    let out = super::step_at_lr0(&vs, &clip, &images, &io["text"], step);
    let dl = max_abs(&out.loss, &io["loss"]);
    assert!(
        dl <= 1e-5,
        "{name}: loss {} vs {}",
        out.loss.double_value(&[]),
        io["loss"].double_value(&[])
    );
    let worst = check_gradients_floored(&vs, &rows, &io, 1e-4, floor);
    println!("{name} step: loss diff {dl:e}, worst gradient {:e} ({})", worst.0, worst.1);
    (vs, io)
}

/// The fixture's `buffer.<name>` entries (BatchNorm statistics after a training step) against
/// the model's, each within 1e-5. Returns how many there were.
pub fn check_buffers(vs: &nn::VarStore, io: &BTreeMap<String, Tensor>) -> usize {
    let vars = vs.variables();
    let mut buffers = 0;
    for (key, expected) in io {
        let Some(buffer) = key.strip_prefix("buffer.") else { continue };
        let diff = max_abs(&vars[buffer], expected);
        assert!(diff <= 1e-5, "{buffer} after the step differs by {diff}");
        buffers += 1;
    }
    buffers
}
