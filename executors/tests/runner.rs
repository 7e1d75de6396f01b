//! The process runner against real processes. Tests that need cgroups skip, saying why, when
//! not root or when no cgroup v2 is writable.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runos_executors::host::leftover;
use runos_executors::host::runner::{
    CgroupMode, DetachedError, Ended, Line, LineRate, LineSink, Outcome, Runner, RunnerConfig,
    SpawnError, Spec, Stream, Tools,
};
use tokio::sync::mpsc;

fn sh(script: &str) -> Spec {
    Spec::new(vec!["/bin/sh".into(), "-c".into(), script.into()])
}

/// A marker no other process has in its command line.
fn marker(name: &str) -> String {
    format!("runos-runner-test-{name}-{}", std::process::id())
}

/// The live (not zombie) processes whose command line holds `marker`, except the caller's.
fn pids_with(marker: &str) -> Vec<i32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n != me))
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // A zombie has ended; its parent just has not reaped it yet.
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            (!zombie && String::from_utf8_lossy(&cmdline).contains(marker)).then_some(pid)
        })
        .collect()
}

async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clean up after a failed test.
fn kill_all(marker: &str) {
    for pid in pids_with(marker) {
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}

/// A runner with cgroups, or `None` (saying why) when this machine cannot give one.
fn cgroup_runner(registry: Option<PathBuf>) -> Option<Runner> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root (cgroups)");
        return None;
    }
    let r = Runner::new(RunnerConfig {
        registry,
        ..RunnerConfig::default()
    });
    if r.cgroup_root().is_none() {
        eprintln!("skipped: no writable cgroup v2 here");
        return None;
    }
    Some(r)
}

/// A sink with room for everything and the given rate, and its receiver.
fn sink(rate: LineRate) -> (LineSink, mpsc::Receiver<Line>) {
    let (tx, rx) = mpsc::channel(100_000);
    (LineSink::new(tx, rate), rx)
}

const UNLIMITED: LineRate = LineRate {
    per_sec: 1_000_000,
    burst: 1_000_000,
};

/// Run `spec` until it prints the line `ready`, then await `then()`, and return the outcome.
async fn run_after_ready<F: Future<Output = ()>>(
    runner: &Runner,
    mut spec: Spec,
    then: impl FnOnce() -> F,
) -> Outcome {
    let (s, mut rx) = sink(UNLIMITED);
    spec.lines = Some(s);
    let run = runner.run(spec);
    tokio::pin!(run);
    loop {
        tokio::select! {
            out = &mut run => panic!("ended before it was ready: {out:?}"),
            line = rx.recv() => if line.is_some_and(|l| l.text == "ready") { break },
        }
    }
    then().await;
    run.await.unwrap()
}

#[tokio::test]
async fn a_child_that_ignores_sigterm_is_killed_after_the_grace() {
    let mut spec = sh("trap '' TERM; echo ready; while :; do sleep 1; done");
    spec.grace = Duration::from_millis(300);
    let cancel = spec.cancel.clone();
    let out = run_after_ready(&Runner::default(), spec, || async move { cancel.cancel() }).await;
    assert_eq!(out.ended, Ended::Cancelled);
    assert_eq!(out.signal, Some(9), "{out:?}");
}

#[tokio::test]
async fn a_child_that_honours_sigterm_ends_with_it() {
    let mut spec = sh("echo ready; sleep 1000");
    spec.timeout = Duration::from_millis(200);
    spec.grace = Duration::from_secs(60);
    let out = Runner::default().run(spec).await.unwrap();
    assert_eq!(out.ended, Ended::TimedOut);
    assert!(out.timed_out());
    assert_eq!(out.signal, Some(15), "{out:?}");
}

/// A script that starts a grandchild which leaves the process group and the session, waits
/// until it runs, prints `ready`, and sleeps.
fn escaping(m: &str, then: &str) -> Spec {
    sh(&format!(
        "setsid -f sh -c 'sleep 1000; : {m}' </dev/null >/dev/null 2>&1; \
         while ! grep -qs {m} /proc/[0-9]*/cmdline; do sleep 0.05; done; echo ready; {then}"
    ))
}

#[tokio::test]
async fn a_setsid_grandchild_is_gone_after_cancel() {
    let Some(runner) = cgroup_runner(None) else {
        return;
    };
    let m = marker("cancel");
    let spec = escaping(&m, "sleep 1000");
    let cancel = spec.cancel.clone();
    let out = run_after_ready(&runner, spec, || async move { cancel.cancel() }).await;
    assert_eq!(out.ended, Ended::Cancelled);
    let gone = wait_until(Duration::from_secs(10), || pids_with(&m).is_empty()).await;
    kill_all(&m);
    assert!(gone, "the setsid grandchild survived the cancel");
}

#[tokio::test]
async fn a_setsid_grandchild_is_gone_after_the_timeout() {
    let Some(runner) = cgroup_runner(None) else {
        return;
    };
    let m = marker("timeout");
    let mut spec = escaping(&m, "sleep 1000");
    // Long enough for the grandchild to start (checked: the script says `ready` once it runs).
    spec.timeout = Duration::from_secs(5);
    let out = runner.run(spec).await.unwrap();
    assert_eq!(out.ended, Ended::TimedOut);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ready\n",
        "the grandchild had not started within the timeout"
    );
    let gone = wait_until(Duration::from_secs(10), || pids_with(&m).is_empty()).await;
    kill_all(&m);
    assert!(gone, "the setsid grandchild survived the timeout");
}

#[tokio::test]
async fn a_setsid_grandchild_is_gone_when_the_run_exits() {
    let Some(runner) = cgroup_runner(None) else {
        return;
    };
    let m = marker("exit");
    let out = runner.run(escaping(&m, "exit 0")).await.unwrap();
    assert_eq!(out.exit_code, Some(0));
    let gone = wait_until(Duration::from_secs(10), || pids_with(&m).is_empty()).await;
    kill_all(&m);
    assert!(gone, "the setsid grandchild outlived the run");
}

#[tokio::test]
async fn streamed_lines_arrive_in_order() {
    let (s, mut rx) = sink(UNLIMITED);
    let mut spec = sh("seq 1 2000; echo err >&2");
    spec.lines = Some(s);
    let out = Runner::default().run(spec).await.unwrap();
    assert_eq!(out.lines_dropped, 0);
    let mut lines = Vec::new();
    while let Ok(l) = rx.try_recv() {
        lines.push(l);
    }
    let stdout: Vec<String> = lines
        .iter()
        .filter(|l| l.stream == Stream::Stdout)
        .map(|l| l.text.clone())
        .collect();
    let expected: Vec<String> = (1..=2000).map(|n| n.to_string()).collect();
    assert_eq!(stdout, expected);
    assert!(
        lines
            .iter()
            .any(|l| l.stream == Stream::Stderr && l.text == "err")
    );
}

#[tokio::test]
async fn streamed_lines_are_rate_limited_and_drops_counted() {
    let (s, mut rx) = sink(LineRate {
        per_sec: 1,
        burst: 10,
    });
    let mut spec = sh("seq 1 1000");
    spec.lines = Some(s);
    let out = Runner::default().run(spec).await.unwrap();
    let mut got = Vec::new();
    while let Ok(l) = rx.try_recv() {
        got.push(l.text.parse::<u32>().unwrap());
    }
    assert!(got.len() >= 10 && out.lines_dropped > 0, "{got:?}");
    assert_eq!(got.len() as u64 + out.lines_dropped, 1000);
    assert_eq!(got[..10], (1..=10).collect::<Vec<_>>()[..], "the burst");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    // The tail for the reply has everything.
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("999\n1000\n"));
}

#[tokio::test]
async fn the_inactivity_watchdog_fires() {
    let mut spec = sh("echo started; sleep 1000");
    spec.inactivity = Some(Duration::from_millis(500));
    spec.timeout = Duration::from_secs(600);
    let out = Runner::default().run(spec).await.unwrap();
    assert_eq!(out.ended, Ended::Inactive);
    assert!(out.signal.is_some(), "{out:?}");
}

#[tokio::test]
async fn output_keeps_a_capped_tail() {
    let mut spec = sh("printf 0123456789abcdef; printf xyz >&2");
    spec.output_cap = 6;
    let out = Runner::default().run(spec).await.unwrap();
    assert_eq!(out.stdout, b"abcdef");
    assert!(out.stdout_truncated);
    assert_eq!(out.stderr, b"xyz");
    assert!(!out.stderr_truncated);
}

/// One task reads both pipes: a program that fills both (each beyond a pipe's buffer,
/// interleaved) never blocks, and each stream keeps its own tail and lines.
#[tokio::test]
async fn both_pipes_are_read_together() {
    let (s, mut rx) = sink(UNLIMITED);
    let mut spec = sh(
        "i=0; while [ $i -lt 3000 ]; do echo out-$i-0123456789abcdef; echo err-$i-0123456789abcdef >&2; i=$((i+1)); done",
    );
    spec.lines = Some(s);
    spec.output_cap = 1 << 20;
    let out = Runner::default().run(spec).await.unwrap();
    assert_eq!(out.exit_code, Some(0));
    let expect = |p: &str| -> String {
        (0..3000)
            .map(|i| format!("{p}-{i}-0123456789abcdef\n"))
            .collect()
    };
    assert_eq!(String::from_utf8_lossy(&out.stdout), expect("out"));
    assert_eq!(String::from_utf8_lossy(&out.stderr), expect("err"));
    let (mut outs, mut errs) = (0, 0);
    while let Ok(l) = rx.try_recv() {
        match l.stream {
            Stream::Stdout => {
                assert_eq!(l.text, format!("out-{outs}-0123456789abcdef"));
                outs += 1;
            }
            Stream::Stderr => {
                assert_eq!(l.text, format!("err-{errs}-0123456789abcdef"));
                errs += 1;
            }
        }
    }
    assert_eq!((outs, errs, out.lines_dropped), (3000, 3000, 0));
}

/// `argv[0]` is resolved before the spawn: a bare name through the runner's PATH, an absolute
/// path as it is; the program sees the `argv[0]` it was given either way.
#[tokio::test]
async fn argv0_is_resolved_and_kept_as_given() {
    let echo0 = |p: &str| Spec::new(vec![p.into(), "-c".into(), "echo $0".into()]);
    let out = Runner::default().run(echo0("sh")).await.unwrap();
    assert_eq!(out.stdout, b"sh\n");
    let out = Runner::default().run(echo0("/bin/sh")).await.unwrap();
    assert_eq!(out.stdout, b"/bin/sh\n");
    let e = Runner::default()
        .run(echo0("runos-no-such-program"))
        .await
        .unwrap_err();
    assert!(matches!(e, SpawnError::Spawn(ref e) if e.kind() == std::io::ErrorKind::NotFound));
    assert_eq!(
        e.to_string(),
        "cannot start the program (argv[0]): not found in the agent's PATH"
    );
    let e = Runner::default()
        .run(echo0("/nonexistent/sh"))
        .await
        .unwrap_err();
    assert!(matches!(e, SpawnError::Spawn(ref e) if e.kind() == std::io::ErrorKind::NotFound));
}

#[tokio::test]
async fn the_environment_is_cleared() {
    let mut spec = Spec::new(vec!["env".into()]);
    spec.env.insert("FOO".into(), "bar".into());
    let out = Runner::default().run(spec).await.unwrap();
    let mut vars: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('=').next().unwrap().to_string())
        .collect();
    vars.sort();
    // Nothing of the test process's environment (CARGO, RUST_*, ...) is visible.
    assert_eq!(vars, ["FOO", "HOME", "LANG", "PATH"]);
}

#[tokio::test]
async fn stdin_and_cwd_reach_the_program() {
    let mut spec = sh("echo \"$PWD\"; cat");
    spec.cwd = "/tmp".into();
    spec.stdin = Some(b"from-stdin".to_vec());
    let out = Runner::default().run(spec).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/tmp\nfrom-stdin");
}

fn stand_in(dir: &Path, name: &str, says: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\necho {says}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test]
async fn a_bare_name_resolves_only_against_the_given_path() {
    let dir = tempfile::tempdir().unwrap();
    stand_in(dir.path(), "runos-stand-in", "from-the-path");
    let name = vec!["runos-stand-in".to_string()];
    let here = Runner::new(RunnerConfig {
        search_path: Some(dir.path().as_os_str().to_owned()),
        ..RunnerConfig::default()
    });
    let out = here.run(Spec::new(name.clone())).await.unwrap();
    assert_eq!(out.stdout, b"from-the-path\n");
    // Not in the default PATH; and a PATH in the program's environment does not choose it.
    let mut spec = Spec::new(name);
    spec.env
        .insert("PATH".into(), dir.path().display().to_string());
    let e = Runner::default().run(spec).await.unwrap_err();
    assert!(matches!(e, SpawnError::Spawn(ref e) if e.kind() == std::io::ErrorKind::NotFound));
    // A relative path is never resolved.
    let e = here
        .run(Spec::new(vec!["./runos-stand-in".into()]))
        .await
        .unwrap_err();
    assert!(matches!(e, SpawnError::Spawn(_)));
}

#[tokio::test]
async fn a_configured_tool_replaces_the_path_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let p = stand_in(dir.path(), "kubectl", "stand-in-kubectl");
    let mut tools = Tools::new();
    tools.set("kubectl", p).unwrap();
    let r = Runner::new(RunnerConfig {
        tools,
        cgroup: CgroupMode::Off,
        ..RunnerConfig::default()
    });
    let out = r.run(Spec::new(vec!["kubectl".into()])).await.unwrap();
    assert_eq!(out.stdout, b"stand-in-kubectl\n");
}

#[test]
fn detached_mode_survives_and_writes_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sub/handoff.log");
    let m = marker("detached");
    let argv: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("echo launched; setsid -f sh -c 'sleep 1000; : {m}' </dev/null >/dev/null 2>&1"),
    ];
    let r = Runner::default();
    r.launch_detached(&argv, Duration::from_secs(30), &log)
        .unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "launched\n");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let running = loop {
        if !pids_with(&m).is_empty() {
            break true;
        }
        if std::time::Instant::now() > end {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The detached child outlives the launcher (and is not ours to end: the test ends it).
    kill_all(&m);
    assert!(running, "the detached child is not running");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let fail: Vec<String> = vec!["/bin/sh".into(), "-c".into(), "echo why >&2; exit 3".into()];
    match r.launch_detached(&fail, Duration::from_secs(30), &log) {
        Err(DetachedError::Failed { status, tail }) => {
            assert_eq!(status.code(), Some(3));
            assert_eq!(tail, "why");
        }
        other => panic!("{other:?}"),
    }
    let hang: Vec<String> = vec!["/bin/sh".into(), "-c".into(), "sleep 1000".into()];
    assert!(matches!(
        r.launch_detached(&hang, Duration::from_millis(200), &log),
        Err(DetachedError::TimedOut(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_run_kills_the_tree() {
    let m = marker("drop");
    let mut spec = sh(&format!("sh -c 'sleep 1000; : {m}' & echo ready; wait"));
    let (s, mut rx) = sink(UNLIMITED);
    spec.lines = Some(s);
    let runner = Runner::default();
    let task = tokio::spawn(async move { runner.run(spec).await });
    while let Some(l) = rx.recv().await {
        if l.text == "ready" {
            break;
        }
    }
    assert!(wait_until(Duration::from_secs(10), || !pids_with(&m).is_empty()).await);
    task.abort();
    let _ = task.await;
    let gone = wait_until(Duration::from_secs(10), || pids_with(&m).is_empty()).await;
    kill_all(&m);
    assert!(gone, "the tree survived the drop");
}

#[tokio::test]
async fn leftover_runs_of_a_killed_agent_are_ended_at_the_next_start() {
    let registry = tempfile::tempdir().unwrap();
    let Some(runner) = cgroup_runner(Some(registry.path().to_path_buf())) else {
        return;
    };
    let m = marker("leftover");
    let mut spec = escaping(&m, "sleep 1000");
    let (s, mut rx) = sink(UNLIMITED);
    spec.lines = Some(s);
    // A run whose future is forgotten: no guard runs, as with a `kill -9` of the agent.
    let mut run = Box::pin(runner.run(spec));
    loop {
        tokio::select! {
            out = &mut run => panic!("ended: {out:?}"),
            l = rx.recv() => if l.is_some_and(|l| l.text == "ready") { break },
        }
    }
    std::mem::forget(run);
    let reaped = leftover::reap(registry.path());
    assert_eq!(reaped.cgroups.len(), 1, "{reaped:?}");
    assert_eq!(reaped.groups.len(), 1, "{reaped:?}");
    let gone = wait_until(Duration::from_secs(10), || pids_with(&m).is_empty()).await;
    kill_all(&m);
    assert!(gone, "the leftover survived the reap");
    assert!(!reaped.cgroups[0].exists(), "the cgroup was not removed");
    assert_eq!(std::fs::read_dir(registry.path()).unwrap().count(), 0);
}

#[test]
fn empty_cgroups_of_gone_agents_are_removed_at_start() {
    let Some(runner) = cgroup_runner(None) else {
        return;
    };
    let root = runner.cgroup_root().unwrap().to_path_buf();
    // No live process has a pid this high (pid_max is at most 2^22).
    let stale = root.join("runos-run-99999999-0");
    let _ = std::fs::create_dir(&stale);
    let mine = root.join(format!("runos-run-{}-999999", std::process::id()));
    std::fs::create_dir(&mine).unwrap();
    let _again = cgroup_runner(None).unwrap();
    let removed = !stale.exists();
    let kept = mine.exists();
    let _ = std::fs::remove_dir(&stale);
    let _ = std::fs::remove_dir(&mine);
    assert!(removed, "the stale cgroup was kept");
    assert!(kept, "a live agent's cgroup was removed");
}
