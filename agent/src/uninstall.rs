//! The agent's side of the uninstall (docs/uninstall.md): the executor of `runos-executors`
//! ([`runos_executors::uninstall`]) built from the configuration, and what follows it once the
//! steps are done: the identity removed and the agent stopped (after the `ACK` for
//! `UNINSTALL_NODE`, at once for `runos uninstall`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use runos_executors::handle::{Host, Spec};
use runos_executors::manifest::Manifest;
use runos_executors::overlay::Overlay;
use runos_executors::uninstall::{Packages, Settings, Uninstall};

use crate::config::{Config, Paths};

/// The manifest of what runos wrote outside its state directory: `<state_dir>/manifest.json`.
pub fn manifest(cfg: &Config) -> Arc<Manifest> {
    Arc::new(Manifest::new(cfg.paths.state_dir.join("manifest.json")))
}

/// The uninstall of this agent, over its overlay.
pub fn build(cfg: &Config, overlay: Arc<Overlay>) -> Uninstall {
    let u = &cfg.uninstall;
    let settings = Settings {
        stop_units: u.stop_units.clone(),
        kubeadm_reset: u.kubeadm_reset,
        reset_timeout: u.reset_timeout,
        ..Settings::default()
    };
    let apt = runos_packages::Apt::new(crate::catalog::packages_settings(
        &cfg.paths.state_dir.join("executors"),
    ));
    let packages: Arc<dyn Packages> = Arc::new(runos_packages::UninstallPackages(Arc::new(apt)));
    Uninstall::new(settings, Some(overlay), Some(packages), manifest(cfg))
}

/// The last act of an uninstall: remove the node's key and certificate (the node can no longer
/// connect; the control plane should revoke it), and disable the `runos` unit when systemd runs
/// (`systemctl disable runos.service`, bounded; a failure is said, not fatal). Idempotent.
/// Returns what it did, in words.
pub async fn finish(paths: &Paths, host: &Host) -> Vec<String> {
    let mut done = Vec::new();
    for p in [&paths.key, &paths.certificate] {
        match remove(p) {
            Ok(true) => done.push(format!("removed {}", p.display())),
            Ok(false) => {}
            Err(e) => done.push(format!("cannot remove {}: {e}", p.display())),
        }
    }
    if Path::new("/run/systemd/system").is_dir() {
        let mut spec = Spec::new(vec![
            "systemctl".into(),
            "disable".into(),
            "--".into(),
            "runos.service".into(),
        ]);
        spec.timeout = Duration::from_secs(30);
        spec.output_cap = 16 * 1024;
        match host.run(spec).await {
            Ok(o) if o.exit_code == Some(0) => done.push("disabled runos.service".into()),
            Ok(o) => done.push(format!(
                "systemctl disable runos.service exited {:?}: {}",
                o.exit_code,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => done.push(format!("cannot run systemctl disable runos.service: {e}")),
        }
    }
    done
}

fn remove(p: &Path) -> std::io::Result<bool> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => runos_executors::handle::remove_durably(p).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
