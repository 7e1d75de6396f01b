//! After the link swap: restart the service from outside the agent's own cgroup, hold the
//! health gate, roll back on failure.
//!
//! The agent (or `runos update`) launches `[update] restart_command`, by default
//! `systemd-run --unit=runos-update-<ts> --collect --quiet -- <runos> --config <config>
//! update-finish --from A --to B --previous <A's binary>`: a transient unit, so neither the
//! restart of `runos.service` nor the rollback is killed with the agent. `<runos>` is the
//! binary that is running now (version A, known to work), not the new one: the rollback must
//! not depend on the binary under test. `update-finish` ([`finish`]) runs
//! `service_restart_command`, then waits up to `health_timeout` for the agent on the admin
//! socket to report `agentVersion` B and connection state `connected`. Otherwise it points
//! `bin_link` back at A, restarts again, records B as refused for automatic updates, and
//! records the outcome (`update.json` `last`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use runos_executors::host::runner::{DetachedError, Runner, Spec};
use serde_json::{Value, json};

use super::state::{self, LastUpdate, Outcome, UpdateState};
use super::version::Version;
use super::{Swap, install};
use crate::config::Config;
use crate::exit::Exit;

/// Bound on the hand-off launcher (`systemd-run` returns once the unit started).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one service restart command.
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// Poll interval of the health gate.
const POLL: Duration = Duration::from_millis(250);

/// What happened after the install.
#[derive(Debug, Clone)]
pub enum AfterInstall {
    /// No restart (asked, or no agent running): the message says what happens next.
    NotRestarted(String),
    /// The hand-off finished with this record.
    Finished(LastUpdate),
    /// The hand-off was launched but its outcome is not known (or it could not be launched).
    Unknown(String),
}

/// The hand-off argv: `template` with `{runos}`, `{config}`, `{from}`, `{to}`, `{previous}`
/// and `{ts}` replaced in each argument.
pub fn handoff_argv(
    template: &[String],
    runos: &Path,
    config: &Path,
    from: Version,
    to: Version,
    previous: &Path,
) -> Vec<String> {
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
        .to_string();
    template
        .iter()
        .map(|a| {
            a.replace("{runos}", &runos.display().to_string())
                .replace("{config}", &config.display().to_string())
                .replace("{from}", &from.tag())
                .replace("{to}", &to.tag())
                .replace("{previous}", &previous.display().to_string())
                .replace("{ts}", &ts)
        })
        .collect()
}

/// Run `argv` through the process runner (its own process group and cgroup, SIGTERM then
/// SIGKILL at the timeout, capped output); `Err` says why it failed.
fn run(argv: Vec<String>, timeout: Duration, rt: &tokio::runtime::Handle) -> Result<(), String> {
    let shown = argv.join(" ");
    let mut spec = Spec::new(argv);
    spec.timeout = timeout;
    spec.output_cap = 16 * 1024;
    let out = rt
        .block_on(Runner::shared().run(spec))
        .map_err(|e| format!("`{shown}` could not be started: {e}"))?;
    if out.exit_code == Some(0) {
        Ok(())
    } else {
        Err(format!(
            "`{shown}` failed (exit {:?}{}): {}",
            out.exit_code,
            if out.timed_out() { ", timed out" } else { "" },
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(300)
                .collect::<String>()
        ))
    }
}

/// The running agent's status, when its admin socket answers.
fn agent_status(cfg: &Config) -> Option<Value> {
    crate::util::admin_client::request(&cfg.paths.admin_socket(), &json!({"op": "status"})).ok()
}

/// Launch the hand-off for `swap` (never waits for it).
/// Point `bin_link` back at the swap's previous target, if it still points at the new binary.
/// Whether it did.
pub fn revert_link(cfg: &Config, swap: &Swap) -> bool {
    install::link_target(&cfg.update.bin_link).is_ok_and(|t| t == swap.binary)
        && install::swap_link(&cfg.update.bin_link, &swap.previous_target).is_ok()
}

pub fn launch(cfg: &Config, config_path: &Path, swap: &Swap) -> Result<(), String> {
    let runos =
        std::env::current_exe().map_err(|e| format!("cannot find the running binary: {e}"))?;
    let argv = handoff_argv(
        &cfg.update.restart_command,
        &runos,
        config_path,
        swap.from,
        swap.to,
        &swap.previous_target,
    );
    tracing::info!(argv = ?argv, "launching the update hand-off");
    launch_detached(
        argv,
        LAUNCH_TIMEOUT,
        &cfg.paths.state_dir.join("update-handoff.log"),
    )
}

/// Run the launcher `argv` in the runner's detached mode
/// ([`Runner::launch_detached`]): wait (at most `timeout`) for it to exit 0, its output in
/// `log`, whose tail is in the error.
fn launch_detached(argv: Vec<String>, timeout: Duration, log: &Path) -> Result<(), String> {
    let shown = argv.join(" ");
    Runner::shared()
        .launch_detached(&argv, timeout, log)
        .map_err(|e| match e {
            DetachedError::EmptyArgv => "update.restart_command is empty".to_string(),
            DetachedError::Log(e) => format!("cannot create {}: {e}", log.display()),
            e => format!("`{shown}` {e}"),
        })
}

/// `runos update` after a successful install: launch the hand-off when an agent runs and
/// wait for its outcome.
pub fn after_install(
    cfg: &Config,
    config_path: &Path,
    swap: &Swap,
    no_restart: bool,
) -> AfterInstall {
    if no_restart {
        return AfterInstall::NotRestarted(format!(
            "not restarted (--no-restart): the agent runs {} until it restarts (systemctl restart runos); no health gate and no automatic rollback",
            swap.from.tag()
        ));
    }
    if agent_status(cfg).is_none() {
        state::record(&cfg.paths.state_dir, |st| {
            st.last = Some(LastUpdate::now(
                swap.from,
                swap.to,
                Outcome::Ok,
                "installed; the agent was not running",
            ));
        });
        return AfterInstall::NotRestarted(format!(
            "the agent is not running: it runs {} when it is started (systemctl start runos)",
            swap.to.tag()
        ));
    }
    let before = UpdateState::load(&cfg.paths.state_dir)
        .ok()
        .and_then(|st| st.last);
    if let Err(e) = launch(cfg, config_path, swap) {
        // Never leave the link on a version that was not health-gated.
        if revert_link(cfg, swap) {
            return AfterInstall::Unknown(format!(
                "{e}; {} stays installed, but the link was set back to {}, so the agent keeps running {}: fix the hand-off (update.restart_command) and run the update again",
                swap.to.tag(),
                swap.previous_target.display(),
                swap.from.tag()
            ));
        }
        return AfterInstall::Unknown(format!(
            "{e}; {} is installed and linked, but the agent was not restarted: restart it (systemctl restart runos), or roll back with `runos update --version {} --allow-downgrade`",
            swap.to.tag(),
            swap.from.tag()
        ));
    }
    // Restart, gate, maybe rollback and a second restart.
    let deadline = Instant::now() + cfg.update.health_timeout * 2 + RESTART_TIMEOUT * 2;
    while Instant::now() < deadline {
        if let Ok(st) = UpdateState::load(&cfg.paths.state_dir)
            && let Some(last) = st.last
            && last.to == swap.to
            && last.from == swap.from
            && Some(&last) != before.as_ref()
        {
            return AfterInstall::Finished(last);
        }
        std::thread::sleep(POLL);
    }
    AfterInstall::Unknown(
        "the update hand-off did not report within its bounds; see `runos status` and the journal of the runos-update-* unit"
            .to_string(),
    )
}

/// The pid of the agent if it reports `version` and is connected.
fn healthy(cfg: &Config, version: Version) -> Option<u64> {
    let s = agent_status(cfg)?;
    let ok = s
        .get("agentVersion")
        .and_then(Value::as_str)
        .is_some_and(|v| Version::parse_loose(v) == Ok(version))
        && s.pointer("/connection/state").and_then(Value::as_str) == Some("connected");
    if ok {
        s.get("pid").and_then(Value::as_u64).or(Some(0))
    } else {
        None
    }
}

/// How long the new agent must stay connected, as the same process, to pass the gate: a
/// version that crashes right after WELCOME must not pass.
const STAY_CONNECTED: Duration = Duration::from_secs(3);

/// Wait until the agent reports `version` and connected, and has stayed so (same pid) for
/// `stay`.
fn wait_healthy(cfg: &Config, version: Version, stay: Duration) -> bool {
    let end = Instant::now() + cfg.update.health_timeout;
    let mut since: Option<(u64, Instant)> = None;
    loop {
        match (healthy(cfg, version), since) {
            (Some(pid), Some((p, t))) if pid == p => {
                if t.elapsed() >= stay {
                    return true;
                }
            }
            (Some(pid), _) => {
                if stay.is_zero() {
                    return true;
                }
                since = Some((pid, Instant::now()));
            }
            (None, _) => since = None,
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// The outcome goes to the control plane in HELLO (`lastUpdate`): ask the agent to reconnect
/// now that it is recorded (best effort).
fn report_to_control_plane(cfg: &Config) {
    let _ =
        crate::util::admin_client::request(&cfg.paths.admin_socket(), &json!({"op": "reconnect"}));
}

/// `runos update-finish`: restart, health gate, rollback. Returns the exit code (0 healthy,
/// 14 rolled back, 1 when even the rollback did not bring the old version back).
pub fn finish(
    cfg: &Config,
    from: Version,
    to: Version,
    previous: &Path,
    rt: &tokio::runtime::Handle,
) -> Exit {
    let u = &cfg.update;
    let restart = || run(u.service_restart_command.clone(), RESTART_TIMEOUT, rt);
    let new_binary = install::version_binary(&u.install_dir, to);
    let mut problem = match restart() {
        Ok(()) => None,
        Err(e) => Some(format!("restarting the service failed: {e}")),
    };
    if problem.is_none() {
        if wait_healthy(cfg, to, STAY_CONNECTED) {
            let msg = format!("{} is running and connected", to.tag());
            tracing::info!(from = %from.tag(), to = %to.tag(), "update healthy");
            state::record(&cfg.paths.state_dir, |st| {
                st.last = Some(LastUpdate::now(from, to, Outcome::Ok, &msg));
            });
            report_to_control_plane(cfg);
            return Exit::Ok;
        }
        problem = Some(format!(
            "{} did not report version {} and connected within {}s",
            u.bin_link.display(),
            to.tag(),
            u.health_timeout.as_secs()
        ));
    }
    let problem = problem.unwrap_or_default();
    tracing::error!(from = %from.tag(), to = %to.tag(), %problem, "health gate failed; rolling back");
    // Roll back only if the link still points at the new version (nobody changed it since).
    let link_now = install::link_target(&u.bin_link).ok();
    let mut message = format!("{problem}; ");
    let mut exit = Exit::RolledBack;
    // Refused before anything restarts: the restarted (old) agent must not try the same version
    // again automatically while this gate is still finishing.
    state::record(&cfg.paths.state_dir, |st| st.refuse(to));
    if link_now.as_deref() == Some(new_binary.as_path()) {
        match install::swap_link(&u.bin_link, previous) {
            Ok(()) => {
                // The old version is known to work: connected once is enough.
                let back = restart().is_ok() && wait_healthy(cfg, from, Duration::ZERO);
                if back {
                    message.push_str(&format!(
                        "rolled back to {} (running and connected); {} is refused for automatic updates",
                        from.tag(),
                        to.tag()
                    ));
                } else {
                    message.push_str(&format!(
                        "rolled back the link to {}, but it did not report connected within {}s either",
                        from.tag(),
                        u.health_timeout.as_secs()
                    ));
                    exit = Exit::Failure;
                }
            }
            Err(e) => {
                message.push_str(&format!("the rollback failed: {e}"));
                exit = Exit::Failure;
            }
        }
    } else {
        message.push_str(&format!(
            "{} no longer points at {}; not rolled back",
            u.bin_link.display(),
            new_binary.display()
        ));
        exit = Exit::Failure;
    }
    state::record(&cfg.paths.state_dir, |st| {
        st.refuse(to);
        st.last = Some(LastUpdate::now(from, to, Outcome::RolledBack, &message));
    });
    report_to_control_plane(cfg);
    // The hand-off's stderr may be gone (a detached unit): never panic on a failed write.
    let _ = writeln!(std::io::stderr(), "runos: error: {message}");
    exit
}

/// The previous binary given to `update-finish`, checked to be in the install layout.
pub fn previous_path(p: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err("--previous must be an absolute path".into())
    }
}
