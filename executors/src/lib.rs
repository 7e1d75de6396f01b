//! The runos executors.
//!
//! This crate holds what an executor needs and nothing of how instructions arrive: it depends
//! on `runos-protocol` (payload types, validation, the catalog table) and never on the agent,
//! the L2Sec session or TLS. The agent wires it up: it builds the registry, hands each accepted
//! instruction to it with a context, and sends the reply.
//!
//! - [`contract`]: what an executor is (typed request + [`Ctx`] → typed reply or error, maybe an
//!   after-ACK step);
//! - [`registry`]: type → decode and validate, executor, lane, maximum deadline;
//! - [`context`]: the [`Ctx`];
//! - [`handle`]: the [`Host`] handle (processes, files, node facts);
//! - [`lanes`]: fast lane, shared pool, resource locks;
//! - [`after_ack`]: pending after-ACK steps on disk;
//! - [`manifest`]: what runos wrote outside its state directory (what the uninstall removes);
//! - one module per executor domain: [`node_status`], [`run_command`], [`overlay`]
//!   (WireGuard peers), [`uninstall`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod after_ack;
pub mod context;
pub mod contract;
pub mod handle;
pub mod host;
pub mod lanes;
pub mod manifest;
pub mod node_status;
pub mod overlay;
pub mod registry;
pub mod run_command;
pub mod uninstall;

pub use context::Ctx;
pub use contract::{AfterAck, Done, StepCtx};
pub use handle::Host;
pub use lanes::{Lane, Resource};
pub use registry::{Registry, Settings};
