//! Strict sha256sum manifests (`checksums.txt`) and streaming SHA-256.
//!
//! - [`Digest`]: a SHA-256 value (32 bytes). Compared in constant time, shown as lowercase hex,
//!   parsed from 64 hex digits of either case.
//! - [`Manifest`]: a parsed `checksums.txt`. [`Manifest::parse`] accepts exactly the GNU
//!   `sha256sum` output for plain file names and rejects everything else with a
//!   [`ManifestError`] naming the line (see [`Manifest::parse`] for the rules). Its
//!   [`Display`](std::fmt::Display) is the canonical form `<hex>  <name>\n`, which parses back
//!   to the same manifest.
//! - [`sha256_reader`], [`sha256_file`], [`Sha256Hasher`]: streaming SHA-256 with a fixed
//!   64 KiB buffer, whatever the input size.
//!
//! The crate reads only what it is given: no network, no paths other than the one passed to
//! [`sha256_file`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod digest;
mod hash;
mod manifest;

pub use digest::{Digest, DigestParseError};
pub use hash::{Sha256Hasher, sha256, sha256_file, sha256_reader};
pub use manifest::{
    Entry, MAX_ENTRIES, MAX_MANIFEST_BYTES, MAX_NAME_BYTES, Manifest, ManifestError, NameError,
    validate_name,
};
