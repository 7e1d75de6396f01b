//! `runos etcd list [--json]` and `runos etcd remove (--ip X | --id Y) [--yes] [--json]`: run
//! here (not through the daemon), on the same library as `REMOVE_ETCD_MEMBER`
//! (`runos_etcd`), with the configuration's `[etcd]` section (docs/etcd.md).
//!
//! Exit codes: 0 listed / removed / not confirmed at the prompt; [`Exit::Degraded`] (8) when
//! `list` finds the cluster unhealthy; [`Exit::EtcdUnreachable`] (15) when etcd cannot be
//! reached; [`Exit::EtcdNotFound`] (16) when no member matches (including one this node removed
//! earlier); [`Exit::EtcdRefused`] (17) when the removal would be unsafe; [`Exit::Usage`] (2)
//! without `--yes` when standard input is not a terminal; [`Exit::Failure`] (1) when a step
//! failed (the message says the cluster's state).

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::PathBuf;

use runos_etcd::remove::{absent, find_target, quorum_for};
use runos_etcd::{ClusterInfo, Kind, RemoveOptions, Target};
use runos_protocol::peertext::PeerText;
use serde_json::json;

use crate::config::Config;
use crate::exit::Exit;

/// Where `REMOVE_ETCD_MEMBER` keeps its removal record (the daemon's executor state dir), so
/// that the command and the executor agree on `already_done`.
pub fn record_dir(cfg: &Config) -> PathBuf {
    cfg.paths
        .state_dir
        .join("executors")
        .join(runos_protocol::instructions::types::REMOVE_ETCD_MEMBER.to_ascii_lowercase())
}

fn fail(json_out: bool, exit: Exit, code: &str, message: &str) -> Exit {
    eprintln!("runos: error: {message}");
    if json_out {
        println!(
            "{}",
            json!({"error": message, "code": code, "exitCode": exit.code()})
        );
    }
    exit
}

fn t(s: &str) -> String {
    PeerText::capped(s, 256).to_string()
}

/// The human form of `info`.
pub fn text(info: &ClusterInfo) -> String {
    let mut o = String::new();
    o += &format!("cluster id:  {}\n", info.cluster_id);
    if info.leader_id.is_empty() {
        o += "leader:      none\n";
    } else {
        o += &format!(
            "leader:      {} ({})\n",
            t(&info.leader_name),
            info.leader_id
        );
    }
    o += &format!("raft index:  {}\n", info.raft_index);
    o += &format!(
        "db size:     {:.1} MB\n",
        info.db_size_bytes as f64 / 1_000_000.0
    );
    o += &format!(
        "health:      {} ({} of {} voting members healthy)\n",
        if info.is_healthy {
            "healthy"
        } else {
            "UNHEALTHY"
        },
        info.healthy_voters(),
        info.voters()
    );
    o += &format!("members:     {}\n\n", info.members.len());
    o += &format!(
        "{:<16}  {:<16}  {:<11}  {:<11}  {:<8}  {:<28}  {}\n",
        "ID", "NAME", "STATUS", "HEALTH", "ROLE", "PEER URLS", "CLIENT URLS"
    );
    for m in &info.members {
        let role = if m.is_leader {
            "leader"
        } else if m.is_learner {
            "learner"
        } else {
            "follower"
        };
        o += &format!(
            "{:<16}  {:<16}  {:<11}  {:<11}  {:<8}  {:<28}  {}\n",
            m.id,
            if m.name.is_empty() {
                "-".into()
            } else {
                t(&m.name)
            },
            if m.started { "started" } else { "not started" },
            m.health.as_str(),
            role,
            t(&m.peer_urls.join(",")),
            if m.client_urls.is_empty() {
                "-".into()
            } else {
                t(&m.client_urls.join(","))
            }
        );
    }
    o
}

/// `runos etcd list`.
pub fn list(cfg: &Config, json_out: bool, rt: &tokio::runtime::Runtime) -> Exit {
    match rt.block_on(runos_etcd::cluster_info(&cfg.etcd)) {
        Ok(info) => {
            if json_out {
                println!("{}", json!(info));
            } else {
                print!("{}", text(&info));
            }
            if info.is_healthy {
                Exit::Ok
            } else {
                Exit::Degraded
            }
        }
        Err(e) => fail(
            json_out,
            Exit::EtcdUnreachable,
            "unreachable",
            &format!(
                "cannot read the etcd cluster through {}: {e}; check [etcd] endpoints and the TLS files in the configuration",
                cfg.etcd.endpoints.join(", ")
            ),
        ),
    }
}

/// Parse `--ip` / `--id` into a target.
pub fn target(ip: Option<&str>, id: Option<&str>) -> Result<Target, String> {
    match (ip, id) {
        (Some(ip), None) => ip
            .trim()
            .parse()
            .map(Target::Ip)
            .map_err(|_| format!("--ip {ip:?} is not an IP address")),
        (None, Some(id)) => runos_etcd::parse_id(id).map(Target::Id),
        _ => Err("give exactly one of --ip and --id".into()),
    }
}

fn exit_of(kind: Kind) -> (Exit, &'static str) {
    match kind {
        Kind::NotFound => (Exit::EtcdNotFound, "not_found"),
        Kind::AlreadyDone => (Exit::EtcdNotFound, "already_done"),
        Kind::Refused => (Exit::EtcdRefused, "refused"),
        Kind::Failed => (Exit::Failure, "failed"),
        Kind::Cancelled => (Exit::Failure, "cancelled"),
        Kind::Timeout => (Exit::Failure, "timeout"),
    }
}

/// `runos etcd remove`.
pub fn remove(
    cfg: &Config,
    target: Target,
    yes: bool,
    json_out: bool,
    rt: &tokio::runtime::Runtime,
) -> Exit {
    let dir = record_dir(cfg);
    let opts = RemoveOptions {
        record_dir: Some(&dir),
        ..Default::default()
    };
    // Show what would go (and refuse early) before asking.
    let info = match rt.block_on(runos_etcd::cluster_info(&cfg.etcd)) {
        Ok(i) => i,
        Err(e) => {
            return fail(
                json_out,
                Exit::EtcdUnreachable,
                "unreachable",
                &format!(
                    "cannot read the etcd cluster through {}: {e}; nothing was removed",
                    cfg.etcd.endpoints.join(", ")
                ),
            );
        }
    };
    // What is shown and confirmed is what is removed: the member by its id from here on.
    let m = match find_target(&info.members, target) {
        Ok(Some(m)) => m,
        Ok(None) => {
            let e = absent(&opts, target);
            let (x, c) = exit_of(e.kind);
            return fail(json_out, x, c, &e.message);
        }
        Err(e) => {
            let (x, c) = exit_of(e.kind);
            return fail(json_out, x, c, &e.message);
        }
    };
    if info.leader() == 0 {
        return fail(
            json_out,
            Exit::EtcdRefused,
            "refused",
            "the cluster has no leader (no member reports one): it cannot change its membership now; nothing was changed. Check `runos etcd list` and the etcd logs",
        );
    }
    if let Err(e) = quorum_for(&info, m) {
        let (x, c) = exit_of(e.kind);
        return fail(json_out, x, c, &e.message);
    }
    eprintln!(
        "etcd member {} {} ({}{}, {}), peer URLs {}",
        m.id,
        t(&m.name),
        if m.is_learner { "learner" } else { "voter" },
        if m.is_leader {
            ", leader: leadership moves first"
        } else {
            ""
        },
        m.health.as_str(),
        t(&m.peer_urls.join(","))
    );
    if !yes {
        if !std::io::stdin().is_terminal() {
            return fail(
                json_out,
                Exit::Usage,
                "usage",
                "standard input is not a terminal: confirm with --yes to remove the member",
            );
        }
        eprint!("Remove it from the etcd cluster? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::Read::take(std::io::stdin().lock(), 1024).read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            eprintln!("Aborted; no member was removed.");
            if json_out {
                println!("{}", json!({"removed": false, "aborted": true}));
            }
            return Exit::Ok;
        }
    }
    let log = |m: &str| eprintln!("  {}", t(m));
    let confirmed = Target::Id(m.id_num);
    match rt.block_on(runos_etcd::remove_member(&cfg.etcd, confirmed, &opts, &log)) {
        Ok(done) => {
            if json_out {
                let mut v = json!(done);
                v["removed"] = json!(true);
                println!("{v}");
            } else {
                println!(
                    "removed etcd member {} {}; {} member(s) left, leader {}",
                    done.id,
                    t(&done.name),
                    done.members_after,
                    done.leader_id
                );
            }
            Exit::Ok
        }
        Err(e) => {
            let (x, c) = exit_of(e.kind);
            fail(json_out, x, c, &e.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_exactly_one_ip_or_id() {
        assert_eq!(
            target(Some("10.0.0.1"), None).unwrap(),
            Target::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            target(None, Some("8e9e05c52164694d")).unwrap(),
            Target::Id(0x8e9e05c52164694d)
        );
        assert!(target(Some("10.0.0.1; rm"), None).is_err());
        assert!(target(None, Some("zz")).is_err());
        assert!(target(None, None).is_err());
        assert!(target(Some("10.0.0.1"), Some("1")).is_err());
    }
}
