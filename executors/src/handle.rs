//! The host handle: every external program and file write of an executor goes through
//! [`Host`], so the agent (and a test) decides how programs run, where tools are found and what
//! the node facts are.
//!
//! Processes are described with the runner's own [`Spec`] and [`Outcome`]; the agent puts its
//! [`Runner`] behind [`RunProcess`], a test a stand-in. Executors run them through
//! [`crate::Ctx::run`], which ties a run to the instruction (deadline, cancellation, `LOG`).

use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use runos_protocol::{ErrorCode, ErrorPayload};

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub use crate::host::runner::{Outcome, Spec, Tools};
use crate::host::runner::{Runner, SpawnError};

/// Why a process could not be run, or did not run to its own end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// It could not be started (not found, not executable): the instruction `failed`.
    #[error("{0}")]
    Spawn(String),
    /// Something of the agent's own failed (pipes, waiting): `internal`.
    #[error("{0}")]
    Internal(String),
    /// The instruction's deadline ended it ([`crate::Ctx::run`]): `timeout`.
    #[error("the instruction's deadline passed; its processes were ended")]
    Deadline,
    /// The instruction was cancelled ([`crate::Ctx::run`]): `cancelled`.
    #[error("the instruction was cancelled; its processes were ended")]
    Cancelled,
}

impl From<RunError> for ErrorPayload {
    fn from(e: RunError) -> Self {
        let code = match e {
            RunError::Spawn(_) => ErrorCode::Failed,
            RunError::Internal(_) => ErrorCode::Internal,
            RunError::Deadline => ErrorCode::Timeout,
            RunError::Cancelled => ErrorCode::Cancelled,
        };
        ErrorPayload::new(code, e.to_string())
    }
}

impl From<SpawnError> for RunError {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::Spawn(_) | SpawnError::EmptyArgv => RunError::Spawn(e.to_string()),
            SpawnError::Wait(_) => RunError::Internal(e.to_string()),
        }
    }
}

/// Runs processes for executors: the process runner ([`Runner`]) in the agent, a stand-in in
/// tests. It takes the runner's own [`Spec`] and answers its [`Outcome`], so the grace, the
/// inactivity watchdog, cancellation and line streaming reach every executor.
pub trait RunProcess: Send + Sync {
    /// Run `spec` to its end (see [`Runner::run`]). Dropping the future kills the tree.
    fn run(&self, spec: Spec) -> BoxFuture<Result<Outcome, RunError>>;
}

impl RunProcess for Runner {
    fn run(&self, spec: Spec) -> BoxFuture<Result<Outcome, RunError>> {
        let me = self.clone();
        Box::pin(async move { Runner::run(&me, spec).await.map_err(RunError::from) })
    }
}

/// No process runner: every run fails (the default of [`Host`], for executors that run none).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRunner;

impl RunProcess for NoRunner {
    fn run(&self, _spec: Spec) -> BoxFuture<Result<Outcome, RunError>> {
        Box::pin(async { Err(RunError::Internal("no process runner configured".into())) })
    }
}

/// Facts of the node and the agent that executors report (injected, so the crate never reads
/// the agent's state).
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// The agent's version.
    pub agent_version: String,
    /// When the agent process started.
    pub agent_started: Instant,
    /// The host name.
    pub hostname: fn() -> String,
    /// The kernel's boot id.
    pub boot_id: fn() -> String,
    /// Seconds since boot.
    pub system_uptime_secs: fn() -> u64,
}

impl Default for NodeFacts {
    fn default() -> Self {
        NodeFacts {
            agent_version: String::new(),
            agent_started: Instant::now(),
            hostname: String::new,
            boot_id: String::new,
            system_uptime_secs: || 0,
        }
    }
}

/// The host handle of the executors.
#[derive(Clone)]
pub struct Host {
    /// Runs external programs.
    pub runner: Arc<dyn RunProcess>,
    /// Where tools are (the runner's [`Tools`]: `argv[0]` names are resolved through them).
    pub tools: Tools,
    /// Node and agent facts.
    pub facts: NodeFacts,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            runner: Arc::new(NoRunner),
            tools: Tools::default(),
            facts: NodeFacts::default(),
        }
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("tools", &self.tools)
            .field("facts", &self.facts)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Run a process through the configured runner as it is. Executors use [`crate::Ctx::run`],
    /// which ties the run to the instruction's deadline, cancellation and `LOG` lines.
    pub async fn run(&self, spec: Spec) -> Result<Outcome, RunError> {
        self.runner.run(spec).await
    }

    /// Write `data` to `path` atomically with `mode` (see [`write_atomic`]).
    pub fn write_file(&self, path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
        write_atomic(path, data, mode)
    }
}

/// Create `dir` and its missing parents, 0700 for the ones created.
pub fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Write `data` to `path` atomically: a temporary file in the same directory with `mode`,
/// fsync, rename over `path`, fsync of the directory. A reader sees the old file or the new one,
/// never a part.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Remove `path` (absent is fine) and fsync its directory.
pub fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    std::fs::File::open(path.parent().unwrap_or_else(|| Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_file_with_the_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        remove_durably(&p).unwrap();
        remove_durably(&p).unwrap();
        assert!(!p.exists());
    }
}
