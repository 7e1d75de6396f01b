//! The local admin socket: `<paths.run_dir>/admin.sock`, a Unix domain socket of mode 0600 that
//! only root (more precisely: the agent's own user) can use. Admin APIs are never reachable over
//! the network: there is no TCP listener for them.
//!
//! Protocol: one request per connection, one line of JSON (at most [`MAX_REQUEST`] bytes, read
//! within [`READ_TIMEOUT`]), answered with one line of JSON, then the connection is closed.
//! At most [`MAX_CONNECTIONS`] connections are served at a time; more are closed at once.
//!
//! - `{"op":"status"}` → the daemon's status ([`crate::daemon::state::AgentState::to_json`]) merged with the
//!   dispatcher's snapshot ([`DispatchSnapshot::to_json`](crate::daemon::dispatch::snapshot::DispatchSnapshot::to_json)).
//! - `{"op":"journal","tag":"<uuid>"}` or `{"op":"journal","limit":N}` (default 50, at most
//!   1000) → `{"entries":[...]}`, newest first (see
//!   [`entry_json`](crate::daemon::dispatch::journal_query::entry_json)); an unknown tag gives no entry.
//! - anything else → `{"error": "..."}`.
//!
//! Creation: the socket is bound inside a fresh 0700 directory, set to 0600, then renamed into
//! place, so it is never reachable with a wider mode. A stale socket (no one answers) is
//! removed; if a live process answers on it, the admin socket is not started (a warning; the
//! agent keeps running). The socket is removed when the [`AdminServer`] is dropped, if it is
//! still ours.

use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::daemon::dispatch::Inbound;
use crate::daemon::state::State;

/// Largest request line, in bytes.
pub const MAX_REQUEST: usize = 4096;
/// Bound on reading the request (and on writing the answer).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at a time.
pub const MAX_CONNECTIONS: usize = 8;
/// Bound on waiting for the dispatcher's snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the admin socket serves.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The agent's state (status, renewal).
    pub state: State,
    /// The dispatcher (weak: the admin socket never keeps it alive).
    pub dispatcher: mpsc::WeakSender<Inbound>,
    /// Where `renew` requests go (the daemon's session).
    pub renew: Option<mpsc::Sender<crate::daemon::session::RenewRequest>>,
    /// `reconnect`: the daemon reloads its configuration and reconnects (with the credentials
    /// and server now on disk).
    pub reconnect: Option<mpsc::Sender<()>>,
    /// The overlay (`vpn`: `runos vpn status`).
    pub overlay: Option<Arc<runos_executors::overlay::Overlay>>,
}

/// A running admin socket; dropping it stops serving and removes the socket file.
#[derive(Debug)]
pub struct AdminServer {
    path: PathBuf,
    id: (u64, u64),
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
        // Remove it only if it is still ours (not replaced by another process).
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Start the admin socket at `path` (`Paths::admin_socket`). Never fails the daemon: on error, logs a warning and
/// returns `None`. Must be called inside the Tokio runtime.
pub fn start(socket: &Path, state: AdminState) -> Option<AdminServer> {
    match bind(socket) {
        Ok((listener, path, id)) => {
            tracing::info!(path = %path.display(), "admin socket listening");
            let task = tokio::spawn(serve(listener, state));
            Some(AdminServer { path, id, task })
        }
        Err(e) => {
            tracing::warn!(
                "the admin socket is not available (`runos status` will not reach this agent): {e}"
            );
            None
        }
    }
}

fn bind(socket: &Path) -> Result<(UnixListener, PathBuf, (u64, u64)), String> {
    let path = socket.to_path_buf();
    let run_dir = socket.parent().unwrap_or(Path::new("/"));
    let shown = path.display().to_string();
    crate::util::fs::ensure_dir(run_dir, 0o755).map_err(|e| e.to_string())?;
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        if m.file_type().is_socket() && std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(format!(
                "{shown} is in use by another live process (another agent?); not replacing it"
            ));
        }
        std::fs::remove_file(&path).map_err(|e| format!("cannot remove the stale {shown}: {e}"))?;
        tracing::info!(path = %shown, "removed a stale admin socket");
    }
    // Bind in a private directory, restrict, then move into place: never reachable wider.
    let tmp = run_dir.join(format!(".admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let result = (|| -> Result<std::os::unix::net::UnixListener, String> {
        let inner = tmp.join("s");
        let l = std::os::unix::net::UnixListener::bind(&inner)
            .map_err(|e| format!("cannot bind {shown}: {e}"))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot set the mode of {shown}: {e}"))?;
        std::fs::rename(&inner, &path).map_err(|e| format!("cannot create {shown}: {e}"))?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    let l = result?;
    let m = std::fs::symlink_metadata(&path).map_err(|e| format!("{shown}: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("{shown}: {e}"))?;
    let l = UnixListener::from_std(l).map_err(|e| format!("{shown}: {e}"))?;
    Ok((l, path, (m.dev(), m.ino())))
}

async fn serve(listener: UnixListener, state: AdminState) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let me = rustix::process::geteuid().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!("admin socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Defence in depth behind the 0600 mode: only root or the agent's own user.
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 || c.uid() == me => {}
            _ => {
                tracing::debug!("admin socket: connection from another user refused");
                continue;
            }
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin socket: too many connections; one refused");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handle(stream, &state).await;
        });
    }
}

async fn handle(stream: UnixStream, state: &AdminState) {
    let (r, mut w) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(r.take(MAX_REQUEST as u64 + 1));
    let answer = match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await
    {
        Err(_) => json!({"error": "no request within the read timeout"}),
        Ok(Err(e)) => json!({"error": format!("reading the request: {e}")}),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            json!({"error": format!("request larger than {MAX_REQUEST} bytes")})
        }
        Ok(Ok(_)) => answer(&line, state).await,
    };
    let mut out = answer.to_string().into_bytes();
    out.push(b'\n');
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        w.write_all(&out).await?;
        w.shutdown().await
    })
    .await;
}

async fn answer(line: &[u8], state: &AdminState) -> Value {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(_) => return json!({"error": "the request is not JSON"}),
    };
    match req.get("op").and_then(Value::as_str) {
        Some("status") => status(state).await,
        Some("journal") => journal(&req, state).await,
        Some("renew") => renew(state).await,
        Some("vpn") => match &state.overlay {
            Some(o) => serde_json::to_value(o.status().await)
                .unwrap_or_else(|e| json!({"error": format!("cannot encode the status: {e}")})),
            None => json!({"error": "this agent has no overlay"}),
        },
        Some("reconnect") => match &state.reconnect {
            Some(tx) if tx.send(()).await.is_ok() => json!({"reconnecting": true}),
            _ => json!({"error": "reconnect is not available"}),
        },
        _ => json!({"error": "unknown op; supported: status, journal, renew, reconnect, vpn"}),
    }
}

/// The `journal` answer.
async fn journal(req: &Value, state: &AdminState) -> Value {
    use crate::daemon::dispatch::journal_query::{
        DEFAULT_LIMIT, JournalQuery, MAX_LIMIT, entry_json,
    };
    let tag = match req.get("tag") {
        None | Some(Value::Null) => None,
        Some(t) => match t.as_str().map(runos_protocol::Tag::parse) {
            Some(Ok(t)) => Some(t),
            _ => return json!({"error": "tag must be a tag (a UUID)"}),
        },
    };
    let limit = match req.get("limit") {
        None | Some(Value::Null) => DEFAULT_LIMIT,
        Some(l) => match l.as_u64() {
            Some(n) if (1..=MAX_LIMIT as u64).contains(&n) => n as usize,
            _ => return json!({"error": format!("limit must be between 1 and {MAX_LIMIT}")}),
        },
    };
    let entries = async {
        let tx = state.dispatcher.upgrade()?;
        let (etx, erx) = oneshot::channel();
        tx.send(Inbound::Journal(JournalQuery { tag, limit }, etx))
            .await
            .ok()?;
        drop(tx);
        erx.await.ok()
    };
    match tokio::time::timeout(SNAPSHOT_TIMEOUT, entries).await {
        Ok(Some(v)) => json!({"entries": v.iter().map(entry_json).collect::<Vec<_>>()}),
        _ => json!({"error": "the dispatcher did not answer"}),
    }
}

/// Longest wait for a `renew` answer: the RENEW round trip plus the probe of the new
/// certificate, with a margin.
pub const RENEW_WAIT: Duration = Duration::from_secs(75);

/// The `renew` answer: `{"renewed":true,…}` or `{"error":…,"code":…}`.
async fn renew(state: &AdminState) -> Value {
    use crate::credentials::renew::RenewError;
    let Some(tx) = &state.renew else {
        return json!({"error": "renewal is not available", "code": "failed"});
    };
    let (otx, orx) = oneshot::channel();
    if tx
        .send(crate::daemon::session::RenewRequest { respond: otx })
        .await
        .is_err()
    {
        return json!({"error": "the agent is stopping", "code": "failed"});
    }
    match tokio::time::timeout(RENEW_WAIT, orx).await {
        Ok(Ok(Ok(out))) => out.to_json(),
        Ok(Ok(Err(e))) => {
            let code = match &e {
                RenewError::Unreachable(_) => "unreachable",
                RenewError::Tls(_) => "tls",
                RenewError::Revoked(_) => "revoked",
                RenewError::Failed(_) | RenewError::Busy(_) => "failed",
            };
            json!({"error": e.to_string(), "code": code})
        }
        Ok(Err(_)) => json!({"error": "the renewal was abandoned", "code": "failed"}),
        Err(_) => {
            json!({"error": "no outcome within the wait; see `runos status`", "code": "failed"})
        }
    }
}

/// The full status answer.
pub async fn status(state: &AdminState) -> Value {
    let mut v = state.state.to_json();
    let snap = async {
        let tx = state.dispatcher.upgrade()?;
        let (stx, srx) = oneshot::channel();
        tx.send(Inbound::Snapshot(stx)).await.ok()?;
        drop(tx);
        srx.await.ok()
    };
    match tokio::time::timeout(SNAPSHOT_TIMEOUT, snap).await {
        Ok(Some(s)) => {
            if let (Some(o), Value::Object(d)) = (v.as_object_mut(), s.to_json()) {
                o.extend(d);
            }
        }
        _ => {
            v["inFlight"] = Value::Null;
            v["queued"] = Value::Null;
            v["journal"] = Value::Null;
            v["dispatcher"] = json!("unresponsive");
        }
    }
    // The overlay in one line, from the saved state only (no device read: status stays fast).
    if let Some(o) = &state.overlay {
        v["overlay"] = serde_json::to_value(o.summary().await).unwrap_or(Value::Null);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::daemon::dispatch::{self, DispatchConfig};

    async fn ask(path: &Path, req: &[u8]) -> Value {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        serde_json::from_str(out.trim()).unwrap()
    }

    #[tokio::test]
    async fn serves_status_on_a_0600_socket_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let (_sd_tx, sd_rx) = tokio::sync::watch::channel(false);
        let cfg = crate::config::load(Path::new("/nonexistent/runos.toml"))
            .unwrap()
            .0;
        let (journal, _) = runos_journal::Journal::open(
            &dir.path().join("state"),
            Default::default(),
            crate::daemon::JOURNAL_POLICY,
        )
        .unwrap();
        let (link, _join) = dispatch::spawn(
            Arc::new(crate::catalog::standard()),
            DispatchConfig::from_settings(&cfg.agent),
            journal,
            sd_rx,
        );
        let state = AdminState {
            state: crate::daemon::state::AgentState::new(),
            dispatcher: link.inbound.downgrade(),
            renew: None,
            reconnect: None,
            overlay: None,
        };
        // A stale socket file (nobody listening) is replaced.
        std::fs::create_dir_all(&run).unwrap();
        drop(std::os::unix::net::UnixListener::bind(run.join("admin.sock")).unwrap());
        let server = start(&run.join("admin.sock"), state.clone()).expect("admin socket");
        let mode = std::fs::metadata(server.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let v = ask(server.path(), b"{\"op\":\"status\"}\n").await;
        assert_eq!(v["agentVersion"], crate::AGENT_VERSION);
        assert_eq!(v["connection"]["state"], "disconnected");
        assert!(v["inFlight"].as_array().unwrap().is_empty());
        assert_eq!(v["journal"]["records"], 0);
        assert_eq!(v["counts"]["queued"], 0);

        let v = ask(server.path(), b"{\"op\":\"journal\"}\n").await;
        assert_eq!(v["entries"], json!([]), "{v}");
        let v = ask(
            server.path(),
            b"{\"op\":\"journal\",\"tag\":\"3f2a3c9e-0000-4000-8000-000000000000\"}\n",
        )
        .await;
        assert_eq!(v["entries"], json!([]), "{v}");
        let v = ask(server.path(), b"{\"op\":\"journal\",\"tag\":\"x\"}\n").await;
        assert!(v["error"].is_string(), "{v}");
        let v = ask(server.path(), b"{\"op\":\"journal\",\"limit\":0}\n").await;
        assert!(v["error"].is_string(), "{v}");

        let v = ask(server.path(), b"{\"op\":\"shell\"}\n").await;
        assert!(v["error"].is_string());
        // Oversized: answered with an error, or reset (the unread excess is dropped on close).
        let mut big = UnixStream::connect(server.path()).await.unwrap();
        big.write_all(&[b'x'; MAX_REQUEST + 10]).await.unwrap();
        let mut out = String::new();
        if big.read_to_string(&mut out).await.is_ok() {
            assert!(out.contains("larger"), "{out}");
        }

        // A live socket is not taken over.
        assert!(start(&run.join("admin.sock"), state).is_none());
        let path = server.path().to_path_buf();
        drop(server);
        assert!(!path.exists());
    }
}
