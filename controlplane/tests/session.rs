//! L2Sec sessions over real mutual TLS on loopback, and the operator socket.

mod common;

use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use runos_controlplane::admin::Request;
use runos_controlplane::cli::Client;
use runos_protocol::control::{self, types};
use runos_protocol::{Envelope, Tag};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test]
async fn hello_gets_welcome_and_heartbeats_are_answered() {
    let cp = start_with(|o| o.heartbeat_interval = Duration::from_secs(2)).await;
    let node = enrol(&cp).await;
    let (mut c, welcome) = session(&cp, &node).await;
    assert_eq!(welcome.heartbeat_interval_ms, 2000);
    assert_eq!(
        welcome.max_frame_bytes,
        runos_protocol::DEFAULT_MAX_FRAME_BYTES
    );
    let api = cp.server.api();
    wait_until(|| api.is_online(&node.id)).await;
    let hb = Envelope::with_type(
        types::HEARTBEAT,
        Tag::random(),
        &control::Heartbeat {
            sent_at_ms: 1,
            in_flight: 0,
        },
    );
    c.send(&hb).await;
    let r = c.next().await.unwrap().unwrap();
    assert!(r.is(types::HEARTBEAT_REPLY));
    assert_eq!(r.tag, hb.tag);
    let n = &api.nodes().unwrap()[0];
    assert!(n.online);
    assert_eq!(n.instruction_types, vec!["RUN_COMMAND", "GET_NODE_STATUS"]);
    cp.server.shutdown().await;
}

#[tokio::test]
async fn a_silent_session_is_closed_after_three_intervals() {
    let cp = start_with(|o| o.heartbeat_interval = Duration::from_secs(1)).await;
    let node = enrol(&cp).await;
    let (mut c, _) = session(&cp, &node).await;
    let api = cp.server.api();
    // Within the 10 s read deadline the server closes the silent (3 s) session.
    c.until_closed().await;
    wait_until(|| !api.is_online(&node.id)).await;
    cp.server.shutdown().await;
}

#[tokio::test]
async fn plaintext_client_on_l2_is_refused_and_the_server_keeps_working() {
    let cp = start().await;
    let mut tcp = tokio::net::TcpStream::connect(cp.server.l2_addr())
        .await
        .unwrap();
    let _ = tcp
        .write_all(b"\x00\x00\x00\x05HELLO plain text\r\n\r\n")
        .await;
    let mut buf = [0u8; 1024];
    let mut total = 0;
    // The server answers with a TLS alert at most, then closes.
    loop {
        match tokio::time::timeout(DEADLINE, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                total += n;
                assert!(total < 4096, "unexpected data from the server");
            }
            Err(_) => panic!("the server did not close the plaintext connection"),
        }
    }
    // Still serving.
    let node = enrol(&cp).await;
    let _ = session(&cp, &node).await;
    cp.server.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let cp = start().await;
    let node = enrol(&cp).await;
    // A look-alike CA and a certificate with the same node identity.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "runos control plane CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        format!("runos://node/{}", node.id).try_into().unwrap(),
    )];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    let identity = (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    );
    match l2_connect(&cp, identity).await {
        Err(_) => {}
        Ok(mut c) => {
            // TLS 1.3: the refusal arrives after the client's side of the handshake.
            let _ = c
                .writer
                .write(&hello_env(&node.id, runos_protocol::PROTOCOL_VERSION))
                .await;
            let seen = c.until_closed().await;
            assert!(
                seen.iter().all(|e| !e.is(types::WELCOME)),
                "a foreign certificate got a WELCOME"
            );
        }
    }
    assert!(!cp.server.api().is_online(&node.id));
    cp.server.shutdown().await;
}

#[tokio::test]
async fn a_revoked_node_is_disconnected_and_refused() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let (mut c, _) = session(&cp, &node).await;
    let api = cp.server.api();
    wait_until(|| api.is_online(&node.id)).await;
    // Revoke by unique id prefix.
    let revoked = api.revoke(&node.id[..8]).unwrap();
    assert_eq!(revoked, node.id);
    let seen = c.until_closed().await;
    assert!(
        seen.iter()
            .all(|e| !e.is(types::ERROR) || error_code(e) == "revoked"),
        "{seen:?}"
    );
    assert!(!api.is_online(&node.id));
    let mut c = l2_connect(&cp, node.identity()).await.unwrap();
    c.send(&hello_env(&node.id, runos_protocol::PROTOCOL_VERSION))
        .await;
    let e = c.next().await.unwrap().unwrap();
    assert_eq!(error_code(&e), "revoked");
    assert!(api.nodes().unwrap()[0].revoked);
    // Instructions to a revoked node are refused.
    let req = runos_controlplane::SendRequest {
        node: node.id.clone(),
        kind: "GET_NODE_STATUS".into(),
        payload: None,
        raw_b64: None,
        timeout_ms: None,
    };
    assert!(matches!(
        api.send(&req),
        Err(runos_controlplane::Error::Revoked(_))
    ));
    cp.server.shutdown().await;
}

#[tokio::test]
async fn wrong_protocol_version_and_wrong_first_frames_are_refused() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let mut c = l2_connect(&cp, node.identity()).await.unwrap();
    let hello = hello_env(&node.id, runos_protocol::PROTOCOL_VERSION + 1);
    c.send(&hello).await;
    let e = c.next().await.unwrap().unwrap();
    assert_eq!(e.tag, hello.tag);
    assert_eq!(error_code(&e), "version_mismatch");
    c.until_closed().await;

    // HELLO with another node id.
    let mut c = l2_connect(&cp, node.identity()).await.unwrap();
    c.send(&hello_env(
        "00000000-0000-4000-8000-000000000000",
        runos_protocol::PROTOCOL_VERSION,
    ))
    .await;
    let e = c.next().await.unwrap().unwrap();
    assert_eq!(error_code(&e), "protocol");

    // A first frame that is not HELLO.
    let mut c = l2_connect(&cp, node.identity()).await.unwrap();
    c.send(&Envelope::with_type(
        types::HEARTBEAT,
        Tag::random(),
        &serde_json::json!({}),
    ))
    .await;
    let e = c.next().await.unwrap().unwrap();
    assert_eq!(error_code(&e), "protocol");

    // A HELLO whose WireGuard key is not one.
    let mut c = l2_connect(&cp, node.identity()).await.unwrap();
    let good = hello_env(&node.id, runos_protocol::PROTOCOL_VERSION);
    let mut v: serde_json::Value = good.payload().unwrap();
    v["wireguardPublicKey"] = serde_json::json!("not-a-key\u{1b}[31m");
    c.send(&Envelope::with_type(types::HELLO, Tag::random(), &v))
        .await;
    let e = c.next().await.unwrap().unwrap();
    assert_eq!(error_code(&e), "protocol");
    cp.server.shutdown().await;
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_the_connection() {
    let cp = start_with(|o| o.max_frame_bytes = 64 * 1024).await;
    let node = enrol(&cp).await;
    let tls = l2_tls(&cp, node.identity()).await.unwrap();
    let (r, mut w) = tokio::io::split(tls);
    let mut reader = runos_transport::FrameReader::new(r, 16 * 1024 * 1024);
    {
        let mut fw = runos_transport::FrameWriter::new(&mut w, 16 * 1024 * 1024);
        fw.write(&hello_env(&node.id, runos_protocol::PROTOCOL_VERSION))
            .await
            .unwrap();
    }
    let welcome = tokio::time::timeout(DEADLINE, reader.read())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let welcome: control::Welcome = welcome.payload().unwrap();
    assert_eq!(welcome.max_frame_bytes, 64 * 1024);
    let api = cp.server.api();
    wait_until(|| api.is_online(&node.id)).await;
    // A length prefix one byte over the limit, then some bytes.
    let mut raw = (64 * 1024 + 1u32).to_be_bytes().to_vec();
    raw.extend_from_slice(&[b'x'; 100]);
    w.write_all(&raw).await.unwrap();
    w.flush().await.unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(DEADLINE, reader.read()).await.unwrap() {
        seen.push(e);
    }
    let last = seen.last().expect("an ERROR before the close");
    assert_eq!(error_code(last), "protocol");
    wait_until(|| !api.is_online(&node.id)).await;
    cp.server.shutdown().await;
}

#[tokio::test]
async fn a_second_session_replaces_the_first() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let (mut first, w1) = session(&cp, &node).await;
    let (mut second, w2) = session(&cp, &node).await;
    assert_ne!(w1.session_id, w2.session_id);
    first.until_closed().await;
    let api = cp.server.api();
    assert!(api.is_online(&node.id));
    let hb = Envelope::with_type(
        types::HEARTBEAT,
        Tag::random(),
        &control::Heartbeat {
            sent_at_ms: 1,
            in_flight: 0,
        },
    );
    second.send(&hb).await;
    let r = second.next().await.unwrap().unwrap();
    assert!(r.is(types::HEARTBEAT_REPLY));
    cp.server.shutdown().await;
}

#[tokio::test]
async fn instructions_are_delivered_acked_and_redelivered_with_the_same_tag() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let client = Client::new(cp.server.admin_socket());
    let api = cp.server.api();

    // Stored while the node is offline, delivered after WELCOME.
    let v = client
        .request(
            &Request::Send {
                node: "test-node".into(),
                kind: "GET_NODE_STATUS".into(),
                payload: None,
                raw_b64: None,
                timeout_ms: Some(5000),
                wait_ms: None,
                tag: None,
            },
            DEADLINE,
        )
        .await
        .unwrap();
    let tag1 = Tag::parse(v["tag"].as_str().unwrap()).unwrap();
    let (mut c, _) = session(&cp, &node).await;
    let got = c.next_non_heartbeat().await.unwrap();
    assert_eq!(got.tag, tag1);
    assert!(got.is("GET_NODE_STATUS"));
    assert_eq!(got.timeout_ms, Some(5000));

    // Sent while online: delivered at once.
    let tag2 = api
        .send(&runos_controlplane::SendRequest {
            node: node.id.clone(),
            kind: "RUN_COMMAND".into(),
            payload: Some(serde_json::json!({"argv": ["true"]})),
            raw_b64: None,
            timeout_ms: None,
        })
        .unwrap();
    let got = c.next_non_heartbeat().await.unwrap();
    assert_eq!(got.tag, tag2);
    let payload: serde_json::Value = got.payload().unwrap();
    assert_eq!(payload, serde_json::json!({"argv": ["true"]}));

    // A LOG line, then the final reply of tag1: stored and ACKed (twice for a duplicate).
    c.send(&Envelope::with_type(
        types::LOG,
        tag1,
        &control::LogLine {
            level: control::LogLevel::Info,
            message: "working".into(),
        },
    ))
    .await;
    let reply = Envelope::with_type("NODE_STATUS", tag1, &serde_json::json!({"hostname": "h"}));
    c.send(&reply).await;
    let ack = c.next_non_heartbeat().await.unwrap();
    assert!(ack.is(types::ACK));
    assert_eq!(ack.tag, tag1);
    let stored = api.wait_reply(&tag1, DEADLINE).await.unwrap();
    assert_eq!(stored.kind, "NODE_STATUS");
    assert_eq!(stored.payload["hostname"], "h");
    c.send(&Envelope::with_type(
        "ERROR",
        tag1,
        &serde_json::json!({"code": "internal", "message": "x"}),
    ))
    .await;
    let ack = c.next_non_heartbeat().await.unwrap();
    assert!(ack.is(types::ACK) && ack.tag == tag1);
    assert_eq!(api.reply(&tag1).unwrap().unwrap().kind, "NODE_STATUS");
    // A reply for an unknown tag is ACKed too.
    let stray = Tag::random();
    c.send(&Envelope::with_type(
        "NO_CONTENT",
        stray,
        &serde_json::json!({}),
    ))
    .await;
    let ack = c.next_non_heartbeat().await.unwrap();
    assert!(ack.is(types::ACK) && ack.tag == stray);

    // tag2 is unanswered: after a reconnect it comes again with the same tag, and only it.
    drop(c);
    let (mut c, _) = session(&cp, &node).await;
    let again = c.next_non_heartbeat().await.unwrap();
    assert_eq!(again.tag, tag2);
    assert!(again.is("RUN_COMMAND"));
    assert_eq!(api.nodes().unwrap()[0].pending, 1);

    // Answer it; `send --wait` style waiting over the operator socket sees a stored reply.
    let waiter = {
        let client = client.clone();
        let id = node.id.clone();
        tokio::spawn(async move {
            client
                .request(
                    &Request::Send {
                        node: id,
                        kind: "NO_SUCH_THING".into(),
                        payload: None,
                        raw_b64: None,
                        timeout_ms: None,
                        wait_ms: Some(10_000),
                        tag: None,
                    },
                    DEADLINE,
                )
                .await
        })
    };
    c.send(&Envelope::with_type(
        "RUN_COMMAND_RESPONSE",
        tag2,
        &serde_json::json!({"exitCode": 0}),
    ))
    .await;
    let mut acked = false;
    let mut tag3 = None;
    while !(acked && tag3.is_some()) {
        let e = c.next_non_heartbeat().await.unwrap();
        if e.is(types::ACK) {
            assert_eq!(e.tag, tag2);
            acked = true;
        } else {
            assert!(e.is("NO_SUCH_THING"));
            tag3 = Some(e.tag);
        }
    }
    let tag3 = tag3.unwrap();
    c.send(&Envelope::with_type(
        "ERROR",
        tag3,
        &serde_json::json!({"code": "unknown_type", "message": "no such type"}),
    ))
    .await;
    let v = waiter.await.unwrap().unwrap();
    assert_eq!(v["tag"], tag3.to_string());
    assert_eq!(v["type"], "ERROR");
    assert_eq!(v["payload"]["code"], "unknown_type");
    assert_eq!(api.nodes().unwrap()[0].pending, 0);

    // Waiting times out with the tag; unknown nodes and control types are refused.
    let r = client
        .request(
            &Request::Send {
                node: node.id.clone(),
                kind: "GET_NODE_STATUS".into(),
                payload: None,
                raw_b64: None,
                timeout_ms: None,
                wait_ms: Some(200),
                tag: None,
            },
            DEADLINE,
        )
        .await;
    match r {
        Err(runos_controlplane::Error::Remote { code, tag, .. }) => {
            assert_eq!(code, "timeout");
            assert!(tag.is_some());
        }
        other => panic!("{other:?}"),
    }
    let r = client
        .request(
            &Request::Send {
                node: "nope".into(),
                kind: "GET_NODE_STATUS".into(),
                payload: None,
                raw_b64: None,
                timeout_ms: None,
                wait_ms: None,
                tag: None,
            },
            DEADLINE,
        )
        .await;
    assert!(
        matches!(r, Err(runos_controlplane::Error::Remote { ref code, .. }) if code == "node_not_found"),
        "{r:?}"
    );
    let r = client
        .request(
            &Request::Send {
                node: node.id.clone(),
                kind: "ACK".into(),
                payload: None,
                raw_b64: None,
                timeout_ms: None,
                wait_ms: None,
                tag: None,
            },
            DEADLINE,
        )
        .await;
    assert!(
        matches!(r, Err(runos_controlplane::Error::Remote { ref code, .. }) if code == "bad_request"),
        "{r:?}"
    );
    cp.server.shutdown().await;
}

#[tokio::test]
async fn the_operator_socket_refuses_oversized_and_malformed_requests() {
    let cp = start_with(|o| o.max_frame_bytes = 64 * 1024).await;
    let mut s = tokio::net::UnixStream::connect(cp.server.admin_socket())
        .await
        .unwrap();
    s.write_all(b"{not json}\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["code"], "bad_request");
    // A line far over the bound: an error answer and a close, without reading it all.
    let big = vec![b'a'; 4 * 1024 * 1024];
    let _ = s.write_all(&big).await;
    let mut all = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut all))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.contains("too large"), "{text}");
    cp.server.shutdown().await;
}
