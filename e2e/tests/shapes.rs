//! Shapes the contract refuses never run (issue 10, finding 3), against the real agent binary:
//! a scripted L2Sec control plane over real mutual TLS on loopback (as in `dedup.rs`) sends an
//! envelope written as a JSON array, a `RUN_COMMAND` payload written as `[argv]`, a relative
//! `argv[0]`, and a bare `argv[0]` with a payload `PATH` naming a directory with a planted
//! program. Each would create a marker file if it ran.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use runos_e2e::Agent;
use runos_e2e::scripted::Pki;
use runos_protocol::control::{Welcome, types};
use runos_protocol::{Envelope, ErrorPayload, MessageType, Tag};
use runos_transport::FrameReader;
use serde_json::json;
use tokio::io::{AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

type Reader = FrameReader<ReadHalf<TlsStream<TcpStream>>>;
type Writer = WriteHalf<TlsStream<TcpStream>>;

const STEP: Duration = Duration::from_secs(30);

/// Write one frame whose body is `body`, whatever it holds.
async fn write_raw(w: &mut Writer, body: &[u8]) {
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    w.write_all(&frame).await.unwrap();
    w.flush().await.unwrap();
}

async fn write(w: &mut Writer, env: &Envelope) {
    write_raw(w, &serde_json::to_vec(env).unwrap()).await;
}

/// The next frame, or `None` when the agent closed the session (or sent garbage).
async fn next(r: &mut Reader) -> Option<Envelope> {
    tokio::time::timeout(STEP, r.read())
        .await
        .expect("a frame or the end of the session within 30 s")
        .ok()
        .flatten()
}

/// Accept the agent's session and answer its HELLO.
async fn accept(listener: &TcpListener, acceptor: &tokio_rustls::TlsAcceptor) -> (Reader, Writer) {
    let (tcp, _) = tokio::time::timeout(STEP, listener.accept())
        .await
        .expect("the agent connects")
        .unwrap();
    let stream = acceptor.accept(tcp).await.unwrap();
    let (r, mut w) = tokio::io::split(stream);
    let max = runos_protocol::DEFAULT_MAX_FRAME_BYTES;
    let mut r = FrameReader::new(r, max);
    let hello = next(&mut r).await.expect("HELLO");
    assert!(hello.is(types::HELLO), "{hello:?}");
    let welcome = Welcome {
        protocol_version: runos_protocol::PROTOCOL_VERSION,
        server_time_ms: 0,
        heartbeat_interval_ms: 15_000,
        max_frame_bytes: max,
        advertised_agent_version: None,
        session_id: "scripted".into(),
    };
    write(
        &mut w,
        &Envelope::with_type(types::WELCOME, hello.tag, &welcome),
    )
    .await;
    (r, w)
}

/// Send `env` and return its final reply (heartbeats answered, LOG skipped), ACKed.
async fn round_trip(r: &mut Reader, w: &mut Writer, env: &Envelope) -> Envelope {
    write(w, env).await;
    loop {
        let got = next(r).await.expect("the agent keeps the session open");
        if got.is(types::HEARTBEAT) {
            let reply = json!({"serverTimeMs": 0});
            write(
                w,
                &Envelope::with_type(types::HEARTBEAT_REPLY, got.tag, &reply),
            )
            .await;
            continue;
        }
        if got.tag != env.tag || got.is(types::LOG) {
            continue;
        }
        write(w, &Envelope::with_type(types::ACK, got.tag, &json!({}))).await;
        return got;
    }
}

fn run_command_text(json: &str) -> Envelope {
    Envelope::from_json_text(
        MessageType::new("RUN_COMMAND").unwrap(),
        Tag::random(),
        json,
    )
}

fn bad_payload(reply: &Envelope) -> ErrorPayload {
    assert!(reply.is(types::ERROR), "{reply:?}");
    let e: ErrorPayload = reply.payload().unwrap();
    assert_eq!(e.code, runos_protocol::ErrorCode::BadPayload, "{e:?}");
    e
}

#[test]
fn shapes_the_contract_refuses_never_run() {
    let tmp = tempfile::tempdir().unwrap();
    let node = "00000000-0000-4000-8000-00000000beef";
    let pki = Pki::new(node);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = pki.acceptor();

    let mut agent = Agent::for_ports(&tmp.path().join("node"), 1, port, "");
    pki.install(&agent);
    agent.start();

    let marker = tmp.path().join("ran");
    let touch = json!(["/bin/touch", marker]);
    let planted = tmp.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    for name in ["id", "true"] {
        let script = planted.join(name);
        std::fs::write(
            &script,
            format!("#!/bin/sh\ntouch {}\necho planted\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    rt.block_on(async {
        // 1. An envelope written as an array is not an envelope: a framing error that ends the
        //    session (§2, §3). Nothing runs and no reply carries its tag.
        let (mut r, mut w) = accept(&listener, &acceptor).await;
        let tag = Tag::random();
        let payload = STANDARD.encode(json!({ "argv": touch }).to_string());
        let array = json!(["RUN_COMMAND", tag.to_string(), payload]).to_string();
        write_raw(&mut w, array.as_bytes()).await;
        while let Some(got) = next(&mut r).await {
            assert_ne!(got.tag, tag, "the array envelope was answered: {got:?}");
        }

        // The agent reconnects; the rest goes over a fresh session.
        let (mut r, mut w) = accept(&listener, &acceptor).await;
        // 2. `[argv]` as a RUN_COMMAND payload; `[]` as GET_NODE_STATUS's.
        let env = run_command_text(&json!([touch]).to_string());
        bad_payload(&round_trip(&mut r, &mut w, &env).await);
        let env = Envelope::from_json_text(
            MessageType::new("GET_NODE_STATUS").unwrap(),
            Tag::random(),
            "[]",
        );
        bad_payload(&round_trip(&mut r, &mut w, &env).await);
        // 3. A relative argv[0] with a '/', resolved against cwd by a shell: refused.
        let env = run_command_text(
            &json!({"argv": ["../../../../bin/touch", marker], "cwd": tmp.path()}).to_string(),
        );
        let e = bad_payload(&round_trip(&mut r, &mut w, &env).await);
        assert!(e.message.contains("`argv[0]`"), "{e:?}");
        assert!(!e.message.contains("../"), "{e:?}");
        // 4. Limits of §9 are bad_payload, not failed.
        for (extra, field) in [
            (json!({"env": {"1X": "v"}}), "`env`"),
            (json!({"cwd": "/tmp\u{0}x"}), "`cwd`"),
            (json!({"cwd": format!("/{}", "a".repeat(4999))}), "`cwd`"),
        ] {
            let mut p = json!({ "argv": touch });
            p.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let env = run_command_text(&p.to_string());
            let e = bad_payload(&round_trip(&mut r, &mut w, &env).await);
            assert!(e.message.contains(field), "{field}: {e:?}");
        }
        // 5. A bare argv[0] is found in the agent's PATH, not in the payload's.
        for name in ["id", "true"] {
            let env =
                run_command_text(&json!({"argv": [name], "env": {"PATH": planted}}).to_string());
            let reply = round_trip(&mut r, &mut w, &env).await;
            assert!(reply.is("RUN_COMMAND_RESPONSE"), "{reply:?}");
            let out: serde_json::Value = reply.payload().unwrap();
            assert_eq!(out["exitCode"], json!(0), "{name}: {out}");
            assert!(!out["stdout"].to_string().contains("planted"), "{out}");
        }
        // 6. UPDATE_AGENT: the error names the field, never the value.
        let env = Envelope::new(
            MessageType::new("UPDATE_AGENT").unwrap(),
            Tag::random(),
            &json!({"version": "../../x"}),
        );
        let e = bad_payload(&round_trip(&mut r, &mut w, &env).await);
        assert!(e.message.contains("`version`"), "{e:?}");
        assert!(!e.message.contains("../../x"), "{e:?}");
    });
    assert!(
        !marker.exists(),
        "a refused or planted program ran\n{}",
        agent.log()
    );
    assert!(agent.is_running(), "{}", agent.log());
}
