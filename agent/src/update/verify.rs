//! The one verification path of a release asset, shared by `runos verify` and the updater:
//! the asset's sha256 against `checksums.txt` (when there is one), then its build-provenance
//! attestation with [`runos_attest::verify`].

use std::path::Path;
use std::time::SystemTime;

use runos_attest::{AttestError, Digest, Policy, PolicyError, TrustedRoot, Verified};
use runos_checksums::{Manifest, ManifestError};
use serde_json::{Value, json};

/// Why an asset was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// `checksums.txt` is malformed.
    #[error("checksums.txt is malformed: {0}")]
    Checksums(ManifestError),
    /// `checksums.txt` does not list the asset.
    #[error("checksums.txt has no entry for {0}")]
    NotListed(String),
    /// The asset's sha256 is not the one `checksums.txt` lists.
    #[error("sha256 mismatch for {asset}: checksums.txt lists {expected}, the file is {actual}")]
    Mismatch {
        /// The asset name.
        asset: String,
        /// The listed digest.
        expected: Digest,
        /// The file's digest.
        actual: Digest,
    },
    /// The attestation was rejected.
    #[error("attestation rejected: {0}")]
    Attestation(#[from] AttestError),
}

/// The trusted root: `path`, or the public-good root compiled in.
pub fn load_root(path: Option<&Path>) -> Result<TrustedRoot, String> {
    match path {
        Some(p) => TrustedRoot::from_file(p).map_err(|e| e.to_string()),
        None => TrustedRoot::public_good().map_err(|e| e.to_string()),
    }
}

/// The release policy for `tag` with the configured `workflow`.
pub fn release_policy(
    repo: &str,
    workflow: &str,
    tag: &str,
    asset: &str,
) -> Result<Policy, PolicyError> {
    let p = Policy::for_release(repo, tag, asset)?;
    if workflow == p.workflow() {
        Ok(p)
    } else {
        Policy::new(repo, workflow, p.git_ref(), asset)
    }
}

/// Check `digest` (the asset's sha256) against `checksums` (when given), then the attestation
/// `bundle` under `policy` and `root`.
pub fn check(
    digest: &Digest,
    checksums: Option<&[u8]>,
    bundle: &[u8],
    policy: &Policy,
    root: &TrustedRoot,
) -> Result<Verified, VerifyError> {
    if let Some(text) = checksums {
        let manifest = Manifest::parse(text).map_err(VerifyError::Checksums)?;
        let asset = policy.asset_name();
        let expected = manifest
            .get(asset)
            .ok_or_else(|| VerifyError::NotListed(asset.to_string()))?;
        if expected != *digest {
            return Err(VerifyError::Mismatch {
                asset: asset.to_string(),
                expected,
                actual: *digest,
            });
        }
    }
    Ok(runos_attest::verify(digest, bundle, policy, root)?)
}

fn time(t: SystemTime) -> String {
    crate::util::time::rfc3339(t)
}

/// What was verified, as JSON (`runos verify --json`, the audit of an update).
pub fn verified_json(v: &Verified) -> Value {
    json!({
        "sha256": v.artifact_sha256.to_hex(),
        "asset": v.asset_name,
        "predicateType": v.predicate_type,
        "identity": v.identity,
        "issuer": v.issuer,
        "repository": v.repository,
        "repositoryId": v.repository_id,
        "ref": v.git_ref,
        "commit": v.commit,
        "runner": v.runner_environment,
        "runInvocationUri": v.run_invocation_uri,
        "logIndex": v.log_index,
        "integratedTime": v.integrated_time.map(time),
        "signedAt": time(v.signed_at),
    })
}

/// What was verified, as text lines.
pub fn verified_text(v: &Verified) -> String {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    format!(
        "asset:      {}\nsha256:     {}\nidentity:   {}\nissuer:     {}\nrepository: {}{}\nref:        {}\ncommit:     {}\nrunner:     {}\nrun:        {}\nlog index:  {}\nsigned at:  {}\n",
        v.asset_name,
        v.artifact_sha256.to_hex(),
        v.identity,
        v.issuer,
        v.repository,
        v.repository_id
            .as_ref()
            .map(|id| format!(" (id {id})"))
            .unwrap_or_default(),
        v.git_ref,
        opt(&v.commit),
        opt(&v.runner_environment),
        opt(&v.run_invocation_uri),
        v.log_index,
        time(v.signed_at),
    )
}
