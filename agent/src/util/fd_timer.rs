//! A one-shot timer on a `timerfd` of its own, registered with the runtime's reactor, outside
//! tokio's timer wheel.
//!
//! Why: tokio's wheel is hierarchical (slots of 1 ms, 64 ms, 4.1 s, 4.4 min, …). A deadline
//! seconds away is filed on an upper level and moved down a level each time its slot comes up,
//! and every move is a wake-up of the runtime: a 15 s heartbeat cost about three wake-ups before
//! it fired. A timerfd wakes the epoll wait once, when it expires. The session's long timers
//! (the heartbeat, the dead-peer deadline, the renewal time) use one each, so an idle agent is
//! woken by the heartbeat alone (issue 12, docs/benchmarks.md).
//!
//! Setting the timer to the deadline it already has costs nothing (no system call), so a select
//! loop can set it on every turn. Where a timerfd cannot be had (it always can on Linux), the
//! timer falls back to tokio's wheel, with the same behaviour.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};

/// A one-shot timer: [`FdTimer::set`] a deadline (or none), await [`FdTimer::fired`].
#[derive(Debug)]
pub struct FdTimer {
    inner: Inner,
    /// The deadline it is armed for (`None`: disarmed, or fired).
    armed: Option<Instant>,
}

#[derive(Debug)]
enum Inner {
    Fd(AsyncFd<OwnedFd>),
    Wheel(Pin<Box<Sleep>>),
}

fn disarmed() -> Itimerspec {
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    Itimerspec {
        it_interval: zero,
        it_value: zero,
    }
}

impl FdTimer {
    /// A disarmed timer. Must be called within a tokio runtime (with I/O enabled).
    // `AsyncFd::new` is deprecated in favour of the `unsafe` `AsyncFd::register`, whose contract
    // is that the descriptor stays open and the same for the `AsyncFd`'s lifetime. An `OwnedFd`
    // moved into it upholds that by construction (nothing else holds or closes it), so the
    // safe constructor is sound here, and the workspace keeps `unsafe_code = "deny"`.
    #[allow(deprecated)]
    pub fn new() -> FdTimer {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .map_err(io::Error::from)
        .and_then(AsyncFd::new);
        let inner = match fd {
            Ok(fd) => Inner::Fd(fd),
            Err(e) => {
                tracing::debug!(error = %e, "no timerfd; using the runtime's timer wheel");
                Inner::Wheel(Box::pin(tokio::time::sleep_until(Instant::now())))
            }
        };
        FdTimer { inner, armed: None }
    }

    /// Arm the timer for `at` (`None`: disarm it). Nothing is done when it is already armed for
    /// exactly that.
    pub fn set(&mut self, at: Option<Instant>) {
        if at == self.armed {
            return;
        }
        self.armed = at;
        match &mut self.inner {
            Inner::Fd(fd) => {
                let mut spec = disarmed();
                if let Some(at) = at {
                    // Relative to now (tokio's `Instant` has no clock reading of its own); at
                    // least 1 ns, since a zero value disarms the timer.
                    let left = at.saturating_duration_since(Instant::now());
                    let left = left.max(std::time::Duration::from_nanos(1));
                    spec.it_value = Timespec {
                        tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                        tv_nsec: i64::from(left.subsec_nanos()),
                    };
                }
                if let Err(e) = timerfd_settime(fd.get_ref(), TimerfdTimerFlags::empty(), &spec) {
                    // Cannot happen with a valid descriptor and a valid value; fall back to the
                    // wheel rather than lose the deadline.
                    tracing::warn!(error = %e, "timerfd_settime failed; using the runtime's timer wheel");
                    self.inner = Inner::Wheel(Box::pin(tokio::time::sleep_until(
                        at.unwrap_or_else(Instant::now),
                    )));
                }
            }
            Inner::Wheel(sleep) => {
                if let Some(at) = at {
                    sleep.as_mut().reset(at);
                }
            }
        }
    }

    /// The deadline it is armed for.
    pub fn deadline(&self) -> Option<Instant> {
        self.armed
    }

    /// Wait until the armed deadline passes (forever when disarmed); the timer is then
    /// disarmed. Cancellation safe: dropping the future leaves the timer armed.
    pub async fn fired(&mut self) {
        let Some(at) = self.armed else {
            return std::future::pending().await;
        };
        match &mut self.inner {
            Inner::Fd(fd) => loop {
                let Ok(mut ready) = fd.readable().await else {
                    // The reactor is gone (runtime shutting down): the deadline can never be
                    // served; wait like a disarmed timer.
                    return std::future::pending().await;
                };
                let mut count = [0u8; 8];
                match ready.try_io(|fd| {
                    rustix::io::read(fd.get_ref(), &mut count).map_err(io::Error::from)
                }) {
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Err(e)) => {
                        // Not expected of a timerfd; judge by the clock instead of spinning.
                        tracing::warn!(error = %e, "reading a timerfd failed");
                        tokio::time::sleep_until(at).await;
                        break;
                    }
                    // Readiness was stale (cleared by `try_io`): wait again.
                    Err(_would_block) => {}
                }
            },
            Inner::Wheel(sleep) => sleep.as_mut().await,
        }
        self.armed = None;
    }
}

impl Default for FdTimer {
    fn default() -> Self {
        FdTimer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_once_at_its_deadline_and_can_be_moved() {
        let mut t = FdTimer::new();
        assert!(matches!(t.inner, Inner::Fd(_)), "a timerfd on Linux");
        let start = Instant::now();
        t.set(Some(start + Duration::from_millis(30)));
        t.fired().await;
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(t.deadline(), None, "disarmed once fired");

        // Moved later before it fires: the first deadline does not fire it.
        let start = Instant::now();
        t.set(Some(start + Duration::from_millis(10)));
        t.set(Some(start + Duration::from_millis(60)));
        t.fired().await;
        assert!(start.elapsed() >= Duration::from_millis(60));

        // A deadline in the past fires at once.
        t.set(Some(Instant::now() - Duration::from_millis(5)));
        tokio::time::timeout(Duration::from_secs(5), t.fired())
            .await
            .expect("a past deadline fires at once");
    }

    #[tokio::test]
    async fn a_disarmed_timer_never_fires() {
        let mut t = FdTimer::new();
        t.set(Some(Instant::now() + Duration::from_millis(10)));
        t.set(None);
        let waited = tokio::time::timeout(Duration::from_millis(100), t.fired()).await;
        assert!(waited.is_err(), "disarmed: no fire");
    }

    #[tokio::test]
    async fn a_cancelled_wait_keeps_the_deadline() {
        let mut t = FdTimer::new();
        let at = Instant::now() + Duration::from_millis(40);
        t.set(Some(at));
        let early = tokio::time::timeout(Duration::from_millis(5), t.fired()).await;
        assert!(early.is_err());
        assert_eq!(t.deadline(), Some(at));
        tokio::time::timeout(Duration::from_secs(5), t.fired())
            .await
            .expect("fires after a cancelled wait");
        assert!(Instant::now() >= at);
    }
}
