//! The `[kubernetes]` section of the agent's configuration: where the tools and files are, the
//! package names, the bounds. Every key has a default; [`KubeSettings::validate`] checks them and
//! names the key that is wrong.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest bootstrap token lifetime accepted (`token_ttl_secs`).
pub const MAX_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// The longest node wait accepted (`node_wait_secs`).
pub const MAX_NODE_WAIT_SECS: u64 = 3600;
/// The longest timeout of one step accepted (`*_timeout_secs`).
pub const MAX_STEP_TIMEOUT_SECS: u64 = 3 * 3600;

/// `[kubernetes]`: the kubeadm executors' settings (docs/kubernetes.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubeSettings {
    /// kubeadm: a tool name (looked up through `[tools]` and `PATH`) or an absolute path.
    pub kubeadm: String,
    /// systemctl: a tool name or an absolute path.
    pub systemctl: String,
    /// The kubeconfig the node's own state is read with (its Node object): kubelet's.
    pub kubeconfig: PathBuf,
    /// The kubeconfig `kubeadm token create` and `kubeadm init phase upload-certs` use.
    pub admin_kubeconfig: PathBuf,
    /// The node's name in Kubernetes; empty: the host name.
    pub node_name: String,
    /// The API server's static Pod manifest, where `--encryption-provider-config` is found.
    pub apiserver_manifest: PathBuf,
    /// The API server's EncryptionConfiguration; empty: the file named by the manifest's
    /// `--encryption-provider-config`.
    pub encryption_config: PathBuf,
    /// Lifetime of a bootstrap token made by `GET_CLUSTER_JOIN_CMD`, 60 s to 24 h.
    pub token_ttl_secs: u64,
    /// Timeout of each kubeadm step of `GET_CLUSTER_JOIN_CMD`.
    pub join_timeout_secs: u64,
    /// The kubeadm package.
    pub kubeadm_package: String,
    /// The kubelet package.
    pub kubelet_package: String,
    /// The kubectl package.
    pub kubectl_package: String,
    /// The containerd package.
    pub containerd_package: String,
    /// helm as a package instead of the verified download; empty: the download.
    pub helm_package: String,
    /// Where helm's release files are (`<base>/helm-v<version>-linux-<arch>.tar.gz` and
    /// `.sha256sum`). HTTPS; plain HTTP only to a loopback address (tests).
    pub helm_base_url: String,
    /// Where the downloaded helm is installed.
    pub helm_path: PathBuf,
    /// Timeout of the helm download (both files).
    pub helm_download_timeout_secs: u64,
    /// Timeout of `kubeadm upgrade apply`.
    pub upgrade_apply_timeout_secs: u64,
    /// Timeout of `kubeadm upgrade node`.
    pub upgrade_node_timeout_secs: u64,
    /// Timeout of `systemctl daemon-reload` and `systemctl restart kubelet`.
    pub restart_timeout_secs: u64,
    /// How long to wait for the Node to report the new kubelet version and Ready, 1 s to 1 h.
    pub node_wait_secs: u64,
    /// Between two reads of the Node while waiting, 1 to 60 s.
    pub node_poll_secs: u64,
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            kubeadm: "kubeadm".into(),
            systemctl: "systemctl".into(),
            kubeconfig: "/etc/kubernetes/kubelet.conf".into(),
            admin_kubeconfig: "/etc/kubernetes/admin.conf".into(),
            node_name: String::new(),
            apiserver_manifest: "/etc/kubernetes/manifests/kube-apiserver.yaml".into(),
            encryption_config: PathBuf::new(),
            token_ttl_secs: 2 * 3600,
            join_timeout_secs: 60,
            kubeadm_package: "kubeadm".into(),
            kubelet_package: "kubelet".into(),
            kubectl_package: "kubectl".into(),
            containerd_package: "containerd".into(),
            helm_package: String::new(),
            helm_base_url: "https://get.helm.sh".into(),
            helm_path: "/usr/local/bin/helm".into(),
            helm_download_timeout_secs: 300,
            upgrade_apply_timeout_secs: 1800,
            upgrade_node_timeout_secs: 900,
            restart_timeout_secs: 120,
            node_wait_secs: 300,
            node_poll_secs: 2,
        }
    }
}

/// A setting that cannot be used: the key (`kubernetes.<key>`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {message}")]
pub struct SettingsError {
    /// The dotted key, e.g. `kubernetes.token_ttl_secs`.
    pub key: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn bad(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError {
        key,
        message: message.into(),
    }
}

impl KubeSettings {
    /// The settings an executor was given (`null`: all defaults), validated.
    pub fn from_config(config: &serde_json::Value) -> Result<Self, SettingsError> {
        let s: KubeSettings = if config.is_null() {
            KubeSettings::default()
        } else {
            serde_json::from_value(config.clone())
                .map_err(|e| bad("kubernetes", format!("is invalid: {e}")))?
        };
        s.validate()?;
        Ok(s)
    }

    /// Check every key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        for (key, v) in [
            ("kubernetes.kubeadm", &self.kubeadm),
            ("kubernetes.systemctl", &self.systemctl),
        ] {
            if !is_program(v) {
                return Err(bad(
                    key,
                    "must be a program name or an absolute path (no NUL)",
                ));
            }
        }
        for (key, p, may_be_empty) in [
            ("kubernetes.kubeconfig", &self.kubeconfig, false),
            ("kubernetes.admin_kubeconfig", &self.admin_kubeconfig, false),
            (
                "kubernetes.apiserver_manifest",
                &self.apiserver_manifest,
                false,
            ),
            (
                "kubernetes.encryption_config",
                &self.encryption_config,
                true,
            ),
            ("kubernetes.helm_path", &self.helm_path, false),
        ] {
            let empty_ok = may_be_empty && p.as_os_str().is_empty();
            if !empty_ok && !is_abs_path(p) {
                return Err(bad(key, "must be an absolute path"));
            }
        }
        if !self.node_name.is_empty() && !is_dns_subdomain(&self.node_name) {
            return Err(bad(
                "kubernetes.node_name",
                "must be a Kubernetes node name (a DNS subdomain: lower-case letters, digits, '-' and '.', at most 253)",
            ));
        }
        for (key, v, may_be_empty) in [
            ("kubernetes.kubeadm_package", &self.kubeadm_package, false),
            ("kubernetes.kubelet_package", &self.kubelet_package, false),
            ("kubernetes.kubectl_package", &self.kubectl_package, false),
            (
                "kubernetes.containerd_package",
                &self.containerd_package,
                false,
            ),
            ("kubernetes.helm_package", &self.helm_package, true),
        ] {
            let empty_ok = may_be_empty && v.is_empty();
            if !empty_ok && !is_debian_package(v) {
                return Err(bad(
                    key,
                    "must be a Debian package name (a-z 0-9 + - ., starting with a letter or digit)",
                ));
            }
        }
        helm_base(&self.helm_base_url).map_err(|m| bad("kubernetes.helm_base_url", m))?;
        range(
            "kubernetes.token_ttl_secs",
            self.token_ttl_secs,
            60,
            MAX_TOKEN_TTL_SECS,
        )?;
        for (key, v) in [
            ("kubernetes.join_timeout_secs", self.join_timeout_secs),
            (
                "kubernetes.helm_download_timeout_secs",
                self.helm_download_timeout_secs,
            ),
            (
                "kubernetes.upgrade_apply_timeout_secs",
                self.upgrade_apply_timeout_secs,
            ),
            (
                "kubernetes.upgrade_node_timeout_secs",
                self.upgrade_node_timeout_secs,
            ),
            ("kubernetes.restart_timeout_secs", self.restart_timeout_secs),
        ] {
            range(key, v, 1, MAX_STEP_TIMEOUT_SECS)?;
        }
        range(
            "kubernetes.node_wait_secs",
            self.node_wait_secs,
            1,
            MAX_NODE_WAIT_SECS,
        )?;
        range("kubernetes.node_poll_secs", self.node_poll_secs, 1, 60)?;
        Ok(())
    }

    /// The node's name: the configured one, else `hostname`.
    pub fn node_name_or(&self, hostname: &str) -> String {
        if self.node_name.is_empty() {
            hostname.to_ascii_lowercase()
        } else {
            self.node_name.clone()
        }
    }

    /// `secs` as a [`Duration`].
    pub(crate) fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }
}

fn range(key: &'static str, v: u64, lo: u64, hi: u64) -> Result<(), SettingsError> {
    if v < lo || v > hi {
        return Err(bad(key, format!("must be between {lo} and {hi}, got {v}")));
    }
    Ok(())
}

fn is_program(v: &str) -> bool {
    !v.is_empty()
        && !v.contains('\0')
        && v.len() <= 4096
        && (v.starts_with('/') || (!v.contains('/') && v != "." && v != ".."))
}

fn is_abs_path(p: &Path) -> bool {
    p.is_absolute() && !p.as_os_str().as_encoded_bytes().contains(&0)
}

/// A Kubernetes object name (DNS-1123 subdomain).
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A Debian package name (policy §5.6.1), at most 128 bytes.
pub(crate) fn is_debian_package(s: &str) -> bool {
    s.len() >= 2
        && s.len() <= 128
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+' || b == b'-' || b == b'.'
        })
}

/// The helm base URL without a trailing `/`: `https://...`, or `http://` to a loopback host.
pub(crate) fn helm_base(url: &str) -> Result<String, String> {
    let u = url.trim_end_matches('/');
    // No user information (`http://127.0.0.1:80@example.com` is example.com) and nothing a URL
    // parser might read differently from the host check below.
    if u.bytes().any(|b| b == b'@' || b == b'\\' || b == b'%') {
        return Err("must be a URL without user information, '\\' or '%'".into());
    }
    let rest = if let Some(r) = u.strip_prefix("https://") {
        r
    } else if let Some(r) = u.strip_prefix("http://") {
        let host = r.split(['/', ':']).next().unwrap_or("");
        let host = if r.starts_with('[') {
            r.split(']').next().unwrap_or("").trim_start_matches('[')
        } else {
            host
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err("must be an https:// URL (http:// only to a loopback address)".into());
        }
        r
    } else {
        return Err("must be an https:// URL".into());
    };
    if rest.is_empty()
        || u.len() > 2048
        || u.bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
    {
        return Err("must be a URL without spaces, query or fragment".into());
    }
    Ok(u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_keys_are_named() {
        KubeSettings::default().validate().unwrap();
        let s = KubeSettings::from_config(&serde_json::Value::Null).unwrap();
        assert_eq!(s, KubeSettings::default());
        for (json, key) in [
            (
                serde_json::json!({"token_ttl_secs": 90000}),
                "kubernetes.token_ttl_secs",
            ),
            (
                serde_json::json!({"token_ttl_secs": 10}),
                "kubernetes.token_ttl_secs",
            ),
            (
                serde_json::json!({"node_wait_secs": 0}),
                "kubernetes.node_wait_secs",
            ),
            (
                serde_json::json!({"kubeadm": "bin/kubeadm"}),
                "kubernetes.kubeadm",
            ),
            (
                serde_json::json!({"kubeconfig": "kubelet.conf"}),
                "kubernetes.kubeconfig",
            ),
            (
                serde_json::json!({"node_name": "Node_1"}),
                "kubernetes.node_name",
            ),
            (
                serde_json::json!({"kubeadm_package": "-x"}),
                "kubernetes.kubeadm_package",
            ),
            (
                serde_json::json!({"helm_base_url": "http://example.com"}),
                "kubernetes.helm_base_url",
            ),
            (serde_json::json!({"nope": 1}), "kubernetes"),
        ] {
            assert_eq!(
                KubeSettings::from_config(&json).unwrap_err().key,
                key,
                "{json}"
            );
        }
        assert!(helm_base("http://127.0.0.1:8080/x/").is_ok());
        assert!(helm_base("http://[::1]:8080").is_ok());
        assert!(helm_base("https://get.helm.sh/").is_ok());
        assert!(helm_base("ftp://x").is_err());
        for bad in [
            "http://127.0.0.1:80@example.com/",
            "http://localhost@example.com",
            "http://127.0.0.1\\@example.com",
            "http://127.0.0.1%2f@example.com",
            "http://127.0.0.1.example.com",
            "https://user@get.helm.sh",
        ] {
            assert!(helm_base(bad).is_err(), "{bad}");
        }
    }
}
