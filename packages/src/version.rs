//! Debian version ordering (deb-version(7), dpkg's `verrevcmp`), for choosing the highest
//! available `upstream-*` version without asking dpkg for every pair.

use std::cmp::Ordering;

/// A Debian version split into its parts: `[epoch:]upstream[-revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebVersion<'a> {
    /// The epoch (0 when absent).
    pub epoch: u64,
    /// The upstream version.
    pub upstream: &'a str,
    /// The Debian revision (empty when absent, which orders like `0`).
    pub revision: &'a str,
}

impl<'a> DebVersion<'a> {
    /// Split `v`. An epoch that is not a number reads as 0 (validated versions always have a
    /// numeric one).
    pub fn parse(v: &'a str) -> Self {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        let (upstream, revision) = rest.rsplit_once('-').unwrap_or((rest, ""));
        DebVersion {
            epoch,
            upstream,
            revision,
        }
    }
}

/// dpkg's character order: `~` before everything (even the end), then the end and digits,
/// then letters, then everything else.
fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(b'~') => -1,
        Some(c) => i32::from(c) + 256,
    }
}

/// dpkg's `verrevcmp`: alternating non-digit and digit runs.
fn verrevcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// Compare two Debian versions as dpkg does.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (a, b) = (DebVersion::parse(a), DebVersion::parse(b));
    a.epoch
        .cmp(&b.epoch)
        .then_with(|| verrevcmp(a.upstream, b.upstream))
        .then_with(|| verrevcmp(a.revision, b.revision))
}

/// Whether `version` is `upstream` with some Debian revision (`1.30.2` matches `1.30.2-1.1`
/// and `1:1.30.2-1`, not `1.30.20-1` nor `1.30.2`).
pub fn has_upstream(version: &str, upstream: &str) -> bool {
    let v = DebVersion::parse(version);
    v.upstream == upstream && version.contains('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_follows_dpkg() {
        use Ordering::*;
        // Cases from deb-version(7) and dpkg's own test suite.
        for (a, b, want) in [
            ("1.0", "1.0", Equal),
            ("1.0-1", "1.0-1", Equal),
            ("1.0", "1.0-0", Equal),
            ("0:1.0", "1.0", Equal),
            ("1.0", "1.1", Less),
            ("1.2", "1.10", Less),
            ("1.0~rc1", "1.0", Less),
            ("1.0~~", "1.0~", Less),
            ("1.0~", "1.0", Less),
            ("1.0", "1.0a", Less),
            ("1.0a", "1.0+", Less),
            ("1.0+", "1.0.1", Less),
            ("1:0.1", "2.0", Greater),
            ("1.30.2-1.1", "1.30.2-1", Greater),
            ("1.30.2-10", "1.30.2-9", Greater),
            ("1.30.2-1.1", "1.30.10-1.1", Less),
            ("2.10-3", "2.10-3+b1", Less),
            ("1.7.12-1+deb12u1", "1.7.12-1", Greater),
            ("007", "7", Equal),
            ("1.001", "1.1", Equal),
            ("a", "b", Less),
            ("1.0-1~bpo1", "1.0-1", Less),
        ] {
            assert_eq!(compare(a, b), want, "{a} vs {b}");
            assert_eq!(compare(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    /// The same pairs through `dpkg --compare-versions`, when dpkg is installed: our order is
    /// dpkg's.
    #[test]
    fn ordering_agrees_with_dpkg_when_present() {
        let vs = [
            "1.0",
            "1.0-0",
            "1.0-1",
            "1.0~rc1",
            "1.0~~",
            "1.0~",
            "1.0a",
            "1.0+",
            "1.0.1",
            "1:0.1",
            "2.0",
            "1.30.2-1.1",
            "1.30.2-1",
            "1.30.10-1.1",
            "2.10-3+b1",
            "007",
            "7",
            "1.0-1~bpo1",
        ];
        for a in vs {
            for b in vs {
                let Ok(st) = std::process::Command::new("dpkg")
                    .args(["--compare-versions", a, "lt", b])
                    .status()
                else {
                    eprintln!("skipped: dpkg is not installed");
                    return;
                };
                assert_eq!(st.success(), compare(a, b) == Ordering::Less, "{a} < {b}");
            }
        }
    }

    #[test]
    fn upstream_match() {
        assert!(has_upstream("1.30.2-1.1", "1.30.2"));
        assert!(has_upstream("1:1.30.2-1", "1.30.2"));
        assert!(has_upstream("1.30.2-0-1", "1.30.2-0"));
        assert!(!has_upstream("1.30.20-1", "1.30.2"));
        assert!(!has_upstream("1.30.2", "1.30.2"));
        assert!(!has_upstream("1.30.2.1-1", "1.30.2"));
    }

    #[test]
    fn parts() {
        let v = DebVersion::parse("2:1.2-3-4");
        assert_eq!((v.epoch, v.upstream, v.revision), (2, "1.2-3", "4"));
    }
}
