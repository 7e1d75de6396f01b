//! The operator socket: a Unix domain socket (mode 0600) speaking newline-delimited JSON, one
//! request line and one response line at a time.
//!
//! Requests: `{"op":"token_create","ttlSecs":3600}`, `{"op":"nodes"}`,
//! `{"op":"send","node":..,"type":..,"payload":{..}|"rawB64":..,"timeoutMs":..,"waitMs":..,
//! "tag":..}`,
//! `{"op":"send_many","requests":[{"node":..,"type":..,"payload":..,"rawB64":..,"timeoutMs":..},
//! ..]}` (all stored in one transaction, or none; answers `{"tags":[..]}` in request order),
//! `{"op":"reply","tag":..,"waitMs":..}`, `{"op":"revoke","node":..}`, `{"op":"ping"}`,
//! `{"op":"ca_status","seenWithinSecs":..}`, `{"op":"ca_rotate"}`,
//! `{"op":"ca_cutover","force":..,"seenWithinSecs":..}`.
//! Responses: `{"ok":true,"result":..}` or `{"ok":false,"error":{"code","message","tag"?}}`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::api::{Api, SendRequest};
use crate::listen;
use crate::server::Shared;
use crate::{Error, util};

/// Largest request line, beyond the largest frame (JSON and base64 overhead).
const REQUEST_OVERHEAD: usize = 64 * 1024;
/// How long a client has to send a request line.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// Concurrent operator connections; more wait in the accept queue. The open-file budget keeps
/// room for all of them whatever the number of sessions.
pub const MAX_CONNECTIONS: usize = 64;

/// A request on the operator socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", rename_all_fields = "camelCase")]
pub enum Request {
    /// Liveness check.
    Ping,
    /// Create an enrolment token.
    TokenCreate {
        /// Lifetime in seconds.
        ttl_secs: u64,
    },
    /// List nodes.
    Nodes,
    /// Send an instruction; with `wait_ms`, wait that long for its final reply.
    Send {
        /// Node id, unique id prefix or hostname.
        node: String,
        /// The instruction type.
        #[serde(rename = "type")]
        kind: String,
        /// The payload as JSON (default `{}`).
        #[serde(default)]
        payload: Option<serde_json::Value>,
        /// Instead of `payload`: text put verbatim in `jsonB64`.
        #[serde(default)]
        raw_b64: Option<String>,
        /// The envelope's `timeoutMs`.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// How long to wait for the final reply, in milliseconds.
        #[serde(default)]
        wait_ms: Option<u64>,
        /// The instruction's tag (a UUID) instead of a fresh one: a retry with the same tag
        /// and the same instruction answers as the first send; a different instruction with
        /// it is refused (`tag_conflict`).
        #[serde(default)]
        tag: Option<String>,
    },
    /// Send many instructions (fresh tags) in one transaction: all are stored, or none when any
    /// request is invalid. Answers `{"tags":[..]}`, in the order of the requests.
    SendMany {
        /// The instructions, at most [`crate::api::MAX_SEND_MANY`].
        requests: Vec<SendRequest>,
    },
    /// The final reply of an instruction sent earlier: the stored reply, or
    /// `{"tag","pending":true}` when there is none yet; with `wait_ms`, wait that long for it
    /// (a `timeout` error when it does not come).
    Reply {
        /// The instruction's tag.
        tag: String,
        /// How long to wait for the final reply, in milliseconds.
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Revoke a node.
    Revoke {
        /// Node id, unique id prefix or hostname.
        node: String,
    },
    /// The CA status.
    CaStatus {
        /// Window for the nodes that block a cutover, in seconds (default 30 days).
        #[serde(default)]
        seen_within_secs: Option<u64>,
    },
    /// Start a CA rotation.
    CaRotate,
    /// Finish a CA rotation.
    CaCutover {
        /// Cut over even though recently seen nodes hold only old certificates.
        #[serde(default)]
        force: bool,
        /// Window for the nodes that block a cutover, in seconds (default 30 days).
        #[serde(default)]
        seen_within_secs: Option<u64>,
    },
}

fn seen_within(secs: Option<u64>) -> Duration {
    secs.map_or(crate::api::DEFAULT_SEEN_WITHIN, Duration::from_secs)
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// Stable code (see [`Error::code`]).
    pub code: String,
    /// Message.
    pub message: String,
    /// The instruction tag, for `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// A response on the operator socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorAnswer>,
}

impl Response {
    fn ok(v: impl Serialize) -> Response {
        match serde_json::to_value(v) {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response::err(&Error::Internal(e.to_string()), None),
        }
    }

    fn err(e: &Error, tag: Option<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(ErrorAnswer {
                code: e.code().to_string(),
                message: e.to_string(),
                tag,
            }),
        }
    }
}

/// Bind the operator socket at `path` with mode 0600. A stale socket file is replaced; a
/// socket a running control plane answers on is an error.
pub(crate) async fn bind(path: &Path) -> Result<UnixListener, Error> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::AdminSocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        util::ensure_private_dir(dir)?;
    }
    let l = UnixListener::bind(path).map_err(|e| Error::Bind {
        addr: path.display().to_string(),
        source: e,
    })?;
    util::chmod(path, 0o600)?;
    Ok(l)
}

pub(crate) async fn run(listener: UnixListener, shared: Arc<Shared>) {
    let shutdown = shared.shutdown.clone();
    let mut conns = listen::accept_loop(
        listener,
        "operator socket",
        Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        shutdown,
        |stream, _peer, slot| {
            let shared = shared.clone();
            async move {
                let _slot = slot;
                connection(stream, shared).await;
            }
        },
    )
    .await;
    conns.shutdown().await;
}

/// Read one line of at most `max` bytes. `Ok(None)` at a clean end of stream.
async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    max: usize,
) -> Result<Option<Vec<u8>>, String> {
    let mut buf = Vec::new();
    loop {
        let avail = r.fill_buf().await.map_err(|e| e.to_string())?;
        if avail.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("connection closed in the middle of a request".into())
            };
        }
        if let Some(pos) = avail.iter().position(|b| *b == b'\n') {
            buf.extend_from_slice(&avail[..pos]);
            r.consume(pos + 1);
            if buf.len() > max {
                return Err("request too large".into());
            }
            return Ok(Some(buf));
        }
        let n = avail.len();
        buf.extend_from_slice(avail);
        r.consume(n);
        if buf.len() > max {
            return Err("request too large".into());
        }
    }
}

async fn connection(stream: UnixStream, shared: Arc<Shared>) {
    let api = Api::new(shared.clone());
    let max = shared.opts.max_frame_bytes as usize * 2 + REQUEST_OVERHEAD;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let line = match tokio::time::timeout(READ_TIMEOUT, read_line(&mut r, max)).await {
            Err(_) | Ok(Ok(None)) => return,
            Ok(Err(m)) => {
                let resp = Response::err(&Error::BadRequest(m), None);
                let _ = write_response(&mut w, &resp).await;
                return;
            }
            Ok(Ok(Some(line))) => line,
        };
        let resp = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handle(&api, req).await,
            Err(e) => Response::err(&Error::BadRequest(format!("request: {e}")), None),
        };
        if write_response(&mut w, &resp).await.is_err() {
            return;
        }
    }
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(resp).unwrap_or_else(|_| {
        br#"{"ok":false,"error":{"code":"internal","message":"unserializable response"}}"#.to_vec()
    });
    bytes.push(b'\n');
    tokio::time::timeout(READ_TIMEOUT, w.write_all(&bytes))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// A tag given by the operator; the error shows at most 64 characters of the text.
fn parse_tag(text: &str) -> Result<runos_protocol::Tag, Error> {
    runos_protocol::Tag::parse(text).map_err(|_| {
        let mut shown: String = text.chars().take(64).collect();
        if shown.len() < text.len() {
            shown.push_str("...");
        }
        Error::MalformedTag(shown)
    })
}

async fn handle(api: &Api, req: Request) -> Response {
    match req {
        Request::Ping => Response::ok(serde_json::json!({})),
        Request::TokenCreate { ttl_secs } => {
            match api.create_token(Duration::from_secs(ttl_secs)) {
                Ok(t) => Response::ok(t),
                Err(e) => Response::err(&e, None),
            }
        }
        Request::Nodes => match api.nodes() {
            Ok(n) => Response::ok(n),
            Err(e) => Response::err(&e, None),
        },
        Request::Send {
            node,
            kind,
            payload,
            raw_b64,
            timeout_ms,
            wait_ms,
            tag,
        } => {
            let request = SendRequest {
                node,
                kind,
                payload,
                raw_b64,
                timeout_ms,
            };
            let tag = match tag.as_deref().map(parse_tag).transpose() {
                Ok(t) => t,
                Err(e) => return Response::err(&e, None),
            };
            let tag = match api.send_with_tag(&request, tag) {
                Ok(t) => t,
                Err(e) => return Response::err(&e, None),
            };
            match wait_ms {
                None => Response::ok(serde_json::json!({ "tag": tag.to_string() })),
                Some(ms) => {
                    let wait = Duration::from_millis(ms).min(MAX_WAIT);
                    match api.wait_reply(&tag, wait).await {
                        Ok(r) => Response::ok(r),
                        Err(e) => Response::err(&e, Some(tag.to_string())),
                    }
                }
            }
        }
        Request::SendMany { requests } => match api.send_many(&requests) {
            Ok(tags) => Response::ok(serde_json::json!({
                "tags": tags.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })),
            Err(e) => Response::err(&e, None),
        },
        Request::Reply { tag, wait_ms } => {
            let tag = match parse_tag(&tag) {
                Ok(t) => t,
                Err(e) => return Response::err(&e, None),
            };
            let reply = match wait_ms {
                None => api.reply(&tag),
                Some(ms) => {
                    let wait = Duration::from_millis(ms).min(MAX_WAIT);
                    api.wait_reply(&tag, wait).await.map(Some)
                }
            };
            match reply {
                Ok(Some(r)) => Response::ok(r),
                Ok(None) => Response::ok(serde_json::json!({
                    "tag": tag.to_string(),
                    "pending": true,
                })),
                Err(e) => {
                    let t = matches!(e, Error::Timeout).then(|| tag.to_string());
                    Response::err(&e, t)
                }
            }
        }
        Request::Revoke { node } => match api.revoke(&node) {
            Ok(id) => Response::ok(serde_json::json!({ "nodeId": id })),
            Err(e) => Response::err(&e, None),
        },
        Request::CaStatus { seen_within_secs } => {
            match api.ca_status(seen_within(seen_within_secs)) {
                Ok(s) => Response::ok(s),
                Err(e) => Response::err(&e, None),
            }
        }
        Request::CaRotate => match api.ca_rotate().await {
            Ok(c) => Response::ok(c),
            Err(e) => Response::err(&e, None),
        },
        Request::CaCutover {
            force,
            seen_within_secs,
        } => match api.ca_cutover(force, seen_within(seen_within_secs)).await {
            Ok(c) => Response::ok(c),
            Err(e) => Response::err(&e, None),
        },
    }
}
