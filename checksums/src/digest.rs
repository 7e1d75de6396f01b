//! The SHA-256 digest type.

use std::fmt;
use std::str::FromStr;

/// A SHA-256 digest: 32 bytes.
///
/// Equality is constant-time (it does not stop at the first differing byte), so comparing a
/// computed digest with an expected one leaks nothing through timing. `Display` and `to_hex`
/// give lowercase hex; [`FromStr`] accepts 64 hex digits of either case.
#[derive(Clone, Copy)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Length of a digest in bytes.
    pub const LEN: usize = 32;
    /// Length of a digest in hex digits.
    pub const HEX_LEN: usize = 64;

    /// A digest from its 32 bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits (upper or lower case, no prefix, no whitespace).
    pub fn from_hex(s: &str) -> Result<Self, DigestParseError> {
        s.parse()
    }
}

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

impl Eq for Digest {}

impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Consistent with `eq`, which compares all 32 bytes.
        self.0.hash(state);
    }
}

impl From<[u8; 32]> for Digest {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl From<Digest> for [u8; 32] {
    fn from(digest: Digest) -> Self {
        digest.0
    }
}

impl AsRef<[u8]> for Digest {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// Why a string is not a SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestParseError {
    /// Not 64 characters long.
    #[error("a sha256 digest is 64 hex digits, found {len} characters")]
    Length {
        /// The number of characters found.
        len: usize,
    },
    /// 64 characters, but not all of them hex digits.
    #[error("a sha256 digest is 64 hex digits, found a character that is not a hex digit")]
    NotHex,
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != Self::HEX_LEN {
            return Err(DigestParseError::Length {
                len: s.chars().count(),
            });
        }
        if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DigestParseError::NotHex);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestParseError::NotHex)?;
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn parses_either_case_and_displays_lowercase() {
        let lower: Digest = ABC.parse().unwrap();
        let upper: Digest = ABC.to_uppercase().parse().unwrap();
        assert_eq!(lower, upper);
        assert_eq!(upper.to_string(), ABC);
        assert_eq!(upper.to_hex(), ABC);
        assert_eq!(format!("{upper:?}"), format!("Digest({ABC})"));
    }

    #[test]
    fn rejects_wrong_length_and_non_hex() {
        assert_eq!(
            Digest::from_hex(&ABC[..63]),
            Err(DigestParseError::Length { len: 63 })
        );
        assert_eq!(
            Digest::from_hex(&format!("{ABC}0")),
            Err(DigestParseError::Length { len: 65 })
        );
        assert_eq!(
            Digest::from_hex(""),
            Err(DigestParseError::Length { len: 0 })
        );
        let mut bad = ABC.to_string();
        bad.replace_range(10..11, "g");
        assert_eq!(Digest::from_hex(&bad), Err(DigestParseError::NotHex));
        // 64 bytes of multi-byte characters: not hex.
        let wide = "é".repeat(32);
        assert_eq!(wide.len(), 64);
        assert_eq!(Digest::from_hex(&wide), Err(DigestParseError::NotHex));
        assert!(Digest::from_hex(&format!("+{}", &ABC[1..])).is_err());
    }

    #[test]
    fn equality_is_by_value() {
        let a = Digest::from_bytes([7; 32]);
        let mut bytes = [7; 32];
        bytes[31] = 8;
        assert_ne!(a, Digest::from(bytes));
        assert_eq!(a, Digest::from([7; 32]));
        assert_eq!(<[u8; 32]>::from(a), [7; 32]);
    }
}
