//! L2Sec: the instruction stream (mutual TLS 1.3) and the per-node session registry.
//!
//! One live session per node: a new session replaces (closes) the old one; revocation closes
//! the live session at once. After WELCOME every instruction of the node without a stored final
//! reply is sent (again, same tag), oldest first; later instructions follow as they are stored.
//!
//! Flow control: at most `max_in_flight` instructions per session are sent and not yet finally
//! answered; more are sent as final replies come in, a few at a time between reads, so that
//! heartbeats and ACKs never wait behind a long backlog. An `ERROR` `busy` or `shutting_down`
//! is not a final reply: it is acknowledged but not stored, and the instruction is sent again
//! (same tag, same envelope) after a delay, 1 s doubling per refusal up to 30 s. The waiting
//! instruction keeps its place in the window; if the session ends first, it is still pending in
//! the database and the next WELCOME sends it again.
//!
//! Batches: the inbound frames already received are handled together (up to [`BATCH_FRAMES`]),
//! their final replies stored in one transaction, and their answers (ACKs, HEARTBEAT_REPLY,
//! ...) pushed only after it commits: no ACK ever leaves before its reply is stored. Frames
//! going out are pushed into the writer and written together, in one write (and one TLS record
//! where they fit), once no more instructions are ready to be pushed at once. Nothing is
//! written to the database when an instruction is sent.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use runos_protocol::control::{self, HeartbeatReply, Hello, LogLevel, LogLine, Welcome, types};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, MessageType, Tag};
use runos_transport::{FrameError, FrameReader, FrameWriter};
use tokio::io::{AsyncWrite, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::db::Stored;
use crate::listen::{self, PerSource, RateLimited, SourceSlot};
use crate::server::{FdPlan, HANDSHAKE_TIMEOUT, Shared, shutdown_signalled};
use crate::util;

/// Longest time one write (of the frames pushed since the last one) may take before the
/// session is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most instructions taken from the database (one read) between two looks at the inbound
/// frames.
const SEND_CHUNK: usize = 64;
/// Most inbound frames handled in a row while instructions are ready to be sent. Reading first
/// lets final replies free several slots, refilled with one database read.
const READS_BEFORE_SEND: usize = 256;
/// Most inbound frames handled as one batch: their final replies are stored in one
/// transaction, and their ACKs written after it commits.
const BATCH_FRAMES: usize = 256;
/// A batch takes no further frame once its frames hold this many bytes.
const BATCH_BYTES: usize = 1024 * 1024;
/// Frames pushed are written (one TLS record where they fit, one `write`) when nothing more is
/// ready to go out, or once they hold this many bytes.
const FLUSH_BYTES: usize = 64 * 1024;
/// First delay before resending an instruction the agent refused (`busy`, `shutting_down`).
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest delay before resending a refused instruction.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Most probe sessions a node may have open at once.
pub(crate) const MAX_PROBES_PER_NODE: usize = 2;
/// Longest life of a probe session.
const PROBE_MAX: Duration = Duration::from_secs(60);
/// Shortest time between two certificates of one node, whatever the sessions (enrolment
/// included).
const RENEW_NODE_INTERVAL: Duration = Duration::from_secs(2);
/// Shortest time between two renewals on one session.
const RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// Why a session was closed from our side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// A newer session of the same node took over.
    Replaced,
    /// The node was revoked.
    Revoked,
    /// The control plane is stopping.
    Shutdown,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    close: watch::Sender<Option<CloseReason>>,
    wake: Arc<Notify>,
}

/// The live sessions, by node id.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    inner: Mutex<HashMap<String, Entry>>,
    next: AtomicU64,
    /// Live probe sessions per node.
    probes: Mutex<HashMap<String, usize>>,
}

struct Registration {
    id: u64,
    close: watch::Receiver<Option<CloseReason>>,
    wake: Arc<Notify>,
    /// A detached registration keeps its own sender, since a dropped sender reads as closed.
    _detached: Option<watch::Sender<Option<CloseReason>>>,
    /// A probe session's slot in the per-node count, released on drop.
    _probe: Option<ProbeSlot>,
}

/// One probe session of a node, counted while it lives.
struct ProbeSlot {
    sessions: Arc<Sessions>,
    node: String,
}

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        let mut probes = self
            .sessions
            .probes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = probes.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                probes.remove(&self.node);
            }
        }
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, node: &str) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let wake = Arc::new(Notify::new());
        let old = self.lock().insert(
            node.to_string(),
            Entry {
                id,
                close: tx,
                wake: wake.clone(),
            },
        );
        if let Some(old) = old {
            let _ = old.close.send(Some(CloseReason::Replaced));
        }
        Registration {
            id,
            close: rx,
            wake,
            _detached: None,
            _probe: None,
        }
    }

    /// A registration that is not in the registry (probe sessions): nothing replaces or
    /// wakes it; it closes on shutdown, and its session checks revocation on every frame.
    /// `None` when the node already has [`MAX_PROBES_PER_NODE`] probe sessions.
    fn detached(self: &Arc<Self>, node: &str) -> Option<Registration> {
        {
            let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
            let n = probes.entry(node.to_string()).or_insert(0);
            if *n >= MAX_PROBES_PER_NODE {
                return None;
            }
            *n += 1;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        Some(Registration {
            id,
            close: rx,
            wake: Arc::new(Notify::new()),
            _detached: Some(tx),
            _probe: Some(ProbeSlot {
                sessions: self.clone(),
                node: node.to_string(),
            }),
        })
    }

    fn deregister(&self, node: &str, id: u64) {
        let mut map = self.lock();
        if map.get(node).is_some_and(|e| e.id == id) {
            map.remove(node);
        }
    }

    /// Close the node's live session, if any.
    pub(crate) fn close(&self, node: &str, reason: CloseReason) {
        if let Some(e) = self.lock().remove(node) {
            let _ = e.close.send(Some(reason));
        }
    }

    /// Close every session.
    pub(crate) fn close_all(&self, reason: CloseReason) {
        for (_, e) in self.lock().drain() {
            let _ = e.close.send(Some(reason));
        }
    }

    /// Tell the node's session that new instructions are stored.
    pub(crate) fn wake(&self, node: &str) {
        if let Some(e) = self.lock().get(node) {
            e.wake.notify_one();
        }
    }

    /// Whether the node has a live session.
    pub(crate) fn is_online(&self, node: &str) -> bool {
        self.lock().contains_key(node)
    }
}

/// L2Sec capacity. A connection holds a handshake slot from accept until its session is
/// admitted (WELCOME sent) or refused, and a session slot from its HELLO until the session
/// ends, so idle handshakes never hold sessions out and sessions never hold handshakes out.
#[derive(Debug)]
pub(crate) struct Limits {
    /// Live sessions (probe sessions included).
    max_sessions: u32,
    /// What `--max-sessions` asked for (more than `max_sessions` when the open-file limit cut
    /// it).
    asked_sessions: u32,
    sessions: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    per_source: Arc<PerSource>,
    full: RateLimited,
    source_full: RateLimited,
}

impl Limits {
    pub(crate) fn new(plan: &FdPlan, asked_sessions: u32, per_source: u32) -> Self {
        let n = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
        Limits {
            max_sessions: plan.sessions,
            asked_sessions,
            sessions: Arc::new(Semaphore::new(n(plan.sessions))),
            handshakes: Arc::new(Semaphore::new(n(plan.handshakes))),
            per_source: PerSource::new(per_source),
            full: RateLimited::new(),
            source_full: RateLimited::new(),
        }
    }

    /// A session slot, or `None` at the ceiling (logged at most once per
    /// [`listen::WARN_EVERY`]).
    fn session_slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.sessions.clone().try_acquire_owned() {
            return Some(p);
        }
        if let Some(suppressed) = self.full.check() {
            if self.max_sessions < self.asked_sessions {
                tracing::warn!(
                    max_sessions = self.max_sessions,
                    asked = self.asked_sessions,
                    refused_since_last_line = suppressed,
                    "L2Sec: session limit reached ({} sessions: --max-sessions {}, lowered by the \
                     open-file limit); new sessions are refused with ERROR busy; raise the hard \
                     open-file limit (LimitNOFILE=) to admit more",
                    self.max_sessions,
                    self.asked_sessions
                );
            } else {
                tracing::warn!(
                    max_sessions = self.max_sessions,
                    refused_since_last_line = suppressed,
                    "L2Sec: session limit reached ({} sessions); new sessions are refused with \
                     ERROR busy; raise --max-sessions to admit more",
                    self.max_sessions
                );
            }
        }
        None
    }

    /// A handshake slot of the connection's source address, or `None` when it has too many
    /// (logged at most once per [`listen::WARN_EVERY`]).
    fn source_slot(&self, peer: Option<std::net::SocketAddr>) -> Result<Option<SourceSlot>, ()> {
        let Some(peer) = peer else { return Ok(None) };
        match self.per_source.try_take(peer.ip()) {
            Some(s) => Ok(Some(s)),
            None => {
                if let Some(suppressed) = self.source_full.check() {
                    tracing::warn!(
                        source = %peer.ip(),
                        max = self.per_source.max(),
                        closed_since_last_line = suppressed,
                        "L2Sec: too many handshakes from one address; connection closed \
                         (--max-handshakes-per-source)"
                    );
                }
                Err(())
            }
        }
    }
}

pub(crate) async fn run(listener: TcpListener, shared: Arc<Shared>) {
    let shutdown = shared.shutdown.clone();
    let mut conns = listen::accept_loop(
        listener,
        "L2Sec",
        shared.l2_limits.handshakes.clone(),
        shutdown,
        // The current TLS configuration (server certificate, trusted client CAs): a CA rotation
        // replaces it for later connections; live sessions keep theirs.
        |stream, _peer, handshake| {
            handle(
                stream,
                TlsAcceptor::from(shared.l2_tls()),
                shared.clone(),
                handshake,
            )
        },
    )
    .await;
    // Sessions see the shutdown signal themselves; give them a moment to close cleanly.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.shutdown().await;
}

fn error_env(tag: Tag, code: ErrorCode, message: impl Into<String>) -> Envelope {
    Envelope::with_type(types::ERROR, tag, &ErrorPayload::new(code, message))
}

type Writer = FrameWriter<WriteHalf<TlsStream<TcpStream>>>;

async fn write_bounded<W: AsyncWrite + Unpin>(
    w: &mut FrameWriter<W>,
    env: &Envelope,
) -> Result<(), FrameError> {
    tokio::time::timeout(WRITE_TIMEOUT, w.write(env))
        .await
        .unwrap_or(Err(FrameError::Truncated))
}

/// Best effort: send the frames pushed so far and one more, and close, within a short deadline.
async fn send_and_close(w: &mut Writer, env: Option<&Envelope>) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if let Some(env) = env {
            let _ = w.push(env);
        }
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    })
    .await;
}

type Reader = FrameReader<tokio::io::ReadHalf<TlsStream<TcpStream>>>;

/// The next frame if one can be had without waiting: buffered already, or readable from the
/// TLS stream now. `None` when that would wait. [`FrameReader::read`] is cancellation safe, so
/// dropping it unfinished loses nothing.
async fn read_now(reader: &mut Reader) -> Option<Result<Option<Envelope>, FrameError>> {
    tokio::select! {
        biased;
        r = reader.read() => Some(r),
        () = std::future::ready(()) => None,
    }
}

/// The verified facts of an accepted HELLO.
struct Accepted {
    node: String,
    hello: Hello,
}

fn check_ident(name: &str, v: &str) -> Result<(), ErrorPayload> {
    if v.len() > control::MAX_IDENT_LEN || v.chars().any(char::is_control) {
        return Err(ErrorPayload::new(
            ErrorCode::Protocol,
            format!("{name} is too long or has control characters"),
        ));
    }
    Ok(())
}

/// Whether the node and the certificate serial are still known and unrevoked (a database
/// failure counts as no).
fn still_admitted(shared: &Shared, node: &str, serial: &str) -> bool {
    let now = util::now_ms();
    let cert_ok = matches!(
        shared.db.cert(serial),
        Ok(Some(c)) if c.node_id == node && c.revoked_at.is_none() && c.not_after > now
    );
    let node_ok = matches!(shared.db.node(node), Ok(Some(n)) if n.revoked_at.is_none());
    cert_ok && node_ok
}

fn check_hello(
    shared: &Shared,
    cert_node: Option<&str>,
    serial: &str,
    env: &Envelope,
) -> Result<Accepted, ErrorPayload> {
    let internal = |e: crate::Error| {
        tracing::error!(error = %e, "L2Sec handshake: database failure");
        ErrorPayload::new(ErrorCode::Internal, "internal error")
    };
    let revoked = |m: &str| ErrorPayload::new(ErrorCode::Revoked, m);
    if !env.is(types::HELLO) {
        return Err(ErrorPayload::new(
            ErrorCode::Protocol,
            format!("the first frame must be HELLO, not {}", env.kind),
        ));
    }
    let hello: Hello = env
        .payload()
        .map_err(|e| ErrorPayload::new(ErrorCode::Protocol, format!("HELLO payload: {e}")))?;
    control::check_version(hello.protocol_version)?;
    let Some(node) = cert_node else {
        return Err(revoked("the certificate carries no node identity"));
    };
    match shared.db.cert(serial).map_err(internal)? {
        None => return Err(revoked("unknown certificate")),
        Some(c) if c.node_id != node => return Err(revoked("unknown certificate")),
        Some(c) if c.revoked_at.is_some() => return Err(revoked("the certificate is revoked")),
        // rustls checks validity in a full handshake; this also holds for anything else.
        Some(c) if c.not_after <= util::now_ms() => {
            return Err(revoked("the certificate has expired; enrol the node again"));
        }
        Some(_) => {}
    }
    match shared.db.node(node).map_err(internal)? {
        None => return Err(revoked("unknown node")),
        Some(n) if n.revoked_at.is_some() => return Err(revoked("the node is revoked")),
        Some(_) => {}
    }
    if hello.node_id != node {
        return Err(ErrorPayload::new(
            ErrorCode::Protocol,
            "HELLO nodeId differs from the certificate's identity",
        ));
    }
    check_ident("hostname", &hello.hostname)?;
    check_ident("agentVersion", &hello.agent_version)?;
    check_ident("bootId", &hello.boot_id)?;
    if let Some(k) = &hello.wireguard_public_key
        && !runos_protocol::validate::is_wireguard_key(k)
    {
        return Err(ErrorPayload::new(
            ErrorCode::Protocol,
            "wireguardPublicKey is not a WireGuard public key",
        ));
    }
    if hello.instruction_types.len() > control::MAX_HELLO_TYPES
        || hello
            .instruction_types
            .iter()
            .any(|t| MessageType::new(t.clone()).is_err())
    {
        return Err(ErrorPayload::new(
            ErrorCode::Protocol,
            "instructionTypes has too many or invalid entries",
        ));
    }
    Ok(Accepted {
        node: node.to_string(),
        hello,
    })
}

async fn handle(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    handshake: OwnedSemaphorePermit,
) {
    let peer = stream.peer_addr().ok();
    let Ok(source) = shared.l2_limits.source_slot(peer) else {
        return;
    };
    // Both are returned once the session is admitted (or refused).
    let handshake = (handshake, source);
    // The TLS handshake and the HELLO, together.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    // Small frames (ACKs, heartbeat replies, instructions sent as slots free up) go out at once
    // instead of waiting for the peer's delayed ACK.
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(?peer, error = %e, "L2Sec TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(?peer, "L2Sec TLS handshake timed out");
            return;
        }
    };
    let conn = tls.get_ref().1;
    if !runos_transport::tls::alpn_matches(conn.alpn_protocol(), runos_protocol::ALPN_L2SEC) {
        tracing::info!(?peer, "L2Sec: wrong or missing ALPN; closed");
        return;
    }
    let info = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| runos_transport::identity::cert_info(c));
    let (r, w) = tokio::io::split(tls);
    let max = shared.opts.max_frame_bytes;
    let mut reader = FrameReader::new(r, max);
    let mut writer = FrameWriter::new(w, max);
    let first = match tokio::time::timeout_at(deadline, reader.read()).await {
        Err(_) => {
            tracing::info!(?peer, "L2Sec: no HELLO within the handshake timeout");
            send_and_close(&mut writer, None).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(FrameError::Decode(e))) => {
            tracing::info!(?peer, error = %e, "L2Sec: invalid first frame");
            let env = error_env(Tag::random(), ErrorCode::Protocol, e.to_string());
            send_and_close(&mut writer, Some(&env)).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(?peer, error = %e, "L2Sec: read failed before HELLO");
            return;
        }
        Ok(Ok(Some(env))) => env,
    };
    // At the ceiling the HELLO is answered at once, before any database work: the agent backs
    // off and tries again.
    let Some(session_slot) = shared.l2_limits.session_slot() else {
        let env = error_env(
            first.tag,
            ErrorCode::Busy,
            "the control plane is at its session limit; try again later",
        );
        send_and_close(&mut writer, Some(&env)).await;
        return;
    };
    let (cert_node, serial) = match info {
        Some(Ok(i)) => (i.node_id, i.serial_hex),
        _ => (None, String::new()),
    };
    let accepted = match check_hello(&shared, cert_node.as_deref(), &serial, &first) {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(
                ?peer,
                node = cert_node.as_deref().unwrap_or("-"),
                code = %e.code,
                reason = %e.message,
                "L2Sec: session refused"
            );
            let env = Envelope::with_type(types::ERROR, first.tag, &e);
            send_and_close(&mut writer, Some(&env)).await;
            return;
        }
    };
    let node = accepted.node;
    let hello = accepted.hello;
    let now = util::now_ms();
    // The agent's last self-update: logged and stored when well formed, dropped otherwise.
    let last_update = match &hello.last_update {
        Some(u) if u.is_valid() => {
            tracing::info!(
                node = %node, from = %u.from, to = %u.to, outcome = %u.outcome,
                message = %u.message, at = %u.time, "agent reports its last update"
            );
            serde_json::to_string(u).ok()
        }
        Some(_) => {
            tracing::warn!(node = %node, "HELLO: lastUpdate out of bounds; ignored");
            None
        }
        None => None,
    };
    // A probe's HELLO says nothing about what the node runs: only touch last-seen.
    let recorded = if hello.probe {
        shared.db.touch(&node, now)
    } else {
        shared.db.update_hello(
            &node,
            &hello.hostname,
            &hello.agent_version,
            &hello.boot_id,
            &hello.instruction_types,
            last_update.as_deref(),
            hello.wireguard_public_key.as_deref(),
            now,
        )
    };
    if let Err(e) = recorded {
        tracing::error!(node = %node, error = %e, "L2Sec: cannot record HELLO");
        let env = error_env(first.tag, ErrorCode::Internal, "internal error");
        send_and_close(&mut writer, Some(&env)).await;
        return;
    }
    // A probe session (a credential check, or a renewal while the agent is stopped) is not
    // registered: it must not replace the node's live session, and it is sent no instructions.
    let probe = hello.probe;
    let reg = if probe {
        match shared.sessions.detached(&node) {
            Some(r) => r,
            None => {
                tracing::info!(node = %node, "L2Sec: too many probe sessions for the node; refused");
                let env = error_env(
                    first.tag,
                    ErrorCode::Busy,
                    format!("at most {MAX_PROBES_PER_NODE} probe sessions per node at a time"),
                );
                send_and_close(&mut writer, Some(&env)).await;
                return;
            }
        }
    } else {
        shared.sessions.register(&node)
    };
    // A revocation that landed between check_hello and register found no session to close:
    // look again now that the session is registered (a later revocation will find it).
    if !still_admitted(&shared, &node, &serial) {
        shared.sessions.deregister(&node, reg.id);
        tracing::info!(node = %node, "L2Sec: revoked during the handshake; session refused");
        let env = error_env(first.tag, ErrorCode::Revoked, "the node is revoked");
        send_and_close(&mut writer, Some(&env)).await;
        return;
    }
    if let Err(e) = shared.db.mark_used(&serial, now) {
        tracing::warn!(node = %node, error = %e, "L2Sec: cannot record the certificate's first use");
    }
    let session_id = uuid::Uuid::new_v4().hyphenated().to_string();
    let interval = shared.opts.heartbeat_interval;
    let welcome = Envelope::with_type(
        types::WELCOME,
        first.tag,
        &Welcome {
            protocol_version: runos_protocol::PROTOCOL_VERSION,
            server_time_ms: u64::try_from(now).unwrap_or(0),
            heartbeat_interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            max_frame_bytes: max,
            advertised_agent_version: shared.opts.advertise_version.clone(),
            session_id: session_id.clone(),
        },
    );
    if let Err(e) = write_bounded(&mut writer, &welcome).await {
        tracing::info!(node = %node, error = %e, "L2Sec: cannot send WELCOME");
        shared.sessions.deregister(&node, reg.id);
        return;
    }
    tracing::info!(
        node = %node,
        session = %session_id,
        hostname = %hello.hostname,
        agent_version = %hello.agent_version,
        pending_replies = hello.pending_replies.len(),
        probe,
        ?peer,
        "session started"
    );
    let session = Session {
        shared: shared.clone(),
        node: node.clone(),
        session_id,
        writer,
        close: reg.close,
        wake: reg.wake,
        shutdown: shared.shutdown.clone(),
        serial,
        probe,
        last_renewal: None,
        cursor: 0,
        more: !probe,
        max_in_flight: usize::try_from(shared.opts.max_in_flight)
            .unwrap_or(usize::MAX)
            .max(1),
        in_flight: HashMap::new(),
        retries: BTreeSet::new(),
        last_touch: now,
    };
    drop(handshake);
    session.run(reader).await;
    // The slot first: once the node shows offline, its slot is free.
    drop(session_slot);
    shared.sessions.deregister(&node, reg.id);
}

/// Wait until the session is closed from our side.
async fn closed(rx: &mut watch::Receiver<Option<CloseReason>>) -> CloseReason {
    match rx.wait_for(|r| r.is_some()).await {
        Ok(r) => (*r).unwrap_or(CloseReason::Shutdown),
        Err(_) => CloseReason::Shutdown,
    }
}

/// Why a session loop ended.
#[derive(Debug)]
enum End {
    Closed(CloseReason),
    PeerClosed,
    Idle,
    Io(String),
    Protocol(String),
    Internal(String),
}

struct Session {
    shared: Arc<Shared>,
    node: String,
    session_id: String,
    writer: Writer,
    close: watch::Receiver<Option<CloseReason>>,
    wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
    /// Serial (hex) of the certificate the session was opened with.
    serial: String,
    /// A probe session: no instructions are sent on it.
    probe: bool,
    /// When this session last got a certificate renewed.
    last_renewal: Option<Instant>,
    /// Row id of the last instruction taken from the database in this session.
    cursor: i64,
    /// Whether stored instructions above the cursor may be waiting.
    more: bool,
    /// Bound on `in_flight`.
    max_in_flight: usize,
    /// Instructions sent in this session and not yet finally answered, including those waiting
    /// to be resent after a refusal.
    in_flight: HashMap<Tag, Flight>,
    /// The refused instructions waiting to be resent, by due time. Each is in `in_flight`.
    retries: BTreeSet<(Instant, Tag)>,
    last_touch: i64,
}

/// An instruction sent in this session and not yet finally answered.
#[derive(Debug, Default)]
struct Flight {
    /// How often the agent refused it (`busy`, `shutting_down`) in this session.
    refusals: u32,
    /// When it is due to be resent, while it waits after a refusal.
    retry_at: Option<Instant>,
}

/// The delay before resending an instruction refused `refusals` times: 1 s, doubling, capped.
fn retry_delay(refusals: u32) -> Duration {
    let doublings = refusals.saturating_sub(1).min(16);
    RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX)
}

/// The payload of an `ERROR` reply that says the instruction was not started and should be sent
/// again later (`busy`, `shutting_down`).
fn refusal(env: &Envelope) -> Option<ErrorPayload> {
    if !env.is(types::ERROR) {
        return None;
    }
    env.payload::<ErrorPayload>()
        .ok()
        .filter(|p| matches!(p.code, ErrorCode::Busy | ErrorCode::ShuttingDown))
}

impl Session {
    async fn run(mut self, reader: Reader) {
        let idle_limit = self.shared.opts.heartbeat_interval.saturating_mul(3);
        // A probe session is short by design; revocation cannot reach it through the registry.
        let probe_end = self.probe.then(|| Instant::now() + PROBE_MAX);
        let mut last_rx = Instant::now();
        let mut reads_in_a_row = 0usize;
        let mut inbound = Inbound::new(reader);
        let end = loop {
            let ready = self.can_send();
            // Coalescing: the frames pushed (answers to a batch of inbound frames, instructions
            // out of the window) go out in one write once no more instructions are ready to be
            // pushed at once, or once they hold many bytes.
            if self.writer.pending() > 0
                && (!ready || self.writer.pending() >= FLUSH_BYTES)
                && let Err(end) = self.flush(&mut inbound).await
            {
                break end;
            }
            // Frames read while writing come first.
            if inbound.has_queued() {
                match self
                    .take_batch(&mut inbound, &mut last_rx, &mut reads_in_a_row)
                    .await
                {
                    Ok(()) => continue,
                    Err(end) => break end,
                }
            }
            let read = !ready || reads_in_a_row < READS_BEFORE_SEND;
            let next_retry = self.retries.first().map(|(due, _)| *due);
            let mut close = self.close.clone();
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                biased;
                reason = closed(&mut close) => break End::Closed(reason),
                () = shutdown_signalled(&mut shutdown) => break End::Closed(CloseReason::Shutdown),
                first = inbound.reader.read(), if read => {
                    inbound.note(first);
                    if let Err(end) = self.take_batch(&mut inbound, &mut last_rx, &mut reads_in_a_row).await {
                        break end;
                    }
                },
                () = self.wake.notified() => self.more = !self.probe,
                () = tokio::time::sleep_until(last_rx + idle_limit) => break End::Idle,
                () = tokio::time::sleep_until(probe_end.unwrap_or_else(Instant::now)), if probe_end.is_some() => break End::Idle,
                () = tokio::time::sleep_until(next_retry.unwrap_or_else(Instant::now)),
                    if next_retry.is_some() && !ready => {}
                // Last: more to send, once nothing above is ready (or after many reads).
                () = std::future::ready(()), if ready => {
                    reads_in_a_row = 0;
                    if let Err(end) = self.send_some() {
                        break end;
                    }
                }
            }
        };
        let farewell = match &end {
            End::Closed(CloseReason::Revoked) => Some(error_env(
                Tag::random(),
                ErrorCode::Revoked,
                "the node has been revoked",
            )),
            End::Protocol(m) => Some(error_env(Tag::random(), ErrorCode::Protocol, m.clone())),
            _ => None,
        };
        send_and_close(&mut self.writer, farewell.as_ref()).await;
        let _ = self.shared.db.touch(&self.node, util::now_ms());
        match &end {
            End::Internal(m) => {
                tracing::error!(node = %self.node, session = %self.session_id, error = %m, "session ended")
            }
            End::Io(m) => {
                tracing::info!(node = %self.node, session = %self.session_id, error = %m, "session ended")
            }
            other => {
                tracing::info!(node = %self.node, session = %self.session_id, reason = ?other, "session ended")
            }
        }
    }

    /// Whether `send_some` has something to do now.
    fn can_send(&self) -> bool {
        (self.more && self.in_flight.len() < self.max_in_flight)
            || self
                .retries
                .first()
                .is_some_and(|(due, _)| *due <= Instant::now())
    }

    /// Push at most `SEND_CHUNK` instructions: refused ones that are due again, then stored
    /// ones above the cursor, oldest first, as far as the in-flight window allows.
    ///
    /// Nothing is written to the database for a send: what an instruction needs is stored
    /// before it is sent, and a send is not a fact anyone reads (delivery is proven by the
    /// final reply; an instruction without one is sent again after each WELCOME).
    fn send_some(&mut self) -> Result<(), End> {
        let mut budget = SEND_CHUNK;
        let now = Instant::now();
        while budget > 0 {
            let Some(&(due, tag)) = self.retries.first() else {
                break;
            };
            if due > now {
                break;
            }
            self.retries.remove(&(due, tag));
            budget -= 1;
            self.resend(tag)?;
        }
        while budget > 0 && self.more && self.in_flight.len() < self.max_in_flight {
            let want = budget.min(self.max_in_flight - self.in_flight.len());
            let batch = self
                .shared
                .db
                .pending_after(
                    &self.node,
                    self.cursor,
                    u32::try_from(want).unwrap_or(u32::MAX),
                )
                .map_err(|e| End::Internal(e.to_string()))?;
            if batch.len() < want {
                self.more = false;
            }
            for (rowid, env) in batch {
                budget = budget.saturating_sub(1);
                self.cursor = rowid;
                let Some(env) = env else { continue };
                self.push_instruction(&env)?;
                self.in_flight.insert(env.tag, Flight::default());
            }
        }
        Ok(())
    }

    /// Send a refused instruction again, as stored, unless it got a final reply meanwhile.
    fn resend(&mut self, tag: Tag) -> Result<(), End> {
        match self.in_flight.get_mut(&tag) {
            Some(f) => f.retry_at = None,
            None => return Ok(()),
        }
        match self.shared.db.pending_instruction(&self.node, &tag) {
            Ok(Some(env)) => self.push_instruction(&env),
            Ok(None) => {
                self.in_flight.remove(&tag);
                Ok(())
            }
            Err(e) => Err(End::Internal(format!("reading {tag}: {e}"))),
        }
    }

    fn push_instruction(&mut self, env: &Envelope) -> Result<(), End> {
        self.push(env)?;
        tracing::debug!(node = %self.node, tag = %env.tag, kind = %env.kind, "instruction sent");
        Ok(())
    }

    /// The instruction got its final reply: it leaves the window.
    fn answered(&mut self, tag: &Tag) {
        if let Some(f) = self.in_flight.remove(tag) {
            if let Some(at) = f.retry_at {
                self.retries.remove(&(at, *tag));
            }
        }
    }

    /// The agent refused the instruction (`busy`, `shutting_down`): schedule it again.
    fn refused(&mut self, tag: Tag, why: &ErrorPayload) {
        let Some(f) = self.in_flight.get_mut(&tag) else {
            tracing::warn!(node = %self.node, tag = %tag, code = %why.code, "refusal of an instruction not in flight in this session (acknowledged, not stored; it stays pending)");
            return;
        };
        if f.retry_at.is_some() {
            tracing::debug!(node = %self.node, tag = %tag, "duplicate refusal");
            return;
        }
        f.refusals = f.refusals.saturating_add(1);
        let delay = retry_delay(f.refusals);
        let at = Instant::now() + delay;
        f.retry_at = Some(at);
        self.retries.insert((at, tag));
        tracing::info!(
            node = %self.node,
            tag = %tag,
            code = %why.code,
            message = %why.message,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "instruction refused by the agent (acknowledged, not stored); it will be sent again"
        );
    }

    /// Queue one frame for the next [`Session::flush`].
    fn push(&mut self, env: &Envelope) -> Result<(), End> {
        self.writer.push(env).map_err(|e| End::Io(e.to_string()))
    }

    /// Write the frames pushed so far (one write), giving up at once when the session is
    /// closed from our side. Inbound frames are read meanwhile (queued in `inbound`, up to a
    /// batch), so a peer that writes while we write never stalls us both.
    async fn flush(&mut self, inbound: &mut Inbound) -> Result<(), End> {
        let mut close = self.close.clone();
        let mut shutdown = self.shutdown.clone();
        let write = tokio::time::timeout(WRITE_TIMEOUT, self.writer.flush());
        tokio::pin!(write);
        loop {
            let room = inbound.has_room();
            tokio::select! {
                biased;
                r = &mut write => {
                    return r
                        .unwrap_or(Err(FrameError::Truncated))
                        .map_err(|e| End::Io(e.to_string()));
                }
                reason = closed(&mut close) => return Err(End::Closed(reason)),
                () = shutdown_signalled(&mut shutdown) => {
                    return Err(End::Closed(CloseReason::Shutdown));
                }
                r = inbound.reader.read(), if room => inbound.note(r),
            }
        }
    }

    /// Handle the frames queued and those that can be read without waiting, as one batch;
    /// then how the session ends, if the stream ended or failed after them.
    async fn take_batch(
        &mut self,
        inbound: &mut Inbound,
        last_rx: &mut Instant,
        reads_in_a_row: &mut usize,
    ) -> Result<(), End> {
        let (batch, end) = inbound.batch().await;
        if !batch.is_empty() {
            *last_rx = Instant::now();
            *reads_in_a_row += batch.len();
            self.inbound(batch)?;
        }
        end.map_or(Ok(()), Err)
    }

    fn touch(&mut self) {
        let now = util::now_ms();
        if now.saturating_sub(self.last_touch) >= 1000 {
            self.last_touch = now;
            if let Err(e) = self.shared.db.touch(&self.node, now) {
                tracing::warn!(node = %self.node, error = %e, "cannot record last-seen");
            }
        }
    }

    /// Handle a batch of inbound frames, in order. The final replies among them are stored in
    /// one transaction; every answer (ACKs, HEARTBEAT_REPLY, RENEWED, ...) is pushed after it
    /// commits, so no ACK leaves before its reply is stored. A frame that ends the session
    /// (a renewal refused as revoked) ends the batch: what came before it is still stored and
    /// answered.
    fn inbound(&mut self, batch: Vec<Envelope>) -> Result<(), End> {
        self.touch();
        let mut out: Vec<Envelope> = Vec::with_capacity(batch.len());
        let mut replies: Vec<Envelope> = Vec::new();
        let mut end = None;
        for env in batch {
            if let Err(e) = self.frame(env, &mut out, &mut replies) {
                end = Some(e);
                break;
            }
        }
        if !replies.is_empty() {
            self.store(&replies)?;
        }
        for env in &out {
            self.push(env)?;
        }
        end.map_or(Ok(()), Err)
    }

    /// One inbound frame: answers go to `out`, final replies to store to `replies` (their ACK
    /// is in `out` already, to be pushed only once they are stored).
    fn frame(
        &mut self,
        env: Envelope,
        out: &mut Vec<Envelope>,
        replies: &mut Vec<Envelope>,
    ) -> Result<(), End> {
        let kind = env.kind.as_str();
        if self.probe {
            // Revocation cannot reach a probe through the registry: look on every frame.
            if !still_admitted(&self.shared, &self.node, &self.serial) {
                return Err(End::Closed(CloseReason::Revoked));
            }
            // A probe proves a credential or carries a renewal, nothing else.
            if kind != types::HEARTBEAT && kind != types::RENEW {
                tracing::warn!(node = %self.node, tag = %env.tag, kind = %kind, "probe session: only HEARTBEAT and RENEW are accepted; dropped");
                return Ok(());
            }
        }
        match kind {
            types::HEARTBEAT => {
                out.push(Envelope::with_type(
                    types::HEARTBEAT_REPLY,
                    env.tag,
                    &HeartbeatReply {
                        server_time_ms: u64::try_from(util::now_ms()).unwrap_or(0),
                    },
                ));
                Ok(())
            }
            types::LOG => {
                match env.payload::<LogLine>() {
                    Ok(line) => {
                        let mut msg = line.message;
                        if msg.len() > control::MAX_LOG_LINE {
                            let mut cut = control::MAX_LOG_LINE;
                            while !msg.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            msg.truncate(cut);
                        }
                        match line.level {
                            LogLevel::Info => {
                                tracing::info!(node = %self.node, tag = %env.tag, message = %msg, "agent log")
                            }
                            LogLevel::Warn => {
                                tracing::warn!(node = %self.node, tag = %env.tag, message = %msg, "agent log")
                            }
                            LogLevel::Error => {
                                tracing::error!(node = %self.node, tag = %env.tag, message = %msg, "agent log")
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node = %self.node, tag = %env.tag, error = %e, "malformed LOG dropped")
                    }
                }
                Ok(())
            }
            types::RENEW => self.renew(env, out),
            types::ERROR | types::NO_CONTENT => {
                self.final_reply(env, out, replies);
                Ok(())
            }
            k if control::is_control_type(k) => {
                tracing::warn!(node = %self.node, tag = %env.tag, kind = %k, "unexpected control message dropped");
                Ok(())
            }
            _ => {
                self.final_reply(env, out, replies);
                Ok(())
            }
        }
    }

    /// `RENEW`: sign a new certificate for the session's node, unless the node or the
    /// certificate the session was opened with has been revoked meanwhile (then the session
    /// ends as revoked). At most one renewal per [`RENEW_INTERVAL`] per session.
    fn renew(&mut self, env: Envelope, out: &mut Vec<Envelope>) -> Result<(), End> {
        let tag = env.tag;
        if let Some(at) = self.last_renewal {
            let wait = RENEW_INTERVAL.saturating_sub(at.elapsed());
            if !wait.is_zero() {
                let msg = format!(
                    "a certificate was renewed moments ago; try again in {} s",
                    wait.as_secs().max(1)
                );
                out.push(error_env(tag, ErrorCode::Busy, msg));
                return Ok(());
            }
        }
        let req: control::Renew = match env.payload() {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("RENEW payload: {e}");
                out.push(error_env(tag, ErrorCode::BadRequest, msg));
                return Ok(());
            }
        };
        let ca = self.shared.ca();
        let issued = match ca.sign_csr(&req.csr_pem, &self.node, self.shared.opts.cert_validity) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::info!(node = %self.node, error = %e, "renewal refused: bad CSR");
                out.push(error_env(tag, ErrorCode::BadRequest, e.to_string()));
                return Ok(());
            }
            Err(e) => {
                tracing::error!(node = %self.node, error = %e, "renewal failed");
                out.push(error_env(tag, ErrorCode::Internal, "internal error"));
                return Ok(());
            }
        };
        let cert = crate::db::NewCert {
            serial_hex: &issued.serial_hex,
            not_before_ms: issued.not_before_ms,
            not_after_ms: issued.not_after_ms,
            ca_sha256: &issued.ca_sha256,
        };
        let now = util::now_ms();
        let too_soon_since =
            now.saturating_sub(util::ms(crate::ca::NODE_BACKDATE + RENEW_NODE_INTERVAL));
        match self
            .shared
            .db
            .renew_cert(&self.node, &self.serial, &cert, now, too_soon_since)
        {
            Ok(crate::db::Renewal::Recorded) => {}
            Ok(crate::db::Renewal::TooSoon) => {
                let msg = format!(
                    "this node got a certificate moments ago; try again in {} s",
                    RENEW_NODE_INTERVAL.as_secs()
                );
                out.push(error_env(tag, ErrorCode::Busy, msg));
                return Ok(());
            }
            Ok(crate::db::Renewal::Refused) => {
                tracing::info!(node = %self.node, "renewal refused: the node or its certificate is revoked or expired");
                let env = error_env(
                    tag,
                    ErrorCode::Revoked,
                    "the node or the certificate of this session is revoked or expired",
                );
                out.push(env);
                return Err(End::Closed(CloseReason::Revoked));
            }
            Err(e) => {
                tracing::error!(node = %self.node, error = %e, "renewal: cannot record the certificate");
                out.push(error_env(tag, ErrorCode::Internal, "internal error"));
                return Ok(());
            }
        }
        self.last_renewal = Some(Instant::now());
        tracing::info!(
            node = %self.node,
            session = %self.session_id,
            old_serial = %self.serial,
            serial = %issued.serial_hex,
            ca_sha256 = %issued.ca_sha256,
            expires = %util::rfc3339_ms(issued.not_after_ms),
            "certificate renewed"
        );
        let reply = Envelope::with_type(
            types::RENEWED,
            tag,
            &control::Renewed {
                certificate_pem: issued.pem,
                ca_pem: ca.bundle_pem(),
                ca_cross_pem: ca.cross_pem().map(str::to_string),
            },
        );
        out.push(reply);
        Ok(())
    }

    /// A reply: a refusal (`busy`, `shutting_down`) schedules the instruction again; anything
    /// else is final and goes to `replies` to be stored. Either way it is acknowledged.
    fn final_reply(&mut self, env: Envelope, out: &mut Vec<Envelope>, replies: &mut Vec<Envelope>) {
        let tag = env.tag;
        out.push(Envelope::with_type(
            types::ACK,
            tag,
            &control::Ack::default(),
        ));
        if let Some(why) = refusal(&env) {
            self.refused(tag, &why);
            return;
        }
        self.answered(&tag);
        replies.push(env);
    }

    /// Store final replies in one transaction and wake whoever waits for them. A failure ends
    /// the session without any of their ACKs: the agent keeps them and sends them again after
    /// the next WELCOME.
    fn store(&mut self, replies: &[Envelope]) -> Result<(), End> {
        let rows: Vec<(Tag, &str, &str)> = replies
            .iter()
            .map(|e| (e.tag, e.kind.as_str(), e.json_b64.as_str()))
            .collect();
        let outcomes = self
            .shared
            .db
            .store_replies(&self.node, &rows, util::now_ms())
            .map_err(|e| End::Internal(format!("storing {} final replies: {e}", rows.len())))?;
        for (env, outcome) in replies.iter().zip(&outcomes) {
            match outcome {
                Stored::First => {
                    tracing::info!(node = %self.node, tag = %env.tag, kind = %env.kind, "final reply stored")
                }
                Stored::Duplicate => {
                    tracing::debug!(node = %self.node, tag = %env.tag, "duplicate final reply")
                }
                Stored::UnknownTag => {
                    tracing::warn!(node = %self.node, tag = %env.tag, kind = %env.kind, "reply for an unknown tag (acknowledged, not stored)")
                }
                Stored::OtherNode => {
                    tracing::warn!(node = %self.node, tag = %env.tag, "reply for another node's instruction (acknowledged, not stored)")
                }
            }
        }
        self.shared.replies.stored(
            replies
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| **o == Stored::First)
                .map(|(e, _)| &e.tag),
        );
        Ok(())
    }
}

/// Why a failed read ends the session.
fn frame_end(e: FrameError) -> End {
    match e {
        FrameError::Decode(e) => End::Protocol(e.to_string()),
        e => End::Io(e.to_string()),
    }
}

/// The read side of a session: the reader, and the frames read but not handled yet (read
/// while a write was in progress, or gathered into a batch).
struct Inbound {
    reader: Reader,
    queued: Vec<Envelope>,
    bytes: usize,
    /// How the stream ended (cleanly or not) after the queued frames.
    end: Option<End>,
}

impl Inbound {
    fn new(reader: Reader) -> Self {
        Inbound {
            reader,
            queued: Vec::new(),
            bytes: 0,
            end: None,
        }
    }

    /// Whether there is something to handle without reading.
    fn has_queued(&self) -> bool {
        !self.queued.is_empty() || self.end.is_some()
    }

    /// Whether one more frame may join the batch being gathered.
    fn has_room(&self) -> bool {
        self.end.is_none() && self.queued.len() < BATCH_FRAMES && self.bytes < BATCH_BYTES
    }

    /// Queue the outcome of a read.
    fn note(&mut self, r: Result<Option<Envelope>, FrameError>) {
        match r {
            Ok(Some(env)) => {
                self.bytes += env.json_b64.len();
                self.queued.push(env);
            }
            Ok(None) => self.end = Some(End::PeerClosed),
            Err(e) => self.end = Some(frame_end(e)),
        }
    }

    /// The frames queued and those that follow without waiting, up to [`BATCH_FRAMES`] or
    /// [`BATCH_BYTES`]; and how the stream ended after them, if it did.
    async fn batch(&mut self) -> (Vec<Envelope>, Option<End>) {
        while self.has_room() {
            match read_now(&mut self.reader).await {
                Some(r) => self.note(r),
                None => break,
            }
        }
        self.bytes = 0;
        (std::mem::take(&mut self.queued), self.end.take())
    }
}
