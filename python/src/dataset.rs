//! Opening datasets: a packed dataset's description, and a split of a packed dataset or of
//! a TFRecord folder for the loader.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use convnets_formats::manifest::MANIFEST_NAME;
use convnets_formats::tfrecord::{list_tfrecord_files, TfRecordSource};
use convnets_formats::{Dataset, RecordSource};
use pyo3::prelude::*;

use crate::{format_err, Error};

/// A split as `convnets train` opens it (tools/src/source.rs): a packed dataset (manifest
/// + shards), else the `train-*` / `validation-*` files of TensorFlow's
///   `build_imagenet_data.py`, whose labels are shifted down by `label_offset`.
pub fn open_split(dir: &Path, split: &str, label_offset: i64) -> PyResult<Arc<dyn RecordSource>> {
    if dir.join(MANIFEST_NAME).is_file() {
        let dataset = Dataset::open(dir).map_err(format_err)?;
        return Ok(Arc::new(dataset.split(split).map_err(format_err)?));
    }
    let prefix = match split {
        "val" | "validation" => "validation",
        other => other,
    };
    let files = match list_tfrecord_files(dir, prefix) {
        Ok(files) => files,
        Err(_) if dir.is_dir() => {
            return Err(Error::new_err(format!(
            "{}: neither a packed dataset ({MANIFEST_NAME}) nor a folder of {prefix}-* TFRecords",
            dir.display()
        )))
        }
        Err(_) => {
            return Err(Error::new_err(format!(
                "{}: no such dataset folder",
                dir.display()
            )))
        }
    };
    let source = TfRecordSource::open(&files, label_offset).map_err(|e| {
        Error::new_err(format!(
            "indexing the {prefix}-* TFRecords of {}: {e}",
            dir.display()
        ))
    })?;
    Ok(Arc::new(source))
}

/// A packed dataset: its splits (name -> records) and classes (label order).
#[pyclass(module = "convnets._convnets", frozen)]
pub struct NativeDataset {
    #[pyo3(get)]
    path: PathBuf,
    #[pyo3(get)]
    splits: Vec<(String, u64)>,
    /// (WordNet id, readable name) per label.
    #[pyo3(get)]
    classes: Vec<(String, String)>,
}

#[pymethods]
impl NativeDataset {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        let dataset = Dataset::open(&path).map_err(format_err)?;
        let manifest = dataset.manifest();
        Ok(Self {
            splits: manifest
                .splits
                .iter()
                .map(|(name, info)| (name.clone(), info.records))
                .collect(),
            classes: manifest
                .classes
                .iter()
                .map(|c| (c.wnid.clone(), c.name.clone()))
                .collect(),
            path,
        })
    }
}
