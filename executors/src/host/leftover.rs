//! The leftover registry: runs that a `kill -9` of the agent cut short are ended at its next
//! start.
//!
//! A guard never runs when the agent is killed with SIGKILL (or crashes). So that a run's
//! processes do not outlive it either, the agent names a registry directory
//! (`<run_dir>/groups`): each run is recorded there as a file named after its process group
//! id, holding the leader's start time and, when the run has one, its cgroup directory. The
//! record is removed when the run has ended. At the next start [`reap`] ends every run still
//! recorded: it kills the cgroup (every process in it, also those that called `setsid`) and
//! removes it, and kills the process group unless its pgid now belongs to another process
//! (checked with the leader's start time; Linux never reuses a pid while it is a live process
//! group's id, so a group that still has members is ours).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};

use super::cgroup::RunCgroup;

/// What [`reap`] ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Process groups killed.
    pub groups: Vec<i32>,
    /// Run cgroups killed and removed.
    pub cgroups: Vec<PathBuf>,
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`, for n ≥ 3.
pub(crate) fn stat_field(pid: i32, n: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// The start time (clock ticks since boot) of process `pid`.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
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

/// The record of one run (see the module docs).
#[derive(Debug)]
pub(crate) struct Record {
    path: Option<PathBuf>,
}

impl Record {
    /// No record.
    pub(crate) fn none() -> Self {
        Record { path: None }
    }

    /// Record the run led by `pgid` (with its cgroup) in `registry`; a run that cannot be
    /// recorded is still run (it would only not be reaped after a crash).
    pub(crate) fn write(registry: Option<&Path>, pgid: i32, cgroup: Option<&RunCgroup>) -> Self {
        let path = registry.and_then(|dir| {
            let t = start_time(pgid)?;
            let path = dir.join(pgid.to_string());
            let mut text = format!("{t}\n");
            if let Some(cg) = cgroup {
                text.push_str(&format!("{}\n", cg.dir().display()));
            }
            std::fs::write(&path, text).ok().map(|()| path)
        });
        Record { path }
    }

    /// Remove the record (the run has ended).
    pub(crate) fn remove(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// End the runs a crashed agent left behind (see the module docs) and clear the registry.
pub fn reap(dir: &Path) -> Reaped {
    let mut reaped = Reaped::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return reaped;
    };
    for e in entries.flatten().take(100_000) {
        let path = e.path();
        let pgid = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines = text.lines();
        let recorded = lines.next().and_then(|t| t.trim().parse::<u64>().ok());
        // The leader still running under another start time means the pid was reused. Decided
        // before the cgroup is killed, whose members then leave the group.
        let group = match (pgid, recorded) {
            (Some(pgid), Some(recorded)) if pgid > 1 => {
                let reused = start_time(pgid).is_some_and(|t| t != recorded);
                (!reused && group_alive(pgid))
                    .then(|| Pid::from_raw(pgid))
                    .flatten()
            }
            _ => None,
        };
        if let Some(cg) = lines.next().and_then(|l| RunCgroup::existing(l.into())) {
            cg.kill();
            cg.remove(Duration::from_secs(5));
            reaped.cgroups.push(cg.dir().to_path_buf());
        }
        if let Some(pg) = group {
            // Members outside the cgroup (none, unless it had none): their group still dies.
            let _ = kill_process_group(pg, Signal::KILL);
            reaped.groups.push(pg.as_raw_nonzero().get());
        }
        let _ = std::fs::remove_file(&path);
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};

    #[test]
    fn proc_stat_fields_are_read_past_the_command_name() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(start_time(me).is_some());
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
        let reaped = reap(dir.path());
        assert_eq!(reaped.groups, vec![pgid]);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
