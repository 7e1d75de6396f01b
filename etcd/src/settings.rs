//! Where etcd is and how long to wait for it: the agent configuration's `[etcd]` section.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The most endpoints a configuration may list.
pub const MAX_ENDPOINTS: usize = 16;
/// Largest CA, certificate or key file read.
pub const MAX_PEM_BYTES: u64 = 256 * 1024;

/// The `[etcd]` section (docs/cli.md, docs/etcd.md). Every field has a default (kubeadm's
/// layout), and unknown keys are errors. Check it with [`Settings::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Client URLs used to find the cluster (`https://` with the TLS files below, or `http://`).
    pub endpoints: Vec<String>,
    /// The CA that signed the etcd servers' certificates (PEM).
    pub ca: PathBuf,
    /// The client certificate presented to etcd (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM; read, never logged).
    pub key: PathBuf,
    /// Connecting to one endpoint (TCP and TLS), in milliseconds.
    pub connect_timeout_ms: u64,
    /// One etcd request (member list, move-leader, member remove), in milliseconds.
    pub request_timeout_ms: u64,
    /// One member's health probe (`Status` against its own client URLs), in milliseconds.
    pub health_timeout_ms: u64,
    /// How long to wait for leadership to move off a leader being removed, in seconds.
    pub leader_move_wait_secs: u64,
    /// How long to wait for the member list to show the removal, in seconds.
    pub verify_wait_secs: u64,
}

/// kubeadm's CA of etcd.
pub const DEFAULT_CA: &str = "/etc/kubernetes/pki/etcd/ca.crt";
/// kubeadm's client certificate for etcd health checks (signed by the etcd CA, client auth).
pub const DEFAULT_CERT: &str = "/etc/kubernetes/pki/etcd/healthcheck-client.crt";
/// Its key.
pub const DEFAULT_KEY: &str = "/etc/kubernetes/pki/etcd/healthcheck-client.key";

impl Default for Settings {
    fn default() -> Self {
        Settings {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            ca: DEFAULT_CA.into(),
            cert: DEFAULT_CERT.into(),
            key: DEFAULT_KEY.into(),
            connect_timeout_ms: 3000,
            request_timeout_ms: 5000,
            health_timeout_ms: 2000,
            leader_move_wait_secs: 10,
            verify_wait_secs: 30,
        }
    }
}

/// A setting out of range: the dotted key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {message}")]
pub struct SettingsError {
    /// The key, e.g. `etcd.endpoints`.
    pub key: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl Settings {
    /// Check every value: 1 to [`MAX_ENDPOINTS`] `http(s)://host:port` endpoints without a
    /// path, absolute TLS paths, timeouts within their bounds.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |key, message: String| Err(SettingsError { key, message });
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            return bad(
                "etcd.endpoints",
                format!("must list 1 to {MAX_ENDPOINTS} URLs"),
            );
        }
        for e in &self.endpoints {
            if let Err(m) = check_endpoint(e) {
                return bad("etcd.endpoints", m);
            }
        }
        for (key, p) in [
            ("etcd.ca", &self.ca),
            ("etcd.cert", &self.cert),
            ("etcd.key", &self.key),
        ] {
            if !p.is_absolute() || p.as_os_str().as_encoded_bytes().contains(&0) {
                return bad(key, format!("must be an absolute path, got {p:?}"));
            }
        }
        for (key, v, lo, hi) in [
            (
                "etcd.connect_timeout_ms",
                self.connect_timeout_ms,
                50,
                60_000,
            ),
            (
                "etcd.request_timeout_ms",
                self.request_timeout_ms,
                50,
                120_000,
            ),
            ("etcd.health_timeout_ms", self.health_timeout_ms, 50, 60_000),
            (
                "etcd.leader_move_wait_secs",
                self.leader_move_wait_secs,
                1,
                120,
            ),
            ("etcd.verify_wait_secs", self.verify_wait_secs, 1, 600),
        ] {
            if !(lo..=hi).contains(&v) {
                return bad(key, format!("must be between {lo} and {hi}, got {v}"));
            }
        }
        Ok(())
    }

    /// [`Settings::connect_timeout_ms`].
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// [`Settings::request_timeout_ms`].
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    /// [`Settings::health_timeout_ms`].
    pub fn health_timeout(&self) -> Duration {
        Duration::from_millis(self.health_timeout_ms)
    }
    /// [`Settings::leader_move_wait_secs`].
    pub fn leader_move_wait(&self) -> Duration {
        Duration::from_secs(self.leader_move_wait_secs)
    }
    /// [`Settings::verify_wait_secs`].
    pub fn verify_wait(&self) -> Duration {
        Duration::from_secs(self.verify_wait_secs)
    }
}

/// `http(s)://host:port` (an optional `/`), nothing else.
pub(crate) fn check_endpoint(e: &str) -> Result<(), String> {
    let u = url::Url::parse(e).map_err(|err| format!("{e:?} is not a URL: {err}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("{e:?} must start with https:// or http://"));
    }
    if u.host().is_none() || u.port().is_none() {
        return Err(format!("{e:?} must name a host and a port"));
    }
    if !u.username().is_empty()
        || u.password().is_some()
        || u.path() != "/"
        || u.query().is_some()
        || u.fragment().is_some()
    {
        return Err(format!(
            "{e:?} must be only scheme, host and port, like https://127.0.0.1:2379"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_the_key() {
        Settings::default().validate().unwrap();
        let with = |f: &dyn Fn(&mut Settings)| {
            let mut s = Settings::default();
            f(&mut s);
            s.validate().unwrap_err().key
        };
        assert_eq!(with(&|s| s.endpoints.clear()), "etcd.endpoints");
        assert_eq!(
            with(&|s| s.endpoints = vec!["127.0.0.1:2379".into()]),
            "etcd.endpoints"
        );
        assert_eq!(
            with(&|s| s.endpoints = vec!["https://127.0.0.1".into()]),
            "etcd.endpoints"
        );
        assert_eq!(
            with(&|s| s.endpoints = vec!["https://u:p@127.0.0.1:2379".into()]),
            "etcd.endpoints"
        );
        assert_eq!(
            with(&|s| s.endpoints = vec!["ftp://127.0.0.1:2379".into()]),
            "etcd.endpoints"
        );
        assert_eq!(with(&|s| s.key = "key.pem".into()), "etcd.key");
        assert_eq!(
            with(&|s| s.request_timeout_ms = 0),
            "etcd.request_timeout_ms"
        );
        assert_eq!(
            with(&|s| s.leader_move_wait_secs = 1000),
            "etcd.leader_move_wait_secs"
        );
        let s = Settings {
            endpoints: vec![
                "http://[::1]:2379/".into(),
                "https://etcd.example:2379".into(),
            ],
            ..Settings::default()
        };
        s.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = serde_json::from_str::<Settings>(r#"{"endpoint":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("endpoint"), "{e}");
        let s: Settings = serde_json::from_str(r#"{"verify_wait_secs":5}"#).unwrap();
        assert_eq!(s.verify_wait_secs, 5);
        assert_eq!(s.ca, PathBuf::from(DEFAULT_CA));
    }
}
