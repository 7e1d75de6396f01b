//! The accept loop shared by the L1Sec, L2Sec and operator listeners.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::server::shutdown_signalled;

/// A listener that yields connections and a printable peer address.
pub(crate) trait Accept {
    /// The connection type.
    type Conn: Send + 'static;
    /// The next connection.
    fn accept_conn(&self) -> impl Future<Output = std::io::Result<(Self::Conn, String)>> + Send;
}

impl Accept for TcpListener {
    type Conn = TcpStream;
    async fn accept_conn(&self) -> std::io::Result<(TcpStream, String)> {
        let (s, peer) = self.accept().await?;
        Ok((s, peer.to_string()))
    }
}

impl Accept for UnixListener {
    type Conn = UnixStream;
    async fn accept_conn(&self) -> std::io::Result<(UnixStream, String)> {
        let (s, _) = self.accept().await?;
        Ok((s, "local".to_string()))
    }
}

/// Accept connections until shutdown is signalled, running `handle` for each, at most `max` at
/// once. Past `max`, further clients wait in the kernel's accept queue until a connection ends:
/// backpressure, not failure. Returns the connections still running, for the caller to drain.
pub(crate) async fn accept_loop<L, F, Fut>(
    listener: L,
    name: &'static str,
    max: usize,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) -> JoinSet<()>
where
    L: Accept + Sync,
    F: Fn(L::Conn, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = shutdown_signalled(&mut shutdown) => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (conn, peer) = tokio::select! {
            () = shutdown_signalled(&mut shutdown) => break,
            accepted = listener.accept_conn() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "{name}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let fut = handle(conn, peer);
        conns.spawn(async move {
            let _permit = permit;
            fut.await;
        });
    }
    conns
}
