//! Wires everything together: data directory, database, CA, the L1Sec and L2Sec listeners and
//! the operator socket. [`serve`] returns a [`ServerHandle`] with the bound addresses, an
//! in-process [`Api`] and a shutdown method, so tests and the demo can run it in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Api;
use crate::ca::Ca;
use crate::db::Db;
use crate::l2::Sessions;
use crate::{Error, admin, l1, l2, util};

/// File name of the state database in the data directory.
pub const DB_FILE: &str = "state.db";
/// File name of the endpoints file in the data directory.
pub const ENDPOINTS_FILE: &str = "endpoints.json";
/// Default name of the operator socket in the data directory.
pub const ADMIN_SOCKET_FILE: &str = "admin.sock";
/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// Smallest heartbeat interval.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Default bound on the instructions per session sent but not yet finally answered.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 128;
/// Largest accepted `max_in_flight`.
pub const MAX_MAX_IN_FLIGHT: u32 = 4096;
/// How long a peer has for the TLS handshake and its first frame, together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on live L2Sec sessions (probe sessions included).
pub const DEFAULT_MAX_SESSIONS: u32 = 50_000;
/// Largest accepted `max_sessions`.
pub const MAX_MAX_SESSIONS: u32 = 1_000_000;
/// Default bound on L2Sec connections in their handshake (TLS, HELLO, WELCOME).
pub const DEFAULT_MAX_HANDSHAKES: u32 = 1024;
/// Largest accepted `max_handshakes`.
pub const MAX_MAX_HANDSHAKES: u32 = 65_536;
/// Default bound on connections in their handshake from one source address, per listener.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 64;
/// File descriptors kept for everything but connections: the database and its journal files,
/// the CA and certificate files, the listeners, the standard streams, the runtime.
pub const FIXED_FDS: u64 = 64;

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The data directory (created 0700).
    pub data_dir: PathBuf,
    /// L1Sec listen address.
    pub l1_addr: String,
    /// L2Sec listen address.
    pub l2_addr: String,
    /// The operator socket; default `DATA_DIR/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// Extra server certificate SANs (DNS names or IP addresses).
    pub hostnames: Vec<String>,
    /// The heartbeat interval advertised in WELCOME (at least 1 s).
    pub heartbeat_interval: Duration,
    /// Largest L2Sec frame accepted (at least 64 KiB).
    pub max_frame_bytes: u32,
    /// Validity of node certificates.
    pub cert_validity: Duration,
    /// Instructions per session sent but not yet finally answered (1..=4096). Instructions
    /// waiting to be resent after `busy` or `shutting_down` count too.
    pub max_in_flight: u32,
    /// The agent version advertised in WELCOME (`vX.Y.Z`), if any: agents with
    /// `[update] auto = true` install it, `runos update` without `--version` targets it.
    pub advertise_version: Option<String>,
    /// Live L2Sec sessions (probe sessions included), 1..=1 000 000. Past it a new session is
    /// refused at once with `ERROR busy`. Lowered at start when the open-file limit cannot
    /// hold it.
    pub max_sessions: u32,
    /// L2Sec connections in their handshake at once (1..=65 536); more wait in the accept
    /// queue.
    pub max_handshakes: u32,
    /// Connections in their handshake from one source address, per listener (1..=65 536);
    /// more are closed at once.
    pub max_handshakes_per_source: u32,
}

/// `vMAJOR.MINOR.PATCH`: decimal, 1-9 digits each, no leading zeros, no suffix.
pub fn is_release_version(v: &str) -> bool {
    let Some(rest) = v.strip_prefix('v') else {
        return false;
    };
    let parts: Vec<&str> = rest.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            (1..=9).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_digit())
                && !(p.len() > 1 && p.starts_with('0'))
        })
}

impl ServeOptions {
    /// Defaults: ports 9191/9192 on all addresses, 15 s heartbeat, 16 MiB frames, 30-day node
    /// certificates, 128 instructions in flight per session.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServeOptions {
            data_dir: data_dir.into(),
            l1_addr: format!("0.0.0.0:{}", runos_protocol::DEFAULT_L1_PORT),
            l2_addr: format!("0.0.0.0:{}", runos_protocol::DEFAULT_L2_PORT),
            admin_socket: None,
            hostnames: Vec::new(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            max_frame_bytes: runos_protocol::DEFAULT_MAX_FRAME_BYTES,
            cert_validity: crate::ca::DEFAULT_NODE_CERT_VALIDITY,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            advertise_version: None,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        }
    }

    /// Loopback ephemeral ports, for tests and the demo.
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        ServeOptions {
            l1_addr: "127.0.0.1:0".into(),
            l2_addr: "127.0.0.1:0".into(),
            ..ServeOptions::new(data_dir)
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if self.heartbeat_interval < MIN_HEARTBEAT_INTERVAL {
            return Err(Error::BadRequest(
                "--heartbeat-interval must be at least 1s".into(),
            ));
        }
        if self.max_frame_bytes < runos_protocol::MIN_MAX_FRAME_BYTES {
            return Err(Error::BadRequest(format!(
                "--max-frame-bytes must be at least {}",
                runos_protocol::MIN_MAX_FRAME_BYTES
            )));
        }
        if self.cert_validity < Duration::from_secs(60) {
            return Err(Error::BadRequest(
                "--cert-validity must be at least 1m".into(),
            ));
        }
        if self.cert_validity > crate::ca::MAX_NODE_CERT_VALIDITY {
            return Err(Error::BadRequest(format!(
                "--cert-validity must be at most {}d (agents refuse longer-lived certificates)",
                crate::ca::MAX_NODE_CERT_VALIDITY.as_secs() / 86400
            )));
        }
        if let Some(v) = &self.advertise_version
            && !is_release_version(v)
        {
            return Err(Error::BadRequest(format!(
                "--advertise-version must be vMAJOR.MINOR.PATCH (e.g. v0.2.0), got {:?}",
                v.chars().take(40).collect::<String>()
            )));
        }
        if !(1..=MAX_MAX_IN_FLIGHT).contains(&self.max_in_flight) {
            return Err(Error::BadRequest(format!(
                "--max-in-flight must be between 1 and {MAX_MAX_IN_FLIGHT}"
            )));
        }
        if !(1..=MAX_MAX_SESSIONS).contains(&self.max_sessions) {
            return Err(Error::BadRequest(format!(
                "--max-sessions must be between 1 and {MAX_MAX_SESSIONS}"
            )));
        }
        if !(1..=MAX_MAX_HANDSHAKES).contains(&self.max_handshakes) {
            return Err(Error::BadRequest(format!(
                "--max-handshakes must be between 1 and {MAX_MAX_HANDSHAKES}"
            )));
        }
        if !(1..=MAX_MAX_HANDSHAKES).contains(&self.max_handshakes_per_source) {
            return Err(Error::BadRequest(format!(
                "--max-handshakes-per-source must be between 1 and {MAX_MAX_HANDSHAKES}"
            )));
        }
        Ok(())
    }
}

/// `DATA_DIR/endpoints.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// The bound L1Sec address.
    pub l1_addr: String,
    /// The bound L2Sec address.
    pub l2_addr: String,
    /// The operator socket path.
    pub admin_socket: String,
}

impl Endpoints {
    /// Read `DIR/endpoints.json`.
    pub fn read(data_dir: &Path) -> Result<Endpoints, Error> {
        let p = data_dir.join(ENDPOINTS_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text).map_err(|e| Error::BadRequest(format!("{}: {e}", p.display())))
    }
}

/// The TLS configurations of the listeners, built from one [`Ca`].
#[derive(Debug, Clone)]
pub(crate) struct TlsConfigs {
    /// L1Sec: the server certificate, no client authentication.
    pub l1: Arc<rustls::ServerConfig>,
    /// L2Sec: the server certificate, client certificates from the trusted CAs.
    pub l2: Arc<rustls::ServerConfig>,
}

impl TlsConfigs {
    /// The configurations for `ca`: its server certificate, and on L2Sec client certificates
    /// from its trusted CAs (both during a rotation). New configurations come with new (empty)
    /// session caches, so no TLS session from before a cutover can be resumed past the check
    /// of the client certificate.
    pub fn new(ca: &Ca) -> Result<TlsConfigs, Error> {
        let (chain, key) = ca.server_identity()?;
        let l1 = runos_transport::tls::server_config(
            chain.clone(),
            key.clone_key(),
            runos_protocol::ALPN_L1SEC,
            None,
        )?;
        let l2 = runos_transport::tls::server_config(
            chain,
            key,
            runos_protocol::ALPN_L2SEC,
            Some(&ca.client_roots()),
        )?;
        Ok(TlsConfigs { l1, l2 })
    }
}

/// State shared by every task of a running control plane.
#[derive(Debug)]
pub(crate) struct Shared {
    pub db: Db,
    /// The CA; replaced as a whole when it is rotated.
    pub ca: std::sync::RwLock<Arc<Ca>>,
    /// The listeners' TLS configurations; replaced with the CA. Each connection takes the
    /// current one when it is accepted.
    pub tls: std::sync::RwLock<TlsConfigs>,
    /// Serialises CA rotations and cutovers.
    pub ca_ops: Arc<tokio::sync::Mutex<()>>,
    pub opts: ServeOptions,
    pub sessions: Arc<Sessions>,
    /// Who waits for which final reply; sessions wake them once a reply is stored.
    pub replies: crate::api::ReplyWaiters,
    pub shutdown: watch::Receiver<bool>,
    /// L2Sec capacity: session and handshake slots, per-source handshakes.
    pub l2_limits: l2::Limits,
    /// L1Sec connections in progress per source address.
    pub l1_sources: Arc<crate::listen::PerSource>,
}

/// Wait until `rx` says "shut down" (or its sender is gone).
impl Shared {
    /// The current CA (a snapshot: a rotation replaces it as a whole).
    pub fn ca(&self) -> Arc<Ca> {
        self.ca.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The current L1Sec TLS configuration.
    pub fn l1_tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .l1
            .clone()
    }

    /// The current L2Sec TLS configuration.
    pub fn l2_tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .l2
            .clone()
    }

    /// Put `ca` in service: first the TLS configurations (so that L2Sec trusts a new CA before
    /// any certificate of it is handed out), then the CA itself. Live connections keep the
    /// configuration they were accepted with.
    pub fn install_ca(&self, ca: Ca) -> Result<(), Error> {
        let tls = TlsConfigs::new(&ca)?;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
        *self.ca.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ca);
        Ok(())
    }
}

/// How long an expired node certificate's row is kept (for `nodes` and audits).
const EXPIRED_CERT_RETENTION: Duration = Duration::from_secs(30 * 86400);
/// How often expired certificate rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Delete the rows of node certificates that expired more than [`EXPIRED_CERT_RETENTION`] ago,
/// at start and then every [`PRUNE_EVERY`], so renewals do not grow the database forever.
async fn prune_certificates(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let before = util::now_ms().saturating_sub(util::ms(EXPIRED_CERT_RETENTION));
        match shared.db.prune_certs(before) {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "pruned expired node certificates"),
            Err(e) => tracing::warn!(error = %e, "cannot prune expired node certificates"),
        }
        tokio::select! {
            () = shutdown_signalled(&mut shutdown) => return,
            () = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

pub(crate) async fn shutdown_signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// A running control plane.
#[derive(Debug)]
pub struct ServerHandle {
    l1_addr: SocketAddr,
    l2_addr: SocketAddr,
    admin_socket: PathBuf,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// The bound L1Sec address.
    pub fn l1_addr(&self) -> SocketAddr {
        self.l1_addr
    }
    /// The bound L2Sec address.
    pub fn l2_addr(&self) -> SocketAddr {
        self.l2_addr
    }
    /// The operator socket.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }
    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.shared.opts.data_dir
    }
    /// The CA bundle agents trust (PEM): one CA, or two during a CA rotation.
    pub fn ca_pem(&self) -> String {
        self.shared.ca().bundle_pem()
    }
    /// The CA pin: lowercase hex sha256 of the active CA certificate's DER (the CA that signs
    /// the server certificate; enrolment tokens carry it).
    pub fn ca_sha256(&self) -> String {
        self.shared.ca().ca_sha256()
    }
    /// The in-process operator API.
    pub fn api(&self) -> Api {
        Api::new(self.shared.clone())
    }

    /// Stop accepting, close every session and the operator socket, wait for the tasks (at
    /// most a few seconds) and close the database.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        self.shared.sessions.close_all(l2::CloseReason::Shutdown);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for t in self.tasks.drain(..) {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        let _ = std::fs::remove_file(&self.admin_socket);
        self.shared.db.close();
        tracing::info!("control plane stopped");
    }
}

async fn bind_tcp(addr: &str) -> Result<(TcpListener, SocketAddr), Error> {
    let l = TcpListener::bind(addr).await.map_err(|e| Error::Bind {
        addr: addr.to_string(),
        source: e,
    })?;
    let local = l.local_addr().map_err(|e| Error::Bind {
        addr: addr.to_string(),
        source: e,
    })?;
    Ok((l, local))
}

/// How many L2Sec sessions and handshakes the open-file limit lets the control plane hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdPlan {
    /// Live sessions.
    pub sessions: u32,
    /// Connections in their handshake.
    pub handshakes: u32,
    /// Open files the options need: sessions, handshakes, L1Sec and operator connections,
    /// [`FIXED_FDS`].
    pub need: u64,
}

/// File descriptors kept for everything but L2Sec: L1Sec and operator connections at their
/// bounds, and [`FIXED_FDS`]. Keeping them out of the L2Sec budget is what lets the operator
/// socket answer however many nodes connect.
fn fd_reserve() -> u64 {
    FIXED_FDS + l1::MAX_CONNECTIONS as u64 + admin::MAX_CONNECTIONS as u64
}

/// The L2Sec budget within an open-file limit of `limit`: what the options ask for when it
/// fits, else handshakes cut to a quarter of what is left and sessions to the rest.
pub(crate) fn fd_plan(opts: &ServeOptions, limit: u64) -> Result<FdPlan, Error> {
    let reserve = fd_reserve();
    let need = reserve + u64::from(opts.max_sessions) + u64::from(opts.max_handshakes);
    if limit >= need {
        return Ok(FdPlan {
            sessions: opts.max_sessions,
            handshakes: opts.max_handshakes,
            need,
        });
    }
    let budget = limit.saturating_sub(reserve);
    if budget < 2 {
        return Err(Error::BadRequest(format!(
            "the open-file limit ({limit}) is too low: the control plane needs at least {} \
             (ulimit -n, or LimitNOFILE= in systemd)",
            reserve + 2
        )));
    }
    let handshakes = u64::from(opts.max_handshakes).min((budget / 4).max(1));
    let sessions = u64::from(opts.max_sessions).min(budget - handshakes);
    Ok(FdPlan {
        sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
        handshakes: u32::try_from(handshakes).unwrap_or(u32::MAX),
        need,
    })
}

/// Raise the soft open-file limit to the hard one; the soft limit in force afterwards.
fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let soft = lim.current.unwrap_or(u64::MAX);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    if soft >= hard {
        return soft;
    }
    let mut raised = lim;
    raised.current = lim.maximum;
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = hard,
                "raised the soft open-file limit to the hard limit"
            );
            hard
        }
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the soft open-file limit");
            soft
        }
    }
}

/// Start a control plane: create or open the data directory, database and CA, bind the
/// listeners and the operator socket, write `endpoints.json`, and run in background tasks.
///
/// Raises the process's soft open-file limit to its hard limit, and when even that cannot hold
/// `max_sessions` (see [`FIXED_FDS`]), serves fewer sessions and says so in a warning.
pub async fn serve(opts: ServeOptions) -> Result<ServerHandle, Error> {
    opts.validate()?;
    let fd_limit = raise_nofile_limit();
    let plan = fd_plan(&opts, fd_limit)?;
    if plan.sessions < opts.max_sessions || plan.handshakes < opts.max_handshakes {
        tracing::warn!(
            open_file_limit = fd_limit,
            needed = plan.need,
            max_sessions = opts.max_sessions,
            sessions = plan.sessions,
            handshakes = plan.handshakes,
            "the open-file limit is below what --max-sessions needs (sessions + handshakes + \
             operator and enrolment connections + {FIXED_FDS}); serving at most the sessions and \
             handshakes shown; raise the hard limit (LimitNOFILE= in systemd, ulimit -Hn)"
        );
    }
    util::ensure_private_dir(&opts.data_dir)?;
    let db = Db::open(&opts.data_dir.join(DB_FILE))?;
    // The write lock makes concurrent first starts on one data directory create one CA.
    let ca = db.with_write_lock(|| Ca::load_or_create(&opts.data_dir, &opts.hostnames))?;
    // Certificates recorded by schema v1 were all issued by the one CA it knew: the active one.
    let attributed = db.attribute_certs(&ca.ca_sha256())?;
    if attributed > 0 {
        tracing::info!(
            certificates = attributed,
            ca_sha256 = %ca.ca_sha256(),
            "recorded the issuing CA of certificates from an older database"
        );
    }
    let tls = TlsConfigs::new(&ca)?;

    let (l1_listener, l1_addr) = bind_tcp(&opts.l1_addr).await?;
    let (l2_listener, l2_addr) = bind_tcp(&opts.l2_addr).await?;
    let admin_path = opts
        .admin_socket
        .clone()
        .unwrap_or_else(|| opts.data_dir.join(ADMIN_SOCKET_FILE));
    let admin_listener = admin::bind(&admin_path).await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        db,
        ca: std::sync::RwLock::new(Arc::new(ca)),
        tls: std::sync::RwLock::new(tls),
        ca_ops: Arc::new(tokio::sync::Mutex::new(())),
        opts: opts.clone(),
        sessions: Arc::new(Sessions::default()),
        replies: crate::api::ReplyWaiters::default(),
        shutdown: shutdown_rx,
        l2_limits: l2::Limits::new(&plan, opts.max_sessions, opts.max_handshakes_per_source),
        l1_sources: crate::listen::PerSource::new(opts.max_handshakes_per_source),
    });

    let tasks = vec![
        tokio::spawn(l1::run(l1_listener, shared.clone())),
        tokio::spawn(l2::run(l2_listener, shared.clone())),
        tokio::spawn(admin::run(admin_listener, shared.clone())),
        tokio::spawn(prune_certificates(shared.clone())),
    ];

    let endpoints = Endpoints {
        l1_addr: l1_addr.to_string(),
        l2_addr: l2_addr.to_string(),
        admin_socket: admin_path.display().to_string(),
    };
    let text = serde_json::to_vec_pretty(&endpoints)
        .map_err(|e| Error::Internal(format!("endpoints.json: {e}")))?;
    let handle = ServerHandle {
        l1_addr,
        l2_addr,
        admin_socket: admin_path,
        shared,
        shutdown_tx,
        tasks,
    };
    if let Err(e) = util::atomic_write(&opts.data_dir.join(ENDPOINTS_FILE), &text, 0o644) {
        handle.shutdown().await;
        return Err(e);
    }
    tracing::info!(
        l1 = %l1_addr,
        l2 = %l2_addr,
        admin = %endpoints.admin_socket,
        ca_sha256 = %handle.ca_sha256(),
        incoming_ca_sha256 = handle.shared.ca().incoming().map(|i| i.sha256.as_str()).unwrap_or("-"),
        max_sessions = plan.sessions,
        max_handshakes = plan.handshakes,
        open_file_limit = fd_limit,
        "control plane listening"
    );
    Ok(handle)
}

/// `serve`: run until SIGTERM or SIGINT, then shut down gracefully.
pub async fn run_until_signal(opts: ServeOptions) -> Result<(), Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let sig =
        |k| signal(k).map_err(|e| Error::Internal(format!("installing signal handlers: {e}")));
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let handle = serve(opts).await?;
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod advertise_tests {
    #[test]
    fn release_versions() {
        for ok in ["v0.2.0", "v10.0.1", "v0.0.0"] {
            assert!(super::is_release_version(ok), "{ok}");
        }
        for bad in [
            "0.2.0",
            "v0.2",
            "v01.2.0",
            "v0.2.0-rc.1",
            "v0.2.0 ",
            "",
            "v1234567890.0.0",
        ] {
            assert!(!super::is_release_version(bad), "{bad}");
        }
    }

    /// Node certificates stay within the lifetime agents accept (issue 10).
    #[test]
    fn cert_validity_is_bounded_both_ways() {
        let mut o = super::ServeOptions::new("/nonexistent");
        o.cert_validity = crate::ca::MAX_NODE_CERT_VALIDITY;
        assert!(o.validate().is_ok());
        o.cert_validity += std::time::Duration::from_secs(1);
        assert!(o.validate().is_err());
        o.cert_validity = std::time::Duration::from_secs(59);
        assert!(o.validate().is_err());
        // With its backdating, the longest node certificate is still one agents accept.
        let longest = crate::ca::MAX_NODE_CERT_VALIDITY + crate::ca::NODE_BACKDATE;
        assert!(longest.as_secs() < 400 * 86400);
    }
}

#[cfg(test)]
mod fd_plan_tests {
    use super::*;

    #[test]
    fn the_plan_keeps_the_reserve_and_cuts_handshakes_then_sessions() {
        let opts = ServeOptions::new("/nonexistent");
        let reserve = fd_reserve();
        let need = reserve + u64::from(DEFAULT_MAX_SESSIONS) + u64::from(DEFAULT_MAX_HANDSHAKES);
        let full = fd_plan(&opts, need).unwrap();
        assert_eq!(
            (full.sessions, full.handshakes, full.need),
            (DEFAULT_MAX_SESSIONS, DEFAULT_MAX_HANDSHAKES, need)
        );
        // 1024 open files: a quarter of what is left after the reserve for handshakes.
        let low = fd_plan(&opts, 1024).unwrap();
        assert_eq!(low.handshakes, 192);
        assert_eq!(low.sessions, 576);
        assert_eq!(u64::from(low.sessions + low.handshakes) + reserve, 1024);
        // Too low to run at all.
        assert!(fd_plan(&opts, reserve + 1).is_err());
        // A small --max-sessions fits as asked.
        let small = ServeOptions {
            max_sessions: 10,
            max_handshakes: 4,
            ..ServeOptions::new("/nonexistent")
        };
        let p = fd_plan(&small, 1024).unwrap();
        assert_eq!((p.sessions, p.handshakes), (10, 4));
    }
}
