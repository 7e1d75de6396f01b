//! `UPGRADE_NODE_K8S` through the real apt executor (`runos_packages::Apt`) and this machine's
//! apt and dpkg (root only; skipped with a printed reason otherwise).
//!
//! kubeadm and kubelet cannot be obtained here, so the test builds `.deb` packages named
//! `runostest-kubeadm`, `runostest-kubelet` and `runostest-kubectl` in two versions each
//! (1.29.6-1.1 and 1.30.2-1.1) with `dpkg-deb`; `runostest-kubeadm` ships the recording
//! stand-in kubeadm (at `/usr/lib/runostest-kubeadm/kubeadm`, which says its own package version
//! in its log), and the upgrade is configured to run that file, so the test sees that the
//! upgrade ran the kubeadm it had just installed. The packages are served from a flat `file:`
//! repository that apt is pointed at through the executor's `apt_options` (the host's sources
//! and lists are untouched); they do go into the machine's dpkg database, under names that
//! cannot clash, and a drop guard purges them at the end. The Node comes from the fake API
//! server of `common`. One test: dpkg has one lock.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Bench, ctx};
use runos_kubeadm::{PackageOps, upgrade_node_k8s};
use runos_packages::{Apt, InstallPackages, PackageSpec, Settings};
use runos_protocol::instructions::UpgradeNodeK8s;
use sha2::Digest as _;

const PKGS: [&str; 3] = [
    "runostest-kubeadm",
    "runostest-kubelet",
    "runostest-kubectl",
];
const KUBEADM_PATH: &str = "/usr/lib/runostest-kubeadm/kubeadm";

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

/// Purges the test packages when dropped.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("apt-mark")
            .arg("unhold")
            .args(PKGS)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("dpkg")
            .args(["--force-hold", "--purge"])
            .args(PKGS)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn build_deb(
    build: &Path,
    out: &Path,
    name: &str,
    version: &str,
    kubeadm: Option<&str>,
) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = build.join(format!("{name}_{version}"));
    std::fs::create_dir_all(dir.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(dir.join(format!("usr/share/{name}"))).unwrap();
    std::fs::write(dir.join(format!("usr/share/{name}/version")), version).unwrap();
    if let Some(script) = kubeadm {
        let p = dir.join(KUBEADM_PATH.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(
        dir.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: runos tests <tests@runos.invalid>\nPriority: optional\nSection: misc\nDescription: runos test package\n A stand-in of the runos kubeadm executor's tests.\n"
        ),
    )
    .unwrap();
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
        hex::encode(sha2::Sha256::digest(&data))
    )
}

/// The stand-in kubeadm of package version `version`: it logs `kubeadm-<version>|argv...`.
fn standin(bench: &Path, version: &str) -> String {
    let d = bench.display();
    format!(
        r#"#!/bin/sh
D='{d}'
{{ printf 'kubeadm-{version}'; for a in "$@"; do printf '|%s' "$a"; done; echo; }} >> "$D/argv.log"
if [ -e "$D/fail-upgrade" ]; then echo "[upgrade] FATAL: told to fail" >&2; exit 1; fi
echo "[upgrade/successful] SUCCESS!"
"#
    )
}

fn dpkg_state(name: &str) -> (String, bool) {
    let out = Command::new("dpkg-query")
        .args(["-W", "--showformat=${Version} ${db:Status-Want}", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (v, want) = text.split_once(' ').unwrap_or(("", ""));
    (v.to_string(), want.trim() == "hold")
}

#[tokio::test]
async fn an_upgrade_through_real_apt_installs_exact_versions_and_restores_holds() {
    if !is_root() {
        eprintln!("skipped: needs root (it installs test packages into dpkg's database)");
        return;
    }
    if !(have("dpkg-deb") && have("apt-get")) {
        eprintln!("skipped: needs dpkg-deb and apt-get");
        return;
    }
    let _cleanup = Cleanup;
    let b = Bench::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
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
    for v in ["1.29.6-1.1", "1.30.2-1.1"] {
        for p in PKGS {
            let script = (p == "runostest-kubeadm").then(|| standin(b.dir.path(), v));
            let deb = build_deb(&t.join("build"), &t.join("repo"), p, v, script.as_deref());
            stanzas.push(stanza(&deb));
        }
    }
    std::fs::write(t.join("repo/Packages"), stanzas.join("\n")).unwrap();
    std::fs::write(
        t.join("sources.list"),
        format!("deb [trusted=yes] file:{} ./\n", t.join("repo").display()),
    )
    .unwrap();
    let apt = Arc::new(Apt::new(Settings {
        apt_options: vec![
            format!("Dir::Etc::SourceList={}", t.join("sources.list").display()),
            format!("Dir::Etc::SourceParts={}", t.join("parts").display()),
            format!("Dir::State::Lists={}", t.join("lists").display()),
            format!("Dir::Cache={}", t.join("cache").display()),
        ],
        state_dir: t.join("state/packages"),
        lock_timeout: Duration::from_secs(60),
        ..Settings::default()
    }));
    let mut s = b.settings();
    s.kubeadm = KUBEADM_PATH.into();
    s.kubeadm_package = PKGS[0].into();
    s.kubelet_package = PKGS[1].into();
    s.kubectl_package = PKGS[2].into();

    // The node as it was: 1.29.6; kubelet and kubectl held, kubeadm not.
    let (c, _rx) = ctx(&s, Duration::from_secs(300));
    apt.install(
        &c,
        InstallPackages {
            packages: PKGS
                .iter()
                .map(|p| PackageSpec {
                    name: p.to_string(),
                    version: Some("1.29.6-1.1".into()),
                })
                .collect(),
            hold: false,
            unhold: true,
            update_index: true,
        },
    )
    .await
    .unwrap();
    apt.set_hold(&c, &[PKGS[1].into(), PKGS[2].into()], true)
        .await
        .unwrap();

    let payload = UpgradeNodeK8s {
        target_kubernetes_version: "1.30.2".into(),
        kube_repo_version: "v1.30".into(),
        is_first_cp: true,
        ..UpgradeNodeK8s::default()
    };

    // 1. `kubeadm upgrade apply` fails: kubeadm is at 1.30.2 (the new stand-in ran) and not
    //    held, as before; kubelet and kubectl are untouched and still held.
    b.touch("fail-upgrade");
    let (c, _rx) = ctx(&s, Duration::from_secs(300));
    let r = upgrade_node_k8s(c, payload.clone(), apt.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(!r.success);
    assert!(
        r.message.contains("phase `kubeadm upgrade apply` failed"),
        "{}",
        r.message
    );
    assert!(r.message.contains("Holds restored"), "{}", r.message);
    assert_eq!(dpkg_state(PKGS[0]), ("1.30.2-1.1".to_string(), false));
    assert_eq!(dpkg_state(PKGS[1]), ("1.29.6-1.1".to_string(), true));
    assert_eq!(dpkg_state(PKGS[2]), ("1.29.6-1.1".to_string(), true));
    assert_eq!(b.argv(), ["kubeadm-1.30.2-1.1|upgrade|apply|v1.30.2|--yes"]);

    // 2. Sent again: it resumes and ends with everything at 1.30.2-1.1 and held.
    std::fs::remove_file(b.path("fail-upgrade")).unwrap();
    let (c, _rx) = ctx(&s, Duration::from_secs(300));
    let r = upgrade_node_k8s(c, payload, apt.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(r.success, "{}", r.message);
    for p in PKGS {
        assert_eq!(dpkg_state(p), ("1.30.2-1.1".to_string(), true), "{p}");
    }
    let argv = b.argv();
    assert_eq!(argv[1], "kubeadm-1.30.2-1.1|upgrade|apply|v1.30.2|--yes");
    assert_eq!(
        argv[2..],
        ["systemctl|daemon-reload", "systemctl|restart|kubelet"]
    );
}
