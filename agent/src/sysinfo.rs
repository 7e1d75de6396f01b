//! Facts about the machine, read from `/proc` and `/etc`. Every read is bounded and every
//! failure degrades to `unknown` rather than an error.

use std::path::Path;

use crate::util::fs as fsutil;

const SMALL: u64 = 64 * 1024;

fn read_small(path: &str) -> Option<String> {
    fsutil::read_capped(Path::new(path), SMALL)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

fn first_line(path: &str) -> Option<String> {
    read_small(path)
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .filter(|s| !s.is_empty())
        .map(|s| cap(&s))
}

fn cap(s: &str) -> String {
    s.chars()
        .take(runos_protocol::control::MAX_IDENT_LEN)
        .collect()
}

/// The hostname (`/proc/sys/kernel/hostname`, then `/etc/hostname`), or `unknown`.
pub fn hostname() -> String {
    first_line("/proc/sys/kernel/hostname")
        .or_else(|| first_line("/etc/hostname"))
        .unwrap_or_else(|| "unknown".into())
}

/// The kernel boot id, or `unknown`.
pub fn boot_id() -> String {
    first_line("/proc/sys/kernel/random/boot_id").unwrap_or_else(|| "unknown".into())
}

/// `/etc/machine-id`, or `unknown`.
pub fn machine_id() -> String {
    first_line("/etc/machine-id").unwrap_or_else(|| "unknown".into())
}

/// Seconds since boot (`/proc/uptime`), or 0.
pub fn system_uptime_secs() -> u64 {
    read_small("/proc/uptime")
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|f| f.parse::<f64>().ok())
        })
        .map(|f| f.max(0.0) as u64)
        .unwrap_or(0)
}

/// `<ID>-<VERSION_ID>` from `/etc/os-release`, or `unknown`.
pub fn os() -> String {
    read_small("/etc/os-release")
        .map(|s| os_from_release(&s))
        .unwrap_or_else(|| "unknown".into())
}

/// Pure part of [`os`].
pub fn os_from_release(text: &str) -> String {
    let get = |key: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_string())
        })
    };
    match (get("ID"), get("VERSION_ID")) {
        (Some(id), Some(v)) => cap(&format!("{id}-{v}")),
        (Some(id), None) => cap(&id),
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_parsing() {
        assert_eq!(
            os_from_release("NAME=\"Debian\"\nID=debian\nVERSION_ID=\"12\"\n"),
            "debian-12"
        );
        assert_eq!(os_from_release("ID=arch\n"), "arch");
        assert_eq!(os_from_release(""), "unknown");
    }

    #[test]
    fn facts_are_never_empty() {
        assert!(!hostname().is_empty());
        assert!(!boot_id().is_empty());
        assert!(!machine_id().is_empty());
    }
}
