//! Atomic file writes: write to a temporary file in the same folder, fsync, rename.
//! A reader never sees a half-written file, and an interrupted write leaves only a
//! `*.tmp` file that the next run overwrites.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// The temporary name used while `path` is being written.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A file being written; it appears under its final name only on [`AtomicFile::commit`].
pub struct AtomicFile {
    final_path: PathBuf,
    temp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let temp = temp_path(path);
        let file = File::create(&temp).at(&temp)?;
        Ok(Self {
            final_path: path.to_path_buf(),
            temp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.final_path
    }

    /// Flushes, fsyncs and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let out = self.out.take().expect("commit called once");
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .at(&self.temp)?;
        file.sync_all().at(&self.temp)?;
        drop(file);
        std::fs::rename(&self.temp, &self.final_path).at(&self.final_path)?;
        if let Some(dir) = self.final_path.parent() {
            // Make the rename itself durable; not all filesystems allow opening a dir.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.as_mut().expect("not committed").write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.out.as_mut().expect("not committed").write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            // Abandoned before commit: leave no partial file behind.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes).at(&f.temp)?;
    f.commit()
}
