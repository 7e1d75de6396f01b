//! After-ACK steps: the step runs only once the reply is acknowledged, exactly once, and a crash
//! between the ACK and the step (the dispatcher dropped without running it) runs it once at the
//! next start.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::dispatch::{Harness, cfg, instr};
use runos_agent::catalog::{self, Catalog, Reply};
use runos_agent::daemon::JOURNAL_POLICY;
use runos_agent::daemon::dispatch::Inbound;
use runos_executors::{AfterAck, Lane, Settings};
use runos_journal::{Journal, Limits};
use runos_protocol::control::types as ctypes;
use runos_protocol::instructions::types;
use runos_protocol::{Envelope, Tag};
use tokio::sync::oneshot;

/// The standard registry with `RUN_COMMAND` replaced by an executor that answers `NO_CONTENT`
/// and asks for the step `count`, which adds one to `runs`. Steps are stored under `root`.
fn registry(root: &Path, runs: Arc<AtomicUsize>) -> Catalog {
    let mut c = catalog::standard();
    c.set_state_root(root.to_path_buf());
    c.register_raw_reply(
        types::RUN_COMMAND,
        Settings::new(Duration::from_secs(60), Lane::Pool),
        Arc::new(|ctx, _env| {
            Box::pin(async move {
                Ok(Reply {
                    envelope: Envelope::with_type(
                        ctypes::NO_CONTENT,
                        ctx.tag,
                        &serde_json::json!({}),
                    ),
                    after_ack: Some(AfterAck {
                        step: "count".into(),
                        params: serde_json::json!({"by": 1}),
                    }),
                })
            })
        }),
    );
    c.register_step("count", move |_ctx, params| {
        let runs = runs.clone();
        async move {
            let by = params["by"].as_u64().ok_or("no `by`")? as usize;
            runs.fetch_add(by, Ordering::SeqCst);
            Ok(())
        }
    });
    c
}

fn step_file(root: &Path, tag: Tag) -> PathBuf {
    root.join("run_command")
        .join("after-ack")
        .join(format!("{tag}.json"))
}

/// Wait (real time, at most 10 s) until `cond` holds.
async fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// A round trip through the dispatcher: everything sent before it has been handled.
async fn settle(h: &Harness) {
    let (tx, rx) = oneshot::channel();
    h.link.inbound.send(Inbound::Snapshot(tx)).await.unwrap();
    rx.await.unwrap();
}

struct Dirs {
    _tmp: tempfile::TempDir,
    journal: PathBuf,
    root: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    Dirs {
        journal: tmp.path().join("state"),
        root: tmp.path().join("state").join("executors"),
        _tmp: tmp,
    }
}

#[tokio::test]
async fn the_step_runs_after_the_ack_and_only_once() {
    let d = dirs();
    let runs = Arc::new(AtomicUsize::new(0));
    let start = || {
        Harness::start(
            &d.journal,
            registry(&d.root, runs.clone()),
            cfg(4, 2),
            Limits::default(),
        )
        .0
    };
    let mut h = start();
    let e = instr(types::RUN_COMMAND, serde_json::json!({"argv": ["true"]}));
    h.send(e.clone()).await;
    let r = h.reply().await;
    assert!(r.is(ctypes::NO_CONTENT), "{}", r.kind);
    // Stored before the reply was sent; not run before the ACK.
    assert!(step_file(&d.root, e.tag).exists());
    settle(&h).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    h.ack(e.tag).await;
    assert!(wait_for(|| runs.load(Ordering::SeqCst) == 1).await);
    assert!(wait_for(|| !step_file(&d.root, e.tag).exists()).await);
    // A duplicate ACK, then a restart: nothing runs again.
    h.ack(e.tag).await;
    settle(&h).await;
    h.stop().await;
    let h = start();
    settle(&h).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    h.stop().await;
}

#[tokio::test]
async fn a_crash_between_the_ack_and_the_step_runs_it_once_at_the_next_start() {
    let d = dirs();
    let runs = Arc::new(AtomicUsize::new(0));
    let start = || {
        Harness::start(
            &d.journal,
            registry(&d.root, runs.clone()),
            cfg(4, 2),
            Limits::default(),
        )
        .0
    };
    let mut h = start();
    let acked = instr(types::RUN_COMMAND, serde_json::json!({"argv": ["true"]}));
    let waiting = instr(types::RUN_COMMAND, serde_json::json!({"argv": ["true"]}));
    h.send(acked.clone()).await;
    h.send(waiting.clone()).await;
    h.replies(2).await;
    // kill -9: the dispatcher is gone; the ACK of `acked` reached the journal, its step never ran.
    h.stop().await;
    {
        let (mut j, _) = Journal::open(&d.journal, Limits::default(), JOURNAL_POLICY).unwrap();
        assert!(j.acked(acked.tag).unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    // The next start runs the acknowledged reply's step once; the other waits for its ACK.
    let h = start();
    assert!(wait_for(|| runs.load(Ordering::SeqCst) == 1).await);
    assert!(wait_for(|| !step_file(&d.root, acked.tag).exists()).await);
    assert!(step_file(&d.root, waiting.tag).exists());
    settle(&h).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    h.ack(waiting.tag).await;
    assert!(wait_for(|| runs.load(Ordering::SeqCst) == 2).await);
    assert!(wait_for(|| !step_file(&d.root, waiting.tag).exists()).await);
    h.stop().await;

    // And never again.
    let h = start();
    settle(&h).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    h.stop().await;
}

#[tokio::test]
async fn a_step_whose_reply_was_never_stored_or_is_unknown_is_dropped() {
    let d = dirs();
    let runs = Arc::new(AtomicUsize::new(0));
    // A step file for a tag the journal answered otherwise (cut short while running), and one
    // for a tag it never held.
    let (mut j, _) = Journal::open(&d.journal, Limits::default(), JOURNAL_POLICY).unwrap();
    let e = instr(types::RUN_COMMAND, serde_json::json!({"argv": ["true"]}));
    j.accepted(
        e.tag,
        types::RUN_COMMAND,
        &runos_journal::payload_sha256(&e),
    )
    .unwrap();
    j.started(e.tag, None).unwrap();
    drop(j);
    runos_executors::after_ack::save(
        &d.root.join("run_command"),
        &runos_executors::after_ack::PendingStep {
            tag: e.tag,
            kind: types::RUN_COMMAND.into(),
            reply_type: ctypes::NO_CONTENT.into(),
            step: AfterAck {
                step: "count".into(),
                params: serde_json::json!({"by": 1}),
            },
        },
    )
    .unwrap();
    let unknown = Tag::random();
    runos_executors::after_ack::save(
        &d.root.join("run_command"),
        &runos_executors::after_ack::PendingStep {
            tag: unknown,
            kind: types::RUN_COMMAND.into(),
            reply_type: ctypes::NO_CONTENT.into(),
            step: AfterAck {
                step: "count".into(),
                params: serde_json::json!({"by": 1}),
            },
        },
    )
    .unwrap();
    // Recovery answers the tag `interrupted`: the step's reply was never stored.
    let (h, _) = Harness::start(
        &d.journal,
        registry(&d.root, runs.clone()),
        cfg(4, 2),
        Limits::default(),
    );
    settle(&h).await;
    assert!(!step_file(&d.root, e.tag).exists());
    assert!(!step_file(&d.root, unknown).exists());
    h.ack(e.tag).await;
    settle(&h).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    h.stop().await;
}
