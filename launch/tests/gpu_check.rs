//! scripts/gpu-check.sh without a GPU: the script parses, and its verdict passes good
//! numbers and fails each kind of bad one (tiled != naive loss, NCCL != single process, slow
//! throughput, a step that did not run, a command that failed), so a device run can fail.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository root")
}

#[test]
fn gpu_check_script_parses() {
    let out = Command::new("bash")
        .arg("-n")
        .arg(repo().join("scripts/gpu-check.sh"))
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn gpu_check_verdict_fails_what_it_should() {
    let out = Command::new("python3")
        .arg(repo().join("scripts/gpu_check_verdict.py"))
        .arg("--self-test")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("18 passed, 0 failed"), "{stdout}");
}

/// A stand-in for the oxclip binary: the JSON lines gpu-check.sh's loss and large-batch
/// sections read, with the tiled loss off by `FAKE_TILED_ERROR` (relative) or the N = 65536
/// loss runs failing (`FAKE_EXIT`).
const FAKE_OXCLIP: &str = r#"#!/usr/bin/env bash
# A stand-in for target/release/oxclip: the JSON lines gpu-check.sh reads, no GPU.
[ "$1" = --version ] && { echo "oxclip fake"; exit 0; }
kind=clip batch=0 naive=false bf16=false bs=0 micro=null
while [ $# -gt 0 ]; do
  case $1 in
    --kind) kind=$2; shift ;; --batch) batch=$2; shift ;; --naive) naive=true ;; --bf16) bf16=true ;;
    --batch-size) bs=$2; shift ;; --micro-batch-size) micro=$2; shift ;;
  esac
  shift
done
[ -n "${FAKE_EXIT:-}" ] && [ "$batch" = 65536 ] && exit 3
if [ "$bs" != 0 ]; then
  echo "{\"bench\":\"train\",\"batch_size\":$bs,\"micro_batch_size\":$micro,\"samples_per_second\":1000.0}"
else
  loss=$([ "$kind" = clip ] && echo 9.7 || echo 0.72)
  [ "$naive" = false ] && [ -n "${FAKE_TILED_ERROR:-}" ] && loss=$(python3 -c "print($loss * (1 + $FAKE_TILED_ERROR))")
  tile=$([ "$naive" = true ] && echo null || echo 4096)
  matmul=$([ "$bf16" = true ] && echo bf16 || echo fp32)
  echo "{\"bench\":\"loss\",\"kind\":\"$kind\",\"batch\":$batch,\"dim\":512,\"tile\":$tile,\"matmul\":\"$matmul\",\"loss\":$loss}"
fi
"#;

/// gpu-check.sh end to end on a machine without a GPU (a fake binary and nvidia-smi): exit
/// 0 when every number agrees, non-zero when a comparison fails or a command does.
#[test]
fn gpu_check_script_exits_non_zero_on_a_failed_comparison_or_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    for (name, text) in [
        ("oxclip", FAKE_OXCLIP),
        ("nvidia-smi", "#!/bin/sh\necho 'name, memory.total, driver_version'\n"),
    ] {
        let path = bin.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let run = |env: &[(&str, &str)]| {
        let out = dir.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("scripts/gpu-check.sh"))
            .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
            .env("OUT", &out)
            .env("BIN", bin.join("oxclip"))
            .env("SECTIONS", "loss large")
            .env("GPU_CHECK_BUDGET_S", "120")
            .env("OXCLIP_VOCAB", "unused")
            .env_remove("GPU_CHECK_INNER");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let done = cmd.output().expect("bash runs");
        (done.status.code(), String::from_utf8_lossy(&done.stdout).into_owned())
    };
    let (code, stdout) = run(&[]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("23 passed, 0 failed"), "{stdout}");
    let (code, stdout) = run(&[("FAKE_TILED_ERROR", "1e-3")]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL loss: clip N=16384 tiled fp32") && stdout.contains("3 failed"),
        "{stdout}"
    );
    let (code, stdout) = run(&[("FAKE_EXIT", "1")]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("FAIL command failed: status 3"), "{stdout}");
}
