//! The crate's one error type.

use std::fmt;
use std::path::PathBuf;

use tch::Kind;

/// Everything that can go wrong in `convnets-models`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--arch` named a model the registry does not know.
    #[error("unknown architecture `{name}`; known architectures: {}", known.join(", "))]
    UnknownArch {
        /// The name that was asked for.
        name: String,
        /// Every name the registry accepts.
        known: &'static [&'static str],
    },

    /// A model was asked for with zero or negative classes.
    #[error("the number of classes must be positive, got {0}")]
    InvalidNumClasses(i64),

    /// A [`ResNetSpec`](crate::ResNetSpec) that describes no valid network.
    #[error("invalid network shape {spec:?}: {problem}")]
    InvalidSpec {
        /// The shape asked for.
        spec: crate::resnet::ResNetSpec,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// The model was given an input that is not an `[N, 3, H, W]` image batch.
    #[error("expected an input batch of shape [N, 3, H, W], got {shape:?}")]
    InputShape {
        /// The shape that was passed in.
        shape: Vec<i64>,
    },

    /// A tensor could not be converted to channels_last because it is not 4-D.
    #[error("channels_last needs a 4-D tensor, got shape {shape:?}")]
    NotFourDimensional {
        /// The shape of the offending tensor.
        shape: Vec<i64>,
    },

    /// A file that is not in the safetensors format (checked before parsing, so the
    /// message says so instead of the parser's "HeaderTooLarge").
    #[error("{} is not a safetensors file: {reason}", path.display())]
    NotSafetensors {
        /// The file.
        path: PathBuf,
        /// What its first bytes are instead.
        reason: String,
    },

    /// A weight file could not be read or parsed (the parser's words are the source).
    #[error("reading weights from {}", path.display())]
    ReadWeights {
        /// The file.
        path: PathBuf,
        /// What libtorch / the safetensors parser said.
        source: tch::TchError,
    },

    /// A weight file could not be written.
    #[error("writing weights to {}", path.display())]
    WriteWeights {
        /// The file.
        path: PathBuf,
        /// What went wrong underneath.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The tensors in a weight file do not match the model's parameters and buffers.
    #[error("weights in {} do not match the model: {report}", path.display())]
    WeightMismatch {
        /// The file.
        path: PathBuf,
        /// Missing, unexpected and mismatched names.
        report: MismatchReport,
    },

    /// Copying one named tensor from a weight file into the model failed.
    #[error("loading `{name}` from {}", path.display())]
    CopyWeight {
        /// The file.
        path: PathBuf,
        /// The parameter or buffer name.
        name: String,
        /// What libtorch said.
        source: tch::TchError,
    },

    /// A libtorch operation failed (bad shapes, out of memory, ...).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// How a weight file differs from a model: the answer of a strict `load_state_dict`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MismatchReport {
    /// Names the model has and the file lacks.
    pub missing: Vec<String>,
    /// Names the file has and the model lacks.
    pub unexpected: Vec<String>,
    /// Names present on both sides with a different shape or an incompatible kind.
    pub mismatched: Vec<Mismatch>,
}

/// One name present in both the model and the file, with incompatible contents.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Parameter or buffer name.
    pub name: String,
    /// Shape in the model.
    pub expected_shape: Vec<i64>,
    /// Shape in the file.
    pub found_shape: Vec<i64>,
    /// Kind (dtype) in the model.
    pub expected_kind: Kind,
    /// Kind (dtype) in the file.
    pub found_kind: Kind,
}

impl MismatchReport {
    /// True when the file matches the model exactly (by name, shape and kind family).
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

/// Lists shown in messages are cut here; the report itself keeps every name.
const SHOWN_PER_LIST: usize = 12;

fn write_list<T>(
    f: &mut fmt::Formatter<'_>,
    label: &str,
    items: &[T],
    show: impl Fn(&T) -> String,
) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    write!(f, "\n  {} {label}:", items.len())?;
    for item in items.iter().take(SHOWN_PER_LIST) {
        write!(f, "\n    {}", show(item))?;
    }
    if items.len() > SHOWN_PER_LIST {
        write!(f, "\n    ... and {} more", items.len() - SHOWN_PER_LIST)?;
    }
    Ok(())
}

impl fmt::Display for MismatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "no differences");
        }
        write_list(f, "missing from the file", &self.missing, String::clone)?;
        write_list(f, "unexpected in the file", &self.unexpected, String::clone)?;
        write_list(f, "with a different shape or kind", &self.mismatched, |m| {
            format!(
                "{}: model {:?} {:?}, file {:?} {:?}",
                m.name, m.expected_shape, m.expected_kind, m.found_shape, m.found_kind
            )
        })
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
