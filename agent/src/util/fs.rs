//! Small, careful file-system helpers: bounded reads, directory creation with a mode, and atomic
//! writes (temporary file in the same directory, fsync, rename, fsync of the directory).
//!
//! Reading never creates anything.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A bounded read that failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file does not exist.
    #[error("file not found")]
    NotFound,
    /// The file is larger than the cap.
    #[error("file is larger than allowed")]
    TooLarge,
    /// Any other I/O error.
    #[error(transparent)]
    Io(std::io::Error),
}

/// A write or directory creation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct FsError {
    /// What was attempted (`create directory`, `write`, ...).
    pub action: &'static str,
    /// The path.
    pub path: PathBuf,
    /// The cause.
    pub source: std::io::Error,
}

fn fs_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FsError + 'a {
    move |source| FsError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The mode of a file written by [`write_atomic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Exactly this mode.
    Exact(u32),
    /// The mode of the file being replaced, or this mode when there is none.
    KeepOr(u32),
}

/// Read at most `cap` bytes of `path`; a longer file is [`ReadError::TooLarge`].
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ReadError::NotFound
        } else {
            ReadError::Io(e)
        }
    })?;
    let mut buf = Vec::new();
    // Read one byte more than the cap to tell "exactly cap" from "more".
    file.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(ReadError::Io)?;
    if buf.len() as u64 > cap {
        return Err(ReadError::TooLarge);
    }
    Ok(buf)
}

/// Create `dir` and its missing parents; directories this call creates get `mode`. An existing
/// directory is left as it is.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), FsError> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(fs_err("create directory", dir))
}

/// Replace `path` atomically with `data`: readers see the old content or the new, never a mix,
/// and a crash leaves no partial file at `path`. The parent directory must exist.
pub fn write_atomic(path: &Path, data: &[u8], mode: Mode) -> Result<(), FsError> {
    let mode = match mode {
        Mode::Exact(m) => m,
        Mode::KeepOr(m) => match fs::metadata(path) {
            Ok(md) => md.permissions().mode() & 0o7777,
            Err(_) => m,
        },
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        // Created with the final mode so that a secret is never readable by others, not even
        // for an instant.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(fs_err("create", &tmp))?;
        // The umask may have removed bits; set the mode explicitly.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(fs_err("set the mode of", &tmp))?;
        f.write_all(data).map_err(fs_err("write", &tmp))?;
        f.sync_all().map_err(fs_err("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(fs_err("replace", path))?;
        sync_dir(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Make the entries of `dir` durable (a rename, link or unlink in it survives a crash). Best
/// effort: a directory that cannot be opened or synced is left as it is.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// [`sync_dir`] on the directory that holds `path`.
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn read_capped_limits() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"12345").unwrap();
        assert_eq!(read_capped(&p, 5).unwrap(), b"12345");
        assert!(matches!(read_capped(&p, 4), Err(ReadError::TooLarge)));
        assert!(matches!(
            read_capped(&d.path().join("none"), 4),
            Err(ReadError::NotFound)
        ));
        assert!(!d.path().join("none").exists());
    }

    #[test]
    fn write_atomic_modes_and_no_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key.pem");
        write_atomic(&p, b"secret", Mode::Exact(0o600)).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"secret");
        assert_eq!(mode_of(&p), 0o600);

        write_atomic(&p, b"v2", Mode::Exact(0o644)).unwrap();
        assert_eq!(mode_of(&p), 0o644);

        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, b"v3", Mode::KeepOr(0o600)).unwrap();
        assert_eq!(mode_of(&p), 0o640);
        assert_eq!(fs::read(&p).unwrap(), b"v3");

        let q = d.path().join("new");
        write_atomic(&q, b"x", Mode::KeepOr(0o600)).unwrap();
        assert_eq!(mode_of(&q), 0o600);

        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
    }

    #[test]
    fn write_atomic_failure_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing-dir/f");
        assert!(write_atomic(&p, b"x", Mode::Exact(0o600)).is_err());
        assert!(!p.exists());
    }

    #[test]
    fn ensure_dir_creates_with_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        ensure_dir(&p, 0o700).unwrap();
        assert!(p.is_dir());
        assert_eq!(mode_of(&p), 0o700);
        ensure_dir(&p, 0o755).unwrap();
        assert_eq!(mode_of(&p), 0o700);
    }
}
