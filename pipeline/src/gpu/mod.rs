//! The GPU stage's parts (feature `cuda`): nvJPEG batched decoding on the GPU's JPEG
//! engines, the fused augment kernel, and the lanes' device and page-locked buffers. The
//! GPU backend of [`Loader`](crate::loader::Loader) (`loader/gpu.rs`, `Backend::Gpu`)
//! drives them, as the CPU backend drives [`cpu`](crate::cpu).

pub(crate) mod kernel;
pub(crate) mod memory;
pub(crate) mod nvjpeg;
