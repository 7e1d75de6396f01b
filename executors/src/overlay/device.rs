//! The real device: WireGuard through `wireguard-control` (kernel netlink or the userspace
//! UAPI, chosen at run time), links and addresses through rtnetlink. Never `wg` or `ip` text.
//!
//! Pitfalls handled here (../shared/reference/test-environment.md §1):
//! - `Device::list` is empty for userspace devices on Linux: a userspace device is found by its
//!   UAPI socket, `/run/wireguard/<interface>.sock`;
//! - `wireguard-control` starts a userspace daemon by itself when the socket is missing, without
//!   a timeout: the agent never lets it, it starts the configured program itself
//!   (`launch_userspace`) and calls the crate only once the socket answers;
//! - boringtun reports the last handshake as seconds *since* it, not a UNIX time
//!   ([`handshake_time`]), and no public key of its own (the key is then set again: a no-op);
//! - `wireguard-control` prints a line to stdout for each UAPI key it does not know (boringtun's
//!   `own_public_key`): harmless, and not a secret.
//!
//! Every call is bounded: netlink requests and UAPI calls get [`CALL_TIMEOUT`] (UAPI calls are
//! blocking and run on the blocking pool; a daemon that never answers leaves that thread
//! blocked, which the timeout reports instead of waiting).

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use wireguard_control as wgc;

use super::plan::{Have, Want};
use super::{Addresses, BackendChoice, DeviceView, Kind, Spec, System, Update};
use crate::handle::BoxFuture;

/// Longest wait for one netlink request or UAPI exchange.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for a started userspace daemon's socket and link.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Where userspace WireGuard implementations put their UAPI sockets.
pub const SOCKET_DIR: &str = "/run/wireguard";

/// The backend to use: a userspace device that already runs wins (its socket exists); then the
/// kernel if it has WireGuard; else userspace. A forced choice is taken as it is.
pub fn select(choice: BackendChoice, kernel_available: bool, socket_exists: bool) -> Kind {
    match choice {
        BackendChoice::Kernel => Kind::Kernel,
        BackendChoice::Userspace => Kind::Userspace,
        BackendChoice::Auto if socket_exists => Kind::Userspace,
        BackendChoice::Auto if kernel_available => Kind::Kernel,
        BackendChoice::Auto => Kind::Userspace,
    }
}

/// Whether the kernel has WireGuard (built in or loaded: both show `/sys/module/wireguard`).
pub fn kernel_available() -> bool {
    Path::new("/sys/module/wireguard").exists()
}

/// The UAPI socket of `iface`.
pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// A handshake time as the backend reported it, made absolute. wireguard-go and the kernel
/// report a UNIX time; boringtun reports seconds since the handshake, which the crate turns into
/// a time in 1970. No real handshake predates 2000, and no "seconds since" reaches 30 years, so
/// a time before 2000 is read as an age.
pub fn handshake_time(reported: Option<SystemTime>, now: SystemTime) -> Option<SystemTime> {
    const Y2000: Duration = Duration::from_secs(946_684_800);
    let t = reported?;
    let since_epoch = t.duration_since(UNIX_EPOCH).ok()?;
    if since_epoch >= Y2000 {
        Some(t)
    } else {
        now.checked_sub(since_epoch)
    }
}

/// The host's WireGuard and netlink.
#[derive(Debug, Default)]
pub struct HostSystem;

fn timeout_err(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} did not answer within {} s", CALL_TIMEOUT.as_secs()),
    )
}

fn nl_err(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

async fn bounded<T>(
    what: &str,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| timeout_err(what))?
}

/// A netlink handle, its connection driven by a task of its own that ends with the handle.
fn netlink() -> io::Result<rtnetlink::Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A link's facts.
#[derive(Debug, Clone, Copy)]
struct Link {
    index: u32,
    up: bool,
    mtu: Option<u32>,
}

async fn link(h: &rtnetlink::Handle, name: &str) -> io::Result<Option<Link>> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(Link {
            index: m.header.index,
            up: m.header.flags.contains(LinkFlags::Up),
            mtu: m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(v) => Some(*v),
                _ => None,
            }),
        })),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -ENODEV => Ok(None),
        Err(e) => Err(nl_err(e)),
    }
}

/// `ENODEV` on Linux: what netlink answers for a link name that does not exist.
const ENODEV: i32 = 19;

/// Every address of the host: (link index, address, prefix length).
async fn all_addresses(h: &rtnetlink::Handle) -> io::Result<Vec<(u32, IpAddr, u8)>> {
    let mut s = h.address().get().execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await.map_err(nl_err)? {
        let local = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let addr = local.or_else(|| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let Some(ip) = addr {
            out.push((m.header.index, ip, m.header.prefix_len));
        }
        if out.len() > 100_000 {
            return Err(io::Error::other("more than 100 000 addresses on this host"));
        }
    }
    Ok(out)
}

fn iface_name(name: &str) -> io::Result<wgc::InterfaceName> {
    name.parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))
}

fn backend(kind: Kind) -> wgc::Backend {
    match kind {
        Kind::Kernel => wgc::Backend::Kernel,
        Kind::Userspace => wgc::Backend::Userspace,
    }
}

fn view(d: wgc::Device, now: SystemTime) -> DeviceView {
    DeviceView {
        public_key: d.public_key.map(|k| k.0),
        listen_port: d.listen_port,
        peers: d
            .peers
            .into_iter()
            .map(|p| {
                (
                    Have {
                        key: p.config.public_key.0,
                        endpoint: p.config.endpoint,
                        allowed: p
                            .config
                            .allowed_ips
                            .iter()
                            .map(|a| (a.address, a.cidr))
                            .collect(),
                        keepalive: p.config.persistent_keepalive_interval,
                        last_handshake: handshake_time(p.stats.last_handshake_time, now),
                    },
                    (p.stats.rx_bytes, p.stats.tx_bytes),
                )
            })
            .collect(),
    }
}

fn builder(w: &Want) -> wgc::PeerConfigBuilder {
    wgc::PeerConfigBuilder::new(&wgc::Key(w.key))
        .set_endpoint(w.endpoint)
        .replace_allowed_ips()
        .add_allowed_ip(w.allowed, w.prefix())
        .set_persistent_keepalive_interval(w.keepalive)
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let task = tokio::task::spawn_blocking(f);
    match tokio::time::timeout(CALL_TIMEOUT, task).await {
        Err(_) => Err(timeout_err(what)),
        Ok(Err(e)) => Err(io::Error::other(format!("{what}: {e}"))),
        Ok(Ok(r)) => r,
    }
}

fn get_device(name: &str, kind: Kind) -> io::Result<wgc::Device> {
    if kind == Kind::Userspace && !socket_path(name).exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} does not exist", socket_path(name).display()),
        ));
    }
    wgc::Device::get(&iface_name(name)?, backend(kind))
}

fn apply_update(name: &str, kind: Kind, u: &Update) -> io::Result<()> {
    // Never let the crate start a daemon itself (it would, without a timeout).
    if kind == Kind::Userspace && !socket_path(name).exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} does not exist: the userspace WireGuard daemon is not running",
                socket_path(name).display()
            ),
        ));
    }
    let mut d = wgc::DeviceUpdate::new();
    if let Some(k) = u.private_key {
        d = d.set_private_key(wgc::Key(k));
    }
    if let Some(p) = u.listen_port {
        d = d.set_listen_port(p);
    }
    for w in &u.upsert {
        d = d.add_peer(builder(w));
    }
    for k in &u.remove {
        d = d.remove_peer_by_key(&wgc::Key(*k));
    }
    d.apply(&iface_name(name)?, backend(kind))
}

/// Start the userspace implementation for `spec` (`spec.userspace_command` plus the interface
/// name, in the foreground, in a process group of its own so that nothing aimed at the agent's
/// group reaches it) and wait for its socket. Its output goes to `<state>/userspace.log`. The
/// child is reaped by a task; the reconcile loop starts it again if it dies.
async fn launch_userspace(spec: &Spec) -> io::Result<()> {
    let Some((program, args)) = spec.userspace_command.split_first() else {
        return Err(io::Error::other(
            "no userspace WireGuard implementation is configured ([wireguard] userspace_command)",
        ));
    };
    std::fs::create_dir_all(SOCKET_DIR)?;
    // A socket left by a daemon that died would make the new one fail.
    let sock = socket_path(&spec.interface);
    if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_err() {
        let _ = std::fs::remove_file(&sock);
    }
    // Appended to, and started afresh once it is past 1 MiB: bounded on disk.
    let log_path = spec.state_dir.join("userspace.log");
    let fresh = std::fs::metadata(&log_path).is_ok_and(|m| m.len() > 1 << 20);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(!fresh)
        .write(true)
        .truncate(fresh)
        .open(&log_path)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .arg(&spec.interface)
        .env_clear()
        .env("PATH", crate::host::runner::DEFAULT_PATH)
        .env("WG_PROCESS_FOREGROUND", "1")
        .env("WG_SUDO", "true")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {program}: {e}; install it (Debian: wireguard-go) or set [wireguard] userspace_command"),
        )
    })?;
    let pid = child.id();
    let iface = spec.interface.clone();
    let program_name = program.clone();
    tokio::spawn(async move {
        match child.wait().await {
            Ok(s) => tracing::warn!(
                interface = %iface,
                pid,
                "the userspace WireGuard daemon {program_name} exited ({s}); the reconcile loop will start it again"
            ),
            Err(e) => tracing::warn!(interface = %iface, "cannot wait for {program_name}: {e}"),
        }
    });
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{program} did not open {} within {} s (see {})",
                    sock.display(),
                    START_TIMEOUT.as_secs(),
                    spec.state_dir.join("userspace.log").display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ensure(spec: Arc<Spec>) -> io::Result<Vec<String>> {
    let mut repaired = Vec::new();
    let name = spec.interface.as_str();
    let sock_exists = std::os::unix::net::UnixStream::connect(socket_path(name)).is_ok();
    let kind = select(spec.backend, kernel_available(), sock_exists);
    let h = netlink()?;
    let mut l = bounded("netlink", link(&h, name)).await?;
    match kind {
        Kind::Kernel if l.is_none() => {
            let msg = rtnetlink::LinkWireguard::new(name).build();
            bounded("netlink", async {
                h.link().add(msg).execute().await.map_err(nl_err)
            })
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create the kernel WireGuard link {name}: {e}; set [wireguard] backend = \"userspace\" where the kernel has no WireGuard"
                    ),
                )
            })?;
            repaired.push(format!("created {name} (kernel WireGuard)"));
        }
        Kind::Userspace if !sock_exists => {
            // A link without a daemon (the daemon died and left it, or someone else's).
            if let Some(old) = l {
                let _ = bounded("netlink", async {
                    h.link().del(old.index).execute().await.map_err(nl_err)
                })
                .await;
            }
            launch_userspace(&spec).await?;
            repaired.push(format!(
                "started {} for {name} (userspace WireGuard)",
                spec.userspace_command.first().map_or("", String::as_str)
            ));
        }
        _ => {}
    }
    if l.is_none() || !repaired.is_empty() {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            l = bounded("netlink", link(&h, name)).await?;
            if l.is_some() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let Some(l) = l else {
        return Err(io::Error::other(format!(
            "{name} did not appear within {} s",
            START_TIMEOUT.as_secs()
        )));
    };
    // Key and port.
    let n = name.to_string();
    let dev = blocking("the WireGuard device", move || get_device(&n, kind)).await?;
    let public = wgc::Key(spec.private_key).get_public().0;
    let mut u = Update::default();
    if dev.public_key.as_ref().map(|k| k.0) != Some(public) {
        u.private_key = Some(spec.private_key);
    }
    if dev.listen_port != Some(spec.listen_port) {
        u.listen_port = Some(spec.listen_port);
    }
    if u.private_key.is_some() || u.listen_port.is_some() {
        let n = name.to_string();
        let had_key = dev.public_key.is_some();
        blocking("the WireGuard device", move || apply_update(&n, kind, &u)).await?;
        if had_key || dev.listen_port != Some(spec.listen_port) {
            repaired.push(format!(
                "set {name}'s key and listen port {}",
                spec.listen_port
            ));
        }
    }
    // MTU and up.
    if !l.up || (spec.mtu.is_some() && l.mtu != spec.mtu) {
        let mut m = rtnetlink::LinkUnspec::new_with_index(l.index).up();
        if let Some(mtu) = spec.mtu {
            m = m.mtu(mtu);
        }
        let msg = m.build();
        bounded("netlink", async {
            h.link().set(msg).execute().await.map_err(nl_err)
        })
        .await?;
        if !l.up {
            repaired.push(format!("brought {name} up"));
        }
    }
    // The overlay address.
    if let Some((ip, prefix)) = spec.address
        && add_missing_address(&h, l.index, ip, prefix).await?
    {
        repaired.push(format!("added {ip}/{prefix} to {name}"));
    }
    Ok(repaired)
}

/// Add `ip/prefix` to link `index` unless it is there; whether it was added.
async fn add_missing_address(
    h: &rtnetlink::Handle,
    index: u32,
    ip: IpAddr,
    prefix: u8,
) -> io::Result<bool> {
    let all = bounded("netlink", all_addresses(h)).await?;
    if all
        .iter()
        .any(|&(i, a, p)| i == index && a == ip && p == prefix)
    {
        return Ok(false);
    }
    bounded("netlink", async {
        h.address()
            .add(index, ip, prefix)
            .execute()
            .await
            .map_err(nl_err)
    })
    .await?;
    Ok(true)
}

impl System for HostSystem {
    fn ensure(&self, spec: Arc<Spec>) -> BoxFuture<io::Result<Vec<String>>> {
        Box::pin(ensure(spec))
    }

    fn device(&self, spec: Arc<Spec>) -> BoxFuture<io::Result<(Kind, DeviceView)>> {
        Box::pin(async move {
            let name = spec.interface.clone();
            let kind = select(
                spec.backend,
                kernel_available(),
                socket_path(&name).exists(),
            );
            let d = blocking("the WireGuard device", move || get_device(&name, kind)).await?;
            Ok((kind, view(d, SystemTime::now())))
        })
    }

    fn apply(&self, spec: Arc<Spec>, kind: Kind, u: Update) -> BoxFuture<io::Result<()>> {
        Box::pin(async move {
            let name = spec.interface.clone();
            blocking("the WireGuard device", move || {
                apply_update(&name, kind, &u)
            })
            .await
        })
    }

    fn add_address(&self, iface: String, ip: IpAddr, prefix: u8) -> BoxFuture<io::Result<()>> {
        Box::pin(async move {
            let h = netlink()?;
            let Some(l) = bounded("netlink", link(&h, &iface)).await? else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{iface} does not exist"),
                ));
            };
            add_missing_address(&h, l.index, ip, prefix).await.map(drop)
        })
    }

    fn del_address(&self, iface: String, ip: IpAddr, prefix: u8) -> BoxFuture<io::Result<()>> {
        Box::pin(async move {
            let h = netlink()?;
            let Some(l) = bounded("netlink", link(&h, &iface)).await? else {
                return Ok(());
            };
            let mut s = h
                .address()
                .get()
                .set_link_index_filter(l.index)
                .set_address_filter(ip)
                .set_prefix_length_filter(prefix)
                .execute();
            let found = bounded("netlink", async { s.try_next().await.map_err(nl_err) }).await?;
            let Some(msg) = found else { return Ok(()) };
            bounded("netlink", async {
                h.address().del(msg).execute().await.map_err(nl_err)
            })
            .await
        })
    }

    fn remove(&self, iface: String) -> BoxFuture<io::Result<bool>> {
        Box::pin(async move {
            let h = netlink()?;
            let Some(l) = bounded("netlink", link(&h, &iface)).await? else {
                return Ok(false);
            };
            bounded("netlink", async {
                h.link().del(l.index).execute().await.map_err(nl_err)
            })
            .await?;
            // wireguard-go removes its socket when it exits; a stale one would confuse the
            // backend choice of a later start.
            let sock = socket_path(&iface);
            if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_err() {
                let _ = std::fs::remove_file(&sock);
            }
            Ok(true)
        })
    }

    fn addresses(&self, iface: String) -> BoxFuture<io::Result<Addresses>> {
        Box::pin(async move {
            let h = netlink()?;
            let l = bounded("netlink", link(&h, &iface)).await?;
            let all = bounded("netlink", all_addresses(&h)).await?;
            let idx = l.map(|l| l.index);
            let mut out = Addresses::default();
            for (i, ip, p) in all {
                if Some(i) == idx {
                    out.overlay.push((ip, p));
                } else if !ip.is_loopback() {
                    out.underlay.push(ip);
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel backend cannot be exercised on the project's machines (no WireGuard module):
    /// its selection is covered here.
    #[test]
    fn the_backend_is_chosen_at_run_time() {
        use BackendChoice::*;
        assert_eq!(select(Auto, true, false), Kind::Kernel);
        assert_eq!(select(Auto, false, false), Kind::Userspace);
        assert_eq!(
            select(Auto, true, true),
            Kind::Userspace,
            "a running daemon wins"
        );
        assert_eq!(select(Kernel, false, true), Kind::Kernel);
        assert_eq!(select(Userspace, true, false), Kind::Userspace);
    }

    #[test]
    fn handshake_times_are_judged_per_backend() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let abs = UNIX_EPOCH + Duration::from_secs(1_799_999_990);
        assert_eq!(handshake_time(Some(abs), now), Some(abs));
        // boringtun: "12 seconds ago".
        let age = UNIX_EPOCH + Duration::from_secs(12);
        assert_eq!(
            handshake_time(Some(age), now),
            Some(now - Duration::from_secs(12))
        );
        assert_eq!(handshake_time(None, now), None);
    }
}
