//! Error types. Messages name the failed check in operator language; values taken from the
//! bundle are sanitised (control characters escaped) and shortened before they are stored.

use std::path::PathBuf;

use runos_checksums::{Digest, NameError};

/// Why a [`Policy`](crate::Policy) could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The repository is not `owner/name`.
    #[error(
        "repository {0:?} is not owner/name (owner: letters, digits and -, at most 39; name: letters, digits, ., - and _, at most 100)"
    )]
    Repo(String),
    /// The workflow is not a file under `.github/workflows/`.
    #[error("workflow {0:?} is not a .yml or .yaml file directly under .github/workflows/")]
    Workflow(String),
    /// The git ref is not a plain `refs/...` name.
    #[error("git ref {0:?} is not a refs/... name of printable ASCII without spaces")]
    GitRef(String),
    /// The release tag is not `vMAJOR.MINOR.PATCH` with an optional pre-release.
    #[error("release tag {0:?} is not vMAJOR.MINOR.PATCH or vMAJOR.MINOR.PATCH-PRERELEASE")]
    Tag(String),
    /// The asset name is not a plain file name.
    #[error("asset name {name:?}: {reason}")]
    AssetName {
        /// The name (shortened).
        name: String,
        /// Why it is refused.
        reason: NameError,
    },
    /// The repository id is not a decimal number.
    #[error("repository id {0:?} is not a decimal number")]
    RepositoryId(String),
}

/// Why a trusted root could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    /// The trusted root is larger than [`MAX_TRUSTED_ROOT_BYTES`](crate::MAX_TRUSTED_ROOT_BYTES).
    #[error("trusted root is larger than {max} bytes")]
    TooLarge {
        /// The bound.
        max: usize,
    },
    /// The file could not be read.
    #[error("cannot read trusted root {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a Sigstore `trusted_root.json`.
    #[error("trusted root is not a valid Sigstore trusted_root.json: {0}")]
    Malformed(String),
    /// It parses, but its keys or certificates cannot be used to verify keyless bundles.
    #[error("trusted root cannot be used: {0}")]
    Unusable(String),
}

/// Why an attestation was rejected.
///
/// Variants group the checks: the bundle's shape, the statement, the signer's identity and
/// claims, and the cryptographic evidence. Identity values are public (they are in the
/// transparency log) and are printed in full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The bundle is larger than [`MAX_BUNDLE_BYTES`](crate::MAX_BUNDLE_BYTES).
    #[error("attestation bundle is {size} bytes, more than the {max} allowed")]
    BundleTooLarge {
        /// Its size.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// The bundle is not a well-formed Sigstore bundle (JSON, encoding or structure).
    #[error("attestation bundle is malformed: {0}")]
    BundleMalformed(String),
    /// The bundle is a Sigstore bundle but not a DSSE in-toto attestation made with a
    /// certificate (for example a plain message signature or a managed-key bundle).
    #[error("bundle is not a keyless DSSE in-toto attestation: {0}")]
    NotAnAttestation(String),
    /// The in-toto statement cannot be read or is not an in-toto v1 statement.
    #[error("attestation statement is invalid: {0}")]
    Statement(String),
    /// The predicate type is not SLSA provenance v1.
    #[error("attestation predicate type is {actual}: expected {expected}")]
    PredicateType {
        /// What the statement says.
        actual: String,
        /// [`SLSA_PROVENANCE_V1`](crate::SLSA_PROVENANCE_V1).
        expected: &'static str,
    },
    /// No subject of the statement has the asset's name.
    #[error("attestation has no subject named {asset_name} (its subjects: {subjects})")]
    SubjectNotFound {
        /// The asset name the policy requires.
        asset_name: String,
        /// The subjects' names, shortened.
        subjects: String,
    },
    /// More than one subject has the asset's name.
    #[error("attestation names {asset_name} in {count} subjects: expected exactly one")]
    SubjectAmbiguous {
        /// The asset name.
        asset_name: String,
        /// How many subjects carry it.
        count: usize,
    },
    /// The subject named as the asset has another sha256 than the asset (or none).
    #[error(
        "attestation subject {asset_name} has sha256 {attested}: the file to install has {actual}"
    )]
    SubjectDigestMismatch {
        /// The asset name.
        asset_name: String,
        /// The subject's sha256 (or "none").
        attested: String,
        /// The asset's sha256.
        actual: Digest,
    },
    /// No subject of the statement has the asset's sha256: the bundle attests other files.
    #[error("attestation covers no file with sha256 {artifact}: it was made for another file")]
    ArtifactMismatch {
        /// The asset's sha256.
        artifact: Digest,
    },
    /// The certificate's identity (SAN) is not the expected workflow at the expected ref.
    #[error("certificate identity is {actual}: expected {expected}")]
    Identity {
        /// The identity the policy requires.
        expected: String,
        /// The certificate's identity ("none" if it has none).
        actual: String,
    },
    /// The certificate's OIDC issuer is not GitHub Actions.
    #[error("certificate OIDC issuer is {actual}: expected {expected}")]
    Issuer {
        /// [`GITHUB_ACTIONS_ISSUER`](crate::GITHUB_ACTIONS_ISSUER).
        expected: String,
        /// The certificate's issuer ("none" if it has none).
        actual: String,
    },
    /// A CI claim of the certificate (Fulcio extension) has another value than the policy's.
    #[error("certificate claim {claim} is {actual}: expected {expected}")]
    Claim {
        /// The claim's name, e.g. `source_repository_ref`.
        claim: &'static str,
        /// The expected value.
        expected: String,
        /// The certificate's value ("none" if absent).
        actual: String,
    },
    /// The DSSE signature does not verify with the certificate's key.
    #[error("signature does not verify: {0}")]
    Signature(String),
    /// The signing certificate does not chain to the trusted Fulcio root at the signing time,
    /// or its SCT is missing or invalid.
    #[error("signing certificate rejected: {0}")]
    Certificate(String),
    /// The transparency-log evidence is missing or invalid: entry, inclusion proof, checkpoint,
    /// SET, integrated time, or an entry that does not describe this bundle.
    #[error("transparency log evidence rejected: {0}")]
    TransparencyLog(String),
    /// An RFC 3161 timestamp is invalid, or no trusted signing time could be established.
    #[error("timestamp rejected: {0}")]
    Timestamp(String),
    /// The trusted root cannot verify this bundle (for example a log key it does not hold).
    #[error("trusted root cannot verify this bundle: {0}")]
    TrustedRoot(String),
    /// The bundle uses a format or algorithm this verifier does not support.
    #[error("unsupported attestation bundle: {0}")]
    Unsupported(String),
    /// Verification ended without one of the required checks having run. Never expected; a
    /// safeguard against a change in the underlying library.
    #[error("verification incomplete: {0} was not verified")]
    Incomplete(&'static str),
    /// Any other verification failure reported by the Sigstore library.
    #[error("attestation verification failed: {0}")]
    Other(String),
}
