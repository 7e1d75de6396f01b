//! Online certificate renewal.
//!
//! When the certificate has used about two thirds of its lifetime (judged with the control
//! plane's time while its offset is within [`crate::daemon::status::MAX_TRUSTED_CLOCK_OFFSET`], with
//! ±5 % jitter per certificate so a fleet enrolled together does not renew together), the
//! session generates a new P-256 key, sends `RENEW` with a CSR on the live mTLS stream and gets
//! `RENEWED` (certificate + CA bundle). The answer is judged first ([`crate::credentials::trust`]: trust
//! continuity, node, key, validity); a refused one changes nothing. The new set is staged on disk
//! ([`crate::credentials`]), proven by a probe session that uses it, and only then promoted;
//! the session then reconnects with it at once. Instructions keep flowing: the dispatcher and
//! the journal do not depend on the connection, and the control plane redelivers by tag.
//!
//! A failure (no answer, refusal, a probe that fails) keeps the current certificate, shows in
//! `runos status`, and is retried with backoff. The current certificate stays in use until it
//! expires.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use runos_protocol::control::{self, Hello, Renewed, Welcome, types};
use runos_protocol::peertext::{self, PeerText};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, Tag};
use runos_transport::{FrameError, FrameReader, FrameWriter};
use serde_json::{Value, json};

use crate::config::Paths;
use crate::credentials::identity::{self, NodeIdentity};
use crate::credentials::{self, CredentialSet};
use crate::net;

/// Bound on waiting for `RENEWED`.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a whole probe (connect, HELLO, WELCOME).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(25);
/// Fraction of the lifetime after which a certificate is renewed.
pub const RENEW_FRACTION: f64 = 2.0 / 3.0;
/// Jitter of [`RENEW_FRACTION`], either way.
pub const RENEW_JITTER: f64 = 0.05;
/// Delay before asking again after a `busy` answer to RENEW.
pub const BUSY_RETRY: Duration = Duration::from_secs(2);
/// Most `busy` answers accepted in a row before the renewal counts as failed.
pub const BUSY_RETRIES: u32 = 10;

/// Why a renewal (or a probe) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewError {
    /// The control plane could not be reached.
    #[error("{0}")]
    Unreachable(String),
    /// TLS failed: the control plane did not accept the certificate, or its certificate was
    /// not trusted.
    #[error("{0}")]
    Tls(String),
    /// The node is revoked.
    #[error("the node is revoked: {0}")]
    Revoked(String),
    /// The control plane asks to try again in a moment (a renewal moments ago).
    #[error("the control plane is busy: {0}")]
    Busy(String),
    /// Any other failure.
    #[error("{0}")]
    Failed(String),
}

/// When to renew a certificate valid from `not_before` to `not_after` (seconds), in ms since
/// the epoch of the control plane's clock: at `fraction` of its lifetime.
pub fn renew_at_ms(not_before: i64, not_after: i64, fraction: f64) -> i64 {
    let life_ms = (not_after.saturating_sub(not_before)).max(0) as f64 * 1000.0;
    not_before
        .saturating_mul(1000)
        .saturating_add((life_ms * fraction.clamp(0.0, 1.0)) as i64)
}

/// The fraction for a certificate: [`RENEW_FRACTION`] ± [`RENEW_JITTER`], fixed per serial so
/// that reconnects do not move it.
pub fn fraction_for(serial_hex: &str) -> f64 {
    use sha2::{Digest as _, Sha256};
    let h = Sha256::digest(serial_hex.as_bytes());
    let x = f64::from(u16::from_be_bytes([h[0], h[1]])) / f64::from(u16::MAX); // 0..=1
    RENEW_FRACTION + (x * 2.0 - 1.0) * RENEW_JITTER
}

use crate::util::time::now_ms;

/// The backoff after `failures` failed renewals of a certificate with `lifetime_s`: 10 s
/// doubling, capped at a tenth of the lifetime (at least 5 s, at most 1 h).
pub fn retry_delay(failures: u32, lifetime_s: i64) -> Duration {
    let cap = Duration::from_secs(u64::try_from(lifetime_s / 10).unwrap_or(0))
        .clamp(Duration::from_secs(5), Duration::from_secs(3600));
    let doublings = failures.saturating_sub(1).min(16);
    Duration::from_secs(10)
        .saturating_mul(1 << doublings)
        .min(cap)
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    retry_after: Option<Instant>,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    last_renewed_at: Option<SystemTime>,
    next_at_ms: Option<i64>,
    in_progress: bool,
    /// The cross-certificate of the last promoted renewal, until [`follow_ca_logged`] takes it.
    endorsement: Option<String>,
}

/// Renewal state that outlives sessions: failures, backoff, and what `runos status` shows.
#[derive(Debug, Default)]
pub struct Renewer {
    state: Mutex<State>,
}

impl Renewer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long from now until the certificate of `id` is due for renewal, given the clock
    /// offset (server − node, ms). Zero when due (or overdue). Honours the failure backoff.
    pub fn due_in(&self, id: &NodeIdentity, offset_ms: i64) -> Duration {
        let at = renew_at_ms(id.not_before, id.not_after, fraction_for(&id.serial_hex));
        let now_server = now_ms().saturating_add(offset_ms);
        let mut wait = Duration::from_millis(u64::try_from(at - now_server).unwrap_or(0));
        let mut g = self.lock();
        if let Some(t) = g.retry_after {
            wait = wait.max(t.saturating_duration_since(Instant::now()));
        }
        g.next_at_ms =
            Some(now_server.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)));
        wait
    }

    /// A renewal started.
    pub fn started(&self) {
        self.lock().in_progress = true;
    }

    /// A renewal succeeded; `endorsement` is the cross-certificate that vouched for a CA of
    /// its bundle, kept for [`follow_ca_logged`].
    pub fn succeeded(&self, endorsement: Option<String>) {
        let mut g = self.lock();
        *g = State {
            last_renewed_at: Some(SystemTime::now()),
            endorsement,
            ..State::default()
        };
    }

    /// Take the cross-certificate of the last promoted renewal.
    pub fn take_endorsement(&self) -> Option<String> {
        self.lock().endorsement.take()
    }

    /// A renewal failed; the next attempt waits for the backoff.
    pub fn failed(&self, error: &str, lifetime_s: i64) -> Duration {
        let mut g = self.lock();
        g.in_progress = false;
        g.failures = g.failures.saturating_add(1);
        let delay = retry_delay(g.failures, lifetime_s);
        g.retry_after = Some(Instant::now() + delay);
        g.last_error = Some(error.chars().take(300).collect());
        g.last_error_at = Some(SystemTime::now());
        delay
    }

    /// A renewal was interrupted (the session ended): not a failure of the control plane's.
    pub fn interrupted(&self) {
        self.lock().in_progress = false;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.lock().failures
    }

    /// The renewal part of `runos status`.
    pub fn to_json(&self) -> Value {
        let g = self.lock();
        json!({
            "state": if g.in_progress { "renewing" } else if g.failures > 0 { "failing" } else { "ok" },
            "failures": g.failures,
            "lastError": g.last_error,
            "lastErrorAt": g.last_error_at.map(crate::util::time::rfc3339),
            "lastRenewedAt": g.last_renewed_at.map(crate::util::time::rfc3339),
            "nextAttemptAt": g.next_at_ms.and_then(|ms| {
                u64::try_from(ms).ok().map(crate::util::time::rfc3339_ms)
            }),
        })
    }
}

/// A new key and CSR for the node: (key PEM, CSR PEM, public key DER).
pub fn new_request() -> Result<(String, String, Vec<u8>), RenewError> {
    crate::credentials::enrol::key_and_csr(&crate::sysinfo::hostname())
        .map_err(|e| RenewError::Failed(e.to_string()))
}

/// A `RENEWED` answer that passed [`check_renewed`].
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The new credential set, to stage and prove.
    pub set: CredentialSet,
    /// The cross-certificate that vouched for a CA of the new bundle, for the L1Sec pin
    /// ([`follow_ca`]).
    pub endorsement: Option<String>,
}

/// Check a `RENEWED` answer with [`crate::credentials::trust::admit`]: a bundle of one or two CAs that
/// continues the trust of `current` (the identity being renewed), and a certificate for its
/// node id and the key we generated, valid at `now_s` with a sane lifetime. Anything else is
/// refused and the current identity stays.
pub fn check_renewed(
    r: &Renewed,
    current: &NodeIdentity,
    key_pem: String,
    public_key_der: &[u8],
    now_s: i64,
) -> Result<Accepted, RenewError> {
    let admitted = crate::credentials::trust::admit(
        &current.trusted_cas,
        &r.ca_pem,
        r.ca_cross_pem.as_deref(),
        &r.certificate_pem,
        &current.node_id,
        public_key_der,
        Some(now_s),
    )
    .map_err(|m| {
        RenewError::Failed(format!(
            "the control plane's RENEWED is refused (the current certificate stays in use): {m}"
        ))
    })?;
    Ok(Accepted {
        set: CredentialSet {
            key_pem,
            cert_pem: r.certificate_pem.clone(),
            ca_pem: r.ca_pem.clone(),
        },
        endorsement: admitted.endorsement,
    })
}

/// The time (seconds since the epoch) by which a renewed certificate is judged: the node's
/// clock corrected by the control plane's offset when that is within
/// the daemon's trusted bound, else the node's own clock: `offset_ms` is the trusted offset (0
/// when there is none).
pub fn judging_now_s(offset_ms: i64) -> i64 {
    now_ms().saturating_add(offset_ms).div_euclid(1000)
}

/// Why the control plane's answer to HELLO ends the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The node is revoked.
    Revoked(String),
    /// The peers speak different protocol versions.
    Incompatible(String),
    /// Any other refusal or an unusable answer.
    Failed(String),
}

/// How a handshake ended without a usable WELCOME ([`handshake`]).
#[derive(Debug)]
pub enum HandshakeError {
    /// HELLO could not be written (within the bound).
    Send(FrameError),
    /// The peer closed the connection before answering.
    Closed,
    /// Reading the answer failed.
    Read(FrameError),
    /// No answer within the bound.
    NoAnswer(Duration),
    /// The answer (kept here) refused the session or was unusable.
    Refused(Refused, Box<Envelope>),
}

/// The one HELLO/WELCOME exchange of the session and of the renewal probe: write `hello` under
/// `tag` (within `write_within`), read the first frame (within `answer_within`) and judge it
/// ([`handshake_answer`]). The caller maps the failure to its own errors.
pub async fn handshake<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    hello: &Hello,
    tag: Tag,
    write_within: Duration,
    answer_within: Duration,
) -> Result<Welcome, HandshakeError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let env = Envelope::with_type(types::HELLO, tag, hello);
    net::write_within(writer, &env, write_within)
        .await
        .map_err(HandshakeError::Send)?;
    let first = match tokio::time::timeout(answer_within, reader.read()).await {
        Ok(Ok(Some(env))) => env,
        Ok(Ok(None)) => return Err(HandshakeError::Closed),
        Ok(Err(e)) => return Err(HandshakeError::Read(e)),
        Err(_) => return Err(HandshakeError::NoAnswer(answer_within)),
    };
    handshake_answer(&first, tag).map_err(|r| HandshakeError::Refused(r, Box::new(first)))
}

/// Longest control-plane message kept in an error (characters).
pub const MAX_PEER_MESSAGE_CHARS: usize = 200;

/// The HELLO of this agent for `id`.
pub fn hello(
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
        wireguard_public_key: None,
    }
}

/// Judge the answer to HELLO: the one handshake judgement of the session and of the renewal
/// probe (a `WELCOME` with the HELLO's tag, a protocol version spoken here, a sane frame size).
pub fn handshake_answer(env: &Envelope, hello_tag: Tag) -> Result<Welcome, Refused> {
    if env.is(types::ERROR) {
        let e: ErrorPayload = env.payload().unwrap_or_else(|_| {
            ErrorPayload::new(ErrorCode::Other, "ERROR with an unreadable payload")
        });
        let message = peertext::clean(&e.message, MAX_PEER_MESSAGE_CHARS);
        return Err(match e.code {
            ErrorCode::Revoked => Refused::Revoked(message),
            ErrorCode::VersionMismatch => Refused::Incompatible(message),
            _ => Refused::Failed(format!(
                "the control plane refused the session ({}): {message}",
                e.code
            )),
        });
    }
    if !env.is(types::WELCOME) || env.tag != hello_tag {
        return Err(Refused::Failed(format!(
            "expected WELCOME with the HELLO's tag, got {}",
            env.kind
        )));
    }
    let w: Welcome = env
        .payload()
        .map_err(|_| Refused::Failed("WELCOME payload is malformed".into()))?;
    control::check_version(w.protocol_version).map_err(|e| Refused::Incompatible(e.message))?;
    if w.max_frame_bytes < runos_protocol::MIN_MAX_FRAME_BYTES {
        // Below the floor the agent cannot even send its own heartbeats and ERRORs reliably.
        return Err(Refused::Failed(format!(
            "protocol error: WELCOME announces a maximum frame size below the protocol's floor of {} bytes",
            runos_protocol::MIN_MAX_FRAME_BYTES
        )));
    }
    Ok(w)
}

/// The identity a credential set gives, for `host:port`.
pub fn identity_of(
    set: &CredentialSet,
    paths: &Paths,
    host: &str,
    port: u16,
) -> Result<NodeIdentity, RenewError> {
    identity::build(
        host,
        port,
        [
            (paths.key.as_path(), set.key_pem.as_bytes()),
            (paths.certificate.as_path(), set.cert_pem.as_bytes()),
            (paths.ca.as_path(), set.ca_pem.as_bytes()),
        ],
    )
    .map_err(|e| RenewError::Failed(e.to_string()))
}

type Reader =
    FrameReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;
type Writer =
    FrameWriter<tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;

/// A probe session: HELLO with `probe: true`, so the control plane sends no instructions and
/// leaves the node's live session alone.
#[derive(Debug)]
pub struct Probe {
    reader: Reader,
    writer: Writer,
    addr: String,
}

impl Probe {
    /// Connect with `id` and complete HELLO/WELCOME.
    pub async fn open(id: &NodeIdentity, max_frame: u32) -> Result<Probe, RenewError> {
        let addr = net::addr(&id.host, id.port);
        let work = async {
            let tls = net::connect_tls(
                &id.host,
                id.port,
                id.tls.clone(),
                runos_protocol::ALPN_L2SEC,
            )
            .await
            .map_err(|e| match e {
                net::ConnectError::Unreachable { .. } => RenewError::Unreachable(e.to_string()),
                net::ConnectError::Tls { .. } => RenewError::Tls(e.to_string()),
            })?;
            let (r, w) = tokio::io::split(tls);
            let mut reader = FrameReader::new(r, max_frame);
            let mut writer = FrameWriter::new(w, max_frame);
            let tag = Tag::random();
            let hello = hello(id, Vec::new(), Vec::new(), true);
            // The whole probe is bounded by PROBE_TIMEOUT (below).
            match handshake(
                &mut reader,
                &mut writer,
                &hello,
                tag,
                PROBE_TIMEOUT,
                PROBE_TIMEOUT,
            )
            .await
            {
                Ok(w) => {
                    writer.set_max(w.max_frame_bytes);
                    Ok(Probe {
                        reader,
                        writer,
                        addr: addr.clone(),
                    })
                }
                Err(HandshakeError::Send(e)) => Err(RenewError::Unreachable(format!(
                    "sending HELLO to {addr}: {e}"
                ))),
                Err(HandshakeError::Closed) => Err(RenewError::Tls(format!(
                    "{addr} closed the connection before WELCOME (is the certificate accepted?)"
                ))),
                // A refused client certificate shows up here in TLS 1.3, as an alert.
                Err(HandshakeError::Read(e)) => {
                    Err(RenewError::Tls(format!("waiting for WELCOME: {e}")))
                }
                Err(HandshakeError::NoAnswer(within)) => Err(RenewError::Unreachable(format!(
                    "no WELCOME from {addr} within {} s",
                    within.as_secs()
                ))),
                Err(HandshakeError::Refused(Refused::Revoked(m), _)) => Err(RenewError::Revoked(m)),
                Err(HandshakeError::Refused(other, _)) => Err(RenewError::Failed(
                    PeerText::new(&format!("{other:?}")).to_string(),
                )),
            }
        };
        tokio::time::timeout(PROBE_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| {
                Err(RenewError::Unreachable(format!(
                    "no WELCOME from {addr} within {} s",
                    PROBE_TIMEOUT.as_secs()
                )))
            })
    }

    /// Send `RENEW` and wait for its answer; a `busy` answer is retried every
    /// [`BUSY_RETRY`], up to [`BUSY_RETRIES`] times.
    pub async fn renew(&mut self, csr_pem: String) -> Result<Renewed, RenewError> {
        let mut tries = 0;
        loop {
            match self.renew_once(csr_pem.clone()).await {
                Err(RenewError::Busy(m)) if tries < BUSY_RETRIES => {
                    tries += 1;
                    tracing::debug!("renewal: control plane busy ({m}); trying again");
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                other => return other,
            }
        }
    }

    async fn renew_once(&mut self, csr_pem: String) -> Result<Renewed, RenewError> {
        let tag = Tag::random();
        self.writer
            .write(&Envelope::with_type(
                types::RENEW,
                tag,
                &control::Renew { csr_pem },
            ))
            .await
            .map_err(|e| RenewError::Unreachable(format!("sending RENEW to {}: {e}", self.addr)))?;
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            let env = match tokio::time::timeout_at(deadline, self.reader.read()).await {
                Err(_) => {
                    return Err(RenewError::Failed(format!(
                        "no answer to RENEW within {} s",
                        ANSWER_TIMEOUT.as_secs()
                    )));
                }
                Ok(Ok(Some(env))) => env,
                Ok(Ok(None)) => {
                    return Err(RenewError::Unreachable(format!(
                        "{} closed the connection during the renewal",
                        self.addr
                    )));
                }
                Ok(Err(e)) => return Err(RenewError::Unreachable(e.to_string())),
            };
            if env.tag != tag {
                // Not ours (a stray message on a probe session): ignore it.
                continue;
            }
            return renew_answer(&env);
        }
    }

    /// Close the session.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writer.shutdown()).await;
    }
}

/// Judge the answer to `RENEW` (same tag): `RENEWED` or `ERROR`.
pub fn renew_answer(env: &Envelope) -> Result<Renewed, RenewError> {
    if env.is(types::ERROR) {
        let e: ErrorPayload = env.payload().unwrap_or_else(|_| {
            ErrorPayload::new(ErrorCode::Other, "ERROR with an unreadable payload")
        });
        return Err(match e.code {
            ErrorCode::Revoked => RenewError::Revoked(PeerText::new(&e.message).to_string()),
            ErrorCode::Busy => RenewError::Busy(PeerText::new(&e.message).to_string()),
            _ => RenewError::Failed(format!(
                "the control plane refused the renewal ({}): {}",
                e.code,
                PeerText::new(&e.message)
            )),
        });
    }
    if !env.is(types::RENEWED) {
        return Err(RenewError::Failed(format!(
            "expected RENEWED, got {}",
            env.kind
        )));
    }
    env.payload()
        .map_err(|_| RenewError::Failed("the RENEWED payload is malformed".into()))
}

/// What a successful renewal produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The new certificate's serial (hex).
    pub serial_hex: String,
    /// Its notAfter, seconds since the epoch.
    pub not_after: i64,
}

impl Outcome {
    /// As JSON for `runos certificate renew --json`.
    pub fn to_json(&self) -> Value {
        json!({
            "renewed": true,
            "serial": self.serial_hex,
            "notAfter": (self.not_after >= 0).then(|| crate::util::time::rfc3339_secs(self.not_after)),
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::util::fs::FsError> + Send + 'static,
) -> Result<T, RenewError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| RenewError::Failed(e.to_string())),
        Err(e) => Err(RenewError::Failed(format!("file task failed: {e}"))),
    }
}

/// Stage `set`, prove it with a probe session to `host:port`, and promote it. On any failure
/// the staged set is discarded and the current one stays. Returns the new certificate's facts.
pub async fn switch_to(
    set: CredentialSet,
    paths: Paths,
    host: String,
    port: u16,
    max_frame: u32,
    renewing: Option<String>,
) -> Result<Outcome, RenewError> {
    // One switch at a time (the daemon's renewal, `certificate renew`, `register --force`).
    let _switch = match credentials::switch_lock(&paths) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Err(RenewError::Busy(
                "another credential switch is in progress (renewal or re-registration)".into(),
            ));
        }
        Err(e) => return Err(RenewError::Failed(e.to_string())),
    };
    // A renewal replaces only the identity it renewed: if the current certificate is another
    // one now (`register --force` meanwhile), the renewed set is stale and dropped.
    if let Some(serial) = renewing {
        let current = crate::credentials::read_certificate(&paths.certificate).ok();
        if current.as_ref().map(|i| i.serial_hex.as_str()) != Some(serial.as_str()) {
            return Err(RenewError::Failed(
                "the node's identity changed during the renewal (re-registered?); the renewed certificate is dropped".into(),
            ));
        }
    }
    switch_locked(set, paths, host, port, max_frame).await
}

/// [`switch_to`] for a caller that holds the switch lock ([`credentials::switch_lock`]).
pub async fn switch_locked(
    set: CredentialSet,
    paths: Paths,
    host: String,
    port: u16,
    max_frame: u32,
) -> Result<Outcome, RenewError> {
    let id = identity_of(&set, &paths, &host, port)?;
    // Finish a switch that failed halfway (a promotion cut short by a full disk, say) before
    // starting another: staging over it would lose it.
    let p = paths.clone();
    blocking(move || credentials::recover_unlocked(&p).map(|_| ())).await?;
    let p = paths.clone();
    blocking(move || credentials::stage(&p, &set)).await?;
    tracing::debug!(serial = %id.serial_hex, "new credentials staged; proving them");
    let proven = match Probe::open(&id, max_frame).await {
        Ok(probe) => {
            probe.close().await;
            Ok(())
        }
        Err(e) => Err(e),
    };
    let p = paths.clone();
    match proven {
        Ok(()) => {
            tracing::debug!(serial = %id.serial_hex, "new credentials proven; promoting them");
            blocking(move || credentials::promote(&p)).await?;
            tracing::debug!(serial = %id.serial_hex, "new credentials promoted");
            Ok(Outcome {
                serial_hex: id.serial_hex,
                not_after: id.not_after,
            })
        }
        Err(e) => {
            let _ = blocking(move || credentials::discard(&p)).await;
            let why = |m: String| {
                format!(
                    "the new certificate could not be proven (the current one stays in use): {m}"
                )
            };
            Err(match e {
                RenewError::Revoked(m) => RenewError::Revoked(m),
                RenewError::Unreachable(m) => RenewError::Unreachable(why(m)),
                RenewError::Tls(m) => RenewError::Tls(why(m)),
                RenewError::Failed(m) | RenewError::Busy(m) => RenewError::Failed(why(m)),
            })
        }
    }
}

/// After a renewal: keep the L1Sec trust (`paths.l1_ca` and `server.l1_ca_sha256`, used by a
/// later `register --force`) in step with a CA rotation. When the pinned L1Sec CA is no longer
/// in the L2Sec bundle the renewal installed, and that bundle holds exactly one CA (the control
/// plane has cut over), that CA becomes the L1Sec CA and its digest the pin, but only when
/// `endorsement` (the renewal's cross-certificate) vouches for exactly that CA under the pinned
/// one: the pin never follows to a CA the pinned CA did not sign off. During the overlap (two
/// CAs) nothing changes. Returns the new pin when it changed.
pub fn follow_ca(
    config_path: &std::path::Path,
    endorsement: Option<&str>,
    offset_ms: i64,
) -> Result<Option<String>, String> {
    let (cfg, _) = crate::config::load(config_path).map_err(|e| e.to_string())?;
    let Some(pin) = cfg.server.l1_ca_sha256.clone() else {
        return Ok(None);
    };
    let Some(host) = cfg.server.host.clone() else {
        return Ok(None);
    };
    let bundle = crate::util::fs::read_capped(&cfg.paths.ca, identity::MAX_PEM_FILE)
        .map_err(|e| format!("{}: {e}", cfg.paths.ca.display()))?;
    let cas = runos_transport::pem::certificates(&bundle).map_err(|e| e.to_string())?;
    let digests: Vec<String> = cas
        .iter()
        .map(|c| runos_transport::pem::der_sha256(c))
        .collect();
    if digests.contains(&pin) || cas.len() != 1 {
        return Ok(None);
    }
    let stays = "the L1Sec pin stays at the previous CA (a later `register --force` needs a token carrying the new CA's pin)";
    let Some(endorsement) = endorsement else {
        return Err(format!(
            "the control plane's CA changed without a cross-certificate from the pinned CA; {stays}"
        ));
    };
    let l1 = crate::util::fs::read_capped(&cfg.paths.l1_ca, identity::MAX_PEM_FILE)
        .map_err(|e| format!("{}: {e}", cfg.paths.l1_ca.display()))?;
    let pinned = runos_transport::pem::certificates(&l1)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|c| runos_transport::pem::der_sha256(c) == pin)
        .ok_or_else(|| {
            format!(
                "{} holds no certificate with the pinned digest; {stays}",
                cfg.paths.l1_ca.display()
            )
        })?;
    let cross = runos_transport::pem::certificates(endorsement.as_bytes())
        .ok()
        .and_then(|mut v| (v.len() == 1).then(|| v.remove(0)))
        .ok_or_else(|| format!("the cross-certificate is unreadable; {stays}"))?;
    if !crate::credentials::trust::vouches(&cross, &cas[0], &pinned, Some(judging_now_s(offset_ms)))
    {
        return Err(format!(
            "the cross-certificate does not vouch for the new CA under the pinned one; {stays}"
        ));
    }
    crate::util::fs::write_atomic(
        &cfg.paths.l1_ca,
        &bundle,
        crate::util::fs::Mode::Exact(0o644),
    )
    .map_err(|e| e.to_string())?;
    crate::config::update_server(
        config_path,
        &host,
        cfg.server.l1_port,
        cfg.server.l2_port,
        Some(&digests[0]),
    )
    .map_err(|e| e.to_string())?;
    Ok(Some(digests[0].clone()))
}

/// [`follow_ca`] with the cross-certificate of the last promoted renewal, logging its outcome.
/// `endorsement` is the promoted renewal's ([`Renewer::take_endorsement`]); `offset_ms` is the
/// trusted clock offset ([`judging_now_s`]).
pub fn follow_ca_logged(
    config_path: &std::path::Path,
    endorsement: Option<String>,
    offset_ms: i64,
) {
    match follow_ca(config_path, endorsement.as_deref(), offset_ms) {
        Ok(Some(pin)) => tracing::info!(
            ca_sha256 = %pin,
            "the control plane's CA changed (rotation cut over, vouched for by the pinned CA): the L1Sec CA and pin follow it"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!("cannot update the L1Sec CA after a CA rotation: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_with_bounded_jitter() {
        assert_eq!(renew_at_ms(0, 90, RENEW_FRACTION), 60_000);
        for s in ["01", "ff", "abcdef", "1234567890abcdef"] {
            let f = fraction_for(s);
            assert!((RENEW_FRACTION - RENEW_JITTER..=RENEW_FRACTION + RENEW_JITTER).contains(&f));
            assert_eq!(f, fraction_for(s), "stable per serial");
        }
        // A broken certificate (notAfter before notBefore) is due at once, without overflow.
        assert_eq!(renew_at_ms(100, 50, 0.5), 100_000);
        assert!(renew_at_ms(i64::MAX / 1000, i64::MAX / 1000 + 10, 0.5) > 0);
    }

    #[test]
    fn retry_backoff_is_capped_by_the_lifetime() {
        let month = 30 * 86400;
        assert_eq!(retry_delay(1, month), Duration::from_secs(10));
        assert_eq!(retry_delay(2, month), Duration::from_secs(20));
        assert_eq!(retry_delay(40, month), Duration::from_secs(3600));
        // A minute-long certificate retries every few seconds.
        assert_eq!(retry_delay(1, 90), Duration::from_secs(9));
        assert_eq!(retry_delay(5, 60), Duration::from_secs(6));
        assert_eq!(retry_delay(5, 0), Duration::from_secs(5));
    }

    #[test]
    fn renewer_tracks_failures_and_success() {
        let r = Renewer::default();
        r.started();
        assert_eq!(r.to_json()["state"], "renewing");
        r.failed("no answer", 90);
        assert_eq!(r.failures(), 1);
        assert_eq!(r.to_json()["state"], "failing");
        assert_eq!(r.to_json()["lastError"], "no answer");
        r.succeeded(None);
        assert_eq!(r.failures(), 0);
        assert_eq!(r.to_json()["state"], "ok");
        assert!(r.to_json()["lastRenewedAt"].is_string());
    }

    #[test]
    fn answers_are_judged() {
        let t = Tag::random();
        let err = Envelope::with_type(
            types::ERROR,
            t,
            &ErrorPayload::new(ErrorCode::Revoked, "gone"),
        );
        assert_eq!(
            renew_answer(&err).unwrap_err(),
            RenewError::Revoked("gone".into())
        );
        let busy = Envelope::with_type(
            types::ERROR,
            t,
            &ErrorPayload::new(ErrorCode::Busy, "later"),
        );
        assert!(matches!(renew_answer(&busy), Err(RenewError::Busy(_))));
        let other = Envelope::with_type(types::WELCOME, t, &serde_json::json!({}));
        assert!(renew_answer(&other).is_err());
        // The control plane's text reaches logs and `runos status` escaped.
        let forged = Envelope::with_type(
            types::ERROR,
            t,
            &ErrorPayload::new(ErrorCode::BadRequest, "no\n\u{1b}[31mINFO forged"),
        );
        let m = renew_answer(&forged).unwrap_err().to_string();
        assert!(!m.chars().any(char::is_control), "{m:?}");
    }

    /// A self-signed CA (name, key) as (PEM, DER, issuer).
    fn test_ca(name: &str) -> (String, Vec<u8>, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let params = || {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            p
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params().self_signed(&key).unwrap();
        (
            cert.pem(),
            cert.der().to_vec(),
            rcgen::Issuer::new(params(), key),
        )
    }

    /// The L1Sec pin follows a cut-over CA only when the renewal's cross-certificate vouches
    /// for exactly that CA under the pinned one.
    #[test]
    fn the_l1sec_pin_follows_only_a_ca_the_pinned_one_vouched_for() {
        let d = tempfile::tempdir().unwrap();
        let (a_pem, a_der, a) = test_ca("A");
        let (b_pem, _, b) = test_ca("B");
        let (_, _, x) = test_ca("X");
        let pin_a = runos_transport::pem::der_sha256(&a_der);
        let cross_by = |by: &rcgen::Issuer<'static, rcgen::KeyPair>| {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name.push(rcgen::DnType::CommonName, "B");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            p.signed_by(b.key(), by).unwrap().pem()
        };
        let (good, forged) = (cross_by(&a), cross_by(&x));
        let path = |f: &str| d.path().join(f).display().to_string();
        let config = d.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nhost = \"127.0.0.1\"\nl1_ca_sha256 = \"{pin_a}\"\n\n[paths]\n\
                 key = \"{}\"\ncertificate = \"{}\"\nca = \"{}\"\nl1_ca = \"{}\"\n\
                 state_dir = \"{}\"\nrun_dir = \"{}\"\n",
                path("node.key"),
                path("node.crt"),
                path("ca.pem"),
                path("l1.pem"),
                path("state"),
                path("run"),
            ),
        )
        .unwrap();
        std::fs::write(d.path().join("l1.pem"), &a_pem).unwrap();
        let pin = || crate::config::load(&config).unwrap().0.server.l1_ca_sha256;
        let l1 = || std::fs::read_to_string(d.path().join("l1.pem")).unwrap();

        // During the overlap ([A, B]) nothing moves.
        std::fs::write(d.path().join("ca.pem"), format!("{a_pem}{b_pem}")).unwrap();
        assert_eq!(follow_ca(&config, Some(&good), 0), Ok(None));
        // Cut over to [B]: without a cross-certificate, or with one not from A, the pin stays.
        std::fs::write(d.path().join("ca.pem"), &b_pem).unwrap();
        assert!(
            follow_ca(&config, None, 0)
                .unwrap_err()
                .contains("pin stays")
        );
        assert!(
            follow_ca(&config, Some(&forged), 0)
                .unwrap_err()
                .contains("pin stays")
        );
        assert!(follow_ca(&config, Some("junk"), 0).is_err());
        assert_eq!(pin(), Some(pin_a.clone()));
        assert_eq!(l1(), a_pem);
        // With A's cross-certificate for B it follows B.
        let pin_b = runos_transport::pem::der_sha256(
            &runos_transport::pem::certificates(b_pem.as_bytes()).unwrap()[0],
        );
        assert_eq!(follow_ca(&config, Some(&good), 0), Ok(Some(pin_b.clone())));
        assert_eq!(pin(), Some(pin_b));
        assert_eq!(l1(), b_pem);
    }
}
