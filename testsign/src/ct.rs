//! The CT-log-like signer: RFC 6962 signed certificate timestamps for
//! precertificates, and the embedded SCT list extension.

use anyhow::{Context, Result, ensure};
use sha2::{Digest, Sha256};
use x509_cert::certificate::Certificate;
use x509_cert::der::asn1::OctetString;
use x509_cert::der::{Decode, Encode};

use crate::keys::EcKey;
use crate::x509::{CT_PRECERT_POISON, CT_PRECERT_SCTS};

/// RFC 6962 `Version.v1`.
const SCT_V1: u8 = 0;
/// RFC 6962 `SignatureType.certificate_timestamp`.
const CERTIFICATE_TIMESTAMP: u8 = 0;
/// RFC 6962 `LogEntryType.precert_entry`.
const PRECERT_ENTRY: u16 = 1;
/// RFC 5246 `HashAlgorithm.sha256` / `sha384`, `SignatureAlgorithm.ecdsa`.
const HASH_SHA256: u8 = 4;
const HASH_SHA384: u8 = 5;
const SIG_ECDSA: u8 = 3;

fn push_u16_prefixed(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    let len = u16::try_from(bytes.len()).context("TLS vector longer than 2^16")?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn push_u24_prefixed(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    ensure!(bytes.len() < 1 << 24, "TLS vector longer than 2^24");
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(bytes);
    Ok(())
}

/// What the CT log does when it is handed a precertificate: checks the
/// poison extension, removes it, and signs the RFC 6962 §3.2
/// `digitally-signed` struct over the precert entry
/// (`issuer_key_hash` = SHA-256 of the issuer's SubjectPublicKeyInfo, the
/// TBSCertificate without the poison). Returns the serialized SCT.
pub(crate) fn sign_precertificate(
    log_key: &EcKey,
    precert_der: &[u8],
    issuer_spki_der: &[u8],
    timestamp_ms: u64,
) -> Result<Vec<u8>> {
    let precert = Certificate::from_der(precert_der).context("parsing the precertificate")?;
    let mut tbs = precert.tbs_certificate;
    let exts = tbs
        .extensions
        .as_mut()
        .context("precertificate without extensions")?;
    let before = exts.len();
    exts.retain(|e| e.extn_id != CT_PRECERT_POISON);
    ensure!(
        exts.len() + 1 == before,
        "precertificate must carry exactly one poison extension"
    );
    ensure!(
        exts.iter().all(|e| e.extn_id != CT_PRECERT_SCTS),
        "precertificate must not carry SCTs"
    );
    let tbs_der = tbs.to_der().context("encoding the precert TBS")?;
    let issuer_key_hash: [u8; 32] = Sha256::digest(issuer_spki_der).into();

    let mut signed = vec![SCT_V1, CERTIFICATE_TIMESTAMP];
    signed.extend_from_slice(&timestamp_ms.to_be_bytes());
    signed.extend_from_slice(&PRECERT_ENTRY.to_be_bytes());
    signed.extend_from_slice(&issuer_key_hash);
    push_u24_prefixed(&mut signed, &tbs_der)?;
    push_u16_prefixed(&mut signed, &[])?; // CtExtensions
    let signature = log_key.sign(&signed)?;

    let mut sct = vec![SCT_V1];
    sct.extend_from_slice(&log_key.key_id());
    sct.extend_from_slice(&timestamp_ms.to_be_bytes());
    push_u16_prefixed(&mut sct, &[])?; // CtExtensions
    sct.push(if log_key.is_p384() {
        HASH_SHA384
    } else {
        HASH_SHA256
    });
    sct.push(SIG_ECDSA);
    push_u16_prefixed(&mut sct, &signature)?;
    Ok(sct)
}

/// The `extnValue` contents of the SCT list extension (RFC 6962 §3.3): a DER
/// OCTET STRING wrapping the TLS `SignedCertificateTimestampList`.
pub(crate) fn sct_list_extension_value(scts: &[Vec<u8>]) -> Result<Vec<u8>> {
    let mut list = Vec::new();
    for sct in scts {
        push_u16_prefixed(&mut list, sct)?;
    }
    let mut tls = Vec::new();
    push_u16_prefixed(&mut tls, &list)?;
    Ok(OctetString::new(tls)?.to_der()?)
}
