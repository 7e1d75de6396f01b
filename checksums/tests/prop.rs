//! Property tests: the canonical writer round-trips through the parser, and the parser never
//! panics, whatever the bytes.

use proptest::prelude::*;
use runos_checksums::{Digest, MAX_NAME_BYTES, Manifest, validate_name};

fn arb_name() -> impl Strategy<Value = String> {
    // Printable ASCII other than space, / and \, then filter the two reserved names.
    proptest::string::string_regex(&format!("[!-\\[\\]-~&&[^/]]{{1,{MAX_NAME_BYTES}}}"))
        .expect("valid regex")
        .prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn arb_manifest() -> impl Strategy<Value = Manifest> {
    proptest::collection::vec((arb_name(), any::<[u8; 32]>()), 0..40).prop_map(|entries| {
        let mut m = Manifest::new();
        for (name, bytes) in entries {
            // Later duplicates are skipped: the manifest keeps names unique.
            if m.get(&name).is_none() {
                m.insert(&name, Digest::from(bytes))
                    .expect("generated names are valid");
            }
        }
        m
    })
}

proptest! {
    #[test]
    fn generated_names_are_valid(name in arb_name()) {
        prop_assert_eq!(validate_name(&name), Ok(()));
    }

    #[test]
    fn writer_then_parser_round_trips(m in arb_manifest()) {
        let text = m.to_string();
        let parsed = Manifest::parse(text.as_bytes()).expect("canonical output parses");
        prop_assert_eq!(&parsed, &m);
        prop_assert_eq!(parsed.to_string(), text);
        for entry in &m {
            prop_assert_eq!(parsed.get(entry.name()), Some(entry.digest()));
        }
    }

    #[test]
    fn binary_mode_and_uppercase_parse_to_the_same_manifest(m in arb_manifest()) {
        let text: String = m
            .iter()
            .map(|e| format!("{} *{}\n", e.digest().to_hex().to_uppercase(), e.name()))
            .collect();
        prop_assert_eq!(Manifest::parse(text.as_bytes()).expect("parses"), m);
    }

    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Manifest::parse(&bytes);
    }

    #[test]
    fn parser_never_panics_on_near_valid_input(
        m in arb_manifest(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = m.to_string().into_bytes();
        for (at, byte) in edits {
            if bytes.is_empty() {
                bytes.push(byte);
            } else {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
        }
        if let Ok(parsed) = Manifest::parse(&bytes) {
            // Whatever parses is canonical after one more round.
            prop_assert_eq!(Manifest::parse(parsed.to_string().as_bytes()).expect("parses"), parsed);
        }
    }

    #[test]
    fn digest_display_parses_back(bytes in any::<[u8; 32]>()) {
        let d = Digest::from(bytes);
        prop_assert_eq!(d.to_string().parse::<Digest>(), Ok(d));
    }

    #[test]
    fn digest_from_str_never_panics(s in ".{0,80}") {
        let _ = s.parse::<Digest>();
    }
}
