//! `Inbound::Snapshot`: what the dispatcher is doing, for `runos status` (through the admin
//! socket). Only tags, instruction type names and times: never a payload.
//!
//! `running` holds only abort handles and cancellation tokens, so the start time and type of each running instruction are
//! noted by `StartLog::note` (one call in `Dispatcher::start`). The log is pruned against
//! `running` at every note and every snapshot, so it never holds more than the running set plus
//! the one being started.

use std::collections::HashMap;
use std::time::SystemTime;

use runos_protocol::Tag;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::Dispatcher;

/// Most instructions listed per list in a snapshot (the counts are always exact).
pub const SNAPSHOT_LIST_MAX: usize = 100;

/// One instruction in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// Its tag.
    pub tag: Tag,
    /// Its instruction type.
    pub kind: String,
    /// When it started (running instructions only).
    pub started_at: Option<SystemTime>,
}

/// Journal statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalStats {
    /// Entries held (not yet acknowledged, or acknowledged within the retention period).
    pub records: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

/// The dispatcher's state at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchSnapshot {
    /// Running instructions (at most [`SNAPSHOT_LIST_MAX`]), oldest first.
    pub running: Vec<TaskInfo>,
    /// How many are running.
    pub running_count: usize,
    /// Queued instructions in queue order (at most [`SNAPSHOT_LIST_MAX`]).
    pub queued: Vec<TaskInfo>,
    /// How many are queued.
    pub queued_count: usize,
    /// Replies held for an ACK.
    pub held_replies: usize,
    /// The journal's size (`None` only in tests that build a snapshot by hand).
    pub journal: Option<JournalStats>,
}

impl DispatchSnapshot {
    /// The dispatcher part of `runos status`.
    pub fn to_json(&self) -> Value {
        let list = |v: &[TaskInfo]| -> Value {
            v.iter()
                .map(|t| {
                    let mut o = json!({"tag": t.tag.to_string(), "type": t.kind});
                    if let Some(s) = t.started_at {
                        o["startedAt"] = json!(crate::util::time::rfc3339(s));
                    }
                    o
                })
                .collect()
        };
        json!({
            "inFlight": list(&self.running),
            "queued": list(&self.queued),
            "counts": {
                "inFlight": self.running_count,
                "queued": self.queued_count,
                "heldReplies": self.held_replies,
            },
            "journal": self.journal.as_ref().map(|j| json!({"records": j.records, "bytes": j.bytes})),
        })
    }
}

/// Type and start time of each running instruction, by tag.
#[derive(Debug, Default)]
pub(super) struct StartLog(HashMap<Tag, (String, SystemTime)>);

impl StartLog {
    /// `tag` of type `kind` starts now; forget whatever is no longer running.
    pub(super) fn note<V>(&mut self, tag: Tag, kind: &str, running: &HashMap<Tag, V>) {
        self.0.retain(|t, _| running.contains_key(t));
        self.0.insert(tag, (kind.to_string(), SystemTime::now()));
    }
}

impl Dispatcher {
    /// Answer `Inbound::Snapshot`.
    pub(super) fn snapshot(&mut self, tx: oneshot::Sender<DispatchSnapshot>) {
        let running_tags: Vec<Tag> = self.running.keys().copied().collect();
        self.started.0.retain(|t, _| self.running.contains_key(t));
        let mut running: Vec<TaskInfo> = running_tags
            .into_iter()
            .map(|tag| match self.started.0.get(&tag) {
                Some((kind, at)) => TaskInfo {
                    tag,
                    kind: kind.clone(),
                    started_at: Some(*at),
                },
                None => TaskInfo {
                    tag,
                    kind: "unknown".into(),
                    started_at: None,
                },
            })
            .collect();
        running.sort_by_key(|t| t.started_at);
        let running_count = running.len();
        running.truncate(SNAPSHOT_LIST_MAX);
        let queued = self
            .queue
            .iter()
            .take(SNAPSHOT_LIST_MAX)
            .map(|q| TaskInfo {
                tag: q.tag,
                kind: q.kind.as_str().to_string(),
                started_at: None,
            })
            .collect();
        let stats = self.journal.stats();
        let _ = tx.send(DispatchSnapshot {
            running,
            running_count,
            queued,
            queued_count: self.queue.len(),
            held_replies: stats.unacked,
            journal: Some(JournalStats {
                records: stats.entries as u64,
                bytes: stats.file_bytes,
            }),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let tag = Tag::random();
        let s = DispatchSnapshot {
            running: vec![TaskInfo {
                tag,
                kind: "RUN_COMMAND".into(),
                started_at: Some(SystemTime::UNIX_EPOCH),
            }],
            running_count: 1,
            queued: vec![TaskInfo {
                tag: Tag::random(),
                kind: "RUN_SCRIPT".into(),
                started_at: None,
            }],
            queued_count: 3,
            held_replies: 2,
            journal: None,
        };
        let j = s.to_json();
        assert_eq!(j["inFlight"][0]["tag"], tag.to_string());
        assert_eq!(j["inFlight"][0]["type"], "RUN_COMMAND");
        assert_eq!(j["inFlight"][0]["startedAt"], "1970-01-01T00:00:00Z");
        assert!(j["queued"][0].get("startedAt").is_none());
        assert_eq!(j["counts"]["queued"], 3);
        assert!(j["journal"].is_null());
    }
}
