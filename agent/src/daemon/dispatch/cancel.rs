//! `CANCEL` (protocol §7.7), handled by the dispatcher itself: it never waits in the queue and
//! never takes a concurrency slot, so it works when every slot is busy.
//!
//! - Target queued: removed from the queue and answered `cancelled`; it never starts.
//! - Target running: its cancellation token is cancelled and its task aborted, which drops its
//!   executor and with it the process-group
//!   guard (the whole group is SIGKILLed), and it is answered `cancelled`. It is taken out of
//!   `running` first, so its own completion (if it finished in the same instant) is dropped by
//!   `finished()`: exactly one final reply.
//! - Target finished, unknown, or the `CANCEL` itself: nothing to do.
//!
//! The `CANCEL` is answered `NO_CONTENT` in every case but a bad payload; that reply is journaled
//! like any final reply, so a redelivered `CANCEL` gets it again through the ordinary dedup. The
//! `CANCEL` is recorded as accepted before it acts: when the journal cannot record it, it is
//! answered `busy` or `internal` and cancels nothing.

use runos_protocol::control::{self, NoContent};
use runos_protocol::instructions::{Cancel, Instruction as _};
use runos_protocol::{Envelope, ErrorCode, ErrorPayload};

use super::{Dispatcher, error_reply};
use runos_executors::lanes::Lane;
use runos_journal::Lookup;

impl Dispatcher {
    /// Handle the `CANCEL` instruction `env` (already past dedup and the shutdown check).
    pub(super) async fn cancel(&mut self, env: Envelope) {
        let tag = env.tag;
        let target = match Cancel::from_envelope(&env) {
            Ok(c) => c.tag,
            Err(e) => {
                let p = e.to_error_payload();
                tracing::warn!(%tag, r#type = %env.kind, "CANCEL refused: bad payload");
                let p = ErrorPayload::new(p.code, format!("CANCEL: {}", p.message));
                self.answer_now(&env, Envelope::with_type(control::types::ERROR, tag, &p))
                    .await;
                return;
            }
        };
        if let Err(refusal) = self.accept(&env) {
            self.send(refusal).await;
            return;
        }
        if target == tag {
            tracing::info!(%tag, cancel_target = %target, "CANCEL names itself; nothing to do");
        } else if let Some(victim) = self
            .queue
            .iter()
            .position(|q| q.tag == target)
            .and_then(|i| self.queue.remove(i))
        {
            self.queued_slow -= usize::from(victim.lane != Lane::Fast);
            tracing::info!(
                %tag,
                cancel_target = %target,
                r#type = %victim.kind,
                "CANCEL: cancelled a queued instruction before it started"
            );
            self.answer(error_reply(
                target,
                ErrorCode::Cancelled,
                format!("cancelled by CANCEL {tag} before it started"),
            ))
            .await;
        } else if let Some(running) = self.running.remove(&target) {
            // Removed from `running` before the abort: `finished()` drops whatever the task
            // still yields, and frees its lane once the aborted task has ended. The executor's
            // cancellation token is cancelled first.
            running.stop();
            tracing::warn!(
                %tag,
                cancel_target = %target,
                "CANCEL: cancelled a running instruction; its processes are stopped (SIGTERM, then SIGKILL after the grace)"
            );
            self.answer(error_reply(
                target,
                ErrorCode::Cancelled,
                format!("cancelled by CANCEL {tag}; its processes were killed"),
            ))
            .await;
        } else if matches!(
            self.journal.lookup(&target),
            Lookup::Done(_) | Lookup::Discarded(_)
        ) {
            tracing::info!(%tag, cancel_target = %target, "CANCEL: already finished; nothing to do");
        } else {
            tracing::info!(
                %tag,
                cancel_target = %target,
                "CANCEL: unknown tag (never received, or answered and acknowledged); nothing to do"
            );
        }
        self.answer(Envelope::with_type(
            control::types::NO_CONTENT,
            tag,
            &NoContent {},
        ))
        .await;
        self.publish();
    }
}
