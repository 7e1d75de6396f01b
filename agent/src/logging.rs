//! Structured logs to stderr (`tracing`), as text or JSON. The level comes from `RUNOS_LOG`
//! (an `EnvFilter` directive), else `--log-level`, else the config; it can be changed at run
//! time (SIGHUP).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;

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
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let ok = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer)
            .with(fmt)
            .with(crate::status::RecentErrorsLayer) // `runos status`: recent errors
            .try_init()
            .is_ok(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer)
            .with(fmt.json().flatten_event(true).with_current_span(true))
            .with(crate::status::RecentErrorsLayer) // `runos status`: recent errors
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
