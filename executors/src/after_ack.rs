//! Pending after-ACK steps on disk: one small file per step, `<executor state dir>/after-ack/
//! <tag>.json` (0600, written atomically), holding the tag, the instruction and reply types, the
//! step's name and its parameters.
//!
//! The dispatcher writes the file **before** the reply is journaled and sent, runs the step once
//! the reply is acknowledged, and removes the file after the step ran. At start it reads every
//! file left ([`load_all`]) and decides with the journal: a reply already acknowledged runs the
//! step now, a reply awaiting its ACK waits for it, and a file whose tag's stored reply is not the
//! success reply it was written for (the agent died before the reply was stored: the tag was
//! answered `interrupted`), or that the journal no longer holds, is removed without running. So a crash between the ACK and the step
//! runs the step once at the next start.

use std::path::{Path, PathBuf};

use runos_protocol::Tag;
use serde::{Deserialize, Serialize};

use crate::contract::AfterAck;
use crate::handle::{ensure_dir, remove_durably, write_atomic};

/// The directory of the pending steps under an executor's state directory.
pub const DIR: &str = "after-ack";

/// Largest pending-step file read back at start.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// One pending step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingStep {
    /// The instruction's tag.
    pub tag: Tag,
    /// The instruction's type.
    pub kind: String,
    /// The type of the reply the step follows.
    pub reply_type: String,
    /// The step.
    #[serde(flatten)]
    pub step: AfterAck,
}

/// The file of `p` under the executor state directory `state_dir`.
pub fn path(state_dir: &Path, tag: &Tag) -> PathBuf {
    state_dir.join(DIR).join(format!("{tag}.json"))
}

/// Store `p` durably under `state_dir`; the file's path.
pub fn save(state_dir: &Path, p: &PendingStep) -> std::io::Result<PathBuf> {
    let file = path(state_dir, &p.tag);
    ensure_dir(file.parent().unwrap_or(state_dir))?;
    let json = serde_json::to_vec(p).map_err(std::io::Error::other)?;
    write_atomic(&file, &json, 0o600)?;
    Ok(file)
}

/// Remove a pending step's file.
pub fn remove(file: &Path) -> std::io::Result<()> {
    remove_durably(file)
}

/// Every pending step under the executor state directories `dirs`, oldest file first. Files
/// that cannot be read or decoded are logged and removed.
pub fn load_all<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> Vec<(PathBuf, PendingStep)> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(dir.join(DIR)) else {
            continue;
        };
        for ent in rd.flatten() {
            let file = ent.path();
            if file.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed = ent
                .metadata()
                .ok()
                .filter(|m| m.is_file() && m.len() <= MAX_FILE_BYTES)
                .and_then(|m| {
                    let data = std::fs::read(&file).ok()?;
                    let p: PendingStep = serde_json::from_slice(&data).ok()?;
                    Some((m.modified().ok(), p))
                });
            match parsed {
                Some((at, p)) => out.push((at, file, p)),
                None => {
                    tracing::warn!(file = %file.display(), "unreadable pending after-ACK step; removed");
                    let _ = remove(&file);
                }
            }
        }
    }
    out.sort_by_key(|a| a.0);
    out.into_iter().map(|(_, f, p)| (f, p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_and_bad_files_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = PendingStep {
            tag: Tag::random(),
            kind: "UPDATE_AGENT".into(),
            reply_type: "UPDATE_AGENT_RESPONSE".into(),
            step: AfterAck {
                step: "restart".into(),
                params: serde_json::json!({"to": "1.2.3"}),
            },
        };
        let f = save(dir.path(), &p).unwrap();
        std::fs::write(dir.path().join(DIR).join("junk.json"), b"{").unwrap();
        let all = load_all([dir.path()]);
        assert_eq!(all, vec![(f.clone(), p)]);
        assert!(!dir.path().join(DIR).join("junk.json").exists());
        remove(&f).unwrap();
        assert!(load_all([dir.path()]).is_empty());
    }
}
