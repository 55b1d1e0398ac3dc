// The libtorch link set-up shared by every crate (build/link_libtorch.rs), then the C++
// shim over libtorch's ATen API that tch does not bind (csrc/): the fused optimizer and
// finite-check ops always, CUDA graphs and stream fences with the `cuda` feature. It is
// compiled against the headers of the same libtorch, as torch-sys compiles its own C++.
#[path = "../build/link_libtorch.rs"]
mod link_libtorch;

use std::path::{Path, PathBuf};

fn main() {
    link_libtorch::link();
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        return;
    };
    let libtorch = PathBuf::from(libtorch);
    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(libtorch.join("include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/step_ops.cpp");
    if cuda {
        build.file("csrc/cuda_graph.cpp");
        if let Some(include) = cuda_include() {
            build.include(include);
        }
    }
    build.compile("convnets_cx");
    if cuda {
        // Referenced directly by the shim; --as-needed would otherwise keep it out.
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// The CUDA runtime headers c10's CUDA headers include: from CUDA_HOME, else from the
/// `nvidia` wheels of the venv that holds libtorch (found through the libnvjpeg.so link
/// scripts/setup makes in CONVNETS_NVLIB).
fn cuda_include() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let dir = Path::new(&home).join("include");
        if dir.join("cuda_runtime_api.h").exists() {
            return Some(dir);
        }
    }
    let nvlib = std::env::var("CONVNETS_NVLIB").ok()?;
    let real = std::fs::canonicalize(Path::new(&nvlib).join("libnvjpeg.so")).ok()?;
    let dir = real.parent()?.parent()?.join("include");
    dir.join("cuda_runtime_api.h").exists().then_some(dir)
}
