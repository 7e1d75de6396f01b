//! The Node read through the Kubernetes API over TLS with a client certificate, as with
//! kubelet's kubeconfig (`client-certificate` and `client-key` naming one PEM file). The API
//! server is a fake (no kube-apiserver can be obtained here): a TLS server made by the test with
//! rustls, requiring a client certificate of the test's CA, answering `GET
//! /api/v1/nodes/node-a`.

use std::sync::Arc;

use runos_kubeadm::node::NodeApi;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_p = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_p.distinguished_name
        .push(DnType::CommonName, "runos-test kubernetes CA");
    ca_p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_p.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_p, ca_key);
    let srv_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let srv = sp.signed_by(&srv_key, &issuer).unwrap();
    let cl_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name
        .push(DnType::CommonName, "system:node:node-a");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cl = cp.signed_by(&cl_key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: (srv.pem(), srv_key.serialize_pem()),
        client: (cl.pem(), cl_key.serialize_pem()),
    }
}

/// A TLS server requiring a client certificate of `ca_pem`; answers every request with the
/// Node. Returns its port.
async fn serve(p: &Pki) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(p.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(p.server.0.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(p.server.1.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let body = serde_json::json!({
                    "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                    "status": {
                        "nodeInfo": {
                            "kubeletVersion": "v1.30.2", "architecture": "amd64", "bootID": "",
                            "containerRuntimeVersion": "", "kernelVersion": "",
                            "kubeProxyVersion": "", "machineID": "", "operatingSystem": "linux",
                            "osImage": "", "systemUUID": ""
                        },
                        "conditions": [{"type": "Ready", "status": "False"}]
                    }
                })
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

fn kubeconfig(
    dir: &std::path::Path,
    port: u16,
    ca_pem: &str,
    client: &(String, String),
) -> std::path::PathBuf {
    use base64::Engine as _;
    // kubelet's layout: one PEM file with the certificate and the key, named twice.
    let pem = dir.join("kubelet-client-current.pem");
    std::fs::write(&pem, format!("{}{}", client.0, client.1)).unwrap();
    let kc = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: default-cluster\n  cluster:\n    certificate-authority-data: {}\n    server: https://127.0.0.1:{port}\ncontexts:\n- name: default-context\n  context:\n    cluster: default-cluster\n    namespace: default\n    user: default-auth\ncurrent-context: default-context\nusers:\n- name: default-auth\n  user:\n    client-certificate: {p}\n    client-key: {p}\n",
        base64::engine::general_purpose::STANDARD.encode(ca_pem),
        p = pem.display()
    );
    let path = dir.join("kubelet.conf");
    std::fs::write(&path, kc).unwrap();
    path
}

/// kubelet's kubeconfig (CA data, client certificate and key in one file): the Node's version
/// and Ready come through TLS with the client certificate.
#[tokio::test]
async fn the_node_is_read_over_tls_with_the_kubeconfigs_client_certificate() {
    let p = pki();
    let port = serve(&p).await;
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), port, &p.ca_pem, &p.client);
    let api = NodeApi::from_kubeconfig(&kc, "node-a").await.unwrap();
    let st = api.state().await.unwrap();
    assert_eq!(st.kubelet_version, "v1.30.2");
    assert!(!st.ready);
}

/// A server whose certificate is not signed by the kubeconfig's CA is refused (the system roots
/// are never used for the cluster); so is a client without a certificate.
#[tokio::test]
async fn another_ca_or_no_client_certificate_is_refused() {
    let p = pki();
    let other = pki();
    let port = serve(&p).await;
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), port, &other.ca_pem, &p.client);
    let api = NodeApi::from_kubeconfig(&kc, "node-a").await.unwrap();
    assert!(api.state().await.is_err());
    let kc = kubeconfig(dir.path(), port, &p.ca_pem, &other.client);
    let api = NodeApi::from_kubeconfig(&kc, "node-a").await.unwrap();
    assert!(api.state().await.is_err());
}
