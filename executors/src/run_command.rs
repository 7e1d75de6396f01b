//! `RUN_COMMAND`: argv only, no shell, through the host handle's process runner
//! ([`crate::handle::Host::run`]). The payload was decoded and validated by the protocol crate
//! before the instruction was accepted; nothing is checked again here.

use std::path::PathBuf;
use std::time::Duration;

use runos_protocol::control::LogLevel;
use runos_protocol::instructions::{
    Output, RunCommand, RunCommandResponse, run_command_limits as lim,
};
use runos_protocol::peertext::PeerText;
use runos_protocol::{ErrorCode, ErrorPayload};

use crate::context::Ctx;
use crate::handle::{ProcessSpec, RunError};

/// The process spec of a `RUN_COMMAND` payload.
pub fn spec(req: RunCommand) -> ProcessSpec {
    ProcessSpec {
        timeout: Duration::from_secs(req.effective_timeout_secs()),
        argv: req.argv,
        env: req.env,
        cwd: PathBuf::from(req.cwd.as_deref().unwrap_or("/")),
        stdin: req.stdin.map(String::into_bytes),
        output_cap: lim::DEFAULT_OUTPUT_CAP,
    }
}

/// `RUN_COMMAND`.
pub async fn run_command(ctx: Ctx, req: RunCommand) -> Result<RunCommandResponse, ErrorPayload> {
    run_spec(&ctx, spec(req)).await
}

/// Run an already validated spec (also used by tests with small caps).
pub async fn run_spec(ctx: &Ctx, spec: ProcessSpec) -> Result<RunCommandResponse, ErrorPayload> {
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
    let out = ctx.host.run(spec).await.map_err(|e| match e {
        RunError::Spawn(m) => ErrorPayload::new(ErrorCode::Failed, m),
        RunError::Internal(m) => ErrorPayload::new(ErrorCode::Internal, m),
    })?;
    tracing::info!(
        exit_code = ?out.exit_code,
        signal = ?out.signal,
        timed_out = out.timed_out,
        duration_ms = out.duration.as_millis() as u64,
        "{program} finished"
    );
    Ok(RunCommandResponse {
        exit_code: out.exit_code,
        signal: out.signal,
        timed_out: out.timed_out,
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
    use crate::handle::{BoxFuture, Host, ProcessOutput, RunProcess};
    use std::sync::{Arc, Mutex};

    /// A stand-in runner: records the spec, answers exit 0 with "ok".
    #[derive(Default)]
    struct Recorder(Mutex<Vec<ProcessSpec>>);

    impl RunProcess for Recorder {
        fn run(&self, spec: ProcessSpec) -> BoxFuture<Result<ProcessOutput, RunError>> {
            self.0.lock().unwrap().push(spec);
            Box::pin(async {
                Ok(ProcessOutput {
                    exit_code: Some(0),
                    signal: None,
                    timed_out: false,
                    stdout: b"ok".to_vec(),
                    stderr: vec![],
                    stdout_truncated: false,
                    stderr_truncated: false,
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
            tokio::time::Instant::now() + Duration::from_secs(5),
            Arc::new(host),
            None,
        );
        let req: RunCommand =
            serde_json::from_str(r#"{"argv":["/bin/echo","x"],"timeoutSecs":7}"#).unwrap();
        let r = run_command(ctx, req).await.unwrap();
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.duration_ms, 3);
        let specs = rec.0.lock().unwrap();
        assert_eq!(specs[0].argv, vec!["/bin/echo", "x"]);
        assert_eq!(specs[0].timeout, Duration::from_secs(7));
        assert_eq!(specs[0].cwd, PathBuf::from("/"));
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
