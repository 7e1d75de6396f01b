//! The L2Sec instruction stream, end to end: the real agent and control plane over mutual TLS on
//! loopback, driven through the operator CLI, plus a hand-driven client for protocol violations.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use runos_e2e::{Agent, ControlPlane, Stack, describe, raw, signal, wait_until};
use runos_protocol::control::{self, Hello, types};
use runos_protocol::{Envelope, Tag};
use serde_json::json;

#[test]
fn get_node_status_and_run_command_round_trip() {
    let s = Stack::up("");
    let r = s.cp.send(&s.node, "GET_NODE_STATUS", "{}");
    assert_eq!(r.exit, 0, "{r:?}\n{}", s.logs());
    assert_eq!(r.kind, "NODE_STATUS");
    assert!(r.payload["agentVersion"].is_string(), "{r:?}");
    assert!(
        r.payload["bootId"].as_str().is_some_and(|b| !b.is_empty()),
        "{r:?}"
    );
    assert_eq!(r.payload["nodeIsReady"], json!(false));

    let r = s.cp.send(
        &s.node,
        "RUN_COMMAND",
        r#"{"argv":["sh","-c","echo out; echo err >&2; exit 3"]}"#,
    );
    assert_eq!(r.kind, "RUN_COMMAND_RESPONSE", "{r:?}\n{}", s.logs());
    assert_eq!(r.payload["exitCode"], json!(3));
    assert_eq!(r.payload["stdout"], json!({"text": "out\n"}));
    assert_eq!(r.payload["stderr"], json!({"text": "err\n"}));
    assert_eq!(r.payload["timedOut"], json!(false));
}

#[test]
fn a_command_past_its_timeout_is_killed_and_reported() {
    let s = Stack::up("");
    let r = s.cp.send(
        &s.node,
        "RUN_COMMAND",
        r#"{"argv":["sleep","30"],"timeoutSecs":1}"#,
    );
    assert_eq!(r.kind, "RUN_COMMAND_RESPONSE", "{r:?}\n{}", s.logs());
    assert_eq!(r.payload["timedOut"], json!(true));
    // SIGTERM first (protocol.md §10): sleep ends on it, within the grace.
    assert_eq!(r.payload["signal"], json!(15));
}

#[test]
fn unknown_types_and_bad_payloads_get_stable_error_codes() {
    let s = Stack::up("");
    let r = s.cp.send(&s.node, "NO_SUCH_INSTRUCTION", "{}");
    assert_eq!(r.error_code(), Some("unknown_type"), "{r:?}\n{}", s.logs());
    assert_eq!(r.exit, 1);

    let r = s.cp.send_with(
        &s.node,
        "RUN_COMMAND",
        "{}",
        &["--raw-b64", "%%%not-base64%%%"],
    );
    assert_eq!(r.error_code(), Some("bad_payload"), "bad base64: {r:?}");

    let not_json = STANDARD.encode("{\"argv\": [\"true\"");
    let r =
        s.cp.send_with(&s.node, "RUN_COMMAND", "{}", &["--raw-b64", &not_json]);
    assert_eq!(r.error_code(), Some("bad_payload"), "bad JSON: {r:?}");

    let r = s.cp.send(&s.node, "RUN_COMMAND", r#"{"argv":[]}"#);
    assert_eq!(r.error_code(), Some("bad_payload"), "empty argv: {r:?}");

    // The payload's secret never comes back in the error.
    let r = s.cp.send(
        &s.node,
        "RUN_COMMAND",
        r#"{"argv":["true"],"env":{"BAD NAME":"hunter2-secret"}}"#,
    );
    assert_eq!(r.error_code(), Some("bad_payload"), "bad env name: {r:?}");
    assert!(!r.payload.to_string().contains("hunter2"), "{r:?}");

    // The agent is still fine.
    let r = s.cp.send(&s.node, "RUN_COMMAND", r#"{"argv":["true"]}"#);
    assert_eq!(r.payload["exitCode"], json!(0), "{r:?}");
}

#[test]
fn secrets_in_instructions_never_reach_the_logs() {
    let s = Stack::up("");
    // The payload goes through stdin (`send NODE TYPE -`), so it is not in `ps` either.
    let out = s.cp.cli_stdin(
        &["send", &s.node, "RUN_COMMAND", "-", "--wait", "--json", "--timeout", "30s"],
        r#"{"argv":["sh","-c","test \"$SECRET\" = s3cr3t-env && cat >/dev/null"],"env":{"SECRET":"s3cr3t-env"},"stdin":"s3cr3t-stdin"}"#,
    );
    let r = runos_e2e::parse_reply(&out);
    assert_eq!(r.payload["exitCode"], json!(0), "{r:?}\n{}", s.logs());
    let logs = s.logs();
    assert!(!logs.contains("s3cr3t-env"), "env value leaked into a log");
    assert!(!logs.contains("s3cr3t-stdin"), "stdin leaked into a log");

    // Nor into the audit log, the journal, `runos status` or `runos journal`.
    let state = s.agent.dir.join("state");
    let audit = std::fs::read_to_string(state.join("audit.jsonl")).unwrap_or_default();
    let journal =
        String::from_utf8_lossy(&std::fs::read(state.join("journal.log")).unwrap()).into_owned();
    let cli = |args: &[&str]| {
        let out = s.agent.cli(args, "");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let outputs = [
        ("state/audit.jsonl", audit.clone()),
        ("state/journal.log", journal),
        ("runos status --json", cli(&["status", "--json"])),
        ("runos journal --json", cli(&["journal", "--json"])),
        ("runos journal", cli(&["journal"])),
        (
            "runos journal --tag",
            cli(&["journal", "--tag", &r.tag, "--json"]),
        ),
    ];
    for (what, text) in &outputs {
        assert!(
            !text.contains("s3cr3t-env"),
            "env value leaked into {what}: {text}"
        );
        assert!(
            !text.contains("s3cr3t-stdin"),
            "stdin leaked into {what}: {text}"
        );
    }

    // The audit log has the instruction's line: tag, type, digest, duration and outcome.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("audit.jsonl"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let line = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["tag"] == json!(r.tag))
        .unwrap_or_else(|| panic!("no audit line for {}: {audit}", r.tag));
    assert_eq!(line["type"], "RUN_COMMAND", "{line}");
    assert_eq!(line["outcome"], "RUN_COMMAND_RESPONSE", "{line}");
    assert_eq!(
        line["payloadSha256"].as_str().map(str::len),
        Some(64),
        "{line}"
    );
    assert!(line["durationMs"].is_u64(), "{line}");
    assert!(line["time"].is_string(), "{line}");

    // `runos journal --tag` shows it; an unknown tag exits 1, a malformed one 2.
    let out = s.agent.cli(&["journal", "--tag", &r.tag, "--json"], "");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["entries"][0]["tag"], json!(r.tag), "{v}");
    assert_eq!(v["entries"][0]["replyType"], "RUN_COMMAND_RESPONSE", "{v}");
    assert_eq!(
        v["entries"][0]["payloadSha256"], line["payloadSha256"],
        "{v}"
    );
    let unknown = Tag::random().to_string();
    let out = s.agent.cli(&["journal", "--tag", &unknown], "");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("no journal entry for {unknown}")),
        "{}",
        describe(&out)
    );
    let out = s.agent.cli(&["journal", "--tag", "not-a-tag"], "");
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

/// `runos journal` with no agent running exits 9, as `runos status`.
#[test]
fn journal_without_a_running_agent_exits_9() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::for_ports(tmp.path(), 1, 1, "");
    let out = agent.cli(&["journal", "--json"], "");
    assert_eq!(out.status.code(), Some(9), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exitCode"], 9, "{v}");
}

/// Every one of 100 instructions sent at once is answered exactly once with its own tag, and
/// every command ran exactly once (each appends its number to a file).
#[test]
fn a_hundred_concurrent_instructions_are_each_answered_once() {
    let s = Stack::up("");
    let counter = s.tmp.path().join("ran.txt");
    let counter_s = counter.display().to_string();
    let replies: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let cp = &s.cp;
                let node = &s.node;
                let counter_s = &counter_s;
                scope.spawn(move || {
                    let payload = json!({
                        "argv": ["sh", "-c", "echo \"$1\" >> \"$2\"; echo \"$1\"", "sh", i.to_string(), counter_s],
                    });
                    (i, cp.send(node, "RUN_COMMAND", &payload.to_string()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut tags = BTreeSet::new();
    for (i, r) in &replies {
        assert_eq!(
            r.kind,
            "RUN_COMMAND_RESPONSE",
            "instruction {i}: {r:?}\n{}",
            s.logs()
        );
        assert_eq!(
            r.payload["stdout"],
            json!({"text": format!("{i}\n")}),
            "{r:?}"
        );
        assert!(tags.insert(r.tag.clone()), "tag {} answered twice", r.tag);
    }
    assert_eq!(tags.len(), 100);
    let ran = std::fs::read_to_string(&counter).unwrap();
    let mut lines: Vec<u32> = ran.lines().map(|l| l.parse().unwrap()).collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        (0..100).collect::<Vec<_>>(),
        "each command must run exactly once"
    );
}

#[test]
fn a_revoked_node_is_cut_off_and_refused() {
    let mut s = Stack::up("");
    let out = s.cp.cli(&["revoke", &s.node]);
    assert!(out.status.success(), "{}", describe(&out));
    wait_until(
        Duration::from_secs(10),
        "the revoked node to go offline",
        || !s.cp.is_online(&s.node),
    );
    // It stays offline: the agent's reconnects are refused.
    let r =
        s.cp.send_with(&s.node, "GET_NODE_STATUS", "{}", &["--timeout", "3s"]);
    assert_ne!(r.exit, 0, "a revoked node must not answer: {r:?}");
    assert!(!s.cp.is_online(&s.node));
    wait_until(
        Duration::from_secs(10),
        "the agent to log the revocation",
        || s.agent.log().contains("revoked"),
    );
    assert!(s.agent.is_running(), "the agent keeps running (slow retry)");

    // Its certificate is refused on a hand-driven connection too.
    s.agent.kill();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut r, mut w) = connect_as_node(&s.cp, &s.agent).await;
        let hello = hello_for(&s.node);
        let sent = raw::send(&mut w, &hello).await;
        if sent.is_ok() {
            let seen = raw::closed(&mut r).await.unwrap();
            assert!(
                seen.iter().all(|e| !e.is(types::WELCOME)),
                "a revoked node must not be welcomed: {seen:?}"
            );
        }
    });
}

#[test]
fn the_agent_survives_a_control_plane_restart() {
    let mut s = Stack::up("");
    s.cp.kill();
    wait_until(Duration::from_secs(10), "the agent to notice", || {
        s.agent.log().to_lowercase().contains("reconnect")
    });
    s.cp.restart();
    s.cp.wait_online(&s.node);
    let r = s.cp.send(&s.node, "GET_NODE_STATUS", "{}");
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}\n{}", s.logs());
    assert!(s.agent.is_running());
}

/// SIGSTOP freezes the control plane: its TCP connection stays open but nothing answers. The
/// agent must notice through missing heartbeat replies, tear the session down and reconnect.
#[test]
fn a_frozen_control_plane_is_detected_by_heartbeat() {
    let mut s = Stack::up("");
    signal(s.cp.pid(), rustix::process::Signal::STOP);
    // The heartbeat interval is 1 s: the agent gives up on the session after 2 s.
    let log_has_dead_peer = || {
        let l = s.agent.log().to_lowercase();
        l.contains("no heartbeat_reply within")
    };
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            Duration::from_secs(15),
            "dead-peer detection",
            log_has_dead_peer,
        )
    }));
    signal(s.cp.pid(), rustix::process::Signal::CONT);
    if let Err(e) = waited {
        panic!("{e:?}\n{}", s.logs());
    }
    s.cp.wait_online(&s.node);
    let r = s.cp.send(&s.node, "GET_NODE_STATUS", "{}");
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}\n{}", s.logs());
    assert!(s.agent.is_running());
}

async fn connect_as_node(cp: &ControlPlane, agent: &Agent) -> raw::Conn {
    let ca = std::fs::read(agent.dir.join("etc/ca.pem")).unwrap();
    let cert = std::fs::read(agent.dir.join("etc/node.crt")).unwrap();
    let key = std::fs::read(agent.dir.join("etc/node.key")).unwrap();
    raw::connect(cp.endpoints.l2, &ca, &cert, &key)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

fn hello_for(node: &str) -> Envelope {
    Envelope::with_type(
        types::HELLO,
        Tag::random(),
        &Hello {
            protocol_version: runos_protocol::PROTOCOL_VERSION,
            agent_version: "0.0.0-test".into(),
            node_id: node.into(),
            hostname: "test".into(),
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            instruction_types: vec![],
            pending_replies: vec![],
            probe: false,
            last_update: None,
            wireguard_public_key: None,
        },
    )
}

/// A node that is registered but whose agent is not running, for hand-driven sessions.
fn registered_node() -> (tempfile::TempDir, ControlPlane, Agent, String) {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &["--max-frame-bytes", "65536"]);
    let mut agent = Agent::new(&tmp.path().join("node"), &cp, "");
    let node = agent.register(&cp);
    (tmp, cp, agent, node)
}

#[test]
fn a_frame_over_the_limit_closes_the_connection() {
    let (_tmp, cp, agent, node) = registered_node();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut r, mut w) = connect_as_node(&cp, &agent).await;
        raw::send(&mut w, &hello_for(&node)).await.unwrap();
        let welcome = raw::next(&mut r).await.unwrap().expect("WELCOME");
        assert!(welcome.is(types::WELCOME), "{welcome:?}");
        let w_payload: control::Welcome = welcome.payload().unwrap();
        assert_eq!(w_payload.max_frame_bytes, 65536);
        // Announce a frame one byte over the limit; the body never needs to be sent.
        let _ = raw::write_raw(&mut w, &(65537u32).to_be_bytes()).await;
        let seen = raw::closed(&mut r).await.unwrap();
        assert!(
            seen.iter().all(|e| !e.is(types::HEARTBEAT_REPLY)),
            "{seen:?}"
        );
    });
    // The server lives on: the real agent connects afterwards.
    let mut agent = agent;
    agent.start();
    cp.wait_online(&node);
}

#[test]
fn a_plaintext_client_on_the_l2sec_port_is_refused() {
    let (_tmp, cp, mut agent, node) = registered_node();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tcp = tokio::net::TcpStream::connect(cp.endpoints.l2)
            .await
            .unwrap();
        let hello = runos_protocol::encode_frame(&hello_for(&node), 1 << 20).unwrap();
        let _ = tcp.write_all(&hello).await;
        let mut buf = vec![0u8; 4096];
        // Whatever the server answers (a TLS alert at most), it is never a WELCOME, and it
        // closes the connection.
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "plaintext connection left open");
        assert!(!String::from_utf8_lossy(&got).contains("WELCOME"));
    });
    agent.start();
    cp.wait_online(&node);
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let (_tmp, cp, mut agent, node) = registered_node();
    // A CA of our own, and a client certificate for the same node id signed by it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("runos://node/{node}").try_into().unwrap(),
    )];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let _ = ca_cert;

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let real_ca = std::fs::read(agent.dir.join("etc/ca.pem")).unwrap();
        match raw::connect(
            cp.endpoints.l2,
            &real_ca,
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
        )
        .await
        {
            Err(_) => {} // refused during the handshake
            Ok((mut r, mut w)) => {
                // TLS 1.3 reports a client-certificate rejection after the client's handshake
                // finishes: the first read fails or the connection closes, never a WELCOME.
                let _ = raw::send(&mut w, &hello_for(&node)).await;
                let seen = raw::closed(&mut r).await.unwrap();
                assert!(seen.iter().all(|e| !e.is(types::WELCOME)), "{seen:?}");
            }
        }
    });
    agent.start();
    cp.wait_online(&node);
}

#[test]
fn a_wrong_protocol_version_is_a_clear_error() {
    let (_tmp, cp, agent, node) = registered_node();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut r, mut w) = connect_as_node(&cp, &agent).await;
        let mut hello: Hello = hello_for(&node).payload().unwrap();
        hello.protocol_version = 999;
        let env = Envelope::with_type(types::HELLO, Tag::random(), &hello);
        raw::send(&mut w, &env).await.unwrap();
        let seen = raw::closed(&mut r).await.unwrap();
        let err = seen
            .iter()
            .find(|e| e.is(types::ERROR))
            .unwrap_or_else(|| panic!("expected an ERROR, saw {seen:?}"));
        assert_eq!(err.tag, env.tag);
        let p: runos_protocol::ErrorPayload = err.payload().unwrap();
        assert_eq!(p.code, runos_protocol::ErrorCode::VersionMismatch);
    });
}

#[test]
fn run_command_output_arrives_as_log_lines_before_the_reply() {
    let s = Stack::up("");
    let r = s.cp.send(
        &s.node,
        "RUN_COMMAND",
        r#"{"argv":["sh","-c","for i in 1 2 3 4; do echo progress-$i; done; echo complaint-1 >&2"]}"#,
    );
    assert_eq!(r.payload["exitCode"], json!(0), "{r:?}\n{}", s.logs());
    // The control plane logs each LOG line with the instruction's tag as it arrives, and the
    // final reply when it stores it.
    let stored = |log: &str| {
        log.lines()
            .position(|l| l.contains("final reply stored") && l.contains(&r.tag))
    };
    wait_until(
        Duration::from_secs(10),
        "the reply in the control plane's log",
        || stored(&s.cp.log()).is_some(),
    );
    let log = s.cp.log();
    let reply_at = stored(&log).unwrap();
    let at = |text: &str| {
        log.lines()
            .position(|l| l.contains("agent log") && l.contains(&r.tag) && l.contains(text))
            .unwrap_or_else(|| panic!("no LOG line {text:?} for {}:\n{}", r.tag, s.logs()))
    };
    let progress: Vec<usize> = (1..=4).map(|i| at(&format!("progress-{i}"))).collect();
    assert!(
        progress.windows(2).all(|w| w[0] < w[1]),
        "{progress:?}\n{log}"
    );
    assert!(progress[3] < reply_at, "a LOG line after the reply:\n{log}");
    // stderr lines are warnings.
    let complaint = at("complaint-1");
    assert!(complaint < reply_at);
    assert!(
        log.lines().nth(complaint).unwrap().contains("WARN"),
        "{log}"
    );
}
