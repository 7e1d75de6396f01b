//! The API server's encryption-at-rest key, for a joining control plane.
//!
//! Where it is: the configured `encryption_config`, else the file named by the
//! `--encryption-provider-config` flag of the `kube-apiserver` container in the API server's
//! static Pod manifest (a typed Pod; the container path is mapped to the host through the Pod's
//! `hostPath` volume mounts, as kubeadm's `extraVolumes` set them up).
//!
//! Which key: the EncryptionConfiguration (`apiserver.config.k8s.io/v1`) is parsed typed; the
//! first resource entry that covers `secrets` (`secrets`, `*.` or `*.*`), its first `aescbc`,
//! `secretbox` or `aesgcm` provider, that provider's first key (the one the API server writes
//! with). Its `secret` (standard base64 of 16, 24 or 32 bytes) is the reply's `encryptionKey`, as
//! written in the file. An API server without the flag encrypts nothing at rest: there is no key
//! and the reply has no `encryptionKey`. A flag whose file cannot be read or holds no such key is
//! an error. Parse errors never repeat the file's text (it holds the keys).

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

use crate::settings::KubeSettings;

/// Largest manifest or EncryptionConfiguration read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

const FLAG: &str = "--encryption-provider-config";

/// The encryption key for `s`: `Ok(None)` when the API server does not encrypt at rest.
pub fn encryption_key(s: &KubeSettings) -> Result<Option<String>, String> {
    let path = if s.encryption_config.as_os_str().is_empty() {
        match config_from_manifest(&s.apiserver_manifest)? {
            Some(p) => p,
            None => return Ok(None),
        }
    } else {
        s.encryption_config.clone()
    };
    let text = read_capped(&path)?;
    first_key(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn read_capped(path: &Path) -> Result<String, String> {
    let buf = crate::tool::read_capped(path, MAX_FILE_BYTES)?;
    String::from_utf8(buf).map_err(|_| format!("{} is not UTF-8", path.display()))
}

/// The host path of the EncryptionConfiguration named by the manifest at `manifest`, or `None`
/// when the API server has no `--encryption-provider-config`.
pub fn config_from_manifest(manifest: &Path) -> Result<Option<PathBuf>, String> {
    let text = read_capped(manifest)?;
    config_from_manifest_text(&text).map_err(|e| format!("{}: {e}", manifest.display()))
}

/// [`config_from_manifest`] on the manifest's text.
pub fn config_from_manifest_text(text: &str) -> Result<Option<PathBuf>, String> {
    let pod: Pod = serde_yaml::from_str(text).map_err(|e| {
        format!(
            "not a Pod manifest ({})",
            crate::tool::redact(&e.to_string())
        )
    })?;
    let spec = pod.spec.ok_or("the Pod has no spec")?;
    let container = spec
        .containers
        .iter()
        .find(|c| c.name == "kube-apiserver")
        .or_else(|| spec.containers.first())
        .ok_or("the Pod has no container")?;
    let args = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten());
    let mut found = None;
    let mut next_is_value = false;
    for a in args {
        if next_is_value {
            found = Some(a.clone());
            next_is_value = false;
        } else if let Some(v) = a.strip_prefix(FLAG) {
            match v.strip_prefix('=') {
                Some(v) => found = Some(v.to_string()),
                None if v.is_empty() => next_is_value = true,
                None => {}
            }
        }
    }
    let Some(in_container) = found else {
        return Ok(None);
    };
    let in_container = PathBuf::from(in_container);
    if !in_container.is_absolute() {
        return Err(format!("{FLAG} is not an absolute path"));
    }
    // The container path on the host: through the longest hostPath mount that holds it.
    let mut best: Option<(usize, PathBuf)> = None;
    for m in container.volume_mounts.iter().flatten() {
        let mount = Path::new(&m.mount_path);
        let Ok(rest) = in_container.strip_prefix(mount) else {
            continue;
        };
        let host = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| PathBuf::from(&h.path));
        if let Some(host) = host {
            let depth = mount.components().count();
            if best.as_ref().is_none_or(|(d, _)| depth > *d) {
                let p = if rest.as_os_str().is_empty() {
                    host
                } else {
                    host.join(rest)
                };
                best = Some((depth, p));
            }
        }
    }
    Ok(Some(best.map_or(in_container, |(_, p)| p)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EncryptionConfiguration {
    api_version: String,
    kind: String,
    #[serde(default)]
    resources: Vec<ResourceConfig>,
}

#[derive(Deserialize)]
struct ResourceConfig {
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    providers: Vec<Provider>,
}

#[derive(Deserialize)]
struct Provider {
    aescbc: Option<KeyProvider>,
    aesgcm: Option<KeyProvider>,
    secretbox: Option<KeyProvider>,
}

#[derive(Deserialize)]
struct KeyProvider {
    #[serde(default)]
    keys: Vec<Key>,
}

#[derive(Deserialize)]
struct Key {
    #[allow(dead_code)]
    name: String,
    secret: String,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The first key of the first `aescbc`/`secretbox`/`aesgcm` provider for `secrets` in an
/// EncryptionConfiguration's text. Errors never repeat the text.
pub fn first_key(text: &str) -> Result<String, String> {
    let cfg: EncryptionConfiguration = serde_yaml::from_str(text).map_err(|e| {
        // serde_yaml's message may quote a value (a key): only where it is.
        match e.location() {
            Some(l) => format!(
                "not a valid EncryptionConfiguration (line {}, column {})",
                l.line(),
                l.column()
            ),
            None => "not a valid EncryptionConfiguration".to_string(),
        }
    })?;
    if cfg.kind != "EncryptionConfiguration"
        || !cfg.api_version.starts_with("apiserver.config.k8s.io/")
    {
        return Err("not an apiserver.config.k8s.io EncryptionConfiguration".into());
    }
    let secrets = cfg
        .resources
        .iter()
        .find(|r| {
            r.resources
                .iter()
                .any(|x| x == "secrets" || x == "*." || x == "*.*")
        })
        .ok_or("no entry covers secrets")?;
    let provider = secrets
        .providers
        .iter()
        .find_map(|p| {
            p.aescbc
                .as_ref()
                .or(p.secretbox.as_ref())
                .or(p.aesgcm.as_ref())
        })
        .ok_or("secrets have no aescbc, secretbox or aesgcm provider")?;
    let key = provider.keys.first().ok_or("the provider has no key")?;
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key.secret.trim())
        .map_err(|_| "the key is not base64")?;
    if ![16, 24, 32].contains(&raw.len()) {
        return Err("the key is not 16, 24 or 32 bytes".into());
    }
    Ok(key.secret.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMzQ="; // 32 bytes

    #[test]
    fn the_first_write_key_of_secrets_is_chosen() {
        let cfg = format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [configmaps]\n    providers:\n      - aesgcm: {{keys: [{{name: other, secret: b3RoZXItMDEyMzQ1Njc4OWFiY2RlZg==}}]}}\n  - resources: [secrets]\n    providers:\n      - identity: {{}}\n      - aescbc:\n          keys:\n            - name: key1\n              secret: {KEY}\n            - name: key0\n              secret: b2xkLWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc=\n"
        );
        assert_eq!(first_key(&cfg).unwrap(), KEY);
        let e = first_key(&format!("kind: [{KEY}")).unwrap_err();
        assert!(!e.contains(KEY), "{e}");
        let e = first_key(&format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers: {KEY}\n"
        ))
        .unwrap_err();
        assert!(!e.contains(KEY), "{e}");
        assert!(first_key("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers: [{identity: {}}]\n").is_err());
    }

    #[test]
    fn the_manifest_flag_is_mapped_to_the_host() {
        let m = "apiVersion: v1\nkind: Pod\nmetadata: {name: kube-apiserver, namespace: kube-system}\nspec:\n  containers:\n  - name: kube-apiserver\n    image: registry.k8s.io/kube-apiserver:v1.30.2\n    command:\n    - kube-apiserver\n    - --advertise-address=10.0.0.1\n    - --encryption-provider-config=/etc/kubernetes/enc/enc.yaml\n    volumeMounts:\n    - {name: k8s-certs, mountPath: /etc/kubernetes/pki, readOnly: true}\n    - {name: enc, mountPath: /etc/kubernetes/enc, readOnly: true}\n  volumes:\n  - {name: k8s-certs, hostPath: {path: /etc/kubernetes/pki, type: DirectoryOrCreate}}\n  - {name: enc, hostPath: {path: /srv/enc, type: DirectoryOrCreate}}\n";
        assert_eq!(
            config_from_manifest_text(m).unwrap(),
            Some(PathBuf::from("/srv/enc/enc.yaml"))
        );
        let none = m.replace(
            "    - --encryption-provider-config=/etc/kubernetes/enc/enc.yaml\n",
            "",
        );
        assert_eq!(config_from_manifest_text(&none).unwrap(), None);
        let split = m.replace(
            "--encryption-provider-config=/etc/kubernetes/enc/enc.yaml",
            "--encryption-provider-config\n    - /opt/enc.yaml",
        );
        assert_eq!(
            config_from_manifest_text(&split).unwrap(),
            Some(PathBuf::from("/opt/enc.yaml"))
        );
        assert!(config_from_manifest_text("just text").is_err());
    }
}
