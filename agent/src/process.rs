//! Running a program as its own process group, with capped output and a kill guard.
//!
//! The child is started with `process_group(0)`, so it and everything it spawns share a process
//! group whose id is the child's pid. A [`GroupGuard`] kills that whole group with SIGKILL when
//! it is dropped: on timeout, on cancellation, and when the future running the command is
//! dropped (for example at the dispatcher's deadline). The group never outlives the command.
//!
//! A `kill -9` of the agent (or a crash) skips the guard. So that its groups do not outlive it
//! either, the daemon names a registry directory ([`set_group_registry`], `<run_dir>/groups`):
//! each guarded group is recorded there as a file named after its pgid holding the leader's
//! start time, removed when the group is killed. At the next start [`reap_leftover_groups`]
//! kills every group still recorded, unless its pgid now belongs to another process (checked
//! with the leader's start time; Linux never reuses a pid while it is a live process group's
//! id, so a group that still has members is ours).

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// The `PATH` given to every command (unless its environment overrides it).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long the output pipes may stay open after the leader exited and the group was killed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Program and arguments (never a shell string).
    pub argv: Vec<String>,
    /// Extra environment on top of the minimal one. Values are secret.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Standard input bytes (secret), or none (stdin is then `/dev/null`).
    pub stdin: Option<Vec<u8>>,
    /// Kill the group after this long.
    pub timeout: Duration,
    /// Bytes kept per output stream (the tail).
    pub output_cap: usize,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// Whether the timeout passed and the group was killed.
    pub timed_out: bool,
    /// Tail of stdout.
    pub stdout: Vec<u8>,
    /// Tail of stderr.
    pub stderr: Vec<u8>,
    /// Whether stdout was longer than the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was longer than the cap.
    pub stderr_truncated: bool,
    /// Wall-clock duration.
    pub duration: Duration,
}

/// The command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The argv is empty.
    #[error("argv is empty")]
    EmptyArgv,
    /// The OS refused to start it (not found, permission, bad cwd). The message does not show
    /// the program: it may come from a peer (protocol.md §7.2).
    #[error("cannot start the program (argv[0]): {source}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Waiting for the process failed.
    #[error("waiting for the process failed: {0}")]
    Wait(std::io::Error),
}

static REGISTRY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Record guarded process groups in `dir` (created 0700), so that [`reap_leftover_groups`] can
/// kill them after a crash. Set once, by the daemon; later calls are ignored.
pub fn set_group_registry(dir: PathBuf) -> Result<(), crate::fsutil::FsError> {
    crate::fsutil::ensure_dir(&dir, 0o700)?;
    let _ = REGISTRY.set(dir);
    Ok(())
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`, for n ≥ 3.
fn stat_field(pid: i32, n: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// The start time (clock ticks since boot) of process `pid`.
fn start_time(pid: i32) -> Option<u64> {
    stat_field(pid, 22)
}

/// Whether any process is in process group `pgid`.
fn group_alive(pgid: i32) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .any(|pid| stat_field(pid, 5) == Some(u64::try_from(pgid).unwrap_or(0)))
}

/// Kill the process groups a crashed agent left behind (see the module docs) and clear the
/// registry. Returns the pgids killed.
pub fn reap_leftover_groups(dir: &std::path::Path) -> Vec<i32> {
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return killed;
    };
    for e in entries.flatten().take(100_000) {
        let path = e.path();
        let pgid = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
        let recorded = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        if let (Some(pgid), Some(recorded)) = (pgid, recorded)
            && pgid > 1
        {
            // The leader still running under another start time means the pid was reused.
            let reused = start_time(pgid).is_some_and(|t| t != recorded);
            if !reused
                && group_alive(pgid)
                && let Some(pg) = Pid::from_raw(pgid)
                && kill_process_group(pg, Signal::KILL).is_ok()
            {
                killed.push(pgid);
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

/// Kills a process group with SIGKILL when dropped (unless disarmed).
#[derive(Debug)]
pub struct GroupGuard {
    pgid: Option<Pid>,
    record: Option<PathBuf>,
}

impl GroupGuard {
    /// Guard the group `pgid` (a child started with `process_group(0)` has pgid == pid), and
    /// record it in the registry when one is set.
    pub fn new(pid: Option<u32>) -> Self {
        let pgid = pid
            .and_then(|p| i32::try_from(p).ok())
            .and_then(Pid::from_raw);
        let record = match (pgid, REGISTRY.get()) {
            (Some(pg), Some(dir)) => start_time(pg.as_raw_nonzero().get()).and_then(|t| {
                let path = dir.join(pg.as_raw_nonzero().get().to_string());
                std::fs::write(&path, format!("{t}\n")).ok().map(|()| path)
            }),
            _ => None,
        };
        GroupGuard { pgid, record }
    }

    /// Kill the group now (idempotent; errors such as "no such group" are ignored).
    pub fn kill(&self) {
        if let Some(pgid) = self.pgid {
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
        if let Some(path) = self.record.take() {
            let _ = std::fs::remove_file(path);
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

async fn read_tail(mut r: impl AsyncRead + Unpin, cap: usize) -> TailBuffer {
    let mut tail = TailBuffer::new(cap);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => tail.push(&chunk[..n]),
        }
    }
    tail
}

/// The agent's own `PATH` (its environment, or [`DEFAULT_PATH`] when it has none).
fn agent_path() -> std::ffi::OsString {
    std::env::var_os("PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.into())
}

/// Where `program` (an `argv[0]`) is: an absolute path as it is, a bare name (no `/`) looked
/// up in the agent's own `PATH` ([`agent_path`]), never in the command's environment: a
/// `PATH` in a payload's `env` reaches the program, but does not choose it. Only absolute
/// `PATH` entries are searched, and only executable regular files match. Anything else (a
/// relative path with a `/`) is refused: it would depend on the working directory.
pub fn resolve_program(program: &str) -> std::io::Result<PathBuf> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::path::Path::new(program);
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    if program.is_empty() || program.contains('/') || program == "." || program == ".." {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not an absolute path or a program name",
        ));
    }
    std::env::split_paths(&agent_path())
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| Error::new(ErrorKind::NotFound, "not found in the agent's PATH"))
}

/// Run `spec` to completion (or timeout) and report how it ended. Dropping the returned future
/// kills the whole process group. `argv[0]` is resolved with [`resolve_program`] and the
/// program is started by its absolute path.
pub async fn run(spec: Spec) -> Result<Outcome, SpawnError> {
    let program = spec.argv.first().ok_or(SpawnError::EmptyArgv)?.clone();
    let resolved = resolve_program(&program).map_err(|source| SpawnError::Spawn {
        program: program.clone(),
        source,
    })?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut cmd = Command::new(&resolved);
    // The program sees the argv[0] it was given, as from a shell.
    std::os::unix::process::CommandExt::arg0(cmd.as_std_mut(), &program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("LANG", "C.UTF-8")
        .env("HOME", home)
        .envs(&spec.env)
        .current_dir(&spec.cwd)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| SpawnError::Spawn {
        program: program.clone(),
        source,
    })?;
    let guard = GroupGuard::new(child.id());

    // The pipe tasks are aborted when this future is dropped (deadline, cancel), so a process
    // that escaped the group and still holds a pipe cannot keep them, and their buffers, alive.
    let stdin_task = match (child.stdin.take(), spec.stdin) {
        (Some(mut w), Some(data)) => Some(AbortOnDrop(tokio::spawn(async move {
            // A child that does not read its stdin closes the pipe: ignore that error.
            let _ = w.write_all(&data).await;
            let _ = w.shutdown().await;
        }))),
        _ => None,
    };
    let cap = spec.output_cap;
    let out = child
        .stdout
        .take()
        .map(|r| AbortOnDrop(tokio::spawn(read_tail(r, cap))));
    let err = child
        .stderr
        .take()
        .map(|r| AbortOnDrop(tokio::spawn(read_tail(r, cap))));

    let (status, timed_out) = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(Ok(status)) => (Some(status), false),
        Ok(Err(e)) => return Err(SpawnError::Wait(e)),
        Err(_) => {
            // Kill the group while the leader is still unreaped, so its pgid cannot be reused.
            guard.kill();
            (child.wait().await.ok(), true)
        }
    };
    // The leader is gone; nothing of the instruction may outlive it (background children
    // holding our pipes would otherwise keep the reply waiting forever).
    guard.kill();
    drop(stdin_task);
    let collect = |h: Option<AbortOnDrop<TailBuffer>>| async move {
        match h {
            // On timeout the guard aborts the reader when it goes out of scope.
            Some(mut h) => match tokio::time::timeout(DRAIN_GRACE, &mut h.0).await {
                Ok(Ok(tail)) => tail.finish(),
                _ => (Vec::new(), false),
            },
            None => (Vec::new(), false),
        }
    };
    let ((stdout, stdout_truncated), (stderr, stderr_truncated)) =
        tokio::join!(collect(out), collect(err));
    Ok(Outcome {
        exit_code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        duration: started.elapsed(),
    })
}

/// A spawned task that is aborted when the guard is dropped.
#[derive(Debug)]
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt as _;

    #[test]
    fn proc_stat_fields_are_read_past_the_command_name() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(start_time(me).is_some());
        // Our own process group is alive.
        let pg = i32::try_from(stat_field(me, 5).unwrap()).unwrap();
        assert!(group_alive(pg));
        assert_eq!(stat_field(-1, 5), None);
    }

    #[test]
    fn leftover_groups_are_killed_and_reused_pids_spared() {
        let dir = tempfile::tempdir().unwrap();
        // A group that escaped its guard: a leader with a child, both in their own group.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 60 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = i32::try_from(child.id()).unwrap();
        let t = start_time(pgid).unwrap();
        std::fs::write(dir.path().join(pgid.to_string()), format!("{t}\n")).unwrap();
        // Our own pid, recorded with a wrong start time: a reused pid, never killed.
        let me = i32::try_from(std::process::id()).unwrap();
        std::fs::write(dir.path().join(me.to_string()), "1\n").unwrap();
        // Garbage entries are removed.
        std::fs::write(dir.path().join("junk"), "x").unwrap();
        let killed = reap_leftover_groups(dir.path());
        assert_eq!(killed, vec![pgid]);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn programs_resolve_against_the_agents_path_only() {
        assert_eq!(
            resolve_program("/bin/sh").unwrap(),
            PathBuf::from("/bin/sh")
        );
        let sh = resolve_program("sh").unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        for bad in ["../../../../bin/sh", "bin/sh", "./sh", ".", "..", ""] {
            assert_eq!(
                resolve_program(bad).unwrap_err().kind(),
                std::io::ErrorKind::InvalidInput,
                "{bad}"
            );
        }
        assert_eq!(
            resolve_program("runos-no-such-program").unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
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
