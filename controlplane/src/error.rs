//! The library's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the control plane library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No node has this id or hostname.
    #[error("no node with id or hostname {0:?}")]
    NodeNotFound(String),
    /// More than one node has this hostname.
    #[error("{0:?} is the hostname of more than one node; use the node id instead")]
    AmbiguousNode(String),
    /// No instruction has this tag.
    #[error("no instruction with tag {0:?}")]
    TagNotFound(String),
    /// The text is not a tag (a hyphenated UUID).
    #[error("{0:?} is not an instruction tag (a hyphenated UUID)")]
    MalformedTag(String),
    /// `send` with a tag already used by a different instruction.
    #[error(
        "tag {0} is already used by a different instruction (another node, type, payload or \
         instruction timeout); use a fresh tag"
    )]
    TagConflict(String),
    /// The node has been revoked.
    #[error("node {0} is revoked")]
    Revoked(String),
    /// The final reply did not arrive within the wait; the instruction stays pending and is
    /// delivered (again, with the same tag) when the node reconnects.
    #[error("no final reply within the wait; the instruction stays pending")]
    Timeout,
    /// The request is malformed (bad type name, duplicate tag, too large, ...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The server is shutting down (or has shut down).
    #[error("the control plane is shutting down")]
    ShuttingDown,
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address or socket path.
        addr: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// Another control plane answers on the operator socket.
    #[error("the operator socket {0} is in use by a running control plane")]
    AdminSocketInUse(PathBuf),
    /// The SQLite database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The database was written by a newer version.
    #[error("database schema: {0}")]
    Schema(String),
    /// The certificate authority's files are unusable, or signing failed.
    #[error("certificate authority: {0}")]
    Ca(String),
    /// The CA is not in the phase the operation needs: `ca rotate` while a rotation is in
    /// progress, `ca cutover` without one.
    #[error("{0}")]
    CaPhase(String),
    /// `ca cutover` would lock out recently seen nodes that hold only certificates of the
    /// outgoing CA.
    #[error("{0}")]
    CutoverBlocked(String),
    /// A TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[from] runos_transport::tls::TlsConfigError),
    /// The operator socket could not be reached (client side).
    #[error("cannot reach the operator socket {path}: {source}")]
    AdminUnreachable {
        /// The socket path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The operator socket answered with an error (client side).
    #[error("{message} ({code})")]
    Remote {
        /// The stable error code.
        code: String,
        /// The message.
        message: String,
        /// The instruction tag, for `timeout`.
        tag: Option<String>,
    },
    /// The operator socket's answer was not understood, or it did not answer in time (client
    /// side).
    #[error("operator socket: {0}")]
    AdminProtocol(String),
    /// An unexpected internal failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The stable code used on the operator socket for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NodeNotFound(_) => "node_not_found",
            Error::AmbiguousNode(_) => "ambiguous_node",
            Error::TagNotFound(_) => "tag_not_found",
            Error::MalformedTag(_) => "malformed_tag",
            Error::TagConflict(_) => "tag_conflict",
            Error::Revoked(_) => "revoked",
            Error::Timeout => "timeout",
            Error::BadRequest(_) => "bad_request",
            Error::ShuttingDown => "shutting_down",
            Error::CaPhase(_) => "ca_phase",
            Error::CutoverBlocked(_) => "cutover_blocked",
            Error::AdminUnreachable { .. } => "unreachable",
            Error::AdminProtocol(_) => "admin_protocol",
            Error::Remote { .. } => "remote",
            _ => "internal",
        }
    }
}
