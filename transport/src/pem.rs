//! PEM parsing with `rustls-pki-types` (`PemObject`).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// A PEM document that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// No certificate in the document.
    #[error("no CERTIFICATE block found")]
    NoCertificate,
    /// A block could not be decoded.
    #[error("malformed PEM: {0}")]
    Malformed(String),
    /// No private key in the document.
    #[error("no private key block found")]
    NoKey,
}

/// All certificates in a PEM document, in order.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM document. The error never contains
/// key material.
pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::NoKey,
        _ => PemError::Malformed("private key block could not be decoded".into()),
    })
}

/// Lowercase hex sha256 of a certificate's DER encoding: the form of a CA pin.
pub fn der_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Normalise a user-supplied sha256 pin: trims, lower-cases, strips a `sha256:` prefix and
/// `:` separators, and checks that 64 hex digits remain.
pub fn normalize_pin(pin: &str) -> Option<String> {
    let p = pin.trim().to_ascii_lowercase();
    let p = p.strip_prefix("sha256:").unwrap_or(&p).replace(':', "");
    (p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit())).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_normalised() {
        let h = "AB".repeat(32);
        assert_eq!(
            normalize_pin(&format!(" sha256:{h} ")),
            Some("ab".repeat(32))
        );
        assert_eq!(normalize_pin("abc"), None);
        assert_eq!(normalize_pin(&"zz".repeat(32)), None);
    }

    #[test]
    fn empty_documents_are_errors() {
        assert!(matches!(certificates(b""), Err(PemError::NoCertificate)));
        assert!(matches!(private_key(b"hello"), Err(PemError::NoKey)));
    }
}
