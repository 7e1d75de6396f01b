//! The runos wire protocol.
//!
//! Everything that crosses the L1Sec (enrolment) and L2Sec (instruction stream) channels is an
//! [`Envelope`]: `{"type": "...", "tag": "<uuid>", "jsonB64": "<base64 of a JSON document>"}`,
//! sent as a frame of a 4-byte big-endian length followed by that many bytes of envelope JSON.
//!
//! This crate is pure: it encodes and decodes, it knows the message types and their payloads,
//! and it knows nothing of sockets, TLS, files or executors. `docs/protocol.md` is its
//! normative description.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod control;
pub mod envelope;
pub mod error;
pub mod examples;
pub mod frame;
pub mod instructions;
pub mod peertext;
pub mod shape;
pub mod validate;

pub use envelope::{Envelope, MessageType, PayloadError, Tag};
pub use error::{ErrorCode, ErrorPayload};
pub use frame::{DecodeError, EncodeError, decode_frame, encode_frame};

/// The protocol version spoken by this crate. HELLO and WELCOME carry it; peers with a different
/// version refuse the session with [`ErrorCode::VersionMismatch`].
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN protocol identifier of the enrolment channel (L1Sec, server authentication only).
pub const ALPN_L1SEC: &[u8] = b"runos-l1sec/1";

/// ALPN protocol identifier of the instruction channel (L2Sec, mutual TLS).
pub const ALPN_L2SEC: &[u8] = b"runos-l2sec/1";

/// Default TCP port of L1Sec.
pub const DEFAULT_L1_PORT: u16 = 9191;

/// Default TCP port of L2Sec.
pub const DEFAULT_L2_PORT: u16 = 9192;

/// Default maximum frame size (length prefix value) a receiver accepts: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;

/// Smallest maximum frame size a peer may configure or advertise: 64 KiB. Smaller limits
/// would make ordinary replies impossible to send.
pub const MIN_MAX_FRAME_BYTES: u32 = 64 * 1024;

/// The URI scheme and prefix of a node identity in a client certificate's SAN.
pub const NODE_URI_PREFIX: &str = "runos://node/";

#[doc(hidden)]
pub mod __fuzz {
    //! Entry points shared by property tests and fuzz targets.

    /// Decode arbitrary bytes as a frame; must never panic.
    pub fn decode(data: &[u8]) {
        let _ = crate::frame::decode_frame(data, crate::DEFAULT_MAX_FRAME_BYTES);
    }
}
