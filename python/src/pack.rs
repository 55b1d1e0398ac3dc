//! `convnets.pack_imagenet`: the packer of `convnets pack-imagenet` (tools/src/pack.rs) with
//! the same defaults, minus the progress bar.

use std::path::PathBuf;

use convnets_formats::tfrecord::list_tfrecord_files;
use convnets_pack::pack::{pack, PackOptions, PackSource, Quiet, ShardSizing};
use convnets_pack::sanitize::{AwkwardPolicy, SanitizeOptions};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::Error;

/// Packs an ImageNet folder (`train/<wnid>/*.JPEG`, `val/`) or a TFRecord folder into a
/// dataset folder; returns the report (`pack-report.json`) as JSON text. The GIL is
/// released while packing.
#[pyfunction]
#[pyo3(signature = (
    input, output, *, format = "auto", val_labels = None, label_offset = 1,
    train_shards = None, val_shards = None, shard_size = 128 << 20, seed = 0, threads = 0,
    max_side = None, quality = 95, awkward = "reencode", decode_check = true, strict = false
))]
#[allow(clippy::too_many_arguments)]
pub fn pack_imagenet(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    format: &str,
    val_labels: Option<PathBuf>,
    label_offset: i64,
    train_shards: Option<usize>,
    val_shards: Option<usize>,
    shard_size: u64,
    seed: u64,
    threads: usize,
    max_side: Option<u32>,
    quality: u8,
    awkward: &str,
    decode_check: bool,
    strict: bool,
) -> PyResult<String> {
    let tfrecords = match format {
        "auto" => ["train", "validation"]
            .iter()
            .any(|p| list_tfrecord_files(&input, p).is_ok()),
        "tfrecord" => true,
        "folder" => false,
        other => {
            return Err(PyValueError::new_err(format!(
                "format must be 'auto', 'folder' or 'tfrecord', got {other:?}"
            )))
        }
    };
    let source = if tfrecords {
        PackSource::TfRecords {
            dir: input.clone(),
            label_offset,
        }
    } else {
        PackSource::ImageFolder {
            root: input.clone(),
            val_labels,
        }
    };
    let sizing = match (train_shards, val_shards) {
        (Some(train), Some(val)) if train > 0 && val > 0 => ShardSizing::Count { train, val },
        (None, None) if shard_size > 0 => ShardSizing::TargetBytes(shard_size),
        (None, None) => return Err(PyValueError::new_err("shard_size must be at least 1")),
        _ => {
            return Err(PyValueError::new_err(
                "train_shards and val_shards go together, each at least 1",
            ))
        }
    };
    if max_side == Some(0) || !(1..=100).contains(&quality) {
        return Err(PyValueError::new_err(
            "max_side must be at least 1 and quality within 1..=100",
        ));
    }
    let awkward = match awkward {
        "reencode" => AwkwardPolicy::Reencode,
        "skip" => AwkwardPolicy::Skip,
        other => {
            return Err(PyValueError::new_err(format!(
                "awkward must be 'reencode' or 'skip', got {other:?}"
            )))
        }
    };
    let defaults = PackOptions::default();
    let opts = PackOptions {
        seed,
        sizing,
        sanitize: SanitizeOptions {
            max_side,
            awkward,
            quality,
            verify_decode: decode_check,
            ..defaults.sanitize
        },
        threads,
        strict,
        ..defaults
    };
    let report = py
        .allow_threads(|| pack(&source, &output, &opts, &Quiet))
        .map_err(|e| {
            Error::new_err(format!(
                "packing {} into {}: {e}",
                input.display(),
                output.display()
            ))
        })?;
    serde_json::to_string(&report).map_err(|e| Error::new_err(e.to_string()))
}
