//! The Fulcio-like CA: root and intermediate certificates, and leaf
//! certificates issued the way Fulcio issues them (precertificate with the
//! CT poison extension, SCT from the CT log, then the final certificate).

use anyhow::{Context, Result, anyhow, ensure};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::der::asn1::{
    BitString, GeneralizedTime, Ia5String, Null, ObjectIdentifier, OctetString, UtcTime,
    Utf8StringRef,
};
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::{Decode, Encode, EncodePem, pem::LineEnding};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};

use crate::keys::EcKey;

/// RFC 6962 §3.1 precertificate poison extension.
pub(crate) const CT_PRECERT_POISON: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.11129.2.4.3");
/// RFC 6962 §3.3 embedded SCT list extension.
pub(crate) const CT_PRECERT_SCTS: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.11129.2.4.2");
/// `id-kp-codeSigning`.
const KP_CODE_SIGNING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.3");
/// The Fulcio extension arc: `1.3.6.1.4.1.57264.1.<n>`.
const FULCIO_ARC: &str = "1.3.6.1.4.1.57264.1";

/// How a Fulcio extension value is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FulcioEncoding {
    /// `.1.1`–`.1.6` (deprecated): the raw string is the extension value.
    Raw,
    /// `.1.8` onwards: a DER UTF8String is the extension value.
    Utf8String,
}

/// One Fulcio claim: `1.3.6.1.4.1.57264.1.<number>`.
#[derive(Debug, Clone)]
pub(crate) struct FulcioClaim {
    pub number: u32,
    pub encoding: FulcioEncoding,
    pub value: String,
}

/// What goes into a leaf certificate besides its key and validity.
#[derive(Debug, Clone)]
pub(crate) struct LeafProfile {
    pub san_uri: String,
    pub claims: Vec<FulcioClaim>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// When the CT log signs the SCT, in milliseconds since the epoch.
    pub sct_timestamp_ms: u64,
}

/// A certificate and its DER.
#[derive(Debug, Clone)]
pub(crate) struct Cert {
    pub cert: Certificate,
    pub der: Vec<u8>,
}

impl Cert {
    fn new(cert: Certificate) -> Result<Self> {
        let der = cert.to_der().context("encoding a certificate")?;
        Ok(Self { cert, der })
    }

    pub(crate) fn from_pem(pem: &str) -> Result<Self> {
        use x509_cert::der::DecodePem;
        Self::new(Certificate::from_pem(pem).context("parsing a PEM certificate")?)
    }

    pub(crate) fn to_pem(&self) -> Result<String> {
        self.cert
            .to_pem(LineEnding::LF)
            .context("encoding a PEM certificate")
    }

    pub(crate) fn subject(&self) -> &Name {
        &self.cert.tbs_certificate.subject
    }

    pub(crate) fn spki_der(&self) -> Result<Vec<u8>> {
        self.cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .context("encoding a SubjectPublicKeyInfo")
    }

    #[cfg(test)]
    pub(crate) fn not_before(&self) -> Result<OffsetDateTime> {
        let secs = self
            .cert
            .tbs_certificate
            .validity
            .not_before
            .to_unix_duration()
            .as_secs();
        Ok(OffsetDateTime::from_unix_timestamp(i64::try_from(secs)?)?)
    }

    #[cfg(test)]
    pub(crate) fn not_after(&self) -> Result<OffsetDateTime> {
        let secs = self
            .cert
            .tbs_certificate
            .validity
            .not_after
            .to_unix_duration()
            .as_secs();
        Ok(OffsetDateTime::from_unix_timestamp(i64::try_from(secs)?)?)
    }
}

pub(crate) fn parse_name(rfc4514: &str) -> Result<Name> {
    rfc4514
        .parse()
        .map_err(|e| anyhow!("bad distinguished name {rfc4514:?}: {e}"))
}

/// RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
fn x509_time(t: OffsetDateTime) -> Result<Time> {
    let secs = u64::try_from(t.unix_timestamp()).context("time before 1970")?;
    let d = std::time::Duration::from_secs(secs);
    Ok(if t.year() < 2050 {
        Time::UtcTime(UtcTime::from_unix_duration(d)?)
    } else {
        Time::GeneralTime(GeneralizedTime::from_unix_duration(d)?)
    })
}

/// A positive, 20-byte random serial number.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes: [u8; 20] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::new(&bytes).context("serial number")
}

/// RFC 7093 §2 method 1: the leftmost 160 bits of SHA-256 of the key bits.
fn key_identifier(spki: &SubjectPublicKeyInfoOwned) -> Result<OctetString> {
    let digest = Sha256::digest(spki.subject_public_key.raw_bytes());
    Ok(OctetString::new(&digest[..20])?)
}

fn extension(oid: ObjectIdentifier, critical: bool, value: &impl Encode) -> Result<Extension> {
    Ok(Extension {
        extn_id: oid,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

fn raw_extension(oid: ObjectIdentifier, critical: bool, value: &[u8]) -> Result<Extension> {
    Ok(Extension {
        extn_id: oid,
        critical,
        extn_value: OctetString::new(value)?,
    })
}

fn spki_of(key: &EcKey) -> Result<SubjectPublicKeyInfoOwned> {
    SubjectPublicKeyInfoOwned::from_der(&key.spki_der()).context("parsing a SubjectPublicKeyInfo")
}

/// Signs `tbs` with `signer` and assembles the certificate.
fn sign(tbs: TbsCertificate, signer: &EcKey) -> Result<Cert> {
    ensure!(
        tbs.signature == signer.signature_algorithm(),
        "TBS signature algorithm does not match the signing key"
    );
    let tbs_der = tbs.to_der().context("encoding a TBSCertificate")?;
    let signature = signer.sign(&tbs_der)?;
    Cert::new(Certificate {
        signature_algorithm: tbs.signature.clone(),
        tbs_certificate: tbs,
        signature: BitString::from_bytes(&signature)?,
    })
}

/// A CA certificate for `key`, signed by `issuer` (self-signed when `None`).
pub(crate) fn ca_certificate(
    key: &EcKey,
    subject: Name,
    issuer: Option<(&Cert, &EcKey)>,
    path_len: u8,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Cert> {
    let spki = spki_of(key)?;
    let ski = key_identifier(&spki)?;
    let (issuer_name, aki, signer) = match issuer {
        Some((cert, issuer_key)) => (
            cert.subject().clone(),
            key_identifier(&cert.cert.tbs_certificate.subject_public_key_info)?,
            issuer_key,
        ),
        None => (subject.clone(), ski.clone(), key),
    };
    let mut extensions = vec![
        extension(
            KeyUsage::OID,
            true,
            &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
        )?,
        extension(
            BasicConstraints::OID,
            true,
            &BasicConstraints {
                ca: true,
                path_len_constraint: Some(path_len),
            },
        )?,
        extension(SubjectKeyIdentifier::OID, false, &SubjectKeyIdentifier(ski))?,
        extension(
            AuthorityKeyIdentifier::OID,
            false,
            &AuthorityKeyIdentifier {
                key_identifier: Some(aki),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?,
    ];
    if issuer.is_some() {
        // Like Fulcio's intermediate: restricted to code signing.
        extensions.insert(
            1,
            extension(
                ExtendedKeyUsage::OID,
                false,
                &ExtendedKeyUsage(vec![KP_CODE_SIGNING]),
            )?,
        );
    }
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: random_serial()?,
        signature: signer.signature_algorithm(),
        issuer: issuer_name,
        validity: Validity {
            not_before: x509_time(not_before)?,
            not_after: x509_time(not_after)?,
        },
        subject,
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    };
    sign(tbs, signer)
}

/// Issues a Fulcio-style code-signing leaf for `leaf_key`, with one embedded
/// SCT obtained from `ct_log` for the precertificate (RFC 6962 §3.1).
pub(crate) fn issue_leaf(
    intermediate: &Cert,
    intermediate_key: &EcKey,
    ct_log: &EcKey,
    leaf_key: &EcKey,
    profile: &LeafProfile,
) -> Result<Cert> {
    let spki = spki_of(leaf_key)?;
    let san = SubjectAltName(vec![GeneralName::UniformResourceIdentifier(
        Ia5String::new(&profile.san_uri).context("SAN URI must be ASCII")?,
    )]);
    // Fulcio's order: KU, EKU, SKI, AKI, SAN, the Fulcio claims, then the SCTs.
    let mut extensions = vec![
        extension(
            KeyUsage::OID,
            true,
            &KeyUsage(KeyUsages::DigitalSignature.into()),
        )?,
        extension(
            ExtendedKeyUsage::OID,
            false,
            &ExtendedKeyUsage(vec![KP_CODE_SIGNING]),
        )?,
        extension(
            SubjectKeyIdentifier::OID,
            false,
            &SubjectKeyIdentifier(key_identifier(&spki)?),
        )?,
        extension(
            AuthorityKeyIdentifier::OID,
            false,
            &AuthorityKeyIdentifier {
                key_identifier: Some(key_identifier(
                    &intermediate.cert.tbs_certificate.subject_public_key_info,
                )?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?,
        // Critical because the subject is empty (RFC 5280 §4.2.1.6).
        extension(SubjectAltName::OID, true, &san)?,
    ];
    for claim in &profile.claims {
        let oid = ObjectIdentifier::new(&format!("{FULCIO_ARC}.{}", claim.number))
            .context("Fulcio claim OID")?;
        extensions.push(match claim.encoding {
            FulcioEncoding::Raw => raw_extension(oid, false, claim.value.as_bytes())?,
            FulcioEncoding::Utf8String => {
                extension(oid, false, &Utf8StringRef::new(&claim.value)?)?
            }
        });
    }
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: random_serial()?,
        signature: intermediate_key.signature_algorithm(),
        issuer: intermediate.subject().clone(),
        validity: Validity {
            not_before: x509_time(profile.not_before)?,
            not_after: x509_time(profile.not_after)?,
        },
        subject: Name::default(),
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    };

    // 1. The precertificate: the same TBS plus the critical poison extension.
    let mut pre_tbs = tbs.clone();
    if let Some(exts) = pre_tbs.extensions.as_mut() {
        exts.push(extension(CT_PRECERT_POISON, true, &Null)?);
    }
    let precert = sign(pre_tbs, intermediate_key)?;

    // 2. The CT log signs the precertificate entry.
    let sct = crate::ct::sign_precertificate(
        ct_log,
        &precert.der,
        &intermediate.spki_der()?,
        profile.sct_timestamp_ms,
    )?;

    // 3. The final certificate: the TBS plus the SCT list extension.
    let mut final_tbs = tbs;
    if let Some(exts) = final_tbs.extensions.as_mut() {
        exts.push(raw_extension(
            CT_PRECERT_SCTS,
            false,
            &crate::ct::sct_list_extension_value(&[sct])?,
        )?);
    }
    sign(final_tbs, intermediate_key)
}
