//! The instruction catalog: every instruction type the control plane may send, with its payload
//! and reply schemas.
//!
//! Payload field names follow the Go RunOS agent where it had the instruction, so its schemas
//! carry over. Executors live in the agent; this module only describes the wire.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A typed instruction: its wire type name, payload, and the type and payload of its success
/// reply. Failures are always `ERROR` with an [`crate::ErrorPayload`] unless the type's docs say
/// otherwise.
pub trait Instruction: Serialize + DeserializeOwned {
    /// The wire type name.
    const TYPE: &'static str;
    /// The wire type name of the success reply.
    const REPLY_TYPE: &'static str;
    /// The success reply's payload.
    type Reply: Serialize + DeserializeOwned;
}

/// Output captured from a process: UTF-8 text, or base64 when it is not valid UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Valid UTF-8.
    Text(String),
    /// Standard base64 of bytes that are not valid UTF-8.
    Base64(String),
}

impl Output {
    /// Wrap captured bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        use base64::Engine as _;
        match String::from_utf8(bytes) {
            Ok(s) => Output::Text(s),
            Err(e) => {
                Output::Base64(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
        }
    }

    /// The captured bytes.
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        match self {
            Output::Text(s) => Some(s.as_bytes().to_vec()),
            Output::Base64(b) => base64::engine::general_purpose::STANDARD.decode(b).ok(),
        }
    }
}

/// Limits of `RUN_COMMAND`, enforced by the agent when it validates the payload.
pub mod run_command_limits {
    /// Most argv elements.
    pub const MAX_ARGS: usize = 4096;
    /// Longest single argument or environment value, in bytes.
    pub const MAX_ARG_LEN: usize = 128 * 1024;
    /// Most environment variables.
    pub const MAX_ENV: usize = 256;
    /// Largest stdin, in bytes.
    pub const MAX_STDIN: usize = 4 * 1024 * 1024;
    /// Longest timeout, in seconds (24 h).
    pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
    /// Default timeout when the payload gives none, in seconds.
    pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
    /// Most stdout/stderr bytes kept per stream (the tail is kept).
    pub const DEFAULT_OUTPUT_CAP: usize = 1024 * 1024;
}

/// `RUN_COMMAND`: run a program (argv, never a shell string) and report how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunCommand {
    /// The program and its arguments. `argv[0]` is an absolute path or a name looked up in the
    /// agent's `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables. The child starts from a minimal environment (`PATH`,
    /// `LANG=C.UTF-8`, `HOME`) plus these. Values are secret: never logged.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute). Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Standard input, as UTF-8 text. Secret: never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill the process group after this many seconds (default 300, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// `RUN_COMMAND_RESPONSE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunCommandResponse {
    /// Exit code, when the process exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal number, when the process was killed by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Whether the agent killed the process group because the timeout passed.
    pub timed_out: bool,
    /// The tail of standard output.
    pub stdout: Output,
    /// The tail of standard error.
    pub stderr: Output,
    /// Whether standard output was longer than the cap (only its tail is kept).
    pub stdout_truncated: bool,
    /// Whether standard error was longer than the cap.
    pub stderr_truncated: bool,
    /// Wall-clock run time in milliseconds.
    pub duration_ms: u64,
}

impl Instruction for RunCommand {
    const TYPE: &'static str = types::RUN_COMMAND;
    const REPLY_TYPE: &'static str = types::RUN_COMMAND_RESPONSE;
    type Reply = RunCommandResponse;
}

/// `GET_NODE_STATUS`: payload `{}` (any object is accepted, as in the Go agent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetNodeStatus {}

/// `NODE_STATUS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Whether the node's Kubernetes Node object is Ready (false until Kubernetes support).
    pub node_is_ready: bool,
    /// The agent's version.
    pub agent_version: String,
    /// Seconds since the agent process started.
    pub agent_uptime_secs: u64,
    /// Seconds since the machine booted.
    pub system_uptime_secs: u64,
    /// The hostname.
    pub hostname: String,
    /// The kernel's boot id.
    pub boot_id: String,
}

impl Instruction for GetNodeStatus {
    const TYPE: &'static str = types::GET_NODE_STATUS;
    const REPLY_TYPE: &'static str = types::NODE_STATUS;
    type Reply = NodeStatus;
}

/// Instruction and reply type names.
pub mod types {
    /// Run a program by argv.
    pub const RUN_COMMAND: &str = "RUN_COMMAND";
    /// Reply to RUN_COMMAND.
    pub const RUN_COMMAND_RESPONSE: &str = "RUN_COMMAND_RESPONSE";
    /// Report the node's status.
    pub const GET_NODE_STATUS: &str = "GET_NODE_STATUS";
    /// Reply to GET_NODE_STATUS.
    pub const NODE_STATUS: &str = "NODE_STATUS";
}

/// Every instruction type in the catalog, whether or not a given agent executes it.
pub const ALL_INSTRUCTION_TYPES: &[&str] = &[types::RUN_COMMAND, types::GET_NODE_STATUS];

/// Whether `kind` names an instruction in the catalog.
pub fn is_instruction_type(kind: &str) -> bool {
    ALL_INSTRUCTION_TYPES.contains(&kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_type_names_are_valid() {
        for t in ALL_INSTRUCTION_TYPES {
            assert!(crate::MessageType::new(*t).is_ok(), "{t}");
        }
    }

    #[test]
    fn output_text_or_base64() {
        assert_eq!(
            Output::from_bytes(b"hi".to_vec()),
            Output::Text("hi".into())
        );
        let o = Output::from_bytes(vec![0xff]);
        assert_eq!(o, Output::Base64("/w==".into()));
        assert_eq!(o.to_bytes().unwrap(), vec![0xff]);
        assert_eq!(
            serde_json::to_string(&Output::Text("a".into())).unwrap(),
            r#"{"text":"a"}"#
        );
    }
}
