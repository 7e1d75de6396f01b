//! `runos-bench`: the benchmark of the spine over the real stack on loopback, each figure next to
//! its floor measured in the same run.
//!
//! It runs the reference control plane in-process (its operator API, no CLI round trips), and the
//! real `runos` agent binary from the same target directory as a child process, registered with
//! a real token over L1Sec and connected over mutual TLS 1.3 on L2Sec. In one run it measures:
//!
//! - the floors: a raw TLS 1.3 echo on loopback of frames the size of a `GET_NODE_STATUS`
//!   instruction frame (round trip one at a time, and pipelined frames/s), and a spawn of `true`
//!   the way the agent spawns (absolute `/bin/true`, and bare `true` looked up in `PATH`), and an
//!   append + `fdatasync` of a journal-sized record in the temporary directory;
//! - round trips one at a time: `GET_NODE_STATUS`, `RUN_COMMAND ["true"]` and
//!   `RUN_COMMAND ["/bin/true"]`, with their ratios to the floors (and `RUN_COMMAND` also to
//!   the floor that includes the two `fdatasync`s its guarantee needs);
//! - pipelined throughput, the clock started after the enqueue: `GET_NODE_STATUS` with the
//!   agent's default configuration, then journaled with every sync (the agent restarted with
//!   `--journaled-config`);
//! - idle wake-ups of the connected agent, its memory fresh and after the long pipelined run,
//!   and certificate renewals spaced beyond the control plane's per-node limit.
//!
//! Build with `cargo build --release --locked --bins` and run `./target/release/runos-bench`
//! (`--quick` for a short run). Progress goes to stderr; the results are printed to stdout as
//! Markdown for `docs/benchmarks.md`.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use runos_controlplane::{Api, Error as CpError, SendRequest, ServeOptions};
use runos_e2e::bench::{
    self, EchoFloor, Machine, fmt_count, fmt_dur, percentile, proc_cpu, proc_state,
    proc_status_field,
};
use runos_e2e::{Agent, describe};
use runos_protocol::Tag;
use serde_json::json;

/// The `[agent]` line that makes the agent journal every type with its syncs (the journaled
/// pipelined run). Override with `--journaled-config` for an agent that spells it otherwise.
const JOURNALED_CONFIG: &str = "journal_sync = \"always\"";

/// The control plane's in-flight window for the bench: its maximum, so that it does not bound
/// the pipelined runs.
const MAX_IN_FLIGHT: u32 = runos_controlplane::server::MAX_MAX_IN_FLIGHT;

/// The agent's queue for the bench (`[agent] queue_capacity`): at least the in-flight window,
/// so that a window's worth of instructions arriving at once is queued, not refused `busy`.
const AGENT_QUEUE: u32 = MAX_IN_FLIGHT;

/// The control plane's shortest time between two certificates of one node
/// (`RENEW_NODE_INTERVAL` in `controlplane/src/l2.rs`). A renewal sooner is answered `busy` and
/// the agent asks again 2 s later, which would be measured instead of the renewal.
const RENEW_NODE_INTERVAL: Duration = Duration::from_secs(2);

/// Margin past [`RENEW_NODE_INTERVAL`]: certificate times have a resolution of one second.
const RENEW_MARGIN: Duration = Duration::from_secs(1);

/// The heartbeat interval the control plane advertises (its default).
const HEARTBEAT: Duration = Duration::from_secs(15);

/// Longest wait for a connection, a reconnect, a stop.
const WAIT: Duration = Duration::from_secs(30);

/// A longer enqueue than this (the agent stopped meanwhile) risks the control plane's write
/// timeout (30 s) on a full socket: warn.
const ENQUEUE_WARN: Duration = Duration::from_secs(20);

/// How long the agent settles after work before idle readings.
const SETTLE: Duration = Duration::from_secs(5);

/// How many of each measurement.
struct Sizes {
    echo_rtt: usize,
    echo_pipelined: usize,
    spawns: usize,
    status_rtt: usize,
    cmd_rtt: usize,
    pipelined_nosync: usize,
    pipelined_journaled: usize,
    idle: Duration,
    renewals: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                echo_rtt: 2000,
                echo_pipelined: 50_000,
                spawns: 200,
                status_rtt: 500,
                cmd_rtt: 200,
                pipelined_nosync: 20_000,
                pipelined_journaled: 10_000,
                idle: Duration::from_secs(20),
                renewals: 3,
            }
        } else {
            Sizes {
                echo_rtt: 5000,
                echo_pipelined: 200_000,
                spawns: 500,
                status_rtt: 2000,
                cmd_rtt: 500,
                pipelined_nosync: 100_000,
                pipelined_journaled: 20_000,
                idle: Duration::from_secs(60),
                renewals: 10,
            }
        }
    }
}

struct Args {
    quick: bool,
    floors_only: bool,
    overlay_only: bool,
    journaled: String,
}

const USAGE: &str = "usage: runos-bench [--quick] [--floors-only] [--journaled-config TOML-LINE]\n\
    --quick                      a shorter run (smaller counts, 20 s idle window)\n\
    --floors-only                measure and print only the floors (TLS echo, spawn)\n\
    --overlay-only               measure and print only the overlay (1000-peer SET_VPN_PEERS; root, wireguard-go)\n\
    --journaled-config LINE      the [agent] line for the journaled run (default: journal_sync = \"always\")";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        quick: false,
        floors_only: false,
        overlay_only: false,
        journaled: JOURNALED_CONFIG.into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--floors-only" => args.floors_only = true,
            "--overlay-only" => args.overlay_only = true,
            "--journaled-config" => {
                args.journaled = it
                    .next()
                    .ok_or("--journaled-config needs a value (one TOML line)")?;
                if args.journaled.contains('\n') {
                    return Err("--journaled-config takes one TOML line".into());
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                return Err(format!(
                    "unknown argument {:?}\n{USAGE}",
                    other.chars().take(64).collect::<String>()
                ));
            }
        }
    }
    Ok(args)
}

/// The floors, measured before the control plane and the agent exist.
struct Floors {
    echo: EchoFloor,
    spawn_abs: Vec<Duration>,
    spawn_bare: Vec<Duration>,
    /// Append + `fdatasync` of a journal-sized record in the temporary directory the stack's
    /// state directories are made in.
    fdatasync: Vec<Duration>,
}

fn floors(s: &Sizes) -> Result<Floors, String> {
    let frame = bench::status_frame()?;
    progress(&format!(
        "floor: TLS 1.3 echo of {}-byte frames",
        frame.len()
    ));
    let echo = bench::tls_echo(&frame, s.echo_rtt, s.echo_pipelined)?;
    progress("floor: spawning /bin/true and true");
    let spawn_abs = bench::spawn_floor("/bin/true", s.spawns)?;
    let spawn_bare = bench::spawn_floor("true", s.spawns)?;
    progress("floor: append + fdatasync");
    let dir = std::env::temp_dir();
    let fdatasync = bench::fdatasync_floor(&dir, s.spawns)?;
    Ok(Floors {
        echo,
        spawn_abs,
        spawn_bare,
        fdatasync,
    })
}

fn progress(what: &str) {
    eprintln!("runos-bench: {what}");
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("runos-bench: {e}");
            std::process::exit(2);
        }
    };
    let sizes = Sizes::new(args.quick);
    let machine = Machine::read();
    // The floors first, on their own threads, while nothing else runs.
    let floors = match floors(&sizes) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("runos-bench: {e}");
            std::process::exit(1);
        }
    };
    if args.floors_only {
        print_machine(&args, &machine);
        print_floors(&floors);
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runos-bench: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if !args.overlay_only {
        match rt.block_on(run(&args, &sizes)) {
            Ok(stack) => report(&args, &sizes, &machine, &floors, &stack),
            Err(e) => {
                eprintln!("runos-bench: {e}");
                std::process::exit(1);
            }
        }
    } else {
        print_machine(&args, &machine);
    }
    overlay(&rt, args.quick);
}

/// `x` as a fraction of `full` ("1/7.6": 7.6 times cheaper).
fn cheaper(x: Duration, full: Duration) -> String {
    if x.is_zero() {
        return "-".into();
    }
    format!("1/{:.1}", full.as_secs_f64() / x.as_secs_f64())
}

/// The overlay table (root and wireguard-go only; a note otherwise).
fn overlay(rt: &tokio::runtime::Runtime, quick: bool) {
    let wg_go = std::process::Command::new("sh")
        .args(["-c", "command -v wireguard-go >/dev/null"])
        .status()
        .is_ok_and(|s| s.success());
    if !rustix::process::geteuid().is_root() || !wg_go {
        println!(
            "Overlay: not measured (needs root and wireguard-go; the test command installs it).\n"
        );
        return;
    }
    progress("overlay: SET_VPN_PEERS with 1000 peers on wireguard-go");
    let rounds = if quick { 5 } else { 20 };
    match rt.block_on(runos_e2e::overlay_bench::run(1000, rounds)) {
        Err(e) => {
            eprintln!("runos-bench: overlay: {e}");
            std::process::exit(1);
        }
        Ok(o) => {
            let p50 = |v: &[Duration]| percentile(v, 0.5);
            println!(
                "| `SET_VPN_PEERS` on wireguard-go, {} peers | samples | p50 | ratio to the full apply |",
                o.peers
            );
            println!("|---|---:|---:|---:|");
            println!(
                "| create the interface (start wireguard-go), empty set | 1 | {} | |",
                fmt_dur(o.create)
            );
            println!(
                "| apply the whole set to an empty device | 1 | {} | 1 |",
                fmt_dur(o.full)
            );
            println!(
                "| re-apply it as a new generation, nothing differs | {} | {} | {} |",
                o.noop.len(),
                fmt_dur(p50(&o.noop)),
                cheaper(p50(&o.noop), o.full)
            );
            println!(
                "| a new generation with one peer's endpoint moved | {} | {} | {} |",
                o.one.len(),
                fmt_dur(p50(&o.one)),
                cheaper(p50(&o.one), o.full)
            );
            println!();
        }
    }
}

fn request(node: &str, kind: &str, payload: serde_json::Value) -> SendRequest {
    SendRequest {
        node: node.to_string(),
        kind: kind.to_string(),
        payload: Some(payload),
        raw_b64: None,
        timeout_ms: None,
    }
}

/// Round trips of `req`, one at a time after 50 of warm-up: from the operator API's `send` (which
/// stores the instruction) to the final reply stored. Sorted.
async fn latency(api: &Api, req: &SendRequest, n: usize) -> Result<Vec<Duration>, String> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..50 + n {
        let t = Instant::now();
        let r = api
            .send_and_wait(req, WAIT)
            .await
            .map_err(|e| format!("{} round trip: {e}", req.kind))?;
        if i >= 50 {
            samples.push(t.elapsed());
        }
        if r.is_error() {
            return Err(format!("{} failed: {}", req.kind, r.payload));
        }
    }
    samples.sort_unstable();
    Ok(samples)
}

/// Store every instruction in one transaction (`Api::send_many`).
fn enqueue(api: &Api, reqs: &[SendRequest]) -> Result<Vec<Tag>, CpError> {
    api.send_many(reqs)
}

/// Instructions of `node` without a stored final reply.
fn pending(api: &Api, node: &str) -> Result<u32, String> {
    api.nodes()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|n| n.id == node)
        .map(|n| n.pending)
        .ok_or_else(|| "the node is gone from the control plane".to_string())
}

/// One pipelined run.
struct Pipelined {
    n: usize,
    enqueue: Duration,
    took: Duration,
    agent_cpu: Duration,
    bench_cpu: Duration,
    busy: usize,
    reconnects: usize,
}

impl Pipelined {
    fn per_s(&self) -> f64 {
        self.n as f64 / self.took.as_secs_f64()
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) -> Result<(), String> {
    let p = rustix::process::Pid::from_raw(pid as i32).ok_or("no agent process")?;
    rustix::process::kill_process(p, sig).map_err(|e| format!("signal {sig:?} to the agent: {e}"))
}

/// Count the agent's `busy` answers in its log so far (a full queue or journal: the control
/// plane resends them a second later, which the figures would include).
fn busy_answers(agent: &Agent) -> usize {
    agent.log().matches("answered busy").count()
}

/// Count the agent's sessions so far (`connected to` in its log).
fn sessions(agent: &Agent) -> usize {
    agent.log().matches("connected to").count()
}

/// `n` `GET_NODE_STATUS` for one node: the agent stopped (SIGSTOP), all `n` stored through the
/// operator API, the agent continued (SIGCONT) and the clock started; stopped when the last
/// final reply is stored. Every reply is then checked.
async fn pipelined(api: &Api, agent: &Agent, node: &str, n: usize) -> Result<Pipelined, String> {
    let pid = agent.pid();
    let reqs = vec![request(node, "GET_NODE_STATUS", json!({})); n];
    let (busy0, sessions0) = (busy_answers(agent), sessions(agent));
    signal(pid, rustix::process::Signal::STOP)?;
    let end = Instant::now() + WAIT;
    while proc_state(pid) != Some('T') {
        if Instant::now() > end {
            let _ = signal(pid, rustix::process::Signal::CONT);
            return Err("the agent did not stop on SIGSTOP".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let api2 = api.clone();
    let stored = tokio::task::spawn_blocking(move || enqueue(&api2, &reqs)).await;
    let enqueue_took = t.elapsed();
    let (agent_cpu0, bench_cpu0) = (proc_cpu(pid), proc_cpu(std::process::id()));
    signal(pid, rustix::process::Signal::CONT)?;
    let t0 = Instant::now();
    let tags = stored
        .map_err(|e| format!("enqueue: {e}"))?
        .map_err(|e| format!("enqueue: {e}"))?;
    if enqueue_took > ENQUEUE_WARN {
        progress(&format!(
            "warning: the enqueue took {enqueue_took:?} with the agent stopped"
        ));
    }
    let last = tags.last().ok_or("nothing to send")?;
    // Every wait bounded: at least 200 instructions/s, plus a minute.
    let deadline = t0 + WAIT * 2 + Duration::from_millis(5) * n as u32;
    let tick = Duration::from_millis(1);
    // The last one stored is (nearly always) the last one sent: wait for it (woken by its
    // store, no polling), then count what is left.
    let _ = api
        .wait_reply(last, deadline.saturating_duration_since(Instant::now()))
        .await;
    while pending(api, node)? > 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "pipelined run: not finished after {:?} ({} of {n} unanswered)",
                t0.elapsed(),
                pending(api, node)?
            ));
        }
        tokio::time::sleep(tick).await;
    }
    let took = t0.elapsed();
    let agent_cpu = proc_cpu(pid)
        .zip(agent_cpu0)
        .map_or(Duration::ZERO, |(b, a)| b.saturating_sub(a));
    let bench_cpu = proc_cpu(std::process::id())
        .zip(bench_cpu0)
        .map_or(Duration::ZERO, |(b, a)| b.saturating_sub(a));
    let api2 = api.clone();
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        for tag in &tags {
            match api2.reply(tag) {
                Ok(Some(r)) if !r.is_error() => {}
                Ok(Some(r)) => return Err(format!("pipelined instruction failed: {}", r.payload)),
                Ok(None) => return Err(format!("no reply stored for {tag}")),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(Pipelined {
        n,
        enqueue: enqueue_took,
        took,
        agent_cpu,
        bench_cpu,
        busy: busy_answers(agent).saturating_sub(busy0),
        reconnects: sessions(agent).saturating_sub(sessions0),
    })
}

/// Wake-ups of the idle agent over `window`, counted every second.
struct Idle {
    window: Duration,
    wakeups: u64,
    threads: u64,
}

async fn idle_wakeups(pid: u32, window: Duration) -> Result<Idle, String> {
    let mut wakeups = 0;
    let mut before = bench::run_counts(pid)?;
    let start = Instant::now();
    let mut next = start;
    while next < start + window {
        next = (next + Duration::from_secs(1)).min(start + window);
        tokio::time::sleep_until(next.into()).await;
        let now = bench::run_counts(pid)?;
        wakeups += bench::wakeups_between(&before, &now);
        before = now;
    }
    Ok(Idle {
        window,
        wakeups,
        threads: proc_status_field(pid, "Threads:").unwrap_or(0),
    })
}

/// The heartbeat interval the agent reported when it connected (`heartbeat_ms=` in its log).
fn heartbeat_from_log(agent: &Agent) -> Option<Duration> {
    let log = agent.log();
    let at = log.rfind("heartbeat_ms=")? + "heartbeat_ms=".len();
    let digits: String = log[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().map(Duration::from_millis)
}

/// Renewals on demand (`runos certificate renew`, through the running agent), each at least
/// [`RENEW_NODE_INTERVAL`] + [`RENEW_MARGIN`] after the node's previous certificate, while one
/// `GET_NODE_STATUS` after another runs: how long a renewal takes (RENEW, staging, the probe
/// session, promotion, answered), and the slowest instruction round trip around the switch
/// (which includes the reconnect). The control plane's other limit, one renewal per session
/// every 5 s, does not apply: each renewal ends with a reconnect on the new certificate.
async fn renewals(
    api: &Api,
    agent: &Agent,
    node: &str,
    n: usize,
    mut last_cert: Instant,
) -> Result<(Vec<Duration>, Duration), String> {
    let req = request(node, "GET_NODE_STATUS", json!({}));
    let mut took = Vec::with_capacity(n);
    let mut worst = Duration::ZERO;
    for _ in 0..n {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let api2 = api.clone();
        let req2 = req.clone();
        let load = tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let r = api2.send_and_wait(&req2, Duration::from_secs(60)).await;
                if !matches!(&r, Ok(r) if !r.is_error()) {
                    return Err(format!("an instruction failed during a renewal: {r:?}"));
                }
                worst = worst.max(t.elapsed());
            }
            Ok(worst)
        });
        let at = last_cert + RENEW_NODE_INTERVAL + RENEW_MARGIN;
        tokio::time::sleep_until(at.max(Instant::now() + Duration::from_millis(200)).into()).await;
        let t = Instant::now();
        let out =
            tokio::task::block_in_place(|| agent.cli(&["certificate", "renew", "--json"], ""));
        took.push(t.elapsed());
        last_cert = Instant::now();
        if !out.status.success() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(format!("certificate renew failed: {}", describe(&out)));
        }
        // Let the load run past the reconnect, then stop it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let load = tokio::time::timeout(Duration::from_secs(90), load)
            .await
            .map_err(|_| "the load during a renewal did not finish".to_string())?;
        worst = worst.max(load.map_err(|e| e.to_string())??);
    }
    took.sort_unstable();
    Ok((took, worst))
}

/// Wait until `node` is online (`true`) or offline (`false`), the agent still running.
async fn wait_online(api: &Api, agent: &mut Agent, node: &str, online: bool) -> Result<(), String> {
    let end = Instant::now() + WAIT;
    while api.is_online(node) != online {
        if online && !agent.is_running() {
            return Err(format!(
                "the agent exited before connecting; its log:\n{}",
                tail(&agent.log(), 40)
            ));
        }
        if Instant::now() > end {
            return Err(format!(
                "the agent did not {} within {WAIT:?}; its log:\n{}",
                if online { "connect" } else { "disconnect" },
                tail(&agent.log(), 40)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stop the agent, write `config`, start it again and wait until it is connected.
async fn restart(agent: &mut Agent, api: &Api, node: &str, config: &str) -> Result<(), String> {
    tokio::task::block_in_place(|| agent.stop());
    // The old session must be gone first, or it would count as the new one.
    wait_online(api, agent, node, false).await?;
    std::fs::write(&agent.config, config).map_err(|e| format!("agent config: {e}"))?;
    agent.start();
    wait_online(api, agent, node, true).await
}

/// VmRSS and VmHWM in KiB.
fn memory(pid: u32) -> Result<(u64, u64), String> {
    proc_status_field(pid, "VmRSS:")
        .zip(proc_status_field(pid, "VmHWM:"))
        .ok_or_else(|| "cannot read the agent's /proc status".to_string())
}

/// Everything measured on the stack.
struct Stack {
    status: Vec<Duration>,
    cmd_bare: Vec<Duration>,
    cmd_abs: Vec<Duration>,
    nosync: Pipelined,
    journaled: Pipelined,
    fresh: (u64, u64),
    after_run: (u64, u64),
    after_idle: (u64, u64),
    idle: Idle,
    heartbeat: Option<Duration>,
    renew_took: Vec<Duration>,
    renew_worst: Duration,
}

async fn run(args: &Args, s: &Sizes) -> Result<Stack, String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut opts = ServeOptions::ephemeral(tmp.path().join("cp"));
    opts.heartbeat_interval = HEARTBEAT;
    opts.max_in_flight = MAX_IN_FLIGHT;
    let server = runos_controlplane::serve(opts)
        .await
        .map_err(|e| format!("control plane: {e}"))?;
    let api = server.api();

    let mut agent = Agent::for_ports(
        &tmp.path().join("node"),
        server.l1_addr().port(),
        server.l2_addr().port(),
        &format!("queue_capacity = {AGENT_QUEUE}"),
    );
    // The bench measures, it does not debug: keep the agent's logging at its default level.
    let base = std::fs::read_to_string(&agent.config)
        .map_err(|e| e.to_string())?
        .replace("level = \"debug\"", "level = \"info\"");
    std::fs::write(&agent.config, &base).map_err(|e| e.to_string())?;
    let token = api
        .create_token(Duration::from_secs(600))
        .map_err(|e| e.to_string())?;
    let ca_file = server.data_dir().join("ca.pem");
    let out = tokio::task::block_in_place(|| {
        agent.register_ca(&ca_file, &token.token, &server.ca_sha256())
    });
    if !out.status.success() {
        return Err(format!("register failed: {}", describe(&out)));
    }
    let registered = Instant::now();
    let node = agent.node_id.clone().ok_or("register printed no node id")?;
    agent.start();
    wait_online(&api, &mut agent, &node, true).await?;

    progress("fresh agent: memory");
    tokio::time::sleep(SETTLE).await;
    let fresh = memory(agent.pid())?;

    progress("round trips, one at a time");
    let status = latency(
        &api,
        &request(&node, "GET_NODE_STATUS", json!({})),
        s.status_rtt,
    )
    .await?;
    let cmd_bare = latency(
        &api,
        &request(&node, "RUN_COMMAND", json!({"argv": ["true"]})),
        s.cmd_rtt,
    )
    .await?;
    let cmd_abs = latency(
        &api,
        &request(&node, "RUN_COMMAND", json!({"argv": ["/bin/true"]})),
        s.cmd_rtt,
    )
    .await?;

    progress(&format!(
        "pipelined: {} GET_NODE_STATUS, default configuration",
        s.pipelined_nosync
    ));
    let nosync = pipelined(&api, &agent, &node, s.pipelined_nosync).await?;
    let after_run = memory(agent.pid())?;

    progress(&format!("idle: {} s of wake-ups", s.idle.as_secs()));
    tokio::time::sleep(SETTLE).await;
    let idle = idle_wakeups(agent.pid(), s.idle).await?;
    let after_idle = memory(agent.pid())?;
    let heartbeat = heartbeat_from_log(&agent);

    progress("renewals");
    let (renew_took, renew_worst) = renewals(&api, &agent, &node, s.renewals, registered).await?;

    progress(&format!(
        "pipelined: {} GET_NODE_STATUS journaled ({})",
        s.pipelined_journaled, args.journaled
    ));
    restart(
        &mut agent,
        &api,
        &node,
        &format!("{base}{}\n", args.journaled),
    )
    .await
    .map_err(|e| {
        format!(
            "{e}\n(the journaled run adds `{}` to [agent]; for an agent that spells it otherwise, \
             pass --journaled-config)",
            args.journaled
        )
    })?;
    let journaled = pipelined(&api, &agent, &node, s.pipelined_journaled).await?;

    tokio::task::block_in_place(|| agent.stop());
    server.shutdown().await;
    Ok(Stack {
        status,
        cmd_bare,
        cmd_abs,
        nosync,
        journaled,
        fresh,
        after_run,
        after_idle,
        idle,
        heartbeat,
        renew_took,
        renew_worst,
    })
}

fn ratio(x: Duration, floor: Duration) -> String {
    if floor.is_zero() {
        return "—".into();
    }
    format!("{:.1}×", x.as_secs_f64() / floor.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn report(args: &Args, s: &Sizes, m: &Machine, f: &Floors, st: &Stack) {
    let echo_p50 = percentile(&f.echo.rtt, 0.5);
    let spawn_p50 = percentile(&f.spawn_abs, 0.5);
    let p = |v: &[Duration]| (fmt_dur(percentile(v, 0.5)), fmt_dur(percentile(v, 0.99)));

    print_machine(args, m);
    print_floors(f);

    println!("| round trip, one at a time | samples | p50 | p99 | floor (p50) | ratio | goal |");
    println!("|---|---:|---:|---:|---|---:|---:|");
    let (a, b) = p(&st.status);
    println!(
        "| `GET_NODE_STATUS` | {} | {a} | {b} | echo {} | {} | ≤ 3× |",
        st.status.len(),
        fmt_dur(echo_p50),
        ratio(percentile(&st.status, 0.5), echo_p50)
    );
    for (name, v) in [
        ("`RUN_COMMAND [\"true\"]`", &st.cmd_bare),
        ("`RUN_COMMAND [\"/bin/true\"]`", &st.cmd_abs),
    ] {
        let (a, b) = p(v);
        println!(
            "| {name} | {} | {a} | {b} | spawn {} + echo {} | {} | ≤ 1.5× |",
            v.len(),
            fmt_dur(spawn_p50),
            fmt_dur(echo_p50),
            ratio(percentile(v, 0.5), spawn_p50 + echo_p50)
        );
    }
    // What the guarantee itself costs: a command that is not safe to re-run has its `started`
    // record durable before the spawn and its `finished` record durable before the reply, two
    // syncs in series that no batching can overlap for one instruction at a time.
    let sync_p50 = percentile(&f.fdatasync, 0.5);
    let (a, b) = p(&st.cmd_abs);
    println!(
        "| `RUN_COMMAND [\"/bin/true\"]` against its durable floor | {} | {a} | {b} | spawn {} + echo {} + 2 × fdatasync {} | {} | |",
        st.cmd_abs.len(),
        fmt_dur(spawn_p50),
        fmt_dur(echo_p50),
        fmt_dur(sync_p50),
        ratio(
            percentile(&st.cmd_abs, 0.5),
            spawn_p50 + echo_p50 + 2 * sync_p50
        )
    );
    println!();

    println!(
        "| pipelined `GET_NODE_STATUS`, one node | instructions | enqueue (not timed) | run | instructions/s | floor: echo frames/s | agent CPU / instruction | bench process CPU / instruction | goal |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, r, goal) in [
        (
            "default configuration (no sync for a type safe to re-run)".to_string(),
            &st.nosync,
            "≥ 100 000/s",
        ),
        (
            format!("journaled: `{}`", args.journaled),
            &st.journaled,
            "≥ 20 000/s",
        ),
    ] {
        let per = |d: Duration| fmt_dur(d / u32::try_from(r.n).unwrap_or(u32::MAX).max(1));
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {goal} |",
            fmt_count(r.n as f64),
            fmt_dur(r.enqueue),
            fmt_dur(r.took),
            fmt_count(r.per_s()),
            fmt_count(f.echo.frames_per_s),
            per(r.agent_cpu),
            per(r.bench_cpu),
        );
    }
    for r in [&st.nosync, &st.journaled] {
        if r.busy > 0 {
            println!();
            println!(
                "Note: the agent answered `busy` in the run of {} ({}×; resent a second later): \
                 that run's figure includes the wait.",
                fmt_count(r.n as f64),
                r.busy
            );
        }
        if r.reconnects > 0 {
            println!();
            println!(
                "Note: the agent reconnected during the run of {} ({}×; the session ended while \
                 it was stopped for an enqueue of {}?): that run's figure includes the \
                 reconnect and the resend.",
                fmt_count(r.n as f64),
                r.reconnects,
                fmt_dur(r.enqueue)
            );
        }
    }
    println!();

    let hb = st.heartbeat.unwrap_or(HEARTBEAT);
    let per_min = |n: f64, w: Duration| n * 60.0 / w.as_secs_f64();
    println!("| measurement | value | goal |");
    println!("|---|---:|---:|");
    println!(
        "| idle agent wake-ups per minute (timeslices of all its threads, {} s window, {} threads) | {:.1} | heartbeat: {:.0}/min |",
        st.idle.window.as_secs(),
        st.idle.threads,
        per_min(st.idle.wakeups as f64, st.idle.window),
        60.0 / hb.as_secs_f64()
    );
    println!(
        "| heartbeat interval ({}) | {} s | |",
        if st.heartbeat.is_some() {
            "from the agent's log"
        } else {
            "advertised; not found in the agent's log"
        },
        hb.as_secs_f64()
    );
    println!(
        "| agent RSS, fresh (connected, nothing run): VmRSS / VmHWM | {} / {} | |",
        mib(st.fresh.0),
        mib(st.fresh.1)
    );
    println!(
        "| agent RSS right after the {}-instruction run: VmRSS / VmHWM | {} / {} | ≤ 16 MiB |",
        fmt_count(s.pipelined_nosync as f64),
        mib(st.after_run.0),
        mib(st.after_run.1)
    );
    println!(
        "| agent RSS after the idle window: VmRSS / VmHWM | {} / {} | ≤ 16 MiB |",
        mib(st.after_idle.0),
        mib(st.after_idle.1)
    );
    println!(
        "| `runos certificate renew` through the agent ({} renewals, {} s apart or more): p50 / max | {} / {} | |",
        st.renew_took.len(),
        (RENEW_NODE_INTERVAL + RENEW_MARGIN).as_secs(),
        fmt_dur(percentile(&st.renew_took, 0.5)),
        fmt_dur(percentile(&st.renew_took, 1.0))
    );
    println!(
        "| slowest `GET_NODE_STATUS` round trip while renewing (includes the reconnect) | {} | |",
        fmt_dur(st.renew_worst)
    );
    if percentile(&st.renew_took, 1.0) >= RENEW_NODE_INTERVAL {
        println!();
        println!(
            "Note: a renewal took {} or more: the control plane probably answered `busy` and the \
             agent asked again (2 s later).",
            fmt_dur(RENEW_NODE_INTERVAL)
        );
    }
}

fn print_machine(args: &Args, m: &Machine) {
    println!(
        "{}, {} build, {} ({} cores), {} MiB, Linux {}; the control plane in-process and the \
         agent on the same machine, loopback. Control plane: `--max-in-flight {MAX_IN_FLIGHT}`, \
         heartbeat {} s; agent: default configuration plus `queue_capacity = {AGENT_QUEUE}`, \
         logging at `info`.{}",
        m.date,
        m.profile,
        m.cpu,
        m.cores,
        m.mem_mib,
        m.kernel,
        HEARTBEAT.as_secs(),
        if args.quick { " `--quick`." } else { "" }
    );
    println!();
}

fn print_floors(f: &Floors) {
    let p = |v: &[Duration]| (fmt_dur(percentile(v, 0.5)), fmt_dur(percentile(v, 0.99)));
    println!("| floor | samples | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    let (a, b) = p(&f.echo.rtt);
    println!(
        "| TLS 1.3 echo round trip, {}-byte frames (`GET_NODE_STATUS` instruction size) | {} | {a} | {b} |",
        f.echo.frame_bytes,
        f.echo.rtt.len()
    );
    let (a, b) = p(&f.spawn_abs);
    println!(
        "| spawn `/bin/true` like the agent (own process group, pipes read to EOF, waited) | {} | {a} | {b} |",
        f.spawn_abs.len()
    );
    let (a, b) = p(&f.spawn_bare);
    println!(
        "| spawn `true` looked up in the command's `PATH` (a forked child) | {} | {a} | {b} |",
        f.spawn_bare.len()
    );
    let (a, b) = p(&f.fdatasync);
    println!(
        "| append a {}-byte record and `fdatasync` it (the journal's durability step) in `{}` | {} | {a} | {b} |",
        bench::SYNC_RECORD_BYTES,
        std::env::temp_dir().display(),
        f.fdatasync.len()
    );
    println!(
        "| TLS 1.3 echo pipelined, {} frames | | {} frames/s | |",
        fmt_count(f.echo.pipelined_frames as f64),
        fmt_count(f.echo.frames_per_s)
    );
    println!();
}
