//! The dispatcher: a bounded queue, lanes (a fast lane, the shared pool, resource locks), a
//! deadline per instruction, panic isolation, after-ACK steps, and dedup and the outbox of final
//! replies through the durable [`Journal`].
//!
//! The session talks to it only through a [`DispatchLink`]: [`Inbound`] messages in (instructions,
//! ACKs, "resend what you hold") and reply envelopes out (final replies and `LOG` lines). The
//! dispatcher knows instructions only through the registry ([`Catalog`]): it decodes and
//! validates, gives the lane, the deadline and the executor's context.
//!
//! Lanes (see `runos_executors::lanes`): an instruction starts when its lane has room (fast
//! lane: its own slots; pool: a `max_concurrency` slot; exclusive: a slot and its resource's
//! lock), else it waits in the one queue, in acceptance order, without holding back later work of
//! other lanes. A full queue answers `busy`. The deadline counts from acceptance.
//!
//! After-ACK steps: a reply that comes with a step has the step written to a file
//! (`runos_executors::after_ack`) before the reply is journaled and sent; the step runs when the
//! reply's ACK is recorded, and at start for steps whose reply was acknowledged before a crash.
//!
//! Every instruction goes through the journal (see the `runos_journal` crate for the contract):
//! `lookup` first (a completed tag gets its stored reply again, a queued or running one nothing),
//! then `accepted`, `started` (on disk before the executor starts, when the type needs it),
//! `finished` (on disk before the reply is sent, when the type needs it) and `acked`.
//!
//! Group commit: the journal only appends (a plain `write`); the `fdatasync`s run on one
//! dedicated thread, one at a time, each covering every record appended before it started. An
//! instruction whose `started` record must be durable gets its task at once (so that `CANCEL`
//! and the shutdown find it running) but the task waits for the durable position before it
//! starts the executor; a reply whose `finished` record must be durable waits in the outbox and
//! is sent (and audited) once it is. While one sync runs, the records of many instructions
//! accumulate, and the next sync covers them all. A sync that fails poisons the journal: the
//! waiting executors are not started (answered `internal`), the waiting replies are sent anyway
//! (logged), as when a write fails.
//!
//! Acknowledged entries expire on a timer armed at the next expiry (the oldest ACK plus the
//! retention, at most once per [`EXPIRY_GRANULARITY`]), not on a periodic tick: an idle agent
//! is not woken by the journal. Immediate answers (`unknown_type`, `unsupported`, a bad
//! `CANCEL`, `cancelled`, `interrupted`, `CANCEL`'s `NO_CONTENT`) are journaled too, so a
//! redelivery gets the same reply. `busy` and `shutting_down` are not: the control plane resends
//! those with the same tag, and the tag must then be new. A journal that cannot record an
//! instruction gets it answered `internal` without running it; a full journal, `busy`.
//!
//! Each instruction gets a fresh reply built from its own tag; nothing is shared between
//! instructions. Every line logged while it runs carries its tag (a `tracing` span).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runos_executors::after_ack::{self, PendingStep};
use runos_executors::lanes::{Lane, Lanes};
use runos_executors::{AfterAck, StepCtx};
use runos_journal::{
    EntryState, Journal, JournalError, Lookup, Lsn, SyncDone, SyncJob, payload_sha256,
};
use runos_protocol::control::{self, is_control_type};
use runos_protocol::instructions::is_instruction_type;
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, MessageType, Tag};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

use crate::catalog::{Catalog, Job};
use crate::daemon::audit::AuditLog;

mod cancel;
// `runos journal`: Inbound::Journal (see `journal_query.rs`).
pub mod journal_query;
// `runos status`: Inbound::Snapshot (see `snapshot.rs`).
pub mod snapshot;

/// Limits of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Instructions waiting for a slot; beyond this, `busy`.
    pub queue_capacity: usize,
    /// Slots of the shared pool (the fast lane has its own, `lanes::FAST_SLOTS`).
    pub max_concurrency: usize,
    /// Capacity of the reply channel to the session.
    pub reply_channel: usize,
}

impl DispatchConfig {
    /// Limits from the agent settings.
    pub fn from_settings(a: &crate::config::AgentSettings) -> Self {
        DispatchConfig {
            queue_capacity: a.queue_capacity,
            max_concurrency: a.max_concurrency,
            reply_channel: 1024,
        }
    }
}

/// A message from the session to the dispatcher.
#[derive(Debug)]
pub enum Inbound {
    /// An instruction envelope (a type that is not a control message).
    Instruction(Envelope),
    /// The control plane stored the final reply with this tag.
    Ack(Tag),
    /// A session was welcomed: send back the tags of every reply awaiting ACK (oldest first),
    /// to be resent page by page with [`Inbound::Replies`].
    Held(oneshot::Sender<Vec<Tag>>),
    /// The replies of `tags` that still await ACK, in order, collected until they hold
    /// `max_bytes` (at least one is always collected when there is one), with how many of
    /// `tags` were looked at. Pages keep the resend's memory bounded whatever the journal holds.
    Replies {
        /// Tags to look at, in order.
        tags: Vec<Tag>,
        /// Stop collecting once the replies hold this many bytes.
        max_bytes: usize,
        /// The replies and how many tags were looked at.
        respond: oneshot::Sender<(Vec<Envelope>, usize)>,
    },
    /// A session is about to send HELLO: send back the tags of the replies awaiting ACK (oldest
    /// first, at most [`control::MAX_HELLO_PENDING`]).
    PendingTags(oneshot::Sender<Vec<Tag>>),
    /// Shutdown grace is over: abort every running executor (their process groups die) and
    /// answer each with `interrupted`; the sender is told once those replies are queued.
    AbortAll(oneshot::Sender<()>),
    /// `runos status`: what is running and queued (see `snapshot.rs`).
    Snapshot(oneshot::Sender<snapshot::DispatchSnapshot>),
    /// `runos journal`: recent journal entries, or one tag's (see `journal_query.rs`).
    Journal(
        journal_query::JournalQuery,
        oneshot::Sender<Vec<runos_journal::EntryView>>,
    ),
}

/// The session's end of the dispatcher.
#[derive(Debug)]
pub struct DispatchLink {
    /// Messages to the dispatcher.
    pub inbound: mpsc::Sender<Inbound>,
    /// Replies and `LOG` lines from the dispatcher, to send on the live session (they are
    /// dropped while disconnected: final replies stay in the journal and are resent).
    pub replies: mpsc::Receiver<Envelope>,
    /// Instructions accepted whose reply has not yet been handed to the session (queued,
    /// running, or answered with the reply waiting for its journal record to be durable).
    pub in_flight: watch::Receiver<usize>,
}

/// Start the dispatcher task, owning `journal` (opened by the caller, which handled its
/// [`runos_journal::Recovery`]). It stops when every [`Inbound`] sender is dropped.
pub fn spawn(
    catalog: Arc<Catalog>,
    cfg: DispatchConfig,
    journal: Journal,
    shutdown: watch::Receiver<bool>,
) -> (DispatchLink, tokio::task::JoinHandle<()>) {
    spawn_with_audit(catalog, cfg, journal, None, shutdown)
}

/// [`spawn`], also writing one line per final reply to `audit` (see `audit.rs`).
pub fn spawn_with_audit(
    catalog: Arc<Catalog>,
    cfg: DispatchConfig,
    journal: Journal,
    audit: Option<AuditLog>,
    shutdown: watch::Receiver<bool>,
) -> (DispatchLink, tokio::task::JoinHandle<()>) {
    spawn_with_sync(
        catalog,
        cfg,
        journal,
        audit,
        shutdown,
        Arc::new(SyncJob::run),
    )
}

/// What runs the journal's syncs on the sync thread: [`SyncJob::run`], or a test's wrapper
/// around it (to count or hold them).
pub type SyncRunner = Arc<dyn Fn(SyncJob) -> SyncDone + Send + Sync>;

/// [`spawn_with_audit`] with the syncs run by `runner`.
pub fn spawn_with_sync(
    catalog: Arc<Catalog>,
    cfg: DispatchConfig,
    journal: Journal,
    audit: Option<AuditLog>,
    shutdown: watch::Receiver<bool>,
    runner: SyncRunner,
) -> (DispatchLink, tokio::task::JoinHandle<()>) {
    let (in_tx, in_rx) = mpsc::channel(256);
    let (reply_tx, reply_rx) = mpsc::channel(cfg.reply_channel.max(1));
    let (flight_tx, flight_rx) = watch::channel(0usize);
    let (sync_tx, sync_rx) = match spawn_sync_thread(runner) {
        Some((tx, rx)) => (Some(tx), rx),
        None => (None, mpsc::unbounded_channel().1),
    };
    let durable_tx = watch::Sender::new((journal.durable(), journal.is_poisoned()));
    let mut d = Dispatcher {
        journal,
        audit,
        lanes: Lanes::new(cfg.max_concurrency),
        catalog,
        cfg,
        queue: VecDeque::new(),
        queued_slow: 0,
        running: HashMap::new(),
        task_lanes: HashMap::new(),
        steps: HashMap::new(),
        tasks: JoinSet::new(),
        reply_tx,
        flight_tx,
        shutting_down: false,
        started: Default::default(), // status: see `snapshot.rs`
        sync_tx,
        durable_tx,
        outbox: VecDeque::new(),
        expiry: None,
        expired_at: tokio::time::Instant::now(),
    };
    d.resume_steps();
    let join = tokio::spawn(d.run(in_rx, sync_rx, shutdown));
    (
        DispatchLink {
            inbound: in_tx,
            replies: reply_rx,
            in_flight: flight_rx,
        },
        join,
    )
}

/// The expiry timer fires at most once in this interval: expiries closer together are handled
/// by one wake-up.
pub const EXPIRY_GRANULARITY: Duration = Duration::from_secs(1);

/// Start the journal's sync thread: it runs each [`SyncJob`] it gets (one `fdatasync`) and
/// sends the outcome back. It ends when the dispatcher drops its sender. `None` when the thread
/// cannot be created (the dispatcher then syncs inline).
fn spawn_sync_thread(
    runner: SyncRunner,
) -> Option<(
    std::sync::mpsc::Sender<SyncJob>,
    mpsc::UnboundedReceiver<SyncDone>,
)> {
    let (job_tx, job_rx) = std::sync::mpsc::channel::<SyncJob>();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("runos-journal-sync".into())
        .spawn(move || {
            while let Ok(job) = job_rx.recv() {
                if done_tx.send(runner(job)).is_err() {
                    break;
                }
            }
        });
    match spawned {
        Ok(_) => Some((job_tx, done_rx)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the journal's sync thread; syncing inline");
            None
        }
    }
}

/// The error envelope for `tag`.
pub fn error_reply(tag: Tag, code: ErrorCode, message: impl Into<String>) -> Envelope {
    Envelope::with_type(
        control::types::ERROR,
        tag,
        &ErrorPayload::new(code, message),
    )
}

struct Dispatcher {
    catalog: Arc<Catalog>,
    cfg: DispatchConfig,
    queue: VecDeque<Queued>,
    /// How many of `queue` are not fast-lane work (so that `pump` stops scanning a queue of
    /// fast work at once when the fast lane is full).
    queued_slow: usize,
    /// Started and not yet answered.
    running: HashMap<Tag, Running>,
    /// What each task holds of the lanes, released when the task has ended (not when its
    /// instruction was answered: a cancelled task's lock is held until its executor is gone).
    task_lanes: HashMap<tokio::task::Id, Lane>,
    lanes: Lanes,
    /// After-ACK steps waiting for their reply's ACK, with their file (`None`: memory only).
    steps: HashMap<Tag, (Option<PathBuf>, PendingStep)>,
    tasks: JoinSet<Finished>,
    journal: Journal,
    /// One line per final reply (see `audit.rs`); `None` in tests.
    audit: Option<AuditLog>,
    reply_tx: mpsc::Sender<Envelope>,
    flight_tx: watch::Sender<usize>,
    shutting_down: bool,
    /// Type and start time of running instructions, for `runos status` (see `snapshot.rs`).
    started: snapshot::StartLog,
    /// To the journal's sync thread (`None`: sync inline).
    sync_tx: Option<std::sync::mpsc::Sender<SyncJob>>,
    /// The journal's durable position, and whether the journal failed: tasks wait on it before
    /// they start their executor.
    durable_tx: watch::Sender<(Lsn, bool)>,
    /// Final replies waiting for their `finished` record to be durable, in journal order.
    outbox: VecDeque<(Lsn, Envelope)>,
    /// When the oldest acknowledged entry's retention ends (see [`EXPIRY_GRANULARITY`]).
    expiry: Option<tokio::time::Instant>,
    /// When the expiry timer last fired.
    expired_at: tokio::time::Instant,
}

/// A running instruction.
struct Running {
    abort: AbortHandle,
    /// Its executor's cancellation token (`Ctx::cancel`).
    cancel: CancellationToken,
}

/// How long a stopped executor (CANCEL, its deadline, the end of the shutdown grace) has to end
/// on its own after its cancellation token fired before its task is aborted: the process
/// runner's grace between SIGTERM and SIGKILL, plus a moment to report. A tool such as helm,
/// apt or kubeadm gets SIGTERM first and a chance to leave no lock or half-done state behind.
pub const STOP_GRACE: Duration =
    runos_executors::host::runner::DEFAULT_GRACE.saturating_add(Duration::from_secs(1));

impl Running {
    /// Cancel the token (its processes get SIGTERM, then SIGKILL after the runner's grace), and
    /// abort the task (dropping its executor) if it has not ended [`STOP_GRACE`] later.
    fn stop(&self) {
        self.cancel.cancel();
        let abort = self.abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STOP_GRACE).await;
            abort.abort();
        });
    }
}

/// What an instruction's task yields.
struct Finished {
    tag: Tag,
    kind: MessageType,
    reply: Envelope,
    after_ack: Option<AfterAck>,
}

/// An accepted instruction waiting for a slot: its payload is already decoded and validated.
struct Queued {
    tag: Tag,
    kind: MessageType,
    lane: Lane,
    /// The instruction's deadline (protocol.md §7.3), measured from `accepted`.
    deadline: Duration,
    /// When the dispatcher accepted it (journaled `accepted`).
    accepted: tokio::time::Instant,
    job: Job,
}

impl Dispatcher {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Inbound>,
        mut synced: mpsc::UnboundedReceiver<SyncDone>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        if *shutdown.borrow() {
            self.begin_shutdown().await;
        }
        loop {
            self.after_event().await;
            let expiry = self.expiry;
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => self.handle(m).await,
                    None => break,
                },
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(done).await;
                }
                Some(done) = synced.recv() => {
                    if let Err(e) = self.journal.synced(done) {
                        tracing::error!(error = %e, "cannot sync the journal: instructions waiting to start are not run, waiting replies are sent anyway");
                    }
                }
                () = sleep_until_some(expiry), if expiry.is_some() => {
                    self.expired_at = tokio::time::Instant::now();
                    let n = self.journal.expire();
                    tracing::debug!(dropped = n, "journal: acknowledged entries past retention dropped");
                }
                changed = shutdown.changed(), if !self.shutting_down => {
                    if changed.is_err() || *shutdown.borrow() {
                        self.begin_shutdown().await;
                    }
                }
            }
        }
        self.tasks.abort_all();
        // Replies still waiting: durable now, resent after the next WELCOME.
        if let Err(e) = self.journal.sync_now() {
            tracing::error!(error = %e, "cannot sync the journal at the dispatcher's end");
        }
    }

    /// After each event: start a sync when a record waits for one, tell waiting tasks how far
    /// the journal is durable, send the replies that became durable, re-arm the expiry timer.
    async fn after_event(&mut self) {
        if let Some(job) = self.journal.sync_job() {
            let job = match &self.sync_tx {
                Some(tx) => tx.send(job).err().map(|e| e.0),
                None => Some(job),
            };
            if let Some(job) = job {
                // No sync thread: sync here.
                if let Err(e) = self.journal.synced(job.run()) {
                    tracing::error!(error = %e, "cannot sync the journal");
                }
            }
        }
        let d = (self.journal.durable(), self.journal.is_poisoned());
        self.durable_tx.send_if_modified(|v| {
            let changed = *v != d;
            *v = d;
            changed
        });
        self.release().await;
        self.expiry = self.journal.next_expiry_ms().map(|at| {
            let wait = Duration::from_millis(at.saturating_sub(self.journal.now_ms()));
            (tokio::time::Instant::now() + wait).max(self.expired_at + EXPIRY_GRANULARITY)
        });
    }

    /// Send (and audit) the replies of the outbox whose record is durable, in order; all of
    /// them when the journal failed (logged).
    async fn release(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let durable = self.journal.durable();
        let failed = self.journal.is_poisoned();
        while let Some((lsn, _)) = self.outbox.front() {
            if *lsn > durable && !failed {
                break;
            }
            let Some((lsn, env)) = self.outbox.pop_front() else {
                break;
            };
            if lsn > durable {
                tracing::error!(tag = %env.tag, "cannot store the reply durably; sending it anyway");
            }
            self.audit(&env); // see `journal_query.rs`
            self.send(env).await;
        }
        self.publish();
    }

    /// Sync inline and send what waited for it (shutdown: before reporting the replies queued).
    async fn flush(&mut self) {
        if let Err(e) = self.journal.sync_now() {
            tracing::error!(error = %e, "cannot sync the journal");
        }
        self.after_event().await;
    }

    /// Whether the reply of `tag` waits in the outbox for its record to be durable.
    fn in_outbox(&self, tag: &Tag) -> bool {
        self.outbox.iter().any(|(_, e)| e.tag == *tag)
    }

    fn publish(&self) {
        let n = self.queue.len() + self.running.len() + self.outbox.len();
        self.flight_tx.send_if_modified(|v| {
            let changed = *v != n;
            *v = n;
            changed
        });
    }

    async fn send(&self, env: Envelope) {
        // The session always drains this channel (it drops replies while disconnected), so
        // this wait is short.
        let _ = self.reply_tx.send(env).await;
    }

    /// Store the final reply of a tag already accepted (queued or running), then send it: at
    /// once when its type needs no sync, else from the outbox once its record is durable.
    ///
    /// When the journal cannot store it, the reply is sent anyway (the work is done; the
    /// control plane stores the first reply it gets) and the failure is logged: after a
    /// restart the tag would be answered `interrupted`, which the control plane then ignores
    /// as a duplicate.
    async fn answer(&mut self, env: Envelope) {
        let tag = env.tag;
        match self.journal.finished(tag, &env) {
            Ok(Some(lsn)) => {
                self.outbox.push_back((lsn, env));
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(%tag, error = %e, "cannot store the reply durably; sending it anyway");
            }
        }
        self.audit(&env); // see `journal_query.rs`
        self.send(env).await;
    }

    /// Record a new instruction as accepted. On failure, the reply to send instead (not
    /// journaled): `busy` when the journal is full, `internal` when it cannot write.
    fn accept(&mut self, env: &Envelope) -> Result<(), Envelope> {
        let tag = env.tag;
        let sha = payload_sha256(env);
        match self.journal.accepted(tag, env.kind.as_str(), &sha) {
            Ok(()) => Ok(()),
            Err(e @ JournalError::Full { .. }) => {
                tracing::warn!(%tag, r#type = %env.kind, error = %e, "journal full: answered busy");
                Err(error_reply(
                    tag,
                    ErrorCode::Busy,
                    "the agent holds too many replies not yet acknowledged; nothing was run, retry later",
                ))
            }
            Err(e) => Err(self.not_recorded(tag, &env.kind, &e)),
        }
    }

    /// The `internal` reply for an instruction the journal could not record (not run).
    fn not_recorded(&self, tag: Tag, kind: &MessageType, e: &JournalError) -> Envelope {
        tracing::error!(%tag, r#type = %kind, error = %e, "cannot record the instruction durably; not run");
        error_reply(
            tag,
            ErrorCode::Internal,
            format!("cannot record the instruction durably: {e}; nothing was run"),
        )
    }

    /// Answer a new instruction at once, without an executor: accepted, then finished, then
    /// sent (so a redelivery gets the same reply).
    async fn answer_now(&mut self, instr: &Envelope, reply: Envelope) {
        match self.accept(instr) {
            Ok(()) => self.answer(reply).await,
            Err(refusal) => self.send(refusal).await,
        }
    }

    async fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        let queued: Vec<_> = self.queue.drain(..).collect();
        self.queued_slow = 0;
        for q in queued {
            tracing::info!(tag = %q.tag, "not started: the agent is shutting down");
            // Not journaled: the control plane redelivers it to the next agent run, where it
            // must be new.
            self.journal.forget(&q.tag);
            self.send(error_reply(
                q.tag,
                ErrorCode::ShuttingDown,
                "the agent is shutting down and did not start this instruction",
            ))
            .await;
        }
        self.publish();
    }

    async fn handle(&mut self, msg: Inbound) {
        match msg {
            Inbound::Instruction(env) => self.submit(env).await,
            Inbound::Ack(tag) => match self.journal.acked(tag) {
                Ok(true) => {
                    tracing::debug!(%tag, "reply acknowledged");
                    if let Some((file, step)) = self.steps.remove(&tag) {
                        self.run_step(file, step);
                    }
                }
                Ok(false) => {
                    tracing::debug!(%tag, "ACK matches no reply awaiting one (late or duplicate); dropped");
                }
                // Not fatal: the reply is resent after the next WELCOME and ACKed again.
                Err(e) => tracing::warn!(%tag, error = %e, "cannot record the ACK"),
            },
            Inbound::Snapshot(tx) => self.snapshot(tx), // see `snapshot.rs`
            Inbound::Journal(q, tx) => self.journal_query(q, tx), // see `journal_query.rs`
            Inbound::Held(tx) => {
                let _ = tx.send(self.journal.unacked_tags());
            }
            Inbound::Replies {
                tags,
                max_bytes,
                respond,
            } => {
                let mut page = Vec::new();
                let mut bytes = 0usize;
                let mut looked = 0usize;
                for tag in &tags {
                    if !page.is_empty() && bytes >= max_bytes {
                        break;
                    }
                    looked += 1;
                    // One in the outbox goes out once durable.
                    let awaiting = self.journal.state(tag) == Some(EntryState::Finished)
                        && !self.in_outbox(tag);
                    if awaiting && let Lookup::Done(reply) = self.journal.lookup(tag) {
                        bytes = bytes.saturating_add(reply.json_b64.len());
                        page.push(reply);
                    }
                }
                let _ = respond.send((page, looked));
            }
            Inbound::PendingTags(tx) => {
                let mut tags = self.journal.unacked_tags();
                tags.truncate(control::MAX_HELLO_PENDING);
                let _ = tx.send(tags);
            }
            Inbound::AbortAll(done) => {
                let aborted: Vec<Tag> = self
                    .running
                    .drain()
                    .map(|(tag, r)| {
                        r.stop();
                        tag
                    })
                    .collect();
                for tag in aborted {
                    tracing::warn!(%tag, "shutdown grace over: instruction aborted");
                    // Stored like any final reply: sent now if connected, else after the next
                    // WELCOME of the next agent run, and the control plane learns the
                    // instruction was cut short instead of silently re-running it.
                    self.answer(error_reply(
                        tag,
                        ErrorCode::Interrupted,
                        "the agent shut down before this instruction finished; its processes were stopped",
                    ))
                    .await;
                }
                // Durable and queued to the session before the sender is told.
                self.flush().await;
                let _ = done.send(());
            }
        }
    }

    async fn submit(&mut self, env: Envelope) {
        let tag = env.tag;
        let kind = env.kind.as_str().to_string();
        if is_control_type(&kind) {
            tracing::warn!(%tag, r#type = %kind, "control message is not an instruction; dropped");
            return;
        }
        match self.journal.lookup(&tag) {
            Lookup::New => {}
            Lookup::InProgress => {
                tracing::info!(%tag, r#type = %kind, "already queued or running; not started again");
                return;
            }
            Lookup::Done(_) if self.in_outbox(&tag) => {
                tracing::info!(%tag, r#type = %kind, "already answered; the reply goes out once stored durably");
                return;
            }
            Lookup::Done(reply) => {
                tracing::info!(%tag, r#type = %kind, "already answered; resending the stored reply");
                self.send(reply).await;
                return;
            }
            Lookup::Discarded(d) => {
                tracing::info!(%tag, r#type = %kind, "already answered with a secret reply, since discarded; answered reply_discarded");
                self.send(error_reply(
                    tag,
                    ErrorCode::ReplyDiscarded,
                    format!(
                        "this instruction was answered ({}, sha256 {}) and acknowledged; its reply was secret and has been discarded, and the instruction is not run again (send it with a new tag to run it again)",
                        d.error_code.as_deref().unwrap_or(&d.reply_type),
                        d.reply_sha256
                    ),
                ))
                .await;
                return;
            }
        }
        if self.shutting_down {
            self.send(error_reply(
                tag,
                ErrorCode::ShuttingDown,
                "the agent is shutting down and did not start this instruction",
            ))
            .await;
            return;
        }
        if !is_instruction_type(&kind) {
            tracing::warn!(%tag, r#type = %kind, "unknown instruction type");
            let reply = error_reply(
                tag,
                ErrorCode::UnknownType,
                format!(
                    "{kind} is not an instruction type of protocol version {}",
                    runos_protocol::PROTOCOL_VERSION
                ),
            );
            self.answer_now(&env, reply).await;
            return;
        }
        // CANCEL is the dispatcher's own: no queue, no slot (see `cancel.rs`).
        if kind == runos_protocol::instructions::types::CANCEL {
            self.cancel(env).await;
            return;
        }
        let Some(entry) = self.catalog.get(&kind).cloned() else {
            tracing::warn!(%tag, r#type = %kind, "no executor for this instruction type");
            let reply = error_reply(
                tag,
                ErrorCode::Unsupported,
                format!(
                    "this agent (version {}) has no executor for {kind}",
                    crate::AGENT_VERSION
                ),
            );
            self.answer_now(&env, reply).await;
            return;
        };
        let lane = entry.lane();
        let start_now = self
            .lanes
            .can_start(lane, self.queue.iter().map(|q| &q.lane));
        if !start_now && self.queue.len() >= self.cfg.queue_capacity {
            tracing::warn!(%tag, r#type = %kind, "queue full: answered busy");
            // Not journaled: the control plane may resend the same tag later.
            self.send(error_reply(
                tag,
                ErrorCode::Busy,
                format!(
                    "the agent is busy ({} running, {} queued); nothing was run, retry later",
                    self.running.len(),
                    self.queue.len()
                ),
            ))
            .await;
            return;
        }
        // The protocol's decoding and validation (§7.2), before anything is accepted or run.
        let prepared = match entry.prepare(&env) {
            Ok(p) => p,
            Err(refusal) => {
                tracing::warn!(%tag, r#type = %kind, error = %refusal.message, "payload refused");
                let reply = Envelope::with_type(control::types::ERROR, tag, &refusal);
                self.answer_now(&env, reply).await;
                return;
            }
        };
        if let Err(refusal) = self.accept(&env) {
            self.send(refusal).await;
            return;
        }
        let q = Queued {
            tag,
            kind: env.kind,
            lane,
            deadline: entry.deadline(env.timeout_ms, prepared.default_deadline),
            accepted: tokio::time::Instant::now(),
            job: prepared.job,
        };
        if start_now {
            self.start(q).await;
        } else {
            tracing::debug!(%tag, r#type = %kind, %lane, "queued");
            self.queued_slow += usize::from(q.lane != Lane::Fast);
            self.queue.push_back(q);
        }
        self.publish();
    }

    /// Start an accepted instruction: `started` on disk first, then the executor. Its deadline
    /// runs from acceptance (§7.3): one that passed in the queue is answered `timeout` unrun.
    async fn start(&mut self, q: Queued) {
        let Queued {
            tag,
            kind,
            lane,
            deadline,
            accepted,
            job,
        } = q;
        let deadline_at = accepted + deadline;
        if tokio::time::Instant::now() >= deadline_at {
            tracing::warn!(%tag, r#type = %kind, "deadline passed before the start; not started");
            self.answer(error_reply(
                tag,
                ErrorCode::Timeout,
                format!(
                    "the deadline of {} ms passed before the instruction started; nothing was run",
                    deadline.as_millis()
                ),
            ))
            .await;
            return;
        }
        // The executor's process group is created inside it, so it is not known here: the
        // journal records none (recovery then has no group to kill; see docs/architecture.md).
        let gate = match self.journal.started(tag, None) {
            Ok(gate) => gate,
            Err(e) => {
                // Still queued in the journal (the record was not applied): forget it, so that
                // a redelivery after a restart is new.
                self.journal.forget(&tag);
                let reply = self.not_recorded(tag, &kind, &e);
                self.send(reply).await;
                return;
            }
        };
        let mut durable = self.durable_tx.subscribe();
        self.started.note(tag, kind.as_str(), &self.running); // status: see `snapshot.rs`
        let span = tracing::info_span!("instruction", %tag, r#type = %kind);
        let ctx =
            self.catalog
                .context(kind.as_str(), tag, deadline_at, Some(self.reply_tx.clone()));
        let cancel = ctx.cancel.clone();
        let token = ctx.cancel.clone();
        let fut = async move {
            // The `started` record durable first, when the type needs it (group commit).
            if let Some(lsn) = gate {
                let durable = tokio::select! {
                    d = durable.wait_for(|(d, failed)| *d >= lsn || *failed) => {
                        d.is_ok_and(|v| v.0 >= lsn)
                    }
                    // CANCEL or the end of the shutdown grace (already answered): never start.
                    () = token.cancelled() => {
                        return Finished {
                            tag,
                            kind,
                            reply: error_reply(tag, ErrorCode::Cancelled, "cancelled before it started"),
                            after_ack: None,
                        };
                    }
                };
                if !durable {
                    tracing::error!("cannot record the start durably; not run");
                    return Finished {
                        tag,
                        kind,
                        reply: error_reply(
                            tag,
                            ErrorCode::Internal,
                            "cannot record the instruction durably (the journal's sync failed); nothing was run",
                        ),
                        after_ack: None,
                    };
                }
            }
            // However the task ends (deadline, CANCEL, shutdown, done), the token is cancelled.
            let _cancel_on_drop = token.clone().drop_guard();
            tracing::info!(
                deadline_ms = deadline.as_millis() as u64,
                queued_ms = accepted.elapsed().as_millis() as u64,
                "started"
            );
            let started = Instant::now();
            let exec = job(ctx).instrument(tracing::Span::current());
            // Aborted when dropped, so that dropping an instruction's task drops its executor
            // (and the executor's process guard).
            let mut inner = AbortOnDropHandle::new(tokio::spawn(exec));
            let mut after_ack = None;
            let reply = match tokio::time::timeout_at(deadline_at, &mut inner).await {
                Ok(Ok(Ok(done))) => {
                    after_ack = done.after_ack;
                    done.envelope
                }
                Ok(Ok(Err(err))) => {
                    Envelope::with_type(control::types::ERROR, tag, &err)
                }
                Ok(Err(join)) if join.is_panic() => {
                    tracing::error!("executor panicked; the agent continues");
                    error_reply(
                        tag,
                        ErrorCode::Internal,
                        "the executor failed unexpectedly (panic); the agent continues",
                    )
                }
                Ok(Err(_)) => error_reply(tag, ErrorCode::Interrupted, "the executor was cancelled"),
                Err(_) => {
                    // Asked to stop first (SIGTERM to its processes), killed after the grace.
                    token.cancel();
                    if tokio::time::timeout(STOP_GRACE, &mut inner).await.is_err() {
                        inner.abort();
                    }
                    tracing::warn!("deadline passed; executor stopped");
                    error_reply(
                        tag,
                        ErrorCode::Timeout,
                        format!(
                            "the instruction did not finish within {} ms; its processes were killed",
                            deadline.as_millis()
                        ),
                    )
                }
            };
            tracing::info!(
                reply = %reply.kind,
                duration_ms = started.elapsed().as_millis() as u64,
                "finished"
            );
            Finished {
                tag,
                kind,
                reply,
                after_ack,
            }
        }
        .instrument(span);
        self.lanes.take(lane);
        let abort = self.tasks.spawn(fut);
        self.task_lanes.insert(abort.id(), lane);
        self.running.insert(tag, Running { abort, cancel });
    }

    async fn finished(
        &mut self,
        done: Result<(tokio::task::Id, Finished), tokio::task::JoinError>,
    ) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        if let Some(lane) = self.task_lanes.remove(&id) {
            self.lanes.release(lane);
        }
        match done {
            Ok((_, f)) => {
                // Exactly one final reply per tag: an instruction already answered
                // `interrupted` by AbortAll or `cancelled` by CANCEL (it finished in the same
                // instant) is not answered again, and its after-ACK step is dropped.
                if self.running.remove(&f.tag).is_some() {
                    if let Some(step) = f.after_ack {
                        self.hold_step(f.tag, &f.kind, &f.reply, step);
                    }
                    self.answer(f.reply).await;
                } else {
                    tracing::debug!(tag = %f.tag, "finished after being aborted; reply dropped");
                }
            }
            Err(_) => {
                // Only an abort (shutdown) ends an outer task without a reply; remove it.
                self.running.retain(|_, r| r.abort.id() != id);
            }
        }
        self.pump().await;
        self.publish();
    }

    /// Start every queued instruction whose lane has room, in queue order; one that cannot
    /// start does not hold back later ones of other lanes (see `runos_executors::lanes`).
    ///
    /// Linear in the queue only while something can start: the scan stops as soon as neither
    /// the fast lane nor the pool has a free slot (or the pool has one but nothing but fast work
    /// waits), so a queue thousands deep costs nothing per finished instruction.
    async fn pump(&mut self) {
        let mut i = 0;
        while i < self.queue.len() {
            let fast_room = self.lanes.can_start(Lane::Fast, std::iter::empty());
            let slow_room =
                self.queued_slow > 0 && self.lanes.can_start(Lane::Pool, std::iter::empty());
            if !fast_room && !slow_room {
                break;
            }
            let lane = self.queue[i].lane;
            let room = if lane == Lane::Fast {
                fast_room
            } else {
                slow_room
            };
            if room
                && self
                    .lanes
                    .can_start(lane, self.queue.iter().take(i).map(|q| &q.lane))
            {
                if let Some(q) = self.queue.remove(i) {
                    self.queued_slow -= usize::from(q.lane != Lane::Fast);
                    self.start(q).await;
                }
            } else {
                i += 1;
            }
        }
    }

    /// Keep `step` until `reply` (of the instruction `tag` of type `kind`) is acknowledged:
    /// written to its file before the reply is journaled and sent (memory only when the
    /// registry has no state directory or the file cannot be written: logged).
    fn hold_step(&mut self, tag: Tag, kind: &MessageType, reply: &Envelope, step: AfterAck) {
        let pending = PendingStep {
            tag,
            kind: kind.as_str().to_string(),
            reply_type: reply.kind.as_str().to_string(),
            step,
        };
        let file = self.catalog.state_dir(kind.as_str()).and_then(|dir| {
            after_ack::save(&dir, &pending)
                .map_err(|e| {
                    tracing::error!(%tag, error = %e, "cannot store the after-ACK step; it runs after the ACK unless the agent stops first");
                })
                .ok()
        });
        self.steps.insert(tag, (file, pending));
    }

    /// Run an after-ACK step whose reply was acknowledged, then remove its file.
    fn run_step(&self, file: Option<PathBuf>, p: PendingStep) {
        let tag = p.tag;
        let Some(f) = self.catalog.step(&p.step.step) else {
            tracing::warn!(%tag, step = %p.step.step, "no such after-ACK step; dropped");
            if let Some(file) = file {
                let _ = after_ack::remove(&file);
            }
            return;
        };
        let ctx = StepCtx {
            tag,
            host: self.catalog.host().clone(),
        };
        let span = tracing::info_span!("after_ack", %tag, r#type = %p.kind, step = %p.step.step);
        tokio::spawn(
            async move {
                tracing::info!("reply acknowledged: running the after-ACK step");
                match f(ctx, p.step.params).await {
                    Ok(()) => tracing::info!("after-ACK step done"),
                    Err(e) => tracing::warn!(error = %e, "after-ACK step failed"),
                }
                if let Some(file) = file
                    && let Err(e) = after_ack::remove(&file)
                {
                    tracing::warn!(error = %e, "cannot remove the after-ACK step's file");
                }
            }
            .instrument(span),
        );
    }

    /// At start: the after-ACK steps the previous run left. A reply acknowledged runs its step
    /// now; one awaiting its ACK waits for it; a tag whose stored reply is not the one the step
    /// follows (answered `interrupted` after a crash before the reply was stored), or that the
    /// journal no longer holds, drops it.
    fn resume_steps(&mut self) {
        let dirs: Vec<PathBuf> = self
            .catalog
            .state_dirs()
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        for (file, p) in after_ack::load_all(dirs.iter().map(PathBuf::as_path)) {
            let tag = p.tag;
            match self.journal.get(&tag) {
                // Forgotten to be run again (cut short, safe to re-run: the reply was never
                // stored), or pruned after a retention that passed while the agent was down:
                // never run a step that cannot be shown to follow an ACK.
                None => {
                    tracing::warn!(%tag, "after-ACK step of a tag the journal no longer holds; dropped");
                    let _ = after_ack::remove(&file);
                }
                Some(v) if v.reply_type.as_deref() != Some(p.reply_type.as_str()) => {
                    tracing::warn!(%tag, "after-ACK step of a reply that was never stored; dropped");
                    let _ = after_ack::remove(&file);
                }
                Some(v) if v.state == EntryState::Acked => self.run_step(Some(file), p),
                Some(_) => {
                    self.steps.insert(tag, (Some(file), p));
                }
            }
        }
    }
}

/// Sleep until `at` (never when `None`; the caller guards the branch).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
