//! The certificate authority: CA creation and loading, the server certificate, and signing of
//! node CSRs with the node identity in the SAN.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use x509_parser::prelude::FromDer as _;

use crate::Error;
use crate::util;

/// File name of the CA certificate in the data directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in the data directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the server certificate in the data directory.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the server private key in the data directory (mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key";

/// Default validity of node certificates.
pub const DEFAULT_NODE_CERT_VALIDITY: Duration = Duration::from_secs(30 * 86400);

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// Backdating of `notBefore` of the server certificate, which agents verify with their own
/// clocks, to tolerate small clock differences.
const BACKDATE: Duration = Duration::from_secs(300);
/// Backdating of node certificates. Only the control plane verifies them, with the clock that
/// issued them; a short backdate keeps "two thirds of the lifetime" meaningful for
/// minute-long certificates.
const NODE_BACKDATE: Duration = Duration::from_secs(30);

/// Why a CSR was refused (maps to `bad_request`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CsrError(pub String);

/// A certificate issued to a node.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub pem: String,
    /// The serial number, lowercase hex of its DER integer bytes (as `cert_info` reports it).
    pub serial_hex: String,
    /// notBefore, ms since the epoch.
    pub not_before_ms: i64,
    /// notAfter, ms since the epoch.
    pub not_after_ms: i64,
}

/// The loaded CA and the server's TLS identity.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("ca_sha256", &self.ca_sha256())
            .finish_non_exhaustive()
    }
}

fn ca_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Ca(format!("{what}: {e}"))
}

fn offset_time(now_ms: i64, delta: Duration, forward: bool) -> Result<time::OffsetDateTime, Error> {
    let d = util::ms(delta);
    let t = if forward {
        now_ms.saturating_add(d)
    } else {
        now_ms.saturating_sub(d)
    };
    // Whole seconds: X.509 times have second precision.
    time::OffsetDateTime::from_unix_timestamp(t / 1000).map_err(|e| ca_err("time out of range", e))
}

/// Parameters of an end-entity certificate: one common name, the given SANs, digital signature
/// for `eku` only, a random serial, backdated by `backdate` and valid for `validity`.
fn leaf_params(
    common_name: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    now: i64,
    backdate: Duration,
    validity: Duration,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = offset_time(now, backdate, false)?;
    params.not_after = offset_time(now, validity, true)?;
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, so its DER form is exactly these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// Load the CA from `dir`, creating it on first start, and (re)issue the server certificate
    /// for `hostnames` (plus `localhost`, `127.0.0.1`, `::1`).
    pub fn load_or_create(dir: &Path, hostnames: &[String]) -> Result<Ca, Error> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let (ca_pem, key) = match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let pem =
                    std::fs::read_to_string(&cert_path).map_err(|e| Error::io(&cert_path, e))?;
                let key_pem =
                    std::fs::read_to_string(&key_path).map_err(|e| Error::io(&key_path, e))?;
                let key = KeyPair::from_pem(&key_pem).map_err(|_| {
                    Error::Ca(format!("{} is not a usable key", key_path.display()))
                })?;
                (pem, key)
            }
            (false, false) => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| ca_err("generating the CA key", e))?;
                let now = util::now_ms();
                let mut params = CertificateParams::default();
                let mut dn = DistinguishedName::new();
                dn.push(DnType::CommonName, "runos control plane CA");
                params.distinguished_name = dn;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                params.serial_number = Some(random_serial());
                params.not_before = offset_time(now, BACKDATE, false)?;
                params.not_after = offset_time(now, CA_VALIDITY, true)?;
                let cert = params
                    .self_signed(&key)
                    .map_err(|e| ca_err("self-signing the CA", e))?;
                // Key first: a CA certificate without its key would be useless.
                util::atomic_write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
                util::atomic_write(&cert_path, cert.pem().as_bytes(), 0o644)?;
                tracing::info!(path = %cert_path.display(), "created a new certificate authority");
                (cert.pem(), key)
            }
            _ => {
                return Err(Error::Ca(format!(
                    "only one of {} and {} exists; restore the other or remove both to create a \
                     new CA (which invalidates every node certificate)",
                    cert_path.display(),
                    key_path.display()
                )));
            }
        };
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(Error::Ca("the CA key is not ECDSA P-256".into()));
        }
        let ca_der = runos_transport::pem::certificates(ca_pem.as_bytes())
            .map_err(|e| ca_err("ca.pem", e))?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Ca("ca.pem holds no certificate".into()))?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| ca_err("ca.pem cannot be used as an issuer", e))?;
        let mut ca = Ca {
            issuer,
            ca_pem,
            ca_der,
            server_chain: Vec::new(),
            server_key_pem: String::new(),
        };
        ca.issue_server_cert(dir, hostnames)?;
        Ok(ca)
    }

    fn issue_server_cert(&mut self, dir: &Path, hostnames: &[String]) -> Result<(), Error> {
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for h in hostnames {
            if !names.contains(h) {
                names.push(h.clone());
            }
        }
        let mut sans = Vec::with_capacity(names.len());
        for n in &names {
            sans.push(match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|_| Error::Ca(format!("{n:?} is not a valid host name")))?,
                ),
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| ca_err("generating the server key", e))?;
        let now = util::now_ms();
        let params = leaf_params(
            "runos control plane",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            now,
            BACKDATE,
            SERVER_CERT_VALIDITY,
        )?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| ca_err("signing the server certificate", e))?;
        let key_pem = key.serialize_pem();
        util::atomic_write(&dir.join(SERVER_KEY_FILE), key_pem.as_bytes(), 0o600)?;
        util::atomic_write(&dir.join(SERVER_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
        self.server_chain = vec![cert.der().clone(), self.ca_der.clone()];
        self.server_key_pem = key_pem;
        Ok(())
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA bundle agents must trust (PEM): the CA certificate.
    pub fn bundle_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The CA certificate (DER).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The pin of the CA: lowercase hex sha256 of its DER.
    pub fn ca_sha256(&self) -> String {
        runos_transport::pem::der_sha256(&self.ca_der)
    }

    /// The server certificate chain (leaf, CA) and key for the TLS listeners.
    pub fn server_identity(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())
            .map_err(|_| Error::Ca("the server key cannot be decoded".into()))?;
        Ok((self.server_chain.clone(), key))
    }

    /// Validate a node's CSR and sign it for `node_id`, valid for `validity`.
    ///
    /// Only the CSR's public key is used: subject, SANs and extensions requested by the node
    /// are ignored; the certificate's identity is `runos://node/<node_id>`.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        node_id: &str,
        validity: Duration,
    ) -> Result<Result<IssuedCert, CsrError>, Error> {
        let csr = match validate_csr(csr_pem) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let now = util::now_ms();
        let uri = format!("{}{node_id}", runos_protocol::NODE_URI_PREFIX);
        let san = SanType::URI(
            uri.try_into()
                .map_err(|_| Error::Internal("node URI is not IA5".into()))?,
        );
        let params = leaf_params(
            node_id,
            vec![san],
            ExtendedKeyUsagePurpose::ClientAuth,
            now,
            NODE_BACKDATE,
            validity,
        )?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| ca_err("signing a node certificate", e))?;
        let info = runos_transport::identity::cert_info(cert.der())
            .map_err(|e| ca_err("reading back a node certificate", e))?;
        Ok(Ok(IssuedCert {
            pem: cert.pem(),
            serial_hex: info.serial_hex,
            not_before_ms: info.not_before.saturating_mul(1000),
            not_after_ms: info.not_after.saturating_mul(1000),
        }))
    }
}

/// Parse a CSR, verify its self-signature, and require an ECDSA P-256 key.
pub fn validate_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CsrError> {
    if csr_pem.len() > runos_protocol::control::MAX_PEM_LEN {
        return Err(CsrError("the CSR is too large".into()));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| CsrError("csrPem is not a PEM CERTIFICATE REQUEST".into()))?;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|_| CsrError("the CSR cannot be parsed".into()))?;
    let spki = &parsed.certification_request_info.subject_pki;
    let is_ec = spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
    let is_p256 = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .is_some_and(|oid| oid == x509_parser::oid_registry::OID_EC_P256);
    if !(is_ec && is_p256) || spki.subject_public_key.data.len() != 65 {
        return Err(CsrError("the CSR's key must be ECDSA P-256".into()));
    }
    let params = CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| CsrError(format!("the CSR is invalid: {e}")))?;
    if params.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError(
            "the CSR must be signed with ECDSA P-256 / SHA-256".into(),
        ));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_is_signed_with_node_uri() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), &["cp.example".into()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let issued = ca
            .sign_csr(&csr, "abc-1", DEFAULT_NODE_CERT_VALIDITY)
            .unwrap()
            .unwrap();
        let der = runos_transport::pem::certificates(issued.pem.as_bytes()).unwrap();
        let info = runos_transport::identity::cert_info(&der[0]).unwrap();
        assert_eq!(info.node_id.as_deref(), Some("abc-1"));
        assert_eq!(info.serial_hex, issued.serial_hex);
        // Loading again keeps the same CA.
        let again = Ca::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(again.ca_sha256(), ca.ca_sha256());
    }

    #[test]
    fn non_p256_and_garbage_csrs_are_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        assert!(validate_csr(&csr).is_err());
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        assert!(validate_csr(&csr).is_err());
        assert!(validate_csr("hello").is_err());
        assert!(
            validate_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            )
            .is_err()
        );
    }
}
