//! A local HTTPS release server for end-to-end tests: serves `<dir>/download/<version>/<asset>`
//! at `/download/<version>/<asset>` over TLS on loopback (ephemeral port, a CA made here, written
//! to [`ReleaseServer::ca_file`]), records every requested path, and can misbehave on request
//! ([`Fault`]).

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A way to answer a request badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Announce the whole file in `Content-Length`, send only its first `send` bytes, close.
    Truncate {
        /// Bytes sent.
        send: usize,
    },
    /// Wait `ms` milliseconds, then answer normally (a slow mirror).
    Delay {
        /// The delay.
        ms: u64,
    },
}

type Faults = Arc<Mutex<HashMap<String, Fault>>>;
type Routes = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// The release's name for this machine's CPU.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no runos release for {other}"),
    }
}

pub fn asset() -> String {
    format!("nodeagent-linux-{}", arch())
}

pub fn other_asset() -> String {
    let other = if arch() == "amd64" { "arm64" } else { "amd64" };
    format!("nodeagent-linux-{other}")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    runos_transport::pem::der_sha256(bytes)
}

/// An HTTPS server on loopback serving `<dir>/download/<version>/<asset>` at
/// `/download/<version>/<asset>`, recording every requested path.
#[derive(Debug)]
pub struct ReleaseServer {
    rt: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    dir: PathBuf,
    /// The CA that signs the server certificate (PEM).
    pub ca_file: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
    faults: Faults,
    routes: Routes,
}

impl ReleaseServer {
    pub fn start(dir: &Path) -> ReleaseServer {
        fs::create_dir_all(dir.join("download")).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Distinct names: OpenSSL (curl) takes a leaf whose issuer is its own subject for a
        // self-signed certificate.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "runos test release CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "runos test release server");
        let leaf = leaf_params.signed_by(&key, &issuer).unwrap();
        let ca_file = dir.join("ca.pem");
        fs::write(&ca_file, ca.pem()).unwrap();
        let chain = runos_transport::pem::certificates(leaf.pem().as_bytes()).unwrap();
        let key = runos_transport::pem::private_key(key.serialize_pem().as_bytes()).unwrap();
        let tls = runos_transport::tls::server_config(chain, key, b"http/1.1", None).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let faults: Faults = Arc::new(Mutex::new(HashMap::new()));
        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let (root, log, f, r) = (
            dir.to_path_buf(),
            requests.clone(),
            faults.clone(),
            routes.clone(),
        );
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, root, log, f, r) = (
                    acceptor.clone(),
                    root.clone(),
                    log.clone(),
                    f.clone(),
                    r.clone(),
                );
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        serve(acceptor, tcp, root, log, f, r),
                    )
                    .await;
                });
            }
        });
        ReleaseServer {
            rt: Some(rt),
            addr,
            dir: dir.to_path_buf(),
            ca_file,
            requests,
            faults,
            routes,
        }
    }

    /// The release base URL (`--base`).
    pub fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Publish `version` with `binary` as this machine's asset and `checksums` as its
    /// checksums.txt.
    pub fn publish_raw(&self, version: &str, binary: &[u8], checksums: &str) {
        let d = self.dir.join("download").join(version);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(asset()), binary).unwrap();
        fs::write(d.join(other_asset()), b"the other architecture's binary").unwrap();
        fs::write(d.join("checksums.txt"), checksums).unwrap();
    }

    /// The checksums.txt a release of `binary` has (both architectures, sorted by name).
    pub fn checksums(binary: &[u8]) -> String {
        let mut lines = [
            format!("{}  {}", sha256_hex(binary), asset()),
            format!(
                "{}  {}",
                sha256_hex(b"the other architecture's binary"),
                other_asset()
            ),
        ];
        lines.sort_by(|a, b| a[66..].cmp(&b[66..]));
        format!("{}\n{}\n", lines[0], lines[1])
    }

    /// Publish a well-formed release of `binary` as `version`.
    pub fn publish(&self, version: &str, binary: &[u8]) {
        self.publish_raw(version, binary, &Self::checksums(binary));
    }

    /// Publish any file of release `version`.
    pub fn publish_file(&self, version: &str, name: &str, bytes: &[u8]) {
        let d = self.dir.join("download").join(version);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(name), bytes).unwrap();
    }

    /// Answer `GET path` (any path, e.g. a GitHub API one) with `body`.
    pub fn route(&self, path: &str, body: Vec<u8>) {
        self.routes.lock().unwrap().insert(path.to_string(), body);
    }

    /// Answer requests for `path` with `fault`.
    pub fn fault(&self, path: &str, fault: Fault) {
        self.faults.lock().unwrap().insert(path.to_string(), fault);
    }

    /// How many times `path` was requested.
    pub fn hits(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

impl Drop for ReleaseServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One HTTP/1.1 exchange: `GET /download/<version>/<asset>`, answered 200 with the file or 404.
async fn serve(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    root: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    faults: Faults,
    routes: Routes,
) -> std::io::Result<()> {
    let mut tls = acceptor.accept(tcp).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut first = head.lines().next().unwrap_or("").split(' ');
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    log.lock().unwrap().push(path.to_string());
    let routed = routes.lock().unwrap().get(path).cloned();
    let file = routed.or_else(|| {
        path.strip_prefix("/download/")
            .map(|rest| rest.split('/').collect::<Vec<_>>())
            .filter(|parts| {
                method == "GET"
                    && parts.len() == 2
                    && parts
                        .iter()
                        .all(|p| !p.is_empty() && !p.starts_with('.') && !p.contains('\\'))
            })
            .and_then(|parts| fs::read(root.join("download").join(parts[0]).join(parts[1])).ok())
    });
    let response = match file {
        Some(body) => {
            let fault = faults.lock().unwrap().get(path).copied();
            let send = match fault {
                Some(Fault::Truncate { send }) => send.min(body.len()),
                Some(Fault::Delay { ms }) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    body.len()
                }
                None => body.len(),
            };
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(&body[..send]);
            r
        }
        None => {
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n"
                .to_vec()
        }
    };
    tls.write_all(&response).await?;
    tls.shutdown().await
}
