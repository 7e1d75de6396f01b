//! The provenance policy layer, [`runos_attest::verify`], on real GitHub Actions bundles from
//! public-good Sigstore (tests/data, see its README), and on variants of them made here.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use runos_attest::{
    AttestError, Digest, GITHUB_ACTIONS_ISSUER, MAX_BUNDLE_BYTES, PUBLIC_GOOD_TRUSTED_ROOT, Policy,
    RootError, SLSA_PROVENANCE_V1, TrustedRoot, Verified, verify, verify_bundle_raw,
};
use runos_checksums::sha256;
use serde_json::Value;

const BEACON_REPO: &str = "sigstore-conformance/extremely-dangerous-public-oidc-beacon";
const BEACON_WORKFLOW: &str = ".github/workflows/extremely-dangerous-oidc-beacon.yml";
const BEACON_IDENTITY: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(data(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn public_good() -> TrustedRoot {
    TrustedRoot::public_good().unwrap()
}

/// P1: sigstore-conformance happy-path-intoto-in-dsse-v3, an attest-build-provenance-shaped
/// bundle (DSSE, in-toto v1, SLSA provenance v1, subject a.txt) from a GitHub Actions workflow.
fn p1() -> (Vec<u8>, Digest) {
    (
        read("conformance/happy-path-intoto-in-dsse-v3/bundle.sigstore.json"),
        sha256(&read("conformance/a.txt")),
    )
}

fn beacon_policy(asset: &str) -> Policy {
    Policy::new(BEACON_REPO, BEACON_WORKFLOW, "refs/heads/main", asset).unwrap()
}

fn edit(bundle: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(bundle).unwrap();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// Flips one bit of the base64-encoded bytes at the JSON pointer.
fn flip_b64(v: &mut Value, pointer: &str, byte: usize, bit: u8) {
    let slot = v
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer}"));
    let mut bytes = STANDARD.decode(slot.as_str().unwrap()).unwrap();
    let i = byte.min(bytes.len() - 1);
    bytes[i] ^= 1 << bit;
    *slot = Value::String(STANDARD.encode(bytes));
}

fn p1_result(bundle: &[u8]) -> Result<Verified, AttestError> {
    let (_, artifact) = p1();
    verify(&artifact, bundle, &beacon_policy("a.txt"), &public_good())
}

/// Asserts rejection with the expected variant; prints the message for the log.
macro_rules! rejected {
    ($result:expr, $pattern:pat) => {{
        match $result {
            Err(e @ $pattern) => {
                println!("rejected as expected: {e}");
                e
            }
            other => panic!("expected {}, got {other:?}", stringify!($pattern)),
        }
    }};
}

// ---------------------------------------------------------------------------------------------
// Accepted

#[test]
fn github_actions_provenance_verifies_with_the_right_policy() {
    let (bundle, artifact) = p1();
    let v = verify(&artifact, &bundle, &beacon_policy("a.txt"), &public_good()).unwrap();
    assert_eq!(v.artifact_sha256, artifact);
    assert_eq!(
        v.artifact_sha256.to_hex(),
        "a0cfc71271d6e278e57cd332ff957c3f7043fdda354c4cbb190a30d56efa01bf"
    );
    assert_eq!(v.asset_name, "a.txt");
    assert_eq!(v.predicate_type, SLSA_PROVENANCE_V1);
    assert_eq!(v.identity, BEACON_IDENTITY);
    assert_eq!(v.issuer, GITHUB_ACTIONS_ISSUER);
    assert_eq!(v.repository, format!("https://github.com/{BEACON_REPO}"));
    assert_eq!(v.git_ref, "refs/heads/main");
    assert_eq!(v.runner_environment.as_deref(), Some("github-hosted"));
    let commit = v.commit.as_deref().unwrap();
    assert!(
        commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{commit}"
    );
    assert!(v.repository_id.is_some());
    assert!(
        v.run_invocation_uri
            .as_deref()
            .unwrap()
            .starts_with("https://github.com/")
    );
    assert_eq!(v.log_index, 155_690_850);
    let integrated = SystemTime::UNIX_EPOCH + Duration::from_secs(1_734_374_576);
    assert_eq!(v.integrated_time, Some(integrated));
    assert_eq!(v.signed_at, integrated);
    println!("{v:#?}");
}

#[test]
fn repository_id_pin_and_self_hosted_allowance() {
    let (bundle, artifact) = p1();
    let id = verify(&artifact, &bundle, &beacon_policy("a.txt"), &public_good())
        .unwrap()
        .repository_id
        .unwrap();
    let pinned = beacon_policy("a.txt").with_repository_id(&id).unwrap();
    assert!(verify(&artifact, &bundle, &pinned, &public_good()).is_ok());
    // Allowing self-hosted runners does not reject a GitHub-hosted one.
    let relaxed = beacon_policy("a.txt").with_require_github_hosted(false);
    assert!(verify(&artifact, &bundle, &relaxed, &public_good()).is_ok());
    // A different repository id (a re-created repository of the same name).
    let other = beacon_policy("a.txt").with_repository_id("1").unwrap();
    let e = rejected!(
        verify(&artifact, &bundle, &other, &public_good()),
        AttestError::Claim {
            claim: "source_repository_identifier",
            ..
        }
    );
    assert_eq!(
        e.to_string(),
        format!("certificate claim source_repository_identifier is {id}: expected 1")
    );
}

#[test]
fn custom_trusted_root_from_file() {
    // conformance intoto-with-custom-trust-root: a v0.2 bundle (DSSE, SLSA v1, intoto 0.0.2
    // log entry, TSA timestamp) signed under a private Sigstore instance described by its
    // trusted_root.json. Proves a configured root is used, and is the only one used.
    let dir = "conformance/intoto-with-custom-trust-root";
    let root = TrustedRoot::from_file(data(&format!("{dir}/trusted_root.json"))).unwrap();
    let bundle = read(&format!("{dir}/bundle.sigstore.json"));
    let artifact = read(&format!("{dir}/artifact"));
    verify_bundle_raw(
        &artifact,
        &bundle,
        BEACON_IDENTITY,
        GITHUB_ACTIONS_ISSUER,
        &root,
    )
    .unwrap();
    // The public-good root does not trust that instance.
    rejected!(
        verify_bundle_raw(
            &artifact,
            &bundle,
            BEACON_IDENTITY,
            GITHUB_ACTIONS_ISSUER,
            &public_good()
        ),
        AttestError::Timestamp(_) | AttestError::Certificate(_) | AttestError::TransparencyLog(_)
    );
    // Through the policy layer: the trust is fine, but this synthetic certificate carries no
    // GitHub CI claims, so the release policy refuses it.
    let e = rejected!(
        verify(&sha256(&artifact), &bundle, &beacon_policy("d.txt"), &root),
        AttestError::Claim {
            claim: "source_repository_uri",
            ..
        }
    );
    assert_eq!(
        e.to_string(),
        format!(
            "certificate claim source_repository_uri is none: expected https://github.com/{BEACON_REPO}"
        )
    );
    rejected!(
        verify(
            &sha256(&artifact),
            &bundle,
            &beacon_policy("d.txt"),
            &public_good()
        ),
        AttestError::Timestamp(_) | AttestError::Certificate(_) | AttestError::TransparencyLog(_)
    );
}

#[test]
fn rekor_v2_dsse_attestation_under_a_custom_root() {
    // conformance rekor2-dsse-happy-path: DSSE over Rekor v2 (hashedrekord 0.0.2), signed on
    // staging with a TSA timestamp; no integrated time.
    let dir = "conformance/rekor2-dsse-happy-path";
    let root = TrustedRoot::from_json(&read(&format!("{dir}/trusted_root.json"))).unwrap();
    let (bundle, artifact) = (read(&format!("{dir}/bundle.sigstore.json")), p1().1);
    let v = verify(&artifact, &bundle, &beacon_policy("a.txt"), &root).unwrap();
    assert_eq!(v.integrated_time, None);
    assert!(v.signed_at > SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    assert_eq!(v.identity, BEACON_IDENTITY);
    assert_eq!(v.runner_environment.as_deref(), Some("github-hosted"));
    // The public-good root does not hold staging's keys.
    rejected!(
        verify(&artifact, &bundle, &beacon_policy("a.txt"), &public_good()),
        AttestError::Timestamp(_) | AttestError::Certificate(_) | AttestError::TransparencyLog(_)
    );
}

// ---------------------------------------------------------------------------------------------
// Rejected: policy

#[test]
fn wrong_repository() {
    let (bundle, artifact) = p1();
    let policy = Policy::new(
        "sigstore-conformance/other-repo",
        BEACON_WORKFLOW,
        "refs/heads/main",
        "a.txt",
    )
    .unwrap();
    let e = rejected!(
        verify(&artifact, &bundle, &policy, &public_good()),
        AttestError::Identity { .. }
    );
    assert_eq!(
        e.to_string(),
        format!(
            "certificate identity is {BEACON_IDENTITY}: expected https://github.com/sigstore-conformance/other-repo/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main"
        )
    );
}

#[test]
fn wrong_workflow() {
    let (bundle, artifact) = p1();
    let policy = Policy::new(
        BEACON_REPO,
        ".github/workflows/release.yml",
        "refs/heads/main",
        "a.txt",
    )
    .unwrap();
    rejected!(
        verify(&artifact, &bundle, &policy, &public_good()),
        AttestError::Identity { .. }
    );
}

#[test]
fn wrong_tag_or_ref() {
    let (bundle, artifact) = p1();
    for git_ref in ["refs/tags/v1.0.0", "refs/heads/main2", "refs/heads/Main"] {
        let policy = Policy::new(BEACON_REPO, BEACON_WORKFLOW, git_ref, "a.txt").unwrap();
        rejected!(
            verify(&artifact, &bundle, &policy, &public_good()),
            AttestError::Identity { .. }
        );
    }
    // Case matters: GitHub's canonical spelling is what the certificate carries.
    let policy = Policy::new(
        &BEACON_REPO.to_uppercase(),
        BEACON_WORKFLOW,
        "refs/heads/main",
        "a.txt",
    )
    .unwrap();
    rejected!(
        verify(&artifact, &bundle, &policy, &public_good()),
        AttestError::Identity { .. }
    );
}

#[test]
fn release_tag_binding_on_a_real_release_identity() {
    // sigstore-python bundle_v3_github: the real `release.yml@refs/tags/v0.1.2` identity shape
    // of trailofbits/rfc8785.py. It is a message signature, not an attestation, so the policy
    // layer refuses it whatever the tag; the Sigstore layer shows the tag binding.
    let bundle = read("sigstore-python/bundle_v3_github.whl.sigstore");
    let wheel = read("sigstore-python/bundle_v3_github.whl");
    let root = public_good();
    let policy =
        Policy::for_release("trailofbits/rfc8785.py", "v0.1.2", "bundle_v3_github.whl").unwrap();
    assert_eq!(
        policy.expected_identity(),
        "https://github.com/trailofbits/rfc8785.py/.github/workflows/release.yml@refs/tags/v0.1.2"
    );
    rejected!(
        verify(&sha256(&wheel), &bundle, &policy, &root),
        AttestError::NotAnAttestation(_)
    );
    verify_bundle_raw(
        &wheel,
        &bundle,
        &policy.expected_identity(),
        GITHUB_ACTIONS_ISSUER,
        &root,
    )
    .unwrap();
    let older = Policy::for_release("trailofbits/rfc8785.py", "v0.1.1", "x").unwrap();
    rejected!(
        verify_bundle_raw(
            &wheel,
            &bundle,
            &older.expected_identity(),
            GITHUB_ACTIONS_ISSUER,
            &root
        ),
        AttestError::Identity { .. }
    );
    let mut flipped = wheel.clone();
    flipped[100] ^= 1;
    rejected!(
        verify_bundle_raw(
            &flipped,
            &bundle,
            &policy.expected_identity(),
            GITHUB_ACTIONS_ISSUER,
            &root
        ),
        AttestError::ArtifactMismatch { .. } | AttestError::Signature(_)
    );
}

#[test]
fn wrong_issuer() {
    // gh-cli custom-issuer: valid, but issued by https://token.actions.githubusercontent.com/hammer-time.
    let bundle = read("gh-cli/custom-issuer.sigstore.json");
    let artifact = sha256(&read("gh-cli/custom-issuer-artifact"));
    let policy = Policy::new(
        "too-legit/attest",
        ".github/workflows/integration.yml",
        "refs/heads/main",
        "artifact",
    )
    .unwrap();
    let e = rejected!(
        verify(&artifact, &bundle, &policy, &public_good()),
        AttestError::Issuer { .. }
    );
    assert_eq!(
        e.to_string(),
        "certificate OIDC issuer is https://token.actions.githubusercontent.com/hammer-time: expected https://token.actions.githubusercontent.com"
    );
    // Cryptographically it is fine: with its own issuer the Sigstore layer accepts it.
    verify_bundle_raw(
        &read("gh-cli/custom-issuer-artifact"),
        &bundle,
        &policy.expected_identity(),
        "https://token.actions.githubusercontent.com/hammer-time",
        &public_good(),
    )
    .unwrap();
}

#[test]
fn wrong_asset_name() {
    let (bundle, artifact) = p1();
    let e = rejected!(
        verify(
            &artifact,
            &bundle,
            &beacon_policy("runos_linux_amd64"),
            &public_good()
        ),
        AttestError::SubjectNotFound { .. }
    );
    assert_eq!(
        e.to_string(),
        "attestation has no subject named runos_linux_amd64 (its subjects: a.txt)"
    );
}

#[test]
fn artifact_of_another_file() {
    let (bundle, _) = p1();
    // The digest of another real file, and one flipped bit of the right file.
    let other = sha256(&read("gh-cli/reusable-workflow-artifact"));
    let mut a = read("conformance/a.txt");
    a[0] ^= 1;
    for artifact in [other, sha256(&a)] {
        let e = rejected!(
            verify(&artifact, &bundle, &beacon_policy("a.txt"), &public_good()),
            AttestError::ArtifactMismatch { .. }
        );
        assert!(e.to_string().contains(&artifact.to_hex()));
    }
}

#[test]
fn bundle_paired_with_another_artifact() {
    // P2 (gh-cli reusable-workflow) is a valid attestation, for another file, by another
    // workflow. Paired with P1's artifact under P1's policy it must fail.
    let p2 = read("gh-cli/reusable-workflow-attestation.sigstore.json");
    let (_, a) = p1();
    rejected!(
        verify(&a, &p2, &beacon_policy("a.txt"), &public_good()),
        AttestError::Identity { .. }
    );
    // And P1's bundle with P2's artifact and subject name.
    let (p1_bundle, _) = p1();
    let p2_artifact = sha256(&read("gh-cli/reusable-workflow-artifact"));
    rejected!(
        verify(
            &p2_artifact,
            &p1_bundle,
            &beacon_policy("github_provenance_demo-0.0.0-py3-none-any.whl"),
            &public_good()
        ),
        AttestError::ArtifactMismatch { .. }
    );
}

#[test]
fn reusable_workflow_attestation_is_not_the_repository_release_workflow() {
    // P2 verifies cryptographically, but its certificate names the reusable workflow
    // github/artifact-attestations-workflows, not malancas/attest-demo's own workflow.
    let bundle = read("gh-cli/reusable-workflow-attestation.sigstore.json");
    let artifact = read("gh-cli/reusable-workflow-artifact");
    verify_bundle_raw(
        &artifact,
        &bundle,
        "https://github.com/github/artifact-attestations-workflows/.github/workflows/attest.yml@09b495c3f12c7881b3cc17209a327792065c1a1d",
        GITHUB_ACTIONS_ISSUER,
        &public_good(),
    )
    .unwrap();
    // The older trusted root cli/cli ships (Rekor v1, Fulcio, CT only) verifies it too.
    let gh_root = TrustedRoot::from_json(&read("gh-cli/trusted_root.json")).unwrap();
    verify_bundle_raw(
        &artifact,
        &bundle,
        "https://github.com/github/artifact-attestations-workflows/.github/workflows/attest.yml@09b495c3f12c7881b3cc17209a327792065c1a1d",
        GITHUB_ACTIONS_ISSUER,
        &gh_root,
    )
    .unwrap();
    let policy = Policy::new(
        "malancas/attest-demo",
        ".github/workflows/shared.yml",
        "refs/heads/main",
        "github_provenance_demo-0.0.0-py3-none-any.whl",
    )
    .unwrap();
    let e = rejected!(
        verify(&sha256(&artifact), &bundle, &policy, &public_good()),
        AttestError::Identity { .. }
    );
    assert!(
        e.to_string().contains("artifact-attestations-workflows"),
        "{e}"
    );
}

#[test]
fn sha512_only_attestation_is_refused() {
    // gh-cli sigstore-js 2.1.0: npm provenance with an intoto 0.0.2 entry and only a sha512
    // subject. The Sigstore layer accepts it with the bytes; the release policy needs sha256.
    let bundle = read("gh-cli/sigstore-js-2.1.0-bundle.json");
    let tgz = read("gh-cli/sigstore-js-2.1.0.tgz");
    let identity =
        "https://github.com/sigstore/sigstore-js/.github/workflows/release.yml@refs/heads/main";
    verify_bundle_raw(
        &tgz,
        &bundle,
        identity,
        GITHUB_ACTIONS_ISSUER,
        &public_good(),
    )
    .unwrap();
    let policy = Policy::new(
        "sigstore/sigstore-js",
        ".github/workflows/release.yml",
        "refs/heads/main",
        "sigstore-2.1.0.tgz",
    )
    .unwrap();
    rejected!(
        verify(&sha256(&tgz), &bundle, &policy, &public_good()),
        AttestError::ArtifactMismatch { .. } | AttestError::Unsupported(_)
    );
}

#[test]
fn invalid_signature_bundle_from_gh_cli() {
    // gh-cli sigstoreBundle-invalid-signature: DSSE of type text/plain ("hello, world!").
    let bundle = read("gh-cli/sigstoreBundle-invalid-signature.json");
    let (_, a) = p1();
    rejected!(
        verify(&a, &bundle, &beacon_policy("a.txt"), &public_good()),
        AttestError::NotAnAttestation(_)
    );
    assert!(
        verify_bundle_raw(
            b"hello, world!",
            &bundle,
            BEACON_IDENTITY,
            GITHUB_ACTIONS_ISSUER,
            &public_good()
        )
        .is_err()
    );
}

#[test]
fn github_private_instance_bundle_is_refused_under_public_good() {
    // gh-cli github_provenance_demo .jsonl: GitHub's private Sigstore instance (TSA only, no
    // transparency log). One bundle per line; this is the only line.
    let jsonl = read("gh-cli/github_provenance_demo-0.0.12-py3-none-any-bundle.jsonl");
    let line = jsonl.split(|b| *b == b'\n').next().unwrap();
    let whl = sha256(&read(
        "gh-cli/github_provenance_demo-0.0.12-py3-none-any.whl",
    ));
    let policy = Policy::new(
        "actions/attest-demo",
        ".github/workflows/build-python.yml",
        "refs/heads/main",
        "github_provenance_demo-0.0.12-py3-none-any.whl",
    )
    .unwrap();
    rejected!(
        verify(&whl, line, &policy, &public_good()),
        AttestError::TransparencyLog(_)
    );
}

// ---------------------------------------------------------------------------------------------
// Rejected: tampering

#[test]
fn bit_flip_in_dsse_signature() {
    let (bundle, _) = p1();
    for byte in [0, 8, 20, 40, 69] {
        let b = edit(&bundle, |v| {
            flip_b64(v, "/dsseEnvelope/signatures/0/sig", byte, 0)
        });
        rejected!(p1_result(&b), AttestError::Signature(_));
    }
}

#[test]
fn bit_flip_in_payload() {
    let (bundle, _) = p1();
    // Flip the low bit of a letter inside the predicate (the JSON stays valid; "h" -> "i").
    let b = edit(&bundle, |v| {
        let slot = v.pointer_mut("/dsseEnvelope/payload").unwrap();
        let mut payload = STANDARD.decode(slot.as_str().unwrap()).unwrap();
        let at = payload
            .windows(b"buildType".len())
            .position(|w| w == b"buildType")
            .unwrap()
            + b"buildType\":\"h".len()
            - 1;
        assert_eq!(payload[at], b'h');
        payload[at] ^= 1;
        *slot = Value::String(STANDARD.encode(payload));
    });
    rejected!(p1_result(&b), AttestError::Signature(_));
    // A flip that breaks the JSON is caught when the statement is read.
    let b = edit(&bundle, |v| flip_b64(v, "/dsseEnvelope/payload", 0, 1));
    rejected!(
        p1_result(&b),
        AttestError::BundleMalformed(_) | AttestError::Signature(_)
    );
    // Re-encoding the statement with another predicate type breaks the signature.
    let b = edit(&bundle, |v| {
        let slot = v.pointer_mut("/dsseEnvelope/payload").unwrap();
        let payload = String::from_utf8(STANDARD.decode(slot.as_str().unwrap()).unwrap()).unwrap();
        let changed = payload.replace(SLSA_PROVENANCE_V1, "https://slsa.dev/provenance/v0.2");
        assert_ne!(changed, payload);
        *slot = Value::String(STANDARD.encode(changed));
    });
    rejected!(p1_result(&b), AttestError::Signature(_));
    // The payload type too (the PAE covers it).
    let b = edit(&bundle, |v| {
        v["dsseEnvelope"]["payloadType"] = "application/vnd.in-toto+json ".into();
    });
    rejected!(p1_result(&b), AttestError::NotAnAttestation(_));
}

#[test]
fn bit_flip_in_certificate() {
    let (bundle, _) = p1();
    let der_len = {
        let v: Value = serde_json::from_slice(&bundle).unwrap();
        STANDARD
            .decode(
                v["verificationMaterial"]["certificate"]["rawBytes"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap()
            .len()
    };
    // Header, issuer, validity, public key, SAN/extensions, signature: every one breaks it.
    for byte in [1, 40, 150, 250, 400, der_len / 2, der_len - 60, der_len - 5] {
        let b = edit(&bundle, |v| {
            flip_b64(v, "/verificationMaterial/certificate/rawBytes", byte, 2)
        });
        rejected!(
            p1_result(&b),
            AttestError::Certificate(_) | AttestError::BundleMalformed(_)
        );
    }
}

#[test]
fn certificate_of_another_signer() {
    // P1 with gh-cli custom-issuer's certificate: valid chain, but not at P1's log time and not
    // the key that signed.
    let (bundle, _) = p1();
    let other: Value = serde_json::from_slice(&read("gh-cli/custom-issuer.sigstore.json")).unwrap();
    let b = edit(&bundle, |v| {
        v["verificationMaterial"]["certificate"] =
            other["verificationMaterial"]["certificate"].clone();
    });
    rejected!(
        p1_result(&b),
        AttestError::Certificate(_)
            | AttestError::Identity { .. }
            | AttestError::TransparencyLog(_)
    );
}

#[test]
fn bit_flip_in_inclusion_proof() {
    let (bundle, _) = p1();
    let e0 = "/verificationMaterial/tlogEntries/0";
    for (pointer, byte) in [
        (format!("{e0}/inclusionProof/hashes/0"), 0),
        (format!("{e0}/inclusionProof/hashes/5"), 17),
        (format!("{e0}/inclusionProof/hashes/10"), 31),
        (format!("{e0}/inclusionProof/rootHash"), 3),
        (format!("{e0}/canonicalizedBody"), 100),
        (format!("{e0}/inclusionPromise/signedEntryTimestamp"), 30),
        (format!("{e0}/logId/keyId"), 0),
    ] {
        let b = edit(&bundle, |v| flip_b64(v, &pointer, byte, 4));
        rejected!(
            p1_result(&b),
            AttestError::TransparencyLog(_) | AttestError::TrustedRoot(_)
        );
    }
}

#[test]
fn edited_log_fields() {
    let (bundle, _) = p1();
    fn entry(v: &mut Value) -> &mut Value {
        &mut v["verificationMaterial"]["tlogEntries"][0]
    }
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "integratedTime + 1",
            Box::new(|v| entry(v)["integratedTime"] = "1734374577".into()),
        ),
        (
            "integratedTime - 1",
            Box::new(|v| entry(v)["integratedTime"] = "1734374575".into()),
        ),
        (
            "logIndex + 1",
            Box::new(|v| entry(v)["logIndex"] = "155690851".into()),
        ),
        (
            "proof logIndex + 1",
            Box::new(|v| entry(v)["inclusionProof"]["logIndex"] = "33786587".into()),
        ),
        (
            "treeSize + 1",
            Box::new(|v| entry(v)["inclusionProof"]["treeSize"] = "33786590".into()),
        ),
        (
            "hashes shortened",
            Box::new(|v| {
                entry(v)["inclusionProof"]["hashes"]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            }),
        ),
        (
            "hashes extended",
            Box::new(|v| {
                let h = entry(v)["inclusionProof"]["hashes"][0].clone();
                entry(v)["inclusionProof"]["hashes"]
                    .as_array_mut()
                    .unwrap()
                    .push(h);
            }),
        ),
        (
            "checkpoint edited",
            Box::new(|v| {
                let c = entry(v)["inclusionProof"]["checkpoint"]["envelope"]
                    .as_str()
                    .unwrap()
                    .replace("33786589", "33786590");
                entry(v)["inclusionProof"]["checkpoint"]["envelope"] = c.into();
            }),
        ),
    ];
    for (what, f) in cases {
        let b = edit(&bundle, |v| f(v));
        println!("{what}:");
        rejected!(
            p1_result(&b),
            AttestError::TransparencyLog(_) | AttestError::BundleMalformed(_)
        );
    }
}

#[test]
fn removed_inclusion_proof() {
    let (bundle, _) = p1();
    let b = edit(&bundle, |v| {
        v["verificationMaterial"]["tlogEntries"][0]
            .as_object_mut()
            .unwrap()
            .remove("inclusionProof");
    });
    let e = rejected!(p1_result(&b), AttestError::TransparencyLog(_));
    assert!(e.to_string().contains("no inclusion proof"), "{e}");
    // The Sigstore layer refuses it too.
    rejected!(
        verify_bundle_raw(
            &read("conformance/a.txt"),
            &b,
            BEACON_IDENTITY,
            GITHUB_ACTIONS_ISSUER,
            &public_good()
        ),
        AttestError::TransparencyLog(_)
    );
}

#[test]
fn removed_inclusion_promise() {
    // Without the SET there is no authenticated signing time (P1 has no TSA timestamp).
    let (bundle, _) = p1();
    let b = edit(&bundle, |v| {
        v["verificationMaterial"]["tlogEntries"][0]
            .as_object_mut()
            .unwrap()
            .remove("inclusionPromise");
    });
    rejected!(p1_result(&b), AttestError::Timestamp(_));
}

#[test]
fn removed_or_duplicated_log_entry() {
    let (bundle, _) = p1();
    let b = edit(&bundle, |v| {
        v["verificationMaterial"]["tlogEntries"] = Value::Array(vec![])
    });
    let e = rejected!(p1_result(&b), AttestError::TransparencyLog(_));
    assert!(e.to_string().contains("0 transparency log entries"), "{e}");
    let b = edit(&bundle, |v| {
        v["verificationMaterial"]
            .as_object_mut()
            .unwrap()
            .remove("tlogEntries");
    });
    rejected!(p1_result(&b), AttestError::TransparencyLog(_));
    let b = edit(&bundle, |v| {
        let e = v["verificationMaterial"]["tlogEntries"][0].clone();
        v["verificationMaterial"]["tlogEntries"]
            .as_array_mut()
            .unwrap()
            .push(e);
    });
    rejected!(p1_result(&b), AttestError::TransparencyLog(_));
}

#[test]
fn trusted_root_without_the_rekor_key() {
    let (bundle, artifact) = p1();
    let mut root: Value = serde_json::from_str(PUBLIC_GOOD_TRUSTED_ROOT).unwrap();
    // Drop the Rekor v1 log (keep the v2 one, so the root still loads).
    root["tlogs"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["baseUrl"] != "https://rekor.sigstore.dev");
    let root = TrustedRoot::from_json(&serde_json::to_vec(&root).unwrap()).unwrap();
    rejected!(
        verify(&artifact, &bundle, &beacon_policy("a.txt"), &root),
        AttestError::TransparencyLog(_) | AttestError::Timestamp(_)
    );
    // With no Rekor log at all the root is refused when loaded.
    let mut empty: Value = serde_json::from_str(PUBLIC_GOOD_TRUSTED_ROOT).unwrap();
    empty["tlogs"] = Value::Array(vec![]);
    assert!(matches!(
        TrustedRoot::from_json(&serde_json::to_vec(&empty).unwrap()),
        Err(RootError::Unusable(_))
    ));
}

#[test]
fn trusted_root_of_another_instance() {
    // The staging root (from a Rekor v2 conformance case) trusts neither P1's Fulcio nor Rekor.
    let (bundle, artifact) = p1();
    let staging =
        TrustedRoot::from_json(&read("conformance/rekor2-happy-path/trusted_root.json")).unwrap();
    rejected!(
        verify(&artifact, &bundle, &beacon_policy("a.txt"), &staging),
        AttestError::TransparencyLog(_) | AttestError::Certificate(_) | AttestError::Timestamp(_)
    );
    // A root with the right logs but another Fulcio CA.
    let mut root: Value = serde_json::from_str(PUBLIC_GOOD_TRUSTED_ROOT).unwrap();
    let staging_json: Value =
        serde_json::from_slice(&read("conformance/rekor2-happy-path/trusted_root.json")).unwrap();
    root["certificateAuthorities"] = staging_json["certificateAuthorities"].clone();
    let root = TrustedRoot::from_json(&serde_json::to_vec(&root).unwrap()).unwrap();
    rejected!(
        verify(&artifact, &bundle, &beacon_policy("a.txt"), &root),
        AttestError::Certificate(_)
    );
}

#[test]
fn truncated_json() {
    let (bundle, _) = p1();
    for cut in [
        0,
        1,
        10,
        100,
        bundle.len() / 3,
        bundle.len() / 2,
        bundle.len() - 2,
        bundle.len() - 1,
    ] {
        rejected!(p1_result(&bundle[..cut]), AttestError::BundleMalformed(_));
    }
}

#[test]
fn oversized_bundle() {
    let (bundle, _) = p1();
    let mut big = bundle.clone();
    big.resize(MAX_BUNDLE_BYTES + 1, b' ');
    let e = rejected!(p1_result(&big), AttestError::BundleTooLarge { .. });
    assert_eq!(
        e.to_string(),
        format!(
            "attestation bundle is {} bytes, more than the {MAX_BUNDLE_BYTES} allowed",
            MAX_BUNDLE_BYTES + 1
        )
    );
    // Whitespace up to the bound is still a valid bundle.
    let mut padded = bundle;
    padded.resize(MAX_BUNDLE_BYTES, b' ');
    assert!(p1_result(&padded).is_ok());
    rejected!(
        verify_bundle_raw(
            b"",
            &big,
            BEACON_IDENTITY,
            GITHUB_ACTIONS_ISSUER,
            &public_good()
        ),
        AttestError::BundleTooLarge { .. }
    );
}

#[test]
fn not_json_not_utf8_wrong_shape() {
    for bad in [
        &b"\xff\xfe{}"[..],
        b"null",
        b"[]",
        b"{}",
        b"{\"mediaType\":\"application/vnd.dev.sigstore.bundle.v0.3+json\"}",
    ] {
        rejected!(p1_result(bad), AttestError::BundleMalformed(_));
    }
    // Errors quote at most a short, escaped part of the input.
    let hostile = format!("{{\"mediaType\":\"\u{1b}]0;{}\"}}", "x".repeat(10_000));
    let e = rejected!(
        p1_result(hostile.as_bytes()),
        AttestError::BundleMalformed(_)
    );
    let msg = e.to_string();
    assert!(msg.len() < 400 && !msg.contains('\u{1b}'), "{msg}");
}

#[test]
fn chain_with_extra_certificates_is_refused() {
    // conformance intoto-with-custom-trust-root is a v0.2 bundle with a one-certificate chain;
    // a chain with the leaf twice (or a root appended) is refused before any crypto.
    let dir = "conformance/intoto-with-custom-trust-root";
    let root = TrustedRoot::from_file(data(&format!("{dir}/trusted_root.json"))).unwrap();
    let artifact = sha256(&read(&format!("{dir}/artifact")));
    let b = edit(&read(&format!("{dir}/bundle.sigstore.json")), |v| {
        let c = v["verificationMaterial"]["x509CertificateChain"]["certificates"][0].clone();
        v["verificationMaterial"]["x509CertificateChain"]["certificates"]
            .as_array_mut()
            .unwrap()
            .push(c);
    });
    rejected!(
        verify(&artifact, &b, &beacon_policy("d.txt"), &root),
        AttestError::BundleMalformed(_)
    );
}

/// One bit flipped at many positions of the raw bundle bytes: never a panic, and a bundle that
/// still verifies (a flip in a field that nothing reads, such as an ignored key name) must give
/// the same result as the original.
#[test]
fn bit_flip_sweep_never_panics() {
    let (bundle, artifact) = p1();
    let root = public_good();
    let policy = beacon_policy("a.txt");
    let original = verify(&artifact, &bundle, &policy, &root).unwrap();
    let (mut rejected, mut accepted) = (0, 0);
    for i in (0..bundle.len()).step_by(13) {
        for bit in [0u8, 5] {
            let mut b = bundle.clone();
            b[i] ^= 1 << bit;
            match verify(&artifact, &b, &policy, &root) {
                Ok(v) => {
                    assert_eq!(v, original, "flip at {i} bit {bit} changed the result");
                    accepted += 1;
                }
                Err(_) => rejected += 1,
            }
        }
    }
    println!("bit-flip sweep: {rejected} rejected, {accepted} accepted unchanged");
    assert!(rejected > accepted * 10);
}
