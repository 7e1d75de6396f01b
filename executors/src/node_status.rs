//! `GET_NODE_STATUS`: facts of the node and the agent, from the host handle
//! ([`crate::handle::NodeFacts`]). Runs in the fast lane.

use runos_protocol::ErrorPayload;
use runos_protocol::instructions::{GetNodeStatus, NodeStatus};

use crate::context::Ctx;

/// `GET_NODE_STATUS`.
pub async fn node_status(ctx: Ctx, _req: GetNodeStatus) -> Result<NodeStatus, ErrorPayload> {
    let f = &ctx.host.facts;
    Ok(NodeStatus {
        node_is_ready: false,
        agent_version: f.agent_version.clone(),
        agent_uptime_secs: f.agent_started.elapsed().as_secs(),
        system_uptime_secs: (f.system_uptime_secs)(),
        hostname: (f.hostname)(),
        boot_id: (f.boot_id)(),
    })
}
