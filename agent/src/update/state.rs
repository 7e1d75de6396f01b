//! `<state_dir>/update.json` (0600, written atomically): the highest version ever installed
//! (the downgrade floor), the versions refused after a failed health gate, and the last
//! update's outcome.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::version::Version;
use crate::util::fs as fsutil;

/// Largest state file read.
const MAX_STATE_BYTES: u64 = 64 * 1024;
/// Refused versions remembered (oldest dropped first).
pub const MAX_REFUSED: usize = 64;
/// Longest message stored.
const MAX_MESSAGE_CHARS: usize = 1024;

/// How an update ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Installed (and, when the service was restarted, healthy).
    Ok,
    /// The new version failed its health gate; the previous one runs again.
    RolledBack,
    /// Nothing was installed.
    Failed,
}

impl Outcome {
    /// The wire and JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RolledBack => "rolled_back",
            Outcome::Failed => "failed",
        }
    }
}

/// The last update attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastUpdate {
    /// The version that was running.
    pub from: Version,
    /// The version asked for.
    pub to: Version,
    /// How it ended.
    pub outcome: Outcome,
    /// What happened, in words.
    pub message: String,
    /// When (RFC 3339).
    pub time: String,
}

impl LastUpdate {
    /// A record stamped now.
    pub fn now(from: Version, to: Version, outcome: Outcome, message: &str) -> Self {
        LastUpdate {
            from,
            to,
            outcome,
            message: message.chars().take(MAX_MESSAGE_CHARS).collect(),
            time: crate::util::time::rfc3339(std::time::SystemTime::now()),
        }
    }
}

/// The whole state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
// Unknown fields are ignored (not refused): a state written by a newer version must still be
// read after a rollback, or the downgrade floor and the refused list would be lost.
#[serde(rename_all = "camelCase", default)]
pub struct UpdateState {
    /// The highest version ever installed by the updater.
    pub highest_installed: Option<Version>,
    /// Versions refused for automatic updates after a failed health gate.
    pub refused: Vec<Version>,
    /// The last attempt.
    pub last: Option<LastUpdate>,
}

impl UpdateState {
    /// The state file under `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("update.json")
    }

    /// Read the state; a missing file is the empty state.
    pub fn load(state_dir: &Path) -> Result<Self, String> {
        let path = Self::path(state_dir);
        match fsutil::read_capped(&path, MAX_STATE_BYTES) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{} is not a valid update state ({e}); move it away to reset the update history",
                    path.display()
                )
            }),
            Err(fsutil::ReadError::NotFound) => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Write the state (0600, atomically; the state directory is created 0700).
    pub fn save(&self, state_dir: &Path) -> Result<(), String> {
        fsutil::ensure_dir(state_dir, 0o700).map_err(|e| e.to_string())?;
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        json.push(b'\n');
        fsutil::write_atomic(&Self::path(state_dir), &json, fsutil::Mode::Exact(0o600))
            .map_err(|e| e.to_string())
    }

    /// Raise the downgrade floor to `v`.
    pub fn installed(&mut self, v: Version) {
        if self.highest_installed.is_none_or(|h| v > h) {
            self.highest_installed = Some(v);
        }
    }

    /// Remember `v` as refused for automatic updates.
    pub fn refuse(&mut self, v: Version) {
        if !self.refused.contains(&v) {
            self.refused.push(v);
        }
        while self.refused.len() > MAX_REFUSED {
            self.refused.remove(0);
        }
    }

    /// Whether `v` was refused.
    pub fn is_refused(&self, v: Version) -> bool {
        self.refused.contains(&v)
    }
}

/// The last update, for HELLO (`None` when there is none or the state is unreadable).
pub fn report(state_dir: &Path) -> Option<runos_protocol::control::UpdateReport> {
    let last = UpdateState::load(state_dir).ok()?.last?;
    Some(runos_protocol::control::UpdateReport {
        from: last.from.tag(),
        to: last.to.tag(),
        outcome: last.outcome.as_str().to_string(),
        message: last.message,
        time: last.time,
    })
}

/// Load, change and save the state, best effort: a failure is logged, never fatal (the state
/// is bookkeeping; the install itself already succeeded or failed). A file that cannot be read
/// is never replaced: it holds the downgrade floor and the refused versions, and updates keep
/// refusing until an operator moves it away.
pub fn record(state_dir: &Path, f: impl FnOnce(&mut UpdateState)) {
    let mut st = match UpdateState::load(state_dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "update state unreadable; left as it is and not updated");
            return;
        }
    };
    f(&mut st);
    if let Err(e) = st.save(state_dir) {
        tracing::warn!(error = %e, "cannot write the update state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn an_unreadable_state_is_never_replaced_and_unknown_fields_are_kept_readable() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut s = UpdateState::default();
        s.installed(Version::new(9, 9, 9));
        s.save(dir).unwrap();
        // A newer version's field: still readable, the floor kept.
        let path = UpdateState::path(dir);
        let text =
            std::fs::read_to_string(&path)
                .unwrap()
                .replacen('{', "{\n  \"pending\": null,", 1);
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            UpdateState::load(dir).unwrap().highest_installed,
            Some(Version::new(9, 9, 9))
        );
        // A damaged file is left alone by `record`.
        std::fs::write(&path, "{not json").unwrap();
        record(dir, |st| st.installed(Version::new(1, 0, 0)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{not json");
    }

    #[test]
    fn round_trip_mode_and_bounds() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        assert_eq!(UpdateState::load(&dir).unwrap(), UpdateState::default());
        let mut s = UpdateState::default();
        s.installed(Version::new(0, 2, 0));
        s.installed(Version::new(0, 1, 0));
        assert_eq!(s.highest_installed, Some(Version::new(0, 2, 0)));
        for i in 0..100 {
            s.refuse(Version::new(1, 0, i));
        }
        s.refuse(Version::new(1, 0, 99));
        assert_eq!(s.refused.len(), MAX_REFUSED);
        assert!(s.is_refused(Version::new(1, 0, 99)));
        assert!(!s.is_refused(Version::new(1, 0, 0)));
        s.last = Some(LastUpdate::now(
            Version::new(0, 1, 0),
            Version::new(0, 2, 0),
            Outcome::RolledBack,
            &"x".repeat(5000),
        ));
        s.save(&dir).unwrap();
        let mode = std::fs::metadata(UpdateState::path(&dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = UpdateState::load(&dir).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.last.unwrap().message.len(), MAX_MESSAGE_CHARS);
        let text = std::fs::read_to_string(UpdateState::path(&dir)).unwrap();
        assert!(text.contains("\"rolled_back\""), "{text}");
    }

    #[test]
    fn hostile_state_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        for bad in [&b"{"[..], b"{\"refused\": [\"1.0\"]}", b"[1]", b"\xff"] {
            std::fs::write(UpdateState::path(d.path()), bad).unwrap();
            let e = UpdateState::load(d.path()).unwrap_err();
            assert!(e.contains("update.json"), "{e}");
        }
        std::fs::write(UpdateState::path(d.path()), vec![b' '; 100_000]).unwrap();
        assert!(UpdateState::load(d.path()).is_err());
    }
}
