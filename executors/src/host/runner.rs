//! The one process runner: every external program of the agent runs through it.
//!
//! - **argv only**, never a shell string. `argv[0]` is a configured tool ([`Tools`]), an
//!   absolute path, or a bare name looked up in the agent's own `PATH`
//!   ([`resolve_program`]); the program is started by its absolute path.
//! - **Spawned without forking the agent**: because the program is an absolute path and
//!   nothing runs in the child before `exec` (the process group is a spawn attribute, the
//!   cgroup is entered around the spawn, [`super::cgroup`]; never a `pre_exec` hook), the
//!   standard library starts it with `posix_spawn` (`clone(CLONE_VM | CLONE_VFORK)`), not
//!   `fork`. Keep it so: a `pre_exec` closure, a `uid`/`gid`/`groups` change or a bare program
//!   name with a custom `PATH` would make every spawn copy the agent's page tables.
//! - **A cleared environment**: `PATH` ([`DEFAULT_PATH`]), `LANG=C.UTF-8`, `HOME`, and the
//!   caller's entries.
//! - **The whole tree ends**: each run gets its own process group and, where cgroup v2 is
//!   writable, its own cgroup ([`super::cgroup`]), so that children that called `setsid` end
//!   too. At the timeout, on cancellation ([`Spec::cancel`]) or when the inactivity watchdog
//!   fires, the tree gets SIGTERM, then [`Spec::grace`] to exit, then SIGKILL. When the
//!   program exits by itself, whatever it left running is killed at once. Dropping the future
//!   of [`Runner::run`] kills the tree with SIGKILL.
//! - **Output**: stdout and stderr are read by one task, kept as capped tails for the reply,
//!   and streamed line by line to an optional [`LineSink`] at a bounded rate (lines over the
//!   rate are dropped and counted).
//! - **Secret-safe**: argv values, environment values and stdin are never logged; only the
//!   program name, escaped.
//! - **Leftovers**: with a registry ([`RunnerConfig::registry`]) each run is recorded so that
//!   the next start ends what a `kill -9` of the agent left ([`super::leftover::reap`]).
//!
//! [`Runner::launch_detached`] is the other mode: a launcher whose children must outlive the
//! agent (the updater's hand-off).

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use runos_protocol::peertext::PeerText;
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::cgroup::{CgroupRoot, RunCgroup};
use super::leftover::Record;

/// The `PATH` given to every program (unless its environment overrides it).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bytes kept per output stream unless the caller says otherwise.
pub const DEFAULT_OUTPUT_CAP: usize = 1024 * 1024;
/// Time between SIGTERM and SIGKILL unless the caller says otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// A streamed line longer than this is cut into pieces of this size.
pub const MAX_LINE: usize = 4096;
/// How long the output pipes may stay open after the tree was killed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long an ended run's cgroup may take to empty before it is removed.
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(5);

/// Configured tool paths: a tool name (`kubectl`) to an absolute path. A name without an entry
/// is looked up in the `PATH`. This is also how tests put stand-ins in place.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Tools {
    paths: BTreeMap<String, PathBuf>,
}

/// A tool entry that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ToolError {
    /// The name is empty or holds a `/`.
    #[error("a tool name is a bare program name")]
    BadName,
    /// The path is not absolute.
    #[error("a tool path must be absolute")]
    NotAbsolute,
}

impl Tools {
    /// No configured tools.
    pub fn new() -> Self {
        Self::default()
    }

    /// Use `path` for the tool `name`.
    pub fn set(&mut self, name: &str, path: PathBuf) -> Result<(), ToolError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(ToolError::BadName);
        }
        if !path.is_absolute() {
            return Err(ToolError::NotAbsolute);
        }
        self.paths.insert(name.to_string(), path);
        Ok(())
    }

    /// The configured path of `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Path> {
        self.paths.get(name).map(PathBuf::as_path)
    }

    /// The configured tools, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.paths.iter().map(|(n, p)| (n.as_str(), p.as_path()))
    }

    /// Where `program` is: the configured path for a tool name, else [`resolve_program`] in
    /// `search_path`.
    pub fn resolve(&self, program: &str, search_path: &OsStr) -> std::io::Result<PathBuf> {
        match self.get(program) {
            Some(p) => Ok(p.to_path_buf()),
            None => resolve_program(program, search_path),
        }
    }
}

/// The agent's own `PATH` (its environment, or [`DEFAULT_PATH`] when it has none).
pub fn agent_path() -> OsString {
    std::env::var_os("PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.into())
}

/// Where `program` (an `argv[0]`) is: an absolute path as it is, a bare name (no `/`) looked
/// up in `search_path` (the agent's own `PATH`, never the program's environment: a `PATH` in
/// a payload's `env` reaches the program, but does not choose it). Only absolute entries are
/// searched, and only executable regular files match. Anything else (a relative path with a
/// `/`) is refused: it would depend on the working directory.
pub fn resolve_program(program: &str, search_path: &OsStr) -> std::io::Result<PathBuf> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::PermissionsExt as _;
    let path = Path::new(program);
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    if program.is_empty() || program.contains('/') || program == "." || program == ".." {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not an absolute path or a program name",
        ));
    }
    std::env::split_paths(search_path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| Error::new(ErrorKind::NotFound, "not found in the agent's PATH"))
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One streamed output line (without its newline; invalid UTF-8 replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Where it came from.
    pub stream: Stream,
    /// The text.
    pub text: String,
}

/// The bound on streamed lines: a token bucket of `burst` lines, refilled at `per_sec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineRate {
    /// Lines per second in the long run.
    pub per_sec: u32,
    /// Lines that may come at once.
    pub burst: u32,
}

impl Default for LineRate {
    fn default() -> Self {
        LineRate {
            per_sec: 20,
            burst: 100,
        }
    }
}

/// Where streamed lines go. A line over the rate, or one the receiver has no room for, is
/// dropped and counted ([`Outcome::lines_dropped`]).
#[derive(Debug, Clone)]
pub struct LineSink {
    tx: mpsc::Sender<Line>,
    rate: LineRate,
}

impl LineSink {
    /// Send lines to `tx` at most at `rate`.
    pub fn new(tx: mpsc::Sender<Line>, rate: LineRate) -> Self {
        LineSink { tx, rate }
    }
}

/// The sink's state during one run, owned by the run's output reader.
#[derive(Debug)]
struct Streamer {
    tx: mpsc::Sender<Line>,
    rate: LineRate,
    /// Tokens left and when they were last refilled.
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

impl Streamer {
    fn new(sink: LineSink) -> Self {
        Streamer {
            tokens: f64::from(sink.rate.burst),
            refilled: Instant::now(),
            tx: sink.tx,
            rate: sink.rate,
            dropped: 0,
        }
    }

    fn offer(&mut self, stream: Stream, bytes: &[u8]) {
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * f64::from(self.rate.per_sec);
        self.tokens = (self.tokens + refill).min(f64::from(self.rate.burst));
        self.refilled = now;
        let allowed = self.tokens >= 1.0;
        if allowed {
            self.tokens -= 1.0;
        }
        let line = Line {
            stream,
            text: String::from_utf8_lossy(bytes).into_owned(),
        };
        if !allowed || self.tx.try_send(line).is_err() {
            self.dropped += 1;
        }
    }
}

/// What to run.
#[derive(Clone)]
pub struct Spec {
    /// Program and arguments (never a shell string). Values may be secret: never logged.
    pub argv: Vec<String>,
    /// Extra environment on top of the minimal one. Values are secret.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Standard input bytes (secret), or none (stdin is then `/dev/null`).
    pub stdin: Option<Vec<u8>>,
    /// End the tree after this long ([`Ended::TimedOut`]).
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// End the tree when it writes no output for this long ([`Ended::Inactive`]).
    pub inactivity: Option<Duration>,
    /// Bytes kept per output stream (the tail).
    pub output_cap: usize,
    /// End the tree when cancelled ([`Ended::Cancelled`]).
    pub cancel: CancellationToken,
    /// Where to stream output lines, if anywhere.
    pub lines: Option<LineSink>,
}

impl Spec {
    /// `argv` in `/`, no stdin, a 300 s timeout, [`DEFAULT_GRACE`], no watchdog,
    /// [`DEFAULT_OUTPUT_CAP`], a token nobody cancels, no line sink.
    pub fn new(argv: Vec<String>) -> Self {
        Spec {
            argv,
            env: BTreeMap::new(),
            cwd: PathBuf::from("/"),
            stdin: None,
            timeout: Duration::from_secs(300),
            grace: DEFAULT_GRACE,
            inactivity: None,
            output_cap: DEFAULT_OUTPUT_CAP,
            cancel: CancellationToken::new(),
            lines: None,
        }
    }
}

impl std::fmt::Debug for Spec {
    // Arguments, environment values and stdin may carry secrets: only their sizes are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec")
            .field(
                "program",
                &self.argv.first().map(|p| PeerText::new(p).to_string()),
            )
            .field("args", &self.argv.len().saturating_sub(1))
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("stdin_bytes", &self.stdin.as_ref().map(Vec::len))
            .field("timeout", &self.timeout)
            .field("grace", &self.grace)
            .field("inactivity", &self.inactivity)
            .field("output_cap", &self.output_cap)
            .field("lines", &self.lines.as_ref().map(|l| l.rate))
            .finish_non_exhaustive()
    }
}

/// Why the runner ended the tree, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The program exited (or a signal from elsewhere ended it).
    Exited,
    /// [`Spec::timeout`] passed.
    TimedOut,
    /// [`Spec::cancel`] was cancelled.
    Cancelled,
    /// No output for [`Spec::inactivity`].
    Inactive,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal ended it (15 or 9 when the runner ended it).
    pub signal: Option<i32>,
    /// Why it ended.
    pub ended: Ended,
    /// Tail of stdout.
    pub stdout: Vec<u8>,
    /// Tail of stderr.
    pub stderr: Vec<u8>,
    /// Whether stdout was longer than the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was longer than the cap.
    pub stderr_truncated: bool,
    /// Streamed lines dropped (over the rate, or no room in the sink).
    pub lines_dropped: u64,
    /// Wall-clock duration.
    pub duration: Duration,
}

impl Outcome {
    /// Whether the timeout ended it.
    pub fn timed_out(&self) -> bool {
        self.ended == Ended::TimedOut
    }
}

/// The program could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The argv is empty.
    #[error("argv is empty")]
    EmptyArgv,
    /// The OS refused to start it (not found, permission, bad cwd). The message does not show
    /// the program: it may come from a peer.
    #[error("cannot start the program (argv[0]): {0}")]
    Spawn(std::io::Error),
    /// Waiting for the process failed.
    #[error("waiting for the process failed: {0}")]
    Wait(std::io::Error),
}

/// A detached launch failed.
#[derive(Debug, thiserror::Error)]
pub enum DetachedError {
    /// The argv is empty.
    #[error("the command is empty")]
    EmptyArgv,
    /// The log file could not be created.
    #[error("cannot create the log file: {0}")]
    Log(std::io::Error),
    /// The launcher could not be started.
    #[error("could not be started: {0}")]
    Spawn(std::io::Error),
    /// The launcher did not exit in time (its process group was killed).
    #[error("did not finish within {}s", .0.as_secs())]
    TimedOut(Duration),
    /// The launcher exited unsuccessfully; `tail` is the end of its log.
    #[error("failed ({status}): {tail}")]
    Failed {
        /// How it exited.
        status: std::process::ExitStatus,
        /// The last characters of its log.
        tail: String,
    },
}

/// How the runner ends trees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CgroupMode {
    /// Run cgroups under the agent's own cgroup v2 when it is writable, else the process
    /// group only.
    #[default]
    Auto,
    /// Run cgroups under this cgroup v2 directory (the process group only when unusable).
    At(PathBuf),
    /// The process group only.
    Off,
}

/// How to build a [`Runner`].
#[derive(Debug, Clone, Default)]
pub struct RunnerConfig {
    /// Where bare program names are looked up; `None`: the agent's own `PATH` ([`agent_path`]).
    pub search_path: Option<OsString>,
    /// Configured tool paths.
    pub tools: Tools,
    /// Cgroups or not.
    pub cgroup: CgroupMode,
    /// The leftover registry directory (must exist, 0700), if any.
    pub registry: Option<PathBuf>,
}

/// The process runner (cheap to clone).
#[derive(Debug, Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    search_path: OsString,
    tools: Tools,
    cgroup: Option<CgroupRoot>,
    registry: Option<PathBuf>,
}

static SHARED: OnceLock<Runner> = OnceLock::new();

impl Default for Runner {
    fn default() -> Self {
        Runner::new(RunnerConfig::default())
    }
}

impl Runner {
    /// A runner. Says once (a warning) when it falls back to process groups.
    pub fn new(cfg: RunnerConfig) -> Self {
        let cgroup = match cfg.cgroup {
            CgroupMode::Off => None,
            CgroupMode::Auto => CgroupRoot::discover()
                .inspect_err(|e| {
                    tracing::warn!(
                        "no writable cgroup v2 for commands ({e}): a command's children that leave its process group (setsid) are not ended with it"
                    );
                })
                .ok(),
            CgroupMode::At(dir) => CgroupRoot::at(dir)
                .inspect_err(|e| {
                    tracing::warn!(
                        "the configured cgroup root is not usable ({e}): a command's children that leave its process group (setsid) are not ended with it"
                    );
                })
                .ok(),
        };
        if let Some(root) = &cgroup {
            root.remove_stale();
        }
        Runner {
            inner: Arc::new(Inner {
                search_path: cfg.search_path.unwrap_or_else(agent_path),
                tools: cfg.tools,
                cgroup,
                registry: cfg.registry,
            }),
        }
    }

    /// Make `runner` the one [`Runner::shared`] returns. The daemon does this once at start,
    /// before anything runs; returns false when a shared runner was already in use.
    ///
    /// Transitional: executors get the runner from their context once it carries a host handle.
    pub fn install_shared(runner: Runner) -> bool {
        SHARED.set(runner).is_ok()
    }

    /// The process-wide runner ([`Runner::install_shared`], else a default one).
    pub fn shared() -> Runner {
        SHARED.get_or_init(Runner::default).clone()
    }

    /// The cgroup root run cgroups are created under, if cgroups are used.
    pub fn cgroup_root(&self) -> Option<&Path> {
        self.inner.cgroup.as_ref().map(CgroupRoot::dir)
    }

    /// The configured tool paths.
    pub fn tools(&self) -> &Tools {
        &self.inner.tools
    }

    /// Where `program` is ([`Tools::resolve`] with this runner's search path).
    pub fn resolve(&self, program: &str) -> std::io::Result<PathBuf> {
        self.inner.tools.resolve(program, &self.inner.search_path)
    }

    /// The command for `argv`: resolved program, the program's `argv[0]` as given, a cleared
    /// environment plus `env`.
    fn command(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
    ) -> Result<std::process::Command, std::io::Error> {
        let program = argv.first().map_or("", String::as_str);
        let resolved = self.resolve(program)?;
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let mut cmd = std::process::Command::new(&resolved);
        // The program sees the argv[0] it was given, as from a shell.
        std::os::unix::process::CommandExt::arg0(&mut cmd, program);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", home)
            .envs(env);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Ok(cmd)
    }

    /// Run `spec` until it ends (see the module docs). Dropping the future kills the tree.
    pub async fn run(&self, spec: Spec) -> Result<Outcome, SpawnError> {
        if spec.argv.is_empty() {
            return Err(SpawnError::EmptyArgv);
        }
        let name = PeerText::new(&spec.argv[0]).to_string();
        let mut cmd: Command = self
            .command(&spec.argv, &spec.env)
            .map_err(SpawnError::Spawn)?
            .into();
        cmd.current_dir(&spec.cwd)
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let cgroup = self.inner.cgroup.as_ref().and_then(|root| {
            root.create()
                .inspect_err(|e| tracing::warn!("cannot create a run cgroup for {name}: {e}"))
                .ok()
        });
        let started = Instant::now();
        let spawned = match &cgroup {
            Some(cg) => cg.spawn_inside(|| cmd.spawn()),
            None => cmd.spawn(),
        };
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.remove(Duration::ZERO);
                }
                return Err(SpawnError::Spawn(e));
            }
        };
        let mut guard = TreeGuard::new(child.id(), cgroup, self.inner.registry.as_deref());
        tracing::debug!(pid = ?child.id(), cgroup = guard.cgroup.is_some(), "started {name}");

        // The pipe tasks are aborted when this future is dropped (deadline, cancel), so a
        // process that escaped and still holds a pipe cannot keep them, and their buffers, alive.
        let stdin_task = match (child.stdin.take(), spec.stdin) {
            (Some(mut w), Some(data)) => Some(AbortOnDropHandle::new(tokio::spawn(async move {
                // A child that does not read its stdin closes the pipe: ignore that error.
                let _ = w.write_all(&data).await;
                let _ = w.shutdown().await;
            }))),
            _ => None,
        };
        let (activity, mut last_output) = watch::channel(Instant::now());
        // One task reads both pipes (it is aborted when this future is dropped).
        let stop_reading = CancellationToken::new();
        let mut output = AbortOnDropHandle::new(tokio::spawn(read_output(
            child.stdout.take(),
            child.stderr.take(),
            spec.output_cap,
            spec.lines.map(Streamer::new),
            activity,
            stop_reading.clone(),
        )));

        let deadline = started + spec.timeout;
        let watchdog = async {
            let Some(quiet) = spec.inactivity else {
                return std::future::pending().await;
            };
            loop {
                let last = *last_output.borrow_and_update();
                tokio::select! {
                    () = tokio::time::sleep_until(last + quiet) => {
                        if !last_output.has_changed().unwrap_or(false) {
                            return;
                        }
                    }
                    Ok(()) = last_output.changed() => {}
                }
            }
        };
        let ended = tokio::select! {
            status = child.wait() => Err(status),
            () = tokio::time::sleep_until(deadline) => Ok(Ended::TimedOut),
            () = spec.cancel.cancelled() => Ok(Ended::Cancelled),
            () = watchdog => Ok(Ended::Inactive),
        };
        let (status, ended) = match ended {
            Err(status) => (status.map_err(SpawnError::Wait)?, Ended::Exited),
            Ok(why) => {
                tracing::info!(
                    ?why,
                    grace_ms = spec.grace.as_millis() as u64,
                    "ending {name}: SIGTERM to its tree"
                );
                let grace_end = Instant::now() + spec.grace;
                guard.signal(Signal::TERM);
                let status = match tokio::time::timeout_at(grace_end, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        tracing::info!("{name} outlived its grace: SIGKILL to its tree");
                        guard.kill();
                        child.wait().await
                    }
                };
                // The rest of the tree gets what is left of the grace to follow the leader.
                guard.wait_empty(grace_end).await;
                (status.map_err(SpawnError::Wait)?, why)
            }
        };
        // The leader is gone; nothing of the run may outlive it (background children holding
        // our pipes would otherwise keep the reply waiting forever).
        guard.kill();
        drop(stdin_task);
        // What escaped the tree's end and still holds a pipe gets a moment; then the reader
        // stops and hands over what it has.
        let output = match tokio::time::timeout(DRAIN_GRACE, &mut output).await {
            Ok(res) => res.ok(),
            Err(_) => {
                stop_reading.cancel();
                (&mut output).await.ok()
            }
        };
        let Output {
            stdout,
            stderr,
            lines_dropped,
        } = output.unwrap_or_else(|| Output {
            stdout: TailBuffer::new(0),
            stderr: TailBuffer::new(0),
            lines_dropped: 0,
        });
        let ((stdout, stdout_truncated), (stderr, stderr_truncated)) =
            (stdout.finish(), stderr.finish());
        guard.finish().await;
        Ok(Outcome {
            exit_code: status.code(),
            signal: status.signal(),
            ended,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            lines_dropped,
            duration: started.elapsed(),
        })
    }

    /// Launch `argv` detached: in its own process group, in no run cgroup and not recorded
    /// in the leftover registry, so that what it starts outlives the agent; wait (at most
    /// `timeout`, blocking) for the launcher itself to exit 0. Its process group is killed only
    /// on timeout: what it detaches (a `systemd-run` unit is not our child at all; a `setsid
    /// -f` child may still be in the group for a moment after the launcher exits) must
    /// outlive it. Its output goes to `log` (0600, truncated; the parent directory is created
    /// 0700), whose tail is in the error.
    ///
    /// Under systemd, stopping the agent's unit ends everything in the unit's cgroup: a
    /// launcher that must survive a restart of the agent's unit has to leave the cgroup itself
    /// (`systemd-run` does).
    pub fn launch_detached(
        &self,
        argv: &[String],
        timeout: Duration,
        log: &Path,
    ) -> Result<(), DetachedError> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        if argv.is_empty() {
            return Err(DetachedError::EmptyArgv);
        }
        if let Some(parent) = log.parent() {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent);
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(log)
            .map_err(DetachedError::Log)?;
        let err = out.try_clone().map_err(DetachedError::Log)?;
        let mut child = self
            .command(argv, &BTreeMap::new())
            .and_then(|mut cmd| {
                cmd.current_dir("/")
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .spawn()
            })
            .map_err(DetachedError::Spawn)?;
        let end = std::time::Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if std::time::Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    if let Some(pg) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
                        let _ = kill_process_group(pg, Signal::KILL);
                    }
                    let _ = child.wait();
                    return Err(DetachedError::TimedOut(timeout));
                }
            }
        };
        if status.success() {
            return Ok(());
        }
        let tail = read_tail(log, 64 * 1024)
            .map(|b| {
                let text = String::from_utf8_lossy(&b).trim().to_string();
                let skip = text.chars().count().saturating_sub(300);
                text.chars().skip(skip).collect()
            })
            .unwrap_or_default();
        Err(DetachedError::Failed { status, tail })
    }
}

/// The last `cap` bytes of the file at `path`.
fn read_tail(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(cap)))?;
    let mut buf = Vec::new();
    f.take(cap).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Ends a run's tree: its process group and its cgroup. Dropped unfinished (the run's future
/// was dropped), it kills the tree with SIGKILL and cleans up in the background.
#[derive(Debug)]
struct TreeGuard {
    pgid: Option<Pid>,
    cgroup: Option<RunCgroup>,
    record: Record,
}

impl TreeGuard {
    fn new(pid: Option<u32>, cgroup: Option<RunCgroup>, registry: Option<&Path>) -> Self {
        let pgid = pid
            .and_then(|p| i32::try_from(p).ok())
            .and_then(Pid::from_raw);
        let record = match pgid {
            Some(pg) => Record::write(registry, pg.as_raw_nonzero().get(), cgroup.as_ref()),
            None => Record::none(),
        };
        TreeGuard {
            pgid,
            cgroup,
            record,
        }
    }

    fn signal(&self, signal: Signal) {
        if let Some(pg) = self.pgid {
            let _ = kill_process_group(pg, signal);
        }
        if let Some(cg) = &self.cgroup {
            cg.signal(signal);
        }
    }

    /// SIGKILL the whole tree (idempotent).
    fn kill(&self) {
        if let Some(pg) = self.pgid {
            let _ = kill_process_group(pg, Signal::KILL);
        }
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
    }

    /// Whether anything of the tree still runs (without a cgroup: the process group).
    fn alive(&self) -> bool {
        match (&self.cgroup, self.pgid) {
            (Some(cg), _) => cg.populated(),
            (None, Some(pg)) => rustix::process::test_kill_process_group(pg).is_ok(),
            (None, None) => false,
        }
    }

    /// Wait until the tree is empty, or `until`.
    async fn wait_empty(&self, until: Instant) {
        while self.alive() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The tree was killed: remove the cgroup once empty, and the record.
    async fn finish(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let end = Instant::now() + CGROUP_EMPTY_WAIT;
            while cg.populated() && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !cg.remove(Duration::from_millis(100)) {
                tracing::warn!(cgroup = %cg.dir().display(), "a run's cgroup did not empty; left for the next start");
                return;
            }
        }
        self.record.remove();
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        self.kill();
        if let Some(cg) = self.cgroup.take() {
            let mut record = std::mem::replace(&mut self.record, Record::none());
            // Removing the cgroup waits for it to empty: not here, in an async context.
            std::thread::spawn(move || {
                if cg.remove(CGROUP_EMPTY_WAIT) {
                    record.remove();
                }
            });
        } else {
            self.record.remove();
        }
    }
}

/// A byte sink that keeps only the last `cap` bytes.
#[derive(Debug)]
pub struct TailBuffer {
    buf: VecDeque<u8>,
    cap: usize,
    truncated: bool,
}

impl TailBuffer {
    /// An empty buffer keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        TailBuffer {
            buf: VecDeque::with_capacity(cap.min(64 * 1024)),
            cap,
            truncated: false,
        }
    }

    /// Append bytes, dropping the oldest beyond the cap.
    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            self.truncated = true;
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        if overflow > 0 {
            self.truncated = true;
            self.buf.drain(..overflow);
        }
        self.buf.extend(data);
    }

    /// The kept bytes and whether anything was dropped.
    pub fn finish(self) -> (Vec<u8>, bool) {
        (self.buf.into(), self.truncated)
    }
}

/// What the output reader collected.
#[derive(Debug)]
struct Output {
    stdout: TailBuffer,
    stderr: TailBuffer,
    lines_dropped: u64,
}

/// One output stream being read: its pipe (until its end), tail and partial line.
struct Reading<R> {
    pipe: Option<R>,
    tail: TailBuffer,
    line: Vec<u8>,
    chunk: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Reading<R> {
    fn new(pipe: Option<R>, cap: usize) -> Self {
        Reading {
            pipe,
            tail: TailBuffer::new(cap),
            line: Vec::new(),
            chunk: vec![0u8; 16 * 1024],
        }
    }

    /// Read once (cancellation safe); `None` at the end of the stream or on an error.
    async fn read(&mut self) -> Option<usize> {
        let pipe = self.pipe.as_mut()?;
        match pipe.read(&mut self.chunk).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        }
    }

    /// Take in `n` bytes just read (`None`: the stream ended): keep the tail, stream the lines.
    fn took(&mut self, n: Option<usize>, stream: Stream, streamer: &mut Option<Streamer>) {
        let Some(n) = n else {
            self.pipe = None;
            if let Some(s) = streamer.as_mut()
                && !self.line.is_empty()
            {
                s.offer(stream, &self.line);
                self.line.clear();
            }
            return;
        };
        let data = &self.chunk[..n];
        self.tail.push(data);
        if let Some(s) = streamer.as_mut() {
            for &b in data {
                if b == b'\n' {
                    s.offer(stream, &self.line);
                    self.line.clear();
                } else {
                    self.line.push(b);
                    if self.line.len() >= MAX_LINE {
                        s.offer(stream, &self.line);
                        self.line.clear();
                    }
                }
            }
        }
    }
}

/// Read stdout and stderr to their ends (or until `stop`), in one task: keep the tails, note
/// the activity, stream the lines.
async fn read_output(
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    cap: usize,
    mut streamer: Option<Streamer>,
    activity: watch::Sender<Instant>,
    stop: CancellationToken,
) -> Output {
    let mut out = Reading::new(stdout, cap);
    let mut err = Reading::new(stderr, cap);
    while out.pipe.is_some() || err.pipe.is_some() {
        tokio::select! {
            n = out.read(), if out.pipe.is_some() => {
                if n.is_some() {
                    activity.send_replace(Instant::now());
                }
                out.took(n, Stream::Stdout, &mut streamer);
            }
            n = err.read(), if err.pipe.is_some() => {
                if n.is_some() {
                    activity.send_replace(Instant::now());
                }
                err.took(n, Stream::Stderr, &mut streamer);
            }
            () = stop.cancelled() => break,
        }
    }
    Output {
        stdout: out.tail,
        stderr: err.tail,
        lines_dropped: streamer.map_or(0, |s| s.dropped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_against_the_given_path_only() {
        let path = OsStr::new(DEFAULT_PATH);
        assert_eq!(
            resolve_program("/bin/sh", path).unwrap(),
            PathBuf::from("/bin/sh")
        );
        let sh = resolve_program("sh", path).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        for bad in ["../../../../bin/sh", "bin/sh", "./sh", ".", "..", ""] {
            assert_eq!(
                resolve_program(bad, path).unwrap_err().kind(),
                std::io::ErrorKind::InvalidInput,
                "{bad}"
            );
        }
        assert_eq!(
            resolve_program("runos-no-such-program", path)
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::NotFound
        );
        // Relative PATH entries are never searched.
        assert_eq!(
            resolve_program("sh", OsStr::new("bin:usr/bin"))
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::NotFound
        );
    }

    #[test]
    fn tools_override_the_path() {
        let mut tools = Tools::new();
        tools
            .set("kubectl", "/opt/stand-in/kubectl".into())
            .unwrap();
        assert_eq!(tools.set("a/b", "/x".into()), Err(ToolError::BadName));
        assert_eq!(tools.set("k", "x".into()), Err(ToolError::NotAbsolute));
        assert_eq!(
            tools.resolve("kubectl", OsStr::new("")).unwrap(),
            PathBuf::from("/opt/stand-in/kubectl")
        );
        assert!(tools.resolve("sh", OsStr::new(DEFAULT_PATH)).is_ok());
    }

    #[test]
    fn tail_buffer_keeps_the_tail() {
        let mut t = TailBuffer::new(5);
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.finish(), (b"cdefg".to_vec(), true));
        let mut t = TailBuffer::new(5);
        t.push(b"0123456789");
        assert_eq!(t.finish(), (b"56789".to_vec(), true));
        let mut t = TailBuffer::new(5);
        t.push(b"12345");
        assert_eq!(t.finish(), (b"12345".to_vec(), false));
    }
}
