//! The command line (`clap` derive) and the mapping of outcomes to stable exit codes.

pub mod certificate;
pub mod etcd;
pub mod journal;
pub mod status;
pub mod uninstall;
pub mod update;
pub mod vpn;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::config::{self, LogLevel};
use crate::credentials::enrol as register;
use crate::exit::{EXIT_CODES_HELP, Exit};
use crate::{daemon, logging};

/// The runos node agent.
#[derive(Debug, Parser)]
#[command(name = "runos", version = crate::AGENT_VERSION, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = config::CONFIG_ENV, value_name = "PATH", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log level (error, warn, info, debug, trace); `RUNOS_LOG` overrides it.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: Option<LogLevel>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

fn parse_level(s: &str) -> Result<LogLevel, String> {
    match s {
        "error" => Ok(LogLevel::Error),
        "warn" => Ok(LogLevel::Warn),
        "info" => Ok(LogLevel::Info),
        "debug" => Ok(LogLevel::Debug),
        "trace" => Ok(LogLevel::Trace),
        _ => Err("must be one of error, warn, info, debug, trace".into()),
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enrol this node with a control plane (generates the key here; only a CSR is sent).
    #[command(after_help = EXIT_CODES_HELP)]
    Register(RegisterArgs),
    /// Run the agent daemon in the foreground (logs to stderr; exits 0 on SIGTERM/SIGINT;
    /// SIGHUP reloads the configuration).
    #[command(after_help = EXIT_CODES_HELP)]
    Agent,
    /// Print the agent and protocol versions.
    #[command(after_help = EXIT_CODES_HELP)]
    Version {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report the agent's health (exit 0 healthy, 8 degraded, 9 not running).
    ///
    /// Asks the running agent through its local admin socket
    /// (`<paths.run_dir>/admin.sock`, mode 0600, root only): connection state, last successful
    /// round trip, certificate expiry (read from `paths.certificate`, so shown even when the
    /// agent is down), agent version, in-flight and queued instructions (tags and types only),
    /// journal size and recent errors. Exits 0 when healthy, 8 when degraded (disconnected for
    /// more than 5 minutes, revoked, or the certificate expired; a certificate expiring within
    /// 24 h is only a warning), 9 when the agent daemon is not running.
    #[command(after_help = EXIT_CODES_HELP)]
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify an artifact's checksum and build-provenance attestation exactly as the updater
    /// does (exit 0 verified, 2 usage, 10 verification failed).
    ///
    /// Computes FILE's sha256, checks it against --checksums when given, then verifies the
    /// Sigstore bundle offline: signed by the workflow --workflow of --repo at --version's tag
    /// (or --ref), issued by GitHub Actions, on a GitHub-hosted runner, logged in Rekor, with
    /// exactly one subject named --asset whose sha256 is FILE's. Prints what was verified
    /// (identity, issuer, repository, ref, commit, runner, log index, time) or what failed.
    #[command(after_help = EXIT_CODES_HELP)]
    Verify(VerifyArgs),
    /// Download, verify and install another runos release, then restart into it with a health
    /// gate and automatic rollback (exit 0 updated or nothing to do; see the codes below).
    ///
    /// Downloads `<release_base>/download/<vX.Y.Z>/` `nodeagent-linux-<arch>`, `checksums.txt`
    /// and the attestation bundle, verifies them as `runos verify` does, installs the binary
    /// side by side in `<install_dir>/<vX.Y.Z>/runos` and swaps `bin_link` atomically. When the
    /// agent daemon runs, launches the restart hand-off and waits for the health gate: the new
    /// agent must report the new version and be connected within `update.health_timeout_secs`,
    /// else the link is swapped back, the old agent restarted and the version refused for
    /// automatic updates. Any failure before the swap leaves the running binary and the link
    /// untouched.
    #[command(after_help = EXIT_CODES_HELP)]
    Update {
        /// The release to install, exactly `vX.Y.Z` (default: the version the control plane
        /// advertises, asked from the running agent).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Allow a version older than the running one or the highest ever installed.
        #[arg(long)]
        allow_downgrade: bool,
        /// Install and swap the link, but do not restart the agent (no health gate).
        #[arg(long)]
        no_restart: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Internal: the update hand-off (restart, health gate, rollback), launched by the agent
    /// or `runos update` outside the agent's cgroup.
    #[command(hide = true)]
    UpdateFinish {
        /// The version that was running.
        #[arg(long, value_name = "V")]
        from: String,
        /// The version installed.
        #[arg(long, value_name = "V")]
        to: String,
        /// The previous binary (`bin_link`'s target before the swap).
        #[arg(long, value_name = "PATH")]
        previous: String,
    },
    /// Inspect the node certificate.
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Certificate(CertificateCommand),
    /// The WireGuard overlay (docs/overlay.md).
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Vpn(VpnCommand),
    /// etcd membership, through the etcd API with the `[etcd]` settings (docs/etcd.md); runs
    /// here, not through the agent daemon.
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Etcd(EtcdCommand),
    /// Take runos off this node (docs/uninstall.md): stop kubelet and containerd, `kubeadm
    /// reset -f`, remove the overlay, purge the packages runos installed, remove the files runos
    /// wrote (only those, and only while unchanged), then this node's key and certificate.
    ///
    /// The same steps as `UNINSTALL_NODE`, run here; the agent must be stopped first (exit 7
    /// otherwise). Asks for `yes` on a terminal unless --yes. Exit 0 done; 1 a step failed
    /// (the output names it and the steps not done; run it again once fixed); 2 not confirmed.
    #[command(after_help = EXIT_CODES_HELP)]
    Uninstall {
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show recent instructions and their outcomes, from the agent's journal (exit 0; 1 when
    /// `--tag` names no entry; 9 when the agent is not running).
    ///
    /// Asks the running agent through its local admin socket (as `runos status`). Each entry:
    /// tag, type, sha256 of the payload (never the payload), state (queued, running, finished,
    /// acked), accepted/started/finished/acked times (RFC 3339), duration, reply type and error
    /// code. The journal keeps an entry until 24 h after its reply was acknowledged. Newest first.
    #[command(after_help = EXIT_CODES_HELP)]
    Journal {
        /// Show only the instruction with this tag (a UUID), in full.
        #[arg(long, value_name = "TAG", value_parser = parse_tag)]
        tag: Option<runos_protocol::Tag>,
        /// Show at most N entries (1 to 1000).
        #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `runos verify` arguments.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("ref_source").required(true).args(["version", "git_ref"]))]
pub struct VerifyArgs {
    /// The artifact to verify (a release binary, any attested file).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Its Sigstore bundle (`<asset>.sigstore.json`, or `gh attestation download` output).
    #[arg(long, value_name = "FILE")]
    pub bundle: PathBuf,
    /// The repository that must have built it, `owner/name` (default: `update.repo`,
    /// `runos-dev/runos`).
    #[arg(long, value_name = "OWNER/REPO")]
    pub repo: Option<String>,
    /// The workflow that must have signed it (default: `update.workflow`,
    /// `.github/workflows/release.yml`).
    #[arg(long, value_name = "PATH")]
    pub workflow: Option<String>,
    /// The release tag it must come from (`vX.Y.Z`; the ref is `refs/tags/vX.Y.Z`).
    #[arg(long, value_name = "V")]
    pub version: Option<String>,
    /// The git ref it must come from (instead of --version), e.g. `refs/heads/main`.
    #[arg(long = "ref", value_name = "REF")]
    pub git_ref: Option<String>,
    /// The attested subject name (default: FILE's file name).
    #[arg(long, value_name = "NAME")]
    pub asset: Option<String>,
    /// A Sigstore trusted_root.json (default: `update.trusted_root`, else the public-good root
    /// built in).
    #[arg(long, value_name = "FILE")]
    pub trusted_root: Option<PathBuf>,
    /// A checksums.txt that must list the asset with FILE's sha256.
    #[arg(long, value_name = "FILE")]
    pub checksums: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `runos etcd` subcommands.
#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// Show the cluster: id, leader, raft index, database size, and each member's status,
    /// health (its own answer, from its client URLs) and role (exit 0; 8 when the cluster is
    /// unhealthy; 15 when etcd cannot be reached).
    #[command(after_help = EXIT_CODES_HELP)]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a member, as `REMOVE_ETCD_MEMBER` does: refused when quorum would be lost,
    /// leadership moved off it first when it leads, the member list checked afterwards (exit 0
    /// removed or not confirmed; 16 no such member; 17 refused; 15 etcd unreachable; 1 a step
    /// failed; 2 no --yes and standard input is not a terminal).
    #[command(after_help = EXIT_CODES_HELP)]
    #[command(group = clap::ArgGroup::new("etcd_target").required(true).args(["ip", "id"]))]
    Remove {
        /// The member whose peer URL host is exactly this IP address.
        #[arg(long, value_name = "IP")]
        ip: Option<String>,
        /// The member with this id (hex, as `runos etcd list` prints it).
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `runos vpn` subcommands.
#[derive(Debug, Subcommand)]
pub enum VpnCommand {
    /// Show the overlay (exit 0; 1 when a peer set is applied but the device cannot be read;
    /// 9 when the agent is not running).
    ///
    /// Asks the running agent through its local admin socket: backend, interface, this node's
    /// public key, the applied generation, and each peer on the device with its endpoint,
    /// allowed IPs, seconds since its last handshake (judged per backend) and bytes received and
    /// sent.
    #[command(after_help = EXIT_CODES_HELP)]
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `runos certificate` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertificateCommand {
    /// Show the node certificate (exit 0 valid, 8 expired, 3 missing or unreadable).
    ///
    /// Reads `paths.certificate` itself, so it works without the agent daemon: node id, serial,
    /// notBefore, notAfter, lifetime used (%), time left until expiry, and the L2Sec CA file
    /// (`paths.ca`). Validity is judged with the control plane's time (local time corrected by
    /// the clock offset the running agent measured at WELCOME and on each heartbeat) when the
    /// agent daemon answers on its admin socket and has connected, else with the local clock
    /// (`judgedBy`: `server` or `local`). Exits 0 when valid, 8 when expired, 3 when the
    /// certificate file is missing or unreadable (run `runos register`).
    #[command(after_help = EXIT_CODES_HELP)]
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Renew the node certificate now (the agent also renews on its own at about two thirds of
    /// the lifetime).
    ///
    /// Through the running agent when its admin socket answers; otherwise directly (taking the
    /// agent's lock, so not while an agent runs). A new key is generated on the node and a CSR
    /// sent over L2Sec; the new certificate and CA bundle are used only once an L2Sec session
    /// with them has succeeded, and the old ones stay until then. Exits 0 when renewed, 3 when
    /// not registered, 4 when the control plane cannot be reached, 5 when it refuses (revoked),
    /// 6 on a TLS failure, 7 when an agent holds the lock but does not answer, 1 otherwise.
    #[command(after_help = EXIT_CODES_HELP)]
    Renew {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_tag(s: &str) -> Result<runos_protocol::Tag, String> {
    runos_protocol::Tag::parse(s)
        .map_err(|_| "must be a tag: a UUID in its hyphenated 36-character form".into())
}

/// `runos register` arguments.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("token_source").required(true).args(["token_file", "token"]))]
pub struct RegisterArgs {
    /// Control-plane host name or IP address.
    #[arg(long, value_name = "HOST")]
    pub server: String,
    /// File holding the enrolment token (keeps it out of `ps`; use mode 0600).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// `-` to read the token from standard input (the token itself is never an argument).
    #[arg(long, value_name = "-", value_parser = clap::builder::PossibleValuesParser::new(["-"]))]
    pub token: Option<String>,
    /// The L1Sec CA certificate (default: `paths.l1_ca`; copied there when given elsewhere).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Expected sha256 of the CA certificate's DER (default: the pin inside the token, else
    /// `server.l1_ca_sha256`; all that are given must agree).
    #[arg(long, value_name = "HEX")]
    pub ca_sha256: Option<String>,
    /// Register without any CA pin, trusting every certificate in the CA file (insecure: anyone
    /// who could change that file can impersonate the control plane).
    #[arg(long, conflicts_with = "ca_sha256")]
    pub insecure_skip_pin: bool,
    /// L1Sec port (written back to the configuration).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub l1_port: Option<u16>,
    /// L2Sec port (written back to the configuration).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub l2_port: Option<u16>,
    /// Replace this node's existing identity. The new key and certificate are used only once an
    /// L2Sec session with them has succeeded; until then (and if that fails) the node keeps
    /// its current identity. Without --force, register refuses (exit 2) when the node is
    /// already registered.
    #[arg(long)]
    pub force: bool,
    /// Print JSON (`{"nodeId": ..., "l2Verified": ...}`).
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn report_error(json_out: bool, exit: Exit, message: &str) -> Exit {
    eprintln!("runos: error: {message}");
    if json_out {
        println!("{}", json!({"error": message, "exitCode": exit.code()}));
    }
    exit
}

/// Threads the blocking pool grows to at most (`spawn_blocking`: the updater's downloads and
/// installs, the renewal's file steps, after-ACK steps): beyond it, blocking work waits for a
/// free thread.
pub const MAX_BLOCKING_THREADS: usize = 16;
/// How long an idle blocking thread is kept before it exits.
pub const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// The runtime a command runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// One thread runs every task (the daemon: session, dispatcher and executors' async parts
    /// hand work to each other without a thread switch); blocking work goes to the blocking
    /// pool (`spawn_blocking`), never `block_in_place`.
    CurrentThread,
    /// Worker threads: for commands that drive async work from synchronous code with
    /// `Handle::block_on` outside `Runtime::block_on` (`update`, `update-finish`), which a
    /// current-thread runtime cannot drive.
    MultiThread,
}

/// Build the runtime of `flavor`, with a bounded blocking pool.
pub fn runtime(flavor: Flavor) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match flavor {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Flavor::MultiThread => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()
}

/// The runtime flavor of `command`.
fn flavor_of(command: &Command) -> Flavor {
    match command {
        Command::Update { .. } | Command::UpdateFinish { .. } => Flavor::MultiThread,
        _ => Flavor::CurrentThread,
    }
}

/// Run a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> Exit {
    let rt = match runtime(flavor_of(&cli.command)) {
        Ok(rt) => rt,
        Err(e) => {
            return report_error(
                false,
                Exit::Failure,
                &format!("cannot start the runtime: {e}"),
            );
        }
    };
    match cli.command {
        Command::Version { json } => {
            if json {
                println!(
                    "{}",
                    json!({"agentVersion": crate::agent_version(), "protocolVersion": runos_protocol::PROTOCOL_VERSION})
                );
            } else {
                println!(
                    "runos {} (protocol {})",
                    crate::agent_version(),
                    runos_protocol::PROTOCOL_VERSION
                );
            }
            Exit::Ok
        }
        Command::Register(a) => {
            let level = cli.log_level.unwrap_or(LogLevel::Warn);
            logging::init(level.as_str(), config::LogFormat::Text);
            let opts = register::Options {
                config_path: cli.config,
                server: a.server,
                token: match a.token_file {
                    Some(f) => register::TokenSource::File(f),
                    None => register::TokenSource::Stdin,
                },
                ca_file: a.ca_file,
                ca_sha256: a.ca_sha256,
                insecure_skip_pin: a.insecure_skip_pin,
                l1_port: a.l1_port,
                l2_port: a.l2_port,
                force: a.force,
            };
            match rt.block_on(register::register(&opts)) {
                Ok(out) => {
                    // A running agent picks the new identity up at once.
                    let reconnected = out.replaced.is_some()
                        && config::load(&opts.config_path).is_ok_and(|(cfg, _)| {
                            crate::util::admin_client::request(
                                &cfg.paths.admin_socket(),
                                &json!({"op": "reconnect"}),
                            )
                            .is_ok()
                        });
                    if a.json {
                        let mut v = json!(out);
                        v["agentReconnected"] = json!(reconnected);
                        println!("{v}");
                    } else {
                        match &out.replaced {
                            Some(old) => println!(
                                "registered: node id {} (replaces node id {old}; the new identity was verified on L2Sec)",
                                out.node_id
                            ),
                            None => println!("registered: node id {}", out.node_id),
                        }
                        if let Some(e) = &out.l2_error {
                            eprintln!(
                                "runos: warning: the identity is stored, but an L2Sec session with it failed: {e}; check the L2Sec port (--l2-port) and the firewall"
                            );
                        }
                        if reconnected {
                            println!("the running agent is reconnecting with the new identity");
                        } else {
                            println!(
                                "start the agent with `runos agent` (or `systemctl start runos`)"
                            );
                        }
                    }
                    Exit::Ok
                }
                Err(e) => report_error(a.json, e.exit, &e.message),
            }
        }
        Command::Status { json } => match config::load(&cli.config) {
            Ok((cfg, _)) => crate::cli::status::run(&cfg, json),
            Err(e) => report_error(json, Exit::NotRegistered, &e.to_string()),
        },
        Command::Certificate(CertificateCommand::Status { json }) => {
            match config::load(&cli.config) {
                Ok((cfg, _)) => crate::cli::certificate::run(&cfg, json),
                Err(e) => report_error(json, Exit::NotRegistered, &e.to_string()),
            }
        }
        Command::Certificate(CertificateCommand::Renew { json }) => {
            match config::load(&cli.config) {
                Ok((cfg, _)) => {
                    logging::init(
                        cli.log_level.unwrap_or(cfg.log.level).as_str(),
                        config::LogFormat::Text,
                    );
                    crate::cli::certificate::renew(&cfg, &cli.config, json, &rt)
                }
                Err(e) => report_error(json, Exit::NotRegistered, &e.to_string()),
            }
        }
        Command::Verify(a) => match config::load(&cli.config) {
            Ok((cfg, _)) => crate::cli::update::verify_cmd(
                &cfg,
                &crate::cli::update::VerifyOptions {
                    file: a.file,
                    bundle: a.bundle,
                    repo: a.repo,
                    workflow: a.workflow,
                    version: a.version,
                    git_ref: a.git_ref,
                    asset: a.asset,
                    trusted_root: a.trusted_root,
                    checksums: a.checksums,
                    json: a.json,
                },
            ),
            Err(e) => report_error(a.json, Exit::NotRegistered, &e.to_string()),
        },
        Command::Update {
            version,
            allow_downgrade,
            no_restart,
            json,
        } => match config::load(&cli.config) {
            Ok((cfg, _)) => {
                logging::init(
                    cli.log_level.unwrap_or(LogLevel::Warn).as_str(),
                    config::LogFormat::Text,
                );
                crate::cli::update::update_cmd(
                    &cfg,
                    &cli.config,
                    &crate::cli::update::UpdateOptions {
                        version,
                        allow_downgrade,
                        no_restart,
                        json,
                    },
                    &rt,
                )
            }
            Err(e) => report_error(json, Exit::NotRegistered, &e.to_string()),
        },
        Command::UpdateFinish { from, to, previous } => {
            let cfg = match config::load(&cli.config) {
                Ok((c, _)) => c,
                Err(e) => return report_error(false, Exit::NotRegistered, &e.to_string()),
            };
            logging::init(
                cli.log_level.unwrap_or(cfg.log.level).as_str(),
                cfg.log.format,
            );
            let parsed = (
                crate::update::version::Version::parse_tag(&from),
                crate::update::version::Version::parse_tag(&to),
                crate::update::handoff::previous_path(&previous),
            );
            match parsed {
                (Ok(from), Ok(to), Ok(previous)) => {
                    crate::update::handoff::finish(&cfg, from, to, &previous, rt.handle())
                }
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    report_error(false, Exit::Usage, &e)
                }
            }
        }
        Command::Etcd(c) => {
            let json = match &c {
                EtcdCommand::List { json } | EtcdCommand::Remove { json, .. } => *json,
            };
            let cfg = match config::load(&cli.config) {
                Ok((cfg, _)) => cfg,
                Err(e) => return report_error(json, Exit::NotRegistered, &e.to_string()),
            };
            match c {
                EtcdCommand::List { json } => crate::cli::etcd::list(&cfg, json, &rt),
                EtcdCommand::Remove { ip, id, yes, json } => {
                    match crate::cli::etcd::target(ip.as_deref(), id.as_deref()) {
                        Ok(t) => crate::cli::etcd::remove(&cfg, t, yes, json, &rt),
                        Err(m) => report_error(json, Exit::Usage, &m),
                    }
                }
            }
        }
        Command::Vpn(VpnCommand::Status { json }) => match config::load(&cli.config) {
            Ok((cfg, _)) => crate::cli::vpn::run(&cfg, json),
            Err(e) => report_error(json, Exit::NotRegistered, &e.to_string()),
        },
        Command::Uninstall { yes, json } => match config::load(&cli.config) {
            Ok((cfg, _)) => crate::cli::uninstall::run(&cfg, yes, json, &rt),
            Err(e) => report_error(json, Exit::NotRegistered, &e.to_string()),
        },
        Command::Journal { tag, limit, json } => match config::load(&cli.config) {
            Ok((cfg, _)) => crate::cli::journal::run(&cfg, tag, usize::from(limit), json),
            Err(e) => report_error(json, Exit::NotRegistered, &e.to_string()),
        },
        Command::Agent => {
            let cfg = match config::load(&cli.config) {
                Ok((c, _)) => c,
                Err(e) => {
                    return report_error(
                        false,
                        Exit::NotRegistered,
                        &format!("{e}; fix the configuration file"),
                    );
                }
            };
            let level = cli.log_level.unwrap_or(cfg.log.level);
            let log = logging::init(level.as_str(), cfg.log.format);
            match rt.block_on(daemon::run(cli.config, cfg, cli.log_level, log)) {
                Ok(()) => Exit::Ok,
                Err(e) => report_error(false, e.exit, &e.message),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn token_on_argv_is_refused() {
        let r = Cli::try_parse_from(["runos", "register", "--server", "h", "--token", "secret"]);
        assert!(r.is_err());
        let r = Cli::try_parse_from(["runos", "register", "--server", "h"]);
        assert!(r.is_err());
        let r = Cli::try_parse_from(["runos", "register", "--server", "h", "--token", "-"]);
        assert!(r.is_ok());
        let r = Cli::try_parse_from(["runos", "journal", "--tag", "nope"]);
        assert!(r.is_err());
        let r = Cli::try_parse_from(["runos", "journal", "--limit", "1001"]);
        assert!(r.is_err());
        let r = Cli::try_parse_from(["runos", "certificate", "status", "--json"]).unwrap();
        assert!(matches!(
            r.command,
            Command::Certificate(CertificateCommand::Status { json: true })
        ));
        assert!(Cli::try_parse_from(["runos", "certificate"]).is_err());
        assert!(Cli::try_parse_from(["runos", "certificate", "renew", "--json"]).is_ok());
        assert!(Cli::try_parse_from(["runos", "certificate", "renew", "now"]).is_err());
        let r = Cli::try_parse_from(["runos", "agent", "--config", "/x.toml"]).unwrap();
        assert_eq!(r.config, PathBuf::from("/x.toml"));
    }
}
