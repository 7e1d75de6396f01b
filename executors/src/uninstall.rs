//! `UNINSTALL_NODE` (and `runos uninstall`): take what runos put on the node off it again, in
//! order, each step reported and each idempotent (it checks before it acts, so running the
//! whole uninstall again after a failure finishes what is left):
//!
//! 1. `stop-services`: stop the workloads' services (`[uninstall] stop_units`, default kubelet
//!    and containerd); a unit that is not loaded is skipped;
//! 2. `kubeadm-reset`: `kubeadm reset -f`, bounded; skipped when kubeadm is not installed;
//! 3. `overlay`: the overlay executor's own removal (the interface, its peers and VIP, the saved
//!    set, the VIP fence, the node's WireGuard key);
//! 4. `packages`: purge exactly the packages the package executor recorded as installed by
//!    this agent (never a fixed list);
//! 5. `files`: remove what the [`Manifest`] lists, and only while it
//!    still holds what runos wrote (a file changed since is kept and said). Nothing else: the
//!    host's firewall and sysctls are never flushed or reset wholesale.
//!
//! Steps 2 to 5 are critical: the first one that fails stops the uninstall, and the `ERROR`
//! names it and the steps not done (the node keeps what a retry needs: a failed reset keeps
//! kubeadm installed). Step 1 is best effort. On success the reply is `NO_CONTENT`, and only
//! after its `ACK` does the agent remove its identity and stop (the after-ACK step
//! [`FINISH_STEP`], registered by the agent).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use runos_protocol::control::LogLevel;
use runos_protocol::control::NoContent;
use runos_protocol::instructions::UninstallNode;
use runos_protocol::{ErrorCode, ErrorPayload};
use serde::Serialize;

use crate::context::{Ctx, Secrecy};
use crate::contract::{AfterAck, Done};
use crate::handle::{BoxFuture, RunError, Spec};
use crate::manifest::{self, Manifest};
use crate::overlay::Overlay;

/// The after-ACK step of `UNINSTALL_NODE`: remove the identity and stop (the agent registers it).
pub const FINISH_STEP: &str = "uninstall-finish";

/// How the uninstall runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// systemd units stopped first (best effort).
    pub stop_units: Vec<String>,
    /// Whether `kubeadm reset -f` runs (when kubeadm is installed).
    pub kubeadm_reset: bool,
    /// Bound of `kubeadm reset`.
    pub reset_timeout: Duration,
    /// Bound of each `systemctl stop`.
    pub stop_timeout: Duration,
    /// A directory that exists only while systemd runs (`/run/systemd/system`): without it no
    /// service is stopped.
    pub systemd_marker: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stop_units: vec!["kubelet.service".into(), "containerd.service".into()],
            kubeadm_reset: true,
            reset_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(60),
            systemd_marker: PathBuf::from("/run/systemd/system"),
        }
    }
}

/// The package side of the uninstall (the package executor, behind a trait: this crate does not
/// depend on it).
pub trait Packages: Send + Sync {
    /// The packages this agent installed that dpkg still has (installed or config files).
    fn recorded(&self, ctx: Ctx) -> BoxFuture<Result<Vec<String>, ErrorPayload>>;
    /// Purge `names` (and forget them once purged).
    fn purge(&self, ctx: Ctx, names: Vec<String>) -> BoxFuture<Result<(), ErrorPayload>>;
}

/// What became of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// It ran and did what it should.
    Done,
    /// There was nothing to do.
    Skipped,
    /// It failed.
    Failed,
    /// It did not run (an earlier critical step failed).
    NotDone,
}

/// One step's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    /// The step's name.
    pub step: &'static str,
    /// Whether its failure stops the uninstall.
    pub critical: bool,
    /// What became of it.
    pub status: StepStatus,
    /// What it did, or why it failed.
    pub detail: String,
}

/// The whole uninstall's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Every step, in order.
    pub steps: Vec<StepReport>,
    /// Whether every critical step is done or had nothing to do.
    pub ok: bool,
}

impl Report {
    /// The `ERROR` of a report that is not ok: names the failed step and the steps not done.
    pub fn error(&self) -> Option<ErrorPayload> {
        if self.ok {
            return None;
        }
        let failed = self
            .steps
            .iter()
            .find(|s| s.status == StepStatus::Failed && s.critical)?;
        let names = |st: StepStatus| {
            self.steps
                .iter()
                .filter(|s| s.status == st)
                .map(|s| s.step)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let not_done = names(StepStatus::NotDone);
        let done = names(StepStatus::Done);
        Some(ErrorPayload::new(
            ErrorCode::Failed,
            format!(
                "uninstall incomplete: step {} failed: {}; not done: {}; done: {}. Fix the cause and send UNINSTALL_NODE again (finished steps are skipped)",
                failed.step,
                failed.detail,
                if not_done.is_empty() {
                    "none"
                } else {
                    &not_done
                },
                if done.is_empty() { "none" } else { &done },
            ),
        ))
    }
}

/// The uninstall of one agent.
#[derive(Clone)]
pub struct Uninstall {
    settings: Settings,
    overlay: Option<Arc<Overlay>>,
    packages: Option<Arc<dyn Packages>>,
    manifest: Arc<Manifest>,
}

impl std::fmt::Debug for Uninstall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uninstall")
            .field("settings", &self.settings)
            .field("manifest", &self.manifest.path())
            .finish_non_exhaustive()
    }
}

/// One step's outcome before it is reported.
enum Outcome {
    Done(String),
    Skipped(String),
    Failed(String),
}

impl Uninstall {
    /// An uninstall with these settings, the agent's overlay and package executor (when it has
    /// them) and its manifest.
    pub fn new(
        settings: Settings,
        overlay: Option<Arc<Overlay>>,
        packages: Option<Arc<dyn Packages>>,
        manifest: Arc<Manifest>,
    ) -> Self {
        Uninstall {
            settings,
            overlay,
            packages,
            manifest,
        }
    }

    /// `UNINSTALL_NODE`: [`Uninstall::run`], then `NO_CONTENT` followed after its `ACK` by
    /// [`FINISH_STEP`], or the `ERROR` of the report. Cancellation and the deadline stop it
    /// between steps (a running program is ended by the runner).
    pub async fn execute(
        &self,
        ctx: Ctx,
        _p: UninstallNode,
    ) -> Result<Done<NoContent>, ErrorPayload> {
        let report = self.run(&ctx).await;
        if ctx.cancel.is_cancelled() {
            return Err(ErrorPayload::new(
                ErrorCode::Cancelled,
                "the uninstall was cancelled or ran out of time between steps; send UNINSTALL_NODE again to finish it",
            ));
        }
        if let Some(e) = report.error() {
            return Err(e);
        }
        Ok(Done::then(
            NoContent {},
            AfterAck {
                step: FINISH_STEP.to_string(),
                params: serde_json::json!({}),
            },
        ))
    }

    /// Run the steps in order (each said as a `LOG` line); stops at the first critical failure.
    pub async fn run(&self, ctx: &Ctx) -> Report {
        let mut steps = Vec::new();
        let mut stopped = false;
        for (step, critical) in [
            ("stop-services", false),
            ("kubeadm-reset", true),
            ("overlay", true),
            ("packages", true),
            ("files", true),
        ] {
            if stopped || ctx.cancel.is_cancelled() {
                steps.push(StepReport {
                    step,
                    critical,
                    status: StepStatus::NotDone,
                    detail: String::new(),
                });
                continue;
            }
            ctx.log(LogLevel::Info, &format!("uninstall: {step}"));
            let out = match step {
                "stop-services" => self.stop_services(ctx).await,
                "kubeadm-reset" => self.kubeadm_reset(ctx).await,
                "overlay" => self.overlay().await,
                "packages" => self.packages(ctx).await,
                _ => self.files(),
            };
            let (status, detail) = match out {
                Outcome::Done(d) => (StepStatus::Done, d),
                Outcome::Skipped(d) => (StepStatus::Skipped, d),
                Outcome::Failed(d) => (StepStatus::Failed, d),
            };
            let level = if status == StepStatus::Failed {
                LogLevel::Error
            } else {
                LogLevel::Info
            };
            ctx.log(
                level,
                &format!("uninstall: {step}: {}: {detail}", status_word(status)),
            );
            if status == StepStatus::Failed && critical {
                stopped = true;
            }
            steps.push(StepReport {
                step,
                critical,
                status,
                detail,
            });
        }
        let ok = !steps
            .iter()
            .any(|s| s.critical && matches!(s.status, StepStatus::Failed | StepStatus::NotDone));
        Report { steps, ok }
    }

    async fn stop_services(&self, ctx: &Ctx) -> Outcome {
        if self.settings.stop_units.is_empty() {
            return Outcome::Skipped("no units configured".into());
        }
        if !self.settings.systemd_marker.is_dir() {
            return Outcome::Skipped(format!(
                "systemd is not running ({} is missing)",
                self.settings.systemd_marker.display()
            ));
        }
        let mut said = Vec::new();
        let mut failed = Vec::new();
        for unit in &self.settings.stop_units {
            let mut spec = Spec::new(vec![
                "systemctl".into(),
                "stop".into(),
                "--".into(),
                unit.clone(),
            ]);
            spec.timeout = self.settings.stop_timeout;
            spec.output_cap = 64 * 1024;
            match ctx.run(spec, Secrecy::Public).await {
                Ok(o) if o.exit_code == Some(0) => said.push(format!("stopped {unit}")),
                // 5: "Unit … not loaded": nothing to stop.
                Ok(o) if o.exit_code == Some(5) => said.push(format!("{unit} is not installed")),
                Ok(o) => failed.push(format!("{unit}: {}", exit_words(&o))),
                Err(e) => failed.push(format!("{unit}: {e}")),
            }
        }
        if failed.is_empty() {
            Outcome::Done(said.join("; "))
        } else {
            Outcome::Failed(format!("could not stop {}", failed.join("; ")))
        }
    }

    async fn kubeadm_reset(&self, ctx: &Ctx) -> Outcome {
        if !self.settings.kubeadm_reset {
            return Outcome::Skipped("[uninstall] kubeadm_reset is off".into());
        }
        let mut spec = Spec::new(vec!["kubeadm".into(), "reset".into(), "-f".into()]);
        spec.timeout = self.settings.reset_timeout;
        spec.output_cap = 256 * 1024;
        match ctx.run(spec, Secrecy::Public).await {
            Ok(o) if o.exit_code == Some(0) => Outcome::Done("kubeadm reset -f".into()),
            Ok(o) => Outcome::Failed(format!(
                "kubeadm reset -f {}: {}",
                exit_words(&o),
                tail(&o.stderr, &o.stdout)
            )),
            Err(RunError::Spawn(e)) => Outcome::Skipped(format!("kubeadm is not installed ({e})")),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    async fn overlay(&self) -> Outcome {
        let Some(o) = &self.overlay else {
            return Outcome::Skipped("this agent has no overlay".into());
        };
        match o.remove().await {
            Ok(d) if d.is_empty() => Outcome::Skipped("no overlay on this node".into()),
            Ok(d) => Outcome::Done(d.join("; ")),
            Err(e) => Outcome::Failed(format!("cannot remove the overlay: {e}")),
        }
    }

    async fn packages(&self, ctx: &Ctx) -> Outcome {
        let Some(p) = &self.packages else {
            return Outcome::Skipped("this agent has no package executor".into());
        };
        let names = match p.recorded(ctx.clone()).await {
            Ok(n) => n,
            Err(e) => {
                return Outcome::Failed(format!(
                    "cannot read the installed-package record: {}",
                    e.message
                ));
            }
        };
        if names.is_empty() {
            return Outcome::Skipped("no package installed by runos is left".into());
        }
        match p.purge(ctx.clone(), names.clone()).await {
            Ok(()) => Outcome::Done(format!("purged {}", names.join(", "))),
            Err(e) => Outcome::Failed(format!("purging {}: {}", names.join(", "), e.message)),
        }
    }

    fn files(&self) -> Outcome {
        let entries = match self.manifest.entries() {
            Ok(e) => e,
            Err(e) => return Outcome::Failed(format!("cannot read the manifest: {e}")),
        };
        if entries.is_empty() {
            return Outcome::Skipped("runos wrote nothing outside its state directory".into());
        }
        let mut said = Vec::new();
        // Files first, then directories deepest first (they are removed only when empty).
        let (files, mut dirs): (Vec<_>, Vec<_>) = entries
            .into_iter()
            .partition(|e| e.kind == manifest::Kind::File);
        dirs.sort_by_key(|e| std::cmp::Reverse(e.path.components().count()));
        for e in files.iter().chain(dirs.iter()) {
            match remove_entry(e) {
                Ok(what) => said.push(what),
                Err(err) => {
                    return Outcome::Failed(format!("{}: {err}", e.path.display()));
                }
            }
            if let Err(err) = self.manifest.forget(&e.path) {
                return Outcome::Failed(format!("cannot update the manifest: {err}"));
            }
        }
        Outcome::Done(said.join("; "))
    }
}

/// Remove one manifest entry if it still is what runos wrote; what happened, in words.
fn remove_entry(e: &manifest::Entry) -> io::Result<String> {
    let p = &e.path;
    if !p.is_absolute() {
        return Ok(format!("kept {} (not an absolute path)", p.display()));
    }
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Ok(format!("{} was already gone", p.display()));
        }
        Err(err) => return Err(err),
    };
    match e.kind {
        manifest::Kind::File => {
            if !meta.is_file() {
                return Ok(format!("kept {} (no longer a regular file)", p.display()));
            }
            // Bounded: runos writes configuration files, not images.
            if meta.len() > 64 << 20 {
                return Ok(format!(
                    "kept {} (changed since runos wrote it)",
                    p.display()
                ));
            }
            let data = std::fs::read(p)?;
            if e.sha256.as_deref() != Some(manifest::sha256_hex(&data).as_str()) {
                return Ok(format!(
                    "kept {} (changed since runos wrote it)",
                    p.display()
                ));
            }
            crate::handle::remove_durably(p)?;
            Ok(format!("removed {}", p.display()))
        }
        manifest::Kind::Dir => {
            if !meta.is_dir() {
                return Ok(format!("kept {} (no longer a directory)", p.display()));
            }
            match std::fs::remove_dir(p) {
                Ok(()) => Ok(format!("removed {}", p.display())),
                Err(err) if err.kind() == io::ErrorKind::DirectoryNotEmpty => {
                    Ok(format!("kept {} (not empty)", p.display()))
                }
                Err(err) => Err(err),
            }
        }
    }
}

fn status_word(s: StepStatus) -> &'static str {
    match s {
        StepStatus::Done => "done",
        StepStatus::Skipped => "nothing to do",
        StepStatus::Failed => "FAILED",
        StepStatus::NotDone => "not done",
    }
}

fn exit_words(o: &crate::handle::Outcome) -> String {
    match (o.exit_code, o.signal) {
        (Some(c), _) => format!("exited {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// The last lines of a program's output (stderr first), bounded.
fn tail(stderr: &[u8], stdout: &[u8]) -> String {
    let text = if stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        stderr
    } else {
        stdout
    };
    let s = String::from_utf8_lossy(text);
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    let mut out = lines[start..].join(" / ");
    if out.len() > 1024 {
        let mut cut = out.len() - 1024;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = format!("...{}", &out[cut..]);
    }
    runos_protocol::peertext::PeerText::capped(&out, 1024).to_string()
}

#[cfg(test)]
mod tests;
