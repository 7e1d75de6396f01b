//! Structured logs to stderr (`tracing`), as text or JSON. The level comes from `RUNOS_LOG`
//! (an `EnvFilter` directive), else `--log-level`, else the config; it can be changed at run
//! time (SIGHUP). Text is coloured only when stderr is a terminal. Warnings a peer can trigger
//! at will go through a [`RateLimit`].

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;

pub mod recent;

/// The environment variable that overrides the log filter.
pub const LOG_ENV: &str = "RUNOS_LOG";

/// Changes the level of the installed subscriber.
#[derive(Debug, Clone)]
pub struct LogHandle {
    handle: Option<reload::Handle<EnvFilter, tracing_subscriber::Registry>>,
    env_override: bool,
}

fn filter(level: &str) -> EnvFilter {
    match std::env::var(LOG_ENV) {
        Ok(s) if !s.is_empty() => EnvFilter::try_new(s).unwrap_or_else(|_| EnvFilter::new(level)),
        _ => EnvFilter::new(level),
    }
}

/// Install the global subscriber. Calling it twice keeps the first one.
pub fn init(level: &str, format: LogFormat) -> LogHandle {
    let env_override = std::env::var(LOG_ENV).is_ok_and(|s| !s.is_empty());
    let (layer, handle) = reload::Layer::new(filter(level));
    // Colours only on a terminal: a log file or the journal gets plain text, so an escape
    // byte in it can only be a bug (peer text goes through `runos_protocol::peertext`).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let ok = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer)
            .with(fmt)
            .with(recent::RecentErrorsLayer) // `runos status`: recent errors
            .try_init()
            .is_ok(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer)
            .with(fmt.json().flatten_event(true).with_current_span(true))
            .with(recent::RecentErrorsLayer) // `runos status`: recent errors
            .try_init()
            .is_ok(),
    };
    LogHandle {
        handle: ok.then_some(handle),
        env_override,
    }
}

impl LogHandle {
    /// Set the level (ignored when `RUNOS_LOG` is set).
    pub fn set_level(&self, level: &str) {
        if self.env_override {
            return;
        }
        if let Some(h) = &self.handle {
            let _ = h.reload(EnvFilter::new(level));
        }
    }
}

/// A rate limit for one kind of warning a peer can trigger at will (unexpected or unmatched
/// frames): at most `burst` lines per `window` are written; the first line of the next window
/// says how many were suppressed. So a flood of thousands of frames writes a bounded number of
/// lines, and nothing is hidden without a trace. Use one `static` per kind of line.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: std::time::Duration,
    state: std::sync::Mutex<RateState>,
}

#[derive(Debug)]
struct RateState {
    /// When the current window began (`None`: no event yet).
    since: Option<std::time::Instant>,
    /// Lines written in the current window.
    written: u32,
    /// Events suppressed since the last line written.
    suppressed: u64,
}

/// What a [`RateLimit`] decided for one event: write the line (with this note appended) or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write the line; `suppressed` similar ones were dropped since the last one written, and
    /// `last` says this is the last line of the window (later ones are suppressed).
    Write {
        /// Events suppressed before this one.
        suppressed: u64,
        /// Whether further events in this window are suppressed.
        last: bool,
    },
    /// Drop the line (it is counted).
    Suppress,
}

impl Verdict {
    /// Whether to write the line.
    pub fn write(&self) -> bool {
        matches!(self, Verdict::Write { .. })
    }
}

/// Appended to a written line: how many were suppressed, and whether the next ones will be.
impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Verdict::Suppress => Ok(()),
            Verdict::Write { suppressed, last } => {
                if suppressed > 0 {
                    write!(f, " ({suppressed} similar messages suppressed)")?;
                }
                if last {
                    f.write_str(" (further similar messages are suppressed for a while)")?;
                }
                Ok(())
            }
        }
    }
}

impl RateLimit {
    /// At most `burst` (at least 1) lines per `window`.
    pub const fn new(burst: u32, window: std::time::Duration) -> Self {
        RateLimit {
            burst: if burst == 0 { 1 } else { burst },
            window,
            state: std::sync::Mutex::new(RateState {
                since: None,
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Decide for one event now.
    pub fn check(&self) -> Verdict {
        self.check_at(std::time::Instant::now())
    }

    /// Decide for one event at `now`.
    pub fn check_at(&self, now: std::time::Instant) -> Verdict {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let expired = s
            .since
            .is_none_or(|t| now.saturating_duration_since(t) >= self.window);
        if expired {
            s.since = Some(now);
            s.written = 0;
        }
        if s.written >= self.burst {
            s.suppressed = s.suppressed.saturating_add(1);
            return Verdict::Suppress;
        }
        s.written += 1;
        let suppressed = std::mem::take(&mut s.suppressed);
        Verdict::Write {
            suppressed,
            last: s.written == self.burst,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_flood_writes_a_bounded_number_of_lines_and_counts_the_rest() {
        let rl = RateLimit::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..10_000).map(|_| rl.check_at(t0)).collect();
        assert_eq!(verdicts.iter().filter(|v| v.write()).count(), 3);
        assert_eq!(
            verdicts[2],
            Verdict::Write {
                suppressed: 0,
                last: true
            }
        );
        assert!(verdicts[2].to_string().contains("suppressed for a while"));
        // The next window's first line carries the count.
        let v = rl.check_at(t0 + Duration::from_secs(61));
        assert_eq!(
            v,
            Verdict::Write {
                suppressed: 9_997,
                last: false
            }
        );
        assert!(v.to_string().contains("9997 similar messages suppressed"));
        assert_eq!(Verdict::Suppress.to_string(), "");
    }
}
