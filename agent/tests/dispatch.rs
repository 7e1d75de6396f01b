//! Dispatcher behaviour: error codes, backpressure, deadlines, panic isolation, dedup, outbox
//! (each harness gives the dispatcher a journal in its own temporary directory).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dispatch::{Harness, catalog_with_sleeper, cfg, code, instr};
use runos_agent::catalog::{self, Catalog};
use runos_agent::daemon::JOURNAL_POLICY;
use runos_agent::daemon::dispatch::{self, Inbound};
use runos_journal::{Journal, Limits};
use runos_protocol::control::types as ctypes;
use runos_protocol::instructions::types;
use runos_protocol::{Envelope, ErrorCode, MessageType, Tag};
use tokio::sync::{oneshot, watch};

#[tokio::test]
async fn unknown_type_and_unsupported() {
    let mut h = Harness::new(Catalog::new(), cfg(4, 2));
    let e = instr("NOT_A_REAL_TYPE", serde_json::json!({}));
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!(r.tag, e.tag);
    assert_eq!(code(&r), ErrorCode::UnknownType);

    let e = instr(types::GET_NODE_STATUS, serde_json::json!({}));
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!(r.tag, e.tag);
    assert_eq!(code(&r), ErrorCode::Unsupported);
}

#[tokio::test]
async fn bad_base64_and_bad_json_are_bad_payload() {
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    let mut e = instr(types::GET_NODE_STATUS, serde_json::json!({}));
    e.json_b64 = "%%%not-base64".into();
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, code(&r)), (e.tag, ErrorCode::BadPayload));

    let e = Envelope::from_json_text(
        MessageType::new(types::RUN_COMMAND).unwrap(),
        Tag::random(),
        r#"{"argv": ["/bin/true"], "stdin": "topsecret", "bogus": 1"#,
    );
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, code(&r)), (e.tag, ErrorCode::BadPayload));
    assert!(!r.payload_text().unwrap().contains("topsecret"));

    let e = instr(
        types::RUN_COMMAND,
        serde_json::json!({"argv": "not-a-list"}),
    );
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, code(&r)), (e.tag, ErrorCode::BadPayload));
}

#[tokio::test]
async fn node_status_reply() {
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    let e = instr(types::GET_NODE_STATUS, serde_json::json!({}));
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!(r.tag, e.tag);
    assert!(r.is(types::NODE_STATUS));
    let s: runos_protocol::instructions::NodeStatus = r.payload().unwrap();
    assert_eq!(s.agent_version, runos_agent::AGENT_VERSION);
    assert!(!s.node_is_ready);
    assert!(!s.boot_id.is_empty());
}

#[tokio::test]
async fn busy_when_queue_full() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(1, 1));
    let running = instr(types::RUN_COMMAND, serde_json::json!({"ms": 1500}));
    let queued = instr(types::RUN_COMMAND, serde_json::json!({"ms": 0}));
    let refused = instr(types::RUN_COMMAND, serde_json::json!({"ms": 0}));
    h.send(running.clone()).await;
    h.send(queued.clone()).await;
    h.send(refused.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, code(&r)), (refused.tag, ErrorCode::Busy));
    // Busy is not held: the same tag may be sent again later and is run then.
    let r1 = h.reply().await;
    let r2 = h.reply().await;
    assert_eq!((r1.tag, r2.tag), (running.tag, queued.tag));
    assert!(r1.is(ctypes::NO_CONTENT) && r2.is(ctypes::NO_CONTENT));
    h.send(refused.clone()).await;
    let r = h.reply().await;
    assert_eq!(r.tag, refused.tag);
    assert!(r.is(ctypes::NO_CONTENT));
}

#[tokio::test]
async fn deadline_gives_timeout() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(4, 2));
    let e = instr(types::RUN_COMMAND, serde_json::json!({"ms": 60_000})).with_timeout_ms(Some(200));
    let t0 = Instant::now();
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, code(&r)), (e.tag, ErrorCode::Timeout));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn panic_is_internal_and_agent_lives_on() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(4, 2));
    let e = instr(types::RUN_COMMAND, serde_json::json!({"panic": true}));
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, code(&r)), (e.tag, ErrorCode::Internal));
    let e = instr(types::GET_NODE_STATUS, serde_json::json!({}));
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!(r.tag, e.tag);
    assert!(r.is(types::NODE_STATUS));
}

#[tokio::test]
async fn dedup_running_and_completed() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(4, 2));
    let e = instr(types::RUN_COMMAND, serde_json::json!({"ms": 300}));
    h.send(e.clone()).await;
    h.send(e.clone()).await; // running: not started again
    let first = h.reply().await;
    assert_eq!(first.tag, e.tag);
    assert!(
        h.no_reply_within(Duration::from_millis(500)).await,
        "one reply only"
    );
    // Completed and held: the same reply again.
    h.send(e.clone()).await;
    let again = h.reply().await;
    assert_eq!(again, first);
    assert_eq!(h.held().await, vec![first.clone()]);
    // After ACK nothing is held; a late duplicate ACK is dropped.
    h.link.inbound.send(Inbound::Ack(e.tag)).await.unwrap();
    h.link.inbound.send(Inbound::Ack(e.tag)).await.unwrap();
    assert!(h.held().await.is_empty());
}

#[tokio::test]
async fn hundred_concurrent_each_answered_once() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(256, 16));
    let mut want = HashMap::new();
    for i in 0..100 {
        let e = if i % 2 == 0 {
            instr(types::RUN_COMMAND, serde_json::json!({"ms": 20}))
        } else {
            instr(types::GET_NODE_STATUS, serde_json::json!({}))
        };
        want.insert(e.tag, e.kind.clone());
        h.send(e).await;
    }
    let mut got: HashMap<Tag, usize> = HashMap::new();
    for _ in 0..100 {
        let r = h.reply().await;
        let kind = want.get(&r.tag).expect("reply for a tag we sent");
        let expect = if kind == types::RUN_COMMAND {
            ctypes::NO_CONTENT
        } else {
            types::NODE_STATUS
        };
        assert!(r.is(expect), "{} for {}", r.kind, kind);
        *got.entry(r.tag).or_default() += 1;
    }
    assert_eq!(got.len(), 100);
    assert!(got.values().all(|n| *n == 1));
    assert!(h.no_reply_within(Duration::from_millis(300)).await);
    assert_eq!(*h.link.in_flight.borrow(), 0);
}

#[tokio::test]
async fn shutdown_refuses_queued_and_new() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(4, 1));
    let running = instr(types::RUN_COMMAND, serde_json::json!({"ms": 500}));
    let queued = instr(types::RUN_COMMAND, serde_json::json!({"ms": 0}));
    h.send(running.clone()).await;
    h.send(queued.clone()).await;
    let mut flight = h.link.in_flight.clone();
    tokio::time::timeout(Duration::from_secs(5), flight.wait_for(|n| *n == 2))
        .await
        .unwrap()
        .unwrap();
    h.shutdown.send(true).unwrap();
    let r = h.reply().await;
    assert_eq!((r.tag, code(&r)), (queued.tag, ErrorCode::ShuttingDown));
    let late = instr(types::GET_NODE_STATUS, serde_json::json!({}));
    h.send(late.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, code(&r)), (late.tag, ErrorCode::ShuttingDown));
    // The running one finishes and is answered.
    let r = h.reply().await;
    assert_eq!(r.tag, running.tag);
    assert!(r.is(ctypes::NO_CONTENT));
}

#[tokio::test]
async fn control_types_are_never_dispatched() {
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    for t in [ctypes::HEARTBEAT_REPLY, ctypes::ACK, ctypes::WELCOME] {
        h.send(instr(t, serde_json::json!({}))).await;
    }
    assert!(h.no_reply_within(Duration::from_millis(300)).await);
}

/// Every final reply gets one audit line (immediate answers too), `busy` none; `Inbound::Journal`
/// lists the entries newest first and finds one by tag.
#[tokio::test]
async fn audit_lines_and_journal_queries() {
    use runos_agent::daemon::audit::{AuditLog, DEFAULT_MAX_BYTES, FILE};
    use runos_agent::daemon::dispatch::journal_query::JournalQuery;

    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), Limits::default(), JOURNAL_POLICY).unwrap();
    let (shutdown, rx) = watch::channel(false);
    let (link, join) = dispatch::spawn_with_audit(
        Arc::new(catalog_with_sleeper()),
        cfg(0, 1),
        journal,
        Some(AuditLog::new(dir.path(), DEFAULT_MAX_BYTES)),
        rx,
    );
    let mut h = Harness::from_spawned(link, join, shutdown);
    let run = instr(types::RUN_COMMAND, serde_json::json!({"ms": 200}));
    let busy = instr(types::RUN_COMMAND, serde_json::json!({"ms": 0}));
    let unknown = instr("NOT_A_TYPE", serde_json::json!({"secret": "s3cr3t-audit"}));
    h.send(run.clone()).await;
    h.send(busy.clone()).await;
    h.send(unknown.clone()).await;
    let mut replies = HashMap::new();
    for _ in 0..3 {
        let r = h.reply().await;
        replies.insert(r.tag, r);
    }
    assert_eq!(code(&replies[&busy.tag]), ErrorCode::Busy);
    assert_eq!(code(&replies[&unknown.tag]), ErrorCode::UnknownType);
    assert!(replies[&run.tag].is(ctypes::NO_CONTENT));

    let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
    assert!(!text.contains("s3cr3t-audit"), "{text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let by_tag = |t: Tag| {
        lines
            .iter()
            .find(|l| l["tag"] == t.to_string())
            .unwrap_or_else(|| panic!("no line for {t}: {text}"))
    };
    let l = by_tag(unknown.tag);
    assert_eq!(l["outcome"], "unknown_type");
    assert_eq!(l["type"], "NOT_A_TYPE");
    assert!(l["durationMs"].is_null());
    let l = by_tag(run.tag);
    assert_eq!(l["outcome"], ctypes::NO_CONTENT);
    assert_eq!(l["type"], types::RUN_COMMAND);
    assert!(l["durationMs"].as_u64().is_some(), "{l}");
    assert_eq!(l["payloadSha256"], runos_journal::payload_sha256(&run));

    let query = |tag: Option<Tag>, limit: usize| {
        let tx = h.link.inbound.clone();
        async move {
            let (etx, erx) = oneshot::channel();
            tx.send(Inbound::Journal(JournalQuery { tag, limit }, etx))
                .await
                .unwrap();
            erx.await.unwrap()
        }
    };
    let all = query(None, 50).await;
    let tags: Vec<Tag> = all.iter().map(|e| e.tag).collect();
    assert_eq!(
        tags,
        [unknown.tag, run.tag],
        "newest first, busy not journaled"
    );
    assert_eq!(query(None, 1).await.len(), 1);
    let one = query(Some(run.tag), 50).await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].reply_type.as_deref(), Some(ctypes::NO_CONTENT));
    assert!(query(Some(busy.tag), 50).await.is_empty());
}

/// protocol.md §7.3: the deadline runs from acceptance. An instruction whose deadline passes
/// while it waits in the queue is answered `timeout` and never started (measured from its
/// start, it would have run and answered `NO_CONTENT`).
#[tokio::test]
async fn deadline_runs_from_acceptance_not_from_start() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(4, 1));
    let first = instr(types::RUN_COMMAND, serde_json::json!({"ms": 1500}));
    let waiting =
        instr(types::RUN_COMMAND, serde_json::json!({"ms": 0})).with_timeout_ms(Some(300));
    h.send(first.clone()).await;
    h.send(waiting.clone()).await;
    let replies: HashMap<Tag, Envelope> =
        h.replies(2).await.into_iter().map(|r| (r.tag, r)).collect();
    assert!(replies[&first.tag].is(ctypes::NO_CONTENT));
    let r = &replies[&waiting.tag];
    assert_eq!(code(r), ErrorCode::Timeout);
    assert!(
        common::dispatch::error(r)
            .message
            .contains("before the instruction started")
    );
}

/// Replies awaiting ACK are handed to a new session in pages (issue 10, finding 7: a control
/// plane that never ACKs drove the agent's memory far past the journal's bound, because every
/// held reply was copied at once on each reconnect). Pages of any size give the same replies in
/// the same order, skip acknowledged ones, and a page holds one reply past its byte bound at most.
#[tokio::test]
async fn held_replies_come_in_pages_in_order() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(64, 8));
    let mut sent = Vec::new();
    for _ in 0..10 {
        let e = instr(types::RUN_COMMAND, serde_json::json!({"ms": 1}));
        h.send(e.clone()).await;
        sent.push(e.tag);
        h.reply().await;
    }
    h.ack(sent[3]).await;
    let all = h.held().await;
    assert_eq!(all.len(), 9);
    assert!(all.iter().all(|r| r.tag != sent[3]));
    // One reply per page (a bound of one byte), and pages of about two replies.
    assert_eq!(h.held_in_pages(1).await, all);
    assert_eq!(h.held_in_pages(all[0].json_b64.len() + 1).await, all);
}
