//! The agent's configuration file (TOML).
//!
//! Loading is two steps: [`RawConfig::parse`] is pure (text → strictly typed struct; unknown keys
//! are errors) and [`RawConfig::validate`] resolves and checks it, with errors that name the key.
//! Reading a configuration never creates or modifies any file; a missing file means "all
//! defaults". The only writer is [`update_server`], used by `runos register`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runos_executors::host::runner::{CgroupMode, Tools};
use serde::{Deserialize, Serialize};

use crate::util::fs as fsutil;

/// Where the configuration lives unless `--config` or `RUNOS_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/runos/config.toml";

/// The environment variable that overrides the configuration path.
pub const CONFIG_ENV: &str = "RUNOS_CONFIG";

/// Largest configuration file accepted.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("config {path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The text is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error("config {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the line and key).
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("config {path}: {key} {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key, e.g. `agent.queue_capacity`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The file could not be rewritten (register only).
    #[error(transparent)]
    Write(#[from] fsutil::FsError),
}

impl ConfigError {
    /// The dotted key the error is about, when it is about one key.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// The configuration exactly as written (after defaults), before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[server]`
    pub server: RawServer,
    /// `[paths]`
    pub paths: RawPaths,
    /// `[log]`
    pub log: RawLog,
    /// `[agent]`
    pub agent: RawAgent,
    /// `[update]`
    pub update: RawUpdate,
    /// `[tools]`: a tool name to its absolute path.
    pub tools: BTreeMap<String, PathBuf>,
    /// `[runner]`
    pub runner: RawRunner,
    /// `[wireguard]`
    pub wireguard: RawWireguard,
    /// `[etcd]`: endpoints, TLS files and waits of `REMOVE_ETCD_MEMBER` and `runos etcd`
    /// (docs/etcd.md).
    pub etcd: runos_etcd::Settings,
    /// `[uninstall]`
    pub uninstall: RawUninstall,
    /// `[kubernetes]`: tools, files, packages and bounds of `GET_CLUSTER_JOIN_CMD` and
    /// `UPGRADE_NODE_K8S` (docs/kubernetes.md).
    pub kubernetes: runos_kubeadm::KubeSettings,
}

/// `[uninstall]` as written: `UNINSTALL_NODE` and `runos uninstall` (docs/uninstall.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUninstall {
    /// systemd units stopped first (best effort).
    pub stop_units: Vec<String>,
    /// Whether `kubeadm reset -f` runs (when kubeadm is installed).
    pub kubeadm_reset: bool,
    /// Bound of `kubeadm reset`, in seconds.
    pub reset_timeout_secs: u64,
}

impl Default for RawUninstall {
    fn default() -> Self {
        RawUninstall {
            stop_units: vec!["kubelet.service".into(), "containerd.service".into()],
            kubeadm_reset: true,
            reset_timeout_secs: 120,
        }
    }
}

/// The most `[uninstall] stop_units`.
pub const MAX_STOP_UNITS: usize = 32;

impl RawUninstall {
    fn validate(&self, path: &Path) -> Result<UninstallSettings, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if self.stop_units.len() > MAX_STOP_UNITS {
            return Err(invalid(
                "uninstall.stop_units",
                format!(
                    "has {} entries; at most {MAX_STOP_UNITS}",
                    self.stop_units.len()
                ),
            ));
        }
        for u in &self.stop_units {
            let ok = !u.is_empty()
                && u.len() <= 256
                && !u.starts_with('-')
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":_.@-\\".contains(&b));
            if !ok {
                return Err(invalid(
                    "uninstall.stop_units",
                    format!("{u:?} is not a systemd unit name (like \"kubelet.service\")"),
                ));
            }
        }
        check_range(
            path,
            "uninstall.reset_timeout_secs",
            self.reset_timeout_secs,
            1,
            3600,
        )?;
        Ok(UninstallSettings {
            stop_units: self.stop_units.clone(),
            kubeadm_reset: self.kubeadm_reset,
            reset_timeout: Duration::from_secs(self.reset_timeout_secs),
        })
    }
}

/// Validated `[uninstall]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UninstallSettings {
    /// Units stopped first.
    pub stop_units: Vec<String>,
    /// Whether `kubeadm reset -f` runs.
    pub kubeadm_reset: bool,
    /// Its bound.
    pub reset_timeout: Duration,
}

/// `[wireguard]` as written: the overlay interface (docs/overlay.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWireguard {
    /// The overlay interface.
    pub interface: String,
    /// `auto`, `kernel` or `userspace`.
    pub backend: String,
    /// The UDP port WireGuard listens on.
    pub listen_port: u16,
    /// The interface's MTU; 0 leaves it as it is.
    pub mtu: u32,
    /// Persistent keepalive for peers without `keepaliveSecs`; 0 for none.
    pub keepalive_secs: u16,
    /// This node's overlay address with its prefix (`172.24.1.5/16`); empty: the interface's.
    pub address: String,
    /// This node's underlay address as reported to the control plane; empty: the address the
    /// host uses towards the control plane.
    pub endpoint_ip: String,
    /// The userspace implementation's argv (the interface name is appended).
    pub userspace_command: Vec<String>,
    /// Seconds between two checks of the device against the applied peer set.
    pub reconcile_secs: u64,
    /// The cluster's VIP (`IP` or `IP/prefix`) for a `VIP_ASSIGN` without `address`; empty: none.
    pub vip: String,
    /// The local service that must answer before this node takes the VIP (`IP:port`); empty:
    /// no check.
    pub vip_check: String,
}

impl Default for RawWireguard {
    fn default() -> Self {
        RawWireguard {
            interface: "wg0".into(),
            backend: "auto".into(),
            listen_port: 51820,
            mtu: 1420,
            keepalive_secs: 25,
            address: String::new(),
            endpoint_ip: String::new(),
            userspace_command: vec!["wireguard-go".into(), "-f".into()],
            reconcile_secs: 30,
            vip: String::new(),
            vip_check: String::new(),
        }
    }
}

/// Validated `[wireguard]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireguardSettings {
    /// The interface.
    pub interface: String,
    /// The backend choice.
    pub backend: String,
    /// The listen port.
    pub listen_port: u16,
    /// The MTU (`None`: left alone).
    pub mtu: Option<u32>,
    /// Default persistent keepalive.
    pub keepalive_secs: u16,
    /// The overlay address.
    pub address: Option<(std::net::IpAddr, u8)>,
    /// The reported underlay address.
    pub endpoint_ip: Option<std::net::IpAddr>,
    /// The userspace implementation.
    pub userspace_command: Vec<String>,
    /// The reconcile interval.
    pub reconcile_interval: Duration,
    /// The default VIP.
    pub vip: Option<(std::net::IpAddr, u8)>,
    /// The VIP's health check.
    pub vip_check: Option<std::net::SocketAddr>,
}

impl RawWireguard {
    fn validate(&self, path: &Path) -> Result<WireguardSettings, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        let i = &self.interface;
        if i.is_empty()
            || i.len() > 15
            || i.starts_with('-')
            || !i
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            || i == "."
            || i == ".."
        {
            return Err(invalid(
                "wireguard.interface",
                "must be an interface name: 1 to 15 of A-Z a-z 0-9 _ - . (not starting with '-')"
                    .into(),
            ));
        }
        if !matches!(self.backend.as_str(), "auto" | "kernel" | "userspace") {
            return Err(invalid(
                "wireguard.backend",
                format!(
                    "must be \"auto\", \"kernel\" or \"userspace\", got {:?}",
                    self.backend
                ),
            ));
        }
        if self.listen_port == 0 {
            return Err(invalid(
                "wireguard.listen_port",
                "must be between 1 and 65535".into(),
            ));
        }
        check_range(path, "wireguard.mtu", u64::from(self.mtu), 0, 65_535)?;
        if self.mtu != 0 && self.mtu < 1280 {
            return Err(invalid(
                "wireguard.mtu",
                "must be 0 (leave it) or at least 1280".into(),
            ));
        }
        let address = if self.address.is_empty() {
            None
        } else {
            let bad = || {
                invalid(
                    "wireguard.address",
                    format!(
                        "must be an address with its prefix, like 172.24.1.5/16, got {:?}",
                        self.address
                    ),
                )
            };
            let (ip, prefix) = self.address.split_once('/').ok_or_else(bad)?;
            let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
            let prefix: u8 = prefix.parse().map_err(|_| bad())?;
            if prefix > if ip.is_ipv4() { 32 } else { 128 } {
                return Err(bad());
            }
            Some((ip, prefix))
        };
        let endpoint_ip = if self.endpoint_ip.is_empty() {
            None
        } else {
            Some(self.endpoint_ip.parse().map_err(|_| {
                invalid(
                    "wireguard.endpoint_ip",
                    format!("must be an IP address, got {:?}", self.endpoint_ip),
                )
            })?)
        };
        match self.userspace_command.first() {
            Some(p)
                if !p.is_empty()
                    && !p.contains('\0')
                    && (p.starts_with('/') || !p.contains('/')) => {}
            _ => {
                return Err(invalid(
                    "wireguard.userspace_command",
                    "must start with an absolute path or a program name, like [\"wireguard-go\", \"-f\"]".into(),
                ));
            }
        }
        if self.userspace_command.len() > 32
            || self
                .userspace_command
                .iter()
                .any(|a| a.contains('\0') || a.len() > 4096)
        {
            return Err(invalid(
                "wireguard.userspace_command",
                "at most 32 arguments of at most 4096 bytes, without NUL".into(),
            ));
        }
        check_range(
            path,
            "wireguard.reconcile_secs",
            self.reconcile_secs,
            1,
            3600,
        )?;
        let vip = if self.vip.is_empty() {
            None
        } else {
            Some(
                runos_protocol::instructions::vip_address(&self.vip).ok_or_else(|| {
                    invalid(
                        "wireguard.vip",
                        format!(
                            "must be an address, optionally with its prefix, like 172.24.1.254/32, got {:?}",
                            self.vip
                        ),
                    )
                })?,
            )
        };
        let vip_check = if self.vip_check.is_empty() {
            None
        } else {
            Some(self.vip_check.parse().map_err(|_| {
                invalid(
                    "wireguard.vip_check",
                    format!(
                        "must be IP:port, like 127.0.0.1:6443, got {:?}",
                        self.vip_check
                    ),
                )
            })?)
        };
        Ok(WireguardSettings {
            interface: i.clone(),
            backend: self.backend.clone(),
            listen_port: self.listen_port,
            mtu: (self.mtu != 0).then_some(self.mtu),
            keepalive_secs: self.keepalive_secs,
            address,
            endpoint_ip,
            userspace_command: self.userspace_command.clone(),
            reconcile_interval: Duration::from_secs(self.reconcile_secs),
            vip,
            vip_check,
        })
    }
}

/// `[runner]` as written: the process runner (docs/architecture.md, "Process runner").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRunner {
    /// Where each run's cgroup is created: `auto` (under the agent's own cgroup v2, when
    /// writable), `off` (process groups only) or an absolute cgroup v2 directory.
    pub cgroup_root: String,
}

impl Default for RawRunner {
    fn default() -> Self {
        RawRunner {
            cgroup_root: "auto".into(),
        }
    }
}

/// `[server]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// The control plane's host name or IP address. No default.
    pub host: Option<String>,
    /// L1Sec (enrolment) port.
    pub l1_port: u16,
    /// L2Sec (instruction channel) port.
    pub l2_port: u16,
    /// Optional pin: sha256 of the L1Sec CA certificate's DER encoding.
    pub l1_ca_sha256: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            host: None,
            l1_port: runos_protocol::DEFAULT_L1_PORT,
            l2_port: runos_protocol::DEFAULT_L2_PORT,
            l1_ca_sha256: None,
        }
    }
}

/// `[paths]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPaths {
    /// The node's private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The node's certificate (PEM).
    pub certificate: PathBuf,
    /// The L2Sec CA bundle written by `register`.
    pub ca: PathBuf,
    /// The L1Sec CA used by `register` when `--ca-file` is not given.
    pub l1_ca: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Runtime directory (holds `agent.lock`).
    pub run_dir: PathBuf,
}

impl Default for RawPaths {
    fn default() -> Self {
        RawPaths {
            key: "/etc/runos/node.key".into(),
            certificate: "/etc/runos/node.crt".into(),
            ca: "/etc/runos/ca.pem".into(),
            l1_ca: "/etc/runos/l1sec-ca.pem".into(),
            state_dir: "/var/lib/runos".into(),
            run_dir: "/run/runos".into(),
        }
    }
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Normal operation.
    #[default]
    Info,
    /// Debugging detail.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The level's name as used in filters.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// Verbosity; the `RUNOS_LOG` environment variable overrides it.
    pub level: LogLevel,
    /// Format.
    pub format: LogFormat,
}

/// `[agent]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAgent {
    /// Largest frame accepted from, and sent to, the control plane.
    pub max_frame_bytes: u32,
    /// Instructions waiting for an executor slot; beyond this, `busy`.
    pub queue_capacity: usize,
    /// Executors running at the same time.
    pub max_concurrency: usize,
    /// How long running instructions may take to finish on SIGTERM.
    pub shutdown_grace_secs: u64,
    /// First reconnect backoff step.
    pub reconnect_initial_ms: u64,
    /// Largest reconnect backoff step.
    pub reconnect_max_ms: u64,
    /// A session that stayed up this long resets the backoff, and the first reconnect after it
    /// waits only a moment (a shorter one counts as a failed attempt).
    pub stable_after_secs: u64,
    /// Bound on writing one frame to the control plane; beyond it the session ends.
    pub write_timeout_secs: u64,
    /// Which journal records are synced (`fdatasync`) before an executor starts and before a
    /// reply is sent (docs/cli.md): `needed` (the default), `always`, `never`.
    pub journal_sync: Option<JournalSync>,
    /// Older spelling: `false` means `journal_sync = "never"`.
    pub journal_fsync: bool,
}

/// `[agent] journal_sync`: which journal records must be durable before the action they allow
/// (see `runos_journal::SyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalSync {
    /// `started` and `finished` of the types not safe to re-run: what the guarantee needs.
    #[default]
    Needed,
    /// `started` and `finished` of every type.
    Always,
    /// None: benchmarks only (a warning at start).
    Never,
}

impl JournalSync {
    /// The journal's sync mode.
    pub fn mode(self) -> runos_journal::SyncMode {
        match self {
            JournalSync::Needed => runos_journal::SyncMode::Needed,
            JournalSync::Always => runos_journal::SyncMode::Always,
            JournalSync::Never => runos_journal::SyncMode::Never,
        }
    }
}

impl Default for RawAgent {
    fn default() -> Self {
        RawAgent {
            max_frame_bytes: runos_protocol::DEFAULT_MAX_FRAME_BYTES,
            queue_capacity: 256,
            max_concurrency: 16,
            shutdown_grace_secs: 10,
            reconnect_initial_ms: 1000,
            reconnect_max_ms: 60_000,
            stable_after_secs: 2,
            write_timeout_secs: 30,
            journal_sync: None,
            journal_fsync: true,
        }
    }
}

/// `[update]` as written (docs/update.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpdate {
    /// The GitHub repository releases come from and are attested by (`owner/name`).
    pub repo: String,
    /// The workflow that must have attested a release.
    pub workflow: String,
    /// A Sigstore `trusted_root.json`; default: the public-good root compiled in.
    pub trusted_root: Option<PathBuf>,
    /// Where releases are downloaded from (`<release_base>/download/<vX.Y.Z>/<asset>`);
    /// default `https://github.com/<repo>/releases`. https only.
    pub release_base: Option<String>,
    /// The GitHub API asked for the attestation (`<api>/repos/<repo>/attestations/sha256:<hex>`)
    /// when the release has no `<asset>.sigstore.json`; `""` turns the fallback off.
    pub attestations_api: String,
    /// A PEM CA bundle that replaces the compiled-in web roots for release downloads (a mirror).
    pub release_ca_file: Option<PathBuf>,
    /// Versions are installed side by side in `<install_dir>/<vX.Y.Z>/runos`.
    pub install_dir: PathBuf,
    /// The symlink the service runs (`ExecStart=`), swapped atomically.
    pub bin_link: PathBuf,
    /// Largest binary downloaded.
    pub max_download_bytes: u64,
    /// TCP connect and TLS handshake bound.
    pub connect_timeout_secs: u64,
    /// Bound on one whole download (each file).
    pub download_timeout_secs: u64,
    /// How long the restarted agent has to report the new version and connect.
    pub health_timeout_secs: u64,
    /// The hand-off command (argv) that restarts the service from outside the agent's cgroup.
    /// `{runos}` (the running binary), `{config}`, `{from}`, `{to}`, `{previous}` (the
    /// previous binary) and `{ts}` are replaced in each argument.
    pub restart_command: Vec<String>,
    /// The command (argv) `runos update-finish` runs to restart the service.
    pub service_restart_command: Vec<String>,
    /// Install the control plane's advertised version on its own.
    pub auto: bool,
}

/// The repository releases come from unless `[update] repo` says otherwise.
pub const DEFAULT_UPDATE_REPO: &str = "runos-dev/runos";

impl Default for RawUpdate {
    fn default() -> Self {
        RawUpdate {
            repo: DEFAULT_UPDATE_REPO.into(),
            workflow: runos_attest::DEFAULT_WORKFLOW.into(),
            trusted_root: None,
            release_base: None,
            attestations_api: "https://api.github.com".into(),
            release_ca_file: None,
            install_dir: "/usr/local/lib/runos".into(),
            bin_link: "/usr/local/bin/runos".into(),
            max_download_bytes: 256 * 1024 * 1024,
            connect_timeout_secs: 10,
            download_timeout_secs: 600,
            health_timeout_secs: 120,
            restart_command: [
                "systemd-run",
                "--unit=runos-update-{ts}",
                "--collect",
                "--quiet",
                "--",
                "{runos}",
                "--config",
                "{config}",
                "update-finish",
                "--from",
                "{from}",
                "--to",
                "{to}",
                "--previous",
                "{previous}",
            ]
            .map(String::from)
            .to_vec(),
            service_restart_command: ["systemctl", "restart", "runos.service"]
                .map(String::from)
                .to_vec(),
            auto: false,
        }
    }
}

/// Validated `[update]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateSettings {
    /// `owner/name`.
    pub repo: String,
    /// Workflow path.
    pub workflow: String,
    /// Trusted root file, or `None` for the compiled-in public-good root.
    pub trusted_root: Option<PathBuf>,
    /// Release base URL (https, no trailing slash).
    pub release_base: String,
    /// GitHub API base for the attestation fallback (https, no trailing slash), if on.
    pub attestations_api: Option<String>,
    /// CA bundle for downloads, replacing the compiled-in roots.
    pub release_ca_file: Option<PathBuf>,
    /// Install directory.
    pub install_dir: PathBuf,
    /// The swapped symlink.
    pub bin_link: PathBuf,
    /// Download cap.
    pub max_download_bytes: u64,
    /// Connect bound.
    #[serde(serialize_with = "ser_secs")]
    pub connect_timeout: Duration,
    /// Whole-download bound.
    #[serde(serialize_with = "ser_secs")]
    pub download_timeout: Duration,
    /// Health gate bound.
    #[serde(serialize_with = "ser_secs")]
    pub health_timeout: Duration,
    /// Hand-off argv (templated).
    pub restart_command: Vec<String>,
    /// Service restart argv.
    pub service_restart_command: Vec<String>,
    /// Automatic updates on.
    pub auto: bool,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Control-plane endpoint.
    pub server: ServerConfig,
    /// Files and directories.
    pub paths: Paths,
    /// Logging.
    pub log: LogConfig,
    /// Daemon limits and timings.
    pub agent: AgentSettings,
    /// Self-update.
    pub update: UpdateSettings,
    /// Where external tools are (`[tools]`; names without an entry are looked up in `PATH`).
    pub tools: Tools,
    /// The process runner.
    pub runner: RunnerSettings,
    /// The overlay interface.
    pub wireguard: WireguardSettings,
    /// etcd (validated).
    pub etcd: runos_etcd::Settings,
    /// The uninstall.
    pub uninstall: UninstallSettings,
    /// The kubeadm executors (validated).
    pub kubernetes: runos_kubeadm::KubeSettings,
}

/// The most `[tools]` entries.
pub const MAX_TOOLS: usize = 256;

/// Validated `[runner]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunnerSettings {
    /// Where run cgroups go.
    #[serde(serialize_with = "ser_cgroup")]
    pub cgroup: CgroupMode,
}

fn ser_cgroup<S: serde::Serializer>(c: &CgroupMode, s: S) -> Result<S::Ok, S::Error> {
    match c {
        CgroupMode::Auto => s.serialize_str("auto"),
        CgroupMode::Off => s.serialize_str("off"),
        CgroupMode::At(p) => s.serialize_str(&p.to_string_lossy()),
    }
}

/// Validated `[server]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerConfig {
    /// The control plane's host; `None` until `register` sets it.
    pub host: Option<String>,
    /// L1Sec port.
    pub l1_port: u16,
    /// L2Sec port.
    pub l2_port: u16,
    /// Normalised L1Sec CA pin (64 lowercase hex digits).
    pub l1_ca_sha256: Option<String>,
}

/// Validated `[paths]` (all absolute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Paths {
    /// Private key.
    pub key: PathBuf,
    /// Certificate.
    pub certificate: PathBuf,
    /// L2Sec CA bundle.
    pub ca: PathBuf,
    /// L1Sec CA.
    pub l1_ca: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Runtime directory.
    pub run_dir: PathBuf,
}

impl Paths {
    /// The instance lock file.
    pub fn lock_file(&self) -> PathBuf {
        self.run_dir.join("agent.lock")
    }

    /// The admin socket (`runos status`, `runos journal`, …; docs/cli.md).
    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir.join("admin.sock")
    }
}

/// Validated `[log]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    /// Verbosity.
    pub level: LogLevel,
    /// Format.
    pub format: LogFormat,
}

/// Validated `[agent]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSettings {
    /// Largest frame in either direction.
    pub max_frame_bytes: u32,
    /// Dispatcher queue capacity.
    pub queue_capacity: usize,
    /// Executors at a time.
    pub max_concurrency: usize,
    /// Shutdown grace.
    #[serde(serialize_with = "ser_secs")]
    pub shutdown_grace: Duration,
    /// First backoff step.
    #[serde(serialize_with = "ser_millis")]
    pub reconnect_initial: Duration,
    /// Backoff cap.
    #[serde(serialize_with = "ser_millis")]
    pub reconnect_max: Duration,
    /// Stable-session threshold.
    #[serde(serialize_with = "ser_secs")]
    pub stable_after: Duration,
    /// Bound on writing one frame to the control plane.
    #[serde(serialize_with = "ser_secs")]
    pub write_timeout: Duration,
    /// Which journal records are synced (see [`RawAgent::journal_sync`]).
    pub journal_sync: JournalSync,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn ser_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Longest host name accepted (DNS limit).
const MAX_HOST_LEN: usize = 253;

impl RawConfig {
    /// Parse TOML text. Pure: no I/O. `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Check every value and resolve the configuration.
    pub fn validate(&self, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };

        let host = match &self.server.host {
            None => None,
            Some(h) => {
                validate_host(h).map_err(|m| invalid("server.host", m))?;
                Some(h.clone())
            }
        };
        if self.server.l1_port == 0 {
            return Err(invalid(
                "server.l1_port",
                "must be between 1 and 65535".into(),
            ));
        }
        if self.server.l2_port == 0 {
            return Err(invalid(
                "server.l2_port",
                "must be between 1 and 65535".into(),
            ));
        }
        let pin = match &self.server.l1_ca_sha256 {
            None => None,
            Some(p) => Some(runos_transport::pem::normalize_pin(p).ok_or_else(|| {
                invalid(
                    "server.l1_ca_sha256",
                    "must be the sha256 of the CA certificate's DER encoding: 64 hex digits, \
                     optionally prefixed by `sha256:`"
                        .into(),
                )
            })?),
        };

        let abs = |key: &'static str, p: &PathBuf| -> Result<PathBuf, ConfigError> {
            if p.is_absolute() {
                Ok(p.clone())
            } else {
                Err(invalid(
                    key,
                    format!(
                        "must be an absolute path, got {:?}",
                        p.display().to_string()
                    ),
                ))
            }
        };
        let paths = Paths {
            key: abs("paths.key", &self.paths.key)?,
            certificate: abs("paths.certificate", &self.paths.certificate)?,
            ca: abs("paths.ca", &self.paths.ca)?,
            l1_ca: abs("paths.l1_ca", &self.paths.l1_ca)?,
            state_dir: abs("paths.state_dir", &self.paths.state_dir)?,
            run_dir: abs("paths.run_dir", &self.paths.run_dir)?,
        };

        let a = &self.agent;
        let range = |key: &'static str, v: u64, lo: u64, hi: u64| check_range(path, key, v, lo, hi);
        range(
            "agent.max_frame_bytes",
            u64::from(a.max_frame_bytes),
            u64::from(runos_protocol::MIN_MAX_FRAME_BYTES),
            256 * 1024 * 1024,
        )?;
        range("agent.queue_capacity", a.queue_capacity as u64, 1, 65_536)?;
        range("agent.max_concurrency", a.max_concurrency as u64, 1, 1024)?;
        range("agent.shutdown_grace_secs", a.shutdown_grace_secs, 0, 3600)?;
        range(
            "agent.reconnect_initial_ms",
            a.reconnect_initial_ms,
            10,
            600_000,
        )?;
        range(
            "agent.reconnect_max_ms",
            a.reconnect_max_ms,
            a.reconnect_initial_ms,
            3_600_000,
        )?;
        range("agent.stable_after_secs", a.stable_after_secs, 1, 86_400)?;
        range("agent.write_timeout_secs", a.write_timeout_secs, 1, 3600)?;
        let journal_sync = match (a.journal_sync, a.journal_fsync) {
            (None, true) => JournalSync::Needed,
            (None, false) | (Some(JournalSync::Never), _) => JournalSync::Never,
            (Some(s), true) => s,
            (Some(_), false) => {
                return Err(invalid(
                    "agent.journal_fsync",
                    "false means journal_sync = \"never\", which contradicts agent.journal_sync; keep only journal_sync".into(),
                ));
            }
        };
        let update = self.update.validate(path)?;
        let wireguard = self.wireguard.validate(path)?;
        self.etcd
            .validate()
            .map_err(|e| invalid(e.key, e.message))?;
        let uninstall = self.uninstall.validate(path)?;
        self.kubernetes
            .validate()
            .map_err(|e| invalid(e.key, e.message))?;
        let tools = validate_tools(&self.tools).map_err(|m| invalid("tools", m))?;
        let cgroup = match self.runner.cgroup_root.as_str() {
            "auto" => CgroupMode::Auto,
            "off" => CgroupMode::Off,
            p if Path::new(p).is_absolute() && !p.contains('\0') => CgroupMode::At(p.into()),
            p => {
                return Err(invalid(
                    "runner.cgroup_root",
                    format!("must be \"auto\", \"off\" or an absolute path, got {p:?}"),
                ));
            }
        };

        Ok(Config {
            server: ServerConfig {
                host,
                l1_port: self.server.l1_port,
                l2_port: self.server.l2_port,
                l1_ca_sha256: pin,
            },
            paths,
            log: LogConfig {
                level: self.log.level,
                format: self.log.format,
            },
            agent: AgentSettings {
                max_frame_bytes: a.max_frame_bytes,
                queue_capacity: a.queue_capacity,
                max_concurrency: a.max_concurrency,
                shutdown_grace: Duration::from_secs(a.shutdown_grace_secs),
                reconnect_initial: Duration::from_millis(a.reconnect_initial_ms),
                reconnect_max: Duration::from_millis(a.reconnect_max_ms),
                stable_after: Duration::from_secs(a.stable_after_secs),
                write_timeout: Duration::from_secs(a.write_timeout_secs),
                journal_sync,
            },
            update,
            tools,
            runner: RunnerSettings { cgroup },
            wireguard,
            etcd: self.etcd.clone(),
            uninstall,
            kubernetes: self.kubernetes.clone(),
        })
    }
}

/// `[tools]`: bare names to absolute paths (the runner's own check), at most [`MAX_TOOLS`]. The
/// files need not exist yet: the agent warns at start about those that do not
/// (`exec::runner_config`).
fn validate_tools(raw: &BTreeMap<String, PathBuf>) -> Result<Tools, String> {
    if raw.len() > MAX_TOOLS {
        return Err(format!("has {} entries; at most {MAX_TOOLS}", raw.len()));
    }
    let mut tools = Tools::new();
    for (name, path) in raw {
        if name.len() > 255 || path.as_os_str().len() > 4096 {
            return Err(format!("{name:?}: the name or the path is too long"));
        }
        if path.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(format!("{name:?}: the path holds a NUL"));
        }
        tools
            .set(name, path.clone())
            .map_err(|e| format!("{name:?}: {e}, got {:?}", path.display().to_string()))?;
    }
    Ok(tools)
}

/// `v` must lie in `lo..=hi`; the error names `key` and the bounds.
fn check_range(
    path: &Path,
    key: &'static str,
    v: u64,
    lo: u64,
    hi: u64,
) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message: format!("must be between {lo} and {hi}, got {v}"),
        })
    } else {
        Ok(())
    }
}

impl RawUpdate {
    fn validate(&self, path: &Path) -> Result<UpdateSettings, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        // The policy constructor is the one check of repository and workflow syntax.
        runos_attest::Policy::new(&self.repo, &self.workflow, "refs/tags/v0.0.0", "runos")
            .map_err(|e| match e {
                runos_attest::PolicyError::Workflow(_) => invalid("update.workflow", e.to_string()),
                _ => invalid("update.repo", e.to_string()),
            })?;
        let https_url = |key: &'static str, b: &str| -> Result<String, ConfigError> {
            let b = b.trim_end_matches('/');
            let rest = b
                .strip_prefix("https://")
                .ok_or_else(|| invalid(key, format!("must be an https:// URL, got {b:?}")))?;
            if rest.is_empty()
                || b.len() > 2048
                || b.chars().any(|c| c.is_whitespace() || c.is_control())
                || rest.contains(['?', '#'])
            {
                return Err(invalid(
                    key,
                    "must be an https:// URL without spaces, query or fragment".into(),
                ));
            }
            Ok(b.to_string())
        };
        let release_base = match &self.release_base {
            None => format!("https://github.com/{}/releases", self.repo),
            Some(b) => https_url("update.release_base", b)?,
        };
        let attestations_api = match self.attestations_api.as_str() {
            "" => None,
            b => Some(https_url("update.attestations_api", b)?),
        };
        let abs = |key: &'static str, p: &PathBuf| -> Result<PathBuf, ConfigError> {
            if p.is_absolute() {
                Ok(p.clone())
            } else {
                Err(invalid(
                    key,
                    format!(
                        "must be an absolute path, got {:?}",
                        p.display().to_string()
                    ),
                ))
            }
        };
        let range = |key: &'static str, v: u64, lo: u64, hi: u64| check_range(path, key, v, lo, hi);
        range(
            "update.max_download_bytes",
            self.max_download_bytes,
            1024 * 1024,
            4 * 1024 * 1024 * 1024,
        )?;
        range(
            "update.connect_timeout_secs",
            self.connect_timeout_secs,
            1,
            300,
        )?;
        range(
            "update.download_timeout_secs",
            self.download_timeout_secs,
            1,
            86_400,
        )?;
        range(
            "update.health_timeout_secs",
            self.health_timeout_secs,
            1,
            3600,
        )?;
        let argv = |key: &'static str, v: &Vec<String>| -> Result<Vec<String>, ConfigError> {
            if v.is_empty()
                || v.len() > 64
                || v.iter().any(|a| a.contains('\0') || a.len() > 4096)
                || v[0].is_empty()
            {
                Err(invalid(
                    key,
                    "must be an argv array of 1 to 64 non-empty strings without NUL".into(),
                ))
            } else {
                Ok(v.clone())
            }
        };
        Ok(UpdateSettings {
            repo: self.repo.clone(),
            workflow: self.workflow.clone(),
            trusted_root: self
                .trusted_root
                .as_ref()
                .map(|p| abs("update.trusted_root", p))
                .transpose()?,
            release_base,
            attestations_api,
            release_ca_file: self
                .release_ca_file
                .as_ref()
                .map(|p| abs("update.release_ca_file", p))
                .transpose()?,
            install_dir: abs("update.install_dir", &self.install_dir)?,
            bin_link: abs("update.bin_link", &self.bin_link)?,
            max_download_bytes: self.max_download_bytes,
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            download_timeout: Duration::from_secs(self.download_timeout_secs),
            health_timeout: Duration::from_secs(self.health_timeout_secs),
            restart_command: argv("update.restart_command", &self.restart_command)?,
            service_restart_command: argv(
                "update.service_restart_command",
                &self.service_restart_command,
            )?,
            auto: self.auto,
        })
    }
}

/// Check a control-plane host name or IP literal.
pub fn validate_host(h: &str) -> Result<(), String> {
    if h.is_empty() {
        return Err("must not be empty".into());
    }
    if h.len() > MAX_HOST_LEN {
        return Err(format!("must be at most {MAX_HOST_LEN} characters"));
    }
    if h.contains(':') && h.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!(
            "{h:?} is not a host name or IP address (give the port separately)"
        ));
    }
    if runos_transport::tls::server_name(h).is_err() {
        return Err(format!("{h:?} is not a valid DNS name or IP address"));
    }
    Ok(())
}

/// Read and validate the configuration at `path`. A missing file is "all defaults"; reading
/// never creates anything. Returns whether the file existed.
pub fn load(path: &Path) -> Result<(Config, bool), ConfigError> {
    match read_text(path)? {
        None => Ok((RawConfig::default().validate(path)?, false)),
        Some(text) => Ok((RawConfig::parse(&text, path)?.validate(path)?, true)),
    }
}

fn read_text(path: &Path) -> Result<Option<String>, ConfigError> {
    match fsutil::read_capped(path, MAX_CONFIG_BYTES) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| ConfigError::Parse {
                path: path.to_path_buf(),
                message: "the file is not UTF-8 text".into(),
            }),
        Err(fsutil::ReadError::NotFound) => Ok(None),
        Err(fsutil::ReadError::TooLarge) => Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
        }),
        Err(fsutil::ReadError::Io(source)) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Rewrite `[server] host/l1_port/l2_port` (and `l1_ca_sha256` when a pin is given) in the
/// configuration at `path`, preserving every
/// other line and comment. Creates the file (mode 0600) when absent; keeps the mode of an
/// existing file; the write is atomic. The result is validated before it is written.
pub fn update_server(
    path: &Path,
    host: &str,
    l1_port: u16,
    l2_port: u16,
    l1_ca_sha256: Option<&str>,
) -> Result<(), ConfigError> {
    let existing = read_text(path)?;
    let text = edit_server(
        existing.as_deref().unwrap_or(""),
        host,
        l1_port,
        l2_port,
        l1_ca_sha256,
    )
    .map_err(|message| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    })?;
    // Never write a file the agent would then refuse to start with.
    RawConfig::parse(&text, path)?.validate(path)?;
    if let Some(dir) = path.parent() {
        fsutil::ensure_dir(dir, 0o700)?;
    }
    fsutil::write_atomic(path, text.as_bytes(), fsutil::Mode::KeepOr(0o600))?;
    Ok(())
}

/// Pure part of [`update_server`]: edit TOML text. `l1_ca_sha256`, when given, replaces
/// `server.l1_ca_sha256`; when `None` that key is left as it is.
pub fn edit_server(
    text: &str,
    host: &str,
    l1_port: u16,
    l2_port: u16,
    l1_ca_sha256: Option<&str>,
) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| e.to_string().trim_end().to_string())?;
    let server = doc
        .entry("server")
        .or_insert_with(toml_edit::table)
        .as_table_mut()
        .ok_or_else(|| "`server` is not a table".to_string())?;
    server["host"] = toml_edit::value(host);
    server["l1_port"] = toml_edit::value(i64::from(l1_port));
    server["l2_port"] = toml_edit::value(i64::from(l2_port));
    if let Some(pin) = l1_ca_sha256 {
        server["l1_ca_sha256"] = toml_edit::value(pin);
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/runos/config.toml")
    }

    fn parse_validate(s: &str) -> Result<Config, ConfigError> {
        RawConfig::parse(s, p())?.validate(p())
    }

    #[test]
    fn empty_is_all_defaults() {
        let c = parse_validate("").unwrap();
        assert_eq!(c.server.host, None);
        assert_eq!(c.server.l1_port, 9191);
        assert_eq!(c.server.l2_port, 9192);
        assert_eq!(c.paths.key, PathBuf::from("/etc/runos/node.key"));
        assert_eq!(c.paths.lock_file(), PathBuf::from("/run/runos/agent.lock"));
        assert_eq!(c.log.level, LogLevel::Info);
        assert_eq!(c.agent.queue_capacity, 256);
        assert_eq!(c.agent.max_concurrency, 16);
        assert_eq!(c.agent.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.agent.reconnect_max, Duration::from_secs(60));
        assert_eq!(c.agent.max_frame_bytes, 16 * 1024 * 1024);
        assert_eq!(c.agent.journal_sync, JournalSync::Needed);
    }

    #[test]
    fn full_example_parses() {
        let c = parse_validate(
            r#"
[server]
host = "cp.example.com"
l1_port = 19191
l2_port = 19192
l1_ca_sha256 = "sha256:ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB"

[paths]
key = "/k"
certificate = "/c"
ca = "/ca"
l1_ca = "/l1"
state_dir = "/s"
run_dir = "/r"

[log]
level = "debug"
format = "json"

[agent]
max_frame_bytes = 1048576
queue_capacity = 8
max_concurrency = 2
shutdown_grace_secs = 3
reconnect_initial_ms = 100
reconnect_max_ms = 1000
stable_after_secs = 5
journal_fsync = false
"#,
        )
        .unwrap();
        assert_eq!(c.server.host.as_deref(), Some("cp.example.com"));
        assert_eq!(c.server.l1_ca_sha256, Some("ab".repeat(32)));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.agent.reconnect_initial, Duration::from_millis(100));
        assert_eq!(c.agent.journal_sync, JournalSync::Never);
    }

    #[test]
    fn journal_sync_values_and_the_older_key() {
        for (text, want) in [
            ("journal_sync = \"needed\"", JournalSync::Needed),
            ("journal_sync = \"always\"", JournalSync::Always),
            ("journal_sync = \"never\"", JournalSync::Never),
            ("journal_fsync = true", JournalSync::Needed),
            ("journal_fsync = false", JournalSync::Never),
            (
                "journal_sync = \"never\"\njournal_fsync = false",
                JournalSync::Never,
            ),
        ] {
            let c = parse_validate(&format!("[agent]\n{text}\n")).unwrap();
            assert_eq!(c.agent.journal_sync, want, "{text}");
        }
        let e = parse_validate("[agent]\njournal_sync = \"sometimes\"\n").unwrap_err();
        assert!(e.to_string().contains("journal_sync"), "{e}");
        let e = parse_validate("[agent]\njournal_sync = \"always\"\njournal_fsync = false\n")
            .unwrap_err();
        assert!(e.to_string().contains("journal_fsync"), "{e}");
    }

    #[test]
    fn kubernetes_section() {
        let c = parse_validate("").unwrap();
        assert_eq!(c.kubernetes, runos_kubeadm::KubeSettings::default());
        let c = parse_validate(
            "[kubernetes]\nnode_name = \"node-1\"\ntoken_ttl_secs = 3600\nkubeadm = \"/opt/bin/kubeadm\"\n",
        )
        .unwrap();
        assert_eq!(c.kubernetes.node_name, "node-1");
        assert_eq!(c.kubernetes.token_ttl_secs, 3600);
        for (toml, key) in [
            (
                "[kubernetes]\ntoken_ttl_secs = 100000\n",
                "kubernetes.token_ttl_secs",
            ),
            (
                "[kubernetes]\nkubeconfig = \"kubelet.conf\"\n",
                "kubernetes.kubeconfig",
            ),
            (
                "[kubernetes]\nhelm_base_url = \"http://example.com\"\n",
                "kubernetes.helm_base_url",
            ),
        ] {
            let e = parse_validate(toml).unwrap_err();
            assert_eq!(e.key(), Some(key), "{toml}: {e}");
        }
        assert!(parse_validate("[kubernetes]\nnope = 1\n").is_err());
    }

    #[test]
    fn etcd_section() {
        let c = parse_validate("").unwrap();
        assert_eq!(c.etcd, runos_etcd::Settings::default());
        let c = parse_validate(
            "[etcd]\nendpoints = [\"https://10.0.0.1:2379\", \"http://127.0.0.1:2379\"]\nverify_wait_secs = 5\n",
        )
        .unwrap();
        assert_eq!(c.etcd.endpoints.len(), 2);
        assert_eq!(c.etcd.verify_wait_secs, 5);
        for (toml, key) in [
            ("[etcd]\nendpoints = []\n", "etcd.endpoints"),
            (
                "[etcd]\nendpoints = [\"10.0.0.1:2379\"]\n",
                "etcd.endpoints",
            ),
            ("[etcd]\nca = \"ca.crt\"\n", "etcd.ca"),
            (
                "[etcd]\nrequest_timeout_ms = 0\n",
                "etcd.request_timeout_ms",
            ),
        ] {
            let e = parse_validate(toml).unwrap_err();
            assert_eq!(e.key(), Some(key), "{toml}: {e}");
        }
        assert!(parse_validate("[etcd]\nendpoint = \"x\"\n").is_err());
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = parse_validate("[server]\nhots = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("hots"), "{e}");
        let e = parse_validate("[nope]\n").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn wrong_types_are_errors() {
        let e = parse_validate("[agent]\nqueue_capacity = \"many\"\n").unwrap_err();
        assert!(e.to_string().contains("queue_capacity"), "{e}");
        let e = parse_validate("[server]\nl1_port = 70000\n").unwrap_err();
        assert!(e.to_string().contains("l1_port"), "{e}");
        let e = parse_validate("[log]\nlevel = \"loud\"\n").unwrap_err();
        assert!(e.to_string().contains("level"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        for (toml, key) in [
            ("[server]\nl1_port = 0\n", "server.l1_port"),
            ("[server]\nl2_port = 0\n", "server.l2_port"),
            ("[server]\nhost = \"\"\n", "server.host"),
            ("[server]\nhost = \"cp.example.com:9192\"\n", "server.host"),
            ("[server]\nl1_ca_sha256 = \"abc\"\n", "server.l1_ca_sha256"),
            ("[paths]\nkey = \"relative/key\"\n", "paths.key"),
            ("[paths]\nrun_dir = \"run\"\n", "paths.run_dir"),
            ("[agent]\nqueue_capacity = 0\n", "agent.queue_capacity"),
            ("[agent]\nmax_concurrency = 0\n", "agent.max_concurrency"),
            ("[agent]\nmax_frame_bytes = 10\n", "agent.max_frame_bytes"),
            (
                "[agent]\nreconnect_initial_ms = 5000\nreconnect_max_ms = 1000\n",
                "agent.reconnect_max_ms",
            ),
            (
                "[agent]\nstable_after_secs = 0\n",
                "agent.stable_after_secs",
            ),
            (
                "[agent]\nshutdown_grace_secs = 99999\n",
                "agent.shutdown_grace_secs",
            ),
        ] {
            let e = parse_validate(toml).unwrap_err();
            assert_eq!(e.key(), Some(key), "{toml}: {e}");
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn update_section() {
        let c = parse_validate("").unwrap();
        assert_eq!(c.update.repo, "runos-dev/runos");
        assert_eq!(c.update.workflow, ".github/workflows/release.yml");
        assert_eq!(
            c.update.release_base,
            "https://github.com/runos-dev/runos/releases"
        );
        assert_eq!(c.update.install_dir, PathBuf::from("/usr/local/lib/runos"));
        assert_eq!(c.update.bin_link, PathBuf::from("/usr/local/bin/runos"));
        assert_eq!(c.update.max_download_bytes, 256 * 1024 * 1024);
        assert_eq!(c.update.health_timeout, Duration::from_secs(120));
        assert!(!c.update.auto);
        let c = parse_validate(
            "[update]\nrepo = \"me/fork\"\nrelease_base = \"https://mirror.example/r/\"\nauto = true\n",
        )
        .unwrap();
        assert_eq!(c.update.release_base, "https://mirror.example/r");
        assert_eq!(
            parse_validate("")
                .unwrap()
                .update
                .attestations_api
                .as_deref(),
            Some("https://api.github.com")
        );
        assert_eq!(
            parse_validate("[update]\nattestations_api = \"\"\n")
                .unwrap()
                .update
                .attestations_api,
            None
        );
        assert!(c.update.auto);
        for (toml, key) in [
            ("[update]\nrepo = \"nope\"\n", "update.repo"),
            ("[update]\nworkflow = \"release.yml\"\n", "update.workflow"),
            (
                "[update]\nrelease_base = \"http://x\"\n",
                "update.release_base",
            ),
            (
                "[update]\nattestations_api = \"http://api\"\n",
                "update.attestations_api",
            ),
            (
                "[update]\nrelease_base = \"https://x y\"\n",
                "update.release_base",
            ),
            ("[update]\ninstall_dir = \"lib\"\n", "update.install_dir"),
            (
                "[update]\ntrusted_root = \"root.json\"\n",
                "update.trusted_root",
            ),
            (
                "[update]\nmax_download_bytes = 5\n",
                "update.max_download_bytes",
            ),
            (
                "[update]\nhealth_timeout_secs = 0\n",
                "update.health_timeout_secs",
            ),
            ("[update]\nrestart_command = []\n", "update.restart_command"),
        ] {
            let e = parse_validate(toml).unwrap_err();
            assert_eq!(e.key(), Some(key), "{toml}: {e}");
        }
    }

    #[test]
    fn tools_map_bare_names_to_absolute_paths() {
        let c = parse_validate(
            "[tools]\nkubectl = \"/usr/local/bin/kubectl\"\n\"wg-quick\" = \"/opt/wg/wg-quick\"\n",
        )
        .unwrap();
        assert_eq!(
            c.tools.get("kubectl"),
            Some(Path::new("/usr/local/bin/kubectl"))
        );
        assert_eq!(c.tools.get("wg-quick"), Some(Path::new("/opt/wg/wg-quick")));
        assert_eq!(c.tools.get("helm"), None);
        // The files need not exist when the configuration is read.
        assert!(parse_validate("[tools]\nhelm = \"/nonexistent/helm\"\n").is_ok());
        assert_eq!(parse_validate("").unwrap().tools, Tools::new());
        for (toml, says) in [
            ("[tools]\nkubectl = \"bin/kubectl\"\n", "absolute"),
            ("[tools]\nkubectl = \"kubectl\"\n", "absolute"),
            (
                "[tools]\n\"usr/bin/kubectl\" = \"/usr/bin/kubectl\"\n",
                "bare",
            ),
            ("[tools]\n\"..\" = \"/usr/bin/kubectl\"\n", "bare"),
            ("[tools]\n\"\" = \"/usr/bin/kubectl\"\n", "bare"),
            ("[tools]\nk = \"/usr/bin/k\\u0000\"\n", "NUL"),
        ] {
            let e = parse_validate(toml).unwrap_err();
            assert_eq!(e.key(), Some("tools"), "{toml}: {e}");
            assert!(e.to_string().contains(says), "{toml}: {e}");
        }
        let e = parse_validate("[tools]\nkubectl = 3\n").unwrap_err();
        assert!(e.to_string().contains("kubectl"), "{e}");
    }

    #[test]
    fn runner_cgroup_root() {
        assert_eq!(parse_validate("").unwrap().runner.cgroup, CgroupMode::Auto);
        let c = |v: &str| parse_validate(&format!("[runner]\ncgroup_root = \"{v}\"\n"));
        assert_eq!(c("off").unwrap().runner.cgroup, CgroupMode::Off);
        assert_eq!(
            c("/sys/fs/cgroup/runos.slice").unwrap().runner.cgroup,
            CgroupMode::At("/sys/fs/cgroup/runos.slice".into())
        );
        for bad in ["", "on", "sys/fs/cgroup"] {
            assert_eq!(
                c(bad).unwrap_err().key(),
                Some("runner.cgroup_root"),
                "{bad}"
            );
        }
        assert!(parse_validate("[runner]\ngrace = 1\n").is_err());
    }

    #[test]
    fn ip_hosts_are_accepted() {
        assert!(parse_validate("[server]\nhost = \"127.0.0.1\"\n").is_ok());
        assert!(parse_validate("[server]\nhost = \"::1\"\n").is_ok());
    }

    #[test]
    fn edit_server_preserves_comments_and_other_keys() {
        let before = "# my agent\n[log]\nlevel = \"debug\" # chatty\n\n[server]\n# the CP\nhost = \"old\"\nl1_ca_sha256 = \"x\"\n";
        let after = edit_server(before, "new.example.com", 1, 2, None).unwrap();
        assert!(after.contains("# my agent"));
        assert!(after.contains("level = \"debug\" # chatty"));
        assert!(after.contains("# the CP"));
        assert!(after.contains("host = \"new.example.com\""));
        assert!(after.contains("l1_ca_sha256 = \"x\""));
        assert!(after.contains("l1_port = 1"));
        assert!(after.contains("l2_port = 2"));

        let fresh = edit_server("", "h", 9191, 9192, None).unwrap();
        let c = parse_validate(&fresh).unwrap();
        assert_eq!(c.server.host.as_deref(), Some("h"));
    }

    #[test]
    fn load_missing_file_is_defaults_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope/config.toml");
        let (c, existed) = load(&path).unwrap();
        assert!(!existed);
        assert_eq!(c.server.host, None);
        assert!(!path.exists());
        assert!(!dir.path().join("nope").exists());
    }

    #[test]
    fn update_server_creates_0600_and_keeps_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/config.toml");
        update_server(&path, "cp", 1, 2, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        update_server(&path, "cp2", 3, 4, Some(&"cd".repeat(32))).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let (c, _) = load(&path).unwrap();
        assert_eq!(c.server.host.as_deref(), Some("cp2"));
        assert_eq!(c.server.l2_port, 4);
        assert_eq!(c.server.l1_ca_sha256, Some("cd".repeat(32)));
    }
}
