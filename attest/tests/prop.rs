//! Property tests: `verify` never panics, whatever the bundle bytes.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use runos_attest::{Policy, TrustedRoot, verify};
use runos_checksums::{Digest, sha256};

fn root() -> &'static TrustedRoot {
    static ROOT: OnceLock<TrustedRoot> = OnceLock::new();
    ROOT.get_or_init(|| TrustedRoot::public_good().expect("embedded root loads"))
}

fn p1() -> &'static (Vec<u8>, Digest) {
    static P1: OnceLock<(Vec<u8>, Digest)> = OnceLock::new();
    P1.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance");
        let bundle = std::fs::read(dir.join("happy-path-intoto-in-dsse-v3/bundle.sigstore.json"))
            .expect("fixture");
        let artifact = sha256(&std::fs::read(dir.join("a.txt")).expect("fixture"));
        (bundle, artifact)
    })
}

fn policy() -> Policy {
    Policy::new(
        "sigstore-conformance/extremely-dangerous-public-oidc-beacon",
        ".github/workflows/extremely-dangerous-oidc-beacon.yml",
        "refs/heads/main",
        "a.txt",
    )
    .expect("valid policy")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        prop_assert!(verify(&p1().1, &bytes, &policy(), root()).is_err());
    }

    #[test]
    fn edited_real_bundle_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (original, artifact) = p1();
        let mut bytes = original.clone();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(v) = verify(artifact, &bytes, &policy(), root()) {
            // Only an edit nothing reads can leave it valid, and then nothing changes.
            let expected = verify(artifact, original, &policy(), root()).expect("original verifies");
            prop_assert_eq!(v, expected);
        }
    }
}
