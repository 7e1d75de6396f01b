//! The overlay: the node's WireGuard interface and its peers (`SET_VPN_PEERS`), declarative,
//! persisted and fail-static.
//!
//! - **The node's key is made here**, on first use: 32 random bytes (clamped), in
//!   `<state>/private.key` (0600, base64), never sent anywhere; the public key is what
//!   `NODE_VPN_PEER` reports.
//! - **Declarative, compatibly.** A `SET_VPN_PEERS` without the runos fields adds or updates
//!   peers, as the Go agent did. With `generation`, an older set is refused (`stale`) and an
//!   equal one changes nothing the set says (it re-checks the device, like a reconcile); with
//!   `complete: true` the payload is the whole set and peers not in it are removed.
//! - **Only what differs changes** ([`plan`]): unchanged peers are not touched, so their
//!   handshakes and traffic go on.
//! - **Persisted before applied.** An accepted set is written atomically to
//!   `<state>/peers.json` before the device is changed: a crash half-way is finished by the next
//!   reconcile, and a failed apply is retried by it (the reply says it failed). At start the
//!   agent restores the interface and peers from this file before any control plane answers.
//! - **Fail-static.** Losing the control plane never removes a peer; the reconcile loop
//!   ([`Overlay::reconcile`]) repairs drift (the interface deleted or recreated, a peer removed
//!   by hand) and logs what it repaired.
//! - **A control-path guard** ([`guard`]) refuses sets that would route the control channel into
//!   the tunnel.
//!
//! The device side is behind [`System`]: [`device::HostSystem`] for the host (wireguard-control
//! and rtnetlink), a fake in the tests of this module.

pub mod device;
pub mod guard;
pub mod plan;
pub mod vip;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use base64::Engine as _;
use runos_protocol::instructions::{DEFAULT_WIREGUARD_PORT, NodeVpnPeer, SetVpnPeers, VpnPeer};
use runos_protocol::{ErrorCode, ErrorPayload};
use serde::{Deserialize, Serialize};

use crate::Ctx;
use crate::handle::{BoxFuture, write_atomic};
use plan::{Have, Plan, Want};

/// Which WireGuard implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The kernel if it has WireGuard, else userspace (a running userspace device wins).
    #[default]
    Auto,
    /// Kernel WireGuard over netlink.
    Kernel,
    /// A userspace implementation (wireguard-go, boringtun) over its UAPI socket.
    Userspace,
}

/// The backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Kernel WireGuard.
    Kernel,
    /// Userspace WireGuard.
    Userspace,
}

/// The overlay's configuration (the agent's `[wireguard]` section).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The interface (default `wg0`).
    pub interface: String,
    /// The backend.
    pub backend: BackendChoice,
    /// The UDP port WireGuard listens on.
    pub listen_port: u16,
    /// The interface's MTU (`None`: leave it).
    pub mtu: Option<u32>,
    /// Persistent keepalive for peers without `keepaliveSecs` (0: none).
    pub keepalive_secs: u16,
    /// This node's overlay address and prefix, added to the interface (`None`: whatever the
    /// interface has).
    pub address: Option<(IpAddr, u8)>,
    /// This node's underlay address, as reported in `NODE_VPN_PEER` (`None`: the address the
    /// host uses towards the control plane).
    pub endpoint_ip: Option<IpAddr>,
    /// The userspace implementation's argv; the interface name is appended.
    pub userspace_command: Vec<String>,
    /// How often the reconcile loop checks the device.
    pub reconcile_interval: Duration,
    /// The overlay's state directory (key, applied set, userspace log, VIP fence).
    pub state_dir: PathBuf,
    /// The VIP for a `VIP_ASSIGN` without `address`.
    pub vip: Option<(IpAddr, u8)>,
    /// The local service that must answer before the node takes the VIP (`IP:port`).
    pub vip_check: Option<SocketAddr>,
}

impl Settings {
    /// The defaults, with state in `state_dir`.
    pub fn new(state_dir: PathBuf) -> Settings {
        Settings {
            interface: "wg0".into(),
            backend: BackendChoice::Auto,
            listen_port: DEFAULT_WIREGUARD_PORT,
            mtu: Some(1420),
            keepalive_secs: 25,
            address: None,
            endpoint_ip: None,
            userspace_command: vec!["wireguard-go".into(), "-f".into()],
            reconcile_interval: Duration::from_secs(30),
            state_dir,
            vip: None,
            vip_check: None,
        }
    }
}

/// What the device side needs to make the interface as configured.
#[derive(Clone)]
pub struct Spec {
    /// The interface.
    pub interface: String,
    /// The backend choice.
    pub backend: BackendChoice,
    /// The listen port.
    pub listen_port: u16,
    /// The MTU.
    pub mtu: Option<u32>,
    /// The overlay address.
    pub address: Option<(IpAddr, u8)>,
    /// The node's private key.
    pub private_key: [u8; 32],
    /// The userspace implementation.
    pub userspace_command: Vec<String>,
    /// Where the userspace log goes.
    pub state_dir: PathBuf,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Spec")
            .field("interface", &self.interface)
            .field("backend", &self.backend)
            .field("listen_port", &self.listen_port)
            .field("mtu", &self.mtu)
            .field("address", &self.address)
            .field("userspace_command", &self.userspace_command)
            .finish_non_exhaustive()
    }
}

/// A device as read: its key, port and peers (with received and sent bytes).
#[derive(Debug, Clone, Default)]
pub struct DeviceView {
    /// Its public key, when the backend reports it.
    pub public_key: Option<[u8; 32]>,
    /// Its listen port.
    pub listen_port: Option<u16>,
    /// Its peers, with (rx, tx) bytes.
    pub peers: Vec<(Have, (u64, u64))>,
}

/// A change to a device.
#[derive(Clone, Default)]
pub struct Update {
    /// Set the private key.
    pub private_key: Option<[u8; 32]>,
    /// Set the listen port.
    pub listen_port: Option<u16>,
    /// Peers to add or update (allowed IPs replaced).
    pub upsert: Vec<Want>,
    /// Peers to remove.
    pub remove: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Update {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Update")
            .field("private_key", &self.private_key.map(|_| "(set)"))
            .field("listen_port", &self.listen_port)
            .field("upsert", &self.upsert.len())
            .field("remove", &self.remove.len())
            .finish()
    }
}

/// The host's addresses: the overlay interface's, and every other non-loopback one.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    /// On the overlay interface, with prefix.
    pub overlay: Vec<(IpAddr, u8)>,
    /// On every other interface.
    pub underlay: Vec<IpAddr>,
}

/// The device side.
pub trait System: Send + Sync + 'static {
    /// Make the interface exist, with the key, port, MTU, up, and address; what it had to
    /// repair, in words.
    fn ensure(&self, spec: Arc<Spec>) -> BoxFuture<io::Result<Vec<String>>>;
    /// Read the device.
    fn device(&self, spec: Arc<Spec>) -> BoxFuture<io::Result<(Kind, DeviceView)>>;
    /// Change the device.
    fn apply(&self, spec: Arc<Spec>, kind: Kind, update: Update) -> BoxFuture<io::Result<()>>;
    /// The host's addresses.
    fn addresses(&self, interface: String) -> BoxFuture<io::Result<Addresses>>;
    /// Add `ip/prefix` to `interface` (present already: fine).
    fn add_address(&self, interface: String, ip: IpAddr, prefix: u8) -> BoxFuture<io::Result<()>>;
    /// Remove `ip/prefix` from `interface` (absent, or no interface: fine).
    fn del_address(&self, interface: String, ip: IpAddr, prefix: u8) -> BoxFuture<io::Result<()>>;
    /// Delete `interface` (a userspace daemon serving it exits with it); `false` when there was
    /// none.
    fn remove(&self, interface: String) -> BoxFuture<io::Result<bool>>;
}

/// The control plane's addresses as the session last connected to them (the session sets them;
/// the guard reads them). Knows no TLS: addresses only.
#[derive(Debug, Default)]
pub struct ControlPaths(Mutex<Vec<IpAddr>>, Mutex<Option<Instant>>);

impl ControlPaths {
    /// The control plane was heard from (the session calls it at WELCOME and for each answered
    /// heartbeat): what a VIP lease counts from.
    pub fn contact(&self) {
        *self.1.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// When the control plane was last heard from.
    pub fn last_contact(&self) -> Option<Instant> {
        *self.1.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record that the control plane was reached at `ip`.
    pub fn connected(&self, ip: IpAddr) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !v.contains(&ip) {
            v.push(ip);
            // A control plane behind a few addresses: keep the last 8.
            if v.len() > 8 {
                v.remove(0);
            }
        }
    }

    /// The addresses known.
    pub fn get(&self) -> Vec<IpAddr> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The applied set, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    /// File format version.
    pub version: u32,
    /// The newest generation applied.
    pub generation: Option<i64>,
    /// Whether the set is complete (peers not in it are removed from the device).
    pub complete: bool,
    /// The desired peers.
    pub peers: Vec<VpnPeer>,
}

const APPLIED_FILE: &str = "peers.json";
const KEY_FILE: &str = "private.key";
/// Largest `peers.json` read back (4096 peers of about 200 bytes fit many times over).
const MAX_APPLIED_BYTES: u64 = 16 << 20;

/// What `runos vpn status` shows of the overlay.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The interface.
    pub interface: String,
    /// The backend in use (absent when the device cannot be read).
    pub backend: Option<Kind>,
    /// This node's public key.
    pub public_key: String,
    /// The applied generation.
    pub generation: Option<i64>,
    /// Whether the applied set is complete.
    pub complete: bool,
    /// The peers on the device.
    pub peers: Vec<PeerStatus>,
    /// Why the device could not be read.
    pub error: Option<String>,
    /// The VIP fence and what is held.
    pub vip: Option<vip::VipState>,
}

/// The overlay in one line (`runos status`): the saved state only, no device read.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The interface.
    pub interface: String,
    /// Whether a peer set was ever applied.
    pub managed: bool,
    /// The applied generation.
    pub generation: Option<i64>,
    /// Peers in the applied set.
    pub peers: usize,
    /// The generation the VIP is held under, if this node holds it.
    pub vip_held: Option<i64>,
}

/// One peer in [`Status`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// Its public key.
    pub pub_key: String,
    /// Its endpoint.
    pub endpoint: Option<String>,
    /// Its allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Seconds since its last handshake (judged per backend).
    pub last_handshake_secs_ago: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// The overlay: one per agent, shared by `SET_VPN_PEERS`, the reconcile loop and status.
pub struct Overlay {
    settings: Settings,
    system: Arc<dyn System>,
    control: Arc<ControlPaths>,
    /// Serialises applies and reconciles; holds the applied set once loaded.
    inner: tokio::sync::Mutex<Option<Applied>>,
    /// Serialises VIP changes.
    vip_lock: tokio::sync::Mutex<()>,
    /// The private key, once read or made.
    key: std::sync::OnceLock<[u8; 32]>,
    /// A peer set was saved (wakes a reconcile loop that waits for the first one).
    peers_saved: tokio::sync::Notify,
    /// The VIP fence changed (wakes the lease watchdog).
    pub(crate) vip_changed: tokio::sync::Notify,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("interface", &self.settings.interface)
            .finish_non_exhaustive()
    }
}

fn failed(m: impl Into<String>) -> ErrorPayload {
    ErrorPayload::new(ErrorCode::Failed, m)
}

fn internal(m: impl Into<String>) -> ErrorPayload {
    ErrorPayload::new(ErrorCode::Internal, m)
}

fn b64(k: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

fn key_of(s: &str) -> Option<[u8; 32]> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()?
        .try_into()
        .ok()
}

/// The public key of a private one.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    wireguard_control::Key(*private).get_public().0
}

impl Overlay {
    /// An overlay over `system`, guarded with `control`.
    pub fn new(settings: Settings, system: Arc<dyn System>, control: Arc<ControlPaths>) -> Self {
        Overlay {
            settings,
            system,
            control,
            inner: tokio::sync::Mutex::new(None),
            vip_lock: tokio::sync::Mutex::new(()),
            key: std::sync::OnceLock::new(),
            peers_saved: tokio::sync::Notify::new(),
            vip_changed: tokio::sync::Notify::new(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn ensure_dir(&self) -> io::Result<&Path> {
        crate::handle::ensure_dir(&self.settings.state_dir)?;
        Ok(&self.settings.state_dir)
    }

    /// This node's private key, made on first use (0600), read from disk once.
    pub fn private_key(&self) -> io::Result<[u8; 32]> {
        if let Some(k) = self.key.get() {
            return Ok(*k);
        }
        let k = self.read_or_make_key()?;
        Ok(*self.key.get_or_init(|| k))
    }

    fn read_or_make_key(&self) -> io::Result<[u8; 32]> {
        let path = self.ensure_dir()?.join(KEY_FILE);
        let read = std::fs::File::open(&path).and_then(|f| {
            // A key is 45 bytes; anything much longer is not one.
            let mut text = String::new();
            io::Read::read_to_string(&mut io::Read::take(f, 1024), &mut text)?;
            Ok(text)
        });
        match read {
            Ok(text) => key_of(text.trim()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is not a WireGuard private key (44 characters of base64); remove it to make a new one",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let k = wireguard_control::Key::generate_private().0;
                let mut text = b64(&k);
                text.push('\n');
                write_atomic(&path, text.as_bytes(), 0o600)?;
                tracing::info!(
                    public_key = %b64(&public_key(&k)),
                    "made this node's WireGuard key"
                );
                Ok(k)
            }
            Err(e) => Err(e),
        }
    }

    /// This node's public key (base64), the key made if there is none yet.
    pub fn public_key_b64(&self) -> io::Result<String> {
        Ok(b64(&public_key(&self.private_key()?)))
    }

    fn spec(&self) -> io::Result<Arc<Spec>> {
        let s = &self.settings;
        Ok(Arc::new(Spec {
            interface: s.interface.clone(),
            backend: s.backend,
            listen_port: s.listen_port,
            mtu: s.mtu,
            address: s.address,
            private_key: self.private_key()?,
            userspace_command: s.userspace_command.clone(),
            state_dir: s.state_dir.clone(),
        }))
    }

    fn load(&self) -> io::Result<Option<Applied>> {
        let path = self.settings.state_dir.join(APPLIED_FILE);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut text = String::new();
        io::Read::read_to_string(&mut io::Read::take(f, MAX_APPLIED_BYTES), &mut text)?;
        let a: Applied = serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a saved peer set: {e}", path.display()),
            )
        })?;
        // The file is ours, but it is input: every peer is checked again.
        let check = SetVpnPeers {
            peers: a.peers.clone(),
            generation: a.generation,
            complete: a.complete,
        };
        runos_protocol::instructions::Instruction::validate(&check).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        Ok(Some(a))
    }

    fn save(&self, a: &Applied) -> io::Result<()> {
        let path = self.ensure_dir()?.join(APPLIED_FILE);
        let text = serde_json::to_vec_pretty(a).map_err(io::Error::other)?;
        write_atomic(&path, &text, 0o600)
    }

    fn wants(&self, peers: &[VpnPeer]) -> Result<Vec<Want>, ErrorPayload> {
        peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let bad = |f: &str| {
                    ErrorPayload::new(
                        ErrorCode::BadPayload,
                        format!("`peers[{i}].{f}` is invalid"),
                    )
                };
                let key = key_of(&p.pub_key).ok_or_else(|| bad("pubKey"))?;
                let ip: IpAddr = p.endpoint_ip.parse().map_err(|_| bad("endpointIp"))?;
                let allowed: IpAddr = p.vpn_ip.parse().map_err(|_| bad("vpnIp"))?;
                Ok(Want {
                    key,
                    endpoint: SocketAddr::new(
                        ip,
                        p.endpoint_port.unwrap_or(DEFAULT_WIREGUARD_PORT),
                    ),
                    allowed,
                    keepalive: p.keepalive_secs.unwrap_or(self.settings.keepalive_secs),
                })
            })
            .collect()
    }

    /// `SET_VPN_PEERS`.
    pub async fn set_vpn_peers(
        &self,
        ctx: &Ctx,
        req: SetVpnPeers,
    ) -> Result<NodeVpnPeer, ErrorPayload> {
        let mut guard = self.inner.lock().await;
        if guard.is_none() {
            *guard = self
                .load()
                .map_err(|e| internal(format!("cannot read the applied peer set: {e}")))?;
        }
        let prev = guard.clone().unwrap_or(Applied {
            version: 1,
            ..Applied::default()
        });
        if let (Some(g), Some(applied)) = (req.generation, prev.generation)
            && g < applied
        {
            return Err(ErrorPayload::new(
                ErrorCode::Stale,
                format!(
                    "generation {g} is older than generation {applied}, which this node applied; nothing was changed"
                ),
            ));
        }
        let same_generation = req.generation.is_some() && req.generation == prev.generation;
        if req.generation.is_none() && prev.generation.is_some() {
            tracing::warn!(
                applied = prev.generation,
                "SET_VPN_PEERS without a generation on a node whose set has one: peers only added or updated"
            );
        }
        let next = if same_generation {
            prev.clone()
        } else if req.complete {
            Applied {
                version: 1,
                generation: req.generation,
                complete: true,
                peers: req.peers.clone(),
            }
        } else {
            // Add or update: the new peers replace those with the same key or overlay address.
            let mut peers: Vec<VpnPeer> = prev
                .peers
                .iter()
                .filter(|p| {
                    !req.peers
                        .iter()
                        .any(|n| n.pub_key == p.pub_key || n.vpn_ip == p.vpn_ip)
                })
                .cloned()
                .collect();
            peers.extend(req.peers.iter().cloned());
            Applied {
                version: 1,
                generation: req.generation.or(prev.generation),
                complete: prev.complete,
                peers,
            }
        };
        let want = self.wants(&next.peers)?;
        let spec = self.spec().map_err(|e| {
            internal(format!(
                "cannot read or make this node's WireGuard key: {e}"
            ))
        })?;
        let own = public_key(&spec.private_key);
        if let Some(i) = want.iter().position(|w| w.key == own) {
            return Err(ErrorPayload::new(
                ErrorCode::BadPayload,
                format!("`peers[{i}].pubKey` is this node's own key"),
            ));
        }
        let addrs = self
            .system
            .addresses(self.settings.interface.clone())
            .await
            .map_err(|e| failed(format!("cannot read the host's addresses: {e}")))?;
        let mut overlay = addrs.overlay.clone();
        if let Some(a) = self.settings.address
            && !overlay.contains(&a)
        {
            overlay.push(a);
        }
        guard::check(&want, &self.control.get(), &addrs.underlay, &overlay)
            .map_err(|e| failed(format!("refused: {e}; nothing was changed")))?;
        if next != prev || guard.is_none() {
            self.save(&next)
                .map_err(|e| internal(format!("cannot save the peer set: {e}")))?;
            self.peers_saved.notify_one();
        }
        *guard = Some(next.clone());
        let previous: HashMap<[u8; 32], SocketAddr> = self
            .wants(&prev.peers)
            .unwrap_or_default()
            .into_iter()
            .map(|w| (w.key, w.endpoint))
            .collect();
        let repaired = self.system.ensure(spec.clone()).await.map_err(|e| {
            failed(format!(
                "cannot set up {}: {e}; the set is saved and the agent retries every {} s",
                self.settings.interface,
                self.settings.reconcile_interval.as_secs()
            ))
        })?;
        for r in &repaired {
            ctx.log(runos_protocol::control::LogLevel::Info, r);
        }
        let plan = self
            .converge(&spec, &want, &previous, next.complete)
            .await
            .map_err(|e| {
                failed(format!(
                    "cannot configure the peers of {}: {e}; the set is saved and the agent retries every {} s",
                    self.settings.interface,
                    self.settings.reconcile_interval.as_secs()
                ))
            })?;
        tracing::info!(
            generation = next.generation,
            added = plan.add.len(),
            changed = plan.change.len(),
            removed = plan.remove.len(),
            unchanged = plan.unchanged,
            "SET_VPN_PEERS applied to {}",
            self.settings.interface
        );
        Ok(NodeVpnPeer {
            node_peer: VpnPeer {
                pub_key: b64(&own),
                endpoint_ip: self
                    .endpoint_ip(&addrs)
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                vpn_ip: self
                    .settings
                    .address
                    .map(|a| a.0)
                    .or_else(|| addrs.overlay.first().map(|a| a.0))
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                endpoint_port: Some(self.settings.listen_port),
                keepalive_secs: None,
            },
            generation: next.generation,
            added: plan.add.iter().map(|w| b64(&w.key)).collect(),
            changed: plan.change.iter().map(|w| b64(&w.key)).collect(),
            removed: plan.remove.iter().map(b64).collect(),
            unchanged: plan.unchanged,
        })
    }

    /// This node's underlay address: configured, else the source address towards the control
    /// plane (a UDP socket's `connect` sends nothing), else the first underlay address.
    fn endpoint_ip(&self, addrs: &Addresses) -> Option<IpAddr> {
        if let Some(ip) = self.settings.endpoint_ip {
            return Some(ip);
        }
        for cp in self.control.get() {
            let bind: SocketAddr = if cp.is_ipv4() {
                "0.0.0.0:0".parse().ok()?
            } else {
                "[::]:0".parse().ok()?
            };
            if let Ok(s) = std::net::UdpSocket::bind(bind)
                && s.connect(SocketAddr::new(cp, 9)).is_ok()
                && let Ok(local) = s.local_addr()
                && !local.ip().is_unspecified()
            {
                return Some(local.ip());
            }
        }
        addrs.underlay.first().copied()
    }

    async fn converge(
        &self,
        spec: &Arc<Spec>,
        want: &[Want],
        previous: &HashMap<[u8; 32], SocketAddr>,
        complete: bool,
    ) -> io::Result<Plan> {
        let (kind, dev) = self.system.device(spec.clone()).await?;
        let have: Vec<Have> = dev.peers.into_iter().map(|(h, _)| h).collect();
        let plan = plan::plan(want, &have, previous, complete, SystemTime::now());
        if !plan.is_empty() {
            let mut upsert = plan.add.clone();
            upsert.extend(plan.change.iter().cloned());
            self.system
                .apply(
                    spec.clone(),
                    kind,
                    Update {
                        upsert,
                        remove: plan.remove.clone(),
                        ..Update::default()
                    },
                )
                .await?;
        }
        Ok(plan)
    }

    /// Make the device match the applied set, if there is one: the interface (created or
    /// started if missing), its key, port, address, and the peers. Returns what was repaired, in
    /// words (empty when nothing had drifted, or no set was ever applied).
    pub async fn reconcile(&self) -> io::Result<Vec<String>> {
        let mut guard = self.inner.lock().await;
        if guard.is_none() {
            *guard = self.load()?;
        }
        let Some(applied) = guard.clone() else {
            return Ok(Vec::new());
        };
        let want = self
            .wants(&applied.peers)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.message))?;
        let spec = self.spec()?;
        let mut repaired = self.system.ensure(spec.clone()).await?;
        // Every desired endpoint counts as the previous one: a roamed peer keeps its endpoint.
        let previous = want.iter().map(|w| (w.key, w.endpoint)).collect();
        let plan = self
            .converge(&spec, &want, &previous, applied.complete)
            .await?;
        if !plan.add.is_empty() {
            repaired.push(format!("restored {} missing peer(s)", plan.add.len()));
        }
        if !plan.change.is_empty() {
            repaired.push(format!("repaired {} changed peer(s)", plan.change.len()));
        }
        if !plan.remove.is_empty() {
            repaired.push(format!(
                "removed {} peer(s) not in the set",
                plan.remove.len()
            ));
        }
        drop(guard);
        // A held VIP comes back with its interface (a leased one only while the lease holds).
        match self.restore_vip().await {
            Ok(Some(r)) => repaired.push(r),
            Ok(None) => {}
            Err(e) => repaired.push(format!("cannot restore the VIP: {e}")),
        }
        Ok(repaired)
    }

    /// Take the overlay off this node (`UNINSTALL_NODE`): forget the applied set (so the
    /// reconcile loop stops restoring it), delete the interface (its VIP and peers go with it;
    /// a userspace daemon exits with it), then remove the saved set, the VIP fence and the
    /// node's WireGuard key. Idempotent: what is already gone is skipped. Returns what it did, in
    /// words.
    pub async fn remove(&self) -> io::Result<Vec<String>> {
        let mut guard = self.inner.lock().await;
        let _vip = self.vip_lock.lock().await;
        let mut done = Vec::new();
        // Forgotten first: a reconcile that runs next finds nothing to restore.
        let applied = self.settings.state_dir.join(APPLIED_FILE);
        if applied.exists() {
            crate::handle::remove_durably(&applied)?;
            done.push(format!("removed the saved peer set {}", applied.display()));
        }
        *guard = None;
        if self.system.remove(self.settings.interface.clone()).await? {
            done.push(format!("deleted the interface {}", self.settings.interface));
        }
        for name in [vip::VIP_FILE, KEY_FILE, "userspace.log"] {
            let path = self.settings.state_dir.join(name);
            if path.exists() {
                crate::handle::remove_durably(&path)?;
                done.push(format!("removed {}", path.display()));
            }
        }
        // An empty state directory goes too; one holding anything else stays.
        if std::fs::remove_dir(&self.settings.state_dir).is_ok() {
            done.push(format!("removed {}", self.settings.state_dir.display()));
        }
        drop(_vip);
        drop(guard);
        self.vip_changed.notify_waiters();
        Ok(done)
    }

    /// Run [`Overlay::reconcile`] now and then every `reconcile_interval` until `stop` is set.
    /// A node that has no saved set is not polled: the loop waits for the first one (an idle
    /// agent wakes only for its heartbeat).
    pub async fn reconcile_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let iface = self.settings.interface.clone();
        let mut last_error: Option<String> = None;
        loop {
            match self.reconcile().await {
                Ok(r) => {
                    for what in &r {
                        tracing::info!(interface = %iface, "overlay reconcile: {what}");
                    }
                    if last_error.take().is_some() {
                        tracing::info!(interface = %iface, "overlay reconcile works again");
                    }
                }
                Err(e) => {
                    let m = e.to_string();
                    // Said once per distinct failure, not every interval.
                    if last_error.as_deref() != Some(m.as_str()) {
                        tracing::warn!(interface = %iface, "overlay reconcile failed: {m}; retrying every {} s", self.settings.reconcile_interval.as_secs());
                        last_error = Some(m);
                    }
                }
            }
            let managed = self.inner.lock().await.is_some();
            tokio::select! {
                _ = tokio::time::sleep(self.settings.reconcile_interval), if managed => {}
                _ = self.peers_saved.notified(), if !managed => {}
                r = stop.wait_for(|s| *s) => { let _ = r; return; }
            }
        }
    }

    /// The overlay in one line (for `runos status`).
    pub async fn summary(&self) -> Summary {
        let applied = {
            let mut guard = self.inner.lock().await;
            if guard.is_none() {
                *guard = self.load().ok().flatten();
            }
            guard.clone()
        };
        Summary {
            interface: self.settings.interface.clone(),
            managed: applied.is_some(),
            generation: applied.as_ref().and_then(|a| a.generation),
            peers: applied.as_ref().map_or(0, |a| a.peers.len()),
            vip_held: self
                .vip_state()
                .ok()
                .and_then(|v| v.held.map(|h| h.generation)),
        }
    }

    /// The overlay's status (for `runos vpn status`).
    pub async fn status(&self) -> Status {
        let applied = {
            let mut guard = self.inner.lock().await;
            if guard.is_none() {
                *guard = self.load().ok().flatten();
            }
            guard.clone()
        };
        let public_key = if self.settings.state_dir.join(KEY_FILE).exists() {
            self.public_key_b64().unwrap_or_default()
        } else {
            String::new()
        };
        let mut st = Status {
            interface: self.settings.interface.clone(),
            backend: None,
            public_key,
            generation: applied.as_ref().and_then(|a| a.generation),
            complete: applied.as_ref().is_some_and(|a| a.complete),
            peers: Vec::new(),
            error: None,
            vip: self.vip_state().ok(),
        };
        let spec = match self.spec() {
            Ok(s) => s,
            Err(e) => {
                st.error = Some(e.to_string());
                return st;
            }
        };
        match self.system.device(spec).await {
            Ok((kind, dev)) => {
                st.backend = Some(kind);
                let now = SystemTime::now();
                st.peers = dev
                    .peers
                    .into_iter()
                    .map(|(h, (rx, tx))| PeerStatus {
                        pub_key: b64(&h.key),
                        endpoint: h.endpoint.map(|e| e.to_string()),
                        allowed_ips: h.allowed.iter().map(|(a, p)| format!("{a}/{p}")).collect(),
                        last_handshake_secs_ago: h
                            .last_handshake
                            .and_then(|t| now.duration_since(t).ok())
                            .map(|d| d.as_secs()),
                        rx_bytes: rx,
                        tx_bytes: tx,
                    })
                    .collect();
            }
            Err(e) => st.error = Some(e.to_string()),
        }
        st
    }
}

#[cfg(test)]
mod tests;
