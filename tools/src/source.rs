//! Opening a split for reading, whatever the folder holds: a packed dataset (manifest +
//! shards) or the TFRecords of TensorFlow's `build_imagenet_data.py`, read in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use convnets_formats::manifest::{shard_path, MANIFEST_NAME};
use convnets_formats::tfrecord::{list_tfrecord_files, TfRecordSource};
use convnets_formats::{Dataset, RecordSource};

/// `split` is `train` or `val`; in a TFRecord folder `val` reads the `validation-*` files
/// and labels are shifted down by `label_offset` (1 for `build_imagenet_data.py`).
pub fn open_split(
    dir: &Path,
    split: &str,
    label_offset: i64,
) -> anyhow::Result<Arc<dyn RecordSource>> {
    if dir.join(MANIFEST_NAME).is_file() {
        return Ok(Arc::new(Dataset::open(dir)?.split(split)?));
    }
    let prefix = tfrecord_prefix(split);
    let files = tfrecord_files(dir, prefix)?;
    Ok(Arc::new(
        TfRecordSource::open(&files, label_offset)
            .with_context(|| format!("indexing the {prefix}-* TFRecords of {}", dir.display()))?,
    ))
}

/// The files [`open_split`] maps for `split`: the split's shards of a packed dataset, or
/// its TFRecord files. Nothing is opened but the manifest.
pub fn split_files(dir: &Path, split: &str) -> anyhow::Result<Vec<PathBuf>> {
    if dir.join(MANIFEST_NAME).is_file() {
        let dataset = Dataset::open(dir)?;
        let Some(info) = dataset.manifest().split(split) else {
            bail!(
                "{}: no split '{split}' (the dataset has: {})",
                dir.display(),
                dataset.split_names().collect::<Vec<_>>().join(", ")
            );
        };
        return Ok(info.shards.iter().map(|s| shard_path(dir, s)).collect());
    }
    tfrecord_files(dir, tfrecord_prefix(split))
}

fn tfrecord_files(dir: &Path, prefix: &str) -> anyhow::Result<Vec<PathBuf>> {
    match list_tfrecord_files(dir, prefix) {
        Ok(files) => Ok(files),
        Err(_) if dir.is_dir() => bail!(
            "{}: neither a packed dataset ({MANIFEST_NAME}) nor a folder of {prefix}-* TFRecords",
            dir.display()
        ),
        Err(_) => bail!("{}: no such dataset folder", dir.display()),
    }
}

/// `val` is called `validation` in `build_imagenet_data.py`'s file names.
fn tfrecord_prefix(split: &str) -> &str {
    match split {
        "val" | "validation" => "validation",
        other => other,
    }
}
