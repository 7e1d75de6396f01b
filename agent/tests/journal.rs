//! The dispatcher with its durable journal: redelivered tags are answered from the journal
//! without running again, across a restart of the dispatcher too; an instruction cut short by a
//! "crash" is answered `interrupted` and never re-run; a full journal answers `busy`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::dispatch::{Harness, catalog_with_run_command, cfg, code, instr};
use runos_agent::catalog::{Catalog, ExecFn};
use runos_agent::daemon::JOURNAL_POLICY;
use runos_agent::daemon::dispatch::{self, Inbound};
use runos_journal::{self as journal, Journal, Limits, Lookup};
use runos_protocol::control::types as ctypes;
use runos_protocol::instructions::types;
use runos_protocol::{Envelope, ErrorCode, MessageType, Tag};

/// A RUN_COMMAND executor that counts its runs, sleeps the payload's `ms` and answers with the
/// run number (so that a second execution would give a different reply).
fn counting(runs: Arc<AtomicUsize>) -> Catalog {
    let exec: ExecFn = Arc::new(move |ctx, env: Envelope| {
        let runs = runs.clone();
        Box::pin(async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let v: serde_json::Value = env.payload().map_err(|e| {
                runos_protocol::instructions::BadPayload::from(e).to_error_payload()
            })?;
            let ms = v.get("ms").and_then(|m| m.as_u64()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Envelope::with_type(
                ctypes::NO_CONTENT,
                ctx.tag,
                &serde_json::json!({ "run": n }),
            ))
        })
    });
    catalog_with_run_command(exec, Duration::from_secs(30), Duration::from_secs(60))
}

fn run_command(ms: u64) -> Envelope {
    instr(types::RUN_COMMAND, serde_json::json!({ "ms": ms }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_tag_twice_runs_once_and_gets_two_identical_replies() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (mut a, _) = Harness::start(
        dir.path(),
        counting(runs.clone()),
        cfg(4, 1),
        Limits::default(),
    );
    let e = run_command(300);
    a.send(e.clone()).await;
    a.send(e.clone()).await; // still running: no second execution, no second reply now
    let first = a.reply().await;
    assert_eq!(first.tag, e.tag);
    assert!(first.is(ctypes::NO_CONTENT));
    assert!(a.no_reply_within(Duration::from_millis(400)).await);
    // Completed: the stored reply again, byte for byte.
    a.send(e.clone()).await;
    let second = a.reply().await;
    assert_eq!(second, first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // HELLO would list it; WELCOME would resend it; after the ACK neither.
    assert_eq!(a.pending_tags().await, vec![e.tag]);
    assert_eq!(a.held().await, vec![first.clone()]);
    a.ack(e.tag).await;
    assert!(a.held().await.is_empty());
    assert!(a.pending_tags().await.is_empty());
    // Acknowledged but within retention: still answered from the journal.
    a.send(e.clone()).await;
    assert_eq!(a.reply().await, first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_tags_survive_a_restart_of_the_dispatcher() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (mut a, _) = Harness::start(
        dir.path(),
        counting(runs.clone()),
        cfg(4, 1),
        Limits::default(),
    );
    let (acked, unacked) = (run_command(0), run_command(0));
    a.send(acked.clone()).await;
    let r_acked = a.reply().await;
    a.send(unacked.clone()).await;
    let r_unacked = a.reply().await;
    a.ack(acked.tag).await;
    // Immediate answers are journaled too.
    let unknown = Envelope::new(
        MessageType::new("NOT_A_REAL_TYPE").unwrap(),
        Tag::random(),
        &serde_json::json!({}),
    );
    a.send(unknown.clone()).await;
    let r_unknown = a.reply().await;
    assert_eq!(code(&r_unknown), ErrorCode::UnknownType);
    a.stop().await;

    let (mut a, rec) = Harness::start(
        dir.path(),
        counting(runs.clone()),
        cfg(4, 1),
        Limits::default(),
    );
    assert_eq!(rec, journal::Recovery::default());
    // The replies not acknowledged wait for the next WELCOME, oldest first.
    assert_eq!(a.held().await, vec![r_unacked.clone(), r_unknown.clone()]);
    for (e, r) in [
        (&acked, &r_acked),
        (&unacked, &r_unacked),
        (&unknown, &r_unknown),
    ] {
        a.send(e.clone()).await;
        assert_eq!(&a.reply().await, r);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_but_not_finished_before_a_crash_is_interrupted_and_never_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let e = run_command(0);
    let queued = run_command(0);
    {
        // The previous run: accepted and started, then the crash (no `finished`).
        let (mut j, _) = Journal::open(dir.path(), Limits::default(), JOURNAL_POLICY).unwrap();
        j.accepted(e.tag, types::RUN_COMMAND, &journal::payload_sha256(&e))
            .unwrap();
        j.started(e.tag, None).unwrap();
        j.accepted(
            queued.tag,
            types::RUN_COMMAND,
            &journal::payload_sha256(&queued),
        )
        .unwrap();
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let (mut a, rec) = Harness::start(
        dir.path(),
        counting(runs.clone()),
        cfg(4, 1),
        Limits::default(),
    );
    assert_eq!(rec.interrupted.len(), 1);
    assert_eq!(rec.interrupted[0].tag, e.tag);
    assert_eq!(rec.never_started, vec![queued.tag]);
    let held = a.held().await;
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].tag, code(&held[0])),
        (e.tag, ErrorCode::Interrupted)
    );
    assert_eq!(a.pending_tags().await, vec![e.tag]);
    // The control plane redelivers it: the same `interrupted`, nothing run.
    a.send(e.clone()).await;
    assert_eq!(a.reply().await, held[0]);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // The one that never started is new again: it runs, once.
    a.send(queued.clone()).await;
    let r = a.reply().await;
    assert_eq!(r.tag, queued.tag);
    assert!(r.is(ctypes::NO_CONTENT));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_tags_refused_at_shutdown_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (mut a, _) = Harness::start(
        dir.path(),
        counting(runs.clone()),
        cfg(4, 1),
        Limits::default(),
    );
    let (running, queued) = (run_command(300), run_command(0));
    a.send(running.clone()).await;
    a.send(queued.clone()).await;
    let mut flight = a.link.in_flight.clone();
    tokio::time::timeout(Duration::from_secs(5), flight.wait_for(|n| *n == 2))
        .await
        .unwrap()
        .unwrap();
    a.shutdown.send(true).unwrap();
    let r = a.reply().await;
    assert_eq!((r.tag, code(&r)), (queued.tag, ErrorCode::ShuttingDown));
    // Not journaled: the same tag, sent again, is refused again (not answered from the journal).
    a.send(queued.clone()).await;
    let r = a.reply().await;
    assert_eq!((r.tag, code(&r)), (queued.tag, ErrorCode::ShuttingDown));
    let r = a.reply().await;
    assert_eq!(r.tag, running.tag);
    a.stop().await;

    // The next run knows nothing of it: the redelivery runs it.
    let (j, rec) = Journal::open(dir.path(), Limits::default(), JOURNAL_POLICY).unwrap();
    assert_eq!(j.lookup(&queued.tag), Lookup::New);
    assert!(matches!(j.lookup(&running.tag), Lookup::Done(_)));
    // (`forget` writes nothing: the file still says "accepted", which an open forgets too.)
    assert!(rec.interrupted.is_empty());
}

#[tokio::test]
async fn a_full_journal_answers_busy_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let limits = Limits {
        max_entries: 1,
        ..Limits::default()
    };
    let (mut a, _) = Harness::start(dir.path(), counting(runs.clone()), cfg(4, 1), limits);
    let (first, second) = (run_command(0), run_command(0));
    a.send(first.clone()).await;
    let r = a.reply().await;
    assert!(r.is(ctypes::NO_CONTENT));
    a.send(second.clone()).await;
    let r = a.reply().await;
    assert_eq!((r.tag, code(&r)), (second.tag, ErrorCode::Busy));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The ACK makes room; busy was not journaled, so the same tag now runs.
    a.ack(first.tag).await;
    a.send(second.clone()).await;
    let r = a.reply().await;
    assert_eq!(r.tag, second.tag);
    assert!(r.is(ctypes::NO_CONTENT));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Secret replies (the catalog's `secret_reply`): discarded from the journal once acknowledged.

const SECRET: &str = "kubeadm-t0ken.s3cr3tvalue0123-CERTKEY-7f3a9c";

/// An executor for `kind` that counts its runs and answers `reply_kind` with [`SECRET`] in it.
fn secret_catalog(runs: Arc<AtomicUsize>) -> Catalog {
    let mut c = runos_agent::catalog::standard();
    for (kind, reply_kind) in [
        (types::GET_CLUSTER_JOIN_CMD, types::CLUSTER_JOIN_CMD),
        (types::RUN_REMOTE_SCRIPT, types::RUN_REMOTE_SCRIPT_RESPONSE),
    ] {
        let runs = runs.clone();
        let exec: ExecFn = Arc::new(move |ctx, _env: Envelope| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                Ok(Envelope::with_type(
                    reply_kind,
                    ctx.tag,
                    &serde_json::json!({ "joinCmd": format!("kubeadm join --token {SECRET}"), "run": n }),
                ))
            })
        });
        c.register_raw(kind, Duration::from_secs(30), Duration::from_secs(60), exec);
    }
    c
}

/// Whether the journal file holds the secret, as is or inside base64 (at any alignment).
fn journal_holds_secret(dir: &std::path::Path) -> bool {
    use base64::Engine as _;
    let bytes = std::fs::read(dir.join(journal::LOG_FILE)).unwrap();
    let mut forms = vec![SECRET.as_bytes().to_vec()];
    for k in 0..3 {
        let part = &SECRET.as_bytes()[k..];
        let part = &part[..part.len() / 3 * 3];
        forms.push(
            base64::engine::general_purpose::STANDARD
                .encode(part)
                .into_bytes(),
        );
    }
    forms
        .iter()
        .any(|f| bytes.windows(f.len()).any(|w| w == f.as_slice()))
}

fn join_cmd() -> Envelope {
    instr(
        types::GET_CLUSTER_JOIN_CMD,
        serde_json::json!({ "asCp": true }),
    )
}

fn remote_script() -> Envelope {
    instr(
        types::RUN_REMOTE_SCRIPT,
        serde_json::json!({ "script": "join.sh", "params": {}, "runInBackground": false }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reply_is_discarded_after_its_ack_and_a_redelivery_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (mut a, _) = Harness::start(
        dir.path(),
        secret_catalog(runs.clone()),
        cfg(4, 1),
        Limits::default(),
    );
    let script = remote_script();
    a.send(script.clone()).await;
    let first = a.reply().await;
    assert!(first.is(types::RUN_REMOTE_SCRIPT_RESPONSE));
    // Until the ACK the reply is kept whole (it may have to be resent) ...
    assert!(journal_holds_secret(dir.path()));
    a.send(script.clone()).await;
    assert_eq!(a.reply().await, first);
    a.ack(script.tag).await;
    // ... and once the ACK is handled (the next message is answered after it), it is gone.
    assert!(a.held().await.is_empty());
    assert!(!journal_holds_secret(dir.path()));
    // A redelivery: `reply_discarded`, nothing run.
    a.send(script.clone()).await;
    let r = a.reply().await;
    assert_eq!((r.tag, code(&r)), (script.tag, ErrorCode::ReplyDiscarded));
    let message = common::dispatch::error(&r).message;
    assert!(message.contains("RUN_REMOTE_SCRIPT_RESPONSE"), "{message}");
    assert!(!message.contains(SECRET));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Not journaled: nothing awaits an ACK.
    assert!(a.pending_tags().await.is_empty());

    // GET_CLUSTER_JOIN_CMD is safe to re-run: a redelivery after the discard runs it afresh.
    let join = join_cmd();
    a.send(join.clone()).await;
    let r1 = a.reply().await;
    a.ack(join.tag).await;
    assert!(a.held().await.is_empty());
    assert!(!journal_holds_secret(dir.path()));
    a.send(join.clone()).await;
    let r2 = a.reply().await;
    assert!(r2.is(types::CLUSTER_JOIN_CMD));
    assert_ne!(r2, r1, "a fresh run");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(a.held().await, vec![r2]);
    a.ack(join.tag).await;
    assert!(a.held().await.is_empty());
    a.stop().await;
    assert!(!journal_holds_secret(dir.path()));

    // After a restart: the same answers.
    let (mut a, rec) = Harness::start(
        dir.path(),
        secret_catalog(runs.clone()),
        cfg(4, 1),
        Limits::default(),
    );
    assert_eq!(rec, journal::Recovery::default());
    a.send(script.clone()).await;
    assert_eq!(code(&a.reply().await), ErrorCode::ReplyDiscarded);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_ack_and_the_discard_is_completed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (mut a, _) = Harness::start(
        dir.path(),
        secret_catalog(runs.clone()),
        cfg(4, 1),
        Limits::default(),
    );
    let script = remote_script();
    a.send(script.clone()).await;
    a.reply().await;
    // The rewrite that discards the reply fails (a directory stands where its temporary file
    // goes): the ACK is appended to the file, which keeps the reply.
    let tmp = dir.path().join(journal::TMP_FILE);
    std::fs::create_dir(&tmp).unwrap();
    a.ack(script.tag).await;
    assert!(a.held().await.is_empty());
    assert!(journal_holds_secret(dir.path()));
    // Discarded in memory already.
    a.send(script.clone()).await;
    assert_eq!(code(&a.reply().await), ErrorCode::ReplyDiscarded);
    a.stop().await; // the "crash": the journal is dropped, nothing more is written
    std::fs::remove_dir(&tmp).unwrap();
    assert!(journal_holds_secret(dir.path()));

    let (mut a, _) = Harness::start(
        dir.path(),
        secret_catalog(runs.clone()),
        cfg(4, 1),
        Limits::default(),
    );
    assert!(!journal_holds_secret(dir.path()));
    a.send(script.clone()).await;
    assert_eq!(code(&a.reply().await), ErrorCode::ReplyDiscarded);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    a.stop().await;
}

// Group commit and the sync policy (current-thread runtime, as the daemon's).

/// A sync runner that counts the syncs and, when `held`, runs each only once the test lets it
/// (one permit per sync), telling the test when one is waiting.
struct Syncs {
    count: Arc<AtomicUsize>,
    waiting: tokio::sync::mpsc::UnboundedReceiver<()>,
    permits: std::sync::mpsc::Sender<()>,
}

fn sync_runner(held: bool) -> (dispatch::SyncRunner, Syncs) {
    let count = Arc::new(AtomicUsize::new(0));
    let (waiting_tx, waiting) = tokio::sync::mpsc::unbounded_channel();
    let (permits, permit_rx) = std::sync::mpsc::channel::<()>();
    let permit_rx = std::sync::Mutex::new(permit_rx);
    let c = count.clone();
    let runner: dispatch::SyncRunner = Arc::new(move |job: journal::SyncJob| {
        if held {
            let _ = waiting_tx.send(());
            let _ = permit_rx.lock().unwrap().recv();
        }
        c.fetch_add(1, Ordering::SeqCst);
        job.run()
    });
    (
        runner,
        Syncs {
            count,
            waiting,
            permits,
        },
    )
}

fn start_with_syncs(
    dir: &std::path::Path,
    catalog: Catalog,
    limits: Limits,
    runner: dispatch::SyncRunner,
) -> Harness {
    let (j, _) = Journal::open(dir, limits, JOURNAL_POLICY).unwrap();
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let (link, join) =
        dispatch::spawn_with_sync(Arc::new(catalog), cfg(1024, 16), j, None, rx, runner);
    Harness::from_spawned(link, join, shutdown)
}

#[tokio::test]
async fn group_commit_holds_starts_and_replies_until_durable_and_batches_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (runner, mut syncs) = sync_runner(true);
    let mut a = start_with_syncs(
        dir.path(),
        counting(runs.clone()),
        Limits::default(),
        runner,
    );
    let first = run_command(0);
    a.send(first.clone()).await;
    // The sync of its `started` record is out and held: the executor has not started.
    syncs.waiting.recv().await.unwrap();
    let rest: Vec<Envelope> = (0..9).map(|_| run_command(0)).collect();
    for e in &rest {
        a.send(e.clone()).await;
    }
    assert!(a.no_reply_within(Duration::from_millis(200)).await);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "no executor before its record is durable"
    );
    assert_eq!(syncs.count.load(Ordering::SeqCst), 0);
    // Released one sync at a time: every instruction runs once and is answered.
    let mut replies = Vec::new();
    while replies.len() < 10 {
        syncs.permits.send(()).unwrap();
        tokio::select! {
            r = a.reply() => replies.push(r),
            _ = syncs.waiting.recv() => {}
        }
        // Every reply received was durable: its sync had completed.
        assert!(syncs.count.load(Ordering::SeqCst) >= 1);
    }
    drop(syncs.permits);
    assert_eq!(runs.load(Ordering::SeqCst), 10);
    let mut tags: Vec<Tag> = replies.iter().map(|r| r.tag).collect();
    tags.sort();
    let mut want: Vec<Tag> = rest.iter().chain([&first]).map(|e| e.tag).collect();
    want.sort();
    assert_eq!(tags, want);
    // 20 records had to be durable; one sync covered many of them.
    let n = syncs.count.load(Ordering::SeqCst);
    assert!(n < 10, "{n} syncs for 10 instructions");
    a.stop().await;
    // All of them stored and found again.
    let (j, rec) = Journal::open(dir.path(), Limits::default(), JOURNAL_POLICY).unwrap();
    assert_eq!(rec, journal::Recovery::default());
    assert_eq!(j.unacked_tags().len(), 10);
}

#[tokio::test]
async fn a_redelivery_while_the_reply_waits_for_its_sync_gets_nothing_until_then() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (runner, mut syncs) = sync_runner(true);
    let mut a = start_with_syncs(
        dir.path(),
        counting(runs.clone()),
        Limits::default(),
        runner,
    );
    let e = run_command(0);
    a.send(e.clone()).await;
    syncs.waiting.recv().await.unwrap();
    syncs.permits.send(()).unwrap(); // `started`
    syncs.waiting.recv().await.unwrap(); // `finished`, held
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    a.send(e.clone()).await; // redelivered: the stored reply is not durable yet
    assert!(a.pending_tags().await.contains(&e.tag));
    assert!(a.held().await.is_empty(), "not resent before it is durable");
    assert!(a.no_reply_within(Duration::from_millis(200)).await);
    syncs.permits.send(()).unwrap();
    let r = a.reply().await;
    assert_eq!(r.tag, e.tag);
    assert!(
        a.no_reply_within(Duration::from_millis(200)).await,
        "one reply"
    );
    drop(syncs.permits);
    a.stop().await;
}

#[tokio::test]
async fn types_safe_to_rerun_are_not_synced_unless_always() {
    use runos_journal::SyncMode;
    for (mode, synced) in [
        (SyncMode::Needed, false),
        (SyncMode::Always, true),
        (SyncMode::Never, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (runner, syncs) = sync_runner(false);
        let limits = Limits {
            sync: mode,
            ..Limits::default()
        };
        let mut a = start_with_syncs(dir.path(), runos_agent::catalog::standard(), limits, runner);
        for _ in 0..5 {
            let e = instr(types::GET_NODE_STATUS, serde_json::json!({}));
            a.send(e.clone()).await;
            let r = a.reply().await;
            assert_eq!(r.tag, e.tag);
            assert!(!r.is(ctypes::ERROR), "{mode:?}");
        }
        a.stop().await;
        let n = syncs.count.load(Ordering::SeqCst);
        assert_eq!(n > 0, synced, "{mode:?}: {n} syncs");
        // Every reply was journaled all the same.
        let (j, _) = Journal::open(dir.path(), Limits::default(), JOURNAL_POLICY).unwrap();
        assert_eq!(j.unacked_tags().len(), 5, "{mode:?}");
    }
}

#[tokio::test]
async fn acknowledged_entries_expire_on_a_timer_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        retention: Duration::from_millis(300),
        ..Limits::default()
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let (mut a, _) = Harness::start(dir.path(), counting(runs), cfg(4, 1), limits);
    let e = run_command(0);
    a.send(e.clone()).await;
    a.reply().await;
    a.ack(e.tag).await;
    let held = |a: &Harness, tag: Tag| {
        let inbound = a.link.inbound.clone();
        async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let q = dispatch::journal_query::JournalQuery {
                tag: Some(tag),
                limit: 1,
            };
            inbound.send(Inbound::Journal(q, tx)).await.unwrap();
            !rx.await.unwrap().is_empty()
        }
    };
    assert!(held(&a, e.tag).await, "kept within retention");
    // Nothing is written any more (a query evicts nothing): only the timer armed at the expiry
    // can drop it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while held(&a, e.tag).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dropped by the timer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
}

#[tokio::test]
async fn cancelled_while_its_start_waits_for_the_sync_it_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (runner, mut syncs) = sync_runner(true);
    let mut a = start_with_syncs(
        dir.path(),
        counting(runs.clone()),
        Limits::default(),
        runner,
    );
    let e = run_command(0);
    a.send(e.clone()).await;
    syncs.waiting.recv().await.unwrap(); // its `started` record's sync, held
    let c = instr(types::CANCEL, serde_json::json!({"tag": e.tag.to_string()}));
    a.send(c.clone()).await;
    // Both replies must be durable: let the next syncs run.
    for _ in 0..16 {
        syncs.permits.send(()).unwrap();
    }
    let mut got = a.replies(2).await;
    got.sort_by_key(|r| r.tag != e.tag);
    assert_eq!(code(&got[0]), ErrorCode::Cancelled);
    assert!(got[1].is(ctypes::NO_CONTENT));
    assert!(a.no_reply_within(Duration::from_millis(200)).await);
    assert_eq!(runs.load(Ordering::SeqCst), 0, "never started");
    drop(syncs);
    a.stop().await;
}

/// How many syncs pipelined instructions share, printed for the benchmark notes:
/// `cargo test -p runos-agent --release --test journal pipelined -- --nocapture`.
#[tokio::test]
async fn pipelined_instructions_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (runner, syncs) = sync_runner(false);
    let mut a = start_with_syncs(
        dir.path(),
        counting(runs.clone()),
        Limits::default(),
        runner,
    );
    let n = 500;
    let start = std::time::Instant::now();
    let sender = {
        let inbound = a.link.inbound.clone();
        tokio::spawn(async move {
            for _ in 0..n {
                inbound
                    .send(Inbound::Instruction(run_command(0)))
                    .await
                    .unwrap();
            }
        })
    };
    let replies = a.replies(n).await;
    sender.await.unwrap();
    let elapsed = start.elapsed();
    assert!(replies.iter().all(|r| r.is(ctypes::NO_CONTENT)));
    assert_eq!(runs.load(Ordering::SeqCst), n);
    let count = syncs.count.load(Ordering::SeqCst);
    eprintln!(
        "{n} pipelined RUN_COMMANDs (2 records each that must be durable): {count} syncs, {:.3} per instruction, {:?} per instruction",
        count as f64 / n as f64,
        elapsed / n as u32
    );
    assert!(count <= 2 * n);
    a.stop().await;
}
