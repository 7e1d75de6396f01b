//! The executors: one async function per instruction type. They know nothing of TLS, queues or
//! sessions; the catalog decodes their payload and encodes their reply.

use std::path::PathBuf;
use std::time::Duration;

use runos_executors::host::runner::{self, Runner};
use runos_protocol::control::LogLevel;
use runos_protocol::instructions::{
    GetNodeStatus, NodeStatus, Output, RunCommand, RunCommandResponse, run_command_limits as lim,
};
use runos_protocol::peertext::PeerText;
use runos_protocol::{ErrorCode, ErrorPayload};

use crate::catalog::ExecCtx;
use crate::sysinfo;

/// `GET_NODE_STATUS`.
pub async fn node_status(ctx: ExecCtx, _req: GetNodeStatus) -> Result<NodeStatus, ErrorPayload> {
    Ok(NodeStatus {
        node_is_ready: false,
        agent_version: crate::agent_version().to_string(),
        agent_uptime_secs: ctx.agent_started.elapsed().as_secs(),
        system_uptime_secs: sysinfo::system_uptime_secs(),
        hostname: sysinfo::hostname(),
        boot_id: sysinfo::boot_id(),
    })
}

/// The process spec of a `RUN_COMMAND` payload. The payload was decoded and validated by the
/// protocol crate's rules when the dispatcher received it ([`crate::catalog::Catalog::register`]);
/// nothing is checked again here.
pub fn run_command_spec(req: RunCommand) -> runner::Spec {
    let timeout = Duration::from_secs(req.effective_timeout_secs());
    let mut spec = runner::Spec::new(req.argv);
    spec.timeout = timeout;
    spec.env = req.env;
    spec.cwd = PathBuf::from(req.cwd.as_deref().unwrap_or("/"));
    spec.stdin = req.stdin.map(String::into_bytes);
    spec.output_cap = lim::DEFAULT_OUTPUT_CAP;
    spec
}

/// `RUN_COMMAND`: argv only, no shell; `argv[0]` is found in the agent's own `PATH`
/// ([`runner::resolve_program`]); at the timeout the whole tree gets SIGTERM, then SIGKILL after
/// [`runner::DEFAULT_GRACE`]; dropping this future kills it at once.
pub async fn run_command(
    ctx: ExecCtx,
    req: RunCommand,
) -> Result<RunCommandResponse, ErrorPayload> {
    run_spec(&ctx, run_command_spec(req)).await
}

/// Run an already validated spec (also used by tests with small caps).
pub async fn run_spec(
    ctx: &ExecCtx,
    spec: runner::Spec,
) -> Result<RunCommandResponse, ErrorPayload> {
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
    let out = Runner::shared().run(spec).await.map_err(|e| match e {
        runner::SpawnError::Spawn(_) => ErrorPayload::new(ErrorCode::Failed, e.to_string()),
        _ => ErrorPayload::new(ErrorCode::Internal, e.to_string()),
    })?;
    tracing::info!(
        exit_code = ?out.exit_code,
        signal = ?out.signal,
        ended = ?out.ended,
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
