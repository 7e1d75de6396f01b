//! Lanes: the fast lane never waits behind the shared pool; work on one exclusive resource never
//! overlaps; `node` excludes every other locked work.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dispatch::{Harness, catalog_with_sleeper, cfg, instr};
use runos_agent::catalog::{Catalog, ExecFn};
use runos_executors::{Lane, Resource};
use runos_protocol::control::types as ctypes;
use runos_protocol::instructions::types;
use runos_protocol::{Envelope, Tag};

#[tokio::test]
async fn node_status_is_answered_while_the_pool_is_full_of_sleeping_commands() {
    // Two pool slots, both busy for a minute, and two more queued behind them.
    let mut h = Harness::new(catalog_with_sleeper(), cfg(4, 2));
    for _ in 0..4 {
        h.send(instr(types::RUN_COMMAND, serde_json::json!({"ms": 60_000})))
            .await;
    }
    let status = instr(types::GET_NODE_STATUS, serde_json::json!({})).with_timeout_ms(Some(5_000));
    h.send(status.clone()).await;
    let r = h.reply().await;
    assert_eq!(r.tag, status.tag);
    assert!(r.is(types::NODE_STATUS), "{}", r.kind);
    // The commands still run or wait: none of them was answered.
    tokio::time::timeout(
        Duration::from_secs(10),
        h.link.in_flight.wait_for(|n| *n == 4),
    )
    .await
    .expect("four in flight")
    .unwrap();
}

/// One interval of a test executor's run.
#[derive(Debug, Clone)]
struct Run {
    kind: String,
    start: Instant,
    end: Instant,
}

/// A raw executor that records when it ran and sleeps 30 ms.
fn recorder(log: Arc<Mutex<Vec<Run>>>) -> ExecFn {
    Arc::new(move |ctx, env: Envelope| {
        let log = log.clone();
        Box::pin(async move {
            let start = Instant::now();
            tokio::time::sleep(Duration::from_millis(30)).await;
            log.lock().unwrap().push(Run {
                kind: env.kind.as_str().to_string(),
                start,
                end: Instant::now(),
            });
            Ok(Envelope::with_type(
                ctypes::NO_CONTENT,
                ctx.tag,
                &serde_json::json!({}),
            ))
        })
    })
}

fn overlap(a: &Run, b: &Run) -> bool {
    a.start < b.end && b.start < a.end
}

#[tokio::test]
async fn work_on_one_resource_never_overlaps_and_node_runs_alone() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut c = Catalog::new();
    let lanes = [
        (types::SET_VPN_PEERS, Lane::Exclusive(Resource::Wg0)),
        (types::UPDATE_DNSMASQ, Lane::Exclusive(Resource::Dnsmasq)),
        (types::UPGRADE_NODE_K8S, Lane::Exclusive(Resource::Node)),
        (types::RUN_COMMAND, Lane::Pool),
    ];
    for (kind, lane) in lanes {
        c.register_raw(
            kind,
            Duration::from_secs(30),
            Duration::from_secs(30),
            recorder(log.clone()),
        );
        c.set_lane(kind, lane);
    }
    // Enough pool slots that only the locks keep work apart.
    let mut h = Harness::new(c, cfg(64, 16));
    let order = [
        types::SET_VPN_PEERS,
        types::SET_VPN_PEERS,
        types::UPDATE_DNSMASQ,
        types::UPGRADE_NODE_K8S,
        types::SET_VPN_PEERS,
        types::RUN_COMMAND,
        types::UPDATE_DNSMASQ,
        types::UPGRADE_NODE_K8S,
        types::SET_VPN_PEERS,
        types::RUN_COMMAND,
    ];
    let mut tags: Vec<Tag> = Vec::new();
    for kind in order {
        let e = instr(kind, serde_json::json!({}));
        tags.push(e.tag);
        h.send(e).await;
    }
    for r in h.replies(order.len()).await {
        assert!(r.is(ctypes::NO_CONTENT), "{}", r.kind);
    }
    let runs = log.lock().unwrap().clone();
    assert_eq!(runs.len(), order.len());
    let locked = |r: &Run| r.kind != types::RUN_COMMAND;
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.kind == b.kind && locked(a) {
                assert!(!overlap(a, b), "two {} overlapped: {a:?} {b:?}", a.kind);
            }
            let node = a.kind == types::UPGRADE_NODE_K8S || b.kind == types::UPGRADE_NODE_K8S;
            if node && locked(a) && locked(b) {
                assert!(!overlap(a, b), "node work overlapped: {a:?} {b:?}");
            }
        }
    }
}
