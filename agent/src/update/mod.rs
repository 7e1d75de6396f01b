//! Verified self-update (docs/update.md).
//!
//! One concern per module: [`version`] (release versions), [`fetch`] (HTTPS downloads),
//! [`verify`] (checksum and attestation, shared with `runos verify`), [`install`] (side-by-side
//! layout and the atomic link swap), [`state`] (`update.json`), [`handoff`] (restart, health
//! gate, rollback). [`install_release`] is the whole download → verify → install sequence;
//! nothing before its last step touches the running binary or `bin_link`, and every failure
//! leaves both as they were.

pub mod daemon_side;
pub mod fetch;
pub mod handoff;
pub mod install;
pub mod state;
pub mod verify;
pub mod version;

use std::path::PathBuf;
use std::time::Duration;

use runos_attest::Verified;

use crate::config::Config;
use crate::exit::Exit;
use state::{LastUpdate, Outcome, UpdateState};
use version::Version;

/// Largest `checksums.txt` downloaded.
pub const MAX_CHECKSUMS_BYTES: u64 = runos_checksums::MAX_MANIFEST_BYTES as u64;
/// How long the new binary may take to answer `version --json`.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// An update that did not happen, with the exit code that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateError {
    /// The exit code.
    pub exit: Exit,
    /// What failed and what to do next.
    pub message: String,
}

impl UpdateError {
    fn new(exit: Exit, message: impl Into<String>) -> Self {
        UpdateError {
            exit,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for UpdateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What to install.
#[derive(Debug, Clone)]
pub struct Request {
    /// The version.
    pub target: Version,
    /// Allow a version older than the running one or the highest ever installed.
    pub allow_downgrade: bool,
    /// An automatic update (versions refused after a failed health gate are skipped).
    pub automatic: bool,
    /// Show download progress (only when stderr is a terminal).
    pub progress: bool,
    /// Set when whoever asked gave up (the `UPDATE_AGENT` deadline passed, or it was
    /// cancelled): the update stops at the next step, and nothing is installed or linked.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The version the running agent reports, when this is not the agent itself (`runos
    /// update`): the version updated from, and whose binary a rollback returns to. `None`: this
    /// process's own version.
    pub running: Option<Version>,
}

impl Request {
    /// Whether the requester gave up.
    pub fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn check_cancelled(&self, step: &str) -> Result<(), UpdateError> {
        if self.cancelled() {
            return Err(UpdateError::new(
                Exit::Failure,
                format!(
                    "the update was cancelled (the instruction's deadline passed, or it was cancelled) {step}; nothing was installed or linked"
                ),
            ));
        }
        Ok(())
    }
}

/// A successful [`install_release`].
#[derive(Debug, Clone)]
pub enum Installed {
    /// The target is the running version and `bin_link` already points at it: nothing done.
    AlreadyCurrent(Version),
    /// The target is installed and `bin_link` points at it.
    Swapped(Box<Swap>),
}

/// The facts of an installed update.
#[derive(Debug, Clone)]
pub struct Swap {
    /// The running version.
    pub from: Version,
    /// The installed version.
    pub to: Version,
    /// `bin_link`'s previous target (what a rollback restores).
    pub previous_target: PathBuf,
    /// The new binary.
    pub binary: PathBuf,
    /// What the attestation established (`None` when `bin_link` already pointed at the
    /// target, installed earlier, and nothing was downloaded).
    pub verified: Option<Verified>,
}

/// Download, verify and install `req.target`, then point `bin_link` at it. Records a failure
/// as the last update in `update.json`. Blocking (downloads); `rt` runs the pre-flight of the
/// new binary.
pub fn install_release(
    cfg: &Config,
    req: &Request,
    rt: &tokio::runtime::Handle,
) -> Result<Installed, UpdateError> {
    let from = match req.running {
        Some(v) => v,
        None => Version::current().map_err(|e| {
            UpdateError::new(Exit::Failure, format!("this agent's own version: {e}"))
        })?,
    };
    let _lock =
        crate::util::lock::acquire(&cfg.paths.state_dir.join("update.lock")).map_err(|e| {
            UpdateError::new(
                Exit::UpdateRefused,
                format!("another update is in progress ({e}); try again when it has finished"),
            )
        })?;
    let result = install_locked(cfg, req, rt, from);
    if let Err(e) = &result {
        state::record(&cfg.paths.state_dir, |st| {
            st.last = Some(LastUpdate::now(
                from,
                req.target,
                Outcome::Failed,
                &e.message,
            ));
        });
    }
    result
}

fn install_locked(
    cfg: &Config,
    req: &Request,
    rt: &tokio::runtime::Handle,
    from: Version,
) -> Result<Installed, UpdateError> {
    let u = &cfg.update;
    let to = req.target;
    let st =
        UpdateState::load(&cfg.paths.state_dir).map_err(|e| UpdateError::new(Exit::Failure, e))?;
    let new_binary = install::version_binary(&u.install_dir, to);
    let linked =
        install::link_target(&u.bin_link).map_err(|e| UpdateError::new(Exit::InstallFailed, e))?;
    // A rollback returns to the binary of the version that runs, when it is in the install
    // layout; the link may point at a newer one installed earlier and never started.
    let running_binary = install::version_binary(&u.install_dir, from);
    let previous_target =
        if req.running.is_some() && running_binary.is_file() && linked != new_binary {
            running_binary
        } else {
            linked.clone()
        };

    if to == from && linked == new_binary {
        return Ok(Installed::AlreadyCurrent(to));
    }
    if linked == new_binary {
        // Installed and linked by an earlier update whose restart has not happened yet; a
        // rollback returns to the running version's binary, which must exist.
        let running = install::version_binary(&u.install_dir, from);
        if !running.is_file() {
            return Err(UpdateError::new(
                Exit::InstallFailed,
                format!(
                    "{} already points at {} (installed earlier), but the running version's binary {} is missing, so there is nothing to roll back to; restart the agent to run {}",
                    u.bin_link.display(),
                    new_binary.display(),
                    running.display(),
                    to.tag()
                ),
            ));
        }
        return Ok(Installed::Swapped(Box::new(Swap {
            from,
            to,
            previous_target: running,
            binary: new_binary,
            verified: None,
        })));
    }
    if req.automatic && st.is_refused(to) {
        return Err(UpdateError::new(
            Exit::UpdateRefused,
            format!(
                "{} was refused after a failed health gate; install it by hand with `runos update --version {}` to retry",
                to.tag(),
                to.tag()
            ),
        ));
    }
    let floor = st.highest_installed.map_or(from, |h| h.max(from));
    if to < floor && !req.allow_downgrade {
        return Err(UpdateError::new(
            Exit::UpdateRefused,
            format!(
                "{} is older than {} ({}); an older release may have known vulnerabilities: pass --allow-downgrade to install it anyway",
                to.tag(),
                floor.tag(),
                if floor == from {
                    "the running version"
                } else {
                    "the highest version installed before"
                }
            ),
        ));
    }

    let asset = install::asset_name().map_err(|e| UpdateError::new(Exit::Failure, e))?;
    let root = verify::load_root(u.trusted_root.as_deref())
        .map_err(|e| UpdateError::new(Exit::NotRegistered, format!("update.trusted_root: {e}")))?;
    let policy = verify::release_policy(&u.repo, &u.workflow, &to.tag(), &asset)
        .map_err(|e| UpdateError::new(Exit::NotRegistered, format!("update: {e}")))?;
    let fetcher = fetch::Fetcher::new(u, req.progress)
        .map_err(|e| UpdateError::new(Exit::NotRegistered, e.to_string()))?
        .with_cancel(req.cancel.clone());
    let base = format!("{}/download/{}", u.release_base, to.tag());
    let fetch_err = |e: fetch::FetchError| match e {
        fetch::FetchError::Write { .. } => UpdateError::new(
            Exit::InstallFailed,
            format!("{e}; free space in {} and retry", u.install_dir.display()),
        ),
        _ => UpdateError::new(
            Exit::DownloadFailed,
            format!(
                "{e}; check update.release_base, the network and that release {} exists",
                to.tag()
            ),
        ),
    };

    // Small files first: a missing release fails before the big download.
    let checksums = fetcher
        .get_bytes(&format!("{base}/checksums.txt"), MAX_CHECKSUMS_BYTES)
        .map_err(fetch_err)?;
    // The bundle published with the release; without one, GitHub's attestations API (after
    // the download, since it is looked up by the binary's digest).
    let bundle = match fetcher.get_bytes(
        &format!("{base}/{asset}.sigstore.json"),
        runos_attest::MAX_BUNDLE_BYTES as u64,
    ) {
        Ok(b) => Some(b),
        Err(fetch::FetchError::Status { status: 404, .. }) if u.attestations_api.is_some() => None,
        Err(e) => return Err(fetch_err(e)),
    };
    let mut tmp = install::TempFile::create(&u.install_dir, &asset).map_err(|e| {
        UpdateError::new(
            Exit::InstallFailed,
            format!("{e}; check update.install_dir"),
        )
    })?;
    let (digest, size) = {
        let path = tmp.path().to_path_buf();
        fetcher
            .get_to_file(
                &format!("{base}/{asset}"),
                u.max_download_bytes,
                tmp.file(),
                &path,
                &asset,
            )
            .map_err(fetch_err)?
    };
    let bundles = match (bundle, &u.attestations_api) {
        (Some(b), _) => vec![b],
        (None, Some(api)) => {
            let url = format!(
                "{api}/repos/{}/attestations/sha256:{}",
                u.repo,
                digest.to_hex()
            );
            tracing::info!(%url, "the release has no attestation bundle; asking the GitHub API");
            let answer = fetcher
                .get_bytes_accept(
                    &url,
                    fetch::MAX_API_BYTES,
                    Some("application/vnd.github+json"),
                )
                .map_err(fetch_err)?;
            fetch::api_bundles(&answer).map_err(|e| UpdateError::new(Exit::DownloadFailed, e))?
        }
        (None, None) => Vec::new(),
    };
    let failed = |e: String| {
        UpdateError::new(
            Exit::VerifyFailed,
            format!(
                "{} {} ({size} bytes, sha256 {}) failed verification: {e}; nothing was installed",
                asset,
                to.tag(),
                digest.to_hex()
            ),
        )
    };
    let mut verified = None;
    let mut last_error = "no attestation was found for it".to_string();
    for b in &bundles {
        match verify::check(&digest, Some(&checksums), b, &policy, &root) {
            Ok(v) => {
                verified = Some(v);
                break;
            }
            Err(e) => last_error = e.to_string(),
        }
    }
    let verified = verified.ok_or_else(|| failed(last_error))?;
    req.check_cancelled("after the download")?;
    tracing::info!(
        version = %to.tag(), sha256 = %digest.to_hex(), identity = %verified.identity,
        commit = ?verified.commit, log_index = verified.log_index,
        "release verified"
    );

    // Install side by side. The version's directory is new, or holds a copy of this version
    // that is replaced by rename (a running copy keeps its inode).
    let dir = u.install_dir.join(to.tag());
    let dir_existed = dir.is_dir();
    crate::util::fs::ensure_dir(&dir, 0o755)
        .map_err(|e| UpdateError::new(Exit::InstallFailed, e.to_string()))?;
    install::check_dir(&dir).map_err(|e| UpdateError::new(Exit::InstallFailed, e))?;
    let placed = tmp.persist(&new_binary, 0o755);
    if let Err(e) = placed {
        if !dir_existed {
            let _ = std::fs::remove_dir(&dir);
        }
        return Err(UpdateError::new(Exit::InstallFailed, e));
    }
    if let Err(e) = preflight(&new_binary, to, rt) {
        // Only what this update created is removed: a version directory that existed may hold
        // the binary of the running agent (reinstalled in place with the same verified release).
        if !dir_existed {
            let _ = std::fs::remove_file(&new_binary);
            let _ = std::fs::remove_dir(&dir);
        }
        return Err(UpdateError::new(Exit::InstallFailed, e));
    }
    if let Err(e) = req.check_cancelled("before the link swap") {
        if new_binary != previous_target && !dir_existed {
            let _ = std::fs::remove_file(&new_binary);
            let _ = std::fs::remove_dir(&dir);
        }
        return Err(e);
    }
    install::swap_link(&u.bin_link, &new_binary)
        .map_err(|e| UpdateError::new(Exit::InstallFailed, e))?;
    tracing::info!(from = %from.tag(), to = %to.tag(), link = %u.bin_link.display(), "installed; link swapped");
    state::record(&cfg.paths.state_dir, |st| st.installed(to));
    Ok(Installed::Swapped(Box::new(Swap {
        from,
        to,
        previous_target,
        binary: new_binary,
        verified: Some(verified),
    })))
}

/// The new binary must run here and report the version it was released as.
fn preflight(
    binary: &std::path::Path,
    to: Version,
    rt: &tokio::runtime::Handle,
) -> Result<(), String> {
    #[allow(unused_mut)]
    let mut env = std::collections::BTreeMap::new();
    #[cfg(debug_assertions)]
    if let Ok(v) = std::env::var(crate::DEBUG_VERSION_FROM_DIR_ENV) {
        env.insert(crate::DEBUG_VERSION_FROM_DIR_ENV.to_string(), v);
    }
    let mut spec = runos_executors::host::runner::Spec::new(vec![
        binary.display().to_string(),
        "version".into(),
        "--json".into(),
    ]);
    spec.env = env;
    spec.timeout = PREFLIGHT_TIMEOUT;
    spec.output_cap = 64 * 1024;
    let out = rt
        .block_on(runos_executors::host::runner::Runner::shared().run(spec))
        .map_err(|e| format!("the new binary {} does not run: {e}", binary.display()))?;
    let reported = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["agentVersion"].as_str().map(str::to_string));
    match (out.exit_code, reported) {
        (Some(0), Some(v)) if Version::parse_loose(&v) == Ok(to) => Ok(()),
        (Some(0), Some(v)) => Err(format!(
            "the new binary {} reports version {:?}, not {}; it was not installed",
            binary.display(),
            v.chars().take(40).collect::<String>(),
            to.tag()
        )),
        _ => Err(format!(
            "the new binary {} does not run here (`version --json` exited {:?}{}): {}",
            binary.display(),
            out.exit_code,
            if out.timed_out() { ", timed out" } else { "" },
            String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(300)
                .collect::<String>()
        )),
    }
}
