//! For tests that play the control plane themselves (a scripted L2Sec server over real mutual
//! TLS on loopback, speaking the protocol frame by frame): a throwaway PKI (rcgen), the server's
//! TLS acceptor, and the agent's identity from it.

use crate::Agent;

/// A CA, a server certificate for 127.0.0.1 and a certificate for one node, all PEM.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate.
    pub ca_pem: String,
    /// The server certificate (127.0.0.1).
    pub server_cert_pem: String,
    /// The server certificate's key.
    pub server_key_pem: String,
    /// The node certificate (SAN `runos://node/<node>`).
    pub node_cert_pem: String,
    /// The node certificate's key.
    pub node_key_pem: String,
}

impl Pki {
    /// A fresh PKI for node `node`.
    pub fn new(node: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "scripted test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let node_key = rcgen::KeyPair::generate().unwrap();
        let mut node_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        node_params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("runos://node/{node}").try_into().unwrap(),
        )];
        let node_cert = node_params.signed_by(&node_key, &issuer).unwrap();
        Pki {
            ca_pem: ca.pem(),
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
            node_cert_pem: node_cert.pem(),
            node_key_pem: node_key.serialize_pem(),
        }
    }

    /// The L2Sec server's TLS configuration: the server certificate, client certificates from
    /// the CA required.
    pub fn server_config(&self) -> std::sync::Arc<rustls::ServerConfig> {
        use runos_transport::pem;
        runos_transport::tls::server_config(
            pem::certificates(self.server_cert_pem.as_bytes()).unwrap(),
            pem::private_key(self.server_key_pem.as_bytes()).unwrap(),
            runos_protocol::ALPN_L2SEC,
            Some(&pem::certificates(self.ca_pem.as_bytes()).unwrap()),
        )
        .unwrap()
    }

    /// [`Pki::server_config`] as an acceptor.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server_config())
    }

    /// Give `agent` this PKI's node identity, as `register` would have.
    pub fn install(&self, agent: &Agent) {
        let etc = agent.dir.join("etc");
        std::fs::write(etc.join("ca.pem"), &self.ca_pem).unwrap();
        std::fs::write(etc.join("node.crt"), &self.node_cert_pem).unwrap();
        std::fs::write(etc.join("node.key"), &self.node_key_pem).unwrap();
    }
}
