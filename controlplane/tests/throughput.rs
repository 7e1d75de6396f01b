//! A measurement, not a test (ignored): the control plane's CPU per instruction and its rate,
//! with a scripted agent that answers every instruction at once over real TLS on loopback.
//!
//! ```sh
//! cargo test -p runos-controlplane --release --locked --test throughput -- --ignored --nocapture
//! ```
//!
//! `RUNOS_WINDOW=N` in the environment sets `--max-in-flight`.
//!
//! The control plane runs on its own runtime, whose threads are named `cp-rt`; the scripted
//! agent runs on another thread. The CPU figures are those of the `cp-rt` threads only
//! (`/proc/self/task/*/schedstat`), so they include storing the instructions (the sends run on
//! that runtime) but not the scripted agent.

mod common;

use std::time::{Duration, Instant};

use common::*;
use runos_controlplane::SendRequest;
use runos_protocol::Envelope;
use runos_protocol::control::types;

const CP_THREAD: &str = "cp-rt";

/// Nanoseconds of CPU used so far by the threads named [`CP_THREAD`].
fn cp_cpu_ns() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != CP_THREAD {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn request(node: &str) -> SendRequest {
    SendRequest {
        node: node.to_string(),
        kind: "GET_NODE_STATUS".into(),
        payload: None,
        raw_b64: None,
        timeout_ms: None,
    }
}

/// The scripted agent: answers every instruction with NO_CONTENT at once, coalescing its
/// writes, and stops after `acks` ACKs.
async fn answer(mut c: Conn, acks: usize) {
    let mut seen = 0;
    while seen < acks {
        let Ok(Some(env)) = c.reader.read().await else {
            panic!("session ended after {seen} ACKs");
        };
        let mut next = Some(env);
        while let Some(env) = next.take() {
            if env.is(types::ACK) {
                seen += 1;
            } else if !env.is(types::HEARTBEAT_REPLY) {
                c.writer
                    .push(&Envelope::with_type(
                        types::NO_CONTENT,
                        env.tag,
                        &serde_json::json!({}),
                    ))
                    .unwrap();
            }
            if c.reader.buffered() > 0 {
                next = c.reader.read().await.unwrap();
            }
        }
        c.writer.flush().await.unwrap();
    }
}

#[test]
#[ignore = "a measurement; run with --ignored --nocapture (release build)"]
fn instructions_per_second_and_cpu_per_instruction() {
    const PIPELINED: usize = 20_000;
    const ONE_AT_A_TIME: usize = 2_000;
    let cp_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .thread_name(CP_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let agent_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `RUNOS_WINDOW=N` sets `--max-in-flight` (default 128).
    let window: Option<u32> = std::env::var("RUNOS_WINDOW")
        .ok()
        .map(|w| w.parse().unwrap());
    let cp = cp_rt.block_on(start_with(|o| {
        if let Some(w) = window {
            o.max_in_flight = w;
        }
    }));
    let node = agent_rt.block_on(enrol(&cp));
    let api = cp.server.api();

    // Pipelined: store them all, then time from the session's start to the last ACK.
    let id = node.id.clone();
    let api2 = api.clone();
    let cpu0 = cp_cpu_ns();
    let t0 = Instant::now();
    cp_rt
        .block_on(cp_rt.spawn(async move {
            let reqs: Vec<SendRequest> = (0..PIPELINED).map(|_| request(&id)).collect();
            api2.send_many(&reqs).unwrap();
        }))
        .unwrap();
    let enqueue = t0.elapsed();
    let enqueue_cpu = cp_cpu_ns() - cpu0;
    let cpu1 = cp_cpu_ns();
    let t1 = Instant::now();
    let (c, _) = agent_rt.block_on(session(&cp, &node));
    agent_rt.block_on(answer(c, PIPELINED));
    let run = t1.elapsed();
    let run_cpu = cp_cpu_ns() - cpu1;
    let per = |ns: u64, n: usize| ns as f64 / n as f64 / 1000.0;
    println!(
        "pipelined {PIPELINED}: enqueue {:.0} ms ({:.1} µs CPU each); delivery {:.0} ms = {:.0}/s, \
         control plane CPU {:.1} µs per instruction",
        enqueue.as_secs_f64() * 1000.0,
        per(enqueue_cpu, PIPELINED),
        run.as_secs_f64() * 1000.0,
        PIPELINED as f64 / run.as_secs_f64(),
        per(run_cpu, PIPELINED),
    );

    // One at a time: send, wait for the reply through the Api, again. The scripted agent runs
    // on its own thread (its own runtime and connection).
    let id = node.id.clone();
    let (online_tx, online_rx) = std::sync::mpsc::channel();
    let (cpu, mut rtts) = std::thread::scope(|scope| {
        scope.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let (c, _) = session(&cp, &node).await;
                    online_tx.send(()).unwrap();
                    answer(c, ONE_AT_A_TIME).await;
                });
        });
        online_rx.recv().unwrap();
        let cpu2 = cp_cpu_ns();
        let rtts = cp_rt
            .block_on(cp_rt.spawn(async move {
                let mut rtts = Vec::with_capacity(ONE_AT_A_TIME);
                for _ in 0..ONE_AT_A_TIME {
                    let t = Instant::now();
                    api.send_and_wait(&request(&id), Duration::from_secs(10))
                        .await
                        .unwrap();
                    rtts.push(t.elapsed());
                }
                rtts
            }))
            .unwrap();
        (cp_cpu_ns() - cpu2, rtts)
    });
    rtts.sort();
    println!(
        "one at a time {ONE_AT_A_TIME}: p50 {:?}, p99 {:?}, control plane CPU {:.1} µs per \
         instruction",
        rtts[ONE_AT_A_TIME / 2],
        rtts[ONE_AT_A_TIME * 99 / 100],
        per(cpu, ONE_AT_A_TIME),
    );
    cp_rt.block_on(cp.server.shutdown());
}
