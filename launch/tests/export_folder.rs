//! `oxclip export` keeps what it did not write: a folder holding other files is refused and
//! left byte for byte as it was; the folder of an earlier export is written over, and the
//! earlier export's files this one does not write again go.

mod util;

use std::path::{Path, PathBuf};

use util::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn export(out: &Path, format: &str) -> std::process::Output {
    oxclip()
        .args(["export", "--model"])
        .arg(fixtures().join("models/parity-tiny.yaml"))
        .arg("--checkpoint")
        .arg(fixtures().join("parity_tiny/model.safetensors"))
        .args(["--format", format, "--out"])
        .arg(out)
        .output()
        .expect("oxclip runs")
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn an_export_refuses_files_it_did_not_write_and_replaces_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A folder of the user's: refused, untouched.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::fs::write(theirs.join("config.json"), "{\"mine\": true}\n").expect("write");
    std::fs::write(theirs.join("README.md"), "# my model\n").expect("write");
    let out = export(&theirs, "hf");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exported over the user's files");
    assert!(
        stderr.contains("2 file(s) that an oxclip export did not write")
            && stderr.contains("README.md")
            && stderr.contains("config.json"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(theirs.join("config.json")).expect("kept"),
        "{\"mine\": true}\n"
    );
    assert_eq!(std::fs::read_to_string(theirs.join("README.md")).expect("kept"), "# my model\n");
    assert_eq!(names(&theirs), ["README.md", "config.json"]);

    // Its own earlier export: written over; what it does not write again goes.
    let ours = dir.path().join("ours");
    assert!(export(&ours, "open_clip").status.success());
    assert_eq!(
        names(&ours),
        [".oxclip-export.json", "open_clip_config.json", "open_clip_model.safetensors"]
    );
    let again = export(&ours, "hf");
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(
        names(&ours),
        [".oxclip-export.json", "config.json", "model.safetensors", "preprocessor_config.json"]
    );
    // And the folder loads back as a model.
    let back = dir.path().join("back");
    run_ok(
        oxclip()
            .args(["export", "--format", "open_clip", "--checkpoint"])
            .arg(&ours)
            .arg("--out")
            .arg(&back),
    );
}
