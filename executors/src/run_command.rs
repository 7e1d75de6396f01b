//! `RUN_COMMAND`: argv only, no shell, through the process runner ([`Ctx::run`]): its output
//! is streamed as `LOG` lines while it runs, and its capped tails are in the reply. The payload
//! was decoded and validated by the protocol crate before the instruction was accepted; nothing
//! is checked again here.

use std::path::PathBuf;
use std::time::Duration;

use runos_protocol::ErrorPayload;
use runos_protocol::control::LogLevel;
use runos_protocol::instructions::{
    Output, RunCommand, RunCommandResponse, run_command_limits as lim,
};
use runos_protocol::peertext::PeerText;

use crate::context::{Ctx, Secrecy};
use crate::handle::Spec;

/// The process spec of a `RUN_COMMAND` payload (the runner's default grace: 10 s, §10).
pub fn spec(req: RunCommand) -> Spec {
    let timeout = Duration::from_secs(req.effective_timeout_secs());
    let mut spec = Spec::new(req.argv);
    spec.env = req.env;
    spec.cwd = PathBuf::from(req.cwd.as_deref().unwrap_or("/"));
    spec.stdin = req.stdin.map(String::into_bytes);
    spec.timeout = timeout;
    spec.output_cap = lim::DEFAULT_OUTPUT_CAP;
    spec
}

/// `RUN_COMMAND`.
pub async fn run_command(ctx: Ctx, req: RunCommand) -> Result<RunCommandResponse, ErrorPayload> {
    run_spec(&ctx, spec(req)).await
}

/// Run an already validated spec (also used by tests with small caps). Its output is not
/// secret (it is in the reply), so it is streamed as `LOG` lines; environment values and stdin
/// never are.
pub async fn run_spec(ctx: &Ctx, spec: Spec) -> Result<RunCommandResponse, ErrorPayload> {
    // argv[0] only: arguments may carry secrets. Escaped and capped: it is the peer's text.
    let program = PeerText::new(spec.argv.first().map_or("", String::as_str)).to_string();
    ctx.log(
        LogLevel::Info,
        &format!(
            "starting {program} with {} argument(s), timeout {} s",
            spec.argv.len().saturating_sub(1),
            spec.timeout.as_secs()
        ),
    );
    let out = ctx.run(spec, Secrecy::Public).await?;
    tracing::info!(
        exit_code = ?out.exit_code,
        signal = ?out.signal,
        ended = ?out.ended,
        lines_dropped = out.lines_dropped,
        duration_ms = out.duration.as_millis() as u64,
        "{program} finished"
    );
    Ok(RunCommandResponse {
        exit_code: out.exit_code,
        signal: out.signal,
        timed_out: out.timed_out(),
        stdout: Output::from_bytes(out.stdout),
        stderr: Output::from_bytes(out.stderr),
        stdout_truncated: out.stdout_truncated,
        stderr_truncated: out.stderr_truncated,
        duration_ms: u64::try_from(out.duration.as_millis()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handle::{BoxFuture, Host, Outcome, RunError, RunProcess};
    use crate::host::runner::Ended;
    use runos_protocol::ErrorCode;
    use std::sync::{Arc, Mutex};

    /// A stand-in runner: records the spec, answers exit 0 with "ok".
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Spec>>);

    impl RunProcess for Recorder {
        fn run(&self, spec: Spec) -> BoxFuture<Result<Outcome, RunError>> {
            self.0.lock().unwrap().push(spec);
            Box::pin(async {
                Ok(Outcome {
                    exit_code: Some(0),
                    signal: None,
                    ended: Ended::Exited,
                    stdout: b"ok".to_vec(),
                    stderr: vec![],
                    stdout_truncated: false,
                    stderr_truncated: false,
                    lines_dropped: 0,
                    duration: Duration::from_millis(3),
                })
            })
        }
    }

    #[tokio::test]
    async fn runs_through_the_host_handle() {
        let rec = Arc::new(Recorder::default());
        let host = Host {
            runner: rec.clone(),
            ..Default::default()
        };
        let ctx = crate::Ctx::new(
            runos_protocol::Tag::random(),
            tokio::time::Instant::now() + Duration::from_secs(60),
            Arc::new(host),
            None,
        );
        let req: RunCommand =
            serde_json::from_str(r#"{"argv":["/bin/echo","x"],"timeoutSecs":7}"#).unwrap();
        let r = run_command(ctx.clone(), req).await.unwrap();
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.duration_ms, 3);
        let specs = rec.0.lock().unwrap();
        assert_eq!(specs[0].argv, vec!["/bin/echo", "x"]);
        assert_eq!(specs[0].timeout, Duration::from_secs(7));
        assert_eq!(specs[0].grace, Duration::from_secs(10));
        assert_eq!(specs[0].cwd, PathBuf::from("/"));
        // Output goes out as LOG lines; the run ends with the instruction.
        assert!(specs[0].lines.is_some());
        assert!(!specs[0].cancel.is_cancelled());
        ctx.cancel.cancel();
        assert!(specs[0].cancel.is_cancelled());
    }

    #[tokio::test]
    async fn a_run_that_would_outlast_the_deadline_ends_before_it_and_answers_timeout() {
        /// Answers what the runner says when the spec's timeout ended the run.
        struct TimesOut(Mutex<Option<Spec>>);
        impl RunProcess for TimesOut {
            fn run(&self, spec: Spec) -> BoxFuture<Result<Outcome, RunError>> {
                *self.0.lock().unwrap() = Some(spec);
                Box::pin(async {
                    Ok(Outcome {
                        exit_code: None,
                        signal: Some(15),
                        ended: Ended::TimedOut,
                        stdout: vec![],
                        stderr: vec![],
                        stdout_truncated: false,
                        stderr_truncated: false,
                        lines_dropped: 0,
                        duration: Duration::from_secs(3),
                    })
                })
            }
        }
        let runner = Arc::new(TimesOut(Mutex::new(None)));
        let host = Host {
            runner: runner.clone(),
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let ctx = crate::Ctx::new(
            runos_protocol::Tag::random(),
            deadline,
            Arc::new(host),
            None,
        );
        let req: RunCommand =
            serde_json::from_str(r#"{"argv":["/bin/sleep","1000"],"timeoutSecs":300}"#).unwrap();
        let e = run_command(ctx, req).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Timeout);
        let spec = runner.0.lock().unwrap().take().unwrap();
        // SIGTERM, the grace and the reply all fit before the deadline.
        assert!(
            spec.timeout + spec.grace + crate::context::REPLY_MARGIN <= Duration::from_secs(5),
            "{spec:?}"
        );
        assert!(spec.grace > Duration::ZERO && spec.timeout > Duration::ZERO);
    }

    #[tokio::test]
    async fn a_host_without_a_runner_answers_internal() {
        let ctx = crate::Ctx::detached(runos_protocol::Tag::random(), Duration::from_secs(5));
        let req: RunCommand = serde_json::from_str(r#"{"argv":["/bin/true"]}"#).unwrap();
        // The default host has no runner: internal.
        let e = run_command(ctx, req).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
    }
}
