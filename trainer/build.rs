// The test binaries link libtorch; give them an rpath so they run without LD_LIBRARY_PATH
// (torch-sys sets none).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
}
