//! The manifest of what runos wrote on the host outside its own state directory.
//!
//! An executor that creates a file or directory elsewhere (a dnsmasq drop-in, a sysctl file, a
//! helm binary) records it here, with the sha256 of what it wrote. `UNINSTALL_NODE` removes
//! exactly these, and only while they still hold what runos wrote: a file changed since is kept
//! and reported, never removed. Nothing outside the manifest is ever removed or reset by the
//! uninstall (no firewall flush, no `ip_forward` switch: docs/uninstall.md).
//!
//! One JSON file (`<state>/manifest.json`, 0600, written atomically), read with a size bound.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::handle::write_atomic;

/// Largest manifest file read.
const MAX_BYTES: u64 = 4 << 20;
/// Most entries kept.
pub const MAX_ENTRIES: usize = 10_000;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A regular file, with the sha256 of what was written.
    File,
    /// A directory runos created (removed only when empty).
    Dir,
}

/// One thing runos wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// File or directory.
    pub kind: Kind,
    /// Its absolute path.
    pub path: PathBuf,
    /// For a file: the sha256 (hex) of its content as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Who wrote it (an instruction type or a component).
    pub by: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    entries: Vec<Entry>,
}

/// The manifest at one path. Its methods serialise on a lock of their own.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    lock: Mutex<()>,
}

/// The sha256 (hex) of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    /// The manifest stored at `path` (created on the first record).
    pub fn new(path: PathBuf) -> Self {
        Manifest {
            path,
            lock: Mutex::new(()),
        }
    }

    /// Where it is stored.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> io::Result<File> {
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(File::default()),
            Err(e) => return Err(e),
        };
        let mut text = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(f, MAX_BYTES + 1), &mut text)?;
        if text.len() as u64 > MAX_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is larger than {MAX_BYTES} bytes", self.path.display()),
            ));
        }
        serde_json::from_slice(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is damaged: {e}", self.path.display()),
            )
        })
    }

    fn write(&self, f: &File) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            crate::handle::ensure_dir(dir)?;
        }
        let json = serde_json::to_vec_pretty(f).map_err(io::Error::other)?;
        write_atomic(&self.path, &json, 0o600)
    }

    fn change(&self, edit: impl FnOnce(&mut Vec<Entry>)) -> io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = self.read()?;
        edit(&mut f.entries);
        if f.entries.len() > MAX_ENTRIES {
            return Err(io::Error::other(format!(
                "the manifest would hold more than {MAX_ENTRIES} entries"
            )));
        }
        self.write(&f)
    }

    /// Record that `by` wrote `data` to the file `path` (replacing an entry for the same path).
    pub fn record_file(&self, path: &Path, data: &[u8], by: &str) -> io::Result<()> {
        let e = Entry {
            kind: Kind::File,
            path: path.to_path_buf(),
            sha256: Some(sha256_hex(data)),
            by: by.to_string(),
        };
        self.change(|v| {
            v.retain(|x| x.path != e.path);
            v.push(e);
        })
    }

    /// Record that `by` created the directory `path`.
    pub fn record_dir(&self, path: &Path, by: &str) -> io::Result<()> {
        let e = Entry {
            kind: Kind::Dir,
            path: path.to_path_buf(),
            sha256: None,
            by: by.to_string(),
        };
        self.change(|v| {
            v.retain(|x| x.path != e.path);
            v.push(e);
        })
    }

    /// Forget `path`.
    pub fn forget(&self, path: &Path) -> io::Result<()> {
        self.change(|v| v.retain(|x| x.path != path))
    }

    /// Every entry, in the order recorded.
    pub fn entries(&self) -> io::Result<Vec<Entry>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.read()?.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_replace_and_forget() {
        let t = tempfile::tempdir().unwrap();
        let m = Manifest::new(t.path().join("s").join("manifest.json"));
        assert!(m.entries().unwrap().is_empty());
        let a = t.path().join("a.conf");
        m.record_file(&a, b"one", "UPDATE_DNSMASQ").unwrap();
        m.record_file(&a, b"two", "UPDATE_DNSMASQ").unwrap();
        m.record_dir(t.path(), "test").unwrap();
        let e = m.entries().unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].sha256.as_deref(), Some(sha256_hex(b"two").as_str()));
        m.forget(&a).unwrap();
        assert_eq!(m.entries().unwrap().len(), 1);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(m.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_damaged_manifest_is_an_error_not_an_empty_one() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("manifest.json");
        std::fs::write(&p, b"{not json").unwrap();
        let e = Manifest::new(p).entries().unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
