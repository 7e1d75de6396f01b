//! The executors: one async function per instruction type. They know nothing of TLS, queues or
//! sessions; the catalog decodes their payload and encodes their reply.

use std::path::PathBuf;
use std::time::Duration;

use runos_protocol::control::LogLevel;
use runos_protocol::instructions::{
    GetNodeStatus, NodeStatus, Output, RunCommand, RunCommandResponse, run_command_limits as lim,
};
use runos_protocol::{ErrorCode, ErrorPayload};

use crate::catalog::ExecCtx;
use crate::{process, sysinfo};

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

fn bad(msg: impl Into<String>) -> ErrorPayload {
    ErrorPayload::new(ErrorCode::BadPayload, msg)
}

/// Check a `RUN_COMMAND` payload and turn it into a process spec. Messages name the field,
/// never its value.
pub fn validate_run_command(req: RunCommand) -> Result<process::Spec, ErrorPayload> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(bad("RUN_COMMAND: argv must contain at least the program"));
    }
    if req.argv.len() > lim::MAX_ARGS {
        return Err(bad(format!(
            "RUN_COMMAND: argv has more than {} elements",
            lim::MAX_ARGS
        )));
    }
    for (i, a) in req.argv.iter().enumerate() {
        if a.len() > lim::MAX_ARG_LEN || a.contains('\0') {
            return Err(bad(format!(
                "RUN_COMMAND: argv[{i}] is longer than {} bytes or contains NUL",
                lim::MAX_ARG_LEN
            )));
        }
    }
    if req.env.len() > lim::MAX_ENV {
        return Err(bad(format!(
            "RUN_COMMAND: env has more than {} variables",
            lim::MAX_ENV
        )));
    }
    for (k, v) in &req.env {
        let name_ok = !k.is_empty()
            && k.len() <= 256
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(bad(
                "RUN_COMMAND: env names must be 1 to 256 characters of [A-Za-z0-9_]",
            ));
        }
        if v.len() > lim::MAX_ARG_LEN || v.contains('\0') {
            return Err(bad(format!(
                "RUN_COMMAND: the value of env {k} is longer than {} bytes or contains NUL",
                lim::MAX_ARG_LEN
            )));
        }
    }
    let cwd = PathBuf::from(req.cwd.as_deref().unwrap_or("/"));
    if !cwd.is_absolute() {
        return Err(bad("RUN_COMMAND: cwd must be an absolute path"));
    }
    if let Some(s) = &req.stdin
        && s.len() > lim::MAX_STDIN
    {
        return Err(bad(format!(
            "RUN_COMMAND: stdin is larger than {} bytes",
            lim::MAX_STDIN
        )));
    }
    let secs = req.timeout_secs.unwrap_or(lim::DEFAULT_TIMEOUT_SECS);
    if secs == 0 || secs > lim::MAX_TIMEOUT_SECS {
        return Err(bad(format!(
            "RUN_COMMAND: timeoutSecs must be between 1 and {}",
            lim::MAX_TIMEOUT_SECS
        )));
    }
    Ok(process::Spec {
        argv: req.argv,
        env: req.env,
        cwd,
        stdin: req.stdin.map(String::into_bytes),
        timeout: Duration::from_secs(secs),
        output_cap: lim::DEFAULT_OUTPUT_CAP,
    })
}

/// `RUN_COMMAND`: argv only, no shell; the whole process group dies on timeout or when this
/// future is dropped.
pub async fn run_command(
    ctx: ExecCtx,
    req: RunCommand,
) -> Result<RunCommandResponse, ErrorPayload> {
    let spec = validate_run_command(req)?;
    run_spec(&ctx, spec).await
}

/// Run an already validated spec (also used by tests with small caps).
pub async fn run_spec(
    ctx: &ExecCtx,
    spec: process::Spec,
) -> Result<RunCommandResponse, ErrorPayload> {
    // argv[0] only: arguments may carry secrets.
    let program = spec.argv[0].clone();
    ctx.log(
        LogLevel::Info,
        &format!(
            "starting {program} with {} argument(s), timeout {} s",
            spec.argv.len() - 1,
            spec.timeout.as_secs()
        ),
    );
    let out = process::run(spec).await.map_err(|e| match e {
        process::SpawnError::Spawn { .. } => ErrorPayload::new(ErrorCode::Failed, e.to_string()),
        _ => ErrorPayload::new(ErrorCode::Internal, e.to_string()),
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
    use std::collections::BTreeMap;

    fn req(argv: &[&str]) -> RunCommand {
        RunCommand {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout_secs: None,
        }
    }

    #[test]
    fn validation_names_fields_not_values() {
        assert!(validate_run_command(req(&[])).is_err());
        let mut r = req(&["/bin/true"]);
        r.cwd = Some("relative".into());
        assert!(validate_run_command(r).unwrap_err().message.contains("cwd"));
        let mut r = req(&["/bin/true"]);
        r.env.insert("BAD=NAME".into(), "topsecret".into());
        let e = validate_run_command(r).unwrap_err();
        assert!(!e.message.contains("topsecret"));
        let mut r = req(&["/bin/true"]);
        r.timeout_secs = Some(0);
        assert!(validate_run_command(r).is_err());
        let mut r = req(&["/bin/true"]);
        r.env.insert("GOOD".into(), "x\0y".into());
        assert!(validate_run_command(r).is_err());
        assert!(validate_run_command(req(&["/bin/true"])).is_ok());
    }
}
