//! The `runos` binary as the demo and tests drive it: exit codes, `--json`, and `register`
//! against an in-test L1Sec server (real TLS on loopback) that signs the node's CSR.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
    SanType,
};
use runos_protocol::control::{Register, Registered, types as ct};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload};
use runos_transport::{FrameReader, FrameWriter};
use tokio_rustls::TlsAcceptor;

fn runos(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runos"))
        .args(args)
        .env_remove("RUNOS_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap()
}

fn config(dir: &Path, extra: &str) -> String {
    let d = dir.display();
    let text = format!(
        "{extra}[paths]\nkey = \"{d}/node.key\"\ncertificate = \"{d}/node.crt\"\nca = \"{d}/ca.pem\"\nl1_ca = \"{d}/l1-ca.pem\"\nstate_dir = \"{d}/state\"\nrun_dir = \"{d}/run\"\n"
    );
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn version_and_help() {
    let o = runos(&["version", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["agentVersion"], runos_agent::AGENT_VERSION);
    for sub in [
        &["--help"][..],
        &["register", "--help"],
        &["agent", "--help"],
    ] {
        let o = runos(sub);
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("Exit codes:"));
    }
    let o = runos(&["register", "--server", "h", "--token", "secret"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn agent_not_registered_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "[server]\nhost = \"127.0.0.1\"\n");
    let o = runos(&["agent", "--config", &cfg]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("runos register"));
}

#[test]
fn register_unreachable_and_pin_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::pki("n");
    std::fs::write(dir.path().join("l1-ca.pem"), &pki.ca_pem).unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, "tok123\n").unwrap();
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(dir.path(), &format!("[server]\nl1_port = {port}\n"));
    let o = runos(&[
        "register",
        "--config",
        &cfg,
        "--server",
        "127.0.0.1",
        "--token-file",
        tok.to_str().unwrap(),
        "--insecure-skip-pin",
        "--json",
    ]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains("tok123"));

    let wrong = "ab".repeat(32);
    let o = runos(&[
        "register",
        "--config",
        &cfg,
        "--server",
        "127.0.0.1",
        "--token-file",
        tok.to_str().unwrap(),
        "--ca-sha256",
        &wrong,
    ]);
    assert_eq!(o.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&wrong));
    assert!(!dir.path().join("node.key").exists());
}

/// A one-shot L1Sec server: accepts one REGISTER and answers per `refuse`.
async fn l1_server(
    listener: tokio::net::TcpListener,
    refuse: bool,
    ca_out: std::path::PathBuf,
) -> Register {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let srv_key = KeyPair::generate().unwrap();
    let srv = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&srv_key, &issuer)
        .unwrap();
    std::fs::write(&ca_out, &ca_pem).unwrap();
    let cfg = runos_transport::tls::server_config(
        vec![srv.der().clone()],
        runos_transport::pem::private_key(srv_key.serialize_pem().as_bytes()).unwrap(),
        runos_protocol::ALPN_L1SEC,
        None,
    )
    .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let tls = TlsAcceptor::from(cfg).accept(tcp).await.unwrap();
    let (r, w) = tokio::io::split(tls);
    let mut r = FrameReader::new(r, 256 * 1024);
    let mut w = FrameWriter::new(w, 256 * 1024);
    let env = r.read().await.unwrap().unwrap();
    assert!(env.is(ct::REGISTER));
    let req: Register = env.payload().unwrap();
    if refuse {
        w.write(&Envelope::with_type(
            ct::ERROR,
            env.tag,
            &ErrorPayload::new(ErrorCode::TokenUsed, "token already used"),
        ))
        .await
        .unwrap();
    } else {
        let node_id = "6a1f0e0c-0000-4000-8000-000000000001";
        let mut csr = CertificateSigningRequestParams::from_pem(&req.csr_pem).unwrap();
        csr.params.subject_alt_names = vec![SanType::URI(
            format!("runos://node/{node_id}").try_into().unwrap(),
        )];
        // A sane lifetime: the agent refuses certificates valid for centuries.
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::minutes(1);
        csr.params.not_after = now + time::Duration::days(30);
        let cert = csr.signed_by(&issuer).unwrap();
        let reg = Registered {
            node_id: node_id.into(),
            certificate_pem: cert.pem(),
            ca_pem: ca_pem.clone(),
            ca_cross_pem: None,
        };
        w.write(&Envelope::with_type(ct::REGISTERED, env.tag, &reg))
            .await
            .unwrap();
    }
    let _ = w.shutdown().await;
    req
}

fn register_against(refuse: bool) -> (tempfile::TempDir, Output, Register) {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("given-ca.pem");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = config(dir.path(), "");
    let tok = dir.path().join("token");
    std::fs::write(&tok, "tok-abc\n").unwrap();
    // The CA file is written before accept; the client starts after it exists.
    let server = rt.spawn(l1_server(listener, refuse, ca_file.clone()));
    // The server writes the CA on its first poll; wait for it (bounded).
    assert!(common::wait_until(
        std::time::Duration::from_secs(10),
        || {
            rt.block_on(tokio::task::yield_now());
            ca_file.exists()
        }
    ));
    let port_s = port.to_string();
    let client = std::thread::spawn({
        let cfg = cfg.clone();
        let tok = tok.clone();
        let ca = ca_file.clone();
        move || {
            runos(&[
                "--config",
                &cfg,
                "register",
                "--server",
                "127.0.0.1",
                "--l1-port",
                &port_s,
                "--l2-port",
                "19999",
                "--token-file",
                tok.to_str().unwrap(),
                "--ca-file",
                ca.to_str().unwrap(),
                "--insecure-skip-pin",
                "--json",
            ])
        }
    });
    let req = rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(30), server)
            .await
            .unwrap()
            .unwrap()
    });
    let out = client.join().unwrap();
    (dir, out, req)
}

#[test]
fn register_success_writes_files() {
    let (dir, out, req) = register_against(false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(req.token, "tok-abc");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodeId"], "6a1f0e0c-0000-4000-8000-000000000001");
    let d = dir.path();
    let mode = std::fs::metadata(d.join("node.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        d.join("node.crt").exists() && d.join("ca.pem").exists() && d.join("l1-ca.pem").exists()
    );
    let (cfg, _) = runos_agent::config::load(&d.join("config.toml")).unwrap();
    assert_eq!(cfg.server.host.as_deref(), Some("127.0.0.1"));
    assert_eq!(cfg.server.l2_port, 19999);
    // The stored identity is usable for L2Sec.
    let id = runos_agent::credentials::identity::load(&cfg).unwrap();
    assert_eq!(id.node_id, "6a1f0e0c-0000-4000-8000-000000000001");
}

#[test]
fn register_refused_token_exits_5() {
    let (dir, out, _) = register_against(true);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("runos-controlplane token create"));
    assert!(!dir.path().join("node.key").exists());
}
