//! The agent's side of the executors' host handle ([`runos_executors::Host`]): their processes
//! run with the process runner the daemon installed ([`Runner::shared`]), and the node facts
//! `GET_NODE_STATUS` reports come from here. The executors themselves live in `runos-executors`.

use std::sync::Arc;

use runos_executors::handle::{Host, NodeFacts};
use runos_executors::host::runner::Runner;

use crate::sysinfo;

/// The agent's host handle: the shared process runner and this node's facts, for an agent that started at
/// `agent_started`.
pub fn host(agent_started: std::time::Instant) -> Host {
    Host {
        runner: Arc::new(Runner::shared()),
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
