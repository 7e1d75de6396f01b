//! The agent's registration of executors: which instruction types this agent runs, in which
//! lane, with which maximum deadline. Everything else (decoding and validating payloads with the
//! protocol crate, default deadlines and the re-run and secret flags from the protocol's one
//! table, the context) is the executors crate's [`Registry`](runos_executors::Registry).
//!
//! The dispatcher knows instructions only through this registry. `CANCEL` has no entry: the
//! dispatcher handles it itself ([`DISPATCHER_TYPES`]), and HELLO still lists it. Every other
//! catalog type has an executor or is listed here as unsupported ([`UNSUPPORTED`]); a test
//! fails otherwise.

use std::path::PathBuf;
use std::time::Duration;

use runos_executors::{Lane, Resource, Settings, node_status, run_command};
use runos_protocol::instructions::{self, types};

use crate::update::daemon_side;

pub use runos_executors::Ctx as ExecCtx;
pub use runos_executors::registry::{
    DISPATCHER_TYPES, Entry, ExecFn, ExecResult, Job, Prepared, Registry as Catalog, Reply,
};

/// Catalog types this agent version answers `unsupported` (`SET_VPN_PEERS` and the VIP types
/// only until [`add_overlay`] registers them, `UNINSTALL_NODE` until [`add_uninstall`] does:
/// the daemon does both).
pub const UNSUPPORTED: &[&str] = &[
    types::SET_VPN_PEERS,
    types::APPLY_CR,
    types::APPLY_OPERATOR,
    types::DELETE_CR,
    types::RUN_KUBECTL_COMMAND,
    types::RUN_REMOTE_SCRIPT,
    types::INSTALL_HELM_CHART,
    types::UNINSTALL_HELM_CHART,
    types::RUN_WEB_REQUEST,
    types::UNINSTALL_NODE,
    types::UPDATE_DNSMASQ,
    types::VIP_ASSIGN,
    types::VIP_RELEASE,
    types::UPDATE_AGENT,
];

/// The lane the agent gives `kind` once it has an executor (the ones without one are listed
/// for the executor issues to come; `UNSUPPORTED` types are never queued).
pub fn lane_of(kind: &str) -> Lane {
    match kind {
        types::GET_NODE_STATUS | types::VIP_ASSIGN | types::VIP_RELEASE => Lane::Fast,
        types::SET_VPN_PEERS => Lane::Exclusive(Resource::Wg0),
        types::UPDATE_DNSMASQ => Lane::Exclusive(Resource::Dnsmasq),
        types::REMOVE_ETCD_MEMBER => Lane::Exclusive(Resource::Etcd),
        types::INSTALL_PACKAGES | types::REMOVE_PACKAGES => Lane::Exclusive(Resource::Packages),
        types::UPGRADE_NODE_K8S | types::UNINSTALL_NODE | types::UPDATE_AGENT => {
            Lane::Exclusive(Resource::Node)
        }
        _ => Lane::Pool,
    }
}

/// The catalog's default deadline of `kind` (protocol.md §10).
fn catalog_default(kind: &str) -> Duration {
    Duration::from_secs(instructions::catalog_entry(kind).map_or(60, |e| e.default_timeout_secs))
}

/// The executors of this agent version without the updater, on the agent's host handle
/// ([`crate::exec::host`], started now: the daemon sets its own start time). Default deadlines come from the protocol's catalog; the maximum
/// (for `timeoutMs`) is this agent's.
pub fn standard() -> Catalog {
    let mut c = Catalog::new();
    c.set_host(crate::exec::host(std::time::Instant::now()));
    c.register::<instructions::GetNodeStatus, _, _>(
        Settings::new(Duration::from_secs(60), lane_of(types::GET_NODE_STATUS)),
        node_status::node_status,
    );
    // RUN_COMMAND enforces its own payload timeout (and reports `timedOut`); its deadline is
    // that timeout plus a grace period, at most the catalog's value for the largest one.
    c.register::<instructions::RunCommand, _, _>(
        Settings::new(
            catalog_default(types::RUN_COMMAND),
            lane_of(types::RUN_COMMAND),
        ),
        run_command::run_command,
    );
    // REMOVE_ETCD_MEMBER: its `[etcd]` settings come with `set_etcd` (defaults without).
    c.register::<instructions::RemoveEtcdMember, _, _>(
        Settings::new(
            catalog_default(types::REMOVE_ETCD_MEMBER),
            lane_of(types::REMOVE_ETCD_MEMBER),
        ),
        runos_etcd::executor::remove_etcd_member,
    );
    let apt = add_packages(&mut c, runos_packages::Settings::default());
    add_kubernetes(&mut c, apt);
    c.unsupported(UNSUPPORTED);
    c
}

/// Register `INSTALL_PACKAGES`, `REMOVE_PACKAGES` (the `packages` lane) and `GET_PACKAGES` (the
/// pool) on an apt executor with `settings` (docs/packages.md). Their maximum deadline is an
/// hour: an `apt-get update` and a large install on a slow mirror.
/// Returns the apt executor, for the other executors that install packages through it.
pub fn add_packages(
    c: &mut Catalog,
    settings: runos_packages::Settings,
) -> std::sync::Arc<runos_packages::Apt> {
    let apt = std::sync::Arc::new(runos_packages::Apt::new(settings));
    let max = Duration::from_secs(3600);
    let a = apt.clone();
    c.register::<instructions::InstallPackages, _, _>(
        Settings::new(max, lane_of(types::INSTALL_PACKAGES)),
        move |ctx, p| {
            let a = a.clone();
            async move { a.install(&ctx, p).await }
        },
    );
    let a = apt.clone();
    c.register::<instructions::RemovePackages, _, _>(
        Settings::new(max, lane_of(types::REMOVE_PACKAGES)),
        move |ctx, p| {
            let a = a.clone();
            async move { a.remove(&ctx, p).await }
        },
    );
    let shared = apt.clone();
    c.register::<instructions::GetPackages, _, _>(
        Settings::new(Duration::from_secs(300), lane_of(types::GET_PACKAGES)),
        move |ctx, p| {
            let a = apt.clone();
            async move { a.get(&ctx, p).await }
        },
    );
    shared
}

/// The apt executor's settings with its state (the record of what it installed) under the
/// executors' state root: `<root>/packages` (shared by the package types, `UPGRADE_NODE_K8S`
/// and the uninstall).
pub fn packages_settings(root: &std::path::Path) -> runos_packages::Settings {
    runos_packages::Settings {
        state_dir: root.join("packages"),
        ..runos_packages::Settings::default()
    }
}

/// Register `GET_CLUSTER_JOIN_CMD` (the pool; at most 5 minutes: two bounded kubeadm steps) and
/// `UPGRADE_NODE_K8S` (the node lane; at most 2 hours), its packages through `packages` (the
/// apt executor's code). Their `[kubernetes]` settings come with [`set_kubernetes`] (defaults
/// without; docs/kubernetes.md).
pub fn add_kubernetes(c: &mut Catalog, packages: std::sync::Arc<dyn runos_kubeadm::PackageOps>) {
    c.register::<instructions::GetClusterJoinCmd, _, _>(
        Settings::new(
            Duration::from_secs(300),
            lane_of(types::GET_CLUSTER_JOIN_CMD),
        ),
        runos_kubeadm::get_cluster_join_cmd,
    );
    c.register::<instructions::UpgradeNodeK8s, _, _>(
        Settings::new(Duration::from_secs(7200), lane_of(types::UPGRADE_NODE_K8S)),
        move |ctx, p| runos_kubeadm::upgrade_node_k8s(ctx, p, packages.clone()),
    );
}

/// Give `GET_CLUSTER_JOIN_CMD` and `UPGRADE_NODE_K8S` the configuration's `[kubernetes]`
/// section (validated with it).
pub fn set_kubernetes(c: &mut Catalog, k: &runos_kubeadm::KubeSettings) {
    let v = serde_json::to_value(k).unwrap_or(serde_json::Value::Null);
    c.set_config(types::GET_CLUSTER_JOIN_CMD, v.clone());
    c.set_config(types::UPGRADE_NODE_K8S, v);
}

/// Give `REMOVE_ETCD_MEMBER` the configuration's `[etcd]` section (validated with it).
pub fn set_etcd(c: &mut Catalog, etcd: &runos_etcd::Settings) {
    c.set_config(
        types::REMOVE_ETCD_MEMBER,
        serde_json::to_value(etcd).unwrap_or(serde_json::Value::Null),
    );
}

/// Register `SET_VPN_PEERS`, `VIP_ASSIGN` and `VIP_RELEASE` on `overlay` (the daemon's; see `runos_executors::overlay`). Its
/// maximum deadline is 5 minutes: a 4096-peer set on a userspace device that must be started
/// first fits many times over.
pub fn add_overlay(c: &mut Catalog, overlay: std::sync::Arc<runos_executors::overlay::Overlay>) {
    c.register::<instructions::SetVpnPeers, _, _>(
        Settings::new(Duration::from_secs(300), lane_of(types::SET_VPN_PEERS)),
        {
            let overlay = overlay.clone();
            move |ctx, p| {
                let o = overlay.clone();
                async move { o.set_vpn_peers(&ctx, p).await }
            }
        },
    );
    // The VIP: in the fast lane, never behind long work.
    let o = overlay.clone();
    c.register::<instructions::VipAssign, _, _>(
        Settings::new(Duration::from_secs(30), lane_of(types::VIP_ASSIGN)),
        move |_ctx, p| {
            let o = o.clone();
            async move { Ok(o.vip_assign(p).await) }
        },
    );
    c.register::<instructions::VipRelease, _, _>(
        Settings::new(Duration::from_secs(30), lane_of(types::VIP_RELEASE)),
        move |_ctx, p| {
            let o = overlay.clone();
            async move { Ok(o.vip_release(p).await) }
        },
    );
}

/// Register `UNINSTALL_NODE` on `uninstall` (the daemon's, over its overlay; its after-ACK
/// step is registered by the daemon, which can stop itself). Its maximum deadline is an hour:
/// `kubeadm reset` and an apt purge are each bounded well below it.
pub fn add_uninstall(
    c: &mut Catalog,
    uninstall: std::sync::Arc<runos_executors::uninstall::Uninstall>,
) {
    c.register_done::<instructions::UninstallNode, _, _>(
        Settings::new(Duration::from_secs(3600), lane_of(types::UNINSTALL_NODE)),
        move |ctx, p| {
            let u = uninstall.clone();
            async move { u.execute(ctx, p).await }
        },
    );
}

/// [`standard`] plus `UPDATE_AGENT`, which reads the configuration at `config_path` when it
/// runs, with executor state (and pending after-ACK steps) under `state_root` (the daemon's
/// registry).
///
/// `UPDATE_AGENT` is registered here, not in the executors crate: it needs the updater (download,
/// attestation, install, hand-off) and the agent's configuration, which live in the agent, and
/// the executors crate never depends on the agent.
pub fn with_updates(config_path: PathBuf, state_root: Option<PathBuf>) -> Catalog {
    let mut c = standard();
    if let Some(root) = state_root {
        // The package record is shared by the three package types: `<root>/packages`.
        let apt = add_packages(&mut c, packages_settings(&root));
        // UPGRADE_NODE_K8S installs through the same apt executor (and its record).
        add_kubernetes(&mut c, apt);
        c.set_state_root(root);
    }
    let exec_path = config_path.clone();
    c.register_done::<instructions::UpdateAgent, _, _>(
        Settings::new(Duration::from_secs(3600), lane_of(types::UPDATE_AGENT)),
        move |ctx, p| daemon_side::update_agent(exec_path.clone(), ctx, p),
    );
    c.register_step(daemon_side::RESTART_STEP, move |_ctx, params| {
        daemon_side::restart(config_path.clone(), params)
    });
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use runos_protocol::{Envelope, ErrorCode, MessageType, Tag};

    fn env(kind: &str, json: &str) -> Envelope {
        Envelope::from_json_text(MessageType::new(kind).unwrap(), Tag::random(), json)
    }

    #[test]
    fn every_catalog_type_is_accounted_for() {
        for c in [standard(), with_updates("/nonexistent".into(), None)] {
            assert_eq!(c.unaccounted(), Vec::<&str>::new());
            for t in c.types() {
                assert!(instructions::is_instruction_type(&t), "{t}");
            }
        }
    }

    #[test]
    fn cancel_is_listed_without_an_executor() {
        for c in [standard(), Catalog::new()] {
            assert!(c.types().contains(&"CANCEL".to_string()));
            assert!(c.get("CANCEL").is_none());
        }
        let t = standard().types();
        let mut sorted = t.clone();
        sorted.sort();
        assert_eq!(t, sorted);
    }

    #[test]
    fn lanes_are_the_agents() {
        let c = with_updates("/nonexistent".into(), None);
        assert_eq!(c.get("GET_NODE_STATUS").unwrap().lane(), Lane::Fast);
        assert_eq!(c.get("RUN_COMMAND").unwrap().lane(), Lane::Pool);
        assert_eq!(
            c.get("REMOVE_ETCD_MEMBER").unwrap().lane(),
            Lane::Exclusive(Resource::Etcd)
        );
        assert_eq!(
            c.get("INSTALL_PACKAGES").unwrap().lane(),
            Lane::Exclusive(Resource::Packages)
        );
        assert_eq!(
            c.get("REMOVE_PACKAGES").unwrap().lane(),
            Lane::Exclusive(Resource::Packages)
        );
        assert_eq!(c.get("GET_PACKAGES").unwrap().lane(), Lane::Pool);
        assert_eq!(c.get("GET_CLUSTER_JOIN_CMD").unwrap().lane(), Lane::Pool);
        assert!(c.get("GET_CLUSTER_JOIN_CMD").unwrap().secret_reply());
        assert_eq!(
            c.get("UPGRADE_NODE_K8S").unwrap().lane(),
            Lane::Exclusive(Resource::Node)
        );
        assert_eq!(
            c.get("UPDATE_AGENT").unwrap().lane(),
            Lane::Exclusive(Resource::Node)
        );
    }

    #[test]
    fn deadlines_follow_the_protocol_catalog_and_are_clamped() {
        let c = standard();
        let e = c.get("GET_NODE_STATUS").unwrap();
        let d = e
            .prepare(&env("GET_NODE_STATUS", "{}"))
            .unwrap()
            .default_deadline;
        assert_eq!(d, Duration::from_secs(30));
        assert_eq!(e.deadline(None, d), Duration::from_secs(30));
        assert_eq!(e.deadline(Some(500), d), Duration::from_millis(500));
        assert_eq!(e.deadline(Some(10_000_000), d), Duration::from_secs(60));
        let e = c.get("RUN_COMMAND").unwrap();
        let run = |json| {
            e.prepare(&env("RUN_COMMAND", json))
                .unwrap()
                .default_deadline
        };
        assert_eq!(run(r#"{"argv":["true"]}"#), Duration::from_secs(330));
        assert_eq!(
            run(r#"{"argv":["true"],"timeoutSecs":5}"#),
            Duration::from_secs(35)
        );
        let longest = run(r#"{"argv":["true"],"timeoutSecs":86400}"#);
        assert_eq!(e.deadline(None, longest), Duration::from_secs(86_430));
        assert_eq!(
            e.deadline(Some(u64::MAX), longest),
            Duration::from_secs(86_430)
        );
    }

    #[test]
    fn every_registered_type_is_validated_by_the_protocol_before_it_runs() {
        let c = with_updates("/nonexistent/runos.toml".into(), None);
        for (kind, json, field) in [
            (
                "RUN_COMMAND",
                r#"{"argv":["../../../../bin/sh"]}"#,
                "argv[0]",
            ),
            (
                "RUN_COMMAND",
                r#"{"argv":["true"],"env":{"1X":"v"}}"#,
                "env",
            ),
            ("UPDATE_AGENT", r#"{"version":"../../x"}"#, "version"),
            (
                "REMOVE_ETCD_MEMBER",
                r#"{"node_ip":"10.0.0.1/../x"}"#,
                "node_ip",
            ),
            (
                "UPGRADE_NODE_K8S",
                r#"{"targetKubernetesVersion":"1.30.2;reboot","kubeRepoVersion":"v1.30"}"#,
                "targetKubernetesVersion",
            ),
        ] {
            let e = c.get(kind).unwrap().prepare(&env(kind, json)).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadPayload);
            assert!(e.message.contains(&format!("`{field}`")), "{}", e.message);
            assert!(!e.message.contains(".."), "{}", e.message);
        }
        for (kind, json) in [
            ("RUN_COMMAND", r#"[["/bin/true"]]"#),
            ("GET_NODE_STATUS", "[]"),
            ("UPDATE_AGENT", r#"["v1.2.3"]"#),
        ] {
            let e = c.get(kind).unwrap().prepare(&env(kind, json)).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadPayload, "{kind}");
        }
    }
}
