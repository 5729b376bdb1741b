//! What the step tests share: a model with given weights set up as a training run sets it up
//! (AdamW as the run picks it, gradient buckets), one step on it, and ranks as threads joined
//! by the CPU backend.

#![allow(dead_code)]

pub mod golden;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oxclip_trainer::collectives::tcp::TcpGroup;
use oxclip_trainer::collectives::{Collectives, SingleProcess, WorldEnv};
use oxclip_trainer::config::{DistConfig, LossConfig, LossKind, Tiling};
use oxclip_trainer::grad_sync::GradSync;
use oxclip_trainer::interchange::weights::load_weights;
use oxclip_trainer::loss::LossSpec;
use oxclip_trainer::model::{Clip, ModelConfig};
use oxclip_trainer::optim::{AdamW, AdamWConfig};
use oxclip_trainer::precision::GradScaler;
use oxclip_trainer::step::{train_step, StepConfig, StepOutput};
use tch::{nn, Device, Kind, Tensor};

pub type Named = BTreeMap<String, Tensor>;

/// The repository's tests/fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// configs/models/tiny.yaml: 32 px, 2-layer towers, the full CLIP vocabulary.
pub fn tiny() -> ModelConfig {
    serde_yaml::from_str(include_str!("../../../configs/models/tiny.yaml")).expect("tiny")
}

/// The model behind the open_clip parity fixtures (tests/fixtures/models/parity-tiny.yaml).
pub fn parity_tiny() -> ModelConfig {
    let path = fixtures().join("models/parity-tiny.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).expect("parity-tiny")
}

/// open_clip's AdamW defaults for CLIP training.
pub const ADAMW: AdamWConfig = AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 };

/// Where a model's weights come from.
pub enum Weights<'a> {
    File(&'a Path),
    Tensors(&'a Named),
}

/// A model, its optimizer and gradient buckets, as `train` builds them on rank `comm`:
/// weights in `kind` (bf16 under pure_bf16), AdamW over what trains (this rank's pieces under
/// `dist.shard`).
pub struct Parts {
    pub vs: nn::VarStore,
    pub model: Clip,
    pub optimizer: AdamW,
    pub sync: GradSync,
}

impl Parts {
    pub fn new(
        cfg: &ModelConfig,
        weights: Weights,
        kind: Kind,
        dist: &DistConfig,
        comm: &dyn Collectives,
    ) -> Parts {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), cfg).expect("model builds");
        if kind == Kind::BFloat16 {
            vs.bfloat16();
        }
        match weights {
            Weights::File(path) => load_weights(&vs, path).expect("weights load"),
            Weights::Tensors(named) => tch::no_grad(|| {
                for (name, var) in vs.variables() {
                    var.shallow_clone().copy_(&named[&name]);
                }
            }),
        }
        let mut sync = GradSync::for_var_store(&vs, dist).expect("buckets");
        sync.split(comm.rank(), comm.world_size()).expect("split");
        let optimizer = sync.adamw(&vs, ADAMW).expect("optimizer");
        Parts { vs, model, optimizer, sync }
    }

    /// One step of this rank's `images`/`tokens` at `lr`, the run's step `step`.
    pub fn step(
        &mut self,
        comm: &dyn Collectives,
        (images, tokens): (&Tensor, &Tensor),
        lr: f64,
        step: u64,
        cfg: StepConfig,
        scaler: Option<&mut GradScaler>,
    ) -> StepOutput {
        train_step(
            &self.model,
            &mut self.optimizer,
            comm,
            &self.sync,
            images,
            tokens,
            lr,
            step,
            cfg,
            scaler,
        )
        .expect("step")
    }

    /// Every trainable parameter's gradient (after a step: the reduced one), copied, by name.
    pub fn grads(&self) -> Named {
        self.optimizer.variables().map(|(n, v)| (n.to_owned(), v.grad().copy())).collect()
    }

    /// Every weight, copied, by name.
    pub fn weights(&self) -> Named {
        self.vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect()
    }
}

/// A plain fp32 step's config with the `kind` loss in tiles of 4, as the parity tests take it.
pub fn step_config(
    kind: LossKind,
    micro_batch: Option<usize>,
    grad_checkpointing: bool,
) -> StepConfig {
    let loss = LossConfig { kind, tiling: Tiling::Tile(4), ..LossConfig::default() };
    StepConfig {
        autocast: None,
        grad_clip_norm: None,
        loss: LossSpec::new(&loss, false),
        micro_batch,
        patch_dropout: None,
        grad_checkpointing,
    }
}

/// One single-process step of `model` (weights in `vs`) at learning rate 0, so the gradients
/// are computed and the weights stay: AdamW over `vs`, fresh gradient buckets.
pub fn step_at_lr0(
    vs: &nn::VarStore,
    model: &Clip,
    images: &Tensor,
    tokens: &Tensor,
    cfg: StepConfig,
) -> StepOutput {
    let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), ADAMW);
    let sync = GradSync::for_var_store(vs, &Default::default()).expect("buckets");
    train_step(model, &mut optimizer, &SingleProcess, &sync, images, tokens, 0.0, 0, cfg, None)
        .expect("step")
}

/// One rank per element of `inputs`, as threads joined by the CPU backend; rank r runs
/// `f(r, inputs[r], comm)`. Results in rank order. (Tensors are `Send`, not `Sync`: each rank
/// gets its own.)
pub fn on_ranks<I, T, F>(inputs: Vec<I>, f: F) -> Vec<T>
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(usize, I, &dyn Collectives) -> T + Send + Sync + 'static,
{
    let world = inputs.len();
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr");
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = inputs
        .into_iter()
        .enumerate()
        .map(|(rank, input)| {
            let f = f.clone();
            std::thread::spawn(move || {
                let env = WorldEnv::on_loopback(rank, world, port.port());
                let comm = TcpGroup::connect(&env, Duration::from_secs(60)).expect("joins");
                f(rank, input, &comm)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank")).collect()
}

/// Rows `rank * n .. (rank + 1) * n` of `t`, copied (for a rank's thread).
pub fn rows(t: &Tensor, rank: usize, n: i64) -> Tensor {
    t.narrow(0, rank as i64 * n, n).copy()
}
