//! The durable instruction journal of the runos agent: what the agent accepted, started and
//! answered, kept on disk so that a crash, restart or reboot neither runs an instruction twice
//! nor loses its reply.
//!
//! The crate knows envelopes and tags (`runos-protocol`) but no instruction catalog: what it
//! must know of instruction types (which are safe to re-run, which have secret replies) is a
//! [`Policy`] its user passes to [`Journal::open`]. The agent derives it from the protocol
//! crate's catalog.
//!
//! # Contract (for the dispatcher)
//!
//! For each instruction the dispatcher calls, in this order:
//!
//! 1. [`Journal::lookup`]: [`Lookup::New`] → go on; [`Lookup::InProgress`] → do nothing (the one
//!    reply goes out when it finishes); [`Lookup::Done`] → send that stored reply again, run
//!    nothing; [`Lookup::Discarded`] → answer `ERROR` `reply_discarded`, run nothing (see
//!    "Secret replies").
//! 2. [`Journal::accepted`] with the payload's sha256 ([`payload_sha256`]), never the payload.
//!    [`JournalError::Full`] maps to `ERROR` `busy`. When the dispatcher then refuses the
//!    instruction without starting it (`shutting_down`), it calls [`Journal::forget`].
//! 3. [`Journal::started`], which returns only once the record is on disk, **before** the
//!    executor starts.
//! 4. [`Journal::finished`], which returns only once the reply is on disk, **before** the reply is
//!    sent. Replies that need no executor (`unknown_type`, `unsupported`, `bad_payload`) go
//!    through `accepted` then `finished` directly.
//! 5. [`Journal::acked`] when the control plane's `ACK` arrives.
//!
//! After each `WELCOME`, [`Journal::unacked`] gives the replies to resend, oldest first (the order
//! they were produced). [`Journal::open`] replays the file and returns a [`Recovery`]: what was
//! cut short by the previous run (see below).
//!
//! Every method is synchronous and meant to be called from the dispatcher task; a synced
//! append costs one `fdatasync` (see the test `synced_append_cost` for a measurement).
//!
//! # Storage: an append-only log of our own
//!
//! One file, `journal.log` (mode 0600, in a directory created 0700), holding a sequence of
//! records, each framed as:
//!
//! ```text
//! u32 big-endian length of the body | u32 big-endian CRC-32C of the body | body (JSON)
//! ```
//!
//! The body is one JSON object with a `rec` field naming the record:
//!
//! - `{"rec":"accepted","tag":…,"type":…,"payloadSha256":…,"atMs":…}`: queued;
//! - `{"rec":"started","tag":…,"atMs":…,"pgid":…}`: the executor is about to start;
//! - `{"rec":"finished","tag":…,"atMs":…,"reply":<envelope>,"durationMs":…}`: the final reply;
//! - `{"rec":"acked","tag":…,"atMs":…}`: the control plane stored the reply;
//! - `{"rec":"discarded","tag":…,"atMs":…,"reply":{"replyType":…,"errorCode":…,"replySha256":…},"durationMs":…}`:
//!   stands in for the `finished` record of a secret reply once it is acknowledged (written only
//!   by a rewrite, see "Secret replies").
//!
//! An `accepted` record always starts a fresh entry for its tag: it is only written when the tag
//! was unknown, so an earlier entry with that tag was forgotten (never started, safe to re-run,
//! or acknowledged and past retention).
//!
//! Why not SQLite or redb: the agent stays free of C code (SQLite), the access pattern is a pure
//! append of small records with one `fdatasync` per state change (which a log does with one
//! `write` and one sync, where a B-tree commit writes and syncs several pages), the whole live
//! state fits in memory (it is bounded by [`Limits`]), and the recovery rules (a torn tail is
//! cut, everything before it kept) are a few dozen lines we can test exhaustively.
//!
//! The checksum is CRC-32C, from the `crc32c` crate (the same values as the table-driven code of
//! earlier versions, so their files open unchanged; see the tests). It guards against
//! torn and partially flushed writes and bit rot, not against an attacker (who could rewrite the
//! checksum as easily as the body; the file is root-only). A cryptographic hash would cost more
//! for no gain in that threat model.
//!
//! # Durability (fsync policy)
//!
//! - `started` and `finished` are `fdatasync`'d before they return. Since the file is written
//!   strictly in order, a sync also makes every earlier record durable.
//! - `accepted` and `acked` are written without a sync. Losing an `accepted` (power loss before
//!   the next sync) means the tag was never started: the control plane redelivers it and it runs
//!   once. Losing an `acked` means the reply is resent after the next `WELCOME`; the control plane
//!   acknowledges duplicates and stores only the first. Both are handled by the tag logic.
//! - [`Limits::sync`] set to false skips every sync (for benchmarks only; [`Stats::syncs`] counts
//!   the syncs performed).
//!
//! # Recovery on open
//!
//! Records are read until the first bad frame: a short header, a length over
//! [`MAX_RECORD_BYTES`] or past the end of the file, a CRC mismatch or a body that is not a
//! record. Everything before it is kept; the file is truncated back to the end of the last good
//! record and a warning names the byte offset. (Corruption in the middle of the file therefore
//! also drops the records after it: a record is only trusted when every record before it is.)
//!
//! Then, for entries the previous run left unfinished:
//!
//! - running, and not safe to re-run ([`Policy::safe_to_rerun`]): a `finished` record with
//!   `ERROR` `interrupted` is appended; the reply goes out through the outbox. Never re-run
//!   silently.
//! - running and safe to re-run, or queued (never started): forgotten, so that a redelivery runs
//!   them.
//!
//! [`Recovery`] lists both, with the process group each had recorded so that the caller can
//! kill leftover processes. (A process group id is meaningful only if the node did not reboot
//! since; the caller must check that before killing anything.)
//!
//! # Bounds and retention
//!
//! - An entry stays until its reply is acknowledged and [`Limits::retention`] has passed since;
//!   then it is dropped and a redelivered tag is new again (the control plane never reuses a tag
//!   for a different instruction, and it stored the reply before acknowledging it).
//! - Acknowledged entries are dropped before their retention ends when the journal holds more
//!   than [`Limits::max_entries`] entries or [`Limits::max_bytes`] bytes, oldest ACK first.
//! - When the entries not yet acknowledged alone reach `max_bytes` or `max_entries`,
//!   [`Journal::accepted`] refuses with [`JournalError::Full`]. The bound is soft by the replies
//!   of instructions already accepted (each at most [`MAX_RECORD_BYTES`]).
//! - The file is compacted (live entries rewritten to `journal.log.tmp`, synced, renamed over
//!   `journal.log`, directory synced) when it is over 1 MiB and more than twice the live size, and
//!   on open when the previous run left something to forget.
//!
//! # Secrets
//!
//! The journal stores the sha256 of an instruction's payload, never the payload
//! ([`Journal::accepted`] refuses anything but 64 hex digits). It stores reply envelopes, which
//! executors keep free of payload secrets, except the replies of types whose reply is the
//! secret ([`Policy::secret_reply`]; see below). Errors name the file and the failed
//! operation; they never contain a payload or a reply.
//!
//! # Secret replies
//!
//! A reply of a secret type (a join token and certificate key, a script's output) is kept
//! whole while it may have to be resent, that is until the control plane acknowledges it.
//! [`Journal::acked`] then replaces it by a [`Discarded`] (reply type, error code, sha256 of the
//! payload), in memory and in the file, `ERROR` replies included (a tool's error output may
//! hold anything):
//!
//! - The `acked` record of a secret reply is not appended: the ACK is recorded by a rewrite of
//!   the whole file (as a compaction: temporary file, `fsync`, rename, directory `fsync`) in
//!   which the entry's `finished` record is replaced by a `discarded` record. The ACK becomes
//!   durable in the same rename that removes the reply from the journal: a crash before it
//!   leaves the old file, where the reply is not acknowledged (it is resent after the next
//!   `WELCOME` and acknowledged again, a duplicate for the control plane); a crash after it,
//!   the new file, which holds no byte of the reply. `acked` returns once the rename is done.
//! - When that rewrite fails (a full disk, an I/O error), the `acked` record is appended to
//!   the old file instead, the reply is discarded in memory at once, and the rewrite is retried
//!   after every later write. Until one succeeds the file still holds the reply.
//! - [`Journal::open`] discards every acknowledged secret reply it finds whole (a crash
//!   between such a failed rewrite and its retry, or a type that became secret in a newer
//!   version) and rewrites the file before it returns.
//! - What a discarded reply looks up as: [`Lookup::Discarded`] (answer `reply_discarded`), or
//!   [`Lookup::New`] when the type is safe to re-run (a redelivery runs it again; its
//!   `accepted` replaces the entry).
//!
//! The cost is one rewrite of the live journal per acknowledged secret reply, so only types
//! whose reply is the secret itself are marked secret. What the rename leaves behind is the
//! old file's blocks, freed but not overwritten: recovering them takes raw access to the disk
//! as root; encrypted storage is the defence against that.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use runos_protocol::control::types::ERROR;
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, Tag};
use serde::{Deserialize, Serialize};

/// The journal's file name inside its directory.
pub const LOG_FILE: &str = "journal.log";
/// The file a compaction writes before renaming it over [`LOG_FILE`].
pub const TMP_FILE: &str = "journal.log.tmp";
/// The largest record body accepted (a reply of the largest frame, 16 MiB, plus room for the
/// record around it). A longer length prefix is treated as corruption.
pub const MAX_RECORD_BYTES: u32 = 17 * 1024 * 1024;
/// The message of the `interrupted` reply written at recovery.
pub const INTERRUPTED_MESSAGE: &str =
    "the agent stopped (crash, restart or reboot) while this instruction ran; it was not re-run";

/// Length and checksum, before each body.
const HEADER_BYTES: u64 = 8;
/// Below this file size, no compaction for garbage alone.
const COMPACT_MIN_BYTES: u64 = 1024 * 1024;

/// Bounds of the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// About how many bytes of records the journal keeps (default 64 MiB). Unacknowledged
    /// entries reaching it make [`Journal::accepted`] answer [`JournalError::Full`].
    pub max_bytes: u64,
    /// How long an acknowledged entry is kept, to answer a redelivery with the same reply
    /// (default 24 h).
    pub retention: Duration,
    /// Most entries kept (default 100 000).
    pub max_entries: usize,
    /// Whether `started` and `finished` are synced to disk before they return (default true;
    /// false only for benchmarks).
    pub sync: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 * 1024 * 1024,
            retention: Duration::from_secs(24 * 3600),
            max_entries: 100_000,
            sync: true,
        }
    }
}

/// What the journal must know of instruction types, passed in by its user (the agent derives it
/// from the protocol crate's catalog): the journal itself knows no catalog.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Whether an instruction of this type may run again under the same tag: one the previous
    /// run left running is forgotten at open (a redelivery runs it) instead of being answered
    /// `interrupted`, and a redelivery of one whose secret reply was discarded runs it again
    /// instead of being answered `reply_discarded`.
    pub safe_to_rerun: fn(&str) -> bool,
    /// Whether the replies to this type carry secrets: once acknowledged, such a reply is
    /// replaced by its sha256, in memory and in the file (see the crate documentation).
    pub secret_reply: fn(&str) -> bool,
}

/// What the journal keeps of a secret reply once it is acknowledged: no byte of its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Discarded {
    /// The reply's type.
    pub reply_type: String,
    /// Its error code, when it was an `ERROR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// sha256 (hex) of its payload, as [`payload_sha256`] computes it for an envelope.
    pub reply_sha256: String,
}

impl Discarded {
    fn of(reply: &Envelope) -> Discarded {
        Discarded {
            reply_type: reply.kind.to_string(),
            error_code: error_code_of(reply),
            reply_sha256: payload_sha256(reply),
        }
    }
}

/// The error code of `reply` when it is an `ERROR`.
fn error_code_of(reply: &Envelope) -> Option<String> {
    Some(reply)
        .filter(|r| r.is(ERROR))
        .and_then(|r| r.payload::<ErrorPayload>().ok())
        .map(|p| p.code.as_str().to_string())
}

/// A source of wall-clock time in milliseconds since the Unix epoch (injected by tests).
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A journal operation that failed. Messages name the file and what failed, never a payload.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file-system operation failed.
    #[error("journal {path}: cannot {action}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Unacknowledged replies fill the journal: answer `busy`.
    #[error(
        "journal {path} is full: {unacked} unacknowledged entries hold {bytes} bytes (limits {max_entries} entries, {max_bytes} bytes)"
    )]
    Full {
        /// The journal file.
        path: PathBuf,
        /// Entries not yet acknowledged.
        unacked: usize,
        /// Their size.
        bytes: u64,
        /// [`Limits::max_entries`].
        max_entries: usize,
        /// [`Limits::max_bytes`].
        max_bytes: u64,
    },
    /// `accepted` for a tag the journal already holds (call [`Journal::lookup`] first).
    #[error("journal {path}: tag {tag} is already recorded ({state})")]
    AlreadyRecorded {
        /// The journal file.
        path: PathBuf,
        /// The tag.
        tag: Tag,
        /// Its state.
        state: &'static str,
    },
    /// A state change that does not follow from the tag's state (or the tag is unknown).
    #[error("journal {path}: cannot record {record} for tag {tag}: it is {state}")]
    WrongState {
        /// The journal file.
        path: PathBuf,
        /// The tag.
        tag: Tag,
        /// The record refused.
        record: &'static str,
        /// The tag's state (`unknown` when not in the journal).
        state: &'static str,
    },
    /// The reply passed to `finished` carries another tag.
    #[error("journal {path}: the reply for tag {tag} carries tag {reply_tag}")]
    ReplyTagMismatch {
        /// The journal file.
        path: PathBuf,
        /// The instruction's tag.
        tag: Tag,
        /// The reply's tag.
        reply_tag: Tag,
    },
    /// The payload digest is not 64 hex digits (the journal never stores a payload).
    #[error("journal {path}: the payload digest must be a sha256 in hex (64 digits)")]
    BadDigest {
        /// The journal file.
        path: PathBuf,
    },
    /// A record would exceed [`MAX_RECORD_BYTES`].
    #[error("journal {path}: the record for tag {tag} is {len} bytes, over the {max}-byte maximum")]
    TooLarge {
        /// The journal file.
        path: PathBuf,
        /// The tag.
        tag: Tag,
        /// Its encoded length.
        len: usize,
        /// [`MAX_RECORD_BYTES`].
        max: u32,
    },
    /// A record could not be encoded.
    #[error("journal {path}: cannot encode the record for tag {tag}: {source}")]
    Encode {
        /// The journal file.
        path: PathBuf,
        /// The tag.
        tag: Tag,
        /// The cause (serde_json's serialization errors name no value).
        source: serde_json::Error,
    },
    /// An earlier write or sync failed and could not be undone: the file's state is unknown,
    /// so nothing more is written until the journal is opened again.
    #[error(
        "journal {path} is unusable after a failed write or sync; restart the agent to recover it"
    )]
    Poisoned {
        /// The journal file.
        path: PathBuf,
    },
}

/// What the journal knows of a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Unknown (or forgotten): run it.
    New,
    /// Queued or running: do not start it again; its reply goes out when it finishes.
    InProgress,
    /// Answered: send this reply again, run nothing.
    Done(Envelope),
    /// Answered with a secret reply that was acknowledged and then discarded (only its type,
    /// error code and digest are left), for a type not safe to re-run: answer `ERROR`
    /// `reply_discarded`, run nothing. (A discarded reply of a type safe to re-run looks up as
    /// [`Lookup::New`]: the redelivery runs again.)
    Discarded(Discarded),
}

/// The state of an entry, for views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// Accepted, not started.
    Queued,
    /// Started, no reply yet.
    Running,
    /// Answered, not yet acknowledged.
    Finished,
    /// Answered and acknowledged.
    Acked,
}

impl EntryState {
    /// The state's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            EntryState::Queued => "queued",
            EntryState::Running => "running",
            EntryState::Finished => "finished",
            EntryState::Acked => "acked",
        }
    }
}

/// One entry as `runos journal` shows it (no payload, no reply body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryView {
    /// The instruction's tag.
    pub tag: Tag,
    /// The instruction's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// sha256 (hex) of the payload.
    pub payload_sha256: String,
    /// The state.
    pub state: EntryState,
    /// When it was accepted (ms since the epoch).
    pub accepted_ms: u64,
    /// When it started.
    pub started_ms: Option<u64>,
    /// When its reply was stored.
    pub finished_ms: Option<u64>,
    /// When the reply was acknowledged.
    pub acked_ms: Option<u64>,
    /// How long it ran.
    pub duration_ms: Option<u64>,
    /// The process group recorded when it started.
    pub pgid: Option<i32>,
    /// The reply's type.
    pub reply_type: Option<String>,
    /// The error code when the reply is `ERROR`.
    pub error_code: Option<String>,
}

/// Sizes and counts, for status output and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Entries held.
    pub entries: usize,
    /// Accepted, not started.
    pub queued: usize,
    /// Running.
    pub running: usize,
    /// Replies awaiting ACK.
    pub unacked: usize,
    /// Acknowledged, kept for the retention period.
    pub acked: usize,
    /// Size of the file.
    pub file_bytes: u64,
    /// Bytes of the records of the entries held.
    pub live_bytes: u64,
    /// Bytes of the records of the entries not acknowledged.
    pub unacked_bytes: u64,
    /// When the oldest reply awaiting ACK was stored.
    pub oldest_unacked_ms: Option<u64>,
    /// When the oldest entry held was accepted.
    pub oldest_entry_ms: Option<u64>,
    /// Syncs performed since open (appends and compactions).
    pub syncs: u64,
    /// Compactions since open.
    pub compactions: u64,
}

/// An instruction the previous run left running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutShort {
    /// Its tag.
    pub tag: Tag,
    /// Its type.
    pub kind: String,
    /// The process group recorded when it started (valid only if the node did not reboot).
    pub pgid: Option<i32>,
}

/// A torn or corrupt tail cut off at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Offset of the first bad record: the file's new length.
    pub offset: u64,
    /// Bytes dropped.
    pub dropped_bytes: u64,
    /// What was wrong.
    pub reason: &'static str,
}

/// What [`Journal::open`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Running, not safe to re-run: answered `ERROR` `interrupted` (the reply is in
    /// [`Journal::unacked`]).
    pub interrupted: Vec<CutShort>,
    /// Running and safe to re-run: forgotten, a redelivery runs them again.
    pub rerunnable: Vec<CutShort>,
    /// Accepted and never started: forgotten.
    pub never_started: Vec<Tag>,
    /// The torn or corrupt tail that was cut, if any.
    pub truncated: Option<Truncation>,
    /// Acknowledged entries dropped (retention over).
    pub expired: usize,
}

impl Recovery {
    /// Process groups recorded by instructions the previous run left running.
    pub fn leftover_pgids(&self) -> Vec<i32> {
        self.interrupted
            .iter()
            .chain(&self.rerunnable)
            .filter_map(|c| c.pgid)
            .collect()
    }
}

/// The sha256 (lowercase hex) that [`Journal::accepted`] records for an instruction: of its
/// decoded payload bytes, or of the `jsonB64` text itself when that is not valid base64.
pub fn payload_sha256(env: &Envelope) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = match base64::engine::general_purpose::STANDARD.decode(env.json_b64.as_bytes()) {
        Ok(bytes) => sha2::Sha256::digest(&bytes),
        Err(_) => sha2::Sha256::digest(env.json_b64.as_bytes()),
    };
    hex::encode(digest)
}

// ---------------------------------------------------------------------------------------------
// Records and framing

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "rec", rename_all = "camelCase", rename_all_fields = "camelCase")]
enum Record<'a> {
    Accepted {
        tag: Tag,
        #[serde(rename = "type")]
        kind: Cow<'a, str>,
        payload_sha256: Cow<'a, str>,
        at_ms: u64,
    },
    Started {
        tag: Tag,
        at_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pgid: Option<i32>,
    },
    Finished {
        tag: Tag,
        at_ms: u64,
        reply: Cow<'a, Envelope>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
    },
    Acked {
        tag: Tag,
        at_ms: u64,
    },
    /// Stands in for `finished` once a secret reply is acknowledged (written only by a rewrite).
    Discarded {
        tag: Tag,
        at_ms: u64,
        reply: Discarded,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
    },
}

impl Record<'_> {
    fn tag(&self) -> Tag {
        match self {
            Record::Accepted { tag, .. }
            | Record::Started { tag, .. }
            | Record::Finished { tag, .. }
            | Record::Acked { tag, .. }
            | Record::Discarded { tag, .. } => *tag,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Record::Accepted { .. } => "accepted",
            Record::Started { .. } => "started",
            Record::Finished { .. } => "finished",
            Record::Acked { .. } => "acked",
            Record::Discarded { .. } => "discarded",
        }
    }
}

/// CRC-32C (Castagnoli), as in iSCSI, ext4 and SCTP: the `crc32c` crate (hardware-accelerated
/// where the CPU has it), the same values the hand-written table of earlier versions produced.
fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Why a frame was refused at replay.
fn frame_problem(header: [u8; 8], remaining_after_header: u64) -> Result<(u32, u32), &'static str> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD_BYTES {
        return Err("length prefix over the maximum record size");
    }
    if u64::from(len) > remaining_after_header {
        return Err("record body cut short");
    }
    Ok((len, crc))
}

// ---------------------------------------------------------------------------------------------
// Entries

#[derive(Debug, Clone, Copy)]
struct Mark {
    ms: u64,
    seq: u64,
}

#[derive(Debug)]
struct Entry {
    kind: String,
    sha: String,
    accepted: Mark,
    started: Option<Mark>,
    pgid: Option<i32>,
    finished: Option<Mark>,
    reply: Option<Reply>,
    duration_ms: Option<u64>,
    acked: Option<Mark>,
    /// Bytes of this entry's frames in the file.
    bytes: u64,
}

/// A stored final reply.
#[derive(Debug)]
enum Reply {
    /// The whole envelope.
    Full(Envelope),
    /// A secret reply, acknowledged: its body is gone.
    Discarded(Discarded),
}

impl Reply {
    fn full(&self) -> Option<&Envelope> {
        match self {
            Reply::Full(env) => Some(env),
            Reply::Discarded(_) => None,
        }
    }
}

impl Entry {
    fn state(&self) -> EntryState {
        if self.acked.is_some() {
            EntryState::Acked
        } else if self.finished.is_some() {
            EntryState::Finished
        } else if self.started.is_some() {
            EntryState::Running
        } else {
            EntryState::Queued
        }
    }

    fn view(&self, tag: Tag) -> EntryView {
        let (reply_type, error_code) = match &self.reply {
            None => (None, None),
            Some(Reply::Full(r)) => (Some(r.kind.to_string()), error_code_of(r)),
            Some(Reply::Discarded(d)) => (Some(d.reply_type.clone()), d.error_code.clone()),
        };
        EntryView {
            tag,
            kind: self.kind.clone(),
            payload_sha256: self.sha.clone(),
            state: self.state(),
            accepted_ms: self.accepted.ms,
            started_ms: self.started.map(|m| m.ms),
            finished_ms: self.finished.map(|m| m.ms),
            acked_ms: self.acked.map(|m| m.ms),
            duration_ms: self.duration_ms,
            pgid: self.pgid,
            reply_type,
            error_code,
        }
    }

    /// The records that rebuild this entry, with their sequence numbers.
    fn records(&self, tag: Tag) -> Vec<(u64, Record<'_>)> {
        let mut out = vec![(
            self.accepted.seq,
            Record::Accepted {
                tag,
                kind: Cow::Borrowed(&self.kind),
                payload_sha256: Cow::Borrowed(&self.sha),
                at_ms: self.accepted.ms,
            },
        )];
        if let Some(m) = self.started {
            out.push((
                m.seq,
                Record::Started {
                    tag,
                    at_ms: m.ms,
                    pgid: self.pgid,
                },
            ));
        }
        match (self.finished, &self.reply) {
            (Some(m), Some(Reply::Full(reply))) => out.push((
                m.seq,
                Record::Finished {
                    tag,
                    at_ms: m.ms,
                    reply: Cow::Borrowed(reply),
                    duration_ms: self.duration_ms,
                },
            )),
            (Some(m), Some(Reply::Discarded(d))) => out.push((
                m.seq,
                Record::Discarded {
                    tag,
                    at_ms: m.ms,
                    reply: d.clone(),
                    duration_ms: self.duration_ms,
                },
            )),
            _ => {}
        }
        if let Some(m) = self.acked {
            out.push((m.seq, Record::Acked { tag, at_ms: m.ms }));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The journal

/// The journal: the file, and the state of every entry it holds, in memory.
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    limits: Limits,
    policy: Policy,
    clock: Arc<dyn Clock>,
    entries: HashMap<Tag, Entry>,
    /// Acknowledged entries by the sequence number of their ACK (oldest first).
    acked_order: BTreeMap<u64, Tag>,
    next_seq: u64,
    file_len: u64,
    live_bytes: u64,
    unacked_bytes: u64,
    syncs: u64,
    compactions: u64,
    poisoned: bool,
    /// Acknowledged secret replies were discarded in memory but the file still holds them: the
    /// next write (or open) rewrites it.
    scrub_pending: bool,
}

impl fmt::Debug for Journal {
    // No entries: they hold replies, which have no place in a debug dump.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("entries", &self.entries.len())
            .field("file_len", &self.file_len)
            .field("limits", &self.limits)
            .field("poisoned", &self.poisoned)
            .field("scrub_pending", &self.scrub_pending)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Open (or create) the journal in `dir`, replay it and recover what the previous run left
    /// unfinished (see the module documentation). Never panics on a damaged file.
    pub fn open(
        dir: &Path,
        limits: Limits,
        policy: Policy,
    ) -> Result<(Journal, Recovery), JournalError> {
        Self::open_with_clock(dir, limits, policy, Arc::new(SystemClock))
    }

    /// [`Journal::open`] with a clock of the caller's choice.
    pub fn open_with_clock(
        dir: &Path,
        limits: Limits,
        policy: Policy,
        clock: Arc<dyn Clock>,
    ) -> Result<(Journal, Recovery), JournalError> {
        let path = dir.join(LOG_FILE);
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("create the directory", dir))?;
        }
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let mode = file
            .metadata()
            .map_err(io_err("read the metadata of", &path))?
            .permissions()
            .mode();
        if mode & 0o777 != 0o600 {
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err("set the mode of", &path))?;
        }
        if !existed {
            sync_dir(dir)?;
        }
        // Left by a compaction cut short; the journal itself is intact.
        let _ = fs::remove_file(dir.join(TMP_FILE));
        let mut j = Journal {
            dir: dir.to_path_buf(),
            path: path.clone(),
            file: file.try_clone().map_err(io_err("open", &path))?,
            limits,
            policy,
            clock,
            entries: HashMap::new(),
            acked_order: BTreeMap::new(),
            next_seq: 0,
            file_len: 0,
            live_bytes: 0,
            unacked_bytes: 0,
            syncs: 0,
            compactions: 0,
            poisoned: false,
            scrub_pending: false,
        };
        let mut recovery = Recovery {
            truncated: j.replay(&mut file)?,
            ..Recovery::default()
        };
        drop(file);
        j.recover(&mut recovery)?;
        Ok((j, recovery))
    }

    /// Read every good record; cut the file at the first bad one.
    fn replay(&mut self, file: &mut File) -> Result<Option<Truncation>, JournalError> {
        let len = file
            .metadata()
            .map_err(io_err("read the metadata of", &self.path))?
            .len();
        let mut reader = BufReader::with_capacity(1 << 16, &mut *file);
        let mut offset = 0u64;
        let mut problem = None;
        while offset < len {
            let remaining = len - offset;
            if remaining < HEADER_BYTES {
                problem = Some("record header cut short");
                break;
            }
            let mut header = [0u8; 8];
            reader
                .read_exact(&mut header)
                .map_err(io_err("read", &self.path))?;
            let (body_len, crc) = match frame_problem(header, remaining - HEADER_BYTES) {
                Ok(v) => v,
                Err(p) => {
                    problem = Some(p);
                    break;
                }
            };
            // Bounded by MAX_RECORD_BYTES and by the bytes actually in the file.
            let mut body = vec![0u8; body_len as usize];
            reader
                .read_exact(&mut body)
                .map_err(io_err("read", &self.path))?;
            if crc32c(&body) != crc {
                problem = Some("checksum mismatch");
                break;
            }
            let frame_len = HEADER_BYTES + u64::from(body_len);
            let record: Record<'static> = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(_) if is_foreign_record(&body) => {
                    // Intact (the checksum matches) but not understood: written by another
                    // version of the agent. Skipped, not cut: the records after it are good.
                    tracing::warn!(
                        path = %self.path.display(),
                        offset,
                        "journal record of an unknown kind or shape; skipped"
                    );
                    offset += frame_len;
                    continue;
                }
                Err(_) => {
                    problem = Some("record body is not JSON");
                    break;
                }
            };
            let (tag, name) = (record.tag(), record.name());
            if !self.apply(record, frame_len) {
                tracing::warn!(
                    path = %self.path.display(),
                    offset,
                    %tag,
                    record = name,
                    "journal record does not follow from the tag's state; ignored"
                );
            }
            offset += frame_len;
        }
        drop(reader);
        self.file_len = offset;
        let Some(reason) = problem else {
            return Ok(None);
        };
        tracing::warn!(
            path = %self.path.display(),
            offset,
            dropped_bytes = len - offset,
            reason,
            "journal has a torn or corrupt record (power loss?): cut at this offset, earlier entries kept"
        );
        file.set_len(offset)
            .map_err(io_err("truncate the torn tail of", &self.path))?;
        file.sync_all().map_err(io_err("sync", &self.path))?;
        self.syncs += 1;
        Ok(Some(Truncation {
            offset,
            dropped_bytes: len - offset,
            reason,
        }))
    }

    /// Answer or forget what the previous run left unfinished; drop expired entries; compact.
    fn recover(&mut self, rec: &mut Recovery) -> Result<(), JournalError> {
        let mut unfinished: Vec<(u64, Tag)> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state(), EntryState::Queued | EntryState::Running))
            .map(|(t, e)| (e.accepted.seq, *t))
            .collect();
        unfinished.sort_unstable();
        let mut forgot = false;
        for (_, tag) in unfinished {
            let Some(e) = self.entries.get(&tag) else {
                continue;
            };
            if e.state() == EntryState::Queued {
                self.drop_entry(&tag);
                rec.never_started.push(tag);
                forgot = true;
                continue;
            }
            let cut = CutShort {
                tag,
                kind: e.kind.clone(),
                pgid: e.pgid,
            };
            if (self.policy.safe_to_rerun)(&e.kind) {
                tracing::warn!(%tag, r#type = %cut.kind, "instruction cut short by the agent's stop; safe to re-run, forgotten");
                self.drop_entry(&tag);
                rec.rerunnable.push(cut);
                forgot = true;
            } else {
                tracing::warn!(%tag, r#type = %cut.kind, "instruction cut short by the agent's stop; answered interrupted");
                let reply = Envelope::with_type(
                    ERROR,
                    tag,
                    &ErrorPayload::new(ErrorCode::Interrupted, INTERRUPTED_MESSAGE),
                );
                self.finish(tag, &reply, None)?;
                rec.interrupted.push(cut);
            }
        }
        // Acknowledged secret replies still in full: the previous run stopped between an ACK
        // and the rewrite that discards the reply (or that rewrite failed, or the type was
        // not secret for the version that wrote the file). Discarded now, before anything else.
        let secret_acked: Vec<Tag> = self
            .entries
            .iter()
            .filter(|(_, e)| e.acked.is_some() && (self.policy.secret_reply)(&e.kind))
            .filter(|(_, e)| matches!(e.reply, Some(Reply::Full(_))))
            .map(|(t, _)| *t)
            .collect();
        if !secret_acked.is_empty() {
            tracing::warn!(
                count = secret_acked.len(),
                "journal holds acknowledged secret replies (the previous run stopped before discarding them); discarding them now"
            );
        }
        for tag in secret_acked {
            self.discard(tag);
        }
        let now = self.clock.now_ms();
        rec.expired = self.evict(now, 0);
        if forgot || rec.expired > 0 || self.scrub_pending || self.wants_compaction() {
            // Forgotten entries must not come back at the next open (their process groups
            // would be reported again); a failure here is not fatal, the state in memory is
            // right and the next write retries.
            if let Err(e) = self.rewrite() {
                if self.scrub_pending {
                    tracing::error!(error = %e, "journal rewrite at open failed: acknowledged secret replies stay in the file until a rewrite succeeds (retried at every write)");
                } else {
                    tracing::warn!(error = %e, "journal compaction at open failed");
                }
            }
        }
        Ok(())
    }

    /// Apply one record to the state; false when it does not follow from the tag's state.
    fn apply(&mut self, record: Record<'_>, frame_len: u64) -> bool {
        let seq = self.next_seq;
        let tag = record.tag();
        let applied = match record {
            Record::Accepted {
                kind,
                payload_sha256,
                at_ms,
                ..
            } => {
                // A fresh `accepted` replaces a forgotten entry of the same tag.
                self.drop_entry(&tag);
                let entry = Entry {
                    kind: kind.into_owned(),
                    sha: payload_sha256.into_owned(),
                    accepted: Mark { ms: at_ms, seq },
                    started: None,
                    pgid: None,
                    finished: None,
                    reply: None,
                    duration_ms: None,
                    acked: None,
                    bytes: 0,
                };
                self.account(tag, entry);
                true
            }
            Record::Started { at_ms, pgid, .. } => self.update(tag, |e| {
                if e.state() != EntryState::Queued {
                    return false;
                }
                e.started = Some(Mark { ms: at_ms, seq });
                e.pgid = pgid;
                true
            }),
            Record::Finished {
                at_ms,
                reply,
                duration_ms,
                ..
            } => {
                let mut reply = Some(reply);
                self.update(tag, |e| {
                    if !matches!(e.state(), EntryState::Queued | EntryState::Running) {
                        return false;
                    }
                    e.finished = Some(Mark { ms: at_ms, seq });
                    e.reply = reply.take().map(|r| Reply::Full(r.into_owned()));
                    e.duration_ms = duration_ms;
                    true
                })
            }
            Record::Discarded {
                at_ms,
                reply,
                duration_ms,
                ..
            } => {
                let mut reply = Some(reply);
                self.update(tag, |e| {
                    if !matches!(e.state(), EntryState::Queued | EntryState::Running) {
                        return false;
                    }
                    e.finished = Some(Mark { ms: at_ms, seq });
                    e.reply = reply.take().map(Reply::Discarded);
                    e.duration_ms = duration_ms;
                    true
                })
            }
            Record::Acked { at_ms, .. } => self.update(tag, |e| {
                if e.state() != EntryState::Finished {
                    return false;
                }
                e.acked = Some(Mark { ms: at_ms, seq });
                true
            }),
        };
        if applied {
            self.next_seq += 1;
            self.update(tag, |e| {
                e.bytes += frame_len;
                true
            });
        }
        applied
    }

    /// Take the entry out of the accounting, change it, put it back.
    fn update(&mut self, tag: Tag, f: impl FnOnce(&mut Entry) -> bool) -> bool {
        let Some(mut e) = self.unaccount(&tag) else {
            return false;
        };
        let changed = f(&mut e);
        self.account(tag, e);
        changed
    }

    fn account(&mut self, tag: Tag, e: Entry) {
        self.live_bytes += e.bytes;
        match e.acked {
            Some(m) => {
                self.acked_order.insert(m.seq, tag);
            }
            None => self.unacked_bytes += e.bytes,
        }
        self.entries.insert(tag, e);
    }

    fn unaccount(&mut self, tag: &Tag) -> Option<Entry> {
        let e = self.entries.remove(tag)?;
        self.live_bytes -= e.bytes;
        match e.acked {
            Some(m) => {
                self.acked_order.remove(&m.seq);
            }
            None => self.unacked_bytes -= e.bytes,
        }
        Some(e)
    }

    fn drop_entry(&mut self, tag: &Tag) -> bool {
        self.unaccount(tag).is_some()
    }

    fn unacked_entries(&self) -> usize {
        self.entries.len() - self.acked_order.len()
    }

    /// Drop acknowledged entries past retention, and the oldest acknowledged ones while the
    /// journal (with `room` more entries) is over its bounds. Returns how many were dropped.
    fn evict(&mut self, now: u64, room: usize) -> usize {
        let retention = u64::try_from(self.limits.retention.as_millis()).unwrap_or(u64::MAX);
        let mut dropped = 0;
        while let Some((_, &tag)) = self.acked_order.first_key_value() {
            let acked_ms = self
                .entries
                .get(&tag)
                .and_then(|e| e.acked)
                .map_or(0, |m| m.ms);
            let expired = acked_ms.saturating_add(retention) <= now;
            let over = self.live_bytes > self.limits.max_bytes
                || self.entries.len() + room > self.limits.max_entries;
            if !(expired || over) {
                break;
            }
            self.drop_entry(&tag);
            dropped += 1;
        }
        dropped
    }

    fn wants_compaction(&self) -> bool {
        self.file_len > COMPACT_MIN_BYTES && self.file_len > 2 * self.live_bytes
    }

    /// Compact when there is enough garbage; a failed compaction is logged, not returned (the
    /// append that preceded it succeeded).
    fn maintain(&mut self) {
        let now = self.clock.now_ms();
        self.evict(now, 0);
        if self.scrub_pending || self.wants_compaction() {
            if let Err(e) = self.rewrite() {
                tracing::warn!(error = %e, "journal compaction failed; retried later");
            }
        }
    }

    fn encode(tag: Tag, path: &Path, record: &Record<'_>) -> Result<Vec<u8>, JournalError> {
        let mut buf = vec![0u8; HEADER_BYTES as usize];
        serde_json::to_writer(&mut buf, record).map_err(|source| JournalError::Encode {
            path: path.to_path_buf(),
            tag,
            source,
        })?;
        let body_len = buf.len() - HEADER_BYTES as usize;
        let len = u32::try_from(body_len)
            .ok()
            .filter(|l| *l <= MAX_RECORD_BYTES)
            .ok_or(JournalError::TooLarge {
                path: path.to_path_buf(),
                tag,
                len: body_len,
                max: MAX_RECORD_BYTES,
            })?;
        let crc = crc32c(&buf[HEADER_BYTES as usize..]);
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        buf[4..8].copy_from_slice(&crc.to_be_bytes());
        Ok(buf)
    }

    /// Append one record (synced when asked and [`Limits::sync`]), then apply it.
    fn write(&mut self, record: Record<'_>, sync: bool) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        let frame = Self::encode(record.tag(), &self.path, &record)?;
        self.append(&frame, sync)?;
        let applied = self.apply(record, frame.len() as u64);
        debug_assert!(applied, "the caller checked the state");
        Ok(())
    }

    /// Append one encoded frame (synced when asked and [`Limits::sync`]).
    fn append(&mut self, frame: &[u8], sync: bool) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        if let Err(e) = self.file.write_all(frame) {
            // Cut a partial frame off, or later records would sit behind a torn one.
            if self.file.set_len(self.file_len).is_err() {
                self.poisoned = true;
            }
            return Err(io_err("append to", &self.path)(e));
        }
        if sync && self.limits.sync {
            if let Err(e) = self.file.sync_data() {
                // After a failed fsync the page cache may have dropped the data: trust
                // nothing more until a reopen rereads the file.
                self.poisoned = true;
                return Err(io_err("sync", &self.path)(e));
            }
            self.syncs += 1;
        }
        self.file_len += frame.len() as u64;
        Ok(())
    }

    /// Replace the acknowledged reply of `tag` by what [`Discarded`] keeps of it, in memory;
    /// the file is rewritten by the caller (or the next write, or the next open).
    fn discard(&mut self, tag: Tag) {
        let changed = self.update(tag, |e| match &e.reply {
            Some(Reply::Full(env)) => {
                e.reply = Some(Reply::Discarded(Discarded::of(env)));
                true
            }
            _ => false,
        });
        self.scrub_pending |= changed;
    }

    /// Record the ACK of the secret reply of `tag`. The ACK reaches the disk only inside a
    /// rewrite of the file that no longer holds the reply: a crash before the rename leaves
    /// the old file, where the reply is not acknowledged (it is resent and acknowledged
    /// again), a crash after it the new one, where the reply is gone. Only when that rewrite
    /// fails is the `acked` record appended to the old file, and the rewrite retried at every
    /// later write and at the next open.
    fn acked_secret(&mut self, record: Record<'_>) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        let tag = record.tag();
        let frame = Self::encode(tag, &self.path, &record)?;
        let applied = self.apply(record, 0);
        debug_assert!(applied, "the caller checked the state");
        self.discard(tag);
        let Err(e) = self.rewrite() else {
            return Ok(());
        };
        tracing::error!(
            %tag,
            error = %e,
            "cannot rewrite the journal without the acknowledged secret reply; it stays in the file until a rewrite succeeds (retried at every write and at the next open)"
        );
        self.append(&frame, false)?;
        self.update(tag, |e| {
            e.bytes += frame.len() as u64;
            true
        });
        Ok(())
    }

    /// Rewrite the live entries to a new file and rename it over the journal.
    fn rewrite(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        let tmp = self.dir.join(TMP_FILE);
        let result = self.write_compacted(&tmp);
        match result {
            Ok((file, len, sizes)) => {
                self.file = file;
                self.file_len = len;
                for (tag, bytes) in sizes {
                    self.update(tag, |e| {
                        e.bytes = bytes;
                        true
                    });
                }
                self.compactions += 1;
                self.scrub_pending = false;
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn write_compacted(
        &mut self,
        tmp: &Path,
    ) -> Result<(File, u64, Vec<(Tag, u64)>), JournalError> {
        match fs::remove_file(tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove the stale", tmp)(e)),
        }
        // Append mode: once renamed, this same descriptor is the journal.
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .map_err(io_err("create", tmp))?;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("set the mode of", tmp))?;
        let mut records: Vec<(u64, Record<'_>)> = self
            .entries
            .iter()
            .flat_map(|(tag, e)| e.records(*tag))
            .collect();
        records.sort_unstable_by_key(|(seq, _)| *seq);
        let mut sizes: HashMap<Tag, u64> = HashMap::with_capacity(self.entries.len());
        let mut len = 0u64;
        let mut w = BufWriter::with_capacity(1 << 16, &file);
        for (_, rec) in &records {
            let frame = Self::encode(rec.tag(), tmp, rec)?;
            w.write_all(&frame).map_err(io_err("write", tmp))?;
            *sizes.entry(rec.tag()).or_default() += frame.len() as u64;
            len += frame.len() as u64;
        }
        w.flush().map_err(io_err("write", tmp))?;
        drop(w);
        drop(records);
        file.sync_all().map_err(io_err("sync", tmp))?;
        fs::rename(tmp, &self.path)
            .map_err(io_err("rename the compacted journal to", &self.path))?;
        self.syncs += 1;
        // The rename is done: from here on the new file is the journal, whatever happens.
        if let Err(e) = sync_dir(&self.dir) {
            tracing::warn!(error = %e, "journal compacted but its directory could not be synced");
        } else {
            self.syncs += 1;
        }
        Ok((file, len, sizes.into_iter().collect()))
    }

    fn state_name(&self, tag: &Tag) -> &'static str {
        self.entries
            .get(tag)
            .map_or("unknown", |e| e.state().as_str())
    }

    fn wrong_state(&self, tag: Tag, record: &'static str) -> JournalError {
        JournalError::WrongState {
            path: self.path.clone(),
            tag,
            record,
            state: self.state_name(&tag),
        }
    }

    // -----------------------------------------------------------------------------------------
    // The API

    /// What the journal knows of `tag`.
    pub fn lookup(&self, tag: &Tag) -> Lookup {
        match self.entries.get(tag) {
            None => Lookup::New,
            Some(e) => match &e.reply {
                Some(Reply::Full(reply)) => Lookup::Done(reply.clone()),
                Some(Reply::Discarded(_)) if (self.policy.safe_to_rerun)(&e.kind) => Lookup::New,
                Some(Reply::Discarded(d)) => Lookup::Discarded(d.clone()),
                None => Lookup::InProgress,
            },
        }
    }

    /// Record that the instruction `tag` of type `kind` was accepted (queued). `payload_sha256`
    /// is the hex sha256 of the payload ([`payload_sha256`]); anything else is refused, so that
    /// a payload cannot end up in the file by mistake. Not synced (see the module docs).
    ///
    /// [`JournalError::Full`] when unacknowledged entries fill the journal: answer `busy`.
    pub fn accepted(
        &mut self,
        tag: Tag,
        kind: &str,
        payload_sha256: &str,
    ) -> Result<(), JournalError> {
        if payload_sha256.len() != 64 || !payload_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(JournalError::BadDigest {
                path: self.path.clone(),
            });
        }
        // An entry whose secret reply was discarded and whose type is safe to re-run looks up
        // as new: its `accepted` replaces it (as at replay).
        if self.lookup(&tag) != Lookup::New {
            return Err(JournalError::AlreadyRecorded {
                path: self.path.clone(),
                tag,
                state: self.state_name(&tag),
            });
        }
        let now = self.clock.now_ms();
        self.evict(now, 1);
        let unacked = self.unacked_entries();
        if self.unacked_bytes >= self.limits.max_bytes || unacked >= self.limits.max_entries {
            return Err(JournalError::Full {
                path: self.path.clone(),
                unacked,
                bytes: self.unacked_bytes,
                max_entries: self.limits.max_entries,
                max_bytes: self.limits.max_bytes,
            });
        }
        let sha = payload_sha256.to_ascii_lowercase();
        self.write(
            Record::Accepted {
                tag,
                kind: Cow::Borrowed(kind),
                payload_sha256: Cow::Owned(sha),
                at_ms: now,
            },
            false,
        )?;
        self.maintain();
        Ok(())
    }

    /// Record that the executor of `tag` is about to start, in process group `pgid` when known.
    /// Synced: returns once the record is on disk. Call it before starting the executor.
    pub fn started(&mut self, tag: Tag, pgid: Option<i32>) -> Result<(), JournalError> {
        if self.entries.get(&tag).map(Entry::state) != Some(EntryState::Queued) {
            return Err(self.wrong_state(tag, "started"));
        }
        let now = self.clock.now_ms();
        self.write(
            Record::Started {
                tag,
                at_ms: now,
                pgid,
            },
            true,
        )?;
        self.maintain();
        Ok(())
    }

    /// Store the final reply of `tag` (queued or running). Synced: returns once the reply is on
    /// disk. Call it before sending the reply.
    pub fn finished(&mut self, tag: Tag, reply: &Envelope) -> Result<(), JournalError> {
        let duration = self
            .entries
            .get(&tag)
            .and_then(|e| e.started)
            .map(|s| self.clock.now_ms().saturating_sub(s.ms));
        self.finish(tag, reply, duration)?;
        self.maintain();
        Ok(())
    }

    fn finish(
        &mut self,
        tag: Tag,
        reply: &Envelope,
        duration_ms: Option<u64>,
    ) -> Result<(), JournalError> {
        if reply.tag != tag {
            return Err(JournalError::ReplyTagMismatch {
                path: self.path.clone(),
                tag,
                reply_tag: reply.tag,
            });
        }
        if !matches!(
            self.entries.get(&tag).map(Entry::state),
            Some(EntryState::Queued | EntryState::Running)
        ) {
            return Err(self.wrong_state(tag, "finished"));
        }
        let now = self.clock.now_ms();
        self.write(
            Record::Finished {
                tag,
                at_ms: now,
                reply: Cow::Borrowed(reply),
                duration_ms,
            },
            true,
        )
    }

    /// Record the control plane's ACK of the reply `tag`. False (nothing written) when no
    /// reply awaits an ACK for it: unknown, not finished, or already acknowledged. Not synced,
    /// except for a secret reply ([`Policy::secret_reply`]): that one is discarded and the ACK
    /// recorded by a synced rewrite of the file, done when this returns (see "Secret replies"
    /// in the crate documentation).
    pub fn acked(&mut self, tag: Tag) -> Result<bool, JournalError> {
        if self.entries.get(&tag).map(Entry::state) != Some(EntryState::Finished) {
            return Ok(false);
        }
        let now = self.clock.now_ms();
        let record = Record::Acked { tag, at_ms: now };
        let secret = self
            .entries
            .get(&tag)
            .is_some_and(|e| (self.policy.secret_reply)(&e.kind));
        if secret {
            self.acked_secret(record)?;
        } else {
            self.write(record, false)?;
        }
        self.maintain();
        Ok(true)
    }

    /// Forget a queued tag that will not be started (answered `shutting_down`): a redelivery
    /// is then new. Nothing is written: a queued entry is forgotten at the next open anyway,
    /// and a later `accepted` for the tag replaces it. False when the tag is not queued.
    pub fn forget(&mut self, tag: &Tag) -> bool {
        if self.entries.get(tag).map(Entry::state) != Some(EntryState::Queued) {
            return false;
        }
        self.drop_entry(tag)
    }

    /// Drop acknowledged entries past retention and rewrite the file with the live entries
    /// only. Happens by itself when the file has grown; exposed for maintenance and tests.
    pub fn compact(&mut self) -> Result<(), JournalError> {
        let now = self.clock.now_ms();
        self.evict(now, 0);
        self.rewrite()
    }

    fn unacked_sorted(&self) -> Vec<(u64, Tag, &Envelope)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| e.acked.is_none())
            .filter_map(|(t, e)| Some((e.finished?.seq, *t, e.reply.as_ref()?.full()?)))
            .collect();
        v.sort_unstable_by_key(|(seq, _, _)| *seq);
        v
    }

    /// The replies awaiting ACK, oldest first: to send after each `WELCOME` (HELLO lists their
    /// tags, [`Journal::unacked_tags`]).
    pub fn unacked(&self) -> Vec<Envelope> {
        self.unacked_sorted()
            .into_iter()
            .map(|(_, _, r)| r.clone())
            .collect()
    }

    /// The tags of [`Journal::unacked`], in the same order.
    pub fn unacked_tags(&self) -> Vec<Tag> {
        self.unacked_sorted()
            .into_iter()
            .map(|(_, t, _)| t)
            .collect()
    }

    /// Sizes and counts.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            entries: self.entries.len(),
            acked: self.acked_order.len(),
            file_bytes: self.file_len,
            live_bytes: self.live_bytes,
            unacked_bytes: self.unacked_bytes,
            syncs: self.syncs,
            compactions: self.compactions,
            ..Stats::default()
        };
        for e in self.entries.values() {
            match e.state() {
                EntryState::Queued => s.queued += 1,
                EntryState::Running => s.running += 1,
                EntryState::Finished => {
                    s.unacked += 1;
                    let at = e.finished.map_or(0, |m| m.ms);
                    s.oldest_unacked_ms = Some(s.oldest_unacked_ms.map_or(at, |o| o.min(at)));
                }
                EntryState::Acked => {}
            }
            let at = e.accepted.ms;
            s.oldest_entry_ms = Some(s.oldest_entry_ms.map_or(at, |o| o.min(at)));
        }
        s
    }

    /// The `n` most recently accepted entries, newest first.
    pub fn recent(&self, n: usize) -> Vec<EntryView> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|(t, e)| (e.accepted.seq, *t, e))
            .collect();
        v.sort_unstable_by_key(|(seq, _, _)| std::cmp::Reverse(*seq));
        v.into_iter().take(n).map(|(_, t, e)| e.view(t)).collect()
    }

    /// The entry of `tag`.
    pub fn get(&self, tag: &Tag) -> Option<EntryView> {
        self.entries.get(tag).map(|e| e.view(*tag))
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether a body that is not a record of this version is at least a JSON object naming a
/// record kind.
fn is_foreign_record(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("rec").is_some_and(serde_json::Value::is_string))
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync the directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const T0: u64 = 1_700_000_000_000;

    #[derive(Debug)]
    struct TestClock(AtomicU64);

    impl TestClock {
        fn new() -> Arc<Self> {
            Arc::new(TestClock(AtomicU64::new(T0)))
        }
        fn advance(&self, ms: u64) {
            self.0.fetch_add(ms, Ordering::SeqCst);
        }
    }

    impl Clock for TestClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// The test policy: `GET_NODE_STATUS` and `GET_CLUSTER_JOIN_CMD` are safe to re-run,
    /// `GET_CLUSTER_JOIN_CMD` and `RUN_REMOTE_SCRIPT` have secret replies.
    const POLICY: Policy = Policy {
        safe_to_rerun: |k| matches!(k, "GET_NODE_STATUS" | "GET_CLUSTER_JOIN_CMD"),
        secret_reply: |k| matches!(k, "GET_CLUSTER_JOIN_CMD" | "RUN_REMOTE_SCRIPT"),
    };

    fn open_with(dir: &Path, clock: &Arc<TestClock>, limits: Limits) -> (Journal, Recovery) {
        Journal::open_with_clock(dir, limits, POLICY, clock.clone()).unwrap()
    }

    fn open(dir: &Path, clock: &Arc<TestClock>) -> (Journal, Recovery) {
        open_with(dir, clock, Limits::default())
    }

    fn sha(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn reply(tag: Tag, text: &str) -> Envelope {
        Envelope::with_type(
            "RUN_COMMAND_RESPONSE",
            tag,
            &serde_json::json!({ "stdout": text }),
        )
    }

    /// Accept, start and finish `tag` as a RUN_COMMAND.
    fn run(j: &mut Journal, tag: Tag, text: &str) -> Envelope {
        let r = reply(tag, text);
        j.accepted(tag, "RUN_COMMAND", &sha(1)).unwrap();
        j.started(tag, Some(4242)).unwrap();
        j.finished(tag, &r).unwrap();
        r
    }

    fn file_len(dir: &Path) -> u64 {
        fs::metadata(dir.join(LOG_FILE)).unwrap().len()
    }

    /// The table-driven CRC-32C of earlier versions, kept to prove the crate computes the same
    /// values (the frames of existing journals must still check).
    fn table_crc32c(data: &[u8]) -> u32 {
        let mut table = [0u32; 256];
        for (i, t) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *t = c;
        }
        let mut c = !0u32;
        for &b in data {
            c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        !c
    }

    #[test]
    fn crc32c_check_value_and_the_old_table_agree() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // Every length up to 1 KiB (the crate switches code paths by length and alignment),
        // over pseudo-random bytes, at every start offset modulo 8.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let data: Vec<u8> = (0..1100)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for start in 0..8 {
            for len in 0..1024 {
                let d = &data[start..start + len];
                assert_eq!(crc32c(d), table_crc32c(d), "start {start} len {len}");
            }
        }
    }

    #[test]
    fn lookup_follows_the_states() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, rec) = open(d.path(), &clock);
        assert_eq!(rec, Recovery::default());
        let t = Tag::random();
        assert_eq!(j.lookup(&t), Lookup::New);
        j.accepted(t, "RUN_COMMAND", &sha(1)).unwrap();
        assert_eq!(j.lookup(&t), Lookup::InProgress);
        assert!(matches!(
            j.accepted(t, "RUN_COMMAND", &sha(1)),
            Err(JournalError::AlreadyRecorded { .. })
        ));
        assert!(!j.acked(t).unwrap());
        j.started(t, None).unwrap();
        assert_eq!(j.lookup(&t), Lookup::InProgress);
        assert!(matches!(
            j.started(t, None),
            Err(JournalError::WrongState { .. })
        ));
        let r = reply(t, "ok");
        assert!(matches!(
            j.finished(t, &reply(Tag::random(), "x")),
            Err(JournalError::ReplyTagMismatch { .. })
        ));
        j.finished(t, &r).unwrap();
        assert_eq!(j.lookup(&t), Lookup::Done(r.clone()));
        assert!(matches!(
            j.finished(t, &r),
            Err(JournalError::WrongState { .. })
        ));
        assert!(j.acked(t).unwrap());
        assert!(!j.acked(t).unwrap());
        assert_eq!(j.lookup(&t), Lookup::Done(r));
        let unknown = Tag::random();
        assert!(matches!(
            j.started(unknown, None),
            Err(JournalError::WrongState {
                state: "unknown",
                ..
            })
        ));
        assert!(!j.acked(unknown).unwrap());
    }

    #[test]
    fn round_trip_through_reopen() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        let (fin, ack, direct) = (Tag::random(), Tag::random(), Tag::random());
        let r_fin = run(&mut j, fin, "finished");
        clock.advance(10);
        let r_ack = run(&mut j, ack, "acked");
        clock.advance(10);
        assert!(j.acked(ack).unwrap());
        // Answered without an executor (unknown_type and the like).
        let r_direct = reply(direct, "direct");
        j.accepted(direct, "NOT_A_TYPE", &sha(3)).unwrap();
        j.finished(direct, &r_direct).unwrap();
        let views: Vec<_> = [fin, ack, direct].iter().map(|t| j.get(t)).collect();
        let stats = j.stats();
        drop(j);

        let (j, rec) = open(d.path(), &clock);
        assert_eq!(rec, Recovery::default());
        assert_eq!(j.lookup(&fin), Lookup::Done(r_fin.clone()));
        assert_eq!(j.lookup(&ack), Lookup::Done(r_ack));
        assert_eq!(j.lookup(&direct), Lookup::Done(r_direct.clone()));
        assert_eq!(j.unacked(), vec![r_fin, r_direct]);
        assert_eq!(j.unacked_tags(), vec![fin, direct]);
        let again: Vec<_> = [fin, ack, direct].iter().map(|t| j.get(t)).collect();
        assert_eq!(views, again);
        let v = j.get(&ack).unwrap();
        assert_eq!(v.state, EntryState::Acked);
        assert_eq!(v.kind, "RUN_COMMAND");
        assert_eq!(v.payload_sha256, sha(1));
        assert_eq!(v.pgid, Some(4242));
        assert_eq!(v.accepted_ms, T0 + 10);
        assert_eq!(v.acked_ms, Some(T0 + 20));
        assert_eq!(v.reply_type.as_deref(), Some("RUN_COMMAND_RESPONSE"));
        let s = j.stats();
        assert_eq!(
            (s.entries, s.unacked, s.acked, s.file_bytes, s.live_bytes),
            (3, 2, 1, stats.file_bytes, stats.live_bytes)
        );
        assert_eq!(s.unacked_bytes, stats.unacked_bytes);
        assert_eq!(s.oldest_unacked_ms, Some(T0));
        assert_eq!(
            j.recent(2).iter().map(|v| v.tag).collect::<Vec<_>>(),
            vec![direct, ack]
        );
    }

    #[test]
    fn torn_tail_at_every_offset_keeps_earlier_entries() {
        let src = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(src.path(), &clock);
        let (a, b) = (Tag::random(), Tag::random());
        let ra = run(&mut j, a, "first");
        assert!(j.acked(a).unwrap());
        let rb = run(&mut j, b, "second");
        let good = file_len(src.path());
        let last = Tag::random();
        j.accepted(last, "RUN_COMMAND", &sha(9)).unwrap();
        let full = file_len(src.path());
        drop(j);
        let bytes = fs::read(src.path().join(LOG_FILE)).unwrap();
        assert_eq!(bytes.len() as u64, full);

        for cut in good..full {
            let d = tempfile::tempdir().unwrap();
            fs::write(d.path().join(LOG_FILE), &bytes[..cut as usize]).unwrap();
            let (mut j, rec) = open(d.path(), &clock);
            if cut == good {
                assert_eq!(rec.truncated, None);
            } else {
                let t = rec.truncated.clone().unwrap();
                assert_eq!((t.offset, t.dropped_bytes), (good, cut - good), "{cut}");
            }
            assert_eq!(file_len(d.path()), good, "cut at {cut}");
            assert_eq!(j.lookup(&a), Lookup::Done(ra.clone()));
            assert_eq!(j.lookup(&b), Lookup::Done(rb.clone()));
            assert_eq!(j.lookup(&last), Lookup::New);
            // Appends work after the cut, and survive a reopen.
            let rl = run(&mut j, last, "after");
            drop(j);
            let (j, rec) = open(d.path(), &clock);
            assert_eq!(rec.truncated, None);
            assert_eq!(j.unacked(), vec![rb.clone(), rl]);
        }
    }

    #[test]
    fn torn_finished_record_reads_as_running_and_is_interrupted() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        let t = Tag::random();
        j.accepted(t, "RUN_REMOTE_SCRIPT", &sha(2)).unwrap();
        j.started(t, Some(77)).unwrap();
        let good = file_len(d.path());
        j.finished(t, &reply(t, "lost")).unwrap();
        drop(j);
        let f = OpenOptions::new()
            .write(true)
            .open(d.path().join(LOG_FILE))
            .unwrap();
        f.set_len(good + 20).unwrap();
        drop(f);
        let (j, rec) = open(d.path(), &clock);
        assert_eq!(rec.truncated.as_ref().unwrap().offset, good);
        assert_eq!(rec.interrupted.len(), 1);
        assert_eq!(rec.leftover_pgids(), vec![77]);
        assert_eq!(
            j.get(&t).unwrap().error_code.as_deref(),
            Some("interrupted")
        );
    }

    #[test]
    fn flipped_byte_in_the_last_record_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        let a = Tag::random();
        let ra = run(&mut j, a, "kept");
        let good = file_len(d.path());
        let b = Tag::random();
        j.accepted(b, "RUN_COMMAND", &sha(4)).unwrap();
        drop(j);
        let p = d.path().join(LOG_FILE);
        let mut bytes = fs::read(&p).unwrap();
        let i = good as usize + 8 + 20;
        bytes[i] ^= 0x01;
        fs::write(&p, &bytes).unwrap();
        let (j, rec) = open(d.path(), &clock);
        let t = rec.truncated.unwrap();
        assert_eq!((t.offset, t.reason), (good, "checksum mismatch"));
        assert_eq!(j.lookup(&a), Lookup::Done(ra));
        assert_eq!(j.lookup(&b), Lookup::New);
        assert_eq!(file_len(d.path()), good);
    }

    #[test]
    fn good_checksum_bad_body_and_huge_length_are_cut() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        let a = Tag::random();
        run(&mut j, a, "kept");
        let good = file_len(d.path());
        drop(j);
        let p = d.path().join(LOG_FILE);
        let base = fs::read(&p).unwrap();

        // A length prefix of almost 4 GiB, followed by a little data: no allocation of that
        // size, the frame is refused.
        let mut bytes = base.clone();
        bytes.extend_from_slice(&0xFFFF_FFF0u32.to_be_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        fs::write(&p, &bytes).unwrap();
        let (j, rec) = open(d.path(), &clock);
        assert_eq!(
            rec.truncated.unwrap().reason,
            "length prefix over the maximum record size"
        );
        assert!(matches!(j.lookup(&a), Lookup::Done(_)));
        assert_eq!(file_len(d.path()), good);
        drop(j);

        // Under the maximum but past the end of the file.
        let mut bytes = base.clone();
        bytes.extend_from_slice(&(MAX_RECORD_BYTES).to_be_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        fs::write(&p, &bytes).unwrap();
        let (_, rec) = open(d.path(), &clock);
        assert_eq!(rec.truncated.unwrap().reason, "record body cut short");
        assert_eq!(file_len(d.path()), good);

        // A well-framed body that is not JSON: cut.
        let frame = |body: &[u8]| {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&crc32c(body).to_be_bytes());
            f.extend_from_slice(body);
            f
        };
        let mut bytes = base.clone();
        bytes.extend(frame(b"{not json"));
        fs::write(&p, &bytes).unwrap();
        let (_, rec) = open(d.path(), &clock);
        assert_eq!(rec.truncated.unwrap().reason, "record body is not JSON");
        assert_eq!(file_len(d.path()), good);

        // An intact record of a kind this version does not know (written by a newer agent):
        // skipped, and the records after it kept.
        let mut bytes = base;
        bytes.extend(frame(br#"{"rec":"cancelled","tag":"x"}"#));
        let (mut j, _) = {
            fs::write(&p, &bytes).unwrap();
            open(d.path(), &clock)
        };
        let b = Tag::random();
        let rb = run(&mut j, b, "after the unknown record");
        drop(j);
        let (j, rec) = open(d.path(), &clock);
        assert_eq!(rec.truncated, None);
        assert!(matches!(j.lookup(&a), Lookup::Done(_)));
        assert_eq!(j.lookup(&b), Lookup::Done(rb));
    }

    #[test]
    fn running_at_reopen_is_interrupted_or_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        let (unsafe_tag, safe_tag, queued) = (Tag::random(), Tag::random(), Tag::random());
        j.accepted(unsafe_tag, "RUN_COMMAND", &sha(1)).unwrap();
        j.started(unsafe_tag, Some(100)).unwrap();
        j.accepted(safe_tag, "GET_NODE_STATUS", &sha(2)).unwrap();
        j.started(safe_tag, Some(200)).unwrap();
        j.accepted(queued, "RUN_COMMAND", &sha(3)).unwrap();
        drop(j); // the crash

        clock.advance(5_000);
        let (mut j, rec) = open(d.path(), &clock);
        assert_eq!(
            rec.interrupted,
            vec![CutShort {
                tag: unsafe_tag,
                kind: "RUN_COMMAND".into(),
                pgid: Some(100)
            }]
        );
        assert_eq!(
            rec.rerunnable,
            vec![CutShort {
                tag: safe_tag,
                kind: "GET_NODE_STATUS".into(),
                pgid: Some(200)
            }]
        );
        assert_eq!(rec.never_started, vec![queued]);
        assert_eq!(rec.leftover_pgids(), vec![100, 200]);
        assert_eq!(j.lookup(&safe_tag), Lookup::New);
        assert_eq!(j.lookup(&queued), Lookup::New);
        let pending = j.unacked();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].tag, unsafe_tag);
        let p: ErrorPayload = pending[0].payload().unwrap();
        assert_eq!(p.code, ErrorCode::Interrupted);
        assert_eq!(p.message, INTERRUPTED_MESSAGE);
        let v = j.get(&unsafe_tag).unwrap();
        assert_eq!(v.state, EntryState::Finished);
        assert_eq!(v.started_ms, Some(T0));
        assert_eq!(v.finished_ms, Some(T0 + 5_000));
        // A redelivery of the forgotten ones runs them.
        run(&mut j, queued, "ran once");
        drop(j);

        // Another restart: nothing reported twice, the interrupted reply still awaits its ACK.
        let (j, rec) = open(d.path(), &clock);
        assert_eq!(rec, Recovery::default());
        assert_eq!(j.unacked_tags(), vec![unsafe_tag, queued]);
        assert_eq!(j.lookup(&safe_tag), Lookup::New);
    }

    #[test]
    fn forget_a_queued_tag() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        let t = Tag::random();
        j.accepted(t, "RUN_COMMAND", &sha(1)).unwrap();
        assert!(j.forget(&t));
        assert_eq!(j.lookup(&t), Lookup::New);
        // Redelivered in the same run: accepted again, replacing the earlier record at replay.
        let r = run(&mut j, t, "once");
        assert!(!j.forget(&t));
        drop(j);
        let (j, rec) = open(d.path(), &clock);
        assert_eq!(rec, Recovery::default());
        assert_eq!(j.lookup(&t), Lookup::Done(r));
    }

    #[test]
    fn acked_entries_expire_after_retention() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let limits = Limits {
            retention: Duration::from_secs(3600),
            ..Limits::default()
        };
        let (mut j, _) = open_with(d.path(), &clock, limits.clone());
        let (a, b) = (Tag::random(), Tag::random());
        run(&mut j, a, "acked");
        let rb = run(&mut j, b, "not acked");
        assert!(j.acked(a).unwrap());
        let before = file_len(d.path());

        clock.advance(3_600_000 - 1);
        j.compact().unwrap();
        assert!(matches!(j.lookup(&a), Lookup::Done(_)));
        clock.advance(1);
        j.compact().unwrap();
        assert_eq!(j.lookup(&a), Lookup::New);
        assert_eq!(j.lookup(&b), Lookup::Done(rb.clone()));
        assert!(file_len(d.path()) < before);
        assert_eq!(j.stats().compactions, 2);
        drop(j);
        let (j, rec) = open_with(d.path(), &clock, limits.clone());
        assert_eq!(rec, Recovery::default());
        assert_eq!(j.lookup(&a), Lookup::New);
        assert_eq!(j.unacked(), vec![rb]);
        drop(j);

        // Expired at open too (without an explicit compaction).
        let (mut j, _) = open_with(d.path(), &clock, limits.clone());
        assert!(j.acked(b).unwrap());
        drop(j);
        clock.advance(3_600_000);
        let (j, rec) = open_with(d.path(), &clock, limits);
        assert_eq!(rec.expired, 1);
        assert_eq!(j.stats().entries, 0);
        assert_eq!(file_len(d.path()), 0);
    }

    #[test]
    fn compaction_preserves_order_and_content() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        let tags: Vec<Tag> = (0..20).map(|_| Tag::random()).collect();
        for (i, t) in tags.iter().enumerate() {
            j.accepted(*t, "RUN_COMMAND", &sha(i as u8)).unwrap();
            clock.advance(1);
        }
        // Finished in reverse order, some started with a pgid, some acked, one left running.
        for (i, t) in tags.iter().enumerate().rev().skip(1) {
            if i % 3 != 0 {
                j.started(*t, Some(i as i32)).unwrap();
            }
            j.finished(*t, &reply(*t, &format!("reply {i}"))).unwrap();
            clock.advance(1);
            if i % 4 == 0 {
                assert!(j.acked(*t).unwrap());
            }
        }
        j.started(tags[19], Some(19)).unwrap();
        let unacked = j.unacked();
        let recent = j.recent(100);
        let stats = j.stats();
        j.compact().unwrap();
        assert_eq!(j.unacked(), unacked);
        assert_eq!(j.recent(100), recent);
        assert_eq!(j.stats().live_bytes, stats.live_bytes);
        assert_eq!(j.stats().file_bytes, stats.live_bytes);
        drop(j);
        let (j, rec) = open(d.path(), &clock);
        assert_eq!(rec.interrupted.len(), 1);
        let mut expect = unacked;
        expect.push(j.unacked().last().unwrap().clone());
        assert_eq!(j.unacked(), expect);
        let recent_after = j.recent(100);
        assert_eq!(recent_after[1..], recent[1..]);
        assert!(!d.path().join(TMP_FILE).exists());
    }

    #[test]
    fn garbage_triggers_compaction_by_itself() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let limits = Limits {
            retention: Duration::from_secs(1),
            ..Limits::default()
        };
        let (mut j, _) = open_with(d.path(), &clock, limits);
        let big = "x".repeat(64 * 1024);
        for _ in 0..64 {
            let t = Tag::random();
            run(&mut j, t, &big);
            assert!(j.acked(t).unwrap());
            clock.advance(2_000);
        }
        let s = j.stats();
        assert!(s.compactions > 0, "{s:?}");
        assert!(s.file_bytes <= 2 * COMPACT_MIN_BYTES, "{s:?}");
        assert_eq!(s.file_bytes, file_len(d.path()));
    }

    #[test]
    fn full_when_unacked_replies_fill_it() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let limits = Limits {
            max_bytes: 16 * 1024,
            max_entries: 1000,
            ..Limits::default()
        };
        let (mut j, _) = open_with(d.path(), &clock, limits);
        let big = "y".repeat(4096);
        let mut done = Vec::new();
        let err = loop {
            let t = Tag::random();
            match j.accepted(t, "RUN_COMMAND", &sha(1)) {
                Ok(()) => {
                    j.finished(t, &reply(t, &big)).unwrap();
                    done.push(t);
                }
                Err(e) => break e,
            }
        };
        assert!(matches!(err, JournalError::Full { .. }), "{err}");
        assert!(err.to_string().contains("journal.log"));
        assert!(done.len() >= 3);
        // ACKs make room: acknowledged entries are evicted first under pressure.
        for t in &done {
            assert!(j.acked(*t).unwrap());
        }
        j.accepted(Tag::random(), "RUN_COMMAND", &sha(1)).unwrap();
        assert!(j.stats().live_bytes <= 16 * 1024 + 8 * 1024);
    }

    #[test]
    fn max_entries_counts_unacked_and_evicts_acked() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let limits = Limits {
            max_entries: 3,
            ..Limits::default()
        };
        let (mut j, _) = open_with(d.path(), &clock, limits);
        let tags: Vec<Tag> = (0..3).map(|_| Tag::random()).collect();
        for t in &tags {
            run(&mut j, *t, "r");
        }
        assert!(matches!(
            j.accepted(Tag::random(), "RUN_COMMAND", &sha(1)),
            Err(JournalError::Full { .. })
        ));
        assert!(j.acked(tags[0]).unwrap());
        let t = Tag::random();
        j.accepted(t, "RUN_COMMAND", &sha(1)).unwrap();
        assert_eq!(j.lookup(&tags[0]), Lookup::New);
        assert_eq!(j.stats().entries, 3);
    }

    #[test]
    fn file_and_directory_modes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state/journal");
        let clock = TestClock::new();
        let (mut j, _) = open(&dir, &clock);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOG_FILE)), 0o600);
        run(&mut j, Tag::random(), "x");
        j.compact().unwrap();
        assert_eq!(mode(&dir.join(LOG_FILE)), 0o600);
        drop(j);
        fs::set_permissions(dir.join(LOG_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let _ = open(&dir, &clock);
        assert_eq!(mode(&dir.join(LOG_FILE)), 0o600);
    }

    #[test]
    fn the_payload_never_reaches_the_file() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        let secret = "hunter2-token-0123456789";
        let tag = Tag::random();
        let env = Envelope::with_type(
            "RUN_REMOTE_SCRIPT",
            tag,
            &serde_json::json!({ "script": "echo", "env": { "TOKEN": secret } }),
        );
        let digest = payload_sha256(&env);
        assert_eq!(digest.len(), 64);
        // A caller passing the payload instead of its digest is refused, without echoing it.
        let err = j
            .accepted(tag, "RUN_REMOTE_SCRIPT", &env.json_b64)
            .unwrap_err();
        assert!(matches!(err, JournalError::BadDigest { .. }));
        assert!(!format!("{err} {err:?}").contains(&env.json_b64));
        j.accepted(tag, "RUN_REMOTE_SCRIPT", &digest).unwrap();
        j.started(tag, None).unwrap();
        j.finished(tag, &reply(tag, "done")).unwrap();
        j.compact().unwrap();
        assert!(format!("{j:?}").len() < 400);
        drop(j);
        let bytes = fs::read(d.path().join(LOG_FILE)).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(secret));
        assert!(!text.contains(&env.json_b64));
        assert!(text.contains(&digest));
    }

    #[test]
    fn write_failure_after_poison_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        j.poisoned = true;
        let t = Tag::random();
        assert!(matches!(
            j.accepted(t, "RUN_COMMAND", &sha(1)),
            Err(JournalError::Poisoned { .. })
        ));
        assert_eq!(j.lookup(&t), Lookup::New);
    }

    /// The cost of one synced append (`started` or `finished`), printed for the report:
    /// `cargo test -p runos-journal --lib tests::synced_append_cost -- --nocapture`.
    #[test]
    fn synced_append_cost() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        for sync in [true, false] {
            let limits = Limits {
                sync,
                ..Limits::default()
            };
            let (mut j, _) = open_with(d.path(), &clock, limits);
            let n = 100;
            let start = std::time::Instant::now();
            for _ in 0..n {
                let t = Tag::random();
                j.accepted(t, "RUN_COMMAND", &sha(1)).unwrap();
                j.started(t, Some(1)).unwrap();
                j.finished(t, &reply(t, "a short reply of some sixty bytes, like most"))
                    .unwrap();
                j.acked(t).unwrap();
            }
            let per = start.elapsed() / (2 * n);
            let syncs = j.stats().syncs;
            eprintln!(
                "journal sync={sync}: {per:?} per synced append ({n} instructions, each 2 synced appends (started, finished) and 2 unsynced (accepted, acked); {syncs} syncs)"
            );
            if sync {
                assert!(syncs >= u64::from(2 * n));
            } else {
                assert_eq!(syncs, 0);
            }
        }
    }
}
