//! The operator operations, shared by the operator socket and in-process callers (tests, the
//! demo): tokens, node listing, sending instructions, waiting for replies, revocation, and CA
//! rotation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use runos_protocol::control::EnrolmentToken;
use runos_protocol::{Envelope, MessageType, Tag};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::server::{Shared, shutdown_signalled};
use crate::{Error, util};

/// Longest token lifetime.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);
/// Default window of `ca status`/`ca cutover`: nodes seen this recently block a cutover.
pub const DEFAULT_SEEN_WITHIN: Duration = Duration::from_secs(30 * 86400);
/// Longest window of `ca status`/`ca cutover` (longer ones are cut to this).
pub const MAX_SEEN_WITHIN: Duration = Duration::from_secs(3650 * 86400);
/// Most blocking nodes listed by `ca status` and `ca cutover` (the total is always given).
pub const MAX_LISTED_BLOCKERS: u32 = 1000;
/// Most blocking nodes named in the message of a refused cutover.
const NAMED_IN_REFUSAL: usize = 20;

/// A CA as `ca status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaInfo {
    /// The pin: lowercase hex sha256 of the certificate's DER.
    pub sha256: String,
    /// The subject.
    pub subject: String,
    /// notBefore (RFC 3339).
    pub not_before: String,
    /// notAfter (RFC 3339).
    pub not_after: String,
    /// Unrevoked nodes holding an unrevoked, unexpired certificate issued by this CA.
    pub nodes: u64,
}

/// A node that a cutover would lock out: seen recently, holding only (unexpired, unrevoked)
/// certificates of the outgoing CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockingNode {
    /// The node id.
    pub id: String,
    /// Its hostname.
    pub hostname: String,
    /// Last frame received (RFC 3339); none when it never connected since enrolment.
    pub last_seen: Option<String>,
    /// Expiry of its newest certificate from the outgoing CA (RFC 3339).
    pub cert_expires_at: String,
}

/// `ca status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    /// `normal` (one CA) or `rotating` (an incoming CA, both trusted).
    pub phase: String,
    /// The active CA: it signs the server certificate, enrolment tokens carry its pin.
    pub active: CaInfo,
    /// The incoming CA during a rotation: it signs node certificates.
    pub incoming: Option<CaInfo>,
    /// When the rotation started (RFC 3339).
    pub rotating_since: Option<String>,
    /// The window used for `blocking`, in seconds.
    pub seen_within_secs: u64,
    /// How many nodes block a cutover (0 when not rotating).
    pub blocking_total: u64,
    /// The nodes that block a cutover, most recently seen first, at most
    /// [`MAX_LISTED_BLOCKERS`].
    pub blocking: Vec<BlockingNode>,
    /// Warnings, such as an active CA that expires within a year.
    pub warnings: Vec<String>,
}

/// The result of `ca rotate` and `ca cutover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaChange {
    /// `rotate` or `cutover`.
    pub action: String,
    /// The pin of the CA a cutover retired.
    pub retired_sha256: Option<String>,
    /// Where its certificate is archived (its key is destroyed).
    pub retired_file: Option<String>,
    /// How many blocking nodes a forced cutover locked out.
    pub forced_past_total: u64,
    /// Those nodes (at most [`MAX_LISTED_BLOCKERS`]).
    pub forced_past: Vec<BlockingNode>,
    /// The status afterwards.
    pub status: CaStatus,
}

pub(crate) fn describe_window(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86400 && s % 86400 == 0 {
        format!("{}d", s / 86400)
    } else if s >= 3600 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// A freshly created enrolment token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// The token (secret; shown once, stored only as its SHA-256).
    pub token: String,
    /// When it expires (RFC 3339).
    pub expires_at: String,
    /// The L1Sec CA pin (also carried inside the token; `runos register --ca-sha256` may repeat it).
    pub ca_sha256: String,
}

/// A node as `nodes` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// The node id.
    pub id: String,
    /// Hostname (from the last HELLO, else from enrolment).
    pub hostname: String,
    /// Machine id given at enrolment.
    pub machine_id: String,
    /// OS given at enrolment.
    pub os: String,
    /// Agent version (last HELLO).
    pub agent_version: String,
    /// Whether a session is live.
    pub online: bool,
    /// Last frame received (RFC 3339).
    pub last_seen: Option<String>,
    /// When it enrolled (RFC 3339).
    pub registered_at: String,
    /// Expiry of its newest unrevoked certificate (RFC 3339).
    pub cert_expires_at: Option<String>,
    /// Whether it is revoked.
    pub revoked: bool,
    /// Instructions without a final reply.
    pub pending: u32,
    /// The instruction types it announced.
    pub instruction_types: Vec<String>,
    /// The outcome of its last self-update, as its agent reported it in HELLO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<runos_protocol::control::UpdateReport>,
    /// Its WireGuard public key, as its agent reported it in HELLO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
}

/// An instruction to send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendRequest {
    /// Node id, unique id prefix or hostname.
    pub node: String,
    /// The instruction type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The payload as JSON (default `{}`).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Instead of `payload`: the text put verbatim in `jsonB64` (for protocol tests).
    #[serde(default)]
    pub raw_b64: Option<String>,
    /// The envelope's `timeoutMs`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A stored final reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyInfo {
    /// The instruction's tag.
    pub tag: String,
    /// The reply type (`ERROR` for failures).
    #[serde(rename = "type")]
    pub kind: String,
    /// The decoded payload; a payload that is not JSON is given as `{"jsonB64": ...}`.
    pub payload: serde_json::Value,
}

impl ReplyInfo {
    /// Whether the reply is an `ERROR`.
    pub fn is_error(&self) -> bool {
        self.kind == runos_protocol::control::types::ERROR
    }

    /// The error code of an `ERROR` reply.
    pub fn error_code(&self) -> Option<&str> {
        if self.is_error() {
            self.payload.get("code").and_then(|c| c.as_str())
        } else {
            None
        }
    }
}

/// Most instructions in one [`Api::send_many`].
pub const MAX_SEND_MANY: usize = 100_000;

/// Who waits for which final reply: one [`Notify`] per tag waited on, woken by the session that
/// stores that tag's reply (after the commit). A tag nobody waits on costs a hash lookup.
#[derive(Debug, Default)]
pub(crate) struct ReplyWaiters {
    map: Mutex<HashMap<Tag, Arc<Notify>>>,
}

/// A registration in [`ReplyWaiters`]; removed on drop when it is the tag's last waiter.
pub(crate) struct Waiter<'a> {
    waiters: &'a ReplyWaiters,
    tag: Tag,
    pub notify: Arc<Notify>,
}

impl ReplyWaiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Tag, Arc<Notify>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register interest in `tag`'s final reply.
    pub(crate) fn waiter(&self, tag: Tag) -> Waiter<'_> {
        let notify = self.lock().entry(tag).or_default().clone();
        Waiter {
            waiters: self,
            tag,
            notify,
        }
    }

    /// The final replies of `tags` are stored (committed): wake whoever waits for them.
    pub(crate) fn stored<'t>(&self, tags: impl IntoIterator<Item = &'t Tag>) {
        let mut map = self.lock();
        if map.is_empty() {
            return;
        }
        for tag in tags {
            if let Some(n) = map.remove(tag) {
                n.notify_waiters();
            }
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        // Clones are only made under the lock: two references are the map's and this one.
        if map
            .get(&self.tag)
            .is_some_and(|n| Arc::ptr_eq(n, &self.notify) && Arc::strong_count(n) == 2)
        {
            map.remove(&self.tag);
        }
    }
}

/// The operator API of a running control plane.
#[derive(Debug, Clone)]
pub struct Api {
    shared: Arc<Shared>,
}

fn hash_token(token: &str) -> String {
    util::sha256_hex(token.as_bytes())
}

pub(crate) fn token_hash(token: &str) -> String {
    hash_token(token)
}

impl Api {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Api { shared }
    }

    /// A fresh `runos1.<CA sha256>.<secret>` token: it carries the pin of this control plane's
    /// L1Sec CA, so `runos register` can check the CA before presenting the secret.
    fn new_token(&self) -> Result<String, Error> {
        let bytes: [u8; 32] = rand::random();
        let token = EnrolmentToken::new(&self.shared.ca().ca_sha256(), &hex::encode(bytes))
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(token.into_string())
    }

    /// Create a one-time enrolment token valid for `ttl`.
    pub fn create_token(&self, ttl: Duration) -> Result<TokenInfo, Error> {
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(Error::BadRequest(
                "the token TTL must be between 1s and 30d".into(),
            ));
        }
        let token = self.new_token()?;
        let now = util::now_ms();
        let expires = now.saturating_add(util::ms(ttl));
        self.shared
            .db
            .insert_token(&hash_token(&token), now, expires)?;
        tracing::info!(expires_at = %util::rfc3339_ms(expires), "enrolment token created");
        Ok(TokenInfo {
            token,
            expires_at: util::rfc3339_ms(expires),
            ca_sha256: self.shared.ca().ca_sha256(),
        })
    }

    /// Store a token that expired a minute ago (for tests of expiry).
    #[doc(hidden)]
    pub fn insert_expired_token_for_tests(&self) -> Result<String, Error> {
        let token = self.new_token()?;
        let now = util::now_ms();
        self.shared
            .db
            .insert_token(&hash_token(&token), now - 120_000, now - 60_000)?;
        Ok(token)
    }

    /// Every node.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, Error> {
        let rows = self.shared.db.nodes()?;
        Ok(rows
            .into_iter()
            .map(|n| NodeInfo {
                online: self.shared.sessions.is_online(&n.id),
                id: n.id,
                hostname: n.hostname,
                machine_id: n.machine_id,
                os: n.os,
                agent_version: n.agent_version,
                last_seen: n.last_seen_at.map(util::rfc3339_ms),
                registered_at: util::rfc3339_ms(n.registered_at),
                cert_expires_at: n.cert_not_after.map(util::rfc3339_ms),
                revoked: n.revoked_at.is_some(),
                pending: n.pending,
                instruction_types: n.instruction_types,
                last_update: n
                    .last_update
                    .as_deref()
                    .and_then(|j| serde_json::from_str(j).ok()),
                wireguard_public_key: n.wireguard_public_key,
            })
            .collect())
    }

    /// Whether a node has a live session.
    pub fn is_online(&self, node_id: &str) -> bool {
        self.shared.sessions.is_online(node_id)
    }

    /// Resolve a node id, unique id prefix or hostname to a node id.
    pub fn resolve_node(&self, key: &str) -> Result<String, Error> {
        if key.is_empty() || key.len() > runos_protocol::control::MAX_IDENT_LEN {
            return Err(Error::NodeNotFound(key.chars().take(64).collect()));
        }
        let mut ids = self.shared.db.find_nodes(key)?;
        match ids.len() {
            0 => Err(Error::NodeNotFound(key.to_string())),
            1 => Ok(ids.remove(0)),
            _ => Err(Error::AmbiguousNode(key.to_string())),
        }
    }

    /// Store an instruction (fresh tag) and deliver it if the node is online; otherwise it is
    /// delivered when the node connects. Returns the tag.
    pub fn send(&self, req: &SendRequest) -> Result<Tag, Error> {
        self.send_with_tag(req, None)
    }

    /// [`Api::send`] with the tag chosen by the caller (`None`: a fresh one). Sending again
    /// with a tag already stored is a retry: when the stored instruction is the same (node,
    /// type, `jsonB64` byte for byte, `timeoutMs`) nothing new is stored and the tag is
    /// returned as the first time; otherwise [`Error::TagConflict`].
    pub fn send_with_tag(&self, req: &SendRequest, tag: Option<Tag>) -> Result<Tag, Error> {
        let chosen = tag.is_some();
        let node = self.send_target(&req.node)?;
        let env = self.envelope(req, tag.unwrap_or_else(Tag::random))?;
        let tag = env.tag;
        if !self
            .shared
            .db
            .insert_instruction(&node, &env, util::now_ms())?
        {
            if !chosen {
                return Err(Error::Internal("tag collision".into()));
            }
            if !self.shared.db.instruction_is(&node, &env)? {
                tracing::info!(node = %node, tag = %tag, "send refused: the tag is used by a different instruction");
                return Err(Error::TagConflict(tag.to_string()));
            }
            tracing::info!(node = %node, tag = %tag, kind = %env.kind, "instruction already stored under this tag (a retry); nothing new stored");
        } else {
            tracing::info!(node = %node, tag = %tag, kind = %env.kind, "instruction stored");
        }
        self.shared.sessions.wake(&node);
        Ok(tag)
    }

    /// Store many instructions (fresh tags) in one transaction and deliver them as
    /// [`Api::send`] does; their tags, in the order of `reqs`. All or nothing: when any request
    /// is invalid (bad type, unknown or revoked node, too large, ...) nothing is stored and the
    /// error names the first such request by its index (from 0). At most [`MAX_SEND_MANY`].
    pub fn send_many(&self, reqs: &[SendRequest]) -> Result<Vec<Tag>, Error> {
        if reqs.len() > MAX_SEND_MANY {
            return Err(Error::BadRequest(format!(
                "at most {MAX_SEND_MANY} instructions per batch, not {}",
                reqs.len()
            )));
        }
        // Each node is looked up once per batch.
        let mut nodes: HashMap<&str, String> = HashMap::new();
        let mut rows: Vec<(&str, Envelope)> = Vec::with_capacity(reqs.len());
        for (i, req) in reqs.iter().enumerate() {
            let in_batch = |e: Error| match e {
                Error::BadRequest(m) => Error::BadRequest(format!("request {i}: {m}")),
                other => other,
            };
            if !nodes.contains_key(req.node.as_str()) {
                let id = self.send_target(&req.node)?;
                nodes.insert(&req.node, id);
            }
            let env = self.envelope(req, Tag::random()).map_err(in_batch)?;
            rows.push((req.node.as_str(), env));
        }
        let rows: Vec<(&str, Envelope)> = rows
            .into_iter()
            .map(|(key, env)| (nodes[key].as_str(), env))
            .collect();
        if let Err(i) = self.shared.db.insert_instructions(&rows, util::now_ms())? {
            return Err(Error::Internal(format!("tag collision at request {i}")));
        }
        for (node, env) in &rows {
            tracing::debug!(node = %node, tag = %env.tag, kind = %env.kind, "instruction stored");
        }
        let mut woken: Vec<&str> = nodes.values().map(String::as_str).collect();
        woken.sort_unstable();
        woken.dedup();
        tracing::info!(
            instructions = rows.len(),
            nodes = woken.len(),
            "instructions stored (one batch)"
        );
        for node in woken {
            self.shared.sessions.wake(node);
        }
        Ok(rows.into_iter().map(|(_, env)| env.tag).collect())
    }

    /// The node an instruction may be sent to: `key` resolved, known and not revoked.
    fn send_target(&self, key: &str) -> Result<String, Error> {
        let node = self.resolve_node(key)?;
        match self.shared.db.node_revoked(&node)? {
            None => Err(Error::NodeNotFound(node)),
            Some(true) => Err(Error::Revoked(node)),
            Some(false) => Ok(node),
        }
    }

    /// The envelope of a request under `tag`, checked: an instruction type (not a control
    /// message) and a frame within the largest accepted.
    fn envelope(&self, req: &SendRequest, tag: Tag) -> Result<Envelope, Error> {
        let kind = MessageType::new(req.kind.clone())
            .map_err(|e| Error::BadRequest(format!("type {:?}: {e}", req.kind)))?;
        if runos_protocol::control::is_control_type(kind.as_str()) {
            return Err(Error::BadRequest(format!(
                "{kind} is a control message type, not an instruction"
            )));
        }
        let env = match (&req.payload, &req.raw_b64) {
            (Some(_), Some(_)) => {
                return Err(Error::BadRequest(
                    "give either a JSON payload or raw base64, not both".into(),
                ));
            }
            (_, Some(raw)) => Envelope {
                kind,
                tag,
                json_b64: raw.clone(),
                timeout_ms: None,
            },
            (Some(v), None) => Envelope::new(kind, tag, v),
            (None, None) => Envelope::new(kind, tag, &serde_json::json!({})),
        }
        .with_timeout_ms(req.timeout_ms);
        if let Err(e) = runos_protocol::encode_frame(&env, self.shared.opts.max_frame_bytes) {
            return Err(Error::BadRequest(e.to_string()));
        }
        Ok(env)
    }

    /// The stored final reply of `tag`, if any. Unknown tag → [`Error::TagNotFound`].
    pub fn reply(&self, tag: &Tag) -> Result<Option<ReplyInfo>, Error> {
        match self.shared.db.reply(tag)? {
            None => Err(Error::TagNotFound(tag.to_string())),
            Some(None) => Ok(None),
            Some(Some(r)) => {
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(r.json_b64.as_bytes())
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_else(|| serde_json::json!({ "jsonB64": r.json_b64 }));
                Ok(Some(ReplyInfo {
                    tag: tag.to_string(),
                    kind: r.kind,
                    payload,
                }))
            }
        }
    }

    /// Wait for the final reply of `tag`, at most `timeout`. [`Error::Timeout`] when it did
    /// not arrive in time (the instruction stays pending); [`Error::TagNotFound`] for an
    /// unknown tag.
    pub async fn wait_reply(&self, tag: &Tag, timeout: Duration) -> Result<ReplyInfo, Error> {
        let mut shutdown = self.shared.shutdown.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the look in the database: a reply stored after the look wakes
            // it. Only the session that stores this tag's reply wakes it (no query per reply
            // stored elsewhere).
            let waiter = self.shared.replies.waiter(*tag);
            let stored = waiter.notify.notified();
            tokio::pin!(stored);
            stored.as_mut().enable();
            if let Some(r) = self.reply(tag)? {
                return Ok(r);
            }
            tokio::select! {
                () = stored => {}
                () = tokio::time::sleep_until(deadline) => return Err(Error::Timeout),
                () = shutdown_signalled(&mut shutdown) => return Err(Error::ShuttingDown),
            }
        }
    }

    /// Send and wait for the final reply.
    pub async fn send_and_wait(
        &self,
        req: &SendRequest,
        timeout: Duration,
    ) -> Result<ReplyInfo, Error> {
        let tag = self.send(req)?;
        self.wait_reply(&tag, timeout).await
    }

    /// The CA status. `seen_within`: nodes seen this recently that hold only certificates of
    /// the active CA block a cutover (at most [`MAX_SEEN_WITHIN`]).
    pub fn ca_status(&self, seen_within: Duration) -> Result<CaStatus, Error> {
        let ca = self.shared.ca();
        let seen_within = seen_within.min(MAX_SEEN_WITHIN);
        let now = util::now_ms();
        let holders = self.shared.db.cert_holders(now)?;
        let count = |pin: &str| {
            holders
                .iter()
                .find(|(p, _)| p == pin)
                .map_or(0, |(_, n)| *n)
        };
        let info = |i: &crate::ca::CaCertInfo| CaInfo {
            sha256: i.sha256.clone(),
            subject: i.subject.clone(),
            not_before: util::rfc3339_ms(i.not_before_ms),
            not_after: util::rfc3339_ms(i.not_after_ms),
            nodes: count(&i.sha256),
        };
        let (blocking_total, blocking) =
            self.blockers(&ca, now, seen_within, MAX_LISTED_BLOCKERS)?;
        let warnings = ca.active().expiry_warning(now).into_iter().collect();
        Ok(CaStatus {
            phase: if ca.incoming().is_some() {
                "rotating"
            } else {
                "normal"
            }
            .into(),
            active: info(ca.active()),
            incoming: ca.incoming().map(info),
            rotating_since: ca.incoming().map(|i| util::rfc3339_ms(i.created_ms())),
            seen_within_secs: seen_within.as_secs(),
            blocking_total,
            blocking,
            warnings,
        })
    }

    /// The nodes a cutover of `ca` would lock out (none when it is not rotating).
    fn blockers(
        &self,
        ca: &crate::ca::Ca,
        now: i64,
        seen_within: Duration,
        limit: u32,
    ) -> Result<(u64, Vec<BlockingNode>), Error> {
        let Some(incoming) = ca.incoming() else {
            return Ok((0, Vec::new()));
        };
        let since = now.saturating_sub(util::ms(seen_within));
        let (total, rows) = self.shared.db.cutover_blockers(
            &ca.active().sha256,
            &incoming.sha256,
            now,
            since,
            limit,
        )?;
        let nodes = rows
            .into_iter()
            .map(|r| BlockingNode {
                id: r.id,
                hostname: r.hostname,
                last_seen: r.last_seen_at.map(util::rfc3339_ms),
                cert_expires_at: util::rfc3339_ms(r.cert_not_after),
            })
            .collect();
        Ok((total, nodes))
    }

    /// Start a CA rotation: create the incoming CA, trust it on L2Sec and issue new node
    /// certificates (REGISTER, RENEW) with it; the bundle in REGISTERED and RENEWED holds both
    /// CAs. The server certificate and the token pin stay with the active CA.
    /// [`Error::CaPhase`] when a rotation is already in progress.
    pub async fn ca_rotate(&self) -> Result<CaChange, Error> {
        // The guard moves into the blocking task: it is held until the files and the CA in
        // service agree, even if this future is dropped.
        let op = self.shared.ca_ops.clone().lock_owned().await;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let _op = op;
            let rotated = shared.ca().rotate(&shared.opts.data_dir)?;
            shared.install_ca(rotated)
        })
        .await
        .map_err(|e| Error::Internal(format!("CA rotation task: {e}")))??;
        let status = self.ca_status(DEFAULT_SEEN_WITHIN)?;
        tracing::warn!(
            active_sha256 = %status.active.sha256,
            incoming_sha256 = %status.incoming.as_ref().map(|i| i.sha256.as_str()).unwrap_or("-"),
            "CA rotation started: node certificates are now issued by the incoming CA"
        );
        Ok(CaChange {
            action: "rotate".into(),
            retired_sha256: None,
            retired_file: None,
            forced_past_total: 0,
            forced_past: Vec::new(),
            status,
        })
    }

    /// Finish a CA rotation: the incoming CA becomes the only one (server certificate, L2Sec
    /// trust, bundle); the old CA's certificate is archived and its key destroyed. Refused with
    /// [`Error::CutoverBlocked`] while nodes seen within `seen_within` hold only certificates
    /// of the old CA, unless `force`; [`Error::CaPhase`] when no rotation is in progress. Live
    /// sessions are kept.
    pub async fn ca_cutover(&self, force: bool, seen_within: Duration) -> Result<CaChange, Error> {
        let op = self.shared.ca_ops.clone().lock_owned().await;
        let seen_within = seen_within.min(MAX_SEEN_WITHIN);
        let ca = self.shared.ca();
        if ca.incoming().is_none() {
            return Err(Error::CaPhase(
                "no CA rotation in progress; start one with `ca rotate`".into(),
            ));
        }
        let (total, blocking) =
            self.blockers(&ca, util::now_ms(), seen_within, MAX_LISTED_BLOCKERS)?;
        if total > 0 && !force {
            let mut named: Vec<String> = blocking
                .iter()
                .take(NAMED_IN_REFUSAL)
                .map(|b| {
                    format!(
                        "{} ({}, last seen {})",
                        b.id,
                        b.hostname,
                        b.last_seen.as_deref().unwrap_or("never")
                    )
                })
                .collect();
            let more = total.saturating_sub(named.len() as u64);
            if more > 0 {
                named.push(format!("and {more} more"));
            }
            return Err(Error::CutoverBlocked(format!(
                "cutover refused: {total} node(s) seen within {} hold only certificates of the \
                 outgoing CA (sha256 {}) and would be locked out: {}. Wait until they renew \
                 (agents renew at two thirds of a certificate's lifetime; `runos certificate \
                 renew` on a node does it now), revoke them, or use --force",
                describe_window(seen_within),
                ca.ca_sha256(),
                named.join(", ")
            )));
        }
        let shared = self.shared.clone();
        let retired = tokio::task::spawn_blocking(move || {
            let _op = op;
            let (new, retired) = shared
                .ca()
                .cutover(&shared.opts.data_dir, &shared.opts.hostnames)?;
            shared.install_ca(new)?;
            Ok::<_, Error>(retired)
        })
        .await
        .map_err(|e| Error::Internal(format!("CA cutover task: {e}")))??;
        let status = self.ca_status(seen_within)?;
        if total > 0 {
            tracing::warn!(
                locked_out = total,
                "forced CA cutover: nodes holding only certificates of the retired CA can no                  longer connect (unless their session is still open) and must be enrolled again"
            );
        }
        tracing::warn!(
            active_sha256 = %status.active.sha256,
            retired_sha256 = %ca.ca_sha256(),
            retired_file = %retired.display(),
            "CA cutover done: the old CA is retired; enrolment tokens created before now pin it              and no longer work"
        );
        Ok(CaChange {
            action: "cutover".into(),
            retired_sha256: Some(ca.ca_sha256()),
            retired_file: Some(retired.display().to_string()),
            forced_past_total: total,
            forced_past: blocking,
            status,
        })
    }

    /// Revoke a node: mark it and its certificates revoked and close its live session.
    pub fn revoke(&self, key: &str) -> Result<String, Error> {
        let node = self.resolve_node(key)?;
        self.shared.db.revoke(&node, util::now_ms())?;
        self.shared
            .sessions
            .close(&node, crate::l2::CloseReason::Revoked);
        tracing::warn!(node = %node, "node revoked");
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stored_reply_wakes_its_waiters_and_a_waiter_leaves_no_trace() {
        let waiters = ReplyWaiters::default();
        let (a, b) = (Tag::random(), Tag::random());
        let first = waiters.waiter(a);
        let second = waiters.waiter(a);
        let other = waiters.waiter(b);
        {
            let woken = first.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            waiters.stored([&a]);
            woken.await;
        }
        drop((first, second));
        assert_eq!(waiters.lock().len(), 1, "only b is waited on");
        drop(other);
        assert!(waiters.lock().is_empty());
    }
}
