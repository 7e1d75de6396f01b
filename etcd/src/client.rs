//! Connecting to etcd: TLS material read once with a size cap, every call bounded.

use std::future::Future;
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::settings::{MAX_PEM_BYTES, Settings};

/// Why talking to etcd failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// The TLS files could not be read or are not PEM of the right kind.
    #[error("{0}")]
    Tls(String),
    /// No usable endpoint, a transport error, or an error answer from etcd.
    #[error("{0}")]
    Call(String),
    /// The call did not finish in time.
    #[error("{0}")]
    Timeout(String),
}

/// The TLS material (loaded only when an `https://` endpoint is used).
#[derive(Clone)]
pub struct Tls(TlsOptions);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

fn read_capped(what: &str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    let f = std::fs::File::open(path).map_err(|e| {
        EtcdError::Tls(format!(
            "cannot read the etcd {what} {}: {e}",
            path.display()
        ))
    })?;
    let mut buf = Vec::new();
    f.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            EtcdError::Tls(format!(
                "cannot read the etcd {what} {}: {e}",
                path.display()
            ))
        })?;
    if buf.len() as u64 > MAX_PEM_BYTES {
        return Err(EtcdError::Tls(format!(
            "the etcd {what} {} is larger than {MAX_PEM_BYTES} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

impl Tls {
    /// Read and check `ca`, `cert` and `key` (PEM; at least one certificate each, one private
    /// key). The key's content never appears in an error.
    pub fn load(s: &Settings) -> Result<Tls, EtcdError> {
        let ca = read_capped("CA", &s.ca)?;
        let cert = read_capped("client certificate", &s.cert)?;
        let key = read_capped("client key", &s.key)?;
        for (what, path, pem) in [("CA", &s.ca, &ca), ("client certificate", &s.cert, &cert)] {
            let n = CertificateDer::pem_slice_iter(pem)
                .map(|c| c.map(|_| ()))
                .collect::<Result<Vec<()>, _>>()
                .map_err(|e| {
                    EtcdError::Tls(format!(
                        "the etcd {what} {} is not valid PEM: {e}",
                        path.display()
                    ))
                })?
                .len();
            if n == 0 {
                return Err(EtcdError::Tls(format!(
                    "the etcd {what} {} holds no certificate",
                    path.display()
                )));
            }
        }
        PrivateKeyDer::from_pem_slice(&key).map_err(|_| {
            EtcdError::Tls(format!(
                "the etcd client key {} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM)",
                s.key.display()
            ))
        })?;
        Ok(Tls(TlsOptions::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))))
    }
}

/// Loads the TLS material on first use and connects to endpoint sets.
#[derive(Debug)]
pub struct Connector {
    settings: Settings,
    tls: std::sync::OnceLock<Result<Tls, EtcdError>>,
}

impl Connector {
    /// A connector for `settings` (nothing is read yet).
    pub fn new(settings: &Settings) -> Self {
        Connector {
            settings: settings.clone(),
            tls: std::sync::OnceLock::new(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn tls(&self) -> Result<Tls, EtcdError> {
        self.tls.get_or_init(|| Tls::load(&self.settings)).clone()
    }

    /// A client for `urls`: the `https://` ones with TLS when there are any, else the
    /// `http://` ones. Connecting is lazy: the first call's timeout covers it.
    pub async fn connect(&self, urls: &[String]) -> Result<Client, EtcdError> {
        let https: Vec<&str> = urls
            .iter()
            .map(|u| u.trim())
            .filter(|u| u.starts_with("https://"))
            .collect();
        let http: Vec<&str> = urls
            .iter()
            .map(|u| u.trim())
            .filter(|u| u.starts_with("http://"))
            .collect();
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.settings.connect_timeout())
            .with_timeout(self.settings.request_timeout());
        let eps = if !https.is_empty() {
            opts = opts.with_tls(self.tls()?.0);
            https
        } else if !http.is_empty() {
            http
        } else {
            return Err(EtcdError::Call(format!(
                "no http:// or https:// client URL among {urls:?}"
            )));
        };
        let fut = Client::connect(eps, Some(opts));
        match tokio::time::timeout(self.settings.connect_timeout(), fut).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(EtcdError::Call(format!("cannot connect to {urls:?}: {e}"))),
            Err(_) => Err(EtcdError::Timeout(format!(
                "connecting to {urls:?} took longer than {:?}",
                self.settings.connect_timeout()
            ))),
        }
    }
}

/// A read-only call through `urls`, one URL at a time (a dead URL does not hide a live one):
/// the first answer wins, each try bounded by `limit` (connecting included).
pub async fn read_each<T, F, Fut>(
    conn: &Connector,
    urls: &[String],
    what: &str,
    limit: Duration,
    f: F,
) -> Result<T, EtcdError>
where
    F: Fn(Client) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut last = EtcdError::Call(format!("{what}: no client URL"));
    for u in urls.iter().take(crate::settings::MAX_ENDPOINTS) {
        let one = std::slice::from_ref(u);
        let r = tokio::time::timeout(limit, async {
            let c = conn.connect(one).await?;
            bounded(what, limit, f(c)).await
        })
        .await;
        match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = EtcdError::Timeout(format!("{what} at {u}: no answer within {limit:?}"))
            }
        }
    }
    Err(last)
}

/// `fut`, bounded by `limit`; `what` names the call in the error.
pub async fn bounded<T, F>(what: &str, limit: Duration, fut: F) -> Result<T, EtcdError>
where
    F: Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(EtcdError::Call(format!("{what}: {}", describe(&e)))),
        Err(_) => Err(EtcdError::Timeout(format!(
            "{what}: no answer within {limit:?}"
        ))),
    }
}

/// An etcd-client error in one line (a gRPC status by its message).
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}
