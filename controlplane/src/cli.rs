//! The operator client: talks to the operator socket, prints results, and maps failures to the
//! stable exit codes of `runos-controlplane`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

use crate::Error;
use crate::admin::{Request, Response};
use crate::api::{BlockingNode, CaChange, CaInfo, CaStatus, NodeInfo, ReplyInfo, TokenInfo};
use crate::server::{ADMIN_SOCKET_FILE, Endpoints};

/// Default data directory of `serve` and the operator commands.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/runos-controlplane";

/// Stable exit codes of `runos-controlplane`.
pub mod exit {
    /// Success (for `send --wait` and `reply`: a non-ERROR final reply).
    pub const OK: u8 = 0;
    /// Failure (for `send --wait` and `reply`: the final reply is an ERROR).
    pub const FAILURE: u8 = 1;
    /// Invalid command line.
    pub const USAGE: u8 = 2;
    /// No such node or tag (or the node name is ambiguous, or the tag malformed).
    pub const UNKNOWN_NODE: u8 = 3;
    /// `send --wait`/`reply --wait`: no final reply within `--timeout`; `reply`: no final
    /// reply yet (the instruction stays pending).
    pub const TIMEOUT: u8 = 4;
    /// The operator socket cannot be reached (is `serve` running?).
    pub const UNREACHABLE: u8 = 5;
    /// `serve`/`demo`: the data directory, database, CA or a listener failed.
    pub const STATE: u8 = 6;
    /// `ca cutover`: refused because recently seen nodes hold only certificates of the
    /// outgoing CA (they are listed; `--force` cuts over anyway).
    pub const CUTOVER_BLOCKED: u8 = 7;
    /// `ca rotate` while a rotation is in progress, or `ca cutover` without one.
    pub const CA_PHASE: u8 = 8;
    /// `send --tag`: the tag is already used by a different instruction (another node, type,
    /// payload or instruction timeout).
    pub const TAG_CONFLICT: u8 = 9;
}

/// The exit-code table shown in `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (send --wait, reply: a non-ERROR final reply)
  1  failure (send --wait, reply: the final reply is an ERROR; demo: a reply was not as
     expected)
  2  usage error (invalid command line)
  3  unknown node or tag (or an ambiguous hostname/prefix)
  4  send --wait, reply --wait: no final reply within --timeout; reply: no final reply yet
     (the instruction stays pending)
  5  the operator socket cannot be reached (is `serve` running?)
  6  serve/demo: data directory, database, CA or listener failure
  7  ca cutover: refused, recently seen nodes hold only certificates of the outgoing CA
  8  ca rotate: a rotation is already in progress; ca cutover: no rotation in progress
  9  send --tag: the tag is already used by a different instruction";

/// The exit code for an error.
pub fn exit_code(e: &Error) -> u8 {
    match e {
        Error::NodeNotFound(_)
        | Error::AmbiguousNode(_)
        | Error::TagNotFound(_)
        | Error::MalformedTag(_) => exit::UNKNOWN_NODE,
        Error::Timeout => exit::TIMEOUT,
        Error::AdminUnreachable { .. } => exit::UNREACHABLE,
        Error::Remote { code, .. } => match code.as_str() {
            "node_not_found" | "ambiguous_node" | "tag_not_found" | "malformed_tag" => {
                exit::UNKNOWN_NODE
            }
            "timeout" => exit::TIMEOUT,
            "cutover_blocked" => exit::CUTOVER_BLOCKED,
            "ca_phase" => exit::CA_PHASE,
            "tag_conflict" => exit::TAG_CONFLICT,
            _ => exit::FAILURE,
        },
        Error::CutoverBlocked(_) => exit::CUTOVER_BLOCKED,
        Error::TagConflict(_) => exit::TAG_CONFLICT,
        Error::CaPhase(_) => exit::CA_PHASE,
        Error::Io { .. }
        | Error::Bind { .. }
        | Error::AdminSocketInUse(_)
        | Error::Db(_)
        | Error::Schema(_)
        | Error::Ca(_)
        | Error::Tls(_) => exit::STATE,
        _ => exit::FAILURE,
    }
}

/// Find the operator socket: `--admin-socket`, else the one named in `DIR/endpoints.json`,
/// else `DIR/admin.sock`.
pub fn locate_socket(data_dir: Option<&Path>, admin_socket: Option<&Path>) -> PathBuf {
    if let Some(p) = admin_socket {
        return p.to_path_buf();
    }
    let dir = data_dir.unwrap_or(Path::new(DEFAULT_DATA_DIR));
    match Endpoints::read(dir) {
        Ok(e) => PathBuf::from(e.admin_socket),
        Err(_) => dir.join(ADMIN_SOCKET_FILE),
    }
}

/// A client of the operator socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

/// Largest response line accepted.
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

impl Client {
    /// A client for the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client { path: path.into() }
    }

    /// Send one request and read its response, within `deadline`.
    pub async fn request(
        &self,
        req: &Request,
        deadline: Duration,
    ) -> Result<serde_json::Value, Error> {
        let fut = async {
            let stream =
                UnixStream::connect(&self.path)
                    .await
                    .map_err(|e| Error::AdminUnreachable {
                        path: self.path.clone(),
                        source: e,
                    })?;
            let (r, mut w) = stream.into_split();
            let mut line = serde_json::to_vec(req).map_err(|e| Error::Internal(e.to_string()))?;
            line.push(b'\n');
            w.write_all(&line)
                .await
                .map_err(|e| Error::AdminProtocol(e.to_string()))?;
            let mut r = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_RESPONSE));
            let mut buf = Vec::new();
            r.read_until(b'\n', &mut buf)
                .await
                .map_err(|e| Error::AdminProtocol(e.to_string()))?;
            if buf.is_empty() {
                return Err(Error::AdminProtocol(
                    "the control plane closed the connection".into(),
                ));
            }
            let resp: Response = serde_json::from_slice(&buf)
                .map_err(|e| Error::AdminProtocol(format!("malformed response: {e}")))?;
            match (resp.ok, resp.result, resp.error) {
                (true, Some(v), _) => Ok(v),
                (false, _, Some(e)) => Err(Error::Remote {
                    code: e.code,
                    message: e.message,
                    tag: e.tag,
                }),
                _ => Err(Error::AdminProtocol("malformed response".into())),
            }
        };
        tokio::time::timeout(deadline, fut)
            .await
            .map_err(|_| Error::AdminProtocol("no answer from the control plane in time".into()))?
    }
}

const SHORT: Duration = Duration::from_secs(30);

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::AdminProtocol(format!("unexpected result: {e}")))
}

/// `token create`.
pub async fn token_create(client: &Client, ttl: Duration, json: bool) -> Result<u8, Error> {
    let v = client
        .request(
            &Request::TokenCreate {
                ttl_secs: ttl.as_secs().max(1),
            },
            SHORT,
        )
        .await?;
    let t: TokenInfo = parse(v)?;
    if json {
        println!("{}", serde_json::to_string(&t).unwrap_or_default());
    } else {
        println!("{}", t.token);
        eprintln!(
            "expires at {}; the token carries the L1Sec CA pin {} (runos register checks it)",
            t.expires_at, t.ca_sha256
        );
    }
    Ok(exit::OK)
}

/// `nodes`.
pub async fn nodes(client: &Client, json: bool) -> Result<u8, Error> {
    let v = client.request(&Request::Nodes, SHORT).await?;
    let nodes: Vec<NodeInfo> = parse(v)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&nodes).unwrap_or_default()
        );
        return Ok(exit::OK);
    }
    println!(
        "{:<36}  {:<20}  {:<7}  {:<20}  {:<20}  {:>7}  VERSION",
        "ID", "HOSTNAME", "STATE", "LAST SEEN", "CERT EXPIRES", "PENDING"
    );
    for n in nodes {
        let state = if n.revoked {
            "revoked"
        } else if n.online {
            "online"
        } else {
            "offline"
        };
        println!(
            "{:<36}  {:<20}  {:<7}  {:<20}  {:<20}  {:>7}  {}",
            n.id,
            n.hostname,
            state,
            n.last_seen.as_deref().unwrap_or("-"),
            n.cert_expires_at.as_deref().unwrap_or("-"),
            n.pending,
            n.agent_version
        );
    }
    Ok(exit::OK)
}

/// Arguments of `send`.
#[derive(Debug, Clone)]
pub struct SendArgs {
    /// Node id, unique id prefix or hostname.
    pub node: String,
    /// Instruction type.
    pub kind: String,
    /// JSON payload text.
    pub json: Option<String>,
    /// Raw `jsonB64` text.
    pub raw_b64: Option<String>,
    /// The envelope's `timeoutMs`.
    pub instruction_timeout_ms: Option<u64>,
    /// Wait for the final reply.
    pub wait: bool,
    /// How long to wait.
    pub timeout: Duration,
    /// Compact JSON output.
    pub json_out: bool,
    /// The instruction's tag (a UUID); a fresh one when `None`.
    pub tag: Option<String>,
}

/// `send`.
pub async fn send(client: &Client, a: SendArgs) -> Result<u8, Error> {
    let payload = match &a.json {
        Some(text) => Some(
            serde_json::from_str::<serde_json::Value>(text)
                .map_err(|e| Error::BadRequest(format!("the payload is not JSON: {e}")))?,
        ),
        None => None,
    };
    let wait_ms = a
        .wait
        .then(|| u64::try_from(a.timeout.as_millis()).unwrap_or(u64::MAX));
    let req = Request::Send {
        node: a.node,
        kind: a.kind,
        payload,
        raw_b64: a.raw_b64,
        timeout_ms: a.instruction_timeout_ms,
        wait_ms,
        tag: a.tag,
    };
    let deadline = if a.wait {
        a.timeout.saturating_add(SHORT)
    } else {
        SHORT
    };
    let v = client.request(&req, deadline).await?;
    if !a.wait {
        print_json(&v, a.json_out);
        return Ok(exit::OK);
    }
    print_final_reply(v, a.json_out)
}

/// `send-batch`: the instructions of `input` (JSON lines; `-` is standard input), stored in one
/// transaction, all or none; prints their tags in input order, one per line, or with `--json`
/// `{"tags":[..]}`.
pub async fn send_batch(client: &Client, input: &Path, json: bool) -> Result<u8, Error> {
    let text = if input == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
            .map_err(|e| Error::io(Path::new("standard input"), e))?;
        text
    } else {
        std::fs::read_to_string(input).map_err(|e| Error::io(input, e))?
    };
    let requests = parse_batch(&text)?;
    let n = requests.len();
    let v = client
        .request(&Request::SendMany { requests }, SHORT)
        .await?;
    if json {
        print_json(&v, true);
    } else {
        for tag in v
            .get("tags")
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            println!("{}", tag.as_str().unwrap_or("?"));
        }
        eprintln!("{n} instruction(s) stored");
    }
    Ok(exit::OK)
}

/// The instructions of a batch file: one JSON object per line (`{"node", "type", "payload"?,
/// "rawB64"?, "timeoutMs"?}`), blank lines skipped, at most [`crate::api::MAX_SEND_MANY`].
pub fn parse_batch(text: &str) -> Result<Vec<crate::SendRequest>, Error> {
    let mut requests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if requests.len() == crate::api::MAX_SEND_MANY {
            return Err(Error::BadRequest(format!(
                "more than {} instructions in the batch",
                crate::api::MAX_SEND_MANY
            )));
        }
        let req = serde_json::from_str(line)
            .map_err(|e| Error::BadRequest(format!("line {}: {e}", i + 1)))?;
        requests.push(req);
    }
    Ok(requests)
}

/// Print a result: compact with `--json`, else pretty.
fn print_json(v: &serde_json::Value, compact: bool) {
    if compact {
        println!("{}", serde_json::to_string(v).unwrap_or_default());
    } else {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

/// Print a final reply (`{"tag","type","payload"}`) and give its exit code: [`exit::FAILURE`]
/// for an `ERROR`, else [`exit::OK`].
fn print_final_reply(v: serde_json::Value, compact: bool) -> Result<u8, Error> {
    let reply: ReplyInfo = parse(v.clone())?;
    print_json(&v, compact);
    Ok(if reply.is_error() {
        exit::FAILURE
    } else {
        exit::OK
    })
}

/// Arguments of `reply`.
#[derive(Debug, Clone)]
pub struct ReplyArgs {
    /// The instruction's tag.
    pub tag: String,
    /// Wait for the final reply.
    pub wait: bool,
    /// How long to wait.
    pub timeout: Duration,
    /// Compact JSON output.
    pub json_out: bool,
}

/// `reply`: the final reply of an instruction sent earlier (printed like `send --wait`), or
/// with `--wait` the reply once it arrives. Without a reply (yet): [`exit::TIMEOUT`].
pub async fn reply(client: &Client, a: ReplyArgs) -> Result<u8, Error> {
    let wait_ms = a
        .wait
        .then(|| u64::try_from(a.timeout.as_millis()).unwrap_or(u64::MAX));
    let deadline = if a.wait {
        a.timeout.saturating_add(SHORT)
    } else {
        SHORT
    };
    let req = Request::Reply {
        tag: a.tag,
        wait_ms,
    };
    let v = client.request(&req, deadline).await?;
    if v.get("pending").and_then(|p| p.as_bool()) == Some(true) {
        if a.json_out {
            print_json(&v, true);
        }
        let tag = v.get("tag").and_then(|t| t.as_str()).unwrap_or("?");
        eprintln!("instruction {tag} has no final reply yet (pending)");
        return Ok(exit::TIMEOUT);
    }
    print_final_reply(v, a.json_out)
}

/// `revoke`.
pub async fn revoke(client: &Client, node: String) -> Result<u8, Error> {
    let v = client.request(&Request::Revoke { node }, SHORT).await?;
    let id = v.get("nodeId").and_then(|x| x.as_str()).unwrap_or("?");
    println!("revoked {id}");
    Ok(exit::OK)
}

fn seen_within_secs(d: Duration) -> Option<u64> {
    Some(d.as_secs().max(1))
}

fn print_ca(label: &str, ca: &CaInfo) {
    println!("{label:<13} sha256 {}", ca.sha256);
    println!(
        "{:<13} {}; valid until {}; {} node(s) hold a current certificate from it",
        "", ca.subject, ca.not_after, ca.nodes
    );
}

fn print_blockers(total: u64, nodes: &[BlockingNode]) {
    println!(
        "  {:<36}  {:<20}  {:<20}  CERT EXPIRES",
        "ID", "HOSTNAME", "LAST SEEN"
    );
    for n in nodes {
        println!(
            "  {:<36}  {:<20}  {:<20}  {}",
            n.id,
            n.hostname,
            n.last_seen.as_deref().unwrap_or("never"),
            n.cert_expires_at
        );
    }
    let more = total.saturating_sub(nodes.len() as u64);
    if more > 0 {
        println!("  ... and {more} more");
    }
}

fn print_status(s: &CaStatus) {
    match &s.rotating_since {
        Some(since) => println!("{:<13} rotating since {since}", "phase:"),
        None => println!("{:<13} normal", "phase:"),
    }
    print_ca("active CA:", &s.active);
    if let Some(i) = &s.incoming {
        print_ca("incoming CA:", i);
        let window = crate::api::describe_window(Duration::from_secs(s.seen_within_secs));
        if s.blocking_total == 0 {
            println!(
                "{:<13} ready: no node seen within {window} holds only certificates of the                  active CA",
                "cutover:"
            );
        } else {
            println!(
                "{:<13} blocked by {} node(s) seen within {window} that hold only certificates                  of the active CA:",
                "cutover:", s.blocking_total
            );
            print_blockers(s.blocking_total, &s.blocking);
        }
    }
    for w in &s.warnings {
        eprintln!("WARNING: {w}");
    }
}

/// `ca status`.
pub async fn ca_status(client: &Client, seen_within: Duration, json: bool) -> Result<u8, Error> {
    let v = client
        .request(
            &Request::CaStatus {
                seen_within_secs: seen_within_secs(seen_within),
            },
            SHORT,
        )
        .await?;
    let s: CaStatus = parse(v.clone())?;
    if json {
        print_json(&v, false);
        for w in &s.warnings {
            eprintln!("WARNING: {w}");
        }
    } else {
        print_status(&s);
    }
    Ok(exit::OK)
}

/// `ca rotate`.
pub async fn ca_rotate(client: &Client, json: bool) -> Result<u8, Error> {
    let v = client.request(&Request::CaRotate, SHORT).await?;
    let c: CaChange = parse(v.clone())?;
    if json {
        print_json(&v, false);
        return Ok(exit::OK);
    }
    let incoming = c
        .status
        .incoming
        .as_ref()
        .map_or("?", |i| i.sha256.as_str());
    println!("CA rotation started: incoming CA sha256 {incoming}");
    eprintln!(
        "New node certificates are issued by the incoming CA, and agents receive both CAs when          they enrol or renew. The server certificate and enrolment tokens stay with the active          CA (sha256 {}). Run `ca cutover` once every node has renewed: wait at least one node          certificate lifetime and check `ca status`.",
        c.status.active.sha256
    );
    Ok(exit::OK)
}

/// `ca cutover`.
pub async fn ca_cutover(
    client: &Client,
    force: bool,
    seen_within: Duration,
    json: bool,
) -> Result<u8, Error> {
    let req = Request::CaCutover {
        force,
        seen_within_secs: seen_within_secs(seen_within),
    };
    let v = client.request(&req, SHORT).await?;
    let c: CaChange = parse(v.clone())?;
    if json {
        print_json(&v, false);
        return Ok(exit::OK);
    }
    println!(
        "CA cutover done: active CA sha256 {}",
        c.status.active.sha256
    );
    eprintln!(
        "The old CA (sha256 {}) is archived in {} and its key destroyed. Enrolment tokens          created before the cutover pin the old CA and no longer work: create new ones.",
        c.retired_sha256.as_deref().unwrap_or("?"),
        c.retired_file.as_deref().unwrap_or("?")
    );
    if c.forced_past_total > 0 {
        eprintln!(
            "WARNING: --force: {} node(s) hold only certificates of the old CA and can no              longer connect; enrol them again:",
            c.forced_past_total
        );
        print_blockers(c.forced_past_total, &c.forced_past);
    }
    Ok(exit::OK)
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the global tracing subscriber (stderr). `level` is an `RUST_LOG`-style filter.
pub fn init_logging(level: &str, format: LogFormat) -> Result<(), Error> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| Error::BadRequest(format!("--log-level {level:?}: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let r = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    r.map_err(|e| Error::Internal(format!("logging: {e}")))
}
