//! Release versions: `vMAJOR.MINOR.PATCH`, decimal, no leading zeros, no pre-release or build
//! suffix (the updater installs final releases only).

use std::fmt;

/// A release version. Ordered numerically (major, minor, patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    major: u32,
    minor: u32,
    patch: u32,
}

/// Largest number of digits in one component.
const MAX_DIGITS: usize = 9;

impl Version {
    /// A version from its components.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Version {
            major,
            minor,
            patch,
        }
    }

    /// Parse a release tag, exactly `vX.Y.Z`.
    pub fn parse_tag(s: &str) -> Result<Self, String> {
        match s.strip_prefix('v') {
            Some(rest) => Self::parse_plain(rest).map_err(|()| bad()),
            None => Err(bad()),
        }
    }

    /// Parse `X.Y.Z` or `vX.Y.Z` (an agent's reported version, a protocol payload).
    pub fn parse_loose(s: &str) -> Result<Self, String> {
        Self::parse_plain(s.strip_prefix('v').unwrap_or(s)).map_err(|()| bad())
    }

    fn parse_plain(s: &str) -> Result<Self, ()> {
        let mut parts = s.split('.');
        let mut next = || -> Result<u32, ()> {
            let p = parts.next().ok_or(())?;
            if p.is_empty()
                || p.len() > MAX_DIGITS
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(());
            }
            p.parse().map_err(|_| ())
        };
        let v = Version::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(());
        }
        Ok(v)
    }

    /// The release tag, `vX.Y.Z`.
    pub fn tag(&self) -> String {
        format!("v{self}")
    }

    /// The version this binary reports ([`crate::agent_version`]).
    pub fn current() -> Result<Self, String> {
        Self::parse_loose(crate::agent_version())
    }
}

/// The error of every parse: it never repeats the text (which may come from a control plane,
/// protocol.md §7.2); callers say which value it was.
fn bad() -> String {
    "is not a release version: expected vMAJOR.MINOR.PATCH, e.g. v0.2.0".to_string()
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.tag())
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Version::parse_tag(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_tags_only() {
        assert_eq!(Version::parse_tag("v0.2.0").unwrap(), Version::new(0, 2, 0));
        assert_eq!(Version::parse_tag("v10.20.30").unwrap().tag(), "v10.20.30");
        for bad in [
            "",
            "v",
            "0.2.0",
            "v0.2",
            "v0.2.0.1",
            "v01.2.0",
            "v0.2.0-rc.1",
            "v0.2.0+b",
            "V0.2.0",
            "v 0.2.0",
            "v0..0",
            "v-1.0.0",
            "v1234567890.0.0",
            "v0.2.0\n",
            "v+1.0.0",
        ] {
            assert!(Version::parse_tag(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Version::parse_loose("0.1.0").unwrap(),
            Version::new(0, 1, 0)
        );
        assert_eq!(
            Version::parse_loose("v0.1.0").unwrap(),
            Version::new(0, 1, 0)
        );
        assert!(Version::parse_loose("0.1").is_err());
    }

    #[test]
    fn errors_never_repeat_the_text() {
        for bad in ["../../x", "v1.2.3-hunter2", "hunter2\n\x1b[31m"] {
            let e = Version::parse_loose(bad).unwrap_err();
            assert!(!e.contains("hunter2") && !e.contains("../"), "{e}");
            assert!(!Version::parse_tag(bad).unwrap_err().contains("hunter2"));
        }
    }

    #[test]
    fn orders_numerically() {
        let v = |s| Version::parse_tag(s).unwrap();
        assert!(v("v0.10.0") > v("v0.9.9"));
        assert!(v("v1.0.0") > v("v0.99.99"));
        assert!(v("v0.1.1") > v("v0.1.0"));
    }

    #[test]
    fn serde_round_trip() {
        let v = Version::new(1, 2, 3);
        let j = serde_json::to_string(&v).unwrap();
        assert_eq!(j, "\"v1.2.3\"");
        assert_eq!(serde_json::from_str::<Version>(&j).unwrap(), v);
        assert!(serde_json::from_str::<Version>("\"1.2.3\"").is_err());
    }
}
