//! The GPU path (feature `cuda`): nvJPEG batched decoding on the GPU's JPEG engines and
//! one fused augment kernel per batch, behind the same [`Loader`](crate::loader::Loader)
//! API as the CPU path (`Backend::Gpu`).

mod kernel;
mod loader;
mod memory;
mod nvjpeg;

pub(crate) use loader::GpuLoader;
