//! `runos uninstall [--yes] [--json]`: the steps of `UNINSTALL_NODE`, run here
//! ([`crate::uninstall`]), then the identity removed. Takes the instance lock first, so it never
//! runs beside a running agent (whose reconcile loop would bring the overlay back).
//!
//! Exit codes: 0 done; [`Exit::Failure`] (1) a step failed (the output names it and the steps
//! not done); [`Exit::Usage`] (2) not confirmed; [`Exit::Locked`] (7) the agent is running.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::cli::report_error as fail;
use crate::config::Config;
use crate::exit::Exit;

/// Ask for the literal `yes` on a terminal.
fn confirmed() -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!(
        "This removes Kubernetes (kubeadm reset), the WireGuard overlay, the packages runos installed and this node's identity.\nType yes to go on: "
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    line.trim().eq_ignore_ascii_case("yes")
}

/// Run `runos uninstall`.
pub fn run(cfg: &Config, yes: bool, json_out: bool, rt: &tokio::runtime::Runtime) -> Exit {
    if !yes && !confirmed() {
        return fail(
            json_out,
            Exit::Usage,
            "not confirmed: nothing was changed (pass --yes to uninstall without the question)",
        );
    }
    let _lock = match crate::util::lock::acquire(&cfg.paths.lock_file()) {
        Ok(l) => l,
        Err(crate::util::lock::LockError::Held(_)) => {
            return fail(
                json_out,
                Exit::Locked,
                "the agent is running: stop it first (systemctl stop runos), or send UNINSTALL_NODE from the control plane",
            );
        }
        Err(e) => {
            return fail(
                json_out,
                Exit::Failure,
                &format!("cannot take the instance lock: {e}"),
            );
        }
    };
    let runner = runos_executors::host::runner::Runner::new(crate::exec::runner_config(cfg, None));
    let _ = runos_executors::host::runner::Runner::install_shared(runner);
    let host = Arc::new(crate::exec::host(std::time::Instant::now()));
    let overlay = Arc::new(runos_executors::overlay::Overlay::new(
        crate::exec::overlay_settings(cfg),
        Arc::new(runos_executors::overlay::device::HostSystem),
        Arc::new(runos_executors::overlay::ControlPaths::default()),
    ));
    let uninstall = crate::uninstall::build(cfg, overlay);
    let ctx = runos_executors::Ctx::new(
        runos_protocol::Tag::random(),
        tokio::time::Instant::now() + Duration::from_secs(1800),
        host.clone(),
        None,
    );
    let (report, finished) = rt.block_on(async {
        let report = uninstall.run(&ctx).await;
        let finished = if report.ok {
            crate::uninstall::finish(&cfg.paths, &host).await
        } else {
            Vec::new()
        };
        (report, finished)
    });
    if json_out {
        println!(
            "{}",
            json!({"ok": report.ok, "steps": report.steps, "identity": finished})
        );
    } else {
        for s in &report.steps {
            println!(
                "{:<14} {:<9} {}",
                s.step,
                serde_json::to_value(s.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                s.detail
            );
        }
        for f in &finished {
            println!("identity       {f}");
        }
    }
    match report.error() {
        None => {
            if !json_out {
                println!(
                    "uninstalled; the state directory {} is kept for the record",
                    cfg.paths.state_dir.display()
                );
            }
            Exit::Ok
        }
        Some(e) => {
            eprintln!("runos: error: {}", e.message);
            Exit::Failure
        }
    }
}
