//! Downloading release files over HTTPS with `ureq` (blocking; callers on the async runtime use
//! `spawn_blocking`).
//!
//! TLS is rustls with the `ring` provider passed explicitly to this client (no process-wide
//! default is installed, so the rest of the agent's TLS is unaffected). Server certificates are
//! checked against the Mozilla roots compiled in (`webpki-roots`), or only against
//! `[update] release_ca_file` when set. Every request is https-only (also after redirects,
//! which GitHub uses for release assets; at most 5), with connect, per-read and whole-download
//! timeouts, and every body has a size cap. A body shorter than its `Content-Length` is an
//! error, never a short file.

use std::fs::File;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runos_checksums::{Digest, Sha256Hasher};
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use crate::config::UpdateSettings;

/// A read that makes no progress for this long fails the download.
pub const READ_STALL: Duration = Duration::from_secs(60);
/// Redirects followed.
const MAX_REDIRECTS: u32 = 5;

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Transport, TLS or HTTP failure.
    #[error("cannot download {url}: {message}")]
    Http {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The server answered with a non-2xx status.
    #[error("cannot download {url}: the server answered HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The body is larger than allowed.
    #[error("{url} is larger than the {cap} bytes allowed")]
    TooLarge {
        /// The URL.
        url: String,
        /// The cap.
        cap: u64,
    },
    /// The body ended before its announced length.
    #[error("{url} was truncated: received {got} of {expected} bytes")]
    Truncated {
        /// The URL.
        url: String,
        /// Bytes received.
        got: u64,
        /// `Content-Length`.
        expected: u64,
    },
    /// Writing the downloaded bytes failed (disk full, I/O error).
    #[error("cannot write the download to {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The client could not be set up (CA file).
    #[error("{0}")]
    Setup(String),
}

/// An HTTPS client for release files.
#[derive(Debug)]
pub struct Fetcher {
    agent: ureq::Agent,
    progress: bool,
    cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Fetcher {
    /// A client for `settings`; `progress` shows a progress line on stderr when it is a
    /// terminal.
    pub fn new(settings: &UpdateSettings, progress: bool) -> Result<Self, FetchError> {
        let roots = match &settings.release_ca_file {
            None => RootCerts::WebPki,
            Some(path) => {
                let pem = crate::util::fs::read_capped(path, 1024 * 1024).map_err(|e| {
                    FetchError::Setup(format!(
                        "cannot read update.release_ca_file {}: {e}",
                        path.display()
                    ))
                })?;
                let certs = runos_transport::pem::certificates(&pem).map_err(|e| {
                    FetchError::Setup(format!("update.release_ca_file {}: {e}", path.display()))
                })?;
                if certs.is_empty() {
                    return Err(FetchError::Setup(format!(
                        "update.release_ca_file {} holds no certificate",
                        path.display()
                    )));
                }
                RootCerts::new_with_certs(
                    &certs
                        .iter()
                        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                        .collect::<Vec<_>>(),
                )
            }
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(roots)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let config = ureq::Agent::config_builder()
            .https_only(true)
            .max_redirects(MAX_REDIRECTS)
            .timeout_connect(Some(settings.connect_timeout))
            .timeout_resolve(Some(settings.connect_timeout))
            .timeout_recv_response(Some(READ_STALL))
            .timeout_per_read(Some(READ_STALL))
            .timeout_global(Some(settings.download_timeout))
            .user_agent(format!("runos/{}", crate::agent_version()))
            .accept_encoding("identity")
            .tls_config(tls)
            .build();
        Ok(Fetcher {
            agent: config.into(),
            progress: progress && std::io::stderr().is_terminal(),
            cancel: None,
        })
    }

    /// Stop a download (with [`FetchError::Http`] "cancelled") once `cancel` is set.
    pub fn with_cancel(mut self, cancel: Option<Arc<std::sync::atomic::AtomicBool>>) -> Self {
        self.cancel = cancel;
        self
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn get(
        &self,
        url: &str,
        cap: u64,
        accept: Option<&str>,
    ) -> Result<(ureq::Body, Option<u64>), FetchError> {
        let mut req = self.agent.get(url);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        let resp = req.call().map_err(|e| match e {
            ureq::Error::StatusCode(status) => FetchError::Status {
                url: url.to_string(),
                status,
            },
            e => FetchError::Http {
                url: url.to_string(),
                message: e.to_string(),
            },
        })?;
        let body = resp.into_body();
        let len = body.content_length();
        if len.is_some_and(|l| l > cap) {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                cap,
            });
        }
        Ok((body, len))
    }

    /// Download `url` into memory, at most `cap` bytes.
    pub fn get_bytes(&self, url: &str, cap: u64) -> Result<Vec<u8>, FetchError> {
        self.get_bytes_accept(url, cap, None)
    }

    /// [`Fetcher::get_bytes`] with an `Accept` header.
    pub fn get_bytes_accept(
        &self,
        url: &str,
        cap: u64,
        accept: Option<&str>,
    ) -> Result<Vec<u8>, FetchError> {
        let mut out = Vec::new();
        self.download(url, cap, None, accept, |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(out)
    }

    /// Download `url` into `file` (at `path`, for messages), at most `cap` bytes; returns the
    /// sha256 and the size. The file is synced.
    pub fn get_to_file(
        &self,
        url: &str,
        cap: u64,
        file: &mut File,
        path: &Path,
        label: &str,
    ) -> Result<(Digest, u64), FetchError> {
        let mut hasher = Sha256Hasher::new();
        let write_err = |source| FetchError::Write {
            path: path.display().to_string(),
            source,
        };
        let size = self.download(url, cap, Some(label), None, |chunk| {
            hasher.update(chunk);
            file.write_all(chunk)
        });
        let size = size.map_err(|e| match e {
            DownloadError::Fetch(f) => f,
            DownloadError::Sink(io) => write_err(io),
        })?;
        file.sync_all().map_err(write_err)?;
        Ok((hasher.finish(), size))
    }

    fn download(
        &self,
        url: &str,
        cap: u64,
        label: Option<&str>,
        accept: Option<&str>,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, DownloadError> {
        let (body, len) = self.get(url, cap, accept)?;
        // One byte over the cap tells "exactly cap" from "more".
        let mut reader = body
            .into_with_config()
            .limit(cap.saturating_add(1))
            .reader();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got: u64 = 0;
        let mut shown = Instant::now();
        let show = self.progress && label.is_some();
        loop {
            if self.cancelled() {
                return Err(FetchError::Http {
                    url: url.to_string(),
                    message: "the update was cancelled".into(),
                }
                .into());
            }
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if show {
                        eprintln!();
                    }
                    let message = e.to_string();
                    // ureq reports a body that ends before its Content-Length as an I/O error.
                    return Err(match len {
                        Some(expected) if got < expected => FetchError::Truncated {
                            url: url.to_string(),
                            got,
                            expected,
                        },
                        _ if message.contains("limit") => FetchError::TooLarge {
                            url: url.to_string(),
                            cap,
                        },
                        _ => FetchError::Http {
                            url: url.to_string(),
                            message,
                        },
                    }
                    .into());
                }
            };
            got = got.saturating_add(n as u64);
            if got > cap {
                return Err(FetchError::TooLarge {
                    url: url.to_string(),
                    cap,
                }
                .into());
            }
            sink(&buf[..n]).map_err(DownloadError::Sink)?;
            if show && shown.elapsed() >= Duration::from_millis(200) {
                shown = Instant::now();
                progress_line(label.unwrap_or(""), got, len);
            }
        }
        if show {
            progress_line(label.unwrap_or(""), got, len);
            eprintln!();
        }
        if let Some(expected) = len
            && got != expected
        {
            return Err(FetchError::Truncated {
                url: url.to_string(),
                got,
                expected,
            }
            .into());
        }
        Ok(got)
    }
}

#[derive(Debug)]
enum DownloadError {
    Fetch(FetchError),
    Sink(std::io::Error),
}

impl From<FetchError> for DownloadError {
    fn from(e: FetchError) -> Self {
        DownloadError::Fetch(e)
    }
}

impl From<DownloadError> for FetchError {
    fn from(e: DownloadError) -> Self {
        match e {
            DownloadError::Fetch(f) => f,
            DownloadError::Sink(source) => FetchError::Write {
                path: "memory".into(),
                source,
            },
        }
    }
}

fn progress_line(label: &str, got: u64, len: Option<u64>) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut err = std::io::stderr().lock();
    let _ = match len {
        Some(l) if l > 0 => write!(
            err,
            "\r{label}: {:.1} / {:.1} MiB ({}%)",
            mib(got),
            mib(l),
            got.saturating_mul(100) / l
        ),
        _ => write!(err, "\r{label}: {:.1} MiB", mib(got)),
    };
    let _ = err.flush();
}

/// Largest answer read from the GitHub attestations API.
pub const MAX_API_BYTES: u64 = 4 * 1024 * 1024;
/// Attestations tried from one API answer.
pub const MAX_API_ATTESTATIONS: usize = 16;

/// The bundles in a GitHub attestations API answer
/// (`{"attestations": [{"bundle": {...}}, ...]}`), re-serialised, at most
/// [`MAX_API_ATTESTATIONS`]. Entries without an inline bundle are skipped.
pub fn api_bundles(answer: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        attestations: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        bundle: Option<serde_json::Value>,
    }
    let a: Answer = serde_json::from_slice(answer)
        .map_err(|e| format!("the attestations API answer is not what GitHub sends: {e}"))?;
    Ok(a.attestations
        .into_iter()
        .filter_map(|e| e.bundle)
        .filter(|b| b.is_object())
        .take(MAX_API_ATTESTATIONS)
        .filter_map(|b| serde_json::to_vec(&b).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_process_default_crypto_provider_is_installed() {
        let settings = crate::config::RawConfig::default()
            .validate(Path::new("/x.toml"))
            .unwrap()
            .update;
        let _f = Fetcher::new(&settings, false).unwrap();
        assert!(rustls::crypto::CryptoProvider::get_default().is_none());
    }

    #[test]
    fn api_answers() {
        let two = br#"{"attestations": [{"bundle": {"a": 1}, "repository_id": 1}, {"bundle_url": "x"}, {"bundle": {"b": 2}}]}"#;
        assert_eq!(
            api_bundles(two).unwrap(),
            vec![br#"{"a":1}"#.to_vec(), br#"{"b":2}"#.to_vec()]
        );
        assert!(api_bundles(br#"{"attestations": []}"#).unwrap().is_empty());
        for bad in [&b"[]"[..], b"{}", b"{\"attestations\": 5}", b"\xff"] {
            assert!(api_bundles(bad).is_err());
        }
        let many = format!(
            "{{\"attestations\": [{}]}}",
            vec![r#"{"bundle": {}}"#; 100].join(",")
        );
        assert_eq!(
            api_bundles(many.as_bytes()).unwrap().len(),
            MAX_API_ATTESTATIONS
        );
    }
}
