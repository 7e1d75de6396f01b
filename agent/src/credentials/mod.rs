//! The node's credentials on disk (key, certificate, L2Sec CA bundle) and how a new set
//! replaces the current one: two-phase, so that a crash at any point leaves one complete,
//! working set.
//!
//! 1. **Stage**: the new set is written next to the current files as `<file>.next` (each
//!    atomically), then the marker `<state_dir>/credentials.switch` says `staged`.
//! 2. The new set is proven by a probe session (see `renew::probe`): the control plane
//!    accepted it. Until then the current set stays in use.
//! 3. **Promote**: the marker says `promoting`; each current file is replaced atomically with
//!    its `.next` content; the marker is removed; the `.next` files are removed.
//!
//! [`recover`] runs before anything loads the credentials: a `promoting` marker is finished
//! (every `.next` file still exists, since they are removed only after the marker), a `staged`
//! marker or stray `.next` files are discarded (the new set was never proven; the renewal is
//! simply done again).

pub mod enrol;
pub mod identity;
pub mod renew;
pub mod trust;

use std::path::{Path, PathBuf};

use crate::config::Paths;
use crate::util::fs::{self as fsutil, FsError, Mode};

/// Name of the marker file in the state directory.
pub const MARKER_FILE: &str = "credentials.switch";
const STAGED: &str = "staged\n";
const PROMOTING: &str = "promoting\n";

/// A complete set of credentials. `Debug` does not show the key.
#[derive(Clone)]
pub struct CredentialSet {
    /// The private key (PEM). Secret.
    pub key_pem: String,
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The L2Sec CA bundle (PEM).
    pub ca_pem: String,
}

impl std::fmt::Debug for CredentialSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialSet")
            .field("key_pem", &"<redacted>")
            .field("cert_pem", &self.cert_pem)
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

/// What [`recover`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was pending.
    Clean,
    /// An interrupted promotion was finished: the new set is now current.
    Promoted,
    /// A staged, unproven set was discarded: the current set stays.
    Discarded,
}

/// `<path>.next`.
pub fn next_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".next");
    PathBuf::from(s)
}

fn marker(p: &Paths) -> PathBuf {
    p.state_dir.join(MARKER_FILE)
}

/// (current, next, mode) for key, certificate and CA.
fn files(p: &Paths) -> [(PathBuf, PathBuf, u32); 3] {
    [
        (p.key.clone(), next_path(&p.key), 0o600),
        (p.certificate.clone(), next_path(&p.certificate), 0o644),
        (p.ca.clone(), next_path(&p.ca), 0o644),
    ]
}

fn remove(path: &Path) -> Result<(), FsError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FsError {
            action: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_marker(p: &Paths) -> Option<String> {
    fsutil::read_capped(&marker(p), 64)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn ensure_parents(p: &Paths) -> Result<(), FsError> {
    fsutil::ensure_dir(&p.state_dir, 0o700)?;
    for (cur, _, _) in files(p) {
        if let Some(dir) = cur.parent() {
            fsutil::ensure_dir(dir, 0o755)?;
        }
    }
    Ok(())
}

/// Phase 1: write `set` as the `.next` files and mark it staged. A set staged earlier is
/// replaced.
pub fn stage(p: &Paths, set: &CredentialSet) -> Result<(), FsError> {
    ensure_parents(p)?;
    // An unfinished promotion must be finished (by `recover`) first: dropping its marker would
    // leave a mixed current set that nothing can repair.
    if read_marker(p).as_deref() == Some(PROMOTING) {
        return Err(FsError {
            action: "stage over an unfinished promotion",
            path: marker(p),
            source: std::io::Error::other("a promotion is unfinished; recover it first"),
        });
    }
    // An older staged set is dropped first, so the marker never describes a mix.
    remove(&marker(p))?;
    crate::util::fs::sync_parent(&marker(p));
    let data = [
        set.key_pem.as_bytes(),
        set.cert_pem.as_bytes(),
        set.ca_pem.as_bytes(),
    ];
    for ((_, next, mode), bytes) in files(p).into_iter().zip(data) {
        fsutil::write_atomic(&next, bytes, Mode::Exact(mode))?;
    }
    fsutil::write_atomic(&marker(p), STAGED.as_bytes(), Mode::Exact(0o600))
}

/// Whether a staged set exists (marker `staged` and every `.next` file present).
pub fn is_staged(p: &Paths) -> bool {
    read_marker(p).as_deref() == Some(STAGED) && files(p).iter().all(|(_, n, _)| n.exists())
}

/// Phase 3: make the staged set current. Idempotent once started: a crash inside is finished
/// by [`recover`].
pub fn promote(p: &Paths) -> Result<(), FsError> {
    fsutil::write_atomic(&marker(p), PROMOTING.as_bytes(), Mode::Exact(0o600))?;
    finish_promotion(p)
}

fn finish_promotion(p: &Paths) -> Result<(), FsError> {
    for (cur, next, mode) in files(p) {
        let data = fsutil::read_capped(&next, crate::credentials::identity::MAX_PEM_FILE).map_err(
            |e| FsError {
                action: "read",
                path: next.clone(),
                source: match e {
                    fsutil::ReadError::Io(e) => e,
                    other => std::io::Error::other(other.to_string()),
                },
            },
        )?;
        fsutil::write_atomic(&cur, &data, Mode::Exact(mode))?;
    }
    remove(&marker(p))?;
    crate::util::fs::sync_parent(&marker(p));
    for (_, next, _) in files(p) {
        remove(&next)?;
        crate::util::fs::sync_parent(&next);
    }
    Ok(())
}

/// Drop a staged set (never proven, or refused). The current set is untouched.
pub fn discard(p: &Paths) -> Result<(), FsError> {
    for (_, next, _) in files(p) {
        remove(&next)?;
        crate::util::fs::sync_parent(&next);
    }
    remove(&marker(p))?;
    crate::util::fs::sync_parent(&marker(p));
    Ok(())
}

/// The lock file (in `paths.run_dir`) held while a credential set is staged, proven and
/// promoted, and while an interrupted switch is recovered.
pub const SWITCH_LOCK: &str = "credentials.lock";

/// Take the switch lock; `None` when another process (or task) holds it.
pub fn switch_lock(p: &Paths) -> Result<Option<crate::util::lock::InstanceLock>, FsError> {
    match crate::util::lock::acquire(&p.run_dir.join(SWITCH_LOCK)) {
        Ok(l) => Ok(Some(l)),
        Err(crate::util::lock::LockError::Held(_)) => Ok(None),
        Err(crate::util::lock::LockError::Io { path, source }) => Err(FsError {
            action: "lock",
            path,
            source,
        }),
    }
}

/// Finish or undo a switch interrupted by a crash. Run before loading the credentials. Does
/// nothing while a switch is in progress elsewhere (it holds the switch lock and finishes or
/// undoes its own work).
pub fn recover(p: &Paths) -> Result<Recovery, FsError> {
    let Some(_lock) = switch_lock(p)? else {
        return Ok(Recovery::Clean);
    };
    recover_unlocked(p)
}

/// [`recover`] for a caller that holds the switch lock.
pub fn recover_unlocked(p: &Paths) -> Result<Recovery, FsError> {
    match read_marker(p).as_deref() {
        Some(PROMOTING) => {
            finish_promotion(p)?;
            Ok(Recovery::Promoted)
        }
        Some(_) => {
            discard(p)?;
            Ok(Recovery::Discarded)
        }
        None if files(p).iter().any(|(_, n, _)| n.exists()) => {
            discard(p)?;
            Ok(Recovery::Discarded)
        }
        None => Ok(Recovery::Clean),
    }
}

/// Write `set` as the current credentials in one step (stage, then promote at once): for a
/// first registration, where there is no current set to protect.
pub fn install(p: &Paths, set: &CredentialSet) -> Result<(), FsError> {
    stage(p, set)?;
    promote(p)
}

/// Read the staged set.
pub fn read_staged(p: &Paths) -> Result<CredentialSet, String> {
    let read = |path: &Path| -> Result<String, String> {
        fsutil::read_capped(path, crate::credentials::identity::MAX_PEM_FILE)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|b| {
                String::from_utf8(b).map_err(|_| format!("{}: not UTF-8", path.display()))
            })
    };
    let [k, c, a] = files(p);
    Ok(CredentialSet {
        key_pem: read(&k.1)?,
        cert_pem: read(&c.1)?,
        ca_pem: read(&a.1)?,
    })
}

/// The facts of the node certificate at `path` (the first certificate in the PEM file).
pub fn read_certificate(path: &Path) -> Result<runos_transport::identity::CertInfo, String> {
    let pem = crate::util::fs::read_capped(path, 1024 * 1024).map_err(|e| e.to_string())?;
    let certs = runos_transport::pem::certificates(&pem).map_err(|e| e.to_string())?;
    let der = certs
        .first()
        .ok_or_else(|| "no certificate in the file".to_string())?;
    runos_transport::identity::cert_info(der).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> Paths {
        Paths {
            key: dir.join("etc/node.key"),
            certificate: dir.join("etc/node.crt"),
            ca: dir.join("etc/ca.pem"),
            l1_ca: dir.join("etc/l1-ca.pem"),
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
        }
    }

    fn set(n: u8) -> CredentialSet {
        CredentialSet {
            key_pem: format!("key{n}"),
            cert_pem: format!("cert{n}"),
            ca_pem: format!("ca{n}"),
        }
    }

    fn current(p: &Paths) -> (String, String, String) {
        (
            std::fs::read_to_string(&p.key).unwrap(),
            std::fs::read_to_string(&p.certificate).unwrap(),
            std::fs::read_to_string(&p.ca).unwrap(),
        )
    }

    fn is(n: u8) -> (String, String, String) {
        (format!("key{n}"), format!("cert{n}"), format!("ca{n}"))
    }

    #[test]
    fn stage_promote_and_modes() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let p = paths(d.path());
        install(&p, &set(1)).unwrap();
        assert_eq!(current(&p), is(1));
        stage(&p, &set(2)).unwrap();
        assert!(is_staged(&p));
        assert_eq!(current(&p), is(1), "staging leaves the current set alone");
        assert_eq!(read_staged(&p).unwrap().cert_pem, "cert2");
        promote(&p).unwrap();
        assert_eq!(current(&p), is(2));
        assert!(!is_staged(&p));
        assert!(!next_path(&p.key).exists());
        let mode = std::fs::metadata(&p.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(recover(&p).unwrap(), Recovery::Clean);
    }

    #[test]
    fn a_staged_set_is_discarded_at_recovery() {
        let d = tempfile::tempdir().unwrap();
        let p = paths(d.path());
        install(&p, &set(1)).unwrap();
        stage(&p, &set(2)).unwrap();
        assert_eq!(recover(&p).unwrap(), Recovery::Discarded);
        assert_eq!(current(&p), is(1));
        assert!(!next_path(&p.certificate).exists());
    }

    #[test]
    fn an_interrupted_promotion_is_finished_at_recovery() {
        let d = tempfile::tempdir().unwrap();
        let p = paths(d.path());
        install(&p, &set(1)).unwrap();
        stage(&p, &set(2)).unwrap();
        // Crash after the marker said promoting and only the key was replaced: a mixed set.
        std::fs::write(marker(&p), PROMOTING).unwrap();
        std::fs::write(&p.key, "key2").unwrap();
        assert_eq!(recover(&p).unwrap(), Recovery::Promoted);
        assert_eq!(current(&p), is(2));
        assert!(!marker(&p).exists());
    }

    #[test]
    fn stray_next_files_without_a_marker_are_discarded() {
        let d = tempfile::tempdir().unwrap();
        let p = paths(d.path());
        install(&p, &set(1)).unwrap();
        // Crash during staging, before the marker: some .next files only.
        std::fs::write(next_path(&p.key), "key2").unwrap();
        assert_eq!(recover(&p).unwrap(), Recovery::Discarded);
        assert_eq!(current(&p), is(1));
        assert!(!next_path(&p.key).exists());
        // Crash after promotion removed the marker, before it removed the .next files.
        stage(&p, &set(3)).unwrap();
        promote(&p).unwrap();
        std::fs::write(next_path(&p.ca), "ca3").unwrap();
        assert_eq!(recover(&p).unwrap(), Recovery::Discarded);
        assert_eq!(current(&p), is(3));
    }

    #[test]
    fn a_new_switch_never_destroys_an_unfinished_promotion() {
        let d = tempfile::tempdir().unwrap();
        let p = paths(d.path());
        install(&p, &set(1)).unwrap();
        stage(&p, &set(2)).unwrap();
        // A promotion that failed after replacing the key (disk full, say).
        std::fs::write(marker(&p), PROMOTING).unwrap();
        std::fs::write(&p.key, "key2").unwrap();
        // Staging over it is refused; recovering first finishes it.
        assert!(stage(&p, &set(3)).is_err());
        assert_eq!(current(&p).0, "key2");
        assert_eq!(recover_unlocked(&p).unwrap(), Recovery::Promoted);
        assert_eq!(current(&p), is(2));
        stage(&p, &set(3)).unwrap();
        discard(&p).unwrap();
        assert_eq!(current(&p), is(2), "a discarded switch leaves a whole set");
    }

    #[test]
    fn debug_hides_the_key() {
        let s = format!("{:?}", set(7));
        assert!(!s.contains("key7"));
    }
}
