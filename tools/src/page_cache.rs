//! Evicting files from the OS page cache, so `convnets bench loader --drop-cache` reads its
//! dataset from the disk instead of from memory.
//!
//! Each file gets `posix_fadvise(POSIX_FADV_DONTNEED)`, which needs no privileges for a file
//! we can open (unlike `echo 1 > /proc/sys/vm/drop_caches`), after `fdatasync`, because
//! only clean pages are dropped. Pages that a live mapping holds (the loader's own, or
//! another process's) stay, so evict before the dataset is opened. What stayed is counted
//! with `mincore` over a fresh read-only mapping, which faults nothing in. Files on tmpfs
//! cannot be evicted at all: their pages are the file.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

/// What happened to one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileEviction {
    pub file: PathBuf,
    pub bytes: u64,
    /// Why it could not be evicted; `None` when `posix_fadvise` succeeded.
    pub error: Option<String>,
    /// Bytes in the page cache before and right after the eviction (`None`: not measured).
    pub resident_before: Option<u64>,
    pub resident_after: Option<u64>,
}

/// The outcome of [`evict`] over a set of files.
#[derive(Debug, Clone, Serialize)]
pub struct Eviction {
    pub files: Vec<FileEviction>,
}

impl Eviction {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// Sum over files, `None` if any file was not measured.
    fn sum(&self, field: impl Fn(&FileEviction) -> Option<u64>) -> Option<u64> {
        self.files.iter().map(field).sum()
    }

    pub fn resident_before(&self) -> Option<u64> {
        self.sum(|f| f.resident_before)
    }

    pub fn resident_after(&self) -> Option<u64> {
        self.sum(|f| f.resident_after)
    }

    /// Every file was evicted and, where that could be measured, nothing of it is left.
    pub fn cold(&self) -> bool {
        self.files
            .iter()
            .all(|f| f.error.is_none() && f.resident_after.unwrap_or(0) == 0)
    }

    /// A summary for a benchmark's JSON document; `resident_at_start` is what was in the
    /// page cache again once the dataset had been opened (see [`resident_bytes`]).
    pub fn to_json(&self, resident_at_start: Option<u64>) -> serde_json::Value {
        json!({
            "method": "posix_fadvise(POSIX_FADV_DONTNEED)",
            "files": self.files.len(),
            "bytes": self.bytes(),
            "evicted_files": self.files.iter().filter(|f| f.error.is_none()).count(),
            "resident_before_bytes": self.resident_before(),
            "resident_after_bytes": self.resident_after(),
            "resident_at_start_bytes": resident_at_start,
            "failed": self.files.iter().filter_map(|f| {
                f.error.as_ref().map(|e| json!({ "file": f.file, "error": e }))
            }).collect::<Vec<_>>(),
            "still_resident": self.files.iter().filter(|f| f.resident_after.unwrap_or(0) > 0)
                .map(|f| json!({ "file": f.file, "bytes": f.resident_after }))
                .collect::<Vec<_>>(),
        })
    }

    /// One warning line per file that is not cold, for stderr.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for f in &self.files {
            if let Some(e) = &f.error {
                out.push(format!(
                    "warning: could not evict {} from the page cache: {e}; this run is not cold",
                    f.file.display()
                ));
            } else if let Some(left) = f.resident_after.filter(|&b| b > 0) {
                out.push(format!(
                    "warning: {} of {} bytes of {} are still in the page cache after eviction \
                     (mapped by another process, dirty, or on tmpfs?); this run is not cold",
                    left,
                    f.bytes,
                    f.file.display()
                ));
            }
        }
        out
    }
}

/// Evicts every file of `files` from the page cache. Failures are recorded per file, never
/// returned: a benchmark runs anyway and reports that it was not cold.
pub fn evict(files: &[PathBuf]) -> Eviction {
    let files = files
        .iter()
        .map(|path| {
            let mut out = FileEviction {
                file: path.clone(),
                bytes: 0,
                error: None,
                resident_before: None,
                resident_after: None,
            };
            let file = match File::open(path).and_then(|f| Ok((f.metadata()?.len(), f))) {
                Ok((len, f)) => {
                    out.bytes = len;
                    f
                }
                Err(e) => {
                    out.error = Some(e.to_string());
                    return out;
                }
            };
            out.resident_before = resident_in(&file, out.bytes).ok();
            // DONTNEED drops clean pages only; freshly written shards may not be on disk
            // yet. A file that cannot be synced (read-only mount) has no dirty pages.
            let _ = file.sync_data();
            if let Err(e) = fadvise_dontneed(&file) {
                out.error = Some(format!("posix_fadvise: {e}"));
            }
            out.resident_after = resident_in(&file, out.bytes).ok();
            out
        })
        .collect();
    Eviction { files }
}

/// Bytes of `files` now in the page cache; `None` if any file could not be measured.
pub fn resident_bytes(files: &[PathBuf]) -> Option<u64> {
    files
        .iter()
        .map(|p| {
            let f = File::open(p).ok()?;
            let len = f.metadata().ok()?.len();
            resident_in(&f, len).ok()
        })
        .sum()
}

#[cfg(target_os = "linux")]
fn fadvise_dontneed(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; offset 0, length 0 = the whole file.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    // posix_fadvise returns the error number instead of setting errno.
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(not(target_os = "linux"))]
fn fadvise_dontneed(_file: &File) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "page-cache eviction is implemented for Linux only",
    ))
}

/// Resident bytes of the first `len` bytes of `file`: `mincore` over a fresh shared
/// read-only mapping (mapping faults nothing in; the mapping is gone on return).
#[cfg(target_os = "linux")]
fn resident_in(file: &File, len: u64) -> io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    let len_usize = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => 4096,
    };
    // SAFETY: a read-only mapping nothing reads through (only `mincore` looks at it), so a
    // file changed by another process meanwhile cannot break any Rust invariant.
    let map = unsafe { memmap2::MmapOptions::new().len(len_usize).map(file)? };
    let mut pages = vec![0u8; len_usize.div_ceil(page)];
    // SAFETY: `map` covers `len_usize` bytes from a page-aligned address; `pages` has one
    // byte per page of it.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            len_usize,
            pages.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let resident = pages.iter().filter(|&&p| p & 1 == 1).count() as u64;
    Ok((resident * page as u64).min(len))
}

#[cfg(not(target_os = "linux"))]
fn resident_in(_file: &File, _len: u64) -> io::Result<u64> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "mincore: Linux only",
    ))
}

/// One line for the benchmark's table output.
pub fn describe(e: &Eviction, resident_at_start: Option<u64>) -> String {
    let mb = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.1}", b as f64 / 1e6));
    format!(
        "page cache: {} of {} files evicted ({} MB); resident before {} MB, after {} MB, \
         after opening {} MB -> {}",
        e.files.iter().filter(|f| f.error.is_none()).count(),
        e.files.len(),
        mb(Some(e.bytes())),
        mb(e.resident_before()),
        mb(e.resident_after()),
        mb(resident_at_start),
        if e.cold() { "cold" } else { "NOT cold" },
    )
}

/// Evicts the files `open_split(dir, split, ..)` reads, printing a warning for each one
/// that stays in memory.
pub fn evict_split(dir: &Path, split: &str) -> anyhow::Result<(Vec<PathBuf>, Eviction)> {
    let files = crate::source::split_files(dir, split)?;
    let eviction = evict(&files);
    for w in eviction.warnings() {
        eprintln!("{w}");
    }
    Ok((files, eviction))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_a_written_file_and_reports_missing_ones() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("data.bin");
        std::fs::write(&path, vec![7u8; 1 << 20])?;
        let _ = std::fs::read(&path)?; // in the page cache now
        let missing = dir.path().join("missing.bin");
        let e = evict(&[path.clone(), missing.clone()]);
        assert_eq!(e.files[0].bytes, 1 << 20);
        assert!(e.files[0].error.is_none(), "{:?}", e.files[0]);
        assert!(e.files[1].error.is_some());
        assert!(!e.cold(), "a file that failed is not cold");
        assert!(e.warnings().iter().any(|w| w.contains("missing.bin")));
        let only = evict(std::slice::from_ref(&path));
        // tmpfs keeps its pages (they are the file); on a disk file system nothing is left.
        if on_tmpfs(dir.path()) {
            assert!(!only.cold());
            assert!(!only.warnings().is_empty());
        } else {
            assert!(only.cold(), "{:?}", only.files);
            assert_eq!(only.resident_after(), Some(0));
        }
        Ok(())
    }

    /// Whether `dir` is on tmpfs, from the file system's magic number.
    fn on_tmpfs(dir: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: `path` is NUL-terminated; `stat` is written by the call.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
        assert_eq!(rc, 0, "statfs {}", dir.display());
        stat.f_type == libc::TMPFS_MAGIC
    }
}
