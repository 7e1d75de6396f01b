//! Batches: `Api::send_many` (all or nothing), the `send-batch` command, replies read off a
//! session together (stored in one transaction, each ACK only once its reply is stored), and
//! many waiters on many tags.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use runos_controlplane::{Error, SendRequest};
use runos_protocol::control::types;
use runos_protocol::{Envelope, Tag};
use tokio::io::AsyncWriteExt as _;

const BIN: &str = env!("CARGO_BIN_EXE_runos-controlplane");

fn request(node: &str, kind: &str) -> SendRequest {
    SendRequest {
        node: node.to_string(),
        kind: kind.into(),
        payload: Some(serde_json::json!({"n": 1})),
        raw_b64: None,
        timeout_ms: None,
    }
}

fn pending(cp: &Cp) -> u32 {
    cp.server
        .api()
        .nodes()
        .unwrap()
        .iter()
        .map(|n| n.pending)
        .sum()
}

#[tokio::test]
async fn send_many_stores_all_or_nothing() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let other = enrol(&cp).await;
    let api = cp.server.api();

    // One bad request refuses the batch, named by its index; nothing is stored.
    let bad_type = [
        request(&node.id, "GET_NODE_STATUS"),
        request(&other.id, "GET_NODE_STATUS"),
        request(&node.id, "not a type"),
    ];
    match api.send_many(&bad_type) {
        Err(Error::BadRequest(m)) => assert!(m.starts_with("request 2:"), "{m}"),
        other => panic!("{other:?}"),
    }
    let control = [
        request(&node.id, "GET_NODE_STATUS"),
        request(&node.id, "ACK"),
    ];
    assert!(matches!(api.send_many(&control), Err(Error::BadRequest(_))));
    let unknown = [
        request(&node.id, "GET_NODE_STATUS"),
        request("no-such-node", "GET_NODE_STATUS"),
    ];
    assert!(matches!(
        api.send_many(&unknown),
        Err(Error::NodeNotFound(_))
    ));
    api.revoke(&other.id).unwrap();
    let revoked = [
        request(&node.id, "GET_NODE_STATUS"),
        request(&other.id, "GET_NODE_STATUS"),
    ];
    assert!(matches!(api.send_many(&revoked), Err(Error::Revoked(_))));
    assert_eq!(pending(&cp), 0, "a refused batch stores nothing");
    assert_eq!(api.send_many(&[]).unwrap(), Vec::<Tag>::new());

    // A good batch: stored in order, delivered in order.
    let reqs: Vec<SendRequest> = (0..20)
        .map(|_| request(&node.id, "GET_NODE_STATUS"))
        .collect();
    let tags = api.send_many(&reqs).unwrap();
    assert_eq!(tags.len(), 20);
    assert_eq!(pending(&cp), 20);
    let (mut c, _) = session(&cp, &node).await;
    for tag in &tags {
        let e = c.next_non_heartbeat().await.unwrap();
        assert_eq!(e.tag, *tag);
        assert!(e.is("GET_NODE_STATUS"), "{e:?}");
    }
    cp.server.shutdown().await;
}

#[tokio::test]
async fn send_batch_reads_json_lines_and_refuses_a_bad_line_whole() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let run = |stdin: String, extra: &'static [&'static str]| {
        let socket = cp.server.admin_socket().to_path_buf();
        async move {
            let mut child = tokio::process::Command::new(BIN)
                .args(["send-batch", "-"])
                .args(extra)
                .arg("--admin-socket")
                .arg(socket)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut input = child.stdin.take().unwrap();
            input.write_all(stdin.as_bytes()).await.unwrap();
            drop(input);
            tokio::time::timeout(DEADLINE, child.wait_with_output())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let line = |kind: &str| format!(r#"{{"node":"{}","type":"{kind}","payload":{{}}}}"#, node.id);

    let out = run(
        format!(
            "{}\n\n{}\nnot json\n",
            line("GET_NODE_STATUS"),
            line("GET_NODE_STATUS")
        ),
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 4"),
        "{out:?}"
    );
    let out = run(
        format!("{}\n{}\n", line("GET_NODE_STATUS"), line("not a type")),
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(pending(&cp), 0);

    let out = run(
        format!("{}\n{}\n", line("GET_NODE_STATUS"), line("RUN_COMMAND")),
        &[],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let tags: Vec<Tag> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| Tag::parse(l).unwrap())
        .collect();
    assert_eq!(tags.len(), 2);
    let out = run(line("GET_NODE_STATUS"), &["--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tags"].as_array().unwrap().len(), 1);
    assert_eq!(pending(&cp), 3);
    let (mut c, _) = session(&cp, &node).await;
    for tag in &tags {
        assert_eq!(c.next_non_heartbeat().await.unwrap().tag, *tag);
    }
    cp.server.shutdown().await;
}

/// The agent writes many replies back to back (one write): the control plane reads them as
/// one batch, and every ACK it sends is for a reply already in the database.
#[tokio::test]
async fn every_ack_follows_the_store_of_its_reply() {
    const N: usize = 100;
    let cp = start().await;
    let node = enrol(&cp).await;
    let api = cp.server.api();
    let reqs: Vec<SendRequest> = (0..N)
        .map(|_| request(&node.id, "GET_NODE_STATUS"))
        .collect();
    let tags = api.send_many(&reqs).unwrap();
    let (mut c, _) = session(&cp, &node).await;
    for tag in &tags {
        assert_eq!(c.next_non_heartbeat().await.unwrap().tag, *tag);
    }
    // A refusal among them: acknowledged, not stored, sent again later.
    let (refused, answered) = tags.split_first().unwrap();
    c.writer
        .push(&Envelope::with_type(
            types::ERROR,
            *refused,
            &serde_json::json!({"code": "busy", "message": "later"}),
        ))
        .unwrap();
    for tag in answered {
        c.writer
            .push(&Envelope::with_type(
                "NODE_STATUS",
                *tag,
                &serde_json::json!({"hostname": "h"}),
            ))
            .unwrap();
    }
    c.writer.flush().await.unwrap();
    let mut acked = Vec::new();
    while acked.len() < N {
        let e = c.next_non_heartbeat().await.unwrap();
        assert!(e.is(types::ACK), "{e:?}");
        if e.tag != *refused {
            assert_eq!(
                api.reply(&e.tag).unwrap().map(|r| r.kind),
                Some("NODE_STATUS".to_string()),
                "the ACK of {} came before its reply was stored",
                e.tag
            );
        }
        acked.push(e.tag);
    }
    acked.sort();
    let mut all = tags.clone();
    all.sort();
    assert_eq!(acked, all, "each reply acknowledged once");
    assert_eq!(api.reply(refused).unwrap(), None);
    // The refused one comes again (same tag) and is then answered for good.
    let again = c.next_non_heartbeat().await.unwrap();
    assert_eq!(again.tag, *refused);
    c.send(&Envelope::with_type(
        "NODE_STATUS",
        *refused,
        &serde_json::json!({"hostname": "h"}),
    ))
    .await;
    let ack = c.next_non_heartbeat().await.unwrap();
    assert!(ack.is(types::ACK) && ack.tag == *refused, "{ack:?}");
    assert!(api.reply(refused).unwrap().is_some());
    assert_eq!(pending(&cp), 0);
    cp.server.shutdown().await;
}

/// Many callers wait on many tags at once; each gets its own reply, and a waiter that gives up
/// does not keep the others from theirs.
#[tokio::test]
async fn many_waiters_get_their_own_replies() {
    // Within the in-flight window, so that all are sent before any is answered.
    const N: usize = 100;
    let cp = start().await;
    let node = enrol(&cp).await;
    let api = cp.server.api();
    let reqs: Vec<SendRequest> = (0..N)
        .map(|_| request(&node.id, "GET_NODE_STATUS"))
        .collect();
    let tags = api.send_many(&reqs).unwrap();
    let mut waits = tokio::task::JoinSet::new();
    for (i, tag) in tags.iter().enumerate() {
        let api2 = api.clone();
        let tag = *tag;
        waits.spawn(async move {
            let r = api2.wait_reply(&tag, DEADLINE).await.unwrap();
            assert_eq!(r.tag, tag.to_string());
            assert_eq!(r.payload["i"], serde_json::json!(i));
        });
        // Two waiters on the same tag; the second gives up at once.
        let api = api.clone();
        waits.spawn(async move {
            let short = api.wait_reply(&tag, Duration::from_millis(1)).await;
            assert!(matches!(short, Err(Error::Timeout)), "{short:?}");
        });
    }
    let (mut c, _) = session(&cp, &node).await;
    for (i, tag) in tags.iter().enumerate() {
        let e = c.next_non_heartbeat().await.unwrap();
        assert_eq!(e.tag, *tag);
        c.writer
            .push(&Envelope::with_type(
                "NODE_STATUS",
                *tag,
                &serde_json::json!({ "i": i }),
            ))
            .unwrap();
    }
    c.writer.flush().await.unwrap();
    while let Some(r) = waits.join_next().await {
        r.unwrap();
    }
    cp.server.shutdown().await;
}
