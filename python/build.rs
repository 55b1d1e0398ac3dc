// libtorch's link set-up shared by every crate of the repository (rpath, and with the
// `cuda` feature libtorch_cuda and nvJPEG); LIBTORCH and CONVNETS_NVLIB come from the
// repository's .cargo/config.toml, which cargo finds from here too.
#[path = "../build/link_libtorch.rs"]
mod link_libtorch;

fn main() {
    link_libtorch::link();
}
