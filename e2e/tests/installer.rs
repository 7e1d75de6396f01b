//! The curl-pipe installer (`installer/install.sh`), end to end: the script is fed to `sh -s --`
//! on standard input, as `curl … | sh -s -- …` does, and downloads the real, freshly built `runos`
//! binary from a local HTTPS release server (loopback, ephemeral port, a CA made here and trusted
//! through `CURL_CA_BUNDLE`). A real control plane issues the enrolment token. Every path the
//! installer writes is under `RUNOS_INSTALL_ROOT`, so no root and no systemd are needed; systemd is
//! simulated by `$RUNOS_INSTALL_ROOT/run/systemd/system` and a fake `systemctl` on `PATH`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use runos_e2e::release::{ReleaseServer, asset, sha256_hex};
use runos_e2e::{ControlPlane, DEADLINE, bin, wait_exit};

/// The installer under test.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../installer/install.sh")
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The version the built agent reports, as a release tag (`v0.1.0`).
fn agent_tag() -> String {
    let out = Command::new(bin("runos"))
        .args(["version", "--json"])
        .output()
        .unwrap_or_else(|e| panic!("runos version: {e}"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    format!("v{}", v["agentVersion"].as_str().unwrap())
}

// --- running the installer -----------------------------------------------------------------

/// What one run of the installer did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn text(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    fn expect(&self, code: i32) -> &Run {
        assert_eq!(self.code, Some(code), "{}", self.text());
        if code != 0 {
            assert!(
                self.stderr.contains("runos-install: error: "),
                "a failure says so: {}",
                self.text()
            );
        }
        self
    }
}

/// A machine to install on: the install root, a TMPDIR that must be left empty, scratch space.
struct Machine {
    root: PathBuf,
    tmpdir: PathBuf,
    scratch: PathBuf,
    path: String,
    runs: usize,
}

impl Machine {
    fn new(dir: &Path) -> Machine {
        let (root, tmpdir, scratch) = (dir.join("root"), dir.join("tmp"), dir.join("scratch"));
        for d in [&tmpdir, &scratch] {
            fs::create_dir_all(d).unwrap();
        }
        Machine {
            root,
            tmpdir,
            scratch,
            path: std::env::var("PATH").unwrap_or_default(),
            runs: 0,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn link(&self) -> PathBuf {
        self.p("usr/local/bin/runos")
    }

    fn vbin(&self, tag: &str) -> PathBuf {
        self.p(&format!("usr/local/lib/runos/{tag}/runos"))
    }

    fn config(&self) -> PathBuf {
        self.p("etc/runos/config.toml")
    }

    fn unit(&self) -> PathBuf {
        self.p("etc/systemd/system/runos.service")
    }

    /// Put `dir` first on the `PATH` the installer sees.
    fn prepend_path(&mut self, dir: &Path) {
        self.path = format!("{}:{}", dir.display(), self.path);
    }

    /// Run `sh -s -- ARGS` with the installer on standard input (as `curl … | sh -s -- …`).
    fn install(&mut self, srv: &ReleaseServer, args: &[&str], env: &[(&str, &str)]) -> Run {
        let script = fs::read(script()).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-s", "--"]).args(args);
        let run = self.run(cmd, srv, env, Some(&script));
        // The installer's private temporary directory is gone, whatever happened.
        let left: Vec<_> = fs::read_dir(&self.tmpdir).unwrap().collect();
        assert!(
            left.is_empty(),
            "TMPDIR not cleaned: {left:?}\n{}",
            run.text()
        );
        run
    }

    /// Run `sh installer/install.sh ARGS` (the script as a file).
    fn install_file(&mut self, srv: Option<&ReleaseServer>, args: &[&str]) -> Run {
        let mut cmd = Command::new("sh");
        cmd.arg(script()).args(args);
        self.run_opt(cmd, srv, &[], None)
    }

    fn run(
        &mut self,
        cmd: Command,
        srv: &ReleaseServer,
        env: &[(&str, &str)],
        stdin: Option<&[u8]>,
    ) -> Run {
        self.run_opt(cmd, Some(srv), env, stdin)
    }

    fn run_opt(
        &mut self,
        mut cmd: Command,
        srv: Option<&ReleaseServer>,
        env: &[(&str, &str)],
        stdin: Option<&[u8]>,
    ) -> Run {
        self.runs += 1;
        let out = self.scratch.join(format!("run{}.out", self.runs));
        let err = self.scratch.join(format!("run{}.err", self.runs));
        for var in [
            "https_proxy",
            "HTTPS_PROXY",
            "http_proxy",
            "HTTP_PROXY",
            "all_proxy",
            "ALL_PROXY",
            "RUNOS_CONFIG",
            "RUNOS_REPO",
            "RUNOS_LOG",
            "NOTIFY_SOCKET",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("RUNOS_INSTALL_ROOT", &self.root)
            .env("TMPDIR", &self.tmpdir)
            .env("PATH", &self.path)
            .env("no_proxy", "*")
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        if let Some(srv) = srv {
            cmd.env("CURL_CA_BUNDLE", &srv.ca_file);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn sh: {e}"));
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(bytes).unwrap();
        }
        let status = wait_exit(&mut child, Duration::from_secs(180), "install.sh");
        Run {
            code: status.code(),
            stdout: fs::read_to_string(out).unwrap(),
            stderr: fs::read_to_string(err).unwrap(),
        }
    }

    /// `runos certificate status --json` through the installed symlink: (exit code, node id).
    fn certificate(&self) -> (Option<i32>, Option<String>) {
        let out = Command::new(self.link())
            .arg("--config")
            .arg(self.config())
            .args(["certificate", "status", "--json"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("runos certificate status: {e}"));
        let node = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["nodeId"].as_str().map(str::to_string));
        (out.status.code(), node)
    }

    /// Every file under the install root with its bytes (symlinks as their target).
    fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for e in entries {
                let p = e.unwrap().path();
                let md = fs::symlink_metadata(&p).unwrap();
                if md.file_type().is_symlink() {
                    let t = fs::read_link(&p).unwrap();
                    out.push((p, t.into_os_string().into_encoded_bytes()));
                } else if md.is_dir() {
                    walk(&p, out);
                } else {
                    out.push((p.clone(), fs::read(&p).unwrap()));
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out.sort();
        out
    }

    /// Names of the files the installer itself creates (the agent's state aside).
    fn installed_names(&self) -> BTreeSet<String> {
        self.snapshot()
            .into_iter()
            .map(|(p, _)| p.strip_prefix(&self.root).unwrap().display().to_string())
            .filter(|n| !n.starts_with("var/") && !n.starts_with("run/"))
            .collect()
    }
}

/// A token file (0600) holding `token`.
fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("{token}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Borrow a list of owned arguments.
fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A child process killed when dropped (a started agent).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The files the installer writes for `tag` (and nothing else outside the agent's state).
fn expected_names(tag: &str) -> BTreeSet<String> {
    [
        "usr/local/bin/runos".to_string(),
        format!("usr/local/lib/runos/{tag}/runos"),
        "etc/runos/config.toml".into(),
        "etc/systemd/system/runos.service".into(),
        // Written by `runos register`.
        "etc/runos/node.key".into(),
        "etc/runos/node.crt".into(),
        "etc/runos/ca.pem".into(),
        "etc/runos/l1sec-ca.pem".into(),
    ]
    .into_iter()
    .collect()
}

// --- the tests ------------------------------------------------------------------------------

#[test]
fn installs_registers_reruns_idempotently_and_refuses_bad_releases() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let srv = ReleaseServer::start(&tmp.path().join("release"));
    let mut m = Machine::new(tmp.path());
    let tag = agent_tag();
    let binary = fs::read(bin("runos")).unwrap();
    let digest = sha256_hex(&binary);
    srv.publish(&tag, &binary);
    let secrets = tmp.path().join("secrets");
    fs::create_dir_all(&secrets).unwrap();
    let server = format!("127.0.0.1:{}", cp.endpoints.l1.port());
    let l2 = cp.endpoints.l2.port().to_string();
    let ca = cp.ca_file().display().to_string();
    let base = srv.base();
    let bin_path = format!("/download/{tag}/{}", asset());
    let sums_path = format!("/download/{tag}/checksums.txt");

    // An unknown token (well-formed, right CA pin): the agent is installed, registration is
    // refused and the installer says so with its own exit code.
    let (_, pin) = cp.token("10m");
    let bogus = token_file(
        &secrets,
        "bogus",
        &format!("runos1.{pin}.{}", "0".repeat(64)),
    );
    let bogus = bogus.display().to_string();
    let args = |token: &str| -> Vec<String> {
        [
            "--version",
            &tag,
            "--server",
            &server,
            "--l2-port",
            &l2,
            "--ca-file",
            &ca,
            "--token-file",
            token,
            "--base",
            &base,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = m.install(&srv, &refs(&args(&bogus)), &[]);
    run.expect(6);
    assert!(
        run.stderr.contains("runos register failed with exit 5"),
        "{}",
        run.text()
    );
    assert_eq!(m.certificate().0, Some(3), "not registered");
    assert!(cp.nodes().is_empty());

    // The real install.
    let (token, _) = cp.token("10m");
    let secret = token.rsplit('.').next().unwrap().to_string();
    let good = token_file(&secrets, "token", &token).display().to_string();
    let run = m.install(&srv, &refs(&args(&good)), &[]);
    run.expect(0);
    let nodes = cp.nodes();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let node = nodes[0]["id"].as_str().unwrap().to_string();
    assert!(
        run.stdout
            .contains(&format!("runos {tag} installed: {}", m.link().display())),
        "{}",
        run.text()
    );
    assert!(
        run.stdout.contains(&format!("registered as node {node}")),
        "{}",
        run.text()
    );
    // The binary, side by side under its version, and the symlink to it.
    let vbin = m.vbin(&tag);
    assert_eq!(fs::read(&vbin).unwrap(), binary);
    assert_eq!(mode(&vbin), 0o755);
    assert_eq!(fs::read_link(m.link()).unwrap(), vbin);
    // The configuration points every path under the root; register filled in [server].
    let config = fs::read_to_string(m.config()).unwrap();
    assert_eq!(mode(&m.config()), 0o600);
    for key in [
        format!("key = \"{}\"", m.p("etc/runos/node.key").display()),
        format!("state_dir = \"{}\"", m.p("var/lib/runos").display()),
        format!("run_dir = \"{}\"", m.p("run/runos").display()),
        "host = \"127.0.0.1\"".to_string(),
        format!("l2_port = {l2}"),
    ] {
        assert!(config.contains(&key), "{key} missing from:\n{config}");
    }
    // The unit.
    let unit = fs::read_to_string(m.unit()).unwrap();
    let exec = format!(
        "ExecStart={} --config {} agent",
        m.link().display(),
        m.config().display()
    );
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "KillMode=mixed",
        "Delegate=yes",
        "Restart=always",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WantedBy=multi-user.target",
        exec.as_str(),
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line} missing from:\n{unit}"
        );
    }
    assert_eq!(m.certificate(), (Some(0), Some(node.clone())), "registered");
    assert_eq!(m.installed_names(), expected_names(&tag));
    // The token never shows: not in the output, not in any file under the root.
    for (path, bytes) in m.snapshot() {
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&secret),
            "token in {}",
            path.display()
        );
    }
    assert!(!run.stdout.contains(&secret) && !run.stderr.contains(&secret));

    // No systemd here: it says how to start the agent, and that command works.
    let start = format!(
        "    {} --config {} agent",
        m.link().display(),
        m.config().display()
    );
    assert!(
        run.stdout.contains("systemd is not running here") && run.stdout.contains(&start),
        "{}",
        run.text()
    );
    let argv: Vec<&str> = start.split_whitespace().collect();
    let log = fs::File::create(tmp.path().join("agent.log")).unwrap();
    let mut agent = KillOnDrop(
        Command::new(argv[0])
            .args(&argv[1..])
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    cp.wait_online(&node);
    runos_e2e::signal(agent.0.id(), rustix::process::Signal::TERM);
    let status = wait_exit(&mut agent.0, DEADLINE, "the installed agent after SIGTERM");
    assert!(status.success(), "agent exit {status:?}");

    // Re-run, with the binary pinned: nothing changes, the binary is not fetched again, the used
    // token is not sent again.
    let before = m.snapshot();
    let (bin_hits, sums_hits) = (srv.hits(&bin_path), srv.hits(&sums_path));
    let mut rerun = args(&good);
    rerun.extend(["--sha256".to_string(), digest.to_uppercase()]);
    let run = m.install(&srv, &refs(&rerun), &[]);
    run.expect(0);
    assert!(run.stderr.contains("already registered"), "{}", run.text());
    assert!(
        run.stdout
            .contains(&format!("node {node} (already registered)")),
        "{}",
        run.text()
    );
    assert_eq!(srv.hits(&bin_path), bin_hits, "binary downloaded again");
    assert_eq!(srv.hits(&sums_path), sums_hits + 1);
    let after = m.snapshot();
    let (var, run_dir) = (m.p("var"), m.p("run"));
    let installer_files = |s: &[(PathBuf, Vec<u8>)]| {
        s.iter()
            .filter(|(p, _)| !p.starts_with(&var) && !p.starts_with(&run_dir))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(installer_files(&after), installer_files(&before));
    assert_eq!(cp.nodes().len(), 1);
    assert_eq!(m.certificate(), (Some(0), Some(node.clone())));

    // Refusals leave the installed version exactly as it is.
    let refuse = |m: &mut Machine, version: &str, extra: &[&str], code: i32, why: &str| {
        let mut a = args(&good);
        a[1] = version.to_string();
        a.extend(extra.iter().map(|s| s.to_string()));
        let run = m.install(&srv, &refs(&a), &[]);
        run.expect(code);
        assert!(run.stderr.contains(why), "{why}: {}", run.text());
        if code == 5 {
            assert!(run.stderr.contains("nothing was changed"), "{}", run.text());
        }
        assert_eq!(
            installer_files(&m.snapshot()),
            installer_files(&after),
            "{version} changed the install"
        );
        run
    };

    // A wrong --sha256: refused before the binary is even downloaded.
    srv.publish("v9.9.9", &binary);
    let wrong = "ab".repeat(32);
    refuse(&mut m, "v9.9.9", &["--sha256", &wrong], 5, "does not match");
    assert_eq!(srv.hits(&format!("/download/v9.9.9/{}", asset())), 0);

    // A tampered binary: it no longer matches checksums.txt.
    let mut tampered = binary.clone();
    tampered.extend_from_slice(b"\0evil");
    srv.publish_raw("v9.9.8", &tampered, &ReleaseServer::checksums(&binary));
    refuse(&mut m, "v9.9.8", &[], 5, "checksum mismatch");
    assert_eq!(srv.hits(&format!("/download/v9.9.8/{}", asset())), 1);

    // A binary whose version is not the release's.
    srv.publish("v9.9.7", &binary);
    refuse(&mut m, "v9.9.7", &[], 5, "reports version");

    // A checksums.txt with two entries for the asset, or one in another format.
    let sums = ReleaseServer::checksums(&binary);
    srv.publish_raw("v9.9.5", &binary, &format!("{sums}{sums}"));
    refuse(&mut m, "v9.9.5", &[], 5, "has 2 entries");
    srv.publish_raw(
        "v9.9.4",
        &binary,
        &format!("{}  ./{}\n", sha256_hex(&binary), asset()),
    );
    refuse(&mut m, "v9.9.4", &[], 5, "has 0 entries");
    srv.publish_raw(
        "v9.9.3",
        &binary,
        &format!("{} *{}\n", sha256_hex(&binary), asset()),
    );
    refuse(&mut m, "v9.9.3", &[], 5, "not in sha256sum format");

    // A version that was never released.
    refuse(&mut m, "v8.0.0", &[], 4, "cannot download");
    assert!(
        !m.p("usr/local/lib/runos")
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().file_name() != tag.as_str()),
        "only {tag} is installed"
    );
}

#[test]
fn drives_systemd_when_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let srv = ReleaseServer::start(&tmp.path().join("release"));
    let mut m = Machine::new(tmp.path());
    let tag = agent_tag();
    let binary = fs::read(bin("runos")).unwrap();
    srv.publish(&tag, &binary);

    // systemd "runs": its directory exists under the root, and a fake systemctl records calls.
    fs::create_dir_all(m.p("run/systemd/system")).unwrap();
    let fake = tmp.path().join("fakebin");
    fs::create_dir_all(&fake).unwrap();
    let calls = tmp.path().join("systemctl.log");
    fs::write(
        fake.join("systemctl"),
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\n\
             [ \"$1\" != \"${{FAKE_SYSTEMCTL_FAIL:-}}\" ]\n",
            calls.display()
        ),
    )
    .unwrap();
    fs::set_permissions(fake.join("systemctl"), fs::Permissions::from_mode(0o755)).unwrap();
    m.prepend_path(&fake);
    let calls_so_far = || runos_e2e::file_lines(&calls);

    let (token, _) = cp.token("10m");
    let good = token_file(tmp.path(), "token", &token)
        .display()
        .to_string();
    let server = format!("127.0.0.1:{}", cp.endpoints.l1.port());
    let l2 = cp.endpoints.l2.port().to_string();
    let ca = cp.ca_file().display().to_string();
    let base = srv.base();
    let common = ["--version", &tag, "--base", &base];

    // First install: the service is enabled and (re)started.
    let mut first = common.to_vec();
    first.extend([
        "--server",
        &server,
        "--l2-port",
        &l2,
        "--ca-file",
        &ca,
        "--token-file",
        &good,
    ]);
    let run = m.install(&srv, &first, &[]);
    run.expect(0);
    assert_eq!(
        calls_so_far(),
        ["daemon-reload", "enable runos", "restart runos"]
    );
    assert!(
        run.stdout.contains("enabled and running") && !run.stdout.contains("start the agent with"),
        "{}",
        run.text()
    );
    assert_eq!(cp.nodes().len(), 1);

    // Same version again, without --server/--token-file (the node is registered): started if
    // stopped, not restarted.
    m.install(&srv, &common, &[]).expect(0);
    assert_eq!(
        calls_so_far()[3..],
        ["daemon-reload", "enable runos", "start runos"]
    );

    // The installed binary was damaged: it is fetched again, replaced, and the service restarted.
    let bin_path = format!("/download/{tag}/{}", asset());
    let hits = srv.hits(&bin_path);
    fs::write(m.vbin(&tag), b"damaged").unwrap();
    let run = m.install(&srv, &common, &[]);
    run.expect(0);
    assert!(
        run.stderr.contains("does not match the release"),
        "{}",
        run.text()
    );
    assert_eq!(srv.hits(&bin_path), hits + 1);
    assert_eq!(fs::read(m.vbin(&tag)).unwrap(), binary);
    assert_eq!(
        calls_so_far()[6..],
        ["daemon-reload", "enable runos", "restart runos"]
    );

    // --no-start: systemctl is not touched.
    let mut no_start = common.to_vec();
    no_start.push("--no-start");
    let run = m.install(&srv, &no_start, &[]);
    run.expect(0);
    assert_eq!(calls_so_far().len(), 9);
    assert!(
        run.stdout.contains("not started (--no-start)"),
        "{}",
        run.text()
    );

    // systemctl failing: its own exit code.
    let run = m.install(&srv, &common, &[("FAKE_SYSTEMCTL_FAIL", "start")]);
    run.expect(7);
    assert!(
        run.stderr.contains("systemctl start runos failed"),
        "{}",
        run.text()
    );
    assert_eq!(cp.nodes().len(), 1, "still one node");
}

#[test]
fn refuses_bad_command_lines_and_machines() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = Machine::new(tmp.path());
    let token = token_file(tmp.path(), "token", "runos1.not-a-real-token");
    let token = token.display().to_string();
    let secret = "s3cr3t-t0ken-value";
    let ok = [
        "--server",
        "127.0.0.1",
        "--token-file",
        token.as_str(),
        "--base",
        "https://127.0.0.1:1",
    ];
    let with = |version: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec!["--version".to_string(), version.to_string()];
        v.extend(ok.iter().map(|s| s.to_string()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    for bad in [
        "1.2.3",
        "v1.2",
        "v1.2.3.4",
        "v1.2.3-rc.1",
        "v01.2.3",
        "v1.02.3",
        "V1.2.3",
        "latest",
        " v1.2.3",
        "v1.2.3\nv1.2.4",
        "v1.2.3/../../x",
    ] {
        let run = m.install_file(None, &refs(&with(bad, &[])));
        run.expect(2);
        assert!(
            run.stderr.contains("vMAJOR.MINOR.PATCH"),
            "{bad:?}: {}",
            run.text()
        );
    }
    let usage = [
        (
            vec!["--server".to_string(), "127.0.0.1".to_string()],
            "--version",
        ),
        (with("v1.2.3", &["--token", secret]), "--token-file"),
        (with("v1.2.3", &[secret]), "not shown"),
        (
            with("v1.2.3", &[&format!("--tokn={secret}")]),
            "unknown flag --tokn",
        ),
        (with("v1.2.3", &["--sha256", "abc"]), "--sha256"),
        (with("v1.2.3", &["--ca-sha256", "xyz"]), "--ca-sha256"),
        (
            with("v1.2.3", &["--base", "http://example.com"]),
            "https://",
        ),
        (with("v1.2.3", &["--server", "cp:0"]), "port"),
        (with("v1.2.3", &["--l2-port", "65536"]), "--l2-port"),
        (
            vec![
                "--version".into(),
                "v1.2.3".into(),
                "--server".into(),
                "127.0.0.1".into(),
            ],
            "--token-file",
        ),
        (
            vec![
                "--version".into(),
                "v1.2.3".into(),
                "--base".into(),
                "https://127.0.0.1:1".into(),
            ],
            "not registered yet",
        ),
        (
            with("v1.2.3", &[])
                .into_iter()
                .map(|a| {
                    if a == token {
                        "/nonexistent/token".into()
                    } else {
                        a
                    }
                })
                .collect(),
            "cannot read the token file",
        ),
    ];
    for (args, why) in usage {
        let run = m.install_file(None, &refs(&args));
        run.expect(2);
        assert!(run.stderr.contains(why), "{why}: {}", run.text());
        assert!(
            !run.stderr.contains(secret) && !run.stdout.contains(secret),
            "the secret was echoed: {}",
            run.text()
        );
    }

    // An unknown CPU, and not Linux.
    let fake = tmp.path().join("fakebin");
    fs::create_dir_all(&fake).unwrap();
    fs::write(
        fake.join("uname"),
        "#!/bin/sh\ncase \"$1\" in -s) echo \"${FAKE_OS:-Linux}\" ;; -m) echo riscv64 ;; esac\n",
    )
    .unwrap();
    fs::set_permissions(fake.join("uname"), fs::Permissions::from_mode(0o755)).unwrap();
    m.prepend_path(&fake);
    let run = m.install_file(None, &refs(&with("v1.2.3", &[])));
    run.expect(3);
    assert!(run.stderr.contains("riscv64"), "{}", run.text());
    let mut cmd = Command::new("sh");
    cmd.arg(script()).args(refs(&with("v1.2.3", &[])));
    cmd.env("FAKE_OS", "Darwin");
    let run = m.run_opt(cmd, None, &[], None);
    run.expect(3);
    assert!(run.stderr.contains("Linux only"), "{}", run.text());

    // --help prints the flags and the exit codes and changes nothing.
    let run = m.install_file(None, &["--help"]);
    run.expect(0);
    for flag in ["--version", "--sha256", "--token-file", "Exit codes:"] {
        assert!(run.stdout.contains(flag), "{flag}: {}", run.text());
    }
    assert!(
        !m.root.exists(),
        "nothing may be written: {:?}",
        m.snapshot()
    );
}

#[test]
fn the_installer_is_posix_sh_and_shellcheck_clean() {
    let out = Command::new("sh").arg("-n").arg(script()).output().unwrap();
    assert!(out.status.success(), "sh -n: {}", runos_e2e::describe(&out));
    match Command::new("shellcheck")
        .args(["-s", "sh"])
        .arg(script())
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck -s sh installer/install.sh: {}",
            runos_e2e::describe(&out)
        ),
        Err(e) => println!(
            "SKIP shellcheck: not installed ({e}); scripts/test.sh installs it when run as root"
        ),
    }
}
