//! `runos-bench`: the benchmark of the spine over the real stack on loopback.
//!
//! It runs the reference control plane in-process (its operator API, no CLI round trips), and the
//! real `runos` agent binary from the same target directory as a child process, registered with
//! a real token over L1Sec and connected over mutual TLS 1.3 on L2Sec. It measures:
//!
//! - round-trip latency (p50, p99, max) of `GET_NODE_STATUS` and of `RUN_COMMAND ["true"]`, one
//!   at a time: from the operator API's `send` (which stores the instruction in SQLite) to the
//!   final reply stored by the control plane;
//! - pipelined throughput: N instructions sent back to back on the one stream, then waited for;
//! - both of the above twice: with the journal synced (the default), then with
//!   `[agent] journal_fsync = false` (the agent restarted with the edited config), side by side;
//! - the idle agent's resident memory (VmRSS and VmHWM from `/proc/<pid>/status`).
//!
//! Build with `cargo build --release --locked --bins` and run `./target/release/runos-bench`
//! (`--quick` for a short run). Results are printed as Markdown for `docs/benchmarks.md`.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use runos_controlplane::{Api, SendRequest, ServeOptions};
use runos_e2e::{Agent, describe};
use serde_json::json;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
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
    if let Err(e) = rt.block_on(run(quick)) {
        eprintln!("runos-bench: {e}");
        std::process::exit(1);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn latency(
    api: &Api,
    node: &str,
    kind: &str,
    payload: serde_json::Value,
    n: usize,
) -> Result<Vec<Duration>, String> {
    let req = SendRequest {
        node: node.to_string(),
        kind: kind.to_string(),
        payload: Some(payload),
        raw_b64: None,
        timeout_ms: None,
    };
    // Warm up.
    for _ in 0..10 {
        api.send_and_wait(&req, Duration::from_secs(30))
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = api
            .send_and_wait(&req, Duration::from_secs(30))
            .await
            .map_err(|e| e.to_string())?;
        samples.push(t.elapsed());
        if r.is_error() {
            return Err(format!("{kind} failed: {:?}", r.payload));
        }
    }
    samples.sort_unstable();
    Ok(samples)
}

async fn throughput(api: &Api, node: &str, n: usize) -> Result<f64, String> {
    let req = SendRequest {
        node: node.to_string(),
        kind: "GET_NODE_STATUS".into(),
        payload: Some(json!({})),
        raw_b64: None,
        timeout_ms: None,
    };
    let t = Instant::now();
    let mut tags = Vec::with_capacity(n);
    for _ in 0..n {
        tags.push(api.send(&req).map_err(|e| e.to_string())?);
    }
    for tag in &tags {
        let r = api
            .wait_reply(tag, Duration::from_secs(120))
            .await
            .map_err(|e| e.to_string())?;
        if r.is_error() {
            return Err(format!("pipelined instruction failed: {:?}", r.payload));
        }
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// One set of measurements on the running agent.
struct Figures {
    status: Vec<Duration>,
    cmd: Vec<Duration>,
    throughput: f64,
}

async fn measure(
    api: &Api,
    node: &str,
    n_lat: usize,
    n_cmd: usize,
    n_tp: usize,
) -> Result<Figures, String> {
    Ok(Figures {
        status: latency(api, node, "GET_NODE_STATUS", json!({}), n_lat).await?,
        cmd: latency(api, node, "RUN_COMMAND", json!({"argv": ["true"]}), n_cmd).await?,
        throughput: throughput(api, node, n_tp).await?,
    })
}

/// Renewals on demand (`runos certificate renew`, through the running agent) while one
/// `GET_NODE_STATUS` after another runs: how long a renewal takes (RENEW, staging, the probe
/// session, promotion, answered), and the slowest instruction round trip around the switch
/// (which includes the reconnect).
async fn renewals(
    api: &Api,
    agent: &Agent,
    node: &str,
    n: usize,
) -> Result<(Vec<Duration>, Duration), String> {
    let req = SendRequest {
        node: node.to_string(),
        kind: "GET_NODE_STATUS".into(),
        payload: Some(json!({})),
        raw_b64: None,
        timeout_ms: None,
    };
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
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        let out =
            tokio::task::block_in_place(|| agent.cli(&["certificate", "renew", "--json"], ""));
        if !out.status.success() {
            return Err(format!("certificate renew failed: {}", describe(&out)));
        }
        took.push(t.elapsed());
        // Let the load run past the reconnect, then stop it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        worst = worst.max(load.await.map_err(|e| e.to_string())??);
        // The control plane accepts one renewal per session every 5 s; each renewal starts a new
        // session, so no wait is needed.
    }
    took.sort_unstable();
    Ok((took, worst))
}

/// Stop the agent (if running), start it again (it reads its config anew) and wait until it is
/// connected.
async fn restart(agent: &mut Agent, api: &Api, node: &str) -> Result<(), String> {
    tokio::task::block_in_place(|| agent.stop());
    // The old session must be gone first, or it would count as the new one.
    let end = Instant::now() + Duration::from_secs(30);
    while api.is_online(node) {
        if Instant::now() > end {
            return Err("the stopped agent's session did not end".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.start();
    while !api.is_online(node) {
        if Instant::now() > end {
            return Err(format!("agent did not reconnect:\n{}", agent.log()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn run(quick: bool) -> Result<(), String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut opts = ServeOptions::ephemeral(tmp.path().join("cp"));
    opts.heartbeat_interval = Duration::from_secs(15);
    let server = runos_controlplane::serve(opts)
        .await
        .map_err(|e| format!("control plane: {e}"))?;
    let api = server.api();

    let mut agent = Agent::for_ports(
        &tmp.path().join("node"),
        server.l1_addr().port(),
        server.l2_addr().port(),
        "",
    );
    // The bench measures, it does not debug: keep the agent's logging at its default level.
    let cfg = std::fs::read_to_string(&agent.config).map_err(|e| e.to_string())?;
    std::fs::write(
        &agent.config,
        cfg.replace("level = \"debug\"", "level = \"info\""),
    )
    .map_err(|e| e.to_string())?;
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
    let node = agent.node_id.clone().ok_or("register printed no node id")?;
    agent.start();
    let end = Instant::now() + Duration::from_secs(30);
    while !api.is_online(&node) {
        if Instant::now() > end {
            return Err(format!("agent did not connect:\n{}", agent.log()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (n_lat, n_cmd, n_tp) = if quick {
        (200, 100, 500)
    } else {
        (2000, 500, 5000)
    };
    // With the journal synced (the default), then with `journal_fsync = false`.
    let synced = measure(&api, &node, n_lat, n_cmd, n_tp).await?;

    let (renew_took, renew_worst) =
        renewals(&api, &agent, &node, if quick { 3 } else { 10 }).await?;

    // Idle memory: let the agent settle after the load, then read its RSS.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss, hwm) = rss_kib(agent.pid()).ok_or("cannot read the agent's /proc status")?;

    let cfg = std::fs::read_to_string(&agent.config).map_err(|e| e.to_string())?;
    std::fs::write(&agent.config, format!("{cfg}journal_fsync = false\n"))
        .map_err(|e| e.to_string())?;
    restart(&mut agent, &api, &node).await?;
    let unsynced = measure(&api, &node, n_lat, n_cmd, n_tp).await?;

    // A fresh agent that never ran an instruction (empty journal, default settings): its idle
    // footprint.
    std::fs::write(&agent.config, cfg).map_err(|e| e.to_string())?;
    agent.stop();
    let state = agent.dir.join("state");
    for f in ["journal.log", "audit.jsonl", "audit.jsonl.1"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    restart(&mut agent, &api, &node).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (fresh_rss, _) = rss_kib(agent.pid()).ok_or("cannot read the agent's /proc status")?;
    agent.stop();
    server.shutdown().await;

    println!(
        "| measurement | samples | journal synced: p50 / p99 / max | journal_fsync = false: p50 / p99 / max |"
    );
    println!("|---|---:|---:|---:|");
    for (name, a, b) in [
        (
            "`GET_NODE_STATUS` round trip",
            &synced.status,
            &unsynced.status,
        ),
        (
            "`RUN_COMMAND [\"true\"]` round trip",
            &synced.cmd,
            &unsynced.cmd,
        ),
    ] {
        let cell = |s: &[Duration]| {
            format!(
                "{} / {} / {}",
                ms(percentile(s, 0.50)),
                ms(percentile(s, 0.99)),
                ms(percentile(s, 1.0))
            )
        };
        println!("| {name} | {} | {} | {} |", a.len(), cell(a), cell(b));
    }
    println!();
    println!("| measurement | journal synced | journal_fsync = false |");
    println!("|---|---:|---:|");
    println!(
        "| pipelined `GET_NODE_STATUS`, {n_tp} on one stream | {:.0} instructions/s | {:.0} instructions/s |",
        synced.throughput, unsynced.throughput
    );
    println!();
    println!("| measurement | value |");
    println!("|---|---:|");
    println!(
        "| idle agent RSS, fresh (connected, empty journal, no instruction run yet) | {} KiB |",
        fresh_rss
    );
    println!("| idle agent RSS after the synced runs above | {rss} KiB (peak {hwm} KiB) |");
    println!(
        "| `runos certificate renew` through the agent ({} renewals): p50 / max | {} / {} |",
        renew_took.len(),
        ms(percentile(&renew_took, 0.5)),
        ms(percentile(&renew_took, 1.0))
    );
    println!(
        "| slowest `GET_NODE_STATUS` round trip while renewing (includes the reconnect) | {} |",
        ms(renew_worst)
    );
    Ok(())
}
