// The test binaries link libtorch; give them an rpath so they run without LD_LIBRARY_PATH
// (torch-sys sets none). And the gradient-ready hook shim (csrc/grad_hooks.cpp), compiled
// against the same libtorch's headers with torch-sys's flags.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=csrc/grad_hooks.cpp");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: point it at libtorch (the Makefile fetches it, see README)");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .file("csrc/grad_hooks.cpp")
        .include(format!("{libtorch}/include"))
        .include(format!("{libtorch}/include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("oxclip_grad_hooks");
}
