//! `runos verify` and `runos update`: argument handling and output. The work is in the sibling
//! modules.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::config::Config;
use crate::exit::Exit;
use crate::update::version::Version;
use crate::update::{Installed, Request, verify};

fn fail(json_out: bool, exit: Exit, message: &str, extra: Value) -> Exit {
    eprintln!("runos: error: {message}");
    if json_out {
        let mut v = json!({"error": message, "exitCode": exit.code()});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        println!("{v}");
    }
    exit
}

/// `runos verify` options (after defaults from `[update]`).
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The artifact.
    pub file: PathBuf,
    /// Its Sigstore bundle.
    pub bundle: PathBuf,
    /// `owner/name` (default `update.repo`).
    pub repo: Option<String>,
    /// Workflow path (default `update.workflow`).
    pub workflow: Option<String>,
    /// Release tag (`refs/tags/<version>`).
    pub version: Option<String>,
    /// Any git ref.
    pub git_ref: Option<String>,
    /// Asset name (default the file's name).
    pub asset: Option<String>,
    /// Trusted root (default `update.trusted_root`, else public-good).
    pub trusted_root: Option<PathBuf>,
    /// A `checksums.txt` that must list the asset with the file's sha256.
    pub checksums: Option<PathBuf>,
    /// Print JSON.
    pub json: bool,
}

fn read_input(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>, (Exit, String)> {
    match crate::util::fs::read_capped(path, cap) {
        Ok(b) => Ok(b),
        Err(crate::util::fs::ReadError::NotFound) => Err((
            Exit::Usage,
            format!("{what} {} does not exist", path.display()),
        )),
        Err(crate::util::fs::ReadError::TooLarge) => Err((
            Exit::VerifyFailed,
            format!("{what} {} is larger than {cap} bytes", path.display()),
        )),
        Err(crate::util::fs::ReadError::Io(e)) => Err((
            Exit::Failure,
            format!("cannot read {what} {}: {e}", path.display()),
        )),
    }
}

/// `runos verify`: exit 0 verified, 2 usage, 10 verification failed.
pub fn verify_cmd(cfg: &Config, o: &VerifyOptions) -> Exit {
    let j = o.json;
    let u = &cfg.update;
    let asset = match &o.asset {
        Some(a) => a.clone(),
        None => match o.file.file_name().and_then(|n| n.to_str()) {
            Some(n) => n.to_string(),
            None => {
                return fail(
                    j,
                    Exit::Usage,
                    "FILE has no usable file name; pass --asset NAME",
                    json!({}),
                );
            }
        },
    };
    let repo = o.repo.as_deref().unwrap_or(&u.repo);
    let workflow = o.workflow.as_deref().unwrap_or(&u.workflow);
    let policy = match (&o.version, &o.git_ref) {
        (Some(v), _) => verify::release_policy(repo, workflow, v, &asset),
        (None, Some(r)) => runos_attest::Policy::new(repo, workflow, r, &asset),
        (None, None) => {
            return fail(
                j,
                Exit::Usage,
                "pass --version vX.Y.Z or --ref REF",
                json!({}),
            );
        }
    };
    let policy = match policy {
        Ok(p) => p,
        Err(e) => return fail(j, Exit::Usage, &e.to_string(), json!({})),
    };
    let (root_path, root_exit) = match &o.trusted_root {
        Some(p) => (Some(p.as_path()), Exit::Usage),
        None => (u.trusted_root.as_deref(), Exit::NotRegistered),
    };
    let root = match verify::load_root(root_path) {
        Ok(r) => r,
        Err(e) => return fail(j, root_exit, &e, json!({})),
    };
    let digest = match runos_checksums::sha256_file(&o.file) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return fail(
                j,
                Exit::Usage,
                &format!("FILE {} does not exist", o.file.display()),
                json!({}),
            );
        }
        Err(e) => {
            return fail(
                j,
                Exit::Failure,
                &format!("cannot read {}: {e}", o.file.display()),
                json!({}),
            );
        }
    };
    let bundle = match read_input(&o.bundle, runos_attest::MAX_BUNDLE_BYTES as u64, "bundle") {
        Ok(b) => b,
        Err((exit, m)) => return fail(j, exit, &m, json!({"verified": false})),
    };
    let checksums = match &o.checksums {
        None => None,
        Some(p) => match read_input(p, crate::update::MAX_CHECKSUMS_BYTES, "checksums file") {
            Ok(b) => Some(b),
            Err((exit, m)) => return fail(j, exit, &m, json!({"verified": false})),
        },
    };
    match verify::check(&digest, checksums.as_deref(), &bundle, &policy, &root) {
        Ok(v) => {
            if j {
                let mut out = verify::verified_json(&v);
                out["verified"] = json!(true);
                out["file"] = json!(o.file.display().to_string());
                out["checksums"] = json!(checksums.is_some());
                out["trustedRoot"] =
                    json!(root_path.map_or("public-good".to_string(), |p| p.display().to_string()));
                println!("{out}");
            } else {
                println!("verified: {}", o.file.display());
                print!("{}", verify::verified_text(&v));
                if checksums.is_some() {
                    println!("checksums:  listed with this sha256");
                }
            }
            Exit::Ok
        }
        Err(e) => fail(
            j,
            Exit::VerifyFailed,
            &format!(
                "verification failed for {} (sha256 {}): {e}",
                o.file.display(),
                digest.to_hex()
            ),
            json!({"verified": false, "sha256": digest.to_hex(), "expectedIdentity": policy.expected_identity()}),
        ),
    }
}

/// `runos update` options.
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    /// `--version`.
    pub version: Option<String>,
    /// `--allow-downgrade`.
    pub allow_downgrade: bool,
    /// `--no-restart`.
    pub no_restart: bool,
    /// `--json`.
    pub json: bool,
}

/// The version the control plane advertises, from the running daemon's status.
fn advertised(cfg: &Config) -> Result<Version, String> {
    let status =
        crate::util::admin_client::request(&cfg.paths.admin_socket(), &json!({"op": "status"}))
            .map_err(|e| {
                let (crate::util::admin_client::AdminError::NotRunning(e)
                | crate::util::admin_client::AdminError::Refused(e)) = e;
                format!(
                    "cannot ask the running agent which version the control plane advertises ({e})"
                )
            })?;
    match status.get("advertisedAgentVersion").and_then(Value::as_str) {
        Some(v) => Version::parse_loose(v)
            .map_err(|e| format!("the control plane advertises a version that {e}")),
        None => Err("the control plane advertises no agent version".into()),
    }
}

/// The version the running agent reports on its admin socket, if one answers: this command's
/// own binary (reached through `bin_link`) may already be a newer, not yet started version.
fn running_agent(cfg: &Config) -> Option<Version> {
    let status =
        crate::util::admin_client::request(&cfg.paths.admin_socket(), &json!({"op": "status"}))
            .ok()?;
    Version::parse_loose(status.get("agentVersion")?.as_str()?).ok()
}

/// `runos update`.
pub fn update_cmd(
    cfg: &Config,
    config_path: &Path,
    o: &UpdateOptions,
    rt: &tokio::runtime::Runtime,
) -> Exit {
    let j = o.json;
    let target = match &o.version {
        Some(v) => match Version::parse_tag(v) {
            Ok(v) => v,
            Err(e) => return fail(j, Exit::Usage, &format!("--version {e}"), json!({})),
        },
        None => match advertised(cfg) {
            Ok(v) => v,
            Err(e) => {
                return fail(
                    j,
                    Exit::UpdateRefused,
                    &format!("no target version: {e}; pass --version vX.Y.Z"),
                    json!({}),
                );
            }
        },
    };
    let req = Request {
        target,
        allow_downgrade: o.allow_downgrade,
        automatic: false,
        progress: !j,
        cancel: None,
        running: running_agent(cfg),
    };
    let swap = match crate::update::install_release(cfg, &req, rt.handle()) {
        Err(e) => return fail(j, e.exit, &e.message, json!({"to": target.tag()})),
        Ok(Installed::AlreadyCurrent(v)) => {
            if j {
                println!(
                    "{}",
                    json!({"outcome": "already_current", "from": v.tag(), "to": v.tag(), "restart": false})
                );
            } else {
                println!(
                    "runos {} is already installed and running; nothing to do",
                    v.tag()
                );
            }
            return Exit::Ok;
        }
        Ok(Installed::Swapped(s)) => s,
    };
    let link = cfg.update.bin_link.display().to_string();
    let mut out = json!({
        "outcome": "installed",
        "from": swap.from.tag(),
        "to": swap.to.tag(),
        "binary": swap.binary.display().to_string(),
        "link": link,
        "previous": swap.previous_target.display().to_string(),
        "verified": swap.verified.as_ref().map(verify::verified_json),
    });
    if !j {
        if let Some(v) = &swap.verified {
            println!("verified runos {}:", swap.to.tag());
            print!("{}", verify::verified_text(v));
        }
        println!(
            "installed {}; {link} -> it (previous: {})",
            swap.binary.display(),
            swap.previous_target.display()
        );
    }
    let restart = crate::update::handoff::after_install(cfg, config_path, &swap, o.no_restart);
    let exit = match &restart {
        crate::update::handoff::AfterInstall::NotRestarted(why) => {
            if !j {
                println!("{why}");
            }
            out["restart"] = json!(false);
            out["message"] = json!(why);
            Exit::Ok
        }
        crate::update::handoff::AfterInstall::Finished(last) => {
            out["restart"] = json!(true);
            out["outcome"] = json!(last.outcome.as_str());
            out["message"] = json!(last.message);
            match last.outcome {
                crate::update::state::Outcome::Ok => {
                    if !j {
                        println!("runos {} is running and connected", swap.to.tag());
                    }
                    Exit::Ok
                }
                crate::update::state::Outcome::RolledBack => {
                    eprintln!("runos: error: {}", last.message);
                    Exit::RolledBack
                }
                crate::update::state::Outcome::Failed => {
                    eprintln!("runos: error: {}", last.message);
                    Exit::Failure
                }
            }
        }
        crate::update::handoff::AfterInstall::Unknown(why) => {
            eprintln!("runos: error: {why}");
            out["restart"] = json!(true);
            out["message"] = json!(why);
            Exit::Failure
        }
    };
    if j {
        out["exitCode"] = json!(exit.code());
        println!("{out}");
    }
    exit
}
