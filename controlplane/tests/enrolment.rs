//! L1Sec enrolment over real TLS on loopback.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use common::*;
use runos_protocol::control::types;
use runos_protocol::{Envelope, Tag};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

#[tokio::test]
async fn registration_with_a_good_token_issues_a_node_certificate() {
    let cp = start().await;
    let api = cp.server.api();
    let token = api.create_token(Duration::from_secs(600)).unwrap();
    assert_eq!(token.ca_sha256, cp.server.ca_sha256());
    let (_key, csr) = csr();
    let r = register(&cp, &token.token, &csr).await.unwrap();
    assert!(uuid::Uuid::parse_str(&r.node_id).is_ok());
    assert_eq!(r.ca_pem, cp.server.ca_pem());

    let der = runos_transport::pem::certificates(r.certificate_pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&der[0]).unwrap();
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![format!("runos://node/{}", r.node_id)]);
    // Chains to the CA: issuer is the CA's subject, and the signature verifies with its key.
    let ca_der = cp.ca_der();
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert_eq!(cert.issuer(), ca.subject());
    let info = runos_transport::identity::cert_info(&der[0]).unwrap();
    let days = (info.not_after - info.not_before) / 86400;
    assert!((29..=31).contains(&days), "{days}");

    let nodes = api.nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].id, r.node_id);
    assert_eq!(nodes[0].hostname, "test-node");
    assert!(!nodes[0].online);

    // The issued certificate is accepted on L2Sec (full mutual TLS chain check).
    let node = Node {
        id: r.node_id,
        cert_pem: r.certificate_pem,
        key: _key,
    };
    let (_conn, welcome) = session(&cp, &node).await;
    assert_eq!(welcome.protocol_version, runos_protocol::PROTOCOL_VERSION);
    cp.server.shutdown().await;
}

#[tokio::test]
async fn reused_expired_and_unknown_tokens_are_refused() {
    let cp = start().await;
    let api = cp.server.api();
    let token = api.create_token(Duration::from_secs(600)).unwrap();
    let (_k, c) = csr();
    register(&cp, &token.token, &c).await.unwrap();
    let (_k, c) = csr();
    let e = register(&cp, &token.token, &c).await.unwrap_err();
    assert_eq!(e.code.as_str(), "token_used");

    let expired = api.insert_expired_token_for_tests().unwrap();
    let e = register(&cp, &expired, &c).await.unwrap_err();
    assert_eq!(e.code.as_str(), "token_expired");

    let e = register(&cp, "rnt_nope", &c).await.unwrap_err();
    assert_eq!(e.code.as_str(), "token_unknown");
    let e = register(&cp, &"x".repeat(10_000), &c).await.unwrap_err();
    assert_eq!(e.code.as_str(), "token_unknown");
    assert_eq!(api.nodes().unwrap().len(), 1);
    cp.server.shutdown().await;
}

#[tokio::test]
async fn bad_csrs_are_bad_requests_and_do_not_consume_the_token() {
    let cp = start().await;
    let api = cp.server.api();
    let token = api.create_token(Duration::from_secs(600)).unwrap();
    let e = register(&cp, &token.token, "not a csr").await.unwrap_err();
    assert_eq!(e.code.as_str(), "bad_request");
    let garbage =
        "-----BEGIN CERTIFICATE REQUEST-----\nMIIBAAAA\n-----END CERTIFICATE REQUEST-----\n";
    let e = register(&cp, &token.token, garbage).await.unwrap_err();
    assert_eq!(e.code.as_str(), "bad_request");
    // A P-384 key is refused.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let p384 = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let e = register(&cp, &token.token, &p384).await.unwrap_err();
    assert_eq!(e.code.as_str(), "bad_request");
    // A payload that is not a Register, and a wrong message type.
    let env = Envelope::with_type(types::REGISTER, Tag::random(), &serde_json::json!({"x": 1}));
    let reply = l1_exchange(&cp, &env).await.unwrap();
    assert_eq!(error_code(&reply), "bad_request");
    let env = Envelope::with_type(types::HELLO, Tag::random(), &serde_json::json!({}));
    let reply = l1_exchange(&cp, &env).await.unwrap();
    assert_eq!(error_code(&reply), "bad_request");
    // The token was not consumed by the failures.
    let (_k, c) = csr();
    register(&cp, &token.token, &c).await.unwrap();
    cp.server.shutdown().await;
}

#[tokio::test]
async fn data_dir_files_have_private_modes_and_endpoints_are_written() {
    let cp = start().await;
    let dir = cp.server.data_dir().to_path_buf();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("server.key")), 0o600);
    assert_eq!(mode(cp.server.admin_socket()), 0o600);
    let ep = runos_controlplane::Endpoints::read(&dir).unwrap();
    assert_eq!(ep.l1_addr, cp.server.l1_addr().to_string());
    assert_eq!(ep.l2_addr, cp.server.l2_addr().to_string());
    assert_eq!(
        std::path::Path::new(&ep.admin_socket),
        cp.server.admin_socket()
    );
    let pin = runos_transport::pem::der_sha256(&cp.ca_der());
    assert_eq!(pin, cp.server.ca_sha256());
    // A restart keeps the CA.
    let ca_pem = cp.server.ca_pem().to_string();
    cp.server.shutdown().await;
    let again = runos_controlplane::serve(runos_controlplane::ServeOptions::ephemeral(&dir))
        .await
        .unwrap();
    assert_eq!(again.ca_pem(), ca_pem);
    again.shutdown().await;
}
