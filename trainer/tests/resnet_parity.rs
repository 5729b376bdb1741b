//! OpenAI's ModifiedResNet image tower against open_clip 3.3.0, from golden files written by
//! tests/fixtures/make_resnet_fixtures.py: RN50's state_dict names and shapes, RN50's
//! features with deterministic random weights, and a training step of a tiny ResNet CLIP in
//! train mode (BatchNorm with batch statistics): the loss, every parameter gradient and the
//! running statistics afterwards, for the whole batch and for gradient caching.

use std::collections::BTreeMap;
use std::path::PathBuf;

use oxclip_trainer::collectives::SingleProcess;
use oxclip_trainer::config::{LossConfig, LossKind, Tiling};
use oxclip_trainer::interchange::export::{export, Format};
use oxclip_trainer::interchange::weights::{load_weights, save_weights};
use oxclip_trainer::model::lock::{lock, Tower};
use oxclip_trainer::model::params::deterministic;
use oxclip_trainer::model::{Clip, ModelConfig};
use oxclip_trainer::optim::{AdamW, AdamWConfig};
use oxclip_trainer::step::{train_step, StepConfig};
use tch::{nn, Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/resnet")
}

fn config(file: &str) -> ModelConfig {
    let path = fixtures().join(file);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("config"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read(file: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(fixtures().join(file)).expect("fixture").into_iter().collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// `[[name, shape, mean, std, dtype]]`, sorted by name.
fn recipe() -> Vec<(String, Vec<i64>, f64, f64, Kind)> {
    let text = std::fs::read_to_string(fixtures().join("rn50_recipe.json")).expect("recipe");
    let rows: Vec<(String, Vec<i64>, f64, f64, String)> =
        serde_json::from_str(&text).expect("recipe parses");
    rows.into_iter()
        .map(|(name, shape, mean, std, dtype)| {
            let kind = match dtype.as_str() {
                "float32" => Kind::Float,
                "int64" => Kind::Int64,
                other => panic!("{name}: dtype {other}"),
            };
            (name, shape, mean, std, kind)
        })
        .collect()
}

#[test]
fn rn50_has_open_clips_state_dict_names_and_shapes() {
    let expected: Vec<(String, Vec<i64>)> =
        recipe().into_iter().map(|(name, shape, ..)| (name, shape)).collect();
    let ours = Clip::shapes(&config("RN50.json")).expect("builds");
    assert_eq!(ours.len(), expected.len());
    assert_eq!(ours, expected);
    assert!(ours.iter().any(|(n, _)| n == "visual.layer1.0.downsample.1.running_var"));
    assert!(ours
        .iter()
        .any(|(n, s)| n == "visual.attnpool.positional_embedding" && s == &[50, 2048]));
}

/// RN50 with open_clip's full-size shapes and deterministic weights (BatchNorm statistics
/// included), in eval mode: the image and text features of open_clip.
#[test]
fn rn50_matches_open_clip_features() {
    let cfg = config("RN50.json");
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Clip::new(&vs.root(), &cfg).expect("builds");
    let vars = vs.variables();
    let rows = recipe();
    assert_eq!(vars.len(), rows.len());
    tch::no_grad(|| {
        for (i, (name, shape, mean, std, kind)) in rows.iter().enumerate() {
            let var = &vars[name];
            assert_eq!(var.kind(), *kind, "{name}");
            var.shallow_clone().copy_(&deterministic(shape, i, *mean, *std, *kind));
        }
    });
    let io = read("rn50_io.safetensors");
    // The fixture's images: deterministic noise plus a ramp along the width (0) / height (1).
    let mut images = deterministic(&[2, 3, 224, 224], 0, 0.0, 1.0, Kind::Double);
    let ramp = Tensor::arange(224, (Kind::Double, Device::Cpu)) / 223.0 * 2.0;
    images = Tensor::stack(
        &[images.get(0) + ramp.view([1, 1, 224]), images.get(1) + ramp.view([1, 224, 1])],
        0,
    )
    .to_kind(Kind::Float);
    let (image, text) = tch::no_grad(|| model.features(&images, &io["text"]));
    let (di, dt) = (max_abs(&image, &io["image_features"]), max_abs(&text, &io["text_features"]));
    assert!(di <= 1e-4 && dt <= 1e-4, "image features differ by {di}, text by {dt}");
    assert_eq!(
        vars["visual.bn1.num_batches_tracked"].int64_value(&[]),
        0,
        "eval mode counts no batch"
    );
}

/// Buffers the step must update as open_clip's forward does: "after.<name>".
fn check_buffers(vs: &nn::VarStore, golden: &BTreeMap<String, Tensor>, case: &str) {
    let mut checked = 0;
    for (name, var) in vs.variables() {
        let Some(expected) = golden.get(&format!("after.{name}")) else { continue };
        if name.ends_with("num_batches_tracked") {
            assert_eq!(var.int64_value(&[]), expected.int64_value(&[]), "{case}: {name}");
        } else {
            let diff = max_abs(&var, expected);
            assert!(
                diff <= 1e-5 * expected.abs().max().double_value(&[]).max(1.0),
                "{case}: {name} differs by {diff}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, golden.keys().filter(|k| k.starts_with("after.")).count());
    assert!(checked > 0);
}

/// One training step (lr 0) of a tiny ModifiedResNet CLIP through `step::train_step`, in
/// train mode: open_clip's ClipLoss, every parameter gradient, and BatchNorm's running
/// statistics folded in once per forward. With micro-batches of 3 each is normalised with its
/// own statistics and counted once, although the step runs it twice.
#[test]
fn tiny_resnet_training_step_matches_open_clip() {
    let io = read("tiny_io.safetensors");
    let cfg = config("tiny-rn.json");
    assert_eq!(cfg.vision_cfg.heads(), 8, "width 4 * 32 / head_width 16");
    let loss =
        LossConfig { kind: LossKind::Clip, tiling: Tiling::Tile(4), ..LossConfig::default() };
    for (case, micro_batch) in [("whole", None), ("micro3", Some(3))] {
        let golden = read(&format!("tiny_{case}.safetensors"));
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg).expect("builds");
        load_weights(&vs, &fixtures().join("tiny_model.safetensors"))
            .expect("loads open_clip weights");
        assert_eq!(vs.variables()["visual.bn1.num_batches_tracked"].int64_value(&[]), 3);
        model.set_training(true);
        let mut optimizer = AdamW::new(
            vs.variables().into_iter().collect(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 },
        );
        let grad_sync =
            oxclip_trainer::grad_sync::GradSync::for_var_store(&vs, &Default::default())
                .expect("buckets");
        let step = StepConfig {
            autocast: None,
            grad_clip_norm: None,
            loss: oxclip_trainer::loss::LossSpec::new(&loss, false),
            micro_batch,
            patch_dropout: None,
            grad_checkpointing: false,
        };
        let out = train_step(
            &model,
            &mut optimizer,
            &SingleProcess,
            &grad_sync,
            &io["images"],
            &io["text"],
            0.0,
            0,
            step,
            None,
        )
        .expect("step");
        let expected = &golden["loss"];
        assert!(
            max_abs(&out.loss, expected) < 1e-5,
            "{case}: loss {} vs {}",
            out.loss.double_value(&[]),
            expected.double_value(&[])
        );
        let mut names = Vec::new();
        for (name, var) in optimizer.variables() {
            let expected = &golden[&format!("grad.{name}")];
            let scale = expected.abs().max().double_value(&[]).max(1e-3);
            let diff = max_abs(&var.grad(), expected);
            assert!(
                diff / scale <= 1e-4,
                "{case}, {name}: gradient differs by {diff} (scale {scale})"
            );
            names.push(name.to_owned());
        }
        // The optimizer holds exactly open_clip's parameters: no BatchNorm buffer.
        let params: Vec<String> =
            golden.keys().filter_map(|k| k.strip_prefix("grad.").map(str::to_owned)).collect();
        names.sort();
        assert_eq!(names, params, "{case}");
        check_buffers(&vs, &golden, case);
    }
}

/// Eval mode normalises with the running statistics and leaves them alone; training-mode
/// forwards count each batch, a repeat not; frozen BatchNorm (a locked tower) acts as in eval
/// mode whatever the model's mode.
#[test]
fn eval_mode_uses_and_keeps_the_running_statistics() {
    let io = read("tiny_io.safetensors");
    let cfg = config("tiny-rn.json");
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Clip::new(&vs.root(), &cfg).expect("builds");
    load_weights(&vs, &fixtures().join("tiny_model.safetensors")).expect("loads");
    let before: BTreeMap<String, Tensor> =
        vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
    let images = io["images"].narrow(0, 0, 2);
    let eval_a = tch::no_grad(|| model.encode_image(&images));
    let eval_b = tch::no_grad(|| model.encode_image(&images.narrow(0, 0, 1)));
    assert!(
        max_abs(&eval_a.narrow(0, 0, 1), &eval_b) < 1e-5,
        "eval mode: a sample's features do not depend on the batch"
    );
    for (name, var) in vs.variables() {
        assert!(var.equal(&before[&name]), "{name} changed in eval mode");
    }
    model.set_training(true);
    let train = tch::no_grad(|| model.encode_image(&images));
    assert!(
        max_abs(&train, &eval_a) > 1e-3,
        "training mode normalises with the batch's statistics"
    );
    assert_eq!(
        vs.variables()["visual.layer4.0.downsample.1.num_batches_tracked"].int64_value(&[]),
        4
    );
    let _ = model.repeating(|| tch::no_grad(|| model.encode_image(&images)));
    assert_eq!(
        vs.variables()["visual.layer4.0.downsample.1.num_batches_tracked"].int64_value(&[]),
        4,
        "a repeat is not counted"
    );

    // train.lock_image_freeze_bn_stats: training mode normalises as eval mode and counts nothing.
    model.freeze_batch_norm();
    let counted: BTreeMap<String, Tensor> =
        vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
    let frozen = tch::no_grad(|| model.encode_image(&images));
    assert!(
        max_abs(
            &frozen,
            &tch::no_grad(|| {
                model.set_training(false);
                model.encode_image(&images)
            })
        ) < 1e-6
    );
    for (name, var) in vs.variables() {
        assert!(var.equal(&counted[&name]), "{name} changed with frozen BatchNorm");
    }
}

/// A ResNet image tower locks whole, as open_clip's `ModifiedResNet.lock`; partial locking
/// is refused naming the setting.
#[test]
fn resnet_tower_locks_whole() {
    let cfg = config("tiny-rn.json");
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = Clip::new(&vs.root(), &cfg).expect("builds");
    let err = lock(&vs, &cfg, Tower::Image, 1).expect_err("partial locking").to_string();
    assert!(
        err.contains("train.lock_image_unlocked_groups") && err.contains("ModifiedResNet"),
        "{err}"
    );
    let is_visual_param = |n: &str, v: &Tensor| {
        n.starts_with("visual.") && v.is_floating_point() && !n.contains(".running_")
    };
    let vars = vs.variables();
    assert!(
        vars.iter().filter(|(n, v)| is_visual_param(n, v)).all(|(_, v)| v.requires_grad()),
        "a refused lock freezes nothing"
    );
    let frozen = lock(&vs, &cfg, Tower::Image, 0).expect("locks");
    let visual_params = vars.iter().filter(|(n, v)| is_visual_param(n, v)).count();
    assert_eq!(frozen, visual_params);
    for (name, var) in &vars {
        assert_eq!(
            var.requires_grad(),
            !name.starts_with("visual.") && var.is_floating_point(),
            "{name}"
        );
    }
}

/// open_clip export and checkpoints keep `num_batches_tracked` int64 (open_clip's
/// `load_state_dict` copies it as is) and load back; Hugging Face export is refused by name.
#[test]
fn resnet_exports_to_open_clip_only() {
    let cfg = config("tiny-rn.json");
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = Clip::new(&vs.root(), &cfg).expect("builds");
    load_weights(&vs, &fixtures().join("tiny_model.safetensors")).expect("loads");
    let weights: BTreeMap<String, Tensor> =
        vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let files = export(
        weights.iter().map(|(k, v)| (k.clone(), v.copy())).collect(),
        &cfg,
        None,
        Format::OpenClip,
        dir.path(),
    )
    .expect("exports");
    let saved = Tensor::read_safetensors(&files[0]).expect("reads");
    let counter = saved.iter().find(|(n, _)| n == "visual.bn1.num_batches_tracked").expect("saved");
    assert_eq!(counter.1.kind(), Kind::Int64);
    assert_eq!(counter.1.int64_value(&[]), 3);
    // A checkpoint's model file round-trips the buffers the same way.
    let checkpoint = dir.path().join("model.safetensors");
    save_weights(&vs, &checkpoint).expect("saves");
    for file in [&files[0], &checkpoint] {
        let other = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(&other.root(), &cfg).expect("builds");
        load_weights(&other, file).expect("loads back");
        for (name, t) in other.variables() {
            assert!(
                t.kind() == weights[&name].kind() && t.equal(&weights[&name]),
                "{}: {name}",
                file.display()
            );
        }
    }
    let hf = dir.path().join("hf");
    let err = export(weights, &cfg, None, Format::HuggingFace, &hf)
        .expect_err("no HF ResNet")
        .to_string();
    assert!(err.contains("ModifiedResNet") && err.contains("--format open_clip"), "{err}");
    assert!(!hf.exists(), "nothing written");
}
