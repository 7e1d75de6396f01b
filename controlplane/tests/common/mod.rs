//! A small raw client built from runos_transport and rcgen, and helpers to run the control
//! plane in-process on loopback ephemeral ports.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use runos_controlplane::{ServeOptions, ServerHandle, serve};
use runos_protocol::control::{self, Hello, Register, Registered, types};
use runos_protocol::{Envelope, ErrorPayload, Tag};
use runos_transport::{FrameReader, FrameWriter};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Cp {
    pub dir: tempfile::TempDir,
    pub server: ServerHandle,
}

pub async fn start() -> Cp {
    start_with(|_| {}).await
}

pub async fn start_with(f: impl FnOnce(&mut ServeOptions)) -> Cp {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ServeOptions::ephemeral(dir.path().join("cp"));
    f(&mut opts);
    let server = serve(opts).await.unwrap();
    Cp { dir, server }
}

impl Cp {
    /// The active CA (the first of the bundle): it signs the server certificate.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        runos_transport::pem::certificates(self.server.ca_pem().as_bytes())
            .unwrap()
            .remove(0)
    }

    /// Stop the control plane and start it again on the same data directory (new ports).
    pub async fn restart(self) -> Cp {
        let data = self.server.data_dir().to_path_buf();
        self.server.shutdown().await;
        let server = serve(ServeOptions::ephemeral(data)).await.unwrap();
        Cp {
            dir: self.dir,
            server,
        }
    }
}

/// The pins of the certificates in a PEM bundle, in order.
pub fn pins(bundle_pem: &str) -> Vec<String> {
    runos_transport::pem::certificates(bundle_pem.as_bytes())
        .unwrap()
        .iter()
        .map(|c| runos_transport::pem::der_sha256(c))
        .collect()
}

pub fn csr() -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key, csr)
}

pub fn register_payload(token: &str, csr_pem: &str) -> Register {
    Register {
        token: token.to_string(),
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        hostname: "test-node".into(),
        os: "debian-12".into(),
        agent_version: "0.1.0".into(),
        csr_pem: csr_pem.to_string(),
    }
}

/// One raw L1Sec exchange: the answer envelope.
pub async fn l1_exchange(cp: &Cp, env: &Envelope) -> Option<Envelope> {
    let cfg = runos_transport::tls::client_config(&[cp.ca_der()], runos_protocol::ALPN_L1SEC, None)
        .unwrap();
    let tcp = TcpStream::connect(cp.server.l1_addr()).await.unwrap();
    let tls = TlsConnector::from(cfg)
        .connect(runos_transport::tls::server_name("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let (r, w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, 256 * 1024);
    let mut writer = FrameWriter::new(w, 256 * 1024);
    writer.write(env).await.unwrap();
    tokio::time::timeout(DEADLINE, reader.read())
        .await
        .unwrap()
        .ok()
        .flatten()
}

/// Register with `token`; `Ok(Registered)` or the ERROR payload.
pub async fn register(cp: &Cp, token: &str, csr_pem: &str) -> Result<Registered, ErrorPayload> {
    let tag = Tag::random();
    let env = Envelope::with_type(types::REGISTER, tag, &register_payload(token, csr_pem));
    let reply = l1_exchange(cp, &env).await.expect("an answer");
    assert_eq!(reply.tag, tag);
    if reply.is(types::REGISTERED) {
        Ok(reply.payload().unwrap())
    } else {
        assert!(reply.is(types::ERROR), "{reply:?}");
        Err(reply.payload().unwrap())
    }
}

pub struct Node {
    pub id: String,
    pub cert_pem: String,
    pub key: KeyPair,
}

impl Node {
    pub fn identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let chain = runos_transport::pem::certificates(self.cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        (chain, key)
    }
}

/// Create a token and enrol a fresh node.
pub async fn enrol(cp: &Cp) -> Node {
    let token = cp
        .server
        .api()
        .create_token(Duration::from_secs(600))
        .unwrap();
    let (key, csr) = csr();
    let r = register(cp, &token.token, &csr).await.unwrap();
    Node {
        id: r.node_id,
        cert_pem: r.certificate_pem,
        key,
    }
}

pub type Reader = FrameReader<ReadHalf<TlsStream<TcpStream>>>;
pub type Writer = FrameWriter<WriteHalf<TlsStream<TcpStream>>>;

pub struct Conn {
    pub reader: Reader,
    pub writer: Writer,
}

/// Open an L2Sec connection presenting `identity`. Errors are returned as text (with TLS 1.3,
/// a refused client certificate shows up on the first read).
pub async fn l2_connect(
    cp: &Cp,
    identity: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Result<Conn, String> {
    let tls = l2_tls(cp, identity).await?;
    let (r, w) = tokio::io::split(tls);
    Ok(Conn {
        reader: FrameReader::new(r, 16 * 1024 * 1024),
        writer: FrameWriter::new(w, 16 * 1024 * 1024),
    })
}

/// The TLS stream of an L2Sec connection.
pub async fn l2_tls(
    cp: &Cp,
    identity: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Result<TlsStream<TcpStream>, String> {
    l2_tls_trusting(cp, &[cp.ca_der()], identity).await
}

/// The TLS stream of an L2Sec connection whose client trusts only `roots`.
pub async fn l2_tls_trusting(
    cp: &Cp,
    roots: &[CertificateDer<'static>],
    identity: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Result<TlsStream<TcpStream>, String> {
    let cfg =
        runos_transport::tls::client_config(roots, runos_protocol::ALPN_L2SEC, Some(identity))
            .unwrap();
    let tcp = TcpStream::connect(cp.server.l2_addr())
        .await
        .map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::clone(&cfg))
        .connect(runos_transport::tls::server_name("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls)
}

pub fn hello_env(node_id: &str, version: u32) -> Envelope {
    Envelope::with_type(
        types::HELLO,
        Tag::random(),
        &Hello {
            protocol_version: version,
            agent_version: "0.1.0".into(),
            node_id: node_id.to_string(),
            hostname: "test-node".into(),
            boot_id: "boot-1".into(),
            instruction_types: vec!["RUN_COMMAND".into(), "GET_NODE_STATUS".into()],
            pending_replies: vec![],
            probe: false,
            last_update: None,
            wireguard_public_key: None,
        },
    )
}

impl Conn {
    /// The next frame within the deadline: `Ok(None)` on a clean close, `Err` on an error.
    pub async fn next(&mut self) -> Result<Option<Envelope>, String> {
        match tokio::time::timeout(DEADLINE, self.reader.read()).await {
            Err(_) => panic!("no frame and no close within {DEADLINE:?}"),
            Ok(r) => r.map_err(|e| e.to_string()),
        }
    }

    /// The next frame that is not a HEARTBEAT_REPLY.
    pub async fn next_non_heartbeat(&mut self) -> Option<Envelope> {
        loop {
            match self.next().await {
                Ok(Some(e)) if e.is(types::HEARTBEAT_REPLY) => continue,
                Ok(Some(e)) => return Some(e),
                _ => return None,
            }
        }
    }

    pub async fn send(&mut self, env: &Envelope) {
        self.writer.write(env).await.unwrap();
    }

    /// Read until the connection ends (clean close or error), within the deadline; the frames
    /// seen on the way.
    pub async fn until_closed(&mut self) -> Vec<Envelope> {
        let mut seen = Vec::new();
        while let Ok(Some(e)) = self.next().await {
            seen.push(e);
        }
        seen
    }
}

/// Connect and complete the handshake; the WELCOME.
pub async fn session(cp: &Cp, node: &Node) -> (Conn, control::Welcome) {
    session_trusting(cp, &[cp.ca_der()], node).await
}

/// Connect trusting only `roots` for the server certificate and complete the handshake; the
/// WELCOME.
pub async fn session_trusting(
    cp: &Cp,
    roots: &[CertificateDer<'static>],
    node: &Node,
) -> (Conn, control::Welcome) {
    let tls = l2_tls_trusting(cp, roots, node.identity()).await.unwrap();
    let (r, w) = tokio::io::split(tls);
    let mut c = Conn {
        reader: FrameReader::new(r, 16 * 1024 * 1024),
        writer: FrameWriter::new(w, 16 * 1024 * 1024),
    };
    let hello = hello_env(&node.id, runos_protocol::PROTOCOL_VERSION);
    c.send(&hello).await;
    let w = c.next().await.unwrap().expect("WELCOME");
    assert!(w.is(types::WELCOME), "{w:?}");
    assert_eq!(w.tag, hello.tag);
    let welcome = w.payload().unwrap();
    (c, welcome)
}

pub fn error_code(env: &Envelope) -> String {
    assert!(env.is(types::ERROR), "{env:?}");
    let p: ErrorPayload = env.payload().unwrap();
    p.code.as_str().to_string()
}

/// Poll `cond` every 20 ms until it holds, at most `DEADLINE`.
pub async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
