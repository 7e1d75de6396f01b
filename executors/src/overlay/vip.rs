//! The cluster's virtual IP on the overlay interface (`VIP_ASSIGN`, `VIP_RELEASE`), fenced
//! for real.
//!
//! - **The fence is on disk.** The highest generation seen, the highest released, and what is
//!   held are written atomically to `<state>/vip.json` **before** the address changes, so a
//!   restart never forgets them: a stale `VIP_ASSIGN`, also one replayed after a restart, is
//!   answered `ok: false`. An assignment whose generation was released already is stale too (a
//!   replay of the hand-off's old half).
//! - **Health first.** Before taking the VIP the agent checks that the local service behind it
//!   answers (`[wireguard] vip_check`, a TCP connect within 2 s) and answers `ok: false` with the
//!   reason otherwise.
//! - **Self-fencing.** With `leaseSecs`, the holder drops the VIP by itself once it has heard
//!   nothing from the control plane for that long ([`Overlay::vip_watchdog`]): a partitioned
//!   holder steps down before the control plane (which waits at least as long) hands the VIP on.
//! - Idempotent: an assign of the generation held, or a release of what is not held, changes
//!   nothing and answers `ok: true`.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use runos_protocol::instructions::{VipAssign, VipRelease, VipResponse, vip_address};
use serde::{Deserialize, Serialize};

use super::Overlay;
use crate::handle::write_atomic;

/// How long the health check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) const VIP_FILE: &str = "vip.json";

/// What is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    /// The generation it is held under.
    pub generation: i64,
    /// The address.
    pub address: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// The lease, if any.
    pub lease_secs: Option<u32>,
}

/// The fence, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VipState {
    /// The highest generation seen in an assign or a release.
    pub highest: Option<i64>,
    /// The highest generation released.
    pub released: Option<i64>,
    /// What this node holds.
    pub held: Option<Held>,
}

fn no(message: impl Into<String>) -> VipResponse {
    VipResponse {
        ok: false,
        message: message.into(),
    }
}

fn yes() -> VipResponse {
    VipResponse {
        ok: true,
        message: String::new(),
    }
}

impl Overlay {
    fn vip_path(&self) -> std::path::PathBuf {
        self.settings.state_dir.join(VIP_FILE)
    }

    /// The persisted fence (default when none).
    pub fn vip_state(&self) -> io::Result<VipState> {
        match std::fs::read(self.vip_path()) {
            Ok(b) if b.len() <= 64 * 1024 => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.vip_path().display()),
                )
            }),
            Ok(_) => Err(io::Error::other("vip.json is larger than 64 KiB")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(VipState::default()),
            Err(e) => Err(e),
        }
    }

    fn save_vip(&self, s: &VipState) -> io::Result<()> {
        crate::handle::ensure_dir(&self.settings.state_dir)?;
        write_atomic(
            &self.vip_path(),
            &serde_json::to_vec(s).map_err(io::Error::other)?,
            0o600,
        )
    }

    fn vip_of(&self, asked: Option<&str>) -> Option<(IpAddr, u8)> {
        asked.and_then(vip_address).or(self.settings.vip)
    }

    /// `VIP_ASSIGN`.
    pub async fn vip_assign(&self, req: VipAssign) -> VipResponse {
        let _g = self.vip_lock.lock().await;
        let mut st = match self.vip_state() {
            Ok(s) => s,
            Err(e) => return no(format!("cannot read the VIP fence: {e}")),
        };
        let g = req.generation;
        if st.highest.is_some_and(|h| g < h) || st.released.is_some_and(|r| g <= r) {
            return no(format!(
                "stale generation {g}: this node has seen generation {} (released up to {})",
                st.highest.unwrap_or(0),
                st.released.map_or("none".to_string(), |r| r.to_string())
            ));
        }
        let Some((address, prefix)) = self.vip_of(req.address.as_deref()) else {
            return no(
                "no VIP address: send `address` or set [wireguard] vip in the agent's configuration",
            );
        };
        if let Some(h) = &st.held
            && h.generation == g
            && h.address == address
        {
            // Held already (a redelivery): make sure the address is there.
            return match self
                .system
                .add_address(self.settings.interface.clone(), address, prefix)
                .await
            {
                Ok(()) => yes(),
                Err(e) => no(format!("cannot add {address}/{prefix}: {e}")),
            };
        }
        if let Some(check) = self.settings.vip_check {
            match tokio::time::timeout(CHECK_TIMEOUT, tokio::net::TcpStream::connect(check)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return no(format!(
                        "the local service behind the VIP does not answer at {check}: {e}"
                    ));
                }
                Err(_) => {
                    return no(format!(
                        "the local service behind the VIP does not answer at {check} within {} s",
                        CHECK_TIMEOUT.as_secs()
                    ));
                }
            }
        }
        // The fence first, then the address.
        let previous = st.held.take();
        st.highest = Some(st.highest.map_or(g, |h| h.max(g)));
        st.held = Some(Held {
            generation: g,
            address,
            prefix,
            lease_secs: req.lease_secs,
        });
        if let Err(e) = self.save_vip(&st) {
            return no(format!("cannot save the VIP fence: {e}"));
        }
        self.vip_changed.notify_one();
        if let Some(p) = previous
            && (p.address != address || p.prefix != prefix)
        {
            let _ = self
                .system
                .del_address(self.settings.interface.clone(), p.address, p.prefix)
                .await;
        }
        // The lease runs from the assignment at the earliest.
        self.control.contact();
        match self
            .system
            .add_address(self.settings.interface.clone(), address, prefix)
            .await
        {
            Ok(()) => {
                tracing::info!(
                    generation = g,
                    lease_secs = req.lease_secs,
                    "took the VIP {address}/{prefix}"
                );
                yes()
            }
            Err(e) => no(format!(
                "cannot add {address}/{prefix} to {}: {e}",
                self.settings.interface
            )),
        }
    }

    /// `VIP_RELEASE`.
    pub async fn vip_release(&self, req: VipRelease) -> VipResponse {
        let _g = self.vip_lock.lock().await;
        let mut st = match self.vip_state() {
            Ok(s) => s,
            Err(e) => return no(format!("cannot read the VIP fence: {e}")),
        };
        let g = req.generation;
        if let Some(h) = &st.held
            && g < h.generation
        {
            return no(format!(
                "stale release of generation {g}: the VIP is held under generation {}",
                h.generation
            ));
        }
        let held = st.held.take();
        st.highest = Some(st.highest.map_or(g, |h| h.max(g)));
        st.released = Some(st.released.map_or(g, |r| r.max(g)));
        if let Err(e) = self.save_vip(&st) {
            return no(format!("cannot save the VIP fence: {e}"));
        }
        self.vip_changed.notify_one();
        let Some(h) = held else { return yes() };
        match self
            .system
            .del_address(self.settings.interface.clone(), h.address, h.prefix)
            .await
        {
            Ok(()) => {
                tracing::info!(
                    generation = g,
                    "released the VIP {}/{}",
                    h.address,
                    h.prefix
                );
                yes()
            }
            Err(e) => no(format!("cannot remove {}/{}: {e}", h.address, h.prefix)),
        }
    }

    /// Add the held VIP back if the interface lost it (recreated), unless its lease ran out
    /// (the watchdog drops it then). What it did, in words.
    pub async fn restore_vip(&self) -> io::Result<Option<String>> {
        let _g = self.vip_lock.lock().await;
        let Some(h) = self.vip_state()?.held else {
            return Ok(None);
        };
        if let Some(lease) = h.lease_secs {
            let fresh = self
                .control
                .last_contact()
                .is_some_and(|t| t.elapsed() <= Duration::from_secs(u64::from(lease)));
            if !fresh {
                return Ok(None);
            }
        }
        let addrs = self
            .system
            .addresses(self.settings.interface.clone())
            .await?;
        if addrs.overlay.contains(&(h.address, h.prefix)) {
            return Ok(None);
        }
        self.system
            .add_address(self.settings.interface.clone(), h.address, h.prefix)
            .await?;
        Ok(Some(format!(
            "restored the VIP {}/{} (generation {})",
            h.address, h.prefix, h.generation
        )))
    }

    /// Drop a leased VIP whose lease ran out, until `stop`. A node that restarted counts from
    /// its start. It sleeps until the lease could run out (and checks again then: contact moves
    /// the end), and not at all while no leased VIP is held: it waits for the fence to change.
    pub async fn vip_watchdog(
        self: std::sync::Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let started = Instant::now();
        loop {
            let until = self.drop_expired_vip(started).await;
            tokio::select! {
                _ = sleep_until(until), if until.is_some() => {}
                _ = self.vip_changed.notified() => {}
                r = stop.wait_for(|s| *s) => { let _ = r; return; }
            }
        }
    }

    /// Drop the held VIP if its lease ran out; else when to look again (`None`: no leased VIP
    /// is held, or the fence cannot be read).
    async fn drop_expired_vip(&self, started: Instant) -> Option<Instant> {
        let since = self.control.last_contact().unwrap_or(started);
        let _g = self.vip_lock.lock().await;
        let mut st = self.vip_state().ok()?;
        let h = st.held.clone()?;
        let lease = Duration::from_secs(u64::from(h.lease_secs?));
        if since.elapsed() <= lease {
            return Some(since + lease + TICK);
        }
        st.held = None;
        if let Err(e) = self.save_vip(&st) {
            tracing::error!("the VIP lease ran out but the fence cannot be saved: {e}");
        }
        match self
            .system
            .del_address(self.settings.interface.clone(), h.address, h.prefix)
            .await
        {
            Ok(()) => tracing::warn!(
                generation = h.generation,
                lease_secs = lease.as_secs(),
                "nothing heard from the control plane for longer than the VIP's lease: dropped the VIP {}/{} (self-fencing)",
                h.address,
                h.prefix
            ),
            Err(e) => tracing::error!(
                "the VIP lease ran out but {}/{} cannot be removed: {e}",
                h.address,
                h.prefix
            ),
        }
        None
    }
}

/// Past the lease's end by this much before the watchdog looks again (so it never wakes just
/// before the end and sleeps again for nothing).
const TICK: Duration = Duration::from_millis(100);

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
