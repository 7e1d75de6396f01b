//! The accept loop shared by the L1Sec, L2Sec and operator listeners, the per-source count of
//! connections in their handshake, and rate-limited warnings.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::server::shutdown_signalled;

/// Shortest time between two lines of one rate-limited warning.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(10);
/// First pause after a failed accept (out of file descriptors, memory or buffers).
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// Longest pause after failed accepts in a row.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

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

/// A warning logged at most once per [`WARN_EVERY`]; the occurrences in between are counted
/// and reported with the next line.
#[derive(Debug)]
pub(crate) struct RateLimited {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimited {
    pub(crate) fn new() -> Self {
        RateLimited {
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being the occurrences not logged since the
    /// previous line; `None` (and counted) otherwise.
    pub(crate) fn check(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// Connections in their handshake, per source address, bounded by `max`.
#[derive(Debug)]
pub(crate) struct PerSource {
    max: u32,
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One handshake counted for its source address, released on drop.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    table: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    pub(crate) fn new(max: u32) -> Arc<Self> {
        Arc::new(PerSource {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// A slot for `ip`, or `None` when it already has `max` handshakes in progress.
    pub(crate) fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Accept connections until shutdown is signalled, running `handle` for each with a permit of
/// `slots`, taken before the accept: with every permit out, further clients wait in the
/// kernel's accept queue until one is returned (backpressure, not failure). `handle` decides
/// how long the permit is held (the L2Sec handshake returns it once the session is admitted).
///
/// A failed accept (typically `EMFILE`, out of file descriptors) pauses the loop, 50 ms
/// doubling to 1 s while it keeps failing, and is logged at most once per [`WARN_EVERY`].
/// Returns the connections still running, for the caller to drain.
pub(crate) async fn accept_loop<L, F, Fut>(
    listener: L,
    name: &'static str,
    slots: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) -> JoinSet<()>
where
    L: Accept + Sync,
    F: Fn(L::Conn, String, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let accept_failed = RateLimited::new();
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = shutdown_signalled(&mut shutdown) => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (conn, peer) = tokio::select! {
            () = shutdown_signalled(&mut shutdown) => break,
            accepted = listener.accept_conn() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    drop(permit);
                    if is_transient(&e) {
                        continue;
                    }
                    if let Some(suppressed) = accept_failed.check() {
                        tracing::warn!(
                            error = %e,
                            suppressed,
                            pause_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                            "{name}: accept failed; pausing (suppressed: the same failures since the last line)"
                        );
                    }
                    tokio::select! {
                        () = shutdown_signalled(&mut shutdown) => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = ACCEPT_BACKOFF_FIRST;
        conns.spawn(handle(conn, peer, permit));
    }
    conns
}

/// Accept failures that concern one connection only (it was reset before it was accepted):
/// take the next one at once.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose every accept fails with `EMFILE`, counting the attempts.
    struct OutOfFiles(Arc<AtomicU64>);

    impl Accept for OutOfFiles {
        type Conn = ();
        async fn accept_conn(&self) -> std::io::Result<((), String)> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Err(std::io::Error::from_raw_os_error(24))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_pause_the_loop_instead_of_spinning() {
        let calls = Arc::new(AtomicU64::new(0));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            OutOfFiles(calls.clone()),
            "test",
            Arc::new(Semaphore::new(4)),
            rx,
            |(), _peer, _permit| async {},
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let _ = tx.send(true);
        drop(task.await.unwrap());
        // 50 ms doubling to 1 s: 14 attempts in 10 s (a spin would make millions).
        let n = calls.load(Ordering::Relaxed);
        assert!((10..=16).contains(&n), "{n} accepts in 10 s");
    }

    #[test]
    fn per_source_slots_are_bounded_and_returned() {
        let t = PerSource::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = t.try_take(a).unwrap();
        let _s2 = t.try_take(a).unwrap();
        assert!(t.try_take(a).is_none());
        assert!(t.try_take(b).is_some());
        drop(s1);
        assert!(t.try_take(a).is_some());
    }

    #[test]
    fn rate_limited_counts_what_it_suppresses() {
        let r = RateLimited::new();
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        let Some(earlier) = Instant::now().checked_sub(WARN_EVERY) else {
            return;
        };
        *r.last.lock().unwrap() = Some(earlier);
        assert_eq!(r.check(), Some(2));
    }
}
