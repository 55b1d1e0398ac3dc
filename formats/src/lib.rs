//! Datasets for convnets: a sharded, indexed, checksummed record format read through
//! mmap with zero copies and a reader for ImageNet TFRecords. The ImageNet packer, which
//! needs image codecs the loader never uses, is the `convnets-pack` crate beside this one.
//!
//! ```no_run
//! use convnets_formats::{Dataset, RecordSource};
//! let ds = Dataset::open("imagenet-packed")?;
//! let train = ds.split("train")?;
//! let rec = train.record(12_345)?; // O(1), no copy: `rec.data` borrows the mmap
//! println!("{} bytes, label {}, {}x{}", rec.data.len(), rec.label, rec.width, rec.height);
//! # Ok::<(), convnets_formats::Error>(())
//! ```
//!
//! The on-disk layout is specified in `FORMAT.md` beside this crate.

pub mod atomic;
pub mod dataset;
pub mod error;
pub mod jpeg;
pub mod lock;
pub mod manifest;
pub mod names;
pub mod shard;
pub mod tfrecord;
pub mod verify;

pub use dataset::{Dataset, SplitReader};
pub use error::{Error, Result};
pub use manifest::{ClassInfo, Manifest, ShardInfo, SplitInfo};
pub use shard::{IndexEntry, ShardReader, ShardSummary, ShardWriter};

use bytes::Bytes;

/// PIL's `Image.MAX_IMAGE_PIXELS`: larger images are treated as decompression bombs, by the
/// packer before decoding and by the loader before sizing a buffer.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// What the loader needs to plan a sample before decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    pub label: u32,
    pub width: u32,
    pub height: u32,
    /// Encoded size in bytes.
    pub len: u32,
}

/// One record: the encoded image (a view into the mapped file) and its metadata.
#[derive(Debug, Clone)]
pub struct Record {
    pub data: Bytes,
    pub label: u32,
    pub width: u32,
    pub height: u32,
}

/// Random access to the records of one split, whatever the files underneath.
pub trait RecordSource: Send + Sync {
    /// Number of records.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Label and size of record `i`, without touching its bytes.
    fn meta(&self, i: usize) -> Result<RecordMeta>;
    /// Record `i`, its checksum verified.
    fn record(&self, i: usize) -> Result<Record>;
    /// Record `i`, its checksum verified only where that costs nothing extra.
    fn record_unchecked(&self, i: usize) -> Result<Record> {
        self.record(i)
    }
    /// Where record `i` lives, for error messages: (file, index within the file).
    fn locate(&self, i: usize) -> Result<(std::path::PathBuf, u64)>;
}
