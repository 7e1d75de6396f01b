//! Payloads the contract refuses never run (issue 10, finding 3): the standard catalog decodes
//! and validates every payload with the protocol crate's rules before the dispatcher accepts the
//! instruction, and RUN_COMMAND finds its program in the agent's own `PATH`.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::dispatch::{Harness, cfg, code, error, instr};
use runos_agent::catalog;
use runos_protocol::instructions::{RunCommandResponse, types};
use runos_protocol::{Envelope, ErrorCode, MessageType, Tag};
use serde_json::json;

fn raw(kind: &str, json: &str) -> Envelope {
    Envelope::from_json_text(MessageType::new(kind).unwrap(), Tag::random(), json)
}

/// A RUN_COMMAND payload that would create `marker` if it ran.
fn touch(marker: &Path) -> Vec<String> {
    vec!["/bin/touch".into(), marker.display().to_string()]
}

async fn refused(h: &mut Harness, env: Envelope, field: &str) {
    h.send(env.clone()).await;
    let r = h.reply().await;
    assert_eq!(r.tag, env.tag);
    let e = error(&r);
    assert_eq!(e.code, ErrorCode::BadPayload, "{}", e.message);
    assert!(e.message.contains(field), "{field}: {}", e.message);
}

#[tokio::test]
async fn payloads_of_the_wrong_shape_or_outside_the_limits_are_bad_payload_and_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    let argv = serde_json::to_string(&touch(&marker)).unwrap();
    // serde_json alone reads `[argv]` as a RunCommand.
    refused(&mut h, raw(types::RUN_COMMAND, &format!("[{argv}]")), "").await;
    refused(&mut h, raw(types::GET_NODE_STATUS, "[]"), "").await;
    let with = |extra: serde_json::Value| {
        let mut p = json!({ "argv": touch(&marker) });
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        instr(types::RUN_COMMAND, p)
    };
    refused(&mut h, with(json!({"env": {"1X": "v"}})), "`env`").await;
    refused(&mut h, with(json!({"cwd": "/tmp\u{0}x"})), "`cwd`").await;
    refused(
        &mut h,
        with(json!({"cwd": format!("/{}", "a".repeat(4999))})),
        "`cwd`",
    )
    .await;
    refused(&mut h, with(json!({"cwd": "tmp"})), "`cwd`").await;
    let relative = vec![
        "../../../../bin/touch".to_string(),
        marker.display().to_string(),
    ];
    refused(
        &mut h,
        instr(types::RUN_COMMAND, json!({ "argv": relative })),
        "`argv[0]`",
    )
    .await;
    assert!(!marker.exists(), "a refused payload ran");
    // The same payload, well-formed, does run (the marker test above is meaningful).
    h.send(instr(types::RUN_COMMAND, json!({ "argv": touch(&marker) })))
        .await;
    let r = h.reply().await;
    assert!(r.is(types::RUN_COMMAND_RESPONSE), "{:?}", code(&r));
    assert!(marker.exists());
}

#[tokio::test]
async fn a_bare_program_name_is_found_in_the_agents_path_not_the_payloads() {
    let planted = tempfile::tempdir().unwrap();
    let marker = planted.path().join("planted-ran");
    for name in ["id", "true"] {
        let script = planted.path().join(name);
        std::fs::write(
            &script,
            format!("#!/bin/sh\ntouch {}\necho planted\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut h = Harness::new(catalog::standard(), cfg(4, 2));
    for name in ["id", "true"] {
        let e = instr(
            types::RUN_COMMAND,
            json!({"argv": [name], "env": {"PATH": planted.path().display().to_string()}}),
        );
        h.send(e.clone()).await;
        let r = h.reply().await;
        assert!(r.is(types::RUN_COMMAND_RESPONSE), "{name}: {:?}", r.kind);
        let out: RunCommandResponse = r.payload().unwrap();
        assert_eq!(out.exit_code, Some(0), "{name}");
        let stdout = String::from_utf8(out.stdout.to_bytes().unwrap()).unwrap();
        assert!(!stdout.contains("planted"), "{name}: {stdout}");
    }
    assert!(!marker.exists(), "the payload's PATH chose the program");
    // The payload's PATH still reaches the program's environment.
    let e = instr(
        types::RUN_COMMAND,
        json!({"argv": ["sh", "-c", "echo \"$PATH\""], "env": {"PATH": "/x"}}),
    );
    h.send(e).await;
    let out: RunCommandResponse = h.reply().await.payload().unwrap();
    assert_eq!(out.stdout.to_bytes().unwrap(), b"/x\n");
}

#[tokio::test]
async fn update_agent_version_errors_do_not_repeat_the_version() {
    let mut h = Harness::new(
        catalog::with_updates("/nonexistent/runos.toml".into(), None),
        cfg(4, 2),
    );
    for version in ["../../x", "v01.2.3", "v1.2.3-../../x"] {
        let e = instr(types::UPDATE_AGENT, json!({ "version": version }));
        h.send(e.clone()).await;
        let r = h.reply().await;
        let p = error(&r);
        assert_eq!(p.code, ErrorCode::BadPayload, "{version}: {}", p.message);
        assert!(p.message.contains("`version`"), "{}", p.message);
        assert!(!p.message.contains(version), "{}", p.message);
        assert!(!p.message.contains("../"), "{}", p.message);
    }
}
