//! `UPGRADE_NODE_K8S` as a phased executor.
//!
//! Phases, each a `LOG` line and a cancellation point:
//!
//! 1. **read versions**: the Node's `status.nodeInfo.kubeletVersion` through the Kubernetes API
//!    (kubelet's kubeconfig), and the installed versions and holds of the packages involved;
//! 2. **check the package repository**: reachable, and the exact Debian versions of the target
//!    resolved (`1.30.2` → `1.30.2-1.1`);
//! 3. **install kubeadm**: unhold, install the exact version, hold;
//! 4. **kubeadm upgrade**: `kubeadm upgrade apply v<target> --yes` on the first control plane,
//!    `kubeadm upgrade node` elsewhere (its output streamed as `LOG` lines);
//! 5. **install kubelet and kubectl**: unhold, install, hold;
//! 6. **install containerd** (when `targetContainerdVersion` is set; its hold kept as it was);
//! 7. **install helm** (when `targetHelmVersion` is set): a verified download ([`crate::helm`]),
//!    or the configured package; never a script;
//! 8. **restart kubelet**: `systemctl daemon-reload`, `systemctl restart kubelet`;
//! 9. **wait for the node**: until the Node reports the target kubelet version **and**
//!    `Ready=True` (the old kubelet's Ready lingers after a restart), bounded.
//!
//! On failure the holds are put back as they were before the upgrade, the versions are read
//! again, and the reply is `success: false` with a message naming the phase, what the node runs
//! now and what to do next. On cancellation (CANCEL, shutdown, the deadline) the executor stops
//! at the next phase boundary (the running program is ended by the runner), puts the holds back
//! and returns `cancelled` (or `timeout`); in the agent the dispatcher has answered already.
//! Reads of the Node and the node wait stop at once. If the executor is dropped before the
//! holds are back (the dispatcher aborts it once its stop grace has passed), a detached task
//! puts them back and reports to the local log. The payload is validated again before anything
//! runs; versions go to programs as argv elements only, never through a shell.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use runos_executors::Ctx;
use runos_executors::context::Secrecy;
use runos_protocol::control::LogLevel;
use runos_protocol::instructions::{UpgradeNodeK8s, UpgradeNodeK8sResponse};
use runos_protocol::{ErrorCode, ErrorPayload};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::node::{NodeApi, NodeState};
use crate::settings::KubeSettings;
use crate::tool::{self, StepError};

/// A future of a [`PackageOps`] method; its error is a message for the operator.
pub type OpFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// What the package database says about one package.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackageInfo {
    /// The package.
    pub name: String,
    /// Its installed Debian version (`None`: not installed).
    pub version: Option<String>,
    /// Whether it is held (`apt-mark hold`).
    pub held: bool,
}

/// The package operations the upgrade needs: the package executor's code in the agent
/// (`runos_packages::Apt`), a recording fake in tests. Each runs its programs through `ctx`
/// (its cancellation and deadline).
pub trait PackageOps: Send + Sync {
    /// The installed version and hold state of each of `names` (one entry per name, in order).
    fn query<'a>(&'a self, ctx: &'a Ctx, names: &'a [String]) -> OpFuture<'a, Vec<PackageInfo>>;
    /// Hold (`true`) or unhold `names`.
    fn set_hold<'a>(&'a self, ctx: &'a Ctx, names: &'a [String], hold: bool) -> OpFuture<'a, ()>;
    /// Install exactly `debian_version` of `name`.
    fn install_exact<'a>(
        &'a self,
        ctx: &'a Ctx,
        name: &'a str,
        debian_version: &'a str,
    ) -> OpFuture<'a, ()>;
    /// The repository's Debian version of `name` for the upstream version `upstream`
    /// (`1.30.2` → `1.30.2-1.1`).
    fn resolve_version<'a>(
        &'a self,
        ctx: &'a Ctx,
        name: &'a str,
        upstream: &'a str,
    ) -> OpFuture<'a, String>;
    /// Whether the repository that carries `name` is reachable (an index update that succeeds).
    fn check_repository<'a>(&'a self, ctx: &'a Ctx, name: &'a str) -> OpFuture<'a, ()>;
}

/// How long putting the holds back may take after a cancellation (within the dispatcher's
/// stop grace).
pub const RESTORE_BUDGET: Duration = Duration::from_secs(8);
/// What the node wait leaves of the instruction's deadline, to answer in time.
const WAIT_MARGIN: Duration = Duration::from_secs(5);

/// The executor of `UPGRADE_NODE_K8S`: settings from the context's configuration (the agent's
/// `[kubernetes]`), packages through `packages`.
pub async fn upgrade_node_k8s(
    ctx: Ctx,
    p: UpgradeNodeK8s,
    packages: Arc<dyn PackageOps>,
) -> Result<UpgradeNodeK8sResponse, ErrorPayload> {
    let settings = KubeSettings::from_config(ctx.config()).map_err(|e| {
        ErrorPayload::new(
            ErrorCode::Failed,
            format!("the agent's [kubernetes] configuration is invalid: {e}"),
        )
    })?;
    let node_name = settings.node_name_or(&(ctx.host.facts.hostname)());
    upgrade(&ctx, &settings, packages, &p, &node_name).await
}

/// The phases of an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Read the Node's and the packages' versions.
    ReadVersions,
    /// Check the repository, resolve the versions.
    CheckRepository,
    /// kubeadm's package.
    InstallKubeadm,
    /// `kubeadm upgrade apply`.
    UpgradeApply,
    /// `kubeadm upgrade node`.
    UpgradeNode,
    /// kubelet's and kubectl's packages.
    InstallKubelet,
    /// containerd's package.
    InstallContainerd,
    /// helm.
    InstallHelm,
    /// `systemctl restart kubelet`.
    RestartKubelet,
    /// The Node's version and Ready.
    WaitNode,
}

impl Phase {
    /// Its name in `LOG` lines and messages.
    pub fn name(self) -> &'static str {
        match self {
            Phase::ReadVersions => "read versions",
            Phase::CheckRepository => "check the package repository",
            Phase::InstallKubeadm => "install kubeadm",
            Phase::UpgradeApply => "kubeadm upgrade apply",
            Phase::UpgradeNode => "kubeadm upgrade node",
            Phase::InstallKubelet => "install kubelet and kubectl",
            Phase::InstallContainerd => "install containerd",
            Phase::InstallHelm => "install helm",
            Phase::RestartKubelet => "restart kubelet",
            Phase::WaitNode => "wait for the node",
        }
    }

    fn advice(self) -> &'static str {
        match self {
            Phase::ReadVersions | Phase::CheckRepository => {
                "Nothing was changed: fix the cause and send the upgrade again."
            }
            Phase::InstallKubeadm => {
                "The cluster is unchanged (kubeadm's package may be at the new version): fix the package problem and send the upgrade again."
            }
            Phase::UpgradeApply | Phase::UpgradeNode => {
                "kubeadm's output is in this instruction's LOG lines; fix the cause (`kubeadm upgrade plan` shows the state) and send the upgrade again: kubeadm upgrade can be re-run. Keep the node cordoned."
            }
            Phase::InstallKubelet | Phase::InstallContainerd | Phase::InstallHelm => {
                "kubeadm's part is done; fix the package problem and send the upgrade again (done steps are skipped). Keep the node cordoned."
            }
            Phase::RestartKubelet | Phase::WaitNode => {
                "The packages are upgraded; check `systemctl status kubelet` and `journalctl -u kubelet` on the node, and uncordon it only once it is Ready with the new version (sending the upgrade again re-checks it)."
            }
        }
    }
}

/// Why the run stopped.
struct Stop {
    phase: Phase,
    error: StepError,
}

struct Run<'a> {
    ctx: &'a Ctx,
    s: &'a KubeSettings,
    pk: Arc<dyn PackageOps>,
    target: String,
    before: BTreeMap<String, PackageInfo>,
    /// Packages whose hold this run changed.
    touched: BTreeSet<String>,
    node: Option<NodeApi>,
    previous: String,
    phase: Phase,
    step: usize,
    steps: usize,
    /// The holds are final (the upgrade succeeded) or have been put back: nothing for
    /// [`Drop`] to do.
    settled: bool,
}

/// Dropped unsettled (the dispatcher aborted the executor after its stop grace, e.g. while a
/// cancelled `kubeadm` was still in its SIGTERM grace or the restore was running): the holds
/// are put back by a detached task, logged locally (the instruction has been answered).
impl Drop for Run<'_> {
    fn drop(&mut self) {
        if self.settled || self.touched.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                "UPGRADE_NODE_K8S stopped without a runtime: the holds of {} were not restored",
                list(&self.touched.iter().cloned().collect::<Vec<_>>())
            );
            return;
        };
        let pk = self.pk.clone();
        let ctx = cleanup_ctx(self.ctx);
        let before = std::mem::take(&mut self.before);
        let touched = std::mem::take(&mut self.touched);
        let phase = self.phase.name();
        rt.spawn(async move {
            let msg = restore_holds(pk.as_ref(), &ctx, &before, &touched).await;
            tracing::warn!("UPGRADE_NODE_K8S was stopped in phase `{phase}`; {msg}");
        });
    }
}

/// A context that the instruction's cancellation does not end, with at least
/// [`RESTORE_BUDGET`], for putting the holds back.
fn cleanup_ctx(ctx: &Ctx) -> Ctx {
    let mut cleanup = ctx.clone().with_cancel(CancellationToken::new());
    cleanup.deadline = cleanup.deadline.max(Instant::now() + RESTORE_BUDGET);
    cleanup
}

/// Run the upgrade with explicit settings and node name.
pub async fn upgrade(
    ctx: &Ctx,
    s: &KubeSettings,
    pk: Arc<dyn PackageOps>,
    p: &UpgradeNodeK8s,
    node_name: &str,
) -> Result<UpgradeNodeK8sResponse, ErrorPayload> {
    // The dispatcher has validated it; a direct caller may not have: versions are strict
    // before anything runs.
    {
        use runos_protocol::instructions::Instruction as _;
        p.validate()
            .map_err(|e| ErrorPayload::new(ErrorCode::BadPayload, e.to_string()))?;
    }
    let target = p
        .target_kubernetes_version
        .trim_start_matches('v')
        .to_string();
    // pkgs.k8s.io has one repository per minor version: any other one cannot carry the target.
    let minor = target.rsplit_once('.').map_or("", |(m, _)| m);
    if p.kube_repo_version.trim_start_matches('v') != minor {
        return Err(ErrorPayload::new(
            ErrorCode::BadPayload,
            format!(
                "`kubeRepoVersion` ({}) is not the minor version of `targetKubernetesVersion` ({target})",
                p.kube_repo_version
            ),
        ));
    }
    if !crate::settings::is_dns_subdomain(node_name) {
        return Err(ErrorPayload::new(
            ErrorCode::Failed,
            "the node's name is not a Kubernetes node name: set [kubernetes] node_name",
        ));
    }
    let steps = 7
        + usize::from(!p.target_containerd_version.is_empty())
        + usize::from(!p.target_helm_version.is_empty());
    let mut run = Run {
        ctx,
        s,
        pk,
        target,
        before: BTreeMap::new(),
        touched: BTreeSet::new(),
        node: None,
        previous: String::new(),
        phase: Phase::ReadVersions,
        step: 0,
        steps,
        settled: false,
    };
    match run.phases(p, node_name).await {
        Ok(()) => {
            run.settled = true;
            let msg = format!(
                "upgraded to Kubernetes {}: the node reports kubelet v{} and Ready",
                run.target, run.target
            );
            ctx.log(LogLevel::Info, &msg);
            Ok(UpgradeNodeK8sResponse {
                success: true,
                message: msg,
                previous_version: run.previous.clone(),
                new_version: run.target.clone(),
            })
        }
        Err(stop) => Ok(run.fail(stop).await?),
    }
}

impl Run<'_> {
    fn pkg(&self, p: &str) -> String {
        p.to_string()
    }

    /// Enter `phase`: a cancellation point and a `LOG` line.
    fn enter(&mut self, phase: Phase) -> Result<(), Stop> {
        self.phase = phase;
        if self.ctx.cancel.is_cancelled() {
            return Err(self.stop(StepError::Cancelled));
        }
        self.step += 1;
        self.ctx.log(
            LogLevel::Info,
            &format!("phase {}/{}: {}", self.step, self.steps, phase.name()),
        );
        Ok(())
    }

    fn stop(&self, error: impl Into<StepError>) -> Stop {
        let mut error = error.into();
        // The token fires on the deadline too: which one it was.
        if self.ctx.cancel.is_cancelled() && !matches!(error, StepError::Deadline) {
            error = if self.ctx.remaining().is_zero() {
                StepError::Deadline
            } else {
                StepError::Cancelled
            };
        }
        Stop {
            phase: self.phase,
            error,
        }
    }

    async fn phases(&mut self, p: &UpgradeNodeK8s, node_name: &str) -> Result<(), Stop> {
        let s = self.s;
        let kubeadm = self.pkg(&s.kubeadm_package);
        let kubelet = self.pkg(&s.kubelet_package);
        let kubectl = self.pkg(&s.kubectl_package);
        let containerd = self.pkg(&s.containerd_package);
        let helm_pkg = (!s.helm_package.is_empty()).then(|| self.pkg(&s.helm_package));
        let with_containerd = !p.target_containerd_version.is_empty();
        let with_helm = !p.target_helm_version.is_empty();

        // 1. read versions
        self.enter(Phase::ReadVersions)?;
        let node = self
            .cancellable(NodeApi::from_kubeconfig(&s.kubeconfig, node_name))
            .await?;
        let state = self.cancellable(node.state()).await?;
        self.previous = state.kubelet_version.trim_start_matches('v').to_string();
        self.node = Some(node);
        let mut names = vec![kubeadm.clone(), kubelet.clone(), kubectl.clone()];
        if with_containerd {
            names.push(containerd.clone());
        }
        if let (true, Some(h)) = (with_helm, &helm_pkg) {
            names.push(h.clone());
        }
        let infos = self
            .pk
            .query(self.ctx, &names)
            .await
            .map_err(|e| self.stop(StepError::Failed(e)))?;
        for i in infos {
            self.before.insert(i.name.clone(), i);
        }
        self.ctx.log(
            LogLevel::Info,
            &format!(
                "node {node_name}: kubelet {} (Ready: {}); {}",
                show(&state.kubelet_version),
                state.ready,
                describe(&self.before)
            ),
        );

        // 2. check the package repository, resolve the exact versions
        self.enter(Phase::CheckRepository)?;
        self.pk
            .check_repository(self.ctx, &kubeadm)
            .await
            .map_err(|e| self.stop(StepError::Failed(e)))?;
        let mut want = BTreeMap::new();
        for n in [&kubeadm, &kubelet, &kubectl] {
            let v = self.resolve(n, &self.target.clone()).await?;
            want.insert(n.clone(), v);
        }
        if with_containerd {
            let up = p.target_containerd_version.trim_start_matches('v');
            let v = self.resolve(&containerd, up).await?;
            want.insert(containerd.clone(), v);
        }
        if let (true, Some(h)) = (with_helm, &helm_pkg) {
            let up = p.target_helm_version.trim_start_matches('v');
            let v = self.resolve(h, up).await?;
            want.insert(h.clone(), v);
        }
        self.ctx.log(
            LogLevel::Info,
            &format!(
                "target versions: {}",
                want.iter()
                    .map(|(n, v)| format!("{n} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );

        // 3. kubeadm
        self.enter(Phase::InstallKubeadm)?;
        self.install_held(std::slice::from_ref(&kubeadm), &want, true)
            .await?;

        // 4. kubeadm upgrade
        let argv = if p.is_first_cp {
            self.enter(Phase::UpgradeApply)?;
            vec![
                s.kubeadm.clone(),
                "upgrade".into(),
                "apply".into(),
                format!("v{}", self.target),
                "--yes".into(),
            ]
        } else {
            self.enter(Phase::UpgradeNode)?;
            vec![s.kubeadm.clone(), "upgrade".into(), "node".into()]
        };
        let timeout = KubeSettings::secs(if p.is_first_cp {
            s.upgrade_apply_timeout_secs
        } else {
            s.upgrade_node_timeout_secs
        });
        tool::run(self.ctx, self.phase.name(), argv, timeout, Secrecy::Public)
            .await
            .map_err(|e| self.stop(e))?;

        // 5. kubelet and kubectl
        self.enter(Phase::InstallKubelet)?;
        self.install_held(&[kubelet.clone(), kubectl.clone()], &want, true)
            .await?;

        // 6. containerd
        if with_containerd {
            self.enter(Phase::InstallContainerd)?;
            let keep = self.before.get(&containerd).is_some_and(|i| i.held);
            self.install_held(std::slice::from_ref(&containerd), &want, keep)
                .await?;
        }

        // 7. helm
        if with_helm {
            self.enter(Phase::InstallHelm)?;
            match &helm_pkg {
                Some(h) => {
                    let keep = self.before.get(h).is_some_and(|i| i.held);
                    self.install_held(std::slice::from_ref(h), &want, keep)
                        .await?;
                }
                None => self.helm_download(&p.target_helm_version).await?,
            }
        }

        // 8. restart kubelet
        self.enter(Phase::RestartKubelet)?;
        let t = KubeSettings::secs(s.restart_timeout_secs);
        for (label, args) in [
            ("systemctl daemon-reload", vec!["daemon-reload"]),
            ("systemctl restart kubelet", vec!["restart", "kubelet"]),
        ] {
            let mut argv = vec![s.systemctl.clone()];
            argv.extend(args.into_iter().map(String::from));
            tool::run(self.ctx, label, argv, t, Secrecy::Public)
                .await
                .map_err(|e| self.stop(e))?;
        }

        // 9. wait for the node
        self.enter(Phase::WaitNode)?;
        self.wait_node().await
    }

    /// `fut` (a bounded API call), or a cancelled [`Stop`] as soon as the instruction is.
    async fn cancellable<T>(
        &self,
        fut: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Stop> {
        tokio::select! {
            r = fut => r.map_err(|e| self.stop(StepError::Failed(e))),
            () = self.ctx.cancel.cancelled() => Err(self.stop(StepError::Cancelled)),
        }
    }

    async fn resolve(&self, name: &str, upstream: &str) -> Result<String, Stop> {
        self.pk
            .resolve_version(self.ctx, name, upstream)
            .await
            .map_err(|e| {
                self.stop(StepError::Failed(format!(
                    "no version {upstream} of {name} in the repository: {e}"
                )))
            })
    }

    /// Unhold `names` (when `hold_after`), install their `want` versions (skipping those
    /// already there), hold them again (when `hold_after`).
    async fn install_held(
        &mut self,
        names: &[String],
        want: &BTreeMap<String, String>,
        hold_after: bool,
    ) -> Result<(), Stop> {
        let todo: Vec<&String> = names
            .iter()
            .filter(|n| {
                self.before.get(*n).and_then(|i| i.version.as_deref())
                    != want.get(*n).map(String::as_str)
            })
            .collect();
        let was_held = names
            .iter()
            .any(|n| self.before.get(n).is_some_and(|i| i.held));
        if hold_after || was_held {
            self.touched.extend(names.iter().cloned());
            if !todo.is_empty() {
                self.pk
                    .set_hold(self.ctx, names, false)
                    .await
                    .map_err(|e| self.stop(StepError::Failed(format!("cannot unhold: {e}"))))?;
            }
        }
        for n in &todo {
            let Some(v) = want.get(*n) else {
                return Err(self.stop(StepError::Internal(format!(
                    "no target version was resolved for {n}"
                ))));
            };
            self.ctx.log(LogLevel::Info, &format!("installing {n} {v}"));
            self.pk.install_exact(self.ctx, n, v).await.map_err(|e| {
                self.stop(StepError::Failed(format!("cannot install {n} {v}: {e}")))
            })?;
        }
        if todo.is_empty() {
            self.ctx.log(
                LogLevel::Info,
                &format!("{} already at the target version", names.join(", ")),
            );
        }
        if hold_after {
            self.pk
                .set_hold(self.ctx, names, true)
                .await
                .map_err(|e| self.stop(StepError::Failed(format!("cannot hold: {e}"))))?;
        }
        Ok(())
    }

    async fn helm_download(&mut self, version: &str) -> Result<(), Stop> {
        let s = self.s;
        let want = format!("v{}", version.trim_start_matches('v'));
        if self.helm_version().await.as_deref() == Some(want.as_str()) {
            self.ctx
                .log(LogLevel::Info, &format!("helm is already {want}"));
            return Ok(());
        }
        let arch = crate::helm::arch().map_err(|e| self.stop(StepError::Failed(e)))?;
        let base = crate::settings::helm_base(&s.helm_base_url)
            .map_err(|e| self.stop(StepError::Failed(e)))?;
        self.ctx.log(
            LogLevel::Info,
            &format!(
                "downloading {} from {base} and verifying its published sha256",
                crate::helm::tarball_name(version, arch)
            ),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let timeout = KubeSettings::secs(s.helm_download_timeout_secs).min(self.ctx.remaining());
        let dest = s.helm_path.clone();
        let v = version.to_string();
        let flag = stop.clone();
        let job = tokio::task::spawn_blocking(move || {
            crate::helm::install(&base, &v, arch, &dest, timeout, &flag)
        });
        let _guard = StopOnDrop(stop.clone());
        let res = tokio::select! {
            r = job => r.map_err(|e| self.stop(StepError::Internal(format!("the download task failed: {e}"))))?,
            () = self.ctx.cancel.cancelled() => {
                stop.store(true, Ordering::SeqCst);
                return Err(self.stop(StepError::Cancelled));
            }
        };
        res.map_err(|e| self.stop(StepError::Failed(e)))?;
        match self.helm_version().await {
            Some(v) if v == want => {
                self.ctx.log(
                    LogLevel::Info,
                    &format!("helm {want} installed at {}", s.helm_path.display()),
                );
                Ok(())
            }
            other => Err(self.stop(StepError::Failed(format!(
                "the installed helm reports {} instead of {want}",
                other.as_deref().unwrap_or("no version")
            )))),
        }
    }

    /// `<helm_path> version --template {{.Version}}`, when it runs.
    async fn helm_version(&self) -> Option<String> {
        if !self.s.helm_path.is_file() {
            return None;
        }
        let out = tool::run(
            self.ctx,
            "helm version",
            vec![
                self.s.helm_path.to_string_lossy().into_owned(),
                "version".into(),
                "--template".into(),
                "{{.Version}}".into(),
            ],
            Duration::from_secs(30),
            Secrecy::Secret,
        )
        .await
        .ok()?;
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!v.is_empty() && v.len() <= 64).then_some(v)
    }

    async fn wait_node(&mut self) -> Result<(), Stop> {
        let Some(node) = self.node.clone() else {
            return Err(self.stop(StepError::Internal(
                "the Node was not read in the first phase".into(),
            )));
        };
        let wait = KubeSettings::secs(self.s.node_wait_secs)
            .min(self.ctx.remaining().saturating_sub(WAIT_MARGIN));
        let poll = KubeSettings::secs(self.s.node_poll_secs);
        let until = Instant::now() + wait;
        let want = format!("v{}", self.target);
        let mut said = None;
        let last: Result<NodeState, String> = loop {
            // The API may be restarting: a failed read is retried; the last one is reported.
            let last = tokio::select! {
                r = node.state() => r,
                () = self.ctx.cancel.cancelled() => return Err(self.stop(StepError::Cancelled)),
            };
            if let Ok(st) = &last {
                if st.kubelet_version == want && st.ready {
                    return Ok(());
                }
                let now = (st.kubelet_version.clone(), st.ready);
                if said.as_ref() != Some(&now) {
                    self.ctx.log(
                        LogLevel::Info,
                        &format!(
                            "node reports kubelet {} (Ready: {}); waiting for {want} and Ready",
                            show(&st.kubelet_version),
                            st.ready
                        ),
                    );
                    said = Some(now);
                }
            }
            if Instant::now() + poll > until {
                break last;
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                () = self.ctx.cancel.cancelled() => return Err(self.stop(StepError::Cancelled)),
            }
        };
        let last = match last {
            Ok(st) => format!(
                "it reports kubelet {} (Ready: {})",
                show(&st.kubelet_version),
                st.ready
            ),
            Err(e) => format!("the last read failed: {e}"),
        };
        Err(self.stop(StepError::Failed(format!(
            "the node did not report kubelet {want} and Ready within {} s; {last}",
            wait.as_secs()
        ))))
    }

    /// Put the holds back, read the versions again, and answer.
    async fn fail(&mut self, stop: Stop) -> Result<UpgradeNodeK8sResponse, ErrorPayload> {
        // A context that the cancellation does not end, for the clean-up only.
        let cleanup = cleanup_ctx(self.ctx);
        let restored = restore_holds(self.pk.as_ref(), &cleanup, &self.before, &self.touched).await;
        self.settled = true;
        let phase = stop.phase.name();
        match stop.error {
            StepError::Cancelled | StepError::Deadline => {
                let (code, why) = if stop.error == StepError::Cancelled {
                    (ErrorCode::Cancelled, "cancelled")
                } else {
                    (ErrorCode::Timeout, "stopped by its deadline")
                };
                let msg = format!("the upgrade was {why} in phase `{phase}`; {restored}");
                cleanup.log(LogLevel::Warn, &msg);
                return Err(ErrorPayload::new(code, msg));
            }
            StepError::Failed(_) | StepError::Internal(_) => {}
        }
        let now = self.now_running(&cleanup).await;
        let msg = format!(
            "phase `{phase}` failed: {}. The node now runs: {now}. {restored}. {}",
            stop.error,
            stop.phase.advice()
        );
        cleanup.log(LogLevel::Error, &msg);
        Ok(UpgradeNodeK8sResponse {
            success: false,
            message: msg,
            previous_version: self.previous.clone(),
            new_version: String::new(),
        })
    }

    async fn now_running(&self, ctx: &Ctx) -> String {
        let node = match &self.node {
            Some(n) => match n.state().await {
                Ok(st) => format!(
                    "Node kubelet {} (Ready: {})",
                    show(&st.kubelet_version),
                    st.ready
                ),
                Err(e) => format!("Node unknown ({e})"),
            },
            None => "Node unknown".to_string(),
        };
        let names: Vec<String> = self.before.keys().cloned().collect();
        let pkgs = if names.is_empty() {
            String::new()
        } else {
            match self.pk.query(ctx, &names).await {
                Ok(infos) => {
                    let m: BTreeMap<String, PackageInfo> =
                        infos.into_iter().map(|i| (i.name.clone(), i)).collect();
                    format!("; {}", describe(&m))
                }
                Err(e) => format!("; packages unknown ({e})"),
            }
        };
        format!("{node}{pkgs}")
    }
}

/// Put the holds of `touched` back as `before` says (held or not); what was done, for the
/// message. Errors of the restore itself are reported, never lost.
async fn restore_holds(
    pk: &dyn PackageOps,
    ctx: &Ctx,
    before: &BTreeMap<String, PackageInfo>,
    touched: &BTreeSet<String>,
) -> String {
    if touched.is_empty() {
        return "no hold was changed".into();
    }
    let (held, free): (Vec<String>, Vec<String>) = touched
        .iter()
        .cloned()
        .partition(|n| before.get(n).is_some_and(|i| i.held));
    let mut errors = Vec::new();
    for (names, hold) in [(&held, true), (&free, false)] {
        if names.is_empty() {
            continue;
        }
        if let Err(e) = pk.set_hold(ctx, names, hold).await {
            errors.push(format!(
                "{} {}: {e}",
                if hold { "hold" } else { "unhold" },
                names.join(" ")
            ));
        }
    }
    if errors.is_empty() {
        format!(
            "Holds restored as they were (held: {}; not held: {})",
            list(&held),
            list(&free)
        )
    } else {
        format!(
            "Holds could NOT all be restored ({}): run `apt-mark hold {}` and `apt-mark unhold {}` as needed",
            errors.join("; "),
            list(&held),
            list(&free)
        )
    }
}

/// Sets its flag when dropped (the blocking download stops at its next read).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn show(v: &str) -> &str {
    if v.is_empty() { "(unknown)" } else { v }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn describe(m: &BTreeMap<String, PackageInfo>) -> String {
    m.values()
        .map(|i| {
            format!(
                "{} {}{}",
                i.name,
                i.version.as_deref().unwrap_or("(not installed)"),
                if i.held { " (held)" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
