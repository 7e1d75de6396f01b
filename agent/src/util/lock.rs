//! The single-instance lock: an exclusive, non-blocking `flock` on `<run_dir>/agent.lock`, held
//! for the life of the process (the kernel releases it when the process dies).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "another `runos agent` is already running (it holds {0}); stop it first, e.g. `systemctl stop runos`"
    )]
    Held(PathBuf),
    /// The lock file could not be created or opened.
    #[error("cannot open the lock file {path}: {source}; check that the run directory is writable")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A held instance lock; released on drop.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Take the lock at `path`, creating its directory (0755) and the file (0644) when needed.
pub fn acquire(path: &Path) -> Result<InstanceLock, LockError> {
    let io = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        crate::util::fs::ensure_dir(dir, 0o755).map_err(|e| io(e.source))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(io)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(InstanceLock {
            _file: file,
            path: path.to_path_buf(),
        }),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(LockError::Held(path.to_path_buf())),
        Err(e) => Err(io(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_released() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run/agent.lock");
        let l = acquire(&p).unwrap();
        assert_eq!(l.path(), p);
        assert!(matches!(acquire(&p), Err(LockError::Held(_))));
        drop(l);
        assert!(acquire(&p).is_ok());
    }
}
