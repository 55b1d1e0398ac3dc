//! The convnets input pipeline: reads packed datasets and turns them into batches of
//! tensors. The GPU path (nvJPEG decode, fused augment kernels) sits behind the `cuda`
//! feature; a build without it keeps the same API and answers GPU requests with
//! [`Error::BuiltWithoutCuda`].
//!
//! ```
//! match convnets_pipeline::device::gpus() {
//!     Ok(gpus) => println!("{} GPU(s)", gpus.len()),
//!     Err(e) => println!("no GPU path: {e}"),
//! }
//! ```

pub mod cpu;
pub mod device;
#[cfg(feature = "cuda")]
mod gpu;
pub mod loader;
pub mod plan;
pub mod sampler;

/// Errors of the input pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("built without CUDA: {what} needs a build with `--features cuda`")]
    BuiltWithoutCuda { what: &'static str },
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("nvJPEG: {call} failed with status {status}")]
    Nvjpeg { call: &'static str, status: i32 },
    #[error("{}: record {record}: {reason}", path.display())]
    Record {
        path: std::path::PathBuf,
        record: u64,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Format(#[from] convnets_formats::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
