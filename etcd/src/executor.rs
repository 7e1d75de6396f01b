//! `REMOVE_ETCD_MEMBER`: the executor over [`crate::remove_member`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use runos_executors::Ctx;
use runos_protocol::control::{LogLevel, NoContent};
use runos_protocol::instructions::RemoveEtcdMember;
use runos_protocol::{ErrorCode, ErrorPayload};

use crate::remove::{Kind, RemoveOptions, Target, remove_member};
use crate::settings::Settings;

/// What the removal keeps before the instruction's deadline to answer in time.
const MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The `ERROR` code of a removal failure.
pub fn code_of(kind: Kind) -> ErrorCode {
    match kind {
        Kind::NotFound => ErrorCode::NotFound,
        Kind::AlreadyDone => ErrorCode::AlreadyDone,
        Kind::Refused => ErrorCode::Refused,
        Kind::Failed => ErrorCode::Failed,
        Kind::Cancelled => ErrorCode::Cancelled,
        Kind::Timeout => ErrorCode::Timeout,
    }
}

/// The settings in the executor's configuration section (`[etcd]`; defaults when it has none).
pub fn settings_of(ctx: &Ctx) -> Result<Settings, ErrorPayload> {
    let s = match ctx.config() {
        serde_json::Value::Null => Settings::default(),
        v => serde_json::from_value::<Settings>(v.clone()).map_err(|e| {
            ErrorPayload::new(
                ErrorCode::Internal,
                format!("the agent's [etcd] configuration is invalid: {e}"),
            )
        })?,
    };
    s.validate().map_err(|e| {
        ErrorPayload::new(
            ErrorCode::Internal,
            format!("the agent's [etcd] configuration is invalid: {e}"),
        )
    })?;
    Ok(s)
}

/// Remove the member whose peer URL host is `node_ip` (docs/protocol.md §10). Every step is a
/// `LOG` line; the removal record lives in the executor's state directory.
pub async fn remove_etcd_member(ctx: Ctx, p: RemoveEtcdMember) -> Result<NoContent, ErrorPayload> {
    let ip = p
        .ip()
        .map_err(|e| ErrorPayload::new(ErrorCode::BadPayload, e.to_string()))?;
    let settings = settings_of(&ctx)?;
    let dir = ctx.state_dir()?.to_path_buf();
    let cancel = ctx.cancel.clone();
    let deadline = ctx.deadline - MARGIN.min(ctx.remaining());
    // The removal runs in its own task: when the instruction's future is dropped (CANCEL, the
    // deadline, shutdown) the task stops at its next step that would change the cluster (it
    // sees the cancelled token), but a removal already sent is still recorded and verified
    // (bounded by the settings). Its lines after the reply go to the local log only.
    let replied = Arc::new(AtomicBool::new(false));
    let task = {
        let ctx = ctx.clone();
        let replied = replied.clone();
        tokio::spawn(async move {
            let log = |m: &str| {
                if replied.load(Ordering::Acquire) {
                    tracing::info!(tag = %ctx.tag, "REMOVE_ETCD_MEMBER (after the reply): {m}");
                } else {
                    ctx.log(LogLevel::Info, m);
                }
            };
            let opts = RemoveOptions {
                record_dir: Some(&dir),
                cancel,
                deadline: Some(deadline),
            };
            remove_member(&settings, Target::Ip(ip), &opts, &log).await
        })
    };
    let _said = Replied(replied);
    // The wait steps are bounded by the settings and the deadline; this is the backstop.
    let r = tokio::select! {
        r = task => match r {
            Ok(r) => r,
            Err(e) => {
                return Err(ErrorPayload::new(
                    ErrorCode::Internal,
                    format!("the removal task ended abnormally: {e}; check `runos etcd list`"),
                ));
            }
        },
        () = tokio::time::sleep(ctx.remaining()) => {
            return Err(ErrorPayload::new(
                ErrorCode::Timeout,
                "the instruction's deadline passed during the removal; check `runos etcd list` for the member's state",
            ));
        }
    };
    match r {
        Ok(done) => {
            ctx.log(
                LogLevel::Info,
                &format!(
                    "removed etcd member {} {:?}; {} member(s) left",
                    done.id, done.name, done.members_after
                ),
            );
            Ok(NoContent {})
        }
        Err(e) => Err(ErrorPayload::new(code_of(e.kind), e.message)),
    }
}

/// Marks the reply as given when dropped (the executor returned or its future was dropped).
struct Replied(Arc<AtomicBool>);

impl Drop for Replied {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}
