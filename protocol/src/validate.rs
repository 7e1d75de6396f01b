//! Pure, cheap checks of payload fields whose shape is a protocol-level fact.
//!
//! These are hand-written (no regex engine) and never look at anything but the string. They do
//! not replace the checks an executor makes against the node's state (is the URL's address
//! blocked, does the etcd member exist); they reject values that can never be right, before any
//! of them reaches an argument vector. Errors name the field in its wire spelling and never
//! repeat the value, so they can be sent back in an `ERROR` and logged.

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Longest helm name (`chartName`, `namespace`, `myChartName`, `myRepoName`), in bytes.
pub const MAX_HELM_NAME_LEN: usize = 253;

/// Longest helm chart `version` (a version or a semver constraint), in bytes.
pub const MAX_HELM_VERSION_LEN: usize = 64;

/// Longest URL in a payload (`repoUrl`, `valuesUrl`, RUN_WEB_REQUEST `url`), in bytes.
pub const MAX_URL_LEN: usize = 8192;

/// Longest `script` of RUN_REMOTE_SCRIPT, in bytes.
pub const MAX_SCRIPT_LEN: usize = 512;

/// Longest version string (`v1.30.2`, `v1.30`), in bytes.
pub const MAX_VERSION_LEN: usize = 32;

/// Longest Kubernetes DNS label (DELETE_CR `type` and `id`), in bytes.
pub const MAX_DNS_LABEL_LEN: usize = 63;

/// Largest UPDATE_DNSMASQ `fileContents`, in bytes.
pub const MAX_DNSMASQ_LEN: usize = 64 * 1024;

/// Longest environment variable name of RUN_COMMAND, in bytes.
pub const MAX_ENV_NAME_LEN: usize = 256;

/// Longest Debian package name, `:arch` included, in bytes.
pub const MAX_PACKAGE_NAME_LEN: usize = 128;

/// Longest Debian package version, in bytes.
pub const MAX_DEBIAN_VERSION_LEN: usize = 128;

/// The dnsmasq directives UPDATE_DNSMASQ may set. This is the Go agent's allow list without
/// `pid-file`, `user` and `group` (which make root write files at, or run dnsmasq as, a path or
/// account of the sender's choosing); `log-facility` is allowed only with a syslog facility, not
/// a file path.
pub const DNSMASQ_ALLOWED_DIRECTIVES: &[&str] = &[
    "address",
    "server",
    "listen-address",
    "bind-interfaces",
    "bind-dynamic",
    "interface",
    "except-interface",
    "no-resolv",
    "no-poll",
    "no-hosts",
    "domain-needed",
    "bogus-priv",
    "cache-size",
    "local",
    "domain",
    "expand-hosts",
    "local-ttl",
    "neg-ttl",
    "max-ttl",
    "min-cache-ttl",
    "max-cache-ttl",
    "dns-forward-max",
    "all-servers",
    "strict-order",
    "stop-dns-rebind",
    "rebind-localhost-ok",
    "port",
    "log-queries",
    "log-facility",
    "clear-on-reload",
    "add-cpe-id",
    "filter-aaaa",
];

/// A payload field that can never be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` {problem}")]
pub struct ValidationError {
    /// The field's path in wire spelling, for example `node_ip` or `peers[2].pubKey`.
    pub field: String,
    /// What is wrong with it. Never contains the value.
    pub problem: Problem,
}

impl ValidationError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, problem: Problem) -> Self {
        ValidationError {
            field: field.into(),
            problem,
        }
    }
}

/// What is wrong with a field. The texts never contain the field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// The field is empty.
    #[error("must not be empty")]
    Empty,
    /// The field is longer than allowed.
    #[error("is longer than {max} bytes")]
    TooLong {
        /// The maximum, in bytes.
        max: usize,
    },
    /// The field starts with `-`, so a program would take it for an option.
    #[error("must not start with '-'")]
    LeadingDash,
    /// The field has a character outside the allowed set.
    #[error("may only contain {allowed}")]
    BadCharacter {
        /// A description of the allowed set.
        allowed: &'static str,
    },
    /// The field contains `..`.
    #[error("must not contain '..'")]
    DotDot,
    /// The field is not an IPv4 or IPv6 address.
    #[error("is not an IP address")]
    NotAnIpAddress,
    /// The field is not a canonical WireGuard public key.
    #[error("is not a WireGuard public key (44 characters of standard base64 encoding 32 bytes)")]
    NotAWireGuardKey,
    /// The field is not a version of the required form.
    #[error("is not a version of the form {form}")]
    NotAVersion {
        /// The required form, for example `v1.30.2`.
        form: &'static str,
    },
    /// The field is not standard padded base64.
    #[error("is not standard padded base64")]
    NotBase64,
    /// The field is not a URL with one of the allowed schemes.
    #[error("must be a URL with scheme {allowed}")]
    BadScheme {
        /// The allowed schemes.
        allowed: &'static str,
    },
    /// A list or map has more entries than allowed.
    #[error("has more than {max} entries")]
    TooMany {
        /// The maximum number of entries.
        max: usize,
    },
    /// The field contains a NUL byte, which cannot be passed to a program.
    #[error("must not contain NUL bytes")]
    Nul,
    /// The field is not an absolute path.
    #[error("must be an absolute path")]
    NotAbsolute,
    /// A number is outside its range.
    #[error("must be between {min} and {max}")]
    OutOfRange {
        /// The smallest allowed value.
        min: u64,
        /// The largest allowed value.
        max: u64,
    },
    /// A map has a key (for example an environment variable name) of the wrong form.
    #[error("has a name that is not of the form {form}")]
    BadName {
        /// The required form.
        form: &'static str,
    },
    /// A program path that is neither absolute nor a bare name (it has a `/` but does not
    /// start with one, so it would be resolved against the working directory).
    #[error("must be an absolute path or a program name without '/'")]
    NotAProgram,
    /// A value that must be unique in its list appears more than once.
    #[error("appears more than once")]
    Duplicate,
    /// The field is set, but only makes sense together with another one that is missing.
    #[error("requires `{other}`")]
    Requires {
        /// The field it needs.
        other: &'static str,
    },
    /// A dnsmasq configuration line uses a directive that is not in
    /// [`DNSMASQ_ALLOWED_DIRECTIVES`], or `log-facility` with a file path.
    #[error("uses a dnsmasq directive or value that is not allowed")]
    DirectiveNotAllowed,
}

/// Shorthand for a result of a check.
pub(crate) type Checked<T = ()> = Result<T, ValidationError>;

fn err<T>(field: &str, problem: Problem) -> Checked<T> {
    Err(ValidationError::new(field, problem))
}

/// `field` is not empty and at most `max` bytes.
pub(crate) fn length(field: &str, value: &str, max: usize) -> Checked {
    if value.is_empty() {
        return err(field, Problem::Empty);
    }
    if value.len() > max {
        return err(field, Problem::TooLong { max });
    }
    Ok(())
}

/// An IPv4 or IPv6 address in its plain text form (no zone, no brackets, no port).
pub(crate) fn ip(field: &str, value: &str) -> Checked<IpAddr> {
    value
        .parse::<IpAddr>()
        .or_else(|_| err(field, Problem::NotAnIpAddress))
}

/// A canonical WireGuard key: 44 characters of standard padded base64 that decode to exactly 32
/// bytes with no stray bits in the last character.
pub(crate) fn wireguard_key(field: &str, value: &str) -> Checked {
    // The STANDARD engine refuses non-zero trailing bits, so only canonical encodings decode.
    match STANDARD.decode(value) {
        Ok(bytes) if value.len() == 44 && bytes.len() == 32 => Ok(()),
        _ => err(field, Problem::NotAWireGuardKey),
    }
}

/// Whether `value` is a canonical WireGuard public key (see [`Problem::NotAWireGuardKey`]).
pub fn is_wireguard_key(value: &str) -> bool {
    wireguard_key("", value).is_ok()
}

/// Standard padded base64, not empty; returns the decoded bytes.
pub(crate) fn base64(field: &str, value: &str) -> Checked<Vec<u8>> {
    if value.is_empty() {
        return err(field, Problem::Empty);
    }
    STANDARD
        .decode(value)
        .or_else(|_| err(field, Problem::NotBase64))
}

/// `v?MAJOR.MINOR.PATCH` where each part is 1 to 9 ASCII digits.
pub(crate) fn version_triplet(field: &str, value: &str) -> Checked {
    version_parts(
        field,
        value,
        3,
        "v1.30.2 (an optional 'v' and three numbers)",
    )
}

/// `v?MAJOR.MINOR` where each part is 1 to 9 ASCII digits (a Kubernetes package repository).
pub(crate) fn version_pair(field: &str, value: &str) -> Checked {
    version_parts(field, value, 2, "v1.30 (an optional 'v' and two numbers)")
}

fn version_parts(field: &str, value: &str, parts: usize, form: &'static str) -> Checked {
    if value.is_empty() {
        return err(field, Problem::Empty);
    }
    if value.len() > MAX_VERSION_LEN {
        return err(
            field,
            Problem::TooLong {
                max: MAX_VERSION_LEN,
            },
        );
    }
    let digits = value.strip_prefix('v').unwrap_or(value);
    let mut n = 0;
    for part in digits.split('.') {
        n += 1;
        if part.is_empty() || part.len() > 9 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return err(field, Problem::NotAVersion { form });
        }
    }
    if n != parts {
        return err(field, Problem::NotAVersion { form });
    }
    Ok(())
}

/// A helm name as the Go agent's validator defines it (`^[a-z0-9._-]+$`, at most 253 bytes),
/// and additionally not starting with `-`, so it can never become a helm option.
pub(crate) fn helm_name(field: &str, value: &str) -> Checked {
    length(field, value, MAX_HELM_NAME_LEN)?;
    if value.starts_with('-') {
        return err(field, Problem::LeadingDash);
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return err(
            field,
            Problem::BadCharacter {
                allowed: "lowercase ASCII letters, digits, '.', '_' and '-'",
            },
        );
    }
    Ok(())
}

/// A helm chart version or constraint: printable ASCII, at most 64 bytes, not starting with `-`.
pub(crate) fn helm_version(field: &str, value: &str) -> Checked {
    length(field, value, MAX_HELM_VERSION_LEN)?;
    if value.starts_with('-') {
        return err(field, Problem::LeadingDash);
    }
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return err(
            field,
            Problem::BadCharacter {
                allowed: "printable ASCII",
            },
        );
    }
    Ok(())
}

/// A Kubernetes DNS-1123 label: 1 to 63 of `[a-z0-9-]`, starting and ending with a letter or
/// digit.
pub(crate) fn dns_label(field: &str, value: &str) -> Checked {
    length(field, value, MAX_DNS_LABEL_LEN)?;
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = value.as_bytes();
    if !bytes.iter().all(|&b| alnum(b) || b == b'-')
        || !bytes.first().copied().is_some_and(alnum)
        || !bytes.last().copied().is_some_and(alnum)
    {
        return err(
            field,
            Problem::BadCharacter {
                allowed: "lowercase ASCII letters, digits and '-', starting and ending with a letter or digit",
            },
        );
    }
    Ok(())
}

/// A URL whose scheme (compared case-insensitively) is one of `schemes`, with something after
/// `://`, at most [`MAX_URL_LEN`] bytes, and no whitespace or control characters. Returns the
/// scheme in lowercase. Whether its host may be contacted is the executor's decision.
pub(crate) fn url(
    field: &str,
    value: &str,
    schemes: &[&'static str],
    allowed: &'static str,
) -> Checked<&'static str> {
    length(field, value, MAX_URL_LEN)?;
    if value.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return err(
            field,
            Problem::BadCharacter {
                allowed: "printable characters without spaces",
            },
        );
    }
    // Compare bytes: slicing the text at the scheme's length could split a character.
    let bytes = value.as_bytes();
    for scheme in schemes {
        let prefix_len = scheme.len() + 3;
        if let Some((name, sep)) = bytes
            .get(..prefix_len)
            .and_then(|p| p.split_at_checked(scheme.len()))
            && name.eq_ignore_ascii_case(scheme.as_bytes())
            && sep == b"://"
            && bytes.len() > prefix_len
        {
            return Ok(scheme);
        }
    }
    err(field, Problem::BadScheme { allowed })
}

/// An HTTP token (RFC 9110 §5.6.2): a method or a header name.
pub(crate) fn http_token(field: &str, value: &str) -> Checked {
    if value.is_empty() {
        return err(field, Problem::Empty);
    }
    if !value.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            )
    }) {
        return err(
            field,
            Problem::BadCharacter {
                allowed: "HTTP token characters",
            },
        );
    }
    Ok(())
}

/// An HTTP header value: no CR, LF or NUL (which would split or end the header).
pub(crate) fn http_header_value(field: &str, value: &str) -> Checked {
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return err(
            field,
            Problem::BadCharacter {
                allowed: "characters other than CR, LF and NUL",
            },
        );
    }
    Ok(())
}

/// The `script` of RUN_REMOTE_SCRIPT, as the Go agent's validator defines it:
/// `^/?(?:t/)?[\w.][\w.\-/]*$`, at most 512 bytes, without `..`. (The optional `t/` group adds
/// nothing to the language: `t` and `/` are already allowed, so the check below is the same
/// without it.)
pub(crate) fn script_name(field: &str, value: &str) -> Checked {
    length(field, value, MAX_SCRIPT_LEN)?;
    if value.contains("..") {
        return err(field, Problem::DotDot);
    }
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'.';
    let rest = value.strip_prefix('/').unwrap_or(value).as_bytes();
    let ok = match rest.split_first() {
        Some((&first, tail)) => {
            word(first) && tail.iter().all(|&b| word(b) || b == b'-' || b == b'/')
        }
        None => false,
    };
    if !ok {
        return err(
            field,
            Problem::BadCharacter {
                allowed: "an optional leading '/', then ASCII letters, digits, '_', '.', '-' and '/' (not starting with '-' or '/')",
            },
        );
    }
    Ok(())
}

/// At most `max` entries.
pub(crate) fn count(field: &str, n: usize, max: usize) -> Checked {
    if n > max {
        return err(field, Problem::TooMany { max });
    }
    Ok(())
}

/// At most `max` bytes (may be empty) and no NUL byte.
pub(crate) fn arg(field: &str, value: &str, max: usize) -> Checked {
    if value.len() > max {
        return err(field, Problem::TooLong { max });
    }
    if value.bytes().any(|b| b == 0) {
        return err(field, Problem::Nul);
    }
    Ok(())
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_ENV_NAME_LEN`] bytes.
pub(crate) fn env_name(field: &str, name: &str) -> Checked {
    let bytes = name.as_bytes();
    let ok = name.len() <= MAX_ENV_NAME_LEN
        && bytes
            .first()
            .is_some_and(|&b| b.is_ascii_alphabetic() || b == b'_')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return err(
            field,
            Problem::BadName {
                form: "[A-Za-z_][A-Za-z0-9_]* (at most 256 bytes)",
            },
        );
    }
    Ok(())
}

/// An absolute path without NUL bytes, at most 4096 bytes.
pub(crate) fn absolute_path(field: &str, value: &str) -> Checked {
    arg(field, value, 4096)?;
    if !value.starts_with('/') {
        return err(field, Problem::NotAbsolute);
    }
    Ok(())
}

/// A program to run: an absolute path, or a bare name (no `/`) that the agent looks up in its
/// own `PATH`. A relative path with a `/` (`bin/x`, `../../bin/sh`) would be resolved against
/// the working directory and is refused. `.` and `..` are not program names either.
pub(crate) fn program(field: &str, value: &str) -> Checked {
    if value.starts_with('/') {
        return Ok(());
    }
    if value.contains('/') || value == "." || value == ".." {
        return err(field, Problem::NotAProgram);
    }
    Ok(())
}

/// `min <= value <= max`.
pub(crate) fn range(field: &str, value: u64, min: u64, max: u64) -> Checked {
    if value < min || value > max {
        return err(field, Problem::OutOfRange { min, max });
    }
    Ok(())
}

/// A Debian package name (policy §5.6.1): at least two of `[a-z0-9+.-]`, starting with a letter
/// or digit, optionally followed by `:arch` (`[a-z0-9][a-z0-9-]*`); at most
/// [`MAX_PACKAGE_NAME_LEN`] bytes in all. Nothing else passes (no option, no glob, no shell
/// character, no `=version` or `/release` suffix).
pub(crate) fn package_name(field: &str, value: &str) -> Checked {
    length(field, value, MAX_PACKAGE_NAME_LEN)?;
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (name, arch) = match value.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (value, None),
    };
    let name_ok = name.len() >= 2
        && name.bytes().next().is_some_and(alnum)
        && name
            .bytes()
            .all(|b| alnum(b) || matches!(b, b'+' | b'.' | b'-'));
    let arch_ok = arch.is_none_or(|a| {
        a.bytes().next().is_some_and(alnum) && a.bytes().all(|b| alnum(b) || b == b'-')
    });
    if !name_ok || !arch_ok {
        return err(
            field,
            Problem::BadCharacter {
                allowed: "a Debian package name: at least two of lowercase ASCII letters, digits, '+', '.' and '-', starting with a letter or digit, optionally ':' and an architecture",
            },
        );
    }
    Ok(())
}

/// A Debian package version (policy §5.6.12): `[epoch:]upstream[-revision]`, at most
/// [`MAX_DEBIAN_VERSION_LEN`] bytes. The epoch is 1 to 9 digits; the upstream version starts
/// with a digit and has only ASCII letters, digits, `.`, `+`, `~` and (when there is a revision)
/// `-`; the revision (after the last `-`) is not empty and has only letters, digits, `.`, `+`
/// and `~`. A colon is allowed only after the epoch.
pub(crate) fn debian_version(field: &str, value: &str) -> Checked {
    const FORM: &str =
        "[epoch:]upstream[-revision] (a Debian version such as 1.30.2-1.1 or 1:2.3~rc1-2)";
    length(field, value, MAX_DEBIAN_VERSION_LEN)?;
    let bad = || err(field, Problem::NotAVersion { form: FORM });
    let (epoch, rest) = match value.split_once(':') {
        Some((e, r)) => (Some(e), r),
        None => (None, value),
    };
    if let Some(e) = epoch
        && (e.is_empty() || e.len() > 9 || !e.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad();
    }
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((u, r)) => (u, Some(r)),
        None => (rest, None),
    };
    let common = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'~');
    let upstream_ok = upstream.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && upstream
            .bytes()
            .all(|b| common(b) || (b == b'-' && revision.is_some()));
    let revision_ok = revision.is_none_or(|r| !r.is_empty() && r.bytes().all(common));
    if !upstream_ok || !revision_ok {
        return bad();
    }
    Ok(())
}

/// A dnsmasq configuration for `/etc/dnsmasq.d/runos.conf`.
///
/// At most [`MAX_DNSMASQ_LEN`] bytes; no control characters other than tab, and CR before LF.
/// Blank lines and lines starting with `#` (after leading blanks) are skipped. The directive of
/// every other line is the text before the first `=`, space or tab, lowercased, with a leading
/// `--` removed; it must be in [`DNSMASQ_ALLOWED_DIRECTIVES`]. `log-facility` must name a
/// facility (no `/`), not a file. An empty configuration is valid. Errors name the line number
/// (`fileContents (line 3)`), never its text.
pub(crate) fn dnsmasq_config(field: &str, value: &str) -> Checked {
    if value.len() > MAX_DNSMASQ_LEN {
        return err(
            field,
            Problem::TooLong {
                max: MAX_DNSMASQ_LEN,
            },
        );
    }
    for (i, raw) in value.split('\n').enumerate() {
        let line_field = || format!("{field} (line {})", i + 1);
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(ValidationError::new(
                line_field(),
                Problem::BadCharacter {
                    allowed: "printable characters and tabs",
                },
            ));
        }
        let line = line.trim_matches(|c| c == ' ' || c == '\t');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line.find(['=', ' ', '\t']).unwrap_or(line.len());
        let (directive, rest) = line.split_at(end);
        let directive = directive.to_ascii_lowercase();
        let directive = directive.strip_prefix("--").unwrap_or(&directive);
        let allowed = DNSMASQ_ALLOWED_DIRECTIVES.contains(&directive)
            && !(directive == "log-facility" && rest.contains('/'));
        if !allowed {
            return Err(ValidationError::new(
                line_field(),
                Problem::DirectiveNotAllowed,
            ));
        }
    }
    Ok(())
}

/// A value shown as `<redacted>` in `Debug` output.
pub(crate) struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A map shown with its keys only.
pub(crate) struct KeysOnly<'a, V>(pub &'a std::collections::BTreeMap<String, V>);

impl<V> fmt::Debug for KeysOnly<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, Redacted)))
            .finish()
    }
}

/// A string shown as its length only (`<123 bytes>`) in `Debug` output: for large or possibly
/// sensitive text such as manifests and command output.
pub(crate) struct LenOnly(pub usize);

impl fmt::Debug for LenOnly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_keys() {
        let good = STANDARD.encode([7u8; 32]);
        assert!(wireguard_key("k", &good).is_ok());
        assert!(wireguard_key("k", "").is_err());
        assert!(wireguard_key("k", &STANDARD.encode([7u8; 31])).is_err());
        assert!(wireguard_key("k", &STANDARD.encode([7u8; 33])).is_err());
        // Unpadded and non-canonical last character.
        assert!(wireguard_key("k", good.trim_end_matches('=')).is_err());
        let mut noncanon = good.clone();
        noncanon.replace_range(42..43, "B");
        assert!(wireguard_key("k", &noncanon).is_err());
        assert!(wireguard_key("k", &format!("{good} ")).is_err());
    }

    #[test]
    fn ips() {
        assert!(ip("f", "10.0.0.1").is_ok());
        assert!(ip("f", "fd00::1").is_ok());
        for bad in [
            "",
            "10.0.0",
            "10.0.0.256",
            "010.0.0.1",
            " 10.0.0.1",
            "10.0.0.1/32",
            "x",
        ] {
            assert!(ip("f", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn versions() {
        for good in ["1.30.2", "v1.30.2", "v0.0.0", "123456789.0.1"] {
            assert!(version_triplet("f", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "v",
            "1.30",
            "1.30.2.1",
            "v1.30.2-rc.1",
            "1..2",
            "1.30.2;id",
            "$(id).1.2",
            "V1.2.3",
            "vv1.2.3",
            "1234567890.0.0",
            " 1.2.3",
        ] {
            assert!(version_triplet("f", bad).is_err(), "{bad:?}");
        }
        assert!(version_pair("f", "v1.30").is_ok());
        assert!(version_pair("f", "1.30").is_ok());
        assert!(version_pair("f", "v1.30.2").is_err());
        assert!(version_pair("f", "v1").is_err());
    }

    #[test]
    fn helm_names() {
        for good in ["nginx", "ingress-nginx", "kube-system", "a.b_c", "0"] {
            assert!(helm_name("f", good).is_ok(), "{good}");
        }
        for bad in ["", "-set", "--kubeconfig", "Nginx", "a b", "a/b", "ä"] {
            assert!(helm_name("f", bad).is_err(), "{bad:?}");
        }
        assert!(helm_name("f", &"a".repeat(253)).is_ok());
        assert!(helm_name("f", &"a".repeat(254)).is_err());
        assert!(helm_version("f", "^1.2.0").is_ok());
        assert!(helm_version("f", ">= 1.2, < 2").is_ok());
        assert!(helm_version("f", "--devel").is_err());
        assert!(helm_version("f", "1.2\n").is_err());
    }

    #[test]
    fn dns_labels() {
        assert!(dns_label("f", "clusters").is_ok());
        assert!(dns_label("f", "a-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "../x", "a/b"] {
            assert!(dns_label("f", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls() {
        let https = &["https"][..];
        assert_eq!(url("f", "https://x", https, "https"), Ok("https"));
        assert_eq!(url("f", "HTTPS://x", https, "https"), Ok("https"));
        let both = &["http", "https", "oci"][..];
        assert_eq!(url("f", "OCI://r/c", both, "x"), Ok("oci"));
        assert_eq!(url("f", "http://x", both, "x"), Ok("http"));
        for bad in [
            "",
            "https://",
            "http://x",
            "file:///etc/passwd",
            "-https://x",
            "https://a b",
        ] {
            assert!(url("f", bad, https, "https").is_err(), "{bad:?}");
        }
        assert!(url("f", "ht", both, "x").is_err());
        assert!(url("f", "é://x", both, "x").is_err());
        // Multi-byte characters where the scheme would end must not panic.
        assert!(url("f", "û9,\u{9946c}", both, "x").is_err());
        assert!(url("f", "htt\u{e9}://x", both, "x").is_err());
    }

    #[test]
    fn scripts() {
        for good in [
            "install.sh",
            "/t/abc-def",
            "t/x",
            "a/b/c.sh",
            "_x",
            ".hidden",
        ] {
            assert!(script_name("f", good).is_ok(), "{good}");
        }
        for bad in [
            "", "/", "//x", "-x", "a/../b", "..", "a b", "a;b", "$(id)", "a\nb", "ü",
        ] {
            assert!(script_name("f", bad).is_err(), "{bad:?}");
        }
        assert!(script_name("f", &"a".repeat(512)).is_ok());
        assert!(script_name("f", &"a".repeat(513)).is_err());
    }

    #[test]
    fn http_tokens_and_values() {
        assert!(http_token("f", "GET").is_ok());
        assert!(http_token("f", "X-Custom_1").is_ok());
        assert!(http_token("f", "GET /").is_err());
        assert!(http_token("f", "").is_err());
        assert!(http_header_value("f", "Bearer x").is_ok());
        assert!(http_header_value("f", "x\r\nHost: y").is_err());
    }

    #[test]
    fn env_names_paths_and_args() {
        for good in ["PATH", "_x", "a1_B"] {
            assert!(env_name("env", good).is_ok(), "{good}");
        }
        for bad in ["", "1A", "A-B", "A=B", "Ä", "A B"] {
            assert!(env_name("env", bad).is_err(), "{bad:?}");
        }
        assert!(env_name("env", &"A".repeat(257)).is_err());
        assert!(absolute_path("cwd", "/tmp").is_ok());
        assert!(absolute_path("cwd", "tmp").is_err());
        assert!(absolute_path("cwd", "").is_err());
        assert!(absolute_path("cwd", "/a\0b").is_err());
        assert!(absolute_path("cwd", &format!("/{}", "a".repeat(4095))).is_ok());
        assert!(absolute_path("cwd", &format!("/{}", "a".repeat(4999))).is_err());
        for good in ["/bin/sh", "sh", "id", "/", "true.sh"] {
            assert!(program("argv[0]", good).is_ok(), "{good}");
        }
        for bad in ["../../../../bin/sh", "bin/sh", "./x", ".", "..", "x/"] {
            assert_eq!(
                program("argv[0]", bad).unwrap_err().problem,
                Problem::NotAProgram,
                "{bad}"
            );
        }
        assert!(arg("a", "", 3).is_ok());
        assert!(arg("a", "abcd", 3).is_err());
        assert_eq!(arg("a", "a\0", 3).unwrap_err().problem, Problem::Nul);
        assert!(count("l", 3, 3).is_ok());
        assert!(count("l", 4, 3).is_err());
        assert!(range("t", 0, 1, 5).is_err());
        assert!(range("t", 5, 1, 5).is_ok());
    }

    #[test]
    fn dnsmasq() {
        let good = "# comment\n\naddress=/x.local/10.0.0.1\r\n  server=1.1.1.1\n--no-resolv\nCache-Size=1000\nlog-facility=LOCAL0\nbind-interfaces\n";
        assert!(dnsmasq_config("fileContents", good).is_ok());
        assert!(dnsmasq_config("fileContents", "").is_ok());
        for (bad, line) in [
            ("server=1.1.1.1\nconf-dir=/etc/x", 2),
            ("dhcp-script=/bin/sh", 1),
            ("pid-file=/etc/shadow", 1),
            ("user=root", 1),
            ("group=root", 1),
            ("log-facility=/etc/cron.d/x", 1),
            ("a\n\nscript-arp", 1),
            ("address=/x/1.2.3.4\x01", 1),
        ] {
            let e = dnsmasq_config("fileContents", bad).unwrap_err();
            assert_eq!(e.field, format!("fileContents (line {line})"), "{bad:?}");
            assert!(!e.to_string().contains("/etc"), "{e}");
        }
        assert!(dnsmasq_config("f", &"#".repeat(MAX_DNSMASQ_LEN + 1)).is_err());
    }

    #[test]
    fn debian_package_names() {
        for good in [
            "hello",
            "kubeadm",
            "libc6",
            "g++",
            "libstdc++6",
            "0ad",
            "python3.11",
            "x-y.z+w",
            "libc6:amd64",
            "libc6:i386",
            "foo:all",
        ] {
            assert!(package_name("f", good).is_ok(), "{good}");
        }
        for bad in [
            "", "a", "-a", "--purge", "+a", ".a", "Hello", "a b", "a;id", "a$(id)", "a`id`", "a|b",
            "a&b", "a>b", "a*", "a?", "a=1.0", "a/stable", "a:", "a:-x", "a:AMD64", "a:b:c", "ä",
            "a\nb", "a\0",
        ] {
            assert!(package_name("f", bad).is_err(), "{bad:?}");
        }
        assert!(package_name("f", &"a".repeat(MAX_PACKAGE_NAME_LEN)).is_ok());
        assert!(package_name("f", &"a".repeat(MAX_PACKAGE_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn debian_versions() {
        for good in [
            "1",
            "1.0",
            "1.30.2-1.1",
            "1:2.3~rc1-2",
            "2.10-3",
            "1.7.12-1+deb12u1",
            "2.6.12-1+deb12u4",
            "0.8.3+ds-2~bpo12+1",
            "1.2-3-4",
            "10:1.0",
            "1.30.2-1.1~ubuntu",
            "3.0.2a",
        ] {
            assert!(debian_version("f", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-1",
            "v1.0",
            "a1.0",
            ":1.0",
            "a:1.0",
            "1234567890:1.0",
            "1:",
            "1.0-",
            "1.0:2",
            "1:2:3",
            "1.0 ",
            " 1.0",
            "1.0;id",
            "1.0$(id)",
            "1.0`id`",
            "1.0|x",
            "1.0&",
            "1.0>x",
            "1.0*",
            "1.0/x",
            "1.0_1",
            "1.0-a-",
            "1.0\n",
            "1.0\0",
            "1.0-r:1",
            "1.ä",
        ] {
            assert!(debian_version("f", bad).is_err(), "{bad:?}");
        }
        assert!(debian_version("f", &"1".repeat(MAX_DEBIAN_VERSION_LEN)).is_ok());
        assert!(debian_version("f", &"1".repeat(MAX_DEBIAN_VERSION_LEN + 1)).is_err());
    }

    #[test]
    fn redaction_helpers() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("TOKEN".to_string(), "hunter2".to_string());
        let shown = format!("{:?} {:?} {:?}", Redacted, KeysOnly(&m), LenOnly(7));
        assert_eq!(shown, r#"<redacted> {"TOKEN": <redacted>} <7 bytes>"#);
    }

    #[test]
    fn messages_never_contain_the_value() {
        let secret = "hunter2-secret";
        let checks: [Checked; 8] = [
            package_name("f", "Hunter2-secret"),
            debian_version("f", "hunter2-secret"),
            ip("f", secret).map(|_| ()),
            wireguard_key("f", secret),
            version_triplet("f", secret),
            helm_name("f", "Hunter2-Secret"),
            script_name("f", "hunter2 secret"),
            url("f", secret, &["https"], "https").map(|_| ()),
        ];
        for c in checks {
            let e = c.unwrap_err();
            let text = e.to_string();
            assert!(!text.to_lowercase().contains("hunter2"), "{text}");
            assert!(text.starts_with("field `f` "), "{text}");
        }
    }
}
