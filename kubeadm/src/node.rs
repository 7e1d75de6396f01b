//! The node's own Node object through the Kubernetes API (`kube`): its kubelet version and its
//! Ready condition. The client is built from a kubeconfig with rustls and the ring provider
//! passed explicitly (no process-wide default provider is installed), the cluster's CA from the
//! kubeconfig only, and the client certificate (or token) the kubeconfig names. The server must
//! be `https://` (plain `http://` only to a loopback address, for tests).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::client::ConfigExt as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::ExposeSecret as _;

/// One API request's bound.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest client certificate or key file read.
const MAX_PEM_BYTES: u64 = 256 * 1024;
/// Largest kubeconfig read.
const MAX_KUBECONFIG_BYTES: u64 = 1024 * 1024;

/// What the Node reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// `status.nodeInfo.kubeletVersion` (e.g. `v1.30.2`; empty when absent).
    pub kubelet_version: String,
    /// Whether the `Ready` condition is `True`.
    pub ready: bool,
}

/// The node's Node object through the API.
#[derive(Clone)]
pub struct NodeApi {
    api: kube::Api<Node>,
    name: String,
}

impl std::fmt::Debug for NodeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeApi")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NodeApi {
    /// The Node `name` through `client`.
    pub fn new(client: kube::Client, name: &str) -> Self {
        NodeApi {
            api: kube::Api::all(client),
            name: name.to_string(),
        }
    }

    /// The Node `name` through the cluster and credentials of the kubeconfig at `path`.
    pub async fn from_kubeconfig(path: &std::path::Path, name: &str) -> Result<Self, String> {
        let client = client_from_kubeconfig(path).await?;
        Ok(NodeApi::new(client, name))
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read the Node (one request, bounded by [`REQUEST_TIMEOUT`]).
    pub async fn state(&self) -> Result<NodeState, String> {
        let node = tokio::time::timeout(REQUEST_TIMEOUT, self.api.get(&self.name))
            .await
            .map_err(|_| {
                format!(
                    "the Kubernetes API did not answer within {} s",
                    REQUEST_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("cannot read Node {}: {e}", self.name))?;
        let status = node.status.unwrap_or_default();
        let kubelet_version = status
            .node_info
            .map(|i| i.kubelet_version)
            .unwrap_or_default();
        let ready = status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Ok(NodeState {
            kubelet_version,
            ready,
        })
    }
}

/// A `kube` client for the kubeconfig at `path` (its current context).
/// The kubeconfig must be a regular file of at most 1 MiB; errors never repeat its
/// credentials (anything key- or token-like is `[redacted]`).
pub async fn client_from_kubeconfig(path: &std::path::Path) -> Result<kube::Client, String> {
    // A regular file, bounded, before kube reads it (whole) itself.
    crate::tool::read_capped(path, MAX_KUBECONFIG_BYTES).map_err(|e| format!("kubeconfig: {e}"))?;
    let redact = |e: &dyn std::fmt::Display| crate::tool::redact(&e.to_string());
    let kc = Kubeconfig::read_from(path)
        .map_err(|e| format!("cannot read kubeconfig {}: {}", path.display(), redact(&e)))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("kubeconfig {}: {}", path.display(), redact(&e)))?;
    client_from_config(config).map_err(|e| format!("kubeconfig {}: {e}", path.display()))
}

/// Whether the API server at `scheme://host` may be used: `https`, or plain `http` to a loopback
/// address only (tests): credentials never travel in the clear off the machine.
fn server_allowed(scheme: Option<&str>, host: Option<&str>) -> bool {
    match scheme {
        Some("https") => true,
        Some("http") => host.is_some_and(|h| {
            h == "localhost"
                || h.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }),
        _ => false,
    }
}

/// A `kube` client for `config` with rustls and the ring provider passed explicitly.
/// The server must be `https` (plain `http` only to a loopback address).
pub fn client_from_config(config: kube::Config) -> Result<kube::Client, String> {
    let url = &config.cluster_url;
    if !server_allowed(url.scheme_str(), url.host()) {
        return Err(format!(
            "the API server {} is not https:// (plain http:// only to a loopback address)",
            config.cluster_url
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in config.root_cert.iter().flatten() {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| format!("the cluster's CA certificate: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let tls = match identity(&config.auth_info)? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("the client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let auth = config
        .auth_layer()
        .map_err(|e| format!("credentials: {e}"))?;
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(auth)
        .service(tower::ServiceExt::map_err(http, |e| {
            Box::new(e) as Box<dyn std::error::Error + Send + Sync>
        }));
    Ok(kube::Client::new(service, config.default_namespace))
}

/// The client certificate chain and key of `auth`, from its `*-data` fields or its files.
fn identity(
    auth: &kube::config::AuthInfo,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
    let cert = pem_source(
        auth.client_certificate_data.as_deref(),
        auth.client_certificate.as_deref(),
        "client-certificate",
    )?;
    let key_data = auth
        .client_key_data
        .as_ref()
        .map(|s| s.expose_secret().to_string());
    let key = pem_source(
        key_data.as_deref(),
        auth.client_key.as_deref(),
        "client-key",
    )?;
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "the client certificate is not PEM".to_string())?;
    if chain.is_empty() {
        return Err("the client certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|_| "the client key is not a PEM private key".to_string())?;
    Ok(Some((chain, key)))
}

fn pem_source(
    data_b64: Option<&str>,
    file: Option<&str>,
    what: &str,
) -> Result<Option<Vec<u8>>, String> {
    use base64::Engine as _;
    if let Some(d) = data_b64 {
        return base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map(Some)
            .map_err(|_| format!("{what}-data is not base64"));
    }
    let Some(f) = file else {
        return Ok(None);
    };
    crate::tool::read_capped(std::path::Path::new(f), MAX_PEM_BYTES)
        .map(Some)
        .map_err(|e| format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        for (u, ok) in [
            ("https://10.0.0.1:6443", true),
            ("http://127.0.0.1:8080", true),
            ("http://[::1]:8080", true),
            ("http://localhost:8080", true),
            ("http://10.0.0.1:6443", false),
            ("http://127.0.0.1.example.com", false),
            ("ftp://127.0.0.1", false),
        ] {
            let (scheme, rest) = u.split_once("://").unwrap();
            let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
            assert_eq!(server_allowed(Some(scheme), Some(host)), ok, "{u}");
        }
    }
}
