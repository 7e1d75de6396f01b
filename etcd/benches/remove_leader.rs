//! `REMOVE_ETCD_MEMBER` of the leader on a 4-member cluster (real etcd on loopback, TLS),
//! p50 of 5, each on a fresh cluster, timing only the removal; with its floor in the same run:
//! the bare etcd-client calls (move-leader at the leader, member remove through the new
//! leader, no checks) on an identical fresh cluster. Prints a markdown table.
//!
//! `cargo bench -p runos-etcd`. Needs /usr/bin/etcd (skips otherwise).

#[path = "../tests/common/mod.rs"]
#[allow(unused_macros, unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use runos_etcd::{RemoveOptions, Target};

const RUNS: usize = 5;

/// etcd refuses reconfigurations until its members have been connected to the leader for 5 s
/// (its strict reconfig check); the clusters settle past that before anything is timed.
const SETTLE: Duration = Duration::from_millis(5500);

async fn leader_ip(c: &Cluster) -> (u64, std::net::IpAddr) {
    let leader = c.leader().await;
    let ids = c.ids().await;
    let name = &ids.iter().find(|(_, id, _)| *id == leader).unwrap().0;
    (leader, c.nodes.iter().find(|n| &n.name == name).unwrap().ip)
}

async fn ours(c: &Cluster) -> Duration {
    let (_, ip) = leader_ip(c).await;
    let s = c.settings();
    let t = Instant::now();
    runos_etcd::remove_member(&s, Target::Ip(ip), &RemoveOptions::default(), &|_| {})
        .await
        .expect("removal");
    t.elapsed()
}

async fn floor(c: &Cluster) -> Duration {
    let (leader, ip) = leader_ip(c).await;
    let ids = c.ids().await;
    let to = ids.iter().find(|(_, id, _)| *id != leader).unwrap();
    let lurl = c
        .nodes
        .iter()
        .find(|n| n.ip == ip)
        .unwrap()
        .client_url
        .clone();
    let turl = c
        .nodes
        .iter()
        .find(|n| n.name == to.0)
        .unwrap()
        .client_url
        .clone();
    let t = Instant::now();
    let mut lc = c.client(&[lurl]).await;
    lc.move_leader(to.1).await.expect("move leader");
    let mut tc = c.client(&[turl]).await;
    tc.member_remove(leader).await.expect("member remove");
    t.elapsed()
}

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]))
}

fn main() {
    if let Some(why) = common::skip_reason() {
        println!("SKIP: {why}");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for i in 0..RUNS {
            let ips_a: Vec<String> = (1..=4).map(|k| format!("127.0.{}.{k}", 100 + i)).collect();
            let ips_b: Vec<String> = (1..=4).map(|k| format!("127.0.{}.{k}", 110 + i)).collect();
            let ra: Vec<&str> = ips_a.iter().map(String::as_str).collect();
            let rb: Vec<&str> = ips_b.iter().map(String::as_str).collect();
            let (ca, cb) = tokio::join!(Cluster::start(&ra), Cluster::start(&rb));
            tokio::time::sleep(SETTLE).await;
            a.push(ours(&ca).await);
            b.push(floor(&cb).await);
        }
    });
    let (p50, min, max) = stats(a);
    let (fp50, fmin, fmax) = stats(b);
    println!(
        "| REMOVE_ETCD_MEMBER of the leader, 4 members (n={RUNS}) | p50 ms | min ms | max ms |"
    );
    println!("|---|---|---|---|");
    println!(
        "| runos_etcd::remove_member (list, health of every member, quorum, move-leader, wait, remove, verify) | {p50:.1} | {min:.1} | {max:.1} |"
    );
    println!(
        "| floor: bare etcd-client move_leader + member_remove, no checks | {fp50:.1} | {fmin:.1} | {fmax:.1} |"
    );
}
