//! The ImageNet packer: an ImageNet folder or a TFRecord folder in, a convnets dataset
//! folder (manifest + shards, as `convnets-formats` reads them) out, with every input file
//! checked on the way ([`sanitize`]). It is a crate of its own because the checks need image
//! codecs (`image`, `jpeg-encoder`) that the loader, which depends on `convnets-formats`,
//! never uses.
//!
//! ```no_run
//! use convnets_pack::pack::{pack, PackOptions, PackSource, Quiet};
//! let source = PackSource::ImageFolder { root: "/data/imagenet".into(), val_labels: None };
//! let report = pack(&source, "/data/imagenet-packed".as_ref(), &PackOptions::default(), &Quiet)?;
//! println!("{} files not stored as is", report.files.len());
//! # Ok::<(), convnets_formats::Error>(())
//! ```

pub mod pack;
pub mod sanitize;
pub mod strict_decode;
