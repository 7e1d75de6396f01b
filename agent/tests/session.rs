//! The L2Sec session against a tiny in-test TLS server (real TLS 1.3 with mTLS on loopback):
//! HELLO/WELCOME, instruction → reply → ACK, stray replies never dispatched, heartbeat timeout →
//! reconnect, resend of un-ACKed replies after WELCOME, graceful shutdown.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use runos_agent::catalog;
use runos_agent::config::RawConfig;
use runos_agent::credentials::identity;
use runos_agent::daemon::JOURNAL_POLICY;
use runos_agent::daemon::dispatch::{self, DispatchConfig};
use runos_agent::daemon::session::{self, Control, SessionEnd, SessionParams};
use runos_journal::{Journal, Limits};
use runos_protocol::control::{HeartbeatReply, Hello, Welcome, types as ct};
use runos_protocol::instructions::types;
use runos_protocol::{Envelope, Tag};
use runos_transport::{FrameReader, FrameWriter};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

type Srv = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
type R = FrameReader<tokio::io::ReadHalf<Srv>>;
type W = FrameWriter<tokio::io::WriteHalf<Srv>>;

const NODE: &str = "0b7e3f3c-1d2a-4c5b-8e9f-001122334455";
const STEP: Duration = Duration::from_secs(10);

async fn accept(l: &TcpListener, acc: &TlsAcceptor) -> (R, W, Hello) {
    let (r, w, hello) = accept_raw(l, acc).await;
    (r, FrameWriter::new(w, 1 << 20), hello)
}

/// [`accept`], with the raw write half (to send a frame in pieces).
async fn accept_raw(l: &TcpListener, acc: &TlsAcceptor) -> (R, tokio::io::WriteHalf<Srv>, Hello) {
    let (tcp, _) = tokio::time::timeout(STEP, l.accept())
        .await
        .unwrap()
        .unwrap();
    let tls = acc.accept(tcp).await.unwrap();
    let (r, mut w) = tokio::io::split(tls);
    let mut r = FrameReader::new(r, 1 << 20);
    let mut fw = FrameWriter::new(&mut w, 1 << 20);
    let hello_env = tokio::time::timeout(STEP, r.read())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(hello_env.is(ct::HELLO));
    let hello: Hello = hello_env.payload().unwrap();
    let welcome = Welcome {
        protocol_version: runos_protocol::PROTOCOL_VERSION,
        server_time_ms: 0,
        heartbeat_interval_ms: 1000,
        max_frame_bytes: 1 << 20,
        advertised_agent_version: None,
        session_id: "test".into(),
    };
    fw.write(&Envelope::with_type(ct::WELCOME, hello_env.tag, &welcome))
        .await
        .unwrap();
    (r, w, hello)
}

/// Read until a non-heartbeat frame arrives, answering heartbeats when `answer` is set.
async fn next_reply<X: tokio::io::AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut FrameWriter<X>,
    answer: bool,
) -> Option<Envelope> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let env = tokio::time::timeout_at(deadline, r.read())
            .await
            .ok()?
            .ok()??;
        if env.is(ct::HEARTBEAT) {
            if answer {
                let _ = w
                    .write(&Envelope::with_type(
                        ct::HEARTBEAT_REPLY,
                        env.tag,
                        &HeartbeatReply { server_time_ms: 0 },
                    ))
                    .await;
            }
            continue;
        }
        if env.is(ct::LOG) {
            continue;
        }
        return Some(env);
    }
}

fn instr(kind: &str) -> Envelope {
    Envelope::with_type_dyn(kind)
}

trait Dyn {
    fn with_type_dyn(kind: &str) -> Envelope;
}

impl Dyn for Envelope {
    fn with_type_dyn(kind: &str) -> Envelope {
        Envelope::new(
            runos_protocol::MessageType::new(kind).unwrap(),
            Tag::random(),
            &serde_json::json!({}),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lifecycle() {
    let pki = common::pki(NODE);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("node.key"), &pki.node_key_pem).unwrap();
    std::fs::write(d.join("node.crt"), &pki.node_cert_pem).unwrap();
    std::fs::write(d.join("ca.pem"), &pki.ca_pem).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let toml = format!(
        "[server]\nhost = \"127.0.0.1\"\nl2_port = {port}\n[paths]\nkey = \"{0}/node.key\"\ncertificate = \"{0}/node.crt\"\nca = \"{0}/ca.pem\"\nl1_ca = \"{0}/l1.pem\"\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n",
        d.display()
    );
    let path = d.join("config.toml");
    let cfg = RawConfig::parse(&toml, &path)
        .unwrap()
        .validate(&path)
        .unwrap();
    let id = identity::load(&cfg).unwrap();
    assert_eq!(id.node_id, NODE);

    let server_cfg = runos_transport::tls::server_config(
        runos_transport::pem::certificates(pki.server_cert_pem.as_bytes()).unwrap(),
        runos_transport::pem::private_key(pki.server_key_pem.as_bytes()).unwrap(),
        runos_protocol::ALPN_L2SEC,
        Some(&runos_transport::pem::certificates(pki.ca_pem.as_bytes()).unwrap()),
    )
    .unwrap();
    let acc = TlsAcceptor::from(server_cfg);

    // The agent side: sessions in a loop, as the daemon runs them (without backoff).
    let catalog = Arc::new(catalog::standard());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (_reconnect_tx, reconnect_rx) = watch::channel(0u64);
    let (mut link, _d) = dispatch::spawn(
        catalog.clone(),
        DispatchConfig::from_settings(&cfg.agent),
        Journal::open(&cfg.paths.state_dir, Limits::default(), JOURNAL_POLICY)
            .unwrap()
            .0,
        shutdown_rx.clone(),
    );
    let params = SessionParams {
        identity: id,
        max_frame_bytes: 1 << 20,
        instruction_types: catalog.types(),
        paths: cfg.paths.clone(),
        write_timeout: session::WRITE_TIMEOUT,
        state: runos_agent::daemon::state::AgentState::new(),
    };
    let (ends_tx, mut ends) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut ctl = Control {
            shutdown: shutdown_rx,
            reconnect: reconnect_rx,
            grace: Duration::from_secs(5),
            renew: mpsc::channel(1).1,
        };
        loop {
            let rep = session::run(&params, &mut link, &mut ctl).await;
            let done = rep.end == SessionEnd::Shutdown;
            let _ = ends_tx.send(rep);
            if done {
                break;
            }
        }
    });

    // Session 1.
    let (mut r, mut w, hello) = accept(&listener, &acc).await;
    assert_eq!(hello.node_id, NODE);
    assert!(hello.pending_replies.is_empty());
    assert!(
        hello
            .instruction_types
            .contains(&types::RUN_COMMAND.to_string())
    );
    // Stray answers: must never come back as instructions (no ERROR for these tags).
    let stray_hb = Tag::random();
    let stray_ack = Tag::random();
    w.write(&Envelope::with_type(
        ct::HEARTBEAT_REPLY,
        stray_hb,
        &HeartbeatReply { server_time_ms: 0 },
    ))
    .await
    .unwrap();
    w.write(&Envelope::with_type(
        ct::ACK,
        stray_ack,
        &serde_json::json!({}),
    ))
    .await
    .unwrap();

    let t1 = instr(types::GET_NODE_STATUS);
    w.write(&t1).await.unwrap();
    let rep = next_reply(&mut r, &mut w, true).await.unwrap();
    assert_eq!(rep.tag, t1.tag, "got {} instead", rep.kind);
    assert!(rep.is(types::NODE_STATUS));
    w.write(&Envelope::with_type(
        ct::ACK,
        t1.tag,
        &serde_json::json!({}),
    ))
    .await
    .unwrap();

    let t2 = instr(types::GET_NODE_STATUS);
    w.write(&t2).await.unwrap();
    let rep = next_reply(&mut r, &mut w, true).await.unwrap();
    assert_eq!(rep.tag, t2.tag);
    // Not ACKed: must be resent after the next WELCOME.

    // Stop answering heartbeats: the agent must give up on this session within ~2 intervals.
    let t0 = Instant::now();
    let mut seen_hb = 0;
    while let Ok(Some(env)) = tokio::time::timeout(STEP, r.read())
        .await
        .expect("agent should close")
    {
        assert_ne!(env.tag, stray_hb);
        assert_ne!(env.tag, stray_ack);
        if env.is(ct::HEARTBEAT) {
            seen_hb += 1;
        }
    }
    assert!(seen_hb >= 1);
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    let end = tokio::time::timeout(STEP, ends.recv())
        .await
        .unwrap()
        .unwrap();
    match end.end {
        SessionEnd::Failed(m) => assert!(m.contains("HEARTBEAT_REPLY"), "{m}"),
        other => panic!("unexpected end {other:?}"),
    }
    assert!(end.welcomed_at.is_some());
    drop((r, w));

    // Session 2: fresh TLS; HELLO lists the un-ACKed reply, which comes again; the ACKed one
    // does not.
    let (mut r, mut raw, hello) = accept_raw(&listener, &acc).await;
    let mut w = FrameWriter::new(&mut raw, 1 << 20);
    assert_eq!(hello.pending_replies, vec![t2.tag.to_string()]);
    let rep = next_reply(&mut r, &mut w, true).await.unwrap();
    assert_eq!(rep.tag, t2.tag);
    assert!(rep.is(types::NODE_STATUS));
    w.write(&Envelope::with_type(
        ct::ACK,
        t2.tag,
        &serde_json::json!({}),
    ))
    .await
    .unwrap();
    // A redelivered instruction whose reply is held is answered with the same reply.
    let t3 = instr(types::GET_NODE_STATUS);
    w.write(&t3).await.unwrap();
    let a = next_reply(&mut r, &mut w, true).await.unwrap();
    w.write(&t3).await.unwrap();
    let b = next_reply(&mut r, &mut w, true).await.unwrap();
    assert_eq!((a.tag, b.tag), (t3.tag, t3.tag));
    assert_eq!(a, b, "the held reply is resent unchanged");

    // A frame split across reads arrives whole: the session reads in its select loop, and a
    // heartbeat going out between the halves shows the loop ran (dropping a pending read)
    // while half the frame was buffered.
    let t4 = instr(types::GET_NODE_STATUS);
    let bytes = runos_protocol::frame::encode_frame(&t4, 1 << 20).unwrap();
    let (first, rest) = bytes.split_at(bytes.len() / 2);
    raw.write_all(first).await.unwrap();
    raw.flush().await.unwrap();
    loop {
        let env = tokio::time::timeout(STEP, r.read())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if env.is(ct::HEARTBEAT) {
            break;
        }
    }
    raw.write_all(rest).await.unwrap();
    raw.flush().await.unwrap();
    let mut w = FrameWriter::new(&mut raw, 1 << 20);
    let rep = next_reply(&mut r, &mut w, true).await.unwrap();
    assert_eq!(rep.tag, t4.tag);
    assert!(rep.is(types::NODE_STATUS));

    // Graceful shutdown: the session ends and the server sees the connection close.
    shutdown_tx.send(true).unwrap();
    let end = tokio::time::timeout(STEP, ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end.end, SessionEnd::Shutdown);
    let closed = loop {
        match tokio::time::timeout(STEP, r.read()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(_) => break true,
            Err(_) => break false,
        }
    };
    assert!(closed);
}

#[tokio::test]
async fn unreachable_server_is_connect_failed() {
    let pki = common::pki(NODE);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("k"), &pki.node_key_pem).unwrap();
    std::fs::write(d.join("c"), &pki.node_cert_pem).unwrap();
    std::fs::write(d.join("ca"), &pki.ca_pem).unwrap();
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let toml = format!(
        "[server]\nhost = \"127.0.0.1\"\nl2_port = {port}\n[paths]\nkey = \"{0}/k\"\ncertificate = \"{0}/c\"\nca = \"{0}/ca\"\nstate_dir = \"{0}/state\"\n",
        d.display()
    );
    let path = d.join("config.toml");
    let cfg = RawConfig::parse(&toml, &path)
        .unwrap()
        .validate(&path)
        .unwrap();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (_rtx, reconnect_rx) = watch::channel(0u64);
    let (mut link, _d) = dispatch::spawn(
        Arc::new(catalog::standard()),
        DispatchConfig::from_settings(&cfg.agent),
        Journal::open(&cfg.paths.state_dir, Limits::default(), JOURNAL_POLICY)
            .unwrap()
            .0,
        shutdown_rx.clone(),
    );
    let params = SessionParams {
        identity: identity::load(&cfg).unwrap(),
        max_frame_bytes: 1 << 20,
        instruction_types: vec![],
        paths: cfg.paths.clone(),
        write_timeout: session::WRITE_TIMEOUT,
        state: runos_agent::daemon::state::AgentState::new(),
    };
    let mut ctl = Control {
        shutdown: shutdown_rx,
        reconnect: reconnect_rx,
        grace: Duration::from_secs(1),
        renew: tokio::sync::mpsc::channel(1).1,
    };
    let rep = session::run(&params, &mut link, &mut ctl).await;
    match rep.end {
        SessionEnd::ConnectFailed(m) => assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}"),
        other => panic!("{other:?}"),
    }
    drop(shutdown_tx);
}
