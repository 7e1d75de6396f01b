//! The apt executor: [`Apt`] and its [`Settings`].

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use runos_executors::Ctx;
use runos_executors::context::Secrecy;
use runos_executors::handle::{Outcome, Spec};
use runos_executors::host::runner::{Ended, Line, LineRate, LineSink, Stream};
use runos_protocol::control::LogLevel;
use runos_protocol::instructions::{
    GetPackages, InstallPackages, Instruction, PackageSpec, PackageState, PackagesReply,
    RemovePackages,
};
use runos_protocol::{ErrorCode, ErrorPayload};
use tokio::sync::mpsc;

use crate::status::{Kind, parse_line};
use crate::{deb822, dpkg, record, simulate, version};

/// The longest [`Settings::lock_timeout`] (a longer one is lowered to it).
pub const MAX_LOCK_TIMEOUT: Duration = Duration::from_secs(3600);
/// Lines of apt's output kept for an error message.
pub const TAIL_LINES: usize = 20;
/// Bytes of apt's output kept for an error message.
pub const TAIL_BYTES: usize = 4096;
/// Longest line of apt's output kept in the tail (longer ones are cut).
const TAIL_LINE_BYTES: usize = 400;
/// Bytes of `dpkg-query` / `apt-cache` output read (a dpkg database of 50 000 packages fits).
const QUERY_OUTPUT_CAP: usize = 16 * 1024 * 1024;
/// Bytes of apt-get / apt-mark output kept by the runner per stream.
const APT_OUTPUT_CAP: usize = 256 * 1024;

/// How the executor runs apt. `Default` is what the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `apt-get` (a name looked up through the runner's tools and `PATH`, or an absolute path).
    pub apt_get: String,
    /// `apt-cache`.
    pub apt_cache: String,
    /// `apt-mark`.
    pub apt_mark: String,
    /// `dpkg-query`.
    pub dpkg_query: String,
    /// How long apt waits for the dpkg lock (`DPkg::Lock::Timeout`); default 120 s, at most
    /// [`MAX_LOCK_TIMEOUT`].
    pub lock_timeout: Duration,
    /// The inactivity watchdog of apt-get: ended when it writes nothing for this long (default
    /// 300 s; never less than the lock timeout plus 30 s).
    pub inactivity: Duration,
    /// Extra apt configuration, each `Key=Value` passed as `-o Key=Value` to apt-get, apt-cache
    /// and apt-mark (after the executor's own, so they can point apt at other sources and lists).
    pub apt_options: Vec<String>,
    /// Install recommended packages too (default false: `--no-install-recommends`).
    pub install_recommends: bool,
    /// Where the record of installed packages is kept (`installed.json`).
    pub state_dir: PathBuf,
    /// dpkg's administrative directory, where its lock files are (to name a lock's holder).
    pub dpkg_dir: PathBuf,
    /// Between SIGTERM and SIGKILL when apt-get must be ended (dpkg is given time to stop at a
    /// safe point).
    pub grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            apt_get: "apt-get".into(),
            apt_cache: "apt-cache".into(),
            apt_mark: "apt-mark".into(),
            dpkg_query: "dpkg-query".into(),
            lock_timeout: Duration::from_secs(120),
            inactivity: Duration::from_secs(300),
            apt_options: Vec::new(),
            install_recommends: false,
            state_dir: PathBuf::from("/var/lib/runos/executors/packages"),
            dpkg_dir: PathBuf::from("/var/lib/dpkg"),
            grace: Duration::from_secs(30),
        }
    }
}

/// The apt executor (`INSTALL_PACKAGES`, `REMOVE_PACKAGES`, `GET_PACKAGES`) and the library
/// API other executors use (kubeadm upgrade, uninstall).
#[derive(Debug)]
pub struct Apt {
    settings: Settings,
    record: std::sync::Mutex<()>,
}

fn failed(message: impl Into<String>) -> ErrorPayload {
    ErrorPayload::new(ErrorCode::Failed, message)
}

fn bad_payload(e: impl std::fmt::Display) -> ErrorPayload {
    ErrorPayload::new(ErrorCode::BadPayload, e.to_string())
}

/// The names of `names`, validated as a `GET_PACKAGES` list (the protocol's rules).
fn check_names(names: &[String]) -> Result<(), ErrorPayload> {
    GetPackages {
        names: names.to_vec(),
    }
    .validate()
    .map_err(bad_payload)
}

fn join(names: &[String]) -> String {
    names.join(", ")
}

/// A package's state for messages: `name 1.2-1 installed (held)`.
fn describe(s: &PackageState) -> String {
    let version = if s.version.is_empty() {
        String::new()
    } else {
        format!(" {}", s.version)
    };
    let held = if s.held { " (held)" } else { "" };
    format!("{}{version} {}{held}", s.name, s.status)
}

/// What an apt-get run left: its outcome, the tail of its text (status lines left out), and
/// the packages dpkg reported errors for.
struct Ran {
    out: Outcome,
    tail: VecDeque<String>,
    pmerrors: Vec<String>,
}

impl Ran {
    fn tail_text(&self) -> String {
        let mut lines: Vec<&str> = Vec::new();
        let mut bytes = 0;
        for l in self.tail.iter().rev() {
            if bytes + l.len() + 1 > TAIL_BYTES {
                break;
            }
            bytes += l.len() + 1;
            lines.push(l);
        }
        lines.reverse();
        lines.join("\n")
    }

    fn lock_error(&self) -> bool {
        self.tail.iter().any(|l| {
            l.contains("Could not get lock")
                || l.contains("Unable to acquire the dpkg frontend lock")
                || l.contains("Unable to lock the administration directory")
        })
    }
}

/// Turns apt's output lines into `LOG` lines and the tail.
struct Progress<'a> {
    ctx: &'a Ctx,
    tail: VecDeque<String>,
    pmerrors: Vec<String>,
    last_download: f64,
    said_waiting: bool,
}

impl Progress<'_> {
    fn line(&mut self, line: Line) {
        if let Some(s) = parse_line(&line.text) {
            match s.kind {
                Kind::Package => self
                    .ctx
                    .log(LogLevel::Info, &format!("{:3.0}% {}", s.percent, s.message)),
                Kind::Download => {
                    if s.percent >= self.last_download + 25.0 || s.percent >= 100.0 {
                        self.last_download = s.percent;
                        self.ctx.log(
                            LogLevel::Info,
                            &format!("download {:3.0}% {}", s.percent, s.message),
                        );
                    }
                }
                Kind::Error => {
                    if !self.pmerrors.contains(&s.subject) {
                        self.pmerrors.push(s.subject.clone());
                    }
                    let text = format!("dpkg error on {}: {}", s.subject, s.message);
                    self.ctx.log(LogLevel::Error, &text);
                    self.push(text);
                }
                Kind::Conffile => self.ctx.log(
                    LogLevel::Warn,
                    &format!("configuration file prompt for {}", s.subject),
                ),
            }
            return;
        }
        let text = line.text.trim_end();
        if text.is_empty() {
            return;
        }
        if text.starts_with("Waiting for cache lock") {
            if !self.said_waiting {
                self.said_waiting = true;
                self.ctx.log(LogLevel::Warn, text);
            }
            // Said once; kept once in the tail.
            if self.tail.back().is_some_and(|l| l == text) {
                return;
            }
        } else if line.stream == Stream::Stderr
            && (text.starts_with("E:") || text.starts_with("W:"))
        {
            self.ctx.log(LogLevel::Warn, text);
        }
        self.push(text.to_string());
    }

    fn push(&mut self, mut text: String) {
        if text.len() > TAIL_LINE_BYTES {
            let mut cut = TAIL_LINE_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text);
    }
}

/// Who holds a lock on `path`, from `/proc/locks` (a kernel machine format): `pid (comm)`.
fn lock_holder(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(path).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: POSIX ADVISORY WRITE <pid> <maj:min:ino> <start> <end>"; waiters have "->".
        if f.len() < 6 || f[1] == "->" {
            continue;
        }
        let Some(file_ino) = f[5].rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) else {
            continue;
        };
        if file_ino != ino {
            continue;
        }
        let pid = f[4];
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        return Some(if comm.is_empty() {
            format!("pid {pid}")
        } else {
            format!("pid {pid}, {comm}")
        });
    }
    None
}

impl Apt {
    /// An executor with `settings`.
    pub fn new(mut settings: Settings) -> Self {
        settings.lock_timeout = settings.lock_timeout.min(MAX_LOCK_TIMEOUT);
        Apt {
            settings,
            record: std::sync::Mutex::new(()),
        }
    }

    /// Its settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn inactivity(&self) -> Duration {
        self.settings
            .inactivity
            .max(self.settings.lock_timeout + Duration::from_secs(30))
    }

    /// `-o` pairs of the configured extra options (each `Key=Value`, not an option itself).
    fn extra_options(&self) -> Result<Vec<String>, ErrorPayload> {
        let mut out = Vec::new();
        for (i, o) in self.settings.apt_options.iter().enumerate() {
            let ok = o.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && !k.starts_with('-') && !k.contains(char::is_whitespace)
            }) && !o.contains('\0');
            if !ok {
                return Err(ErrorPayload::new(
                    ErrorCode::Internal,
                    format!("packages apt_options[{i}] is not of the form Key=Value"),
                ));
            }
            out.push("-o".into());
            out.push(o.clone());
        }
        Ok(out)
    }

    /// apt-get with the executor's fixed options, the extra ones, then `args`.
    fn apt_get_argv(&self, args: &[&str]) -> Result<Vec<String>, ErrorPayload> {
        let mut argv: Vec<String> = vec![
            self.settings.apt_get.clone(),
            "-q".into(),
            "-y".into(),
            "-o".into(),
            "APT::Status-Fd=1".into(),
            "-o".into(),
            format!(
                "DPkg::Lock::Timeout={}",
                self.settings.lock_timeout.as_secs()
            ),
            "-o".into(),
            "Dpkg::Options::=--force-confdef".into(),
            "-o".into(),
            "Dpkg::Options::=--force-confold".into(),
        ];
        argv.extend(self.extra_options()?);
        argv.extend(args.iter().map(|a| a.to_string()));
        Ok(argv)
    }

    fn env() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string()),
            ("APT_LISTCHANGES_FRONTEND".to_string(), "none".to_string()),
        ])
    }

    /// Run apt-get (or apt-mark) with the watchdog, streaming its progress as `LOG` lines.
    async fn run_apt(&self, ctx: &Ctx, argv: Vec<String>) -> Result<Ran, ErrorPayload> {
        if ctx.cancel.is_cancelled() {
            return Err(ErrorPayload::new(
                ErrorCode::Cancelled,
                "the instruction was cancelled",
            ));
        }
        let program = argv[0].clone();
        let mut spec = Spec::new(argv);
        spec.env = Self::env();
        spec.timeout = ctx.remaining();
        spec.grace = self.settings.grace;
        spec.inactivity = Some(self.inactivity());
        spec.output_cap = APT_OUTPUT_CAP;
        let (tx, mut rx) = mpsc::channel(1024);
        spec.lines = Some(LineSink::new(
            tx,
            LineRate {
                per_sec: 5000,
                burst: 1000,
            },
        ));
        let mut p = Progress {
            ctx,
            tail: VecDeque::new(),
            pmerrors: Vec::new(),
            last_download: -100.0,
            said_waiting: false,
        };
        // The spec brings its own sink: Ctx::run sends nothing itself.
        let run = ctx.run(spec, Secrecy::Public);
        tokio::pin!(run);
        let res = loop {
            tokio::select! {
                biased;
                Some(line) = rx.recv() => p.line(line),
                res = &mut run => break res,
            }
        };
        while let Ok(line) = rx.try_recv() {
            p.line(line);
        }
        let out = res.map_err(ErrorPayload::from)?;
        let ran = Ran {
            out,
            tail: p.tail,
            pmerrors: p.pmerrors,
        };
        match ran.out.ended {
            Ended::Exited => Ok(ran),
            Ended::Inactive => Err(failed(format!(
                "{program} wrote nothing for {} s and was ended (inactivity watchdog); apt's output (last lines):\n{}",
                self.inactivity().as_secs(),
                ran.tail_text()
            ))),
            Ended::TimedOut => Err(ErrorPayload::new(
                ErrorCode::Timeout,
                format!("{program} did not finish before the instruction's deadline and was ended"),
            )),
            Ended::Cancelled => Err(ErrorPayload::new(
                ErrorCode::Cancelled,
                format!("the instruction was cancelled; {program} was ended"),
            )),
        }
    }

    /// The error for an apt-get run that exited non-zero, naming `packages` (or the ones dpkg
    /// reported errors for).
    fn apt_failure(&self, what: &str, packages: &[String], ran: &Ran) -> ErrorPayload {
        let exit = ran
            .out
            .exit_code
            .map_or_else(|| "killed by a signal".to_string(), |c| format!("exit {c}"));
        if ran.lock_error() {
            let holder = lock_holder(&self.settings.dpkg_dir.join("lock-frontend"))
                .or_else(|| lock_holder(&self.settings.dpkg_dir.join("lock")))
                .map_or_else(String::new, |h| format!(" ({h})"));
            return failed(format!(
                "the dpkg lock is held by another process{holder} and was not released within {} s (lock timeout); {what} of {} did not run and nothing was changed",
                self.settings.lock_timeout.as_secs(),
                join(packages)
            ));
        }
        let named = if ran.pmerrors.is_empty() {
            packages
        } else {
            &ran.pmerrors[..]
        };
        failed(format!(
            "{what} failed for {} ({exit}); apt's output (last lines):\n{}",
            join(named),
            ran.tail_text()
        ))
    }

    /// What apt would remove to carry out `args` (`apt-get -s`: nothing changes, no lock is
    /// taken). The simulation may change holds (`--allow-change-held-packages`): the real run
    /// releases the holds it must first, and never carries that option.
    async fn simulated_removals(
        &self,
        ctx: &Ctx,
        args: &[&str],
    ) -> Result<Vec<String>, ErrorPayload> {
        let mut all = vec!["-s", "--allow-change-held-packages"];
        all.extend_from_slice(args);
        let argv = self.apt_get_argv(&all)?;
        let out = self.run_query(ctx, argv, &[0]).await.map_err(|e| {
            failed(format!(
                "apt cannot plan this change, nothing was changed: {}",
                e.message
            ))
        })?;
        Ok(simulate::removals(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Run a query program (no `LOG` lines, a large output cap), accepting `ok_codes`.
    async fn run_query(
        &self,
        ctx: &Ctx,
        argv: Vec<String>,
        ok_codes: &[i32],
    ) -> Result<Outcome, ErrorPayload> {
        let program = argv[0].clone();
        let mut spec = Spec::new(argv);
        spec.env = Self::env();
        spec.timeout = ctx.remaining().min(Duration::from_secs(300));
        spec.output_cap = QUERY_OUTPUT_CAP;
        // Not secret, but not progress either: the output stays with the executor.
        let out = ctx
            .run(spec, Secrecy::Secret)
            .await
            .map_err(ErrorPayload::from)?;
        if out.ended != Ended::Exited {
            return Err(failed(format!(
                "{program} did not finish ({:?})",
                out.ended
            )));
        }
        if out.stdout_truncated {
            return Err(failed(format!(
                "{program} wrote more than {QUERY_OUTPUT_CAP} bytes"
            )));
        }
        if !out.exit_code.is_some_and(|c| ok_codes.contains(&c)) {
            let err = String::from_utf8_lossy(&out.stderr);
            let err: String = err.trim().chars().take(TAIL_BYTES).collect();
            return Err(failed(format!(
                "{program} failed ({}): {err}",
                out.exit_code
                    .map_or_else(|| "killed by a signal".to_string(), |c| format!("exit {c}"))
            )));
        }
        Ok(out)
    }

    /// The dpkg database's state of `names` (in order; a name dpkg does not know is
    /// `not-installed`), or of every package when `names` is empty. Read with
    /// `dpkg-query -W --showformat=…`, never from apt's text.
    pub async fn query(
        &self,
        ctx: &Ctx,
        names: &[String],
    ) -> Result<Vec<PackageState>, ErrorPayload> {
        check_names(names)?;
        let mut argv = vec![
            self.settings.dpkg_query.clone(),
            "-W".into(),
            format!("--showformat={}", dpkg::QUERY_FORMAT),
        ];
        argv.extend(names.iter().cloned());
        // Exit 1: some names are not in the database (they are reported not-installed).
        let out = self.run_query(ctx, argv, &[0, 1]).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let rows = dpkg::parse(&text).map_err(|e| failed(e.to_string()))?;
        if names.is_empty() {
            return Ok(rows.iter().map(|r| r.state(&r.binary)).collect());
        }
        Ok(names.iter().map(|n| dpkg::state_of(n, &rows)).collect())
    }

    /// Hold (`apt-mark hold`) or release (`apt-mark unhold`) `names`. Nothing runs for an empty
    /// list.
    pub async fn set_hold(
        &self,
        ctx: &Ctx,
        names: &[String],
        hold: bool,
    ) -> Result<(), ErrorPayload> {
        check_names(names)?;
        if names.is_empty() {
            return Ok(());
        }
        let verb = if hold { "hold" } else { "unhold" };
        let mut argv = vec![self.settings.apt_mark.clone()];
        argv.extend(self.extra_options()?);
        argv.push(verb.into());
        argv.extend(names.iter().cloned());
        ctx.log(LogLevel::Info, &format!("apt-mark {verb} {}", join(names)));
        let ran = self.run_apt(ctx, argv).await?;
        if ran.out.exit_code != Some(0) {
            return Err(self.apt_failure(&format!("apt-mark {verb}"), names, &ran));
        }
        Ok(())
    }

    /// `apt-get update`.
    pub async fn update_index(&self, ctx: &Ctx) -> Result<(), ErrorPayload> {
        ctx.log(LogLevel::Info, "apt-get update");
        let ran = self.run_apt(ctx, self.apt_get_argv(&["update"])?).await?;
        if ran.out.exit_code != Some(0) {
            return Err(self.apt_failure("apt-get update", &[], &ran));
        }
        Ok(())
    }

    /// The repository stanzas (`apt-cache show`, deb822) of `name` that can be downloaded (they
    /// have a `Filename`; the dpkg database's own stanza has none).
    async fn available(&self, ctx: &Ctx, name: &str) -> Result<Vec<String>, ErrorPayload> {
        check_names(&[name.to_string()])?;
        let mut argv = vec![self.settings.apt_cache.clone()];
        argv.extend(self.extra_options()?);
        argv.push("show".into());
        argv.push(name.into());
        // Exit 100: apt knows no such package.
        let out = self.run_query(ctx, argv, &[0, 100]).await?;
        let base = name.split_once(':').map_or(name, |(p, _)| p);
        Ok(deb822::parse(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .filter(|s| s.get("Package") == Some(base) && s.get("Filename").is_some())
            .filter_map(|s| s.get("Version").map(str::to_string))
            .collect())
    }

    /// The highest available Debian version of `name` whose upstream version is `upstream`
    /// (`1.30.2` → `1.30.2-1.1`), from apt's lists (`apt-cache show`, deb822) ordered as dpkg
    /// orders versions. `not_found` when there is none.
    pub async fn resolve_version(
        &self,
        ctx: &Ctx,
        name: &str,
        upstream: &str,
    ) -> Result<String, ErrorPayload> {
        InstallPackages {
            packages: vec![PackageSpec {
                name: name.into(),
                version: Some(upstream.into()),
            }],
            hold: false,
            unhold: false,
            update_index: false,
        }
        .validate()
        .map_err(bad_payload)?;
        let versions = self.available(ctx, name).await?;
        versions
            .iter()
            .filter(|v| version::has_upstream(v, upstream))
            .max_by(|a, b| version::compare(a, b))
            .cloned()
            .ok_or_else(|| {
                let mut known = versions.clone();
                known.sort_by(|a, b| version::compare(b, a));
                known.truncate(10);
                ErrorPayload::new(
                    ErrorCode::NotFound,
                    format!(
                        "no version {upstream}-* of {name} in the configured repositories (available: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                )
            })
    }

    /// Whether a configured repository offers `name` (apt's lists know a downloadable version
    /// of it): `not_found` otherwise. Run [`Apt::update_index`] first to check the repository is
    /// reachable now.
    pub async fn check_repository(&self, ctx: &Ctx, name: &str) -> Result<(), ErrorPayload> {
        if self.available(ctx, name).await?.is_empty() {
            return Err(ErrorPayload::new(
                ErrorCode::NotFound,
                format!(
                    "no configured repository offers {name} (is the repository configured and its index updated?)"
                ),
            ));
        }
        Ok(())
    }

    /// The packages this agent installed (sorted), from its record.
    pub fn recorded(&self) -> Result<Vec<String>, ErrorPayload> {
        Ok(record::load(&self.settings.state_dir)?
            .into_iter()
            .collect())
    }

    fn update_record(&self, added: Vec<String>, dropped: &[String]) -> Result<(), ErrorPayload> {
        let _g = self.record.lock().unwrap_or_else(|p| p.into_inner());
        record::update(&self.settings.state_dir, added, dropped)
    }

    /// `before` and `after` side by side: `after` with `changed` set, and whether any changed.
    fn reply(before: &[PackageState], mut after: Vec<PackageState>) -> PackagesReply {
        for (a, b) in after.iter_mut().zip(before) {
            a.changed = a.version != b.version || a.status != b.status || a.held != b.held;
        }
        let changed = after.iter().any(|p| p.changed);
        PackagesReply {
            packages: after,
            changed,
        }
    }

    /// A failure's message with the packages' states now (best effort).
    async fn with_states(&self, ctx: &Ctx, mut e: ErrorPayload, names: &[String]) -> ErrorPayload {
        if let Ok(now) = self.query(ctx, names).await {
            let states: Vec<String> = now.iter().map(describe).collect();
            e.message = format!("{}\npackage states now: {}", e.message, states.join("; "));
        }
        e
    }

    /// `INSTALL_PACKAGES`. See docs/protocol.md §10 and docs/packages.md.
    pub async fn install(
        &self,
        ctx: &Ctx,
        req: InstallPackages,
    ) -> Result<PackagesReply, ErrorPayload> {
        req.validate().map_err(bad_payload)?;
        if req.update_index {
            self.update_index(ctx).await?;
        }
        let names: Vec<String> = req.packages.iter().map(|p| p.name.clone()).collect();
        let before = self.query(ctx, &names).await?;
        let mut refused = Vec::new();
        let mut to_unhold = Vec::new();
        let mut to_install = Vec::new();
        let mut install_names = Vec::new();
        let mut to_hold = Vec::new();
        for (p, st) in req.packages.iter().zip(&before) {
            let needs =
                st.status != "installed" || p.version.as_ref().is_some_and(|v| *v != st.version);
            if needs && st.held && !req.unhold {
                refused.push(describe(st));
                continue;
            }
            let release = st.held && req.unhold && (needs || !req.hold);
            if release {
                to_unhold.push(p.name.clone());
            }
            if needs {
                to_install.push(match &p.version {
                    Some(v) => format!("{}={v}", p.name),
                    None => p.name.clone(),
                });
                install_names.push(p.name.clone());
            }
            if req.hold && (!st.held || release) {
                to_hold.push(p.name.clone());
            }
        }
        if !refused.is_empty() {
            return Err(ErrorPayload::new(
                ErrorCode::Refused,
                format!(
                    "held package(s) would change: {}; nothing was changed (send unhold: true to release the hold)",
                    refused.join("; ")
                ),
            ));
        }
        if to_install.is_empty() && to_hold.is_empty() && to_unhold.is_empty() {
            ctx.log(
                LogLevel::Info,
                "every package is already as asked: nothing to do",
            );
            return Ok(Self::reply(&before, before.clone()));
        }
        let mut args = vec!["--allow-downgrades"];
        if !self.settings.install_recommends {
            args.push("--no-install-recommends");
        }
        args.push("install");
        args.extend(to_install.iter().map(String::as_str));
        if !to_install.is_empty() {
            // An install never removes a package (a conflicting one) behind the caller's back.
            let removed = self.simulated_removals(ctx, &args).await?;
            if !removed.is_empty() {
                return Err(ErrorPayload::new(
                    ErrorCode::Refused,
                    format!(
                        "installing {} would remove {}; nothing was changed (remove them first with REMOVE_PACKAGES if that is intended)",
                        join(&install_names),
                        join(&removed)
                    ),
                ));
            }
        }
        self.set_hold(ctx, &to_unhold, false).await?;
        if !to_install.is_empty() {
            ctx.log(
                LogLevel::Info,
                &format!("apt-get install {}", to_install.join(" ")),
            );
            let result = match self.run_apt(ctx, self.apt_get_argv(&args)?).await {
                Ok(ran) if ran.out.exit_code == Some(0) => Ok(()),
                Ok(ran) => Err(self.apt_failure("apt-get install", &install_names, &ran)),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                // Never leave a hold released by a failed install.
                if !to_unhold.is_empty() && self.set_hold(ctx, &to_unhold, true).await.is_ok() {
                    ctx.log(
                        LogLevel::Warn,
                        &format!("holds restored: {}", join(&to_unhold)),
                    );
                }
                self.record_installed(ctx, &install_names, &before).await;
                return Err(self.with_states(ctx, e, &names).await);
            }
        }
        self.set_hold(ctx, &to_hold, true).await?;
        let after = self.query(ctx, &names).await?;
        self.record_after(&install_names, &before, &after)?;
        Ok(Self::reply(&before, after))
    }

    /// Record what a failed install left installed (best effort).
    async fn record_installed(&self, ctx: &Ctx, names: &[String], before: &[PackageState]) {
        if let Ok(after) = self.query(ctx, names).await {
            let before: Vec<PackageState> = names
                .iter()
                .map(|n| {
                    before
                        .iter()
                        .find(|b| b.name == *n)
                        .cloned()
                        .unwrap_or_default()
                })
                .collect();
            let _ = self.record_after(names, &before, &after);
        }
    }

    /// Record the packages of `installed` (names apt was asked to install) that dpkg now has
    /// and that changed.
    fn record_after(
        &self,
        installed: &[String],
        before: &[PackageState],
        after: &[PackageState],
    ) -> Result<(), ErrorPayload> {
        let added: Vec<String> = after
            .iter()
            .filter(|a| installed.contains(&a.name) && a.status != "not-installed")
            .filter(|a| {
                before
                    .iter()
                    .find(|b| b.name == a.name)
                    .is_none_or(|b| b.version != a.version || b.status != a.status)
            })
            .map(|a| a.name.clone())
            .collect();
        self.update_record(added, &[])
    }

    /// `REMOVE_PACKAGES`. See docs/protocol.md §10 and docs/packages.md.
    pub async fn remove(
        &self,
        ctx: &Ctx,
        req: RemovePackages,
    ) -> Result<PackagesReply, ErrorPayload> {
        req.validate().map_err(bad_payload)?;
        let names: Vec<String> = req.packages.iter().map(|p| p.name.clone()).collect();
        let before = self.query(ctx, &names).await?;
        let mut refused = Vec::new();
        let mut to_unhold = Vec::new();
        let mut to_remove = Vec::new();
        for st in &before {
            let needs = if req.purge {
                st.status != "not-installed"
            } else {
                st.status != "not-installed" && st.status != "config-files"
            };
            if st.held && req.unhold {
                to_unhold.push(st.name.clone());
            } else if st.held && needs {
                refused.push(describe(st));
                continue;
            }
            if needs {
                to_remove.push(st.name.clone());
            }
        }
        if !refused.is_empty() {
            return Err(ErrorPayload::new(
                ErrorCode::Refused,
                format!(
                    "held package(s) would be removed: {}; nothing was changed (send unhold: true to release the hold)",
                    refused.join("; ")
                ),
            ));
        }
        if to_remove.is_empty() && to_unhold.is_empty() {
            ctx.log(
                LogLevel::Info,
                "every package is already removed: nothing to do",
            );
            return Ok(Self::reply(&before, before.clone()));
        }
        let verb = if req.purge { "purge" } else { "remove" };
        if !to_remove.is_empty() {
            // Only what was named: never the packages that depend on it, silently.
            let mut args = vec![verb];
            args.extend(to_remove.iter().map(String::as_str));
            let asked: Vec<&str> = to_remove.iter().map(|n| simulate::base(n)).collect();
            let extra: Vec<String> = self
                .simulated_removals(ctx, &args)
                .await?
                .into_iter()
                .filter(|n| !asked.contains(&n.as_str()))
                .collect();
            if !extra.is_empty() {
                return Err(ErrorPayload::new(
                    ErrorCode::Refused,
                    format!(
                        "removing {} would also remove {} (they depend on it); nothing was changed (name them too to remove them)",
                        join(&to_remove),
                        join(&extra)
                    ),
                ));
            }
        }
        self.set_hold(ctx, &to_unhold, false).await?;
        if !to_remove.is_empty() {
            ctx.log(
                LogLevel::Info,
                &format!("apt-get {verb} {}", to_remove.join(" ")),
            );
            let mut args = vec![verb];
            args.extend(to_remove.iter().map(String::as_str));
            let what = format!("apt-get {verb}");
            let result = match self.run_apt(ctx, self.apt_get_argv(&args)?).await {
                Ok(ran) if ran.out.exit_code == Some(0) => Ok(()),
                Ok(ran) => Err(self.apt_failure(&what, &to_remove, &ran)),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                if !to_unhold.is_empty() {
                    let _ = self.set_hold(ctx, &to_unhold, true).await;
                }
                return Err(self.with_states(ctx, e, &names).await);
            }
        }
        let after = self.query(ctx, &names).await?;
        let purged: Vec<String> = after
            .iter()
            .filter(|a| a.status == "not-installed")
            .map(|a| a.name.clone())
            .collect();
        self.update_record(Vec::new(), &purged)?;
        Ok(Self::reply(&before, after))
    }

    /// `GET_PACKAGES`: the dpkg database's state of the names, or of every package.
    pub async fn get(&self, ctx: &Ctx, req: GetPackages) -> Result<PackagesReply, ErrorPayload> {
        req.validate().map_err(bad_payload)?;
        Ok(PackagesReply {
            packages: self.query(ctx, &req.names).await?,
            changed: false,
        })
    }
}
