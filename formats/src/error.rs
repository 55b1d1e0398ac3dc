use std::path::PathBuf;

/// Everything that can go wrong reading or writing datasets. Variants name the file and,
/// where there is one, the record, so a user can find the damage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The I/O error is part of the message rather than a `source`, so chains printed
    // with `{:#}` do not repeat it.
    #[error("{}: {error}", crate::names::escaped_path(path))]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{}: not a convnets shard (bad magic)",
        crate::names::escaped_path(path)
    )]
    BadMagic { path: PathBuf },
    #[error(
        "{}: unsupported {what} version {found} (this build reads version {supported})",
        crate::names::escaped_path(path)
    )]
    UnsupportedVersion {
        path: PathBuf,
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{}: corrupt shard: {reason}", crate::names::escaped_path(path))]
    CorruptShard { path: PathBuf, reason: String },
    #[error("{}: record {index}: {reason}", crate::names::escaped_path(path))]
    CorruptRecord {
        path: PathBuf,
        index: u64,
        reason: String,
    },
    #[error("{}: record {index}: CRC32C mismatch (index says {expected:#010x}, data has {actual:#010x})", crate::names::escaped_path(path))]
    ChecksumMismatch {
        path: PathBuf,
        index: u64,
        expected: u32,
        actual: u32,
    },
    #[error("{}: invalid manifest: {reason}", crate::names::escaped_path(path))]
    Manifest { path: PathBuf, reason: String },
    #[error(
        "{}: TFRecord at byte {offset}: {reason}",
        crate::names::escaped_path(path)
    )]
    TfRecord {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("record {index} out of range ({len} records)")]
    IndexOutOfRange { index: u64, len: u64 },
    #[error("{}: {reason}", crate::names::escaped_path(path))]
    Input { path: PathBuf, reason: String },
    /// A folder another live process holds (see [`crate::lock`]).
    #[error("{} is held by PID {pid}", crate::names::escaped_path(path))]
    Locked { path: PathBuf, pid: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an I/O error (also used by the packer, `convnets-pack`).
pub trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|error| Error::Io {
            path: path.to_path_buf(),
            error,
        })
    }
}
