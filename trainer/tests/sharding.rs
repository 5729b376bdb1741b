//! `dist.shard` (ZeRO-1/2) through `step::train_step` itself, on 4 ranks joined by the CPU
//! backend (threads of this process): the steps of a sharded run against the replicated
//! run's, bit for bit where the arithmetic allows, and the optimizer state each rank holds.
//! (An overflow in one rank's share under amp: launch/tests/amp.rs.)

mod common;

use std::collections::BTreeMap;

use common::{on_ranks, parity_tiny, rows, Parts, Weights};
use oxclip_trainer::config::{DistConfig, LossConfig, Precision, Shard};
use oxclip_trainer::precision::{GradScaler, GradScalerConfig};
use oxclip_trainer::step::StepConfig;
use tch::{Device, Kind, Tensor};

const WORLD: usize = 4;
/// Samples per rank.
const ROWS: i64 = 4;
const STEPS: u64 = 3;

/// How a run is set up.
#[derive(Clone, Copy, Debug)]
struct Setup {
    shard: Shard,
    overlap: bool,
    clip: Option<f64>,
    precision: Precision,
}

impl Setup {
    fn new(shard: Shard) -> Self {
        Setup { shard, overlap: true, clip: None, precision: Precision::Fp32 }
    }
}

/// What one rank ends with.
struct Ended {
    weights: BTreeMap<String, Vec<f32>>,
    optimizer_bytes: u64,
}

/// `STEPS` steps of the parity model (lr 1e-3) on `WORLD` ranks, rank r on rows r ROWS .. of
/// a fixed batch.
fn run(setup: Setup) -> Vec<Ended> {
    // A fixed function, not libtorch's generator: that one is the process's, shared with the
    // tests running beside this one.
    let n = WORLD as i64 * ROWS;
    let images = (Tensor::arange(n * 3 * 32 * 32, (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .view([n, 3, 32, 32]);
    let tokens = (Tensor::arange(n * 16, (Kind::Int64, Device::Cpu)) * 7919).remainder(999) + 1;
    let tokens = tokens.view([n, 16]);
    let inputs = (0..WORLD).map(|r| (rows(&images, r, ROWS), rows(&tokens, r, ROWS))).collect();
    on_ranks(inputs, move |_, (images, tokens), comm| {
        // Small buckets: several per tower, parameters cut across chunks.
        let dist = DistConfig {
            shard: setup.shard,
            overlap: setup.overlap,
            bucket_mb: 0.05,
            ..DistConfig::default()
        };
        let weights = common::fixtures().join("parity_tiny/model.safetensors");
        let mut parts =
            Parts::new(&parity_tiny(), Weights::File(&weights), Kind::Float, &dist, comm);
        let cfg =
            StepConfig::new(setup.precision, Device::Cpu, &LossConfig::default(), setup.clip, None)
                .unwrap();
        let mut scaler = setup
            .precision
            .scales_loss()
            .then(|| GradScaler::new(Device::Cpu, GradScalerConfig::default()));
        for step in 0..STEPS {
            parts.step(comm, (&images, &tokens), 1e-3, step, cfg, scaler.as_mut());
        }
        let weights = parts
            .weights()
            .into_iter()
            .map(|(k, v)| (k, Vec::<f32>::try_from(v.to_kind(Kind::Float).flatten(0, -1)).unwrap()))
            .collect();
        Ended { weights, optimizer_bytes: parts.optimizer.state_bytes() }
    })
}

fn largest(weights: &BTreeMap<String, Vec<f32>>) -> f64 {
    weights.values().flatten().map(|v| v.abs() as f64).fold(0.0, f64::max)
}

fn largest_difference(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f64 {
    a.iter()
        .flat_map(|(k, v)| v.iter().zip(&b[k]).map(|(x, y)| (x - y).abs() as f64))
        .fold(0.0, f64::max)
}

/// Every rank of a run holds the very same weights.
fn replicas_agree(ranks: &[Ended], what: &str) {
    for (r, e) in ranks.iter().enumerate().skip(1) {
        assert!(e.weights == ranks[0].weights, "{what}: rank {r}'s weights differ from rank 0's");
    }
}

/// Without clipping the update is elementwise, and the CPU backend sums a reduce-scatter as it
/// sums an all-reduce: sharded runs end where the replicated run does, with the reduction
/// overlapped or not, bit for bit on this data and to the last bits of a few elements on other
/// data (3e-11 of the largest weight seen: the fused kernel's
/// vector loop and its scalar tail round differently, and a piece's boundaries move an
/// element from one to the other). Each rank holds a quarter of the moments (plus the
/// padding of the last chunk of each bucket).
#[test]
fn sharded_steps_equal_the_replicated_steps() {
    let replicated = run(Setup::new(Shard::None));
    let scale = largest(&replicated[0].weights);
    replicas_agree(&replicated, "replicated");
    let whole = replicated[0].optimizer_bytes;
    for shard in [Shard::Optimizer, Shard::Gradients] {
        for overlap in [true, false] {
            let sharded = run(Setup { overlap, ..Setup::new(shard) });
            let what = format!("{shard:?}, overlap {overlap}");
            replicas_agree(&sharded, &what);
            let diff = largest_difference(&sharded[0].weights, &replicated[0].weights);
            eprintln!("{what}: largest difference {:.1e} of the largest weight", diff / scale);
            assert!(diff <= 1e-9 * scale, "{what}: {diff} of {scale}");

            let held: u64 = sharded.iter().map(|e| e.optimizer_bytes).sum();
            assert_eq!(held, whole, "{what}: the ranks' moments add up to the whole");
            for (r, e) in sharded.iter().enumerate() {
                // Within one padded chunk (8 bytes of moments per element) per bucket of 0.05 MB.
                let quarter = whole / WORLD as u64;
                assert!(
                    e.optimizer_bytes.abs_diff(quarter) <= 8 * 12_500,
                    "{what}: rank {r} holds {} bytes of moments, a quarter is {quarter}",
                    e.optimizer_bytes
                );
            }
        }
    }
    // amp: the gradients unscaled piece by piece, the inf check agreed over ranks.
    let amp = |shard| Setup { precision: Precision::Amp, ..Setup::new(shard) };
    let (replicated, sharded) = (run(amp(Shard::None)), run(amp(Shard::Gradients)));
    replicas_agree(&sharded, "amp, sharded");
    let diff = largest_difference(&sharded[0].weights, &replicated[0].weights);
    assert!(diff <= 1e-9 * scale, "amp: {diff} of {scale}");
}

/// Clipping sums the ranks' partial squared norms, another order of summation than the
/// replicated norm's: the weights agree to rounding, here with a limit that bites every step.
#[test]
fn sharded_clipping_equals_the_replicated_clipping() {
    let clip = Some(0.05);
    let replicated = run(Setup { clip, ..Setup::new(Shard::None) });
    let sharded = run(Setup { clip, ..Setup::new(Shard::Gradients) });
    replicas_agree(&sharded, "sharded, clipped");
    let diff = largest_difference(&replicated[0].weights, &sharded[0].weights);
    let scale = largest(&replicated[0].weights);
    eprintln!(
        "clipped: sharded vs replicated, largest difference {:.2e} of the largest weight",
        diff / scale
    );
    assert!(diff <= 1e-6 * scale, "{diff} of {scale}");
    let unclipped = run(Setup::new(Shard::None));
    assert!(
        largest_difference(&unclipped[0].weights, &replicated[0].weights) > 1e-3 * scale,
        "the clipping bit"
    );
}
