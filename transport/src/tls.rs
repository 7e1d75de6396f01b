//! TLS 1.3-only client and server configurations for L1Sec and L2Sec.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A TLS configuration that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A CA certificate could not be added to the trust store.
    #[error("CA certificate rejected: {0}")]
    BadCa(String),
    /// The certificate and key do not form a usable pair, or the verifier could not be built.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// The server name is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(cas: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    for ca in cas {
        store
            .add(ca.clone())
            .map_err(|e| TlsConfigError::BadCa(e.to_string()))?;
    }
    Ok(store)
}

/// A client configuration trusting exactly `cas`, offering `alpn`, TLS 1.3 only, optionally
/// presenting a client certificate.
pub fn client_config(
    cas: &[CertificateDer<'static>],
    alpn: &[u8],
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(cas)?), provider())
        .build()
        .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier);
    let mut cfg = match client_auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// A server configuration presenting `chain`/`key`, speaking only `alpn`, TLS 1.3 only, with
/// session resumption disabled. With `client_cas`, a client certificate chaining to one of them
/// is required (and checked in every handshake).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
    client_cas: Option<&[CertificateDer<'static>]>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_cas {
        Some(cas) => {
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(cas)?), provider())
                .build()
                .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    // No session resumption: a resumed TLS 1.3 session restores the client certificate
    // without checking it again (expiry included), and every connection is long-lived anyway.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The TLS server name for `host`: an IP address literal or a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsConfigError> {
    ServerName::try_from(host.to_string()).map_err(|_| TlsConfigError::ServerName(host.into()))
}

/// Whether the negotiated ALPN protocol of a finished handshake is `expected`. Both sides call
/// this so that L1Sec and L2Sec can never be confused.
pub fn alpn_matches(negotiated: Option<&[u8]>, expected: &[u8]) -> bool {
    negotiated == Some(expected)
}

/// The certificates a server presented, captured by [`chain_capture_config`].
#[derive(Debug, Default)]
pub struct CapturedChain {
    certs: std::sync::Mutex<Vec<CertificateDer<'static>>>,
}

impl CapturedChain {
    /// The presented chain (end entity first), empty before a handshake reached verification.
    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        self.certs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Debug)]
struct CaptureVerifier {
    captured: Arc<CapturedChain>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for CaptureVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut all = vec![end_entity.clone().into_owned()];
        // Bounded: a server cannot make us keep more than a few certificates.
        all.extend(intermediates.iter().take(8).map(|c| c.clone().into_owned()));
        *self
            .captured
            .certs
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = all;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that **trusts any server** and records the chain it presents. Only
/// for learning a control plane's CA to check it against a pin (as k3s does with the CA hash in
/// its tokens): nothing may be sent on such a connection, and the captured certificates are
/// trusted only if one matches the pin.
pub fn chain_capture_config(
    alpn: &[u8],
) -> Result<(Arc<ClientConfig>, Arc<CapturedChain>), TlsConfigError> {
    let captured = Arc::new(CapturedChain::default());
    let verifier = Arc::new(CaptureVerifier {
        captured: captured.clone(),
        provider: provider(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok((Arc::new(cfg), captured))
}
