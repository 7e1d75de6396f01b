//! The overlay's part of `runos-bench`: how long `SET_VPN_PEERS` takes to apply a 1000-peer set
//! to a real userspace device (Debian's `wireguard-go`), and a 1-peer change to that set, which
//! the diff must make far cheaper. The executor runs in this process, on the host's
//! WireGuard and netlink (`runos_executors::overlay::device::HostSystem`), on an interface of
//! its own (`rbench<pid>`: the UAPI socket directory is shared, so the name is unique). Peers
//! have TEST-NET endpoints and no keepalive: nothing is sent. Needs root and `wireguard-go`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use runos_executors::Ctx;
use runos_executors::overlay::{ControlPaths, Overlay, Settings, device::HostSystem};
use runos_protocol::Tag;
use runos_protocol::instructions::{SetVpnPeers, VpnPeer};

/// The figures.
#[derive(Debug, Clone)]
pub struct OverlayBench {
    /// Peers in the big set.
    pub peers: usize,
    /// Creating the interface (starting wireguard-go) with an empty set.
    pub create: Duration,
    /// Applying the whole set to an empty device.
    pub full: Duration,
    /// Re-applying the same set (a new generation, nothing differs): read, diff, no change.
    pub noop: Vec<Duration>,
    /// A new generation in which one peer's endpoint moved.
    pub one: Vec<Duration>,
}

fn key(i: usize) -> String {
    use base64::Engine as _;
    let mut private = [0u8; 32];
    private[1..9].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    private[31] = 0x40;
    base64::engine::general_purpose::STANDARD.encode(runos_executors::overlay::public_key(&private))
}

fn peer(i: usize, port: u16) -> VpnPeer {
    VpnPeer {
        pub_key: key(i),
        endpoint_ip: format!("192.0.2.{}", 1 + i % 250),
        vpn_ip: format!("10.200.{}.{}", i / 250, 1 + i % 250),
        endpoint_port: Some(port + (i / 250) as u16),
        keepalive_secs: Some(0),
    }
}

fn set(peers: Vec<VpnPeer>, generation: i64) -> SetVpnPeers {
    SetVpnPeers {
        peers,
        generation: Some(generation),
        complete: true,
    }
}

/// Run it: `n` peers, `rounds` of each small change.
pub async fn run(n: usize, rounds: usize) -> Result<OverlayBench, String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let iface = format!("rbench{}", std::process::id() % 100_000);
    let mut s = Settings::new(tmp.path().join("wireguard"));
    s.interface = iface.clone();
    s.mtu = None;
    s.keepalive_secs = 0;
    s.listen_port = 51000 + (std::process::id() % 1000) as u16;
    let o = Overlay::new(s, Arc::new(HostSystem), Arc::new(ControlPaths::default()));
    let result = async {
        let ctx = || Ctx::detached(Tag::random(), Duration::from_secs(120));
        let apply = |r: Result<_, runos_protocol::ErrorPayload>| {
            r.map_err(|e: runos_protocol::ErrorPayload| format!("SET_VPN_PEERS: {}", e.message))
        };
        let t = Instant::now();
        apply(o.set_vpn_peers(&ctx(), set(vec![], 1)).await)?;
        let create = t.elapsed();
        let all: Vec<VpnPeer> = (0..n).map(|i| peer(i, 51820)).collect();
        // The payload checks the registry makes before an executor runs (distinct keys among them).
        runos_protocol::instructions::Instruction::validate(&set(all.clone(), 2))
            .map_err(|e| format!("the benchmark's own set is invalid: {e}"))?;
        let t = Instant::now();
        let r = apply(o.set_vpn_peers(&ctx(), set(all.clone(), 2)).await)?;
        let full = t.elapsed();
        if r.added.len() != n {
            return Err(format!("added {} of {n} peers", r.added.len()));
        }
        let mut generation = 3;
        let mut noop = Vec::with_capacity(rounds);
        let mut one = Vec::with_capacity(rounds);
        let mut current = all;
        for round in 0..rounds {
            let t = Instant::now();
            let r = apply(
                o.set_vpn_peers(&ctx(), set(current.clone(), generation))
                    .await,
            )?;
            noop.push(t.elapsed());
            generation += 1;
            if r.unchanged != n {
                return Err(format!("a re-apply left {} of {n} unchanged", r.unchanged));
            }
            let i = (round * 37) % n;
            current[i].endpoint_port = Some(40000 + round as u16);
            let t = Instant::now();
            let r = apply(
                o.set_vpn_peers(&ctx(), set(current.clone(), generation))
                    .await,
            )?;
            one.push(t.elapsed());
            generation += 1;
            if r.changed.len() != 1 || r.unchanged != n - 1 {
                return Err(format!(
                    "a 1-peer change changed {} and left {} unchanged",
                    r.changed.len(),
                    r.unchanged
                ));
            }
        }
        noop.sort_unstable();
        one.sort_unstable();
        Ok(OverlayBench {
            peers: n,
            create,
            full,
            noop,
            one,
        })
    }
    .await;
    if result.is_err() && std::env::var_os("RUNOS_BENCH_KEEP").is_some() {
        eprintln!("kept {iface} for inspection");
        return result;
    }
    // The daemon exits with its link.
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &iface])
        .status();
    result
}
