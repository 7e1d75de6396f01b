//! `runos register`: enrol this node over L1Sec.
//!
//! The key (ECDSA P-256) is generated here and never leaves the node: only a CSR is sent. The
//! token comes from a file or stdin, never from argv. The L1Sec CA is checked against a pin before
//! anything is sent: the pin comes from `--ca-sha256`, else from the token (`runos1.<pin>.<secret>`),
//! else from `server.l1_ca_sha256`. Without any, register refuses unless `--insecure-skip-pin`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runos_protocol::control::{EnrolmentToken, Register, Registered, types};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, Tag};
use runos_transport::{FrameReader, FrameWriter};
use serde::Serialize;

use crate::config::{self, Config};
use crate::exit::Exit;
use crate::util::fs::{self as fsutil, Mode};
use crate::{net, sysinfo};

/// Largest frame on L1Sec.
pub const L1_MAX_FRAME: u32 = 256 * 1024;
/// Bound on waiting for the answer to REGISTER.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest token file read.
const MAX_TOKEN_FILE: u64 = 4096;

/// Where the token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A file (trimmed).
    File(PathBuf),
    /// Standard input (trimmed).
    Stdin,
}

/// What `register` needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configuration file to read and update.
    pub config_path: PathBuf,
    /// Control-plane host name or IP.
    pub server: String,
    /// The token's source.
    pub token: TokenSource,
    /// The L1Sec CA file (default `paths.l1_ca`).
    pub ca_file: Option<PathBuf>,
    /// Expected sha256 of the CA (`--ca-sha256`; else the token's pin, else
    /// `server.l1_ca_sha256`).
    pub ca_sha256: Option<String>,
    /// Trust the whole CA file when no pin is known (`--insecure-skip-pin`).
    pub insecure_skip_pin: bool,
    /// L1Sec port override.
    pub l1_port: Option<u16>,
    /// L2Sec port override.
    pub l2_port: Option<u16>,
    /// Replace an existing identity (only once the new one has been proven on L2Sec).
    pub force: bool,
}

/// The result of a successful enrolment.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// The node id assigned by the control plane.
    pub node_id: String,
    /// The node id this registration replaced (`--force`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced: Option<String>,
    /// Whether an L2Sec session with the new identity was completed (HELLO/WELCOME).
    pub l2_verified: bool,
    /// Why the L2Sec check failed, when it did (first registration only: the identity is kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_error: Option<String>,
}

/// A failed enrolment: what failed and what to do, with its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RegisterError {
    /// The exit code.
    pub exit: Exit,
    /// The message for the operator.
    pub message: String,
}

fn fail(exit: Exit, message: impl Into<String>) -> RegisterError {
    RegisterError {
        exit,
        message: message.into(),
    }
}

/// Read and check the token. The token's value never appears in errors.
pub fn read_token(src: &TokenSource) -> Result<EnrolmentToken, RegisterError> {
    let bytes = match src {
        TokenSource::File(p) => {
            if let Ok(md) = std::fs::metadata(p) {
                use std::os::unix::fs::PermissionsExt;
                if md.permissions().mode() & 0o004 != 0 {
                    tracing::warn!(
                        "token file {} is readable by every user; use mode 0600 and delete it after registering",
                        p.display()
                    );
                }
            }
            fsutil::read_capped(p, MAX_TOKEN_FILE).map_err(|e| {
                fail(
                    Exit::Failure,
                    format!("cannot read the token file {}: {e}", p.display()),
                )
            })?
        }
        TokenSource::Stdin => {
            let mut buf = Vec::new();
            std::io::stdin()
                .take(MAX_TOKEN_FILE + 1)
                .read_to_end(&mut buf)
                .map_err(|e| {
                    fail(
                        Exit::Failure,
                        format!("cannot read the token from stdin: {e}"),
                    )
                })?;
            if buf.len() as u64 > MAX_TOKEN_FILE {
                return Err(fail(Exit::Failure, "the token on stdin is too long"));
            }
            buf
        }
    };
    let token = String::from_utf8(bytes)
        .map_err(|_| fail(Exit::Failure, "the token is not UTF-8 text"))?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(fail(
            Exit::Failure,
            "the token is empty; create one with `runos-controlplane token create`",
        ));
    }
    EnrolmentToken::parse(&token).map_err(|e| {
        fail(
            Exit::Refused,
            format!("{e}; create a new token with `runos-controlplane token create`"),
        )
    })
}

/// The one CA pin to check, from the three places it may come from, or `None` when there is
/// none and `insecure_skip_pin` allows that. `flag` is `--ca-sha256` (not yet normalised),
/// `token` the token's pin, `config` `server.l1_ca_sha256` (normalised). Two different pins are
/// a pin mismatch (exit 6); no pin without `insecure_skip_pin` is a usage error (exit 2).
pub fn resolve_pin(
    flag: Option<&str>,
    token: Option<&str>,
    config: Option<&str>,
    insecure_skip_pin: bool,
) -> Result<Option<String>, RegisterError> {
    let flag = match flag {
        Some(p) => Some(runos_transport::pem::normalize_pin(p).ok_or_else(|| {
            fail(
                Exit::Usage,
                "--ca-sha256 must be 64 hex digits (optionally prefixed by `sha256:`)",
            )
        })?),
        None => None,
    };
    let sources: Vec<(&str, String)> = [
        ("--ca-sha256", flag),
        ("the enrolment token", token.map(str::to_string)),
        (
            "server.l1_ca_sha256 in the configuration",
            config.map(str::to_string),
        ),
    ]
    .into_iter()
    .filter_map(|(name, pin)| pin.map(|p| (name, p)))
    .collect();
    if let Some(((first, a), (second, b))) = sources
        .iter()
        .flat_map(|x| sources.iter().map(move |y| (x, y)))
        .find(|((_, a), (_, b))| a != b)
    {
        return Err(fail(
            Exit::Tls,
            format!(
                "conflicting L1Sec CA pins: {first} says sha256 {a}, {second} says sha256 {b}; \
                 find out which is the control plane's CA and drop or correct the other"
            ),
        ));
    }
    match sources.into_iter().next() {
        Some((_, pin)) => Ok(Some(pin)),
        None if insecure_skip_pin => Ok(None),
        None => Err(fail(
            Exit::Usage,
            "no L1Sec CA pin: the token carries none (an old-format token), and neither \
             --ca-sha256 nor server.l1_ca_sha256 is set. Give the pin in one of three ways: \
             use a token from `runos-controlplane token create` (it carries the pin), pass \
             --ca-sha256 with the caSha256 it prints, or set server.l1_ca_sha256 in the \
             configuration. --insecure-skip-pin trusts the CA file unchecked (not recommended).",
        )),
    }
}

/// Generate a P-256 key and a CSR for it. Returns (key PEM, CSR PEM, public key DER).
pub fn key_and_csr(hostname: &str) -> Result<(String, String, Vec<u8>), RegisterError> {
    let internal =
        |e: rcgen::Error| fail(Exit::Failure, format!("cannot create the key or CSR: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, hostname);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(internal)?;
    let csr_pem = csr.pem().map_err(internal)?;
    Ok((
        key.serialize_pem(),
        csr_pem,
        rcgen::PublicKeyData::der_bytes(&key).to_vec(),
    ))
}

fn refusal(e: &ErrorPayload) -> RegisterError {
    match e.code {
        ErrorCode::TokenUnknown | ErrorCode::TokenExpired | ErrorCode::TokenUsed => fail(
            Exit::Refused,
            format!(
                "the control plane refused the token ({}): {}; create a new token with `runos-controlplane token create` and run register again",
                e.code, e.message
            ),
        ),
        ErrorCode::Revoked => fail(
            Exit::Refused,
            format!(
                "the control plane refused the enrolment (revoked): {}",
                e.message
            ),
        ),
        _ => fail(
            Exit::Failure,
            format!(
                "the control plane refused the enrolment ({}): {}",
                e.code, e.message
            ),
        ),
    }
}

/// Check the REGISTERED answer against our key and the L1Sec CA the enrolment trusted
/// (`l1_cas`, DER: the pinned one): the bundle must continue that trust ([`crate::credentials::trust`]), the
/// certificate must be for the node id and our key. Returns the node id.
fn check_registered(
    r: &Registered,
    public_key_der: &[u8],
    l1_cas: &[Vec<u8>],
) -> Result<String, RegisterError> {
    let bad = |m: String| {
        fail(
            Exit::Failure,
            format!("the control plane's answer is unusable: {m}"),
        )
    };
    if !runos_transport::identity::is_valid_node_id(&r.node_id) {
        return Err(bad("the node id is malformed".into()));
    }
    // No trusted time yet at enrolment: validity periods are the control plane's to judge.
    crate::credentials::trust::admit(
        l1_cas,
        &r.ca_pem,
        r.ca_cross_pem.as_deref(),
        &r.certificate_pem,
        &r.node_id,
        public_key_der,
        None,
    )
    .map_err(bad)?;
    Ok(r.node_id.clone())
}

/// Enrol the node.
pub async fn register(opts: &Options) -> Result<Outcome, RegisterError> {
    let (cfg, _) = config::load(&opts.config_path).map_err(|e| {
        fail(
            Exit::NotRegistered,
            format!("{e}; fix the configuration file"),
        )
    })?;
    config::validate_host(&opts.server).map_err(|m| fail(Exit::Usage, format!("--server {m}")))?;
    // Hold the credential switch lock from before the token is spent until the new identity is
    // in place, so a renewal by the running agent can neither make this fail after the token
    // was used nor overwrite the new identity afterwards.
    let _switch = wait_switch_lock(&cfg).await?;
    // Finish (or undo) a switch a crash interrupted, then look at what is there.
    crate::credentials::recover_unlocked(&cfg.paths).map_err(|e| {
        fail(
            Exit::Failure,
            format!("cannot finish an interrupted credential switch: {e}"),
        )
    })?;
    let existing = existing_node(&cfg);
    if let Some(node) = &existing
        && !opts.force
    {
        return Err(fail(
            Exit::Usage,
            format!(
                "this node is already registered (node id {node}, {}); to replace its identity, run register again with --force and a fresh token: the current identity stays in use until the new one has connected",
                cfg.paths.certificate.display()
            ),
        ));
    }
    let l1_port = opts.l1_port.unwrap_or(cfg.server.l1_port);
    let l2_port = opts.l2_port.unwrap_or(cfg.server.l2_port);
    let token = read_token(&opts.token)?;
    // Re-enrolling (--force) with a pin given now (flag or token): that pin supersedes the one
    // stored by the previous enrolment, which may be for another control plane or a CA that
    // has been rotated out.
    let stored_pin = if opts.force && (opts.ca_sha256.is_some() || token.ca_sha256().is_some()) {
        None
    } else {
        cfg.server.l1_ca_sha256.as_deref()
    };
    let pin = resolve_pin(
        opts.ca_sha256.as_deref(),
        token.ca_sha256(),
        stored_pin,
        opts.insecure_skip_pin,
    )?;

    // The L1Sec CA, checked against the pin before anything is sent.
    let ca_path = opts
        .ca_file
        .clone()
        .unwrap_or_else(|| cfg.paths.l1_ca.clone());
    let mut fetched = false;
    let holds_pin = |pem: &[u8]| {
        runos_transport::pem::certificates(pem).is_ok_and(|cs| {
            cs.iter()
                .any(|c| Some(runos_transport::pem::der_sha256(c)) == pin)
        })
    };
    let ca_pem = match fsutil::read_capped(&ca_path, crate::credentials::identity::MAX_PEM_FILE) {
        // Re-enrolling, and the stored L1Sec CA of the earlier enrolment does not match the pin
        // given now (another control plane, a rotated CA): learn the CA as if there were none.
        Ok(b) if opts.force && opts.ca_file.is_none() && pin.is_some() && !holds_pin(&b) => {
            let pin = pin.as_deref().unwrap_or_default();
            fetched = true;
            fetch_ca(&opts.server, l1_port, pin).await?
        }
        Ok(b) => b,
        // No CA file but a pin: learn the CA from the server and keep it only if it matches
        // the pin (as k3s does with the CA hash in its tokens).
        Err(fsutil::ReadError::NotFound) if opts.ca_file.is_none() && pin.is_some() => {
            let pin = pin.as_deref().unwrap_or_default();
            fetched = true;
            fetch_ca(&opts.server, l1_port, pin).await?
        }
        Err(e) => {
            return Err(fail(
                Exit::Tls,
                format!(
                    "cannot read the L1Sec CA file {}: {e}; pass --ca-file with the control plane's ca.pem",
                    ca_path.display()
                ),
            ));
        }
    };
    let cas = runos_transport::pem::certificates(&ca_pem).map_err(|e| {
        fail(
            Exit::Tls,
            format!("the L1Sec CA file {}: {e}", ca_path.display()),
        )
    })?;
    // With a pin, trust exactly the one certificate in the file whose digest matches it, wherever
    // it stands: another certificate in the same file must never widen the trust.
    let digests: Vec<String> = cas
        .iter()
        .map(|c| runos_transport::pem::der_sha256(c))
        .collect();
    let cas = match &pin {
        Some(pin) => match digests.iter().position(|d| d == pin) {
            Some(i) => vec![cas[i].clone()],
            None => {
                return Err(fail(
                    Exit::Tls,
                    format!(
                        "no certificate in the L1Sec CA file {} matches the pin: expected sha256 {pin}, the file has {}; get the right CA file (or pin) from the control plane's operator",
                        ca_path.display(),
                        digests.join(", ")
                    ),
                ));
            }
        },
        None => {
            eprintln!(
                "WARNING: --insecure-skip-pin and no CA pin (--ca-sha256, the token or server.l1_ca_sha256): trusting every certificate in the CA file {} as it is (sha256 {}). \
                 Anyone who could change that file can impersonate the control plane. Pin it with the caSha256 that \
                 `runos-controlplane token create` prints.",
                ca_path.display(),
                digests.join(", ")
            );
            cas
        }
    };

    let hostname = sysinfo::hostname();
    let (key_pem, csr_pem, public_key) = key_and_csr(&hostname)?;
    let tls = runos_transport::tls::client_config(&cas, runos_protocol::ALPN_L1SEC, None)
        .map_err(|e| fail(Exit::Tls, format!("the L1Sec CA cannot be used: {e}")))?;
    let stream = net::connect_tls(&opts.server, l1_port, tls, runos_protocol::ALPN_L1SEC)
        .await
        .map_err(|e| match e {
            net::ConnectError::Unreachable { .. } => fail(
                Exit::Unreachable,
                format!("{e}; check the host name, the L1Sec port (--l1-port) and the firewall"),
            ),
            net::ConnectError::Tls { .. } => fail(
                Exit::Tls,
                format!("{e}; check that --ca-file is the control plane's CA and that the host name is in its certificate"),
            ),
        })?;
    let (r, w) = tokio::io::split(stream);
    let mut reader = FrameReader::new(r, L1_MAX_FRAME);
    let mut writer = FrameWriter::new(w, L1_MAX_FRAME);
    let tag = Tag::random();
    let req = Register {
        token: token.into_string(),
        machine_id: sysinfo::machine_id(),
        hostname,
        os: sysinfo::os(),
        agent_version: crate::AGENT_VERSION.to_string(),
        csr_pem,
    };
    let addr = net::addr(&opts.server, l1_port);
    writer
        .write(&Envelope::with_type(types::REGISTER, tag, &req))
        .await
        .map_err(|e| {
            fail(
                Exit::Unreachable,
                format!("sending REGISTER to {addr} failed: {e}"),
            )
        })?;
    drop(req);
    let answer = match tokio::time::timeout(ANSWER_TIMEOUT, reader.read()).await {
        Ok(Ok(Some(env))) => env,
        Ok(Ok(None)) => {
            return Err(fail(
                Exit::Unreachable,
                format!("{addr} closed the connection without answering"),
            ));
        }
        Ok(Err(e)) => {
            return Err(fail(
                Exit::Unreachable,
                format!("reading the answer from {addr}: {e}"),
            ));
        }
        Err(_) => {
            return Err(fail(
                Exit::Unreachable,
                format!(
                    "no answer from {addr} within {} s",
                    ANSWER_TIMEOUT.as_secs()
                ),
            ));
        }
    };
    let _ = writer.shutdown().await;
    if answer.tag != tag {
        return Err(fail(
            Exit::Failure,
            "the control plane answered with another tag",
        ));
    }
    if answer.is(types::ERROR) {
        let e: ErrorPayload = answer
            .payload()
            .map_err(|_| fail(Exit::Failure, "the control plane sent an unreadable ERROR"))?;
        return Err(refusal(&e));
    }
    if !answer.is(types::REGISTERED) {
        return Err(fail(
            Exit::Failure,
            format!("unexpected answer {}", answer.kind),
        ));
    }
    let reg: Registered = answer
        .payload()
        .map_err(|_| fail(Exit::Failure, "the REGISTERED payload is malformed"))?;
    let l1_cas: Vec<Vec<u8>> = cas.iter().map(|c| c.to_vec()).collect();
    let node_id = check_registered(&reg, &public_key, &l1_cas)?;
    let set = crate::credentials::CredentialSet {
        key_pem,
        cert_pem: reg.certificate_pem.clone(),
        ca_pem: reg.ca_pem.clone(),
    };
    let write_err = |e: String| {
        fail(
            Exit::Failure,
            format!("{e}; run register as root or point [paths] at a writable directory"),
        )
    };
    let (l2_verified, l2_error) = match &existing {
        Some(old) => {
            // Replace only once the new identity has carried an L2Sec session.
            crate::credentials::renew::switch_locked(
                set,
                cfg.paths.clone(),
                opts.server.clone(),
                l2_port,
                cfg.agent.max_frame_bytes,
            )
            .await
            .map_err(|e| {
                fail(
                    match e {
                        crate::credentials::renew::RenewError::Unreachable(_) => Exit::Unreachable,
                        crate::credentials::renew::RenewError::Tls(_) => Exit::Tls,
                        crate::credentials::renew::RenewError::Revoked(_) => Exit::Refused,
                        crate::credentials::renew::RenewError::Failed(_) | crate::credentials::renew::RenewError::Busy(_) => {
                            Exit::Failure
                        }
                    },
                    format!(
                        "the new identity (node id {node_id}) did not work on L2Sec, so node {old} keeps its current identity: {e}"
                    ),
                )
            })?;
            (true, None)
        }
        None => {
            ensure_parents(&cfg).map_err(|e| write_err(e.to_string()))?;
            crate::credentials::install(&cfg.paths, &set).map_err(|e| write_err(e.to_string()))?;
            // A first registration keeps its identity either way (the token is spent), but
            // says at once whether L2Sec works.
            match crate::credentials::renew::identity_of(&set, &cfg.paths, &opts.server, l2_port) {
                Ok(id) => {
                    match crate::credentials::renew::Probe::open(&id, cfg.agent.max_frame_bytes)
                        .await
                    {
                        Ok(p) => {
                            p.close().await;
                            (true, None)
                        }
                        Err(e) => (false, Some(e.to_string())),
                    }
                }
                Err(e) => (false, Some(e.to_string())),
            }
        }
    };
    store(
        &cfg,
        &opts.config_path,
        &opts.server,
        l1_port,
        l2_port,
        (&ca_path, fetched),
        certs_to_pem(&cas).as_bytes(),
        pin.as_deref(),
    )?;
    Ok(Outcome {
        node_id,
        replaced: existing,
        l2_verified,
        l2_error,
    })
}

/// Bound on waiting for another credential switch (a renewal) to finish.
const SWITCH_WAIT: Duration = Duration::from_secs(60);

async fn wait_switch_lock(cfg: &Config) -> Result<crate::util::lock::InstanceLock, RegisterError> {
    let deadline = tokio::time::Instant::now() + SWITCH_WAIT;
    loop {
        match crate::credentials::switch_lock(&cfg.paths) {
            Ok(Some(l)) => return Ok(l),
            Ok(None) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(None) => {
                return Err(fail(
                    Exit::Locked,
                    format!(
                        "another credential switch (a renewal) has held {} for {} s; nothing was sent (the token is unused): try again",
                        cfg.paths
                            .run_dir
                            .join(crate::credentials::SWITCH_LOCK)
                            .display(),
                        SWITCH_WAIT.as_secs()
                    ),
                ));
            }
            Err(e) => {
                return Err(fail(
                    Exit::Failure,
                    format!("{e}; run register as root or point [paths] at a writable directory"),
                ));
            }
        }
    }
}

/// The node id of the identity on disk, if there is a readable certificate with one.
fn existing_node(cfg: &Config) -> Option<String> {
    crate::credentials::read_certificate(&cfg.paths.certificate)
        .ok()
        .map(|i| i.node_id.unwrap_or_else(|| "unknown".into()))
}

fn ensure_parents(cfg: &Config) -> Result<(), fsutil::FsError> {
    let p = &cfg.paths;
    for f in [&p.key, &p.certificate, &p.ca, &p.l1_ca] {
        if let Some(dir) = f.parent() {
            fsutil::ensure_dir(dir, 0o755)?;
        }
    }
    Ok(())
}

/// Learn the control plane's CA from the chain its L1Sec server presents, keeping only the
/// certificate whose sha256 is `pin`. Nothing is sent on that connection. Returns the CA as PEM.
async fn fetch_ca(host: &str, port: u16, pin: &str) -> Result<Vec<u8>, RegisterError> {
    let (tls, captured) = runos_transport::tls::chain_capture_config(runos_protocol::ALPN_L1SEC)
        .map_err(|e| fail(Exit::Failure, format!("TLS setup: {e}")))?;
    let stream = net::connect_tls(host, port, tls, runos_protocol::ALPN_L1SEC)
        .await
        .map_err(|e| match e {
            net::ConnectError::Unreachable { .. } => fail(
                Exit::Unreachable,
                format!("{e}; check the host name, the L1Sec port (--l1-port) and the firewall"),
            ),
            net::ConnectError::Tls { .. } => fail(Exit::Tls, e.to_string()),
        })?;
    drop(stream);
    let certs = captured.certs();
    let digests: Vec<String> = certs
        .iter()
        .map(|c| runos_transport::pem::der_sha256(c))
        .collect();
    match digests.iter().position(|d| d == pin) {
        Some(i) => {
            eprintln!(
                "runos: no CA file given: using the control plane's CA from {}, which matches the pin {pin}",
                net::addr(host, port)
            );
            Ok(certs_to_pem(&certs[i..=i]).into_bytes())
        }
        None => Err(fail(
            Exit::Tls,
            format!(
                "the server at {} presented no CA matching the pin {pin} (it presented {}); it may not be the control plane the token is for: get its CA file (--ca-file) or pin from its operator",
                net::addr(host, port),
                if digests.is_empty() {
                    "no certificates".to_string()
                } else {
                    digests.join(", ")
                }
            ),
        )),
    }
}

/// PEM text of `certs`: what `register` keeps as the L1Sec CA (with a pin, only the pinned one).
fn certs_to_pem(certs: &[rustls_pki_types::CertificateDer<'_>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for c in certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Keep the L1Sec CA and the server settings (the key, certificate and L2Sec CA are already in
/// place).
#[allow(clippy::too_many_arguments)]
fn store(
    cfg: &Config,
    config_path: &Path,
    host: &str,
    l1_port: u16,
    l2_port: u16,
    (ca_path, fetched): (&Path, bool),
    ca_pem: &[u8],
    pin: Option<&str>,
) -> Result<(), RegisterError> {
    let write_err = |e: fsutil::FsError| {
        fail(
            Exit::Failure,
            format!("{e}; run register as root or point [paths] at a writable directory"),
        )
    };
    let p = &cfg.paths;
    ensure_parents(cfg).map_err(write_err)?;
    if ca_path != p.l1_ca || fetched {
        // Only the trusted certificates (the pinned one when there is a pin).
        fsutil::write_atomic(&p.l1_ca, ca_pem, Mode::Exact(0o644)).map_err(write_err)?;
    }
    // The pin used is kept, so a later re-registration stays pinned.
    config::update_server(config_path, host, l1_port, l2_port, pin).map_err(|e| {
        fail(
            Exit::Failure,
            format!("the node is enrolled but the configuration could not be updated: {e}"),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_trimmed_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, "  abc123\n").unwrap();
        assert_eq!(
            read_token(&TokenSource::File(p.clone())).unwrap().expose(),
            "abc123"
        );
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token(&TokenSource::File(p.clone())).is_err());
        std::fs::write(&p, "secret with-space").unwrap();
        let e = read_token(&TokenSource::File(p.clone())).unwrap_err();
        assert!(!e.message.contains("secret"));
        let e = read_token(&TokenSource::File(d.path().join("none"))).unwrap_err();
        assert_eq!(e.exit, Exit::Failure);
    }

    #[test]
    fn tokens_are_parsed_strictly_and_never_echoed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        let pin = "ab".repeat(32);
        let secret = "0123456789abcdef".repeat(4);
        let read = |text: &str| {
            std::fs::write(&p, text).unwrap();
            read_token(&TokenSource::File(p.clone()))
        };
        let t = read(&format!("runos1.{pin}.{secret}\n")).unwrap();
        assert_eq!(t.ca_sha256(), Some(pin.as_str()));
        assert_eq!(t.expose(), format!("runos1.{pin}.{secret}"));
        assert!(!format!("{t:?}").contains(&secret));
        // An old-format token is accepted and carries no pin.
        let old = format!("rnt_{secret}");
        assert_eq!(read(&old).unwrap().ca_sha256(), None);
        for bad in [
            format!("runos1.{}.{secret}", "zz".repeat(32)), // bad hex in the pin
            format!("runos1.{pin}.{}x", &secret[1..]),      // bad hex in the secret
            format!("runos1.{}.{secret}", "ab".repeat(31)), // short pin
            format!("runos1.{pin}.{secret}00"),             // long secret
            format!("runos1.{pin}"),                        // no secret
        ] {
            let e = read(&bad).unwrap_err();
            assert_eq!(e.exit, Exit::Refused, "{bad}: {}", e.message);
            assert!(e.message.contains("malformed"), "{}", e.message);
            assert!(!e.message.contains(&secret[1..]), "{}", e.message);
        }
    }

    #[test]
    fn the_pin_comes_from_one_of_three_places() {
        let a = "ab".repeat(32);
        let b = "cd".repeat(32);
        // Each source alone.
        let flag = format!("sha256:{}", a.to_uppercase());
        assert_eq!(
            resolve_pin(Some(&flag), None, None, false).unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            resolve_pin(None, Some(&a), None, false).unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            resolve_pin(None, None, Some(&a), false).unwrap(),
            Some(a.clone())
        );
        // Agreeing sources are fine.
        assert_eq!(
            resolve_pin(Some(&a), Some(&a), Some(&a), false).unwrap(),
            Some(a.clone())
        );
        // Any two that differ: a pin mismatch naming both.
        for (f, t, c) in [
            (Some(&a), Some(&b), None),
            (Some(&a), None, Some(&b)),
            (None, Some(&a), Some(&b)),
            (Some(&a), Some(&a), Some(&b)),
        ] {
            let e = resolve_pin(
                f.map(String::as_str),
                t.map(String::as_str),
                c.map(String::as_str),
                true,
            )
            .unwrap_err();
            assert_eq!(e.exit, Exit::Tls, "{}", e.message);
            assert!(
                e.message.contains(&a) && e.message.contains(&b),
                "{}",
                e.message
            );
        }
        // No pin: a usage error explaining the three ways, unless skipped explicitly.
        let e = resolve_pin(None, None, None, false).unwrap_err();
        assert_eq!(e.exit, Exit::Usage);
        for way in [
            "token",
            "--ca-sha256",
            "server.l1_ca_sha256",
            "--insecure-skip-pin",
        ] {
            assert!(e.message.contains(way), "{way}: {}", e.message);
        }
        assert_eq!(resolve_pin(None, None, None, true).unwrap(), None);
        // A malformed flag is a usage error.
        assert_eq!(
            resolve_pin(Some("abc"), None, None, true).unwrap_err().exit,
            Exit::Usage
        );
    }

    #[test]
    fn csr_is_p256() {
        let (key, csr, pk) = key_and_csr("node1").unwrap();
        assert!(key.contains("PRIVATE KEY"));
        assert!(csr.contains("CERTIFICATE REQUEST"));
        assert_eq!(pk.len(), 65); // uncompressed P-256 point
    }

    #[test]
    fn refusals_map_to_exit_codes() {
        let e = refusal(&ErrorPayload::new(ErrorCode::TokenExpired, "expired"));
        assert_eq!(e.exit, Exit::Refused);
        assert!(e.message.contains("runos-controlplane token create"));
        assert_eq!(
            refusal(&ErrorPayload::new(ErrorCode::Internal, "x")).exit,
            Exit::Failure
        );
    }
}
