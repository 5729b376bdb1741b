// The `oxclip` binary runs without LD_LIBRARY_PATH: torch-sys sets no rpath, so add one to
// libtorch's lib directory. With a CUDA libtorch, link libtorch_cuda
// even though no symbol of it is referenced: loading it is what registers the CUDA backend.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let lib = std::path::Path::new(&libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
