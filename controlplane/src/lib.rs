//! The reference control plane of runos.
//!
//! - [`server::serve`] runs a control plane (CA, SQLite state, L1Sec enrolment, L2Sec sessions,
//!   operator socket) and returns a [`ServerHandle`];
//! - [`api::Api`] is the operator API, used in-process and behind the operator socket;
//! - [`cli`] is the operator client that talks to the socket;
//! - [`demo`] runs a control plane and an agent end to end.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod ca;
pub mod cli;
pub(crate) mod db;
pub mod demo;
pub mod error;
pub mod l1;
pub(crate) mod l2;
pub(crate) mod listen;
pub mod server;
pub mod util;

pub use api::{Api, NodeInfo, ReplyInfo, SendRequest, TokenInfo};
pub use error::Error;
pub use server::{Endpoints, ServeOptions, ServerHandle, serve};
