//! `RUN_COMMAND` through the real process runner with a context (`Ctx::run`): output streamed
//! as `LOG` lines, at the `LOG` rate, and the instruction's cancellation ending the tree.

use std::sync::Arc;
use std::time::Duration;

use runos_executors::context::{LOG_BURST, LOG_PER_SEC};
use runos_executors::handle::{Host, Spec};
use runos_executors::host::runner::{CgroupMode, Runner, RunnerConfig};
use runos_executors::run_command as exec;
use runos_executors::{Ctx, run_command};
use runos_protocol::control::{LogLevel, LogLine, types};
use runos_protocol::instructions::RunCommand;
use runos_protocol::{Envelope, ErrorCode, Tag};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn ctx_with(runner: Runner, within: Duration) -> (Ctx, mpsc::Receiver<Envelope>) {
    let (tx, rx) = mpsc::channel(10_000);
    let host = Host {
        tools: runner.tools().clone(),
        runner: Arc::new(runner),
        ..Default::default()
    };
    let ctx = Ctx::new(
        Tag::random(),
        Instant::now() + within,
        Arc::new(host),
        Some(tx),
    );
    (ctx, rx)
}

fn sh(script: &str) -> RunCommand {
    serde_json::from_value(serde_json::json!({
        "argv": ["/bin/sh", "-c", script],
        "env": {"SECRET": "s3cr3t-env"},
        "stdin": "s3cr3t-stdin",
        "timeoutSecs": 60,
    }))
    .unwrap()
}

/// The `LOG` lines received so far, checking each has the instruction's tag.
fn lines(ctx: &Ctx, rx: &mut mpsc::Receiver<Envelope>) -> Vec<LogLine> {
    let mut out = vec![];
    while let Ok(env) = rx.try_recv() {
        assert_eq!(env.kind, types::LOG);
        assert_eq!(env.tag, ctx.tag);
        out.push(env.payload().unwrap());
    }
    out
}

fn dead(pid: i32) -> bool {
    // Gone, or a zombie not yet reaped by its parent.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test]
async fn output_is_streamed_as_log_lines_in_order_before_the_reply() {
    let (ctx, mut rx) = ctx_with(Runner::default(), Duration::from_secs(120));
    let r = run_command::run_command(
        ctx.clone(),
        sh("cat >/dev/null; for i in 1 2 3 4 5; do echo out-$i; done; echo err-1 >&2; echo \"$SECRET\" | wc -c"),
    )
    .await
    .unwrap();
    assert_eq!(r.exit_code, Some(0));
    let got = lines(&ctx, &mut rx);
    assert!(
        got[0].message.starts_with("starting /bin/sh"),
        "{:?}",
        got[0]
    );
    let out: Vec<&str> = got
        .iter()
        .filter(|l| l.level == LogLevel::Info && l.message.starts_with("out-"))
        .map(|l| l.message.as_str())
        .collect();
    assert_eq!(out, ["out-1", "out-2", "out-3", "out-4", "out-5"]);
    let err: Vec<&LogLine> = got.iter().filter(|l| l.message == "err-1").collect();
    assert_eq!(err.len(), 1, "{got:?}");
    assert_eq!(err[0].level, LogLevel::Warn);
    // Environment values and stdin are never logged.
    for l in &got {
        assert!(!l.message.contains("s3cr3t"), "{l:?}");
    }
}

#[tokio::test]
async fn streamed_lines_keep_to_the_log_rate_and_the_drop_is_said() {
    const N: usize = 2000;
    let (ctx, mut rx) = ctx_with(Runner::default(), Duration::from_secs(120));
    let started = Instant::now();
    let r = run_command::run_command(ctx.clone(), sh(&format!("cat >/dev/null; seq 1 {N}")))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let got = lines(&ctx, &mut rx);
    // Never more than the burst plus the rate over the time it ran (the start line included).
    let bound =
        LOG_BURST as usize + (elapsed.as_secs_f64() * f64::from(LOG_PER_SEC)).ceil() as usize;
    assert!(
        got.len() <= bound,
        "{} LOG lines in {elapsed:?} (bound {bound})",
        got.len()
    );
    // The streamed numbers are in order.
    let numbers: Vec<usize> = got.iter().filter_map(|l| l.message.parse().ok()).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    assert!(!numbers.is_empty());
    // What was dropped is said, and the reply still has the output's tail.
    assert!(
        got.last()
            .is_some_and(|l| l.message.contains("log line(s) dropped: rate limit")),
        "{got:?}"
    );
    let stdout = String::from_utf8(r.stdout.to_bytes().unwrap()).unwrap();
    assert_eq!(stdout.lines().count(), N);
}

#[tokio::test]
async fn cancelling_the_context_ends_the_process_tree() {
    let runner = Runner::default();
    let cgroups = runner.cgroup_root().is_some();
    // A setsid grandchild leaves the process group: only a cgroup ends it.
    let script = if cgroups {
        "cat >/dev/null; sleep 1000 & echo pid $!; setsid sleep 1000 & echo pid $!; wait"
    } else {
        eprintln!("no writable cgroup v2 here (or not root): the setsid grandchild is not tested");
        "cat >/dev/null; sleep 1000 & echo pid $!; sleep 1000 & echo pid $!; wait"
    };
    let (ctx, mut rx) = ctx_with(runner, Duration::from_secs(120));
    let task = tokio::spawn(run_command::run_command(ctx.clone(), sh(script)));
    // The pids arrive as LOG lines while the command runs.
    let mut pids: Vec<i32> = vec![];
    let ok = wait_until(Duration::from_secs(20), || {
        pids.extend(
            lines(&ctx, &mut rx)
                .iter()
                .filter_map(|l| l.message.strip_prefix("pid ")?.parse::<i32>().ok()),
        );
        pids.len() == 2
    })
    .await;
    assert!(ok, "the command did not start its children: {pids:?}");
    ctx.cancel.cancel();
    let e = task.await.unwrap().unwrap_err();
    assert_eq!(e.code, ErrorCode::Cancelled);
    assert!(
        wait_until(Duration::from_secs(5), || pids.iter().all(|p| dead(*p))).await,
        "processes survived the cancellation: {pids:?}"
    );
}

#[tokio::test]
async fn a_run_without_cgroups_streams_too() {
    // The same through a runner that has only process groups, with a small output cap.
    let runner = Runner::new(RunnerConfig {
        cgroup: CgroupMode::Off,
        ..Default::default()
    });
    let (ctx, mut rx) = ctx_with(runner, Duration::from_secs(120));
    let mut spec = Spec::new(vec!["/bin/sh".into(), "-c".into(), "echo a; echo b".into()]);
    spec.output_cap = 2;
    let r = exec::run_spec(&ctx, spec).await.unwrap();
    assert_eq!(r.stdout.to_bytes().unwrap(), b"b\n");
    assert!(r.stdout_truncated);
    let got: Vec<String> = lines(&ctx, &mut rx)
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert_eq!(got[1..], ["a", "b"]);
}
