//! One cgroup v2 per run, so that the whole process tree of a run ends, even the children that
//! called `setsid` and left the process group.
//!
//! The runner creates `runos-run-<agent pid>-<n>` under a root: the agent's own cgroup (found
//! in `/proc/self/cgroup` on the cgroup2 mount of `/proc/self/mountinfo`), or a configured
//! directory. The child must be *born* inside it, or a fast `fork` could escape before it is
//! moved: without `pre_exec` (the workspace denies unsafe code) the runner moves the agent
//! itself into the run's cgroup, spawns (the child inherits the cgroup at `fork`), and moves
//! back. Spawns are serialized by a lock for that moment; a process that some other thread of
//! the agent forks outside the runner in those microseconds would land in the run's cgroup
//! (nothing in the agent does). Ending the run writes `cgroup.kill` (Linux ≥ 5.14; before
//! that, every member is sent SIGKILL until the cgroup is empty).
//!
//! Under systemd the agent's unit should say `Delegate=yes`, so that systemd leaves the
//! sub-cgroups of its cgroup alone. When no cgroup v2 is writable (cgroup v1 only, a read-only
//! mount, no permission), the runner falls back to the process group, and says so once.

use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// The name prefix of every run's cgroup.
pub const RUN_PREFIX: &str = "runos-run-";

/// Serializes the moment the agent spends in a run's cgroup (see the module docs).
static SPAWN_LOCK: Mutex<()> = Mutex::new(());
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Where run cgroups are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    dir: PathBuf,
}

/// The cgroup2 mount point, from a `/proc/self/mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The cgroup2 path (`0::<path>`) of a `/proc/<pid>/cgroup` text.
fn unified_path(cgroup: &str) -> Option<&str> {
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.starts_with('/'))
}

/// The directory of this process's own cgroup v2.
pub fn own_cgroup() -> io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = cgroup2_mount(&mountinfo)
        .ok_or_else(|| io::Error::new(ErrorKind::NotFound, "no cgroup2 mount"))?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
    let path = unified_path(&cgroup)
        .ok_or_else(|| io::Error::new(ErrorKind::NotFound, "no cgroup v2 membership"))?;
    // A path ending in " (deleted)" or with ".." is not one we can use.
    if path.split('/').any(|c| c == "..") || path.contains(" (deleted)") {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            "unusable cgroup path",
        ));
    }
    Ok(mount.join(path.trim_start_matches('/')))
}

impl CgroupRoot {
    /// The agent's own cgroup, if run cgroups can be created under it (probed).
    pub fn discover() -> io::Result<Self> {
        Self::at(own_cgroup()?)
    }

    /// A configured root directory (on a cgroup2 mount), if run cgroups can be created under
    /// it (probed: a probe cgroup is created and removed).
    pub fn at(dir: PathBuf) -> io::Result<Self> {
        if !dir.join("cgroup.procs").is_file() {
            return Err(io::Error::new(
                ErrorKind::NotFound,
                "not a cgroup v2 directory",
            ));
        }
        let root = CgroupRoot { dir };
        let probe = root.create()?;
        probe.remove(Duration::from_secs(1));
        Ok(root)
    }

    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Remove the empty run cgroups of agents that are gone (`runos-run-<pid>-*` whose pid is
    /// not a live process): what a crash left behind when its registry was lost. Only empty
    /// cgroups can be removed, so this never ends a process. Returns how many were removed.
    pub fn remove_stale(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .flatten()
            .take(10_000)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(RUN_PREFIX))
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            })
            .filter(|e| std::fs::remove_dir(e.path()).is_ok())
            .count()
    }

    /// A new, empty run cgroup.
    pub fn create(&self) -> io::Result<RunCgroup> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .dir
            .join(format!("{RUN_PREFIX}{}-{n}", std::process::id()));
        std::fs::create_dir(&dir)?;
        Ok(RunCgroup { dir })
    }
}

/// One run's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCgroup {
    dir: PathBuf,
}

impl RunCgroup {
    /// An existing run cgroup (from the leftover registry): only a directory named
    /// `runos-run-*` holding `cgroup.procs` is accepted.
    pub fn existing(dir: PathBuf) -> Option<Self> {
        let named = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(RUN_PREFIX));
        (named && dir.is_absolute() && dir.join("cgroup.procs").is_file())
            .then_some(RunCgroup { dir })
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Run `spawn` with this process inside the cgroup, so that the child it forks is born
    /// there; then move back. Fails (without spawning) when this process cannot be moved in.
    pub fn spawn_inside<T>(&self, spawn: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let _lock = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let home = own_cgroup()?;
        let me = std::process::id().to_string();
        std::fs::write(self.dir.join("cgroup.procs"), &me)?;
        let spawned = spawn();
        if let Err(e) = std::fs::write(home.join("cgroup.procs"), &me) {
            // Never kill a cgroup the agent is still in: `members` excludes it below.
            tracing::error!("cannot leave a run's cgroup after spawning: {e}");
        }
        spawned
    }

    /// The pids in the cgroup.
    pub fn members(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Whether the agent itself is in the cgroup (it must then never be killed).
    fn holds_me(&self) -> bool {
        let me = i32::try_from(std::process::id()).unwrap_or(0);
        self.members().contains(&me)
    }

    /// Whether any process is in the cgroup (or below it).
    pub fn populated(&self) -> bool {
        match std::fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(events) => events.lines().any(|l| l == "populated 1"),
            Err(_) => !self.members().is_empty(),
        }
    }

    /// Send `signal` to every member.
    pub fn signal(&self, signal: Signal) {
        let me = i32::try_from(std::process::id()).unwrap_or(0);
        for pid in self.members() {
            if pid != me
                && let Some(pid) = Pid::from_raw(pid)
            {
                let _ = kill_process(pid, signal);
            }
        }
    }

    /// SIGKILL everything in the cgroup, with `cgroup.kill` where the kernel has it.
    pub fn kill(&self) {
        if self.holds_me() {
            tracing::error!("not killing a run's cgroup that holds the agent itself");
            return;
        }
        if std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        // Older kernels: kill the members until none is left (bounded: a fork bomb wins).
        for _ in 0..100 {
            let members = self.members();
            if members.is_empty() {
                break;
            }
            self.signal(Signal::KILL);
        }
    }

    /// Wait (at most `wait`, polling) until the cgroup is empty, then remove it. Whether it was
    /// removed.
    pub fn remove(&self, wait: Duration) -> bool {
        let end = Instant::now() + wait;
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return true,
                Err(e) if e.kind() == ErrorKind::NotFound => return true,
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_and_path_parsing() {
        let mi = "24 30 0:21 / /proc rw - proc proc rw\n\
                  35 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 2 0:1 / /x rw - tmpfs t rw\n"), None);
        assert_eq!(
            unified_path("1:cpu:/\n0::/system.slice/runos.service\n"),
            Some("/system.slice/runos.service")
        );
        assert_eq!(unified_path("1:cpu:/\n"), None);
    }

    #[test]
    fn only_run_cgroups_are_accepted_from_the_registry() {
        assert_eq!(RunCgroup::existing("/sys/fs/cgroup".into()), None);
        assert_eq!(RunCgroup::existing("relative/runos-run-1-1".into()), None);
    }
}
