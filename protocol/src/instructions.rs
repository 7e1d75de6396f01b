//! The instruction catalog: every instruction type the control plane may send, with its payload
//! and reply schemas.
//!
//! Payload field names follow the Go RunOS agent where it had the instruction, so its schemas
//! carry over, oddities included:
//!
//! - `REMOVE_ETCD_MEMBER` spells its field `node_ip` (snake case); everything else is camelCase.
//! - `RUN_KUBECTL_COMMAND`'s payload is a bare JSON array of strings, not an object.
//! - `RUN_WEB_REQUEST`'s success reply has the same type name as the request, and its
//!   `responseStatusCode` is a string (`"200"`).
//! - `GET_NODE_STATUS` and `UNINSTALL_NODE` take any JSON object and ignore it.
//! - `RUN_WEB_REQUEST`'s `allowInsecure` is accepted and ignored: TLS is always verified.
//!
//! Payloads inherited from the Go agent accept unknown fields, treat a missing field as its
//! empty value, and read a JSON `null` string, list, map, number or boolean as empty (as Go's
//! decoder does); [`Instruction::validate`] then rejects empty values where they are required,
//! naming the field. Payloads new in runos (`RUN_COMMAND`, `CANCEL`, `UPDATE_AGENT`, and the
//! package types `INSTALL_PACKAGES`, `REMOVE_PACKAGES`, `GET_PACKAGES`) refuse unknown fields.
//!
//! Where the Go agent accepted values it then passed to a program unchecked, runos refuses them
//! here: WireGuard keys and IP addresses of every VPN peer (the Go agent skipped bad peers and
//! still answered success), strict version strings for `UPGRADE_NODE_K8S` (the Go agent put them
//! into shell strings), helm names and versions that could turn into options, `oci://` detected
//! case-insensitively everywhere ([`InstallHelmChart::is_oci`]), an etcd member's IP address,
//! and the dnsmasq directives `pid-file`, `user`, `group` and `log-facility` with a path.
//!
//! Failures are answered with `ERROR` and an [`ErrorPayload`]; the Go agent's
//! `INSTALL_HELM_CHART_ERROR` and `UNINSTALL_HELM_CHART_ERROR` reply types are not used (runos
//! sends `ERROR` with code `failed`). Reply types that carry a success flag
//! (`UPGRADE_NODE_K8S_RESPONSE.success`, `VIP_*_RESPONSE.ok`) report an operation that ran and
//! failed with the flag set to false; `ERROR` covers everything before that (`bad_payload`,
//! `busy`, `timeout`, ...). Every instruction gets exactly one final reply: `VIP_ASSIGN` is no
//! longer silent on failure.
//!
//! Secret fields (environment values, stdin, script parameters, HTTP headers and bodies, join
//! commands and keys, manifests) are left out of `Debug` output, and validation errors name
//! fields but never repeat values.
//!
//! Executors live in the agent; this module only describes the wire. Where a field's shape is a
//! protocol-level fact (an IP address, a WireGuard key, a strict version string, a helm name that
//! cannot turn into an option), [`Instruction::validate`] checks it, purely and cheaply.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::control::NoContent;
use crate::envelope::{Envelope, PayloadError, Tag};
use crate::error::{ErrorCode, ErrorPayload};
use crate::validate::{self, KeysOnly, LenOnly, Problem, Redacted, ValidationError};

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

    /// Check the fields whose shape is a protocol-level fact. Pure and cheap; executors still
    /// check what depends on the node. The default accepts every decoded payload.
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }

    /// The deadline, in seconds, of this instruction when its envelope has no `timeoutMs`
    /// (§7.3): the catalog's default for the type, unless the payload decides it (RUN_COMMAND:
    /// its `timeoutSecs` plus [`RUN_COMMAND_DEADLINE_GRACE_SECS`]).
    fn default_deadline_secs(&self) -> u64 {
        catalog_entry(Self::TYPE).map_or(DEFAULT_DEADLINE_SECS, |e| e.default_timeout_secs)
    }

    /// An envelope carrying this instruction with `tag`.
    fn to_envelope(&self, tag: Tag) -> Envelope {
        Envelope::with_type(Self::TYPE, tag, self)
    }

    /// Decode and validate the payload of `env`. The caller has already routed by type: the
    /// envelope's type is not looked at.
    fn from_envelope(env: &Envelope) -> Result<Self, BadPayload> {
        let payload: Self = env.payload()?;
        payload.validate()?;
        Ok(payload)
    }

    /// The success reply envelope for the instruction tagged `tag`.
    fn reply_envelope(tag: Tag, reply: &Self::Reply) -> Envelope {
        Envelope::with_type(Self::REPLY_TYPE, tag, reply)
    }
}

/// Why an instruction's payload was refused: it could not be decoded, or a field failed
/// [`Instruction::validate`]. Answered with `ERROR` code `bad_payload`.
#[derive(Debug, thiserror::Error)]
pub enum BadPayload {
    /// The payload is not base64, not UTF-8, not JSON, or not of the type's schema.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// A field failed validation.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

impl BadPayload {
    /// The `ERROR` payload to answer with: code `bad_payload` and a message that names the
    /// problem (and the field, when known) but never repeats a value from the payload.
    pub fn to_error_payload(&self) -> ErrorPayload {
        let message = match self {
            BadPayload::Payload(e) => e.safe_message(),
            BadPayload::Invalid(e) => e.to_string(),
        };
        ErrorPayload::new(ErrorCode::BadPayload, message)
    }
}

/// Read a JSON `null` as the type's default (Go encodes a nil slice or map as `null`).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Output captured from a process: UTF-8 text, or base64 when it is not valid UTF-8 or when
/// base64 is shorter than the text would be once escaped in JSON (output full of control
/// bytes, where each escape costs 6 bytes). So the encoded size of captured output is never more
/// than 4/3 of its raw size, and a reply with capped output always fits in a frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Valid UTF-8 whose JSON form is not longer than its base64 form.
    Text(String),
    /// Standard base64 of the bytes.
    Base64(String),
}

/// Length of `s` as a JSON string body (without quotes), as serde_json escapes it.
fn json_escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

impl Output {
    /// Wrap captured bytes, choosing the shorter encoding.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        match String::from_utf8(bytes) {
            Ok(s) if json_escaped_len(&s) <= s.len().div_ceil(3) * 4 => Output::Text(s),
            Ok(s) => Output::Base64(b64(s.as_bytes())),
            Err(e) => Output::Base64(b64(e.as_bytes())),
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
///
/// `Debug` shows environment variable names but not their values, and not stdin.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl fmt::Debug for RunCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunCommand")
            .field("argv", &self.argv)
            .field("env", &KeysOnly(&self.env))
            .field("cwd", &self.cwd)
            .field("stdin", &self.stdin.as_ref().map(|_| Redacted))
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

impl RunCommand {
    /// The process timeout: `timeoutSecs`, or [`run_command_limits::DEFAULT_TIMEOUT_SECS`].
    pub fn effective_timeout_secs(&self) -> u64 {
        self.timeout_secs
            .unwrap_or(run_command_limits::DEFAULT_TIMEOUT_SECS)
    }
}

impl Instruction for RunCommand {
    const TYPE: &'static str = types::RUN_COMMAND;
    const REPLY_TYPE: &'static str = types::RUN_COMMAND_RESPONSE;
    type Reply = RunCommandResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        use run_command_limits as l;
        let Some(program) = self.argv.first() else {
            return Err(ValidationError::new("argv", Problem::Empty));
        };
        validate::count("argv", self.argv.len(), l::MAX_ARGS)?;
        validate::length("argv[0]", program, l::MAX_ARG_LEN)?;
        validate::program("argv[0]", program)?;
        for (i, a) in self.argv.iter().enumerate() {
            validate::arg(&format!("argv[{i}]"), a, l::MAX_ARG_LEN)?;
        }
        validate::count("env", self.env.len(), l::MAX_ENV)?;
        for (name, value) in &self.env {
            validate::env_name("env", name)?;
            validate::arg(&format!("env.{name}"), value, l::MAX_ARG_LEN)?;
        }
        if let Some(cwd) = &self.cwd {
            validate::absolute_path("cwd", cwd)?;
        }
        if let Some(stdin) = &self.stdin
            && stdin.len() > l::MAX_STDIN
        {
            return Err(ValidationError::new(
                "stdin",
                Problem::TooLong { max: l::MAX_STDIN },
            ));
        }
        if let Some(t) = self.timeout_secs {
            validate::range("timeoutSecs", t, 1, l::MAX_TIMEOUT_SECS)?;
        }
        Ok(())
    }

    fn default_deadline_secs(&self) -> u64 {
        self.effective_timeout_secs()
            .saturating_add(RUN_COMMAND_DEADLINE_GRACE_SECS)
    }
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

// ---------------------------------------------------------------------------------------------
// SET_VPN_PEERS

/// Most peers in one `SET_VPN_PEERS`.
pub const MAX_VPN_PEERS: usize = 4096;

/// A WireGuard peer, as in `SET_VPN_PEERS` and `NODE_VPN_PEER`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VpnPeer {
    /// The peer's WireGuard public key: 44 characters of standard base64 encoding 32 bytes.
    #[serde(deserialize_with = "null_as_default")]
    pub pub_key: String,
    /// The peer's underlay address (IPv4 or IPv6).
    #[serde(deserialize_with = "null_as_default")]
    pub endpoint_ip: String,
    /// The peer's overlay address; its allowed IPs are this address alone (/32 or /128).
    #[serde(deserialize_with = "null_as_default")]
    pub vpn_ip: String,
    /// runos: the peer's WireGuard UDP port (default 51820, the Go agent's fixed port). Two
    /// nodes behind one NAT need different ones. In `NODE_VPN_PEER`: this node's listen port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_port: Option<u16>,
    /// runos: this peer's persistent keepalive in seconds, 0 for none (default: the agent's
    /// `[wireguard] keepalive_secs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_secs: Option<u16>,
}

/// The WireGuard port of a peer without `endpointPort`.
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;

/// `SET_VPN_PEERS`: add or update WireGuard peers on the overlay interface (`wg0`). Every peer
/// is validated; one invalid peer rejects the whole instruction (the Go agent skipped it and
/// still answered success).
///
/// runos extensions: with `generation`, a set older than the one the node applied last is
/// refused (`ERROR` `stale`) and an equal one changes nothing; with `complete: true` (which
/// requires `generation`) the payload is the whole desired peer set, and peers absent from it are
/// removed. Without either, peers are only added or updated, as in the Go agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SetVpnPeers {
    /// The peers to configure. `null` reads as an empty list.
    #[serde(deserialize_with = "null_as_default")]
    pub peers: Vec<VpnPeer>,
    /// runos: the set's generation (0 or more; increases with every change the control plane
    /// makes to this node's peer set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// runos: `peers` is the whole desired set (peers not in it are removed).
    #[serde(skip_serializing_if = "is_false", deserialize_with = "null_as_default")]
    pub complete: bool,
}

/// `NODE_VPN_PEER`: this node's own WireGuard identity, after the peers were applied, and
/// (runos) what the instruction changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct NodeVpnPeer {
    /// This node as a peer: its public key, underlay address, overlay address and listen port.
    pub node_peer: VpnPeer,
    /// runos: the generation now applied (absent while no set with a generation was applied).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// runos: public keys of the peers this instruction added to the interface.
    #[serde(deserialize_with = "null_as_default")]
    pub added: Vec<String>,
    /// runos: public keys of the peers whose endpoint, allowed IPs or keepalive it changed.
    #[serde(deserialize_with = "null_as_default")]
    pub changed: Vec<String>,
    /// runos: public keys of the peers it removed (only a `complete` set removes peers).
    #[serde(deserialize_with = "null_as_default")]
    pub removed: Vec<String>,
    /// runos: how many peers of the set were already as asked (left alone: no handshake reset).
    #[serde(deserialize_with = "null_as_default")]
    pub unchanged: usize,
}

impl Instruction for SetVpnPeers {
    const TYPE: &'static str = types::SET_VPN_PEERS;
    const REPLY_TYPE: &'static str = types::NODE_VPN_PEER;
    type Reply = NodeVpnPeer;

    fn validate(&self) -> Result<(), ValidationError> {
        validate::count("peers", self.peers.len(), MAX_VPN_PEERS)?;
        if let Some(g) = self.generation
            && g < 0
        {
            return Err(ValidationError::new(
                "generation",
                Problem::OutOfRange {
                    min: 0,
                    max: i64::MAX as u64,
                },
            ));
        }
        if self.complete && self.generation.is_none() {
            return Err(ValidationError::new(
                "complete",
                Problem::Requires {
                    other: "generation",
                },
            ));
        }
        let mut keys = std::collections::HashSet::with_capacity(self.peers.len());
        let mut vpn_ips = std::collections::HashSet::with_capacity(self.peers.len());
        for (i, p) in self.peers.iter().enumerate() {
            validate::wireguard_key(&format!("peers[{i}].pubKey"), &p.pub_key)?;
            validate::ip(&format!("peers[{i}].endpointIp"), &p.endpoint_ip)?;
            let vpn_ip = validate::ip(&format!("peers[{i}].vpnIp"), &p.vpn_ip)?;
            if let Some(port) = p.endpoint_port {
                validate::range(
                    &format!("peers[{i}].endpointPort"),
                    u64::from(port),
                    1,
                    65535,
                )?;
            }
            if !keys.insert(p.pub_key.as_str()) {
                return Err(ValidationError::new(
                    format!("peers[{i}].pubKey"),
                    Problem::Duplicate,
                ));
            }
            // Two peers with one allowed IP: WireGuard would silently move it to the last one.
            if !vpn_ips.insert(vpn_ip) {
                return Err(ValidationError::new(
                    format!("peers[{i}].vpnIp"),
                    Problem::Duplicate,
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// GET_CLUSTER_JOIN_CMD

/// `GET_CLUSTER_JOIN_CMD`: create a kubeadm join command for another node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct GetClusterJoinCmd {
    /// Whether the joining node becomes a control-plane node (adds `--control-plane
    /// --certificate-key` and the encryption key).
    #[serde(deserialize_with = "null_as_default")]
    pub as_cp: bool,
}

/// `CLUSTER_JOIN_CMD`. Both fields are secrets; `Debug` shows neither.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClusterJoinCmd {
    /// The `kubeadm join ...` command line (contains a bootstrap token, and for a control plane
    /// the certificate key).
    #[serde(deserialize_with = "null_as_default")]
    pub join_cmd: String,
    /// For `asCp`: the API server's encryption-at-rest key material.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<String>,
}

impl fmt::Debug for ClusterJoinCmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterJoinCmd")
            .field("join_cmd", &Redacted)
            .field(
                "encryption_key",
                &self.encryption_key.as_ref().map(|_| Redacted),
            )
            .finish()
    }
}

impl Instruction for GetClusterJoinCmd {
    const TYPE: &'static str = types::GET_CLUSTER_JOIN_CMD;
    const REPLY_TYPE: &'static str = types::CLUSTER_JOIN_CMD;
    type Reply = ClusterJoinCmd;
}

// ---------------------------------------------------------------------------------------------
// APPLY_CR, APPLY_OPERATOR, DELETE_CR

/// `APPLY_CR`: `kubectl apply` a YAML manifest. `Debug` shows only its length (manifests may
/// hold Kubernetes Secrets).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApplyCr {
    /// Standard padded base64 of the YAML manifest; not empty.
    #[serde(rename = "crB64", deserialize_with = "null_as_default")]
    pub cr_b64: String,
}

/// `APPLY_OPERATOR`: `kubectl apply` an operator's YAML (CRDs and friends). `Debug` shows only
/// its length.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApplyOperator {
    /// Standard padded base64 of the YAML manifest; not empty.
    #[serde(rename = "crdB64", deserialize_with = "null_as_default")]
    pub crd_b64: String,
}

fn decode_manifest(field: &str, b64: &str) -> Result<Vec<u8>, ValidationError> {
    let bytes = validate::base64(field, b64)?;
    if bytes.is_empty() {
        return Err(ValidationError::new(field, Problem::Empty));
    }
    Ok(bytes)
}

impl ApplyCr {
    /// The decoded manifest.
    pub fn manifest(&self) -> Result<Vec<u8>, ValidationError> {
        decode_manifest("crB64", &self.cr_b64)
    }
}

impl ApplyOperator {
    /// The decoded manifest.
    pub fn manifest(&self) -> Result<Vec<u8>, ValidationError> {
        decode_manifest("crdB64", &self.crd_b64)
    }
}

impl fmt::Debug for ApplyCr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApplyCr")
            .field("cr_b64", &LenOnly(self.cr_b64.len()))
            .finish()
    }
}

impl fmt::Debug for ApplyOperator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApplyOperator")
            .field("crd_b64", &LenOnly(self.crd_b64.len()))
            .finish()
    }
}

impl Instruction for ApplyCr {
    const TYPE: &'static str = types::APPLY_CR;
    const REPLY_TYPE: &'static str = crate::control::types::NO_CONTENT;
    type Reply = NoContent;

    fn validate(&self) -> Result<(), ValidationError> {
        self.manifest().map(|_| ())
    }
}

impl Instruction for ApplyOperator {
    const TYPE: &'static str = types::APPLY_OPERATOR;
    const REPLY_TYPE: &'static str = crate::control::types::NO_CONTENT;
    type Reply = NoContent;

    fn validate(&self) -> Result<(), ValidationError> {
        self.manifest().map(|_| ())
    }
}

/// `DELETE_CR`: delete the custom resource `id` of resource type `type` (group `runos.com`,
/// version `v1`) in namespace `id` (the Go agent's convention: name and namespace are equal).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeleteCr {
    /// The resource's plural name, e.g. `clusters`: a DNS-1123 label.
    #[serde(rename = "type", deserialize_with = "null_as_default")]
    pub kind: String,
    /// The object's name, which is also its namespace: a DNS-1123 label.
    #[serde(deserialize_with = "null_as_default")]
    pub id: String,
}

impl Instruction for DeleteCr {
    const TYPE: &'static str = types::DELETE_CR;
    const REPLY_TYPE: &'static str = crate::control::types::NO_CONTENT;
    type Reply = NoContent;

    fn validate(&self) -> Result<(), ValidationError> {
        validate::dns_label("type", &self.kind)?;
        validate::dns_label("id", &self.id)
    }
}

// ---------------------------------------------------------------------------------------------
// RUN_KUBECTL_COMMAND

/// `RUN_KUBECTL_COMMAND`: run `kubectl` with these arguments (the program itself is not part of
/// the list). On the wire the payload is a bare JSON array of strings, e.g.
/// `["get", "nodes", "-o", "json"]`; `null` reads as an empty list, which fails validation.
/// Limits are those of RUN_COMMAND's argv.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunKubectlCommand {
    /// The arguments after `kubectl`.
    pub args: Vec<String>,
}

impl Serialize for RunKubectlCommand {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.args.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RunKubectlCommand {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(RunKubectlCommand {
            args: null_as_default(d)?,
        })
    }
}

/// A reply whose only field is `response`: the output of the command it ran. `Debug` shows only
/// its length (output may hold secrets).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextResponse {
    /// The output (UTF-8; invalid sequences replaced by U+FFFD).
    #[serde(deserialize_with = "null_as_default")]
    pub response: String,
}

impl fmt::Debug for TextResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextResponse")
            .field("response", &LenOnly(self.response.len()))
            .finish()
    }
}

/// `KUBECTL_COMMAND_RESPONSE`: `{"response": "<stdout>"}`.
pub type KubectlCommandResponse = TextResponse;
/// `RUN_REMOTE_SCRIPT_RESPONSE`: `{"response": "<combined output>"}`.
pub type RunRemoteScriptResponse = TextResponse;
/// `INSTALL_HELM_CHART_RESPONSE` and `UNINSTALL_HELM_CHART_RESPONSE`: `{"response": "<stdout>"}`.
pub type HelmChartResponse = TextResponse;

impl Instruction for RunKubectlCommand {
    const TYPE: &'static str = types::RUN_KUBECTL_COMMAND;
    const REPLY_TYPE: &'static str = types::KUBECTL_COMMAND_RESPONSE;
    type Reply = KubectlCommandResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        use run_command_limits as l;
        if self.args.is_empty() {
            return Err(ValidationError::new("payload", Problem::Empty));
        }
        validate::count("payload", self.args.len(), l::MAX_ARGS)?;
        for (i, a) in self.args.iter().enumerate() {
            validate::arg(&format!("payload[{i}]"), a, l::MAX_ARG_LEN)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// RUN_REMOTE_SCRIPT

/// Most entries in RUN_REMOTE_SCRIPT `params`.
pub const MAX_SCRIPT_PARAMS: usize = 256;

/// Longest RUN_REMOTE_SCRIPT parameter name, in bytes.
pub const MAX_SCRIPT_PARAM_NAME_LEN: usize = 256;

/// `RUN_REMOTE_SCRIPT`: fetch a script from the installer (or conductor, for `/t/...`) service
/// and run it with bash. `Debug` shows parameter names only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RunRemoteScript {
    /// The script's name or path: `^/?[A-Za-z0-9_.][A-Za-z0-9_./-]*$`, at most 512 bytes,
    /// without `..`.
    #[serde(deserialize_with = "null_as_default")]
    pub script: String,
    /// Parameters passed to the script service. Values are secret. `null` reads as empty.
    #[serde(deserialize_with = "null_as_default")]
    pub params: BTreeMap<String, String>,
    /// Start the script detached and answer at once instead of waiting for it.
    #[serde(deserialize_with = "null_as_default")]
    pub run_in_background: bool,
}

impl fmt::Debug for RunRemoteScript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunRemoteScript")
            .field("script", &self.script)
            .field("params", &KeysOnly(&self.params))
            .field("run_in_background", &self.run_in_background)
            .finish()
    }
}

impl Instruction for RunRemoteScript {
    const TYPE: &'static str = types::RUN_REMOTE_SCRIPT;
    const REPLY_TYPE: &'static str = types::RUN_REMOTE_SCRIPT_RESPONSE;
    type Reply = RunRemoteScriptResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        validate::script_name("script", &self.script)?;
        validate::count("params", self.params.len(), MAX_SCRIPT_PARAMS)?;
        for (name, value) in &self.params {
            validate::length("params", name, MAX_SCRIPT_PARAM_NAME_LEN)?;
            validate::arg("params", value, run_command_limits::MAX_ARG_LEN)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// INSTALL_HELM_CHART, UNINSTALL_HELM_CHART

/// `INSTALL_HELM_CHART`: `helm upgrade --install` a chart from an HTTPS repository or an OCI
/// registry. All fields are strings; empty means absent for `valuesUrl`, `version`, and (for
/// OCI) `myRepoName`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct InstallHelmChart {
    /// The repository: `https://...` (added as `myRepoName`) or `oci://...` (scheme compared
    /// case-insensitively).
    #[serde(deserialize_with = "null_as_default")]
    pub repo_url: String,
    /// The local repository name (`helm repo add <myRepoName>`); required unless OCI.
    #[serde(deserialize_with = "null_as_default")]
    pub my_repo_name: String,
    /// The release name.
    #[serde(deserialize_with = "null_as_default")]
    pub my_chart_name: String,
    /// The chart's name in the repository.
    #[serde(deserialize_with = "null_as_default")]
    pub chart_name: String,
    /// The namespace (created when missing).
    #[serde(deserialize_with = "null_as_default")]
    pub namespace: String,
    /// Optional `https://` URL of a values file.
    #[serde(deserialize_with = "null_as_default")]
    pub values_url: String,
    /// Optional chart version or constraint.
    #[serde(deserialize_with = "null_as_default")]
    pub version: String,
}

impl InstallHelmChart {
    /// Whether `repoUrl` is an OCI registry (`oci://`, any case). Executors must use this, not
    /// their own prefix test, so validation and execution agree.
    pub fn is_oci(&self) -> bool {
        self.repo_url
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("oci://"))
    }
}

impl Instruction for InstallHelmChart {
    const TYPE: &'static str = types::INSTALL_HELM_CHART;
    const REPLY_TYPE: &'static str = types::INSTALL_HELM_CHART_RESPONSE;
    type Reply = HelmChartResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        let scheme = validate::url("repoUrl", &self.repo_url, &["https", "oci"], "https or oci")?;
        validate::helm_name("chartName", &self.chart_name)?;
        validate::helm_name("namespace", &self.namespace)?;
        validate::helm_name("myChartName", &self.my_chart_name)?;
        if scheme != "oci" || !self.my_repo_name.is_empty() {
            validate::helm_name("myRepoName", &self.my_repo_name)?;
        }
        if !self.values_url.is_empty() {
            validate::url("valuesUrl", &self.values_url, &["https"], "https")?;
        }
        if !self.version.is_empty() {
            validate::helm_version("version", &self.version)?;
        }
        Ok(())
    }
}

/// `UNINSTALL_HELM_CHART`: `helm uninstall`, then `helm repo remove` when `myRepoName` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UninstallHelmChart {
    /// The local repository to remove afterwards; empty: none.
    #[serde(deserialize_with = "null_as_default")]
    pub my_repo_name: String,
    /// The release name.
    #[serde(deserialize_with = "null_as_default")]
    pub my_chart_name: String,
    /// The release's namespace.
    #[serde(deserialize_with = "null_as_default")]
    pub namespace: String,
}

impl Instruction for UninstallHelmChart {
    const TYPE: &'static str = types::UNINSTALL_HELM_CHART;
    const REPLY_TYPE: &'static str = types::UNINSTALL_HELM_CHART_RESPONSE;
    type Reply = HelmChartResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        validate::helm_name("myChartName", &self.my_chart_name)?;
        validate::helm_name("namespace", &self.namespace)?;
        if !self.my_repo_name.is_empty() {
            validate::helm_name("myRepoName", &self.my_repo_name)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// RUN_WEB_REQUEST

/// Most headers in RUN_WEB_REQUEST.
pub const MAX_WEB_HEADERS: usize = 100;

/// Longest RUN_WEB_REQUEST header value, in bytes.
pub const MAX_WEB_HEADER_VALUE_LEN: usize = 8192;

/// Longest RUN_WEB_REQUEST method, in bytes.
pub const MAX_WEB_METHOD_LEN: usize = 32;

/// `RUN_WEB_REQUEST`: make one HTTP(S) request from the node. Whether the destination may be
/// contacted (loopback, link-local, metadata addresses) is the executor's decision. `Debug`
/// shows header names only, and not the body.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RunWebRequest {
    /// `http://` or `https://` URL.
    #[serde(deserialize_with = "null_as_default")]
    pub url: String,
    /// HTTP method; empty means `GET`.
    #[serde(deserialize_with = "null_as_default")]
    pub method: String,
    /// Request body, sent when not empty. Secret.
    #[serde(deserialize_with = "null_as_default")]
    pub post_data: String,
    /// Accepted for compatibility and ignored: TLS certificates are always verified.
    #[serde(deserialize_with = "null_as_default")]
    pub allow_insecure: bool,
    /// Request headers. Values are secret. `null` reads as empty.
    #[serde(deserialize_with = "null_as_default")]
    pub headers: BTreeMap<String, String>,
}

impl RunWebRequest {
    /// The method to use: `method`, or `GET` when empty.
    pub fn effective_method(&self) -> &str {
        if self.method.is_empty() {
            "GET"
        } else {
            &self.method
        }
    }
}

impl fmt::Debug for RunWebRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunWebRequest")
            .field("url", &self.url)
            .field("method", &self.method)
            .field("post_data", &LenOnly(self.post_data.len()))
            .field("allow_insecure", &self.allow_insecure)
            .field("headers", &KeysOnly(&self.headers))
            .finish()
    }
}

/// `RUN_WEB_REQUEST` (the reply has the request's type name). Any HTTP status is a successful
/// reply; transport failures are `ERROR`. `Debug` shows only the body's length.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RunWebRequestResponse {
    /// The response body (UTF-8; invalid sequences replaced by U+FFFD), possibly cut.
    #[serde(deserialize_with = "null_as_default")]
    pub response_body: String,
    /// The HTTP status code as a decimal string, e.g. `"200"` (a string, as in the Go agent).
    #[serde(deserialize_with = "null_as_default")]
    pub response_status_code: String,
    /// Whether the body was longer than the agent keeps and was cut (runos addition; absent
    /// means false).
    #[serde(skip_serializing_if = "is_false", deserialize_with = "null_as_default")]
    pub response_body_truncated: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl RunWebRequestResponse {
    /// The status code as a number, when `responseStatusCode` is one.
    pub fn status_code(&self) -> Option<u16> {
        self.response_status_code.parse().ok()
    }
}

impl fmt::Debug for RunWebRequestResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunWebRequestResponse")
            .field("response_body", &LenOnly(self.response_body.len()))
            .field("response_status_code", &self.response_status_code)
            .field("response_body_truncated", &self.response_body_truncated)
            .finish()
    }
}

impl Instruction for RunWebRequest {
    const TYPE: &'static str = types::RUN_WEB_REQUEST;
    const REPLY_TYPE: &'static str = types::RUN_WEB_REQUEST;
    type Reply = RunWebRequestResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        validate::url("url", &self.url, &["http", "https"], "http or https")?;
        if !self.method.is_empty() {
            validate::http_token("method", &self.method)?;
            validate::length("method", &self.method, MAX_WEB_METHOD_LEN)?;
        }
        validate::count("headers", self.headers.len(), MAX_WEB_HEADERS)?;
        for (name, value) in &self.headers {
            validate::http_token("headers", name)?;
            let field = format!("headers.{name}");
            validate::http_header_value(&field, value)?;
            if value.len() > MAX_WEB_HEADER_VALUE_LEN {
                return Err(ValidationError::new(
                    field,
                    Problem::TooLong {
                        max: MAX_WEB_HEADER_VALUE_LEN,
                    },
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// UNINSTALL_NODE, REMOVE_ETCD_MEMBER, UPDATE_DNSMASQ

/// `UNINSTALL_NODE`: remove Kubernetes, WireGuard and runos from the node. The payload is any
/// JSON object (usually `{}`) and is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UninstallNode {}

impl Instruction for UninstallNode {
    const TYPE: &'static str = types::UNINSTALL_NODE;
    const REPLY_TYPE: &'static str = crate::control::types::NO_CONTENT;
    type Reply = NoContent;
}

/// `REMOVE_ETCD_MEMBER`: remove the etcd member whose peer URL's host is exactly this address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoveEtcdMember {
    /// The member's IP address (snake case on the wire, as in the Go agent).
    #[serde(deserialize_with = "null_as_default")]
    pub node_ip: String,
}

impl RemoveEtcdMember {
    /// The parsed address.
    pub fn ip(&self) -> Result<IpAddr, ValidationError> {
        validate::ip("node_ip", &self.node_ip)
    }
}

impl Instruction for RemoveEtcdMember {
    const TYPE: &'static str = types::REMOVE_ETCD_MEMBER;
    const REPLY_TYPE: &'static str = crate::control::types::NO_CONTENT;
    type Reply = NoContent;

    fn validate(&self) -> Result<(), ValidationError> {
        self.ip().map(|_| ())
    }
}

/// `UPDATE_DNSMASQ`: replace `/etc/dnsmasq.d/runos.conf` and restart dnsmasq (nothing happens
/// when the content is unchanged). See [`validate::DNSMASQ_ALLOWED_DIRECTIVES`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UpdateDnsmasq {
    /// The whole file.
    #[serde(deserialize_with = "null_as_default")]
    pub file_contents: String,
}

impl Instruction for UpdateDnsmasq {
    const TYPE: &'static str = types::UPDATE_DNSMASQ;
    const REPLY_TYPE: &'static str = crate::control::types::NO_CONTENT;
    type Reply = NoContent;

    fn validate(&self) -> Result<(), ValidationError> {
        validate::dnsmasq_config("fileContents", &self.file_contents)
    }
}

// ---------------------------------------------------------------------------------------------
// UPGRADE_NODE_K8S

/// `UPGRADE_NODE_K8S`: upgrade kubeadm, the control plane or node configuration, kubelet and
/// kubectl (and optionally containerd and helm) to the given versions. The caller has cordoned
/// and drained the node. Versions are strict (`v?N.N.N`); they never reach a shell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UpgradeNodeK8s {
    /// Kubernetes version, e.g. `1.30.2` or `v1.30.2`.
    #[serde(deserialize_with = "null_as_default")]
    pub target_kubernetes_version: String,
    /// containerd package version, e.g. `1.7.12`; empty: leave containerd alone.
    #[serde(deserialize_with = "null_as_default")]
    pub target_containerd_version: String,
    /// helm version, e.g. `3.15.2`; empty: leave helm alone.
    #[serde(deserialize_with = "null_as_default")]
    pub target_helm_version: String,
    /// The pkgs.k8s.io repository, e.g. `v1.30`.
    #[serde(deserialize_with = "null_as_default")]
    pub kube_repo_version: String,
    /// Whether this is the first control-plane node (`kubeadm upgrade apply`); otherwise
    /// `kubeadm upgrade node`.
    #[serde(deserialize_with = "null_as_default")]
    pub is_first_cp: bool,
}

/// `UPGRADE_NODE_K8S_RESPONSE`. Sent for an upgrade that ran, successful or not; progress goes
/// out as `LOG` lines with the instruction's tag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UpgradeNodeK8sResponse {
    /// Whether the node now runs the target version and is Ready.
    #[serde(deserialize_with = "null_as_default")]
    pub success: bool,
    /// A summary, or what failed.
    #[serde(deserialize_with = "null_as_default")]
    pub message: String,
    /// The kubelet version before (without `v`).
    #[serde(deserialize_with = "null_as_default")]
    pub previous_version: String,
    /// The kubelet version after; empty on failure.
    #[serde(deserialize_with = "null_as_default")]
    pub new_version: String,
}

impl Instruction for UpgradeNodeK8s {
    const TYPE: &'static str = types::UPGRADE_NODE_K8S;
    const REPLY_TYPE: &'static str = types::UPGRADE_NODE_K8S_RESPONSE;
    type Reply = UpgradeNodeK8sResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        validate::version_triplet("targetKubernetesVersion", &self.target_kubernetes_version)?;
        validate::version_pair("kubeRepoVersion", &self.kube_repo_version)?;
        if !self.target_containerd_version.is_empty() {
            validate::version_triplet("targetContainerdVersion", &self.target_containerd_version)?;
        }
        if !self.target_helm_version.is_empty() {
            validate::version_triplet("targetHelmVersion", &self.target_helm_version)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// VIP_ASSIGN, VIP_RELEASE

/// `VIP_ASSIGN`: take the cluster's virtual IP, unless `generation` is older than the newest one
/// this node has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VipAssign {
    /// The assignment's generation (increases with every hand-off).
    #[serde(deserialize_with = "null_as_default")]
    pub generation: i64,
    /// runos: the holder drops the VIP by itself once it has heard nothing from the control
    /// plane for this long (1 to 86400 s); the control plane waits at least this long before it
    /// assigns the VIP to another node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_secs: Option<u32>,
    /// runos: the VIP (`IP` or `IP/prefix`); default: the agent's configured one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// A VIP address field: an IP address, optionally `/prefix` (default /32 or /128).
pub fn vip_address(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 3 => {
            p.parse().ok().filter(|p| *p <= max)?
        }
        Some(_) => return None,
    };
    Some((ip, prefix))
}

/// `VIP_RELEASE`: drop the cluster's virtual IP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VipRelease {
    /// The generation being released.
    #[serde(deserialize_with = "null_as_default")]
    pub generation: i64,
}

fn validate_vip(
    generation: i64,
    lease: Option<u32>,
    address: Option<&str>,
) -> Result<(), ValidationError> {
    if generation < 0 {
        return Err(ValidationError::new(
            "generation",
            Problem::OutOfRange {
                min: 0,
                max: i64::MAX as u64,
            },
        ));
    }
    if let Some(l) = lease {
        validate::range("leaseSecs", u64::from(l), 1, 86_400)?;
    }
    if let Some(a) = address
        && vip_address(a).is_none()
    {
        return Err(ValidationError::new("address", Problem::NotAnIpAddress));
    }
    Ok(())
}

/// `VIP_ASSIGN_RESPONSE` and `VIP_RELEASE_RESPONSE`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VipResponse {
    /// Whether the node now holds (assign) or no longer holds (release) the address. A stale
    /// `VIP_ASSIGN` generation is answered `ok: false` with a message.
    #[serde(deserialize_with = "null_as_default")]
    pub ok: bool,
    /// Why not, when `ok` is false; absent when empty.
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub message: String,
}

impl Instruction for VipAssign {
    const TYPE: &'static str = types::VIP_ASSIGN;
    const REPLY_TYPE: &'static str = types::VIP_ASSIGN_RESPONSE;
    type Reply = VipResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        validate_vip(self.generation, self.lease_secs, self.address.as_deref())
    }
}

impl Instruction for VipRelease {
    const TYPE: &'static str = types::VIP_RELEASE;
    const REPLY_TYPE: &'static str = types::VIP_RELEASE_RESPONSE;
    type Reply = VipResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        validate_vip(self.generation, None, None)
    }
}

// ---------------------------------------------------------------------------------------------
// CANCEL, UPDATE_AGENT (new in runos)

/// `CANCEL`: stop the instruction with tag `tag` if it is queued or running. That instruction's
/// final reply becomes `ERROR` with code `cancelled`. `CANCEL` itself is answered `NO_CONTENT`
/// whether or not the target was still queued or running (cancelling is idempotent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// The tag of the instruction to cancel.
    pub tag: Tag,
}

impl Instruction for Cancel {
    const TYPE: &'static str = types::CANCEL;
    const REPLY_TYPE: &'static str = crate::control::types::NO_CONTENT;
    type Reply = NoContent;
}

/// `UPDATE_AGENT`: install another release of the agent and restart into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateAgent {
    /// The release, `vX.Y.Z` (the `v` is optional; no pre-release or build suffix).
    pub version: String,
    /// Allow installing a version older than the running one. Default false.
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// `UPDATE_AGENT_RESPONSE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateAgentResponse {
    /// The version that was running.
    pub previous_version: String,
    /// The version that runs after the restart (equal to `previousVersion` when nothing
    /// changed).
    pub new_version: String,
    /// Whether the agent restarts after this reply is acknowledged; false when the requested
    /// version was already running.
    pub restart: bool,
}

impl Instruction for UpdateAgent {
    const TYPE: &'static str = types::UPDATE_AGENT;
    const REPLY_TYPE: &'static str = types::UPDATE_AGENT_RESPONSE;
    type Reply = UpdateAgentResponse;

    fn validate(&self) -> Result<(), ValidationError> {
        validate::version_triplet("version", &self.version)
    }
}

// ---------------------------------------------------------------------------------------------
// INSTALL_PACKAGES, REMOVE_PACKAGES, GET_PACKAGES (new in runos)

/// Most packages in one `INSTALL_PACKAGES`, `REMOVE_PACKAGES` or `GET_PACKAGES`.
pub const MAX_PACKAGES: usize = 256;

/// A package to install: a Debian package name and, optionally, the exact Debian version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageSpec {
    /// The package name (Debian policy §5.6.1), optionally `:arch`.
    pub name: String,
    /// The exact version (`[epoch:]upstream[-revision]`); absent: install when missing, leave
    /// an installed one at its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A package to remove, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageName {
    /// The package name (Debian policy §5.6.1), optionally `:arch`.
    pub name: String,
}

/// `INSTALL_PACKAGES`: install Debian packages through apt, at exact versions when given, and
/// hold or release them (docs/protocol.md §10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstallPackages {
    /// The packages (1 to [`MAX_PACKAGES`], no name twice).
    pub packages: Vec<PackageSpec>,
    /// Hold every listed package after it is installed (`apt-mark hold`).
    #[serde(default)]
    pub hold: bool,
    /// Release the holds of the listed packages first, so that a held package may change
    /// version (without it such a package is `ERROR` `refused`). Without `hold` they stay
    /// released.
    #[serde(default)]
    pub unhold: bool,
    /// Run `apt-get update` first.
    #[serde(default)]
    pub update_index: bool,
}

/// `REMOVE_PACKAGES`: remove (or purge) Debian packages through apt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemovePackages {
    /// The packages (1 to [`MAX_PACKAGES`], no name twice).
    pub packages: Vec<PackageName>,
    /// Purge: remove their configuration files too (also of packages already removed).
    #[serde(default)]
    pub purge: bool,
    /// Release the holds of the listed packages first (without it a held installed package is
    /// `ERROR` `refused`).
    #[serde(default)]
    pub unhold: bool,
}

/// `GET_PACKAGES`: report packages from the dpkg database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GetPackages {
    /// The names to report (at most [`MAX_PACKAGES`], no name twice); empty: every package the
    /// dpkg database knows.
    #[serde(default)]
    pub names: Vec<String>,
}

/// One package as the dpkg database has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PackageState {
    /// The package name (with `:arch` where dpkg needs it to tell packages apart).
    pub name: String,
    /// The installed version; empty when none.
    pub version: String,
    /// Whether the package is on hold (dpkg's selection is `hold`).
    pub held: bool,
    /// dpkg's package status: `installed`, `not-installed`, `config-files`, `half-installed`,
    /// `unpacked`, `half-configured`, `triggers-awaited` or `triggers-pending`.
    pub status: String,
    /// Whether this instruction changed its version, status or hold.
    pub changed: bool,
}

/// `PACKAGES`: the reply of the three package instructions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PackagesReply {
    /// The packages asked about, in the payload's order (`GET_PACKAGES` of everything: dpkg's).
    pub packages: Vec<PackageState>,
    /// Whether any package changed.
    pub changed: bool,
}

fn validate_package_names<'a>(
    field: &str,
    names: impl ExactSizeIterator<Item = (String, &'a str)>,
) -> Result<(), ValidationError> {
    validate::count(field, names.len(), MAX_PACKAGES)?;
    let mut seen = std::collections::HashSet::new();
    for (path, name) in names {
        validate::package_name(&path, name)?;
        if !seen.insert(name) {
            return Err(ValidationError::new(path, Problem::Duplicate));
        }
    }
    Ok(())
}

impl Instruction for InstallPackages {
    const TYPE: &'static str = types::INSTALL_PACKAGES;
    const REPLY_TYPE: &'static str = types::PACKAGES;
    type Reply = PackagesReply;

    fn validate(&self) -> Result<(), ValidationError> {
        if self.packages.is_empty() {
            return Err(ValidationError::new("packages", Problem::Empty));
        }
        validate_package_names(
            "packages",
            self.packages
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("packages[{i}].name"), p.name.as_str())),
        )?;
        for (i, p) in self.packages.iter().enumerate() {
            if let Some(v) = &p.version {
                validate::debian_version(&format!("packages[{i}].version"), v)?;
            }
        }
        Ok(())
    }
}

impl Instruction for RemovePackages {
    const TYPE: &'static str = types::REMOVE_PACKAGES;
    const REPLY_TYPE: &'static str = types::PACKAGES;
    type Reply = PackagesReply;

    fn validate(&self) -> Result<(), ValidationError> {
        if self.packages.is_empty() {
            return Err(ValidationError::new("packages", Problem::Empty));
        }
        validate_package_names(
            "packages",
            self.packages
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("packages[{i}].name"), p.name.as_str())),
        )
    }
}

impl Instruction for GetPackages {
    const TYPE: &'static str = types::GET_PACKAGES;
    const REPLY_TYPE: &'static str = types::PACKAGES;
    type Reply = PackagesReply;

    fn validate(&self) -> Result<(), ValidationError> {
        validate_package_names(
            "names",
            self.names
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("names[{i}]"), n.as_str())),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Type names and the catalog

/// Instruction and reply type names. `NO_CONTENT` and `ERROR` are in [`crate::control::types`].
pub mod types {
    /// Run a program by argv.
    pub const RUN_COMMAND: &str = "RUN_COMMAND";
    /// Reply to RUN_COMMAND.
    pub const RUN_COMMAND_RESPONSE: &str = "RUN_COMMAND_RESPONSE";
    /// Report the node's status.
    pub const GET_NODE_STATUS: &str = "GET_NODE_STATUS";
    /// Reply to GET_NODE_STATUS.
    pub const NODE_STATUS: &str = "NODE_STATUS";
    /// Configure WireGuard peers.
    pub const SET_VPN_PEERS: &str = "SET_VPN_PEERS";
    /// Reply to SET_VPN_PEERS.
    pub const NODE_VPN_PEER: &str = "NODE_VPN_PEER";
    /// Create a kubeadm join command.
    pub const GET_CLUSTER_JOIN_CMD: &str = "GET_CLUSTER_JOIN_CMD";
    /// Reply to GET_CLUSTER_JOIN_CMD.
    pub const CLUSTER_JOIN_CMD: &str = "CLUSTER_JOIN_CMD";
    /// `kubectl apply` a manifest.
    pub const APPLY_CR: &str = "APPLY_CR";
    /// `kubectl apply` an operator manifest.
    pub const APPLY_OPERATOR: &str = "APPLY_OPERATOR";
    /// Delete a runos.com custom resource.
    pub const DELETE_CR: &str = "DELETE_CR";
    /// Run kubectl with arguments.
    pub const RUN_KUBECTL_COMMAND: &str = "RUN_KUBECTL_COMMAND";
    /// Reply to RUN_KUBECTL_COMMAND.
    pub const KUBECTL_COMMAND_RESPONSE: &str = "KUBECTL_COMMAND_RESPONSE";
    /// Fetch and run a script.
    pub const RUN_REMOTE_SCRIPT: &str = "RUN_REMOTE_SCRIPT";
    /// Reply to RUN_REMOTE_SCRIPT.
    pub const RUN_REMOTE_SCRIPT_RESPONSE: &str = "RUN_REMOTE_SCRIPT_RESPONSE";
    /// Install or upgrade a helm chart.
    pub const INSTALL_HELM_CHART: &str = "INSTALL_HELM_CHART";
    /// Reply to INSTALL_HELM_CHART.
    pub const INSTALL_HELM_CHART_RESPONSE: &str = "INSTALL_HELM_CHART_RESPONSE";
    /// Uninstall a helm release.
    pub const UNINSTALL_HELM_CHART: &str = "UNINSTALL_HELM_CHART";
    /// Reply to UNINSTALL_HELM_CHART.
    pub const UNINSTALL_HELM_CHART_RESPONSE: &str = "UNINSTALL_HELM_CHART_RESPONSE";
    /// Make an HTTP request; also the type name of its reply.
    pub const RUN_WEB_REQUEST: &str = "RUN_WEB_REQUEST";
    /// Uninstall everything from the node.
    pub const UNINSTALL_NODE: &str = "UNINSTALL_NODE";
    /// Remove an etcd member.
    pub const REMOVE_ETCD_MEMBER: &str = "REMOVE_ETCD_MEMBER";
    /// Replace the dnsmasq configuration.
    pub const UPDATE_DNSMASQ: &str = "UPDATE_DNSMASQ";
    /// Upgrade Kubernetes on the node.
    pub const UPGRADE_NODE_K8S: &str = "UPGRADE_NODE_K8S";
    /// Reply to UPGRADE_NODE_K8S.
    pub const UPGRADE_NODE_K8S_RESPONSE: &str = "UPGRADE_NODE_K8S_RESPONSE";
    /// Take the virtual IP.
    pub const VIP_ASSIGN: &str = "VIP_ASSIGN";
    /// Reply to VIP_ASSIGN.
    pub const VIP_ASSIGN_RESPONSE: &str = "VIP_ASSIGN_RESPONSE";
    /// Drop the virtual IP.
    pub const VIP_RELEASE: &str = "VIP_RELEASE";
    /// Reply to VIP_RELEASE.
    pub const VIP_RELEASE_RESPONSE: &str = "VIP_RELEASE_RESPONSE";
    /// Cancel a queued or running instruction.
    pub const CANCEL: &str = "CANCEL";
    /// Install another agent release.
    pub const UPDATE_AGENT: &str = "UPDATE_AGENT";
    /// Reply to UPDATE_AGENT.
    pub const UPDATE_AGENT_RESPONSE: &str = "UPDATE_AGENT_RESPONSE";
    /// Install Debian packages through apt.
    pub const INSTALL_PACKAGES: &str = "INSTALL_PACKAGES";
    /// Remove or purge Debian packages through apt.
    pub const REMOVE_PACKAGES: &str = "REMOVE_PACKAGES";
    /// Report packages from the dpkg database.
    pub const GET_PACKAGES: &str = "GET_PACKAGES";
    /// Reply to INSTALL_PACKAGES, REMOVE_PACKAGES and GET_PACKAGES.
    pub const PACKAGES: &str = "PACKAGES";
}

/// One row of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The instruction's type name.
    pub kind: &'static str,
    /// The type name of its success reply.
    pub reply_kind: &'static str,
    /// Whether running it a second time (with the same payload) leaves the node as running it
    /// once would, so a control plane may resend it after `interrupted`, `busy`,
    /// `shutting_down` or a lost session without asking an operator.
    pub safe_to_rerun: bool,
    /// Whether its replies carry secrets (a join token, a key, output that commonly echoes the
    /// payload's secret values): an agent keeps such a reply only until it is acknowledged
    /// (docs/protocol.md §7.5).
    pub secret_reply: bool,
    /// The deadline when the envelope has no `timeoutMs`, in seconds.
    pub default_timeout_secs: u64,
}

macro_rules! catalog {
    ($($variant:ident($ty:ty) { rerun: $rerun:expr, secret: $secret:expr, timeout: $secs:expr $(,)? })*) => {
        /// The instruction catalog, one entry per instruction type, in a fixed order.
        pub const CATALOG: &[CatalogEntry] = &[$(
            CatalogEntry {
                kind: <$ty as Instruction>::TYPE,
                reply_kind: <$ty as Instruction>::REPLY_TYPE,
                safe_to_rerun: $rerun,
                secret_reply: $secret,
                default_timeout_secs: $secs,
            },
        )*];

        /// Every instruction type in the catalog, whether or not a given agent executes it.
        pub const ALL_INSTRUCTION_TYPES: &[&str] = &[$(<$ty as Instruction>::TYPE,)*];

        /// Any instruction of the catalog, decoded and validated.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum AnyInstruction {
            $(
                #[doc = concat!("`", stringify!($ty), "`.")]
                $variant($ty),
            )*
        }

        impl AnyInstruction {
            /// Decode and validate the payload of `env` according to its type.
            pub fn from_envelope(env: &Envelope) -> Result<Self, DecodeInstructionError> {
                let kind = env.kind.as_str();
                $(
                    if kind == <$ty as Instruction>::TYPE {
                        return Ok(AnyInstruction::$variant(<$ty as Instruction>::from_envelope(env)?));
                    }
                )*
                Err(DecodeInstructionError::UnknownType)
            }

            /// The instruction's type name.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(AnyInstruction::$variant(_) => <$ty as Instruction>::TYPE,)*
                }
            }

            /// The type name of its success reply.
            pub fn reply_kind(&self) -> &'static str {
                match self {
                    $(AnyInstruction::$variant(_) => <$ty as Instruction>::REPLY_TYPE,)*
                }
            }

            /// Check its fields (see [`Instruction::validate`]).
            pub fn validate(&self) -> Result<(), ValidationError> {
                match self {
                    $(AnyInstruction::$variant(i) => i.validate(),)*
                }
            }

            /// Its deadline in seconds when the envelope has no `timeoutMs` (see
            /// [`Instruction::default_deadline_secs`]).
            pub fn default_deadline_secs(&self) -> u64 {
                match self {
                    $(AnyInstruction::$variant(i) => i.default_deadline_secs(),)*
                }
            }

            /// An envelope carrying it with `tag`.
            pub fn to_envelope(&self, tag: Tag) -> Envelope {
                match self {
                    $(AnyInstruction::$variant(i) => i.to_envelope(tag),)*
                }
            }
        }
    };
}

catalog! {
    SetVpnPeers(SetVpnPeers) { rerun: true, secret: false, timeout: 60 }
    GetNodeStatus(GetNodeStatus) { rerun: true, secret: false, timeout: 30 }
    GetClusterJoinCmd(GetClusterJoinCmd) { rerun: true, secret: true, timeout: 120 }
    ApplyCr(ApplyCr) { rerun: true, secret: false, timeout: 300 }
    ApplyOperator(ApplyOperator) { rerun: true, secret: false, timeout: 300 }
    DeleteCr(DeleteCr) { rerun: true, secret: false, timeout: 120 }
    RunKubectlCommand(RunKubectlCommand) { rerun: false, secret: false, timeout: 300 }
    RunRemoteScript(RunRemoteScript) { rerun: false, secret: true, timeout: 3600 }
    InstallHelmChart(InstallHelmChart) { rerun: true, secret: false, timeout: 1800 }
    UninstallHelmChart(UninstallHelmChart) { rerun: true, secret: false, timeout: 600 }
    RunWebRequest(RunWebRequest) { rerun: false, secret: false, timeout: 60 }
    UninstallNode(UninstallNode) { rerun: false, secret: false, timeout: 1800 }
    RemoveEtcdMember(RemoveEtcdMember) { rerun: false, secret: false, timeout: 300 }
    UpdateDnsmasq(UpdateDnsmasq) { rerun: true, secret: false, timeout: 60 }
    UpgradeNodeK8s(UpgradeNodeK8s) { rerun: true, secret: false, timeout: 3600 }
    VipAssign(VipAssign) { rerun: true, secret: false, timeout: 5 }
    VipRelease(VipRelease) { rerun: true, secret: false, timeout: 5 }
    RunCommand(RunCommand) {
        rerun: false,
        secret: false,
        timeout: run_command_limits::MAX_TIMEOUT_SECS + RUN_COMMAND_DEADLINE_GRACE_SECS,
    }
    Cancel(Cancel) { rerun: true, secret: false, timeout: 10 }
    UpdateAgent(UpdateAgent) { rerun: true, secret: false, timeout: 900 }
    InstallPackages(InstallPackages) { rerun: true, secret: false, timeout: 900 }
    RemovePackages(RemovePackages) { rerun: true, secret: false, timeout: 600 }
    GetPackages(GetPackages) { rerun: true, secret: false, timeout: 60 }
}

/// For `RUN_COMMAND` without `timeoutMs`, the instruction's deadline is the payload's
/// effective `timeoutSecs` plus this grace period (so the process timeout, which yields a
/// `RUN_COMMAND_RESPONSE` with `timedOut: true`, fires first). The catalog lists the largest
/// such deadline.
pub const RUN_COMMAND_DEADLINE_GRACE_SECS: u64 = 30;

/// The deadline of a type that is not in the catalog (never used by catalog types).
const DEFAULT_DEADLINE_SECS: u64 = 60;

/// The catalog entry of `kind`.
pub fn catalog_entry(kind: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.kind == kind)
}

/// Whether the catalog marks `kind` safe to re-run (false for types not in the catalog).
pub fn safe_to_rerun(kind: &str) -> bool {
    catalog_entry(kind).is_some_and(|e| e.safe_to_rerun)
}

/// Whether the catalog marks the replies of `kind` secret (false for types not in the catalog:
/// they are answered `unknown_type`, which carries nothing secret).
pub fn secret_reply(kind: &str) -> bool {
    catalog_entry(kind).is_some_and(|e| e.secret_reply)
}

/// The success reply type of the instruction `kind`.
pub fn reply_type_of(kind: &str) -> Option<&'static str> {
    catalog_entry(kind).map(|e| e.reply_kind)
}

/// Whether `kind` names an instruction in the catalog.
pub fn is_instruction_type(kind: &str) -> bool {
    ALL_INSTRUCTION_TYPES.contains(&kind)
}

/// Whether `kind` is the success reply type of some instruction. Note that `RUN_WEB_REQUEST`
/// is both an instruction and a reply type, and `NO_CONTENT` is also a control type.
pub fn is_reply_type(kind: &str) -> bool {
    CATALOG.iter().any(|e| e.reply_kind == kind)
}

/// Why an envelope could not be decoded as an instruction of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum DecodeInstructionError {
    /// The type is not in the catalog: answer `ERROR` `unknown_type`.
    #[error("instruction type is not in the catalog")]
    UnknownType,
    /// The payload was refused: answer `ERROR` `bad_payload`.
    #[error(transparent)]
    BadPayload(#[from] BadPayload),
}

impl DecodeInstructionError {
    /// The `ERROR` payload to answer with. Never repeats a payload value.
    pub fn to_error_payload(&self) -> ErrorPayload {
        match self {
            DecodeInstructionError::UnknownType => ErrorPayload::new(
                ErrorCode::UnknownType,
                "instruction type is not in the catalog",
            ),
            DecodeInstructionError::BadPayload(b) => b.to_error_payload(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MessageType;
    use serde_json::{Value, json};

    use crate::examples::{CR, KEY};

    fn examples() -> Vec<(&'static str, Value)> {
        crate::examples::valid()
    }

    fn envelope(kind: &str, payload: &Value) -> Envelope {
        Envelope::new(MessageType::new(kind).unwrap(), Tag::random(), payload)
    }

    fn decode(kind: &str, payload: &Value) -> Result<AnyInstruction, DecodeInstructionError> {
        AnyInstruction::from_envelope(&envelope(kind, payload))
    }

    #[test]
    fn all_type_names_are_valid() {
        for t in ALL_INSTRUCTION_TYPES {
            assert!(crate::MessageType::new(*t).is_ok(), "{t}");
        }
        for e in CATALOG {
            assert!(
                crate::MessageType::new(e.reply_kind).is_ok(),
                "{}",
                e.reply_kind
            );
        }
    }

    #[test]
    fn catalog_is_complete_and_consistent() {
        assert_eq!(CATALOG.len(), 23);
        let kinds: Vec<&str> = CATALOG.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ALL_INSTRUCTION_TYPES);
        let mut sorted = kinds.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), kinds.len(), "duplicate type");
        for k in &kinds {
            assert!(!crate::control::is_control_type(k), "{k} is a control type");
            assert!(is_instruction_type(k));
            let e = catalog_entry(k).unwrap();
            assert!(e.default_timeout_secs > 0);
            assert_eq!(reply_type_of(k), Some(e.reply_kind));
            assert!(is_reply_type(e.reply_kind));
        }
        let example_kinds: Vec<&str> = examples().iter().map(|(k, _)| *k).collect();
        assert_eq!(example_kinds, kinds, "examples cover the catalog in order");
        assert_eq!(reply_type_of("RUN_WEB_REQUEST"), Some("RUN_WEB_REQUEST"));
        assert_eq!(reply_type_of("CANCEL"), Some("NO_CONTENT"));
        assert_eq!(reply_type_of("UPDATE_AGENT"), Some("UPDATE_AGENT_RESPONSE"));
        assert_eq!(reply_type_of("NO_SUCH"), None);
        assert!(!is_instruction_type("NODE_STATUS"));
        assert!(!is_instruction_type("HEARTBEAT"));
        assert!(catalog_entry("GET_NODE_STATUS").unwrap().safe_to_rerun);
        assert!(!catalog_entry("RUN_COMMAND").unwrap().safe_to_rerun);
        let secret: Vec<&str> = CATALOG
            .iter()
            .filter(|e| e.secret_reply)
            .map(|e| e.kind)
            .collect();
        assert_eq!(secret, ["GET_CLUSTER_JOIN_CMD", "RUN_REMOTE_SCRIPT"]);
        assert!(secret_reply("GET_CLUSTER_JOIN_CMD") && safe_to_rerun("GET_CLUSTER_JOIN_CMD"));
        assert!(!secret_reply("NO_SUCH") && !safe_to_rerun("NO_SUCH"));
    }

    #[test]
    fn golden_payloads_decode_validate_and_round_trip() {
        for (kind, payload) in examples() {
            let i = decode(kind, &payload).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(i.kind(), kind);
            assert_eq!(Some(i.reply_kind()), reply_type_of(kind));
            let env = i.to_envelope(Tag::random());
            assert_eq!(env.kind.as_str(), kind);
            let back: Value = env.payload().unwrap();
            assert_eq!(back, payload, "{kind}");
        }
    }

    #[test]
    fn golden_fields() {
        let Ok(AnyInstruction::SetVpnPeers(p)) = decode("SET_VPN_PEERS", &examples()[0].1) else {
            panic!()
        };
        assert_eq!(p.peers[0].pub_key, KEY);
        assert_eq!(p.peers[0].vpn_ip, "172.24.0.2");
        let r: RemoveEtcdMember = serde_json::from_str(r#"{"node_ip":"10.0.0.3"}"#).unwrap();
        assert_eq!(r.ip().unwrap().to_string(), "10.0.0.3");
        let k: RunKubectlCommand = serde_json::from_str(r#"["get","pods"]"#).unwrap();
        assert_eq!(k.args, ["get", "pods"]);
        assert_eq!(serde_json::to_string(&k).unwrap(), r#"["get","pods"]"#);
        let d: DeleteCr = serde_json::from_str(r#"{"type":"clusters","id":"x"}"#).unwrap();
        assert_eq!(d.kind, "clusters");
        let a = ApplyCr { cr_b64: CR.into() };
        assert!(a.manifest().unwrap().starts_with(b"apiVersion: v1\n"));
        let h: InstallHelmChart =
            serde_json::from_str(r#"{"repoUrl":"OCI://r.example/charts"}"#).unwrap();
        assert!(h.is_oci());
        let w = RunWebRequest::default();
        assert_eq!(w.effective_method(), "GET");
        let c: Cancel =
            serde_json::from_str(r#"{"tag":"3f0e4b8e-3c55-4b8f-9d6a-3e9a1b0c2d4e"}"#).unwrap();
        assert_eq!(c.tag.to_string(), "3f0e4b8e-3c55-4b8f-9d6a-3e9a1b0c2d4e");
        let u: UpdateAgent = serde_json::from_str(r#"{"version":"v1.2.3"}"#).unwrap();
        assert!(!u.allow_downgrade);
        let rc: RunCommand = serde_json::from_str(r#"{"argv":["true"]}"#).unwrap();
        assert_eq!(
            rc.effective_timeout_secs(),
            run_command_limits::DEFAULT_TIMEOUT_SECS
        );
    }

    #[test]
    fn vpn_peer_sets_are_checked_as_a_whole() {
        let peer = |k: &str, ip: &str| json!({"pubKey": k, "endpointIp": "192.0.2.1", "vpnIp": ip});
        const KEY2: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let bad = |v: Value| -> String {
            let e = decode(types::SET_VPN_PEERS, &v)
                .unwrap_err()
                .to_error_payload();
            assert_eq!(e.code, ErrorCode::BadPayload, "{v}");
            e.message
        };
        let m = bad(json!({"peers": [peer(KEY, "10.0.0.1"), peer(KEY, "10.0.0.2")]}));
        assert!(
            m.contains("`peers[1].pubKey`") && m.contains("more than once"),
            "{m}"
        );
        let m = bad(json!({"peers": [peer(KEY, "10.0.0.1"), peer(KEY2, "10.0.0.1")]}));
        assert!(m.contains("`peers[1].vpnIp`"), "{m}");
        let m = bad(json!({"peers": [], "complete": true}));
        assert!(m.contains("`complete`") && m.contains("generation"), "{m}");
        let m = bad(json!({"peers": [], "generation": -1}));
        assert!(m.contains("`generation`"), "{m}");
        let mut p = peer(KEY, "10.0.0.1");
        p["endpointPort"] = json!(0);
        let m = bad(json!({"peers": [p]}));
        assert!(m.contains("`peers[0].endpointPort`"), "{m}");
        let mut p = peer(KEY, "10.0.0.1");
        p["endpointPort"] = json!(70000);
        bad(json!({"peers": [p]}));
        // The runos form.
        let mut p = peer(KEY, "10.0.0.1");
        p["endpointPort"] = json!(51821);
        p["keepaliveSecs"] = json!(0);
        let Ok(AnyInstruction::SetVpnPeers(s)) = decode(
            types::SET_VPN_PEERS,
            &json!({"peers": [p, peer(KEY2, "10.0.0.2")], "generation": 3, "complete": true}),
        ) else {
            panic!("valid")
        };
        assert_eq!((s.generation, s.complete), (Some(3), true));
        assert_eq!(s.peers[0].endpoint_port, Some(51821));
        assert_eq!(s.peers[0].keepalive_secs, Some(0));
        assert_eq!(s.peers[1].endpoint_port, None);
        // The Go form: no generation, not complete.
        let Ok(AnyInstruction::SetVpnPeers(s)) = decode(
            types::SET_VPN_PEERS,
            &json!({"peers": null, "complete": null}),
        ) else {
            panic!("valid")
        };
        assert_eq!((s.generation, s.complete, s.peers.len()), (None, false, 0));
    }

    #[test]
    fn vip_extensions_are_checked() {
        let Ok(AnyInstruction::VipAssign(a)) = decode(
            types::VIP_ASSIGN,
            &json!({"generation": 5, "leaseSecs": 30, "address": "172.24.1.254/32"}),
        ) else {
            panic!("valid")
        };
        assert_eq!(
            (a.lease_secs, a.address.as_deref()),
            (Some(30), Some("172.24.1.254/32"))
        );
        assert_eq!(
            vip_address("fd00::1"),
            Some(("fd00::1".parse().unwrap(), 128))
        );
        assert_eq!(
            vip_address("10.0.0.1"),
            Some(("10.0.0.1".parse().unwrap(), 32))
        );
        for bad in [
            "10.0.0.1/33",
            "10.0.0.1/",
            "10.0.0.1/+8",
            "x",
            "10.0.0.1/8/8",
        ] {
            assert_eq!(vip_address(bad), None, "{bad}");
        }
        for (v, field) in [
            (json!({"generation": 1, "leaseSecs": 0}), "leaseSecs"),
            (
                json!({"generation": 1, "address": "10.0.0.1/40"}),
                "address",
            ),
            (json!({"generation": -1}), "generation"),
        ] {
            let e = decode(types::VIP_ASSIGN, &v)
                .unwrap_err()
                .to_error_payload();
            assert!(e.message.contains(&format!("`{field}`")), "{}", e.message);
        }
        // The Go form.
        assert!(decode(types::VIP_ASSIGN, &json!({"generation": 3})).is_ok());
        assert!(decode(types::VIP_RELEASE, &json!({"generation": 3})).is_ok());
    }

    fn reply_round_trip<I: Instruction>(json: Value)
    where
        I::Reply: fmt::Debug,
    {
        let reply: I::Reply = serde_json::from_value(json.clone())
            .unwrap_or_else(|e| panic!("{}: {e}", I::REPLY_TYPE));
        let tag = Tag::random();
        let env = I::reply_envelope(tag, &reply);
        assert_eq!(env.kind.as_str(), I::REPLY_TYPE);
        assert_eq!(env.tag, tag);
        let back: Value = env.payload().unwrap();
        assert_eq!(back, json, "{}", I::REPLY_TYPE);
    }

    #[test]
    fn golden_replies() {
        reply_round_trip::<SetVpnPeers>(json!({"nodePeer": {"pubKey": KEY,
            "endpointIp": "203.0.113.8", "vpnIp": "172.24.0.3", "endpointPort": 51820},
            "generation": 7, "added": [KEY], "changed": [], "removed": [], "unchanged": 2}));
        // The Go agent's reply (no runos fields) still reads.
        let go: NodeVpnPeer = serde_json::from_value(json!({"nodePeer": {"pubKey": KEY,
            "endpointIp": "203.0.113.8", "vpnIp": "172.24.0.3"}}))
        .unwrap();
        assert_eq!(go.generation, None);
        assert!(go.added.is_empty());
        reply_round_trip::<GetNodeStatus>(json!({"nodeIsReady": false, "agentVersion": "0.1.0",
            "agentUptimeSecs": 12, "systemUptimeSecs": 3600, "hostname": "n1",
            "bootId": "9f1c3c1e-8a43-4c5e-a1d5-0d6f3f1b2c3d"}));
        reply_round_trip::<GetClusterJoinCmd>(
            json!({"joinCmd": "kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef",
            "encryptionKey": "c2VjcmV0"}),
        );
        reply_round_trip::<GetClusterJoinCmd>(json!({"joinCmd": "kubeadm join x"}));
        reply_round_trip::<ApplyCr>(json!({}));
        reply_round_trip::<RunKubectlCommand>(json!({"response": "node/n1 Ready\n"}));
        reply_round_trip::<RunRemoteScript>(json!({"response": "done\n"}));
        reply_round_trip::<InstallHelmChart>(
            json!({"response": "Release \"web\" has been upgraded."}),
        );
        reply_round_trip::<UninstallHelmChart>(json!({"response": "release \"web\" uninstalled"}));
        reply_round_trip::<RunWebRequest>(
            json!({"responseBody": "ok", "responseStatusCode": "200"}),
        );
        reply_round_trip::<RunWebRequest>(
            json!({"responseBody": "ok", "responseStatusCode": "200",
            "responseBodyTruncated": true}),
        );
        reply_round_trip::<UpgradeNodeK8s>(json!({"success": true, "message": "upgraded",
            "previousVersion": "1.29.6", "newVersion": "1.30.2"}));
        reply_round_trip::<VipAssign>(json!({"ok": true}));
        reply_round_trip::<VipRelease>(
            json!({"ok": false, "message": "wg0 has no overlay address"}),
        );
        reply_round_trip::<RunCommand>(json!({"exitCode": 0, "timedOut": false,
            "stdout": {"text": "up 3 days\n"}, "stderr": {"base64": "/w=="},
            "stdoutTruncated": false, "stderrTruncated": false, "durationMs": 4}));
        reply_round_trip::<Cancel>(json!({}));
        reply_round_trip::<UpdateAgent>(json!({"previousVersion": "0.1.0", "newVersion": "0.2.0",
            "restart": true}));
        let r: RunWebRequestResponse =
            serde_json::from_str(r#"{"responseBody":"","responseStatusCode":"404"}"#).unwrap();
        assert_eq!(r.status_code(), Some(404));
        assert!(!r.response_body_truncated);
        let nc = Envelope::with_type(
            crate::control::types::NO_CONTENT,
            Tag::random(),
            &NoContent {},
        );
        assert_eq!(nc.json_b64, "e30=");
    }

    #[test]
    fn go_null_reads_as_empty() {
        let p: SetVpnPeers = serde_json::from_str(r#"{"peers":null}"#).unwrap();
        assert!(p.peers.is_empty());
        assert!(p.validate().is_ok());
        let p: SetVpnPeers = serde_json::from_str(r#"{}"#).unwrap();
        assert!(p.peers.is_empty());
        let s: RunRemoteScript =
            serde_json::from_str(r#"{"script":"x.sh","params":null,"runInBackground":null}"#)
                .unwrap();
        assert!(s.params.is_empty() && !s.run_in_background);
        let w: RunWebRequest =
            serde_json::from_str(r#"{"url":"https://x","headers":null,"method":null}"#).unwrap();
        assert!(w.headers.is_empty() && w.method.is_empty());
        let k: RunKubectlCommand = serde_json::from_str("null").unwrap();
        assert!(k.args.is_empty());
        let v: VipAssign = serde_json::from_str(r#"{"generation":null}"#).unwrap();
        assert_eq!(v.generation, 0);
        let u: UpgradeNodeK8s = serde_json::from_str(r#"{"isFirstCp":null}"#).unwrap();
        assert!(!u.is_first_cp);
    }

    #[test]
    fn go_payloads_accept_unknown_fields_new_payloads_refuse_them() {
        for (kind, payload) in examples() {
            let Value::Object(mut map) = payload else {
                continue;
            };
            map.insert("someFutureField".into(), json!(1));
            let result = decode(kind, &Value::Object(map));
            let strict = [
                types::RUN_COMMAND,
                types::CANCEL,
                types::UPDATE_AGENT,
                types::INSTALL_PACKAGES,
                types::REMOVE_PACKAGES,
                types::GET_PACKAGES,
            ]
            .contains(&kind);
            match result {
                Ok(_) => assert!(!strict, "{kind} accepted an unknown field"),
                Err(e) => {
                    assert!(strict, "{kind}: {e}");
                    let p = e.to_error_payload();
                    assert_eq!(p.code, ErrorCode::BadPayload);
                    assert!(
                        p.message.contains("unknown field `someFutureField`"),
                        "{}",
                        p.message
                    );
                }
            }
        }
    }

    #[test]
    fn validation_names_the_field_and_never_the_value() {
        let long_stdin = "x".repeat(run_command_limits::MAX_STDIN + 1);
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "SET_VPN_PEERS",
                json!({"peers": [{"pubKey": KEY, "endpointIp": "203.0.113.7", "vpnIp": "172.24.0.2"},
                {"pubKey": "hunter2", "endpointIp": "203.0.113.7", "vpnIp": "172.24.0.2"}]}),
                "peers[1].pubKey",
            ),
            (
                "SET_VPN_PEERS",
                json!({"peers": [{"pubKey": KEY, "endpointIp": "hunter2", "vpnIp": "172.24.0.2"}]}),
                "peers[0].endpointIp",
            ),
            (
                "SET_VPN_PEERS",
                json!({"peers": [{"pubKey": KEY, "endpointIp": "203.0.113.7"}]}),
                "peers[0].vpnIp",
            ),
            ("APPLY_CR", json!({"crB64": "hunter2!"}), "crB64"),
            ("APPLY_CR", json!({}), "crB64"),
            ("APPLY_OPERATOR", json!({"crdB64": ""}), "crdB64"),
            (
                "DELETE_CR",
                json!({"type": "clusters", "id": "../hunter2"}),
                "id",
            ),
            ("DELETE_CR", json!({"type": "Hunter2", "id": "x"}), "type"),
            ("RUN_KUBECTL_COMMAND", json!([]), "payload"),
            ("RUN_KUBECTL_COMMAND", Value::Null, "payload"),
            (
                "RUN_KUBECTL_COMMAND",
                json!(["get", "hun\u{0}ter2"]),
                "payload[1]",
            ),
            (
                "RUN_REMOTE_SCRIPT",
                json!({"script": "../hunter2"}),
                "script",
            ),
            ("RUN_REMOTE_SCRIPT", json!({"script": "-hunter2"}), "script"),
            (
                "INSTALL_HELM_CHART",
                json!({"repoUrl": "file:///hunter2", "myRepoName": "r", "myChartName": "c", "chartName": "c", "namespace": "n"}),
                "repoUrl",
            ),
            (
                "INSTALL_HELM_CHART",
                json!({"repoUrl": "https://x", "myRepoName": "r", "myChartName": "--hunter2", "chartName": "c", "namespace": "n"}),
                "myChartName",
            ),
            (
                "INSTALL_HELM_CHART",
                json!({"repoUrl": "https://x", "myRepoName": "-hunter2", "myChartName": "c", "chartName": "c", "namespace": "n"}),
                "myRepoName",
            ),
            (
                "INSTALL_HELM_CHART",
                json!({"repoUrl": "https://x", "myChartName": "c", "chartName": "c", "namespace": "n"}),
                "myRepoName",
            ),
            (
                "INSTALL_HELM_CHART",
                json!({"repoUrl": "oci://x", "myChartName": "c", "chartName": "c", "namespace": "n", "version": "--hunter2"}),
                "version",
            ),
            (
                "INSTALL_HELM_CHART",
                json!({"repoUrl": "oci://x", "myChartName": "c", "chartName": "c", "namespace": "n", "valuesUrl": "http://hunter2"}),
                "valuesUrl",
            ),
            (
                "INSTALL_HELM_CHART",
                json!({"repoUrl": "oci://x", "myChartName": "c", "chartName": "hunter2 x", "namespace": "n"}),
                "chartName",
            ),
            (
                "UNINSTALL_HELM_CHART",
                json!({"myRepoName": "-hunter2", "myChartName": "c", "namespace": "n"}),
                "myRepoName",
            ),
            (
                "UNINSTALL_HELM_CHART",
                json!({"myChartName": "c", "namespace": "--hunter2"}),
                "namespace",
            ),
            ("RUN_WEB_REQUEST", json!({"url": "ftp://hunter2"}), "url"),
            (
                "RUN_WEB_REQUEST",
                json!({"url": "https://x", "method": "GET hunter2"}),
                "method",
            ),
            (
                "RUN_WEB_REQUEST",
                json!({"url": "https://x", "headers": {"X-Token": "a\r\nhunter2: 1"}}),
                "headers.X-Token",
            ),
            (
                "RUN_WEB_REQUEST",
                json!({"url": "https://x", "headers": {"hunter2 x": "1"}}),
                "headers",
            ),
            (
                "REMOVE_ETCD_MEMBER",
                json!({"node_ip": "hunter2"}),
                "node_ip",
            ),
            (
                "REMOVE_ETCD_MEMBER",
                json!({"nodeIp": "10.0.0.1"}),
                "node_ip",
            ),
            (
                "UPDATE_DNSMASQ",
                json!({"fileContents": "server=1.1.1.1\npid-file=/hunter2"}),
                "fileContents (line 2)",
            ),
            (
                "UPGRADE_NODE_K8S",
                json!({"targetKubernetesVersion": "1.30.2;hunter2", "kubeRepoVersion": "v1.30"}),
                "targetKubernetesVersion",
            ),
            (
                "UPGRADE_NODE_K8S",
                json!({"targetKubernetesVersion": "1.30.2", "kubeRepoVersion": "v1.30 && hunter2"}),
                "kubeRepoVersion",
            ),
            (
                "UPGRADE_NODE_K8S",
                json!({"targetKubernetesVersion": "1.30.2", "kubeRepoVersion": "v1.30", "targetHelmVersion": "$(hunter2)"}),
                "targetHelmVersion",
            ),
            (
                "UPGRADE_NODE_K8S",
                json!({"targetKubernetesVersion": "1.30.2", "kubeRepoVersion": "v1.30", "targetContainerdVersion": "1.7.12-hunter2"}),
                "targetContainerdVersion",
            ),
            ("RUN_COMMAND", json!({"argv": []}), "argv"),
            ("RUN_COMMAND", json!({"argv": [""]}), "argv[0]"),
            (
                "RUN_COMMAND",
                json!({"argv": ["/bin/echo", "a\u{0}hunter2"]}),
                "argv[1]",
            ),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "env": {"1BAD": "hunter2"}}),
                "env",
            ),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "env": {"OK": "hun\u{0}ter2"}}),
                "env.OK",
            ),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "cwd": "hunter2"}),
                "cwd",
            ),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "timeoutSecs": 0}),
                "timeoutSecs",
            ),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "timeoutSecs": 86401}),
                "timeoutSecs",
            ),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "stdin": long_stdin}),
                "stdin",
            ),
            (
                "UPDATE_AGENT",
                json!({"version": "latest-hunter2"}),
                "version",
            ),
            (
                "UPDATE_AGENT",
                json!({"version": "../../hunter2"}),
                "version",
            ),
            (
                "RUN_COMMAND",
                json!({"argv": ["../../../../bin/hunter2"]}),
                "argv[0]",
            ),
            ("RUN_COMMAND", json!({"argv": ["bin/hunter2"]}), "argv[0]"),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "cwd": "/hun\u{0}ter2"}),
                "cwd",
            ),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "cwd": format!("/hunter2{}", "x".repeat(5000))}),
                "cwd",
            ),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "env": {"1X": "hunter2"}}),
                "env",
            ),
        ];
        for (kind, payload, field) in cases {
            let err = decode(kind, &payload).unwrap_err();
            let DecodeInstructionError::BadPayload(BadPayload::Invalid(v)) = &err else {
                panic!("{kind} {field}: not a validation error: {err}");
            };
            assert_eq!(v.field, field, "{kind}");
            let p = err.to_error_payload();
            assert_eq!(p.code, ErrorCode::BadPayload);
            assert!(p.message.contains(&format!("`{field}`")), "{}", p.message);
            let shown = format!("{} {err} {err:?}", p.message);
            assert!(!shown.contains("hunter2"), "{kind}: {shown}");
        }
    }

    #[test]
    fn package_payloads_are_checked() {
        let ok = |kind: &str, v: Value| assert!(decode(kind, &v).is_ok(), "{kind} {v}");
        let field = |kind: &str, v: Value| match decode(kind, &v) {
            Err(DecodeInstructionError::BadPayload(BadPayload::Invalid(e))) => e.field,
            other => panic!("{kind} {v}: {other:?}"),
        };
        ok(
            types::INSTALL_PACKAGES,
            json!({"packages": [{"name": "hello", "version": "2.10-3"}]}),
        );
        ok(types::GET_PACKAGES, json!({}));
        ok(types::GET_PACKAGES, json!({"names": []}));
        for bad in [
            "1.0;id",
            "1.0$(id)",
            "1.0 && rm",
            "`id`",
            "-1",
            "1.0\n",
            "*",
        ] {
            assert_eq!(
                field(
                    types::INSTALL_PACKAGES,
                    json!({"packages": [{"name": "hello"}, {"name": "jq", "version": bad}]})
                ),
                "packages[1].version",
                "{bad:?}"
            );
        }
        for bad in ["--purge", "a;id", "Hello", "a*", "x=1.0", ""] {
            assert_eq!(
                field(types::REMOVE_PACKAGES, json!({"packages": [{"name": bad}]})),
                "packages[0].name",
                "{bad:?}"
            );
            assert_eq!(
                field(types::GET_PACKAGES, json!({"names": ["jq", bad]})),
                "names[1]"
            );
        }
        assert_eq!(
            field(types::INSTALL_PACKAGES, json!({"packages": []})),
            "packages"
        );
        assert_eq!(
            field(types::REMOVE_PACKAGES, json!({"packages": []})),
            "packages"
        );
        assert_eq!(
            field(
                types::INSTALL_PACKAGES,
                json!({"packages": [{"name": "jq"}, {"name": "jq", "version": "1.6-2"}]})
            ),
            "packages[1].name"
        );
        let many: Vec<Value> = (0..=MAX_PACKAGES)
            .map(|i| json!({"name": format!("p{i}")}))
            .collect();
        assert_eq!(
            field(types::INSTALL_PACKAGES, json!({ "packages": many })),
            "packages"
        );
        // Unknown fields, also in a package, are refused.
        assert!(
            decode(
                types::INSTALL_PACKAGES,
                &json!({"packages": [{"name": "jq", "release": "stable"}]})
            )
            .is_err()
        );
        reply_round_trip::<GetPackages>(json!({"packages": [{"name": "jq", "version": "1.6-2",
            "held": false, "status": "installed", "changed": false}], "changed": false}));
    }

    #[test]
    fn run_command_limits_are_enforced() {
        use run_command_limits as l;
        let many = vec!["x".to_string(); l::MAX_ARGS + 1];
        let rc = RunCommand {
            argv: many,
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout_secs: None,
        };
        assert_eq!(rc.validate().unwrap_err().field, "argv");
        let rc = RunCommand {
            argv: vec!["x".repeat(l::MAX_ARG_LEN + 1)],
            ..rc
        };
        assert_eq!(rc.validate().unwrap_err().field, "argv[0]");
        let env: BTreeMap<String, String> = (0..=l::MAX_ENV)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        let rc = RunCommand {
            argv: vec!["true".into()],
            env,
            ..rc
        };
        assert_eq!(rc.validate().unwrap_err().field, "env");
        let rc = RunCommand {
            env: BTreeMap::new(),
            timeout_secs: Some(l::MAX_TIMEOUT_SECS),
            stdin: Some("x".repeat(l::MAX_STDIN)),
            cwd: Some("/var/tmp".into()),
            ..rc
        };
        assert!(rc.validate().is_ok());
    }

    #[test]
    fn schema_errors_never_repeat_values() {
        for (kind, payload) in [
            ("RUN_COMMAND", json!({"argv": "hunter2"})),
            (
                "RUN_COMMAND",
                json!({"argv": ["true"], "timeoutSecs": "hunter2"}),
            ),
            ("CANCEL", json!({"tag": "hunter2"})),
            (
                "UPDATE_AGENT",
                json!({"version": 5, "allowDowngrade": "hunter2"}),
            ),
            ("SET_VPN_PEERS", json!({"peers": "hunter2"})),
            ("VIP_ASSIGN", json!({"generation": "hunter2"})),
            ("RUN_KUBECTL_COMMAND", json!({"args": ["hunter2"]})),
            ("GET_NODE_STATUS", json!("hunter2")),
        ] {
            let err = decode(kind, &payload).unwrap_err();
            assert!(matches!(
                err,
                DecodeInstructionError::BadPayload(BadPayload::Payload(_))
            ));
            let p = err.to_error_payload();
            assert_eq!(p.code, ErrorCode::BadPayload);
            let shown = format!("{} {err} {err:?}", p.message);
            assert!(!shown.contains("hunter2"), "{kind}: {shown}");
        }
        let mut env = envelope("GET_NODE_STATUS", &json!({}));
        env.json_b64 = "not base64!".into();
        let p = AnyInstruction::from_envelope(&env)
            .unwrap_err()
            .to_error_payload();
        assert_eq!(p.code, ErrorCode::BadPayload);
    }

    /// A payload of the wrong JSON shape for the type: an array where the type is an object
    /// (every type but RUN_KUBECTL_COMMAND), an object where it is an array.
    fn wrong_shapes(kind: &str, example: &Value) -> Vec<Value> {
        match example {
            Value::Array(items) => vec![json!({ "args": items }), json!({}), json!("get")],
            Value::Object(fields) => {
                let values: Vec<Value> = fields.values().cloned().collect();
                assert!(kind != types::RUN_KUBECTL_COMMAND);
                vec![Value::Array(values), json!([]), json!([{}]), json!(7)]
            }
            other => panic!("{kind}: example is neither object nor array: {other}"),
        }
    }

    #[test]
    fn every_type_refuses_payloads_of_the_wrong_shape() {
        for (kind, example) in examples() {
            for bad in wrong_shapes(kind, &example) {
                let err = decode(kind, &bad).expect_err(&format!("{kind} accepted {bad}"));
                assert!(
                    matches!(
                        err,
                        DecodeInstructionError::BadPayload(BadPayload::Payload(_))
                    ),
                    "{kind} {bad}: {err}"
                );
                assert_eq!(err.to_error_payload().code, ErrorCode::BadPayload);
            }
        }
        // Nested structs are objects too: a peer written as an array is refused.
        let peer = json!([KEY, "203.0.113.7", "172.24.0.2"]);
        assert!(decode(types::SET_VPN_PEERS, &json!({ "peers": [peer] })).is_err());
        // GET_NODE_STATUS: any object, never an array.
        assert!(decode(types::GET_NODE_STATUS, &json!({"anything": [1]})).is_ok());
        assert!(decode(types::GET_NODE_STATUS, &json!([])).is_err());
        assert!(decode(types::RUN_COMMAND, &json!([["/bin/true"]])).is_err());
    }

    /// Every string in `v` (values, not keys), each path to one, in document order.
    fn string_paths(v: &Value, path: &mut Vec<PathPart>, out: &mut Vec<Vec<PathPart>>) {
        match v {
            Value::String(_) => out.push(path.clone()),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(PathPart::Index(i));
                    string_paths(item, path, out);
                    path.pop();
                }
            }
            Value::Object(fields) => {
                for (k, item) in fields {
                    path.push(PathPart::Key(k.clone()));
                    string_paths(item, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    #[derive(Clone)]
    enum PathPart {
        Index(usize),
        Key(String),
    }

    fn at<'a>(v: &'a mut Value, path: &[PathPart]) -> &'a mut Value {
        path.iter().fold(v, |v, p| match p {
            PathPart::Index(i) => &mut v[*i],
            PathPart::Key(k) => &mut v[k.as_str()],
        })
    }

    #[test]
    fn no_error_message_repeats_a_string_of_the_payload() {
        const MARKER: &str = "Zq7marker";
        let markers = [
            MARKER.to_string(),
            format!("-{MARKER}"),
            format!("../../{MARKER}"),
            format!("/{MARKER}\u{0}"),
            format!("{MARKER} x\n$(id)"),
            format!("1{MARKER}"),
            format!("v1.2.3-{MARKER}"),
            format!("{MARKER}{}", "x".repeat(9000)),
        ];
        let mut refused = 0;
        for (kind, example) in examples() {
            let mut paths = Vec::new();
            string_paths(&example, &mut Vec::new(), &mut paths);
            for path in &paths {
                for marker in &markers {
                    let mut payload = example.clone();
                    *at(&mut payload, path) = Value::String(marker.clone());
                    let Err(err) = decode(kind, &payload) else {
                        continue;
                    };
                    refused += 1;
                    let p = err.to_error_payload();
                    assert_eq!(p.code, ErrorCode::BadPayload);
                    // A validation error names the field that was changed (its top level).
                    if let DecodeInstructionError::BadPayload(BadPayload::Invalid(v)) = &err {
                        let top = match &path[0] {
                            PathPart::Key(k) => k.clone(),
                            PathPart::Index(_) => "payload".to_string(),
                        };
                        assert!(v.field.starts_with(&top), "{kind}: {} for {top}", v.field);
                        assert!(
                            p.message.contains(&format!("`{}`", v.field)),
                            "{}",
                            p.message
                        );
                    }
                    let shown = format!("{} {err} {err:?}", p.message);
                    assert!(!shown.contains(MARKER), "{kind}: {shown}");
                }
                // A marker of the wrong type (a number where a string is expected is fine
                // for serde; an object is not) must not be echoed either.
                let mut payload = example.clone();
                *at(&mut payload, path) = json!({ MARKER: MARKER });
                if let Err(err) = decode(kind, &payload) {
                    let shown = format!("{} {err:?}", err.to_error_payload().message);
                    assert!(!shown.contains(MARKER), "{kind}: {shown}");
                }
            }
        }
        assert!(refused > 50, "the markers exercise validation ({refused})");
    }

    #[test]
    fn default_deadlines_come_from_the_catalog() {
        for (kind, example) in examples() {
            let i = decode(kind, &example).unwrap();
            let entry = catalog_entry(kind).unwrap();
            if kind == types::RUN_COMMAND {
                // The example's timeoutSecs is 30.
                assert_eq!(
                    i.default_deadline_secs(),
                    30 + RUN_COMMAND_DEADLINE_GRACE_SECS
                );
            } else {
                assert_eq!(
                    i.default_deadline_secs(),
                    entry.default_timeout_secs,
                    "{kind}"
                );
            }
        }
        let rc: RunCommand = serde_json::from_str(r#"{"argv":["true"]}"#).unwrap();
        assert_eq!(rc.default_deadline_secs(), 300 + 30);
        let rc = RunCommand {
            timeout_secs: Some(run_command_limits::MAX_TIMEOUT_SECS),
            ..rc
        };
        assert_eq!(
            rc.default_deadline_secs(),
            catalog_entry(types::RUN_COMMAND)
                .unwrap()
                .default_timeout_secs
        );
        assert_eq!(
            catalog_entry(types::GET_NODE_STATUS)
                .unwrap()
                .default_timeout_secs,
            30
        );
    }

    #[test]
    fn unknown_types_are_unknown_type() {
        let err = decode("NO_SUCH_THING", &json!({})).unwrap_err();
        assert!(matches!(err, DecodeInstructionError::UnknownType));
        assert_eq!(err.to_error_payload().code, ErrorCode::UnknownType);
        // A reply type is not an instruction.
        assert!(decode("NODE_STATUS", &json!({})).is_err());
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut env = BTreeMap::new();
        env.insert("API_TOKEN".to_string(), "hunter2".to_string());
        let rc = RunCommand {
            argv: vec!["/bin/true".into()],
            env: env.clone(),
            cwd: None,
            stdin: Some("hunter2".into()),
            timeout_secs: None,
        };
        let rs = RunRemoteScript {
            script: "x.sh".into(),
            params: env.clone(),
            run_in_background: false,
        };
        let web = RunWebRequest {
            url: "https://x".into(),
            method: "POST".into(),
            post_data: "hunter2".into(),
            allow_insecure: false,
            headers: env,
        };
        let join = ClusterJoinCmd {
            join_cmd: "kubeadm join --token hunter2".into(),
            encryption_key: Some("hunter2".into()),
        };
        let cr = ApplyCr {
            cr_b64: "aHVudGVyMg==".into(),
        };
        let out = TextResponse {
            response: "hunter2".into(),
        };
        let body = RunWebRequestResponse {
            response_body: "hunter2".into(),
            response_status_code: "200".into(),
            response_body_truncated: false,
        };
        let reg = crate::control::Register {
            token: "hunter2".into(),
            machine_id: "m".into(),
            hostname: "h".into(),
            os: "debian-12".into(),
            agent_version: "0.1.0".into(),
            csr_pem: String::new(),
        };
        let any = AnyInstruction::RunCommand(rc.clone());
        let shown =
            format!("{rc:?} {rs:?} {web:?} {join:?} {cr:?} {out:?} {body:?} {reg:?} {any:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("aHVudGVyMg"), "{shown}");
        assert!(shown.contains("API_TOKEN"), "{shown}");
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
        // Control bytes would cost 6 bytes each escaped: base64 is chosen, and round trips.
        let zeros = Output::from_bytes(vec![0u8; 3000]);
        assert!(matches!(zeros, Output::Base64(_)));
        assert_eq!(zeros.to_bytes().unwrap(), vec![0u8; 3000]);
        assert!(serde_json::to_string(&zeros).unwrap().len() < 4100);
        // Ordinary text, newlines and quotes included, stays text.
        let text = "line \"one\"\n\tline two\n".repeat(10);
        assert_eq!(
            Output::from_bytes(text.clone().into_bytes()),
            Output::Text(text)
        );
        assert_eq!(
            serde_json::to_string(&Output::Text("a".into())).unwrap(),
            r#"{"text":"a"}"#
        );
    }
}
