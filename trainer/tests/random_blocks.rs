//! Random numbers inside a tower's blocks (timm's stochastic depth, the relative-position
//! MLP's dropout) under activation checkpointing and gradient caching, which re-run blocks.
//! Its own test binary: libtorch's generator is global, and another test drawing from it on
//! a parallel thread would change the draws this one compares.

mod common;

use common::golden::max_abs;
use oxclip_trainer::config::LossKind;
use oxclip_trainer::model::params::deterministic;
use oxclip_trainer::model::{zoo, Clip};
use tch::Kind;

/// Stochastic depth and the relative-position MLP's dropout draw random numbers in every
/// block; activation checkpointing and gradient caching re-run blocks, and must draw the same
/// numbers again: from the same generator state, the gradients with checkpointing equal
/// those without, whole and in micro-batches, and the drops are real (they change them).
#[test]
fn random_blocks_recompute_the_same_draws() {
    let mut cfg = zoo::builtin("vit_relpos_medium_patch16_cls_224").expect("built in");
    cfg.vision_cfg.image_size = 32;
    cfg.text_cfg = serde_json::from_value(serde_json::json!(
        {"context_length": 8, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2}
    ))
    .expect("text_cfg");
    let images = deterministic(&[4, 3, 32, 32], 0, 0.0, 1.0, Kind::Float);
    let text =
        tch::Tensor::from_slice(&[98i64, 5, 99, 0, 98, 7, 8, 99, 98, 3, 4, 99, 98, 99, 0, 0])
            .view([4, 4]);
    let text = tch::Tensor::cat(&[&text, &text.zeros_like()], 1);
    let grads = |drop_path: f64, micro_batch: Option<usize>, checkpointing: bool| {
        let mut cfg = cfg.clone();
        cfg.vision_cfg.timm_drop_path = Some(drop_path);
        tch::manual_seed(0);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let clip = Clip::new(&vs.root(), &cfg).expect("builds");
        clip.set_training(true);
        let step = common::step_config(LossKind::Clip, micro_batch, checkpointing);
        tch::manual_seed(7);
        common::step_at_lr0(&vs, &clip, &images, &text, step);
        let mut out: Vec<(String, tch::Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(n, v)| (n, v.grad().copy()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    let worst = |a: &[(String, tch::Tensor)], b: &[(String, tch::Tensor)]| {
        a.iter()
            .zip(b)
            .map(|((n, x), (m, y))| {
                assert_eq!(n, m);
                max_abs(x, y)
            })
            .fold(0.0f64, f64::max)
    };
    for micro_batch in [None, Some(2)] {
        let plain = grads(0.5, micro_batch, false);
        let checkpointed = grads(0.5, micro_batch, true);
        let diff = worst(&plain, &checkpointed);
        assert!(
            diff <= 1e-6,
            "micro-batch {micro_batch:?}: checkpointing changed a gradient by {diff}"
        );
        let again = grads(0.5, micro_batch, false);
        assert_eq!(worst(&plain, &again), 0.0, "same seed, same draws");
    }
    let without = grads(0.0, None, false);
    assert!(worst(&grads(0.5, None, false), &without) > 1e-4, "drop path changes the gradients");
}
