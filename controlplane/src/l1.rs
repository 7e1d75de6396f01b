//! L1Sec: the enrolment server (TLS 1.3, server authentication only). One REGISTER exchange
//! per connection.

use std::sync::Arc;
use std::time::Duration;

use runos_protocol::control::{self, Register, Registered, types};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, Tag};
use runos_transport::{FrameError, FrameReader, FrameWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::db::{NewCert, NewNode, TokenProblem};
use crate::listen::{self, RateLimited};
use crate::server::{HANDSHAKE_TIMEOUT, Shared};
use crate::{Error, util};

/// Largest frame on L1Sec, both directions.
pub const L1_MAX_FRAME: u32 = 256 * 1024;
/// Concurrent enrolment connections; more wait in the accept queue. A connection lasts at most
/// `CONNECTION_DEADLINE`, and one source address holds at most `--max-handshakes-per-source`
/// of them.
pub const MAX_CONNECTIONS: usize = 128;
/// Upper bound of one whole enrolment connection.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

pub(crate) async fn run(listener: TcpListener, shared: Arc<Shared>) {
    let shutdown = shared.shutdown.clone();
    let source_full = Arc::new(RateLimited::new());
    let mut conns = listen::accept_loop(
        listener,
        "L1Sec",
        Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        shutdown,
        |stream, peer, slot| {
            // The current TLS configuration: a CA cutover replaces it for later connections.
            let acceptor = TlsAcceptor::from(shared.l1_tls());
            let shared = shared.clone();
            let source_full = source_full.clone();
            async move {
                let _slot = slot;
                let source = match stream.peer_addr() {
                    Ok(a) => match shared.l1_sources.try_take(a.ip()) {
                        Some(s) => Some(s),
                        None => {
                            if let Some(suppressed) = source_full.check() {
                                tracing::warn!(
                                    source = %a.ip(),
                                    max = shared.l1_sources.max(),
                                    closed_since_last_line = suppressed,
                                    "L1Sec: too many connections from one address; connection \
                                     closed (--max-handshakes-per-source)"
                                );
                            }
                            return;
                        }
                    },
                    Err(_) => None,
                };
                let _source = source;
                if tokio::time::timeout(CONNECTION_DEADLINE, handle(stream, acceptor, &shared))
                    .await
                    .is_err()
                {
                    tracing::debug!(%peer, "L1Sec connection took too long; closed");
                }
            }
        },
    )
    .await;
    conns.shutdown().await;
}

fn error_env(tag: Tag, code: ErrorCode, message: impl Into<String>) -> Envelope {
    Envelope::with_type(types::ERROR, tag, &ErrorPayload::new(code, message))
}

async fn handle(stream: TcpStream, acceptor: TlsAcceptor, shared: &Shared) {
    let peer = stream.peer_addr().ok();
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "L1Sec TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(?peer, "L1Sec TLS handshake timed out");
            return;
        }
    };
    if !runos_transport::tls::alpn_matches(
        tls.get_ref().1.alpn_protocol(),
        runos_protocol::ALPN_L1SEC,
    ) {
        tracing::debug!(?peer, "L1Sec: wrong or missing ALPN; closed");
        return;
    }
    let (r, w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, L1_MAX_FRAME);
    let mut writer = FrameWriter::new(w, L1_MAX_FRAME);
    let reply = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.read()).await {
        Err(_) => {
            tracing::debug!(?peer, "L1Sec: no REGISTER within the handshake timeout");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(FrameError::Decode(e))) => {
            tracing::info!(?peer, error = %e, "L1Sec: invalid frame");
            error_env(Tag::random(), ErrorCode::Protocol, e.to_string())
        }
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "L1Sec read failed");
            return;
        }
        Ok(Ok(Some(env))) => match register(shared, &env) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::error!(?peer, error = %e, "L1Sec: enrolment failed");
                error_env(env.tag, ErrorCode::Internal, "internal error")
            }
        },
    };
    let done = async {
        writer.write(&reply).await?;
        writer.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(HANDSHAKE_TIMEOUT, done)
        .await
        .unwrap_or(Err(FrameError::Truncated))
    {
        tracing::debug!(?peer, error = %e, "L1Sec: could not send the answer");
    }
}

fn bounded_ident(name: &str, v: &str, allow_empty: bool) -> Result<(), String> {
    if v.len() > control::MAX_IDENT_LEN {
        return Err(format!(
            "{name} is longer than {} bytes",
            control::MAX_IDENT_LEN
        ));
    }
    if !allow_empty && v.is_empty() {
        return Err(format!("{name} is empty"));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{name} contains control characters"));
    }
    Ok(())
}

/// Handle one REGISTER envelope; the answer is REGISTERED or ERROR with the same tag.
fn register(shared: &Shared, env: &Envelope) -> Result<Envelope, Error> {
    let tag = env.tag;
    let bad = |m: String| Ok(error_env(tag, ErrorCode::BadRequest, m));
    if !env.is(types::REGISTER) {
        return bad(format!("expected REGISTER, got {}", env.kind));
    }
    let req: Register = match env.payload() {
        Ok(r) => r,
        Err(e) => return bad(format!("REGISTER payload: {e}")),
    };
    if req.token.is_empty() || req.token.len() > control::MAX_TOKEN_LEN {
        return Ok(error_env(tag, ErrorCode::TokenUnknown, "unknown token"));
    }
    for (name, v, empty_ok) in [
        ("machineId", req.machine_id.as_str(), false),
        ("hostname", req.hostname.as_str(), false),
        ("os", req.os.as_str(), true),
        ("agentVersion", req.agent_version.as_str(), true),
    ] {
        if let Err(m) = bounded_ident(name, v, empty_ok) {
            return bad(m);
        }
    }
    let hash = crate::api::token_hash(&req.token);
    let now = util::now_ms();
    if let Err(p) = shared.db.token_status(&hash, now)? {
        return Ok(token_error(tag, p, &req.hostname));
    }
    let node_id = uuid::Uuid::new_v4().hyphenated().to_string();
    // One snapshot: the bundle sent is the one of the CA that signs.
    let ca = shared.ca();
    let issued = match ca.sign_csr(&req.csr_pem, &node_id, shared.opts.cert_validity)? {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(hostname = %req.hostname, error = %e, "enrolment refused: bad CSR");
            return bad(e.to_string());
        }
    };
    let node = NewNode {
        id: &node_id,
        machine_id: &req.machine_id,
        hostname: &req.hostname,
        os: &req.os,
        agent_version: &req.agent_version,
    };
    let cert = NewCert {
        serial_hex: &issued.serial_hex,
        not_before_ms: issued.not_before_ms,
        not_after_ms: issued.not_after_ms,
        ca_sha256: &issued.ca_sha256,
    };
    if let Err(p) = shared.db.enrol(&hash, now, &node, &cert)? {
        return Ok(token_error(tag, p, &req.hostname));
    }
    tracing::info!(
        node = %node_id,
        hostname = %req.hostname,
        serial = %issued.serial_hex,
        expires = %util::rfc3339_ms(issued.not_after_ms),
        "node registered"
    );
    Ok(Envelope::with_type(
        types::REGISTERED,
        tag,
        &Registered {
            node_id,
            certificate_pem: issued.pem,
            ca_pem: ca.bundle_pem(),
            ca_cross_pem: ca.cross_pem().map(str::to_string),
        },
    ))
}

fn token_error(tag: Tag, p: TokenProblem, hostname: &str) -> Envelope {
    let (code, msg) = match p {
        TokenProblem::Unknown => (ErrorCode::TokenUnknown, "unknown token"),
        TokenProblem::Expired => (ErrorCode::TokenExpired, "the token has expired"),
        TokenProblem::Used => (ErrorCode::TokenUsed, "the token was already used"),
    };
    // The token itself is never logged.
    tracing::info!(hostname = %hostname, code = %code, "enrolment refused");
    error_env(tag, code, msg)
}
