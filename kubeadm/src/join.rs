//! `GET_CLUSTER_JOIN_CMD`: a `kubeadm join` command for another node.
//!
//! - `kubeadm token create --print-join-command --ttl <ttl>s` (the bootstrap token lives at most
//!   `token_ttl_secs`, 24 h at most); its output must be exactly one line `kubeadm join
//!   <host:port> --token <token> --discovery-token-ca-cert-hash sha256:<64 hex>`, which is parsed
//!   ([`JoinCommand`]) and written out again: anything else is refused.
//! - For `asCp`: first the encryption key (no side effect: the API server's
//!   EncryptionConfiguration, [`crate::encryption`]), then `kubeadm init phase upload-certs
//!   --upload-certs`, whose last line must be the 64-hex certificate key, then the token. The join
//!   command gets ` --control-plane --certificate-key <key>`.
//!
//! Every step's output is [`Secrecy::Secret`]: never a `LOG` line. Any failed step is `ERROR`
//! `failed` (its message redacted, [`crate::tool::redact`]), never a partial command.

use std::fmt;

use runos_executors::Ctx;
use runos_executors::context::Secrecy;
use runos_protocol::control::LogLevel;
use runos_protocol::instructions::{ClusterJoinCmd, GetClusterJoinCmd};
use runos_protocol::{ErrorCode, ErrorPayload};

use crate::settings::KubeSettings;
use crate::tool::{self, StepError};

/// A parsed `kubeadm join` line. `Debug` shows only the endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinCommand {
    /// `host:port` of the API server (`[v6]:port` for IPv6).
    pub endpoint: String,
    /// The bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`).
    pub token: String,
    /// The CA's public key hash: 64 lower-case hex digits (without `sha256:`).
    pub ca_cert_hash: String,
}

impl fmt::Debug for JoinCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinCommand")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JoinCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kubeadm join {} --token {} --discovery-token-ca-cert-hash sha256:{}",
            self.endpoint, self.token, self.ca_cert_hash
        )
    }
}

/// Why kubeadm's output was refused (never repeats it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(&'static str);

impl JoinCommand {
    /// Parse `kubeadm token create --print-join-command`'s stdout: exactly one non-empty line
    /// of exactly that form.
    pub fn parse(stdout: &str) -> Result<Self, ParseError> {
        let mut lines = stdout.lines().map(str::trim).filter(|l| !l.is_empty());
        let line = lines.next().ok_or(ParseError("the output is empty"))?;
        if lines.next().is_some() {
            return Err(ParseError("the output is more than one line"));
        }
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let [
            "kubeadm",
            "join",
            endpoint,
            "--token",
            token,
            "--discovery-token-ca-cert-hash",
            hash,
        ] = words.as_slice()
        else {
            return Err(ParseError(
                "the output is not `kubeadm join <host:port> --token <token> --discovery-token-ca-cert-hash sha256:<hash>`",
            ));
        };
        if !is_endpoint(endpoint) {
            return Err(ParseError("the API server endpoint is not host:port"));
        }
        if !is_token(token) {
            return Err(ParseError("the token is not a bootstrap token"));
        }
        let hash = hash
            .strip_prefix("sha256:")
            .filter(|h| is_hex64(h))
            .ok_or(ParseError(
                "the CA certificate hash is not sha256:<64 hex digits>",
            ))?;
        Ok(JoinCommand {
            endpoint: endpoint.to_string(),
            token: token.to_string(),
            ca_cert_hash: hash.to_string(),
        })
    }
}

/// A bootstrap token: `[a-z0-9]{6}.[a-z0-9]{16}`.
pub fn is_token(s: &str) -> bool {
    let ok = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    s.split_once('.')
        .is_some_and(|(a, b)| ok(a, 6) && ok(b, 16))
}

/// 64 lower-case hex digits.
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `host:port`: a DNS name or IPv4 address, or `[IPv6]`, and a port 1 to 65535.
fn is_endpoint(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    port_ok && host_ok
}

/// Parse `kubeadm init phase upload-certs --upload-certs`'s stdout: its last non-empty line is
/// the certificate key, 64 lower-case hex digits.
pub fn parse_certificate_key(stdout: &str) -> Result<String, ParseError> {
    let last = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .ok_or(ParseError("the output is empty"))?;
    if !is_hex64(last) {
        return Err(ParseError(
            "the last line of the output is not a certificate key (64 hex digits)",
        ));
    }
    Ok(last.to_string())
}

fn failed(what: &str, e: StepError) -> ErrorPayload {
    e.to_error(what)
}

/// The executor of `GET_CLUSTER_JOIN_CMD`: settings from the context's configuration (the
/// agent's `[kubernetes]`), the node's host name from its facts.
pub async fn get_cluster_join_cmd(
    ctx: Ctx,
    p: GetClusterJoinCmd,
) -> Result<ClusterJoinCmd, ErrorPayload> {
    let settings = KubeSettings::from_config(ctx.config()).map_err(|e| {
        ErrorPayload::new(
            ErrorCode::Failed,
            format!("the agent's [kubernetes] configuration is invalid: {e}"),
        )
    })?;
    join_command(&ctx, &settings, p.as_cp).await
}

/// [`get_cluster_join_cmd`] with explicit settings.
pub async fn join_command(
    ctx: &Ctx,
    s: &KubeSettings,
    as_cp: bool,
) -> Result<ClusterJoinCmd, ErrorPayload> {
    let timeout = KubeSettings::secs(s.join_timeout_secs);
    let kubeconfig = s.admin_kubeconfig.to_string_lossy().into_owned();
    let mut control_plane = None;
    if as_cp {
        ctx.log(
            LogLevel::Info,
            "reading the API server's encryption-at-rest key",
        );
        let key = crate::encryption::encryption_key(s).map_err(|m| {
            ErrorPayload::new(
                ErrorCode::Failed,
                format!("cannot read the encryption key: {m}"),
            )
        })?;
        if key.is_none() {
            ctx.log(
                LogLevel::Warn,
                "the API server has no --encryption-provider-config: the reply has no encryptionKey",
            );
        }
        ctx.log(
            LogLevel::Info,
            "uploading the control-plane certificates (kubeadm init phase upload-certs)",
        );
        let out = tool::run(
            ctx,
            "kubeadm init phase upload-certs",
            vec![
                s.kubeadm.clone(),
                "init".into(),
                "phase".into(),
                "upload-certs".into(),
                "--upload-certs".into(),
                "--kubeconfig".into(),
                kubeconfig.clone(),
            ],
            timeout,
            Secrecy::Secret,
        )
        .await
        .map_err(|e| failed("cannot upload the control-plane certificates", e))?;
        let cert_key =
            parse_certificate_key(&String::from_utf8_lossy(&out.stdout)).map_err(|e| {
                ErrorPayload::new(
                    ErrorCode::Failed,
                    format!("kubeadm init phase upload-certs: {e}"),
                )
            })?;
        control_plane = Some((cert_key, key));
    }
    ctx.log(
        LogLevel::Info,
        &format!(
            "creating a bootstrap token valid for {} s (kubeadm token create)",
            s.token_ttl_secs
        ),
    );
    let out = tool::run(
        ctx,
        "kubeadm token create",
        vec![
            s.kubeadm.clone(),
            "token".into(),
            "create".into(),
            "--print-join-command".into(),
            "--ttl".into(),
            format!("{}s", s.token_ttl_secs),
            "--description".into(),
            "made by runos for GET_CLUSTER_JOIN_CMD".into(),
            "--kubeconfig".into(),
            kubeconfig,
        ],
        timeout,
        Secrecy::Secret,
    )
    .await
    .map_err(|e| failed("cannot create a bootstrap token", e))?;
    let join = JoinCommand::parse(&String::from_utf8_lossy(&out.stdout)).map_err(|e| {
        ErrorPayload::new(
            ErrorCode::Failed,
            format!("kubeadm token create --print-join-command: {e}"),
        )
    })?;
    let mut join_cmd = join.to_string();
    let mut encryption_key = None;
    if let Some((cert_key, key)) = control_plane {
        join_cmd.push_str(" --control-plane --certificate-key ");
        join_cmd.push_str(&cert_key);
        encryption_key = key;
    }
    ctx.log(
        LogLevel::Info,
        &format!(
            "join command ready for {} ({})",
            join.endpoint,
            if as_cp { "control plane" } else { "worker" }
        ),
    );
    Ok(ClusterJoinCmd {
        join_cmd,
        encryption_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "8f3b2c1d0e9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c";

    #[test]
    fn join_lines_are_parsed_strictly() {
        let ok = format!(
            "kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:{HASH} \n"
        );
        let j = JoinCommand::parse(&ok).unwrap();
        assert_eq!(j.endpoint, "10.0.0.1:6443");
        assert_eq!(j.to_string(), ok.trim());
        assert!(!format!("{j:?}").contains("abcdef"));
        for host in ["cp.example.com:6443", "[fd00::1]:6443"] {
            let l = format!(
                "kubeadm join {host} --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:{HASH}"
            );
            assert!(JoinCommand::parse(&l).is_ok(), "{l}");
        }
        for bad in [
            String::new(),
            format!("kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:{HASH}\nsecond"),
            format!("kubeadm join 10.0.0.1:6443 --token ABCDEF.0123456789abcdef --discovery-token-ca-cert-hash sha256:{HASH}"),
            format!("kubeadm join 10.0.0.1 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:{HASH}"),
            format!("kubeadm join 10.0.0.1:6443;rm --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:{HASH}"),
            "kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:abc".to_string(),
            format!("kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:{HASH} --extra"),
            format!("kubeadm join 10.0.0.1:99999 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:{HASH}"),
        ] {
            assert!(JoinCommand::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn certificate_keys_are_the_last_line() {
        let out = format!(
            "[upload-certs] Storing the certificates in Secret \"kubeadm-certs\"\n[upload-certs] Using certificate key:\n{HASH}\n"
        );
        assert_eq!(parse_certificate_key(&out).unwrap(), HASH);
        assert!(parse_certificate_key("[upload-certs] done\n").is_err());
        assert!(parse_certificate_key("").is_err());
    }
}
