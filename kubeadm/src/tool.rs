//! Running kubeadm, systemctl and helm through the instruction's runner ([`Ctx::run`]): argv
//! only, a timeout, the tree killed on cancellation, output capped. A failure is a [`StepError`]
//! whose message never carries the output of a secret run unredacted.

use std::time::Duration;

use runos_executors::Ctx;
use runos_executors::context::Secrecy;
use runos_executors::handle::{Outcome, RunError, Spec};
use runos_executors::host::runner::Ended;
use runos_protocol::{ErrorCode, ErrorPayload};

/// Bytes kept of a tool's output (its tail).
pub const OUTPUT_CAP: usize = 256 * 1024;

/// Why a step did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// It ran (or could not be run) and failed; the message says why (never a secret).
    #[error("{0}")]
    Failed(String),
    /// The instruction was cancelled (CANCEL or shutdown).
    #[error("the instruction was cancelled")]
    Cancelled,
    /// The instruction's deadline passed.
    #[error("the instruction's deadline passed")]
    Deadline,
    /// Something of the agent's own failed.
    #[error("{0}")]
    Internal(String),
}

impl StepError {
    /// The `ERROR` payload for it.
    pub fn to_error(&self, what: &str) -> ErrorPayload {
        let code = match self {
            StepError::Failed(_) => ErrorCode::Failed,
            StepError::Cancelled => ErrorCode::Cancelled,
            StepError::Deadline => ErrorCode::Timeout,
            StepError::Internal(_) => ErrorCode::Internal,
        };
        ErrorPayload::new(code, format!("{what}: {self}"))
    }
}

impl From<RunError> for StepError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Spawn(m) => StepError::Failed(m),
            RunError::Internal(m) => StepError::Internal(m),
            RunError::Deadline => StepError::Deadline,
            RunError::Cancelled => StepError::Cancelled,
        }
    }
}

/// Run `argv` (its `argv[0]` a configured tool name or an absolute path) with `timeout`.
/// `label` names it in messages (never an argument: arguments may be secret). Success is exit
/// code 0; the outcome is returned for its stdout.
pub async fn run(
    ctx: &Ctx,
    label: &str,
    argv: Vec<String>,
    timeout: Duration,
    secrecy: Secrecy,
) -> Result<Outcome, StepError> {
    if ctx.cancel.is_cancelled() {
        return Err(StepError::Cancelled);
    }
    let mut spec = Spec::new(argv);
    spec.timeout = timeout;
    spec.output_cap = OUTPUT_CAP;
    let out = ctx.run(spec, secrecy).await?;
    match out.ended {
        Ended::Exited if out.exit_code == Some(0) => Ok(out),
        Ended::Exited => {
            let how = match (out.exit_code, out.signal) {
                (Some(c), _) => format!("exited with {c}"),
                (None, Some(s)) => format!("was killed by signal {s}"),
                (None, None) => "ended abnormally".to_string(),
            };
            Err(StepError::Failed(format!(
                "{label} {how}{}",
                last_line(&out, secrecy)
            )))
        }
        Ended::TimedOut => Err(StepError::Failed(format!(
            "{label} did not finish within {} s and was killed",
            timeout.as_secs()
        ))),
        Ended::Inactive => Err(StepError::Failed(format!(
            "{label} stopped writing output and was killed"
        ))),
        Ended::Cancelled => Err(StepError::Cancelled),
    }
}

/// The content of the regular file at `path`, at most `max` bytes (a larger file is an error).
/// Anything but a regular file (a FIFO, whose open would block, a device, a directory) is
/// refused before it is opened. Messages name the path, never the content.
pub fn read_capped(path: &std::path::Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > max {
        return Err(format!("{} is larger than {max} bytes", path.display()));
    }
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut buf = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if buf.len() as u64 > max {
        return Err(format!("{} is larger than {max} bytes", path.display()));
    }
    Ok(buf)
}

/// `": <the last non-empty line of stderr (else stdout)>"`, redacted for a secret run.
fn last_line(out: &Outcome, secrecy: Secrecy) -> String {
    let pick = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    };
    let Some(line) = pick(&out.stderr).or_else(|| pick(&out.stdout)) else {
        return String::new();
    };
    let line = match secrecy {
        Secrecy::Public => line,
        Secrecy::Secret => redact(&line),
    };
    let line = runos_protocol::peertext::PeerText::capped(&line, 512).to_string();
    format!(": {line}")
}

/// `text` with every word that could be a secret replaced by `[redacted]`: a run of at least 16
/// characters of `[A-Za-z0-9+/=._-]` with both a letter and a digit (a bootstrap token, a
/// 64-hex key, a base64 key), or holding the `abcdef.0123456789abcdef` token form or a run of
/// 32 or more hex digits anywhere (`--token=<token>`, a key of letters only).
pub fn redact(text: &str) -> String {
    let secretish = |w: &str| {
        (w.len() >= 16
            && w.bytes().any(|b| b.is_ascii_digit())
            && w.bytes().any(|b| b.is_ascii_alphabetic()))
            || has_token(w)
            || has_hex_run(w, 32)
    };
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if secretish(word) {
            out.push_str("[redacted]");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '.' | '_' | '-') {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Whether `w` holds a bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`) anywhere.
fn has_token(w: &str) -> bool {
    let b = w.as_bytes();
    let tok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.iter().enumerate().any(|(i, c)| {
        *c == b'.'
            && i >= 6
            && b.get(i - 6..i).is_some_and(|p| p.iter().all(tok))
            && b.get(i + 1..i + 17).is_some_and(|p| p.iter().all(tok))
    })
}

/// Whether `w` holds a run of at least `n` hex digits.
fn has_hex_run(w: &str, n: usize) -> bool {
    let mut run = 0;
    for c in w.bytes() {
        run = if c.is_ascii_hexdigit() { run + 1 } else { 0 };
        if run >= n {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_tokens_and_keys_and_keeps_words() {
        let t = "error: token abcdef.0123456789abcdef key 0f1e2d3c4b5a69780f1e2d3c4b5a69780f1e2d3c4b5a69780f1e2d3c4b5a6978 in /etc/kubernetes/admin.conf, secret c2VjcmV0LWtleS0xMjM0NTY3OA==";
        let r = redact(t);
        assert!(!r.contains("0123456789abcdef"), "{r}");
        assert!(!r.contains("0f1e2d3c"), "{r}");
        assert!(!r.contains("c2VjcmV0"), "{r}");
        assert!(r.contains("/etc/kubernetes/admin.conf"), "{r}");
        assert!(
            r.starts_with("error: token [redacted] key [redacted]"),
            "{r}"
        );
        // Tokens and keys of letters only, or glued to a flag, are caught too.
        let t = format!(
            "bad --token=abcdef.ghijklmnopqrstuv or key {} for kubeadm-certs",
            "abcdef".repeat(11)
        );
        let r = redact(&t);
        assert_eq!(r, "bad [redacted] or key [redacted] for kubeadm-certs");
    }
}
