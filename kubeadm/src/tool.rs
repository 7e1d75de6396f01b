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
/// 64-hex key, a base64 key), or the `abcdef.0123456789abcdef` token form.
pub fn redact(text: &str) -> String {
    let secretish = |w: &str| {
        w.len() >= 16
            && w.bytes().any(|b| b.is_ascii_digit())
            && w.bytes().any(|b| b.is_ascii_alphabetic())
    };
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if secretish(word) || crate::join::is_token(word) {
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
    }
}
