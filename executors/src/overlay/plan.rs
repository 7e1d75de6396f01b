//! The diff between the desired peer set and the device: pure, so every rule is unit-tested
//! without a device.
//!
//! Rules:
//! - a desired peer missing from the device is **added**;
//! - a desired peer on the device whose allowed IPs or keepalive differ is **changed**
//!   (allowed IPs replaced, never appended);
//! - an endpoint difference is a change only when the control plane moved the endpoint (the
//!   desired endpoint differs from the previously desired one), when the device has none, or
//!   when the peer has had no handshake for [`ROAMING_TRUST`]. WireGuard updates a peer's
//!   endpoint to where its authenticated packets come from (roaming, NAT rebinding); resetting it
//!   on every reconcile would fight that and break working tunnels;
//! - a device peer absent from the desired set is **removed** only when the set is complete;
//! - everything else is **unchanged** and not touched: no handshake reset.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

/// How long after its last handshake a peer's own (roamed) endpoint is trusted over the
/// configured one: WireGuard's `Reject-After-Time` (180 s), after which the session is dead.
pub const ROAMING_TRUST: Duration = Duration::from_secs(180);

/// A peer as the node wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// The public key (32 bytes).
    pub key: [u8; 32],
    /// Where to send to.
    pub endpoint: SocketAddr,
    /// The one allowed IP: the peer's overlay address (/32 or /128).
    pub allowed: IpAddr,
    /// Persistent keepalive in seconds, 0 for none.
    pub keepalive: u16,
}

impl Want {
    /// The allowed IP's prefix length.
    pub fn prefix(&self) -> u8 {
        if self.allowed.is_ipv4() { 32 } else { 128 }
    }
}

/// A peer as the device has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Have {
    /// The public key.
    pub key: [u8; 32],
    /// Its endpoint, if it has one.
    pub endpoint: Option<SocketAddr>,
    /// Its allowed IPs.
    pub allowed: Vec<(IpAddr, u8)>,
    /// Persistent keepalive (`None` or `Some(0)`: none).
    pub keepalive: Option<u16>,
    /// The last handshake, when the backend reports a real time (see `device.rs`).
    pub last_handshake: Option<SystemTime>,
}

/// What to do to the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Peers to add.
    pub add: Vec<Want>,
    /// Peers to update (endpoint, allowed IPs replaced, keepalive).
    pub change: Vec<Want>,
    /// Keys of peers to remove.
    pub remove: Vec<[u8; 32]>,
    /// Desired peers already as wanted.
    pub unchanged: usize,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.change.is_empty() && self.remove.is_empty()
    }
}

/// The plan that takes `have` to `want`. `previous` is the endpoint each peer had in the
/// previously applied desired set; `remove_others` is true for a complete set.
pub fn plan(
    want: &[Want],
    have: &[Have],
    previous: &HashMap<[u8; 32], SocketAddr>,
    remove_others: bool,
    now: SystemTime,
) -> Plan {
    let by_key: HashMap<&[u8; 32], &Have> = have.iter().map(|h| (&h.key, h)).collect();
    let mut out = Plan::default();
    for w in want {
        let Some(h) = by_key.get(&w.key) else {
            out.add.push(w.clone());
            continue;
        };
        let allowed_same = h.allowed.len() == 1 && h.allowed[0] == (w.allowed, w.prefix());
        let keepalive_same = h.keepalive.unwrap_or(0) == w.keepalive;
        let endpoint_same = match h.endpoint {
            None => false,
            Some(e) if e == w.endpoint => true,
            Some(_) => {
                let moved_by_control = previous.get(&w.key).is_some_and(|p| *p != w.endpoint)
                    || !previous.contains_key(&w.key);
                let roamed_recently = h
                    .last_handshake
                    .is_some_and(|t| now.duration_since(t).is_ok_and(|age| age < ROAMING_TRUST));
                !moved_by_control && roamed_recently
            }
        };
        if allowed_same && keepalive_same && endpoint_same {
            out.unchanged += 1;
        } else {
            out.change.push(w.clone());
        }
    }
    if remove_others {
        let wanted: HashSet<&[u8; 32]> = want.iter().map(|w| &w.key).collect();
        out.remove = have
            .iter()
            .filter(|h| !wanted.contains(&h.key))
            .map(|h| h.key)
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(n: u8) -> Want {
        Want {
            key: [n; 32],
            endpoint: format!("192.0.2.{n}:51820").parse().unwrap(),
            allowed: format!("10.9.0.{n}").parse().unwrap(),
            keepalive: 25,
        }
    }

    fn have(w: &Want) -> Have {
        Have {
            key: w.key,
            endpoint: Some(w.endpoint),
            allowed: vec![(w.allowed, 32)],
            keepalive: Some(w.keepalive),
            last_handshake: None,
        }
    }

    fn prev(ws: &[Want]) -> HashMap<[u8; 32], SocketAddr> {
        ws.iter().map(|w| (w.key, w.endpoint)).collect()
    }

    #[test]
    fn only_what_differs_is_touched() {
        let ws: Vec<Want> = (1..=4).map(want).collect();
        let mut hs: Vec<Have> = ws[..3].iter().map(have).collect();
        hs[1].allowed.push(("10.9.9.9".parse().unwrap(), 32)); // extra allowed IP
        hs[2].keepalive = None; // keepalive off
        hs.push(have(&want(9))); // not wanted
        let p = plan(&ws, &hs, &prev(&ws), false, SystemTime::now());
        assert_eq!(p.add, vec![ws[3].clone()]);
        assert_eq!(p.change, vec![ws[1].clone(), ws[2].clone()]);
        assert_eq!(p.unchanged, 1);
        assert!(p.remove.is_empty(), "an additive set never removes");
        let p = plan(&ws, &hs, &prev(&ws), true, SystemTime::now());
        assert_eq!(p.remove, vec![[9; 32]]);
    }

    #[test]
    fn the_same_set_twice_is_a_no_op() {
        let ws: Vec<Want> = (1..=50).map(want).collect();
        let hs: Vec<Have> = ws.iter().map(have).collect();
        let p = plan(&ws, &hs, &prev(&ws), true, SystemTime::now());
        assert!(p.is_empty());
        assert_eq!(p.unchanged, 50);
    }

    #[test]
    fn a_roamed_endpoint_is_kept_while_the_session_lives() {
        let ws = vec![want(1)];
        let mut h = have(&ws[0]);
        h.endpoint = Some("198.51.100.7:40000".parse().unwrap()); // NAT rebinding
        let now = SystemTime::now();
        h.last_handshake = Some(now - Duration::from_secs(30));
        let p = plan(&ws, &[h.clone()], &prev(&ws), true, now);
        assert_eq!((p.change.len(), p.unchanged), (0, 1));
        // The session died: back to the configured endpoint.
        h.last_handshake = Some(now - Duration::from_secs(600));
        let p = plan(&ws, &[h.clone()], &prev(&ws), true, now);
        assert_eq!(p.change.len(), 1);
        // No handshake time known (a backend that does not report one): the configured one.
        h.last_handshake = None;
        assert_eq!(
            plan(&ws, &[h.clone()], &prev(&ws), true, now).change.len(),
            1
        );
        // The control plane moved the endpoint: applied even while the session lives.
        h.last_handshake = Some(now - Duration::from_secs(30));
        let mut old = prev(&ws);
        old.insert([1; 32], "192.0.2.200:51820".parse().unwrap());
        assert_eq!(plan(&ws, &[h], &old, true, now).change.len(), 1);
    }

    #[test]
    fn ipv6_peers_get_a_128_prefix() {
        let mut w = want(1);
        w.allowed = "fd00::1".parse().unwrap();
        assert_eq!(w.prefix(), 128);
        let mut h = have(&w);
        h.allowed = vec![(w.allowed, 128)];
        let p = plan(&[w.clone()], &[h], &prev(&[w]), true, SystemTime::now());
        assert_eq!(p.unchanged, 1);
    }
}
