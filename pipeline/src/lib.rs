//! The convnets input pipeline: reads packed datasets and turns them into batches of
//! tensors. The GPU path (nvJPEG decode, fused augment kernels) sits behind the `cuda`
//! feature; a build without it keeps the same API and answers GPU requests with
//! [`Error::BuiltWithoutCuda`].
//!
//! The entry point is [`Loader`]: a [`RecordSource`](convnets_formats::RecordSource), a
//! [`LoaderConfig`] and a [`LoaderState`] in, batches of tch tensors out (see [`loader`]
//! for an example). [`LoaderConfig::default`] is ImageNet training at 224 x 224 on the CPU.
//!
//! ```
//! use convnets_pipeline::{Backend, LoaderConfig, OutputDtype};
//!
//! let mut cfg = LoaderConfig::default();
//! cfg.sampler.batch_size = 256;
//! cfg.output.dtype = OutputDtype::F16;
//! assert_eq!(cfg.backend, Backend::Cpu);
//! match convnets_pipeline::device::gpus() {
//!     Ok(gpus) => println!("{} GPU(s)", gpus.len()),
//!     Err(e) => println!("no GPU path: {e}"),
//! }
//! ```
//!
//! Modules: [`loader`] (the facade and its CPU and GPU backends), [`output`] (what a batch
//! looks like), [`sampler`] and [`plan`] (which records, which crops), [`cpu`] (the CPU
//! decoder and augmenter), `gpu` (nvJPEG, the augment kernel; feature `cuda`), [`device`].

pub mod cpu;
pub mod device;
#[cfg(feature = "cuda")]
mod gpu;
pub mod loader;
pub mod output;
pub mod plan;
pub mod sampler;

pub use loader::{
    Backend, BadRecordPolicy, Batch, GpuOptions, Loader, LoaderConfig, LoaderState, LoaderStats,
    SkippedRecord, Transform,
};
pub use output::{Layout, Normalize, OutputDtype, OutputSpec};

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
    /// A record of the split whose shard could not be named.
    #[error("record {index}: {reason}")]
    RecordIndex { index: usize, reason: String },
    /// No record of a batch could be decoded (skip policy: nothing to fill the batch with).
    #[error("every record of batch {batch} of epoch {epoch} failed to decode")]
    AllRecordsFailed { epoch: u64, batch: usize },
    /// The loader's threads (or a channel between them) are gone.
    #[error("{what} stopped")]
    Stopped { what: &'static str },
    #[error("cannot start thread {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    /// The JPEG decoder could not be set up (not about any one image).
    #[error("cannot start the JPEG decoder: {0}")]
    DecoderStart(String),
    #[error(transparent)]
    Augment(#[from] cpu::augment::AugmentError),
    #[error("invalid configuration: {0}")]
    Config(String),
    /// libtorch could not allocate a batch's memory (out of memory).
    #[error("cannot allocate {what}: {reason}")]
    Alloc { what: String, reason: String },
    #[error(transparent)]
    Format(#[from] convnets_formats::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
