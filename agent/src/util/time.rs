//! Wall-clock time: the Unix time in milliseconds and RFC 3339 renderings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wall-clock time in milliseconds since the Unix epoch (0 before 1970, saturating far in the
/// future).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An RFC 3339 UTC timestamp.
pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

/// An RFC 3339 rendering of a Unix time in seconds (times before 1970 are clamped).
pub fn rfc3339_secs(secs: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// An RFC 3339 rendering of a Unix time in milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_utc() {
        assert_eq!(rfc3339_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_secs(-5), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_500), "1970-01-01T00:00:01.5Z");
        assert!(now_ms() > 0);
    }
}
