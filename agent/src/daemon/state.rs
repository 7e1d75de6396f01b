//! The agent's state handle: everything the daemon loop, the session, the admin socket and the
//! automatic updater share, created once by the daemon ([`AgentState::new`]) and passed down as
//! a [`State`] (an `Arc`). Nothing here is process-wide, so two agents (tests) can live in one
//! process.
//!
//! Values that drive behaviour are `watch` channels: the agent version the control plane of the
//! current session advertises (the automatic updater waits on it) and the trusted clock offset
//! (renewal timing and certificate judgement read it).

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use crate::credentials::renew::Renewer;
use crate::daemon::session::SessionEnd;
use crate::daemon::status::StatusHandle;

/// The shared handle.
pub type State = Arc<AgentState>;

/// What one agent knows about itself at run time.
#[derive(Debug)]
pub struct AgentState {
    /// Connection state and history (`runos status`).
    pub status: StatusHandle,
    /// Certificate renewal state: failures, backoff, what `runos status` shows.
    pub renewal: Renewer,
    /// The version the control plane of the current session advertises (`None` while not
    /// connected or when none is advertised).
    advertised: watch::Sender<Option<String>>,
    /// The trusted clock offset (server − node, ms; 0 when none or not trusted).
    clock_offset: watch::Sender<i64>,
    /// The control plane's addresses as connected to (the overlay's control-path guard).
    pub control_paths: Arc<runos_executors::overlay::ControlPaths>,
    /// The node's WireGuard public key, for HELLO (set once at start).
    pub wireguard_public_key: std::sync::OnceLock<String>,
}

impl AgentState {
    /// A fresh state: disconnected since now, nothing advertised, no clock offset.
    pub fn new() -> State {
        Arc::new(AgentState {
            status: StatusHandle::new(),
            renewal: Renewer::default(),
            advertised: watch::channel(None).0,
            clock_offset: watch::channel(0).0,
            control_paths: Arc::default(),
            wireguard_public_key: std::sync::OnceLock::new(),
        })
    }

    /// WELCOME advertised `v` (`None`: none, or not a release version).
    pub fn set_advertised_version(&self, v: Option<String>) {
        self.status.set_advertised_version(v.clone());
        self.advertised.send_replace(v);
    }

    /// The version the connected control plane advertises, as a watch.
    pub fn advertised_version(&self) -> watch::Receiver<Option<String>> {
        self.advertised.subscribe()
    }

    /// A measured clock offset (server − node, ms); the trusted offset follows
    /// ([`StatusHandle::observe_clock_offset`]).
    pub fn observe_clock_offset(&self, offset_ms: i64) {
        self.status.observe_clock_offset(offset_ms);
        self.clock_offset
            .send_replace(self.status.trusted_clock_offset());
    }

    /// The trusted clock offset (ms; 0 when none).
    pub fn trusted_clock_offset(&self) -> i64 {
        *self.clock_offset.borrow()
    }

    /// The trusted clock offset, as a watch.
    pub fn clock_offset(&self) -> watch::Receiver<i64> {
        self.clock_offset.subscribe()
    }

    /// The session ended: nothing is advertised any more.
    pub fn session_ended(&self, end: &SessionEnd) {
        self.status.session_ended(end);
        self.advertised.send_replace(None);
    }

    /// The status answer of the admin socket (connection state and renewal).
    pub fn to_json(&self) -> Value {
        self.status.to_json(self.renewal.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two agents in one process keep their own state.
    #[test]
    fn two_states_are_independent() {
        let a = AgentState::new();
        let b = AgentState::new();
        let adv_b = b.advertised_version();
        a.status.connected("a.example:7443", Some("s-a"));
        a.set_advertised_version(Some("v9.9.9".into()));
        a.observe_clock_offset(1_500);
        a.renewal.failed("boom", 3600);
        assert_eq!(a.to_json()["connection"]["state"], "connected");
        assert_eq!(b.to_json()["connection"]["state"], "disconnected");
        assert_eq!(a.trusted_clock_offset(), 1_500);
        assert_eq!(b.trusted_clock_offset(), 0);
        assert_eq!(*a.advertised_version().borrow(), Some("v9.9.9".to_string()));
        assert_eq!(*adv_b.borrow(), None);
        assert!(!adv_b.has_changed().unwrap());
        assert_eq!(a.renewal.failures(), 1);
        assert_eq!(b.renewal.failures(), 0);
        a.session_ended(&SessionEnd::Failed("gone".into()));
        assert_eq!(*a.advertised_version().borrow(), None);
    }
}
