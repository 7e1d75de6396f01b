//! The registry: instruction type → how to decode and validate it, its executor, its lane and
//! its maximum deadline.
//!
//! The registry always decodes **and validates** a payload with the protocol crate
//! ([`Instruction::from_envelope`]) before the instruction is accepted; the default deadline, the
//! safe-to-re-run flag (and the secret-reply flag) come from the protocol's one table
//! ([`instructions::CATALOG`]). What the agent adds per type is only a maximum deadline and a
//! [`Lane`] ([`Settings`]). Every catalog type has an executor, is handled by the dispatcher
//! itself ([`DISPATCHER_TYPES`]), or is marked "unsupported here" ([`Registry::unsupported`]):
//! [`Registry::unaccounted`] lists the ones that are none of these (a test keeps it empty).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use runos_protocol::instructions::{self, CatalogEntry, Instruction};
use runos_protocol::{Envelope, ErrorPayload, Tag};
use tokio::sync::mpsc;

use crate::context::Ctx;
use crate::contract::{AfterAck, Done, StepCtx, StepFn};
use crate::handle::{BoxFuture, Host};
use crate::lanes::Lane;

/// Instruction types the dispatcher handles itself, without an executor, queue or slot
/// (`CANCEL`). Every registry lists them among the types this agent supports.
pub const DISPATCHER_TYPES: &[&str] = &[instructions::types::CANCEL];

/// What an executor produced: the reply envelope and maybe an after-ACK step.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The success reply.
    pub envelope: Envelope,
    /// What to run once it is acknowledged.
    pub after_ack: Option<AfterAck>,
}

/// What a job yields: the reply, or the error to answer with.
pub type ExecResult = Result<Reply, ErrorPayload>;

/// A type-erased executor that decodes its envelope itself (tests only, see
/// [`Registry::register_raw`]).
pub type ExecFn =
    Arc<dyn Fn(Ctx, Envelope) -> BoxFuture<Result<Envelope, ErrorPayload>> + Send + Sync>;

/// An instruction whose payload passed the protocol's checks, ready to run once.
pub type Job = Box<dyn FnOnce(Ctx) -> BoxFuture<ExecResult> + Send + Sync>;

type PrepareFn = Arc<dyn Fn(&Envelope) -> Result<Prepared, ErrorPayload> + Send + Sync>;

/// An instruction decoded and validated.
pub struct Prepared {
    /// Its deadline when the envelope has no `timeoutMs` (protocol.md §7.3: the catalog's
    /// default, or what the payload decides, see [`Instruction::default_deadline_secs`]).
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

/// What the agent decides per type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Largest deadline accepted (a larger `timeoutMs` or payload-derived default is lowered).
    pub max_deadline: Duration,
    /// Where it runs.
    pub lane: Lane,
}

impl Settings {
    /// `max_deadline` in `lane`.
    pub fn new(max_deadline: Duration, lane: Lane) -> Self {
        Settings { max_deadline, lane }
    }
}

/// One registered type.
#[derive(Clone)]
pub struct Entry {
    /// The instruction type.
    pub kind: &'static str,
    /// The agent's settings for it.
    pub settings: Settings,
    /// Its row of the protocol's catalog (`None` only for test types outside the catalog).
    pub catalog: Option<&'static CatalogEntry>,
    prepare: PrepareFn,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("kind", &self.kind)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// Decode and validate `env`'s payload (the protocol crate's rules, §7.2): the instruction
    /// ready to run, or the `bad_payload` error to answer with. Nothing runs here.
    pub fn prepare(&self, env: &Envelope) -> Result<Prepared, ErrorPayload> {
        (self.prepare)(env)
    }

    /// The lane it runs in.
    pub fn lane(&self) -> Lane {
        self.settings.lane
    }

    /// The deadline for an envelope asking `timeout_ms`, with default `default`; never more
    /// than the maximum.
    pub fn deadline(&self, timeout_ms: Option<u64>, default: Duration) -> Duration {
        timeout_ms
            .map_or(default, Duration::from_millis)
            .min(self.settings.max_deadline)
    }

    /// Whether running it again leaves the node as running it once would (the protocol's
    /// table).
    pub fn safe_to_rerun(&self) -> bool {
        self.catalog.is_some_and(|c| c.safe_to_rerun)
    }

    /// Whether its reply is secret (dropped from the journal once acknowledged; the protocol's
    /// table).
    pub fn secret_reply(&self) -> bool {
        self.catalog.is_some_and(|c| c.secret_reply)
    }
}

/// The executors of this agent.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<&'static str, Entry>,
    unsupported: BTreeSet<&'static str>,
    steps: BTreeMap<String, StepFn>,
    configs: BTreeMap<&'static str, Arc<serde_json::Value>>,
    state_root: Option<PathBuf>,
    host: Arc<Host>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("entries", &self.entries)
            .field("unsupported", &self.unsupported)
            .field("steps", &self.steps.keys().collect::<Vec<_>>())
            .field("state_root", &self.state_root)
            .finish_non_exhaustive()
    }
}

/// The catalog's default deadline of `kind`.
fn catalog_default(kind: &str) -> Duration {
    Duration::from_secs(instructions::catalog_entry(kind).map_or(60, |e| e.default_timeout_secs))
}

impl Registry {
    /// A registry with no executors, a default host and no state directory.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Use `host` as the host handle of every executor.
    pub fn set_host(&mut self, host: Host) {
        self.host = Arc::new(host);
    }

    /// The host handle.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// Executors' state directories go under `root` (`<root>/<type in lower case>`), and with
    /// them the pending after-ACK steps. Without a root, steps are kept in memory only.
    pub fn set_state_root(&mut self, root: PathBuf) {
        self.state_root = Some(root);
    }

    /// The state directory of `kind`'s executor.
    pub fn state_dir(&self, kind: &str) -> Option<PathBuf> {
        self.state_root
            .as_ref()
            .map(|r| r.join(kind.to_ascii_lowercase()))
    }

    /// Every executor state directory (for the pending after-ACK steps at start).
    pub fn state_dirs(&self) -> Vec<(&'static str, PathBuf)> {
        self.entries
            .keys()
            .filter_map(|k| self.state_dir(k).map(|d| (*k, d)))
            .collect()
    }

    /// Give `kind`'s executor its configuration section.
    pub fn set_config(&mut self, kind: &'static str, config: serde_json::Value) {
        self.configs.insert(kind, Arc::new(config));
    }

    /// Add a typed executor for `I` that answers a plain reply.
    pub fn register<I, F, Fut>(&mut self, settings: Settings, f: F)
    where
        I: Instruction + Send + Sync + 'static,
        I::Reply: Send,
        F: Fn(Ctx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<I::Reply, ErrorPayload>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.register_done::<I, _, _>(settings, move |ctx, i| {
            let fut = f(ctx, i);
            async move { fut.await.map(Done::reply) }
        });
    }

    /// Add a typed executor for `I` that may ask for an after-ACK step ([`Done::then`]). Its
    /// payload is decoded and validated by the protocol crate before the instruction is
    /// accepted, so it only ever sees a payload the contract allows.
    pub fn register_done<I, F, Fut>(&mut self, settings: Settings, f: F)
    where
        I: Instruction + Send + Sync + 'static,
        I::Reply: Send,
        F: Fn(Ctx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Done<I::Reply>, ErrorPayload>> + Send + 'static,
    {
        let f = Arc::new(f);
        let prepare: PrepareFn = Arc::new(move |env: &Envelope| {
            let payload = I::from_envelope(env).map_err(|e| e.to_error_payload())?;
            let default_deadline = Duration::from_secs(payload.default_deadline_secs());
            let f = f.clone();
            let job: Job = Box::new(move |ctx: Ctx| {
                Box::pin(async move {
                    let tag = ctx.tag;
                    let done = f(ctx, payload).await?;
                    Ok(Reply {
                        envelope: I::reply_envelope(tag, &done.reply),
                        after_ack: done.after_ack,
                    })
                })
            });
            Ok(Prepared {
                default_deadline,
                job,
            })
        });
        self.insert(I::TYPE, settings, prepare);
    }

    /// Add an untyped executor that decodes its envelope itself (tests), in the pool lane, with
    /// the given default deadline. Use [`Registry::set_lane`] for another lane.
    pub fn register_raw(
        &mut self,
        kind: &'static str,
        default_deadline: Duration,
        max_deadline: Duration,
        exec: ExecFn,
    ) {
        let prepare: PrepareFn = Arc::new(move |env: &Envelope| {
            let exec = exec.clone();
            let env = env.clone();
            Ok(Prepared {
                default_deadline,
                job: Box::new(move |ctx| {
                    Box::pin(async move {
                        exec(ctx, env).await.map(|envelope| Reply {
                            envelope,
                            after_ack: None,
                        })
                    })
                }),
            })
        });
        let settings = Settings::new(max_deadline.max(default_deadline), Lane::Pool);
        self.insert(kind, settings, prepare);
    }

    /// Add an untyped executor like [`Registry::register_raw`] whose job yields a full
    /// [`Reply`] (tests of after-ACK steps).
    pub fn register_raw_reply(
        &mut self,
        kind: &'static str,
        settings: Settings,
        exec: Arc<dyn Fn(Ctx, Envelope) -> BoxFuture<ExecResult> + Send + Sync>,
    ) {
        let prepare: PrepareFn = Arc::new(move |env: &Envelope| {
            let exec = exec.clone();
            let env = env.clone();
            Ok(Prepared {
                default_deadline: catalog_default(env.kind.as_str()),
                job: Box::new(move |ctx| exec(ctx, env)),
            })
        });
        self.insert(kind, settings, prepare);
    }

    /// Move `kind` (registered) to `lane`.
    pub fn set_lane(&mut self, kind: &str, lane: Lane) {
        if let Some(e) = self.entries.get_mut(kind) {
            e.settings.lane = lane;
        }
    }

    /// Mark catalog types this agent does not execute: they are answered `unsupported`. A type
    /// registered later is taken off the list.
    pub fn unsupported(&mut self, kinds: &[&'static str]) {
        for k in kinds {
            if !self.entries.contains_key(k) {
                self.unsupported.insert(k);
            }
        }
    }

    /// Register the after-ACK step `name`.
    pub fn register_step<F, Fut>(&mut self, name: &str, f: F)
    where
        F: Fn(StepCtx, serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.steps
            .insert(name.to_string(), Arc::new(move |c, p| Box::pin(f(c, p))));
    }

    /// The after-ACK step `name`.
    pub fn step(&self, name: &str) -> Option<StepFn> {
        self.steps.get(name).cloned()
    }

    fn insert(&mut self, kind: &'static str, settings: Settings, prepare: PrepareFn) {
        self.unsupported.remove(kind);
        self.entries.insert(
            kind,
            Entry {
                kind,
                settings,
                catalog: instructions::catalog_entry(kind),
                prepare,
            },
        );
    }

    /// The entry for `kind`.
    pub fn get(&self, kind: &str) -> Option<&Entry> {
        self.entries.get(kind)
    }

    /// The context of the instruction `tag` of type `kind`: its deadline, state directory,
    /// configuration and the host handle; `LOG` lines go to `logs`.
    pub fn context(
        &self,
        kind: &str,
        tag: Tag,
        deadline: tokio::time::Instant,
        logs: Option<mpsc::Sender<Envelope>>,
    ) -> Ctx {
        let mut ctx = Ctx::new(tag, deadline, self.host.clone(), logs);
        if let Some(dir) = self.state_dir(kind) {
            ctx = ctx.with_state_dir(dir);
        }
        if let Some(c) = self.configs.get(kind) {
            ctx = ctx.with_config(c.clone());
        }
        ctx
    }

    /// The instruction types this agent supports (for HELLO): those with an executor and those
    /// the dispatcher handles itself, sorted.
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

    /// Catalog types with neither an executor, nor the dispatcher's own handling, nor an
    /// explicit "unsupported here". Empty for a complete registry.
    pub fn unaccounted(&self) -> Vec<&'static str> {
        instructions::ALL_INSTRUCTION_TYPES
            .iter()
            .copied()
            .filter(|k| {
                !self.entries.contains_key(k)
                    && !self.unsupported.contains(k)
                    && !DISPATCHER_TYPES.contains(k)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runos_protocol::instructions::{
        GetNodeStatus, NodeStatus, UpdateAgent, UpdateAgentResponse,
    };
    use runos_protocol::{ErrorCode, MessageType};

    fn env(kind: &str, json: &str) -> Envelope {
        Envelope::from_json_text(MessageType::new(kind).unwrap(), Tag::random(), json)
    }

    #[tokio::test]
    async fn a_registered_executor_gets_a_validated_payload_a_context_and_may_ask_for_a_step() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = Registry::new();
        r.set_state_root(tmp.path().to_path_buf());
        r.set_config(
            instructions::types::UPDATE_AGENT,
            serde_json::json!({"channel": "stable"}),
        );
        r.register_done::<UpdateAgent, _, _>(
            Settings::new(Duration::from_secs(10), Lane::Pool),
            |ctx, p: UpdateAgent| async move {
                assert_eq!(ctx.config()["channel"], "stable");
                assert!(ctx.state_dir().unwrap().ends_with("update_agent"));
                Ok(Done::then(
                    UpdateAgentResponse {
                        previous_version: "0.1.0".into(),
                        new_version: p.version,
                        restart: true,
                    },
                    AfterAck {
                        step: "restart".into(),
                        params: serde_json::json!({}),
                    },
                ))
            },
        );
        let e = r.get("UPDATE_AGENT").unwrap();
        assert!(e.safe_to_rerun());
        assert!(!e.secret_reply());
        let bad = e
            .prepare(&env("UPDATE_AGENT", r#"{"version":"x"}"#))
            .unwrap_err();
        assert_eq!(bad.code, ErrorCode::BadPayload);
        assert!(bad.message.contains("`version`"), "{}", bad.message);
        let instr = env("UPDATE_AGENT", r#"{"version":"1.2.3"}"#);
        let p = e.prepare(&instr).unwrap();
        assert_eq!(p.default_deadline, Duration::from_secs(900));
        let ctx = r.context(
            "UPDATE_AGENT",
            instr.tag,
            tokio::time::Instant::now() + Duration::from_secs(1),
            None,
        );
        let reply = (p.job)(ctx).await.unwrap();
        assert!(reply.envelope.is("UPDATE_AGENT_RESPONSE"));
        assert_eq!(reply.envelope.tag, instr.tag);
        assert_eq!(reply.after_ack.unwrap().step, "restart");
    }

    #[tokio::test]
    async fn node_status_reports_the_hosts_facts() {
        let mut r = Registry::new();
        r.set_host(Host {
            facts: crate::handle::NodeFacts {
                agent_version: "9.9.9".into(),
                hostname: || "node-a".into(),
                ..Default::default()
            },
            ..Default::default()
        });
        r.register::<GetNodeStatus, _, _>(
            Settings::new(Duration::from_secs(60), Lane::Fast),
            crate::node_status::node_status,
        );
        let instr = env("GET_NODE_STATUS", "{}");
        let p = r.get("GET_NODE_STATUS").unwrap().prepare(&instr).unwrap();
        let ctx = r.context(
            "GET_NODE_STATUS",
            instr.tag,
            tokio::time::Instant::now() + Duration::from_secs(1),
            None,
        );
        let reply = (p.job)(ctx).await.unwrap();
        let s: NodeStatus = reply.envelope.payload().unwrap();
        assert_eq!(
            (s.agent_version.as_str(), s.hostname.as_str()),
            ("9.9.9", "node-a")
        );
    }

    #[test]
    fn completeness_counts_executors_unsupported_and_the_dispatchers_types() {
        let mut r = Registry::new();
        assert_eq!(
            r.unaccounted().len(),
            instructions::CATALOG.len() - DISPATCHER_TYPES.len()
        );
        r.unsupported(instructions::ALL_INSTRUCTION_TYPES);
        assert!(r.unaccounted().is_empty());
        assert_eq!(r.types(), vec!["CANCEL".to_string()]);
    }
}
