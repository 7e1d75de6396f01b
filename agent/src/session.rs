//! One L2Sec session: connect, HELLO/WELCOME, then a read task, a write task with a bounded
//! channel, and one select loop for frames, replies, heartbeat, shutdown and reconnect requests.
//!
//! Routing of received envelopes after WELCOME:
//! - `HEARTBEAT_REPLY` is matched by tag to this session's outstanding heartbeats; an unmatched
//!   one is logged and dropped.
//! - `ACK` goes to the dispatcher, which records it in the journal (matched by tag; a late or
//!   duplicate one is logged and dropped).
//! - `ERROR` with `revoked` or `protocol` ends the session; any other control message is logged
//!   and dropped. None of these is ever dispatched as an instruction.
//! - Everything else is an instruction and goes to the dispatcher.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use runos_protocol::control::{self, Heartbeat, HeartbeatReply, Hello, Welcome, types};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, Tag};
use runos_transport::{FrameError, FrameReader, FrameWriter};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dispatch::{DispatchLink, Inbound, error_reply};
use crate::identity::NodeIdentity;
use crate::{net, notify, renew};

/// Bound on waiting for WELCOME after HELLO.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on writing one frame.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Smallest and largest heartbeat interval honoured.
pub const HEARTBEAT_MIN: Duration = Duration::from_secs(1);
/// See [`HEARTBEAT_MIN`].
pub const HEARTBEAT_MAX: Duration = Duration::from_secs(300);
/// Frames buffered between the select loop and the write task.
const WRITE_QUEUE: usize = 64;

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
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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

/// Connect, handshake and serve one session until it ends.
pub async fn run(p: &SessionParams, link: &mut DispatchLink, ctl: &mut Control) -> SessionReport {
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
    let (r, w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, p.max_frame_bytes);
    let mut writer = FrameWriter::new(w, p.max_frame_bytes);

    // Handshake.
    let pending_replies = pending_tags(link).await;
    let hello_tag = Tag::random();
    let mut hello = hello(id, p.instruction_types.clone(), pending_replies, false);
    hello.last_update = crate::update::state::report(&p.paths.state_dir);
    let hello_sent_ms = now_ms();
    let hello_sent = Instant::now();
    if let Err(e) = writer
        .write(&Envelope::with_type(types::HELLO, hello_tag, &hello))
        .await
    {
        return report(
            SessionEnd::Failed(format!("sending HELLO to {addr}: {e}")),
            None,
        );
    }
    let first = match tokio::time::timeout(WELCOME_TIMEOUT, reader.read()).await {
        Ok(Ok(Some(env))) => env,
        Ok(Ok(None)) => {
            return report(
                SessionEnd::Failed(format!("{addr} closed the connection before WELCOME")),
                None,
            );
        }
        Ok(Err(e)) => {
            return report(
                SessionEnd::Failed(format!("waiting for WELCOME: {e}")),
                None,
            );
        }
        Err(_) => {
            return report(
                SessionEnd::Failed(format!(
                    "no WELCOME from {addr} within {} s",
                    WELCOME_TIMEOUT.as_secs()
                )),
                None,
            );
        }
    };
    let welcome = match handshake_answer(&first, hello_tag) {
        Ok(w) => w,
        Err(end) => return report(end, None),
    };
    let welcomed_at = Instant::now();
    let rtt_ms = u64::try_from(hello_sent.elapsed().as_millis()).unwrap_or(u64::MAX);
    let offset_ms = crate::status::clock_offset_ms(welcome.server_time_ms, hello_sent_ms, rtt_ms);
    writer.set_max(welcome.max_frame_bytes);
    let interval = heartbeat_interval(welcome.heartbeat_interval_ms);
    tracing::info!(
        session = %welcome.session_id,
        heartbeat_ms = interval.as_millis() as u64,
        clock_offset_ms = offset_ms,
        max_frame = welcome.max_frame_bytes,
        "connected to {addr}"
    );
    notify::status(&format!("connected to {addr}"));
    crate::status::global().connected(&addr, &welcome.session_id); // `runos status`
    // Bounded and printable before it reaches status or the updater (which parses it strictly).
    crate::status::global().set_advertised_version(
        welcome
            .advertised_agent_version
            .as_deref()
            .filter(|v| v.len() <= 32 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_string),
    );
    crate::status::global().observe_clock_offset(offset_ms);
    let end = serve(p, reader, writer, link, ctl, interval).await;
    report(end, Some(welcomed_at))
}

/// The HELLO of this agent for `id`.
pub(crate) fn hello(
    id: &NodeIdentity,
    instruction_types: Vec<String>,
    pending_replies: Vec<String>,
    probe: bool,
) -> Hello {
    Hello {
        protocol_version: runos_protocol::PROTOCOL_VERSION,
        agent_version: crate::agent_version().to_string(),
        node_id: id.node_id.clone(),
        hostname: crate::sysinfo::hostname(),
        boot_id: crate::sysinfo::boot_id(),
        instruction_types,
        pending_replies,
        probe,
        last_update: None,
    }
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

/// Judge the answer to HELLO.
pub(crate) fn handshake_answer(env: &Envelope, hello_tag: Tag) -> Result<Welcome, SessionEnd> {
    if env.is(types::ERROR) {
        let e: ErrorPayload = env.payload().unwrap_or_else(|_| {
            ErrorPayload::new(ErrorCode::Other, "ERROR with an unreadable payload")
        });
        return Err(match e.code {
            ErrorCode::Revoked => SessionEnd::Revoked(e.message),
            ErrorCode::VersionMismatch => SessionEnd::Incompatible(e.message),
            _ => SessionEnd::Failed(format!(
                "the control plane refused the session ({}): {}",
                e.code, e.message
            )),
        });
    }
    if !env.is(types::WELCOME) || env.tag != hello_tag {
        return Err(SessionEnd::Failed(format!(
            "expected WELCOME with the HELLO's tag, got {}",
            env.kind
        )));
    }
    let w: Welcome = env
        .payload()
        .map_err(|_| SessionEnd::Failed("WELCOME payload is malformed".into()))?;
    control::check_version(w.protocol_version).map_err(|e| SessionEnd::Incompatible(e.message))?;
    Ok(w)
}

type Reader =
    FrameReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;
type Writer =
    FrameWriter<tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;

async fn write_loop(
    mut writer: Writer,
    mut rx: mpsc::Receiver<Envelope>,
) -> Result<(), FrameError> {
    while let Some(env) = rx.recv().await {
        let res = match tokio::time::timeout(WRITE_TIMEOUT, writer.write(&env)).await {
            Ok(r) => r,
            Err(_) => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "a frame could not be written within {} s",
                    WRITE_TIMEOUT.as_secs()
                ),
            ))),
        };
        match res {
            Ok(()) => {}
            Err(FrameError::Encode(runos_protocol::EncodeError::TooLarge { len, max })) => {
                // Never send a frame above the peer's maximum: answer the tag with an error.
                tracing::warn!(tag = %env.tag, r#type = %env.kind, len, max, "reply too large for the control plane");
                if !env.is(types::LOG) && !env.is(types::ERROR) {
                    let sub = error_reply(
                        env.tag,
                        ErrorCode::Failed,
                        format!(
                            "the reply of {len} bytes exceeds the control plane's maximum frame size of {max} bytes"
                        ),
                    );
                    writer.write(&sub).await?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.shutdown()).await;
    Ok(())
}

async fn read_loop(mut reader: Reader, tx: mpsc::Sender<Result<Envelope, FrameError>>) {
    loop {
        match reader.read().await {
            Ok(Some(env)) => {
                if tx.send(Ok(env)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

async fn serve(
    p: &SessionParams,
    reader: Reader,
    writer: Writer,
    link: &mut DispatchLink,
    ctl: &mut Control,
    interval: Duration,
) -> SessionEnd {
    let (wtx, wrx) = mpsc::channel::<Envelope>(WRITE_QUEUE);
    let (rtx, mut rrx) = mpsc::channel(WRITE_QUEUE);
    let mut write_task = tokio::spawn(write_loop(writer, wrx));
    let read_task = tokio::spawn(read_loop(reader, rtx));
    let mut renewal = Renewal::new(p);
    let end = serve_loop(
        &wtx,
        &mut rrx,
        &mut write_task,
        link,
        ctl,
        interval,
        &mut renewal,
    )
    .await;
    renewal.session_ended().await;
    read_task.abort();
    drop(wtx);
    // Let queued frames out (bounded), then the write task closes the TLS stream.
    if tokio::time::timeout(Duration::from_secs(5), &mut write_task)
        .await
        .is_err()
    {
        write_task.abort();
    }
    end
}

async fn serve_loop(
    wtx: &mpsc::Sender<Envelope>,
    rrx: &mut mpsc::Receiver<Result<Envelope, FrameError>>,
    write_task: &mut tokio::task::JoinHandle<Result<(), FrameError>>,
    link: &mut DispatchLink,
    ctl: &mut Control,
    interval: Duration,
    renewal: &mut Renewal,
) -> SessionEnd {
    let send = |env: Envelope| async move { wtx.send(env).await.is_ok() };

    // Resend every reply still waiting for an ACK.
    let (htx, hrx) = oneshot::channel();
    if link.inbound.send(Inbound::Held(htx)).await.is_ok()
        && let Ok(Ok(held)) = tokio::time::timeout(Duration::from_secs(5), hrx).await
    {
        if !held.is_empty() {
            tracing::info!(count = held.len(), "resending replies not yet acknowledged");
        }
        for env in held {
            if !send(env).await {
                return SessionEnd::Failed("connection lost while resending replies".into());
            }
        }
    }

    let dead_after = interval * 2;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        let oldest = pending.values().map(|s| s.at).min();
        tokio::select! {
            _ = ticker.tick() => {
                let tag = Tag::random();
                let hb = Heartbeat {
                    sent_at_ms: now_ms(),
                    in_flight: u32::try_from(*link.in_flight.borrow()).unwrap_or(u32::MAX),
                };
                pending.insert(tag, Sent { at: tokio::time::Instant::now(), wall_ms: hb.sent_at_ms });
                tracing::trace!(%tag, "heartbeat");
                if !send(Envelope::with_type(types::HEARTBEAT, tag, &hb)).await {
                    return SessionEnd::Failed("connection lost".into());
                }
            }
            _ = tokio::time::sleep_until(oldest.unwrap_or_else(tokio::time::Instant::now) + dead_after), if oldest.is_some() => {
                tracing::warn!("no HEARTBEAT_REPLY within {} ms: the control plane is unreachable; reconnecting", dead_after.as_millis());
                return SessionEnd::Failed(format!("no HEARTBEAT_REPLY within {} ms", dead_after.as_millis()));
            }
            frame = rrx.recv() => match frame {
                Some(Ok(env)) => match route(env, &mut pending, renewal.asked_tag()) {
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
                                                return SessionEnd::Failed("connection lost".into());
                                            }
                                        }
                                        None => return SessionEnd::Failed("dispatcher stopped".into()),
                                    }
                                }
                            }
                        }
                    }
                },
                Some(Err(e)) => {
                    tracing::warn!("closing the session: {e}");
                    if matches!(e, FrameError::Decode(_)) {
                        let _ = send(error_reply(Tag::random(), ErrorCode::Protocol, format!("agent received an invalid frame: {e}"))).await;
                    }
                    return SessionEnd::Failed(e.to_string());
                }
                None => return SessionEnd::Failed("the control plane closed the connection".into()),
            },
            reply = link.replies.recv() => match reply {
                Some(env) => {
                    if !send(env).await {
                        return SessionEnd::Failed("connection lost".into());
                    }
                }
                None => return SessionEnd::Failed("dispatcher stopped".into()),
            },
            res = &mut *write_task => {
                let msg = match res {
                    Ok(Err(e)) => e.to_string(),
                    _ => "writer stopped".into(),
                };
                return SessionEnd::Failed(format!("sending failed: {msg}"));
            }
            _ = until_shutdown(&mut ctl.shutdown), if draining.is_none() => {
                tracing::info!("shutting down: waiting for running instructions (at most {} s)", ctl.grace.as_secs());
                draining = Some(tokio::time::Instant::now() + ctl.grace);
            }
            _ = ctl.reconnect.changed() => {
                tracing::info!("configuration changed: reconnecting");
                return SessionEnd::Reconnect;
            }
            _ = tokio::time::sleep_until(renewal.timer), if renewal.is_idle() && draining.is_none() => {
                if let Some(env) = renewal.start() && !send(env).await {
                    return SessionEnd::Failed("connection lost".into());
                }
            }
            req = ctl.renew.recv(), if renewal.requests_open => match req {
                Some(req) => {
                    if draining.is_some() {
                        let _ = req.respond.send(Err(renew::RenewError::Failed("the agent is shutting down".into())));
                    } else {
                        renewal.waiters.push(req.respond);
                        if renewal.is_idle() && let Some(env) = renewal.start() && !send(env).await {
                            return SessionEnd::Failed("connection lost".into());
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
fn route(env: Envelope, pending: &mut HashMap<Tag, Sent>, renew_tag: Option<Tag>) -> Routed {
    let tag = env.tag;
    if renew_tag == Some(tag) && (env.is(types::RENEWED) || env.is(types::ERROR)) {
        return Routed::Renew(env);
    }
    match env.kind.as_str() {
        types::HEARTBEAT_REPLY => match pending.remove(&tag) {
            Some(sent) => {
                let rtt_ms = u64::try_from(sent.at.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::trace!(%tag, rtt_ms, "heartbeat answered");
                let status = crate::status::global();
                status.round_trip(); // `runos status`
                match env.payload::<HeartbeatReply>() {
                    Ok(r) => status.observe_clock_offset(crate::status::clock_offset_ms(
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
                tracing::debug!(%tag, "HEARTBEAT_REPLY matches no outstanding heartbeat (late or unknown); dropped")
            }
        },
        types::ACK => return Routed::Forward(Inbound::Ack(tag)),
        types::ERROR => {
            let e: Option<ErrorPayload> = env.payload().ok();
            match e {
                Some(e) if e.code == ErrorCode::Revoked => {
                    return Routed::End(SessionEnd::Revoked(e.message));
                }
                Some(e) if e.code == ErrorCode::Protocol => {
                    return Routed::End(SessionEnd::Failed(format!(
                        "the control plane reported a protocol error: {}",
                        e.message
                    )));
                }
                Some(e) => {
                    tracing::warn!(%tag, code = %e.code, "ERROR from the control plane dropped: {}", e.message)
                }
                None => tracing::warn!(%tag, "unreadable ERROR from the control plane dropped"),
            }
        }
        k if control::is_control_type(k) => {
            tracing::warn!(%tag, r#type = k, "unexpected control message after WELCOME; dropped");
        }
        _ => return Routed::Forward(Inbound::Instruction(env)),
    }
    Routed::Nothing
}

/// The renewal state of one session (see [`crate::renew`]).
struct Renewal {
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
        let offset = crate::status::global().trusted_clock_offset();
        let due = renew::global().due_in(&p.identity, offset);
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
        renew::global().started();
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
                renew::judging_now_s(),
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
                renew::global().succeeded(self.endorsement.take());
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
        let delay = renew::global().failed(&e.to_string(), self.lifetime());
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
                renew::global().interrupted();
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
