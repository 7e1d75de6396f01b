//! `Inbound::Journal`: recent journal entries, or one tag's, for `runos journal` (through the
//! admin socket), and the audit line of each final reply (see `audit.rs`). Only tags, types,
//! payload digests, states, times and reply types or error codes: never a payload or a reply
//! body.

use std::time::{Duration, UNIX_EPOCH};

use runos_protocol::{Envelope, Tag};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::Dispatcher;
use crate::daemon::audit::Record;
use runos_journal::EntryView;

/// Default number of entries `runos journal` shows.
pub const DEFAULT_LIMIT: usize = 50;
/// Most entries one query returns.
pub const MAX_LIMIT: usize = 1000;

/// What `runos journal` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalQuery {
    /// One tag (its entry, or nothing), or `None` for the most recent entries.
    pub tag: Option<Tag>,
    /// Most entries returned (clamped to 1..=[`MAX_LIMIT`]).
    pub limit: usize,
}

fn at(ms: Option<u64>) -> Value {
    ms.map_or(Value::Null, |ms| {
        json!(crate::util::time::rfc3339(
            UNIX_EPOCH + Duration::from_millis(ms)
        ))
    })
}

/// One entry as `runos journal --json` prints it.
pub fn entry_json(e: &EntryView) -> Value {
    json!({
        "tag": e.tag.to_string(),
        "type": e.kind,
        "payloadSha256": e.payload_sha256,
        "state": e.state.as_str(),
        "acceptedAt": at(Some(e.accepted_ms)),
        "startedAt": at(e.started_ms),
        "finishedAt": at(e.finished_ms),
        "ackedAt": at(e.acked_ms),
        "durationMs": e.duration_ms,
        "replyType": e.reply_type,
        "errorCode": e.error_code,
    })
}

impl Dispatcher {
    /// Answer `Inbound::Journal`: newest first.
    pub(super) fn journal_query(&self, q: JournalQuery, tx: oneshot::Sender<Vec<EntryView>>) {
        let entries = match q.tag {
            Some(tag) => self.journal.get(&tag).into_iter().collect(),
            None => self.journal.recent(q.limit.clamp(1, MAX_LIMIT)),
        };
        let _ = tx.send(entries);
    }

    /// Write the audit line of the final reply `reply` (already recorded in the journal).
    pub(super) fn audit(&mut self, reply: &Envelope) {
        if let Some(audit) = self.audit.as_mut() {
            let view = self.journal.get(&reply.tag);
            audit.record(&Record::for_reply(view.as_ref(), reply));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runos_journal::EntryState;

    #[test]
    fn json_shape() {
        let tag = Tag::random();
        let e = EntryView {
            tag,
            kind: "RUN_COMMAND".into(),
            payload_sha256: "ab".repeat(32),
            state: EntryState::Finished,
            accepted_ms: 0,
            started_ms: Some(1000),
            finished_ms: Some(2000),
            acked_ms: None,
            duration_ms: Some(1000),
            pgid: None,
            reply_type: Some("ERROR".into()),
            error_code: Some("timeout".into()),
        };
        let j = entry_json(&e);
        assert_eq!(j["tag"], tag.to_string());
        assert_eq!(j["state"], "finished");
        assert_eq!(j["acceptedAt"], "1970-01-01T00:00:00Z");
        assert_eq!(j["finishedAt"], "1970-01-01T00:00:02Z");
        assert!(j["ackedAt"].is_null());
        assert_eq!(j["durationMs"], 1000);
        assert_eq!(j["errorCode"], "timeout");
    }
}
