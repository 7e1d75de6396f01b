//! Reconnect backoff: exponential steps from an initial value, capped, with full jitter (the
//! wait is uniform in `[0, step]`), reset after a stable session. Never gives up.
//!
//! The first attempt after a stable session does not wait a whole step: the control plane just
//! proved itself reachable (a restart of it is the common cause), so it waits
//! [`Backoff::after_stable`], between a tenth and half of the initial step (100–500 ms by
//! default), jittered so that a fleet still spreads out. Without this, a control plane
//! restarted every few seconds would see each reconnect wait a little longer than the last.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, doubling up to `max` (`max` is raised to `initial` if
    /// smaller).
    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            step: initial,
        }
    }

    /// The current step (upper bound of the next wait).
    pub fn step(&self) -> Duration {
        self.step
    }

    /// The cap.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The next wait: uniform in `[0, step]`; then the step doubles (capped).
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let step_ms = u64::try_from(self.step.as_millis()).unwrap_or(u64::MAX);
        let wait = Duration::from_millis(rng.random_range(0..=step_ms));
        self.step = self.step.saturating_mul(2).min(self.max);
        wait
    }

    /// Back to the initial step (after a stable session).
    pub fn reset(&mut self) {
        self.step = self.initial;
    }

    /// The wait before the first attempt after a stable session: the step goes back to the
    /// initial one, and the wait is uniform in `[initial / 10, initial / 2]`. An attempt that
    /// then fails before WELCOME waits [`Backoff::next_delay`] as usual.
    pub fn after_stable(&mut self, rng: &mut impl Rng) -> Duration {
        self.reset();
        let initial_ms = u64::try_from(self.initial.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(initial_ms / 10..=initial_ms / 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_and_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut rng = rand::rng();
        let mut steps = vec![];
        for _ in 0..8 {
            steps.push(b.step().as_millis());
            let d = b.next_delay(&mut rng);
            assert!(d <= Duration::from_millis(1000));
        }
        assert_eq!(steps, vec![100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_covers_the_range() {
        let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_millis(1000));
        let mut rng = rand::rng();
        let waits: Vec<_> = (0..500).map(|_| b.next_delay(&mut rng)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(1000)));
        assert!(waits.iter().any(|w| *w < Duration::from_millis(250)));
        assert!(waits.iter().any(|w| *w > Duration::from_millis(750)));
    }

    /// Control-plane restarts do not ratchet the backoff: after each stable session the wait is
    /// short, however many sessions came before; failures before WELCOME still double.
    #[test]
    fn the_first_attempt_after_a_stable_session_is_short() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut rng = rand::rng();
        for _ in 0..20 {
            // Some attempts failed before WELCOME: the step grew.
            for _ in 0..3 {
                b.next_delay(&mut rng);
            }
            assert_eq!(b.step(), Duration::from_secs(8));
            let d = b.after_stable(&mut rng);
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(500),
                "{d:?}"
            );
            assert_eq!(b.step(), Duration::from_secs(1));
        }
        let waits: Vec<_> = (0..500).map(|_| b.after_stable(&mut rng)).collect();
        assert!(waits.iter().any(|w| *w < Duration::from_millis(200)));
        assert!(waits.iter().any(|w| *w > Duration::from_millis(400)));
        // It scales with the configured initial step.
        let mut fast = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert!(fast.after_stable(&mut rng) <= Duration::from_millis(50));
    }

    #[test]
    fn max_below_initial_is_raised() {
        let b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.max(), Duration::from_secs(5));
    }
}
