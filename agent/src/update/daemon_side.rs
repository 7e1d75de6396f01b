//! The daemon's side of updating: the `UPDATE_AGENT` executor and automatic updates to the
//! version the control plane advertises in WELCOME (`[update] auto = true`).
//!
//! Both install on a blocking thread: the configuration is read afresh from the file (so a
//! SIGHUP-reloaded `[update]` applies), then [`super::install_release`], then the hand-off
//! ([`super::handoff::launch`]), which restarts the service from outside the agent's cgroup. The
//! agent itself never stops here: a failure leaves it running the old version.
//!
//! `UPDATE_AGENT` launches the hand-off as an **after-ACK step** ([`RESTART_STEP`]): the reply
//! (`restart: true`) goes first, and the restart follows only once the control plane has
//! acknowledged it (protocol.md §10). A crash between the ACK and the step runs the step at the
//! next start, which launches the hand-off only if the agent still runs the version it updated
//! from. The executor and its step are registered by the agent (`catalog::with_updates`), not
//! in the executors crate: the updater and the configuration it reads live in the agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use runos_executors::{AfterAck, Ctx, Done};
use runos_protocol::control::LogLevel;
use runos_protocol::instructions::{UpdateAgent, UpdateAgentResponse};
use runos_protocol::{ErrorCode, ErrorPayload};
use tokio::sync::watch;

use super::version::Version;
use super::{Installed, Request, Swap, UpdateError, handoff};
use crate::config::{self, Config};
use crate::exit::Exit;

/// The after-ACK step of `UPDATE_AGENT`: launch the hand-off.
pub const RESTART_STEP: &str = "update-agent-restart";

/// [`RESTART_STEP`] with the configuration at `config_path`: launch the hand-off described by
/// `params` (on a blocking thread).
pub async fn restart(config_path: PathBuf, params: serde_json::Value) -> Result<(), String> {
    tokio::task::spawn_blocking(move || restart_step(&config_path, params))
        .await
        .map_err(|e| format!("the hand-off failed: {e}"))?
}

/// The parameters of [`RESTART_STEP`] (on disk until it ran; no secret).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestartParams {
    from: String,
    to: String,
    previous_target: PathBuf,
    binary: PathBuf,
}

/// [`RESTART_STEP`]: launch the hand-off of the installed swap, unless the agent no longer runs
/// the version it updated from (a crash and restart already brought the new one up) or
/// `bin_link` no longer points at the new binary (a hand-off already ran and rolled back). A
/// step may run twice (the hand-off can stop the agent before the step's file is removed):
/// these checks make the second run a no-op.
fn restart_step(config_path: &Path, params: serde_json::Value) -> Result<(), String> {
    let p: RestartParams = serde_json::from_value(params).map_err(|e| e.to_string())?;
    let parse = |v: &str| Version::parse_loose(v).map_err(|e| e.to_string());
    let swap = Swap {
        from: parse(&p.from)?,
        to: parse(&p.to)?,
        previous_target: p.previous_target,
        binary: p.binary,
        verified: None,
    };
    let current = Version::current().map_err(|e| e.to_string())?;
    if current != swap.from {
        tracing::info!(running = %current.tag(), from = %swap.from.tag(), "the agent no longer runs the version it updated from; no hand-off");
        return Ok(());
    }
    let (cfg, _) = config::load(config_path).map_err(|e| e.to_string())?;
    // A hand-off that already ran and rolled back (the agent died before removing this step)
    // set the link back: never launch it again.
    if !super::install::link_target(&cfg.update.bin_link).is_ok_and(|t| t == swap.binary) {
        tracing::info!(to = %swap.to.tag(), "bin_link no longer points at the installed version; no hand-off");
        return Ok(());
    }
    launch(&cfg, config_path, &swap).map_err(|e| e.message)
}

/// First wait before an automatic update that failed is tried again (a release still being
/// published, a network fault); it doubles up to [`AUTO_RETRY_MAX`].
const AUTO_RETRY_FIRST: Duration = Duration::from_secs(5);
/// Longest wait between attempts at the same advertised version.
const AUTO_RETRY_MAX: Duration = Duration::from_secs(3600);

/// When the automatic updater may try `version` again after `failures` failed attempts.
fn auto_retry_after(failures: u32) -> Duration {
    AUTO_RETRY_FIRST
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(AUTO_RETRY_MAX)
}

/// One advertised version's attempts.
#[derive(Debug, Clone, Copy)]
struct Attempts {
    failures: u32,
    /// `None` once installed (never again in this run).
    next: Option<Instant>,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The running version.
    pub from: Version,
    /// The version now installed.
    pub to: Version,
    /// Whether the hand-off (restart, health gate) was launched.
    pub restart: bool,
}

/// Read the configuration at `config_path` and install `req` (no hand-off). Blocking.
fn install(
    config_path: &Path,
    req: &Request,
    rt: &tokio::runtime::Handle,
) -> Result<(Config, Installed), UpdateError> {
    let (cfg, _) = config::load(config_path).map_err(|e| UpdateError {
        exit: Exit::NotRegistered,
        message: e.to_string(),
    })?;
    let installed = super::install_release(&cfg, req, rt)?;
    Ok((cfg, installed))
}

/// Install `req` with the configuration at `config_path` and launch the hand-off at once
/// (automatic updates). Blocking.
pub fn apply(
    config_path: &Path,
    req: &Request,
    rt: &tokio::runtime::Handle,
) -> Result<Applied, UpdateError> {
    let (cfg, installed) = install(config_path, req, rt)?;
    match installed {
        Installed::AlreadyCurrent(v) => Ok(Applied {
            from: v,
            to: v,
            restart: false,
        }),
        Installed::Swapped(s) => {
            if req.cancelled() {
                return Err(undo(
                    &cfg,
                    &s,
                    "the update was cancelled (the instruction's deadline passed, or it was cancelled) before the restart".to_string(),
                ));
            }
            launch(&cfg, config_path, &s)?;
            Ok(Applied {
                from: s.from,
                to: s.to,
                restart: true,
            })
        }
    }
}

/// Launch the hand-off of `s`; on failure, set the link back ([`undo`]).
fn launch(cfg: &Config, config_path: &Path, s: &Swap) -> Result<(), UpdateError> {
    handoff::launch(cfg, config_path, s).map_err(|e| undo(cfg, s, e))
}

/// The error of an update installed but not restarted into (`e`): the link is set back, the
/// failure recorded.
fn undo(cfg: &Config, s: &Swap, e: String) -> UpdateError {
    // Never leave the link on a version that was not health-gated: the next restart (a crash, a
    // reboot) would run it with no gate and no rollback.
    let reverted = handoff::revert_link(cfg, s);
    let message = if reverted {
        format!(
            "{e}; {} stays installed but the link was set back to {}: the agent keeps running {}",
            s.to.tag(),
            s.previous_target.display(),
            s.from.tag()
        )
    } else {
        format!(
            "{e}; {} is installed and linked, but the agent was not restarted",
            s.to.tag()
        )
    };
    super::state::record(&cfg.paths.state_dir, |st| {
        st.last = Some(super::state::LastUpdate::now(
            s.from,
            s.to,
            super::state::Outcome::Failed,
            &message,
        ));
    });
    UpdateError {
        exit: Exit::Failure,
        message,
    }
}

/// Whether the hand-off's launcher (`update.restart_command[0]`) is an executable file.
fn launcher_ready(cfg: &Config) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let program = cfg
        .update
        .restart_command
        .first()
        .ok_or_else(|| "update.restart_command is empty".to_string())?;
    use runos_executors::host::runner::{agent_path, resolve_program};
    let path = resolve_program(program, &agent_path())
        .map_err(|e| format!("the hand-off launcher `{program}` cannot be used: {e}"))?;
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        _ => Err(format!(
            "the hand-off launcher {} is not an executable file",
            path.display()
        )),
    }
}

/// The `UPDATE_AGENT` executor: download, verify and install; the reply says whether a restart
/// follows, and the restart itself is its after-ACK step ([`RESTART_STEP`]).
pub async fn update_agent(
    config_path: PathBuf,
    ctx: Ctx,
    p: UpdateAgent,
) -> Result<Done<UpdateAgentResponse>, ErrorPayload> {
    // The protocol crate validated `version`'s shape (§7.2); a release version is stricter
    // (no leading zeros), so this can still refuse it, naming the field.
    let target = Version::parse_loose(&p.version)
        .map_err(|e| ErrorPayload::new(ErrorCode::BadPayload, format!("field `version` {e}")))?;
    ctx.log(
        LogLevel::Info,
        &format!("downloading and verifying runos {}", target.tag()),
    );
    // The context's token is cancelled on deadline, CANCEL and shutdown: the blocking updater
    // then stops at its next step instead of installing anyway.
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch_cancel = {
        let (token, flag) = (ctx.cancel.clone(), cancel.clone());
        tokio::spawn(async move {
            token.cancelled().await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let req = Request {
        target,
        allow_downgrade: p.allow_downgrade,
        automatic: false,
        progress: false,
        cancel: Some(cancel),
        running: None,
    };
    let rt = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || {
        let (cfg, installed) = install(&config_path, &req, &rt)?;
        if let Installed::Swapped(s) = &installed {
            if req.cancelled() {
                return Err(undo(
                    &cfg,
                    s,
                    "the update was cancelled (the instruction's deadline passed, or it was cancelled) before the restart".to_string(),
                ));
            }
            // The hand-off runs after the ACK; a launcher that is not there fails now, while
            // the control plane can still be told.
            launcher_ready(&cfg).map_err(|e| undo(&cfg, s, e))?;
        }
        Ok(installed)
    })
    .await;
    watch_cancel.abort();
    let installed = result
        .map_err(|e| ErrorPayload::new(ErrorCode::Internal, format!("the updater failed: {e}")))?
        .map_err(|e| ErrorPayload::new(ErrorCode::Failed, e.message))?;
    match installed {
        Installed::AlreadyCurrent(v) => Ok(Done::reply(UpdateAgentResponse {
            previous_version: v.to_string(),
            new_version: v.to_string(),
            restart: false,
        })),
        Installed::Swapped(s) => {
            ctx.log(
                LogLevel::Info,
                &format!(
                    "runos {} verified and installed; restarting into it once this reply is acknowledged",
                    s.to.tag()
                ),
            );
            let params = RestartParams {
                from: s.from.to_string(),
                to: s.to.to_string(),
                previous_target: s.previous_target.clone(),
                binary: s.binary.clone(),
            };
            Ok(Done::then(
                UpdateAgentResponse {
                    previous_version: s.from.to_string(),
                    new_version: s.to.to_string(),
                    restart: true,
                },
                AfterAck {
                    step: RESTART_STEP.to_string(),
                    params: serde_json::to_value(params).unwrap_or_default(),
                },
            ))
        }
    }
}

/// Automatic updates: while `[update] auto` is on and the agent is connected, a newer version
/// advertised by the control plane (and not refused after a failed health gate) is installed;
/// a failed attempt (download, verification, install) is logged, recorded in `update.json` and
/// tried again after a backoff (5 s doubling, at most 1 h), since a release may still be being
/// published or the network may be down. Once installed, a version is not tried again in this
/// run.
///
/// `advertised` is the version the control plane of the current session advertises (`None`
/// while not connected; `AgentState::advertised_version`): the updater wakes when it or the
/// configuration changes, or when a retry is due; it does not poll.
pub fn spawn_auto(
    config_path: PathBuf,
    cfg_rx: watch::Receiver<Config>,
    advertised: watch::Receiver<Option<String>>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let looks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(auto_loop(config_path, cfg_rx, advertised, shutdown, looks))
}

/// The automatic updater's loop ([`spawn_auto`]); `looks` counts its wake-ups.
async fn auto_loop(
    config_path: PathBuf,
    mut cfg_rx: watch::Receiver<Config>,
    mut advertised: watch::Receiver<Option<String>>,
    mut shutdown: watch::Receiver<bool>,
    looks: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    {
        let mut tried = BTreeMap::new();
        // A closed channel (its sender dropped) never wakes the updater again.
        let (mut cfg_open, mut adv_open) = (true, true);
        loop {
            if *shutdown.borrow() {
                return;
            }
            looks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let retry_at = auto_step(&config_path, &cfg_rx, &mut advertised, &mut tried).await;
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = advertised.changed(), if adv_open => adv_open = r.is_ok(),
                r = cfg_rx.changed(), if cfg_open => cfg_open = r.is_ok(),
                _ = retry => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// One look at the advertised version: installs it when it is due. Returns when to look again
/// for a retry (`None`: only when something changes).
async fn auto_step(
    config_path: &Path,
    cfg_rx: &watch::Receiver<Config>,
    advertised: &mut watch::Receiver<Option<String>>,
    tried: &mut BTreeMap<Version, Attempts>,
) -> Option<Instant> {
    let adv = advertised.borrow_and_update().clone();
    if !cfg_rx.borrow().update.auto {
        return None;
    }
    let (Some(adv), Ok(current)) = (
        adv.and_then(|v| Version::parse_loose(&v).ok()),
        Version::current(),
    ) else {
        return None;
    };
    if adv <= current {
        return None;
    }
    if let Some(a) = tried.get(&adv) {
        match a.next {
            None => return None,
            Some(at) if Instant::now() < at => return Some(at),
            Some(_) => {}
        }
    }
    // A version that failed its health gate is not retried automatically (and the
    // rolled_back record stays the last outcome).
    let state_dir = cfg_rx.borrow().paths.state_dir.clone();
    if super::state::UpdateState::load(&state_dir).is_ok_and(|st| st.is_refused(adv)) {
        tracing::info!(version = %adv.tag(), "advertised version was refused after a failed health gate; not installing it automatically");
        // Said once per run: later wake-ups (each reconnect) skip it without reading the state.
        tried.insert(
            adv,
            Attempts {
                failures: 0,
                next: None,
            },
        );
        return None;
    }
    tracing::info!(from = %current.tag(), to = %adv.tag(), "automatic update to the advertised version");
    let req = Request {
        target: adv,
        allow_downgrade: false,
        automatic: true,
        progress: false,
        cancel: None,
        running: None,
    };
    let rt = tokio::runtime::Handle::current();
    let path = config_path.to_path_buf();
    let outcome = tokio::task::spawn_blocking(move || apply(&path, &req, &rt)).await;
    let a = tried.entry(adv).or_insert(Attempts {
        failures: 0,
        next: None,
    });
    let failed = |a: &mut Attempts| {
        a.failures = a.failures.saturating_add(1);
        let wait = auto_retry_after(a.failures);
        a.next = Some(Instant::now() + wait);
        wait.as_secs()
    };
    match outcome {
        Ok(Ok(done)) => {
            a.next = None;
            tracing::info!(to = %done.to.tag(), restart = done.restart, "automatic update installed")
        }
        Ok(Err(e)) => {
            let retry_secs = failed(a);
            tracing::warn!(to = %adv.tag(), error = %e.message, retry_secs, "automatic update failed")
        }
        Err(e) => {
            let retry_secs = failed(a);
            tracing::warn!(error = %e, retry_secs, "automatic updater failed")
        }
    }
    a.next
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Idle means idle: the updater looks only when the advertised version or the
    /// configuration changes, never on a timer (an hour of paused time passes without a look).
    #[tokio::test(start_paused = true)]
    async fn the_updater_sleeps_until_something_changes() {
        use std::sync::atomic::Ordering::Relaxed;
        let (mut cfg, _) = config::load(Path::new("/nonexistent/runos.toml")).unwrap();
        cfg.update.auto = false;
        let (cfg_tx, cfg_rx) = watch::channel(cfg.clone());
        let (adv_tx, adv_rx) = watch::channel(None::<String>);
        let (_shutdown_tx, shutdown_rx) = watch::channel(false);
        let looks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn(auto_loop(
            "/nonexistent/runos.toml".into(),
            cfg_rx,
            adv_rx,
            shutdown_rx,
            looks.clone(),
        ));
        let settle = || tokio::time::sleep(Duration::from_secs(3600));
        settle().await;
        assert_eq!(
            looks.load(Relaxed),
            1,
            "one look at start, then none for an hour"
        );
        // A newer version advertised while `auto` is off: one look, no install, no timer.
        adv_tx.send_replace(Some("v999.0.0".into()));
        settle().await;
        assert_eq!(looks.load(Relaxed), 2);
        // `auto` on, but the advertised version is not newer: one look, then asleep again.
        adv_tx.send_replace(Some("v0.0.1".into()));
        settle().await;
        cfg.update.auto = true;
        cfg_tx.send_replace(cfg);
        settle().await;
        assert_eq!(looks.load(Relaxed), 4);
        task.abort();
    }

    #[test]
    fn automatic_retries_back_off_and_are_capped() {
        assert_eq!(auto_retry_after(1), Duration::from_secs(5));
        assert_eq!(auto_retry_after(2), Duration::from_secs(10));
        assert_eq!(auto_retry_after(5), Duration::from_secs(80));
        assert_eq!(auto_retry_after(30), AUTO_RETRY_MAX);
        assert_eq!(auto_retry_after(u32::MAX), AUTO_RETRY_MAX);
    }
}
