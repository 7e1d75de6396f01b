//! Regression tests from the security review of the certificate lifecycle (issue 4): each one
//! reproduced a finding before its fix, over real TLS on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use runos_controlplane::api::{DEFAULT_SEEN_WITHIN, SendRequest};
use runos_protocol::control::{self, Hello, types};
use runos_protocol::{Envelope, Tag};
use runos_transport::{FrameReader, FrameWriter};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn probe_hello(node_id: &str) -> Envelope {
    Envelope::with_type(
        types::HELLO,
        Tag::random(),
        &Hello {
            protocol_version: runos_protocol::PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            node_id: node_id.to_string(),
            hostname: "test-node".into(),
            boot_id: "boot-1".into(),
            instruction_types: vec![],
            pending_replies: vec![],
            probe: true,
            last_update: None,
            wireguard_public_key: None,
        },
    )
}

async fn probe_session(cp: &Cp, node: &Node) -> Conn {
    let mut c = l2_connect(cp, node.identity()).await.unwrap();
    let hello = probe_hello(&node.id);
    c.send(&hello).await;
    let w = c.next().await.unwrap().expect("WELCOME");
    assert!(w.is(types::WELCOME), "{w:?}");
    c
}

async fn renew_on(c: &mut Conn) -> Envelope {
    let (_key, csr) = csr();
    let env = Envelope::with_type(
        types::RENEW,
        Tag::random(),
        &control::Renew { csr_pem: csr },
    );
    c.send(&env).await;
    c.next_non_heartbeat().await.expect("an answer to RENEW")
}

/// RENEW until it is not refused as `busy` (the per-node interval since enrolment), within a
/// deadline.
async fn renew_patiently(c: &mut Conn) -> Envelope {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = renew_on(c).await;
        if !(r.is(types::ERROR) && error_code(&r) == "busy")
            || tokio::time::Instant::now() > deadline
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Finding: a probe session opened before `revoke` is not closed by it (it is not in the
/// registry) and keeps being served: heartbeats are answered and, worse, final replies for the
/// node's instructions are still stored and ACKed after the node was revoked.
#[tokio::test]
async fn a_probe_session_is_cut_off_by_revocation_and_stores_no_replies() {
    let cp = start().await;
    let api = cp.server.api();
    let node = enrol(&cp).await;
    let tag = api
        .send(&SendRequest {
            node: node.id.clone(),
            kind: "GET_NODE_STATUS".into(),
            payload: None,
            raw_b64: None,
            timeout_ms: None,
        })
        .unwrap();
    let mut probe = probe_session(&cp, &node).await;
    api.revoke(&node.id).unwrap();
    // A normal session is now refused...
    let mut c = l2_connect(&cp, node.identity()).await.unwrap();
    c.send(&hello_env(&node.id, runos_protocol::PROTOCOL_VERSION))
        .await;
    let e = c.next().await.unwrap().expect("ERROR");
    assert_eq!(error_code(&e), "revoked");
    // ...but the probe session of the revoked node still works.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = Envelope::with_type(types::NO_CONTENT, tag, &serde_json::json!({}));
    probe.send(&reply).await;
    let answer = probe.next_non_heartbeat().await;
    let stored = api.reply(&tag).unwrap();
    assert!(
        !answer.as_ref().is_some_and(|e| e.is(types::ACK)) && stored.is_none(),
        "a revoked node's probe session must not be served: answer {answer:?}, reply stored {stored:?}"
    );
}

/// Finding: the renewal rate limit is per session, and probe sessions are unlimited: one node
/// can get many certificates per second (each is a signature and a row that is never pruned).
#[tokio::test]
async fn renewals_are_rate_limited_per_node_and_probes_capped() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let mut issued = 0;
    for _ in 0..20 {
        let mut p = probe_session(&cp, &node).await;
        if renew_on(&mut p).await.is_ok_and_renewed() {
            issued += 1;
        }
    }
    assert!(
        issued <= 1,
        "{issued} certificates issued to one node within a second or so (limit is one per 5 s per *session*)"
    );
}

trait Renewed {
    fn is_ok_and_renewed(&self) -> bool;
}
impl Renewed for Envelope {
    fn is_ok_and_renewed(&self) -> bool {
        self.is(types::RENEWED)
    }
}

/// Finding: `ca status`/`ca cutover` count a node as safe as soon as the control plane has
/// *issued* it a certificate of the incoming CA, whether or not the node ever installed it
/// (RENEWED lost, staging/probe failed, disk full, ...). The cutover then goes through without
/// --force and the node, which still holds A's certificate and trusts only [A], is locked out.
#[tokio::test]
async fn cutover_counts_only_certificates_that_carried_a_session() {
    let cp = start().await;
    let api = cp.server.api();
    let a = cp.ca_der();
    let node = enrol(&cp).await;
    let (mut live, _) = session(&cp, &node).await;
    api.ca_rotate().await.unwrap();
    // The node asks for a renewal, but never installs the answer (e.g. its stage or probe
    // failed): it keeps A's certificate and the bundle [A].
    let r = renew_patiently(&mut live).await;
    assert!(r.is(types::RENEWED));
    drop(live);
    let st = api.ca_status(DEFAULT_SEEN_WITHIN).unwrap();
    assert_eq!(
        st.blocking_total, 1,
        "an issued but never used certificate of the new CA must not count"
    );
    let cut = api.ca_cutover(false, DEFAULT_SEEN_WITHIN).await;
    assert!(cut.is_err(), "the cutover must be refused without --force");
    // The node still connects with what it really holds (A's certificate, trusting only A).
    let tls = l2_tls_trusting(&cp, &[a], node.identity()).await.unwrap();
    let (r, w) = tokio::io::split(tls);
    let mut c = Conn {
        reader: FrameReader::new(r, 1 << 20),
        writer: FrameWriter::new(w, 1 << 20),
    };
    c.send(&hello_env(&node.id, runos_protocol::PROTOCOL_VERSION))
        .await;
    let w = c.next().await.unwrap().expect("an answer to HELLO");
    assert!(w.is(types::WELCOME), "{w:?}");
}

/// Finding: TLS 1.3 session resumption on L2Sec restores the client certificate without
/// re-verifying it, and the control plane never checks `not_after` itself: a client holding a
/// ticket from an earlier session is admitted after its certificate expired, and can RENEW it.
#[tokio::test]
async fn an_expired_certificate_cannot_resume_a_session_or_renew() {
    let cp = start_with(|o| o.cert_validity = Duration::from_secs(60)).await;
    let node = enrol(&cp).await;
    let cfg = runos_transport::tls::client_config(
        &[cp.ca_der()],
        runos_protocol::ALPN_L2SEC,
        Some(node.identity()),
    )
    .unwrap();
    let open = |cfg: Arc<rustls::ClientConfig>| {
        let addr = cp.server.l2_addr();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = TlsConnector::from(cfg)
                .connect(runos_transport::tls::server_name("localhost").unwrap(), tcp)
                .await
                .map_err(|e| e.to_string())?;
            let (r, w) = tokio::io::split(tls);
            Ok::<_, String>(Conn {
                reader: FrameReader::new(r, 1 << 20),
                writer: FrameWriter::new(w, 1 << 20),
            })
        }
    };
    // 1. A normal session while the certificate is valid (the client keeps the tickets).
    {
        let mut c = open(cfg.clone()).await.unwrap();
        c.send(&hello_env(&node.id, runos_protocol::PROTOCOL_VERSION))
            .await;
        let w = c.next().await.unwrap().unwrap();
        assert!(w.is(types::WELCOME));
        // Let the NewSessionTicket messages be read.
        let hb = Envelope::with_type(
            types::HEARTBEAT,
            Tag::random(),
            &control::Heartbeat {
                sent_at_ms: 1,
                in_flight: 0,
            },
        );
        c.send(&hb).await;
        let _ = c.next().await;
    }
    // 2. Wait until the certificate has expired.
    let der = runos_transport::pem::certificates(node.cert_pem.as_bytes()).unwrap();
    let info = runos_transport::identity::cert_info(&der[0]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let wait = (info.not_after - now + 3).max(0) as u64;
    eprintln!("waiting {wait} s for the certificate to expire");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    // Control: a full handshake with the expired certificate is refused.
    let fresh = runos_transport::tls::client_config(
        &[cp.ca_der()],
        runos_protocol::ALPN_L2SEC,
        Some(node.identity()),
    )
    .unwrap();
    let full_refused = match open(fresh).await {
        Err(_) => true,
        Ok(mut c) => {
            let _ = c
                .writer
                .write(&hello_env(&node.id, runos_protocol::PROTOCOL_VERSION))
                .await;
            !c.until_closed().await.iter().any(|e| e.is(types::WELCOME))
        }
    };
    assert!(
        full_refused,
        "control: a full handshake with an expired certificate must fail"
    );
    // 3. Resume the earlier TLS session: the expired certificate is admitted.
    let mut c = open(cfg.clone()).await.unwrap();
    c.send(&hello_env(&node.id, runos_protocol::PROTOCOL_VERSION))
        .await;
    let first = c.next().await;
    let welcomed = matches!(&first, Ok(Some(e)) if e.is(types::WELCOME));
    let renewed = if welcomed {
        renew_on(&mut c).await.is(types::RENEWED)
    } else {
        false
    };
    assert!(
        !welcomed,
        "expired certificate (notAfter {}) got WELCOME via TLS resumption; RENEW answered RENEWED: {renewed}",
        info.not_after
    );
}
