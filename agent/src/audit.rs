//! The audit log: `<state_dir>/audit.jsonl`, one JSON line per instruction, written when its
//! final reply is produced:
//!
//! ```json
//! {"time":"2026-11-23T20:13:56.123Z","tag":"…","type":"RUN_COMMAND","payloadSha256":"…","durationMs":12,"outcome":"RUN_COMMAND_RESPONSE"}
//! ```
//!
//! `outcome` is the reply type on success and the error code when the reply is `ERROR`;
//! `durationMs` is how long the executor ran (`null` when none ran, e.g. `unknown_type`). The
//! line holds the sha256 of the payload, never the payload, and no reply body: a token, a key, an
//! environment value or a script parameter sent in an instruction never reaches this file.
//! `busy` and `shutting_down` are not recorded (the control plane resends those with the same
//! tag, which then gets its line when it is answered for good).
//!
//! # Writing
//!
//! The file is created 0600 and opened with `O_APPEND`; each record is one `write` of one whole
//! line, so lines never interleave or tear at a process crash (the dispatcher, the only writer,
//! runs under the instance lock).
//!
//! There is no `fsync` per line, on purpose. The audit log is a record for people, not part of
//! the delivery guarantee: the journal, which is synced before a reply is sent, already holds
//! what matters for correctness. A crash of the agent process loses nothing (the `write` has
//! reached the kernel); only a power loss or kernel crash can lose the last lines still in the
//! page cache. A sync per line would double the number of syncs per instruction.
//!
//! # Rotation
//!
//! When a line would take the file over its bound ([`DEFAULT_MAX_BYTES`], 16 MiB), `audit.jsonl`
//! is renamed to `audit.jsonl.1` (replacing the previous old file, so at most one is kept) and a
//! fresh `audit.jsonl` is started. Both stay 0600 (a rename keeps the mode).
//!
//! # Failures
//!
//! Writing the audit log never fails an instruction. The first failure is logged as an error,
//! later ones are not (until a write succeeds again, which is logged once too); the file is
//! reopened at the next record.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runos_protocol::control::types::ERROR;
use runos_protocol::{Envelope, ErrorPayload};
use serde::Serialize;

use crate::journal::EntryView;

/// The audit log's file name in the state directory.
pub const FILE: &str = "audit.jsonl";
/// The previous audit log, after a rotation.
pub const OLD_FILE: &str = "audit.jsonl.1";
/// Default size bound of `audit.jsonl` before it is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// When the final reply was produced (RFC 3339, UTC).
    pub time: String,
    /// The instruction's tag.
    pub tag: String,
    /// The instruction's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// sha256 (hex) of the payload.
    pub payload_sha256: String,
    /// How long the executor ran (`None` when no executor ran).
    pub duration_ms: Option<u64>,
    /// The reply type, or the error code of an `ERROR` reply.
    pub outcome: String,
}

impl Record {
    /// The time field for `ms` milliseconds since the epoch.
    pub fn time_of_ms(ms: u64) -> String {
        crate::status::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The time field for now.
    pub fn now() -> String {
        crate::status::rfc3339(SystemTime::now())
    }

    /// The record of the final reply `reply`, produced now, for the instruction the journal
    /// shows as `view` (`None` when the journal does not hold it: type and digest unknown).
    pub fn for_reply(view: Option<&EntryView>, reply: &Envelope) -> Record {
        let outcome = if reply.is(ERROR) {
            reply
                .payload::<ErrorPayload>()
                .map(|p| p.code.as_str().to_string())
                .unwrap_or_else(|_| "ERROR".into())
        } else {
            reply.kind.to_string()
        };
        Record {
            time: Record::now(),
            tag: reply.tag.to_string(),
            kind: view.map_or_else(|| "unknown".into(), |v| v.kind.clone()),
            payload_sha256: view.map(|v| v.payload_sha256.clone()).unwrap_or_default(),
            duration_ms: view.and_then(|v| v.duration_ms),
            outcome,
        }
    }
}

/// The append-only audit log (opened lazily at the first record).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    old: PathBuf,
    max_bytes: u64,
    file: Option<(File, u64)>,
    failing: bool,
}

impl AuditLog {
    /// The audit log in `dir` (the state directory), rotated over `max_bytes`.
    pub fn new(dir: &Path, max_bytes: u64) -> AuditLog {
        AuditLog {
            path: dir.join(FILE),
            old: dir.join(OLD_FILE),
            max_bytes,
            file: None,
            failing: false,
        }
    }

    /// The current file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `rec`. Never fails: a failure is logged (once until writes succeed again).
    pub fn record(&mut self, rec: &Record) {
        match self.try_record(rec) {
            Ok(()) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!(path = %self.path.display(), "the audit log is writable again");
                }
            }
            Err(e) => {
                self.file = None;
                if !self.failing {
                    self.failing = true;
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        "cannot write the audit log; instructions go on, further failures are not logged until it works again"
                    );
                }
            }
        }
    }

    fn try_record(&mut self, rec: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
        line.push(b'\n');
        let len = line.len() as u64;
        if let Some((_, size)) = &self.file
            && *size > 0
            && size.saturating_add(len) > self.max_bytes
        {
            self.file = None;
            std::fs::rename(&self.path, &self.old)?;
        }
        if self.file.is_none() {
            let f = open(&self.path)?;
            let size = f.metadata()?.len();
            self.file = Some((f, size));
            // A file left over by a previous run may already be over the bound.
            if size > 0 && size.saturating_add(len) > self.max_bytes {
                self.file = None;
                std::fs::rename(&self.path, &self.old)?;
                self.file = Some((open(&self.path)?, 0));
            }
        }
        let Some((f, size)) = self.file.as_mut() else {
            return Err(io::Error::other("the audit log is not open"));
        };
        // One write of the whole line (O_APPEND: it lands at the end, in one piece).
        let n = f.write(&line)?;
        *size += n as u64;
        if n != line.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {len} bytes"),
            ));
        }
        Ok(())
    }
}

fn open(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    // A file created earlier with a wider mode is narrowed.
    if f.metadata()?.permissions().mode() & 0o777 != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> Record {
        Record {
            time: Record::time_of_ms(1_700_000_000_123),
            tag: format!("tag-{i}"),
            kind: "RUN_COMMAND".into(),
            payload_sha256: "ab".repeat(32),
            duration_ms: Some(5),
            outcome: "RUN_COMMAND_RESPONSE".into(),
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn line_format_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = AuditLog::new(dir.path(), DEFAULT_MAX_BYTES);
        a.record(&rec(1));
        let mut r = rec(2);
        r.duration_ms = None;
        r.outcome = "unknown_type".into();
        a.record(&r);
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "time": "2023-11-14T22:13:20.123Z",
                "tag": "tag-1",
                "type": "RUN_COMMAND",
                "payloadSha256": "ab".repeat(32),
                "durationMs": 5,
                "outcome": "RUN_COMMAND_RESPONSE",
            })
        );
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert!(v["durationMs"].is_null());
        assert_eq!(v["outcome"], "unknown_type");
        assert_eq!(mode(&dir.path().join(FILE)), 0o600);
    }

    #[test]
    fn appends_across_reopen_and_narrows_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE);
        std::fs::write(&p, "{\"old\":1}\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut a = AuditLog::new(dir.path(), DEFAULT_MAX_BYTES);
        a.record(&rec(1));
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("{\"old\":1}\n"), "{text}");
        assert_eq!(text.lines().count(), 2);
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn rotates_over_the_bound_keeping_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let line_len = serde_json::to_vec(&rec(1)).unwrap().len() as u64 + 1;
        // Room for three lines per file.
        let mut a = AuditLog::new(dir.path(), line_len * 3 + 2);
        for i in 0..8 {
            a.record(&rec(i));
        }
        let cur = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        let old = std::fs::read_to_string(dir.path().join(OLD_FILE)).unwrap();
        let tags = |t: &str| -> Vec<String> {
            t.lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["tag"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(tags(&old), ["tag-3", "tag-4", "tag-5"]);
        assert_eq!(tags(&cur), ["tag-6", "tag-7"]);
        assert!(!dir.path().join("audit.jsonl.2").exists());
        assert_eq!(mode(&dir.path().join(FILE)), 0o600);
        assert_eq!(mode(&dir.path().join(OLD_FILE)), 0o600);
        // A file over the bound at open (previous run) is rotated before the first line.
        let mut b = AuditLog::new(dir.path(), line_len);
        b.record(&rec(9));
        assert_eq!(
            tags(&std::fs::read_to_string(dir.path().join(FILE)).unwrap()),
            ["tag-9"]
        );
    }

    #[test]
    fn a_failure_never_panics_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let mut a = AuditLog::new(&missing, DEFAULT_MAX_BYTES);
        a.record(&rec(1));
        assert!(a.failing);
        std::fs::create_dir(&missing).unwrap();
        a.record(&rec(2));
        assert!(!a.failing);
        let text = std::fs::read_to_string(missing.join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 1);
    }
}
