//! `runos-controlplane reply TAG`: the final reply of an instruction sent earlier, over the
//! operator socket and through the binary (output and exit codes).

mod common;

use std::process::Output;

use common::*;
use runos_controlplane::admin::Request;
use runos_controlplane::cli::Client;
use runos_protocol::{Envelope, Tag};

const BIN: &str = env!("CARGO_BIN_EXE_runos-controlplane");

async fn cli(cp: &Cp, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--admin-socket")
        .arg(cp.server.admin_socket())
        .stdin(std::process::Stdio::null())
        .output();
    tokio::time::timeout(DEADLINE, run).await.unwrap().unwrap()
}

fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn reply_shows_pending_waits_and_prints_the_final_reply() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let api = cp.server.api();
    let (mut c, _) = session(&cp, &node).await;

    let send = |kind: &str| {
        api.send(&runos_controlplane::SendRequest {
            node: node.id.clone(),
            kind: kind.into(),
            payload: Some(serde_json::json!({"argv": ["true"]})),
            raw_b64: None,
            timeout_ms: None,
        })
        .unwrap()
    };
    let tag = send("RUN_COMMAND");
    let got = c.next_non_heartbeat().await.unwrap();
    assert_eq!(got.tag, tag);
    let t = tag.to_string();

    // No reply yet: pending, exit 4 (with --json the pending object on stdout too).
    let out = cli(&cp, &["reply", &t]).await;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(stderr(&out).contains("pending"), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let out = cli(&cp, &["reply", &t, "--json"]).await;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(
        stdout_json(&out),
        serde_json::json!({"tag": t, "pending": true})
    );
    // --wait that runs out: exit 4, and the tag is named.
    let out = cli(&cp, &["reply", &t, "--wait", "--timeout", "300ms"]).await;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(stderr(&out).contains(&t), "{out:?}");

    // --wait sees the reply that arrives while it waits.
    let waiter = {
        let admin = cp.server.admin_socket().to_path_buf();
        let t = t.clone();
        tokio::spawn(async move {
            tokio::process::Command::new(BIN)
                .args(["reply", &t, "--wait", "--timeout", "10s", "--json"])
                .arg("--admin-socket")
                .arg(admin)
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    c.send(&Envelope::with_type(
        "RUN_COMMAND_RESPONSE",
        tag,
        &serde_json::json!({"exitCode": 0, "stdout": "hi\n"}),
    ))
    .await;
    let out = tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let want = serde_json::json!({
        "tag": t,
        "type": "RUN_COMMAND_RESPONSE",
        "payload": {"exitCode": 0, "stdout": "hi\n"},
    });
    assert_eq!(stdout_json(&out), want);

    // Stored now: without --wait too, in both output formats.
    let out = cli(&cp, &["reply", &t, "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert_eq!(stdout_json(&out), want);
    let out = cli(&cp, &["reply", &t]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout_json(&out), want);

    // An ERROR reply: printed, exit 1.
    let tag2 = send("NO_SUCH_THING");
    // (The ACK of the first reply may come first.)
    loop {
        let got = c.next_non_heartbeat().await.unwrap();
        if got.tag == tag2 {
            assert!(got.is("NO_SUCH_THING"), "{got:?}");
            break;
        }
        assert!(got.is("ACK") && got.tag == tag, "{got:?}");
    }
    c.send(&Envelope::with_type(
        "ERROR",
        tag2,
        &serde_json::json!({"code": "unknown_type", "message": "no such type"}),
    ))
    .await;
    api.wait_reply(&tag2, DEADLINE).await.unwrap();
    let out = cli(&cp, &["reply", &tag2.to_string(), "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = stdout_json(&out);
    assert_eq!(v["type"], "ERROR");
    assert_eq!(v["payload"]["code"], "unknown_type");

    // Unknown and malformed tags: exit 3 with a clear message, with or without --wait.
    let unknown = Tag::random().to_string();
    for args in [
        vec!["reply", unknown.as_str()],
        vec!["reply", unknown.as_str(), "--wait", "--timeout", "5s"],
    ] {
        let out = cli(&cp, &args).await;
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert!(stderr(&out).contains("no instruction with tag"), "{out:?}");
    }
    let out = cli(&cp, &["reply", "not-a-tag"]).await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stderr(&out).contains("not an instruction tag"), "{out:?}");

    // The same over the socket: stable error codes.
    let client = Client::new(cp.server.admin_socket());
    for (tag, code) in [
        (unknown.clone(), "tag_not_found"),
        ("x".repeat(500), "malformed_tag"),
    ] {
        let r = client
            .request(&Request::Reply { tag, wait_ms: None }, DEADLINE)
            .await;
        assert!(
            matches!(r, Err(runos_controlplane::Error::Remote { code: ref c, .. }) if c == code),
            "{r:?}"
        );
    }
    let v = client
        .request(
            &Request::Reply {
                tag: t.clone(),
                wait_ms: Some(1000),
            },
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(v, want);
    cp.server.shutdown().await;
}
