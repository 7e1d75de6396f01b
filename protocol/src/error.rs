//! Stable error codes carried in `ERROR` replies.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code. Codes are part of the protocol: new ones may be added,
/// existing ones are never renamed. A receiver maps codes it does not know to [`ErrorCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The instruction type is not in the protocol's catalog.
    UnknownType,
    /// The type is in the catalog but this agent has no executor for it.
    Unsupported,
    /// The payload is not base64, not UTF-8, not JSON, or does not match the type's schema, or a
    /// field failed validation.
    BadPayload,
    /// The instruction did not finish within its deadline; its processes were killed.
    Timeout,
    /// The agent's queue is full; nothing was run. Safe to resend later with the same tag.
    Busy,
    /// An unexpected failure inside the agent (including a panic in an executor).
    Internal,
    /// The agent stopped (crash, restart or reboot) while the instruction ran.
    Interrupted,
    /// The instruction was cancelled.
    Cancelled,
    /// The executor ran and the operation it performs failed (details in the message).
    Failed,
    /// The agent is shutting down and did not start the instruction.
    ShuttingDown,
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The peer broke the protocol (for example a message out of order).
    Protocol,
    /// Enrolment: the token is not known.
    TokenUnknown,
    /// Enrolment: the token has expired.
    TokenExpired,
    /// Enrolment: the token was already used.
    TokenUsed,
    /// Enrolment: the request is malformed (for example an invalid CSR).
    BadRequest,
    /// The node's identity has been revoked.
    Revoked,
    /// A redelivered instruction's reply was secret and was discarded once acknowledged; the
    /// instruction is not run again.
    ReplyDiscarded,
    /// The instruction carries a generation older than one this node already applied
    /// (`SET_VPN_PEERS`); nothing was changed.
    Stale,
    /// The instruction's target does not exist (`REMOVE_ETCD_MEMBER`: no member has that
    /// address); nothing was changed.
    NotFound,
    /// What the instruction asks for is already the case because this agent did it earlier
    /// (`REMOVE_ETCD_MEMBER`: this agent removed that member); nothing was changed.
    AlreadyDone,
    /// The agent refused to run the operation because it would be unsafe (`REMOVE_ETCD_MEMBER`:
    /// quorum would be lost; a held package); nothing was changed. The message says why.
    Refused,
    /// The receiver does not know this code.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The code's wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::BadPayload => "bad_payload",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::Interrupted => "interrupted",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Failed => "failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::Protocol => "protocol",
            ErrorCode::TokenUnknown => "token_unknown",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenUsed => "token_used",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Revoked => "revoked",
            ErrorCode::ReplyDiscarded => "reply_discarded",
            ErrorCode::Stale => "stale",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyDone => "already_done",
            ErrorCode::Refused => "refused",
            ErrorCode::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The payload of an `ERROR` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorPayload {
    /// The stable code.
    pub code: ErrorCode,
    /// A human-readable explanation. Never contains secrets from the instruction's payload.
    pub message: String,
}

impl ErrorPayload {
    /// A new error payload.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorPayload {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_to_their_wire_names() {
        for c in [
            ErrorCode::UnknownType,
            ErrorCode::Unsupported,
            ErrorCode::BadPayload,
            ErrorCode::Timeout,
            ErrorCode::Busy,
            ErrorCode::Internal,
            ErrorCode::Interrupted,
            ErrorCode::Cancelled,
            ErrorCode::Failed,
            ErrorCode::ShuttingDown,
            ErrorCode::VersionMismatch,
            ErrorCode::Protocol,
            ErrorCode::TokenUnknown,
            ErrorCode::TokenExpired,
            ErrorCode::TokenUsed,
            ErrorCode::BadRequest,
            ErrorCode::Revoked,
            ErrorCode::ReplyDiscarded,
            ErrorCode::Stale,
            ErrorCode::NotFound,
            ErrorCode::AlreadyDone,
            ErrorCode::Refused,
        ] {
            let s = serde_json::to_string(&c).unwrap();
            assert_eq!(s, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&s).unwrap(), c);
        }
    }

    #[test]
    fn unknown_codes_map_to_other() {
        let c: ErrorCode = serde_json::from_str("\"something_new\"").unwrap();
        assert_eq!(c, ErrorCode::Other);
    }
}
