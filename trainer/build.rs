// The test binaries link libtorch; give them an rpath so they run without LD_LIBRARY_PATH
// (torch-sys sets none). And the C++ shims (csrc/grad_hooks.cpp: gradient-ready hooks;
// csrc/autocast.cpp: autocast on any device, the gradient scaler's kernel), compiled
// against the same libtorch's headers with torch-sys's flags: only against the libtorch
// version torch-sys expects, as a shim built on other headers than the library tch binds
// would disagree with it on C++ layouts that no linker checks.

/// The torch-sys this pairing was checked against, and the libtorch version (major.minor) it
/// expects: its build.rs's TORCH_VERSION ("2.11.0" in torch-sys 0.24).
const TORCH_SYS: (&str, &str) = ("0.24", "2.11");

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_BYPASS_VERSION_CHECK");
    println!("cargo:rerun-if-changed=csrc/grad_hooks.cpp");
    println!("cargo:rerun-if-changed=csrc/optim.cpp");
    println!("cargo:rerun-if-changed=csrc/host_reads.cpp");
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        fail("LIBTORCH is not set: point it at libtorch (the Makefile fetches it, see README)");
    };
    check_torch_sys_pairing();
    check_libtorch_version(&libtorch);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .file("csrc/grad_hooks.cpp")
        .file("csrc/optim.cpp")
        .file("csrc/host_reads.cpp")
        .file("csrc/autocast.cpp")
        .include(format!("{libtorch}/include"))
        .include(format!("{libtorch}/include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // libtorch's release build is compiled with NDEBUG, and some of its headers declare
        // members only without it (RecordFunction's `inputs_valid_`): every shim must see the
        // layouts the library was built with.
        .define("NDEBUG", None)
        .warnings(false)
        .compile("oxclip_grad_hooks");
}

/// Stops the build with `message`.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

/// `$LIBTORCH/build-version` (`2.11.0+cpu`, `2.11.0+cu130`) must name the major.minor that
/// torch-sys expects, as torch-sys itself checks (which lets a missing file pass: here it does
/// not, since the shim's headers would then be of an unknown version). Skipped, as in
/// torch-sys, under LIBTORCH_BYPASS_VERSION_CHECK.
fn check_libtorch_version(libtorch: &str) {
    let path = format!("{libtorch}/build-version");
    println!("cargo:rerun-if-changed={path}");
    if std::env::var_os("LIBTORCH_BYPASS_VERSION_CHECK").is_some() {
        return;
    }
    let expected = TORCH_SYS.1;
    let Ok(text) = std::fs::read_to_string(&path) else {
        fail(&format!(
            "{path} is missing or unreadable, so the version of the libtorch at LIBTORCH is \
             unknown; tch's torch-sys expects libtorch {expected}.x (the Makefile fetches it, see \
             README), or set LIBTORCH_BYPASS_VERSION_CHECK=1 to build against it anyway"
        ));
    };
    let version = text.trim();
    let release = version.split_once('+').map_or(version, |(release, _)| release);
    let major_minor: Vec<&str> = release.split('.').take(2).collect();
    if major_minor.join(".") != expected {
        fail(&format!(
            "LIBTORCH={libtorch} is libtorch {version} ({path}), but tch's torch-sys expects \
             libtorch {expected}.x: point LIBTORCH at libtorch {expected} (the Makefile fetches \
             it, see README), or set LIBTORCH_BYPASS_VERSION_CHECK=1 to build against it anyway"
        ));
    }
}

/// The torch-sys in Cargo.lock must be the one [`TORCH_SYS`] names, so that a tch upgrade
/// cannot leave the expected libtorch version behind. Without a Cargo.lock (this crate built
/// from elsewhere) there is nothing to compare.
fn check_torch_sys_pairing() {
    let Ok(manifest_dir) = std::env::var("CARGO_MANIFEST_DIR") else { return };
    let lock = std::path::Path::new(&manifest_dir).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let Ok(text) = std::fs::read_to_string(&lock) else { return };
    let mut lines = text.lines();
    let Some(locked) = lines
        .by_ref()
        .find(|line| line.trim() == "name = \"torch-sys\"")
        .and_then(|_| lines.next())
        .and_then(|line| line.trim().strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
    else {
        return;
    };
    let (pinned, libtorch) = TORCH_SYS;
    if !locked.starts_with(&format!("{pinned}.")) {
        fail(&format!(
            "Cargo.lock has torch-sys {locked}, but trainer/build.rs pairs torch-sys {pinned} with \
             libtorch {libtorch}: set TORCH_SYS there to this torch-sys and the major.minor of \
             the TORCH_VERSION in its build.rs"
        ));
    }
}
