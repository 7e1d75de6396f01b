//! Test fixtures. kubeadm, kubelet and a Kubernetes API server cannot be obtained on the test
//! machines (no Debian, PyPI or npm package ships them), so the tests use:
//!
//! - **recording stand-in binaries**: small shell scripts written into a temporary directory and
//!   configured as the tool paths (`kubeadm`, `systemctl`); each appends its argv to a log file
//!   and is told to fail or block at a step by a file in that directory (the runner clears the
//!   environment, so files, not variables);
//! - **a fake Kubernetes API server** on 127.0.0.1 (a small HTTP/1.1 server in the test) serving
//!   `GET /api/v1/nodes/<name>`: the Node's kubeletVersion flips to the new version once the
//!   stand-in `systemctl restart kubelet` has touched its marker file; it also serves helm's
//!   release files for the verified-download tests;
//! - **a fake [`PackageOps`]** recording its calls (the real apt executor has its own tests).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runos_executors::Ctx;
use runos_executors::handle::{Host, NodeFacts};
use runos_executors::host::runner::{CgroupMode, Runner, RunnerConfig};
use runos_kubeadm::upgrade::OpFuture;
use runos_kubeadm::{KubeSettings, PackageInfo, PackageOps};
use runos_protocol::control::LogLine;
use runos_protocol::{Envelope, Tag};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The stand-ins' directory, their argv log, the fake API server.
pub struct Bench {
    pub dir: tempfile::TempDir,
    pub api: FakeApi,
}

impl Bench {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let api = FakeApi::start(dir.path().to_path_buf()).await;
        let b = Bench { dir, api };
        b.write_standins();
        b
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Create the control file `name` (e.g. `fail-apply`, `block-apply`, `no-flip`).
    pub fn touch(&self, name: &str) {
        std::fs::write(self.path(name), b"").unwrap();
    }

    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }

    /// The recorded invocations, each `program|arg|arg...`.
    pub fn argv(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("argv.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_standins(&self) {
        use std::os::unix::fs::PermissionsExt as _;
        let d = self.dir.path().display();
        let log = format!(
            "{{ printf '%s' \"$(basename \"$0\")\"; for a in \"$@\"; do printf '|%s' \"$a\"; done; echo; }} >> '{d}/argv.log'"
        );
        let kubeadm = format!(
            r#"#!/bin/sh
D='{d}'
{log}
case "$1 $2" in
  "token create")
    if [ -e "$D/fail-token" ]; then cat "$D/fail-token" >&2; exit 1; fi
    cat "$D/join.out" ;;
  "init phase")
    if [ -e "$D/fail-upload-certs" ]; then cat "$D/fail-upload-certs" >&2; exit 1; fi
    cat "$D/certs.out" ;;
  "upgrade apply"|"upgrade node")
    echo "[upgrade] running $1 $2"
    if [ -e "$D/block-upgrade" ]; then touch "$D/upgrade-started"; sleep 60; fi
    if [ -e "$D/fail-upgrade" ]; then echo "[upgrade/apply] FATAL: the stand-in was told to fail" >&2; exit 1; fi
    echo "[upgrade/successful] SUCCESS!" ;;
  *) echo "stand-in kubeadm: unexpected $*" >&2; exit 2 ;;
esac
"#
        );
        let systemctl = format!(
            r#"#!/bin/sh
D='{d}'
{log}
if [ "$1" = restart ] && [ "$2" = kubelet ]; then
  if [ -e "$D/fail-restart" ]; then echo "Job for kubelet.service failed" >&2; exit 1; fi
  touch "$D/kubelet-restarted"
fi
exit 0
"#
        );
        for (name, text) in [("kubeadm", kubeadm), ("systemctl", systemctl)] {
            let p = self.path(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
            self.api.addr
        );
        self.write("kubelet.conf", &kubeconfig);
    }

    /// Settings pointing at the stand-ins and the fake API.
    pub fn settings(&self) -> KubeSettings {
        KubeSettings {
            kubeadm: self.path("kubeadm").display().to_string(),
            systemctl: self.path("systemctl").display().to_string(),
            kubeconfig: self.path("kubelet.conf"),
            admin_kubeconfig: self.path("admin.conf"),
            node_name: "node-a".into(),
            apiserver_manifest: self.path("kube-apiserver.yaml"),
            helm_base_url: format!("http://{}/helm", self.api.addr),
            helm_path: self.path("bin-helm"),
            node_wait_secs: 20,
            node_poll_secs: 1,
            ..KubeSettings::default()
        }
    }
}

/// A context with a real runner (process groups, no cgroups), the settings as its
/// configuration, and a `LOG` channel.
pub fn ctx(settings: &KubeSettings, within: Duration) -> (Ctx, mpsc::Receiver<Envelope>) {
    let (tx, rx) = mpsc::channel(10_000);
    let runner = Runner::new(RunnerConfig {
        cgroup: CgroupMode::Off,
        ..RunnerConfig::default()
    });
    let host = Host {
        runner: Arc::new(runner),
        tools: Default::default(),
        facts: NodeFacts {
            hostname: || "node-a".to_string(),
            ..NodeFacts::default()
        },
    };
    let ctx = Ctx::new(
        Tag::random(),
        tokio::time::Instant::now() + within,
        Arc::new(host),
        Some(tx),
    )
    .with_config(Arc::new(serde_json::to_value(settings).unwrap()));
    (ctx, rx)
}

/// The `LOG` messages sent so far.
pub fn logs(rx: &mut mpsc::Receiver<Envelope>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(env) = rx.try_recv() {
        if let Ok(l) = env.payload::<LogLine>() {
            out.push(l.message);
        }
    }
    out
}

/// Wait until `cond` holds, at most `within`.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// The fake Kubernetes API server (and file server for helm).
pub struct FakeApi {
    pub addr: std::net::SocketAddr,
    pub files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    pub old_version: Arc<Mutex<String>>,
    pub new_version: Arc<Mutex<String>>,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    async fn start(dir: PathBuf) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let files: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
        let old_version = Arc::new(Mutex::new("v1.29.6".to_string()));
        let new_version = Arc::new(Mutex::new("v1.30.2".to_string()));
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (f, o, n, r) = (
            files.clone(),
            old_version.clone(),
            new_version.clone(),
            requests.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (f, o, n, r, dir) = (f.clone(), o.clone(), n.clone(), r.clone(), dir.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let line = head.lines().next().unwrap_or("").to_string();
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    r.lock().unwrap().push(line.clone());
                    let (status, ctype, body) = respond(&path, &dir, &f, &o, &n);
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(&body).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        FakeApi {
            addr,
            files,
            old_version,
            new_version,
            requests,
        }
    }
}

fn respond(
    path: &str,
    dir: &Path,
    files: &Mutex<BTreeMap<String, Vec<u8>>>,
    old: &Mutex<String>,
    new: &Mutex<String>,
) -> (&'static str, &'static str, Vec<u8>) {
    let path = path.split('?').next().unwrap_or("");
    if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
        if name != "node-a" {
            return not_found(name);
        }
        let flipped = dir.join("kubelet-restarted").exists() && !dir.join("no-flip").exists();
        let version = if flipped {
            new.lock().unwrap().clone()
        } else {
            old.lock().unwrap().clone()
        };
        let node = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name},
            "status": {
                "nodeInfo": {
                    "kubeletVersion": version,
                    "architecture": "amd64", "bootID": "", "containerRuntimeVersion": "",
                    "kernelVersion": "", "kubeProxyVersion": "", "machineID": "",
                    "operatingSystem": "linux", "osImage": "", "systemUUID": ""
                },
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        });
        return ("200 OK", "application/json", node.to_string().into_bytes());
    }
    if let Some(name) = path.strip_prefix("/helm/") {
        if let Some(b) = files.lock().unwrap().get(name) {
            return ("200 OK", "application/octet-stream", b.clone());
        }
    }
    not_found(path)
}

fn not_found(what: &str) -> (&'static str, &'static str, Vec<u8>) {
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404
    });
    (
        "404 Not Found",
        "application/json",
        status.to_string().into_bytes(),
    )
}

/// A fake package database recording its calls.
#[derive(Default)]
pub struct FakePackages {
    pub db: Mutex<BTreeMap<String, PackageInfo>>,
    pub calls: Mutex<Vec<String>>,
    /// `install_exact` of this package fails.
    pub fail_install: Mutex<Option<String>>,
}

impl FakePackages {
    pub fn with(pkgs: &[(&str, &str, bool)]) -> Arc<Self> {
        let me = FakePackages::default();
        for (n, v, held) in pkgs {
            me.db.lock().unwrap().insert(
                n.to_string(),
                PackageInfo {
                    name: n.to_string(),
                    version: Some(v.to_string()),
                    held: *held,
                },
            );
        }
        Arc::new(me)
    }

    pub fn held(&self, name: &str) -> bool {
        self.db.lock().unwrap().get(name).is_some_and(|i| i.held)
    }

    pub fn version(&self, name: &str) -> Option<String> {
        self.db
            .lock()
            .unwrap()
            .get(name)
            .and_then(|i| i.version.clone())
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl PackageOps for FakePackages {
    fn query<'a>(&'a self, _ctx: &'a Ctx, names: &'a [String]) -> OpFuture<'a, Vec<PackageInfo>> {
        Box::pin(async move {
            let db = self.db.lock().unwrap();
            Ok(names
                .iter()
                .map(|n| {
                    db.get(n).cloned().unwrap_or(PackageInfo {
                        name: n.clone(),
                        version: None,
                        held: false,
                    })
                })
                .collect())
        })
    }

    fn set_hold<'a>(&'a self, _ctx: &'a Ctx, names: &'a [String], hold: bool) -> OpFuture<'a, ()> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(format!(
                "{} {}",
                if hold { "hold" } else { "unhold" },
                names.join(" ")
            ));
            let mut db = self.db.lock().unwrap();
            for n in names {
                db.entry(n.clone())
                    .or_insert_with(|| PackageInfo {
                        name: n.clone(),
                        ..PackageInfo::default()
                    })
                    .held = hold;
            }
            Ok(())
        })
    }

    fn install_exact<'a>(
        &'a self,
        _ctx: &'a Ctx,
        name: &'a str,
        debian_version: &'a str,
    ) -> OpFuture<'a, ()> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push(format!("install {name}={debian_version}"));
            if self.fail_install.lock().unwrap().as_deref() == Some(name) {
                return Err(format!("E: the fake was told to fail installing {name}"));
            }
            let mut db = self.db.lock().unwrap();
            let e = db.entry(name.to_string()).or_insert_with(|| PackageInfo {
                name: name.to_string(),
                ..PackageInfo::default()
            });
            if e.held {
                return Err(format!("{name} is held"));
            }
            e.version = Some(debian_version.to_string());
            Ok(())
        })
    }

    fn resolve_version<'a>(
        &'a self,
        _ctx: &'a Ctx,
        name: &'a str,
        upstream: &'a str,
    ) -> OpFuture<'a, String> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push(format!("resolve {name} {upstream}"));
            Ok(format!("{upstream}-1.1"))
        })
    }

    fn check_repository<'a>(&'a self, _ctx: &'a Ctx, name: &'a str) -> OpFuture<'a, ()> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(format!("check {name}"));
            Ok(())
        })
    }
}
