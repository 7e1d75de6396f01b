//! Offline verification of the GitHub build-provenance attestation of a runos release asset.
//!
//! A release workflow (`.github/workflows/release.yml`, run on a `vX.Y.Z` tag) attests each
//! asset with `actions/attest-build-provenance`: a Sigstore bundle holding a DSSE envelope with
//! an in-toto statement whose predicate is SLSA provenance v1, signed with a short-lived Fulcio
//! certificate issued to the workflow run, and logged in Rekor. [`verify`] checks such a bundle
//! against the asset's SHA-256, a [`Policy`] (repository, workflow, tag, asset name) and a
//! [`TrustedRoot`], without any network access:
//!
//! - through `sigstore-verify`: the certificate chain to Fulcio at the signing time, the
//!   embedded SCT, the Rekor inclusion proof, signed checkpoint and SET, that the log entry
//!   describes this bundle, the DSSE signature, and the certificate identity (exact SAN) and
//!   OIDC issuer;
//! - here, on top: a size bound on the bundle; exactly one transparency-log entry, with an
//!   inclusion proof; a DSSE envelope with an in-toto v1 statement; predicate type
//!   `https://slsa.dev/provenance/v1`; exactly one subject named as the asset, whose sha256 is
//!   the asset's; the certificate's CI claims (source repository, ref, GitHub-hosted runner,
//!   optionally the repository's numeric id).
//!
//! Every failure is an [`AttestError`] that says which check failed, in words an operator can
//! act on. Nothing here panics on input, and every input is bounded.
//!
//! The crate knows nothing of HTTP or the agent: the caller downloads the asset and the bundle,
//! computes the asset's SHA-256 (`runos-checksums`), and decides what to do with the
//! [`Verified`] result. It installs no process-wide crypto provider: `sigstore-verify` uses
//! `aws-lc-rs` directly, and rustls' provider selection elsewhere is unaffected.
//!
//! Only the roots given to it are trusted: the embedded public-good root
//! ([`TrustedRoot::public_good`]) or a `trusted_root.json` the operator configures
//! ([`TrustedRoot::from_file`]). There is no test-only trust material in this crate.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod error;
mod policy;
mod root;
mod statement;
mod verify;

pub use error::{AttestError, PolicyError, RootError};
pub use policy::{DEFAULT_WORKFLOW, Policy};
pub use root::{
    MAX_TRUSTED_ROOT_BYTES, PUBLIC_GOOD_TRUSTED_ROOT, PUBLIC_GOOD_TRUSTED_ROOT_SHA256, RootSource,
    TrustedRoot,
};
pub use runos_checksums::Digest;
pub use verify::{MAX_BUNDLE_BYTES, Verified, verify, verify_bundle_raw};

/// The OIDC issuer of GitHub Actions, the only issuer [`verify`] accepts.
pub const GITHUB_ACTIONS_ISSUER: &str = "https://token.actions.githubusercontent.com";

/// The DSSE payload type of an in-toto statement.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// The in-toto statement type [`verify`] accepts.
pub const IN_TOTO_STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";

/// The predicate type [`verify`] requires: SLSA build provenance v1.
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";

/// The `runner_environment` claim of a GitHub-hosted runner.
pub const GITHUB_HOSTED: &str = "github-hosted";

/// `text` made safe to print: control characters escaped, at most `max` characters.
pub(crate) fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The agent keeps a root for its lifetime and verifies from a blocking task.
    #[test]
    fn public_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::TrustedRoot>();
        check::<super::Policy>();
        check::<super::Verified>();
        check::<super::AttestError>();
        check::<super::RootError>();
    }

    #[test]
    fn sanitize_escapes_and_bounds() {
        assert_eq!(super::sanitize("a\u{1b}[2Jb\n", 100), "a\\u{1b}[2Jb\\n");
        assert_eq!(super::sanitize("abcdef", 3), "abc…");
        assert_eq!(super::sanitize("", 3), "");
    }
}
