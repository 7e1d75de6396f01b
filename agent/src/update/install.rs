//! The install layout (the same as `installer/install.sh`): each version in
//! `<install_dir>/<vX.Y.Z>/runos` (0755), and `bin_link`, an absolute symlink to the version in
//! use, replaced atomically (a new symlink under a temporary name, then `rename`).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::version::Version;

/// The release asset for this machine's CPU.
pub fn asset_name() -> Result<String, String> {
    match std::env::consts::ARCH {
        "x86_64" => Ok("nodeagent-linux-amd64".into()),
        "aarch64" => Ok("nodeagent-linux-arm64".into()),
        other => Err(format!("runos releases have no binary for {other}")),
    }
}

/// Refuse a directory that another user could change between verification and installation
/// (as sshd's `StrictModes` does): it must be owned by root or by this process's user, and not
/// writable by group or others.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let md = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let me = rustix::process::geteuid().as_raw();
    if md.uid() != 0 && md.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not root: another user could swap the verified binary; fix its owner",
            dir.display(),
            md.uid()
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o}): another user could swap the verified binary; chmod go-w it",
            dir.display(),
            md.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Where version `v` is installed.
pub fn version_binary(install_dir: &Path, v: Version) -> PathBuf {
    install_dir.join(v.tag()).join("runos")
}

/// A file removed when dropped, unless [`TempFile::persist`] moved it into place.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    /// A new empty file (0600) in `dir`, which is created (0755) when missing.
    pub fn create(dir: &Path, what: &str) -> Result<TempFile, String> {
        crate::util::fs::ensure_dir(dir, 0o755).map_err(|e| e.to_string())?;
        check_dir(dir)?;
        let path = dir.join(format!(
            ".{what}.{}.{:08x}.partial",
            std::process::id(),
            rand::random::<u32>()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempFile {
            path,
            file,
            persisted: false,
        })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Give it `mode` and rename it to `dest` (same file system); the directory is synced.
    pub fn persist(mut self, dest: &Path, mode: u32) -> Result<(), String> {
        self.file
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set the mode of {}: {e}", self.path.display()))?;
        self.file
            .sync_all()
            .map_err(|e| format!("cannot sync {}: {e}", self.path.display()))?;
        fs::rename(&self.path, dest).map_err(|e| {
            format!(
                "cannot move {} to {}: {e}",
                self.path.display(),
                dest.display()
            )
        })?;
        crate::util::fs::sync_parent(dest);
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The absolute target of `bin_link`, which must be a symlink.
pub fn link_target(bin_link: &Path) -> Result<PathBuf, String> {
    let md = fs::symlink_metadata(bin_link)
        .map_err(|e| format!("cannot read {}: {e}", bin_link.display()))?;
    if !md.file_type().is_symlink() {
        return Err(format!(
            "{} is not a symlink (not installed by install.sh?): the updater installs side by side \
             and swaps that link; reinstall with install.sh or point update.bin_link at the link",
            bin_link.display()
        ));
    }
    let target = fs::read_link(bin_link)
        .map_err(|e| format!("cannot read the link {}: {e}", bin_link.display()))?;
    if target.is_absolute() {
        Ok(target)
    } else {
        Ok(bin_link
            .parent()
            .unwrap_or_else(|| Path::new("/"))
            .join(target))
    }
}

/// Point `bin_link` at `target` atomically: a symlink under a temporary name in the same
/// directory, renamed over the link, then the directory synced.
pub fn swap_link(bin_link: &Path, target: &Path) -> Result<(), String> {
    let dir = bin_link.parent().unwrap_or_else(|| Path::new("/"));
    check_dir(dir)?;
    let tmp = dir.join(format!(
        ".runos.link.{}.{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::os::unix::fs::symlink(target, &tmp)
        .map_err(|e| format!("cannot create the symlink {}: {e}", tmp.display()))?;
    if let Err(e) = fs::rename(&tmp, bin_link) {
        let _ = fs::remove_file(&tmp);
        return Err(format!("cannot replace {}: {e}", bin_link.display()));
    }
    crate::util::fs::sync_parent(bin_link);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_link_is_atomic_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("runos");
        std::os::unix::fs::symlink("/opt/a/runos", &link).unwrap();
        assert_eq!(link_target(&link).unwrap(), PathBuf::from("/opt/a/runos"));
        swap_link(&link, Path::new("/opt/b/runos")).unwrap();
        assert_eq!(link_target(&link).unwrap(), PathBuf::from("/opt/b/runos"));
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_file(&link).unwrap();
        fs::write(&link, b"binary").unwrap();
        assert!(link_target(&link).unwrap_err().contains("not a symlink"));
    }

    #[test]
    fn temp_file_is_removed_unless_persisted() {
        let d = tempfile::tempdir().unwrap();
        let t = TempFile::create(d.path(), "x").unwrap();
        let p = t.path().to_path_buf();
        assert!(p.exists());
        drop(t);
        assert!(!p.exists());
        let mut t = TempFile::create(d.path(), "x").unwrap();
        std::io::Write::write_all(t.file(), b"hi").unwrap();
        let dest = d.path().join("done");
        t.persist(&dest, 0o755).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"hi");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
