//! Recent errors for `runos status`: a `tracing` layer ([`RecentErrorsLayer`]) keeps the message
//! of the last [`RECENT_ERRORS`] WARN/ERROR events, truncated to [`MAX_ERROR_CHARS`]; the logs
//! never carry secrets, and neither does this ring (event fields are not recorded, only the
//! message). The ring is process-wide like the `tracing` subscriber that feeds it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

/// How many warning-level events are kept.
pub const RECENT_ERRORS: usize = 16;
/// Longest message kept per event (characters).
pub const MAX_ERROR_CHARS: usize = 300;

/// `s` truncated to [`MAX_ERROR_CHARS`] characters (an ellipsis marks a cut).
pub fn short(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_ERROR_CHARS).collect();
    if s.chars().count() > MAX_ERROR_CHARS {
        out.push('…');
    }
    out
}

/// One warning-level event.
#[derive(Debug, Clone)]
pub struct RecentError {
    /// When.
    pub at: SystemTime,
    /// `WARN` or `ERROR`.
    pub level: &'static str,
    /// The event's message (the agent's own text), truncated.
    pub message: String,
}

static RECENT: Mutex<VecDeque<RecentError>> = Mutex::new(VecDeque::new());

/// Record one event (also usable without `tracing`).
pub fn record_error(level: &'static str, message: &str) {
    let mut g = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    if g.len() >= RECENT_ERRORS {
        g.pop_front();
    }
    g.push_back(RecentError {
        at: SystemTime::now(),
        level,
        message: short(message),
    });
}

/// The ring, oldest first.
pub fn recent_errors() -> Vec<RecentError> {
    RECENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect()
}

/// A `tracing` layer that keeps the messages of WARN and ERROR events in the ring (only the
/// `message` field: structured fields are not recorded).
#[derive(Debug, Clone, Copy, Default)]
pub struct RecentErrorsLayer;

struct MessageVisitor(Option<String>);

impl tracing::field::Visit for MessageVisitor {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.to_string());
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RecentErrorsLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let level = *event.metadata().level();
        let name = if level == tracing::Level::ERROR {
            "ERROR"
        } else if level == tracing::Level::WARN {
            "WARN"
        } else {
            return;
        };
        let mut v = MessageVisitor(None);
        event.record(&mut v);
        if let Some(m) = v.0 {
            record_error(name, &m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring is process-wide: tests that read it run one at a time.
    static RING: Mutex<()> = Mutex::new(());

    #[test]
    fn ring_is_bounded_and_truncated() {
        let _g = RING.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..(RECENT_ERRORS + 5) {
            record_error("WARN", &format!("ring-test {i} {}", "x".repeat(1000)));
        }
        let r = recent_errors();
        assert!(r.len() <= RECENT_ERRORS);
        assert!(
            r.iter()
                .all(|e| e.message.chars().count() <= MAX_ERROR_CHARS + 1)
        );
    }

    #[test]
    fn layer_records_only_warnings_messages() {
        let _g = RING.lock().unwrap_or_else(|p| p.into_inner());
        use tracing_subscriber::layer::SubscriberExt as _;
        let sub = tracing_subscriber::registry().with(RecentErrorsLayer);
        tracing::subscriber::with_default(sub, || {
            tracing::info!("layer-test info");
            tracing::warn!(secret = "field-value-xyz", "layer-test warning {}", 7);
        });
        let r = recent_errors();
        assert!(r.iter().any(|e| e.message == "layer-test warning 7"));
        assert!(!r.iter().any(|e| e.message.contains("layer-test info")));
        assert!(!r.iter().any(|e| e.message.contains("field-value-xyz")));
    }
}
