//! The agent's side of the executors' host handle ([`runos_executors::Host`]): their processes
//! run with the process runner the daemon installed ([`Runner::shared`], built from the
//! configuration with [`runner_config`]), and the node facts `GET_NODE_STATUS` reports come
//! from here. The executors themselves live in `runos-executors`.

use std::path::PathBuf;
use std::sync::Arc;

use runos_executors::handle::{Host, NodeFacts};
use runos_executors::host::runner::{Runner, RunnerConfig};

use crate::config::Config;
use crate::sysinfo;

/// The process runner's configuration: `[tools]` (how `argv[0]` names are found, and how a
/// test puts stand-ins in place), `[runner] cgroup_root`, and the leftover `registry`. Says (a
/// warning) which configured tools are not executable files yet: they may be installed later,
/// and a run of a missing one fails then.
pub fn runner_config(cfg: &Config, registry: Option<PathBuf>) -> RunnerConfig {
    use std::os::unix::fs::PermissionsExt as _;
    for (name, path) in cfg.tools.iter() {
        let usable = std::fs::metadata(path)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if !usable {
            tracing::warn!(
                tool = name,
                path = %path.display(),
                "[tools] names a path that is not an executable file (yet)"
            );
        }
    }
    RunnerConfig {
        search_path: None,
        tools: cfg.tools.clone(),
        cgroup: cfg.runner.cgroup.clone(),
        registry,
    }
}

/// The agent's host handle: the shared process runner (with its configured tools) and this
/// node's facts, for an agent that started at `agent_started`.
pub fn host(agent_started: std::time::Instant) -> Host {
    let runner = Runner::shared();
    Host {
        tools: runner.tools().clone(),
        runner: Arc::new(runner),
        facts: NodeFacts {
            agent_version: crate::agent_version().to_string(),
            agent_started,
            hostname: sysinfo::hostname,
            boot_id: sysinfo::boot_id,
            system_uptime_secs: sysinfo::system_uptime_secs,
        },
    }
}

/// The overlay's settings from `[wireguard]`, with its state in `<state_dir>/wireguard`.
pub fn overlay_settings(cfg: &Config) -> runos_executors::overlay::Settings {
    use runos_executors::overlay::{BackendChoice, Settings};
    let w = &cfg.wireguard;
    let mut s = Settings::new(cfg.paths.state_dir.join("wireguard"));
    s.interface = w.interface.clone();
    s.backend = match w.backend.as_str() {
        "kernel" => BackendChoice::Kernel,
        "userspace" => BackendChoice::Userspace,
        _ => BackendChoice::Auto,
    };
    s.listen_port = w.listen_port;
    s.mtu = w.mtu;
    s.keepalive_secs = w.keepalive_secs;
    s.address = w.address;
    s.endpoint_ip = w.endpoint_ip;
    s.userspace_command = w.userspace_command.clone();
    s.reconcile_interval = w.reconcile_interval;
    s.vip = w.vip;
    s.vip_check = w.vip_check;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn configured_tools_replace_the_path_lookup() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let stand_in = dir.path().join("kubectl-stand-in");
        std::fs::write(&stand_in, "#!/bin/sh\necho stand-in \"$@\"\n").unwrap();
        std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).unwrap();
        let text = format!(
            "[tools]\nkubectl = {:?}\nhelm = \"/nonexistent/helm\"\n\n[runner]\ncgroup_root = \"off\"\n",
            stand_in.display().to_string()
        );
        let path = std::path::Path::new("/test/config.toml");
        let cfg = crate::config::RawConfig::parse(&text, path)
            .unwrap()
            .validate(path)
            .unwrap();
        let runner = Runner::new(runner_config(&cfg, None));
        assert_eq!(runner.cgroup_root(), None);
        let spec = runos_executors::handle::Spec::new(vec!["kubectl".into(), "version".into()]);
        let out = runner.run(spec).await.unwrap();
        assert_eq!(out.stdout, b"stand-in version\n");
        // A configured tool that is missing fails when run, not at start.
        let spec = runos_executors::handle::Spec::new(vec!["helm".into()]);
        assert!(runner.run(spec).await.is_err());
    }
}
