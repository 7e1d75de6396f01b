//! The executor contract.
//!
//! An executor is an async function `(Ctx, I) -> Result<Done<I::Reply>, ErrorPayload>` over a
//! typed instruction `I` of the protocol crate ([`runos_protocol::instructions::Instruction`]).
//! It gets the payload only after the registry decoded **and validated** it with the protocol
//! crate; it answers the typed success reply, or an [`ErrorPayload`](runos_protocol::ErrorPayload) (sent as `ERROR`). An
//! executor that returns a plain `Result<I::Reply, ErrorPayload>` is registered with
//! [`crate::Registry::register`]; one that may ask for an after-ACK step with
//! [`crate::Registry::register_done`].
//!
//! An **after-ACK step** ([`AfterAck`]) is work that must follow the control plane's
//! acknowledgement of the reply, never precede it (`UPDATE_AGENT`'s restart, `UNINSTALL_NODE`'s
//! last act). The dispatcher writes it to a small file before the reply is sent, runs it once the
//! reply is acknowledged and removes the file after it ran; after a crash, the next start runs
//! the steps whose reply was acknowledged (see `after_ack.rs`). A step can therefore run again if
//! the agent dies *while* it runs: steps are written to be repeated (check first, then act).

use std::sync::Arc;

use crate::handle::{BoxFuture, Host};

/// An executor's success: the reply, and maybe a step to run once the reply is acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct Done<R> {
    /// The success reply.
    pub reply: R,
    /// What to run after the control plane acknowledged `reply`.
    pub after_ack: Option<AfterAck>,
}

impl<R> Done<R> {
    /// A reply with no after-ACK step.
    pub fn reply(reply: R) -> Self {
        Done {
            reply,
            after_ack: None,
        }
    }

    /// A reply followed, once acknowledged, by `step`.
    pub fn then(reply: R, step: AfterAck) -> Self {
        Done {
            reply,
            after_ack: Some(step),
        }
    }
}

/// A step to run after the ACK: the name of a step registered with
/// [`crate::Registry::register_step`] and its parameters (stored on disk until it ran: never a
/// secret).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AfterAck {
    /// The registered step's name.
    pub step: String,
    /// Its parameters.
    pub params: serde_json::Value,
}

/// What a step gets: the tag of the instruction whose reply was acknowledged and the host
/// handle (its parameters come separately).
#[derive(Debug, Clone)]
pub struct StepCtx {
    /// The instruction's tag.
    pub tag: runos_protocol::Tag,
    /// The host handle.
    pub host: Arc<Host>,
}

/// A registered after-ACK step. Its error is logged (the reply was already acknowledged: there
/// is no one to answer).
pub type StepFn =
    Arc<dyn Fn(StepCtx, serde_json::Value) -> BoxFuture<Result<(), String>> + Send + Sync>;
