//! `oxclip bench loss`: the tiled loss and the N x N oracle agree, and the output is one
//! JSON line with what the docs promise. `oxclip bench train` takes `--patch-dropout` and
//! `--grad-checkpointing`.

mod util;

use util::*;

#[test]
fn bench_loss_tiled_and_naive_agree() {
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = run_ok(
            oxclip()
                .args(["bench", "loss", "--batch", "300", "--dim", "16", "--device", "cpu"])
                .args(extra),
        );
        serde_json::from_slice(&out.stdout).expect("one JSON line")
    };
    let (tiled, naive) = (run(&["--tile", "64"]), run(&["--naive"]));
    assert_eq!(tiled["tile"], 64);
    assert!(naive["tile"].is_null());
    let (a, b) = (tiled["loss"].as_f64().expect("loss"), naive["loss"].as_f64().expect("loss"));
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    assert!(tiled["seconds"].as_f64().expect("seconds") >= 0.0);
    assert!(tiled["peak_rss_bytes"].as_u64().expect("rss") > 0);
    let bad = oxclip().args(["bench", "loss", "--batch", "0"]).output().expect("runs");
    assert!(!bad.status.success());

    // SigLIP: tiled and the autograd oracle; bf16 products within bf16 rounding.
    let (tiled, naive, bf16) = (
        run(&["--kind", "siglip", "--tile", "64"]),
        run(&["--kind", "siglip", "--naive"]),
        run(&["--kind", "siglip", "--tile", "64", "--bf16"]),
    );
    assert_eq!((tiled["kind"].as_str(), bf16["matmul"].as_str()), (Some("siglip"), Some("bf16")));
    let (a, b, c) = (
        tiled["loss"].as_f64().expect("loss"),
        naive["loss"].as_f64().expect("loss"),
        bf16["loss"].as_f64().expect("loss"),
    );
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    // bf16 products of these aligned pairs (text = image + noise, D = 16, N = 300): measured
    // 2.0e-4 relative, held at 1e-3. The loss's own rounding shrinks as N grows (under 1e-6 at
    // N = 16,384, D = 512: docs/benchmarks.md).
    assert!((c - b).abs() <= 1e-3 * b.abs(), "bf16 {c} vs {b}");
}

/// `oxclip bench optim`: both updates timed in one run by default, one with `--impl`.
#[test]
fn bench_optim_times_the_loop_and_the_fused_update() {
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = run_ok(
            oxclip()
                .args(["bench", "optim", "--model", "tiny", "--steps", "2", "--warmup", "1"])
                .args(["--device", "cpu"])
                .args(extra),
        );
        serde_json::from_slice(&out.stdout).expect("one JSON line")
    };
    let both = run(&[]);
    assert_eq!(both["bench"], "optim");
    assert!(both["tensors"].as_u64().expect("tensors") > 2);
    let (l, f) = (
        both["loop_step_secs"].as_f64().expect("loop timed"),
        both["fused_step_secs"].as_f64().expect("fused timed"),
    );
    assert!(l > 0.0 && f > 0.0);
    // Within an ulp or two, not equal: serde_json (without its `float_roundtrip` feature)
    // may read a printed float back one ulp off.
    let speedup = both["speedup"].as_f64().expect("speedup");
    assert!(
        (speedup - l / f).abs() <= 1e-12 * speedup,
        "speedup {speedup}, loop / fused {}",
        l / f
    );
    let fused = run(&["--impl", "fused"]);
    assert!(fused["loop_step_secs"].is_null() && fused["speedup"].is_null());
    assert!(fused["fused_step_secs"].as_f64().expect("fused timed") > 0.0);
}

#[test]
fn bench_train_runs_with_patch_dropout() {
    let result = bench_train_tiny(2, 1, &["--patch-dropout", "0.5"]);
    assert_eq!(result["patch_dropout"].as_f64(), Some(0.5));
    assert_eq!(result["steps"].as_u64(), Some(2));
    assert!(result["samples_per_second"].as_f64().expect("throughput") > 0.0);
    assert!(result["cpu_seconds"].as_f64().expect("CPU time") > 0.0, "{result}");
    let bad = oxclip()
        .args(["bench", "train", "--model", "tiny", "--device", "cpu", "--patch-dropout", "1.5"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--patch-dropout must be in [0, 1)"));
}

/// `bench train --grad-checkpointing`: the step runs checkpointed and says so, with the peak
/// memory and the CPU seconds that docs/benchmarks.md compares.
#[test]
fn bench_train_takes_grad_checkpointing() {
    let result = bench_train_tiny(1, 0, &["--grad-checkpointing"]);
    assert_eq!(result["grad_checkpointing"], true);
    assert!(result["cpu_seconds"].as_f64().expect("cpu seconds") > 0.0);
    assert!(result["peak_rss_bytes"].as_u64().expect("rss") > 0);
}
