//! Transport pieces shared by the runos agent and control plane: TLS 1.3 configurations with
//! the channels' ALPN values, PEM parsing, node identity in certificates, and framed reads and
//! writes of [`runos_protocol::Envelope`]s over any async stream.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod framed;
pub mod identity;
pub mod pem;
pub mod tls;

pub use framed::{FrameError, FrameReader, FrameWriter};
