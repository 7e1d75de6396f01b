//! The host handle: every external program and file write of an executor goes through
//! [`Host`], so the agent (and a test) decides how programs run, where tools are found and what
//! the node facts are.
//!
//! Kept thin on purpose: the process runner (`host::runner`) slots in behind
//! [`RunProcess`] and [`Tools`]; until then the agent provides its `process::run`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A process to run: argv only, never a shell.
#[derive(Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// `argv[0]` and its arguments.
    pub argv: Vec<String>,
    /// Extra environment on top of the runner's minimal one (nothing else is inherited).
    /// Values are secret.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Bytes written to stdin, then closed (`None`: stdin is `/dev/null`).
    pub stdin: Option<Vec<u8>>,
    /// The process group is killed after this long.
    pub timeout: Duration,
    /// Bytes of stdout and of stderr kept (the tail).
    pub output_cap: usize,
}

impl fmt::Debug for ProcessSpec {
    // Arguments, environment values and stdin may carry secrets: only their sizes are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessSpec")
            .field("program", &self.argv.first())
            .field("args", &self.argv.len().saturating_sub(1))
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("stdin_bytes", &self.stdin.as_ref().map(Vec::len))
            .field("timeout", &self.timeout)
            .field("output_cap", &self.output_cap)
            .finish()
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessOutput {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal, when it was killed by one.
    pub signal: Option<i32>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// The kept tail of stdout.
    pub stdout: Vec<u8>,
    /// The kept tail of stderr.
    pub stderr: Vec<u8>,
    /// Whether stdout was cut to the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was cut to the cap.
    pub stderr_truncated: bool,
    /// How long it ran.
    pub duration: Duration,
}

/// Why a process could not be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// It could not be started (not found, not executable): the instruction `failed`.
    #[error("{0}")]
    Spawn(String),
    /// Something of the agent's own failed (pipes, waiting): `internal`.
    #[error("{0}")]
    Internal(String),
}

/// Runs processes for executors (the agent's process code today, the process runner next).
pub trait RunProcess: Send + Sync {
    /// Run `spec` to its end (or its timeout). Dropping the future kills the process group.
    fn run(&self, spec: ProcessSpec) -> BoxFuture<Result<ProcessOutput, RunError>>;
}

/// The process runner ([`crate::host::runner`]) behind the executors' host handle: the spec's
/// timeout ends the whole tree (SIGTERM, the default grace, then SIGKILL); dropping the future
/// kills it at once.
impl RunProcess for crate::host::runner::Runner {
    fn run(&self, spec: ProcessSpec) -> BoxFuture<Result<ProcessOutput, RunError>> {
        use crate::host::runner;
        let me = self.clone();
        Box::pin(async move {
            let mut s = runner::Spec::new(spec.argv);
            s.env = spec.env;
            s.cwd = spec.cwd;
            s.stdin = spec.stdin;
            s.timeout = spec.timeout;
            s.output_cap = spec.output_cap;
            let out = me.run(s).await.map_err(|e| match e {
                runner::SpawnError::Spawn(_) | runner::SpawnError::EmptyArgv => {
                    RunError::Spawn(e.to_string())
                }
                _ => RunError::Internal(e.to_string()),
            })?;
            Ok(ProcessOutput {
                exit_code: out.exit_code,
                signal: out.signal,
                timed_out: out.timed_out(),
                stdout: out.stdout,
                stderr: out.stderr,
                stdout_truncated: out.stdout_truncated,
                stderr_truncated: out.stderr_truncated,
                duration: out.duration,
            })
        })
    }
}

/// No process runner: every run fails (the default of [`Host`], for executors that run none).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRunner;

impl RunProcess for NoRunner {
    fn run(&self, _spec: ProcessSpec) -> BoxFuture<Result<ProcessOutput, RunError>> {
        Box::pin(async { Err(RunError::Internal("no process runner configured".into())) })
    }
}

/// Where external tools are found (`[tools] kubectl = "/usr/bin/kubectl"`). A placeholder the
/// process runner fills; a name without an entry is looked up in `PATH` by the runner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tools {
    paths: BTreeMap<String, PathBuf>,
}

impl Tools {
    /// Tools from a name → path table.
    pub fn new(paths: BTreeMap<String, PathBuf>) -> Self {
        Tools { paths }
    }

    /// The configured path of `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Path> {
        self.paths.get(name).map(PathBuf::as_path)
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
    /// Where tools are.
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
    /// Run a process through the configured runner.
    pub async fn run(&self, spec: ProcessSpec) -> Result<ProcessOutput, RunError> {
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
