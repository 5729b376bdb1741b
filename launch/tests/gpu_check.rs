//! scripts/gpu-check.sh without a GPU: the script parses, and its verdict passes good
//! numbers and fails each kind of bad one (tiled != naive loss, NCCL != single process, slow
//! throughput, a step that did not run, a command that failed), so a device run can fail.

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository root")
}

#[test]
fn gpu_check_script_parses() {
    let out = Command::new("bash").arg("-n").arg(repo().join("scripts/gpu-check.sh")).output().expect("bash runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn gpu_check_verdict_fails_what_it_should() {
    let out = Command::new("python3").arg(repo().join("scripts/gpu_check_verdict.py")).arg("--self-test").output().expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("11 passed, 0 failed"), "{stdout}");
}
