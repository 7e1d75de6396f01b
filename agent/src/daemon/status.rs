//! The daemon's live status, shared cheaply between the daemon loop, the session and the admin
//! socket ([`crate::daemon::admin`]), and rendered by `runos status` ([`crate::cli::status`]).
//!
//! Everything here is the agent's own knowledge: connection state, times, tags and instruction
//! type names, and the agent's own warning texts. No instruction payload (environment values,
//! stdin, tokens, keys, script parameters) ever enters this model.
//!
//! Recent errors come from the logging layer ([`crate::logging::recent`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::daemon::session::SessionEnd;
use crate::logging::recent::{recent_errors, short};
use crate::util::time::rfc3339;

/// Longest WELCOME `sessionId` kept and shown (characters); a longer one is ignored.
pub const MAX_SESSION_ID_CHARS: usize = 128;
/// A clock offset from the control plane larger than this (either way) is warned about.
pub const MAX_CLOCK_OFFSET: Duration = Duration::from_secs(30);
/// The largest clock offset from the control plane the agent acts on (either way). Beyond it the
/// agent warns and keeps its own clock for renewal timing and for judging certificates: a
/// drifting node clock is off by seconds or minutes, while an offset of days means a broken
/// control-plane clock or a peer trying to make the agent renew (or accept a certificate) out of
/// time. A day keeps nodes with a badly set clock renewing on time by the control plane's clock.
pub const MAX_TRUSTED_CLOCK_OFFSET: Duration = Duration::from_secs(86400);

/// The node's clock offset from the control plane's, in milliseconds (positive: the server is
/// ahead of the node): `server_ms − (sent_ms + rtt_ms / 2)`, where `sent_ms` is the node's clock
/// when the request (HELLO or HEARTBEAT) was sent and `rtt_ms` the round trip until the answer
/// carrying `server_ms` arrived (the server's clock is taken to be read half-way).
pub fn clock_offset_ms(server_ms: u64, sent_ms: u64, rtt_ms: u64) -> i64 {
    let mid = i128::from(sent_ms) + i128::from(rtt_ms / 2);
    let off = i128::from(server_ms) - mid;
    i64::try_from(off).unwrap_or(if off < 0 { i64::MIN } else { i64::MAX })
}

/// Whether the agent acts on `offset_ms`: within [`MAX_TRUSTED_CLOCK_OFFSET`] either way.
pub fn clock_offset_trusted(offset_ms: i64) -> bool {
    u128::from(offset_ms.unsigned_abs()) <= MAX_TRUSTED_CLOCK_OFFSET.as_millis()
}

/// Whether `offset_ms` exceeds [`MAX_CLOCK_OFFSET`] either way.
pub fn clock_offset_exceeds(offset_ms: i64) -> bool {
    u128::from(offset_ms.unsigned_abs()) > MAX_CLOCK_OFFSET.as_millis()
}

/// The text describing a clock offset: "ahead of"/"behind" the control plane by N s.
pub fn clock_offset_text(offset_ms: i64) -> String {
    // A positive offset means the server's clock is ahead: the node's clock is behind.
    let secs = offset_ms.unsigned_abs() / 1000;
    if offset_ms > 0 {
        format!("the node's clock is behind the control plane's by {secs} s")
    } else {
        format!("the node's clock is ahead of the control plane's by {secs} s")
    }
}

/// A crossing of [`MAX_CLOCK_OFFSET`] reported by [`StatusHandle::clock_offset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockCrossing {
    /// The offset went beyond the bound.
    Exceeded,
    /// The offset came back within the bound.
    Recovered,
}

fn secs_since(t: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(t).unwrap_or(Duration::ZERO).as_secs()
}

/// The connection state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Trying to connect to `server`.
    Connecting {
        /// `host:port`.
        server: String,
    },
    /// WELCOME received.
    Connected {
        /// `host:port`.
        server: String,
        /// The control plane's session id (`None` when WELCOME's was not clean, printable text
        /// of at most [`MAX_SESSION_ID_CHARS`] characters: it is then ignored).
        session_id: Option<String>,
    },
    /// Between attempts.
    Disconnected,
    /// The control plane said this node is revoked (kept until the next WELCOME).
    Revoked {
        /// The control plane's message.
        message: String,
    },
    /// SIGTERM/SIGINT: draining and exiting.
    Stopping,
}

impl ConnState {
    /// The state's name in `runos status`.
    pub fn name(&self) -> &'static str {
        match self {
            ConnState::Connecting { .. } => "connecting",
            ConnState::Connected { .. } => "connected",
            ConnState::Disconnected => "disconnected",
            ConnState::Revoked { .. } => "revoked",
            ConnState::Stopping => "stopping",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: ConnState,
    /// When the current state was entered (for `connected`: the WELCOME).
    state_since: SystemTime,
    /// Since when the agent has had no welcomed session (`None` while connected).
    offline_since: Option<SystemTime>,
    last_error: Option<String>,
    last_round_trip: Option<SystemTime>,
    /// The last measured clock offset (ms, server − node) and when it was measured.
    clock_offset: Option<(i64, SystemTime)>,
    /// Whether the offset is currently beyond [`MAX_CLOCK_OFFSET`] (warned once per crossing).
    clock_off_bound: bool,
    /// Whether the offset is currently beyond [`MAX_TRUSTED_CLOCK_OFFSET`] (warned once per
    /// crossing).
    clock_untrusted: bool,
    /// The agent version the control plane advertised in the last WELCOME.
    advertised_version: Option<String>,
    /// Sessions that ended with a panic (a bug in the agent; the daemon reconnected).
    session_panics: u64,
    /// When the last one happened and its panic message.
    last_session_panic: Option<(SystemTime, String)>,
}

/// A shared handle on the daemon's status. Cloning is cheap; every update takes a short lock.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    inner: Arc<Mutex<Inner>>,
    started_at: SystemTime,
}

impl Default for StatusHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusHandle {
    /// A fresh status: disconnected since now.
    pub fn new() -> Self {
        let now = SystemTime::now();
        StatusHandle {
            inner: Arc::new(Mutex::new(Inner {
                state: ConnState::Disconnected,
                state_since: now,
                offline_since: Some(now),
                last_error: None,
                last_round_trip: None,
                clock_offset: None,
                clock_off_bound: false,
                clock_untrusted: false,
                advertised_version: None,
                session_panics: 0,
                last_session_panic: None,
            })),
            started_at: now,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the plain data inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, state: ConnState) {
        let mut g = self.lock();
        if g.state != state {
            g.state = state;
            g.state_since = SystemTime::now();
        }
    }

    /// A connection attempt to `server` begins (a revoked node stays `revoked`).
    pub fn connecting(&self, server: &str) {
        let now = SystemTime::now();
        let mut g = self.lock();
        g.offline_since.get_or_insert(now);
        if matches!(g.state, ConnState::Revoked { .. } | ConnState::Stopping) {
            return;
        }
        let state = ConnState::Connecting {
            server: server.to_string(),
        };
        if g.state != state {
            g.state = state;
            g.state_since = now;
        }
    }

    /// WELCOME received: connected; WELCOME counts as a successful round trip. `session_id`
    /// is the control plane's, already checked by the session (`None`: none or ignored).
    pub fn connected(&self, server: &str, session_id: Option<&str>) {
        let now = SystemTime::now();
        let mut g = self.lock();
        g.state = ConnState::Connected {
            server: server.to_string(),
            session_id: session_id.map(str::to_string),
        };
        g.state_since = now;
        g.offline_since = None;
        g.last_error = None;
        g.last_round_trip = Some(now);
    }

    /// A HEARTBEAT_REPLY matched an outstanding heartbeat.
    pub fn round_trip(&self) {
        self.lock().last_round_trip = Some(SystemTime::now());
    }

    /// A clock offset was measured (at WELCOME or a matched HEARTBEAT_REPLY). Returns the
    /// crossing of [`MAX_CLOCK_OFFSET`] this measurement makes, if any (to be logged once).
    pub fn clock_offset(&self, offset_ms: i64, at: SystemTime) -> Option<ClockCrossing> {
        let mut g = self.lock();
        g.clock_offset = Some((offset_ms, at));
        let beyond = clock_offset_exceeds(offset_ms);
        let crossing = match (g.clock_off_bound, beyond) {
            (false, true) => Some(ClockCrossing::Exceeded),
            (true, false) => Some(ClockCrossing::Recovered),
            _ => None,
        };
        g.clock_off_bound = beyond;
        crossing
    }

    /// Record whether `offset_ms` is one the agent acts on; `Some(trusted)` when that changed.
    fn clock_trust(&self, offset_ms: i64) -> Option<bool> {
        let mut g = self.lock();
        let untrusted = !clock_offset_trusted(offset_ms);
        let changed = g.clock_untrusted != untrusted;
        g.clock_untrusted = untrusted;
        changed.then_some(!untrusted)
    }

    /// Record a measured clock offset and log a crossing of [`MAX_CLOCK_OFFSET`].
    pub fn observe_clock_offset(&self, offset_ms: i64) {
        match self.clock_offset(offset_ms, SystemTime::now()) {
            Some(ClockCrossing::Exceeded) if clock_offset_trusted(offset_ms) => tracing::warn!(
                offset_ms,
                "{} (more than {} s); certificate validity is judged with the control plane's time",
                clock_offset_text(offset_ms),
                MAX_CLOCK_OFFSET.as_secs()
            ),
            // Beyond the trusted bound: the warning below says what happens.
            Some(ClockCrossing::Exceeded) => {}
            Some(ClockCrossing::Recovered) => tracing::info!(
                offset_ms,
                "the node's clock is back within {} s of the control plane's",
                MAX_CLOCK_OFFSET.as_secs()
            ),
            None => {}
        }
        match self.clock_trust(offset_ms) {
            Some(false) => tracing::warn!(
                offset_ms,
                "{} (more than {} h): the control plane's time is ignored; renewal timing and certificate checks use the node's own clock. Fix the clock of the node or of the control plane",
                clock_offset_text(offset_ms),
                MAX_TRUSTED_CLOCK_OFFSET.as_secs() / 3600
            ),
            Some(true) => tracing::info!(
                offset_ms,
                "the control plane's time is within {} h of the node's again: renewal timing uses it",
                MAX_TRUSTED_CLOCK_OFFSET.as_secs() / 3600
            ),
            None => {}
        }
    }

    /// The clock offset (ms, server − node) the agent acts on: the last measured one when it
    /// is within [`MAX_TRUSTED_CLOCK_OFFSET`], else 0 (the node's own clock).
    pub fn trusted_clock_offset(&self) -> i64 {
        self.clock_offset_now()
            .filter(|o| clock_offset_trusted(*o))
            .unwrap_or(0)
    }

    /// The last measured clock offset (ms, server − node), if any.
    pub fn clock_offset_now(&self) -> Option<i64> {
        self.lock().clock_offset.map(|(o, _)| o)
    }

    /// A session ended with `end`.
    pub fn session_ended(&self, end: &SessionEnd) {
        let now = SystemTime::now();
        let mut g = self.lock();
        g.offline_since.get_or_insert(now);
        let (state, error) = match end {
            SessionEnd::Shutdown => (ConnState::Stopping, None),
            SessionEnd::Revoked(m) => (
                ConnState::Revoked { message: short(m) },
                Some(format!("revoked: {}", short(m))),
            ),
            SessionEnd::Incompatible(m) => (
                ConnState::Disconnected,
                Some(format!("incompatible protocol: {}", short(m))),
            ),
            SessionEnd::Reconnect | SessionEnd::Renewed => (ConnState::Disconnected, None),
            SessionEnd::Failed(m) => (
                ConnState::Disconnected,
                Some(format!("session ended: {}", short(m))),
            ),
            SessionEnd::ConnectFailed(m) => (
                ConnState::Disconnected,
                Some(format!("cannot connect: {}", short(m))),
            ),
        };
        if let Some(e) = error {
            g.last_error = Some(e);
        }
        // Revoked is sticky until a WELCOME; stopping is final.
        if matches!(g.state, ConnState::Stopping)
            || (matches!(g.state, ConnState::Revoked { .. }) && state == ConnState::Disconnected)
        {
            return;
        }
        if g.state != state {
            g.state = state;
            g.state_since = now;
        }
    }

    /// A session ended with a panic (caught: the daemon reconnects). Counted and kept for
    /// `runos status`; `message` is the panic's message (the agent's own text).
    pub fn session_panicked(&self, message: &str) {
        let mut g = self.lock();
        g.session_panics = g.session_panics.saturating_add(1);
        g.last_session_panic = Some((SystemTime::now(), short(message)));
    }

    /// The agent could not even try to connect (e.g. the identity cannot be loaded).
    pub fn cannot_connect(&self, message: &str) {
        let mut g = self.lock();
        g.last_error = Some(short(message));
        g.offline_since.get_or_insert_with(SystemTime::now);
    }

    /// SIGTERM/SIGINT.
    pub fn stopping(&self) {
        self.set(ConnState::Stopping);
    }

    /// The agent version the control plane advertised in WELCOME (`None`: none advertised).
    pub fn set_advertised_version(&self, v: Option<String>) {
        self.lock().advertised_version = v;
    }

    /// The agent version the control plane advertised in the last WELCOME.
    pub fn advertised_version(&self) -> Option<String> {
        self.lock().advertised_version.clone()
    }

    /// The current connection state.
    pub fn state(&self) -> ConnState {
        self.lock().state.clone()
    }

    /// The daemon part of `runos status` (everything but the certificate and the dispatcher),
    /// with `renewal` (the renewal state's part) in it.
    pub fn to_json(&self, renewal: Value) -> Value {
        let now = SystemTime::now();
        let g = self.lock();
        let mut conn = json!({
            "state": g.state.name(),
            "since": rfc3339(g.state_since),
            "forSecs": secs_since(g.state_since, now),
        });
        match &g.state {
            ConnState::Connecting { server } => conn["server"] = json!(server),
            ConnState::Connected { server, session_id } => {
                conn["server"] = json!(server);
                conn["sessionId"] = json!(session_id);
            }
            ConnState::Revoked { message } => conn["message"] = json!(message),
            ConnState::Disconnected | ConnState::Stopping => {}
        }
        if let Some(t) = g.offline_since {
            conn["offlineSince"] = json!(rfc3339(t));
            conn["offlineForSecs"] = json!(secs_since(t, now));
        }
        if let Some(e) = &g.last_error
            && !matches!(g.state, ConnState::Connected { .. })
        {
            conn["lastError"] = json!(e);
        }
        json!({
            "agentVersion": crate::agent_version(),
            "advertisedAgentVersion": g.advertised_version,
            "pid": std::process::id(),
            "startedAt": rfc3339(self.started_at),
            "uptimeSecs": secs_since(self.started_at, now),
            "connection": conn,
            "lastRoundTrip": g.last_round_trip.map(rfc3339),
            "clockOffsetMs": g.clock_offset.map(|(o, _)| o),
            "clockOffsetAt": g.clock_offset.map(|(_, t)| rfc3339(t)),
            "clockOffsetIgnored": g.clock_untrusted,
            "renewal": renewal,
            "sessionPanics": g.session_panics,
            "lastSessionPanic": g.last_session_panic.as_ref().map(|(at, m)| json!({
                "at": rfc3339(*at),
                "message": m,
            })),
            "recentErrors": recent_errors_json(),
        })
    }
}

fn recent_errors_json() -> Value {
    Value::Array(
        recent_errors()
            .into_iter()
            .map(|e| json!({"at": rfc3339(e.at), "level": e.level, "message": e.message}))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn lifecycle() {
        let s = StatusHandle::new();
        assert_eq!(s.state(), ConnState::Disconnected);
        assert!(s.to_json(Value::Null)["lastRoundTrip"].is_null());
        s.connecting("h:1");
        assert_eq!(s.to_json(Value::Null)["connection"]["state"], "connecting");
        s.connected("h:1", Some("sess"));
        let j = s.to_json(Value::Null);
        assert_eq!(j["connection"]["state"], "connected");
        assert_eq!(j["connection"]["sessionId"], "sess");
        assert!(j["connection"].get("offlineSince").is_none());
        assert!(j["lastRoundTrip"].is_string());
        assert_eq!(j["agentVersion"], crate::AGENT_VERSION);
        s.round_trip();
        s.session_ended(&SessionEnd::Failed(
            "no HEARTBEAT_REPLY within 2000 ms".into(),
        ));
        let j = s.to_json(Value::Null);
        assert_eq!(j["connection"]["state"], "disconnected");
        assert!(j["connection"]["offlineForSecs"].is_u64());
        assert!(
            j["connection"]["lastError"]
                .as_str()
                .unwrap()
                .contains("HEARTBEAT")
        );
        // Revoked is sticky across failed attempts, cleared by a WELCOME.
        s.session_ended(&SessionEnd::Revoked("gone".into()));
        s.connecting("h:1");
        s.session_ended(&SessionEnd::ConnectFailed("refused".into()));
        assert_eq!(
            s.state(),
            ConnState::Revoked {
                message: "gone".into()
            }
        );
        s.connected("h:1", None);
        assert!(s.to_json(Value::Null)["connection"]["sessionId"].is_null());
        assert_eq!(s.state().name(), "connected");
        s.stopping();
        s.session_ended(&SessionEnd::Failed("x".into()));
        assert_eq!(s.state(), ConnState::Stopping);
    }

    #[test]
    fn session_panics_are_counted() {
        let s = StatusHandle::new();
        let j = s.to_json(Value::Null);
        assert_eq!(j["sessionPanics"], 0);
        assert!(j["lastSessionPanic"].is_null());
        s.session_panicked("first");
        s.session_panicked("JoinHandle polled after completion");
        let j = s.to_json(Value::Null);
        assert_eq!(j["sessionPanics"], 2);
        assert_eq!(
            j["lastSessionPanic"]["message"],
            "JoinHandle polled after completion"
        );
        assert!(j["lastSessionPanic"]["at"].is_string());
    }

    #[test]
    fn clock_offset_arithmetic() {
        // Server 120 s ahead; 200 ms round trip: the server read its clock at sent + 100 ms.
        let sent = 1_700_000_000_000;
        assert_eq!(clock_offset_ms(sent + 100 + 120_000, sent, 200), 120_000);
        assert_eq!(clock_offset_ms(sent + 100, sent, 200), 0);
        assert_eq!(clock_offset_ms(sent - 45_000, sent, 0), -45_000);
        assert_eq!(clock_offset_ms(0, u64::MAX, u64::MAX), i64::MIN);
        assert!(!clock_offset_exceeds(30_000));
        assert!(clock_offset_exceeds(30_001));
        assert!(clock_offset_exceeds(-30_001));
        assert!(clock_offset_text(120_000).contains("behind"));
        assert!(clock_offset_text(120_000).contains("120 s"));
        assert!(clock_offset_text(-45_000).contains("ahead"));
    }

    #[test]
    fn clock_offset_warns_once_per_crossing() {
        let s = StatusHandle::new();
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(s.to_json(Value::Null)["clockOffsetMs"].is_null());
        assert_eq!(s.clock_offset(100, at), None);
        let sent = 1_800_000_000_000;
        let skewed = clock_offset_ms(sent + 120_000 + 50, sent, 100);
        assert_eq!(s.clock_offset(skewed, at), Some(ClockCrossing::Exceeded));
        assert_eq!(s.clock_offset(skewed, at), None);
        assert_eq!(s.clock_offset(-skewed, at), None);
        assert_eq!(s.clock_offset(20, at), Some(ClockCrossing::Recovered));
        assert_eq!(s.clock_offset(25, at), None);
        let j = s.to_json(Value::Null);
        assert_eq!(j["clockOffsetMs"], 25);
        assert_eq!(j["clockOffsetAt"], rfc3339(at));
        assert_eq!(s.clock_offset_now(), Some(25));
    }

    /// Issue 10: a WELCOME claiming a time four weeks ahead must not make the agent renew at
    /// once: beyond the bound the offset is shown but not acted on.
    #[test]
    fn only_a_bounded_clock_offset_is_acted_on() {
        let s = StatusHandle::new();
        assert_eq!(s.trusted_clock_offset(), 0);
        s.observe_clock_offset(90_000);
        assert_eq!(
            s.trusted_clock_offset(),
            90_000,
            "a skewed node clock is corrected"
        );
        let day = MAX_TRUSTED_CLOCK_OFFSET.as_millis() as i64;
        s.observe_clock_offset(-day);
        assert_eq!(
            s.trusted_clock_offset(),
            -day,
            "the bound itself is acted on"
        );
        let four_weeks = 28 * 86_400_000;
        s.observe_clock_offset(four_weeks);
        assert_eq!(
            s.trusted_clock_offset(),
            0,
            "beyond the bound: the node's own clock"
        );
        assert_eq!(s.clock_offset_now(), Some(four_weeks), "shown as measured");
        assert_eq!(s.to_json(Value::Null)["clockOffsetIgnored"], true);
        s.observe_clock_offset(-four_weeks);
        assert_eq!(s.trusted_clock_offset(), 0);
        s.observe_clock_offset(500);
        assert_eq!(s.trusted_clock_offset(), 500);
        assert_eq!(s.to_json(Value::Null)["clockOffsetIgnored"], false);
        assert!(clock_offset_trusted(day) && !clock_offset_trusted(day + 1));
    }
}
