//! The executor catalog: instruction type name → entry (how to decode and validate the payload,
//! the executor, the maximum deadline).
//!
//! Payloads are decoded and validated by the protocol crate's rules only
//! ([`Instruction::from_envelope`]), when the dispatcher receives the instruction and before it
//! is accepted; default deadlines come from the protocol's catalog
//! ([`Instruction::default_deadline_secs`]). The dispatcher knows instructions only through
//! this table. Adding an executor is adding an
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
use runos_protocol::{Envelope, ErrorPayload, Tag};
use tokio::sync::mpsc;

/// Instruction types the dispatcher handles itself, without an executor, queue or slot. Every
/// catalog lists them among the types this agent supports ([`Catalog::types`]).
pub const DISPATCHER_TYPES: &[&str] = &[instructions::types::CANCEL];

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What an executor produces: the final success reply, or an error reply.
pub type ExecResult = Result<Envelope, ErrorPayload>;

/// A type-erased executor: takes the instruction's envelope, decodes it itself. Only for
/// [`Catalog::register_raw`] (tests); typed executors get their payload decoded and validated
/// by the protocol crate before anything is accepted ([`Catalog::register`]).
pub type ExecFn = Arc<dyn Fn(ExecCtx, Envelope) -> BoxFuture<ExecResult> + Send + Sync>;

/// An instruction whose payload passed the protocol's checks, ready to run once.
pub type Job = Box<dyn FnOnce(ExecCtx) -> BoxFuture<ExecResult> + Send + Sync>;

/// Decode and validate an envelope into a [`Prepared`] instruction, or the `bad_payload` error.
type PrepareFn = Arc<dyn Fn(&Envelope) -> Result<Prepared, ErrorPayload> + Send + Sync>;

/// An instruction decoded and validated, with the deadline it gets when the envelope has no
/// `timeoutMs`.
pub struct Prepared {
    /// The deadline without `timeoutMs` (protocol.md §7.3: the catalog's default for the type,
    /// or what the payload decides, see [`Instruction::default_deadline_secs`]).
    pub default_deadline: Duration,
    /// The executor, bound to the decoded payload.
    pub job: Job,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("default_deadline", &self.default_deadline)
            .finish_non_exhaustive()
    }
}

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
    /// Largest deadline accepted (a larger `timeoutMs`, or a larger payload-derived default,
    /// is lowered to this).
    pub max_timeout: Duration,
    prepare: PrepareFn,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("kind", &self.kind)
            .field("max_timeout", &self.max_timeout)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// Decode and validate `env`'s payload (the protocol crate's rules, protocol.md §7.2): the
    /// instruction ready to run, or the `bad_payload` error to answer with. Nothing runs here.
    pub fn prepare(&self, env: &Envelope) -> Result<Prepared, ErrorPayload> {
        (self.prepare)(env)
    }

    /// The deadline of an instruction whose envelope asks for `timeout_ms`, and whose default
    /// (without `timeoutMs`) is `default`; never more than [`Entry::max_timeout`].
    pub fn deadline(&self, timeout_ms: Option<u64>, default: Duration) -> Duration {
        timeout_ms
            .map_or(default, Duration::from_millis)
            .min(self.max_timeout)
    }
}

/// The table of executors this agent has.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: BTreeMap<&'static str, Entry>,
}

/// The catalog's default deadline of `kind` (protocol.md §10), for [`Catalog::register_raw`].
fn catalog_default(kind: &str) -> Duration {
    Duration::from_secs(instructions::catalog_entry(kind).map_or(60, |e| e.default_timeout_secs))
}

impl Catalog {
    /// A catalog with no executors.
    pub fn empty() -> Self {
        Catalog::default()
    }

    /// The executors of this agent version. Default deadlines come from the protocol's
    /// catalog; the maximum (for `timeoutMs`) is this agent's.
    pub fn standard() -> Self {
        let mut c = Catalog::empty();
        c.register::<instructions::GetNodeStatus, _, _>(
            Duration::from_secs(60),
            crate::exec::node_status,
        );
        // RUN_COMMAND enforces its own payload timeout (and reports `timedOut`); its deadline
        // is that timeout plus a grace period, at most the catalog's value for the largest one.
        c.register::<instructions::RunCommand, _, _>(
            catalog_default(instructions::types::RUN_COMMAND),
            crate::exec::run_command,
        );
        c
    }

    /// [`Catalog::standard`] plus `UPDATE_AGENT`, which reads the configuration at
    /// `config_path` when it runs (the daemon's catalog).
    pub fn with_updates(config_path: std::path::PathBuf) -> Self {
        let mut c = Catalog::standard();
        c.register::<instructions::UpdateAgent, _, _>(Duration::from_secs(3600), move |ctx, p| {
            crate::update::daemon_side::update_agent(config_path.clone(), ctx, p)
        });
        c
    }

    /// Add a typed executor for `I`. Its payload is decoded and validated by the protocol crate
    /// ([`Instruction::from_envelope`]) before the instruction is accepted, so an executor only
    /// ever sees a payload the contract allows.
    pub fn register<I, F, Fut>(&mut self, max_timeout: Duration, f: F)
    where
        I: Instruction + Send + Sync + 'static,
        F: Fn(ExecCtx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<I::Reply, ErrorPayload>> + Send + 'static,
    {
        let f = Arc::new(f);
        let prepare: PrepareFn = Arc::new(move |env: &Envelope| {
            let payload = I::from_envelope(env).map_err(|e| e.to_error_payload())?;
            let default_deadline = Duration::from_secs(payload.default_deadline_secs());
            let f = f.clone();
            let job: Job = Box::new(move |ctx: ExecCtx| {
                Box::pin(async move {
                    let tag = ctx.tag;
                    let reply = f(ctx, payload).await?;
                    Ok(Envelope::with_type(I::REPLY_TYPE, tag, &reply))
                })
            });
            Ok(Prepared {
                default_deadline,
                job,
            })
        });
        self.insert(I::TYPE, max_timeout, prepare);
    }

    /// Add an untyped executor that decodes its envelope itself (tests), with the given
    /// default deadline.
    pub fn register_raw(
        &mut self,
        kind: &'static str,
        default_timeout: Duration,
        max_timeout: Duration,
        exec: ExecFn,
    ) {
        let prepare: PrepareFn = Arc::new(move |env: &Envelope| {
            let exec = exec.clone();
            let env = env.clone();
            Ok(Prepared {
                default_deadline: default_timeout,
                job: Box::new(move |ctx| exec(ctx, env)),
            })
        });
        self.insert(kind, max_timeout.max(default_timeout), prepare);
    }

    fn insert(&mut self, kind: &'static str, max_timeout: Duration, prepare: PrepareFn) {
        self.entries.insert(
            kind,
            Entry {
                kind,
                max_timeout,
                prepare,
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
    use runos_protocol::{ErrorCode, MessageType};

    fn env(kind: &str, json: &str) -> Envelope {
        Envelope::from_json_text(MessageType::new(kind).unwrap(), Tag::random(), json)
    }

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
    fn deadlines_follow_the_protocol_catalog_and_are_clamped() {
        let c = Catalog::standard();
        let e = c.get("GET_NODE_STATUS").unwrap();
        let d = e
            .prepare(&env("GET_NODE_STATUS", "{}"))
            .unwrap()
            .default_deadline;
        assert_eq!(d, Duration::from_secs(30));
        assert_eq!(e.deadline(None, d), Duration::from_secs(30));
        assert_eq!(e.deadline(Some(500), d), Duration::from_millis(500));
        assert_eq!(e.deadline(Some(10_000_000), d), Duration::from_secs(60));
        let e = c.get("RUN_COMMAND").unwrap();
        let run = |json| {
            e.prepare(&env("RUN_COMMAND", json))
                .unwrap()
                .default_deadline
        };
        assert_eq!(run(r#"{"argv":["true"]}"#), Duration::from_secs(330));
        assert_eq!(
            run(r#"{"argv":["true"],"timeoutSecs":5}"#),
            Duration::from_secs(35)
        );
        let longest = run(r#"{"argv":["true"],"timeoutSecs":86400}"#);
        assert_eq!(e.deadline(None, longest), Duration::from_secs(86_430));
        assert_eq!(
            e.deadline(Some(u64::MAX), longest),
            Duration::from_secs(86_430)
        );
    }

    #[test]
    fn every_registered_type_is_validated_by_the_protocol_before_it_runs() {
        let c = Catalog::with_updates("/nonexistent/runos.toml".into());
        for (kind, json, field) in [
            (
                "RUN_COMMAND",
                r#"{"argv":["../../../../bin/sh"]}"#,
                "argv[0]",
            ),
            (
                "RUN_COMMAND",
                r#"{"argv":["true"],"env":{"1X":"v"}}"#,
                "env",
            ),
            ("UPDATE_AGENT", r#"{"version":"../../x"}"#, "version"),
        ] {
            let e = c.get(kind).unwrap().prepare(&env(kind, json)).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadPayload);
            assert!(e.message.contains(&format!("`{field}`")), "{}", e.message);
            assert!(!e.message.contains(".."), "{}", e.message);
        }
        for (kind, json) in [
            ("RUN_COMMAND", r#"[["/bin/true"]]"#),
            ("GET_NODE_STATUS", "[]"),
            ("UPDATE_AGENT", r#"["v1.2.3"]"#),
        ] {
            let e = c.get(kind).unwrap().prepare(&env(kind, json)).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadPayload, "{kind}");
        }
    }

    #[test]
    fn bad_payload_never_echoes_values() {
        let c = Catalog::standard();
        let e = c
            .get("RUN_COMMAND")
            .unwrap()
            .prepare(&env("RUN_COMMAND", r#"{"argv": "hunter2-secret"}"#))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadPayload);
        assert!(!e.message.contains("hunter2"), "{}", e.message);
    }
}
