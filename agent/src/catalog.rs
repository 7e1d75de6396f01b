//! The executor catalog: instruction type name → entry (executor, default and maximum deadline).
//!
//! The dispatcher knows instructions only through this table. Adding an executor is adding an
//! entry here (see [`Catalog::standard`]); nothing else changes. The one exception is `CANCEL`,
//! which the dispatcher handles itself ([`DISPATCHER_TYPES`]): it has no entry, but HELLO still
//! lists it. Executors are plain async
//! functions over typed payloads ([`runos_protocol::instructions::Instruction`]); they know
//! nothing of TLS, sessions or queues.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runos_protocol::control::{self, LogLevel, LogLine};
use runos_protocol::instructions::{self, Instruction};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload, PayloadError, Tag};
use tokio::sync::mpsc;

/// Instruction types the dispatcher handles itself, without an executor, queue or slot. Every
/// catalog lists them among the types this agent supports ([`Catalog::types`]).
pub const DISPATCHER_TYPES: &[&str] = &[instructions::types::CANCEL];

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What an executor produces: the final success reply, or an error reply.
pub type ExecResult = Result<Envelope, ErrorPayload>;

/// A type-erased executor: takes the instruction's envelope, decodes it itself.
pub type ExecFn = Arc<dyn Fn(ExecCtx, Envelope) -> BoxFuture<ExecResult> + Send + Sync>;

/// What an executor may use besides its payload.
#[derive(Debug, Clone)]
pub struct ExecCtx {
    /// The instruction's tag.
    pub tag: Tag,
    /// When the agent process started (for uptime).
    pub agent_started: Instant,
    logs: Option<mpsc::Sender<Envelope>>,
}

impl ExecCtx {
    /// A context for the instruction `tag`; `LOG` lines go to `logs` (best effort).
    pub fn new(tag: Tag, agent_started: Instant, logs: Option<mpsc::Sender<Envelope>>) -> Self {
        ExecCtx {
            tag,
            agent_started,
            logs,
        }
    }

    /// Send a `LOG` line with the instruction's tag to the control plane (best effort: dropped
    /// when the reply channel is full) and to the local log. Never pass secrets.
    pub fn log(&self, level: LogLevel, message: &str) {
        let mut message = message.to_string();
        if message.len() > control::MAX_LOG_LINE {
            let mut cut = control::MAX_LOG_LINE - 3;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        tracing::info!(log_level = ?level, "{message}");
        if let Some(tx) = &self.logs {
            let env =
                Envelope::with_type(control::types::LOG, self.tag, &LogLine { level, message });
            let _ = tx.try_send(env);
        }
    }
}

/// One catalog entry.
#[derive(Clone)]
pub struct Entry {
    /// The instruction type.
    pub kind: &'static str,
    /// Deadline when the envelope gives no `timeoutMs`.
    pub default_timeout: Duration,
    /// Largest deadline accepted (a larger `timeoutMs` is lowered to this).
    pub max_timeout: Duration,
    exec: ExecFn,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("kind", &self.kind)
            .field("default_timeout", &self.default_timeout)
            .field("max_timeout", &self.max_timeout)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// The deadline for an instruction whose envelope asks for `timeout_ms`.
    pub fn deadline(&self, timeout_ms: Option<u64>) -> Duration {
        match timeout_ms {
            Some(ms) => Duration::from_millis(ms).min(self.max_timeout),
            None => self.default_timeout,
        }
    }

    /// Start the executor on `env`.
    pub fn run(&self, ctx: ExecCtx, env: Envelope) -> BoxFuture<ExecResult> {
        (self.exec)(ctx, env)
    }
}

/// The table of executors this agent has.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: BTreeMap<&'static str, Entry>,
}

/// A `bad_payload` error that never echoes the payload (serde messages can quote values).
pub fn bad_payload(kind: &str, e: &PayloadError) -> ErrorPayload {
    let what = match e {
        PayloadError::Base64(_) => "jsonB64 is not valid standard base64".to_string(),
        PayloadError::Utf8 => "jsonB64 does not decode to UTF-8 text".to_string(),
        PayloadError::Json(j) => {
            let class = match j.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    "is not valid JSON"
                }
                _ => "does not match the schema",
            };
            format!(
                "the payload {class} (line {}, column {})",
                j.line(),
                j.column()
            )
        }
    };
    ErrorPayload::new(ErrorCode::BadPayload, format!("{kind}: {what}"))
}

impl Catalog {
    /// A catalog with no executors.
    pub fn empty() -> Self {
        Catalog::default()
    }

    /// The executors of this agent version.
    pub fn standard() -> Self {
        let mut c = Catalog::empty();
        c.register::<instructions::GetNodeStatus, _, _>(
            Duration::from_secs(10),
            Duration::from_secs(60),
            crate::exec::node_status,
        );
        // RUN_COMMAND enforces its own payload timeout (and reports `timedOut`); the dispatcher
        // deadline is a backstop above the largest payload timeout unless `timeoutMs` is given.
        let backstop = Duration::from_secs(instructions::run_command_limits::MAX_TIMEOUT_SECS + 60);
        c.register::<instructions::RunCommand, _, _>(backstop, backstop, crate::exec::run_command);
        c
    }

    /// [`Catalog::standard`] plus `UPDATE_AGENT`, which reads the configuration at
    /// `config_path` when it runs (the daemon's catalog).
    pub fn with_updates(config_path: std::path::PathBuf) -> Self {
        let mut c = Catalog::standard();
        c.register::<instructions::UpdateAgent, _, _>(
            Duration::from_secs(900),
            Duration::from_secs(3600),
            move |ctx, p| crate::update::daemon_side::update_agent(config_path.clone(), ctx, p),
        );
        c
    }

    /// Add a typed executor for `I`.
    pub fn register<I, F, Fut>(&mut self, default_timeout: Duration, max_timeout: Duration, f: F)
    where
        I: Instruction + Send + 'static,
        F: Fn(ExecCtx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<I::Reply, ErrorPayload>> + Send + 'static,
    {
        let f = Arc::new(f);
        let exec: ExecFn = Arc::new(move |ctx: ExecCtx, env: Envelope| {
            let f = f.clone();
            Box::pin(async move {
                let payload: I = env.payload().map_err(|e| bad_payload(I::TYPE, &e))?;
                let tag = ctx.tag;
                let reply = f(ctx, payload).await?;
                Ok(Envelope::with_type(I::REPLY_TYPE, tag, &reply))
            })
        });
        self.register_raw(I::TYPE, default_timeout, max_timeout, exec);
    }

    /// Add an untyped executor (tests, or types whose payload needs custom decoding).
    pub fn register_raw(
        &mut self,
        kind: &'static str,
        default_timeout: Duration,
        max_timeout: Duration,
        exec: ExecFn,
    ) {
        self.entries.insert(
            kind,
            Entry {
                kind,
                default_timeout,
                max_timeout: max_timeout.max(default_timeout),
                exec,
            },
        );
    }

    /// The entry for `kind`.
    pub fn get(&self, kind: &str) -> Option<&Entry> {
        self.entries.get(kind)
    }

    /// The instruction types this agent supports (for HELLO): those with an executor and those
    /// the dispatcher handles itself ([`DISPATCHER_TYPES`]), sorted.
    pub fn types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .entries
            .keys()
            .chain(DISPATCHER_TYPES)
            .map(|k| k.to_string())
            .collect();
        types.sort();
        types.dedup();
        types
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_catalog_covers_only_catalog_types() {
        let c = Catalog::standard();
        for t in c.types() {
            assert!(instructions::is_instruction_type(&t), "{t}");
        }
        assert!(c.get("RUN_COMMAND").is_some());
        assert!(c.get("GET_NODE_STATUS").is_some());
    }

    #[test]
    fn cancel_is_listed_without_an_executor() {
        for c in [Catalog::standard(), Catalog::empty()] {
            assert!(c.types().contains(&"CANCEL".to_string()));
            assert!(c.get("CANCEL").is_none());
        }
        let t = Catalog::standard().types();
        let mut sorted = t.clone();
        sorted.sort();
        assert_eq!(t, sorted);
    }

    #[test]
    fn deadlines_are_clamped() {
        let c = Catalog::standard();
        let e = c.get("GET_NODE_STATUS").unwrap();
        assert_eq!(e.deadline(None), Duration::from_secs(10));
        assert_eq!(e.deadline(Some(500)), Duration::from_millis(500));
        assert_eq!(e.deadline(Some(10_000_000)), Duration::from_secs(60));
    }

    #[test]
    fn bad_payload_never_echoes_values() {
        let env = Envelope::from_json_text(
            runos_protocol::MessageType::new("RUN_COMMAND").unwrap(),
            Tag::random(),
            r#"{"argv": "hunter2-secret"}"#,
        );
        let e = env.payload::<instructions::RunCommand>().unwrap_err();
        let p = bad_payload("RUN_COMMAND", &e);
        assert_eq!(p.code, ErrorCode::BadPayload);
        assert!(!p.message.contains("hunter2"), "{}", p.message);
    }
}
