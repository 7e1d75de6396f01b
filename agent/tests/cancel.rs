//! `CANCEL` (protocol §7.7) through the dispatcher: queued and running targets, full slots,
//! unknown and finished tags, bad payloads, dedup of the `CANCEL` itself, and the process group
//! of a cancelled `RUN_COMMAND` dying.

mod common;

use std::time::Duration;

use common::dispatch::{Harness, cfg, error, instr};
use runos_agent::catalog::{self, Catalog};
use runos_protocol::control::types as ctypes;
use runos_protocol::instructions::types;
use runos_protocol::{Envelope, ErrorCode, MessageType, Tag};

/// The standard catalog with `RUN_COMMAND` replaced by the shared sleeper (timeouts 120 s).
fn catalog_with_sleeper() -> Catalog {
    common::dispatch::catalog_with_sleeper_timeouts(
        Duration::from_secs(120),
        Duration::from_secs(120),
    )
}

fn cancel(target: Tag) -> Envelope {
    instr(
        types::CANCEL,
        serde_json::json!({"tag": target.to_string()}),
    )
}

fn find(replies: &[Envelope], tag: Tag) -> &Envelope {
    let mut it = replies.iter().filter(|r| r.tag == tag);
    let r = it.next().unwrap_or_else(|| panic!("no reply for {tag}"));
    assert!(it.next().is_none(), "two replies for {tag}");
    r
}

fn is_no_content(env: &Envelope) -> bool {
    env.is(ctypes::NO_CONTENT) && env.payload_text().unwrap() == "{}"
}

/// Poll `cond` (without blocking the runtime) until it holds or `limit` passes.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `(pid, state, pgrp)` of every process, from `/proc/*/stat`.
fn processes() -> Vec<(i32, char, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; comm may contain spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(pgrp)) = (
            f.first().and_then(|s| s.chars().next()),
            f.get(2).and_then(|p| p.parse().ok()),
        ) else {
            continue;
        };
        out.push((pid, state, pgrp));
    }
    out
}

/// Live (not zombie) members of the process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, state, pgrp)| *pgrp == pgid && *state != 'Z' && *state != 'X')
        .map(|(pid, _, _)| pid)
        .collect()
}

/// The pid of the live process whose command line contains `marker`.
fn pid_with_marker(marker: &str) -> Option<i32> {
    processes()
        .into_iter()
        .filter(|(_, state, _)| *state != 'Z' && *state != 'X')
        .find(|(pid, _, _)| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .map(|(pid, _, _)| pid)
}

/// `RUN_COMMAND sh -c 'sleep 1000 & sleep 1000 & wait' MARKER` (the marker is `$0`, so the
/// shell can be found in `/proc`), and the marker.
fn two_sleeps() -> (Envelope, String) {
    let marker = format!("runos-cancel-test-{}", Tag::random());
    let env = instr(
        types::RUN_COMMAND,
        serde_json::json!({"argv": ["sh", "-c", "sleep 1000 & sleep 1000 & wait", marker]}),
    );
    (env, marker)
}

/// Wait until the shell of `marker` and its two sleeps run; returns the group id.
async fn wait_for_group(marker: &str) -> i32 {
    let mut pgid = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            pgid = pid_with_marker(marker);
            pgid.is_some_and(|g| group_members(g).len() >= 3)
        })
        .await,
        "the shell and its two sleeps did not start (group {pgid:?})"
    );
    let pgid = pgid.unwrap();
    assert!(group_members(pgid).contains(&pgid), "the shell leads it");
    pgid
}

#[tokio::test]
async fn cancel_queued_answers_cancelled_and_it_never_starts() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(4, 1));
    let running = instr(types::RUN_COMMAND, serde_json::json!({"ms": 60_000}));
    let queued = instr(types::RUN_COMMAND, serde_json::json!({"ms": 0}));
    h.send(running.clone()).await;
    h.send(queued.clone()).await;
    h.wait_in_flight(2).await;

    let c = cancel(queued.tag);
    h.send(c.clone()).await;
    let rs = h.replies(2).await;
    let target = find(&rs, queued.tag);
    let p = error(target);
    assert_eq!(p.code, ErrorCode::Cancelled);
    assert_eq!(
        p.message,
        format!("cancelled by CANCEL {} before it started", c.tag)
    );
    assert!(is_no_content(find(&rs, c.tag)));
    h.wait_in_flight(1).await;
    // The running one is untouched; the cancelled one is never run (no second reply).
    assert!(h.no_reply_within(Duration::from_millis(300)).await);

    // Both replies are held; a redelivered target gets its `cancelled` reply again.
    let held = h.held().await;
    assert!(held.contains(target) && held.contains(find(&rs, c.tag)));
    h.send(queued.clone()).await;
    assert_eq!(&h.reply().await, target);
}

#[tokio::test]
async fn cancel_running_command_kills_its_whole_group_and_answers_once() {
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    let (run, marker) = two_sleeps();
    h.send(run.clone()).await;
    let pgid = wait_for_group(&marker).await;

    let c = cancel(run.tag);
    h.send(c.clone()).await;
    let rs = h.replies(2).await;
    let p = error(find(&rs, run.tag));
    assert_eq!(p.code, ErrorCode::Cancelled);
    assert_eq!(
        p.message,
        format!("cancelled by CANCEL {}; its processes were killed", c.tag)
    );
    assert!(is_no_content(find(&rs, c.tag)));

    let mut left = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            left = group_members(pgid);
            left.is_empty()
        })
        .await,
        "processes of group {pgid} survived the cancel: {left:?}"
    );
    // The aborted task's own completion is never answered.
    assert!(h.no_reply_within(Duration::from_millis(500)).await);
    h.wait_in_flight(0).await;
}

#[tokio::test]
async fn cancel_works_when_every_slot_and_the_queue_are_full() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(1, 1));
    let running = instr(types::RUN_COMMAND, serde_json::json!({"ms": 60_000}));
    let queued = instr(types::RUN_COMMAND, serde_json::json!({"ms": 0}));
    h.send(running.clone()).await;
    h.send(queued.clone()).await;
    h.wait_in_flight(2).await;
    // A third instruction is refused: the agent is full.
    let refused = instr(types::RUN_COMMAND, serde_json::json!({"ms": 0}));
    h.send(refused.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, error(&r).code), (refused.tag, ErrorCode::Busy));

    // CANCEL is not refused: it takes neither a queue place nor a slot.
    let c = cancel(running.tag);
    h.send(c.clone()).await;
    // The cancelled one, the CANCEL, and the queued one, which now gets the slot.
    let rs = h.replies(3).await;
    assert_eq!(error(find(&rs, running.tag)).code, ErrorCode::Cancelled);
    assert!(is_no_content(find(&rs, c.tag)));
    assert!(find(&rs, queued.tag).is(ctypes::NO_CONTENT));
    h.wait_in_flight(0).await;
    assert!(h.no_reply_within(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn cancel_unknown_or_itself_is_no_content() {
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    let c = cancel(Tag::random());
    h.send(c.clone()).await;
    let r = h.reply().await;
    assert_eq!(r.tag, c.tag);
    assert!(is_no_content(&r));

    let tag = Tag::random();
    let own = Envelope::new(
        MessageType::new(types::CANCEL).unwrap(),
        tag,
        &serde_json::json!({"tag": tag.to_string()}),
    );
    h.send(own).await;
    let r = h.reply().await;
    assert_eq!(r.tag, tag);
    assert!(is_no_content(&r));
    assert!(h.no_reply_within(Duration::from_millis(200)).await);
    assert_eq!(*h.link.in_flight.borrow(), 0);
}

#[tokio::test]
async fn cancel_finished_leaves_its_reply_unchanged() {
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    let e = instr(types::GET_NODE_STATUS, serde_json::json!({}));
    h.send(e.clone()).await;
    let original = h.reply().await;
    assert!(original.is(types::NODE_STATUS));

    let c = cancel(e.tag);
    h.send(c.clone()).await;
    let r = h.reply().await;
    assert_eq!(r.tag, c.tag);
    assert!(is_no_content(&r));
    assert!(h.no_reply_within(Duration::from_millis(200)).await);
    // Redelivered, the target still gets its original reply.
    h.send(e.clone()).await;
    assert_eq!(h.reply().await, original);
    assert!(h.held().await.contains(&original));
}

#[tokio::test]
async fn bad_cancel_payload_is_bad_payload() {
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    for payload in [
        serde_json::json!({"tag": "not-a-uuid"}),
        serde_json::json!({"tag": Tag::random().to_string(), "extra": 1}),
        serde_json::json!({}),
        serde_json::json!("hunter2"),
    ] {
        let e = instr(types::CANCEL, payload);
        h.send(e.clone()).await;
        let r = h.reply().await;
        assert_eq!(r.tag, e.tag);
        let p = error(&r);
        assert_eq!(p.code, ErrorCode::BadPayload);
        assert!(p.message.starts_with("CANCEL: "), "{}", p.message);
        assert!(!p.message.contains("hunter2") && !p.message.contains("not-a-uuid"));
    }
    let mut e = cancel(Tag::random());
    e.json_b64 = "%%%".into();
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, error(&r).code), (e.tag, ErrorCode::BadPayload));
}

#[tokio::test]
async fn redelivered_cancel_gets_its_stored_reply_and_cancels_nothing_more() {
    let mut h = Harness::new(catalog_with_sleeper(), cfg(4, 1));
    let running = instr(types::RUN_COMMAND, serde_json::json!({"ms": 60_000}));
    let queued = instr(types::RUN_COMMAND, serde_json::json!({"ms": 0}));
    h.send(running.clone()).await;
    h.send(queued.clone()).await;
    h.wait_in_flight(2).await;

    let c = cancel(queued.tag);
    h.send(c.clone()).await;
    let rs = h.replies(2).await;
    let first = find(&rs, c.tag).clone();
    assert!(is_no_content(&first));
    h.send(c.clone()).await;
    assert_eq!(h.reply().await, first);
    assert!(h.no_reply_within(Duration::from_millis(300)).await);
    h.wait_in_flight(1).await;
}

/// A command that writes `term` to `marker` when it gets SIGTERM and then exits, so a test can
/// tell a graceful stop from a SIGKILL.
fn traps_term(marker: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "argv": ["/bin/sh", "-c",
            "trap 'echo term > \"$0\"; exit 0' TERM; echo ready > \"$0.ready\"; while :; do sleep 0.05; done",
            marker],
        "timeoutSecs": 600,
    })
}

/// CANCEL ends a running command gracefully (issue 11): SIGTERM first, so a tool can clean up,
/// and SIGKILL only after the grace. Before, the process group got SIGKILL at once.
#[tokio::test]
async fn cancel_gives_the_processes_sigterm_first() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    let run = instr(types::RUN_COMMAND, traps_term(&marker));
    h.send(run.clone()).await;
    let ready = dir.path().join("marker.ready");
    assert!(eventually(Duration::from_secs(20), || ready.exists()).await);
    let c = cancel(run.tag);
    h.send(c.clone()).await;
    let rs = h.replies(2).await;
    assert_eq!(error(find(&rs, run.tag)).code, ErrorCode::Cancelled);
    assert!(
        eventually(Duration::from_secs(20), || std::fs::read_to_string(&marker)
            .is_ok_and(|t| t == "term\n"))
        .await,
        "the command never saw SIGTERM"
    );
    h.wait_in_flight(0).await;
}

/// A command whose instruction deadline passes is stopped the same way: SIGTERM first, then the
/// `timeout` reply once it is gone. (For `RUN_COMMAND` the executor's `Ctx::run` ends the tree
/// just before the deadline; the dispatcher's own stop at the deadline, SIGTERM and then abort
/// after the grace, covers executors that do not.)
#[tokio::test]
async fn the_deadline_gives_the_processes_sigterm_first() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    let run = instr(types::RUN_COMMAND, traps_term(&marker)).with_timeout_ms(Some(1500));
    h.send(run.clone()).await;
    let r = h.reply().await;
    assert_eq!((r.tag, error(&r).code), (run.tag, ErrorCode::Timeout));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "term\n");
}
