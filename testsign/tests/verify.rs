//! Bundles from a fake world verify under the unmodified `sigstore-verify`
//! given that world's trusted root, and only then.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use runos_testsign::{
    AttestOptions, GITHUB_ACTIONS_ISSUER, SLSA_PROVENANCE_V1, Subject, World, dsse,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sigstore_trust_root::{SIGSTORE_PRODUCTION_TRUSTED_ROOT, TrustedRoot};
use sigstore_types::{Bundle, Sha256Hash};
use sigstore_verify::{VerificationPolicy, VerificationResult, verify};

const ARTIFACT: &[u8] = b"\x7fELF pretend this is nodeagent-linux-amd64 v1.2.3";
const NAME: &str = "nodeagent-linux-amd64";
const REPO: &str = "runos-dev/runos";
const REF: &str = "refs/tags/v1.2.3";

fn opts() -> AttestOptions {
    AttestOptions::new(REPO, REF)
}

fn root_of(world: &World) -> TrustedRoot {
    TrustedRoot::from_json(&world.trusted_root_json()).expect("trusted root parses")
}

fn parse(bundle: &[u8]) -> Bundle {
    Bundle::from_json(std::str::from_utf8(bundle).unwrap()).expect("bundle parses")
}

fn policy(o: &AttestOptions) -> VerificationPolicy {
    VerificationPolicy::new(o.san(), GITHUB_ACTIONS_ISSUER)
}

fn check(
    artifact: &[u8],
    bundle: &[u8],
    o: &AttestOptions,
    root: &TrustedRoot,
) -> sigstore_verify::Result<VerificationResult> {
    verify(artifact, &parse(bundle), &policy(o), root)
}

/// A mutation of the bundle JSON, re-serialized.
fn mutate(bundle: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(bundle).unwrap();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn a_bundle_verifies_under_its_world_root_with_everything_checked() {
    let world = World::generate().unwrap();
    let o = opts();
    let bundle = world.attest(ARTIFACT, NAME, &o).unwrap();
    let result = check(ARTIFACT, &bundle, &o, &root_of(&world)).expect("verifies");

    assert!(result.certificate_verified());
    assert!(result.sct_verified());
    assert!(result.tlog_verified());
    assert!(result.identity_policy_checked());
    assert_eq!(
        result.identity().unwrap().as_str(),
        "https://github.com/runos-dev/runos/.github/workflows/release.yml@refs/tags/v1.2.3"
    );
    assert_eq!(result.issuer(), Some(GITHUB_ACTIONS_ISSUER));
    let integrated = result.integrated_time().expect("SET-authenticated time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(integrated.as_second() <= i64::try_from(now).unwrap());

    let claims = &result.certificate().unwrap().ci_claims;
    assert_eq!(claims.runner_environment.as_deref(), Some("github-hosted"));
    assert_eq!(claims.source_repository_ref.as_deref(), Some(REF));
    assert_eq!(
        claims.source_repository_uri.as_deref(),
        Some("https://github.com/runos-dev/runos")
    );
    assert_eq!(claims.build_signer_uri.as_deref(), Some(o.san().as_str()));
    assert_eq!(
        claims.source_repository_digest.as_deref(),
        Some(o.commit_sha.as_str())
    );
    assert_eq!(
        claims.source_repository_identifier.as_deref(),
        Some("123456789")
    );
    assert_eq!(
        claims.source_repository_owner_uri.as_deref(),
        Some("https://github.com/runos-dev")
    );
    assert_eq!(claims.build_trigger.as_deref(), Some("push"));
    assert_eq!(
        claims.source_repository_visibility_at_signing.as_deref(),
        Some("public")
    );
    assert_eq!(claims.deprecated_github.workflow_ref.as_deref(), Some(REF));
}

#[test]
fn the_statement_looks_like_attest_build_provenance_output() {
    let world = World::generate().unwrap();
    let o = opts();
    let bundle: Value = serde_json::from_slice(&world.attest(ARTIFACT, NAME, &o).unwrap()).unwrap();
    assert_eq!(
        bundle["mediaType"],
        "application/vnd.dev.sigstore.bundle.v0.3+json"
    );
    let env = &bundle["dsseEnvelope"];
    assert_eq!(env["payloadType"], dsse::IN_TOTO_PAYLOAD_TYPE);
    let statement: Value =
        serde_json::from_slice(&B64.decode(env["payload"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(statement["predicateType"], SLSA_PROVENANCE_V1);
    assert_eq!(statement["subject"][0]["name"], NAME);
    assert_eq!(
        statement["subject"][0]["digest"]["sha256"],
        hex::encode(Sha256::digest(ARTIFACT))
    );
    let pred = &statement["predicate"];
    assert_eq!(
        pred["buildDefinition"]["externalParameters"]["workflow"]["ref"],
        REF
    );
    assert_eq!(pred["runDetails"]["builder"]["id"], o.san());

    let entry = &bundle["verificationMaterial"]["tlogEntries"][0];
    assert_eq!(entry["kindVersion"]["kind"], "dsse");
    assert_eq!(entry["kindVersion"]["version"], "0.0.1");
    let checkpoint = entry["inclusionProof"]["checkpoint"]["envelope"]
        .as_str()
        .unwrap();
    assert!(checkpoint.starts_with(&format!("{}\n", world.rekor_origin())));
}

#[test]
fn the_digest_binds_the_artifact() {
    let world = World::generate().unwrap();
    let root = root_of(&world);
    let o = opts();
    let digest: [u8; 32] = Sha256::digest(ARTIFACT).into();
    let bundle = world.attest_digest(digest, NAME, &o).unwrap();

    check(ARTIFACT, &bundle, &o, &root).expect("the artifact verifies");
    verify(Sha256Hash::new(digest), &parse(&bundle), &policy(&o), &root)
        .expect("its digest verifies");

    let err = check(b"another artifact", &bundle, &o, &root).unwrap_err();
    assert!(err.to_string().contains("artifact"), "{err}");
    let other: [u8; 32] = Sha256::digest(b"another artifact").into();
    assert!(verify(Sha256Hash::new(other), &parse(&bundle), &policy(&o), &root).is_err());
}

#[test]
fn several_subjects_in_one_statement() {
    let world = World::generate().unwrap();
    let root = root_of(&world);
    let o = opts();
    let arm = b"arm64 build".as_slice();
    let bundle = world
        .attest_subjects(
            &[
                Subject::of("nodeagent-linux-amd64", ARTIFACT),
                Subject::of("nodeagent-linux-arm64", arm),
            ],
            &o,
        )
        .unwrap();
    check(ARTIFACT, &bundle, &o, &root).unwrap();
    check(arm, &bundle, &o, &root).unwrap();
    assert!(check(b"riscv", &bundle, &o, &root).is_err());
}

#[test]
fn the_public_good_root_rejects_a_fake_bundle() {
    let world = World::generate().unwrap();
    let o = opts();
    let bundle = world.attest(ARTIFACT, NAME, &o).unwrap();
    let public_good = TrustedRoot::from_json(SIGSTORE_PRODUCTION_TRUSTED_ROOT).unwrap();
    assert!(check(ARTIFACT, &bundle, &o, &public_good).is_err());
}

#[test]
fn another_world_rejects_the_bundle() {
    let a = World::generate().unwrap();
    let b = World::generate().unwrap();
    let o = opts();
    let bundle = a.attest(ARTIFACT, NAME, &o).unwrap();
    check(ARTIFACT, &bundle, &o, &root_of(&a)).unwrap();
    assert!(check(ARTIFACT, &bundle, &o, &root_of(&b)).is_err());

    // Swap in one of B's parts at a time (A's others still trusted): each is
    // checked on its own.
    let b_root: Value = serde_json::from_str(&b.trusted_root_json()).unwrap();
    for (part, expected) in [
        ("certificateAuthorities", "certificate chain"),
        ("ctlogs", "certificate timestamp"),
        ("tlogs", "No log key"),
    ] {
        let mut mixed: Value = serde_json::from_str(&a.trusted_root_json()).unwrap();
        mixed[part] = b_root[part].clone();
        let mixed = TrustedRoot::from_json(&mixed.to_string()).unwrap();
        let err = check(ARTIFACT, &bundle, &o, &mixed).unwrap_err();
        assert!(err.to_string().contains(expected), "{part}: {err}");
    }
}

#[test]
fn policy_mismatches_are_rejected() {
    let world = World::generate().unwrap();
    let root = root_of(&world);
    let o = opts();
    let bundle = world.attest(ARTIFACT, NAME, &o).unwrap();
    let other_tag = AttestOptions::new(REPO, "refs/tags/v1.2.4");
    assert!(check(ARTIFACT, &bundle, &other_tag, &root).is_err());
    let wrong_issuer = VerificationPolicy::new(o.san(), "https://accounts.google.com");
    assert!(verify(ARTIFACT, &parse(&bundle), &wrong_issuer, &root).is_err());

    // A self-hosted runner or another issuer is carried faithfully.
    let custom = AttestOptions {
        runner_environment: "self-hosted".into(),
        issuer: "https://token.actions.githubusercontent.com/acme".into(),
        ..opts()
    };
    let bundle = world.attest(ARTIFACT, NAME, &custom).unwrap();
    let policy = VerificationPolicy::new(custom.san(), &custom.issuer);
    let result = verify(ARTIFACT, &parse(&bundle), &policy, &root).unwrap();
    let claims = &result.certificate().unwrap().ci_claims;
    assert_eq!(claims.runner_environment.as_deref(), Some("self-hosted"));
    assert!(check(ARTIFACT, &bundle, &custom, &root).is_err());
}

/// Each piece the world signs is really checked: breaking it fails.
#[test]
fn tampering_with_any_signed_piece_fails() {
    let world = World::generate().unwrap();
    let root = root_of(&world);
    let o = opts();
    let bundle = world.attest(ARTIFACT, NAME, &o).unwrap();
    check(ARTIFACT, &bundle, &o, &root).unwrap();
    let entry = "/verificationMaterial/tlogEntries/0";

    // (what, expected error fragment, tampered bundle)
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "integratedTime - 1",
            "SET verification failed",
            mutate(&bundle, |v| {
                let t = v.pointer_mut(&format!("{entry}/integratedTime")).unwrap();
                let n: i64 = t.as_str().unwrap().parse().unwrap();
                *t = (n - 1).to_string().into();
            }),
        ),
        (
            "logIndex + 1",
            "SET verification failed",
            mutate(&bundle, |v| {
                let t = v.pointer_mut(&format!("{entry}/logIndex")).unwrap();
                let n: u64 = t.as_str().unwrap().parse().unwrap();
                *t = (n + 1).to_string().into();
            }),
        ),
        (
            "proof hash",
            "inclusion proof",
            mutate(&bundle, |v| {
                *v.pointer_mut(&format!("{entry}/inclusionProof/hashes/0"))
                    .unwrap() = B64.encode([7u8; 32]).into();
            }),
        ),
        (
            "checkpoint signature",
            "checkpoint",
            mutate(&bundle, |v| {
                let cp = v
                    .pointer_mut(&format!("{entry}/inclusionProof/checkpoint/envelope"))
                    .unwrap();
                let text = cp.as_str().unwrap().to_string();
                let (head, sig_line) = text.trim_end().rsplit_once(' ').unwrap();
                let mut sig = B64.decode(sig_line).unwrap();
                let last = sig.len() - 1;
                sig[last] ^= 1;
                *cp = format!("{head} {}\n", B64.encode(sig)).into();
            }),
        ),
        (
            "DSSE signature",
            "DSSE signature verification failed",
            mutate(&bundle, |v| {
                let s = v.pointer_mut("/dsseEnvelope/signatures/0/sig").unwrap();
                let mut sig = B64.decode(s.as_str().unwrap()).unwrap();
                let last = sig.len() - 1;
                sig[last] ^= 1;
                *s = B64.encode(sig).into();
            }),
        ),
    ];
    for (what, expected, tampered) in cases {
        let err = check(ARTIFACT, &tampered, &o, &root)
            .err()
            .unwrap_or_else(|| panic!("{what}: still verifies"));
        assert!(err.to_string().contains(expected), "{what}: {err}");
    }

    // A root without the CT log: the SCT cannot be verified.
    let mut no_ct: Value = serde_json::from_str(&world.trusted_root_json()).unwrap();
    no_ct["ctlogs"] = Value::Array(vec![]);
    let no_ct = TrustedRoot::from_json(&no_ct.to_string()).unwrap();
    let err = check(ARTIFACT, &bundle, &o, &no_ct).unwrap_err();
    assert!(err.to_string().contains("CT log"), "{err}");
    // A root without the Rekor key: the SET cannot be verified.
    let mut no_tlog: Value = serde_json::from_str(&world.trusted_root_json()).unwrap();
    no_tlog["tlogs"] = Value::Array(vec![]);
    let no_tlog = TrustedRoot::from_json(&no_tlog.to_string()).unwrap();
    let err = check(ARTIFACT, &bundle, &o, &no_tlog).unwrap_err();
    assert!(err.to_string().contains("No log key"), "{err}");
}

#[test]
fn signing_times_outside_the_verifiable_range_fail() {
    let world = World::generate().unwrap();
    let root = root_of(&world);
    let future = AttestOptions {
        signed_at: Some(time::OffsetDateTime::now_utc() + time::Duration::minutes(5)),
        ..opts()
    };
    let bundle = world.attest(ARTIFACT, NAME, &future).unwrap();
    let err = check(ARTIFACT, &bundle, &future, &root).unwrap_err();
    assert!(err.to_string().contains("future"), "{err}");

    let before_world = AttestOptions {
        signed_at: Some(world.valid_from() - time::Duration::hours(1)),
        ..opts()
    };
    let bundle = world.attest(ARTIFACT, NAME, &before_world).unwrap();
    assert!(check(ARTIFACT, &bundle, &before_world, &root).is_err());

    // An old but valid signing time (an old release) still verifies.
    let old = AttestOptions {
        signed_at: Some(world.valid_from() + time::Duration::hours(1)),
        ..opts()
    };
    let bundle = world.attest(ARTIFACT, NAME, &old).unwrap();
    check(ARTIFACT, &bundle, &old, &root).unwrap();
}

#[test]
fn the_cli_writes_a_world_and_a_bundle_that_verify() {
    let dir = tempfile::tempdir().unwrap();
    let world_dir = dir.path().join("world");
    let artifact = dir.path().join(NAME);
    let out = dir.path().join(format!("{NAME}.sigstore.json"));
    std::fs::write(&artifact, ARTIFACT).unwrap();
    let exe = env!("CARGO_BIN_EXE_runos-testsign");
    let run = |args: &[&std::ffi::OsStr]| {
        let status = std::process::Command::new(exe).args(args).status().unwrap();
        assert!(status.success(), "{args:?}");
    };
    run(&["world".as_ref(), "--out".as_ref(), world_dir.as_os_str()]);
    run(&[
        "attest".as_ref(),
        "--world".as_ref(),
        world_dir.as_os_str(),
        "--artifact".as_ref(),
        artifact.as_os_str(),
        "--name".as_ref(),
        NAME.as_ref(),
        "--repo".as_ref(),
        REPO.as_ref(),
        "--ref".as_ref(),
        REF.as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let root = TrustedRoot::from_file(world_dir.join("trusted_root.json")).unwrap();
    let bundle = std::fs::read(&out).unwrap();
    let result = check(ARTIFACT, &bundle, &opts(), &root).unwrap();
    assert!(result.tlog_verified() && result.sct_verified() && result.certificate_verified());
}

#[test]
fn a_loaded_world_keeps_signing_for_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::generate().unwrap();
    world.save(dir.path()).unwrap();
    let loaded = World::load(dir.path()).unwrap();
    let o = opts();
    let bundle = loaded.attest(ARTIFACT, NAME, &o).unwrap();
    check(ARTIFACT, &bundle, &o, &root_of(&world)).unwrap();
}
