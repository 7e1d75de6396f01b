//! The agent's side of the executors' host handle ([`runos_executors::Host`]): how their
//! processes run (today [`crate::process::run`]; the process runner takes its place) and the
//! node facts `GET_NODE_STATUS` reports. The executors themselves live in `runos-executors`.

use std::sync::Arc;

use runos_executors::handle::{
    BoxFuture, Host, NodeFacts, ProcessOutput, ProcessSpec, RunError, RunProcess,
};

use crate::{process, sysinfo};

/// Runs executor processes with [`process::run`]: argv only, its own process group, killed on
/// timeout and when the future is dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentRunner;

impl RunProcess for AgentRunner {
    fn run(&self, spec: ProcessSpec) -> BoxFuture<Result<ProcessOutput, RunError>> {
        Box::pin(async move {
            let spec = process::Spec {
                argv: spec.argv,
                env: spec.env,
                cwd: spec.cwd,
                stdin: spec.stdin,
                timeout: spec.timeout,
                output_cap: spec.output_cap,
            };
            let out = process::run(spec).await.map_err(|e| match e {
                process::SpawnError::Spawn { .. } => RunError::Spawn(e.to_string()),
                _ => RunError::Internal(e.to_string()),
            })?;
            Ok(ProcessOutput {
                exit_code: out.exit_code,
                signal: out.signal,
                timed_out: out.timed_out,
                stdout: out.stdout,
                stderr: out.stderr,
                stdout_truncated: out.stdout_truncated,
                stderr_truncated: out.stderr_truncated,
                duration: out.duration,
            })
        })
    }
}

/// The agent's host handle: [`AgentRunner`] and this node's facts, for an agent that started at
/// `agent_started`.
pub fn host(agent_started: std::time::Instant) -> Host {
    Host {
        runner: Arc::new(AgentRunner),
        tools: Default::default(),
        facts: NodeFacts {
            agent_version: crate::agent_version().to_string(),
            agent_started,
            hostname: sysinfo::hostname,
            boot_id: sysinfo::boot_id,
            system_uptime_secs: sysinfo::system_uptime_secs,
        },
    }
}
