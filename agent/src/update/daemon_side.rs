//! The daemon's side of updating: the `UPDATE_AGENT` executor and automatic updates to the
//! version the control plane advertises in WELCOME (`[update] auto = true`).
//!
//! Both run [`apply`] on a blocking thread: the configuration is read afresh from the file
//! (so a SIGHUP-reloaded `[update]` applies), then [`super::install_release`], then the
//! hand-off ([`super::handoff::launch`]), which restarts the service from outside the agent's
//! cgroup. The agent itself never stops here: a failure leaves it running the old version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use runos_protocol::control::LogLevel;
use runos_protocol::instructions::{UpdateAgent, UpdateAgentResponse};
use runos_protocol::{ErrorCode, ErrorPayload};
use tokio::sync::watch;

use super::version::Version;
use super::{Installed, Request, UpdateError, handoff};
use crate::catalog::ExecCtx;
use crate::config::{self, Config};
use crate::exit::Exit;

/// How often the automatic updater looks at the advertised version (in memory, no I/O).
const AUTO_POLL: Duration = Duration::from_secs(2);
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

/// Install `req` with the configuration at `config_path` and launch the hand-off. Blocking.
pub fn apply(
    config_path: &Path,
    req: &Request,
    rt: &tokio::runtime::Handle,
) -> Result<Applied, UpdateError> {
    let (cfg, _) = config::load(config_path).map_err(|e| UpdateError {
        exit: Exit::NotRegistered,
        message: e.to_string(),
    })?;
    match super::install_release(&cfg, req, rt)? {
        Installed::AlreadyCurrent(v) => Ok(Applied {
            from: v,
            to: v,
            restart: false,
        }),
        Installed::Swapped(s) => {
            let launched = if req.cancelled() {
                Err("the update was cancelled (the instruction's deadline passed, or it was cancelled) before the restart".to_string())
            } else {
                handoff::launch(&cfg, config_path, &s).map_err(|e| e.to_string())
            };
            launched.map_err(|e| {
                // Never leave the link on a version that was not health-gated: the next restart
                // (a crash, a reboot) would run it with no gate and no rollback.
                let reverted = handoff::revert_link(&cfg, &s);
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
            })?;
            Ok(Applied {
                from: s.from,
                to: s.to,
                restart: true,
            })
        }
    }
}

/// The `UPDATE_AGENT` executor.
pub async fn update_agent(
    config_path: PathBuf,
    ctx: ExecCtx,
    p: UpdateAgent,
) -> Result<UpdateAgentResponse, ErrorPayload> {
    let target = Version::parse_loose(&p.version)
        .map_err(|e| ErrorPayload::new(ErrorCode::BadPayload, format!("field `version` {e}")))?;
    ctx.log(
        LogLevel::Info,
        &format!("downloading and verifying runos {}", target.tag()),
    );
    // Dropping this future (the instruction's deadline, a CANCEL) sets the flag: the blocking
    // updater stops at its next step instead of installing and restarting anyway.
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut guard = CancelOnDrop(Some(cancel.clone()));
    let req = Request {
        target,
        allow_downgrade: p.allow_downgrade,
        automatic: false,
        progress: false,
        cancel: Some(cancel),
        running: None,
    };
    let rt = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || apply(&config_path, &req, &rt))
        .await
        .map_err(|e| ErrorPayload::new(ErrorCode::Internal, format!("the updater failed: {e}")));
    guard.0 = None;
    let result = result?;
    match result {
        Ok(a) => {
            if a.restart {
                ctx.log(
                    LogLevel::Info,
                    &format!(
                        "runos {} verified and installed; restarting into it",
                        a.to.tag()
                    ),
                );
            }
            Ok(UpdateAgentResponse {
                previous_version: a.from.to_string(),
                new_version: a.to.to_string(),
                restart: a.restart,
            })
        }
        Err(e) => Err(ErrorPayload::new(ErrorCode::Failed, e.message)),
    }
}

/// Sets its flag when dropped (unless disarmed by taking it).
struct CancelOnDrop(Option<std::sync::Arc<std::sync::atomic::AtomicBool>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Automatic updates: while `[update] auto` is on and the agent is connected, a newer version
/// advertised by the control plane (and not refused after a failed health gate) is installed;
/// a failed attempt (download, verification, install) is logged, recorded in `update.json` and
/// tried again after a backoff (5 s doubling, at most 1 h), since a release may still be being
/// published or the network may be down. Once installed, a version is not tried again in this
/// run.
pub fn spawn_auto(
    config_path: PathBuf,
    cfg_rx: watch::Receiver<Config>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    static TRIED: Mutex<BTreeMap<Version, Attempts>> = Mutex::new(BTreeMap::new());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(AUTO_POLL) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() || !cfg_rx.borrow().update.auto {
                continue;
            }
            let status = crate::status::global();
            if !matches!(status.state(), crate::status::ConnState::Connected { .. }) {
                continue;
            }
            let (Some(adv), Ok(current)) = (
                status
                    .advertised_version()
                    .and_then(|v| Version::parse_loose(&v).ok()),
                Version::current(),
            ) else {
                continue;
            };
            if adv <= current {
                continue;
            }
            {
                let tried = TRIED.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(a) = tried.get(&adv)
                    && a.next.is_none_or(|at| Instant::now() < at)
                {
                    continue;
                }
            }
            // A version that failed its health gate is not retried automatically (and the
            // rolled_back record stays the last outcome).
            let state_dir = cfg_rx.borrow().paths.state_dir.clone();
            if super::state::UpdateState::load(&state_dir).is_ok_and(|st| st.is_refused(adv)) {
                tracing::info!(version = %adv.tag(), "advertised version was refused after a failed health gate; not installing it automatically");
                continue;
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
            let path = config_path.clone();
            let outcome = tokio::task::spawn_blocking(move || apply(&path, &req, &rt)).await;
            let mut tried = TRIED.lock().unwrap_or_else(|p| p.into_inner());
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
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_retries_back_off_and_are_capped() {
        assert_eq!(auto_retry_after(1), Duration::from_secs(5));
        assert_eq!(auto_retry_after(2), Duration::from_secs(10));
        assert_eq!(auto_retry_after(5), Duration::from_secs(80));
        assert_eq!(auto_retry_after(30), AUTO_RETRY_MAX);
        assert_eq!(auto_retry_after(u32::MAX), AUTO_RETRY_MAX);
    }
}
