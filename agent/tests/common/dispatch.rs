//! The dispatcher test harness shared by `dispatch.rs`, `cancel.rs` and `journal.rs`: a
//! dispatcher on a journal (in its own temporary directory or a given one), with helpers to send
//! instructions and collect the final replies.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use runos_agent::catalog::{self, Catalog, ExecFn};
use runos_agent::daemon::JOURNAL_POLICY;
use runos_agent::daemon::dispatch::{self, DispatchConfig, DispatchLink, Inbound};
use runos_journal::{self as journal, Journal, Limits};
use runos_protocol::control::types as ctypes;
use runos_protocol::instructions::types;
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, MessageType, Tag};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub fn cfg(queue: usize, conc: usize) -> DispatchConfig {
    DispatchConfig {
        queue_capacity: queue,
        max_concurrency: conc,
        reply_channel: 1024,
    }
}

/// A raw executor that sleeps for the payload's `ms` (or panics when `panic` is set), and stops
/// early when its cancellation token fires, as a well-behaved executor does. With `"stubborn":
/// true` it ignores the token (the dispatcher must abort it after the stop grace).
pub fn sleeper() -> ExecFn {
    Arc::new(|ctx, env: Envelope| {
        Box::pin(async move {
            let v: serde_json::Value = env.payload().map_err(|e| {
                runos_protocol::instructions::BadPayload::from(e).to_error_payload()
            })?;
            if v.get("panic").is_some() {
                panic!("executor bug");
            }
            let ms = v.get("ms").and_then(|m| m.as_u64()).unwrap_or(0);
            let sleep = tokio::time::sleep(Duration::from_millis(ms));
            if v.get("stubborn").is_some() {
                sleep.await;
            } else {
                tokio::select! {
                    _ = sleep => {}
                    _ = ctx.cancel.cancelled() => {}
                }
            }
            Ok(Envelope::with_type(
                ctypes::NO_CONTENT,
                ctx.tag,
                &serde_json::json!({}),
            ))
        })
    })
}

/// The standard catalog with `RUN_COMMAND` replaced by `exec`, registered with the given default
/// and maximum timeouts.
pub fn catalog_with_run_command(exec: ExecFn, default: Duration, max: Duration) -> Catalog {
    let mut c = catalog::standard();
    c.register_raw(types::RUN_COMMAND, default, max, exec);
    c
}

/// The standard catalog with `RUN_COMMAND` replaced by [`sleeper`] (timeouts 30 s, max 60 s).
pub fn catalog_with_sleeper() -> Catalog {
    catalog_with_sleeper_timeouts(Duration::from_secs(30), Duration::from_secs(60))
}

/// The standard catalog with `RUN_COMMAND` replaced by [`sleeper`], with the given timeouts.
pub fn catalog_with_sleeper_timeouts(default: Duration, max: Duration) -> Catalog {
    catalog_with_run_command(sleeper(), default, max)
}

pub fn instr(kind: &str, payload: serde_json::Value) -> Envelope {
    Envelope::new(MessageType::new(kind).unwrap(), Tag::random(), &payload)
}

/// The payload of an `ERROR` reply (asserts that it is one).
pub fn error(env: &Envelope) -> ErrorPayload {
    assert!(env.is(ctypes::ERROR), "expected ERROR, got {}", env.kind);
    env.payload::<ErrorPayload>().unwrap()
}

/// The code of an `ERROR` reply (asserts that it is one).
pub fn code(env: &Envelope) -> ErrorCode {
    error(env).code
}

/// A running dispatcher and the ends of its link.
pub struct Harness {
    pub link: DispatchLink,
    join: JoinHandle<()>,
    pub shutdown: watch::Sender<bool>,
    _dir: Option<tempfile::TempDir>,
}

impl Harness {
    /// A dispatcher on a fresh journal in its own temporary directory.
    pub fn new(catalog: Catalog, cfg: DispatchConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (mut h, _) = Self::start(dir.path(), catalog, cfg, Limits::default());
        h._dir = Some(dir);
        h
    }

    /// A dispatcher on the journal in `dir`, as the daemon starts one.
    pub fn start(
        dir: &Path,
        catalog: Catalog,
        cfg: DispatchConfig,
        limits: Limits,
    ) -> (Self, journal::Recovery) {
        let (j, rec) = Journal::open(dir, limits, JOURNAL_POLICY).unwrap();
        let (shutdown, rx) = watch::channel(false);
        let (link, join) = dispatch::spawn(Arc::new(catalog), cfg, j, rx);
        (Self::from_spawned(link, join, shutdown), rec)
    }

    /// Wrap a dispatcher spawned by the test itself (e.g. with `spawn_with_audit`).
    pub fn from_spawned(
        link: DispatchLink,
        join: JoinHandle<()>,
        shutdown: watch::Sender<bool>,
    ) -> Self {
        Harness {
            link,
            join,
            shutdown,
            _dir: None,
        }
    }

    /// Stop the dispatcher and wait until it has released the journal.
    pub async fn stop(self) {
        drop(self.link);
        tokio::time::timeout(Duration::from_secs(10), self.join)
            .await
            .expect("dispatcher stops")
            .unwrap();
    }

    pub async fn send(&self, env: Envelope) {
        self.link
            .inbound
            .send(Inbound::Instruction(env))
            .await
            .unwrap();
    }

    /// Next final reply (LOG lines skipped), within 10 s.
    pub async fn reply(&mut self) -> Envelope {
        loop {
            let env = tokio::time::timeout(Duration::from_secs(10), self.link.replies.recv())
                .await
                .expect("a reply within 10 s")
                .expect("dispatcher alive");
            if !env.is(ctypes::LOG) {
                return env;
            }
        }
    }

    /// The next `n` final replies, by tag (their order is not part of the contract).
    pub async fn replies(&mut self, n: usize) -> Vec<Envelope> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.reply().await);
        }
        out
    }

    /// No final reply within `d`.
    pub async fn no_reply_within(&mut self, d: Duration) -> bool {
        let end = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(end, self.link.replies.recv()).await {
                Err(_) => return true,
                Ok(Some(e)) if e.is(ctypes::LOG) => continue,
                Ok(_) => return false,
            }
        }
    }

    /// The replies awaiting ACK, oldest first, fetched the way a session resends them: the
    /// tags, then pages of at most `page_bytes`.
    pub async fn held(&self) -> Vec<Envelope> {
        self.held_in_pages(usize::MAX).await
    }

    pub async fn held_in_pages(&self, page_bytes: usize) -> Vec<Envelope> {
        let (tx, rx) = oneshot::channel();
        self.link.inbound.send(Inbound::Held(tx)).await.unwrap();
        let tags = rx.await.unwrap();
        let mut out = Vec::new();
        let mut rest = &tags[..];
        while !rest.is_empty() {
            let (tx, rx) = oneshot::channel();
            self.link
                .inbound
                .send(Inbound::Replies {
                    tags: rest.to_vec(),
                    max_bytes: page_bytes,
                    respond: tx,
                })
                .await
                .unwrap();
            let (page, looked) = rx.await.unwrap();
            assert!(looked >= 1 && looked <= rest.len(), "{looked}");
            assert!(!page.is_empty() || looked == rest.len() || page_bytes == usize::MAX);
            out.extend(page);
            rest = &rest[looked..];
        }
        out
    }

    pub async fn pending_tags(&self) -> Vec<Tag> {
        let (tx, rx) = oneshot::channel();
        self.link
            .inbound
            .send(Inbound::PendingTags(tx))
            .await
            .unwrap();
        rx.await.unwrap()
    }

    pub async fn ack(&self, tag: Tag) {
        self.link.inbound.send(Inbound::Ack(tag)).await.unwrap();
    }

    pub async fn wait_in_flight(&self, n: usize) {
        let mut flight = self.link.in_flight.clone();
        tokio::time::timeout(Duration::from_secs(10), flight.wait_for(|v| *v == n))
            .await
            .unwrap_or_else(|_| panic!("in_flight did not reach {n} within 10 s"))
            .unwrap();
    }
}
