//! helm as a verified download (never a script): `<base>/helm-v<version>-linux-<arch>.tar.gz`
//! and its published `<same>.sha256sum` (exactly one line, [`parse_sum`]); the tarball's sha256
//! must equal the published one; only
//! the entry `linux-<arch>/helm` (a regular file, at most [`MAX_BINARY_BYTES`]) is taken from it
//! and installed atomically with mode 0755. Downloads are bounded in size and time and stop on
//! cancellation. HTTPS with the Mozilla roots (rustls, ring passed explicitly); plain HTTP only
//! to a loopback base URL (tests), and then without redirects.

use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

/// Largest tarball downloaded.
pub const MAX_TARBALL_BYTES: u64 = 128 * 1024 * 1024;
/// Largest checksum file downloaded.
pub const MAX_SUM_BYTES: u64 = 4096;
/// Largest helm binary taken from the tarball.
pub const MAX_BINARY_BYTES: u64 = 256 * 1024 * 1024;
/// The most tarball entries looked at.
pub const MAX_ENTRIES: usize = 1000;

/// helm's name for this machine's architecture (`amd64`, `arm64`, ...).
pub fn arch() -> Result<&'static str, String> {
    match std::env::consts::ARCH {
        "x86_64" => Ok("amd64"),
        "aarch64" => Ok("arm64"),
        "arm" => Ok("arm"),
        "powerpc64" => Ok("ppc64le"),
        "s390x" => Ok("s390x"),
        "riscv64" => Ok("riscv64"),
        other => Err(format!("no helm release for architecture {other}")),
    }
}

/// The release tarball's file name for `version` (`3.15.2` or `v3.15.2`) and `arch`.
pub fn tarball_name(version: &str, arch: &str) -> String {
    format!(
        "helm-v{}-linux-{arch}.tar.gz",
        version.trim_start_matches('v')
    )
}

/// Download helm `version` for `arch` from `base` (validated, without trailing `/`), verify it
/// and install its binary at `dest` (0755, atomically). Blocking: call from a blocking thread.
/// `stop` ends the download at its next read.
pub fn install(
    base: &str,
    version: &str,
    arch: &str,
    dest: &Path,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<(), String> {
    let name = tarball_name(version, arch);
    let client = agent(base.starts_with("http://"), timeout);
    let url = format!("{base}/{name}");
    let sum_text = get(&client, &format!("{url}.sha256sum"), MAX_SUM_BYTES, stop)?;
    let want = parse_sum(&String::from_utf8_lossy(&sum_text), &name)?;
    let tarball = get(&client, &url, MAX_TARBALL_BYTES, stop)?;
    let got = hex::encode(Sha256::digest(&tarball));
    if got != want {
        return Err(format!(
            "{name}: its sha256 {got} is not the published {want}; nothing was installed"
        ));
    }
    let binary = extract(&tarball, &format!("linux-{arch}/helm"))?;
    if stop.load(Ordering::SeqCst) {
        return Err(format!(
            "{url}: the download was cancelled; nothing was installed"
        ));
    }
    runos_executors::handle::write_atomic(dest, &binary, 0o755)
        .map_err(|e| format!("cannot install {}: {e}", dest.display()))?;
    // The mode the file was created with is cut by the umask: 0755 whatever it is.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot make {} executable: {e}", dest.display()))
}

fn agent(plain_http: bool, timeout: Duration) -> ureq::Agent {
    use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::WebPki)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    ureq::Agent::config_builder()
        .https_only(!plain_http)
        // A plain-HTTP (loopback) base follows no redirect: it could lead off the machine.
        .max_redirects(if plain_http { 0 } else { 5 })
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .timeout_global(Some(timeout))
        .accept_encoding("identity")
        .user_agent("runos")
        .tls_config(tls)
        .build()
        .into()
}

fn get(client: &ureq::Agent, url: &str, cap: u64, stop: &AtomicBool) -> Result<Vec<u8>, String> {
    let resp = client.get(url).call().map_err(|e| match e {
        ureq::Error::StatusCode(s) => format!("{url}: HTTP {s}"),
        e => format!("{url}: {e}"),
    })?;
    let body = resp.into_body();
    if body.content_length().is_some_and(|l| l > cap) {
        return Err(format!("{url}: larger than {cap} bytes"));
    }
    let mut reader = body
        .into_with_config()
        .limit(cap.saturating_add(1))
        .reader();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err(format!("{url}: the download was cancelled"));
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("{url}: {e}")),
        };
        out.extend_from_slice(&buf[..n]);
        if out.len() as u64 > cap {
            return Err(format!("{url}: larger than {cap} bytes"));
        }
    }
    Ok(out)
}

/// The sha256 of `name` in a `.sha256sum` file: exactly one non-empty line, `<64 hex>`
/// optionally followed by the file name (which must then be `name`, `*name` in binary mode), and
/// nothing else.
pub fn parse_sum(text: &str, name: &str) -> Result<String, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let line = lines.next().ok_or("the checksum file is empty")?;
    if lines.next().is_some() {
        return Err("the checksum file has more than one line".into());
    }
    let mut words = line.split_ascii_whitespace();
    let hash = words.next().unwrap_or("").to_ascii_lowercase();
    if !crate::join::is_hex64(&hash) {
        return Err("the checksum file does not start with a sha256 (64 hex digits)".into());
    }
    match words.next() {
        None => {}
        Some(n) if n.strip_prefix('*').unwrap_or(n) == name => {}
        Some(_) => return Err(format!("the checksum file is not for {name}")),
    }
    if words.next().is_some() {
        return Err("the checksum file has more than a sha256 and a file name".into());
    }
    Ok(hash)
}

/// The content of the regular-file entry `wanted` of the gzip tarball `tarball` (at most
/// [`MAX_BINARY_BYTES`]); no other entry is written anywhere.
pub fn extract(tarball: &[u8], wanted: &str) -> Result<Vec<u8>, String> {
    // The decompressed stream is bounded too (a gzip bomb ends the read, not the machine).
    let gz = flate2::read::GzDecoder::new(tarball).take(MAX_TARBALL_BYTES * 4);
    let mut archive = tar::Archive::new(gz);
    let entries = archive
        .entries()
        .map_err(|e| format!("the tarball cannot be read: {e}"))?;
    for (i, entry) in entries.enumerate() {
        if i >= MAX_ENTRIES {
            break;
        }
        let entry = entry.map_err(|e| format!("the tarball cannot be read: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("the tarball cannot be read: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if path != wanted {
            continue;
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(format!("{wanted} in the tarball is not a regular file"));
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| format!("the tarball cannot be read: {e}"))?;
        if size > MAX_BINARY_BYTES {
            return Err(format!("{wanted} is larger than {MAX_BINARY_BYTES} bytes"));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry
            .take(MAX_BINARY_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("the tarball cannot be read: {e}"))?;
        if data.len() as u64 != size {
            return Err(format!("{wanted} in the tarball is truncated"));
        }
        return Ok(data);
    }
    Err(format!("the tarball has no {wanted}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_files_are_parsed() {
        let h = "a".repeat(64);
        let n = "helm-v3.15.2-linux-amd64.tar.gz";
        assert_eq!(parse_sum(&format!("{h}  {n}\n"), n).unwrap(), h);
        assert_eq!(parse_sum(&format!("{h}\n"), n).unwrap(), h);
        assert!(parse_sum(&format!("{h}  other.tar.gz\n"), n).is_err());
        assert!(parse_sum("not a hash\n", n).is_err());
        assert!(parse_sum("", n).is_err());
        assert_eq!(parse_sum(&format!("{h} *{n}"), n).unwrap(), h);
        for bad in [
            format!("{h}  {n} extra\n"),
            format!("{h}  {n}\n{}  other\n", "b".repeat(64)),
            format!("{h}  **{n}\n"),
            format!("{}  {n}\n", "a".repeat(63)),
            format!("{}g  {n}\n", "a".repeat(63)),
        ] {
            assert!(parse_sum(&bad, n).is_err(), "{bad}");
        }
        assert_eq!(
            tarball_name("v3.15.2", "arm64"),
            "helm-v3.15.2-linux-arm64.tar.gz"
        );
    }
}
