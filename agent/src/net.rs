//! Outbound TLS connections with bounded waits: DNS and TCP connect (10 s), TLS handshake (10 s)
//! and an ALPN check. Used by `register` (L1Sec) and the session (L2Sec). Also the bounded write
//! of one frame ([`write_within`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Bound on DNS resolution plus TCP connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the TLS handshake.
pub const TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection that could not be set up. The message names `host:port`.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// DNS, TCP or timeout: the server could not be reached.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// `host:port`.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// The TLS handshake failed (certificate verification, protocol) or the ALPN is wrong.
    #[error("TLS with {addr} failed: {reason}")]
    Tls {
        /// `host:port`.
        addr: String,
        /// What happened.
        reason: String,
    },
}

/// `host:port`, with brackets around IPv6 literals.
pub fn addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Resolve `host` afresh, connect (10 s), handshake TLS (10 s), and check the negotiated ALPN.
pub async fn connect_tls(
    host: &str,
    port: u16,
    config: Arc<rustls::ClientConfig>,
    alpn: &[u8],
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let a = addr(host, port);
    let unreachable = |reason: String| ConnectError::Unreachable {
        addr: a.clone(),
        reason,
    };
    let tls_err = |reason: String| ConnectError::Tls {
        addr: a.clone(),
        reason,
    };
    let name = runos_transport::tls::server_name(host).map_err(|e| tls_err(e.to_string()))?;
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => {
            return Err(unreachable(format!(
                "no connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            )));
        }
    };
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(config);
    let tls = match tokio::time::timeout(TLS_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // rustls errors arrive as InvalidData; anything else is the socket.
            let is_tls = e
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
            return Err(if is_tls {
                tls_err(e.to_string())
            } else {
                unreachable(format!("connection lost during the TLS handshake: {e}"))
            });
        }
        Err(_) => {
            return Err(unreachable(format!(
                "no TLS handshake within {} s",
                TLS_TIMEOUT.as_secs()
            )));
        }
    };
    if !runos_transport::tls::alpn_matches(tls.get_ref().1.alpn_protocol(), alpn) {
        return Err(tls_err(format!(
            "the server did not agree to ALPN {:?}; is this the right port?",
            String::from_utf8_lossy(alpn)
        )));
    }
    Ok(tls)
}

/// Bound a frame write by `within`; a timeout is an I/O error that ends the session.
pub async fn write_within<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut runos_transport::FrameWriter<W>,
    env: &runos_protocol::Envelope,
    within: Duration,
) -> Result<(), runos_transport::FrameError> {
    match tokio::time::timeout(within, writer.write(env)).await {
        Ok(r) => r,
        Err(_) => Err(runos_transport::FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("a frame could not be written within {} s", within.as_secs()),
        ))),
    }
}
