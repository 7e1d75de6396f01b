//! Messages that run the channels themselves: enrolment, handshake, heartbeat, replies.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// Message type names of the control messages.
pub mod types {
    /// L1Sec, agent → control plane: an enrolment request ([`super::Register`]).
    pub const REGISTER: &str = "REGISTER";
    /// L1Sec, control plane → agent: the signed certificate ([`super::Registered`]).
    pub const REGISTERED: &str = "REGISTERED";
    /// L2Sec, agent → control plane, first message of a session ([`super::Hello`]).
    pub const HELLO: &str = "HELLO";
    /// L2Sec, control plane → agent, answer to HELLO ([`super::Welcome`]).
    pub const WELCOME: &str = "WELCOME";
    /// L2Sec, agent → control plane, liveness probe ([`super::Heartbeat`]).
    pub const HEARTBEAT: &str = "HEARTBEAT";
    /// L2Sec, control plane → agent, answer to HEARTBEAT with the same tag
    /// ([`super::HeartbeatReply`]).
    pub const HEARTBEAT_REPLY: &str = "HEARTBEAT_REPLY";
    /// L2Sec, control plane → agent: the final reply with this tag was received ([`super::Ack`]).
    pub const ACK: &str = "ACK";
    /// Either direction: a failure, with an [`crate::ErrorPayload`].
    pub const ERROR: &str = "ERROR";
    /// L2Sec, agent → control plane: a log or progress line of a running instruction
    /// ([`super::LogLine`]), carrying the instruction's tag.
    pub const LOG: &str = "LOG";
    /// A successful reply with nothing to say; payload `{}`.
    pub const NO_CONTENT: &str = "NO_CONTENT";
    /// L2Sec, agent → control plane: a certificate renewal request ([`super::Renew`]).
    pub const RENEW: &str = "RENEW";
    /// L2Sec, control plane → agent, answer to RENEW with the same tag ([`super::Renewed`]).
    pub const RENEWED: &str = "RENEWED";
}

/// Every control message type. An envelope of one of these types is never an instruction: an
/// agent must not dispatch it to an executor.
pub const ALL_CONTROL_TYPES: &[&str] = &[
    types::REGISTER,
    types::REGISTERED,
    types::HELLO,
    types::WELCOME,
    types::HEARTBEAT,
    types::HEARTBEAT_REPLY,
    types::ACK,
    types::ERROR,
    types::LOG,
    types::NO_CONTENT,
    types::RENEW,
    types::RENEWED,
];

/// Whether `kind` names a control message (as opposed to an instruction or a reply).
pub fn is_control_type(kind: &str) -> bool {
    ALL_CONTROL_TYPES.contains(&kind)
}

/// Maximum length of an enrolment token accepted by either side.
pub const MAX_TOKEN_LEN: usize = 256;

/// Maximum size of a PEM document (CSR, certificate, CA bundle) in enrolment messages.
pub const MAX_PEM_LEN: usize = 64 * 1024;

/// Maximum length of short identity strings (hostname, machine id, OS, versions).
pub const MAX_IDENT_LEN: usize = 255;

/// Maximum number of instruction types an agent may list in HELLO.
pub const MAX_HELLO_TYPES: usize = 256;

/// Maximum number of tags an agent lists in HELLO's `pendingReplies`.
pub const MAX_HELLO_PENDING: usize = 1024;

/// `REGISTER`: an enrolment request sent over L1Sec. `Debug` does not show the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Register {
    /// The one-time enrolment token. Secret: never logged.
    pub token: String,
    /// The node's `/etc/machine-id`.
    pub machine_id: String,
    /// The node's hostname.
    pub hostname: String,
    /// `<ID>-<VERSION_ID>` from `/etc/os-release`, or `unknown`.
    pub os: String,
    /// The agent's version.
    pub agent_version: String,
    /// A PKCS#10 certificate signing request (PEM) for a key generated on the node.
    pub csr_pem: String,
}

impl std::fmt::Debug for Register {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Register")
            .field("token", &"<redacted>")
            .field("machine_id", &self.machine_id)
            .field("hostname", &self.hostname)
            .field("os", &self.os)
            .field("agent_version", &self.agent_version)
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// `REGISTERED`: the answer to a successful enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registered {
    /// The node identity assigned by the control plane; also in the certificate's SAN as
    /// `runos://node/<nodeId>`.
    pub node_id: String,
    /// The node's certificate (PEM).
    pub certificate_pem: String,
    /// The CA bundle (PEM, one or two certificates) that L2Sec server certificates chain to.
    pub ca_pem: String,
    /// The cross-certificate of the control plane's newest CA (PEM, one certificate), signed by
    /// the CA before it; present once the control plane's CA has been rotated (protocol.md
    /// §6.4, trust continuity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cross_pem: Option<String>,
}

/// `HELLO`: the agent's first message on an L2Sec session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// The agent's protocol version ([`crate::PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// The agent's version (semver, e.g. `0.1.0`).
    pub agent_version: String,
    /// The node id from the agent's certificate.
    pub node_id: String,
    /// The node's hostname.
    pub hostname: String,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), so the control plane can tell
    /// a reboot from a reconnect.
    pub boot_id: String,
    /// The instruction types this agent can execute.
    pub instruction_types: Vec<String>,
    /// Tags of the final replies the agent holds that the control plane has not acknowledged
    /// yet, oldest first: they are sent right after `WELCOME`. At most [`MAX_HELLO_PENDING`]
    /// are listed, so the list may be incomplete: the control plane must not rely on it being
    /// complete (every reply still arrives, listed or not). Omitted when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_replies: Vec<String>,
    /// A probe session: opened only to prove a credential works or to renew a certificate
    /// while the agent is not running. The control plane answers HELLO, HEARTBEAT and RENEW
    /// on it, sends no instructions, and leaves the node's live session (if any) alone.
    /// Omitted when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probe: bool,
    /// The outcome of the agent's last self-update (runos), if it has one. Omitted when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<UpdateReport>,
    /// The node's WireGuard public key (runos): 44 characters of standard base64, so that the
    /// control plane knows it before it sends peers. Omitted when the agent has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
}

/// Longest [`UpdateReport::message`] a control plane accepts (characters).
pub const MAX_UPDATE_MESSAGE: usize = 1024;

/// The outcome of an agent's last self-update, reported in HELLO (runos).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateReport {
    /// The version that was running (`vX.Y.Z`).
    pub from: String,
    /// The version asked for (`vX.Y.Z`).
    pub to: String,
    /// `ok`, `rolled_back` or `failed`.
    pub outcome: String,
    /// What happened, in words (at most [`MAX_UPDATE_MESSAGE`] characters).
    pub message: String,
    /// When (RFC 3339).
    pub time: String,
}

impl UpdateReport {
    /// Whether every field is within its bounds (a control plane drops a report that is not).
    pub fn is_valid(&self) -> bool {
        let short =
            |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic());
        short(&self.from)
            && short(&self.to)
            && short(&self.time)
            && ["ok", "rolled_back", "failed"].contains(&self.outcome.as_str())
            && self.message.chars().count() <= MAX_UPDATE_MESSAGE
    }
}

/// `WELCOME`: the control plane's answer to HELLO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Welcome {
    /// The control plane's protocol version.
    pub protocol_version: u32,
    /// The control plane's clock, milliseconds since the Unix epoch.
    pub server_time_ms: u64,
    /// How often the agent sends HEARTBEAT, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// The largest frame the control plane accepts; the agent never sends a larger one.
    pub max_frame_bytes: u32,
    /// The agent version the control plane wants this node to run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_agent_version: Option<String>,
    /// An identifier of this session, for correlating logs on both sides.
    pub session_id: String,
}

/// `RENEW`: a certificate renewal request, sent by the agent on an established L2Sec session
/// (so the request is authenticated by the certificate being renewed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Renew {
    /// A PKCS#10 certificate signing request (PEM) for a key newly generated on the node.
    pub csr_pem: String,
}

/// `RENEWED`: the answer to RENEW, with its tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Renewed {
    /// The new certificate (PEM), for the CSR's key and the session's node id.
    pub certificate_pem: String,
    /// The CA bundle (PEM, one or two certificates) the agent must trust from now on: during a
    /// CA rotation it holds both the old and the new CA.
    pub ca_pem: String,
    /// The cross-certificate of the control plane's newest CA (PEM, one certificate): its
    /// subject and key, signed by the CA before it. An agent admits a CA it does not trust yet
    /// only when this vouches for it under a CA it trusts (protocol.md §6.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cross_pem: Option<String>,
}

/// `HEARTBEAT`: an agent-initiated liveness probe, answered by `HEARTBEAT_REPLY` with its tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// The agent's clock when sent, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// Instructions currently running on the agent.
    pub in_flight: u32,
}

/// `HEARTBEAT_REPLY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatReply {
    /// The control plane's clock, milliseconds since the Unix epoch.
    pub server_time_ms: u64,
}

/// `ACK`: payload `{}`; the tag names the acknowledged reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {}

/// `NO_CONTENT`: the success reply of instructions that have nothing to report; payload `{}`
/// (base64 `e30=`). Any JSON object is accepted when decoding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoContent {}

/// Level of a [`LogLine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Informational progress.
    Info,
    /// Something went wrong but the instruction continues.
    Warn,
    /// A failure.
    Error,
}

/// `LOG`: a log or progress line of a running instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLine {
    /// The level.
    pub level: LogLevel,
    /// The line (at most [`MAX_LOG_LINE`] bytes; longer lines are cut and marked).
    pub message: String,
}

/// Longest `LOG` message in bytes.
pub const MAX_LOG_LINE: usize = 4096;

/// Result of judging a peer's protocol version.
pub fn check_version(peer: u32) -> Result<(), crate::ErrorPayload> {
    if peer == crate::PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(crate::ErrorPayload::new(
            ErrorCode::VersionMismatch,
            format!(
                "protocol version {peer} is not supported; this side speaks version {}",
                crate::PROTOCOL_VERSION
            ),
        ))
    }
}

/// Prefix of an enrolment token that carries the control plane's CA pin.
pub const TOKEN_PREFIX: &str = "runos1.";

/// Length in hex digits of both parts of a `runos1.` token.
const TOKEN_PART_HEX: usize = 64;

/// An enrolment token as the agent reads it and the control plane issues it.
///
/// The current format is `runos1.<CA sha256>.<secret>`, both parts 64 lowercase hex digits: like
/// k3s's `K10<ca-hash>::<secret>`, it carries the pin of the L1Sec CA (the sha256 of the CA
/// certificate's DER) so the node can check the control plane before presenting the secret.
/// The control plane stores the sha256 of the whole token string, so the pin is bound to the
/// token. Any other text (such as the older `rnt_<64 hex>` tokens) is an opaque token that
/// carries no pin. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrolmentToken {
    raw: String,
    ca_sha256: Option<String>,
}

/// A token that claims the `runos1.` format but does not follow it. Never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the enrolment token is malformed: {0}")]
pub struct TokenFormatError(&'static str);

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl EnrolmentToken {
    /// Build a `runos1.` token from a CA pin and a secret (each 64 lowercase hex digits).
    pub fn new(ca_sha256: &str, secret: &str) -> Result<Self, TokenFormatError> {
        Self::parse(&format!("{TOKEN_PREFIX}{ca_sha256}.{secret}"))
    }

    /// Parse a token (already trimmed). A token that starts with `runos1.` must be exactly
    /// `runos1.<64 lowercase hex>.<64 lowercase hex>`; any other non-empty text without
    /// whitespace of at most [`MAX_TOKEN_LEN`] characters is an opaque token without a pin.
    pub fn parse(s: &str) -> Result<Self, TokenFormatError> {
        if s.is_empty() {
            return Err(TokenFormatError("it is empty"));
        }
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenFormatError("it is too long"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenFormatError("it contains spaces or control characters"));
        }
        let Some(rest) = s.strip_prefix(TOKEN_PREFIX) else {
            return Ok(EnrolmentToken {
                raw: s.to_string(),
                ca_sha256: None,
            });
        };
        let Some((pin, secret)) = rest.split_once('.') else {
            return Err(TokenFormatError(
                "a runos1 token has three parts separated by dots: runos1.<CA sha256>.<secret>",
            ));
        };
        if pin.len() != TOKEN_PART_HEX {
            return Err(TokenFormatError(
                "the CA sha256 part of a runos1 token must be 64 hex digits",
            ));
        }
        if !is_lower_hex(pin) {
            return Err(TokenFormatError(
                "the CA sha256 part of a runos1 token must be lowercase hex digits",
            ));
        }
        if secret.len() != TOKEN_PART_HEX || !is_lower_hex(secret) {
            return Err(TokenFormatError(
                "the secret part of a runos1 token must be 64 lowercase hex digits",
            ));
        }
        Ok(EnrolmentToken {
            raw: s.to_string(),
            ca_sha256: Some(pin.to_string()),
        })
    }

    /// The CA pin the token carries (64 lowercase hex digits), if any.
    pub fn ca_sha256(&self) -> Option<&str> {
        self.ca_sha256.as_deref()
    }

    /// The whole token as sent in REGISTER and hashed by the control plane. Secret.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// Consume the token, returning the whole token string. Secret.
    pub fn into_string(self) -> String {
        self.raw
    }
}

impl std::fmt::Debug for EnrolmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolmentToken")
            .field("ca_sha256", &self.ca_sha256)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn runos1_tokens_carry_the_pin() {
        let pin = "ab".repeat(32);
        let secret = "0f".repeat(32);
        let t = EnrolmentToken::new(&pin, &secret).unwrap();
        assert_eq!(t.ca_sha256(), Some(pin.as_str()));
        assert_eq!(t.expose(), format!("runos1.{pin}.{secret}"));
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&secret), "{dbg}");
        assert_eq!(EnrolmentToken::parse(t.expose()).unwrap(), t);
    }

    #[test]
    fn malformed_runos1_tokens_are_refused_without_echo() {
        let pin = "ab".repeat(32);
        let secret = "0f".repeat(32);
        for bad in [
            format!("runos1.{pin}"),
            format!("runos1.{pin}{secret}"),
            format!("runos1.{}.{secret}", "ab".repeat(31)),
            format!("runos1.{pin}.{}", "0f".repeat(33)),
            format!("runos1.{}.{secret}", "zz".repeat(32)),
            format!("runos1.{}.{secret}", "AB".repeat(32)),
            format!("runos1.{pin}.{}", "0g".repeat(32)),
            format!("runos1.{pin}.{secret}.x"),
            format!("runos1..{secret}"),
        ] {
            let e = EnrolmentToken::parse(&bad).unwrap_err();
            assert!(!e.to_string().contains(&secret), "{e}");
        }
        assert!(EnrolmentToken::parse("").is_err());
        assert!(EnrolmentToken::parse("a b").is_err());
        assert!(EnrolmentToken::parse(&"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
    }

    #[test]
    fn other_tokens_carry_no_pin() {
        let old = format!("rnt_{}", "0f".repeat(32));
        let t = EnrolmentToken::parse(&old).unwrap();
        assert_eq!(t.ca_sha256(), None);
        assert_eq!(t.expose(), old);
        assert!(!format!("{t:?}").contains(&old));
    }
}
