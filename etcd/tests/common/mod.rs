//! Real etcd clusters on loopback for the tests and the benchmark: Debian's `etcd` (3.4) with
//! TLS made here (a CA, one server/peer certificate with every member's IP SAN, a client
//! certificate), ephemeral ports, data in a temporary directory, fast raft timings. Every
//! process is killed and reaped when the cluster is dropped.
#![allow(dead_code, missing_docs)]

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, MemberAddOptions, TlsOptions};
use runos_etcd::Settings;

pub const ETCD: &str = "/usr/bin/etcd";

/// `Some(reason)` when the tests cannot run here (printed by the caller).
pub fn skip_reason() -> Option<String> {
    if !Path::new(ETCD).exists() {
        return Some(format!(
            "{ETCD} is missing (apt-get install etcd-server): skipping the real-etcd test"
        ));
    }
    None
}

macro_rules! require_etcd {
    () => {
        if let Some(why) = common::skip_reason() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}
pub(crate) use require_etcd;

pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// A CA, a server/peer certificate for `ips` (and 127.0.0.1), a client certificate.
    pub fn make(dir: &Path, ips: &[IpAddr]) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_p = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_p.distinguished_name
            .push(DnType::CommonName, "runos-test etcd CA");
        ca_p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_p.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_p, ca_key);

        let mut all: Vec<IpAddr> = ips.to_vec();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        if !all.contains(&lo) {
            all.push(lo);
        }
        let srv_key = KeyPair::generate().unwrap();
        let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        sp.subject_alt_names
            .extend(all.iter().map(|ip| SanType::IpAddress(*ip)));
        sp.distinguished_name.push(DnType::CommonName, "etcd");
        sp.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let srv = sp.signed_by(&srv_key, &issuer).unwrap();

        let cl_key = KeyPair::generate().unwrap();
        let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
        cp.distinguished_name
            .push(DnType::CommonName, "kube-etcd-healthcheck-client");
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cl = cp.signed_by(&cl_key, &issuer).unwrap();

        let w = |name: &str, data: String| {
            let p = dir.join(name);
            std::fs::write(&p, data).unwrap();
            p
        };
        Pki {
            ca: w("ca.crt", ca.pem()),
            server_cert: w("server.crt", srv.pem()),
            server_key: w("server.key", srv_key.serialize_pem()),
            client_cert: w("client.crt", cl.pem()),
            client_key: w("client.key", cl_key.serialize_pem()),
        }
    }
}

fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn url(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(_) => format!("https://{ip}:{port}"),
        IpAddr::V6(_) => format!("https://[{ip}]:{port}"),
    }
}

pub struct Node {
    pub name: String,
    pub ip: IpAddr,
    pub client_url: String,
    pub peer_url: String,
    child: Option<Child>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub nodes: Vec<Node>,
    token: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Cluster {
    /// Start one member per address in `ips` (names n1, n2, …) and wait until every member
    /// answers with a leader (deadline 30 s).
    pub async fn start(ips: &[&str]) -> Cluster {
        let ips: Vec<IpAddr> = ips.iter().map(|s| s.parse().unwrap()).collect();
        Self::start_with_pki_ips(&ips, &ips).await
    }

    /// As [`Cluster::start`], with server-certificate SANs for `san_ips` as well (members
    /// added later).
    pub async fn start_with_pki_ips(ips: &[IpAddr], san_ips: &[IpAddr]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut sans = ips.to_vec();
        sans.extend_from_slice(san_ips);
        let pki = Pki::make(dir.path(), &sans);
        let token = format!("runos-test-{}", std::process::id());
        let mut nodes: Vec<Node> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| Node {
                name: format!("n{}", i + 1),
                ip: *ip,
                client_url: url(*ip, free_port(*ip)),
                peer_url: url(*ip, free_port(*ip)),
                child: None,
            })
            .collect();
        let initial = nodes
            .iter()
            .map(|n| format!("{}={}", n.name, n.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            pki,
            nodes: Vec::new(),
            token,
        };
        for n in &mut nodes {
            n.child = Some(c.spawn(n, &initial, "new"));
        }
        c.nodes = nodes;
        c.wait_healthy(Duration::from_secs(30)).await;
        c
    }

    fn spawn(&self, n: &Node, initial: &str, state: &str) -> Child {
        let data = self.dir.path().join(format!("{}.data", n.name));
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", n.name))).unwrap();
        let p = |p: &PathBuf| p.to_str().unwrap().to_string();
        Command::new(ETCD)
            .args(["--name", &n.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &n.client_url])
            .args(["--advertise-client-urls", &n.client_url])
            .args(["--listen-peer-urls", &n.peer_url])
            .args(["--initial-advertise-peer-urls", &n.peer_url])
            .args(["--initial-cluster", initial])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--cert-file", &p(&self.pki.server_cert)])
            .args(["--key-file", &p(&self.pki.server_key)])
            .args(["--trusted-ca-file", &p(&self.pki.ca)])
            .arg("--client-cert-auth")
            .args(["--peer-cert-file", &p(&self.pki.server_cert)])
            .args(["--peer-key-file", &p(&self.pki.server_key)])
            .args(["--peer-trusted-ca-file", &p(&self.pki.ca)])
            .arg("--peer-client-cert-auth")
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd")
    }

    /// The library settings for this cluster (TLS with the test's client certificate).
    pub fn settings(&self) -> Settings {
        Settings {
            endpoints: self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| n.client_url.clone())
                .collect(),
            ca: self.pki.ca.clone(),
            cert: self.pki.client_cert.clone(),
            key: self.pki.client_key.clone(),
            leader_move_wait_secs: 10,
            verify_wait_secs: 15,
            ..Settings::default()
        }
    }

    fn tls(&self) -> TlsOptions {
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.pki.ca).unwrap()))
            .identity(Identity::from_pem(
                std::fs::read(&self.pki.client_cert).unwrap(),
                std::fs::read(&self.pki.client_key).unwrap(),
            ))
    }

    /// A bare etcd-client connected to `urls`.
    pub async fn client(&self, urls: &[String]) -> Client {
        let o = ConnectOptions::new()
            .with_tls(self.tls())
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        Client::connect(urls, Some(o)).await.unwrap()
    }

    /// A client for every running member.
    pub async fn any_client(&self) -> Client {
        let eps = self.settings().endpoints;
        for e in &eps {
            let mut c = self.client(std::slice::from_ref(e)).await;
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await {
                return c;
            }
        }
        panic!("no member answers");
    }

    /// The member ids by name (member list), and the leader's id (from a running member).
    pub async fn ids(&self) -> Vec<(String, u64, bool)> {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let mut c = self.client(std::slice::from_ref(&n.client_url)).await;
            if let Ok(Ok(l)) = tokio::time::timeout(Duration::from_secs(2), c.member_list()).await {
                return l
                    .members()
                    .iter()
                    .map(|m| (m.name().to_string(), m.id(), m.is_learner()))
                    .collect();
            }
        }
        panic!("no member answers the member list");
    }

    /// Forget member `name`'s process (it exits by itself once removed): reaped, and no longer
    /// among the endpoints.
    pub fn forget(&mut self, name: &str) {
        if let Some(i) = self.nodes.iter().position(|n| n.name == name) {
            self.stop(i);
        }
    }

    pub async fn id_of(&self, name: &str) -> u64 {
        self.ids()
            .await
            .into_iter()
            .find(|(n, _, _)| n == name)
            .unwrap()
            .1
    }

    /// The leader as `Status` on the first running member reports it (0: none).
    pub async fn leader(&self) -> u64 {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(mut c) = tokio::time::timeout(
                Duration::from_secs(2),
                self.client(std::slice::from_ref(&n.client_url)),
            )
            .await
            else {
                continue;
            };
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await
                && s.leader() != 0
            {
                return s.leader();
            }
        }
        0
    }

    /// Wait until every running member answers `Status` with a leader.
    pub async fn wait_healthy(&self, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        'outer: loop {
            assert!(
                tokio::time::Instant::now() < until,
                "etcd cluster not healthy within {within:?}; logs in {}",
                self.dir.path().display()
            );
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                let ok = async {
                    let o = ConnectOptions::new()
                        .with_tls(self.tls())
                        .with_connect_timeout(Duration::from_millis(500))
                        .with_timeout(Duration::from_millis(500));
                    let mut c = Client::connect([n.client_url.as_str()], Some(o))
                        .await
                        .ok()?;
                    let s = c.status().await.ok()?;
                    (s.leader() != 0).then_some(())
                };
                if tokio::time::timeout(Duration::from_secs(1), ok)
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'outer;
                }
            }
            return;
        }
    }

    /// Stop member `i` (kill and reap).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Add a learner on `ip` (member add); start it when `start` (and wait until it serves).
    pub async fn add_learner(&mut self, ip: &str, start: bool) -> u64 {
        let ip: IpAddr = ip.parse().unwrap();
        let name = format!("n{}", self.nodes.len() + 1);
        let peer_url = url(ip, free_port(ip));
        let client_url = url(ip, free_port(ip));
        let mut c = self.any_client().await;
        // etcd refuses reconfigurations for 5 s after members connect (strict reconfig check).
        let until = tokio::time::Instant::now() + Duration::from_secs(15);
        let r = loop {
            match c
                .member_add(
                    [peer_url.as_str()],
                    Some(MemberAddOptions::new().with_is_learner()),
                )
                .await
            {
                Ok(r) => break r,
                Err(e)
                    if e.to_string().contains("unhealthy cluster")
                        && tokio::time::Instant::now() < until =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("member add: {e}"),
            }
        };
        let id = r.member().unwrap().id();
        let mut node = Node {
            name: name.clone(),
            ip,
            client_url,
            peer_url,
            child: None,
        };
        if start {
            let mut initial: Vec<String> = r
                .member_list()
                .iter()
                .filter(|m| !m.name().is_empty())
                .map(|m| format!("{}={}", m.name(), m.peer_urls()[0]))
                .collect();
            initial.push(format!("{name}={}", node.peer_url));
            node.child = Some(self.spawn(&node, &initial.join(","), "existing"));
        }
        self.nodes.push(node);
        if start {
            self.wait_healthy(Duration::from_secs(30)).await;
        }
        id
    }
}
