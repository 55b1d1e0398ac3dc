//! The CPU stage: decode and augment on worker threads, into caller-owned buffers.

pub mod augment;
pub mod decode;
