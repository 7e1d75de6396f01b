//! `runos agent`: the long-running daemon.
//!
//! Startup: configuration, registration check, instance lock, journal (recovery of what the
//! previous run left unfinished), dispatcher, `READY=1`. Then the
//! reconnect loop: one [`session`] at a time, exponential backoff with full jitter between
//! attempts (reset after a stable session, whose first reconnect waits only a moment; the cap
//! after `revoked`), forever. SIGTERM/SIGINT
//! drain running instructions within the grace and exit; SIGHUP reloads the configuration and
//! never exits.

pub mod admin;
pub mod audit;
pub mod backoff;
pub mod dispatch;
pub mod notify;
pub mod session;
pub mod state;
pub mod status;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runos_journal::Journal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::{self, Config};
use crate::credentials::identity;
use crate::daemon::audit::AuditLog;
use crate::daemon::backoff::Backoff;
use crate::daemon::dispatch::{DispatchConfig, DispatchLink, Inbound};
use crate::daemon::session::{Control, SessionEnd, SessionParams};
use crate::exit::Exit;
use crate::logging::LogHandle;
use crate::util::lock;

/// A daemon that could not start.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DaemonError {
    /// The exit code.
    pub exit: Exit,
    /// What failed and what to do.
    pub message: String,
}

fn fail(exit: Exit, message: impl Into<String>) -> DaemonError {
    DaemonError {
        exit,
        message: message.into(),
    }
}

/// Whether a configuration change needs a new connection.
fn needs_reconnect(old: &Config, new: &Config) -> bool {
    old.server != new.server || old.paths != new.paths
}

/// The log level in force: `--log-level` beats the configuration.
fn level_of(cfg: &Config, cli_level: Option<config::LogLevel>) -> &'static str {
    cli_level.unwrap_or(cfg.log.level).as_str()
}

/// Run the daemon until SIGTERM/SIGINT.
pub async fn run(
    config_path: PathBuf,
    cfg: Config,
    cli_level: Option<config::LogLevel>,
    log: LogHandle,
) -> Result<(), DaemonError> {
    // Refuse to start unregistered rather than loop forever.
    // A credential switch a crash interrupted is finished (or undone) before anything reads
    // the credentials.
    if let Err(e) = crate::credentials::recover(&cfg.paths) {
        tracing::error!("cannot finish an interrupted credential switch: {e}");
    }
    identity::load(&cfg).map_err(|e| fail(Exit::NotRegistered, e.to_string()))?;
    let _lock = lock::acquire(&cfg.paths.lock_file()).map_err(|e| match e {
        lock::LockError::Held(_) => fail(Exit::Locked, e.to_string()),
        lock::LockError::Io { .. } => fail(Exit::Failure, e.to_string()),
    })?;
    // Process groups of instructions that a crash (kill -9) of the previous run cut short:
    // kill them now, before anything new runs. Only the lock holder does this.
    let groups = cfg.paths.run_dir.join("groups");
    let reaped = runos_executors::host::leftover::reap(&groups);
    for pgid in reaped.groups {
        tracing::warn!(
            pgid,
            "killed the leftover process group of an instruction that a crash of the previous run cut short"
        );
    }
    for cgroup in reaped.cgroups {
        tracing::warn!(
            cgroup = %cgroup.display(),
            "killed and removed the leftover cgroup of an instruction that a crash of the previous run cut short"
        );
    }
    let registry = match crate::util::fs::ensure_dir(&groups, 0o700) {
        Ok(()) => Some(groups),
        Err(e) => {
            tracing::warn!(
                "cannot record running commands ({e}); after a crash, instruction processes would not be killed at the next start"
            );
            None
        }
    };
    // `[tools]` and `[runner]` apply from here on; a SIGHUP reload does not change them.
    let runner =
        runos_executors::host::runner::Runner::new(crate::exec::runner_config(&cfg, registry));
    if !runos_executors::host::runner::Runner::install_shared(runner) {
        tracing::debug!("the process runner was already set up in this process");
    }
    let signal_err = |e: std::io::Error| {
        fail(
            Exit::Failure,
            format!("cannot install signal handlers: {e}"),
        )
    };
    let mut sigterm = signal(SignalKind::terminate()).map_err(signal_err)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(signal_err)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(signal_err)?;

    let agent_started = Instant::now();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Shared with the uninstall's last step, which stops the agent.
    let shutdown_tx = Arc::new(shutdown_tx);
    let uninstall_stop = shutdown_tx.clone();
    let (reconnect_tx, reconnect_rx) = watch::channel(0u64);
    let reconnect_tx = Arc::new(reconnect_tx);
    let (renew_tx, renew_rx) = tokio::sync::mpsc::channel(8);
    let (cfg_tx, cfg_rx) = watch::channel(cfg.clone());

    let update_config = config_path.clone();
    // Signals: handled in one task for the life of the daemon.
    // The admin socket's `reconnect` (sent by `register --force`): reload the configuration
    // (the server may have changed) and reconnect whatever changed.
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<()>(4);
    let reconnect_sig = reconnect_tx.clone();
    let config_file = config_path.clone();
    tokio::spawn(async move {
        let reconnect_tx = reconnect_sig;
        let reload = |why: &str, force: bool| match config::load(&config_path) {
            Ok((new, _)) => {
                log.set_level(level_of(&new, cli_level));
                let old = cfg_tx.borrow().clone();
                let reconnect = force || needs_reconnect(&old, &new);
                cfg_tx.send_replace(new);
                tracing::info!(reconnect, "{why}: configuration reloaded");
                if reconnect {
                    reconnect_tx.send_modify(|g| *g += 1);
                }
            }
            Err(e) => {
                tracing::error!("{why}: the new configuration is invalid and was ignored: {e}");
                if force {
                    reconnect_tx.send_modify(|g| *g += 1);
                }
            }
        };
        loop {
            tokio::select! {
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); let _ = shutdown_tx.send(true); }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); let _ = shutdown_tx.send(true); }
                _ = sighup.recv() => reload("SIGHUP", false),
                Some(()) = reload_rx.recv() => reload("reconnect requested", true),
            }
        }
    });

    // This agent's shared state (status, renewal, advertised version, clock offset).
    let state = state::AgentState::new();
    // After the lock: one process at a time owns the journal.
    let (journal, audit) = open_journal(&cfg.paths.state_dir, cfg.agent.journal_sync)?;
    let mut catalog = crate::catalog::with_updates(
        update_config.clone(),
        Some(cfg.paths.state_dir.join("executors")),
    );
    catalog.set_host(crate::exec::host(agent_started));
    crate::catalog::set_etcd(&mut catalog, &cfg.etcd);
    crate::catalog::set_kubernetes(&mut catalog, &cfg.kubernetes);
    // The overlay (`SET_VPN_PEERS`): restored from its saved set and kept so by its reconcile
    // loop, before and whether or not a control plane answers (docs/overlay.md).
    let overlay = Arc::new(runos_executors::overlay::Overlay::new(
        crate::exec::overlay_settings(&cfg),
        Arc::new(runos_executors::overlay::device::HostSystem),
        state.control_paths.clone(),
    ));
    crate::catalog::add_overlay(&mut catalog, overlay.clone());
    // `UNINSTALL_NODE`: its steps, then (after the ACK) the identity removed and the agent
    // stopped; systemd's restart then finds no identity and stops (exit 3) (docs/uninstall.md).
    crate::catalog::add_uninstall(
        &mut catalog,
        Arc::new(crate::uninstall::build(&cfg, overlay.clone())),
    );
    let finish_paths = cfg.paths.clone();
    catalog.register_step(
        runos_executors::uninstall::FINISH_STEP,
        move |ctx, _params| {
            let paths = finish_paths.clone();
            let stop = uninstall_stop.clone();
            async move {
                for what in crate::uninstall::finish(&paths, &ctx.host).await {
                    tracing::warn!("uninstall: {what}");
                }
                tracing::warn!(
                    "uninstall finished: this node's identity is removed; the agent stops"
                );
                let _ = stop.send(true);
                Ok(())
            }
        },
    );
    // HELLO carries the public key, so the key is made now (a file, no interface).
    match overlay.public_key_b64() {
        Ok(k) => {
            let _ = state.wireguard_public_key.set(k);
        }
        Err(e) => tracing::warn!(
            "cannot read or make this node's WireGuard key ({e}); HELLO will not carry it"
        ),
    }
    let _reconcile = tokio::spawn(overlay.clone().reconcile_loop(shutdown_rx.clone()));
    let _vip_lease = tokio::spawn(overlay.clone().vip_watchdog(shutdown_rx.clone()));
    let catalog = Arc::new(catalog);
    // `[update] auto`: follow the version the control plane advertises (docs/update.md).
    let _auto = crate::update::daemon_side::spawn_auto(
        update_config,
        cfg_rx.clone(),
        state.advertised_version(),
        shutdown_rx.clone(),
    );
    let (mut link, dispatcher) = dispatch::spawn_with_audit(
        catalog.clone(),
        DispatchConfig::from_settings(&cfg.agent),
        journal,
        Some(audit),
        shutdown_rx.clone(),
    );
    let mut ctl = Control {
        shutdown: shutdown_rx.clone(),
        reconnect: reconnect_rx,
        grace: cfg.agent.shutdown_grace,
        renew: renew_rx,
    };
    // `runos status`: the local admin socket (see admin.rs, status.rs); removed on drop.
    let status = &state.status;
    let _admin = crate::daemon::admin::start(
        &cfg.paths.admin_socket(),
        crate::daemon::admin::AdminState {
            state: state.clone(),
            dispatcher: link.inbound.downgrade(),
            renew: Some(renew_tx),
            reconnect: Some(reload_tx),
            overlay: Some(overlay.clone()),
        },
    );
    tracing::info!(version = crate::agent_version(), types = ?catalog.types(), "agent started");
    notify::ready();

    let mut backoff = Backoff::new(cfg.agent.reconnect_initial, cfg.agent.reconnect_max);
    loop {
        if *ctl.shutdown.borrow() {
            drain_disconnected(&mut link, ctl.grace).await;
            break;
        }
        let cfg = cfg_rx.borrow().clone();
        ctl.grace = cfg.agent.shutdown_grace;
        let mut wait_max = false;
        let mut stable = false;
        match crate::credentials::recover(&cfg.paths) {
            Ok(crate::credentials::Recovery::Clean) => {}
            Ok(r) => tracing::info!(outcome = ?r, "finished an interrupted credential switch"),
            Err(e) => tracing::error!("cannot finish an interrupted credential switch: {e}"),
        }
        match identity::load(&cfg) {
            Err(e) => {
                tracing::error!("cannot connect: {e}");
                status.cannot_connect(&format!("cannot connect: {e}")); // `runos status`
            }
            Ok(id) => {
                status.connecting(&crate::net::addr(&id.host, id.port)); // `runos status`
                notify::status(&format!(
                    "connecting to {}",
                    crate::net::addr(&id.host, id.port)
                ));
                let params = SessionParams {
                    identity: id,
                    max_frame_bytes: cfg.agent.max_frame_bytes,
                    instruction_types: catalog.types(),
                    paths: cfg.paths.clone(),
                    write_timeout: cfg.agent.write_timeout,
                    state: state.clone(),
                };
                let rep = session::run(&params, &mut link, &mut ctl).await;
                state.session_ended(&rep.end); // `runos status`
                stable = rep
                    .welcomed_at
                    .is_some_and(|t| t.elapsed() >= cfg.agent.stable_after);
                match rep.end {
                    SessionEnd::Shutdown => {
                        drain_disconnected(&mut link, ctl.grace).await;
                        break;
                    }
                    SessionEnd::Renewed => {
                        let path = config_file.clone();
                        let offset = state.trusted_clock_offset();
                        let endorsement = state.renewal.take_endorsement();
                        let _ = tokio::task::spawn_blocking(move || {
                            crate::credentials::renew::follow_ca_logged(&path, endorsement, offset)
                        })
                        .await;
                        backoff.reset();
                        continue;
                    }
                    SessionEnd::Reconnect => {
                        backoff.reset();
                        continue;
                    }
                    SessionEnd::Revoked(m) => {
                        tracing::error!(
                            "this node is revoked by the control plane ({m}); retrying only every {} s; re-register the node to restore it",
                            backoff.max().as_secs()
                        );
                        wait_max = true;
                    }
                    SessionEnd::Incompatible(m) => {
                        tracing::error!(
                            "the control plane speaks another protocol version ({m}); retrying only every {} s; install an agent version that matches the control plane",
                            backoff.max().as_secs()
                        );
                        wait_max = true;
                    }
                    SessionEnd::Failed(m) => tracing::warn!("session ended: {m}"),
                    SessionEnd::ConnectFailed(m) => tracing::warn!("cannot connect: {m}"),
                }
            }
        }
        let b = Backoff::new(cfg.agent.reconnect_initial, cfg.agent.reconnect_max);
        if b.max() != backoff.max() {
            backoff = b;
        }
        let delay = if wait_max {
            backoff.max()
        } else if stable {
            // The control plane was there a moment ago (most often it restarted): come back
            // soon, with the backoff from its start.
            backoff.after_stable(&mut rand::rng())
        } else {
            backoff.next_delay(&mut rand::rng())
        };
        notify::status(&format!(
            "disconnected; next attempt in {} ms",
            delay.as_millis()
        ));
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after backoff"
        );
        wait_disconnected(&mut link, &mut ctl, delay).await;
    }
    status.stopping(); // `runos status`
    notify::stopping();
    drop(link);
    let _ = tokio::time::timeout(Duration::from_secs(5), dispatcher).await;
    tracing::info!("agent stopped");
    Ok(())
}

/// Open the journal in `state_dir` (created 0700) and report what the previous run left
/// unfinished. Those cut short and not safe to re-run are answered `interrupted` by the
/// journal itself (the replies wait in it for the next WELCOME); the journal logs a warning for
/// each (tag and type) and for a torn tail it cut.
///
/// Leftover process groups of instructions the previous run left running are killed before
/// this, from the registry in the run directory (see `runos_executors::host::leftover`).
///
/// Also opens the audit log (see `audit.rs`) and writes back, from the journal, the lines a
/// crash lost: those of the `interrupted` replies just stored, and of any reply whose line a
/// crash between the journal's `finished` record and the audit write prevented.
fn open_journal(
    state_dir: &std::path::Path,
    sync: config::JournalSync,
) -> Result<(Journal, AuditLog), DaemonError> {
    if sync == config::JournalSync::Never {
        tracing::warn!(
            "agent.journal_sync = \"never\" (or agent.journal_fsync = false): the journal is not synced to disk; a power loss or a crash of the machine may lose or repeat instructions (for benchmarks only)"
        );
    }
    let limits = runos_journal::Limits {
        sync: sync.mode(),
        ..runos_journal::Limits::default()
    };
    let (journal, rec) = Journal::open(state_dir, limits, JOURNAL_POLICY).map_err(|e| {
        fail(
            Exit::Failure,
            format!("cannot open the instruction journal: {e}"),
        )
    })?;
    let s = journal.stats();
    tracing::info!(
        path = %journal.path().display(),
        entries = s.entries,
        unacked = s.unacked,
        interrupted = rec.interrupted.len(),
        rerunnable = rec.rerunnable.len(),
        never_started = rec.never_started.len(),
        expired = rec.expired,
        truncated = rec.truncated.is_some(),
        "journal opened"
    );
    let mut audit = AuditLog::new(state_dir, crate::daemon::audit::DEFAULT_MAX_BYTES);
    audit.backfill(&answered_newest_first(&journal));
    Ok((journal, audit))
}

/// What the journal learns of instruction types, from the protocol crate's catalog: which are
/// safe to re-run and which have secret replies.
pub const JOURNAL_POLICY: runos_journal::Policy = runos_journal::Policy {
    safe_to_rerun: runos_protocol::instructions::safe_to_rerun,
    secret_reply: runos_protocol::instructions::secret_reply,
};

/// The journal's final replies with their entries, newest first, as many as the audit log's
/// recovery looks at. A secret reply discarded after its ACK has no body left and is skipped:
/// it needs no line written back (its line was written before it was sent, and a crash before
/// that line leaves the reply unacknowledged, hence whole, at the next start).
fn answered_newest_first(
    journal: &Journal,
) -> Vec<(runos_journal::EntryView, runos_protocol::Envelope)> {
    journal
        .answered_newest_first(crate::daemon::audit::BACKFILL_MAX)
        .into_iter()
        .filter_map(|tag| match journal.lookup(&tag) {
            runos_journal::Lookup::Done(reply) => Some((journal.get(&tag)?, reply)),
            _ => None,
        })
        .collect()
}

/// Wait `delay` while disconnected: replies produced meanwhile stay in the journal (resent after
/// the next WELCOME), LOG lines are dropped. Returns early on shutdown or a forced reconnect.
async fn wait_disconnected(link: &mut DispatchLink, ctl: &mut Control, delay: Duration) {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return,
            _ = session::until_shutdown(&mut ctl.shutdown) => return,
            _ = ctl.reconnect.changed() => return,
            r = link.replies.recv() => if r.is_none() { return },
            Some(req) = ctl.renew.recv() => {
                let _ = req.respond.send(Err(crate::credentials::renew::RenewError::Unreachable(
                    "the agent is not connected to the control plane; it renews automatically once connected".into(),
                )));
            }
        }
    }
}

/// Shutdown while disconnected: let running instructions finish within the grace (their replies
/// cannot be sent now; the control plane redelivers unanswered instructions), then abort.
async fn drain_disconnected(link: &mut DispatchLink, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    let mut flight = link.in_flight.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("shutdown grace over; aborting running instructions");
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                if link.inbound.send(Inbound::AbortAll(done_tx)).await.is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
                }
                return;
            }
            _ = async { let _ = flight.wait_for(|n| *n == 0).await.is_ok(); } => return,
            r = link.replies.recv() => if r.is_none() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_only_for_server_or_paths() {
        let (a, _) = config::load(std::path::Path::new("/nonexistent/runos.toml")).unwrap();
        let mut b = a.clone();
        b.log.level = config::LogLevel::Debug;
        assert!(!needs_reconnect(&a, &b));
        b.server.l2_port = 1;
        assert!(needs_reconnect(&a, &b));
    }
}
