//! Property tests: framing round trips, and no decoder panics on arbitrary input.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use runos_protocol::instructions::{ALL_INSTRUCTION_TYPES, AnyInstruction};
use runos_protocol::{
    DEFAULT_MAX_FRAME_BYTES, Envelope, MessageType, Tag, decode_frame, encode_frame,
};
use serde_json::Value;

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        "[A-Za-z0-9_]{1,64}",
        any::<u128>(),
        ".{0,200}",
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(kind, tag, json_b64, timeout_ms)| Envelope {
            kind: MessageType::new(kind).expect("strategy yields valid names"),
            tag: Tag::from(uuid::Uuid::from_u128(tag)),
            json_b64,
            timeout_ms,
        })
}

/// Field names used anywhere in the catalog, so generated objects reach past the first field.
const FIELDS: &[&str] = &[
    "peers",
    "pubKey",
    "endpointIp",
    "vpnIp",
    "asCp",
    "crB64",
    "crdB64",
    "type",
    "id",
    "script",
    "params",
    "runInBackground",
    "repoUrl",
    "myRepoName",
    "myChartName",
    "chartName",
    "namespace",
    "valuesUrl",
    "version",
    "url",
    "method",
    "postData",
    "allowInsecure",
    "headers",
    "node_ip",
    "fileContents",
    "targetKubernetesVersion",
    "targetContainerdVersion",
    "targetHelmVersion",
    "kubeRepoVersion",
    "isFirstCp",
    "generation",
    "argv",
    "env",
    "cwd",
    "stdin",
    "timeoutSecs",
    "tag",
    "allowDowngrade",
];

/// Strings that are valid for some field, so generated payloads sometimes pass validation.
const STRINGS: &[&str] = &[
    "",
    "10.0.0.1",
    "fd00::1",
    "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
    "v1.30",
    "1.30.2",
    "https://charts.example.com",
    "oci://registry.example/charts",
    "nginx",
    "-x",
    "/usr/bin/true",
    "server=1.1.1.1\n",
    "3f0e4b8e-3c55-4b8f-9d6a-3e9a1b0c2d4e",
    "e30=",
];

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(STRINGS).prop_map(str::to_string),
        ".{0,40}",
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        arb_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    prop_oneof![
                        proptest::sample::select(FIELDS).prop_map(str::to_string),
                        ".{0,12}",
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frame_round_trip(env in arb_envelope()) {
        let frame = encode_frame(&env, DEFAULT_MAX_FRAME_BYTES).expect("small envelope fits");
        let (back, used) = decode_frame(&frame, DEFAULT_MAX_FRAME_BYTES)
            .expect("own frame decodes")
            .expect("frame is complete");
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(back, env);
    }

    #[test]
    fn decode_frame_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        runos_protocol::__fuzz::decode(&data);
        if let Ok(Some((_, used))) = decode_frame(&data, 1024) {
            prop_assert!(used <= data.len());
        }
    }

    #[test]
    fn decode_frame_never_panics_on_framed_garbage(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut data = (body.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(&body);
        let _ = decode_frame(&data, 1024);
    }

    #[test]
    fn payload_never_panics(json_b64 in ".{0,200}", raw in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut env = Envelope::with_type("X", Tag::random(), &Value::Null);
        env.json_b64 = json_b64;
        let _ = env.payload::<Value>();
        env.json_b64 = STANDARD.encode(&raw);
        let _ = env.payload::<Value>();
        let _ = env.payload_text();
    }

    #[test]
    fn every_catalog_type_decodes_arbitrary_json_without_panicking(json in arb_json()) {
        for kind in ALL_INSTRUCTION_TYPES {
            let env = Envelope::with_type(kind, Tag::random(), &json);
            match AnyInstruction::from_envelope(&env) {
                Ok(i) => {
                    // What was accepted re-encodes to something accepted and equal.
                    let again = AnyInstruction::from_envelope(&i.to_envelope(env.tag))
                        .expect("re-encoded instruction decodes");
                    prop_assert_eq!(again, i);
                }
                Err(e) => {
                    let p = e.to_error_payload();
                    prop_assert!(!p.message.is_empty());
                }
            }
        }
    }
}
