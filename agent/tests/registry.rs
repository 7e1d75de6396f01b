//! The registry against the protocol's catalog: every catalog type is accounted for, and every
//! type is checked with the protocol crate's examples — a valid payload passes, a bad field is
//! refused by the agent naming the field and never repeating the value.

mod common;

use common::dispatch::{Harness, cfg, error};
use runos_agent::catalog;
use runos_protocol::instructions::{
    self, AnyInstruction, BadPayload, DecodeInstructionError, types,
};
use runos_protocol::{Envelope, ErrorCode, MessageType, Tag};
use serde_json::Value;

const MARKER: &str = "Zq7marker";

fn envelope(kind: &str, payload: &Value) -> Envelope {
    Envelope::new(MessageType::new(kind).unwrap(), Tag::random(), payload)
}

/// Every string of `v` replaced, one at a time, by each of a few hostile values.
fn mutations(v: &Value) -> Vec<Value> {
    fn walk(v: &Value, set: &mut dyn FnMut(Value) -> Value, out: &mut Vec<Value>) {
        match v {
            Value::String(_) => {
                for bad in [
                    format!("-{MARKER}"),
                    format!("../../{MARKER}"),
                    format!("/{MARKER}\u{0}"),
                    format!("{MARKER} x\n$(id)"),
                    format!("1{MARKER}"),
                    String::new(),
                ] {
                    out.push(set(Value::String(bad)));
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(
                        item,
                        &mut |x| {
                            let mut items = items.clone();
                            items[i] = x;
                            set(Value::Array(items))
                        },
                        out,
                    );
                }
            }
            Value::Object(fields) => {
                for (k, item) in fields {
                    walk(
                        item,
                        &mut |x| {
                            let mut fields = fields.clone();
                            fields.insert(k.clone(), x);
                            set(Value::Object(fields))
                        },
                        out,
                    );
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut |x| x, &mut out);
    out
}

#[test]
fn every_catalog_type_has_an_executor_or_is_unsupported_here() {
    let c = catalog::with_updates("/nonexistent/runos.toml".into(), None);
    assert_eq!(
        c.unaccounted(),
        Vec::<&str>::new(),
        "catalog types with neither an executor nor an explicit unsupported entry"
    );
    // And each entry's defaults are the protocol table's.
    for row in instructions::CATALOG {
        if let Some(e) = c.get(row.kind) {
            assert_eq!(e.catalog, Some(row));
            assert_eq!(e.safe_to_rerun(), row.safe_to_rerun);
        }
    }
}

#[tokio::test]
async fn every_catalog_type_is_validated_with_the_protocols_examples() {
    let c = catalog::with_updates("/nonexistent/runos.toml".into(), None);
    let examples = runos_protocol::examples::valid();
    assert_eq!(examples.len(), instructions::CATALOG.len());
    let mut h = Harness::new(
        catalog::with_updates("/nonexistent/runos.toml".into(), None),
        cfg(16, 2),
    );
    for (kind, example) in examples {
        let Some(entry) = c.get(kind) else {
            if kind == types::CANCEL {
                continue; // the dispatcher's own: below
            }
            // Unsupported here: answered `unsupported`, whatever the payload.
            h.send(envelope(kind, &example)).await;
            assert_eq!(
                error(&h.reply().await).code,
                ErrorCode::Unsupported,
                "{kind}"
            );
            continue;
        };
        // The valid example passes (nothing runs: only decoded and validated).
        entry
            .prepare(&envelope(kind, &example))
            .unwrap_or_else(|e| panic!("{kind}: {}", e.message));
        // A payload of the wrong shape is refused.
        let e = entry.prepare(&envelope(kind, &Value::from(7))).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadPayload, "{kind}");
        // Each bad field the protocol refuses, the agent refuses naming it.
        let mut named = 0;
        for bad in mutations(&example) {
            let env = envelope(kind, &bad);
            let Err(DecodeInstructionError::BadPayload(BadPayload::Invalid(v))) =
                AnyInstruction::from_envelope(&env)
            else {
                continue;
            };
            h.send(env).await;
            let p = error(&h.reply().await);
            assert_eq!(p.code, ErrorCode::BadPayload, "{kind}");
            assert!(
                p.message.contains(&format!("`{}`", v.field)),
                "{kind}: {}",
                p.message
            );
            assert!(!p.message.contains(MARKER), "{kind}: {}", p.message);
            named += 1;
        }
        let has_strings = !mutations(&example).is_empty();
        assert!(named > 0 || !has_strings, "{kind}: no bad field exercised");
    }
    // CANCEL, handled by the dispatcher, names its field too.
    h.send(envelope(types::CANCEL, &serde_json::json!({"tag": MARKER})))
        .await;
    let p = error(&h.reply().await);
    assert_eq!(p.code, ErrorCode::BadPayload);
    assert!(!p.message.contains(MARKER), "{}", p.message);
    h.stop().await;
}
