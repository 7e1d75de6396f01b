//! The real `runos agent` against a scripted, hostile control plane over real mTLS on loopback
//! (issue 10, findings 1, 4 and 7): a control plane that stops reading while replies are due,
//! reads very slowly, resets the connection while the agent is blocked writing, announces a
//! tiny `maxFrameBytes`, forges its `sessionId` and `advertisedAgentVersion`, floods unexpected
//! control frames, or accepts frames too small for a reply. In every case the agent process
//! lives on, reconnects and answers, and the instructions running at that moment are answered
//! after the reconnect (not `interrupted`).
//!
//! The control plane here is the test itself: a TLS listener on an ephemeral port with a
//! throwaway PKI (rcgen), speaking the protocol from `docs/protocol.md` frame by frame. Every
//! wait is a condition with a deadline.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runos_e2e::scripted::Pki;
use runos_e2e::{Agent, DEADLINE, describe};
use runos_protocol::control::{HeartbeatReply, Hello, Welcome, types as ct};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, MessageType, Tag};
use runos_transport::{FrameReader, FrameWriter};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const NODE: &str = "0b7e3f3c-1d2a-4c5b-8e9f-001122334455";
/// The control plane's maximum frame size in the well-behaved WELCOME.
const MAX_FRAME: u32 = runos_protocol::DEFAULT_MAX_FRAME_BYTES;
/// How long a test waits for replies.
const REPLIES_WITHIN: Duration = Duration::from_secs(90);

type Srv = tokio_rustls::server::TlsStream<TcpStream>;

/// A throwaway PKI for [`NODE`].
fn pki() -> Pki {
    Pki::new(NODE)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A WELCOME with these limits (the server's clock is the real one).
fn welcome(max_frame_bytes: u32, heartbeat_interval_ms: u64) -> Welcome {
    Welcome {
        protocol_version: runos_protocol::PROTOCOL_VERSION,
        server_time_ms: now_ms(),
        heartbeat_interval_ms,
        max_frame_bytes,
        advertised_agent_version: None,
        session_id: "scripted".into(),
    }
}

/// A well-behaved WELCOME: the default frame limit, a heartbeat every 5 s.
fn good_welcome() -> Welcome {
    welcome(MAX_FRAME, 5_000)
}

/// The scripted control plane's listener.
struct ScriptedCp {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

/// One accepted session.
struct Conn {
    r: FrameReader<ReadHalf<Srv>>,
    w: WriteHalf<Srv>,
    hello: Hello,
}

impl ScriptedCp {
    async fn start(pki: &Pki) -> ScriptedCp {
        Self::start_with(pki, None).await
    }

    /// A control plane whose sockets have a small receive buffer, so that a stalled reader
    /// blocks the agent's writes after a few MB whatever the machine's socket buffer sizes.
    async fn start_small(pki: &Pki) -> ScriptedCp {
        Self::start_with(pki, Some(64 * 1024)).await
    }

    async fn start_with(pki: &Pki, rcvbuf: Option<u32>) -> ScriptedCp {
        let cfg = pki.server_config();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(n) = rcvbuf {
            socket.set_recv_buffer_size(n).unwrap();
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        ScriptedCp {
            listener: socket.listen(16).unwrap(),
            acceptor: TlsAcceptor::from(cfg),
        }
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().unwrap().port()
    }

    /// Accept the agent's next session within [`DEADLINE`], read its HELLO and answer `w`.
    /// With `reset`, closing the connection later resets it (TCP RST, zero linger).
    async fn accept_with(&self, w: &Welcome, reset: bool) -> Conn {
        let (tcp, _) = tokio::time::timeout(DEADLINE, self.listener.accept())
            .await
            .expect("the agent connects (again) within the deadline")
            .unwrap();
        if reset {
            tcp.set_zero_linger().unwrap();
        }
        let tls = tokio::time::timeout(DEADLINE, self.acceptor.accept(tcp))
            .await
            .unwrap()
            .unwrap();
        let (r, w_half) = tokio::io::split(tls);
        let mut r = FrameReader::new(r, MAX_FRAME);
        let mut wr = w_half;
        let hello_env = tokio::time::timeout(DEADLINE, r.read())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(hello_env.is(ct::HELLO), "first frame {}", hello_env.kind);
        let hello: Hello = hello_env.payload().unwrap();
        assert_eq!(hello.node_id, NODE);
        FrameWriter::new(&mut wr, MAX_FRAME)
            .write(&Envelope::with_type(ct::WELCOME, hello_env.tag, w))
            .await
            .unwrap();
        Conn { r, w: wr, hello }
    }

    async fn accept(&self, w: &Welcome) -> Conn {
        self.accept_with(w, false).await
    }

    /// [`ScriptedCp::accept`] the agent's reconnect, failing at once if the agent process
    /// exits meanwhile (the bug was an exit with status 101).
    async fn reconnect(&self, node: &mut Node, w: &Welcome) -> Conn {
        let accept = self.accept(w);
        tokio::pin!(accept);
        loop {
            tokio::select! {
                c = &mut accept => return c,
                _ = tokio::time::sleep(Duration::from_millis(100)) => node.assert_alive(),
            }
        }
    }
}

fn instruction(kind: &str, payload: &Value) -> Envelope {
    Envelope::new(MessageType::new(kind).unwrap(), Tag::random(), payload)
}

impl Conn {
    async fn send(&mut self, env: &Envelope) {
        FrameWriter::new(&mut self.w, MAX_FRAME)
            .write(env)
            .await
            .unwrap();
    }

    /// Send `RUN_COMMAND` with `argv`; returns its tag.
    async fn run(&mut self, argv: &[&str]) -> Tag {
        let env = instruction("RUN_COMMAND", &json!({"argv": argv, "timeoutSecs": 120}));
        self.send(&env).await;
        env.tag
    }

    /// Read until every tag in `tags` has its final reply, answering heartbeats and ACKing
    /// every final reply; returns the replies by tag.
    async fn collect(&mut self, tags: &[Tag]) -> HashMap<Tag, Envelope> {
        let mut got = HashMap::new();
        let deadline = tokio::time::Instant::now() + REPLIES_WITHIN;
        while !tags.iter().all(|t| got.contains_key(t)) {
            let env = match tokio::time::timeout_at(deadline, self.r.read()).await {
                Ok(Ok(Some(env))) => env,
                other => panic!(
                    "replies for {:?} missing ({other:?}); have {:?}",
                    tags.iter()
                        .filter(|t| !got.contains_key(*t))
                        .collect::<Vec<_>>(),
                    got.keys().collect::<Vec<_>>()
                ),
            };
            if env.is(ct::HEARTBEAT) {
                let reply = HeartbeatReply {
                    server_time_ms: now_ms(),
                };
                self.send(&Envelope::with_type(ct::HEARTBEAT_REPLY, env.tag, &reply))
                    .await;
                continue;
            }
            if env.is(ct::LOG) {
                continue;
            }
            self.send(&Envelope::with_type(ct::ACK, env.tag, &json!({})))
                .await;
            got.insert(env.tag, env);
        }
        got
    }

    /// One `GET_NODE_STATUS` round trip: the agent serves this session.
    async fn round_trip(&mut self) {
        let env = instruction("GET_NODE_STATUS", &json!({}));
        self.send(&env).await;
        let got = self.collect(&[env.tag]).await;
        assert_eq!(
            got[&env.tag].kind.as_str(),
            "NODE_STATUS",
            "{:?}",
            got[&env.tag]
        );
    }
}

/// An agent with the PKI's node identity, configured for the scripted control plane.
struct Node {
    agent: Agent,
    _tmp: tempfile::TempDir,
}

fn start_agent(pki: &Pki, port: u16, extra_agent: &str) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let mut agent = Agent::for_ports(tmp.path(), 1, port, extra_agent);
    pki.install(&agent);
    agent.start();
    Node { agent, _tmp: tmp }
}

impl Node {
    /// The agent process must still be running (the bug was an exit with status 101).
    fn assert_alive(&mut self) {
        assert!(
            self.agent.is_running(),
            "the agent process exited\n{}",
            self.agent.log()
        );
        assert!(
            !self.agent.log().contains("panicked"),
            "the agent panicked\n{}",
            self.agent.log()
        );
    }

    /// Wait until the agent's log satisfies `cond` (polling with a deadline).
    async fn wait_log(&self, what: &str, cond: impl Fn(&str) -> bool) {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            if cond(&self.agent.log()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "timed out waiting for {what}\n{}",
                self.agent.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `runos status --json`.
    fn status(&self) -> Value {
        let out = self.agent.cli(&["status", "--json"], "");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status output: {e}: {}", describe(&out)))
    }
}

/// A command printing about 1 MB on stdout and 1 MB on stderr: its reply is a frame of about
/// 2.7 MB, several of which overflow the loopback socket buffers.
const BIG: [&str; 3] = [
    "sh",
    "-c",
    "head -c 1000000 /dev/zero | tr '\\0' a; head -c 1000000 /dev/zero | tr '\\0' b >&2",
];
/// Big replies queued at once (well beyond what the kernel buffers on loopback).
const BIG_COUNT: usize = 10;

/// Start a slow instruction and [`BIG_COUNT`] big ones; returns `(slow, big)`.
async fn load(conn: &mut Conn) -> (Tag, Vec<Tag>) {
    let slow = conn.run(&["sh", "-c", "sleep 2; echo slow"]).await;
    let mut big = Vec::new();
    for _ in 0..BIG_COUNT {
        big.push(conn.run(&BIG).await);
    }
    (slow, big)
}

/// On the new session every instruction of [`load`] is answered with its real result.
async fn check_answered(node: &mut Node, conn: &mut Conn, slow: Tag, big: &[Tag]) {
    let mut tags = big.to_vec();
    tags.push(slow);
    let got = conn.collect(&tags).await;
    for t in &tags {
        let r = &got[t];
        assert_eq!(
            r.kind.as_str(),
            "RUN_COMMAND_RESPONSE",
            "{t}: {r:?}\n{}",
            node.agent.log()
        );
    }
    let p: Value = got[&slow].payload().unwrap();
    assert_eq!(p["stdout"]["text"], "slow\n", "{p}");
    conn.round_trip().await;
    node.assert_alive();
}

/// Finding 1: the control plane stops reading while large replies are due; the agent's write
/// bound (here 1 s) passes; the session ends, the process does not, and after the reconnect
/// every reply arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_stops_reading_costs_a_reconnect_not_the_process() {
    let pki = pki();
    let cp = ScriptedCp::start_small(&pki).await;
    let mut node = start_agent(&pki, cp.port(), "write_timeout_secs = 1");
    // A heartbeat far away: only the write bound can notice the stall.
    let mut stalled = cp.accept(&welcome(MAX_FRAME, 300_000)).await;
    let (slow, big) = load(&mut stalled).await;
    // Never read `stalled` again; keep it open until the agent gave up on it.
    let mut conn = cp.reconnect(&mut node, &good_welcome()).await;
    drop(stalled);
    node.wait_log("the write bound to end the session", |l| {
        l.contains("could not be written within 1 s")
    })
    .await;
    check_answered(&mut node, &mut conn, slow, &big).await;
}

/// Finding 1: a control plane that reads very slowly (a few KB per 50 ms) while large replies
/// are due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_reads_very_slowly_costs_a_reconnect_not_the_process() {
    let pki = pki();
    let cp = ScriptedCp::start_small(&pki).await;
    let mut node = start_agent(&pki, cp.port(), "write_timeout_secs = 1");
    let mut trickle = cp.accept(&welcome(MAX_FRAME, 300_000)).await;
    let (slow, big) = load(&mut trickle).await;
    let mut raw = trickle.r.into_inner();
    let slow_reader = async move {
        let mut buf = [0u8; 4096];
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => std::future::pending::<()>().await,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let good = good_welcome();
    let mut conn = tokio::select! {
        c = cp.reconnect(&mut node, &good) => c,
        _ = slow_reader => unreachable!(),
    };
    check_answered(&mut node, &mut conn, slow, &big).await;
}

/// Finding 1: the connection is reset (TCP RST) while the agent is blocked writing large
/// replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_while_the_agent_is_blocked_writing_costs_a_reconnect_not_the_process() {
    let pki = pki();
    let cp = ScriptedCp::start_small(&pki).await;
    // A long write bound: the reset, not the bound, ends the session.
    let mut node = start_agent(&pki, cp.port(), "write_timeout_secs = 600");
    let mut doomed = cp.accept_with(&welcome(MAX_FRAME, 300_000), true).await;
    let (slow, big) = load(&mut doomed).await;
    // Every big reply produced: they overflow the socket buffers, so the writer is blocked.
    let finished = big.clone();
    node.wait_log("the big instructions to finish", move |l| {
        finished.iter().all(|t| {
            l.lines()
                .any(|x| x.contains(&t.to_string()) && x.contains("finished"))
        })
    })
    .await;
    drop(doomed); // zero linger: RST
    let mut conn = cp.reconnect(&mut node, &good_welcome()).await;
    check_answered(&mut node, &mut conn, slow, &big).await;
}

/// Finding 1: a WELCOME whose `maxFrameBytes` is below the protocol's floor is a protocol
/// error: the agent says so (ERROR `protocol`), logs it, backs off and reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_below_the_frame_floor_is_refused_and_the_agent_reconnects() {
    let pki = pki();
    let cp = ScriptedCp::start(&pki).await;
    let mut node = start_agent(&pki, cp.port(), "");
    let mut tiny = cp.accept(&welcome(1000, 1000)).await;
    match tokio::time::timeout(DEADLINE, tiny.r.read()).await {
        Ok(Ok(Some(env))) => {
            assert!(env.is(ct::ERROR), "{env:?}");
            let e: ErrorPayload = env.payload().unwrap();
            assert_eq!(e.code, ErrorCode::Protocol);
            assert!(e.message.contains("floor"), "{}", e.message);
        }
        other => panic!("expected ERROR protocol, got {other:?}"),
    }
    let mut conn = cp.reconnect(&mut node, &good_welcome()).await;
    conn.round_trip().await;
    node.wait_log("the refusal to be logged", |l| {
        l.contains("below the protocol's floor")
    })
    .await;
    node.assert_alive();
}

/// A frame above the agent's own limit (the length prefix alone) is a protocol error: the
/// agent answers ERROR `protocol`, ends the session and reconnects; the instruction running at
/// that moment is answered on the next session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_above_the_agents_limit_costs_a_reconnect_not_the_process() {
    let pki = pki();
    let cp = ScriptedCp::start(&pki).await;
    let mut node = start_agent(&pki, cp.port(), "max_frame_bytes = 65536");
    let mut conn = cp.accept(&good_welcome()).await;
    let slow = conn.run(&["sh", "-c", "sleep 2; echo slow"]).await;
    node.wait_log("the instruction to start", |l| {
        l.lines()
            .any(|x| x.contains(&slow.to_string()) && x.contains("started"))
    })
    .await;
    conn.w.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    conn.w.flush().await.unwrap();
    let mut seen = Vec::new();
    while let Ok(Ok(Some(env))) = tokio::time::timeout(DEADLINE, conn.r.read()).await {
        seen.push(env);
    }
    assert!(
        seen.iter().any(|e| e.is(ct::ERROR)
            && e.payload::<ErrorPayload>()
                .is_ok_and(|p| p.code == ErrorCode::Protocol)),
        "{seen:?}"
    );
    let mut conn = cp.reconnect(&mut node, &good_welcome()).await;
    let got = conn.collect(&[slow]).await;
    let p: Value = got[&slow].payload().unwrap();
    assert_eq!(p["stdout"]["text"], "slow\n", "{p}");
    node.assert_alive();
}

/// Finding 7: a reply too large for the control plane's frame limit is answered `internal`
/// (protocol.md §7.6), and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_above_the_frame_limit_is_answered_internal() {
    let pki = pki();
    let cp = ScriptedCp::start(&pki).await;
    let mut node = start_agent(&pki, cp.port(), "");
    let floor = runos_protocol::MIN_MAX_FRAME_BYTES;
    let mut conn = cp.accept(&welcome(floor, 5_000)).await;
    let tag = conn
        .run(&["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' a"])
        .await;
    let got = conn.collect(&[tag]).await;
    let r = &got[&tag];
    assert!(r.is(ct::ERROR), "{r:?}");
    let e: ErrorPayload = r.payload().unwrap();
    assert_eq!(e.code, ErrorCode::Internal, "{}", e.message);
    conn.round_trip().await;
    node.assert_alive();
}

/// Finding 4: a forged `sessionId` (newline, ANSI escapes, a fake log line) and a malformed
/// `advertisedAgentVersion` are ignored with a warning: not stored, not shown by `runos
/// status`; an ERROR message with escapes is logged escaped. The log holds no raw ESC byte and
/// no forged line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_peer_text_never_reaches_the_log_or_status_raw() {
    let pki = pki();
    let cp = ScriptedCp::start(&pki).await;
    let mut node = start_agent(&pki, cp.port(), "");
    let mut w = good_welcome();
    w.session_id = "s1\n2026-01-01T00:00:00.000000Z  INFO runos: FORGED-SESSION \x1b[31mred".into();
    w.advertised_agent_version = Some("v9.9.9\x1b[2J\nFORGED-VERSION".into());
    let mut conn = cp.accept(&w).await;
    conn.send(&Envelope::with_type(
        ct::ERROR,
        Tag::random(),
        &ErrorPayload::new(
            ErrorCode::Failed,
            "oops\nFORGED-ERROR line \x1b]0;title\x07 \x1b[2J",
        ),
    ))
    .await;
    conn.round_trip().await;
    node.wait_log("the ERROR to be logged", |l| l.contains("FORGED-ERROR"))
        .await;
    let v = node.status();
    assert_eq!(v["connection"]["state"], "connected", "{v}");
    assert!(v["connection"]["sessionId"].is_null(), "{v}");
    assert!(v["advertisedAgentVersion"].is_null(), "{v}");
    let shown = v.to_string();
    assert!(
        !shown.contains("FORGED-SESSION") && !shown.contains("FORGED-VERSION"),
        "{v}"
    );
    // The ERROR's message is shown (recent errors), escaped on one line.
    for e in v["recentErrors"].as_array().unwrap() {
        let m = e["message"].as_str().unwrap();
        assert!(!m.contains('\n') && !m.contains('\x1b'), "{m:?}");
    }
    let human = node.agent.cli(&["status"], "");
    assert!(!human.stdout.contains(&0x1b), "{}", describe(&human));
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        !human.contains("FORGED-SESSION") && !human.contains("FORGED-VERSION"),
        "{human}"
    );
    assert!(human.lines().all(|l| !l.starts_with("FORGED")), "{human}");
    let log = std::fs::read(node.agent.log_path()).unwrap();
    assert!(
        !log.contains(&0x1b),
        "raw ESC in the log\n{:?}",
        String::from_utf8_lossy(&log)
            .lines()
            .filter(|l| l.contains('\x1b'))
            .collect::<Vec<_>>()
    );
    let log = String::from_utf8_lossy(&log);
    assert!(
        log.lines().all(|l| !l.trim_start().starts_with("FORGED")
            && !l.trim_start().starts_with("2026-01-01T00:00:00.000000Z")),
        "a forged line in the log\n{log}"
    );
    assert!(!log.contains("FORGED-SESSION") && !log.contains("FORGED-VERSION"));
    assert!(log.contains("sessionId is not printable text"), "{log}");
    assert!(
        log.contains("advertisedAgentVersion is not a release version"),
        "{log}"
    );
    node.assert_alive();
}

/// Finding 7: thousands of unexpected control frames (stray HEARTBEATs, WELCOMEs, ERRORs,
/// unmatched HEARTBEAT_REPLYs) write a bounded number of log lines, and the session serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unexpected_control_frames_writes_a_bounded_number_of_lines() {
    let pki = pki();
    let cp = ScriptedCp::start(&pki).await;
    let mut node = start_agent(&pki, cp.port(), "");
    let mut conn = cp.accept(&good_welcome()).await;
    assert!(conn.hello.pending_replies.is_empty());
    const EACH: usize = 1500;
    for _ in 0..EACH {
        conn.send(&Envelope::with_type(
            ct::HEARTBEAT,
            Tag::random(),
            &json!({}),
        ))
        .await;
        conn.send(&Envelope::with_type(
            ct::WELCOME,
            Tag::random(),
            &good_welcome(),
        ))
        .await;
        conn.send(&Envelope::with_type(
            ct::ERROR,
            Tag::random(),
            &ErrorPayload::new(ErrorCode::Busy, "flood"),
        ))
        .await;
        conn.send(&Envelope::with_type(
            ct::HEARTBEAT_REPLY,
            Tag::random(),
            &HeartbeatReply { server_time_ms: 0 },
        ))
        .await;
    }
    // Frames are handled in order: once this is answered, the flood was handled.
    conn.round_trip().await;
    let log = node.agent.log();
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    let warned = count("unexpected control message after WELCOME")
        + count("ERROR from the control plane dropped");
    let unmatched = count("HEARTBEAT_REPLY matches no outstanding heartbeat");
    // 10 lines per 60 s window; a slow machine may straddle one window boundary.
    assert!(warned <= 20, "{warned} warnings for {} frames", 3 * EACH);
    assert!(unmatched <= 20, "{unmatched} lines for {EACH} frames");
    assert!(warned >= 1 && log.contains("suppressed"), "{log}");
    assert!(
        log.lines().count() < 500,
        "{} log lines",
        log.lines().count()
    );
    node.assert_alive();
}

impl Conn {
    /// Read `n` final replies (answering heartbeats, never ACKing); returns their tags.
    async fn finals_without_ack(&mut self, n: usize) -> Vec<Tag> {
        let mut tags = Vec::new();
        let deadline = tokio::time::Instant::now() + REPLIES_WITHIN;
        while tags.len() < n {
            let env = match tokio::time::timeout_at(deadline, self.r.read()).await {
                Ok(Ok(Some(env))) => env,
                other => panic!("{} of {n} replies, then {other:?}", tags.len()),
            };
            if env.is(ct::HEARTBEAT) {
                let reply = HeartbeatReply {
                    server_time_ms: now_ms(),
                };
                self.send(&Envelope::with_type(ct::HEARTBEAT_REPLY, env.tag, &reply))
                    .await;
            } else if !env.is(ct::LOG) {
                tags.push(env.tag);
            }
        }
        tags
    }
}

/// The agent's peak resident memory (`VmHWM`) in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Finding 7: a control plane that never ACKs drove the agent's memory to ~300 MB although the
/// journal holds at most 64 MiB of unacknowledged replies: on every reconnect all of them were
/// copied at once, and the write queue held up to 64 frames of any size. Now the resend goes in
/// pages through a write queue bounded in bytes. The journal fills (new work is answered
/// `busy`), the replies are resent on three reconnects, and resending adds (almost) nothing to
/// the agent's peak memory, which was reached while the big commands ran (measured here: 140
/// MiB peak before and after the resends; before the fix the resends took it to 204 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_never_acks_keeps_the_agents_memory_bounded() {
    let pki = pki();
    let cp = ScriptedCp::start(&pki).await;
    let mut node = start_agent(&pki, cp.port(), "");
    let mut conn = cp.accept(&good_welcome()).await;
    // About 2.7 MB a reply: 30 of them are more than the journal's 64 MiB, so the last ones
    // are refused `busy` (a final reply too, never ACKed either).
    for _ in 0..30 {
        conn.run(&BIG).await;
    }
    let first = conn.finals_without_ack(30).await;
    assert_eq!(first.len(), 30);
    let after_running = peak_rss_kib(node.agent.pid()) / 1024;
    for round in 0..3 {
        drop(conn);
        conn = cp.reconnect(&mut node, &good_welcome()).await;
        let held = conn.hello.pending_replies.len();
        assert!(held >= 20, "round {round}: {held} replies held");
        conn.finals_without_ack(held).await;
    }
    node.assert_alive();
    let peak_mib = peak_rss_kib(node.agent.pid()) / 1024;
    eprintln!(
        "agent peak RSS: {after_running} MiB after running, {peak_mib} MiB after 3 resends of a full journal"
    );
    // A full copy of the held replies is 64 MiB; a page and the write queue are 4 MiB each.
    assert!(
        peak_mib <= after_running + 24,
        "resending grew the peak from {after_running} to {peak_mib} MiB\n{}",
        node.agent.log()
    );
}
