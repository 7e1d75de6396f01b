//! The node identity carried in a client certificate.

use runos_protocol::NODE_URI_PREFIX;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Facts read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The node id from a `runos://node/<id>` URI SAN, if present.
    pub node_id: Option<String>,
    /// The serial number, lowercase hex.
    pub serial_hex: String,
    /// Not valid before, seconds since the Unix epoch.
    pub not_before: i64,
    /// Not valid after, seconds since the Unix epoch.
    pub not_after: i64,
}

/// A certificate that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("certificate cannot be parsed: {0}")]
pub struct CertParseError(String);

/// Parse the facts runos needs from a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, CertParseError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertParseError(e.to_string()))?;
    let mut node_id = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(id) = uri.strip_prefix(NODE_URI_PREFIX)
                && is_valid_node_id(id)
            {
                node_id = Some(id.to_string());
                break;
            }
        }
    }
    Ok(CertInfo {
        node_id,
        serial_hex: hex::encode(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Whether `id` is a well-formed node id: 1 to 64 characters of `[a-z0-9-]`.
pub fn is_valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
