//! ECDSA keys (P-256 and P-384), held as `rcgen` key pairs backed by `ring`.

use anyhow::{Context, Result, bail};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PublicKeyData, SigningKey};
use sha2::{Digest, Sha256};
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::spki::AlgorithmIdentifierOwned;

/// `ecdsa-with-SHA256` (RFC 5758).
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
/// `ecdsa-with-SHA384` (RFC 5758).
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");

/// An ECDSA private key. P-256 keys sign with SHA-256, P-384 keys with SHA-384;
/// signatures are ASN.1 DER, as X.509, Rekor, CT and DSSE all expect.
pub(crate) struct EcKey {
    pair: KeyPair,
}

impl std::fmt::Debug for EcKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcKey")
            .field("curve", &if self.is_p384() { "P-384" } else { "P-256" })
            .field("key_id", &hex::encode(self.key_id()))
            .finish_non_exhaustive()
    }
}

impl EcKey {
    pub(crate) fn generate_p256() -> Result<Self> {
        Ok(Self {
            pair: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                .context("generating a P-256 key")?,
        })
    }

    pub(crate) fn generate_p384() -> Result<Self> {
        Ok(Self {
            pair: KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)
                .context("generating a P-384 key")?,
        })
    }

    /// Reads a PKCS#8 `PRIVATE KEY` PEM as written by [`EcKey::to_pem`].
    pub(crate) fn from_pem(pem: &str) -> Result<Self> {
        let pair = KeyPair::from_pem(pem).context("parsing a PKCS#8 private key")?;
        if pair.algorithm() != &PKCS_ECDSA_P256_SHA256
            && pair.algorithm() != &PKCS_ECDSA_P384_SHA384
        {
            bail!("only ECDSA P-256 and P-384 keys are supported");
        }
        Ok(Self { pair })
    }

    /// PKCS#8 `PRIVATE KEY` PEM.
    pub(crate) fn to_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    pub(crate) fn is_p384(&self) -> bool {
        self.pair.algorithm() == &PKCS_ECDSA_P384_SHA384
    }

    /// DER SubjectPublicKeyInfo.
    pub(crate) fn spki_der(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// SHA-256 of the DER SubjectPublicKeyInfo: the Rekor log ID and the CT
    /// log ID (RFC 6962 §3.2) of a log using this key.
    pub(crate) fn key_id(&self) -> [u8; 32] {
        Sha256::digest(self.spki_der()).into()
    }

    /// ECDSA signature (ASN.1 DER) over `msg`, hashed with the curve's hash.
    pub(crate) fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        self.pair.sign(msg).context("ECDSA signing")
    }

    /// The X.509 signature algorithm of certificates this key signs.
    pub(crate) fn signature_algorithm(&self) -> AlgorithmIdentifierOwned {
        AlgorithmIdentifierOwned {
            oid: if self.is_p384() {
                ECDSA_WITH_SHA384
            } else {
                ECDSA_WITH_SHA256
            },
            parameters: None,
        }
    }
}
