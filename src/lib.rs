//! convnets: train ResNet-family image classifiers on ImageNet-scale data, fed by a
//! fast input pipeline. This crate re-exports the workspace's crates under one name.
//!
//! - [`formats`]: the packed shard format, manifest, TFRecord reader.
//! - [`pack`]: the ImageNet packer and its per-image checks.
//! - [`pipeline`]: the input pipeline (CPU path; GPU path behind the `cuda` feature).
//! - [`models`]: the ResNet family in tch.
//! - [`tools`]: the `convnets` command-line tool, callable in-process.

pub use convnets_formats as formats;
pub use convnets_models as models;
pub use convnets_pack as pack;
pub use convnets_pipeline as pipeline;
pub use convnets_tools as tools;
