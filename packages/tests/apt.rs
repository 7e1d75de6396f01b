//! The apt executor against the real apt and dpkg of this machine (root only; skipped with a
//! printed reason otherwise).
//!
//! The test builds small `.deb` packages with `dpkg-deb` (`runostest-hello` in three versions,
//! with a conffile; `runostest-fail`, whose `postinst` fails), writes a flat `file:` repository
//! (its `Packages` index written here), and points apt only at it through
//! `Settings::apt_options` (its own sources list, empty parts directory, lists and cache
//! directories), so the host's sources and lists are untouched. The packages do go into the
//! machine's dpkg database (there is no other): their names cannot clash, and a drop guard
//! purges them at the end, failed or not. dpkg has one global lock, so everything runs as the
//! steps of one test.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use runos_executors::Ctx;
use runos_executors::handle::Host;
use runos_executors::host::runner::{Runner, RunnerConfig};
use runos_packages::{
    Apt, GetPackages, InstallPackages, PackageName, PackageSpec, PackageState, RemovePackages,
    Settings,
};
use runos_protocol::control::LogLine;
use runos_protocol::{Envelope, ErrorCode, Tag};
use sha2::Digest as _;
use tokio::sync::mpsc;

const HELLO: &str = "runostest-hello";
const FAIL: &str = "runostest-fail";
/// Depends on [`HELLO`].
const DEP: &str = "runostest-dep";
/// Conflicts with [`HELLO`].
const CONFLICT: &str = "runostest-conflict";

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Purges the test packages when dropped (and ends the lock holder, if any).
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("apt-mark")
            .args(["unhold", HELLO, FAIL, DEP, CONFLICT])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("dpkg")
            .args([
                "--force-hold",
                "--force-remove-reinstreq",
                "--purge",
                DEP,
                CONFLICT,
                HELLO,
                FAIL,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn build_deb(
    root: &Path,
    out: &Path,
    name: &str,
    version: &str,
    postinst_fails: bool,
    relations: &str,
) -> PathBuf {
    let dir = root.join(format!("{name}_{version}"));
    std::fs::create_dir_all(dir.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(dir.join(format!("usr/share/{name}"))).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join(format!("usr/share/{name}/version")), version).unwrap();
    std::fs::write(dir.join(format!("etc/{name}.conf")), "setting = 1\n").unwrap();
    std::fs::write(dir.join("DEBIAN/conffiles"), format!("/etc/{name}.conf\n")).unwrap();
    let control = format!(
        "Package: {name}\nVersion: {version}\nArchitecture: all\n{relations}Maintainer: runos tests <tests@runos.invalid>\nPriority: optional\nSection: misc\nDescription: runos test package\n A package of the runos apt executor's tests.\n"
    );
    std::fs::write(dir.join("DEBIAN/control"), &control).unwrap();
    if postinst_fails {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join("DEBIAN/postinst");
        std::fs::write(
            &p,
            "#!/bin/sh\necho \"runostest postinst fails on purpose\" >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let deb = out.join(format!("{name}_{version}_all.deb"));
    let st = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&dir)
        .arg(&deb)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "dpkg-deb --build");
    deb
}

/// The repository's `Packages` stanza of `deb` (its control fields plus where and what it is).
fn stanza(deb: &Path) -> String {
    let control = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .output()
        .unwrap();
    assert!(control.status.success());
    let data = std::fs::read(deb).unwrap();
    format!(
        "{}\nFilename: ./{}\nSize: {}\nSHA256: {}\n",
        String::from_utf8(control.stdout).unwrap().trim_end(),
        deb.file_name().unwrap().to_string_lossy(),
        data.len(),
        hex(&sha2::Sha256::digest(&data))
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Env {
    _tmp: tempfile::TempDir,
    settings: Settings,
}

fn repository() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let repo = t.join("repo");
    for d in [
        "repo",
        "build",
        "parts",
        "lists/partial",
        "cache/archives/partial",
        "state",
    ] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    let mut stanzas = Vec::new();
    for v in ["1.0-1", "1.1-1", "2.0-1"] {
        stanzas.push(stanza(&build_deb(
            &t.join("build"),
            &repo,
            HELLO,
            v,
            false,
            "",
        )));
    }
    stanzas.push(stanza(&build_deb(
        &t.join("build"),
        &repo,
        FAIL,
        "1.0-1",
        true,
        "",
    )));
    for (name, relations) in [
        (DEP, format!("Depends: {HELLO}\n")),
        (CONFLICT, format!("Conflicts: {HELLO}\n")),
    ] {
        stanzas.push(stanza(&build_deb(
            &t.join("build"),
            &repo,
            name,
            "1.0-1",
            false,
            &relations,
        )));
    }
    std::fs::write(repo.join("Packages"), stanzas.join("\n")).unwrap();
    std::fs::write(
        t.join("sources.list"),
        format!("deb [trusted=yes] file:{} ./\n", repo.display()),
    )
    .unwrap();
    let settings = Settings {
        apt_options: vec![
            format!("Dir::Etc::SourceList={}", t.join("sources.list").display()),
            format!("Dir::Etc::SourceParts={}", t.join("parts").display()),
            format!("Dir::State::Lists={}", t.join("lists").display()),
            format!("Dir::Cache={}", t.join("cache").display()),
        ],
        state_dir: t.join("state/packages"),
        lock_timeout: Duration::from_secs(30),
        ..Settings::default()
    };
    Env {
        _tmp: tmp,
        settings,
    }
}

fn ctx(logs: Option<mpsc::Sender<Envelope>>) -> Ctx {
    let host = Host {
        runner: Arc::new(Runner::new(RunnerConfig::default())),
        ..Host::default()
    };
    Ctx::new(
        Tag::random(),
        tokio::time::Instant::now() + Duration::from_secs(300),
        Arc::new(host),
        logs,
    )
}

fn install(name: &str, version: Option<&str>) -> InstallPackages {
    InstallPackages {
        packages: vec![PackageSpec {
            name: name.into(),
            version: version.map(str::to_string),
        }],
        hold: false,
        unhold: false,
        update_index: false,
    }
}

fn one(p: &[PackageState]) -> &PackageState {
    assert_eq!(p.len(), 1, "{p:?}");
    &p[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apt_executor_against_real_apt() {
    if !is_root() {
        eprintln!("skipped: the apt tests change the dpkg database and need root");
        return;
    }
    for tool in ["apt-get", "dpkg-deb", "dpkg-query", "apt-mark", "apt-cache"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed");
            return;
        }
    }
    let _cleanup = Cleanup;
    drop(Cleanup); // start from a clean state if an earlier run was killed
    let env = repository();
    let apt = Apt::new(env.settings.clone());

    // Install an exact version, updating the (test's own) index first; progress is LOG lines.
    let (tx, mut rx) = mpsc::channel(1000);
    let c = ctx(Some(tx));
    let mut req = install(HELLO, Some("1.0-1"));
    req.update_index = true;
    let r = apt.install(&c, req).await.unwrap();
    let p = one(&r.packages);
    assert_eq!(
        (p.version.as_str(), p.status.as_str()),
        ("1.0-1", "installed")
    );
    assert!(p.changed && r.changed && !p.held);
    let mut logs = Vec::new();
    while let Ok(env) = rx.try_recv() {
        logs.push(env.payload::<LogLine>().unwrap().message);
    }
    assert!(
        logs.iter().any(|l| l.contains('%') && l.contains(HELLO)),
        "{logs:?}"
    );
    assert_eq!(apt.recorded().unwrap(), [HELLO]);

    let c = ctx(None);
    // Idempotent: nothing runs but the query.
    let r = apt
        .install(&c, install(HELLO, Some("1.0-1")))
        .await
        .unwrap();
    assert!(!r.changed && !r.packages[0].changed);
    let r = apt.install(&c, install(HELLO, None)).await.unwrap();
    assert!(!r.changed, "no version: an installed package is left alone");

    // Upgrade to an exact version.
    let r = apt
        .install(&c, install(HELLO, Some("1.1-1")))
        .await
        .unwrap();
    assert_eq!(r.packages[0].version, "1.1-1");
    assert!(r.changed);

    // Hold: a change of hold alone is a change; again is not.
    let mut req = install(HELLO, Some("1.1-1"));
    req.hold = true;
    let r = apt.install(&c, req.clone()).await.unwrap();
    assert!(r.packages[0].held && r.changed);
    let r = apt.install(&c, req).await.unwrap();
    assert!(r.packages[0].held && !r.changed);

    // Another version of a held package is refused, naming it; nothing changes.
    let e = apt
        .install(&c, install(HELLO, Some("2.0-1")))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused, "{}", e.message);
    assert!(e.message.contains(HELLO), "{}", e.message);
    let now = apt.query(&c, &[HELLO.to_string()]).await.unwrap();
    assert_eq!((now[0].version.as_str(), now[0].held), ("1.1-1", true));

    // unhold + hold: the upgrade's move (release, install exactly, hold again).
    let mut req = install(HELLO, Some("2.0-1"));
    req.unhold = true;
    req.hold = true;
    let r = apt.install(&c, req).await.unwrap();
    assert_eq!(
        (r.packages[0].version.as_str(), r.packages[0].held),
        ("2.0-1", true)
    );

    // A downgrade, releasing the hold for good.
    let mut req = install(HELLO, Some("1.0-1"));
    req.unhold = true;
    let r = apt.install(&c, req).await.unwrap();
    assert_eq!(
        (r.packages[0].version.as_str(), r.packages[0].held),
        ("1.0-1", false)
    );

    // The library API: holds, versions from the repository, the repository check.
    apt.set_hold(&c, &[HELLO.to_string()], true).await.unwrap();
    assert!(apt.query(&c, &[HELLO.to_string()]).await.unwrap()[0].held);
    apt.set_hold(&c, &[HELLO.to_string()], false).await.unwrap();
    assert!(!apt.query(&c, &[HELLO.to_string()]).await.unwrap()[0].held);
    assert_eq!(
        apt.resolve_version(&c, HELLO, "1.1").await.unwrap(),
        "1.1-1"
    );
    assert_eq!(
        apt.resolve_version(&c, HELLO, "2.0").await.unwrap(),
        "2.0-1"
    );
    let e = apt.resolve_version(&c, HELLO, "9.9").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.message.contains("2.0-1"), "{}", e.message);
    apt.check_repository(&c, HELLO).await.unwrap();
    let e = apt
        .check_repository(&c, "runostest-nothere")
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = apt.resolve_version(&c, HELLO, "1.0;id").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::BadPayload);

    // GET_PACKAGES: some names (unknown ones not-installed), and the whole database.
    let r = apt
        .get(
            &c,
            GetPackages {
                names: vec![HELLO.into(), "runostest-nothere".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(r.packages[0].version, "1.0-1");
    assert_eq!(
        (
            r.packages[1].status.as_str(),
            r.packages[1].version.as_str()
        ),
        ("not-installed", "")
    );
    let all = apt.get(&c, GetPackages::default()).await.unwrap();
    assert!(all.packages.len() > 10);
    assert!(all.packages.iter().any(|p| p.name == HELLO));
    assert!(
        all.packages
            .iter()
            .any(|p| p.name == "dpkg" && p.status == "installed")
    );

    // Validation: shell metacharacters never reach apt.
    for bad in ["1.0;id", "1.0$(id)", "1.0 -o APT::x=y"] {
        let e = apt
            .install(&c, install(HELLO, Some(bad)))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadPayload);
        assert!(e.message.contains("packages[0].version"), "{}", e.message);
    }
    let e = apt.install(&c, install("--purge", None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::BadPayload);

    // A package whose postinst fails: the error names it, has apt's tail and the state.
    let e = apt.install(&c, install(FAIL, None)).await.unwrap_err();
    eprintln!("the failing postinst: {}: {}", e.code.as_str(), e.message);
    assert_eq!(e.code, ErrorCode::Failed, "{}", e.message);
    assert!(e.message.contains(FAIL), "{}", e.message);
    assert!(e.message.contains("post-installation"), "{}", e.message);
    assert!(e.message.contains("package states now"), "{}", e.message);
    assert!(e.message.len() < 6000, "{}", e.message.len());
    let s = apt.query(&c, &[FAIL.to_string()]).await.unwrap();
    assert_eq!(s[0].status, "half-configured", "{s:?}");
    assert!(apt.recorded().unwrap().contains(&FAIL.to_string()));

    // The dpkg lock held by another process: a bounded wait, then a clear error.
    if have("python3") {
        let mut holder = Command::new("python3")
            .args([
                "-c",
                "import fcntl,sys,time\n\
                 f=open('/var/lib/dpkg/lock-frontend','r+'); fcntl.lockf(f,fcntl.LOCK_EX)\n\
                 g=open('/var/lib/dpkg/lock','r+'); fcntl.lockf(g,fcntl.LOCK_EX)\n\
                 print('locked',flush=True); sys.stdin.read()",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        let quick = Apt::new(Settings {
            lock_timeout: Duration::from_secs(2),
            ..env.settings.clone()
        });
        let e = quick
            .install(&c, install(HELLO, Some("1.1-1")))
            .await
            .unwrap_err();
        let _ = holder.kill();
        let _ = holder.wait();
        eprintln!("the held lock: {}: {}", e.code.as_str(), e.message);
        assert_eq!(e.code, ErrorCode::Failed, "{}", e.message);
        assert!(
            e.message.contains("dpkg lock is held by another process"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains(&format!("pid {}", holder.id())),
            "{}",
            e.message
        );
        assert!(e.message.contains(HELLO), "{}", e.message);
    } else {
        eprintln!("lock step skipped: python3 is not installed");
    }

    // Remove keeps the conffile (config-files); purge removes it and the record entry.
    let purge_fail = RemovePackages {
        packages: vec![PackageName { name: FAIL.into() }],
        purge: true,
        unhold: false,
    };
    apt.remove(&c, purge_fail).await.unwrap();

    // apt never removes what was not named: not a package that depends on the one removed,
    // not one that conflicts with the one installed. Refused before anything changes.
    apt.install(&c, install(DEP, None)).await.unwrap();
    let e = apt
        .remove(
            &c,
            RemovePackages {
                packages: vec![PackageName { name: HELLO.into() }],
                purge: false,
                unhold: false,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused, "{}", e.message);
    assert!(e.message.contains(DEP), "{}", e.message);
    let e = apt.install(&c, install(CONFLICT, None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused, "{}", e.message);
    assert!(e.message.contains(HELLO), "{}", e.message);
    let now = apt
        .query(&c, &[HELLO.into(), DEP.into(), CONFLICT.into()])
        .await
        .unwrap();
    assert_eq!(
        now.iter().map(|p| p.status.as_str()).collect::<Vec<_>>(),
        ["installed", "installed", "not-installed"],
        "nothing changed"
    );
    apt.remove(
        &c,
        RemovePackages {
            packages: vec![PackageName { name: DEP.into() }],
            purge: true,
            unhold: false,
        },
    )
    .await
    .unwrap();
    let rm = |purge| RemovePackages {
        packages: vec![PackageName { name: HELLO.into() }],
        purge,
        unhold: false,
    };
    let r = apt.remove(&c, rm(false)).await.unwrap();
    assert_eq!(
        (
            r.packages[0].status.as_str(),
            r.packages[0].version.as_str()
        ),
        ("config-files", "")
    );
    assert!(r.changed);
    assert!(Path::new(&format!("/etc/{HELLO}.conf")).exists());
    let r = apt.remove(&c, rm(false)).await.unwrap();
    assert!(!r.changed);
    assert_eq!(
        apt.recorded().unwrap(),
        [HELLO],
        "config files remain: still recorded"
    );
    let r = apt.remove(&c, rm(true)).await.unwrap();
    assert_eq!(r.packages[0].status, "not-installed");
    assert!(r.changed);
    assert!(!Path::new(&format!("/etc/{HELLO}.conf")).exists());
    assert!(apt.recorded().unwrap().is_empty());
    let r = apt.remove(&c, rm(true)).await.unwrap();
    assert!(!r.changed);

    // A held package is not removed without unhold.
    apt.install(&c, {
        let mut r = install(HELLO, Some("1.0-1"));
        r.hold = true;
        r
    })
    .await
    .unwrap();
    let e = apt.remove(&c, rm(true)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    let mut req = rm(true);
    req.unhold = true;
    let r = apt.remove(&c, req).await.unwrap();
    assert_eq!(
        (r.packages[0].status.as_str(), r.packages[0].held),
        ("not-installed", false)
    );

    // The uninstall's packages step, through this executor: what runos installed (held or not)
    // is purged; a package it did not install is left alone.
    let mut req = install(HELLO, Some("1.1-1"));
    req.hold = true;
    apt.install(&c, req).await.unwrap();
    let apt = Arc::new(apt);
    let dir = tempfile::tempdir().unwrap();
    let uninstall = runos_executors::uninstall::Uninstall::new(
        runos_executors::uninstall::Settings {
            stop_units: Vec::new(),
            kubeadm_reset: false,
            ..Default::default()
        },
        None,
        Some(Arc::new(runos_packages::UninstallPackages(apt.clone()))),
        Arc::new(runos_executors::manifest::Manifest::new(
            dir.path().join("manifest.json"),
        )),
    );
    let report = uninstall.run(&c).await;
    assert!(report.ok, "{report:?}");
    let step = report.steps.iter().find(|s| s.step == "packages").unwrap();
    assert_eq!(
        step.status,
        runos_executors::uninstall::StepStatus::Done,
        "{step:?}"
    );
    assert!(step.detail.contains(HELLO), "{step:?}");
    let now = apt.query(&c, &[HELLO.to_string()]).await.unwrap();
    assert_eq!(
        (now[0].status.as_str(), now[0].held),
        ("not-installed", false)
    );
    assert!(apt.recorded().unwrap().is_empty());
    assert!(
        apt.query(&c, &["dpkg".to_string()]).await.unwrap()[0].status == "installed",
        "only what runos installed"
    );
    let again = uninstall.run(&c).await;
    assert_eq!(
        again
            .steps
            .iter()
            .find(|s| s.step == "packages")
            .unwrap()
            .status,
        runos_executors::uninstall::StepStatus::Skipped
    );
}
