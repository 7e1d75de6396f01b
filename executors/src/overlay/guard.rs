//! The control-path guard: a peer set that would route the agent's own control channel, or
//! the tunnel's own underlay, into the tunnel is refused before anything is saved or changed.
//!
//! A peer's allowed IP is its overlay address alone (/32 or /128), so "capture" means one of:
//! - a peer's overlay address is the control plane's address (packets to the control plane would
//!   be encrypted to that peer);
//! - a peer's overlay address is one of this node's own underlay addresses;
//! - a peer's overlay address is another peer's endpoint (that peer's tunnel packets would be
//!   sent into the tunnel: a loop);
//! - the interface's own address prefix contains the control plane's address (the kernel routes
//!   the control plane to the overlay interface, where no peer takes it).

use std::collections::HashSet;
use std::net::IpAddr;

use super::plan::Want;

/// Why a set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Captured {
    /// A peer's overlay address is the control plane's.
    #[error(
        "peers[{index}].vpnIp {ip} is the control plane's address: the agent would route its own control channel into the tunnel"
    )]
    ControlPlane {
        /// The peer's index in the payload.
        index: usize,
        /// The address.
        ip: IpAddr,
    },
    /// A peer's overlay address is this node's underlay address.
    #[error("peers[{index}].vpnIp {ip} is one of this node's own underlay addresses")]
    OwnAddress {
        /// The peer's index in the payload.
        index: usize,
        /// The address.
        ip: IpAddr,
    },
    /// A peer's overlay address is another peer's endpoint.
    #[error(
        "peers[{index}].vpnIp {ip} is the endpoint of another peer: its tunnel would run through the tunnel"
    )]
    Endpoint {
        /// The peer's index in the payload.
        index: usize,
        /// The address.
        ip: IpAddr,
    },
    /// The interface's prefix covers the control plane.
    #[error(
        "the overlay interface's address {address}/{prefix} contains the control plane's address {ip}"
    )]
    Prefix {
        /// The interface address.
        address: IpAddr,
        /// Its prefix length.
        prefix: u8,
        /// The control plane's address.
        ip: IpAddr,
    },
}

/// Check `want` (in payload order) against the control plane's addresses, this node's own
/// underlay addresses and the overlay interface's addresses.
pub fn check(
    want: &[Want],
    control_plane: &[IpAddr],
    own_underlay: &[IpAddr],
    overlay_addresses: &[(IpAddr, u8)],
) -> Result<(), Captured> {
    for &ip in control_plane {
        for &(address, prefix) in overlay_addresses {
            if contains(address, prefix, ip) {
                return Err(Captured::Prefix {
                    address,
                    prefix,
                    ip,
                });
            }
        }
    }
    let endpoints: HashSet<IpAddr> = want.iter().map(|w| w.endpoint.ip()).collect();
    for (index, w) in want.iter().enumerate() {
        let ip = w.allowed;
        if control_plane.contains(&ip) {
            return Err(Captured::ControlPlane { index, ip });
        }
        if own_underlay.contains(&ip) {
            return Err(Captured::OwnAddress { index, ip });
        }
        if endpoints.contains(&ip) {
            return Err(Captured::Endpoint { index, ip });
        }
    }
    Ok(())
}

/// Whether `address/prefix` contains `ip` (same family only).
pub fn contains(address: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (address, ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let p = u32::from(prefix.min(32));
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let p = u32::from(prefix.min(128));
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(allowed: &str, endpoint: &str) -> Want {
        Want {
            key: [1; 32],
            endpoint: format!("{endpoint}:51820").parse().unwrap(),
            allowed: allowed.parse().unwrap(),
            keepalive: 0,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_set_that_would_capture_the_control_channel_is_refused() {
        let cp = [ip("198.51.100.10")];
        let own = [ip("192.0.2.5")];
        let overlay = [(ip("10.9.0.5"), 24)];
        let ok = [want("10.9.0.2", "192.0.2.2"), want("10.9.0.3", "192.0.2.3")];
        assert_eq!(check(&ok, &cp, &own, &overlay), Ok(()));
        let e = check(
            &[ok[0].clone(), want("198.51.100.10", "192.0.2.9")],
            &cp,
            &own,
            &overlay,
        )
        .unwrap_err();
        assert_eq!(
            e,
            Captured::ControlPlane {
                index: 1,
                ip: cp[0]
            }
        );
        assert!(e.to_string().contains("peers[1].vpnIp"));
        assert!(matches!(
            check(&[want("192.0.2.5", "192.0.2.9")], &cp, &own, &overlay),
            Err(Captured::OwnAddress { index: 0, .. })
        ));
        assert!(matches!(
            check(
                &[
                    want("10.9.0.2", "192.0.2.3"),
                    want("192.0.2.3", "192.0.2.4")
                ],
                &cp,
                &own,
                &overlay
            ),
            Err(Captured::Endpoint { index: 1, .. })
        ));
        assert!(matches!(
            check(&ok, &cp, &own, &[(ip("198.51.0.1"), 16)]),
            Err(Captured::Prefix { .. })
        ));
    }

    #[test]
    fn prefixes() {
        assert!(contains(ip("10.0.0.0"), 8, ip("10.200.1.1")));
        assert!(!contains(ip("10.0.0.0"), 16, ip("10.200.1.1")));
        assert!(contains(ip("0.0.0.0"), 0, ip("1.2.3.4")));
        assert!(contains(ip("1.2.3.4"), 32, ip("1.2.3.4")));
        assert!(contains(ip("fd00::"), 8, ip("fd12::1")));
        assert!(!contains(ip("fd00::"), 8, ip("10.0.0.1")));
    }
}
