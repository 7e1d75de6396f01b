//! `UPGRADE_NODE_K8S` against recording stand-ins (`kubeadm`, `systemctl`: shell scripts, since
//! kubeadm and kubelet cannot be obtained on the test machines), a fake Kubernetes API server on
//! 127.0.0.1 whose Node reports the new kubelet version once the stand-in `systemctl restart
//! kubelet` ran, and a fake package database recording its calls (see `common`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Bench, FakePackages, ctx, logs, wait_until};
use runos_executors::{Lane, Registry, Settings};
use runos_kubeadm::{PackageOps, upgrade_node_k8s};
use runos_protocol::instructions::UpgradeNodeK8s;
use runos_protocol::{Envelope, ErrorCode, MessageType, Tag};

fn payload(first_cp: bool) -> UpgradeNodeK8s {
    UpgradeNodeK8s {
        target_kubernetes_version: "1.30.2".into(),
        target_containerd_version: String::new(),
        target_helm_version: String::new(),
        kube_repo_version: "v1.30".into(),
        is_first_cp: first_cp,
    }
}

fn packages() -> Arc<FakePackages> {
    FakePackages::with(&[
        ("kubeadm", "1.29.6-1.1", true),
        ("kubelet", "1.29.6-1.1", true),
        ("kubectl", "1.29.6-1.1", false),
    ])
}

/// The first control plane: exact versions through the package code (unhold, install, hold),
/// `kubeadm upgrade apply v1.30.2 --yes` as argv, kubelet and kubectl, the restart, and the wait
/// until the Node reports v1.30.2 and Ready.
#[tokio::test]
async fn the_first_control_plane_is_upgraded_in_order() {
    let b = Bench::new().await;
    let pk = packages();
    let s = b.settings();
    let (c, mut rx) = ctx(&s, Duration::from_secs(120));
    let r = upgrade_node_k8s(c, payload(true), pk.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(r.success, "{}", r.message);
    assert_eq!(r.previous_version, "1.29.6");
    assert_eq!(r.new_version, "1.30.2");
    assert_eq!(
        b.argv(),
        [
            "kubeadm|upgrade|apply|v1.30.2|--yes",
            "systemctl|daemon-reload",
            "systemctl|restart|kubelet"
        ]
    );
    assert_eq!(
        pk.calls(),
        [
            "check kubeadm",
            "resolve kubeadm 1.30.2",
            "resolve kubelet 1.30.2",
            "resolve kubectl 1.30.2",
            "unhold kubeadm",
            "install kubeadm=1.30.2-1.1",
            "hold kubeadm",
            "unhold kubelet kubectl",
            "install kubelet=1.30.2-1.1",
            "install kubectl=1.30.2-1.1",
            "hold kubelet kubectl",
        ]
    );
    for p in ["kubeadm", "kubelet", "kubectl"] {
        assert!(pk.held(p), "{p}");
        assert_eq!(pk.version(p).as_deref(), Some("1.30.2-1.1"));
    }
    let l = logs(&mut rx);
    for phase in [
        "read versions",
        "check the package repository",
        "install kubeadm",
        "kubeadm upgrade apply",
        "install kubelet and kubectl",
        "restart kubelet",
        "wait for the node",
    ] {
        assert!(
            l.iter().any(|m| m.contains(&format!(": {phase}"))),
            "{phase}: {l:?}"
        );
    }
    // kubeadm's own output is streamed.
    assert!(l.iter().any(|m| m.contains("SUCCESS!")), "{l:?}");
}

/// Another node runs `kubeadm upgrade node`; packages already at the target are not
/// reinstalled (a re-sent upgrade skips what is done).
#[tokio::test]
async fn other_nodes_run_upgrade_node_and_done_steps_are_skipped() {
    let b = Bench::new().await;
    let pk = FakePackages::with(&[
        ("kubeadm", "1.30.2-1.1", true),
        ("kubelet", "1.29.6-1.1", true),
        ("kubectl", "1.29.6-1.1", true),
    ]);
    let s = b.settings();
    let (c, _rx) = ctx(&s, Duration::from_secs(120));
    let r = upgrade_node_k8s(c, payload(false), pk.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(r.success, "{}", r.message);
    assert_eq!(b.argv()[0], "kubeadm|upgrade|node");
    let calls = pk.calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("install kubeadm")),
        "{calls:?}"
    );
    assert!(calls.contains(&"install kubelet=1.30.2-1.1".to_string()));
}

/// `kubeadm upgrade apply` fails: `success: false` naming the phase, what the node runs now,
/// the holds as they were before (kubeadm held, kubectl not), nothing after the failed phase.
#[tokio::test]
async fn a_failed_upgrade_apply_restores_the_holds_and_says_what_failed() {
    let b = Bench::new().await;
    b.touch("fail-upgrade");
    let pk = FakePackages::with(&[
        ("kubeadm", "1.29.6-1.1", false),
        ("kubelet", "1.29.6-1.1", true),
        ("kubectl", "1.29.6-1.1", false),
    ]);
    let s = b.settings();
    let (c, mut rx) = ctx(&s, Duration::from_secs(120));
    let r = upgrade_node_k8s(c, payload(true), pk.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(!r.success);
    assert_eq!(r.previous_version, "1.29.6");
    assert_eq!(r.new_version, "");
    let m = &r.message;
    assert!(m.contains("phase `kubeadm upgrade apply` failed"), "{m}");
    assert!(m.contains("exited with 1"), "{m}");
    assert!(m.contains("Node kubelet v1.29.6"), "{m}");
    assert!(m.contains("kubeadm 1.30.2-1.1"), "{m}");
    assert!(m.contains("Holds restored"), "{m}");
    assert!(m.contains("kubeadm upgrade can be re-run"), "{m}");
    // kubeadm was not held before: it is not held now; the others were never touched.
    assert!(!pk.held("kubeadm"));
    assert!(pk.held("kubelet"));
    assert!(!pk.held("kubectl"));
    assert_eq!(pk.calls().last().unwrap(), "unhold kubeadm");
    assert_eq!(b.argv(), ["kubeadm|upgrade|apply|v1.30.2|--yes"]);
    assert!(logs(&mut rx).iter().any(|l| l.contains("FATAL")));
}

/// A failed package install (kubelet) restores the holds of kubeadm, kubelet and kubectl.
#[tokio::test]
async fn a_failed_install_restores_every_hold_it_changed() {
    let b = Bench::new().await;
    let pk = packages();
    *pk.fail_install.lock().unwrap() = Some("kubelet".into());
    let s = b.settings();
    let (c, _rx) = ctx(&s, Duration::from_secs(120));
    let r = upgrade_node_k8s(c, payload(true), pk.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(!r.success);
    assert!(
        r.message
            .contains("phase `install kubelet and kubectl` failed"),
        "{}",
        r.message
    );
    assert!(pk.held("kubeadm"));
    assert!(pk.held("kubelet"));
    assert!(!pk.held("kubectl"));
    assert!(!b.argv().iter().any(|a| a.starts_with("systemctl")));
}

/// Cancelled while `kubeadm upgrade apply` runs: the stand-in is killed, nothing after it runs,
/// the holds are put back, and the executor answers `cancelled`.
#[tokio::test]
async fn a_cancelled_upgrade_stops_and_restores_the_holds() {
    let b = Bench::new().await;
    b.touch("block-upgrade");
    let pk = FakePackages::with(&[
        ("kubeadm", "1.29.6-1.1", false),
        ("kubelet", "1.29.6-1.1", true),
        ("kubectl", "1.29.6-1.1", true),
    ]);
    let s = b.settings();
    let (c, _rx) = ctx(&s, Duration::from_secs(120));
    let token = c.cancel.clone();
    let task = tokio::spawn(upgrade_node_k8s(
        c,
        payload(true),
        pk.clone() as Arc<dyn PackageOps>,
    ));
    let started = b.path("upgrade-started");
    assert!(wait_until(Duration::from_secs(30), || started.exists()).await);
    // kubeadm is held by the upgrade at this point.
    assert!(pk.held("kubeadm"));
    token.cancel();
    let e = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the upgrade did not stop")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Cancelled);
    assert!(e.message.contains("kubeadm upgrade apply"), "{}", e.message);
    assert!(e.message.contains("Holds restored"), "{}", e.message);
    assert!(!pk.held("kubeadm"));
    assert!(pk.held("kubelet"));
    assert!(pk.held("kubectl"));
    assert_eq!(b.argv(), ["kubeadm|upgrade|apply|v1.30.2|--yes"]);
}

/// The Node never reports the new version (kubelet's restart "worked" but it stays old): the
/// bounded wait ends in `success: false` naming the phase and what the node reports.
#[tokio::test]
async fn a_node_that_never_reports_the_new_version_is_a_failure() {
    let b = Bench::new().await;
    b.touch("no-flip");
    let pk = packages();
    let mut s = b.settings();
    s.node_wait_secs = 2;
    let (c, _rx) = ctx(&s, Duration::from_secs(120));
    let r = upgrade_node_k8s(c, payload(false), pk.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(!r.success);
    let m = &r.message;
    assert!(m.contains("phase `wait for the node` failed"), "{m}");
    assert!(
        m.contains("did not report kubelet v1.30.2 and Ready within 2 s"),
        "{m}"
    );
    assert!(m.contains("it reports kubelet v1.29.6"), "{m}");
    assert!(m.contains("journalctl -u kubelet"), "{m}");
    // Holds as before: kubeadm and kubelet held, kubectl not.
    assert!(pk.held("kubeadm") && pk.held("kubelet") && !pk.held("kubectl"));
}

/// A version with shell metacharacters is refused by the protocol's validation when the
/// registry prepares the instruction: nothing runs, no package is touched.
#[tokio::test]
async fn shell_metacharacters_in_a_version_are_refused_before_anything_runs() {
    let b = Bench::new().await;
    let pk = packages();
    let mut r = Registry::new();
    let ops = pk.clone() as Arc<dyn PackageOps>;
    r.register::<UpgradeNodeK8s, _, _>(
        Settings::new(Duration::from_secs(3600), Lane::Pool),
        move |ctx, p| upgrade_node_k8s(ctx, p, ops.clone()),
    );
    r.set_config(
        "UPGRADE_NODE_K8S",
        serde_json::to_value(b.settings()).unwrap(),
    );
    let entry = r.get("UPGRADE_NODE_K8S").unwrap();
    for json in [
        r#"{"targetKubernetesVersion":"1.30.2; touch /tmp/pwned","kubeRepoVersion":"v1.30","isFirstCp":true}"#,
        r#"{"targetKubernetesVersion":"1.30.2","kubeRepoVersion":"v1.30$(id)"}"#,
        r#"{"targetKubernetesVersion":"1.30.2","kubeRepoVersion":"v1.30","targetHelmVersion":"3.15.2 | bash"}"#,
        r#"{"targetKubernetesVersion":"1.30.2","kubeRepoVersion":"v1.30","targetContainerdVersion":"`reboot`"}"#,
    ] {
        let env = Envelope::from_json_text(
            MessageType::new("UPGRADE_NODE_K8S").unwrap(),
            Tag::random(),
            json,
        );
        let e = entry.prepare(&env).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadPayload, "{json}");
    }
    assert!(b.argv().is_empty());
    assert!(pk.calls().is_empty());
}

/// A repository that cannot carry the target (another minor) is refused before anything runs.
#[tokio::test]
async fn a_repository_of_another_minor_is_refused() {
    let b = Bench::new().await;
    let pk = packages();
    let s = b.settings();
    let (c, _rx) = ctx(&s, Duration::from_secs(60));
    let mut p = payload(true);
    p.kube_repo_version = "v1.29".into();
    let e = upgrade_node_k8s(c, p, pk.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadPayload);
    assert!(pk.calls().is_empty() && b.argv().is_empty());
}

/// containerd when asked: its exact version, its hold kept as it was (not held).
#[tokio::test]
async fn containerd_is_installed_when_asked() {
    let b = Bench::new().await;
    let pk = FakePackages::with(&[
        ("kubeadm", "1.29.6-1.1", true),
        ("kubelet", "1.29.6-1.1", true),
        ("kubectl", "1.29.6-1.1", true),
        ("containerd", "1.6.20-1", false),
    ]);
    let s = b.settings();
    let (c, _rx) = ctx(&s, Duration::from_secs(120));
    let mut p = payload(false);
    p.target_containerd_version = "1.7.12".into();
    let r = upgrade_node_k8s(c, p, pk.clone() as Arc<dyn PackageOps>)
        .await
        .unwrap();
    assert!(r.success, "{}", r.message);
    assert_eq!(pk.version("containerd").as_deref(), Some("1.7.12-1.1"));
    assert!(!pk.held("containerd"));
    assert!(!pk.calls().iter().any(|c| c.contains("hold containerd")));
}

/// A direct caller (not through the registry's validation) with a version holding shell
/// metacharacters is refused by `upgrade_node_k8s` itself before anything runs.
#[tokio::test]
async fn an_unvalidated_payload_is_refused_by_the_executor_itself() {
    let b = Bench::new().await;
    let pk = packages();
    let s = b.settings();
    for bad in [
        "1.30.2; touch /tmp/pwned",
        "1.30.2$(id)",
        "1.30.2 --config=/x",
    ] {
        let (c, _rx) = ctx(&s, Duration::from_secs(60));
        let mut p = payload(true);
        p.target_kubernetes_version = bad.into();
        let e = upgrade_node_k8s(c, p, pk.clone() as Arc<dyn PackageOps>)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadPayload, "{bad}");
    }
    assert!(pk.calls().is_empty() && b.argv().is_empty());
}

/// The executor's task is aborted (as the dispatcher does once its stop grace has passed)
/// while `kubeadm upgrade apply` runs: the holds it changed are still put back, by a detached
/// task.
#[tokio::test]
async fn an_aborted_upgrade_still_restores_the_holds() {
    let b = Bench::new().await;
    b.touch("block-upgrade");
    let pk = FakePackages::with(&[
        ("kubeadm", "1.29.6-1.1", false),
        ("kubelet", "1.29.6-1.1", true),
        ("kubectl", "1.29.6-1.1", true),
    ]);
    let s = b.settings();
    let (c, _rx) = ctx(&s, Duration::from_secs(120));
    let task = tokio::spawn(upgrade_node_k8s(
        c,
        payload(true),
        pk.clone() as Arc<dyn PackageOps>,
    ));
    let started = b.path("upgrade-started");
    assert!(wait_until(Duration::from_secs(30), || started.exists()).await);
    assert!(pk.held("kubeadm"));
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(
        wait_until(Duration::from_secs(20), || !pk.held("kubeadm")).await,
        "kubeadm's hold was not put back: {:?}",
        pk.calls()
    );
    assert!(pk.held("kubelet") && pk.held("kubectl"));
    assert_eq!(pk.calls().last().unwrap(), "unhold kubeadm");
}

/// Cancelled while waiting for the Node: the wait ends at once (not at its bound), the holds
/// are put back and the executor answers `cancelled`.
#[tokio::test]
async fn a_cancel_during_the_node_wait_stops_it() {
    let b = Bench::new().await;
    b.touch("no-flip");
    let pk = packages();
    let mut s = b.settings();
    s.node_wait_secs = 600;
    let (c, mut rx) = ctx(&s, Duration::from_secs(900));
    let token = c.cancel.clone();
    let task = tokio::spawn(upgrade_node_k8s(
        c,
        payload(false),
        pk.clone() as Arc<dyn PackageOps>,
    ));
    let mut seen = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            seen.extend(logs(&mut rx));
            seen.iter()
                .any(|l| l.contains("waiting for v1.30.2 and Ready"))
        })
        .await,
        "{seen:?}"
    );
    token.cancel();
    let e = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the wait did not stop")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Cancelled);
    assert!(e.message.contains("wait for the node"), "{}", e.message);
    assert!(e.message.contains("Holds restored"), "{}", e.message);
    assert!(pk.held("kubeadm") && pk.held("kubelet") && !pk.held("kubectl"));
}
