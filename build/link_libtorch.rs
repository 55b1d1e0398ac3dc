// Shared build script (included by every crate whose tests or binaries link libtorch).
//
// tch finds libtorch through LIBTORCH (set in .cargo/config.toml). We add an rpath so
// binaries and `cargo test` run without LD_LIBRARY_PATH, and with the `cuda` feature we
// force a dependency on libtorch_cuda.so (tch alone drops it with --as-needed, and then
// CUDA is silently unavailable) and put the folder holding libnvjpeg.so on the link path.
// `tools/build.rs` includes this file as a module and calls `link` before compiling its C++.
#[allow(dead_code)]
fn main() {
    link();
}

pub fn link() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=CONVNETS_NVLIB");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup first");
        return;
    };
    let torch_lib = std::path::Path::new(&libtorch).join("lib");
    println!("cargo:rustc-link-search=native={}", torch_lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", torch_lib.display());
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        if let Ok(nvlib) = std::env::var("CONVNETS_NVLIB") {
            println!("cargo:rustc-link-search=native={nvlib}");
            // Follow the symlink so the rpath names the real folder of libnvjpeg.so.13.
            let real = std::fs::canonicalize(std::path::Path::new(&nvlib).join("libnvjpeg.so"));
            if let Some(dir) = real.ok().as_deref().and_then(std::path::Path::parent) {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            }
        }
    }
}
