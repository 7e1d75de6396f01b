//! REMOVE_ETCD_MEMBER and the cluster overview against real etcd clusters (Debian's etcd 3.4)
//! on loopback, with TLS made by the test. Each member has its own loopback address
//! (127.0.0.0/8 binds without setup on Linux), so members are told apart by host, as on real
//! nodes. Skipped, with the reason printed, when /usr/bin/etcd is missing.

mod common;

use std::net::IpAddr;
use std::sync::Mutex;

use common::{Cluster, require_etcd};
use runos_etcd::{Health, Kind, RemoveOptions, Target, cluster_info, id_hex, remove_member};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Run a removal, collecting its log lines.
async fn remove(
    c: &Cluster,
    target: Target,
    record: Option<&std::path::Path>,
) -> (
    Result<runos_etcd::Removed, runos_etcd::RemoveError>,
    Vec<String>,
) {
    let lines = Mutex::new(Vec::new());
    let log = |m: &str| lines.lock().unwrap().push(m.to_string());
    let opts = RemoveOptions {
        record_dir: record,
        ..Default::default()
    };
    let r = remove_member(&c.settings(), target, &opts, &log).await;
    (r, lines.into_inner().unwrap())
}

#[tokio::test]
async fn remove_a_follower_then_again_is_already_done_and_unknown_is_not_found() {
    require_etcd!();
    let c = Cluster::start(&["127.0.1.1", "127.0.1.2", "127.0.1.3"]).await;
    let leader = c.leader().await;
    let ids = c.ids().await;
    let (idx, (name, fid, _)) = ids
        .iter()
        .enumerate()
        .find(|(_, (_, id, _))| *id != leader)
        .unwrap();
    let fip = c.nodes.iter().find(|n| &n.name == name).unwrap().ip;
    let _ = idx;
    let rec = c.dir.path().join("state");
    let (r, log) = remove(&c, Target::Ip(fip), Some(&rec)).await;
    let done = r.unwrap_or_else(|e| panic!("{e:?} {log:#?}"));
    assert_eq!(done.id, id_hex(*fid));
    assert!(!done.was_leader);
    assert_eq!(done.members_after, 2);
    assert!(
        log.iter().any(|l| l.contains("quorum check passed")),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l.starts_with("verified:")), "{log:#?}");
    let after = c.ids().await;
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|(_, id, _)| id != fid));

    // The same address again: this agent removed it.
    let (r, _) = remove(&c, Target::Ip(fip), Some(&rec)).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, Kind::AlreadyDone, "{e:?}");
    assert!(e.message.contains(&id_hex(*fid)), "{}", e.message);
    let (r, _) = remove(&c, Target::Id(*fid), Some(&rec)).await;
    assert_eq!(r.unwrap_err().kind, Kind::AlreadyDone);
    // Without a record it is simply not found; and an address no member has is not found.
    let (r, _) = remove(&c, Target::Ip(fip), None).await;
    assert_eq!(r.unwrap_err().kind, Kind::NotFound);
    let (r, _) = remove(&c, Target::Ip(ip("127.0.1.9")), Some(&rec)).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, Kind::NotFound, "{e:?}");
    assert!(e.message.contains("127.0.1.9"), "{}", e.message);
    let (r, _) = remove(&c, Target::Id(0xdead), Some(&rec)).await;
    assert_eq!(r.unwrap_err().kind, Kind::NotFound);
    assert_eq!(c.ids().await.len(), 2);
}

#[tokio::test]
async fn removing_the_leader_of_four_moves_leadership_first() {
    require_etcd!();
    let c = Cluster::start(&["127.0.2.1", "127.0.2.2", "127.0.2.3", "127.0.2.4"]).await;
    let leader = c.leader().await;
    assert_ne!(leader, 0);
    let ids = c.ids().await;
    let lname = &ids.iter().find(|(_, id, _)| *id == leader).unwrap().0;
    let lip = c.nodes.iter().find(|n| &n.name == lname).unwrap().ip;
    let (r, log) = remove(&c, Target::Ip(lip), None).await;
    let done = r.unwrap_or_else(|e| panic!("{e:?} {log:#?}"));
    assert!(done.was_leader);
    assert_ne!(done.leader_id, id_hex(leader));
    assert!(
        log.iter().any(|l| l.contains("moving leadership to")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.starts_with("leadership moved")),
        "{log:#?}"
    );
    // No orphan: three members, none of them the old leader, and a leader among them.
    let after = c.ids().await;
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(after.iter().all(|(_, id, _)| *id != leader));
    let info = cluster_info(&c.settings()).await.unwrap();
    assert_eq!(info.members.len(), 3);
    assert!(info.is_healthy, "{info:#?}");
    let new_leader = info.leader();
    assert!(after.iter().any(|(_, id, _)| *id == new_leader));
}

/// Three voters: after the leader goes, both others are needed for quorum, so the re-check after
/// the leadership move must wait (bounded) until both follow the new leader, not refuse.
#[tokio::test]
async fn removing_the_leader_of_three_rechecks_quorum_after_the_move() {
    require_etcd!();
    let c = Cluster::start(&["127.0.8.1", "127.0.8.2", "127.0.8.3"]).await;
    let leader = c.leader().await;
    let ids = c.ids().await;
    let lname = &ids.iter().find(|(_, id, _)| *id == leader).unwrap().0;
    let lip = c.nodes.iter().find(|n| &n.name == lname).unwrap().ip;
    let (r, log) = remove(&c, Target::Ip(lip), None).await;
    let done = r.unwrap_or_else(|e| panic!("{e:?} {log:#?}"));
    assert!(done.was_leader);
    assert_eq!(done.members_after, 2);
    assert!(
        log.iter()
            .any(|l| l.starts_with("re-checked after the leadership move")),
        "{log:#?}"
    );
    let after = c.ids().await;
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|(_, id, _)| *id != leader));
}

#[tokio::test]
async fn with_one_member_down_removing_a_healthy_one_is_refused() {
    require_etcd!();
    let mut c = Cluster::start(&["127.0.3.1", "127.0.3.2", "127.0.3.3"]).await;
    let before = c.ids().await;
    // Stop a member that is not the leader, then try to remove another healthy follower.
    let leader = c.leader().await;
    let followers: Vec<usize> = c
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            before
                .iter()
                .any(|(nm, id, _)| nm == &n.name && *id != leader)
        })
        .map(|(i, _)| i)
        .collect();
    c.stop(followers[0]);
    let healthy_ip = c.nodes[followers[1]].ip;
    let (r, log) = remove(&c, Target::Ip(healthy_ip), None).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, Kind::Refused, "{e:?} {log:#?}");
    assert!(e.message.contains("need 2 healthy"), "{}", e.message);
    assert!(e.message.contains("only 1 are healthy"), "{}", e.message);
    assert_eq!(c.ids().await, before, "nothing changed");
    // The leader too (it is healthy): refused.
    let lip = c
        .nodes
        .iter()
        .find(|n| {
            before
                .iter()
                .any(|(nm, id, _)| nm == &n.name && *id == leader)
        })
        .unwrap()
        .ip;
    let (r, _) = remove(&c, Target::Ip(lip), None).await;
    assert_eq!(r.unwrap_err().kind, Kind::Refused);
    assert_eq!(c.leader().await, leader, "leadership was not moved");
    // Removing the dead one keeps quorum (2 voters left, both healthy): allowed.
    let dead_ip = c.nodes[followers[0]].ip;
    let (r, log) = remove(&c, Target::Ip(dead_ip), None).await;
    let done = r.unwrap_or_else(|e| panic!("{e:?} {log:#?}"));
    assert_eq!(done.members_after, 2);
}

#[tokio::test]
async fn the_substring_trap_and_cluster_info() {
    require_etcd!();
    let c = Cluster::start(&["127.0.0.1", "127.0.0.11", "127.0.0.21"]).await;
    let info = cluster_info(&c.settings()).await.unwrap();
    let ids = c.ids().await;
    // cluster_info matches the cluster.
    assert_eq!(info.members.len(), 3);
    assert!(info.is_healthy);
    assert_eq!(info.cluster_id.len(), 16);
    assert!(info.raft_index > 0);
    assert!(info.db_size_bytes > 0);
    let leader = c.leader().await;
    assert_eq!(info.leader_id, id_hex(leader));
    for (name, id, learner) in &ids {
        let m = info.members.iter().find(|m| &m.name == name).unwrap();
        let node = c.nodes.iter().find(|n| &n.name == name).unwrap();
        assert_eq!(m.id, id_hex(*id));
        assert_eq!(m.is_learner, *learner);
        assert_eq!(m.is_leader, *id == leader);
        assert_eq!(m.peer_urls, vec![node.peer_url.clone()]);
        assert_eq!(m.client_urls, vec![node.client_url.clone()]);
        assert!(m.started);
        assert_eq!(m.health, Health::Healthy);
    }
    let v = serde_json::to_value(&info).unwrap();
    for k in [
        "members",
        "leaderId",
        "leaderName",
        "clusterId",
        "raftIndex",
        "dbSizeBytes",
        "isHealthy",
    ] {
        assert!(v.get(k).is_some(), "{k}: {v}");
    }
    for k in [
        "id",
        "name",
        "peerUrls",
        "clientUrls",
        "started",
        "isLearner",
        "isLeader",
        "health",
    ] {
        assert!(v["members"][0].get(k).is_some(), "{k}: {v}");
    }

    // 127.0.0.1 names exactly n1, never n2 at 127.0.0.11.
    let n1 = c.id_of("n1").await;
    let n2 = c.id_of("n2").await;
    let (r, log) = remove(&c, Target::Ip(ip("127.0.0.1")), None).await;
    let done = r.unwrap_or_else(|e| panic!("{e:?} {log:#?}"));
    assert_eq!(done.id, id_hex(n1));
    let after = c.ids().await;
    assert!(after.iter().any(|(_, id, _)| *id == n2));
    assert!(after.iter().all(|(_, id, _)| *id != n1));
    // And 127.0.0.2 (a prefix of 127.0.0.21) names nothing.
    let (r, _) = remove(&c, Target::Ip(ip("127.0.0.2")), None).await;
    assert_eq!(r.unwrap_err().kind, Kind::NotFound);
}

#[tokio::test]
async fn learners_are_removed_without_quorum_math() {
    require_etcd!();
    let extra: Vec<IpAddr> = vec![ip("127.0.4.4"), ip("127.0.4.5")];
    let base: Vec<IpAddr> = vec![ip("127.0.4.1"), ip("127.0.4.2"), ip("127.0.4.3")];
    let mut c = Cluster::start_with_pki_ips(&base, &extra).await;
    // etcd 3.4 allows one learner at a time: first one never started, then a started one.
    let unstarted = c.add_learner("127.0.4.5", false).await;
    let info = cluster_info(&c.settings()).await.unwrap();
    let u = info
        .members
        .iter()
        .find(|m| m.id == id_hex(unstarted))
        .unwrap();
    assert!(u.is_learner && !u.started, "{u:?}");
    assert_eq!(u.health, Health::NotStarted);
    assert_eq!(info.voters(), 3);
    let (r, log) = remove(&c, Target::Ip(ip("127.0.4.5")), None).await;
    r.unwrap_or_else(|e| panic!("{e:?} {log:#?}"));
    assert!(log.iter().any(|l| l.contains("is a learner")), "{log:#?}");

    let started = c.add_learner("127.0.4.4", true).await;
    let info = cluster_info(&c.settings()).await.unwrap();
    let l = info
        .members
        .iter()
        .find(|m| m.id == id_hex(started))
        .unwrap();
    assert!(l.is_learner && l.started, "{l:?}");
    assert!(!l.is_leader);
    // With a voter down (no quorum slack left): a learner may still go. The stopped voter is
    // a follower, so that no election is under way.
    let leader = c.leader().await;
    let ids = c.ids().await;
    let follower = (0..3)
        .find(|i| {
            ids.iter()
                .any(|(n, id, _)| n == &c.nodes[*i].name && *id != leader)
        })
        .unwrap();
    c.stop(follower);
    let (r, log) = remove(&c, Target::Id(started), None).await;
    r.unwrap_or_else(|e| panic!("{e:?} {log:#?}"));
    let after = c.ids().await;
    assert_eq!(after.len(), 3);
    assert!(after.iter().all(|(_, _, learner)| !learner));
}

#[tokio::test]
async fn the_last_voter_is_never_removed_and_bad_tls_is_clear() {
    require_etcd!();
    let c = Cluster::start(&["127.0.5.1"]).await;
    let (r, _) = remove(&c, Target::Ip(ip("127.0.5.1")), None).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, Kind::Refused, "{e:?}");
    assert!(e.message.contains("last voting member"), "{}", e.message);
    assert_eq!(c.ids().await.len(), 1);

    let mut s = c.settings();
    s.key = c.dir.path().join("missing.key");
    let e = cluster_info(&s).await.unwrap_err();
    assert!(e.to_string().contains("missing.key"), "{e}");
    let mut s = c.settings();
    s.key = s.ca.clone();
    let e = cluster_info(&s).await.unwrap_err();
    assert!(e.to_string().contains("no usable private key"), "{e}");
}

#[tokio::test]
async fn the_executor_logs_every_step_and_honours_cancel() {
    use runos_executors::{Ctx, Host};
    use runos_protocol::control::LogLine;
    use runos_protocol::instructions::RemoveEtcdMember;
    use runos_protocol::{ErrorCode, Tag};
    use std::sync::Arc;
    use std::time::Duration;
    require_etcd!();
    let c = Cluster::start(&["127.0.7.1", "127.0.7.2", "127.0.7.3"]).await;
    let state = c.dir.path().join("executor-state");
    let config = Arc::new(serde_json::to_value(c.settings()).unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let ctx = || {
        Ctx::new(
            Tag::random(),
            tokio::time::Instant::now() + Duration::from_secs(120),
            Arc::new(Host::default()),
            Some(tx.clone()),
        )
        .with_state_dir(state.clone())
        .with_config(config.clone())
    };
    let req = |ip: &str| RemoveEtcdMember {
        node_ip: ip.to_string(),
    };
    let e = runos_etcd::executor::remove_etcd_member(ctx(), req("127.0.7.9"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);

    let cancelled = ctx();
    cancelled.cancel.cancel();
    let e = runos_etcd::executor::remove_etcd_member(cancelled, req("127.0.7.3"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Cancelled, "{e:?}");
    assert_eq!(c.ids().await.len(), 3, "nothing removed");
    while rx.try_recv().is_ok() {}

    runos_etcd::executor::remove_etcd_member(ctx(), req("127.0.7.3"))
        .await
        .unwrap();
    let mut lines = Vec::new();
    while let Ok(env) = rx.try_recv() {
        lines.push(env.payload::<LogLine>().unwrap().message);
    }
    for want in [
        "listing etcd members",
        "target:",
        "quorum check passed",
        "re-checked",
        "removing member",
        "verified:",
        "removed etcd member",
    ] {
        assert!(lines.iter().any(|l| l.contains(want)), "{want}: {lines:#?}");
    }
    assert_eq!(c.ids().await.len(), 2);
    let e = runos_etcd::executor::remove_etcd_member(ctx(), req("127.0.7.3"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AlreadyDone, "{e:?}");

    // A bad [etcd] section is the agent's fault: internal, nothing attempted.
    let bad = ctx().with_config(Arc::new(serde_json::json!({"endpoints": []})));
    let e = runos_etcd::executor::remove_etcd_member(bad, req("127.0.7.2"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Internal);
}

#[tokio::test]
async fn two_members_on_one_host_are_ambiguous_by_ip_and_removable_by_id() {
    require_etcd!();
    let c = Cluster::start(&["127.0.9.1", "127.0.9.1", "127.0.9.2"]).await;
    let before = c.ids().await;
    let (r, log) = remove(&c, Target::Ip(ip("127.0.9.1")), None).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, Kind::Refused, "{e:?} {log:#?}");
    assert!(e.message.contains("ambiguous"), "{}", e.message);
    assert_eq!(c.ids().await, before, "nothing changed");
    // By id, one of them goes (a follower, so that this is quick).
    let leader = c.leader().await;
    let (_, id, _) = before
        .iter()
        .find(|(n, id, _)| *id != leader && (n == "n1" || n == "n2"))
        .unwrap();
    let (r, log) = remove(&c, Target::Id(*id), None).await;
    let done = r.unwrap_or_else(|e| panic!("{e:?} {log:#?}"));
    assert_eq!(done.id, id_hex(*id));
    assert_eq!(c.ids().await.len(), 2);
}
