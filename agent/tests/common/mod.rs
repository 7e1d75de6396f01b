//! Shared test helpers: a throwaway PKI (rcgen), condition waits with deadlines and (in
//! [`dispatch`]) the dispatcher harness.
//!
//! Each integration-test crate (`cli.rs`, `session.rs`, `run_command.rs`, `dispatch.rs`, ...)
//! compiles this module on its own and uses only part of it, so unused helpers are expected:
//! `dead_code` is allowed here (and thus in the submodules), the usual pattern for Rust
//! integration-test helpers.
#![allow(dead_code)]

pub mod dispatch;

use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A CA, a server certificate for 127.0.0.1/localhost and a node certificate.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub node_cert_pem: String,
    pub node_key_pem: String,
}

pub fn pki(node_id: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let node_key = KeyPair::generate().unwrap();
    let mut node_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    node_params.subject_alt_names = vec![SanType::URI(
        format!("runos://node/{node_id}").try_into().unwrap(),
    )];
    let node_cert = node_params.signed_by(&node_key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        node_cert_pem: node_cert.pem(),
        node_key_pem: node_key.serialize_pem(),
    }
}

/// Poll `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Whether a pid is gone (or a zombie awaiting its reaper).
pub fn pid_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}
