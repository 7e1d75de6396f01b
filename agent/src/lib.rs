//! The runos node agent.
//!
//! `runos` is a root daemon that enrols a node with a control plane (`runos register`), then holds
//! one outbound, mutually authenticated TLS 1.3 session to it (`runos agent`), executes the
//! instructions that arrive on that session and answers each with the instruction's own tag.
//!
//! The layering is strict (see `docs/architecture.md`):
//!
//! ```text
//!  main (CLI, exit codes)                                     cli
//!    └─ daemon ── session (TLS, HELLO/WELCOME, heartbeat)     daemon, session, net, backoff
//!         └─ dispatcher (queue, concurrency, deadlines, dedup) dispatch, journal
//!              └─ catalog (type name → executor entry)         catalog
//!                   └─ executors                               exec, process
//! ```
//!
//! What the agent refuses to do:
//!
//! - run anything through a shell: commands are argv vectors, executed directly;
//! - trust a control plane it cannot authenticate: there is no "insecure" switch, the L1Sec CA can
//!   be pinned, and the L2Sec CA comes from enrolment;
//! - send its private key anywhere: the key is generated on the node and only a CSR leaves it;
//! - log secrets: payloads, environment values, stdin, tokens and keys never reach a log line;
//! - grow without bound: every queue, buffer, wait and frame has a limit;
//! - treat a late reply as an instruction: replies are matched by tag or dropped.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod backoff;
pub mod catalog;
pub mod cert_cmd;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod dispatch;
pub mod exec;
pub mod exit;
pub mod fsutil;
pub mod identity;
pub mod journal;
pub mod journal_cmd;
pub mod lock;
pub mod logging;
pub mod net;
pub mod notify;
pub mod process;
pub mod register;
pub mod renew;
pub mod session;
pub mod status;
pub mod status_cmd;
pub mod sysinfo;

/// The agent's version (the crate version).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
