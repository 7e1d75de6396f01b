//! [`verify`]: the whole check of one release asset's attestation.

use std::time::SystemTime;

use runos_checksums::Digest;
use sigstore_types::bundle::VerificationMaterialContent;
use sigstore_types::{Bundle, Sha256Hash, SignatureContent};
use sigstore_verify::{IdentityMatcher, SubjectAltName, VerificationPolicy, VerificationResult};

use crate::error::AttestError;
use crate::policy::Policy;
use crate::root::TrustedRoot;
use crate::{GITHUB_ACTIONS_ISSUER, GITHUB_HOSTED, IN_TOTO_PAYLOAD_TYPE, sanitize, statement};

/// Largest bundle accepted: 256 KiB. A GitHub provenance bundle is about 11 KB; the bound
/// leaves room for statements with many subjects.
pub const MAX_BUNDLE_BYTES: usize = 256 * 1024;

/// Longest detail taken from the Sigstore library's error messages.
const DETAIL_CHARS: usize = 240;

/// What a successful [`verify`] established, for the audit log. Only [`verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verified {
    /// The asset's SHA-256 (the attested subject's digest).
    pub artifact_sha256: Digest,
    /// The asset name (the attested subject's name).
    pub asset_name: String,
    /// The predicate type ([`SLSA_PROVENANCE_V1`](crate::SLSA_PROVENANCE_V1)).
    pub predicate_type: &'static str,
    /// The certificate identity (URI SAN): `https://github.com/<repo>/<workflow>@<ref>`.
    pub identity: String,
    /// The OIDC issuer ([`GITHUB_ACTIONS_ISSUER`]).
    pub issuer: String,
    /// The source repository URI (claim `source_repository_uri`).
    pub repository: String,
    /// The repository's numeric id (claim `source_repository_identifier`), if present.
    pub repository_id: Option<String>,
    /// The git ref built (claim `source_repository_ref`).
    pub git_ref: String,
    /// The commit built (claim `source_repository_digest`), if present.
    pub commit: Option<String>,
    /// The runner environment (claim `runner_environment`), if present.
    pub runner_environment: Option<String>,
    /// The workflow run that signed (claim `run_invocation_uri`), if present.
    pub run_invocation_uri: Option<String>,
    /// The Rekor log index of the entry.
    pub log_index: u64,
    /// Rekor's integrated time, authenticated by its SET (Rekor v1 entries; Rekor v2 entries
    /// have none and rely on an RFC 3161 timestamp).
    pub integrated_time: Option<SystemTime>,
    /// The earliest verified signing time (integrated time or RFC 3161 timestamp), at which
    /// the certificate was checked.
    pub signed_at: SystemTime,
}

/// Verifies the attestation `bundle_json` (a Sigstore bundle, as `attest-build-provenance`
/// uploads it and `gh attestation download` saves it, one bundle) for the asset whose SHA-256
/// is `artifact_sha256`, under `policy`, with `root` as the only trust.
///
/// Checks, in this order, each failure its own [`AttestError`]:
///
/// 1. the bundle is at most [`MAX_BUNDLE_BYTES`] and parses as a Sigstore bundle;
/// 2. it holds a DSSE envelope of type `application/vnd.in-toto+json`, a signing certificate
///    (not a managed key; a pre-v0.3 chain must hold only that certificate), and exactly one
///    transparency-log entry that carries an inclusion proof;
/// 3. `sigstore-verify`, with the exact identity [`Policy::expected_identity`] (as a URI SAN)
///    and issuer [`GITHUB_ACTIONS_ISSUER`]: the certificate chain to the root's Fulcio CA at
///    every verified signing time, the SCT, identity and issuer, the inclusion proof, the
///    signed checkpoint, the SET and integrated time, the DSSE signature, that some subject's
///    digest is `artifact_sha256`, and that the log entry describes this envelope and
///    certificate;
/// 4. that the certificate, SCT and log were all verified;
/// 5. the certificate's CI claims: `source_repository_uri` is
///    [`Policy::expected_repository_uri`], `source_repository_ref` is the policy's ref,
///    `runner_environment` is `github-hosted` (unless the policy allows self-hosted runners),
///    `source_repository_identifier` is the policy's repository id (when it names one);
/// 6. the statement: in-toto v1, predicate type SLSA provenance v1, exactly one subject named
///    [`Policy::asset_name`], and that subject's sha256 is `artifact_sha256`.
///
/// Time: certificate validity is judged at the signing time the log (or a timestamp
/// authority) vouches for, not at the current time. `sigstore-verify` reads the system clock
/// only to refuse a log entry or key dated in the future; it takes no clock parameter, so
/// neither does this function.
pub fn verify(
    artifact_sha256: &Digest,
    bundle_json: &[u8],
    policy: &Policy,
    root: &TrustedRoot,
) -> Result<Verified, AttestError> {
    let bundle = parse_bundle(bundle_json)?;
    let (payload, log_index) = check_shape(&bundle)?;

    let expected_identity = policy.expected_identity();
    let sigstore_policy = VerificationPolicy::new(
        IdentityMatcher::Uri(expected_identity.clone()),
        GITHUB_ACTIONS_ISSUER,
    );
    let artifact = Sha256Hash::new(*artifact_sha256.as_bytes());
    let result = root
        .verifier()
        .verify(artifact, &bundle, &sigstore_policy)
        .map_err(|e| map_error(e, artifact_sha256))?;

    check_evidence(&result)?;
    let claims = check_identity_and_claims(&result, policy, &expected_identity)?;
    let predicate_type = statement::check(payload, policy.asset_name(), artifact_sha256)?;

    let signed_at = result
        .verified_timestamps()
        .iter()
        .min()
        .copied()
        .ok_or(AttestError::Incomplete("a signing time"))?;
    Ok(Verified {
        artifact_sha256: *artifact_sha256,
        asset_name: policy.asset_name().to_string(),
        predicate_type,
        identity: expected_identity,
        issuer: GITHUB_ACTIONS_ISSUER.to_string(),
        repository: claims.repository,
        repository_id: claims.repository_id,
        git_ref: claims.git_ref,
        commit: claims.commit,
        runner_environment: claims.runner_environment,
        run_invocation_uri: claims.run_invocation_uri,
        log_index,
        integrated_time: result.integrated_time().map(SystemTime::from),
        signed_at: SystemTime::from(signed_at),
    })
}

/// Full Sigstore verification of any keyless bundle (DSSE or message signature) over the
/// artifact bytes, with the exact certificate identity and issuer, and transparency-log,
/// certificate and SCT verification all required; no provenance policy (no predicate,
/// subject-name, claim or shape checks beyond the library's).
///
/// This is the layer [`verify`] builds on. It exists for conformance testing of that layer
/// and for diagnostics; the updater must use [`verify`].
pub fn verify_bundle_raw(
    artifact: &[u8],
    bundle_json: &[u8],
    identity: &str,
    issuer: &str,
    root: &TrustedRoot,
) -> Result<(), AttestError> {
    let bundle = parse_bundle(bundle_json)?;
    let result = root
        .verifier()
        .verify(
            artifact,
            &bundle,
            &VerificationPolicy::new(identity, issuer),
        )
        .map_err(|e| map_error(e, &runos_checksums::sha256(artifact)))?;
    check_evidence(&result)
}

fn parse_bundle(bundle_json: &[u8]) -> Result<Bundle, AttestError> {
    if bundle_json.len() > MAX_BUNDLE_BYTES {
        return Err(AttestError::BundleTooLarge {
            size: bundle_json.len(),
            max: MAX_BUNDLE_BYTES,
        });
    }
    let text = std::str::from_utf8(bundle_json)
        .map_err(|_| AttestError::BundleMalformed("not UTF-8".to_string()))?;
    Bundle::from_json(text)
        .map_err(|e| AttestError::BundleMalformed(sanitize(&e.to_string(), DETAIL_CHARS)))
}

/// The structural requirements of a release attestation; returns the DSSE payload and the
/// log index.
fn check_shape(bundle: &Bundle) -> Result<(&[u8], u64), AttestError> {
    let envelope = match &bundle.content {
        SignatureContent::DsseEnvelope(envelope) => envelope,
        SignatureContent::MessageSignature(_) => {
            return Err(AttestError::NotAnAttestation(
                "it holds a plain message signature, not a DSSE envelope".to_string(),
            ));
        }
        _ => {
            return Err(AttestError::NotAnAttestation(
                "it holds no DSSE envelope".to_string(),
            ));
        }
    };
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(AttestError::NotAnAttestation(format!(
            "the DSSE payload type is {}: expected {IN_TOTO_PAYLOAD_TYPE}",
            sanitize(&envelope.payload_type, 80)
        )));
    }
    match &bundle.verification_material.content {
        VerificationMaterialContent::Certificate(_) => {}
        // Bundles before v0.3 carry a chain; only the leaf is used (the CA certificates come
        // from the trusted root), so a chain with anything else in it is refused rather than
        // ignored.
        VerificationMaterialContent::X509CertificateChain { certificates } => {
            if certificates.len() != 1 {
                return Err(AttestError::BundleMalformed(format!(
                    "the certificate chain holds {} certificates: expected only the signing certificate",
                    certificates.len()
                )));
            }
        }
        VerificationMaterialContent::PublicKey(_) => {
            return Err(AttestError::NotAnAttestation(
                "it is signed with a managed key, not a Fulcio certificate".to_string(),
            ));
        }
        _ => {
            return Err(AttestError::NotAnAttestation(
                "it holds no signing certificate".to_string(),
            ));
        }
    }
    let entries = &bundle.verification_material.tlog_entries;
    let [entry] = entries.as_slice() else {
        return Err(AttestError::TransparencyLog(format!(
            "the bundle has {} transparency log entries: expected exactly one",
            entries.len()
        )));
    };
    if entry.inclusion_proof.is_none() {
        return Err(AttestError::TransparencyLog(
            "the transparency log entry has no inclusion proof".to_string(),
        ));
    }
    Ok((envelope.payload.as_bytes(), entry.log_index.get()))
}

/// Every piece of evidence the library reports must have been checked.
fn check_evidence(result: &VerificationResult) -> Result<(), AttestError> {
    if !result.certificate_verified() {
        return Err(AttestError::Incomplete("the certificate chain"));
    }
    if !result.sct_verified() {
        return Err(AttestError::Incomplete("the certificate's SCT"));
    }
    if !result.tlog_verified() {
        return Err(AttestError::Incomplete("transparency log inclusion"));
    }
    if !result.identity_policy_checked() {
        return Err(AttestError::Incomplete("the certificate identity"));
    }
    if result.verified_timestamps().is_empty() {
        return Err(AttestError::Incomplete("a signing time"));
    }
    Ok(())
}

struct Claims {
    repository: String,
    repository_id: Option<String>,
    git_ref: String,
    commit: Option<String>,
    runner_environment: Option<String>,
    run_invocation_uri: Option<String>,
}

fn shown(value: Option<&str>) -> String {
    value.map_or_else(|| "none".to_string(), |v| sanitize(v, 200))
}

/// Identity and issuer again (the library checked them; this keeps the rule local and the
/// error specific), then the CI claims.
fn check_identity_and_claims(
    result: &VerificationResult,
    policy: &Policy,
    expected_identity: &str,
) -> Result<Claims, AttestError> {
    match result.identity() {
        Some(SubjectAltName::Uri(uri)) if uri == expected_identity => {}
        other => {
            return Err(AttestError::Identity {
                expected: expected_identity.to_string(),
                actual: shown(other.map(SubjectAltName::as_str)),
            });
        }
    }
    if result.issuer() != Some(GITHUB_ACTIONS_ISSUER) {
        return Err(AttestError::Issuer {
            expected: GITHUB_ACTIONS_ISSUER.to_string(),
            actual: shown(result.issuer()),
        });
    }
    let cert = result
        .certificate()
        .ok_or(AttestError::Incomplete("the signing certificate"))?;
    let ci = &cert.ci_claims;

    let claim = |name: &'static str, actual: Option<&String>, expected: &str| {
        if actual.map(String::as_str) == Some(expected) {
            Ok(expected.to_string())
        } else {
            Err(AttestError::Claim {
                claim: name,
                expected: expected.to_string(),
                actual: shown(actual.map(String::as_str)),
            })
        }
    };
    let repository = claim(
        "source_repository_uri",
        ci.source_repository_uri.as_ref(),
        &policy.expected_repository_uri(),
    )?;
    let git_ref = claim(
        "source_repository_ref",
        ci.source_repository_ref.as_ref(),
        policy.git_ref(),
    )?;
    if policy.requires_github_hosted() {
        claim(
            "runner_environment",
            ci.runner_environment.as_ref(),
            GITHUB_HOSTED,
        )?;
    }
    if let Some(id) = policy.repository_id() {
        claim(
            "source_repository_identifier",
            ci.source_repository_identifier.as_ref(),
            id,
        )?;
    }
    let keep = |v: &Option<String>| v.as_deref().map(|s| sanitize(s, 200));
    Ok(Claims {
        repository,
        repository_id: keep(&ci.source_repository_identifier),
        git_ref,
        commit: keep(&ci.source_repository_digest),
        runner_environment: keep(&ci.runner_environment),
        run_invocation_uri: keep(&ci.run_invocation_uri),
    })
}

/// Sorts the library's errors into our variants.
fn map_error(error: sigstore_verify::Error, artifact: &Digest) -> AttestError {
    use sigstore_verify::Error as E;
    let detail = |e: &dyn std::fmt::Display| sanitize(&e.to_string(), DETAIL_CHARS);
    match error {
        E::IdentityMismatch { expected, actual } => AttestError::Identity {
            expected: match expected {
                IdentityMatcher::Exact(s) | IdentityMatcher::Uri(s) | IdentityMatcher::Email(s) => {
                    s
                }
                other => other.to_string(),
            },
            actual: shown(actual.as_ref().map(SubjectAltName::as_str)),
        },
        E::IssuerMismatch { expected, actual } => AttestError::Issuer {
            expected,
            actual: shown(actual.as_deref()),
        },
        E::SignatureInvalid(s) => AttestError::Signature(detail(&s)),
        E::ArtifactMismatch(_) => AttestError::ArtifactMismatch {
            artifact: *artifact,
        },
        E::UnsupportedArtifact(s) | E::UnsupportedBundle(s) => AttestError::Unsupported(detail(&s)),
        E::Certificate(e) => AttestError::Certificate(detail(&e)),
        E::TransparencyLog(e) => AttestError::TransparencyLog(detail(&e)),
        E::Timestamp(e) => AttestError::Timestamp(detail(&e)),
        E::InvalidBundle(s) => AttestError::BundleMalformed(detail(&s)),
        E::Types(e) => AttestError::BundleMalformed(detail(&e)),
        E::Bundle(e) => {
            use sigstore_verify::bundle::Error as B;
            match e {
                B::MissingInclusionPromise(_)
                | B::MissingInclusionProof(_)
                | B::MissingSigningTimeEvidence
                | B::MissingCheckpoint
                | B::LogIndexOutOfRange { .. }
                | B::CheckpointRootMismatch => AttestError::TransparencyLog(detail(&e)),
                B::MissingTimestamp => AttestError::Timestamp(detail(&e)),
                _ => AttestError::BundleMalformed(detail(&e)),
            }
        }
        E::InvalidTrustRoot(s) => AttestError::TrustedRoot(detail(&s)),
        E::TrustRoot(e) => AttestError::TrustedRoot(detail(&e)),
        E::TrustedCertificate(e) => AttestError::TrustedRoot(detail(&e)),
        other => AttestError::Other(detail(&other)),
    }
}
