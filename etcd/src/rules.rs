//! The two pure rules of a removal: which member an address names, and whether removing it keeps
//! quorum.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The IP address a peer URL's host is, or `None` (a DNS name, not a URL, no host). The host
/// is taken from the URL's text as written (after `scheme://` and any `user@`, before the
/// `:port` and any path) and must be an IP literal in the form etcd itself accepts: dotted
/// decimal IPv4 or bracketed IPv6. Never the WHATWG shorthands (`10.1`, `0x0a.0.0.1`,
/// `010.0.0.1`, `167772161`), which etcd treats as host names. IPv6 letter case and zero
/// compression, IPv4-mapped IPv6 (`::ffff:a.b.c.d`) and an IPv4 host with a trailing dot are
/// normalised; a zone (`%eth0`) never matches; DNS names are never resolved.
pub fn url_host_ip(url: &str) -> Option<IpAddr> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let mut sb = scheme.bytes();
    if !sb.next().is_some_and(|b| b.is_ascii_alphabetic())
        || !sb.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let ip = if let Some(r) = hostport.strip_prefix('[') {
        let (h, after) = r.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) if port_ok(p) => {}
            None if after.is_empty() => {}
            _ => return None,
        }
        IpAddr::V6(h.parse::<Ipv6Addr>().ok()?)
    } else {
        let h = match hostport.rsplit_once(':') {
            Some((h, p)) if port_ok(p) => h,
            Some(_) => return None,
            None => hostport,
        };
        let h = h.strip_suffix('.').unwrap_or(h);
        IpAddr::V4(h.parse::<Ipv4Addr>().ok()?)
    };
    Some(ip.to_canonical())
}

/// Whether one of `peer_urls` has exactly `ip` as its host (compared as addresses, never as
/// text: `10.0.0.1` does not match `10.0.0.11`).
pub fn peer_urls_match(peer_urls: &[String], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    peer_urls.iter().any(|u| url_host_ip(u) == Some(ip))
}

/// What the quorum rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumInput {
    /// Voting members (not learners), the target included when it votes.
    pub voters: usize,
    /// Voting members that answered their health probe, the target included when it did.
    pub healthy_voters: usize,
    /// The target is a learner.
    pub target_is_learner: bool,
    /// The target answered its health probe.
    pub target_healthy: bool,
}

/// The numbers behind an allowed removal (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumOk {
    /// Voting members after the removal.
    pub voters_after: usize,
    /// Their quorum.
    pub quorum_after: usize,
    /// Healthy voters after the removal.
    pub healthy_after: usize,
}

/// The quorum rule: a learner may always go (it does not vote); the last voting member never;
/// otherwise the healthy voters left must be at least a majority of the voters left
/// (`floor((n-1)/2)+1`). `Err` says why, with the numbers.
pub fn check_quorum(q: QuorumInput) -> Result<QuorumOk, String> {
    if q.target_is_learner {
        let healthy = q.healthy_voters;
        return Ok(QuorumOk {
            voters_after: q.voters,
            quorum_after: q.voters / 2 + 1,
            healthy_after: healthy,
        });
    }
    if q.voters <= 1 {
        return Err(format!(
            "it is the last voting member of the cluster ({} voting member(s)); removing it would destroy the cluster",
            q.voters
        ));
    }
    let voters_after = q.voters - 1;
    let quorum_after = voters_after / 2 + 1;
    let healthy_after = q
        .healthy_voters
        .saturating_sub(usize::from(q.target_healthy));
    if healthy_after < quorum_after {
        return Err(format!(
            "quorum would be lost: after the removal {voters_after} voting member(s) remain, which need {quorum_after} healthy for quorum, but only {healthy_after} are healthy ({} of {} voting members are healthy now, the target {})",
            q.healthy_voters,
            q.voters,
            if q.target_healthy {
                "included"
            } else {
                "not among them"
            }
        ));
    }
    Ok(QuorumOk {
        voters_after,
        quorum_after,
        healthy_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_compared_as_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (url, want) in [
            ("https://10.0.0.1:2380", Some("10.0.0.1")),
            ("http://10.0.0.11:2380", Some("10.0.0.11")),
            ("https://10.0.0.1.:2380", Some("10.0.0.1")),
            ("https://[fd00::1]:2380", Some("fd00::1")),
            ("https://[FD00:0::1]:2380", Some("fd00::1")),
            ("https://[::ffff:10.0.0.1]:2380", Some("10.0.0.1")),
            ("unix://10.0.0.1:2380", Some("10.0.0.1")),
            ("unix://[::1]:2380", Some("::1")),
            (" https://10.0.0.1:2380 ", Some("10.0.0.1")),
            ("https://etcd-1.example:2380", None),
            ("https://localhost:2380", None),
            ("10.0.0.1:2380", None),
            ("", None),
            ("https://:2380", None),
            // What the URL standard reads as IPv4 but etcd (Go) as a host name: never an address.
            ("https://10.1:2380", None),
            ("https://010.0.0.1:2380", None),
            ("https://0x0a.0.0.1:2380", None),
            ("https://167772161:2380", None),
            // Userinfo, a path, no port; a zone, junk after the brackets, a bad port.
            ("https://u@10.0.0.1:2380", Some("10.0.0.1")),
            ("https://10.0.0.1:2380/x?y#z", Some("10.0.0.1")),
            ("https://10.0.0.1", Some("10.0.0.1")),
            ("https://[fd00::1]", Some("fd00::1")),
            ("https://[fe80::1%25eth0]:2380", None),
            ("https://[fe80::1%eth0]:2380", None),
            ("https://[fd00::1]x:2380", None),
            ("https://10.0.0.1:23x0", None),
            ("https://fd00::1:2380", None),
            ("https://10.0.0.1%2e:2380", None),
            ("://10.0.0.1:2380", None),
            ("1https://10.0.0.1:2380", None),
        ] {
            assert_eq!(url_host_ip(url), want.map(ip), "{url}");
        }
    }

    #[test]
    fn no_substring_matches() {
        let urls = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let table: &[(&[&str], &str, bool)] = &[
            (&["https://10.0.0.11:2380"], "10.0.0.1", false),
            (&["https://10.0.0.1:2380"], "10.0.0.11", false),
            (&["https://110.0.0.1:2380"], "10.0.0.1", false),
            (&["https://10.0.0.1:23801"], "10.0.0.1", true),
            (
                &["https://10.0.0.2:2380", "https://10.0.0.1:2380"],
                "10.0.0.1",
                true,
            ),
            (&["https://[fd00::10]:2380"], "fd00::1", false),
            (&["https://[fd00::1]:2380"], "fd00:0:0::1", true),
            (&["https://10.0.0.1:2380"], "::ffff:10.0.0.1", true),
            (&["https://[::ffff:10.0.0.1]:2380"], "10.0.0.1", true),
            (&["https://node-10.0.0.1.example:2380"], "10.0.0.1", false),
            (&["https://10.1:2380"], "10.0.0.1", false),
            (&["https://010.0.0.1:2380"], "8.0.0.1", false),
            (&[], "10.0.0.1", false),
        ];
        for (u, i, want) in table {
            assert_eq!(peer_urls_match(&urls(u), ip(i)), *want, "{u:?} {i}");
        }
    }

    #[test]
    fn quorum_table() {
        // (voters, healthy voters, target is learner, target healthy) -> allowed
        let table = [
            ((1, 1, false, true), false), // the last voter
            ((0, 0, true, false), true),  // a learner needs no quorum check
            ((2, 2, false, true), true),  // 2 → 1: needs 1, 1 left
            ((2, 1, false, true), false), // 2 → 1: the other one is down
            ((2, 1, false, false), true), // removing the dead one of two
            ((3, 3, false, true), true),
            ((3, 2, false, true), false), // one down already: removing a healthy one
            ((3, 2, false, false), true), // removing the dead one
            ((4, 4, false, true), true),  // 4 → 3: needs 2, 3 left
            ((4, 3, false, true), true),  // 4 → 3: needs 2, 2 left
            ((4, 2, false, true), false), // 4 → 3: needs 2, 1 left
            ((4, 2, false, false), true), // 4 → 3: needs 2, 2 left
            ((5, 3, false, true), false), // 5 → 4: needs 3, 2 left
            ((5, 4, false, true), true),
            ((5, 3, false, false), true),
            ((3, 1, true, true), true), // a learner, even with voters down
        ];
        for ((voters, healthy_voters, target_is_learner, target_healthy), want) in table {
            let r = check_quorum(QuorumInput {
                voters,
                healthy_voters,
                target_is_learner,
                target_healthy,
            });
            assert_eq!(
                r.is_ok(),
                want,
                "{voters} {healthy_voters} {target_is_learner} {target_healthy}: {r:?}"
            );
        }
        let e = check_quorum(QuorumInput {
            voters: 3,
            healthy_voters: 2,
            target_is_learner: false,
            target_healthy: true,
        })
        .unwrap_err();
        assert!(e.contains("2 voting member(s) remain, which need 2"), "{e}");
        assert!(e.contains("only 1 are healthy"), "{e}");
    }
}
