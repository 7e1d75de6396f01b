//! The Sigstore trusted root: Fulcio CAs, Rekor and CT log keys, timestamp authorities.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use runos_checksums::{Digest, sha256};
use sigstore_verify::Verifier;

use crate::error::RootError;
use crate::sanitize;

/// Largest trusted root accepted: 1 MiB (the public-good root is 7 KB, GitHub's 32 KB).
pub const MAX_TRUSTED_ROOT_BYTES: usize = 1024 * 1024;

/// The pinned public-good `trusted_root.json` compiled into the crate
/// (`attest/trusted-roots/public-good.json`; its README says where it comes from).
pub const PUBLIC_GOOD_TRUSTED_ROOT: &str = include_str!("../trusted-roots/public-good.json");

/// SHA-256 of [`PUBLIC_GOOD_TRUSTED_ROOT`]. A test keeps the two in step.
pub const PUBLIC_GOOD_TRUSTED_ROOT_SHA256: &str =
    "6494e21ea73fa7ee769f85f57d5a3e6a08725eae1e38c755fc3517c9e6bc0b66";

/// Media types of a `trusted_root.json` this crate accepts.
const TRUSTED_ROOT_MEDIA_TYPES: &[&str] = &[
    "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
    "application/vnd.dev.sigstore.trustedroot.v0.2+json",
];

/// Where a [`TrustedRoot`] came from, for logs and audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RootSource {
    /// The embedded public-good root.
    PublicGood,
    /// A file (configured by the operator).
    File(PathBuf),
    /// JSON given by the caller.
    Json,
}

impl fmt::Display for RootSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PublicGood => f.write_str("embedded Sigstore public-good root"),
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Json => f.write_str("caller-supplied trusted root"),
        }
    }
}

/// A loaded, checked trusted root, ready to verify bundles.
///
/// Loading parses the JSON and prepares every key and certificate in it (sigstore-verify's
/// `Verifier::new`), so a root that cannot be used fails here, not at the first update. The
/// root must hold at least one Fulcio CA, one Rekor log and one CT log, since [`verify`]
/// requires all three kinds of evidence.
///
/// [`verify`]: crate::verify
pub struct TrustedRoot {
    verifier: Verifier,
    sha256: Digest,
    source: RootSource,
}

impl fmt::Debug for TrustedRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedRoot")
            .field("source", &self.source)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl TrustedRoot {
    /// The embedded public-good root ([`PUBLIC_GOOD_TRUSTED_ROOT`]).
    pub fn public_good() -> Result<Self, RootError> {
        Self::load(PUBLIC_GOOD_TRUSTED_ROOT.as_bytes(), RootSource::PublicGood)
    }

    /// A root from `trusted_root.json` bytes (at most [`MAX_TRUSTED_ROOT_BYTES`]).
    pub fn from_json(json: &[u8]) -> Result<Self, RootError> {
        Self::load(json, RootSource::Json)
    }

    /// A root from a `trusted_root.json` file (at most [`MAX_TRUSTED_ROOT_BYTES`]; a larger
    /// file is refused without being read whole).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, RootError> {
        let path = path.as_ref();
        let read_err = |source| RootError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_TRUSTED_ROOT_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        Self::load(&bytes, RootSource::File(path.to_path_buf()))
    }

    fn load(json: &[u8], source: RootSource) -> Result<Self, RootError> {
        if json.len() > MAX_TRUSTED_ROOT_BYTES {
            return Err(RootError::TooLarge {
                max: MAX_TRUSTED_ROOT_BYTES,
            });
        }
        let text =
            std::str::from_utf8(json).map_err(|_| RootError::Malformed("not UTF-8".to_string()))?;
        let root = sigstore_trust_root::TrustedRoot::from_json(text)
            .map_err(|e| RootError::Malformed(sanitize(&e.to_string(), 240)))?;
        if !TRUSTED_ROOT_MEDIA_TYPES.contains(&root.media_type.as_str()) {
            return Err(RootError::Malformed(format!(
                "media type {:?} is not a Sigstore trusted root",
                sanitize(&root.media_type, 80)
            )));
        }
        for (what, empty) in [
            (
                "Fulcio certificate authority",
                root.certificate_authorities.is_empty(),
            ),
            ("Rekor transparency log", root.tlogs.is_empty()),
            ("certificate transparency log", root.ctlogs.is_empty()),
        ] {
            if empty {
                return Err(RootError::Unusable(format!("it holds no {what}")));
            }
        }
        let verifier =
            Verifier::new(&root).map_err(|e| RootError::Unusable(sanitize(&e.to_string(), 240)))?;
        Ok(Self {
            verifier,
            sha256: sha256(json),
            source,
        })
    }

    /// SHA-256 of the JSON this root was loaded from (to log which root verified an update).
    pub fn sha256(&self) -> Digest {
        self.sha256
    }

    /// Where it came from.
    pub fn source(&self) -> &RootSource {
        &self.source
    }

    pub(crate) fn verifier(&self) -> &Verifier {
        &self.verifier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_root_is_the_pinned_one() {
        assert_eq!(
            sha256(PUBLIC_GOOD_TRUSTED_ROOT.as_bytes()).to_hex(),
            PUBLIC_GOOD_TRUSTED_ROOT_SHA256
        );
        // The hash the research report and the fixtures README cite for the public-good root.
        assert_eq!(
            PUBLIC_GOOD_TRUSTED_ROOT_SHA256,
            "6494e21ea73fa7ee769f85f57d5a3e6a08725eae1e38c755fc3517c9e6bc0b66"
        );
        assert_eq!(PUBLIC_GOOD_TRUSTED_ROOT.len(), 6787);
        let root = TrustedRoot::public_good().unwrap();
        assert_eq!(root.sha256().to_hex(), PUBLIC_GOOD_TRUSTED_ROOT_SHA256);
        assert_eq!(root.source(), &RootSource::PublicGood);
        assert!(format!("{root:?}").contains(PUBLIC_GOOD_TRUSTED_ROOT_SHA256));
    }

    #[test]
    fn from_json_and_from_file() {
        let root = TrustedRoot::from_json(PUBLIC_GOOD_TRUSTED_ROOT.as_bytes()).unwrap();
        assert_eq!(root.source(), &RootSource::Json);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trusted_root.json");
        std::fs::write(&path, PUBLIC_GOOD_TRUSTED_ROOT).unwrap();
        let root = TrustedRoot::from_file(&path).unwrap();
        assert_eq!(root.source(), &RootSource::File(path.clone()));
        assert_eq!(root.source().to_string(), path.display().to_string());
        assert!(matches!(
            TrustedRoot::from_file(dir.path().join("missing")),
            Err(RootError::Read { .. })
        ));
        assert!(matches!(
            TrustedRoot::from_file(dir.path()),
            Err(RootError::Read { .. })
        ));
    }

    #[test]
    fn bounds_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_TRUSTED_ROOT_BYTES + 1]).unwrap();
        assert!(matches!(
            TrustedRoot::from_file(&big),
            Err(RootError::TooLarge { .. })
        ));
        assert!(matches!(
            TrustedRoot::from_json(&vec![b' '; MAX_TRUSTED_ROOT_BYTES + 1]),
            Err(RootError::TooLarge { .. })
        ));
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            b"null",
            b"\xff\xfe",
            &PUBLIC_GOOD_TRUSTED_ROOT.as_bytes()[..1000],
        ] {
            assert!(
                matches!(TrustedRoot::from_json(bad), Err(RootError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(PUBLIC_GOOD_TRUSTED_ROOT).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn wrong_media_type_and_missing_authorities() {
        let json = edited(|v| v["mediaType"] = "application/json".into());
        assert!(matches!(
            TrustedRoot::from_json(&json),
            Err(RootError::Malformed(_))
        ));
        for key in ["certificateAuthorities", "tlogs", "ctlogs"] {
            let json = edited(|v| v[key] = serde_json::json!([]));
            assert!(
                matches!(TrustedRoot::from_json(&json), Err(RootError::Unusable(_))),
                "{key}"
            );
        }
        // A Rekor key that is not a key.
        let json = edited(|v| v["tlogs"][0]["publicKey"]["rawBytes"] = "AAAA".into());
        assert!(matches!(
            TrustedRoot::from_json(&json),
            Err(RootError::Unusable(_) | RootError::Malformed(_))
        ));
    }
}
