//! Opening a split for reading, whatever the folder holds: a packed dataset (manifest +
//! shards) or the TFRecords of TensorFlow's `build_imagenet_data.py`, read in place.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use convnets_formats::tfrecord::{list_tfrecord_files, TfRecordSource};
use convnets_formats::{manifest::MANIFEST_NAME, Dataset, RecordSource};

/// `split` is `train` or `val`; in a TFRecord folder `val` reads the `validation-*` files
/// and labels are shifted down by `label_offset` (1 for `build_imagenet_data.py`).
pub fn open_split(dir: &Path, split: &str, label_offset: i64) -> anyhow::Result<Arc<dyn RecordSource>> {
    if dir.join(MANIFEST_NAME).is_file() {
        return Ok(Arc::new(Dataset::open(dir)?.split(split)?));
    }
    let prefix = match split {
        "val" | "validation" => "validation",
        other => other,
    };
    match list_tfrecord_files(dir, prefix) {
        Ok(files) => Ok(Arc::new(
            TfRecordSource::open(&files, label_offset)
                .with_context(|| format!("indexing the {prefix}-* TFRecords of {}", dir.display()))?,
        )),
        Err(_) if dir.is_dir() => bail!(
            "{}: neither a packed dataset ({MANIFEST_NAME}) nor a folder of {prefix}-* TFRecords",
            dir.display()
        ),
        Err(_) => bail!("{}: no such dataset folder", dir.display()),
    }
}
