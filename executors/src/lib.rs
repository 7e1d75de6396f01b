//! The runos executors.
//!
//! This crate holds what an executor needs and nothing of how instructions arrive: it depends
//! on `runos-protocol` (payload types, validation, the catalog table) and never on the agent,
//! the L2Sec session or TLS. The agent wires it up: it builds the registry, hands each accepted
//! instruction to it with a context, and sends the reply.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod host;
