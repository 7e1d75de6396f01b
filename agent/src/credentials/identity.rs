//! The node's L2Sec identity: key, certificate and CA written by `runos register`.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

use crate::config::Config;
use crate::util::fs as fsutil;

/// Largest PEM file read.
pub const MAX_PEM_FILE: u64 = 1024 * 1024;

/// Why the node cannot start a session.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Not registered: a file is missing, or no server is configured.
    #[error(
        "this node is not registered ({0}); run `runos register --server HOST --token-file FILE` first"
    )]
    NotRegistered(String),
    /// A file exists but is unusable.
    #[error("{path}: {message}; run `runos register` again to replace it")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// What the session needs to connect.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The node id from the certificate's URI SAN.
    pub node_id: String,
    /// The control plane's host.
    pub host: String,
    /// L2Sec port.
    pub port: u16,
    /// mTLS client configuration.
    pub tls: Arc<rustls::ClientConfig>,
    /// The certificate's serial (hex).
    pub serial_hex: String,
    /// The certificate's notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// The certificate's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The CAs of the L2Sec bundle (DER): the node's trust, which a renewal may only continue
    /// ([`crate::credentials::trust`]).
    pub trusted_cas: Vec<Vec<u8>>,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, IdentityError> {
    match fsutil::read_capped(path, MAX_PEM_FILE) {
        Ok(b) if b.iter().all(|c| c.is_ascii_whitespace()) => Err(IdentityError::NotRegistered(
            format!("{} is empty", path.display()),
        )),
        Ok(b) => Ok(b),
        Err(fsutil::ReadError::NotFound) => Err(IdentityError::NotRegistered(format!(
            "{} does not exist",
            path.display()
        ))),
        Err(fsutil::ReadError::TooLarge) => Err(IdentityError::Invalid {
            path: path.display().to_string(),
            message: format!("larger than {MAX_PEM_FILE} bytes"),
        }),
        Err(fsutil::ReadError::Io(e)) => Err(IdentityError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

/// Load the key, certificate and CA from the configured paths and build the L2Sec client
/// configuration. Errors never contain key material.
pub fn load(cfg: &Config) -> Result<NodeIdentity, IdentityError> {
    let host = cfg.server.host.clone().ok_or_else(|| {
        IdentityError::NotRegistered("no [server] host in the configuration".into())
    })?;
    let p = &cfg.paths;
    let key_pem = read_pem(&p.key)?;
    let cert_pem = read_pem(&p.certificate)?;
    let ca_pem = read_pem(&p.ca)?;
    build(
        &host,
        cfg.server.l2_port,
        [
            (p.key.as_path(), key_pem.as_slice()),
            (p.certificate.as_path(), cert_pem.as_slice()),
            (p.ca.as_path(), ca_pem.as_slice()),
        ],
    )
}

/// Build an identity from PEM texts (key, certificate, CA bundle), each with the path it is
/// (or will be) stored at, for error messages. Errors never contain key material.
pub fn build(
    host: &str,
    port: u16,
    [
        (key_path, key_pem),
        (cert_path, cert_pem),
        (ca_path, ca_pem),
    ]: [(&Path, &[u8]); 3],
) -> Result<NodeIdentity, IdentityError> {
    let invalid = |path: &Path, message: String| IdentityError::Invalid {
        path: path.display().to_string(),
        message,
    };
    let key =
        runos_transport::pem::private_key(key_pem).map_err(|e| invalid(key_path, e.to_string()))?;
    let chain = runos_transport::pem::certificates(cert_pem)
        .map_err(|e| invalid(cert_path, e.to_string()))?;
    let cas: Vec<CertificateDer<'static>> =
        runos_transport::pem::certificates(ca_pem).map_err(|e| invalid(ca_path, e.to_string()))?;
    let info = runos_transport::identity::cert_info(&chain[0])
        .map_err(|e| invalid(cert_path, e.to_string()))?;
    let node_id = info.node_id.ok_or_else(|| {
        invalid(
            cert_path,
            "the certificate carries no runos://node/<id> URI".into(),
        )
    })?;
    let trusted_cas = cas.iter().map(|c| c.to_vec()).collect();
    let tls =
        runos_transport::tls::client_config(&cas, runos_protocol::ALPN_L2SEC, Some((chain, key)))
            .map_err(|e| {
            invalid(
                cert_path,
                format!("the key and certificate cannot be used: {e}"),
            )
        })?;
    Ok(NodeIdentity {
        node_id,
        host: host.to_string(),
        port,
        tls,
        serial_hex: info.serial_hex,
        not_before: info.not_before,
        not_after: info.not_after,
        trusted_cas,
    })
}
