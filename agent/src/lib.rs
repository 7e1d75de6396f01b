//! The runos node agent.
//!
//! `runos` is a root daemon that enrols a node with a control plane (`runos register`), then holds
//! one outbound, mutually authenticated TLS 1.3 session to it (`runos agent`), executes the
//! instructions that arrive on that session and answers each with the instruction's own tag.
//!
//! The layering is strict (see `docs/architecture.md`):
//!
//! ```text
//!  main (CLI, exit codes)                                     cli/
//!    └─ daemon ── session (TLS, HELLO/WELCOME, heartbeat)     daemon/, daemon/session.rs, net
//!         └─ dispatcher (queue, lanes, deadlines, dedup)       daemon/dispatch.rs (runos-journal)
//!              └─ registry (type → executor, lane, max deadline) catalog (runos-executors)
//!                   └─ executors                               runos-executors; exec (host)
//! ```
//!
//! Beside them: `credentials/` (enrolment, renewal, the on-disk switch), `update/` (the
//! updater), `logging/`, `config`, and `util/` (time, atomic files, locks, the admin client).
//! No top-level module imports one that imports it back (`scripts/module-cycles.py`). The
//! daemon's shared state is one handle passed down (`daemon::state::AgentState`), not statics.
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

pub mod catalog;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod exec;
pub mod exit;
pub mod logging;
pub mod net;
pub mod sysinfo;
pub mod uninstall;
pub mod update;
pub mod util;

/// The agent's version (the crate version).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The environment variable of the debug-only version hook (see [`agent_version`]).
#[cfg(debug_assertions)]
pub const DEBUG_VERSION_FROM_DIR_ENV: &str = "RUNOS_DEBUG_VERSION_FROM_DIR";

/// The version this agent reports (`runos version`, HELLO, status, `GET_NODE_STATUS`).
///
/// In release builds this is always [`AGENT_VERSION`]. Debug builds only (`#[cfg(debug_assertions)]`,
/// for the end-to-end update tests, which can build one binary but must install "another
/// version"): when `RUNOS_DEBUG_VERSION_FROM_DIR=1` and the running executable sits in a
/// directory named `vX.Y.Z` (the updater's layout, `<install_dir>/vX.Y.Z/runos`), the agent
/// reports `X.Y.Z` instead. Documented in docs/update.md.
pub fn agent_version() -> &'static str {
    #[cfg(debug_assertions)]
    {
        static FROM_DIR: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        if let Some(v) = FROM_DIR.get_or_init(debug_version_from_dir) {
            return v;
        }
    }
    AGENT_VERSION
}

#[cfg(debug_assertions)]
fn debug_version_from_dir() -> Option<String> {
    if std::env::var_os(DEBUG_VERSION_FROM_DIR_ENV).is_none_or(|v| v != "1") {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.file_name()?.to_str()?;
    Some(update::version::Version::parse_tag(dir).ok()?.to_string())
}
