//! RUN_COMMAND against real processes.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use runos_executors::Ctx;
use runos_executors::host::runner::{Runner, Spec};
use runos_executors::run_command as exec;
use runos_protocol::Tag;
use runos_protocol::instructions::{Output, RunCommand};

/// A context on the agent's host handle (its process code).
fn ctx() -> Ctx {
    let host = std::sync::Arc::new(runos_agent::exec::host(Instant::now()));
    Ctx::new(
        Tag::random(),
        tokio::time::Instant::now() + Duration::from_secs(60),
        host,
        None,
    )
}

fn sh(script: &str) -> RunCommand {
    RunCommand {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout_secs: Some(30),
    }
}

fn text(o: &Output) -> String {
    String::from_utf8(o.to_bytes().unwrap()).unwrap()
}

#[tokio::test]
async fn exit_code_and_output() {
    let r = exec::run_command(ctx(), sh("echo out; echo err >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.signal, None);
    assert!(!r.timed_out);
    assert_eq!(text(&r.stdout), "out\n");
    assert_eq!(text(&r.stderr), "err\n");
    assert!(!r.stdout_truncated && !r.stderr_truncated);
}

#[tokio::test]
async fn signal_is_reported() {
    let r = exec::run_command(ctx(), sh("kill -9 $$")).await.unwrap();
    assert_eq!(r.exit_code, None);
    assert_eq!(r.signal, Some(9));
}

#[tokio::test]
async fn output_tail_and_truncation_flags() {
    let mut spec = Spec::new(vec![
        "/bin/sh".into(),
        "-c".into(),
        "printf 0123456789abcdef; printf xyz >&2".into(),
    ]);
    spec.timeout = Duration::from_secs(30);
    spec.output_cap = 6;
    let r = exec::run_spec(&ctx(), spec).await.unwrap();
    assert_eq!(text(&r.stdout), "abcdef");
    assert!(r.stdout_truncated);
    assert_eq!(text(&r.stderr), "xyz");
    assert!(!r.stderr_truncated);
}

#[tokio::test]
async fn env_cwd_and_stdin() {
    let mut req = sh("echo \"$FOO|$PWD|$LANG|${CARGO:-unset}\"; cat");
    req.env.insert("FOO".into(), "bar".into());
    req.cwd = Some("/tmp".into());
    req.stdin = Some("from-stdin".into());
    let r = exec::run_command(ctx(), req).await.unwrap();
    assert_eq!(text(&r.stdout), "bar|/tmp|C.UTF-8|unset\nfrom-stdin");
}

#[tokio::test]
async fn program_not_found_is_failed() {
    let mut req = sh("");
    req.argv = vec!["/nonexistent/program".into()];
    let e = exec::run_command(ctx(), req).await.unwrap_err();
    assert_eq!(e.code, runos_protocol::ErrorCode::Failed);
}

fn pids_from(s: &str) -> Vec<i32> {
    s.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[tokio::test]
async fn timeout_ends_the_whole_group() {
    let mut req = sh("sleep 1000 & echo $!; sleep 1000 & echo $!; wait");
    req.timeout_secs = Some(1);
    let r = exec::run_command(ctx(), req).await.unwrap();
    assert!(r.timed_out);
    // SIGTERM first: the shell ends on it, within the grace.
    assert_eq!(r.signal, Some(15));
    let pids = pids_from(&text(&r.stdout));
    assert_eq!(pids.len(), 2, "{:?}", r.stdout);
    assert!(
        common::wait_until(Duration::from_secs(5), || pids
            .iter()
            .all(|p| common::pid_dead(*p))),
        "children survived: {pids:?}"
    );
}

#[tokio::test]
async fn lingering_children_die_with_the_leader() {
    let r = exec::run_command(ctx(), sh("sleep 1000 >/dev/null 2>&1 & echo $!"))
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
    let pids = pids_from(&text(&r.stdout));
    assert_eq!(pids.len(), 1);
    assert!(common::wait_until(Duration::from_secs(5), || {
        common::pid_dead(pids[0])
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_future_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pids");
    let script = format!(
        "echo $$ > {0}; sleep 1000 & echo $! >> {0}; wait",
        f.display()
    );
    let mut spec = Spec::new(vec!["/bin/sh".into(), "-c".into(), script]);
    spec.timeout = Duration::from_secs(600);
    let task = tokio::spawn(async move { Runner::shared().run(spec).await });
    let mut pids = vec![];
    let ok = common::wait_until(Duration::from_secs(10), || {
        pids = std::fs::read_to_string(&f)
            .map(|s| pids_from(&s))
            .unwrap_or_default();
        pids.len() == 2
    });
    assert!(ok, "the script did not start");
    task.abort();
    let _ = task.await;
    assert!(
        common::wait_until(Duration::from_secs(5), || pids
            .iter()
            .all(|p| common::pid_dead(*p))),
        "processes survived the drop: {pids:?}"
    );
}
