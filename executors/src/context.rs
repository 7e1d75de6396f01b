//! What an executor may use besides its payload: the [`Ctx`].
//!
//! - the instruction's tag;
//! - its deadline, measured from acceptance (protocol.md §7.3), to pass on to a tool's own
//!   `--timeout`;
//! - a cancellation token, cancelled when the deadline passes, on `CANCEL` and at shutdown
//!   (the executor's future is dropped right after: the token is for work that outlives a
//!   future, such as a blocking thread, to stop at its next step);
//! - a log sink for `LOG` lines ([`Ctx::log`]: capped, rate-limited, never a secret);
//! - a per-executor state directory, created 0700 when first asked for;
//! - the agent's configuration for this executor (an opaque JSON section);
//! - the [`Host`] handle, through which external programs and file writes go; an executor runs
//!   a program with [`Ctx::run`], which ties the run to the instruction: its cancellation, its
//!   deadline, and (unless the output is secret) its `LOG` lines.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runos_protocol::control::{self, LogLevel, LogLine};
use runos_protocol::peertext::PeerText;
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, Tag};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::handle::{Host, Outcome, RunError, Spec};
use crate::host::runner::{Ended, Line, LineRate, LineSink, Stream};

/// `LOG` lines an instruction may send at once before the rate limit applies.
pub const LOG_BURST: u32 = 20;
/// `LOG` lines per second an instruction may send once its burst is spent.
pub const LOG_PER_SEC: u32 = 10;
/// What [`Ctx::run`] keeps between the end of a process tree (its grace included) and the
/// instruction's deadline, to answer in time.
pub const REPLY_MARGIN: Duration = Duration::from_secs(1);

/// Whether a process's output may be sent as `LOG` lines ([`Ctx::run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrecy {
    /// The output holds no secret: each line goes out as a `LOG` line as it comes.
    Public,
    /// The output may hold a secret (a join token, a key): it stays with the executor.
    Secret,
}

/// The context of one running instruction.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The instruction's tag.
    pub tag: Tag,
    /// When the instruction's deadline passes (measured from its acceptance).
    pub deadline: Instant,
    /// Cancelled on deadline, `CANCEL` and shutdown.
    pub cancel: CancellationToken,
    /// External programs, file writes, node facts.
    pub host: Arc<Host>,
    log: LogSink,
    state_dir: Option<PathBuf>,
    config: Arc<serde_json::Value>,
}

impl Ctx {
    /// A context for `tag` with the given deadline; `LOG` lines go to `logs` (best effort).
    /// No state directory and an empty configuration until set with [`Ctx::with_state_dir`] and
    /// [`Ctx::with_config`].
    pub fn new(
        tag: Tag,
        deadline: Instant,
        host: Arc<Host>,
        logs: Option<mpsc::Sender<Envelope>>,
    ) -> Self {
        Ctx {
            tag,
            deadline,
            cancel: CancellationToken::new(),
            host,
            log: LogSink::new(tag, logs),
            state_dir: None,
            config: Arc::new(serde_json::Value::Null),
        }
    }

    /// A context for tests and tools: `tag`, a deadline `within` from now, a default host, no
    /// `LOG` channel.
    pub fn detached(tag: Tag, within: Duration) -> Self {
        Ctx::new(
            tag,
            Instant::now() + within,
            Arc::new(Host::default()),
            None,
        )
    }

    /// Use `dir` as this executor's state directory (created 0700 on first use).
    pub fn with_state_dir(mut self, dir: PathBuf) -> Self {
        self.state_dir = Some(dir);
        self
    }

    /// Use `config` as this executor's configuration section.
    pub fn with_config(mut self, config: Arc<serde_json::Value>) -> Self {
        self.config = config;
        self
    }

    /// Use `token` as the cancellation token.
    pub fn with_cancel(mut self, token: CancellationToken) -> Self {
        self.cancel = token;
        self
    }

    /// Time left until the deadline (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The agent's configuration for this executor (`null` when it has none).
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// This executor's state directory, created (0700) if missing. `internal` when the agent
    /// gave none or it cannot be created.
    pub fn state_dir(&self) -> Result<&Path, ErrorPayload> {
        let dir = self.state_dir.as_deref().ok_or_else(|| {
            ErrorPayload::new(ErrorCode::Internal, "this executor has no state directory")
        })?;
        crate::handle::ensure_dir(dir).map_err(|e| {
            ErrorPayload::new(
                ErrorCode::Internal,
                format!("cannot create the executor's state directory: {e}"),
            )
        })?;
        Ok(dir)
    }

    /// Run `spec` through the host's runner as part of this instruction:
    ///
    /// - **cancellation**: the run's token is a child of [`Ctx::cancel`], so `CANCEL`, the
    ///   deadline and shutdown end the tree (SIGTERM, the grace, SIGKILL); the spec's own token
    ///   still ends it too;
    /// - **deadline**: when the spec's timeout plus its grace would pass the instruction's
    ///   deadline less [`REPLY_MARGIN`], both are shortened (the grace to at most a quarter of
    ///   what is left) so that the tree has ended before it;
    /// - **output**: with [`Secrecy::Public`] every output line is sent as a `LOG` line as it
    ///   comes (stdout `info`, stderr `warn`; cut at 4096 bytes) at the `LOG` rate
    ///   ([`LOG_BURST`], then [`LOG_PER_SEC`] a second); lines over it are dropped and a last
    ///   line says how many (waiting at most 1 / [`LOG_PER_SEC`] s for the rate to allow it).
    ///   Every line is sent before this returns, so none follows the reply. The capped tails
    ///   are in the outcome either way. A spec that brings its own line sink keeps it and
    ///   nothing is sent.
    ///
    /// A run ended by the instruction's deadline is [`RunError::Deadline`], one ended by its
    /// cancellation [`RunError::Cancelled`]; both become the matching `ERROR`
    /// (`ErrorPayload::from`). Environment values and stdin are never logged.
    pub async fn run(&self, mut spec: Spec, output: Secrecy) -> Result<Outcome, RunError> {
        let budget = self.remaining().saturating_sub(REPLY_MARGIN);
        let own_timeout = spec.timeout;
        if spec.timeout.saturating_add(spec.grace) > budget {
            spec.grace = spec.grace.min(budget / 4);
            spec.timeout = spec.timeout.min(budget - spec.grace);
        }
        let deadline_first = spec.timeout < own_timeout;
        let token = self.cancel.child_token();
        let own = std::mem::replace(&mut spec.cancel, token.clone());
        let (tx, mut rx) = mpsc::channel(LOG_BURST as usize);
        if output == Secrecy::Public && spec.lines.is_none() {
            let rate = LineRate {
                per_sec: LOG_PER_SEC,
                burst: LOG_BURST,
            };
            spec.lines = Some(LineSink::new(tx, rate));
        } else {
            drop(tx);
        }
        let run = self.host.run(spec);
        tokio::pin!(run);
        let mut own_cancelled = false;
        let out = loop {
            tokio::select! {
                biased;
                Some(line) = rx.recv() => self.log_line(line),
                () = own.cancelled(), if !own_cancelled => {
                    own_cancelled = true;
                    token.cancel();
                }
                out = &mut run => break out?,
            }
        };
        // The runner has joined its readers: what they streamed is in the channel.
        while let Ok(line) = rx.try_recv() {
            self.log_line(line);
        }
        // Lines over the rate are counted with the context's own drops and said in one last
        // line (within the rate: it waits for the next token).
        self.log.add_dropped(out.lines_dropped);
        self.log.flush().await;
        match out.ended {
            Ended::TimedOut if deadline_first => Err(RunError::Deadline),
            Ended::Cancelled if self.cancel.is_cancelled() => Err(RunError::Cancelled),
            _ => Ok(out),
        }
    }

    fn log_line(&self, line: Line) {
        let level = match line.stream {
            Stream::Stdout => LogLevel::Info,
            Stream::Stderr => LogLevel::Warn,
        };
        self.log(level, &line.text);
    }

    /// Send a `LOG` line with the instruction's tag to the control plane and to the local log.
    /// Capped at [`control::MAX_LOG_LINE`] bytes; beyond [`LOG_BURST`] lines at once and
    /// [`LOG_PER_SEC`] a second the rest are dropped, and how many is said in the next line
    /// sent. Best effort (dropped when the reply channel is full). **Never pass a secret.**
    pub fn log(&self, level: LogLevel, message: &str) {
        self.log.log(level, message);
    }
}

/// The rate-limited `LOG` sink of one instruction (shared by the clones of its [`Ctx`]).
#[derive(Debug, Clone)]
struct LogSink {
    tag: Tag,
    tx: Option<mpsc::Sender<Envelope>>,
    bucket: Arc<Mutex<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    dropped: u64,
}

impl LogSink {
    fn new(tag: Tag, tx: Option<mpsc::Sender<Envelope>>) -> Self {
        LogSink {
            tag,
            tx,
            bucket: Arc::new(Mutex::new(Bucket {
                tokens: f64::from(LOG_BURST),
                at: Instant::now(),
                dropped: 0,
            })),
        }
    }

    fn log(&self, level: LogLevel, message: &str) {
        let Ok(dropped) = self.take(true) else {
            return;
        };
        if dropped > 0 {
            self.send(
                level,
                format!("({dropped} log line(s) dropped: rate limit) {message}"),
            );
        } else {
            self.send(level, message.to_string());
        }
    }

    /// Take a token: `Ok(lines dropped since the last line sent)`, or `Err(time until the
    /// next token)` (the line counted as dropped when `count`).
    fn take(&self, count: bool) -> Result<u64, Duration> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * f64::from(LOG_PER_SEC);
        b.tokens = (b.tokens + refill).min(f64::from(LOG_BURST));
        b.at = now;
        if b.tokens < 1.0 {
            b.dropped += u64::from(count);
            return Err(Duration::from_secs_f64(
                (1.0 - b.tokens) / f64::from(LOG_PER_SEC),
            ));
        }
        b.tokens -= 1.0;
        Ok(std::mem::take(&mut b.dropped))
    }

    /// Count `n` lines dropped elsewhere (over the runner's rate).
    fn add_dropped(&self, n: u64) {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        b.dropped = b.dropped.saturating_add(n);
    }

    /// Say how many lines were dropped since the last one sent, if any: waits (at most
    /// 1 / [`LOG_PER_SEC`] s) for the rate to allow one more line.
    async fn flush(&self) {
        loop {
            if self
                .bucket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dropped
                == 0
            {
                return;
            }
            match self.take(false) {
                Ok(0) => return,
                Ok(n) => {
                    return self.send(
                        LogLevel::Warn,
                        format!("({n} log line(s) dropped: rate limit)"),
                    );
                }
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    fn send(&self, level: LogLevel, mut message: String) {
        if message.len() > control::MAX_LOG_LINE {
            let mut cut = control::MAX_LOG_LINE - 3;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        // Escaped in the local log: a program's output may hold escapes that repaint a terminal.
        tracing::info!(
            log_level = ?level,
            "{}",
            PeerText::capped(&message, control::MAX_LOG_LINE)
        );
        if let Some(tx) = &self.tx {
            let env =
                Envelope::with_type(control::types::LOG, self.tag, &LogLine { level, message });
            let _ = tx.try_send(env);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn log_lines_are_rate_limited_and_the_drop_is_reported() {
        let (tx, mut rx) = mpsc::channel(1000);
        let ctx = Ctx::new(
            Tag::random(),
            Instant::now() + Duration::from_secs(5),
            Arc::new(Host::default()),
            Some(tx),
        );
        for i in 0..100 {
            ctx.log(LogLevel::Info, &format!("line {i}"));
        }
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, LOG_BURST as usize);
        tokio::time::advance(Duration::from_secs(1)).await;
        ctx.log(LogLevel::Info, "after");
        let env = rx.try_recv().unwrap();
        let line: LogLine = env.payload().unwrap();
        assert!(
            line.message.contains("80 log line(s) dropped"),
            "{}",
            line.message
        );
        assert!(line.message.ends_with("after"));
    }

    #[test]
    fn state_dir_is_created_private_on_first_use() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("x").join("state");
        let ctx = Ctx::detached(Tag::random(), Duration::from_secs(1)).with_state_dir(dir.clone());
        assert!(!dir.exists());
        ctx.state_dir().unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let none = Ctx::detached(Tag::random(), Duration::from_secs(1));
        assert_eq!(none.state_dir().unwrap_err().code, ErrorCode::Internal);
    }
}
