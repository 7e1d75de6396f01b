//! helm as a verified download, from a local HTTP server (the fake of `common`) serving a
//! release tarball made by the test and its `.sha256sum`: a good one is installed (only its
//! `linux-<arch>/helm` entry, 0755), a tampered one is refused and nothing is installed. The
//! "helm" in the tarball is a shell script that prints its version (helm's real binary is not
//! needed to test the download and the verification).

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::{Bench, FakePackages, ctx};
use runos_kubeadm::helm;
use runos_kubeadm::{PackageOps, upgrade_node_k8s};
use runos_protocol::instructions::UpgradeNodeK8s;
use sha2::{Digest as _, Sha256};

fn tarball(arch: &str, script: &str) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut t = tar::Builder::new(gz);
    for (path, data, mode) in [
        (format!("linux-{arch}/helm"), script.as_bytes(), 0o755),
        (
            format!("linux-{arch}/LICENSE"),
            b"Apache-2.0".as_slice(),
            0o644,
        ),
        (
            "../../escape".to_string(),
            b"never written".as_slice(),
            0o644,
        ),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..`; the raw name is what a hostile tarball would carry.
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        t.append(&h, data).unwrap();
    }
    t.into_inner().unwrap().finish().unwrap()
}

fn script(version: &str) -> String {
    format!("#!/bin/sh\necho {version}\n")
}

fn publish(b: &Bench, version: &str, body: Vec<u8>, sum_of: &[u8]) {
    let arch = helm::arch().unwrap();
    let name = helm::tarball_name(version, arch);
    let sum = format!("{}  {name}\n", hex::encode(Sha256::digest(sum_of)));
    let mut f = b.api.files.lock().unwrap();
    f.insert(format!("{name}.sha256sum"), sum.into_bytes());
    f.insert(name, body);
}

/// A good tarball: its checksum matches, only the helm entry is installed, mode 0755.
#[tokio::test]
async fn a_verified_tarball_installs_only_its_helm() {
    use std::os::unix::fs::PermissionsExt as _;
    let b = Bench::new().await;
    let arch = helm::arch().unwrap();
    let tb = tarball(arch, &script("v3.15.2"));
    publish(&b, "3.15.2", tb.clone(), &tb);
    let s = b.settings();
    let dest = s.helm_path.clone();
    let base = format!("http://{}/helm", b.api.addr);
    tokio::task::spawn_blocking(move || {
        helm::install(
            &base,
            "3.15.2",
            arch,
            &dest,
            Duration::from_secs(30),
            &AtomicBool::new(false),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(&s.helm_path).unwrap(),
        script("v3.15.2")
    );
    let mode = std::fs::metadata(&s.helm_path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o755);
    assert!(!b.dir.path().parent().unwrap().join("escape").exists());
    assert!(!b.path("LICENSE").exists());
}

/// A tampered tarball (its bytes differ from what the published checksum says): refused,
/// nothing installed; and a missing checksum file is refused too.
#[tokio::test]
async fn a_tampered_tarball_is_refused_and_nothing_is_installed() {
    let b = Bench::new().await;
    let arch = helm::arch().unwrap();
    let good = tarball(arch, &script("v3.15.2"));
    let evil = tarball(arch, "#!/bin/sh\necho pwned\n");
    publish(&b, "3.15.2", evil, &good);
    let s = b.settings();
    let base = format!("http://{}/helm", b.api.addr);
    let (dest, base2) = (s.helm_path.clone(), base.clone());
    let e = tokio::task::spawn_blocking(move || {
        helm::install(
            &base2,
            "3.15.2",
            arch,
            &dest,
            Duration::from_secs(30),
            &AtomicBool::new(false),
        )
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(e.contains("is not the published"), "{e}");
    assert!(!s.helm_path.exists());
    let dest = s.helm_path.clone();
    let e = tokio::task::spawn_blocking(move || {
        helm::install(
            &base,
            "3.99.0",
            arch,
            &dest,
            Duration::from_secs(30),
            &AtomicBool::new(false),
        )
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(e.contains("404"), "{e}");
    assert!(!s.helm_path.exists());
}

/// Through the upgrade: `targetHelmVersion` downloads and verifies helm in its own phase; a
/// tampered tarball makes the upgrade `success: false` in phase `install helm`.
#[tokio::test]
async fn the_upgrade_installs_helm_only_verified() {
    let b = Bench::new().await;
    let arch = helm::arch().unwrap();
    let good = tarball(arch, &script("v3.15.2"));
    publish(&b, "3.15.2", good.clone(), &good);
    let pk = FakePackages::with(&[
        ("kubeadm", "1.29.6-1.1", true),
        ("kubelet", "1.29.6-1.1", true),
        ("kubectl", "1.29.6-1.1", true),
    ]);
    let s = b.settings();
    let p = UpgradeNodeK8s {
        target_kubernetes_version: "1.30.2".into(),
        target_helm_version: "3.15.2".into(),
        kube_repo_version: "v1.30".into(),
        ..UpgradeNodeK8s::default()
    };
    let (c, _rx) = ctx(&s, Duration::from_secs(120));
    let r = upgrade_node_k8s(c, p.clone(), pk.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(r.success, "{}", r.message);
    assert!(s.helm_path.exists());

    // A second node whose mirror serves a tampered tarball.
    let b = Bench::new().await;
    let evil = tarball(arch, &script("v3.15.2"));
    let mut evil2 = evil.clone();
    let n = evil2.len();
    evil2[n / 2] ^= 0xff;
    publish(&b, "3.15.2", evil2, &evil);
    let s = b.settings();
    let (c, _rx) = ctx(&s, Duration::from_secs(120));
    let r = upgrade_node_k8s(c, p, pk.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(!r.success);
    assert!(
        r.message.contains("phase `install helm` failed"),
        "{}",
        r.message
    );
    assert!(r.message.contains("sha256"), "{}", r.message);
    assert!(!s.helm_path.exists());
    assert!(!b.argv().iter().any(|a| a.starts_with("systemctl")));
}
