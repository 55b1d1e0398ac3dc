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

    /// Flushes, fsyncs and renames the file into place; on failure the temporary file is
    /// removed, so an error leaves nothing behind.
    pub fn commit(mut self) -> Result<()> {
        let out = self.out.take().expect("commit called once");
        let result = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .at(&self.temp)
            .and_then(|()| rename_into_place(&self.temp, &self.final_path));
        if result.is_err() {
            let _ = std::fs::remove_file(&self.temp);
        }
        result
    }
}

/// Renames the fsynced `temp` to `path` and makes the rename durable.
fn rename_into_place(temp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(temp, path).at(path)?;
    if let Some(dir) = path.parent() {
        // Not all filesystems allow opening a dir.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
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

/// Writes `path` atomically through `write`, which creates the file at the temporary path
/// it is given: for writers that only take a path (safetensors). The file is then fsynced
/// and renamed as [`AtomicFile`] does; on any error the temporary file is removed.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let temp = temp_path(path);
    let written = write(&temp).and_then(|()| File::open(&temp)?.sync_all());
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(error).at(&temp);
    }
    rename_into_place(&temp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_with_renames_on_success_and_cleans_up_on_failure() -> Result<()> {
        let dir = tempfile::tempdir().at(Path::new("tempdir"))?;
        let path = dir.path().join("w.bin");
        write_atomic_with(&path, |temp| std::fs::write(temp, b"one"))?;
        assert_eq!(std::fs::read(&path).at(&path)?, b"one");
        let err = write_atomic_with(&path, |temp| {
            std::fs::write(temp, b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .expect_err("the writer failed");
        assert!(err.to_string().contains("w.bin.tmp"), "{err}");
        assert_eq!(std::fs::read(&path).at(&path)?, b"one", "old file kept");
        assert!(!temp_path(&path).exists());
        // A commit that cannot rename (a folder in the way) leaves no temporary file.
        let blocked = dir.path().join("report.json");
        std::fs::create_dir(&blocked).at(&blocked)?;
        write_atomic(&blocked, b"{}").expect_err("a folder is in the way");
        assert!(!temp_path(&blocked).exists());
        Ok(())
    }
}
