//! One L2Sec session: connect, HELLO/WELCOME, then a write task with a bounded channel, and one
//! select loop that reads frames (the framed reader is cancellation safe) and handles replies,
//! heartbeat, shutdown and reconnect requests. The write task coalesces: every frame that is
//! ready goes out in one write (see `write_loop`); it stays a task of its own so that a
//! control plane that stops reading never blocks the select loop (heartbeat, dead-peer
//! detection, shutdown).
//!
//! Routing of received envelopes after WELCOME:
//! - `HEARTBEAT_REPLY` is matched by tag to this session's outstanding heartbeats; an unmatched
//!   one is logged and dropped.
//! - `ACK` goes to the dispatcher, which records it in the journal (matched by tag; a late or
//!   duplicate one is logged and dropped).
//! - `ERROR` with `revoked` or `protocol` ends the session; any other control message is logged
//!   and dropped. None of these is ever dispatched as an instruction.
//! - Everything else is an instruction and goes to the dispatcher.
//!
//! Nothing a control plane sends and no network condition ends the process: every failure ends
//! the session ([`SessionEnd::Failed`]) and the daemon reconnects after a backoff. The write
//! task's outcome has one owner (`WriteSide`), and [`run`] catches a panic of the session
//! itself (a bug) as a failed session, counted in `runos status`. Peer text (WELCOME's
//! `sessionId`, ERROR messages) reaches logs and status only through
//! [`runos_protocol::peertext`]; warnings a peer can trigger at will are rate-limited
//! ([`crate::logging::RateLimit`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use runos_protocol::control::{self, Heartbeat, HeartbeatReply, Welcome, types};
use runos_protocol::frame::{DecodeError, EncodeError};
use runos_protocol::peertext::{self, PeerText};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, Tag};
use runos_transport::{FrameError, FrameReader, FrameWriter};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::AbortOnDropHandle;

use crate::credentials::identity::NodeIdentity;
use crate::credentials::renew::{self, HandshakeError};
use crate::daemon::dispatch::{DispatchLink, Inbound, error_reply};
use crate::daemon::notify;
use crate::daemon::state::{AgentState, State};
use crate::logging::RateLimit;
use crate::net::{self, write_within};
use crate::util::fd_timer::FdTimer;

/// Bound on waiting for WELCOME after HELLO.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on one write of the frames ready together (`agent.write_timeout_secs`).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest peer message (an ERROR's) kept in a session end, a log line or the status.
use crate::credentials::renew::MAX_PEER_MESSAGE_CHARS;
/// Warnings about dropped control frames: at most this many lines per [`DROP_LOG_WINDOW`].
const DROP_LOG_BURST: u32 = 10;
/// See [`DROP_LOG_BURST`].
const DROP_LOG_WINDOW: Duration = Duration::from_secs(60);
/// Unexpected control frames, unmatched or unwanted `ERROR`s (WARN lines).
static DROPPED: RateLimit = RateLimit::new(DROP_LOG_BURST, DROP_LOG_WINDOW);
/// `HEARTBEAT_REPLY`s that match no outstanding heartbeat (DEBUG lines).
static UNMATCHED: RateLimit = RateLimit::new(DROP_LOG_BURST, DROP_LOG_WINDOW);
/// Smallest and largest heartbeat interval honoured.
pub const HEARTBEAT_MIN: Duration = Duration::from_secs(1);
/// See [`HEARTBEAT_MIN`].
pub const HEARTBEAT_MAX: Duration = Duration::from_secs(300);
/// Frames buffered between the select loop and the write task.
const WRITE_QUEUE: usize = 64;
/// Bytes of frames queued for the write task at most, besides the count bound: a control plane
/// that reads slowly or not at all holds at most this much of the agent's memory in the queue
/// (a frame larger than this waits until the queue is empty and then goes alone).
const WRITE_QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Replies looked up per page when resending the ones awaiting ACK after WELCOME; a page is also
/// cut once it holds [`WRITE_QUEUE_BYTES`].
const RESEND_PAGE: usize = 256;

/// The session's side of the write queue: bounded in frames and in bytes.
#[derive(Debug, Clone)]
struct WriteQueue {
    tx: mpsc::Sender<Queued>,
    budget: std::sync::Arc<tokio::sync::Semaphore>,
}

/// A queued frame with its share of the byte budget, given back once it is written.
#[derive(Debug)]
struct Queued {
    env: Envelope,
    _budget: tokio::sync::OwnedSemaphorePermit,
}

impl WriteQueue {
    fn new() -> (WriteQueue, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(WRITE_QUEUE_BYTES));
        (WriteQueue { tx, budget }, rx)
    }

    /// Queue `env`, waiting for room; false when the write task is gone.
    async fn send(&self, env: Envelope) -> bool {
        let cost = env
            .json_b64
            .len()
            .saturating_add(128) // type, tag and framing
            .min(WRITE_QUEUE_BYTES);
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        let Ok(permit) = self.budget.clone().acquire_many_owned(cost).await else {
            return false;
        };
        self.tx
            .send(Queued {
                env,
                _budget: permit,
            })
            .await
            .is_ok()
    }
}

/// What a session needs besides the dispatcher.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// Who we are and where to connect.
    pub identity: NodeIdentity,
    /// Largest frame we accept.
    pub max_frame_bytes: u32,
    /// Instruction types for HELLO.
    pub instruction_types: Vec<String>,
    /// Where the credentials live (a renewal stages and promotes there).
    pub paths: crate::config::Paths,
    /// Bound on one write ([`WRITE_TIMEOUT`] by default); beyond it the session ends.
    pub write_timeout: Duration,
    /// The agent's state (status, renewal, advertised version, clock offset).
    pub state: State,
}

/// A request to renew the certificate now (`runos certificate renew` through the admin
/// socket), answered when the renewal is done or has failed.
#[derive(Debug)]
pub struct RenewRequest {
    /// Where the outcome goes.
    pub respond: oneshot::Sender<Result<renew::Outcome, renew::RenewError>>,
}

/// Signals from the daemon.
#[derive(Debug)]
pub struct Control {
    /// Becomes true on SIGTERM/SIGINT.
    pub shutdown: watch::Receiver<bool>,
    /// Bumped when the configuration changed in a way that needs a new connection.
    pub reconnect: watch::Receiver<u64>,
    /// How long running instructions may take to finish after shutdown.
    pub grace: Duration,
    /// Requests to renew the certificate now.
    pub renew: mpsc::Receiver<RenewRequest>,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Shutdown: running instructions finished (or the grace ran out) and replies were sent.
    Shutdown,
    /// The control plane said the node is revoked.
    Revoked(String),
    /// The peers speak different protocol versions: retrying soon cannot help.
    Incompatible(String),
    /// The configuration changed; connect again now.
    Reconnect,
    /// The certificate was renewed and the new one proven: connect again now, with it.
    Renewed,
    /// Connection, handshake or peer failure; reconnect after a backoff.
    Failed(String),
    /// The server could not be reached or TLS failed before HELLO.
    ConnectFailed(String),
}

/// The outcome of [`run`].
#[derive(Debug, Clone)]
pub struct SessionReport {
    /// Why it ended.
    pub end: SessionEnd,
    /// When WELCOME arrived, if it did.
    pub welcomed_at: Option<Instant>,
}

fn now_ms() -> u64 {
    u64::try_from(crate::util::time::now_ms()).unwrap_or(0)
}

/// The heartbeat interval from WELCOME, clamped to 1 s – 300 s.
pub fn heartbeat_interval(ms: u64) -> Duration {
    Duration::from_millis(ms).clamp(HEARTBEAT_MIN, HEARTBEAT_MAX)
}

fn report(end: SessionEnd, welcomed_at: Option<Instant>) -> SessionReport {
    SessionReport { end, welcomed_at }
}

/// Resolves once shutdown is requested (or the daemon dropped its sender). Does not hold the
/// watch borrow across an await, so futures using it stay `Send`.
pub async fn until_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.is_ok();
}

/// Connect, handshake and serve one session until it ends. Never panics: a panic inside the
/// session (a bug) is caught, logged, counted in `runos status` and reported as
/// [`SessionEnd::Failed`], so it costs a reconnect, not the process.
pub async fn run(p: &SessionParams, link: &mut DispatchLink, ctl: &mut Control) -> SessionReport {
    match CatchUnwind(Some(Box::pin(session(p, link, ctl)))).await {
        Ok(rep) => rep,
        Err(msg) => {
            tracing::error!(
                "the session failed unexpectedly (a bug in the agent: {msg}); reconnecting"
            );
            p.state.status.session_panicked(&msg); // `runos status`
            report(
                SessionEnd::Failed(format!("the session failed unexpectedly: {msg}")),
                None,
            )
        }
    }
}

/// A future whose panic is caught and returned as its message (escaped and capped: a panic
/// message may quote anything). Polled again after it finished, it stays pending.
struct CatchUnwind<F>(Option<Pin<Box<F>>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(fut) = self.0.as_mut() else {
            return Poll::Pending;
        };
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx)));
        match res {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => {
                self.0 = None;
                Poll::Ready(Ok(v))
            }
            Err(payload) => {
                // Dropping the unwound future may panic again: contain that too.
                let fut = self.0.take();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(fut)));
                Poll::Ready(Err(panic_message(payload.as_ref())))
            }
        }
    }
}

/// The message of a panic payload, escaped and capped.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    peertext::clean(text, MAX_PEER_MESSAGE_CHARS)
}

/// A frame error as text safe for a log line, a session end and an `ERROR` to the peer: no
/// peer-supplied value (a JSON error can quote the offending input), on one line.
fn frame_error_text(e: &FrameError) -> String {
    match e {
        FrameError::Decode(DecodeError::Envelope(j)) => format!(
            "protocol error: frame is not a valid envelope ({:?} error at line {}, column {})",
            j.classify(),
            j.line(),
            j.column()
        ),
        FrameError::Io(io) => format!(
            "connection error: {}",
            PeerText::capped(&io.to_string(), MAX_PEER_MESSAGE_CHARS)
        ),
        other => other.to_string(),
    }
}

/// WELCOME's `sessionId` if it is clean, printable text of at most
/// [`crate::daemon::status::MAX_SESSION_ID_CHARS`] characters; otherwise it is ignored with a warning
/// (never logged or shown: it would forge log lines or repaint a terminal).
fn welcome_session_id(w: &Welcome) -> Option<&str> {
    let id = w.session_id.as_str();
    if id.is_empty() {
        return None;
    }
    if peertext::is_clean(id, crate::daemon::status::MAX_SESSION_ID_CHARS) {
        Some(id)
    } else {
        tracing::warn!(
            "WELCOME sessionId is not printable text of at most {} characters; ignored",
            crate::daemon::status::MAX_SESSION_ID_CHARS
        );
        None
    }
}

/// WELCOME's `advertisedAgentVersion`, parsed strictly as a release tag `vX.Y.Z` (protocol.md
/// §4); a malformed one is ignored with a warning (not stored, not shown, not installed).
fn welcome_advertised_version(w: &Welcome) -> Option<String> {
    let v = w.advertised_agent_version.as_deref()?;
    match crate::update::version::Version::parse_tag(v) {
        Ok(v) => Some(v.tag()),
        Err(_) => {
            tracing::warn!(
                "WELCOME advertisedAgentVersion is not a release version vMAJOR.MINOR.PATCH; ignored"
            );
            None
        }
    }
}

async fn session(p: &SessionParams, link: &mut DispatchLink, ctl: &mut Control) -> SessionReport {
    let id = &p.identity;
    let addr = net::addr(&id.host, id.port);
    let mut shutdown = ctl.shutdown.clone();
    let connect = net::connect_tls(
        &id.host,
        id.port,
        id.tls.clone(),
        runos_protocol::ALPN_L2SEC,
    );
    let tls = tokio::select! {
        r = connect => match r {
            Ok(s) => s,
            Err(e) => return report(SessionEnd::ConnectFailed(e.to_string()), None),
        },
        _ = until_shutdown(&mut shutdown) => return report(SessionEnd::Shutdown, None),
    };
    // The overlay never routes this address into its tunnel.
    if let Ok(peer) = tls.get_ref().0.peer_addr() {
        p.state.control_paths.connected(peer.ip());
    }
    let (r, w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, p.max_frame_bytes);
    let mut writer = FrameWriter::new(w, p.max_frame_bytes);

    // Handshake.
    let pending_replies = pending_tags(link).await;
    let hello_tag = Tag::random();
    let mut hello = renew::hello(id, p.instruction_types.clone(), pending_replies, false);
    hello.last_update = crate::update::state::report(&p.paths.state_dir);
    hello.wireguard_public_key = p.state.wireguard_public_key.get().cloned();
    let hello_sent_ms = now_ms();
    let hello_sent = Instant::now();
    let handshake = renew::handshake(
        &mut reader,
        &mut writer,
        &hello,
        hello_tag,
        p.write_timeout,
        WELCOME_TIMEOUT,
    );
    let welcome = match handshake.await {
        Ok(w) => w,
        Err(HandshakeError::Send(e)) => {
            return report(
                SessionEnd::Failed(format!("sending HELLO to {addr}: {}", frame_error_text(&e))),
                None,
            );
        }
        Err(HandshakeError::Closed) => {
            return report(
                SessionEnd::Failed(format!("{addr} closed the connection before WELCOME")),
                None,
            );
        }
        Err(HandshakeError::Read(e)) => {
            return report(
                SessionEnd::Failed(format!("waiting for WELCOME: {}", frame_error_text(&e))),
                None,
            );
        }
        Err(HandshakeError::NoAnswer(within)) => {
            return report(
                SessionEnd::Failed(format!(
                    "no WELCOME from {addr} within {} s",
                    within.as_secs()
                )),
                None,
            );
        }
        Err(HandshakeError::Refused(refused, first)) => {
            let end = session_end(refused);
            if let SessionEnd::Failed(m) = &end
                && first.is(types::WELCOME)
            {
                // A WELCOME we cannot work with: tell the control plane why (best effort).
                let refusal = error_reply(Tag::random(), ErrorCode::Protocol, m.clone());
                let _ = write_within(&mut writer, &refusal, Duration::from_secs(2)).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), writer.shutdown()).await;
            }
            return report(end, None);
        }
    };
    let welcomed_at = Instant::now();
    let rtt_ms = u64::try_from(hello_sent.elapsed().as_millis()).unwrap_or(u64::MAX);
    let offset_ms =
        crate::daemon::status::clock_offset_ms(welcome.server_time_ms, hello_sent_ms, rtt_ms);
    writer.set_max(welcome.max_frame_bytes);
    let interval = heartbeat_interval(welcome.heartbeat_interval_ms);
    let session_id = welcome_session_id(&welcome);
    tracing::info!(
        session = session_id.unwrap_or("-"),
        heartbeat_ms = interval.as_millis() as u64,
        clock_offset_ms = offset_ms,
        max_frame = welcome.max_frame_bytes,
        "connected to {addr}"
    );
    notify::status(&format!("connected to {addr}"));
    p.state.status.connected(&addr, session_id); // `runos status`
    p.state.control_paths.contact();
    p.state
        .set_advertised_version(welcome_advertised_version(&welcome));
    p.state.observe_clock_offset(offset_ms);
    let end = serve(p, reader, writer, link, ctl, interval).await;
    report(end, Some(welcomed_at))
}

/// The tags of the replies awaiting ACK, for HELLO (bounded by the dispatcher). Not connected
/// yet: replies and LOG lines the dispatcher produces meanwhile are drained and dropped (final
/// replies stay in the journal and are resent after WELCOME), so the dispatcher never waits on
/// a full reply channel while we wait on it. Empty if the dispatcher does not answer in time.
async fn pending_tags(link: &mut DispatchLink) -> Vec<String> {
    let (tx, mut rx) = oneshot::channel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut msg = Some(Inbound::PendingTags(tx));
    loop {
        tokio::select! {
            permit = link.inbound.reserve(), if msg.is_some() => match (permit, msg.take()) {
                (Ok(p), Some(m)) => p.send(m),
                _ => return Vec::new(),
            },
            tags = &mut rx, if msg.is_none() => {
                return tags.map(|t| t.iter().map(Tag::to_string).collect()).unwrap_or_default();
            }
            r = link.replies.recv() => if r.is_none() { return Vec::new() },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("the dispatcher did not list pending replies in time; HELLO lists none");
                return Vec::new();
            }
        }
    }
}

/// How a refused handshake ends the session.
fn session_end(refused: renew::Refused) -> SessionEnd {
    match refused {
        renew::Refused::Revoked(m) => SessionEnd::Revoked(m),
        renew::Refused::Incompatible(m) => SessionEnd::Incompatible(m),
        renew::Refused::Failed(m) => SessionEnd::Failed(m),
    }
}

/// Judge the answer to HELLO ([`renew::handshake_answer`], shared with the renewal probe).
#[cfg(test)]
fn handshake_answer(env: &Envelope, hello_tag: Tag) -> Result<Welcome, SessionEnd> {
    renew::handshake_answer(env, hello_tag).map_err(session_end)
}

type Reader =
    FrameReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;
type Writer =
    FrameWriter<tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;

/// Whether `env` is a final reply (as opposed to a `LOG` line or the agent's own control
/// messages), i.e. something the control plane must get an answer for.
fn is_final_reply(env: &Envelope) -> bool {
    !(env.is(types::LOG) || env.is(types::HEARTBEAT) || env.is(types::RENEW))
}

/// Bytes the write task pushes at most before it flushes, even if more frames are ready: one
/// write, a few TLS records.
const FLUSH_BYTES: usize = 64 * 1024;

/// The write task: sends queued frames. Every frame that is ready is pushed and the batch is
/// flushed once (one write, frames sharing TLS records) when the queue is empty or
/// [`FLUSH_BYTES`] are pushed; each flush must finish within `within`. The frames' share of the
/// queue's byte budget is given back once their flush is done. Returns when the queue closes
/// (after closing the stream) or with the error that ends the session.
async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<Queued>,
    within: Duration,
) -> Result<(), FrameError> {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(Queued {
            env,
            _budget: permit,
        }) = next.take()
        {
            push(&mut writer, &env)?;
            batch.push(permit);
            if writer.pending() < FLUSH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        flush_within(&mut writer, within).await?;
        batch.clear();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.shutdown()).await;
    Ok(())
}

/// Push `env` for the next flush. A frame above the peer's maximum is never sent (protocol.md
/// §7.6): a final reply that cannot fit is answered `internal` under its tag; a LOG line is
/// dropped.
fn push<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    env: &Envelope,
) -> Result<(), FrameError> {
    match writer.push(env) {
        Err(FrameError::Encode(EncodeError::TooLarge { len, max })) => {
            tracing::warn!(tag = %env.tag, r#type = %env.kind, len, max, "reply too large for the control plane's maximum frame size");
            if is_final_reply(env) {
                let sub = error_reply(
                    env.tag,
                    ErrorCode::Internal,
                    format!(
                        "the reply of {len} bytes exceeds the control plane's maximum frame size of {max} bytes"
                    ),
                );
                writer.push(&sub)?;
            }
            Ok(())
        }
        other => other,
    }
}

/// Send what was pushed, within `within`.
async fn flush_within<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    within: Duration,
) -> Result<(), FrameError> {
    match tokio::time::timeout(within, writer.flush()).await {
        Ok(r) => r,
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("frames could not be written within {} s", within.as_secs()),
        ))),
    }
}

/// The write task of one session and the only owner of its outcome. The task's handle never
/// leaves this struct: [`WriteSide::ended`] takes the outcome at most once (afterwards it stays
/// pending) and [`WriteSide::close`] consumes the side, so no path can await the task twice.
/// Dropped without `close` (a panic unwinding the session), it aborts the task.
/// The write task, aborted when dropped.
struct WriteSide {
    task: Option<AbortOnDropHandle<Result<(), FrameError>>>,
}

impl WriteSide {
    fn spawn(writer: Writer, rx: mpsc::Receiver<Queued>, within: Duration) -> WriteSide {
        WriteSide {
            task: Some(AbortOnDropHandle::new(tokio::spawn(write_loop(
                writer, rx, within,
            )))),
        }
    }

    /// Resolves when the write task ended on its own, with why; pending once taken. Cancel
    /// safe: dropped before the task ends, nothing is lost.
    async fn ended(&mut self) -> String {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let res = task.await;
        self.task = None;
        match res {
            Ok(Ok(())) => "the writer stopped".into(),
            Ok(Err(e)) => frame_error_text(&e),
            Err(e) if e.is_panic() => "the writer failed unexpectedly (panic)".into(),
            Err(_) => "the writer was stopped".into(),
        }
    }

    /// The session ended because a frame could not be queued (the write task is gone or going):
    /// why, from the task's outcome if it is there within a moment.
    async fn lost(&mut self) -> SessionEnd {
        match tokio::time::timeout(Duration::from_secs(1), self.ended()).await {
            Ok(why) => SessionEnd::Failed(format!("sending failed: {why}")),
            Err(_) => SessionEnd::Failed("connection lost".into()),
        }
    }

    /// The queue's sender is gone: let queued frames out within `grace` (the task then closes
    /// the stream), else abort the task.
    async fn close(mut self, grace: Duration) {
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

async fn serve(
    p: &SessionParams,
    mut reader: Reader,
    writer: Writer,
    link: &mut DispatchLink,
    ctl: &mut Control,
    interval: Duration,
) -> SessionEnd {
    let (wtx, wrx) = WriteQueue::new();
    let mut write = WriteSide::spawn(writer, wrx, p.write_timeout);
    let mut renewal = Renewal::new(p);
    let end = serve_loop(
        &wtx,
        &mut reader,
        &mut write,
        link,
        ctl,
        interval,
        &mut renewal,
    )
    .await;
    renewal.session_ended().await;
    drop(reader);
    drop(wtx);
    // Let queued frames out (bounded), then the write task closes the TLS stream.
    write.close(Duration::from_secs(5)).await;
    end
}

async fn serve_loop(
    wtx: &WriteQueue,
    reader: &mut Reader,
    write: &mut WriteSide,
    link: &mut DispatchLink,
    ctl: &mut Control,
    interval: Duration,
    renewal: &mut Renewal,
) -> SessionEnd {
    let send = |env: Envelope| wtx.send(env);

    // Resend every reply still waiting for an ACK, a page at a time (the journal may hold tens
    // of MiB of them; only a page and the write queue's budget are in memory at once).
    let (htx, hrx) = oneshot::channel();
    if link.inbound.send(Inbound::Held(htx)).await.is_ok()
        && let Ok(Ok(held)) = tokio::time::timeout(Duration::from_secs(5), hrx).await
    {
        if !held.is_empty() {
            tracing::info!(count = held.len(), "resending replies not yet acknowledged");
        }
        let mut rest = &held[..];
        while !rest.is_empty() {
            let (ptx, prx) = oneshot::channel();
            let page = Inbound::Replies {
                tags: rest[..rest.len().min(RESEND_PAGE)].to_vec(),
                max_bytes: WRITE_QUEUE_BYTES,
                respond: ptx,
            };
            if link.inbound.send(page).await.is_err() {
                return SessionEnd::Failed("dispatcher stopped".into());
            }
            let Ok(Ok((replies, looked))) = tokio::time::timeout(Duration::from_secs(5), prx).await
            else {
                tracing::warn!(
                    "the dispatcher did not hand over replies to resend in time; the rest go after the next reconnect"
                );
                break;
            };
            rest = &rest[looked.clamp(1, rest.len())..];
            for env in replies {
                if !send(env).await {
                    return write.lost().await;
                }
            }
        }
    }

    let dead_after = interval * 2;
    // The long timers are timerfds outside tokio's wheel (an idle agent is woken by the
    // heartbeat alone: see `util::fd_timer`), set on every turn (free when unchanged). The next
    // heartbeat is `interval` after the previous one was sent (a late tick is not made up).
    let mut next_heartbeat = tokio::time::Instant::now() + interval;
    let mut heartbeat_timer = FdTimer::new();
    let mut dead_timer = FdTimer::new();
    let mut renewal_timer = FdTimer::new();
    // Outstanding heartbeats: tag → when sent. Bounded: an entry older than `dead_after` ends
    // the session.
    let mut pending: HashMap<Tag, Sent> = HashMap::new();
    let mut draining: Option<tokio::time::Instant> = if *ctl.shutdown.borrow() {
        Some(tokio::time::Instant::now() + ctl.grace)
    } else {
        None
    };
    let mut drain_check = tokio::time::interval(Duration::from_millis(50));

    loop {
        heartbeat_timer.set(Some(next_heartbeat));
        dead_timer.set(
            pending
                .values()
                .map(|s| s.at)
                .min()
                .map(|oldest| oldest + dead_after),
        );
        renewal_timer.set((renewal.is_idle() && draining.is_none()).then_some(renewal.timer));
        tokio::select! {
            _ = heartbeat_timer.fired() => {
                next_heartbeat = tokio::time::Instant::now() + interval;
                let tag = Tag::random();
                let hb = Heartbeat {
                    sent_at_ms: now_ms(),
                    in_flight: u32::try_from(*link.in_flight.borrow()).unwrap_or(u32::MAX),
                };
                pending.insert(tag, Sent { at: tokio::time::Instant::now(), wall_ms: hb.sent_at_ms });
                tracing::trace!(%tag, "heartbeat");
                if !send(Envelope::with_type(types::HEARTBEAT, tag, &hb)).await {
                    return write.lost().await;
                }
            }
            _ = dead_timer.fired() => {
                tracing::warn!("no HEARTBEAT_REPLY within {} ms: the control plane is unreachable; reconnecting", dead_after.as_millis());
                return SessionEnd::Failed(format!("no HEARTBEAT_REPLY within {} ms", dead_after.as_millis()));
            }
            // Cancellation safe: bytes of a frame read so far stay in the reader's buffer.
            frame = reader.read() => match frame {
                Ok(Some(env)) => match route(env, &mut pending, renewal.asked_tag(), &renewal.state) {
                    Routed::End(end) => return end,
                    Routed::Nothing => {}
                    Routed::Renew(env) => {
                        if let Some(end) = renewal.answered(&env) {
                            return end;
                        }
                    }
                    Routed::Forward(msg) => {
                        // Never wait on the dispatcher without draining its replies: it may
                        // itself be waiting for room in the reply channel.
                        let mut msg = Some(msg);
                        while let Some(m) = msg.take() {
                            tokio::select! {
                                permit = link.inbound.reserve() => match permit {
                                    Ok(p) => p.send(m),
                                    Err(_) => return SessionEnd::Failed("dispatcher stopped".into()),
                                },
                                reply = link.replies.recv() => {
                                    msg = Some(m);
                                    match reply {
                                        Some(env) => {
                                            if !send(env).await {
                                                return write.lost().await;
                                            }
                                        }
                                        None => return SessionEnd::Failed("dispatcher stopped".into()),
                                    }
                                }
                            }
                        }
                    }
                },
                Err(e) => {
                    let why = frame_error_text(&e);
                    tracing::warn!("closing the session: {why}");
                    if matches!(e, FrameError::Decode(_)) {
                        let _ = send(error_reply(Tag::random(), ErrorCode::Protocol, format!("agent received an invalid frame: {why}"))).await;
                    }
                    return SessionEnd::Failed(why);
                }
                Ok(None) => return SessionEnd::Failed("the control plane closed the connection".into()),
            },
            reply = link.replies.recv() => match reply {
                Some(env) => {
                    if !send(env).await {
                        return write.lost().await;
                    }
                }
                None => return SessionEnd::Failed("dispatcher stopped".into()),
            },
            why = write.ended() => return SessionEnd::Failed(format!("sending failed: {why}")),
            _ = until_shutdown(&mut ctl.shutdown), if draining.is_none() => {
                tracing::info!("shutting down: waiting for running instructions (at most {} s)", ctl.grace.as_secs());
                draining = Some(tokio::time::Instant::now() + ctl.grace);
            }
            _ = ctl.reconnect.changed() => {
                tracing::info!("configuration changed: reconnecting");
                return SessionEnd::Reconnect;
            }
            _ = renewal_timer.fired() => {
                if let Some(env) = renewal.start() && !send(env).await {
                    return write.lost().await;
                }
            }
            req = ctl.renew.recv(), if renewal.requests_open => match req {
                Some(req) => {
                    if draining.is_some() {
                        let _ = req.respond.send(Err(renew::RenewError::Failed("the agent is shutting down".into())));
                    } else {
                        renewal.waiters.push(req.respond);
                        if renewal.is_idle() && let Some(env) = renewal.start() && !send(env).await {
                            return write.lost().await;
                        }
                    }
                }
                None => renewal.requests_open = false,
            },
            _ = tokio::time::sleep_until(renewal.answer_deadline()), if renewal.is_asked() => {
                if let Some(end) = renewal.fail(renew::RenewError::Failed(format!(
                    "no answer to RENEW within {} s", renew::ANSWER_TIMEOUT.as_secs()
                ))) {
                    return end;
                }
            }
            res = renewal.proving(), if renewal.is_proving() => {
                if let Some(end) = renewal.proven(res) {
                    return end;
                }
            }
            _ = drain_check.tick(), if draining.is_some() => {
                if *link.in_flight.borrow() == 0 && link.replies.is_empty() {
                    return SessionEnd::Shutdown;
                }
                if draining.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    tracing::warn!("shutdown grace over; aborting running instructions");
                    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                    if link.inbound.send(Inbound::AbortAll(done_tx)).await.is_ok() {
                        let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
                    }
                    // Forward every reply produced, the `interrupted` ones included.
                    while let Ok(env) = link.replies.try_recv() {
                        let _ = send(env).await;
                    }
                    return SessionEnd::Shutdown;
                }
            }
        }
    }
}

/// Route one envelope received after WELCOME. Pure: forwarding to the dispatcher is the
/// caller's job, so the caller can keep draining replies while it waits.
fn route(
    env: Envelope,
    pending: &mut HashMap<Tag, Sent>,
    renew_tag: Option<Tag>,
    state: &AgentState,
) -> Routed {
    let tag = env.tag;
    if renew_tag == Some(tag) && (env.is(types::RENEWED) || env.is(types::ERROR)) {
        return Routed::Renew(env);
    }
    match env.kind.as_str() {
        types::HEARTBEAT_REPLY => match pending.remove(&tag) {
            Some(sent) => {
                let rtt_ms = u64::try_from(sent.at.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::trace!(%tag, rtt_ms, "heartbeat answered");
                state.status.round_trip(); // `runos status`
                state.control_paths.contact(); // a VIP lease counts from here
                match env.payload::<HeartbeatReply>() {
                    Ok(r) => state.observe_clock_offset(crate::daemon::status::clock_offset_ms(
                        r.server_time_ms,
                        sent.wall_ms,
                        rtt_ms,
                    )),
                    Err(_) => {
                        tracing::debug!(%tag, "HEARTBEAT_REPLY without a readable server time")
                    }
                }
                // An answer proves the peer alive: older unanswered heartbeats are moot.
                pending.retain(|_, t| t.at > sent.at);
            }
            None => {
                let v = UNMATCHED.check();
                if v.write() {
                    tracing::debug!(%tag, "HEARTBEAT_REPLY matches no outstanding heartbeat (late or unknown); dropped{v}")
                }
            }
        },
        types::ACK => return Routed::Forward(Inbound::Ack(tag)),
        types::ERROR => {
            let e: Option<ErrorPayload> = env.payload().ok();
            match e {
                Some(e) if e.code == ErrorCode::Revoked => {
                    return Routed::End(SessionEnd::Revoked(peertext::clean(
                        &e.message,
                        MAX_PEER_MESSAGE_CHARS,
                    )));
                }
                Some(e) if e.code == ErrorCode::Protocol => {
                    return Routed::End(SessionEnd::Failed(format!(
                        "the control plane reported a protocol error: {}",
                        PeerText::capped(&e.message, MAX_PEER_MESSAGE_CHARS)
                    )));
                }
                Some(e) => {
                    let v = DROPPED.check();
                    if v.write() {
                        tracing::warn!(%tag, code = %e.code, "ERROR from the control plane dropped: {}{v}", PeerText::capped(&e.message, MAX_PEER_MESSAGE_CHARS))
                    }
                }
                None => {
                    let v = DROPPED.check();
                    if v.write() {
                        tracing::warn!(%tag, "unreadable ERROR from the control plane dropped{v}")
                    }
                }
            }
        }
        k if control::is_control_type(k) => {
            let v = DROPPED.check();
            if v.write() {
                tracing::warn!(%tag, r#type = k, "unexpected control message after WELCOME; dropped{v}");
            }
        }
        _ => return Routed::Forward(Inbound::Instruction(env)),
    }
    Routed::Nothing
}

/// The renewal state of one session (see [`crate::credentials::renew`]).
struct Renewal {
    /// The agent's state (renewal state, clock offset).
    state: State,
    identity: NodeIdentity,
    paths: crate::config::Paths,
    max_frame: u32,
    /// When the next automatic renewal starts.
    timer: tokio::time::Instant,
    phase: RenewPhase,
    /// `runos certificate renew` callers waiting for the outcome.
    waiters: Vec<oneshot::Sender<Result<renew::Outcome, renew::RenewError>>>,
    /// `busy` answers in a row for the current renewal.
    busy: u32,
    /// Whether the request channel is still open.
    requests_open: bool,
    /// The cross-certificate of the renewal being proven, for the L1Sec pin once promoted.
    endorsement: Option<String>,
}

enum RenewPhase {
    Idle,
    /// RENEW sent; waiting for RENEWED.
    Asked {
        tag: Tag,
        key_pem: String,
        public_key: Vec<u8>,
        deadline: tokio::time::Instant,
    },
    /// The new set is being staged, proven and promoted.
    Proving(tokio::task::JoinHandle<Result<renew::Outcome, renew::RenewError>>),
}

impl Renewal {
    fn new(p: &SessionParams) -> Renewal {
        // Only an offset within the bound moves the renewal: a WELCOME claiming a time weeks
        // ahead must not make the agent renew at once.
        let offset = p.state.trusted_clock_offset();
        let due = p.state.renewal.due_in(&p.identity, offset);
        tracing::debug!(
            due_in_secs = due.as_secs(),
            serial = %p.identity.serial_hex,
            "certificate renewal scheduled"
        );
        Renewal {
            identity: p.identity.clone(),
            paths: p.paths.clone(),
            max_frame: p.max_frame_bytes,
            timer: tokio::time::Instant::now() + due,
            phase: RenewPhase::Idle,
            waiters: Vec::new(),
            busy: 0,
            requests_open: true,
            endorsement: None,
            state: p.state.clone(),
        }
    }

    fn is_idle(&self) -> bool {
        matches!(self.phase, RenewPhase::Idle)
    }

    fn is_asked(&self) -> bool {
        matches!(self.phase, RenewPhase::Asked { .. })
    }

    fn is_proving(&self) -> bool {
        matches!(self.phase, RenewPhase::Proving(_))
    }

    fn asked_tag(&self) -> Option<Tag> {
        match &self.phase {
            RenewPhase::Asked { tag, .. } => Some(*tag),
            _ => None,
        }
    }

    fn answer_deadline(&self) -> tokio::time::Instant {
        match &self.phase {
            RenewPhase::Asked { deadline, .. } => *deadline,
            _ => tokio::time::Instant::now(),
        }
    }

    fn lifetime(&self) -> i64 {
        self.identity.not_after - self.identity.not_before
    }

    /// Start a renewal: the `RENEW` to send, or `None` if the request could not be made.
    fn start(&mut self) -> Option<Envelope> {
        let (key_pem, csr_pem, public_key) = match renew::new_request() {
            Ok(r) => r,
            Err(e) => {
                let _ = self.fail(e);
                return None;
            }
        };
        let tag = Tag::random();
        tracing::info!(
            serial = %self.identity.serial_hex,
            %tag,
            "renewing the certificate"
        );
        self.state.renewal.started();
        self.phase = RenewPhase::Asked {
            tag,
            key_pem,
            public_key,
            deadline: tokio::time::Instant::now() + renew::ANSWER_TIMEOUT,
        };
        Some(Envelope::with_type(
            types::RENEW,
            tag,
            &control::Renew { csr_pem },
        ))
    }

    /// The control plane answered `RENEW`.
    fn answered(&mut self, env: &Envelope) -> Option<SessionEnd> {
        let RenewPhase::Asked {
            key_pem,
            public_key,
            ..
        } = std::mem::replace(&mut self.phase, RenewPhase::Idle)
        else {
            return None;
        };
        // Judged before anything is staged: trust continuity, node, key, validity, lifetime.
        let accepted = renew::renew_answer(env).and_then(|r| {
            renew::check_renewed(
                &r,
                &self.identity,
                key_pem,
                &public_key,
                renew::judging_now_s(self.state.trusted_clock_offset()),
            )
        });
        match accepted {
            Ok(acc) => {
                self.endorsement = acc.endorsement;
                let task = renew::switch_to(
                    acc.set,
                    self.paths.clone(),
                    self.identity.host.clone(),
                    self.identity.port,
                    self.max_frame,
                    Some(self.identity.serial_hex.clone()),
                );
                self.phase = RenewPhase::Proving(tokio::spawn(task));
                None
            }
            // Asked to come back in a moment: not a failure; the callers keep waiting.
            Err(renew::RenewError::Busy(m)) if self.busy < renew::BUSY_RETRIES => {
                self.busy += 1;
                tracing::debug!("renewal: control plane busy ({m}); trying again");
                self.timer = tokio::time::Instant::now() + renew::BUSY_RETRY;
                None
            }
            Err(e) => self.fail(e),
        }
    }

    /// Wait for the proving task (only called while proving).
    async fn proving(&mut self) -> Result<renew::Outcome, renew::RenewError> {
        match &mut self.phase {
            RenewPhase::Proving(h) => match h.await {
                Ok(r) => r,
                Err(e) => Err(renew::RenewError::Failed(format!(
                    "the renewal task failed: {e}"
                ))),
            },
            _ => std::future::pending().await,
        }
    }

    /// The proving task finished.
    fn proven(&mut self, res: Result<renew::Outcome, renew::RenewError>) -> Option<SessionEnd> {
        self.phase = RenewPhase::Idle;
        self.busy = 0;
        match res {
            Ok(out) => {
                self.state.renewal.succeeded(self.endorsement.take());
                tracing::info!(
                    old_serial = %self.identity.serial_hex,
                    serial = %out.serial_hex,
                    "certificate renewed; reconnecting with it"
                );
                for w in self.waiters.drain(..) {
                    let _ = w.send(Ok(out.clone()));
                }
                Some(SessionEnd::Renewed)
            }
            Err(e) => self.fail(e),
        }
    }

    /// A renewal failed: keep the current certificate, back off, tell the waiters. A revoked
    /// node ends the session.
    fn fail(&mut self, e: renew::RenewError) -> Option<SessionEnd> {
        self.phase = RenewPhase::Idle;
        self.busy = 0;
        self.endorsement = None;
        let delay = self.state.renewal.failed(&e.to_string(), self.lifetime());
        self.timer = tokio::time::Instant::now() + delay;
        tracing::warn!(
            retry_in_secs = delay.as_secs(),
            "certificate renewal failed (the current certificate stays in use): {e}"
        );
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(e.clone()));
        }
        match e {
            renew::RenewError::Revoked(m) => Some(SessionEnd::Revoked(m)),
            _ => None,
        }
    }

    /// The session ended: finish a renewal that is being proven (bounded: the probe has its
    /// own deadline), forget one that was only asked.
    async fn session_ended(&mut self) {
        match std::mem::replace(&mut self.phase, RenewPhase::Idle) {
            RenewPhase::Idle => {}
            RenewPhase::Asked { .. } => {
                self.state.renewal.interrupted();
                let e = renew::RenewError::Unreachable(
                    "the session ended before the control plane answered; the renewal is retried once connected".into(),
                );
                for w in self.waiters.drain(..) {
                    let _ = w.send(Err(e.clone()));
                }
            }
            RenewPhase::Proving(h) => {
                let res = match tokio::time::timeout(renew::PROBE_TIMEOUT * 2, h).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(renew::RenewError::Failed(format!(
                        "the renewal task failed: {e}"
                    ))),
                    Err(_) => Err(renew::RenewError::Failed(
                        "the renewal did not finish in time".into(),
                    )),
                };
                let _ = self.proven(res);
            }
        }
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(renew::RenewError::Unreachable(
                "the session ended; the renewal is retried once connected".into(),
            )));
        }
    }
}

/// An outstanding heartbeat.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// When sent (monotonic: the round trip).
    at: tokio::time::Instant,
    /// The node's wall clock when sent (`sentAtMs`), for the clock offset.
    wall_ms: u64,
}

/// What to do with a routed envelope.
enum Routed {
    /// Nothing more (matched, logged or dropped).
    Nothing,
    /// Hand this to the dispatcher.
    Forward(Inbound),
    /// The answer to this session's `RENEW`.
    Renew(Envelope),
    /// End the session.
    End(SessionEnd),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_the_session_is_caught_as_its_message() {
        let r = CatchUnwind(Some(Box::pin(async { panic!("boom \n\u{1b}[2J") }))).await;
        assert_eq!(r, Err::<(), _>("boom \\u{a}\\u{1b}[2J".to_string()));
        let ok = CatchUnwind(Some(Box::pin(async { 7 }))).await;
        assert_eq!(ok, Ok(7));
    }

    #[tokio::test]
    async fn the_write_outcome_is_taken_once_and_never_awaited_twice() {
        let mut w = WriteSide {
            task: Some(AbortOnDropHandle::new(tokio::spawn(async {
                Err(FrameError::Truncated)
            }))),
        };
        assert!(w.ended().await.contains("middle of a frame"));
        // Taken: every later look is pending, never a second await of the handle.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), w.ended())
                .await
                .is_err()
        );
        assert_eq!(w.lost().await, SessionEnd::Failed("connection lost".into()));
        w.close(Duration::from_millis(20)).await;

        // A panicking writer is an ended writer, not a panicking session.
        let mut w = WriteSide {
            task: Some(AbortOnDropHandle::new(tokio::spawn(async {
                panic!("writer bug")
            }))),
        };
        assert!(w.ended().await.contains("panic"));

        // Closing a writer that does not finish aborts it within the grace.
        let w = WriteSide {
            task: Some(AbortOnDropHandle::new(tokio::spawn(std::future::pending()))),
        };
        w.close(Duration::from_millis(20)).await;
    }

    /// Counts flushes (one per batch the write task sends).
    struct Counting {
        inner: tokio::io::DuplexStream,
        flushes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl tokio::io::AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.flushes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn padded(kind: &str, pad: usize) -> Envelope {
        Envelope::new(
            runos_protocol::MessageType::new(kind).unwrap(),
            Tag::random(),
            &serde_json::json!({ "pad": "x".repeat(pad) }),
        )
    }

    /// Run the write task over `frames` queued at once; what the peer reads and how many
    /// flushes it took.
    async fn write_all_queued(frames: &[Envelope], max: u32) -> (Vec<Envelope>, usize) {
        let (a, b) = tokio::io::duplex(8 << 20);
        let flushes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer = FrameWriter::new(
            Counting {
                inner: a,
                flushes: flushes.clone(),
            },
            max,
        );
        let (q, rx) = WriteQueue::new();
        for f in frames {
            assert!(q.send(f.clone()).await);
        }
        drop(q);
        write_loop(writer, rx, Duration::from_secs(5))
            .await
            .unwrap();
        let mut reader = FrameReader::new(b, 1 << 20);
        let mut got = Vec::new();
        while let Some(env) = reader.read().await.unwrap() {
            got.push(env);
        }
        (got, flushes.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Frames that are ready together leave in one flush, in order; past the byte budget the
    /// batch is cut; a final reply over the peer's maximum is answered `internal` in its place
    /// and a LOG line over it is dropped.
    #[tokio::test]
    async fn ready_frames_are_coalesced_in_order() {
        let small: Vec<Envelope> = (0..10).map(|i| padded("NODE_STATUS", i * 10)).collect();
        let (got, flushes) = write_all_queued(&small, 1 << 20).await;
        assert_eq!(got, small);
        assert_eq!(flushes, 1, "ten small frames ready at once: one write");

        let big: Vec<Envelope> = (0..8).map(|_| padded("NODE_STATUS", 20_000)).collect();
        let (got, flushes) = write_all_queued(&big, 1 << 20).await;
        assert_eq!(got, big);
        assert!(
            (2..big.len()).contains(&flushes),
            "{flushes} flushes for {} frames of ~27 KiB",
            big.len()
        );

        let reply = padded("NODE_STATUS", 10);
        let too_large = padded("NODE_STATUS", 70_000);
        let log = padded(types::LOG, 70_000);
        let after = padded("NODE_STATUS", 10);
        let frames = [reply.clone(), too_large.clone(), log, after.clone()];
        let (got, _) = write_all_queued(&frames, 65_536).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], reply);
        assert!(got[1].is(types::ERROR) && got[1].tag == too_large.tag);
        let e: ErrorPayload = got[1].payload().unwrap();
        assert_eq!(e.code, ErrorCode::Internal);
        assert_eq!(got[2], after);
    }

    #[test]
    fn frame_errors_never_quote_the_peer() {
        // serde_json quotes the offending value: "invalid type: string \"SECRET…\"".
        let bad = serde_json::from_slice::<Envelope>(
            br#"{"type": "PING", "tag": "00000000-0000-4000-8000-000000000001", "jsonB64": "", "timeoutMs": "SECRET\n\u001b"}"#,
        )
        .unwrap_err();
        assert!(bad.to_string().contains("SECRET"), "{bad}");
        let t = frame_error_text(&FrameError::Decode(DecodeError::Envelope(bad)));
        assert!(!t.contains("SECRET"), "{t}");
        assert!(t.contains("not a valid envelope"), "{t}");
    }

    #[test]
    fn welcome_fields_are_checked() {
        let mut w = Welcome {
            protocol_version: runos_protocol::PROTOCOL_VERSION,
            server_time_ms: 0,
            heartbeat_interval_ms: 1000,
            max_frame_bytes: 65536,
            advertised_agent_version: Some("v1.2.3".into()),
            session_id: "abc-123".into(),
        };
        assert_eq!(welcome_session_id(&w), Some("abc-123"));
        assert_eq!(welcome_advertised_version(&w).as_deref(), Some("v1.2.3"));
        for bad in [
            "1.2.3",
            "v1.2",
            "v01.2.3",
            "v1.2.3-rc1",
            "v1.2.3\n",
            "../../x",
        ] {
            w.advertised_agent_version = Some(bad.into());
            assert_eq!(welcome_advertised_version(&w), None, "{bad:?}");
        }
        for bad in ["a\nb", "\u{1b}[31m", &"x".repeat(129), ""] {
            w.session_id = bad.into();
            assert_eq!(welcome_session_id(&w), None, "{bad:?}");
        }
    }

    #[test]
    fn heartbeat_interval_is_clamped() {
        assert_eq!(heartbeat_interval(0), Duration::from_secs(1));
        assert_eq!(heartbeat_interval(15_000), Duration::from_secs(15));
        assert_eq!(heartbeat_interval(u64::MAX), Duration::from_secs(300));
    }

    #[test]
    fn handshake_answers() {
        let t = Tag::random();
        let w = Welcome {
            protocol_version: runos_protocol::PROTOCOL_VERSION,
            server_time_ms: 0,
            heartbeat_interval_ms: 1000,
            max_frame_bytes: 65536,
            advertised_agent_version: None,
            session_id: "s".into(),
        };
        assert!(handshake_answer(&Envelope::with_type(types::WELCOME, t, &w), t).is_ok());
        // A maximum frame size below the protocol's floor is a protocol error.
        let mut tiny = w.clone();
        tiny.max_frame_bytes = runos_protocol::MIN_MAX_FRAME_BYTES - 1;
        match handshake_answer(&Envelope::with_type(types::WELCOME, t, &tiny), t) {
            Err(SessionEnd::Failed(m)) => assert!(m.contains("floor"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A peer's message is escaped and capped before it reaches a session end.
        let forged = Envelope::with_type(
            types::ERROR,
            t,
            &ErrorPayload::new(
                ErrorCode::Revoked,
                format!("x\n\u{1b}[31mINFO forged{}", "y".repeat(5000)),
            ),
        );
        match handshake_answer(&forged, t) {
            Err(SessionEnd::Revoked(m)) => {
                assert!(!m.contains('\n') && !m.contains('\u{1b}'), "{m}");
                assert!(m.chars().count() < 300, "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            handshake_answer(&Envelope::with_type(types::WELCOME, Tag::random(), &w), t).is_err()
        );
        let revoked = Envelope::with_type(
            types::ERROR,
            t,
            &ErrorPayload::new(ErrorCode::Revoked, "gone"),
        );
        assert_eq!(
            handshake_answer(&revoked, t).unwrap_err(),
            SessionEnd::Revoked("gone".into())
        );
        let mut old = w.clone();
        old.protocol_version = 99;
        assert!(matches!(
            handshake_answer(&Envelope::with_type(types::WELCOME, t, &old), t),
            Err(SessionEnd::Incompatible(_))
        ));
        let refused = Envelope::with_type(
            types::ERROR,
            t,
            &ErrorPayload::new(ErrorCode::VersionMismatch, "speaks 2"),
        );
        assert_eq!(
            handshake_answer(&refused, t).unwrap_err(),
            SessionEnd::Incompatible("speaks 2".into())
        );
    }
}
