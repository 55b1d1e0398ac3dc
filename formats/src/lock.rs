//! A folder taken by one live process: an exclusive `flock` on a lock file holding the
//! owner's PID. The kernel releases the lock however the process ends, so a lock left by a
//! dead process is stale and the next taker simply gets it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Held while alive; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Locks `path` (created if missing) for this process and writes its PID there, or
    /// returns [`Error::Locked`] with the PID of the live process that holds it.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .at(path)?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::WouldBlock {
                return Err(error).at(path);
            }
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(Error::Locked {
                path: path.to_path_buf(),
                pid: pid.trim().to_string(),
            });
        }
        // Rewritten only when it names another process, so taking a lock this process
        // held before changes nothing on disk.
        let pid = std::process::id().to_string();
        let mut old = String::new();
        let _ = file.read_to_string(&mut old);
        if old != pid {
            file.set_len(0).at(path)?;
            file.rewind().at(path)?;
            file.write_all(pid.as_bytes()).at(path)?;
        }
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_is_refused_until_the_first_lets_go() -> Result<()> {
        let dir = tempfile::tempdir().at(Path::new("tempdir"))?;
        let path = dir.path().join(".lock");
        let first = FileLock::acquire(&path)?;
        match FileLock::acquire(&path) {
            Err(Error::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        FileLock::acquire(&path)?;
        Ok(())
    }
}
