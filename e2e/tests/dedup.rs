//! The same tag sent twice reaches the real agent: one execution, identical replies, also
//! across a `kill -9` and restart of the agent.
//!
//! The reference control plane never sends a tag it already has a reply for, so this test
//! plays the control plane itself: a scripted L2Sec server over real mutual TLS on loopback,
//! with a CA, server and node certificate made here (rcgen). The agent is the real binary.

use std::time::Duration;

use runos_e2e::scripted::Pki;
use runos_e2e::{Agent, file_lines};
use runos_protocol::control::{Welcome, types};
use runos_protocol::{Envelope, MessageType, Tag};
use runos_transport::{FrameReader, FrameWriter};
use serde_json::json;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

type Conn = (
    FrameReader<ReadHalf<TlsStream<TcpStream>>>,
    FrameWriter<WriteHalf<TlsStream<TcpStream>>>,
);

/// Accept the agent's session and answer its HELLO.
async fn accept(listener: &TcpListener, acceptor: &tokio_rustls::TlsAcceptor) -> Conn {
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the agent connects")
        .unwrap();
    let stream = acceptor.accept(tcp).await.unwrap();
    let (r, w) = tokio::io::split(stream);
    let max = runos_protocol::DEFAULT_MAX_FRAME_BYTES;
    let (mut r, mut w) = (FrameReader::new(r, max), FrameWriter::new(w, max));
    let hello = next(&mut r).await;
    assert!(hello.is(types::HELLO), "{hello:?}");
    let welcome = Welcome {
        protocol_version: runos_protocol::PROTOCOL_VERSION,
        server_time_ms: 0,
        heartbeat_interval_ms: 15_000,
        max_frame_bytes: max,
        advertised_agent_version: None,
        session_id: "scripted".into(),
    };
    w.write(&Envelope::with_type(types::WELCOME, hello.tag, &welcome))
        .await
        .unwrap();
    (r, w)
}

async fn next<R: tokio::io::AsyncRead + Unpin>(r: &mut FrameReader<R>) -> Envelope {
    tokio::time::timeout(Duration::from_secs(30), r.read())
        .await
        .expect("a frame within 30 s")
        .expect("a valid frame")
        .expect("the agent keeps the session open")
}

/// Send `env` and return the final reply with its tag (skipping LOG, heartbeats and other
/// tags' replies); ACK it.
async fn round_trip(conn: &mut Conn, env: &Envelope) -> Envelope {
    let (r, w) = conn;
    w.write(env).await.unwrap();
    loop {
        let got = next(r).await;
        if got.is(types::HEARTBEAT) {
            let reply = json!({"serverTimeMs": 0});
            w.write(&Envelope::with_type(
                types::HEARTBEAT_REPLY,
                got.tag,
                &reply,
            ))
            .await
            .unwrap();
            continue;
        }
        if got.tag != env.tag || got.is(types::LOG) {
            continue;
        }
        w.write(&Envelope::with_type(types::ACK, got.tag, &json!({})))
            .await
            .unwrap();
        return got;
    }
}

#[test]
fn the_same_tag_twice_runs_once_and_gets_identical_replies_even_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let node = "00000000-0000-4000-8000-00000000d00d";
    let pki = Pki::new(node);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = pki.acceptor();

    let mut agent = Agent::for_ports(&tmp.path().join("node"), 1, port, "");
    pki.install(&agent);
    agent.start();

    let counter = tmp.path().join("ran.txt");
    let payload = json!({
        "argv": ["sh", "-c", "echo ran >> \"$1\"; echo \"ran at $$\"", "sh", counter],
    });
    let env = Envelope::new(
        MessageType::new("RUN_COMMAND").unwrap(),
        Tag::random(),
        &payload,
    );
    let ran = || file_lines(&counter).len();

    let (first, second) = rt.block_on(async {
        let mut conn = accept(&listener, &acceptor).await;
        let first = round_trip(&mut conn, &env).await;
        let second = round_trip(&mut conn, &env).await;
        (first, second)
    });
    assert!(
        first.is("RUN_COMMAND_RESPONSE"),
        "{first:?}\n{}",
        agent.log()
    );
    assert_eq!(first, second, "a redelivered tag gets the identical reply");
    assert_eq!(ran(), 1, "the command ran once");

    // kill -9 and restart: the journal still answers the tag without running it.
    agent.kill();
    agent.start();
    let third = rt.block_on(async {
        let mut conn = accept(&listener, &acceptor).await;
        round_trip(&mut conn, &env).await
    });
    assert_eq!(first, third, "the reply survives a crash of the agent");
    assert_eq!(ran(), 1, "the command still ran only once\n{}", agent.log());
}
