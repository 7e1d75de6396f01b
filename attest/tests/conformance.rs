//! The sigstore-conformance `bundle-verify` suite (tests/data/conformance, 70 cases), run
//! through [`verify_bundle_raw`]: the Sigstore layer that [`runos_attest::verify`] builds on.
//! Every `*_fail` case must be rejected with the error kind listed below, every other case
//! accepted. The suite is the regression net for upgrades of `sigstore-verify`.
//!
//! Managed-key cases (`key.pub` present) have no certificate and so no identity: they cannot
//! be a release attestation, and our API has no key-based entry point. They are run directly
//! through `sigstore-verify`'s key policy so the library's behaviour is still pinned.

use std::path::{Path, PathBuf};

use runos_attest::{AttestError, TrustedRoot, verify_bundle_raw};

const DEFAULT_IDENTITY: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
const DEFAULT_ISSUER: &str = "https://token.actions.githubusercontent.com";

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance")
}

fn read_opt(dir: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(name)).ok()
}

fn text_or(dir: &Path, name: &str, default: &str) -> String {
    read_opt(dir, name)
        .map(|b| String::from_utf8(b).unwrap().trim().to_string())
        .unwrap_or_else(|| default.to_string())
}

/// Outcome of a case: Ok, or the name of the error kind.
fn run_case(dir: &Path) -> Result<(), String> {
    let bundle = std::fs::read(dir.join("bundle.sigstore.json")).unwrap();
    let artifact =
        read_opt(dir, "artifact").unwrap_or_else(|| std::fs::read(data().join("a.txt")).unwrap());
    let root = match read_opt(dir, "trusted_root.json") {
        Some(json) => TrustedRoot::from_json(&json),
        None => TrustedRoot::public_good(),
    }
    .map_err(|e| format!("Root({e})"))?;

    if let Some(key) = read_opt(dir, "key.pub") {
        return run_managed_key(dir, &artifact, &bundle, &key);
    }
    let identity = text_or(dir, "identity", DEFAULT_IDENTITY);
    let issuer = text_or(dir, "issuer", DEFAULT_ISSUER);
    verify_bundle_raw(&artifact, &bundle, &identity, &issuer, &root).map_err(kind)
}

fn run_managed_key(dir: &Path, artifact: &[u8], bundle: &[u8], key: &[u8]) -> Result<(), String> {
    use sigstore_verify::{PublicKeyVerificationPolicy, Verifier};
    let root_json = read_opt(dir, "trusted_root.json")
        .map(|b| String::from_utf8(b).unwrap())
        .unwrap_or_else(|| runos_attest::PUBLIC_GOOD_TRUSTED_ROOT.to_string());
    let root = sigstore_verify::trust_root::TrustedRoot::from_json(&root_json).unwrap();
    let bundle = sigstore_verify::types::Bundle::from_json(std::str::from_utf8(bundle).unwrap())
        .map_err(|e| format!("Parse({e})"))?;
    let key = sigstore_verify::types::DerPublicKey::from_pem(std::str::from_utf8(key).unwrap())
        .map_err(|e| format!("Key({e})"))?;
    Verifier::new(&root)
        .unwrap()
        .verify(artifact, &bundle, &PublicKeyVerificationPolicy::new(key))
        .map(|_| ())
        .map_err(|e| format!("KeyPolicy({e})"))
}

fn kind(e: AttestError) -> String {
    let name = match &e {
        AttestError::BundleTooLarge { .. } => "BundleTooLarge",
        AttestError::BundleMalformed(_) => "BundleMalformed",
        AttestError::NotAnAttestation(_) => "NotAnAttestation",
        AttestError::Statement(_) => "Statement",
        AttestError::PredicateType { .. } => "PredicateType",
        AttestError::SubjectNotFound { .. } => "SubjectNotFound",
        AttestError::SubjectAmbiguous { .. } => "SubjectAmbiguous",
        AttestError::SubjectDigestMismatch { .. } => "SubjectDigestMismatch",
        AttestError::ArtifactMismatch { .. } => "ArtifactMismatch",
        AttestError::Identity { .. } => "Identity",
        AttestError::Issuer { .. } => "Issuer",
        AttestError::Claim { .. } => "Claim",
        AttestError::Signature(_) => "Signature",
        AttestError::Certificate(_) => "Certificate",
        AttestError::TransparencyLog(_) => "TransparencyLog",
        AttestError::Timestamp(_) => "Timestamp",
        AttestError::TrustedRoot(_) => "TrustedRoot",
        AttestError::Unsupported(_) => "Unsupported",
        AttestError::Incomplete(_) => "Incomplete",
        AttestError::Other(_) => "Other",
        _ => "Unknown",
    };
    format!("{name}({e})")
}

/// Every case and the outcome sigstore-verify 0.15.1 gives it: `ok`, or the [`AttestError`]
/// kind (`Root` when the trusted root itself is refused, `Key` when the managed key does not
/// parse). Where the library rejects a `_fail` case for another reason than the one its README
/// states, the comment says so.
const EXPECTED: &[(&str, &str)] = &[
    // Needs no checkpoint in its inclusion proof to be rejected before its chain is looked at.
    ("bundle-empty-certificate-chain_fail", "TransparencyLog"),
    ("bundle-from-wrong-instance_fail", "TransparencyLog"),
    ("bundle-invalid-base64-signature_fail", "BundleMalformed"),
    ("bundle-malformed-json_fail", "BundleMalformed"),
    ("bundle-negative-log-index_fail", "BundleMalformed"),
    ("bundle-unknown-version_fail", "BundleMalformed"),
    // Rejected for its checkpoint-less inclusion proof, not for the root certificate in its
    // chain: see `root_certificate_in_chain` below.
    ("bundle-with-root-cert_fail", "TransparencyLog"),
    ("bundle-with-sct-with-extensions", "ok"),
    ("checkpoint-bad-keyhint_fail", "TransparencyLog"),
    ("checkpoint-wrong-roothash_fail", "TransparencyLog"),
    ("dsse-invalid-sig_fail", "Signature"),
    ("dsse-mismatch-envelope_fail", "TransparencyLog"),
    ("dsse-mismatch-sig_fail", "TransparencyLog"),
    ("happy-path-intoto-in-dsse-v3", "ok"),
    ("happy-path-v0.1", "ok"),
    ("happy-path-v0.2", "ok"),
    ("happy-path-v0.3", "ok"),
    ("happy-path-v0.3-new-mediaType", "ok"),
    ("inclusion-proof-corrupted-hash_fail", "TransparencyLog"),
    ("incorrect-public-key_fail", "TransparencyLog"),
    // The certificate is checked at the SET time before the integrated time itself.
    ("integrated-time-in-future_fail", "Certificate"),
    ("intoto-expired-certificate_fail", "Certificate"),
    ("intoto-log-entry-mismatch_fail", "TransparencyLog"),
    ("intoto-missing-inclusion-proof_fail", "TransparencyLog"),
    (
        "intoto-set-outside-signing-cert-validity_fail",
        "Certificate",
    ),
    (
        "intoto-tsa-timestamp-outside-cert-validity_fail",
        "Certificate",
    ),
    ("intoto-with-custom-trust-root", "ok"),
    ("invalid-checkpoint-signature_fail", "TransparencyLog"),
    ("invalid-ct-key_fail", "Certificate"),
    // Its proof has no checkpoint (an older proof format), refused before the proof is checked.
    ("invalid-inclusion-proof_fail", "TransparencyLog"),
    ("managed-key-and-trusted-root", "ok"),
    ("managed-key-happy-path", "ok"),
    // Run as keyless (there is no key.pub): no certificate.
    ("managed-key-no-key_fail", "BundleMalformed"),
    // Its key.pub is not valid base64 ("…wrongkey=="): refused before any signature check.
    ("managed-key-wrong-key_fail", "Key"),
    ("message-digest-mismatch_fail", "ArtifactMismatch"),
    ("rekor2-checkpoint-cosigned", "ok"),
    (
        "rekor2-checkpoint-missing-log-signature_fail",
        "BundleMalformed",
    ),
    ("rekor2-checkpoint-missing-origin_fail", "BundleMalformed"),
    (
        "rekor2-checkpoint-missing-root-hash_fail",
        "BundleMalformed",
    ),
    ("rekor2-checkpoint-missing-size_fail", "BundleMalformed"),
    ("rekor2-checkpoint-multiple-cosigs", "ok"),
    (
        "rekor2-checkpoint-no-matching-signature_fail",
        "TransparencyLog",
    ),
    ("rekor2-checkpoint-origin-not-first", "ok"),
    ("rekor2-checkpoint-two-sigs-cosigned", "ok"),
    ("rekor2-checkpoint-two-sigs-from-origin", "ok"),
    ("rekor2-dsse-happy-path", "ok"),
    ("rekor2-dsse-invalid-sig_fail", "Signature"),
    // The envelope's statement names another digest, so the artifact binding fails first.
    ("rekor2-dsse-mismatch-envelope_fail", "ArtifactMismatch"),
    ("rekor2-dsse-mismatch-sig_fail", "TransparencyLog"),
    ("rekor2-happy-path", "ok"),
    ("rekor2-no-inclusion-proof_fail", "TransparencyLog"),
    ("rekor2-no-timestamp_fail", "Timestamp"),
    (
        "rekor2-timestamp-outside-trust-root-tsa-validity_fail",
        "Timestamp",
    ),
    (
        "rekor2-timestamp-outside-tsa-cert-validity_fail",
        "Timestamp",
    ),
    ("rekor2-timestamp-payload-mismatch_fail", "Timestamp"),
    (
        "rekor2-timestamp-untrusted-tsa-with-embedded-cert_fail",
        "Timestamp",
    ),
    (
        "rekor2-timestamp-untrusted-tsa-without-embedded-cert_fail",
        "Timestamp",
    ),
    ("rekor2-timestamp-with-embedded-cert", "ok"),
    ("rekor2-timestamp-with-expired-cert-chain", "ok"),
    // Its timestamp is line-wrapped base64, refused by the parser before the time is checked:
    // see `incorrect_timestamp_time` below.
    (
        "rekor2-timestamp-with-incorrect-time_fail",
        "BundleMalformed",
    ),
    ("rekor2-timestamp-without-embedded-cert", "ok"),
    ("set-invalid-signature_fail", "TransparencyLog"),
    ("signature-mismatch_fail", "Signature"),
    ("trust-root-tlog-missing-validity-start_fail", "Root"),
    ("trust-root-tlog-validity-end-inclusive", "ok"),
    ("trust-root-tsa-validity-end-inclusive", "ok"),
    ("wrong-hashedrekord-artifact_fail", "ArtifactMismatch"),
    ("wrong-hashedrekord-cert-and-sig_fail", "TransparencyLog"),
    ("wrong-hashedrekord-entry_fail", "ArtifactMismatch"),
    ("wrong-material_fail", "ArtifactMismatch"),
];

#[test]
fn bundle_verify_suite() {
    let mut dirs: Vec<_> = std::fs::read_dir(data())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let listed: Vec<&str> = EXPECTED.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names, listed,
        "the table must list every case directory, in order"
    );
    assert_eq!(names.len(), 70);

    let mut wrong = Vec::new();
    let (mut accepted, mut rejected) = (0, 0);
    for (dir, (name, expected)) in dirs.iter().zip(EXPECTED) {
        // The suite's own rule first: `_fail` cases must fail, the others pass.
        assert_eq!(
            name.ends_with("_fail"),
            *expected != "ok",
            "{name}: table contradicts the suite's naming"
        );
        let outcome = run_case(dir);
        let got = match &outcome {
            Ok(()) => "ok".to_string(),
            Err(e) => e.split('(').next().unwrap_or_default().to_string(),
        };
        if outcome.is_ok() {
            accepted += 1;
        } else {
            rejected += 1;
        }
        println!("{name}: {outcome:?}");
        if got != *expected {
            wrong.push(format!("{name}: expected {expected}, got {outcome:?}"));
        }
    }
    println!("conformance: {accepted} accepted, {rejected} rejected");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `bundle-with-root-cert_fail` is rejected only because its inclusion proof has no
/// checkpoint. Without the proof (its v0.1 media type needs only the SET) and with its own
/// identity, sigstore-verify accepts it: a chain that carries the root is not refused (the
/// library uses only the trusted root's CA certificates, so nothing untrusted is believed).
/// Our `verify` refuses any chain with more than the signing certificate, and refuses message
/// signatures anyway.
#[test]
fn root_certificate_in_chain() {
    let dir = data().join("bundle-with-root-cert_fail");
    let artifact = std::fs::read(dir.join("artifact")).unwrap();
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("bundle.sigstore.json")).unwrap()).unwrap();
    assert!(
        v["verificationMaterial"]["x509CertificateChain"]["certificates"]
            .as_array()
            .unwrap()
            .len()
            > 1
    );
    v["verificationMaterial"]["tlogEntries"][0]
        .as_object_mut()
        .unwrap()
        .remove("inclusionProof");
    let bundle = serde_json::to_vec(&v).unwrap();
    let root = TrustedRoot::public_good().unwrap();
    let raw = verify_bundle_raw(
        &artifact,
        &bundle,
        "a@tny.town",
        "https://github.com/login/oauth",
        &root,
    );
    assert!(raw.is_ok(), "{raw:?}");
    let policy = runos_attest::Policy::new(
        "sigstore-conformance/x",
        ".github/workflows/release.yml",
        "refs/tags/v1.0.0",
        "artifact",
    )
    .unwrap();
    let e = runos_attest::verify(&runos_checksums::sha256(&artifact), &bundle, &policy, &root)
        .unwrap_err();
    assert!(
        matches!(
            e,
            AttestError::NotAnAttestation(_) | AttestError::BundleMalformed(_)
        ),
        "{e:?}"
    );
}

/// `rekor2-timestamp-with-incorrect-time_fail` carries its RFC 3161 token as line-wrapped
/// base64, which the bundle parser refuses. With the line breaks removed it is refused for the
/// reason the case is about: the timestamp is outside the certificate's validity.
#[test]
fn incorrect_timestamp_time() {
    let dir = data().join("rekor2-timestamp-with-incorrect-time_fail");
    let root =
        TrustedRoot::from_json(&std::fs::read(dir.join("trusted_root.json")).unwrap()).unwrap();
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("bundle.sigstore.json")).unwrap()).unwrap();
    let slot = &mut v["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"][0]
        ["signedTimestamp"];
    let unwrapped = slot.as_str().unwrap().replace('\n', "");
    *slot = unwrapped.into();
    let e = verify_bundle_raw(
        &std::fs::read(data().join("a.txt")).unwrap(),
        &serde_json::to_vec(&v).unwrap(),
        DEFAULT_IDENTITY,
        DEFAULT_ISSUER,
        &root,
    )
    .unwrap_err();
    assert!(matches!(e, AttestError::Certificate(_)), "{e:?}");
}
