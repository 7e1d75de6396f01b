//! Capacity of the `runos-controlplane` binary: `--max-sessions` refuses the excess at once with
//! `ERROR busy` and one rate-limited warning; started with a soft open-file limit of 1024 it
//! raises it and holds thousands of sessions; with a hard limit too low for `--max-sessions` it
//! lowers the ceiling, says so, and its operator socket keeps answering.
//!
//! The sessions are real mTLS sessions of real enrolled nodes, opened from this test process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair};
use runos_controlplane::admin::Request;
use runos_controlplane::cli::Client;
use runos_protocol::control::{Hello, Register, Registered, types};
use runos_protocol::{Envelope, ErrorPayload, Tag};
use runos_transport::{FrameReader, FrameWriter};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const BIN: &str = env!("CARGO_BIN_EXE_runos-controlplane");
const DEADLINE: Duration = Duration::from_secs(20);
/// Connections opened at once by the test: below the default per-source handshake limit (64).
const PARALLEL: usize = 32;

/// A `serve` process, killed on drop.
struct Server {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    l1: String,
    l2: String,
    ca: CertificateDer<'static>,
    client: Client,
    _tmp: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `serve` on loopback ephemeral ports, through `sh -c "ulimit ...; exec ..."` when
/// `ulimit` is given (e.g. `-Sn 1024`).
fn start(ulimit: Option<&str>, extra: &[&str]) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let log = tmp.path().join("serve.log");
    let mut args: Vec<String> = [
        "serve",
        "--l1-addr",
        "127.0.0.1:0",
        "--l2-addr",
        "127.0.0.1:0",
        "--heartbeat-interval",
        "120s",
        "--log-format",
        "json",
        "--data-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(dir.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = match ulimit {
        Some(u) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit {u} && exec \"$0\" \"$@\""))
                .arg(BIN)
                .args(&args);
            c
        }
        None => {
            let mut c = Command::new(BIN);
            c.args(&args);
            c
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !dir.join("endpoints.json").exists() {
        assert!(
            start.elapsed() < DEADLINE,
            "serve did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    let ep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("endpoints.json")).unwrap()).unwrap();
    let ca = runos_transport::pem::certificates(&std::fs::read(dir.join("ca.pem")).unwrap())
        .unwrap()
        .remove(0);
    Server {
        child,
        l1: ep["l1Addr"].as_str().unwrap().to_string(),
        l2: ep["l2Addr"].as_str().unwrap().to_string(),
        client: Client::new(PathBuf::from(ep["adminSocket"].as_str().unwrap())),
        ca,
        dir,
        log,
        _tmp: tmp,
    }
}

impl Server {
    fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// `nodes --json` through the binary (the operator's way).
    fn nodes(&self) -> Vec<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["nodes", "--json", "--data-dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn online(&self) -> usize {
        self.nodes()
            .iter()
            .filter(|n| n["online"].as_bool() == Some(true))
            .count()
    }
}

struct Node {
    id: String,
    cert: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

async fn token(s: &Server) -> String {
    let v = s
        .client
        .request(&Request::TokenCreate { ttl_secs: 600 }, DEADLINE)
        .await
        .unwrap();
    v["token"].as_str().unwrap().to_string()
}

async fn enrol(s: &Server, token: String) -> Node {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let cfg = runos_transport::tls::client_config(
        std::slice::from_ref(&s.ca),
        runos_protocol::ALPN_L1SEC,
        None,
    )
    .unwrap();
    let tcp = TcpStream::connect(&s.l1).await.unwrap();
    let tls = TlsConnector::from(cfg)
        .connect(runos_transport::tls::server_name("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let (r, w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, 256 * 1024);
    let mut writer = FrameWriter::new(w, 256 * 1024);
    let reg = Register {
        token,
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        hostname: "load-node".into(),
        os: "debian-12".into(),
        agent_version: "0.1.0".into(),
        csr_pem: csr,
    };
    writer
        .write(&Envelope::with_type(types::REGISTER, Tag::random(), &reg))
        .await
        .unwrap();
    let env = tokio::time::timeout(DEADLINE, reader.read())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(env.is(types::REGISTERED), "{env:?}");
    let r: Registered = env.payload().unwrap();
    Node {
        id: r.node_id,
        cert: runos_transport::pem::certificates(r.certificate_pem.as_bytes()).unwrap(),
        key: key.serialize_der(),
    }
}

/// Enrol `n` nodes, [`PARALLEL`] at a time.
async fn enrol_many(s: &Arc<Server>, n: usize) -> Vec<Node> {
    let gate = Arc::new(Semaphore::new(PARALLEL));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let s = s.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            let t = token(&s).await;
            enrol(&s, t).await
        }));
    }
    let mut nodes = Vec::with_capacity(n);
    for t in tasks {
        nodes.push(t.await.unwrap());
    }
    nodes
}

type Reader = FrameReader<ReadHalf<TlsStream<TcpStream>>>;
type Writer = FrameWriter<WriteHalf<TlsStream<TcpStream>>>;

/// An open session (or a refused one, until dropped).
struct Session {
    _reader: Reader,
    _writer: Writer,
}

/// What the control plane answered to a HELLO.
enum Answer {
    Welcome(Session),
    Error(ErrorPayload),
}

async fn hello(s: &Server, node: &Node) -> Answer {
    let identity = (
        node.cert.clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(node.key.clone())),
    );
    let cfg = runos_transport::tls::client_config(
        std::slice::from_ref(&s.ca),
        runos_protocol::ALPN_L2SEC,
        Some(identity),
    )
    .unwrap();
    let tcp = TcpStream::connect(&s.l2).await.unwrap();
    let tls = TlsConnector::from(cfg)
        .connect(runos_transport::tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (r, w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, 16 * 1024 * 1024);
    let mut writer = FrameWriter::new(w, 16 * 1024 * 1024);
    let tag = Tag::random();
    let hello = Envelope::with_type(
        types::HELLO,
        tag,
        &Hello {
            protocol_version: runos_protocol::PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            node_id: node.id.clone(),
            hostname: "load-node".into(),
            boot_id: "boot-1".into(),
            instruction_types: vec!["GET_NODE_STATUS".into()],
            pending_replies: vec![],
            probe: false,
            last_update: None,
            wireguard_public_key: None,
        },
    );
    writer.write(&hello).await.unwrap();
    let env = tokio::time::timeout(DEADLINE, reader.read())
        .await
        .expect("an answer to HELLO in time")
        .unwrap()
        .expect("an answer to HELLO, not a bare close");
    assert_eq!(env.tag, tag);
    if env.is(types::WELCOME) {
        Answer::Welcome(Session {
            _reader: reader,
            _writer: writer,
        })
    } else {
        assert!(env.is(types::ERROR), "{env:?}");
        // Refused: the control plane closes the connection after the ERROR.
        let end = tokio::time::timeout(DEADLINE, reader.read())
            .await
            .expect("closed after the ERROR");
        assert!(!matches!(end, Ok(Some(_))), "{end:?}");
        Answer::Error(env.payload().unwrap())
    }
}

/// Open a session for each node, [`PARALLEL`] at a time: the sessions, and the refusals.
async fn hello_many(s: &Arc<Server>, nodes: Vec<Node>) -> (Vec<Session>, Vec<ErrorPayload>) {
    let gate = Arc::new(Semaphore::new(PARALLEL));
    let tasks: Vec<_> = nodes
        .into_iter()
        .map(|n| {
            let s = s.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let _p = gate.acquire().await.unwrap();
                hello(&s, &n).await
            })
        })
        .collect();
    let (mut open, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Answer::Welcome(c) => open.push(c),
            Answer::Error(e) => refused.push(e),
        }
    }
    (open, refused)
}

/// Raise this process's soft open-file limit to its hard limit; the hard limit.
fn raise_own_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    let _ = setrlimit(Resource::Nofile, lim);
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_max_sessions_are_refused_busy_with_one_rate_limited_warning() {
    let s = Arc::new(start(None, &["--max-sessions", "3"]));
    let nodes = enrol_many(&s, 7).await;
    let mut nodes = nodes.into_iter();
    let first: Vec<Node> = nodes.by_ref().take(3).collect();
    let (mut open, refused) = hello_many(&s, first).await;
    assert_eq!((open.len(), refused.len()), (3, 0));
    // Each further node is answered at once with ERROR busy to its HELLO, and closed.
    let rest: Vec<Node> = nodes.collect();
    let spare = rest.last().map(|n| Node {
        id: n.id.clone(),
        cert: n.cert.clone(),
        key: n.key.clone(),
    });
    let (more, refused) = hello_many(&s, rest).await;
    assert!(more.is_empty());
    assert_eq!(refused.len(), 4);
    for e in &refused {
        assert_eq!(e.code.as_str(), "busy", "{e:?}");
        assert!(e.message.contains("session limit"), "{e:?}");
    }
    // One warning for the four refusals, naming the ceiling and the flag.
    let warned = s.log_lines("session limit reached");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains("3 sessions"), "{}", warned[0]);
    assert!(warned[0].contains("--max-sessions"), "{}", warned[0]);
    assert!(warned[0].contains("WARN"), "{}", warned[0]);
    // The operator socket answers; the refused nodes are not online.
    assert_eq!(s.online(), 3);
    // A session that ends frees its slot for the next node.
    open.pop();
    wait_until("a slot freed", || s.online() == 2);
    let Answer::Welcome(_again) = hello(&s, &spare.unwrap()).await else {
        panic!("a freed slot admits the next session");
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_soft_limit_of_1024_thousands_of_sessions_get_in_and_the_operator_socket_answers() {
    const SESSIONS: usize = 2000;
    // The control plane needs SESSIONS + its handshake slots (1024) + its reserve (256); this
    // process needs SESSIONS and some.
    let hard = raise_own_nofile();
    if hard < (SESSIONS as u64) + 1024 + 256 + 64 {
        eprintln!(
            "skipped: the hard open-file limit ({hard}) is below what {SESSIONS} sessions need"
        );
        return;
    }
    let s = Arc::new(start(Some("-Sn 1024"), &[]));
    let raised = s.log_lines("raised the soft open-file limit");
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert!(raised[0].contains("\"from\":1024"), "{}", raised[0]);
    let nodes = enrol_many(&s, SESSIONS).await;
    let (open, refused) = hello_many(&s, nodes).await;
    assert!(refused.is_empty(), "{:?}", refused.first());
    assert_eq!(open.len(), SESSIONS);
    // The operator still answers, and sees every session.
    assert_eq!(s.online(), SESSIONS);
    assert!(s.log_lines("Too many open files").is_empty());
    assert!(s.log_lines("session limit reached").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_limit_below_max_sessions_lowers_the_ceiling_and_the_operator_socket_answers() {
    raise_own_nofile();
    // 400 open files: 256 kept for the database, enrolment and operator connections, 36
    // handshake slots, 108 sessions.
    let s = Arc::new(start(Some("-n 400"), &[]));
    let low = s.log_lines("open-file limit is below what --max-sessions needs");
    assert_eq!(low.len(), 1, "{low:?}");
    assert!(low[0].contains("\"sessions\":108"), "{}", low[0]);
    let nodes = enrol_many(&s, 112).await;
    let (open, refused) = hello_many(&s, nodes).await;
    assert_eq!((open.len(), refused.len()), (108, 4));
    assert!(refused.iter().all(|e| e.code.as_str() == "busy"));
    let warned = s.log_lines("session limit reached");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains("open-file limit"), "{}", warned[0]);
    // The operator socket answers at the ceiling, several clients at once.
    let answers: Vec<usize> = std::thread::scope(|t| {
        let hs: Vec<_> = (0..8).map(|_| t.spawn(|| s.online())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|n| *n == 108), "{answers:?}");
    assert!(s.log_lines("Too many open files").is_empty());
    drop(open);
}

/// Resident memory (KiB) and CPU time (ms) of a process, from /proc.
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which ends with ')'): utime and stime are the 12th and
    // 13th, in clock ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    (rss, (f[0] + f[1]) * 10)
}

/// A measurement, not an assertion: what RUNOS_MEASURE_SESSIONS (default 10 000) sessions cost
/// the control plane, started with a soft open-file limit of 1024. Run with
/// `cargo test -p runos-controlplane --test capacity -- --ignored --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn measure_the_cost_of_sessions() {
    let n: usize = std::env::var("RUNOS_MEASURE_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let hard = raise_own_nofile();
    assert!(
        hard >= n as u64 + 2048,
        "the hard open-file limit ({hard}) is too low"
    );
    let s = Arc::new(start(Some("-Sn 1024"), &[]));
    let pid = s.child.id();
    let t0 = Instant::now();
    let nodes = enrol_many(&s, n).await;
    let enrolled = t0.elapsed();
    let (rss1, cpu1) = usage(pid);
    let t1 = Instant::now();
    let (open, refused) = hello_many(&s, nodes).await;
    let opened = t1.elapsed();
    assert!(refused.is_empty());
    // Let the last writes settle before reading the counters.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss2, cpu2) = usage(pid);
    let t2 = Instant::now();
    assert_eq!(s.online(), n);
    let listed = t2.elapsed();
    eprintln!(
        "{n} sessions: enrolment {enrolled:?}; sessions opened in {opened:?}; \
         RSS {rss1} KiB -> {rss2} KiB = {:.1} KiB per session; \
         CPU {cpu1} ms -> {cpu2} ms = {:.2} ms per session (TLS handshake, HELLO, WELCOME); \
         `nodes --json` with all online took {listed:?}",
        (rss2 - rss1) as f64 / n as f64,
        (cpu2 - cpu1) as f64 / n as f64,
    );
    drop(open);
}
