//! The uninstall's steps, in a sandbox: `systemctl` and `kubeadm` are recording stand-in
//! scripts (kubeadm cannot be installed on the project's machines; stopping real units would
//! touch the host), run through the real process runner; the overlay is an in-memory device;
//! the packages are a recording stand-in of the package executor; every manifest path is under
//! a temporary directory. Nothing on the host is touched.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::*;
use crate::handle::Host;
use crate::host::runner::{CgroupMode, Runner, RunnerConfig, Tools};
use crate::overlay::{Addresses, ControlPaths, DeviceView, Kind, System, Update};
use runos_protocol::Tag;

/// An overlay device that only knows whether it exists.
#[derive(Default)]
struct Device(Mutex<bool>);

impl System for Device {
    fn ensure(&self, _s: Arc<crate::overlay::Spec>) -> BoxFuture<io::Result<Vec<String>>> {
        *self.0.lock().unwrap() = true;
        Box::pin(async { Ok(vec![]) })
    }
    fn device(&self, _s: Arc<crate::overlay::Spec>) -> BoxFuture<io::Result<(Kind, DeviceView)>> {
        Box::pin(async { Ok((Kind::Userspace, DeviceView::default())) })
    }
    fn apply(
        &self,
        _s: Arc<crate::overlay::Spec>,
        _k: Kind,
        _u: Update,
    ) -> BoxFuture<io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn addresses(&self, _i: String) -> BoxFuture<io::Result<Addresses>> {
        Box::pin(async { Ok(Addresses::default()) })
    }
    fn add_address(&self, _i: String, _ip: IpAddr, _p: u8) -> BoxFuture<io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn del_address(&self, _i: String, _ip: IpAddr, _p: u8) -> BoxFuture<io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn remove(&self, _i: String) -> BoxFuture<io::Result<bool>> {
        let was = std::mem::replace(&mut *self.0.lock().unwrap(), false);
        Box::pin(async move { Ok(was) })
    }
}

/// The package executor's side: what it recorded, what was purged.
#[derive(Default)]
struct Pkgs {
    recorded: Mutex<Vec<String>>,
    purged: Mutex<Vec<String>>,
}

impl Packages for Pkgs {
    fn recorded(&self, _ctx: Ctx) -> BoxFuture<Result<Vec<String>, ErrorPayload>> {
        let r = self.recorded.lock().unwrap().clone();
        Box::pin(async move { Ok(r) })
    }
    fn purge(&self, _ctx: Ctx, names: Vec<String>) -> BoxFuture<Result<(), ErrorPayload>> {
        self.recorded.lock().unwrap().retain(|n| !names.contains(n));
        self.purged.lock().unwrap().extend(names);
        Box::pin(async { Ok(()) })
    }
}

struct Sandbox {
    dir: tempfile::TempDir,
    device: Arc<Device>,
    pkgs: Arc<Pkgs>,
    overlay: Arc<Overlay>,
    manifest: Arc<Manifest>,
    runner: Runner,
}

/// A recording stand-in: appends its name and argv to `calls`, exits with the number in
/// `<name>.fail` if that file exists.
fn stand_in(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\necho \"{name} $*\" >> '{calls}'\nif [ -f '{fail}' ]; then echo \"{name}: told to fail\" >&2; exit \"$(cat '{fail}')\"; fi\nexit 0\n",
            calls = dir.join("calls").display(),
            fail = dir.join(format!("{name}.fail")).display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

impl Sandbox {
    fn new(with_kubeadm: bool) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let mut tools = Tools::new();
        tools.set("systemctl", stand_in(&bin, "systemctl")).unwrap();
        if with_kubeadm {
            tools.set("kubeadm", stand_in(&bin, "kubeadm")).unwrap();
        }
        let runner = Runner::new(RunnerConfig {
            // Nothing else is found: a missing kubeadm is missing.
            search_path: Some(bin.join("empty").into_os_string()),
            tools,
            cgroup: CgroupMode::Off,
            registry: None,
        });
        let device = Arc::new(Device::default());
        let mut s = crate::overlay::Settings::new(dir.path().join("state/wireguard"));
        s.address = Some(("10.9.0.1".parse().unwrap(), 24));
        let overlay = Arc::new(Overlay::new(
            s,
            device.clone(),
            Arc::new(ControlPaths::default()),
        ));
        let manifest = Arc::new(Manifest::new(dir.path().join("state/manifest.json")));
        std::fs::create_dir_all(dir.path().join("run/systemd/system")).unwrap();
        Sandbox {
            device,
            pkgs: Arc::new(Pkgs::default()),
            overlay,
            manifest,
            runner,
            dir,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn uninstall(&self) -> Uninstall {
        let settings = Settings {
            systemd_marker: self.path("run/systemd/system"),
            ..Settings::default()
        };
        Uninstall::new(
            settings,
            Some(self.overlay.clone()),
            Some(self.pkgs.clone() as Arc<dyn Packages>),
            self.manifest.clone(),
        )
    }

    fn ctx(&self) -> Ctx {
        let host = Host {
            runner: Arc::new(self.runner.clone()),
            ..Host::default()
        };
        Ctx::new(
            Tag::random(),
            tokio::time::Instant::now() + Duration::from_secs(60),
            Arc::new(host),
            None,
        )
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("bin/calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A managed overlay, packages recorded, and three manifest entries (a file as written, a
    /// file changed since, a directory).
    async fn populate(&self) {
        self.overlay.private_key().unwrap();
        let set: runos_protocol::instructions::SetVpnPeers =
            serde_json::from_value(serde_json::json!({
                "generation": 1, "complete": true, "peers": []
            }))
            .unwrap();
        self.overlay.set_vpn_peers(&self.ctx(), set).await.unwrap();
        assert!(*self.device.0.lock().unwrap());
        *self.pkgs.recorded.lock().unwrap() = vec!["runostest-a".into(), "runostest-b".into()];
        let etc = self.path("etc/runos-test");
        std::fs::create_dir_all(&etc).unwrap();
        self.manifest.record_dir(&etc, "test").unwrap();
        for (name, body) in [("ours.conf", "ours"), ("edited.conf", "ours")] {
            let p = etc.join(name);
            std::fs::write(&p, body).unwrap();
            self.manifest
                .record_file(&p, body.as_bytes(), "test")
                .unwrap();
        }
        std::fs::write(etc.join("edited.conf"), "the operator's").unwrap();
    }
}

fn statuses(r: &Report) -> Vec<(&'static str, StepStatus)> {
    r.steps.iter().map(|s| (s.step, s.status)).collect()
}

#[tokio::test]
async fn every_step_runs_in_order_and_only_what_runos_made_goes() {
    let sb = Sandbox::new(true);
    sb.populate().await;
    let done = sb
        .uninstall()
        .execute(sb.ctx(), UninstallNode {})
        .await
        .unwrap();
    assert_eq!(done.after_ack.unwrap().step, FINISH_STEP);
    assert_eq!(
        sb.calls(),
        vec![
            "systemctl stop -- kubelet.service",
            "systemctl stop -- containerd.service",
            "kubeadm reset -f",
        ]
    );
    assert!(!*sb.device.0.lock().unwrap(), "the interface is deleted");
    assert!(
        !sb.path("state/wireguard").exists(),
        "the overlay's state is gone"
    );
    assert_eq!(
        *sb.pkgs.purged.lock().unwrap(),
        vec!["runostest-a", "runostest-b"]
    );
    let etc = sb.path("etc/runos-test");
    assert!(!etc.join("ours.conf").exists());
    assert_eq!(
        std::fs::read_to_string(etc.join("edited.conf")).unwrap(),
        "the operator's"
    );
    assert!(etc.is_dir(), "a directory that still holds a file is kept");
    assert!(sb.manifest.entries().unwrap().is_empty());

    // Again: everything is already gone; the services are stopped again (harmless).
    let r = sb.uninstall().run(&sb.ctx()).await;
    assert!(r.ok);
    assert_eq!(
        statuses(&r),
        vec![
            ("stop-services", StepStatus::Done),
            ("kubeadm-reset", StepStatus::Done),
            ("overlay", StepStatus::Skipped),
            ("packages", StepStatus::Skipped),
            ("files", StepStatus::Skipped),
        ]
    );
}

#[tokio::test]
async fn a_failed_reset_stops_the_uninstall_and_a_retry_finishes_it() {
    let sb = Sandbox::new(true);
    sb.populate().await;
    std::fs::write(sb.path("bin/kubeadm.fail"), "1").unwrap();
    let e = sb
        .uninstall()
        .execute(sb.ctx(), UninstallNode {})
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Failed);
    assert!(
        e.message.contains("step kubeadm-reset failed"),
        "{}",
        e.message
    );
    assert!(e.message.contains("told to fail"), "{}", e.message);
    assert!(
        e.message.contains("not done: overlay, packages, files"),
        "{}",
        e.message
    );
    // Nothing after the failed step ran: the node keeps what a retry needs.
    assert!(*sb.device.0.lock().unwrap());
    assert!(sb.pkgs.purged.lock().unwrap().is_empty());
    assert_eq!(sb.manifest.entries().unwrap().len(), 3);

    std::fs::remove_file(sb.path("bin/kubeadm.fail")).unwrap();
    let r = sb.uninstall().run(&sb.ctx()).await;
    assert!(r.ok, "{r:?}");
    assert!(!*sb.device.0.lock().unwrap());
    assert_eq!(sb.pkgs.purged.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn without_kubeadm_or_systemd_those_steps_are_skipped() {
    let sb = Sandbox::new(false);
    std::fs::remove_dir(sb.path("run/systemd/system")).unwrap();
    let r = sb.uninstall().run(&sb.ctx()).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        statuses(&r),
        vec![
            ("stop-services", StepStatus::Skipped),
            ("kubeadm-reset", StepStatus::Skipped),
            ("overlay", StepStatus::Skipped),
            ("packages", StepStatus::Skipped),
            ("files", StepStatus::Skipped),
        ]
    );
    assert!(sb.calls().is_empty());
}

#[tokio::test]
async fn a_unit_that_will_not_stop_is_reported_but_does_not_stop_the_uninstall() {
    let sb = Sandbox::new(true);
    std::fs::write(sb.path("bin/systemctl.fail"), "1").unwrap();
    let r = sb.uninstall().run(&sb.ctx()).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.steps[0].status, StepStatus::Failed);
    assert!(
        r.steps[0].detail.contains("kubelet.service"),
        "{}",
        r.steps[0].detail
    );
    assert_eq!(r.steps[1].status, StepStatus::Done);
    // Not loaded (exit 5) is not a failure.
    std::fs::write(sb.path("bin/systemctl.fail"), "5").unwrap();
    let r = sb.uninstall().run(&sb.ctx()).await;
    assert_eq!(r.steps[0].status, StepStatus::Done);
    assert!(
        r.steps[0].detail.contains("not installed"),
        "{}",
        r.steps[0].detail
    );
}

#[tokio::test]
async fn a_cancelled_uninstall_answers_cancelled_and_runs_no_further_step() {
    let sb = Sandbox::new(true);
    sb.populate().await;
    let ctx = sb.ctx();
    ctx.cancel.cancel();
    let e = sb
        .uninstall()
        .execute(ctx, UninstallNode {})
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Cancelled);
    assert!(sb.calls().is_empty());
    assert!(*sb.device.0.lock().unwrap());
}
