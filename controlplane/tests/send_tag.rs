//! `send --tag`: an operator retry with the same tag and the same instruction stores nothing
//! new and answers as the first send; the same tag with a different instruction is refused
//! (exit 9, `tag_conflict`).

mod common;

use std::process::Output;

use common::*;
use runos_protocol::Tag;
use runos_protocol::control::types;

const BIN: &str = env!("CARGO_BIN_EXE_runos-controlplane");

async fn send(cp: &Cp, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .arg("send")
        .args(args)
        .arg("--admin-socket")
        .arg(cp.server.admin_socket())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_retry_with_the_same_tag_is_the_same_instruction_and_a_different_one_is_refused() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let tag = Tag::random().to_string();
    let payload = r#"{"argv":["/bin/true"],"timeoutSecs":5}"#;
    let args = [
        node.id.as_str(),
        "RUN_COMMAND",
        payload,
        "--tag",
        &tag,
        "--json",
    ];

    let first = send(&cp, &args).await;
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let again = send(&cp, &args).await;
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert_eq!(first.stdout, again.stdout);
    let shown: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(shown["tag"], tag.as_str());
    // One instruction stored.
    let nodes = cp.server.api().nodes().unwrap();
    assert_eq!(nodes[0].pending, 1);

    // The same tag with another payload, type, node or instruction timeout: refused, exit 9.
    let other = enrol(&cp).await;
    for args in [
        vec![
            node.id.as_str(),
            "RUN_COMMAND",
            r#"{"argv":["/bin/false"]}"#,
        ],
        vec![node.id.as_str(), "GET_NODE_STATUS", payload],
        vec![other.id.as_str(), "RUN_COMMAND", payload],
        vec![
            node.id.as_str(),
            "RUN_COMMAND",
            payload,
            "--instruction-timeout",
            "9s",
        ],
    ] {
        let mut args = args.clone();
        args.extend(["--tag", &tag]);
        let out = send(&cp, &args).await;
        assert_eq!(out.status.code(), Some(9), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("tag_conflict"), "{err}");
        assert!(
            err.contains("already used by a different instruction"),
            "{err}"
        );
    }
    let nodes = cp.server.api().nodes().unwrap();
    assert_eq!(nodes.iter().map(|n| n.pending).sum::<u32>(), 1);

    // A malformed tag is refused before anything is stored (exit 3, as for `reply`).
    let out = send(
        &cp,
        &[node.id.as_str(), "RUN_COMMAND", payload, "--tag", "nope"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    // The node receives the instruction once, under the operator's tag; a retry after the
    // reply is stored answers with that reply.
    let (mut conn, _) = session(&cp, &node).await;
    let env = conn.next_non_heartbeat().await.unwrap();
    assert_eq!(env.tag.to_string(), tag);
    conn.send(&runos_protocol::Envelope::with_type(
        "RUN_COMMAND_RESPONSE",
        env.tag,
        &serde_json::json!({"exitCode": 0, "stdout": "", "stderr": ""}),
    ))
    .await;
    let ack = conn.next_non_heartbeat().await.unwrap();
    assert!(ack.is(types::ACK), "{ack:?}");
    let mut waited = args.to_vec();
    waited.push("--wait");
    let out = send(&cp, &waited).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["type"], "RUN_COMMAND_RESPONSE");
    assert_eq!(reply["tag"], tag.as_str());
    cp.server.shutdown().await;
}
