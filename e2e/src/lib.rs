//! The end-to-end harness: runs the real `runos-controlplane` and `runos` binaries, each in its
//! own temporary directory, over real TLS on loopback with ephemeral ports. No root is needed:
//! every path the agent uses is set in its config file.
//!
//! The binaries are looked up next to the test executable's `deps/` directory
//! (`target/<profile>/`), so `cargo build --bins` must run before `cargo test` (the test command,
//! `scripts/test.sh`, does that). Every wait is a poll of a condition with a deadline.
#![forbid(unsafe_code)]

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod bench;
pub mod overlay_bench;
pub mod release;
pub mod scripted;

/// How long the harness waits for anything (a process to come up, a node to connect).
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The path of a workspace binary built into the same target directory as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// Poll `cond` until it holds or `deadline` passes; panics naming `what` on timeout.
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Send `sig` to process `pid`.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Wait for `child` to exit within `deadline`; kill it and panic otherwise.
pub fn wait_exit(child: &mut Child, deadline: Duration, what: &str) -> ExitStatus {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Text of a command's stdout and stderr, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The addresses a running control plane bound (`endpoints.json`).
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// L1Sec address.
    pub l1: std::net::SocketAddr,
    /// L2Sec address.
    pub l2: std::net::SocketAddr,
}

/// A final reply as printed by `runos-controlplane send --wait --json`.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The CLI's exit code.
    pub exit: i32,
    /// The reply's tag.
    pub tag: String,
    /// The reply's type (`ERROR`, `NODE_STATUS`, …).
    pub kind: String,
    /// The decoded payload.
    pub payload: Value,
}

impl Reply {
    /// The error code of an `ERROR` reply.
    pub fn error_code(&self) -> Option<&str> {
        (self.kind == "ERROR")
            .then(|| self.payload.get("code").and_then(Value::as_str))
            .flatten()
    }
}

/// A `runos-controlplane serve` process.
#[derive(Debug)]
pub struct ControlPlane {
    /// Its data directory.
    pub dir: PathBuf,
    child: Option<Child>,
    /// Where it listens.
    pub endpoints: Endpoints,
    extra: Vec<String>,
}

impl ControlPlane {
    /// Start a control plane in `dir` on ephemeral loopback ports with a 1 s heartbeat and any
    /// `extra` serve flags.
    pub fn start(dir: &Path, extra: &[&str]) -> ControlPlane {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, endpoints) = Self::spawn(dir, "127.0.0.1:0", "127.0.0.1:0", &extra);
        ControlPlane {
            dir: dir.to_path_buf(),
            child: Some(child),
            endpoints,
            extra,
        }
    }

    /// Start a control plane in `dir` listening on `l1` and `l2` (`ADDR:PORT`, port 0 for an
    /// ephemeral one), with a 1 s heartbeat and any `extra` serve flags.
    pub fn start_at(dir: &Path, l1: &str, l2: &str, extra: &[&str]) -> ControlPlane {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, endpoints) = Self::spawn(dir, l1, l2, &extra);
        ControlPlane {
            dir: dir.to_path_buf(),
            child: Some(child),
            endpoints,
            extra,
        }
    }

    fn spawn(dir: &Path, l1: &str, l2: &str, extra: &[String]) -> (Child, Endpoints) {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let endpoints_file = dir.join("endpoints.json");
        let _ = fs::remove_file(&endpoints_file);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .unwrap_or_else(|e| panic!("serve.log: {e}"));
        let mut child = Command::new(bin("runos-controlplane"))
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args([
                "--l1-addr",
                l1,
                "--l2-addr",
                l2,
                "--heartbeat-interval",
                "1s",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn runos-controlplane: {e}"));
        let mut endpoints = None;
        let log_path = dir.join("serve.log");
        let end = Instant::now() + DEADLINE;
        while endpoints.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "runos-controlplane serve exited with {status}:\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < end,
                "control plane did not write endpoints.json"
            );
            endpoints = fs::read(&endpoints_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| {
                    let l1 = v.get("l1Addr")?.as_str()?.parse().ok()?;
                    let l2 = v.get("l2Addr")?.as_str()?.parse().ok()?;
                    Some(Endpoints { l1, l2 })
                });
            std::thread::sleep(Duration::from_millis(10));
        }
        (child, endpoints.unwrap_or_else(|| unreachable!()))
    }

    /// The process id of the serve process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Kill the serve process with SIGKILL (no graceful shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the control plane again on the same data directory and the same ports.
    pub fn restart(&mut self) {
        self.kill();
        let l1 = self.endpoints.l1.to_string();
        let l2 = self.endpoints.l2.to_string();
        let (child, endpoints) = Self::spawn(&self.dir, &l1, &l2, &self.extra);
        self.child = Some(child);
        self.endpoints = endpoints;
    }

    /// The CA certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The serve log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// Run an operator subcommand against this control plane.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("runos-controlplane"))
            .args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run runos-controlplane {args:?}: {e}"))
    }

    /// Run an operator subcommand with `input` on its standard input.
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = Command::new(bin("runos-controlplane"))
            .args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run runos-controlplane {args:?}: {e}"));
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(input.as_bytes());
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("runos-controlplane {args:?}: {e}"))
    }

    /// Create an enrolment token; returns `(token, caSha256)`.
    pub fn token(&self, ttl: &str) -> (String, String) {
        let out = self.cli(&["token", "create", "--ttl", ttl, "--json"]);
        assert!(out.status.success(), "token create: {}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("token create output: {e}: {}", describe(&out)));
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("token create output lacks {k}: {v}"))
                .to_string()
        };
        (s("token"), s("caSha256"))
    }

    /// `nodes --json`.
    pub fn nodes(&self) -> Vec<Value> {
        let out = self.cli(&["nodes", "--json"]);
        assert!(out.status.success(), "nodes: {}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("nodes output: {e}: {}", describe(&out)));
        match v {
            Value::Array(a) => a,
            Value::Object(ref o) => o
                .get("nodes")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The `nodes` entry of `node`.
    pub fn node(&self, node: &str) -> Option<Value> {
        self.nodes()
            .into_iter()
            .find(|n| n.get("id").and_then(Value::as_str) == Some(node))
    }

    /// Whether `node` has a live session.
    pub fn is_online(&self, node: &str) -> bool {
        self.node(node)
            .and_then(|n| n.get("online").and_then(Value::as_bool))
            .unwrap_or(false)
    }

    /// Wait until `node` has a live session.
    pub fn wait_online(&self, node: &str) {
        wait_until(DEADLINE, &format!("node {node} online"), || {
            self.is_online(node)
        });
    }

    /// `send NODE TYPE JSON --wait --json` with extra flags; returns the parsed reply.
    pub fn send_with(&self, node: &str, kind: &str, json: &str, extra: &[&str]) -> Reply {
        let mut args = vec!["send", node, kind];
        if !extra.contains(&"--raw-b64") {
            args.push(json);
        }
        args.extend_from_slice(&["--wait", "--json"]);
        if !extra.contains(&"--timeout") {
            args.extend_from_slice(&["--timeout", "30s"]);
        }
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        parse_reply(&out)
    }

    /// `send NODE TYPE JSON --wait`.
    pub fn send(&self, node: &str, kind: &str, json: &str) -> Reply {
        self.send_with(node, kind, json, &[])
    }
}

/// Parse the output of `send --wait --json`.
pub fn parse_reply(out: &Output) -> Reply {
    let exit = out.status.code().unwrap_or(-1);
    let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
        // Refused before anything was sent (unknown or revoked node): no reply to parse.
        assert_ne!(
            exit,
            0,
            "send succeeded without printing a reply: {}",
            describe(out)
        );
        return Reply {
            exit,
            tag: String::new(),
            kind: String::new(),
            payload: Value::String(String::from_utf8_lossy(&out.stderr).into_owned()),
        };
    };
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    Reply {
        exit,
        tag: s("tag"),
        kind: s("type"),
        payload: v.get("payload").cloned().unwrap_or(Value::Null),
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `runos` agent with its own configuration and state under one directory.
#[derive(Debug)]
pub struct Agent {
    /// Its root directory.
    pub dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    child: Option<Child>,
    /// The node id, once registered.
    pub node_id: Option<String>,
}

impl Agent {
    /// Write a config for an agent rooted at `dir` that talks to `cp`; `extra_agent` is added to
    /// the `[agent]` table (TOML lines).
    pub fn new(dir: &Path, cp: &ControlPlane, extra_agent: &str) -> Agent {
        Agent::for_ports(
            dir,
            cp.endpoints.l1.port(),
            cp.endpoints.l2.port(),
            extra_agent,
        )
    }

    /// Write a config for an agent rooted at `dir` that talks to a control plane on loopback at
    /// ports `l1`/`l2`.
    pub fn for_ports(dir: &Path, l1: u16, l2: u16, extra_agent: &str) -> Agent {
        let etc = dir.join("etc");
        fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("mkdir: {e}"));
        let config = etc.join("config.toml");
        let p = |s: &str| dir.join(s).display().to_string();
        let text = format!(
            "[server]\nhost = \"127.0.0.1\"\nl1_port = {}\nl2_port = {}\n\n\
             [paths]\nkey = \"{}\"\ncertificate = \"{}\"\nca = \"{}\"\nl1_ca = \"{}\"\n\
             state_dir = \"{}\"\nrun_dir = \"{}\"\n\n[log]\nlevel = \"debug\"\n\n\
             [agent]\nreconnect_initial_ms = 100\nreconnect_max_ms = 1000\n{extra_agent}\n",
            l1,
            l2,
            p("etc/node.key"),
            p("etc/node.crt"),
            p("etc/ca.pem"),
            p("etc/l1sec-ca.pem"),
            p("state"),
            p("run"),
        );
        fs::write(&config, text).unwrap_or_else(|e| panic!("write config: {e}"));
        Agent {
            dir: dir.to_path_buf(),
            config,
            child: None,
            node_id: None,
        }
    }

    /// Run `runos --config C <args>`, feeding `stdin`.
    pub fn cli(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(bin("runos"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn runos {args:?}: {e}"));
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(stdin.as_bytes());
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("runos {args:?}: {e}"))
    }

    /// Register with `token` (through stdin) against `cp`, pinning its CA. Returns the output;
    /// on success records the node id.
    pub fn register_with(&mut self, cp: &ControlPlane, token: &str, pin: &str) -> Output {
        self.register_ca(&cp.ca_file(), token, pin)
    }

    /// Register with `token` (through stdin), trusting the CA in `ca_file` pinned to `pin`.
    pub fn register_ca(&mut self, ca_file: &Path, token: &str, pin: &str) -> Output {
        let ca = ca_file.display().to_string();
        let out = self.cli(
            &[
                "register",
                "--server",
                "127.0.0.1",
                "--token",
                "-",
                "--ca-file",
                &ca,
                "--ca-sha256",
                pin,
                "--json",
            ],
            token,
        );
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("register output: {e}: {}", describe(&out)));
            self.node_id = v.get("nodeId").and_then(Value::as_str).map(str::to_string);
        }
        out
    }

    /// Register with a fresh token; panics on failure.
    pub fn register(&mut self, cp: &ControlPlane) -> String {
        let (token, pin) = cp.token("10m");
        let out = self.register_with(cp, &token, &pin);
        assert!(out.status.success(), "register: {}", describe(&out));
        self.node_id
            .clone()
            .unwrap_or_else(|| panic!("register printed no nodeId: {}", describe(&out)))
    }

    /// `runos certificate status --json`, parsed.
    pub fn certificate(&self) -> Value {
        let out = self.cli(&["certificate", "status", "--json"], "");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("certificate status output: {e}: {}", describe(&out)))
    }

    /// The serial of the certificate on disk.
    pub fn serial(&self) -> String {
        self.certificate()["serial"]
            .as_str()
            .unwrap_or_else(|| panic!("no serial in certificate status"))
            .to_string()
    }

    /// `runos status --json`, parsed (whatever the exit code).
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"], "");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status output: {e}: {}", describe(&out)))
    }

    /// The agent's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Start `runos agent` in the background with extra environment variables.
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        self.start_wrapped(&[], env);
    }

    /// Start `runos agent` in the background as the last arguments of `wrapper` (a program
    /// that execs its arguments, such as `ip netns exec NS`; empty: none), so that the child's
    /// pid is the agent's.
    pub fn start_wrapped(&mut self, wrapper: &[&str], env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "agent already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("agent.log: {e}"));
        let mut cmd = match wrapper.split_first() {
            None => Command::new(bin("runos")),
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(bin("runos"));
                c
            }
        };
        cmd.arg("--config")
            .arg(&self.config)
            .arg("agent")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn agent: {e}")));
    }

    /// Start `runos agent` in the background.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// The agent's process id (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Whether the agent process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM the agent and wait for it to exit.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), rustix::process::Signal::TERM);
        Some(wait_exit(&mut child, DEADLINE, "runos agent after SIGTERM"))
    }

    /// SIGKILL the agent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A control plane and one registered, connected agent in a fresh temporary directory.
#[derive(Debug)]
pub struct Stack {
    /// The agent (dropped first).
    pub agent: Agent,
    /// The control plane.
    pub cp: ControlPlane,
    /// The node id.
    pub node: String,
    /// Keeps the directory alive.
    pub tmp: tempfile::TempDir,
}

impl Stack {
    /// Start a control plane, register an agent and wait until it is online.
    pub fn up(extra_agent: &str) -> Stack {
        Stack::up_with(&[], extra_agent)
    }

    /// [`Stack::up`] with extra `serve` flags for the control plane.
    pub fn up_with(serve_flags: &[&str], extra_agent: &str) -> Stack {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let cp = ControlPlane::start(&tmp.path().join("cp"), serve_flags);
        let mut agent = Agent::new(&tmp.path().join("node"), &cp, extra_agent);
        let node = agent.register(&cp);
        agent.start();
        cp.wait_online(&node);
        Stack {
            agent,
            cp,
            node,
            tmp,
        }
    }

    /// Both logs, for assertion messages.
    pub fn logs(&self) -> String {
        format!(
            "--- agent log\n{}\n--- control plane log\n{}",
            self.agent.log(),
            self.cp.log()
        )
    }

    /// Send a `RUN_COMMAND` with `payload` without waiting for its reply; returns the tag.
    pub fn send_nowait(&self, payload: &Value) -> String {
        let out = self.cp.cli(&[
            "send",
            &self.node,
            "RUN_COMMAND",
            &payload.to_string(),
            "--json",
        ]);
        assert!(out.status.success(), "{}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["tag"].as_str().expect("send prints the tag").to_string()
    }

    /// The reply to `tag`, waiting for it up to `timeout` (e.g. `"60s"`): `reply TAG --wait`.
    pub fn reply_of(&self, tag: &str, timeout: &str) -> Reply {
        parse_reply(
            &self
                .cp
                .cli(&["reply", tag, "--wait", "--timeout", timeout, "--json"]),
        )
    }
}

/// The lines of the file at `path` (none if it cannot be read).
pub fn file_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A hand-driven L2Sec client, for the protocol-violation tests: connects with the given client
/// identity and lets the test send whatever it wants.
pub mod raw {
    use std::net::SocketAddr;
    use std::time::Duration;

    use runos_protocol::Envelope;
    use runos_transport::{FrameReader, FrameWriter, pem, tls};
    use tokio::io::{AsyncWriteExt as _, ReadHalf, WriteHalf};
    use tokio::net::TcpStream;
    use tokio_rustls::client::TlsStream;

    /// A connected client.
    pub type Conn = (
        FrameReader<ReadHalf<TlsStream<TcpStream>>>,
        WriteHalf<TlsStream<TcpStream>>,
    );

    /// Connect to L2Sec at `addr`, trusting `ca_pem`, presenting `cert_pem`/`key_pem`.
    pub async fn connect(
        addr: SocketAddr,
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Conn, String> {
        let cas = pem::certificates(ca_pem).map_err(|e| e.to_string())?;
        let chain = pem::certificates(cert_pem).map_err(|e| e.to_string())?;
        let key = pem::private_key(key_pem).map_err(|e| e.to_string())?;
        let cfg = tls::client_config(&cas, runos_protocol::ALPN_L2SEC, Some((chain, key)))
            .map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = tls::server_name("127.0.0.1").map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (r, w) = tokio::io::split(stream);
        let max = runos_protocol::DEFAULT_MAX_FRAME_BYTES;
        Ok((FrameReader::new(r, max), w))
    }

    /// The next envelope within 10 s: `Ok(None)` when the peer closed, `Err` on a transport or
    /// TLS error or timeout.
    pub async fn next<R: tokio::io::AsyncRead + Unpin>(
        r: &mut FrameReader<R>,
    ) -> Result<Option<Envelope>, String> {
        match tokio::time::timeout(Duration::from_secs(10), r.read()).await {
            Ok(Ok(e)) => Ok(e),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no frame within 10 s".into()),
        }
    }

    /// Whether the peer ends the connection (EOF or error, not a timeout) within 10 s, skipping
    /// any frames it sends first (for example a final `ERROR`). Returns the frames seen.
    pub async fn closed<R: tokio::io::AsyncRead + Unpin>(
        r: &mut FrameReader<R>,
    ) -> Result<Vec<Envelope>, String> {
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), r.read()).await {
                Ok(Ok(Some(e))) => seen.push(e),
                Ok(Ok(None)) | Ok(Err(_)) => return Ok(seen),
                Err(_) => return Err(format!("connection still open after 10 s; saw {seen:?}")),
            }
        }
    }

    /// Send one envelope.
    pub async fn send<W: tokio::io::AsyncWrite + Unpin>(
        w: &mut W,
        env: &Envelope,
    ) -> Result<(), String> {
        FrameWriter::new(w, runos_protocol::DEFAULT_MAX_FRAME_BYTES)
            .write(env)
            .await
            .map_err(|e| e.to_string())
    }

    /// Write raw bytes on the TLS stream.
    pub async fn write_raw<W: tokio::io::AsyncWrite + Unpin>(
        w: &mut W,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        w.write_all(bytes).await?;
        w.flush().await
    }
}
