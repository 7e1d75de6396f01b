//! `runos etcd list --json` and `runos etcd remove` (the built binary) against a real etcd
//! cluster on loopback with TLS made by the test (the harness of runos-etcd's tests). Skipped,
//! with the reason printed, when /usr/bin/etcd is missing.

#[path = "../../etcd/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Cluster, require_etcd};

fn runos(cfg: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runos"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("RUNOS_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn config(c: &Cluster) -> std::path::PathBuf {
    let d = c.dir.path().display();
    let s = c.settings();
    let eps = s
        .endpoints
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "[paths]\nkey = \"{d}/node.key\"\ncertificate = \"{d}/node.crt\"\nca = \"{d}/ca.pem\"\nl1_ca = \"{d}/l1-ca.pem\"\nstate_dir = \"{d}/state\"\nrun_dir = \"{d}/run\"\n\n[etcd]\nendpoints = [{eps}]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        s.ca, s.cert, s.key
    );
    let p = c.dir.path().join("config.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test]
async fn etcd_list_json_matches_the_cluster_and_remove_is_guarded() {
    require_etcd!();
    let c = Cluster::start(&["127.0.6.1", "127.0.6.2", "127.0.6.3"]).await;
    let cfg = config(&c);
    let ids = c.ids().await;
    let leader = c.leader().await;

    let o = runos(&cfg, &["etcd", "list", "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["isHealthy"], true);
    assert_eq!(v["leaderId"], format!("{leader:016x}"));
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for (name, id, _) in &ids {
        let m = members.iter().find(|m| m["name"] == name.as_str()).unwrap();
        let node = c.nodes.iter().find(|n| &n.name == name).unwrap();
        assert_eq!(m["id"], format!("{id:016x}"));
        assert_eq!(m["peerUrls"][0], node.peer_url.as_str());
        assert_eq!(m["clientUrls"][0], node.client_url.as_str());
        assert_eq!(m["started"], true);
        assert_eq!(m["isLearner"], false);
        assert_eq!(m["isLeader"], *id == leader);
        assert_eq!(m["health"], "healthy");
    }
    let o = runos(&cfg, &["etcd", "list"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("leader:") && out.contains("127.0.6.2"),
        "{out}"
    );

    // Exactly one of --ip / --id; no --yes without a terminal: refused, nothing changed.
    let o = runos(&cfg, &["etcd", "remove", "--ip", "127.0.6.2", "--id", "1"]);
    assert_eq!(o.status.code(), Some(2));
    let o = runos(&cfg, &["etcd", "remove"]);
    assert_eq!(o.status.code(), Some(2));
    let o = runos(&cfg, &["etcd", "remove", "--ip", "127.0.6.2"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--yes"));
    assert_eq!(c.ids().await.len(), 3);
    let o = runos(&cfg, &["etcd", "remove", "--ip", "127.0.6.9", "--json"]);
    assert_eq!(o.status.code(), Some(16));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["code"], "not_found");

    let o = runos(
        &cfg,
        &["etcd", "remove", "--ip", "127.0.6.2", "--yes", "--json"],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["removed"], true);
    assert_eq!(c.ids().await.len(), 2);
    // Again: this node removed it (the record the executor shares).
    let o = runos(
        &cfg,
        &["etcd", "remove", "--ip", "127.0.6.2", "--yes", "--json"],
    );
    assert_eq!(o.status.code(), Some(16));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["code"], "already_done");
    assert!(
        c.dir
            .path()
            .join("state/executors/remove_etcd_member/removed-members.json")
            .exists()
    );
}
