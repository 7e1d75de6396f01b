//! The certificate authority: CA creation, loading and rotation, the server certificate, and
//! signing of node CSRs with the node identity in the SAN.
//!
//! # Files and phases
//!
//! | phase | files | bundle | L2Sec client trust | signs node certs | signs the server cert |
//! |---|---|---|---|---|---|
//! | normal | `ca.pem`/`ca.key` (A) | A | A | A | A |
//! | rotating | + `ca-next.pem`/`ca-next.key` (B) | A, B | A, B | B | A |
//!
//! `ca-cross.pem` holds the cross-certificate of the newest CA: B's subject and key, signed by
//! A. It goes out with every bundle (`caCrossPem`), and it is the only way an agent admits B into
//! its trust (docs/certificates.md, "Trust continuity"). It is issued again at every load while
//! rotating (A's key is there), and kept after the cutover (A's key is not), so a node that missed
//! the whole overlap can still follow. After a cutover a cross-certificate that does not vouch
//! for the active CA is stale and ignored.
//!
//! `rotate` writes `ca-next.key`, then `ca-next.pem`, then `ca-cross.pem`. `cutover` writes
//! `ca-retired-<unix seconds>.pem` (a copy of A), then `ca.pem` := B, then `ca.key` := B's key
//! (A's key is gone from then on), then removes `ca-next.key`, then `ca-next.pem`. Every write
//! is atomic (temporary file, fsync, rename, fsync of the directory), so a crash leaves one of
//! the states that [`Ca::load_or_create`] recognises: it finishes an interrupted cutover,
//! discards the key of an interrupted rotation (no certificate of that CA can exist yet), and
//! refuses anything else.

use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer as _;

use crate::Error;
use crate::util;

/// File name of the CA certificate in the data directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in the data directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the incoming CA certificate during a rotation.
pub const CA_NEXT_CERT_FILE: &str = "ca-next.pem";
/// File name of the incoming CA private key during a rotation (mode 0600).
pub const CA_NEXT_KEY_FILE: &str = "ca-next.key";
/// Prefix of the archived certificates of retired CAs (`ca-retired-<unix seconds>.pem`).
pub const CA_RETIRED_PREFIX: &str = "ca-retired-";
/// File name of the cross-certificate of the newest CA (`ca rotate` writes it; kept after the
/// cutover): the newest CA's subject and key, signed by the CA before it. Agents admit a new CA
/// into their trust only with it (docs/certificates.md, "Trust continuity").
pub const CA_CROSS_FILE: &str = "ca-cross.pem";
/// File name of the server certificate in the data directory.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the server private key in the data directory (mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key";

/// Default validity of node certificates.
pub const DEFAULT_NODE_CERT_VALIDITY: Duration = Duration::from_secs(30 * 86400);
/// Longest validity of node certificates (`--cert-validity`): agents refuse a certificate that
/// lives longer than 400 days (docs/certificates.md), and the backdating must fit within that.
pub const MAX_NODE_CERT_VALIDITY: Duration = Duration::from_secs(398 * 86400);
/// Validity of a CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// `ca status` warns when the active CA expires within this.
pub const CA_EXPIRY_WARNING: Duration = Duration::from_secs(365 * 86400);

const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// Backdating of `notBefore` of the server certificate, which agents verify with their own
/// clocks, to tolerate small clock differences.
const BACKDATE: Duration = Duration::from_secs(300);
/// Backdating of node certificates. Only the control plane verifies them, with the clock that
/// issued them; a short backdate keeps "two thirds of the lifetime" meaningful for
/// minute-long certificates.
pub(crate) const NODE_BACKDATE: Duration = Duration::from_secs(30);
/// Largest CA file read (a PEM certificate or key is a few hundred bytes).
const MAX_CA_FILE: u64 = 64 * 1024;
/// Common name of the first CA; rotated CAs add their creation time.
const CA_COMMON_NAME: &str = "runos control plane CA";

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
    /// The pin (lowercase hex sha256 of the DER) of the CA that signed it.
    pub ca_sha256: String,
}

/// Public facts of a CA certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertInfo {
    /// The pin: lowercase hex sha256 of the certificate's DER.
    pub sha256: String,
    /// The subject, as text.
    pub subject: String,
    /// notBefore, ms since the epoch.
    pub not_before_ms: i64,
    /// notAfter, ms since the epoch.
    pub not_after_ms: i64,
}

impl CaCertInfo {
    /// When the CA was created (its notBefore is backdated by a few minutes).
    pub fn created_ms(&self) -> i64 {
        self.not_before_ms.saturating_add(util::ms(BACKDATE))
    }

    /// A warning when the CA expires within [`CA_EXPIRY_WARNING`] of `now_ms` (or has expired).
    pub fn expiry_warning(&self, now_ms: i64) -> Option<String> {
        let left = self.not_after_ms.saturating_sub(now_ms);
        if left <= 0 {
            Some(format!(
                "the active CA (sha256 {}) expired at {}: agents refuse the server certificate; \
                 nodes must be enrolled again",
                self.sha256,
                util::rfc3339_ms(self.not_after_ms)
            ))
        } else if left < util::ms(CA_EXPIRY_WARNING) {
            Some(format!(
                "the active CA (sha256 {}) expires at {} (in {} days): rotate it now \
                 (`ca rotate`, then `ca cutover` once the nodes have renewed)",
                self.sha256,
                util::rfc3339_ms(self.not_after_ms),
                left / 86_400_000
            ))
        } else {
            None
        }
    }
}

/// One CA: its certificate and signing key.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
    info: CaCertInfo,
}

/// The loaded CA (one, or two during a rotation) and the server's TLS identity.
pub struct Ca {
    /// Signs the server certificate; its pin is carried by enrolment tokens.
    active: Arc<Authority>,
    /// The incoming CA during a rotation: signs node certificates.
    next: Option<Arc<Authority>>,
    /// The cross-certificate (PEM) of the newest CA (the incoming one during a rotation, else
    /// the active one), signed by the CA before it; `None` when the CA was never rotated.
    cross: Option<String>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("ca_sha256", &self.ca_sha256())
            .field(
                "incoming_sha256",
                &self.next.as_ref().map(|n| n.info.sha256.as_str()),
            )
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
    seconds_time(t)
}

fn seconds_time(ms: i64) -> Result<time::OffsetDateTime, Error> {
    // Whole seconds: X.509 times have second precision.
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .map_err(|e| ca_err("time out of range", e))
}

/// Parameters of an end-entity certificate: one common name, the given SANs, digital signature
/// for `eku` only, a random serial, backdated by `backdate` and valid for `validity`, but not
/// beyond `ca_not_after_ms` (a certificate cannot outlive its issuer).
fn leaf_params(
    common_name: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    now: i64,
    backdate: Duration,
    validity: Duration,
    ca_not_after_ms: i64,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    // No BasicConstraints at all: an end entity is the extension's default (cA FALSE), and
    // DER forbids encoding a default value, so writing `cA = FALSE` makes a certificate that
    // strict parsers refuse.
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = offset_time(now, backdate, false)?;
    let wanted = now.saturating_add(util::ms(validity));
    // An expired CA is reported elsewhere; clamping to its past would make no usable
    // certificate either.
    let not_after = if ca_not_after_ms > now {
        wanted.min(ca_not_after_ms)
    } else {
        wanted
    };
    params.not_after = seconds_time(not_after)?;
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, so its DER form is exactly these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Read a CA file: `None` when it does not exist. At most [`MAX_CA_FILE`] bytes.
fn read_opt(path: &Path) -> Result<Option<String>, Error> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut text = String::new();
    f.take(MAX_CA_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_CA_FILE {
        return Err(Error::Ca(format!(
            "{} is larger than {MAX_CA_FILE} bytes",
            path.display()
        )));
    }
    Ok(Some(text))
}

/// The single certificate of a CA certificate file.
fn parse_ca_cert(path: &Path, pem: &str) -> Result<CertificateDer<'static>, Error> {
    let mut certs = runos_transport::pem::certificates(pem.as_bytes())
        .map_err(|e| ca_err(&path.display().to_string(), e))?;
    if certs.len() != 1 {
        return Err(Error::Ca(format!(
            "{} must hold exactly one certificate, not {}",
            path.display(),
            certs.len()
        )));
    }
    Ok(certs.remove(0))
}

fn parse_key(path: &Path, pem: &str) -> Result<KeyPair, Error> {
    let key = KeyPair::from_pem(pem)
        .map_err(|_| Error::Ca(format!("{} is not a usable key", path.display())))?;
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(Error::Ca(format!(
            "{} is not an ECDSA P-256 key",
            path.display()
        )));
    }
    Ok(key)
}

/// Whether `key` is the key of the certificate `der`.
fn key_matches(key: &KeyPair, der: &CertificateDer<'_>) -> bool {
    x509_parser::certificate::X509Certificate::from_der(der)
        .is_ok_and(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

fn cert_info(der: &CertificateDer<'_>) -> Result<CaCertInfo, Error> {
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| ca_err("parsing a CA certificate", e))?;
    Ok(CaCertInfo {
        sha256: runos_transport::pem::der_sha256(der),
        subject: c.subject().to_string(),
        not_before_ms: c.validity().not_before.timestamp().saturating_mul(1000),
        not_after_ms: c.validity().not_after.timestamp().saturating_mul(1000),
    })
}

impl Authority {
    /// A CA from its certificate and key files' text; the key must belong to the certificate.
    fn from_pem(
        cert_path: &Path,
        cert_pem: String,
        key_path: &Path,
        key_pem: &str,
    ) -> Result<Authority, Error> {
        let der = parse_ca_cert(cert_path, &cert_pem)?;
        let key = parse_key(key_path, key_pem)?;
        if !key_matches(&key, &der) {
            return Err(Error::Ca(format!(
                "{} is not the key of {}",
                key_path.display(),
                cert_path.display()
            )));
        }
        let info = cert_info(&der)?;
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| {
            ca_err(
                &format!("{} cannot be used as an issuer", cert_path.display()),
                e,
            )
        })?;
        Ok(Authority {
            issuer,
            pem: cert_pem,
            der,
            info,
        })
    }

    /// A new self-signed CA: ECDSA P-256, path length 0, valid for [`CA_VALIDITY`]. Returns the
    /// key PEM and the certificate PEM.
    fn generate(common_name: &str) -> Result<(String, String), Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| ca_err("generating a CA key", e))?;
        let now = util::now_ms();
        let mut params = ca_params(common_name)?;
        params.not_after = offset_time(now, CA_VALIDITY, true)?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| ca_err("self-signing a CA", e))?;
        Ok((key.serialize_pem(), cert.pem()))
    }

    fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

/// Remove a file (a missing one is fine) and make the removal durable.
fn remove_durably(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Counts the file steps of an operation; in tests it stops (as a crash would) after a given
/// number of them.
struct Steps {
    left: usize,
}

impl Steps {
    fn all() -> Steps {
        Steps { left: usize::MAX }
    }

    /// Whether to go on with the next step.
    fn next(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }
}

/// Bring the CA files of `dir` to a settled state: normal (`ca.*`) or rotating (`ca.*` and
/// `ca-next.*`), finishing an interrupted cutover and discarding the key of an interrupted
/// rotation. Refuses every state the write order cannot produce. `Ok(false)` when there is no
/// CA at all.
fn settle(dir: &Path) -> Result<bool, Error> {
    let (cp, kp) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    let (ncp, nkp) = (dir.join(CA_NEXT_CERT_FILE), dir.join(CA_NEXT_KEY_FILE));
    let (c, k) = (read_opt(&cp)?, read_opt(&kp)?);
    let (nc, nk) = (read_opt(&ncp)?, read_opt(&nkp)?);
    let (c, k) = match (c, k) {
        (None, None) => {
            if nc.is_some() || nk.is_some() {
                return Err(Error::Ca(format!(
                    "{} or {} exists but {} and {} do not; restore the active CA (the incoming \
                     one alone cannot be used)",
                    ncp.display(),
                    nkp.display(),
                    cp.display(),
                    kp.display()
                )));
            }
            return Ok(false);
        }
        (Some(c), Some(k)) => (c, k),
        _ => {
            return Err(Error::Ca(format!(
                "only one of {} and {} exists; restore the other or remove both to create a \
                 new CA (which invalidates every node certificate)",
                cp.display(),
                kp.display()
            )));
        }
    };
    let c_der = parse_ca_cert(&cp, &c)?;
    let k_ok = key_matches(&parse_key(&kp, &k)?, &c_der);
    let mismatch = || {
        Error::Ca(format!(
            "{} is not the key of {}; restore the matching pair",
            kp.display(),
            cp.display()
        ))
    };
    match (nc, nk) {
        (None, None) => {}
        (None, Some(_)) => {
            // A rotation stopped between its two writes: no certificate of that CA exists.
            if !k_ok {
                return Err(mismatch());
            }
            tracing::warn!(path = %nkp.display(), "discarding the key of an interrupted CA rotation");
            remove_durably(&nkp)?;
        }
        (Some(nc), None) => {
            // A cutover stopped before removing ca-next.pem (its key is gone already).
            if parse_ca_cert(&ncp, &nc)? != c_der || !k_ok {
                return Err(Error::Ca(format!(
                    "{} exists without {}; restore the key, or remove {} if no node holds a \
                     certificate of that CA",
                    ncp.display(),
                    nkp.display(),
                    ncp.display()
                )));
            }
            tracing::warn!("finishing an interrupted CA cutover");
            remove_durably(&ncp)?;
        }
        (Some(nc), Some(nk)) => {
            let nc_der = parse_ca_cert(&ncp, &nc)?;
            if !key_matches(&parse_key(&nkp, &nk)?, &nc_der) {
                return Err(Error::Ca(format!(
                    "{} is not the key of {}; restore the matching pair",
                    nkp.display(),
                    ncp.display()
                )));
            }
            if nc_der == c_der {
                // A cutover stopped after ca.pem was replaced: finish it.
                tracing::warn!("finishing an interrupted CA cutover");
                if !k_ok {
                    util::atomic_write(&kp, nk.as_bytes(), 0o600)?;
                }
                remove_durably(&nkp)?;
                remove_durably(&ncp)?;
            } else if !k_ok {
                return Err(mismatch());
            }
        }
    }
    Ok(true)
}

/// Load the settled CA files: the active CA and, during a rotation, the incoming one.
fn load_settled(dir: &Path) -> Result<(Authority, Option<Authority>), Error> {
    let load = |cert: &str, key: &str| -> Result<Option<Authority>, Error> {
        let (cp, kp) = (dir.join(cert), dir.join(key));
        match (read_opt(&cp)?, read_opt(&kp)?) {
            (Some(c), Some(k)) => Authority::from_pem(&cp, c, &kp, &k).map(Some),
            (None, None) => Ok(None),
            _ => Err(Error::Ca(format!(
                "{} and {} changed while being loaded",
                cp.display(),
                kp.display()
            ))),
        }
    };
    let active = load(CA_CERT_FILE, CA_KEY_FILE)?
        .ok_or_else(|| Error::Ca(format!("{CA_CERT_FILE} disappeared while being loaded")))?;
    let next = load(CA_NEXT_CERT_FILE, CA_NEXT_KEY_FILE)?;
    Ok((active, next))
}

/// Create the first CA: key first, since a CA certificate without its key would be useless.
fn create_first(dir: &Path) -> Result<(), Error> {
    let (key_pem, cert_pem) = Authority::generate(CA_COMMON_NAME)?;
    let cert_path = dir.join(CA_CERT_FILE);
    util::atomic_write(&dir.join(CA_KEY_FILE), key_pem.as_bytes(), 0o600)?;
    util::atomic_write(&cert_path, cert_pem.as_bytes(), 0o644)?;
    tracing::info!(path = %cert_path.display(), "created a new certificate authority");
    Ok(())
}

/// Write a new incoming CA: `ca-next.key`, then `ca-next.pem`.
fn rotate_files(dir: &Path, steps: &mut Steps) -> Result<(), Error> {
    let name = format!("{CA_COMMON_NAME} {}", util::rfc3339_ms(util::now_ms()));
    let (key_pem, cert_pem) = Authority::generate(&name)?;
    if steps.next() {
        util::atomic_write(&dir.join(CA_NEXT_KEY_FILE), key_pem.as_bytes(), 0o600)?;
    }
    if steps.next() {
        util::atomic_write(&dir.join(CA_NEXT_CERT_FILE), cert_pem.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// A free name for the archived certificate of a CA retired at `now_ms`.
fn retired_path(dir: &Path, now_ms: i64, pem: &str) -> Result<PathBuf, Error> {
    let secs = now_ms.div_euclid(1000);
    for n in 0..100u32 {
        let name = if n == 0 {
            format!("{CA_RETIRED_PREFIX}{secs}.pem")
        } else {
            format!("{CA_RETIRED_PREFIX}{secs}-{n}.pem")
        };
        let p = dir.join(name);
        match read_opt(&p)? {
            None => return Ok(p),
            Some(existing) if existing == pem => return Ok(p),
            Some(_) => continue,
        }
    }
    Err(Error::Ca(format!(
        "no free name for the retired CA certificate ({CA_RETIRED_PREFIX}{secs}-*.pem)"
    )))
}

/// Replace the active CA by the incoming one: archive the active certificate, `ca.pem` := the
/// incoming certificate, `ca.key` := its key, remove `ca-next.key`, remove `ca-next.pem`. The
/// active CA's key is overwritten, not archived. Returns the archive's path.
fn cutover_files(
    dir: &Path,
    active: &Authority,
    next: &Authority,
    steps: &mut Steps,
) -> Result<PathBuf, Error> {
    let retired = retired_path(dir, util::now_ms(), &active.pem)?;
    if steps.next() {
        util::atomic_write(&retired, active.pem.as_bytes(), 0o644)?;
    }
    if steps.next() {
        util::atomic_write(&dir.join(CA_CERT_FILE), next.pem.as_bytes(), 0o644)?;
    }
    if steps.next() {
        util::atomic_write(&dir.join(CA_KEY_FILE), next.key_pem().as_bytes(), 0o600)?;
    }
    if steps.next() {
        remove_durably(&dir.join(CA_NEXT_KEY_FILE))?;
    }
    if steps.next() {
        remove_durably(&dir.join(CA_NEXT_CERT_FILE))?;
    }
    Ok(retired)
}

fn pem_with_newline(pem: &str) -> String {
    let mut s = pem.to_string();
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// The parameters every CA certificate of ours has (a self-signed CA, or a cross-certificate
/// for one): the name, path length 0, the CA key usages, a random serial, valid from a moment
/// ago; the caller sets the end.
fn ca_params(common_name: &str) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = offset_time(util::now_ms(), BACKDATE, false)?;
    Ok(params)
}

/// A cross-certificate for `subject`: its name and key, a CA like itself, signed by `issuer`,
/// valid from now until the earlier of the two CAs' ends.
fn cross_certify(issuer: &Authority, subject: &Authority) -> Result<String, Error> {
    let (_, s) = x509_parser::certificate::X509Certificate::from_der(&subject.der)
        .map_err(|e| ca_err("parsing the incoming CA", e))?;
    let cn = s
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| Error::Ca("the incoming CA has no common name".into()))?;
    let mut params = ca_params(cn)?;
    params.use_authority_key_identifier_extension = true;
    params.not_after = seconds_time(subject.info.not_after_ms.min(issuer.info.not_after_ms))?;
    let cert = params
        .signed_by(subject.issuer.key(), &issuer.issuer)
        .map_err(|e| ca_err("cross-certifying the incoming CA", e))?;
    if !vouches_for(cert.der(), &subject.der) {
        return Err(Error::Ca(
            "the cross-certificate does not name the incoming CA exactly".into(),
        ));
    }
    Ok(cert.pem())
}

/// Whether the certificate `cross` has exactly the subject and key of `ca` (and is not `ca`
/// itself).
fn vouches_for(cross: &[u8], ca: &[u8]) -> bool {
    use x509_parser::certificate::X509Certificate;
    match (
        X509Certificate::from_der(cross),
        X509Certificate::from_der(ca),
    ) {
        (Ok((_, x)), Ok((_, c))) => {
            cross != ca
                && x.subject().as_raw() == c.subject().as_raw()
                && x.public_key().raw == c.public_key().raw
                && x.issuer().as_raw() != c.subject().as_raw()
        }
        _ => false,
    }
}

/// The cross-certificate on disk, if it vouches for `ca`; a missing, unreadable or stale one
/// (from an earlier rotation) is `None`.
fn read_cross(dir: &Path, ca: &Authority) -> Option<String> {
    let path = dir.join(CA_CROSS_FILE);
    let pem = match read_opt(&path) {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("ignoring the CA cross-certificate: {e}");
            return None;
        }
    };
    match runos_transport::pem::certificates(pem.as_bytes()) {
        Ok(certs) if certs.len() == 1 && vouches_for(&certs[0], &ca.der) => Some(pem),
        _ => {
            tracing::info!(path = %path.display(), "the CA cross-certificate is not the active CA's (an earlier rotation's); ignored");
            None
        }
    }
}

/// Issue and write the cross-certificate of `next` signed by `active`.
fn write_cross(dir: &Path, active: &Authority, next: &Authority) -> Result<String, Error> {
    let pem = cross_certify(active, next)?;
    util::atomic_write(&dir.join(CA_CROSS_FILE), pem.as_bytes(), 0o644)?;
    Ok(pem)
}

impl Ca {
    /// Load the CA from `dir`, creating it on first start (and finishing or discarding an
    /// interrupted rotation step, see the module documentation), and (re)issue the server
    /// certificate for `hostnames` (plus `localhost`, `127.0.0.1`, `::1`), signed by the active
    /// CA.
    pub fn load_or_create(dir: &Path, hostnames: &[String]) -> Result<Ca, Error> {
        if !settle(dir)? {
            create_first(dir)?;
        }
        let (active, next) = load_settled(dir)?;
        // While rotating, the cross-certificate is issued again (A's key is here): a crash
        // between `ca-next.pem` and `ca-cross.pem` leaves none, and a rotation started by an
        // older version wrote none.
        let cross = match &next {
            Some(n) => Some(write_cross(dir, &active, n)?),
            None => read_cross(dir, &active),
        };
        let mut ca = Ca {
            active: Arc::new(active),
            next: next.map(Arc::new),
            cross,
            server_chain: Vec::new(),
            server_key_pem: String::new(),
        };
        ca.issue_server_cert(dir, hostnames)?;
        Ok(ca)
    }

    /// Start a rotation: create the incoming CA (`ca-next.*`). The result trusts both CAs and
    /// signs node certificates with the new one; the server certificate stays as it is.
    /// [`Error::CaPhase`] when a rotation is already in progress.
    pub fn rotate(&self, dir: &Path) -> Result<Ca, Error> {
        self.rotate_with(dir, &mut Steps::all())
    }

    fn rotate_with(&self, dir: &Path, steps: &mut Steps) -> Result<Ca, Error> {
        if let Some(n) = &self.next {
            return Err(Error::CaPhase(format!(
                "a CA rotation is already in progress (incoming CA sha256 {}); finish it with \
                 `ca cutover`",
                n.info.sha256
            )));
        }
        let ncp = dir.join(CA_NEXT_CERT_FILE);
        if ncp.exists() {
            return Err(Error::Ca(format!(
                "{} exists although no rotation is loaded; was the data directory changed \
                 behind the control plane's back? Restart it to load the files",
                ncp.display()
            )));
        }
        rotate_files(dir, steps)?;
        let (active, next) = load_settled(dir)?;
        let next = next.ok_or_else(|| Error::Ca("the incoming CA was not written".into()))?;
        if active.der != self.active.der {
            return Err(Error::Ca(format!(
                "{CA_CERT_FILE} changed behind the control plane's back; restart it"
            )));
        }
        let cross = cross_certify(&self.active, &next)?;
        if steps.next() {
            util::atomic_write(&dir.join(CA_CROSS_FILE), cross.as_bytes(), 0o644)?;
        }
        Ok(Ca {
            active: self.active.clone(),
            next: Some(Arc::new(next)),
            cross: Some(cross),
            server_chain: self.server_chain.clone(),
            server_key_pem: self.server_key_pem.clone(),
        })
    }

    /// Finish a rotation: the incoming CA becomes the only one and signs a new server
    /// certificate; the old one's certificate is archived as `ca-retired-<unix seconds>.pem`
    /// (returned) and its key destroyed. [`Error::CaPhase`] when no rotation is in progress.
    pub fn cutover(&self, dir: &Path, hostnames: &[String]) -> Result<(Ca, PathBuf), Error> {
        self.cutover_with(dir, hostnames, &mut Steps::all())
    }

    fn cutover_with(
        &self,
        dir: &Path,
        hostnames: &[String],
        steps: &mut Steps,
    ) -> Result<(Ca, PathBuf), Error> {
        let Some(next) = &self.next else {
            return Err(Error::CaPhase(
                "no CA rotation in progress; start one with `ca rotate`".into(),
            ));
        };
        let retired = cutover_files(dir, &self.active, next, steps)?;
        let mut ca = Ca {
            active: next.clone(),
            next: None,
            // Written at `rotate` (or the last load) and kept: A's key is gone from here on.
            cross: self.cross.clone(),
            server_chain: Vec::new(),
            server_key_pem: String::new(),
        };
        ca.issue_server_cert(dir, hostnames)?;
        Ok((ca, retired))
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
        if let Some(w) = self.active.info.expiry_warning(now) {
            tracing::warn!("{w}");
        }
        let params = leaf_params(
            "runos control plane",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            now,
            BACKDATE,
            SERVER_CERT_VALIDITY,
            self.active.info.not_after_ms,
        )?;
        let cert = params
            .signed_by(&key, &self.active.issuer)
            .map_err(|e| ca_err("signing the server certificate", e))?;
        let key_pem = key.serialize_pem();
        util::atomic_write(&dir.join(SERVER_KEY_FILE), key_pem.as_bytes(), 0o600)?;
        util::atomic_write(&dir.join(SERVER_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
        self.server_chain = vec![cert.der().clone(), self.active.der.clone()];
        self.server_key_pem = key_pem;
        Ok(())
    }

    /// The active CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.active.pem
    }

    /// The CA bundle agents must trust (PEM): the active CA, and during a rotation the incoming
    /// one after it.
    pub fn bundle_pem(&self) -> String {
        let mut s = pem_with_newline(&self.active.pem);
        if let Some(n) = &self.next {
            s.push_str(&pem_with_newline(&n.pem));
        }
        s
    }

    /// The cross-certificate of the newest CA (PEM), sent with every bundle as `caCrossPem`:
    /// during a rotation the incoming CA signed by the active one, after a cutover the active
    /// CA signed by the retired one. `None` when this CA was never rotated.
    pub fn cross_pem(&self) -> Option<&str> {
        self.cross.as_deref()
    }

    /// The active CA certificate (DER).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.active.der
    }

    /// The CAs whose certificates L2Sec accepts from clients: the active one, and during a
    /// rotation the incoming one.
    pub fn client_roots(&self) -> Vec<CertificateDer<'static>> {
        let mut v = vec![self.active.der.clone()];
        if let Some(n) = &self.next {
            v.push(n.der.clone());
        }
        v
    }

    /// The pin of the active CA (which signs the server certificate): lowercase hex sha256 of
    /// its DER.
    pub fn ca_sha256(&self) -> String {
        self.active.info.sha256.clone()
    }

    /// The active CA.
    pub fn active(&self) -> &CaCertInfo {
        &self.active.info
    }

    /// The incoming CA, during a rotation.
    pub fn incoming(&self) -> Option<&CaCertInfo> {
        self.next.as_ref().map(|n| &n.info)
    }

    /// The server certificate chain (leaf, CA) and key for the TLS listeners.
    pub fn server_identity(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())
            .map_err(|_| Error::Ca("the server key cannot be decoded".into()))?;
        Ok((self.server_chain.clone(), key))
    }

    /// Validate a node's CSR and sign it for `node_id`, valid for `validity` (not beyond the
    /// signing CA). The incoming CA signs during a rotation, else the active one.
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
        let signer = self.next.as_ref().unwrap_or(&self.active);
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
            signer.info.not_after_ms,
        )?;
        let cert = params
            .signed_by(&csr.public_key, &signer.issuer)
            .map_err(|e| ca_err("signing a node certificate", e))?;
        let info = runos_transport::identity::cert_info(cert.der())
            .map_err(|e| ca_err("reading back a node certificate", e))?;
        Ok(Ok(IssuedCert {
            pem: cert.pem(),
            serial_hex: info.serial_hex,
            not_before_ms: info.not_before.saturating_mul(1000),
            not_after_ms: info.not_after.saturating_mul(1000),
            ca_sha256: signer.info.sha256.clone(),
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

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ca"))
            .collect();
        v.sort();
        v
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    /// Whether a TLS server trusting only `root` accepts `leaf` as a client certificate.
    fn client_verifies(root: &CertificateDer<'static>, leaf: &CertificateDer<'static>) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        v.verify_client_cert(leaf, &[], rustls_pki_types::UnixTime::now())
            .is_ok()
    }

    fn signer_of(ca: &Ca) -> String {
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
        // The recorded issuer is the one whose key verifies the certificate.
        let der = runos_transport::pem::certificates(issued.pem.as_bytes()).unwrap();
        let verified: Vec<String> = ca
            .client_roots()
            .iter()
            .filter(|r| client_verifies(r, &der[0]))
            .map(|r| runos_transport::pem::der_sha256(r))
            .collect();
        assert_eq!(verified, vec![issued.ca_sha256.clone()]);
        issued.ca_sha256
    }

    /// Whether `child`'s signature verifies under `issuer`'s key (ECDSA P-256 / SHA-256).
    fn verified_by(child: &[u8], issuer: &[u8]) -> bool {
        let (_, c) = x509_parser::certificate::X509Certificate::from_der(child).unwrap();
        let (_, i) = x509_parser::certificate::X509Certificate::from_der(issuer).unwrap();
        webpki_alg()
            .verify_signature(
                &i.public_key().subject_public_key.data,
                c.tbs_certificate.as_ref(),
                &c.signature_value.data,
            )
            .is_ok()
    }

    fn webpki_alg() -> &'static dyn rustls_pki_types::SignatureVerificationAlgorithm {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all
            .iter()
            .copied()
            .find(|a| {
                a.signature_alg_id() == rustls_pki_types::alg_id::ECDSA_SHA256
                    && a.public_key_alg_id() == rustls_pki_types::alg_id::ECDSA_P256
            })
            .unwrap()
    }

    fn server_issuer(ca: &Ca) -> String {
        let (chain, _) = ca.server_identity().unwrap();
        assert_eq!(chain.len(), 2);
        runos_transport::pem::der_sha256(&chain[1])
    }

    #[test]
    fn a_rotation_bundles_both_cas_and_signs_nodes_with_the_incoming_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::load_or_create(d, &[]).unwrap();
        let a = ca.ca_sha256();
        assert!(ca.incoming().is_none());
        assert_eq!(signer_of(&ca), a);
        assert_eq!(ca.client_roots().len(), 1);
        assert_eq!(
            runos_transport::pem::certificates(ca.bundle_pem().as_bytes())
                .unwrap()
                .len(),
            1
        );

        let rotating = ca.rotate(d).unwrap();
        let b = rotating.incoming().unwrap().sha256.clone();
        assert_ne!(a, b);
        assert_eq!(rotating.ca_sha256(), a, "the pin stays the active CA's");
        assert_eq!(server_issuer(&rotating), a);
        assert_eq!(signer_of(&rotating), b);
        let bundle = runos_transport::pem::certificates(rotating.bundle_pem().as_bytes()).unwrap();
        let pins: Vec<String> = bundle
            .iter()
            .map(|c| runos_transport::pem::der_sha256(c))
            .collect();
        assert_eq!(pins, vec![a.clone(), b.clone()]);
        assert_eq!(rotating.client_roots().len(), 2);
        assert!(
            rotating
                .incoming()
                .unwrap()
                .subject
                .contains(CA_COMMON_NAME)
        );
        let mode = |n: &str| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(d.join(n)).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(CA_NEXT_KEY_FILE), 0o600);
        assert!(matches!(rotating.rotate(d), Err(Error::CaPhase(_))));
        assert!(matches!(ca.cutover(d, &[]), Err(Error::CaPhase(_))));

        // The cross-certificate: B's name and key, signed by A; never the case before a rotation.
        assert_eq!(ca.cross_pem(), None);
        let cross = rotating.cross_pem().unwrap().to_string();
        let cross_der = runos_transport::pem::certificates(cross.as_bytes()).unwrap();
        assert!(vouches_for(&cross_der[0], &bundle[1]));
        assert!(verified_by(&cross_der[0], &bundle[0]));
        assert_eq!(read(d, CA_CROSS_FILE), cross);

        let (done, retired) = rotating.cutover(d, &[]).unwrap();
        // Kept after the cutover (A's key is gone), and found again by a restart.
        assert_eq!(done.cross_pem(), Some(cross.as_str()));
        assert_eq!(
            Ca::load_or_create(d, &[]).unwrap().cross_pem(),
            Some(cross.as_str())
        );
        assert_eq!(done.ca_sha256(), b);
        assert!(done.incoming().is_none());
        assert_eq!(server_issuer(&done), b);
        assert_eq!(signer_of(&done), b);
        assert_eq!(done.client_roots().len(), 1);
        let archived =
            runos_transport::pem::certificates(std::fs::read(&retired).unwrap().as_slice())
                .unwrap();
        assert_eq!(runos_transport::pem::der_sha256(&archived[0]), a);
        let retired_name = retired.file_name().unwrap().to_string_lossy().into_owned();
        assert!(retired_name.starts_with(CA_RETIRED_PREFIX));
        let mut expected = vec![
            CA_KEY_FILE.to_string(),
            retired_name,
            CA_CERT_FILE.to_string(),
            CA_CROSS_FILE.to_string(),
        ];
        expected.sort();
        assert_eq!(files(d), expected);
    }

    #[test]
    fn every_crash_point_of_a_rotation_loads() {
        for n in 0..=3 {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let ca = Ca::load_or_create(d, &[]).unwrap();
            let _ = ca.rotate_with(d, &mut Steps { left: n });
            let loaded = Ca::load_or_create(d, &[]).unwrap();
            assert_eq!(loaded.ca_sha256(), ca.ca_sha256(), "step {n}");
            if n < 2 {
                assert!(loaded.incoming().is_none(), "step {n}");
                assert_eq!(
                    files(d),
                    vec![CA_KEY_FILE.to_string(), CA_CERT_FILE.to_string()],
                    "step {n}"
                );
            } else {
                assert!(loaded.incoming().is_some(), "step {n}");
                // A crash before the cross-certificate was written: the load issues it.
                let cross =
                    runos_transport::pem::certificates(loaded.cross_pem().unwrap().as_bytes())
                        .unwrap();
                assert!(
                    vouches_for(&cross[0], &loaded.client_roots()[1]),
                    "step {n}"
                );
                assert_eq!(read(d, CA_CROSS_FILE), loaded.cross_pem().unwrap());
            }
            // Loading again changes nothing.
            let again = Ca::load_or_create(d, &[]).unwrap();
            assert_eq!(again.incoming(), loaded.incoming());
        }
    }

    #[test]
    fn every_crash_point_of_a_cutover_loads() {
        for n in 0..=5 {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let rotating = Ca::load_or_create(d, &[]).unwrap().rotate(d).unwrap();
            let a = rotating.ca_sha256();
            let a_key = read(d, CA_KEY_FILE);
            let b = rotating.incoming().unwrap().sha256.clone();
            let b_key = read(d, CA_NEXT_KEY_FILE);
            let _ = rotating.cutover_with(d, &[], &mut Steps { left: n });
            let loaded = Ca::load_or_create(d, &[]).unwrap();
            let retired = files(d)
                .iter()
                .filter(|f| f.starts_with(CA_RETIRED_PREFIX))
                .count();
            assert_eq!(retired, usize::from(n >= 1), "step {n}");
            if n < 2 {
                assert_eq!(loaded.ca_sha256(), a, "step {n}");
                assert_eq!(loaded.incoming().unwrap().sha256, b, "step {n}");
                assert_eq!(read(d, CA_KEY_FILE), a_key);
                assert_eq!(server_issuer(&loaded), a);
            } else {
                assert_eq!(loaded.ca_sha256(), b, "step {n}");
                assert!(loaded.incoming().is_none(), "step {n}");
                assert_eq!(read(d, CA_KEY_FILE), b_key, "step {n}: the old key is gone");
                assert!(!d.join(CA_NEXT_CERT_FILE).exists(), "step {n}");
                assert!(!d.join(CA_NEXT_KEY_FILE).exists(), "step {n}");
                assert_eq!(server_issuer(&loaded), b);
                assert_eq!(signer_of(&loaded), b);
            }
            // Whatever the crash point, the cross-certificate for B survives.
            let cross =
                runos_transport::pem::certificates(loaded.cross_pem().unwrap().as_bytes()).unwrap();
            let b_der = loaded.client_roots().last().unwrap().clone();
            assert!(vouches_for(&cross[0], &b_der), "step {n}");
            let again = Ca::load_or_create(d, &[]).unwrap();
            assert_eq!(again.ca_sha256(), loaded.ca_sha256());
            assert_eq!(again.incoming(), loaded.incoming());
        }
    }

    #[test]
    fn inconsistent_files_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        Ca::load_or_create(&src, &[]).unwrap().rotate(&src).unwrap();
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        Ca::load_or_create(&other, &[]).unwrap();
        let a = (read(&src, CA_CERT_FILE), read(&src, CA_KEY_FILE));
        let b = (read(&src, CA_NEXT_CERT_FILE), read(&src, CA_NEXT_KEY_FILE));
        let x_key = read(&other, CA_KEY_FILE);
        let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
            ("ca.pem alone", vec![(CA_CERT_FILE, a.0.clone())]),
            ("ca.key alone", vec![(CA_KEY_FILE, a.1.clone())]),
            (
                "ca.key of another CA",
                vec![(CA_CERT_FILE, a.0.clone()), (CA_KEY_FILE, x_key.clone())],
            ),
            (
                "ca-next.* without ca.*",
                vec![
                    (CA_NEXT_CERT_FILE, b.0.clone()),
                    (CA_NEXT_KEY_FILE, b.1.clone()),
                ],
            ),
            (
                "ca-next.pem without its key",
                vec![
                    (CA_CERT_FILE, a.0.clone()),
                    (CA_KEY_FILE, a.1.clone()),
                    (CA_NEXT_CERT_FILE, b.0.clone()),
                ],
            ),
            (
                "ca-next.key of another CA",
                vec![
                    (CA_CERT_FILE, a.0.clone()),
                    (CA_KEY_FILE, a.1.clone()),
                    (CA_NEXT_CERT_FILE, b.0.clone()),
                    (CA_NEXT_KEY_FILE, x_key.clone()),
                ],
            ),
            (
                "ca.key of another CA during a rotation",
                vec![
                    (CA_CERT_FILE, a.0.clone()),
                    (CA_KEY_FILE, x_key.clone()),
                    (CA_NEXT_CERT_FILE, b.0.clone()),
                    (CA_NEXT_KEY_FILE, b.1.clone()),
                ],
            ),
            (
                "two certificates in ca.pem",
                vec![
                    (CA_CERT_FILE, format!("{}{}", a.0, b.0)),
                    (CA_KEY_FILE, a.1.clone()),
                ],
            ),
            (
                "garbage in ca.pem",
                vec![(CA_CERT_FILE, "hello".into()), (CA_KEY_FILE, a.1.clone())],
            ),
            (
                "a huge ca.pem",
                vec![
                    (CA_CERT_FILE, "A".repeat(1 << 20)),
                    (CA_KEY_FILE, a.1.clone()),
                ],
            ),
        ];
        for (name, contents) in cases {
            let d = tempfile::tempdir().unwrap();
            for (f, text) in &contents {
                std::fs::write(d.path().join(f), text).unwrap();
            }
            let before = files(d.path());
            match Ca::load_or_create(d.path(), &[]) {
                Err(Error::Ca(m)) => assert!(!m.is_empty(), "{name}"),
                other => panic!("{name}: {other:?}"),
            }
            assert_eq!(files(d.path()), before, "{name}: files were changed");
            for (f, text) in &contents {
                assert_eq!(&read(d.path(), f), text, "{name}: {f} was changed");
            }
        }
    }

    #[test]
    fn certificates_do_not_outlive_their_ca_and_expiry_is_warned() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A CA that expires in two days.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = util::now_ms();
        params.not_before = offset_time(now, Duration::from_secs(60), false).unwrap();
        params.not_after = offset_time(now, Duration::from_secs(2 * 86400), true).unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(d.join(CA_KEY_FILE), key.serialize_pem()).unwrap();
        std::fs::write(d.join(CA_CERT_FILE), cert.pem()).unwrap();
        let ca = Ca::load_or_create(d, &[]).unwrap();
        let ca_end = ca.active().not_after_ms;
        let csr = CertificateParams::default()
            .serialize_request(&KeyPair::generate().unwrap())
            .unwrap()
            .pem()
            .unwrap();
        let issued = ca
            .sign_csr(&csr, "abc-1", DEFAULT_NODE_CERT_VALIDITY)
            .unwrap()
            .unwrap();
        assert!(issued.not_after_ms <= ca_end);
        let (chain, _) = ca.server_identity().unwrap();
        let leaf = runos_transport::identity::cert_info(&chain[0]).unwrap();
        assert!(leaf.not_after * 1000 <= ca_end);
        let w = ca.active().expiry_warning(now).unwrap();
        assert!(w.contains("expires") && w.contains("ca rotate"), "{w}");
        assert!(
            ca.active()
                .expiry_warning(ca_end + 1)
                .unwrap()
                .contains("expired")
        );

        let fresh = tempfile::tempdir().unwrap();
        let fresh = Ca::load_or_create(fresh.path(), &[]).unwrap();
        assert_eq!(fresh.active().expiry_warning(util::now_ms()), None);
        let ten_years = fresh.active().not_after_ms - fresh.active().not_before_ms;
        assert!(ten_years >= util::ms(CA_VALIDITY));
        assert!(
            fresh
                .active()
                .expiry_warning(fresh.active().not_after_ms - 300 * 86_400_000)
                .is_some()
        );
    }

    /// Strict DER (X.690 §10–11) of one TLV sequence: definite minimal lengths, booleans only
    /// `TRUE` (0xFF; a `FALSE` in a certificate can only be an explicit DEFAULT, which DER
    /// forbids: `critical` and `cA` both default to FALSE), minimal integers, bit strings whose
    /// unused bits are zero. Recurses into constructed values (not into OCTET STRINGs).
    fn strict_der(mut b: &[u8]) -> Result<(), String> {
        while !b.is_empty() {
            let tag = b[0];
            if tag & 0x1f == 0x1f {
                return Err("high tag number form".into());
            }
            let (len, hdr) = match *b.get(1).ok_or("truncated")? {
                l if l < 0x80 => (usize::from(l), 2),
                0x80 => return Err("indefinite length".into()),
                l => {
                    let n = usize::from(l & 0x7f);
                    let bytes = b.get(2..2 + n).ok_or("truncated length")?;
                    if bytes[0] == 0 {
                        return Err("length with a leading zero".into());
                    }
                    let len = bytes.iter().fold(0usize, |a, x| (a << 8) | usize::from(*x));
                    if len < 0x80 {
                        return Err("long form for a short length".into());
                    }
                    (len, 2 + n)
                }
            };
            let v = b.get(hdr..hdr + len).ok_or("truncated value")?;
            match tag {
                0x01 if v != [0xff] => {
                    return Err(format!(
                        "BOOLEAN {v:02x?}: a DEFAULT FALSE encoded, or not DER"
                    ));
                }
                0x02 if v.is_empty()
                    || (v.len() > 1
                        && ((v[0] == 0 && v[1] < 0x80) || (v[0] == 0xff && v[1] >= 0x80))) =>
                {
                    return Err("INTEGER not minimal".into());
                }
                0x03 => {
                    let unused = *v.first().ok_or("empty BIT STRING")?;
                    if unused > 7 || (v.len() == 1 && unused != 0) {
                        return Err("BIT STRING unused-bits count".into());
                    }
                    if unused > 0 && v[v.len() - 1] & ((1 << unused) - 1) != 0 {
                        return Err("BIT STRING unused bits not zero".into());
                    }
                }
                t if t & 0x20 != 0 => strict_der(v)?,
                _ => {}
            }
            b = &b[hdr + len..];
        }
        Ok(())
    }

    /// The certificate, and the value of each of its extensions, are strict DER.
    fn strict_cert(der: &[u8]) -> Result<(), String> {
        strict_der(der)?;
        let (_, c) =
            x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        for ext in c.extensions() {
            strict_der(ext.value).map_err(|e| format!("extension {}: {e}", ext.oid))?;
        }
        Ok(())
    }

    /// Python's `cryptography` (the strict parser that refused runos certificates) reads every
    /// extension of `pem`; skipped, with the reason printed, where it is not installed.
    fn python_reads(pem: &str) -> Option<Result<(), String>> {
        let probe = std::process::Command::new("python3")
            .args(["-c", "import cryptography"])
            .output();
        if !probe.is_ok_and(|o| o.status.success()) {
            eprintln!("skipping the cross-check with Python's cryptography: not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.pem");
        std::fs::write(&path, pem).unwrap();
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys; from cryptography import x509; \
                 c = x509.load_pem_x509_certificate(open(sys.argv[1], 'rb').read()); \
                 [e.value for e in c.extensions]",
            ])
            .arg(&path)
            .output()
            .unwrap();
        Some(if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        })
    }

    /// Finding 6 of issue 10: every certificate the CA makes (node, server, CA, cross) is strict
    /// DER; an explicit `cA = FALSE` made node and server certificates unreadable to strict
    /// parsers.
    #[test]
    fn every_certificate_the_ca_makes_is_strict_der() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::load_or_create(d, &["cp.example".into()]).unwrap();
        let rotating = ca.rotate(d).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&KeyPair::generate().unwrap())
            .unwrap()
            .pem()
            .unwrap();
        let node = rotating
            .sign_csr(&csr, "abc-1", DEFAULT_NODE_CERT_VALIDITY)
            .unwrap()
            .unwrap()
            .pem;
        let server = read(d, SERVER_CERT_FILE);
        let mut all = vec![
            ("a node certificate", node.clone()),
            ("the server certificate", server),
            ("the CA certificate", read(d, CA_CERT_FILE)),
            ("the incoming CA certificate", read(d, CA_NEXT_CERT_FILE)),
            (
                "the cross-certificate",
                rotating.cross_pem().unwrap().to_string(),
            ),
        ];
        let (done, _) = rotating.cutover(d, &[]).unwrap();
        all.push((
            "the server certificate after a cutover",
            read(d, SERVER_CERT_FILE),
        ));
        drop(done);
        for (what, pem) in &all {
            for der in runos_transport::pem::certificates(pem.as_bytes()).unwrap() {
                strict_cert(&der).unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            if let Some(Err(e)) = python_reads(pem) {
                panic!("{what}: Python's cryptography refuses it: {e}");
            }
        }
        // Both checks do catch the finding: an explicit cA = FALSE.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::ExplicitNoCa;
        let bad = p.self_signed(&key).unwrap();
        assert!(strict_cert(bad.der()).unwrap_err().contains("BOOLEAN"));
        assert!(python_reads(&bad.pem()).is_none_or(|r| r.is_err()));
        // Node certificates carry no BasicConstraints at all.
        let der = runos_transport::pem::certificates(node.as_bytes()).unwrap();
        let (_, c) = x509_parser::certificate::X509Certificate::from_der(&der[0]).unwrap();
        assert!(c.basic_constraints().unwrap().is_none());
    }
}
