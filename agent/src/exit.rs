//! Stable process exit codes of the `runos` binary.
//!
//! These are part of the CLI contract (`docs/cli.md`): scripts and systemd units
//! (`RestartPreventExitStatus=`) may depend on them. Codes are never renumbered.

/// A `runos` exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// A failure not covered by a more specific code.
    Failure = 1,
    /// The command line is invalid.
    Usage = 2,
    /// The node is not registered, or the configuration is invalid.
    NotRegistered = 3,
    /// The control plane could not be reached (DNS, TCP, timeout).
    Unreachable = 4,
    /// The control plane refused the enrolment (token unknown, expired or used).
    Refused = 5,
    /// TLS failed: certificate verification, ALPN, or an L1Sec CA pin mismatch.
    Tls = 6,
    /// Another `runos agent` holds the instance lock.
    Locked = 7,
    /// `runos status`: the agent is degraded (disconnected too long, revoked, or its
    /// certificate expired); `runos certificate status`: the certificate expired; `runos etcd
    /// list`: the etcd cluster is unhealthy.
    Degraded = 8,
    /// `runos status`, `runos journal`: the agent daemon is not running (no answer on the admin
    /// socket).
    NotRunning = 9,
    /// `runos verify`, `runos update`: the artifact failed verification (checksum or
    /// attestation); nothing was installed.
    VerifyFailed = 10,
    /// `runos update`: a release file could not be downloaded (network, HTTP status, size cap,
    /// truncated); nothing was installed.
    DownloadFailed = 11,
    /// `runos update`: refused by policy (a downgrade without `--allow-downgrade`, a version
    /// refused after a failed health gate, no target version known).
    UpdateRefused = 12,
    /// `runos update`: the verified release could not be installed (disk full, permissions,
    /// `bin_link` not a symlink, the new binary does not run); the previous one is untouched.
    InstallFailed = 13,
    /// `runos update`: the new version failed its health gate and was rolled back.
    RolledBack = 14,
    /// `runos etcd`: etcd could not be reached (no endpoint answers, or the TLS files in
    /// `[etcd]` cannot be read).
    EtcdUnreachable = 15,
    /// `runos etcd remove`: no member matches (also when this node removed it earlier).
    EtcdNotFound = 16,
    /// `runos etcd remove`: refused as unsafe (quorum, the last voting member, no leader, an
    /// ambiguous address); nothing was changed.
    EtcdRefused = 17,
}

impl Exit {
    /// The numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// The exit-code table as shown in `--help` and `docs/cli.md`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  failure (not covered below)
  2  usage error (invalid command line)
  3  not registered, or the configuration is invalid
  4  the control plane could not be reached (DNS, TCP, timeout)
  5  the control plane refused the enrolment token
  6  TLS failure: certificate verification, ALPN, or L1Sec CA pin mismatch
  7  another runos agent is running (instance lock held)
  8  runos status: degraded (disconnected > 5 min, revoked, or certificate expired);
     runos certificate status: the certificate expired; runos etcd list: etcd cluster unhealthy
  9  runos status, runos journal: the agent daemon is not running (admin socket absent or refusing)
 10  runos verify, runos update: verification failed (checksum or attestation)
 11  runos update: a release file could not be downloaded
 12  runos update: refused (downgrade without --allow-downgrade, refused version, no target)
 13  runos update: the verified release could not be installed (previous one untouched)
 14  runos update: the new version failed its health gate and was rolled back
 15  runos etcd: etcd could not be reached (endpoints, TLS files)
 16  runos etcd remove: no such member (or this node removed it earlier)
 17  runos etcd remove: refused as unsafe (quorum, last voter, no leader, ambiguous); nothing changed";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        let all = [
            (Exit::Ok, 0),
            (Exit::Failure, 1),
            (Exit::Usage, 2),
            (Exit::NotRegistered, 3),
            (Exit::Unreachable, 4),
            (Exit::Refused, 5),
            (Exit::Tls, 6),
            (Exit::Locked, 7),
            (Exit::Degraded, 8),
            (Exit::NotRunning, 9),
            (Exit::VerifyFailed, 10),
            (Exit::DownloadFailed, 11),
            (Exit::UpdateRefused, 12),
            (Exit::InstallFailed, 13),
            (Exit::RolledBack, 14),
            (Exit::EtcdUnreachable, 15),
            (Exit::EtcdNotFound, 16),
            (Exit::EtcdRefused, 17),
        ];
        for (e, n) in all {
            assert_eq!(e.code(), n);
            assert!(EXIT_CODES_HELP.contains(&format!("\n{n:>3}  ")), "{n}");
        }
    }
}
