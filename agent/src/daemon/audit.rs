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
//! what matters for correctness, and is the source of truth for the audit log too.
//!
//! # Recovery
//!
//! A line is written after the journal's `finished` record, so a crash (a `kill -9`, a power
//! loss) between the two can lose it. At start, [`AuditLog::backfill`] compares the replies the
//! journal holds with the tags at the end of the audit files, and writes the missing lines with
//! `"recovered": true` and the time the reply was stored. Lines are written in the order replies
//! are stored, so walking the journal's replies newest first, the first one whose tag the audit
//! log has marks the end of what is missing. At most [`BACKFILL_MAX`] lines are written back; the
//! journal keeps replies for 24 h after their ACK, so an audit line lost longer ago than that is
//! lost for good.
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
use std::time::SystemTime;

use runos_protocol::control::types::ERROR;
use runos_protocol::{Envelope, ErrorPayload};
use serde::Serialize;

use runos_journal::EntryView;

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
    /// Written at start from the journal, because a crash lost the original line.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

impl Record {
    /// The time field for `ms` milliseconds since the epoch.
    pub fn time_of_ms(ms: u64) -> String {
        crate::util::time::rfc3339_ms(ms)
    }

    /// The time field for now.
    pub fn now() -> String {
        crate::util::time::rfc3339(SystemTime::now())
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
            recovered: false,
        }
    }
}

/// The most audit lines [`AuditLog::backfill`] writes back at one start.
pub const BACKFILL_MAX: usize = 1024;
/// Bytes read from the end of each audit file to learn which tags it holds.
const TAIL_BYTES: u64 = 1024 * 1024;

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

    /// Write the lines a crash lost between the journal's `finished` record and the audit write.
    /// `answered` holds the journal's final replies with their entries, **newest first** (by
    /// when the reply was stored). Returns how many lines were written.
    pub fn backfill(&mut self, answered: &[(EntryView, Envelope)]) -> usize {
        if answered.is_empty() {
            return 0;
        }
        let mut have = std::collections::HashSet::new();
        for p in [&self.path, &self.old] {
            tail_tags(p, TAIL_BYTES, &mut have);
        }
        let missing: Vec<_> = answered
            .iter()
            .take(BACKFILL_MAX)
            .take_while(|(view, _)| !have.contains(&view.tag.to_string()))
            .collect();
        // Oldest first, as they would have been written.
        for (view, reply) in missing.iter().rev() {
            let mut rec = Record::for_reply(Some(view), reply);
            if let Some(ms) = view.finished_ms {
                rec.time = Record::time_of_ms(ms);
            }
            rec.recovered = true;
            self.record(&rec);
        }
        if !missing.is_empty() {
            tracing::info!(
                lines = missing.len(),
                "audit lines a crash lost were written back from the journal"
            );
        }
        missing.len()
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

/// Add the tags of the audit lines in the last `max` bytes of `path` to `into` (nothing when the
/// file is missing or unreadable; lines that are not records are skipped).
fn tail_tags(path: &Path, max: u64, into: &mut std::collections::HashSet<String>) {
    use std::io::{Read as _, Seek as _, SeekFrom};
    #[derive(serde::Deserialize)]
    struct TagOnly {
        tag: String,
    }
    let Ok(mut f) = File::open(path) else { return };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return;
    };
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if f.take(max).read_to_end(&mut buf).is_err() {
        return;
    }
    let mut lines = buf.split(|b| *b == b'\n');
    if start > 0 {
        lines.next(); // Cut mid-line.
    }
    for line in lines {
        if let Ok(r) = serde_json::from_slice::<TagOnly>(line) {
            into.insert(r.tag);
        }
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
            recovered: false,
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

    fn answered(n: usize) -> Vec<(EntryView, Envelope)> {
        // Newest first: finished_ms descending.
        (0..n)
            .rev()
            .map(|i| {
                let tag = runos_protocol::Tag::random();
                let view = EntryView {
                    tag,
                    kind: "RUN_COMMAND".into(),
                    payload_sha256: "cd".repeat(32),
                    state: runos_journal::EntryState::Finished,
                    accepted_ms: 1_700_000_000_000 + i as u64,
                    started_ms: None,
                    finished_ms: Some(1_700_000_000_000 + i as u64),
                    acked_ms: None,
                    duration_ms: Some(1),
                    pgid: None,
                    reply_type: Some("NO_CONTENT".into()),
                    error_code: None,
                };
                let reply = Envelope::with_type("NO_CONTENT", tag, &serde_json::json!({}));
                (view, reply)
            })
            .collect()
    }

    fn lines(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(FILE))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn backfill_writes_only_the_lines_a_crash_lost() {
        let dir = tempfile::tempdir().unwrap();
        let all = answered(5); // newest first
        let mut a = AuditLog::new(dir.path(), DEFAULT_MAX_BYTES);
        // The three oldest were audited; a crash lost the two newest.
        for (view, reply) in all.iter().skip(2).rev() {
            a.record(&Record::for_reply(Some(view), reply));
        }
        let mut b = AuditLog::new(dir.path(), DEFAULT_MAX_BYTES);
        assert_eq!(b.backfill(&all), 2);
        let l = lines(dir.path());
        assert_eq!(l.len(), 5);
        // Written oldest first, marked, with the time the reply was stored.
        assert_eq!(l[3]["tag"], all[1].0.tag.to_string());
        assert_eq!(l[4]["tag"], all[0].0.tag.to_string());
        assert_eq!(l[4]["recovered"], true);
        assert_eq!(l[4]["time"], Record::time_of_ms(1_700_000_000_004));
        assert!(l[2].get("recovered").is_none());
        // Nothing is missing any more: a second start writes nothing.
        assert_eq!(
            AuditLog::new(dir.path(), DEFAULT_MAX_BYTES).backfill(&all),
            0
        );
        assert_eq!(lines(dir.path()).len(), 5);
    }

    #[test]
    fn backfill_finds_lines_in_the_rotated_file_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let all = answered(3);
        let mut a = AuditLog::new(dir.path(), DEFAULT_MAX_BYTES);
        for (view, reply) in all.iter().rev() {
            a.record(&Record::for_reply(Some(view), reply));
        }
        std::fs::rename(dir.path().join(FILE), dir.path().join(OLD_FILE)).unwrap();
        assert_eq!(
            AuditLog::new(dir.path(), DEFAULT_MAX_BYTES).backfill(&all),
            0
        );
        // No audit file at all: at most BACKFILL_MAX lines come back.
        let many = answered(BACKFILL_MAX + 10);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            AuditLog::new(empty.path(), DEFAULT_MAX_BYTES).backfill(&many),
            BACKFILL_MAX
        );
    }
}
