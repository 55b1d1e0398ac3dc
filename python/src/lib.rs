//! `convnets._convnets`: the native half of the `convnets` Python package (the pure-Python
//! half, `convnets/__init__.py`, imports torch first so that libtorch is loaded, then wraps
//! these classes with PyTorch-style defaults).
//!
//! - [`loader::NativeLoader`]: the convnets loader of one rank, batches as torch tensors;
//! - [`dataset::NativeDataset`]: a packed dataset's splits and classes;
//! - [`pack::pack_imagenet`]: the packer behind `convnets pack-imagenet`.
//!
//! ```python
//! import torch, convnets
//! loader = convnets.Loader("data/imagenet", batch_size=256, device="cuda")
//! for images, labels in loader:  # one epoch
//!     ...
//! ```

mod dataset;
mod loader;
mod pack;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    convnets,
    Error,
    PyRuntimeError,
    "A dataset, a record or the loader failed; the message says which (a damaged record names its shard and index)."
);

/// A pipeline error as Python sees it: a bad configuration is a `ValueError`, everything
/// else a `convnets.Error` carrying the Rust message.
fn pipeline_err(e: convnets_pipeline::Error) -> PyErr {
    match e {
        convnets_pipeline::Error::Config(_) => PyValueError::new_err(e.to_string()),
        e => Error::new_err(e.to_string()),
    }
}

fn format_err(e: convnets_formats::Error) -> PyErr {
    Error::new_err(e.to_string())
}

fn tch_err(what: &str, e: tch::TchError) -> PyErr {
    Error::new_err(format!("{what}: {e}"))
}

#[pymodule]
fn _convnets(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("Error", m.py().get_type::<Error>())?;
    m.add_class::<loader::NativeLoader>()?;
    m.add_class::<dataset::NativeDataset>()?;
    m.add_function(wrap_pyfunction!(pack::pack_imagenet, m)?)?;
    m.add("CUDA", cfg!(feature = "cuda"))?;
    Ok(())
}
