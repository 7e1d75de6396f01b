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
//! 3. [`Journal::started`] before the executor starts. When it returns a position ([`Lsn`]),
//!    the executor starts only once [`Journal::durable`] has reached it.
//! 4. [`Journal::finished`] before the reply is sent. When it returns a position, the reply is
//!    sent only once [`Journal::durable`] has reached it (and a redelivery of the tag meanwhile
//!    gets nothing: the reply goes out once durable). Replies that need no executor
//!    (`unknown_type`, `unsupported`, `bad_payload`) go through `accepted` then `finished`
//!    directly.
//! 5. [`Journal::acked`] when the control plane's `ACK` arrives.
//!
//! Group commit: no method syncs on the caller's behalf (but a rewrite, see below). The caller
//! takes a [`SyncJob`] from [`Journal::sync_job`] whenever one is due, runs it on a thread of its
//! own ([`SyncJob::run`], one `fdatasync` of everything appended so far) and hands the outcome
//! to [`Journal::synced`]; records appended while it runs wait for the next job, so one
//! `fdatasync` covers the records of many instructions. [`Journal::sync_now`] does the same
//! inline. A failed sync poisons the journal ([`JournalError::Poisoned`]).
//!
//! After each `WELCOME`, [`Journal::unacked`] gives the replies to resend, oldest first (the order
//! they were produced). [`Journal::open`] replays the file and returns a [`Recovery`]: what was
//! cut short by the previous run (see below). [`Journal::next_expiry_ms`] and
//! [`Journal::expire`] let the caller drop expired entries on a timer.
//!
//! Every other method is synchronous and cheap (a `write`, or a `pread` to read a record back)
//! and meant to be called from the dispatcher task; see the test `synced_append_cost` for what a
//! sync costs, per record and per batch.
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
//! append of small records with at most one `fdatasync` per batch of state changes (which a log
//! does with `write`s and one sync, where a B-tree commit writes and syncs several pages), the
//! index of the live entries fits in memory (it is bounded by [`Limits`]), and the recovery
//! rules (a torn tail is cut, everything before it kept) are a few dozen lines we can test
//! exhaustively.
//!
//! # Memory: an index in memory, the records on disk
//!
//! For each entry the journal keeps in memory only where its records are in the file (32-bit
//! offsets of its `accepted`, `started`, `finished` and `acked` records), their total size and a
//! few flags (its state; whether its type is safe to re-run and whether its replies are secret,
//! asked of the [`Policy`] once, at `accepted`): 24 bytes, about 59 bytes per entry with the
//! hash table and the order of the ACKs, a queue of the 4-byte offsets of the `acked` records
//! (each names its tag and time) ([`Stats::index_bytes`]; the test `tests/memory.rs`
//! measures it with 100 000 entries). The type, the payload digest, the times and the reply are
//! read back from the file (`pread`) when asked for: a redelivery of a completed tag, the
//! resend after `WELCOME`, `runos journal`, the audit line. A rewrite moves the records and
//! the offsets with them. Hence the file is at most 4 GiB ([`JournalError::FileTooLarge`]; the
//! default bounds keep it far below).
//!
//! The checksum is CRC-32C, from the `crc32c` crate (the same values as the table-driven code of
//! earlier versions, so their files open unchanged; see the tests). It guards against
//! torn and partially flushed writes and bit rot, not against an attacker (who could rewrite the
//! checksum as easily as the body; the file is root-only). A cryptographic hash would cost more
//! for no gain in that threat model.
//!
//! # Durability (fsync policy)
//!
//! Which records must be durable before the action they allow is [`Limits::sync`]
//! ([`SyncMode`]); [`Stats::syncs`] counts the syncs performed. Since the file is written
//! strictly in order, a sync makes every earlier record durable.
//!
//! - [`SyncMode::Needed`] (the default): the `started` and `finished` records of types **not**
//!   safe to re-run must be durable before the executor starts and before the reply is sent.
//!   Those of types safe to re-run ([`Policy::safe_to_rerun`]) are never waited for: "nothing
//!   lost, nothing run twice" holds without them. Losing (power loss before some later sync) the
//!   `accepted`, `started` or `finished` of such a type leaves the tag queued, running or
//!   unknown after the restart, and a queued or running entry of a type safe to re-run is
//!   forgotten at open: the control plane, which has no reply stored (or has one and ignores a
//!   second as a duplicate), redelivers the instruction and it runs again, which the catalog
//!   declares harmless for that type. A reply sent before its `finished` record was durable is
//!   the same case: if the record is lost, a redelivery re-runs the instruction and answers
//!   again; the control plane stores only the first reply it gets. Nothing is lost (an
//!   unanswered instruction is always redelivered) and nothing that may not run twice runs
//!   twice.
//! - [`SyncMode::Always`]: the same for every type (paranoid operators; the benchmark's journaled
//!   throughput with `GET_NODE_STATUS`).
//! - [`SyncMode::Never`]: no record is waited for (benchmarks only).
//! - `accepted` and `acked` are never waited for. Losing an `accepted` (power loss before the
//!   next sync) means the tag was never started: the control plane redelivers it and it runs
//!   once. Losing an `acked` means the reply is resent after the next `WELCOME`; the control plane
//!   acknowledges duplicates and stores only the first. Both are handled by the tag logic.
//! - A rewrite (compaction, secret scrubbing) syncs the new file before renaming it: everything
//!   appended before it is durable then.
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
//! - The file is compacted (live records copied, in order, to `journal.log.tmp`, synced, renamed
//!   over `journal.log`, directory synced) when it is over 1 MiB and more than twice the live
//!   size, and on open when the previous run left something to forget.
//! - Expiry happens at every write and at [`Journal::expire`], which the dispatcher calls from
//!   a timer armed at [`Journal::next_expiry_ms`] (so an idle agent drops expired entries too,
//!   without a periodic wake-up).
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
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
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
    /// Which `started` and `finished` records must be durable before the executor starts and
    /// before the reply is sent (default [`SyncMode::Needed`]).
    pub sync: SyncMode,
}

/// Which records must reach the disk before the action they allow (see "Durability" in the
/// crate documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// `started` and `finished` of the types not safe to re-run ([`Policy::safe_to_rerun`]):
    /// what "nothing lost, nothing run twice" needs.
    #[default]
    Needed,
    /// `started` and `finished` of every type, safe to re-run or not.
    Always,
    /// None: a crash of the machine may lose or repeat instructions (benchmarks only).
    Never,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 * 1024 * 1024,
            retention: Duration::from_secs(24 * 3600),
            max_entries: 100_000,
            sync: SyncMode::Needed,
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
    /// The journal file would grow past 4 GiB (its offsets are 32-bit).
    #[error("journal {path} would grow past 4 GiB")]
    FileTooLarge {
        /// The journal file.
        path: PathBuf,
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
    /// Bytes of memory the index of the entries takes (the hash table and the ACK order, by
    /// their capacity): what the journal holds in memory grows by this, not by the replies.
    pub index_bytes: u64,
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

/// The `started` record is in the file.
const STARTED: u8 = 1;
/// The `finished` (or `discarded`) record is in the file.
const FINISHED: u8 = 1 << 1;
/// The reply is acknowledged.
const ACKED: u8 = 1 << 2;
/// A secret reply, acknowledged and discarded: its record is a `discarded` one, or becomes one at
/// the next rewrite (`Journal::scrub_pending`).
const DISCARDED: u8 = 1 << 3;
/// The type is safe to re-run ([`Policy::safe_to_rerun`], asked once, at `accepted`).
const SAFE: u8 = 1 << 4;
/// The type's replies are secret ([`Policy::secret_reply`], asked once, at `accepted`).
const SECRET: u8 = 1 << 5;

/// What the journal keeps in memory of an entry: where its records are in the file, their size
/// and its state, 24 bytes. Everything else (type, payload digest, times, the reply) is read
/// back from the file when asked for. An offset of 0 means "no such record" for every record
/// but `accepted` (which precedes the others, so only it can be at offset 0).
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    accepted_off: u32,
    started_off: u32,
    /// The `finished` (or `discarded`) frame (its length is in its header).
    reply_off: u32,
    /// 0 with `ACKED`: the ACK of a secret reply, not yet in the file (see
    /// `Journal::pending_acks`).
    acked_off: u32,
    /// Bytes of this entry's frames in the file.
    bytes: u32,
    flags: u8,
}

impl Entry {
    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn state(&self) -> EntryState {
        if self.has(ACKED) {
            EntryState::Acked
        } else if self.has(FINISHED) {
            EntryState::Finished
        } else if self.has(STARTED) {
            EntryState::Running
        } else {
            EntryState::Queued
        }
    }
}

/// Just what a rewrite needs of a record: its kind and tag.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    rec: Cow<'a, str>,
    tag: Tag,
}

/// Reads a file from a position of its own with `pread`, leaving the descriptor's offset alone.
struct At<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The body of the frame at `off`, its checksum verified: one `pread` for most records (a
/// first read of up to 4 KiB), two for longer ones.
fn read_frame(file: &File, off: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = file.read_at(&mut buf, off)?;
    if n < HEADER_BYTES as usize {
        file.read_exact_at(&mut buf[..HEADER_BYTES as usize], off)?;
    }
    let header: [u8; 8] = buf[..8].try_into().unwrap_or_default();
    let (len, crc) = frame_problem(header, u64::from(MAX_RECORD_BYTES))
        .map_err(|p| io::Error::new(io::ErrorKind::InvalidData, p))?;
    let total = HEADER_BYTES as usize + len as usize;
    let have = n.max(HEADER_BYTES as usize).min(total);
    buf.resize(total, 0);
    if have < total {
        file.read_exact_at(&mut buf[have..], off + have as u64)?;
    }
    let body = buf.split_off(HEADER_BYTES as usize);
    if crc32c(&body) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "checksum mismatch",
        ));
    }
    Ok(body)
}

// ---------------------------------------------------------------------------------------------
// Group commit

/// A position in the journal's history (bytes appended since open, across rewrites): a record
/// that must be durable is durable once [`Journal::durable`] reaches the position
/// [`Journal::started`] or [`Journal::finished`] returned for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(u64);

/// One `fdatasync` of the journal file, to run on a thread of the caller's choice
/// ([`SyncJob::run`]); its outcome goes back to [`Journal::synced`]. It covers every record
/// appended before [`Journal::sync_job`] made it.
#[derive(Debug)]
pub struct SyncJob {
    file: Arc<File>,
    upto: u64,
}

impl SyncJob {
    /// Sync the file (blocks for the duration of an `fdatasync`).
    pub fn run(self) -> SyncDone {
        let result = self.file.sync_data();
        SyncDone {
            upto: self.upto,
            result,
        }
    }
}

/// The outcome of a [`SyncJob`], for [`Journal::synced`].
#[derive(Debug)]
pub struct SyncDone {
    upto: u64,
    result: io::Result<()>,
}

// ---------------------------------------------------------------------------------------------
// The journal

/// The largest journal file, so that offsets fit in 32 bits (see "Bounds and retention").
const MAX_FILE_BYTES: u64 = u32::MAX as u64;

/// The journal: the file, and a small index of every entry it holds, in memory.
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    file: Arc<File>,
    limits: Limits,
    policy: Policy,
    clock: Arc<dyn Clock>,
    entries: HashMap<Tag, Entry>,
    /// Offsets of the `acked` records of acknowledged entries in the order of their ACK, oldest
    /// first (4 bytes each: the record names the tag and the time). An offset whose entry was
    /// dropped, or acknowledged again elsewhere, is skipped when it reaches the front.
    acked_order: VecDeque<u32>,
    /// The ACK at the front of `acked_order` (`acked_off`, tag, ms), read back once.
    front_ack: Option<(u32, Tag, u64)>,
    /// ACKs of secret replies applied but not yet in the file (written by the rewrite that
    /// discards the reply), with their time.
    pending_acks: Vec<(Tag, u64)>,
    /// When the instructions started in this run started (ms), until they finish: for the
    /// duration in `finished`.
    running_since: HashMap<Tag, u64>,
    acked_count: usize,
    /// The [`Lsn`] of offset 0 of the current file.
    base: u64,
    file_len: u64,
    /// Everything up to here is on disk.
    durable: u64,
    /// The last record that must become durable ends here.
    want: u64,
    /// A [`SyncJob`] is out.
    syncing: bool,
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
    // No entries: they lead to replies, which have no place in a debug dump.
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
        let file = OpenOptions::new()
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
            file: Arc::new(file),
            limits,
            policy,
            clock,
            entries: HashMap::new(),
            acked_order: VecDeque::new(),
            front_ack: None,
            pending_acks: Vec::new(),
            running_since: HashMap::new(),
            acked_count: 0,
            base: 0,
            file_len: 0,
            durable: 0,
            want: 0,
            syncing: false,
            live_bytes: 0,
            unacked_bytes: 0,
            syncs: 0,
            compactions: 0,
            poisoned: false,
            scrub_pending: false,
        };
        let mut recovery = Recovery {
            truncated: j.replay()?,
            ..Recovery::default()
        };
        // What the file held when opened is taken as durable (it was written by a run that
        // synced what it had to, or is all that survived).
        j.durable = j.file_len;
        j.recover(&mut recovery)?;
        j.entries.shrink_to_fit();
        Ok((j, recovery))
    }

    /// Read every good record; cut the file at the first bad one.
    fn replay(&mut self) -> Result<Option<Truncation>, JournalError> {
        let file = self.file.clone();
        let len = file
            .metadata()
            .map_err(io_err("read the metadata of", &self.path))?
            .len();
        let mut reader = BufReader::with_capacity(
            1 << 16,
            At {
                file: &file,
                pos: 0,
            },
        );
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
            let frame_len = HEADER_BYTES + u64::from(body_len);
            if offset + frame_len > MAX_FILE_BYTES {
                problem = Some("record past the 4 GiB a journal file may hold");
                break;
            }
            // Bounded by MAX_RECORD_BYTES and by the bytes actually in the file.
            let mut body = vec![0u8; body_len as usize];
            reader
                .read_exact(&mut body)
                .map_err(io_err("read", &self.path))?;
            if crc32c(&body) != crc {
                problem = Some("checksum mismatch");
                break;
            }
            let record: Record<'_> = match serde_json::from_slice(&body) {
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
            // Both fit: checked against MAX_FILE_BYTES above.
            if !self.apply(&record, offset as u32, frame_len as u32) {
                tracing::warn!(
                    path = %self.path.display(),
                    offset,
                    tag = %record.tag(),
                    record = record.name(),
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
        let mut unfinished: Vec<(u32, Tag)> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state(), EntryState::Queued | EntryState::Running))
            .map(|(t, e)| (e.accepted_off, *t))
            .collect();
        unfinished.sort_unstable();
        let mut forgot = false;
        for (_, tag) in unfinished {
            let Some(e) = self.entries.get(&tag).copied() else {
                continue;
            };
            if e.state() == EntryState::Queued {
                self.drop_entry(&tag);
                rec.never_started.push(tag);
                forgot = true;
                continue;
            }
            let kind = match self.read_record(e.accepted_off)? {
                Record::Accepted { kind, .. } => kind.into_owned(),
                _ => return Err(self.misplaced()),
            };
            let pgid = match self.read_record(e.started_off)? {
                Record::Started { pgid, .. } => pgid,
                _ => return Err(self.misplaced()),
            };
            let cut = CutShort { tag, kind, pgid };
            if e.has(SAFE) {
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
            .filter(|(_, e)| e.has(ACKED) && e.has(SECRET) && !e.has(DISCARDED))
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
        // The `interrupted` replies are durable before anyone can send them.
        self.sync_now()?;
        Ok(())
    }

    /// Apply one record, whose frame of `frame_len` bytes is at `off`, to the state; false
    /// when it does not follow from the tag's state.
    fn apply(&mut self, record: &Record<'_>, off: u32, frame_len: u32) -> bool {
        let tag = record.tag();
        let applied = match record {
            Record::Accepted { kind, .. } => {
                // A fresh `accepted` replaces a forgotten entry of the same tag.
                self.drop_entry(&tag);
                let mut flags = 0;
                if (self.policy.safe_to_rerun)(kind) {
                    flags |= SAFE;
                }
                if (self.policy.secret_reply)(kind) {
                    flags |= SECRET;
                }
                let entry = Entry {
                    accepted_off: off,
                    flags,
                    ..Entry::default()
                };
                self.weigh(&entry, true);
                self.entries.insert(tag, entry);
                true
            }
            Record::Started { .. } => self.update(tag, |e| {
                if e.state() != EntryState::Queued {
                    return false;
                }
                e.started_off = off;
                e.flags |= STARTED;
                true
            }),
            Record::Finished { .. } | Record::Discarded { .. } => {
                let discarded = matches!(record, Record::Discarded { .. });
                self.update(tag, |e| {
                    if !matches!(e.state(), EntryState::Queued | EntryState::Running) {
                        return false;
                    }
                    e.reply_off = off;
                    e.flags |= FINISHED;
                    if discarded {
                        e.flags |= DISCARDED;
                    }
                    true
                })
            }
            Record::Acked { .. } => self.mark_acked(tag, off),
        };
        if applied {
            self.update(tag, |e| {
                e.bytes += frame_len;
                true
            });
        }
        applied
    }

    /// Record the ACK (its record at `off`, 0 when not in the file yet) of a finished entry.
    fn mark_acked(&mut self, tag: Tag, off: u32) -> bool {
        let done = self.update(tag, |e| {
            if e.state() != EntryState::Finished {
                return false;
            }
            e.acked_off = off;
            e.flags |= ACKED;
            true
        });
        // An ACK not in the file yet (a secret reply's, see `acked_secret`) is queued when its
        // record is written (the rewrite rebuilds the queue, or the fallback append).
        if done && off != 0 {
            self.acked_order.push_back(off);
        }
        done
    }

    /// Add (`true`) or remove an entry's weight from the totals.
    fn weigh(&mut self, e: &Entry, add: bool) {
        let bytes = u64::from(e.bytes);
        let acked = e.has(ACKED);
        if add {
            self.live_bytes += bytes;
            if acked {
                self.acked_count += 1;
            } else {
                self.unacked_bytes += bytes;
            }
        } else {
            self.live_bytes -= bytes;
            if acked {
                self.acked_count -= 1;
            } else {
                self.unacked_bytes -= bytes;
            }
        }
    }

    /// Change the entry of `tag`, keeping the totals right.
    fn update(&mut self, tag: Tag, f: impl FnOnce(&mut Entry) -> bool) -> bool {
        let Some(e) = self.entries.get_mut(&tag) else {
            return false;
        };
        let before = *e;
        let changed = f(e);
        let after = *e;
        self.weigh(&before, false);
        self.weigh(&after, true);
        changed
    }

    fn drop_entry(&mut self, tag: &Tag) -> bool {
        let Some(e) = self.entries.remove(tag) else {
            return false;
        };
        self.weigh(&e, false);
        self.running_since.remove(tag);
        true
    }

    fn unacked_entries(&self) -> usize {
        self.entries.len() - self.acked_count
    }

    /// Whether the entry of `tag` is acknowledged by the `acked` record at `off` (not dropped,
    /// nor accepted again since).
    fn acked_at(&self, tag: &Tag, off: u32) -> bool {
        self.entries
            .get(tag)
            .is_some_and(|e| e.has(ACKED) && e.acked_off == off)
    }

    /// The oldest ACK still held: its tag and time.
    fn front_ack(&mut self) -> Option<(Tag, u64)> {
        loop {
            let off = *self.acked_order.front()?;
            if let Some((o, tag, ms)) = self.front_ack
                && o == off
                && self.acked_at(&tag, off)
            {
                return Some((tag, ms));
            }
            let (tag, ms) = match self.read_record(off) {
                Ok(Record::Acked { tag, at_ms }) => (tag, at_ms),
                Ok(_) => {
                    tracing::warn!(
                        off,
                        "the journal's ACK queue names a record that is not an ACK"
                    );
                    self.acked_order.pop_front();
                    continue;
                }
                Err(err) => {
                    // Unreadable: the entry it belongs to is treated as expired (it only serves
                    // redeliveries). Found by its offset (a scan, on this rare path only).
                    let Some(tag) = self
                        .entries
                        .iter()
                        .find(|(_, e)| e.has(ACKED) && e.acked_off == off)
                        .map(|(t, _)| *t)
                    else {
                        self.acked_order.pop_front();
                        continue;
                    };
                    tracing::warn!(%tag, error = %err, "cannot read back the time of an ACK; the entry is dropped");
                    (tag, 0)
                }
            };
            if !self.acked_at(&tag, off) {
                // Dropped (or accepted again) since its ACK.
                self.acked_order.pop_front();
                continue;
            }
            self.front_ack = Some((off, tag, ms));
            return Some((tag, ms));
        }
    }

    fn retention_ms(&self) -> u64 {
        u64::try_from(self.limits.retention.as_millis()).unwrap_or(u64::MAX)
    }

    /// Drop acknowledged entries past retention, and the oldest acknowledged ones while the
    /// journal (with `room` more entries) is over its bounds. Returns how many were dropped.
    fn evict(&mut self, now: u64, room: usize) -> usize {
        let retention = self.retention_ms();
        let mut dropped = 0;
        while let Some((tag, acked_ms)) = self.front_ack() {
            let expired = acked_ms.saturating_add(retention) <= now;
            let over = self.live_bytes > self.limits.max_bytes
                || self.entries.len() + room > self.limits.max_entries;
            if !(expired || over) {
                break;
            }
            self.acked_order.pop_front();
            self.drop_entry(&tag);
            dropped += 1;
        }
        if self.acked_order.capacity() > 64
            && self.acked_order.len() < self.acked_order.capacity() / 4
        {
            self.acked_order.shrink_to(self.acked_order.len() * 2);
        }
        if dropped > 0
            && self.entries.capacity() > 64
            && self.entries.len() < self.entries.capacity() / 4
        {
            self.entries.shrink_to(self.entries.len() * 2);
        }
        dropped
    }

    fn wants_compaction(&self) -> bool {
        self.file_len > COMPACT_MIN_BYTES && self.file_len > 2 * self.live_bytes
    }

    /// Evict and compact when there is enough garbage; a failed compaction is logged, not
    /// returned (the append that preceded it succeeded).
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

    fn check_poisoned(&self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Whether the `started` and `finished` records of an entry with these flags must be
    /// durable before the executor starts and before the reply is sent ([`SyncMode`]).
    fn must_sync(&self, flags: u8) -> bool {
        match self.limits.sync {
            SyncMode::Needed => flags & SAFE == 0,
            SyncMode::Always => true,
            SyncMode::Never => false,
        }
    }

    /// Append one record, then apply it. With `durable`, the position it must be durable at.
    fn write(&mut self, record: Record<'_>, durable: bool) -> Result<Option<Lsn>, JournalError> {
        self.check_poisoned()?;
        let frame = Self::encode(record.tag(), &self.path, &record)?;
        let off = self.append(&frame)?;
        let applied = self.apply(&record, off, frame.len() as u32);
        debug_assert!(applied, "the caller checked the state");
        if !durable {
            return Ok(None);
        }
        let end = self.base + self.file_len;
        self.want = self.want.max(end);
        Ok(Some(Lsn(end)))
    }

    /// Append one encoded frame (a plain `write`, no sync); its offset.
    fn append(&mut self, frame: &[u8]) -> Result<u32, JournalError> {
        self.check_poisoned()?;
        let off = self.file_len;
        if off + frame.len() as u64 > MAX_FILE_BYTES {
            return Err(JournalError::FileTooLarge {
                path: self.path.clone(),
            });
        }
        if let Err(e) = (&*self.file).write_all(frame) {
            // Cut a partial frame off, or later records would sit behind a torn one.
            if self.file.set_len(self.file_len).is_err() {
                self.poisoned = true;
            }
            return Err(io_err("append to", &self.path)(e));
        }
        self.file_len += frame.len() as u64;
        Ok(off as u32)
    }

    /// Mark the acknowledged reply of `tag` discarded, in memory; the file is rewritten by the
    /// caller (or the next write, or the next open).
    fn discard(&mut self, tag: Tag) {
        let changed = self.update(tag, |e| {
            if e.has(FINISHED) && !e.has(DISCARDED) {
                e.flags |= DISCARDED;
                true
            } else {
                false
            }
        });
        self.scrub_pending |= changed;
    }

    /// Record the ACK of the secret reply of `tag`. The ACK reaches the disk only inside a
    /// rewrite of the file that no longer holds the reply: a crash before the rename leaves
    /// the old file, where the reply is not acknowledged (it is resent and acknowledged
    /// again), a crash after it the new one, where the reply is gone. Only when that rewrite
    /// fails is the `acked` record appended to the old file, and the rewrite retried at every
    /// later write and at the next open.
    fn acked_secret(&mut self, tag: Tag, now: u64) -> Result<(), JournalError> {
        self.check_poisoned()?;
        let frame = Self::encode(tag, &self.path, &Record::Acked { tag, at_ms: now })?;
        let applied = self.mark_acked(tag, 0);
        debug_assert!(applied, "the caller checked the state");
        self.pending_acks.push((tag, now));
        self.discard(tag);
        let Err(e) = self.rewrite() else {
            return Ok(());
        };
        tracing::error!(
            %tag,
            error = %e,
            "cannot rewrite the journal without the acknowledged secret reply; it stays in the file until a rewrite succeeds (retried at every write and at the next open)"
        );
        let off = self.append(&frame)?;
        self.pending_acks.retain(|(t, _)| *t != tag);
        self.update(tag, |e| {
            e.acked_off = off;
            e.bytes += frame.len() as u32;
            true
        });
        self.acked_order.push_back(off);
        Ok(())
    }

    /// Rewrite the live entries to a new file and rename it over the journal.
    fn rewrite(&mut self) -> Result<(), JournalError> {
        self.check_poisoned()?;
        let tmp = self.dir.join(TMP_FILE);
        match self.write_compacted(&tmp) {
            Ok((file, len, entries)) => {
                // Everything before the rename is durable: the new file was synced.
                self.base += self.file_len;
                self.file = Arc::new(file);
                self.file_len = len;
                self.durable = self.base + len;
                self.entries = entries;
                self.live_bytes = 0;
                self.unacked_bytes = 0;
                self.acked_count = 0;
                let all: Vec<Entry> = self.entries.values().copied().collect();
                for e in &all {
                    self.weigh(e, true);
                }
                drop(all);
                self.pending_acks.clear();
                self.front_ack = None;
                // The new file holds the `acked` records in the order of the old one (the ACKs
                // not yet in the file last): its order of ACKs.
                let mut order: Vec<u32> = self
                    .entries
                    .values()
                    .filter(|e| e.has(ACKED) && e.acked_off != 0)
                    .map(|e| e.acked_off)
                    .collect();
                order.sort_unstable();
                self.acked_order = order.into();
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

    /// Copy the live records, in their order, to `tmp` (a `discarded` record in place of the
    /// `finished` one of a discarded secret reply, and the ACKs not yet in the file at the
    /// end), sync it and rename it over the journal. Returns the new file, its length and the
    /// entries with their new offsets.
    #[allow(clippy::type_complexity)]
    fn write_compacted(
        &mut self,
        tmp: &Path,
    ) -> Result<(File, u64, HashMap<Tag, Entry>), JournalError> {
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
        let mut new: HashMap<Tag, Entry> = HashMap::with_capacity(self.entries.len());
        let mut len = 0u64;
        let mut w = BufWriter::with_capacity(1 << 16, &file);
        let old = self.file.clone();
        let mut r = BufReader::with_capacity(1 << 16, At { file: &old, pos: 0 });
        let mut off = 0u64;
        let read_err = io_err("read", &self.path);
        let unreadable = || {
            io_err("read", &self.path)(io::Error::new(
                io::ErrorKind::InvalidData,
                "a record changed since it was written",
            ))
        };
        let mut read_failure = None;
        while off < self.file_len {
            let mut header = [0u8; 8];
            if let Err(e) = r.read_exact(&mut header) {
                read_failure = Some(e);
                break;
            }
            let Ok((body_len, crc)) = frame_problem(header, self.file_len - off - HEADER_BYTES)
            else {
                return Err(unreadable());
            };
            let mut frame = header.to_vec();
            frame.resize(HEADER_BYTES as usize + body_len as usize, 0);
            if let Err(e) = r.read_exact(&mut frame[HEADER_BYTES as usize..]) {
                read_failure = Some(e);
                break;
            }
            let at = off as u32;
            off += frame.len() as u64;
            let body = &frame[HEADER_BYTES as usize..];
            if crc32c(body) != crc {
                return Err(unreadable());
            }
            let Ok(head) = serde_json::from_slice::<Head<'_>>(body) else {
                continue; // a record of another version: dropped
            };
            let (tag, is_finished) = (head.tag, head.rec == "finished");
            let Some(e) = self.entries.get(&tag) else {
                continue; // dropped, forgotten, expired
            };
            #[derive(PartialEq)]
            enum Which {
                Accepted,
                Started,
                Reply,
                Acked,
            }
            let which = if at == e.accepted_off {
                Which::Accepted
            } else if e.has(STARTED) && at == e.started_off {
                Which::Started
            } else if e.has(FINISHED) && at == e.reply_off {
                Which::Reply
            } else if e.has(ACKED) && e.acked_off != 0 && at == e.acked_off {
                Which::Acked
            } else {
                continue; // an earlier entry of the same tag, or a record replay ignored
            };
            let out = if which == Which::Reply && e.has(DISCARDED) && is_finished {
                let Ok(Record::Finished {
                    at_ms,
                    reply,
                    duration_ms,
                    ..
                }) = serde_json::from_slice::<Record<'_>>(body)
                else {
                    return Err(unreadable());
                };
                let rec = Record::Discarded {
                    tag,
                    at_ms,
                    reply: Discarded::of(&reply),
                    duration_ms,
                };
                Self::encode(tag, tmp, &rec)?
            } else {
                frame
            };
            w.write_all(&out).map_err(io_err("write", tmp))?;
            let n = new.entry(tag).or_insert(Entry {
                flags: e.flags,
                ..Entry::default()
            });
            let pos = len as u32; // the new file is no longer than the old one
            match which {
                Which::Accepted => n.accepted_off = pos,
                Which::Started => n.started_off = pos,
                Which::Reply => n.reply_off = pos,
                Which::Acked => n.acked_off = pos,
            }
            n.bytes += out.len() as u32;
            len += out.len() as u64;
        }
        drop(r);
        if let Some(e) = read_failure {
            return Err(read_err(e));
        }
        // The ACKs of secret replies that reach the file with this rewrite.
        for &(tag, at_ms) in &self.pending_acks {
            let Some(n) = new.get_mut(&tag).filter(|n| n.has(ACKED)) else {
                continue;
            };
            let frame = Self::encode(tag, tmp, &Record::Acked { tag, at_ms })?;
            w.write_all(&frame).map_err(io_err("write", tmp))?;
            n.acked_off = len as u32;
            n.bytes += frame.len() as u32;
            len += frame.len() as u64;
        }
        w.flush().map_err(io_err("write", tmp))?;
        drop(w);
        if new.len() != self.entries.len() {
            return Err(io_err("rewrite", &self.path)(io::Error::new(
                io::ErrorKind::InvalidData,
                "records of live entries are missing from the file",
            )));
        }
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
        Ok((file, len, new))
    }

    /// The error for a record that is not where the index says.
    fn misplaced(&self) -> JournalError {
        io_err("read back a record of", &self.path)(io::Error::new(
            io::ErrorKind::InvalidData,
            "the record at the recorded offset is of another kind",
        ))
    }

    /// The record at `off` of the current file.
    fn read_record(&self, off: u32) -> Result<Record<'static>, JournalError> {
        let body = read_frame(&self.file, u64::from(off))
            .map_err(io_err("read back a record of", &self.path))?;
        serde_json::from_slice(&body).map_err(|_| {
            io_err("read back a record of", &self.path)(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a record",
            ))
        })
    }

    /// The stored reply of a finished entry.
    fn reply_of(&self, e: &Entry) -> Result<Envelope, JournalError> {
        match self.read_record(e.reply_off)? {
            Record::Finished { reply, .. } => Ok(reply.into_owned()),
            _ => Err(self.misplaced()),
        }
    }

    /// What is left of the discarded reply of an entry.
    fn discarded_of(&self, e: &Entry) -> Result<Discarded, JournalError> {
        match self.read_record(e.reply_off)? {
            Record::Finished { reply, .. } => Ok(Discarded::of(&reply)),
            Record::Discarded { reply, .. } => Ok(reply),
            _ => Err(self.misplaced()),
        }
    }

    fn acked_ms(&self, tag: &Tag, e: &Entry) -> Result<u64, JournalError> {
        if e.acked_off == 0 {
            return Ok(self
                .pending_acks
                .iter()
                .find(|(t, _)| t == tag)
                .map_or(0, |(_, ms)| *ms));
        }
        match self.read_record(e.acked_off)? {
            Record::Acked { at_ms, .. } => Ok(at_ms),
            _ => Err(self.misplaced()),
        }
    }

    fn view(&self, tag: Tag, e: &Entry) -> Result<EntryView, JournalError> {
        let Record::Accepted {
            kind,
            payload_sha256,
            at_ms,
            ..
        } = self.read_record(e.accepted_off)?
        else {
            return Err(self.misplaced());
        };
        let mut v = EntryView {
            tag,
            kind: kind.into_owned(),
            payload_sha256: payload_sha256.into_owned(),
            state: e.state(),
            accepted_ms: at_ms,
            started_ms: None,
            finished_ms: None,
            acked_ms: None,
            duration_ms: None,
            pgid: None,
            reply_type: None,
            error_code: None,
        };
        if e.has(STARTED) {
            let Record::Started { at_ms, pgid, .. } = self.read_record(e.started_off)? else {
                return Err(self.misplaced());
            };
            v.started_ms = Some(at_ms);
            v.pgid = pgid;
        }
        if e.has(FINISHED) {
            let (at, d, duration) = match self.read_record(e.reply_off)? {
                Record::Finished {
                    at_ms,
                    reply,
                    duration_ms,
                    ..
                } => (at_ms, Discarded::of(&reply), duration_ms),
                Record::Discarded {
                    at_ms,
                    reply,
                    duration_ms,
                    ..
                } => (at_ms, reply, duration_ms),
                _ => return Err(self.misplaced()),
            };
            v.finished_ms = Some(at);
            v.duration_ms = duration;
            v.reply_type = Some(d.reply_type);
            v.error_code = d.error_code;
        }
        if e.has(ACKED) {
            v.acked_ms = Some(self.acked_ms(&tag, e)?);
        }
        Ok(v)
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

    /// What the journal knows of `tag`. A stored reply is read back from the file; when that
    /// fails (logged), [`Lookup::InProgress`]: nothing is run, nothing is sent.
    pub fn lookup(&self, tag: &Tag) -> Lookup {
        let Some(e) = self.entries.get(tag) else {
            return Lookup::New;
        };
        if !e.has(FINISHED) {
            return Lookup::InProgress;
        }
        let read = if e.has(DISCARDED) {
            if e.has(SAFE) {
                return Lookup::New;
            }
            self.discarded_of(e).map(Lookup::Discarded)
        } else {
            self.reply_of(e).map(Lookup::Done)
        };
        read.unwrap_or_else(|err| {
            tracing::error!(%tag, error = %err, "cannot read back the stored reply; nothing sent, nothing run");
            Lookup::InProgress
        })
    }

    /// The state of the entry of `tag` (no read from the file).
    pub fn state(&self, tag: &Tag) -> Option<EntryState> {
        self.entries.get(tag).map(Entry::state)
    }

    /// Whether `tag` is unknown, or may be accepted again (see [`Journal::lookup`]).
    fn is_new(&self, tag: &Tag) -> bool {
        self.entries
            .get(tag)
            .is_none_or(|e| e.has(DISCARDED) && e.has(SAFE))
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
        if !self.is_new(&tag) {
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
    /// The record is appended, not synced: when it must be durable before the executor starts
    /// ([`SyncMode`]), the position to wait for ([`Journal::durable`]); `None` when the
    /// executor may start now.
    pub fn started(&mut self, tag: Tag, pgid: Option<i32>) -> Result<Option<Lsn>, JournalError> {
        let Some(e) = self
            .entries
            .get(&tag)
            .filter(|e| e.state() == EntryState::Queued)
        else {
            return Err(self.wrong_state(tag, "started"));
        };
        let sync = self.must_sync(e.flags);
        let now = self.clock.now_ms();
        let lsn = self.write(
            Record::Started {
                tag,
                at_ms: now,
                pgid,
            },
            sync,
        )?;
        self.running_since.insert(tag, now);
        self.maintain();
        Ok(lsn)
    }

    /// Store the final reply of `tag` (queued or running). The record is appended, not synced:
    /// when it must be durable before the reply is sent ([`SyncMode`]), the position to wait
    /// for ([`Journal::durable`]); `None` when the reply may go now.
    pub fn finished(&mut self, tag: Tag, reply: &Envelope) -> Result<Option<Lsn>, JournalError> {
        let duration = self
            .running_since
            .get(&tag)
            .map(|s| self.clock.now_ms().saturating_sub(*s));
        let lsn = self.finish(tag, reply, duration)?;
        self.running_since.remove(&tag);
        self.maintain();
        Ok(lsn)
    }

    fn finish(
        &mut self,
        tag: Tag,
        reply: &Envelope,
        duration_ms: Option<u64>,
    ) -> Result<Option<Lsn>, JournalError> {
        if reply.tag != tag {
            return Err(JournalError::ReplyTagMismatch {
                path: self.path.clone(),
                tag,
                reply_tag: reply.tag,
            });
        }
        let Some(e) = self
            .entries
            .get(&tag)
            .filter(|e| matches!(e.state(), EntryState::Queued | EntryState::Running))
        else {
            return Err(self.wrong_state(tag, "finished"));
        };
        let sync = self.must_sync(e.flags);
        let now = self.clock.now_ms();
        self.write(
            Record::Finished {
                tag,
                at_ms: now,
                reply: Cow::Borrowed(reply),
                duration_ms,
            },
            sync,
        )
    }

    /// Record the control plane's ACK of the reply `tag`. False (nothing written) when no
    /// reply awaits an ACK for it: unknown, not finished, or already acknowledged. Not synced,
    /// except for a secret reply ([`Policy::secret_reply`]): that one is discarded and the ACK
    /// recorded by a synced rewrite of the file, done when this returns (see "Secret replies"
    /// in the crate documentation).
    pub fn acked(&mut self, tag: Tag) -> Result<bool, JournalError> {
        let Some(e) = self
            .entries
            .get(&tag)
            .filter(|e| e.state() == EntryState::Finished)
        else {
            return Ok(false);
        };
        let now = self.clock.now_ms();
        if e.has(SECRET) {
            self.acked_secret(tag, now)?;
        } else {
            self.write(Record::Acked { tag, at_ms: now }, false)?;
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

    /// Drop the acknowledged entries whose retention is over (compacting when that leaves
    /// enough garbage), as the writes do; for a timer armed at [`Journal::next_expiry_ms`].
    /// Returns how many were dropped.
    pub fn expire(&mut self) -> usize {
        let now = self.clock.now_ms();
        let dropped = self.evict(now, 0);
        if dropped > 0 && (self.scrub_pending || self.wants_compaction()) {
            if let Err(e) = self.rewrite() {
                tracing::warn!(error = %e, "journal compaction failed; retried later");
            }
        }
        dropped
    }

    /// When (ms since the epoch, by the journal's clock) the oldest acknowledged entry's
    /// retention ends; `None` when no entry is acknowledged.
    pub fn next_expiry_ms(&mut self) -> Option<u64> {
        let retention = self.retention_ms();
        self.front_ack().map(|(_, ms)| ms.saturating_add(retention))
    }

    /// The journal's clock, now.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    // --- Group commit -------------------------------------------------------------------------

    /// A sync of everything appended so far, when a record that must be durable is not yet and
    /// no other job is out; run it ([`SyncJob::run`], on another thread) and pass its outcome
    /// to [`Journal::synced`]. Records appended meanwhile wait for the next job: one
    /// `fdatasync` covers all of them.
    pub fn sync_job(&mut self) -> Option<SyncJob> {
        if self.poisoned || self.syncing || self.want <= self.durable {
            return None;
        }
        self.syncing = true;
        Some(SyncJob {
            file: self.file.clone(),
            upto: self.base + self.file_len,
        })
    }

    /// Record the outcome of a [`SyncJob`]: the new durable position, or the error (which
    /// leaves the journal [`JournalError::Poisoned`], as any failed sync does, unless a rewrite
    /// made those records durable meanwhile).
    pub fn synced(&mut self, done: SyncDone) -> Result<Lsn, JournalError> {
        self.syncing = false;
        self.sync_outcome(done.upto, done.result)
    }

    fn sync_outcome(&mut self, upto: u64, result: io::Result<()>) -> Result<Lsn, JournalError> {
        match result {
            Ok(()) => {
                self.syncs += 1;
                self.durable = self.durable.max(upto);
                Ok(Lsn(self.durable))
            }
            Err(_) if upto <= self.durable => Ok(Lsn(self.durable)),
            Err(e) => {
                // After a failed fsync the page cache may have dropped the data: trust
                // nothing more until a reopen rereads the file.
                self.poisoned = true;
                Err(io_err("sync", &self.path)(e))
            }
        }
    }

    /// Sync now, on this thread, when a record that must be durable is not yet.
    pub fn sync_now(&mut self) -> Result<Lsn, JournalError> {
        self.check_poisoned()?;
        if self.want <= self.durable {
            return Ok(Lsn(self.durable));
        }
        let upto = self.base + self.file_len;
        let result = self.file.sync_data();
        self.sync_outcome(upto, result)
    }

    /// Everything up to this position is on disk.
    pub fn durable(&self) -> Lsn {
        Lsn(self.durable)
    }

    /// Whether a failed write or sync made the journal unusable until it is opened again.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    // --- Views ----------------------------------------------------------------------------------

    /// Tags of the replies awaiting ACK, oldest first.
    fn unacked_sorted(&self) -> Vec<Tag> {
        let mut v: Vec<(u32, Tag)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.state() == EntryState::Finished && !e.has(DISCARDED))
            .map(|(t, e)| (e.reply_off, *t))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, t)| t).collect()
    }

    /// The replies awaiting ACK, oldest first: to send after each `WELCOME` (HELLO lists their
    /// tags, [`Journal::unacked_tags`]). Read back from the file (one that cannot be read is
    /// logged and left out).
    pub fn unacked(&self) -> Vec<Envelope> {
        self.unacked_sorted()
            .into_iter()
            .filter_map(|t| match self.lookup(&t) {
                Lookup::Done(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// The tags of [`Journal::unacked`], in the same order.
    pub fn unacked_tags(&self) -> Vec<Tag> {
        self.unacked_sorted()
    }

    /// The tags of the `n` entries answered last (their reply stored last), newest first.
    pub fn answered_newest_first(&self, n: usize) -> Vec<Tag> {
        let mut v: Vec<(u32, Tag)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.has(FINISHED))
            .map(|(t, e)| (e.reply_off, *t))
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.truncate(n);
        v.into_iter().map(|(_, t)| t).collect()
    }

    /// Sizes and counts (the two times are read back from the file).
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            entries: self.entries.len(),
            acked: self.acked_count,
            file_bytes: self.file_len,
            live_bytes: self.live_bytes,
            unacked_bytes: self.unacked_bytes,
            syncs: self.syncs,
            compactions: self.compactions,
            index_bytes: self.index_bytes(),
            ..Stats::default()
        };
        let mut oldest_unacked: Option<&Entry> = None;
        let mut oldest: Option<&Entry> = None;
        for e in self.entries.values() {
            match e.state() {
                EntryState::Queued => s.queued += 1,
                EntryState::Running => s.running += 1,
                EntryState::Finished => {
                    s.unacked += 1;
                    if oldest_unacked.is_none_or(|o| e.reply_off < o.reply_off) {
                        oldest_unacked = Some(e);
                    }
                }
                EntryState::Acked => {}
            }
            if oldest.is_none_or(|o| e.accepted_off < o.accepted_off) {
                oldest = Some(e);
            }
        }
        s.oldest_unacked_ms = oldest_unacked.and_then(|e| match self.read_record(e.reply_off) {
            Ok(Record::Finished { at_ms, .. }) => Some(at_ms),
            _ => None,
        });
        s.oldest_entry_ms = oldest.and_then(|e| match self.read_record(e.accepted_off) {
            Ok(Record::Accepted { at_ms, .. }) => Some(at_ms),
            _ => None,
        });
        s
    }

    /// See [`Stats::index_bytes`]: a hash table of `capacity` entries has a power of two of
    /// buckets, at least 8/7 of it, each with one control byte.
    fn index_bytes(&self) -> u64 {
        fn table<K, V>(capacity: usize) -> usize {
            if capacity == 0 {
                return 0;
            }
            let buckets = (capacity * 8 / 7).next_power_of_two();
            buckets * (std::mem::size_of::<(K, V)>() + 1)
        }
        let bytes = table::<Tag, Entry>(self.entries.capacity())
            + table::<Tag, u64>(self.running_since.capacity())
            + self.acked_order.capacity() * std::mem::size_of::<u32>()
            + self.pending_acks.capacity() * std::mem::size_of::<(Tag, u64)>();
        bytes as u64
    }

    /// The `n` most recently accepted entries, newest first.
    pub fn recent(&self, n: usize) -> Vec<EntryView> {
        let mut v: Vec<(u32, Tag)> = self
            .entries
            .iter()
            .map(|(t, e)| (e.accepted_off, *t))
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.truncate(n);
        v.into_iter().filter_map(|(_, t)| self.get(&t)).collect()
    }

    /// The entry of `tag`, read back from the file (`None` when unknown, or unreadable:
    /// logged).
    pub fn get(&self, tag: &Tag) -> Option<EntryView> {
        let e = self.entries.get(tag)?;
        self.view(*tag, e)
            .map_err(|err| tracing::error!(%tag, error = %err, "cannot read back a journal entry"))
            .ok()
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

    /// The ACK queue holds the offsets of the `acked` records: across a compaction (which moves
    /// every record) and a re-ACK of a tag accepted again, entries still expire in the order of
    /// their ACK, each at its own time.
    #[test]
    fn acks_expire_in_their_order_across_compactions() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let limits = Limits {
            retention: Duration::from_secs(100),
            ..Limits::default()
        };
        let (mut j, _) = open_with(d.path(), &clock, limits);
        let tags: Vec<Tag> = (0..6).map(|_| Tag::random()).collect();
        for (i, t) in tags.iter().enumerate() {
            run(&mut j, *t, &format!("reply {i}"));
        }
        // ACKed in reverse order of acceptance, 10 s apart.
        for t in tags.iter().rev() {
            assert!(j.acked(*t).unwrap());
            clock.advance(10_000);
        }
        j.compact().unwrap();
        // The first ACK (tags[5]) was at T0, the last (tags[0]) at T0 + 50 s; now T0 + 60 s.
        clock.advance(100_000 - 60_000 + 15_000); // T0 + 115 s: ACKs at T0 and T0 + 10 s expire
        assert_eq!(j.expire(), 2);
        assert_eq!(j.lookup(&tags[5]), Lookup::New);
        assert_eq!(j.lookup(&tags[4]), Lookup::New);
        assert!(matches!(j.lookup(&tags[3]), Lookup::Done(_)));
        j.compact().unwrap();
        clock.advance(20_000); // T0 + 135 s: the ACKs at T0 + 20 s and T0 + 30 s
        assert_eq!(j.expire(), 2);
        assert!(matches!(j.lookup(&tags[1]), Lookup::Done(_)));
        assert!(matches!(j.lookup(&tags[0]), Lookup::Done(_)));
        clock.advance(20_000);
        assert_eq!(j.expire(), 2);
        assert_eq!(j.stats().entries, 0);
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

    /// The cost of a synced append (`started` or `finished`), printed for the report:
    /// `cargo test -p runos-journal --lib tests::synced_append_cost -- --nocapture`. One sync
    /// per record (as before group commit) against one sync per batch of 64 instructions.
    #[test]
    fn synced_append_cost() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        for batch in [1usize, 64] {
            let (mut j, _) = open(d.path(), &clock);
            let n = 128;
            let syncs0 = j.stats().syncs;
            let start = std::time::Instant::now();
            let mut tags = Vec::new();
            for _ in 0..n {
                let t = Tag::random();
                j.accepted(t, "RUN_COMMAND", &sha(1)).unwrap();
                j.started(t, Some(1)).unwrap();
                if batch == 1 {
                    j.sync_now().unwrap();
                }
                j.finished(t, &reply(t, "a short reply of some sixty bytes, like most"))
                    .unwrap();
                if batch == 1 {
                    j.sync_now().unwrap();
                }
                tags.push(t);
                if tags.len() == batch / 2 || batch == 1 {
                    if let Some(job) = j.sync_job() {
                        j.synced(job.run()).unwrap();
                    }
                    for t in tags.drain(..) {
                        j.acked(t).unwrap();
                    }
                }
            }
            let per = start.elapsed() / n as u32;
            let syncs = j.stats().syncs - syncs0;
            eprintln!(
                "journal, sync every {batch} records: {per:?} per instruction ({n} instructions of 4 records, 2 that must be durable; {syncs} syncs)"
            );
            assert!(syncs >= 1);
            drop(j);
        }
    }

    #[test]
    fn one_sync_covers_every_record_appended_before_it() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (mut j, _) = open(d.path(), &clock);
        assert!(j.sync_job().is_none(), "nothing to sync");
        let syncs = j.stats().syncs;
        let mut lsns = Vec::new();
        for i in 0..10u8 {
            let t = Tag::random();
            j.accepted(t, "RUN_COMMAND", &sha(i)).unwrap();
            lsns.push(j.started(t, None).unwrap().expect("must be durable"));
            if i % 2 == 0 {
                lsns.push(
                    j.finished(t, &reply(t, "r"))
                        .unwrap()
                        .expect("must be durable"),
                );
            }
        }
        assert!(lsns.windows(2).all(|w| w[0] < w[1]));
        assert!(lsns.iter().all(|l| *l > j.durable()));
        let job = j.sync_job().expect("a sync is due");
        assert!(j.sync_job().is_none(), "one job at a time");
        // Appended while the job runs: for the next one.
        let late = Tag::random();
        j.accepted(late, "RUN_COMMAND", &sha(99)).unwrap();
        let late_lsn = j.started(late, None).unwrap().unwrap();
        let done = job.run();
        let durable = j.synced(done).unwrap();
        assert!(
            lsns.iter().all(|l| *l <= durable),
            "one sync for 15 records"
        );
        assert!(late_lsn > durable);
        assert_eq!(j.stats().syncs, syncs + 1);
        let job = j.sync_job().expect("the late record");
        j.synced(job.run()).unwrap();
        assert!(late_lsn <= j.durable());
        assert!(j.sync_job().is_none());
        // A rewrite syncs itself: everything before it is durable.
        let t = Tag::random();
        j.accepted(t, "RUN_COMMAND", &sha(1)).unwrap();
        let lsn = j.started(t, None).unwrap().unwrap();
        j.compact().unwrap();
        assert!(lsn <= j.durable());
        assert!(j.sync_job().is_none());
        let lsn2 = j.finished(t, &reply(t, "after")).unwrap().unwrap();
        assert!(
            lsn2 > j.durable(),
            "positions go on growing after a rewrite"
        );
        assert!(j.sync_now().unwrap() >= lsn2);
    }

    #[test]
    fn sync_modes_decide_which_records_must_be_durable() {
        let clock = TestClock::new();
        for (mode, safe, unsafe_) in [
            (SyncMode::Needed, false, true),
            (SyncMode::Always, true, true),
            (SyncMode::Never, false, false),
        ] {
            let d = tempfile::tempdir().unwrap();
            let limits = Limits {
                sync: mode,
                ..Limits::default()
            };
            let (mut j, _) = open_with(d.path(), &clock, limits);
            for (kind, want) in [("GET_NODE_STATUS", safe), ("RUN_COMMAND", unsafe_)] {
                let t = Tag::random();
                j.accepted(t, kind, &sha(1)).unwrap();
                assert_eq!(
                    j.started(t, None).unwrap().is_some(),
                    want,
                    "{mode:?} {kind}"
                );
                assert_eq!(
                    j.finished(t, &reply(t, "r")).unwrap().is_some(),
                    want,
                    "{mode:?} {kind}"
                );
                assert_eq!(j.sync_job().is_some(), want, "{mode:?} {kind}");
                j.sync_now().unwrap();
                j.syncing = false;
                // `accepted` and `acked` never need a sync.
                j.acked(t).unwrap();
                assert!(j.sync_job().is_none());
            }
        }
    }

    #[test]
    fn replies_are_read_back_from_the_file_across_compactions() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let limits = Limits {
            retention: Duration::from_secs(10),
            ..Limits::default()
        };
        let (mut j, _) = open_with(d.path(), &clock, limits.clone());
        let mut kept = Vec::new();
        let filler = "z".repeat(2000);
        for i in 0..2000 {
            let t = Tag::random();
            // Some over the 4 KiB a first read takes.
            let text = if i % 300 == 0 {
                format!("{i} {filler}{filler}{filler}")
            } else {
                format!("{i} {filler}")
            };
            let r = run(&mut j, t, &text);
            if i % 100 == 0 {
                kept.push((t, r)); // never acknowledged
            } else {
                assert!(j.acked(t).unwrap());
            }
            clock.advance(20);
        }
        // Acknowledged ones expired and the file was compacted by itself, several times: the
        // offsets of the replies kept moved with it.
        let s = j.stats();
        assert!(s.compactions >= 1, "{s:?}");
        assert!(s.entries < 2000, "{s:?}");
        for (t, r) in &kept {
            assert_eq!(j.lookup(t), Lookup::Done(r.clone()));
        }
        assert_eq!(
            j.unacked(),
            kept.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>()
        );
        j.compact().unwrap();
        for (t, r) in &kept {
            assert_eq!(j.lookup(t), Lookup::Done(r.clone()));
            assert_eq!(j.get(t).unwrap().state, EntryState::Finished);
        }
        drop(j);
        let (j, _) = open_with(d.path(), &clock, limits);
        for (t, r) in &kept {
            assert_eq!(j.lookup(t), Lookup::Done(r.clone()));
        }
    }

    #[test]
    fn the_next_expiry_is_the_oldest_ack_plus_the_retention() {
        let d = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let limits = Limits {
            retention: Duration::from_secs(60),
            ..Limits::default()
        };
        let (mut j, _) = open_with(d.path(), &clock, limits);
        assert_eq!(j.next_expiry_ms(), None);
        let (a, b) = (Tag::random(), Tag::random());
        run(&mut j, a, "a");
        run(&mut j, b, "b");
        assert!(j.acked(a).unwrap());
        clock.advance(1000);
        assert!(j.acked(b).unwrap());
        assert_eq!(j.next_expiry_ms(), Some(T0 + 60_000));
        clock.advance(59_000);
        assert_eq!(j.expire(), 1);
        assert_eq!(j.lookup(&a), Lookup::New);
        assert_eq!(j.next_expiry_ms(), Some(T0 + 61_000));
        clock.advance(1000);
        assert_eq!(j.expire(), 1);
        assert_eq!(j.next_expiry_ms(), None);
    }
}
