//! Durable instruction delivery, end to end with the real binaries: the agent's journal
//! (`<node dir>/state/journal.log`) survives a `kill -9` and a torn last record.
//!
//! Fault test 4 (the same tag delivered twice: one execution, two identical replies) is covered
//! at the dispatcher level in `agent/tests/journal.rs`: the control plane never resends a tag on
//! its own while connected, and driving the agent by hand would need a fake control plane.

use std::path::{Path, PathBuf};
use std::time::Duration;

use runos_e2e::{Stack, file_lines, wait_until};
use serde_json::json;

fn journal(s: &Stack) -> PathBuf {
    s.agent.dir.join("state/journal.log")
}

/// Process ids whose command line contains `marker`.
fn pids_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(marker) {
            out.push(pid);
        }
    }
    out
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
fn pgid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// SIGKILL the process groups of the processes whose command line contains `marker` (what a
/// `kill -9` of the agent left behind).
fn kill_leftovers(marker: &str) {
    for pid in pids_with(marker) {
        if let Some(pg) = pgid_of(pid).and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
        }
    }
}

/// Fault test 1: `kill -9` of the agent while a RUN_COMMAND runs, then a restart: the
/// instruction is answered `interrupted`, its command ran once, not again, and the process
/// group the crash left behind is killed at the restart.
#[test]
fn an_instruction_cut_short_by_kill_9_is_answered_interrupted_and_never_rerun() {
    let mut s = Stack::up("");
    let counter = s.tmp.path().join("ran.txt");
    let marker = counter.display().to_string();
    let tag =
        s.send_nowait(&json!({"argv": ["sh", "-c", "echo x >> \"$1\"; sleep 30", "sh", counter]}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(20), "the command to start", || {
            file_lines(&counter).len() == 1
        });
        s.agent.kill();
        assert!(
            !pids_with(&marker).is_empty(),
            "the command outlives the kill -9 of the agent"
        );
        s.agent.start();
        // The restarted agent kills the process group the crash left behind.
        wait_until(
            Duration::from_secs(20),
            "the leftover process group to die",
            || pids_with(&marker).is_empty(),
        );
        // The kill comes first, its log line right after.
        wait_until(Duration::from_secs(20), "the kill to be logged", || {
            s.agent.log().contains("killed the leftover process group")
        });
        let r = s.reply_of(&tag, "60s");
        assert_eq!(
            (r.kind.as_str(), r.error_code()),
            ("ERROR", Some("interrupted")),
            "{r:?}\n{}",
            s.logs()
        );
        assert_eq!(
            file_lines(&counter).len(),
            1,
            "the command must not run again"
        );
        // One more round trip: a redelivery of the tag (if the control plane made one) has
        // been answered from the journal by now, without running anything.
        s.cp.wait_online(&s.node);
        let r = s.cp.send(&s.node, "GET_NODE_STATUS", "{}");
        assert_eq!(r.kind, "NODE_STATUS", "{r:?}\n{}", s.logs());
        assert_eq!(
            file_lines(&counter).len(),
            1,
            "the command must run at most once"
        );
        let log = s.agent.log();
        assert!(
            log.lines()
                .any(|l| l.contains(&tag) && l.contains("answered interrupted")),
            "the restart names the interrupted tag\n{log}"
        );
    }));
    // The agent died without killing its child: end the orphaned `sleep 30`.
    kill_leftovers(&marker);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Fault test 5: the journal's last record is torn (cut short, as by a power loss): the agent
/// starts, reports the cut, keeps the earlier entries, and serves new instructions.
#[test]
fn a_torn_last_journal_record_is_cut_and_the_earlier_entries_kept() {
    let mut s = Stack::up("");
    let tag = s.send_nowait(&json!({"argv": ["echo", "before the tear"]}));
    let before = s.reply_of(&tag, "60s");
    assert_eq!(
        before.kind,
        "RUN_COMMAND_RESPONSE",
        "{before:?}\n{}",
        s.logs()
    );
    // The ACK is recorded last (nothing else is journaled meanwhile).
    let path = journal(&s);
    let text =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let acked = format!("{{\"rec\":\"acked\",\"tag\":\"{tag}\"");
    wait_until(Duration::from_secs(20), "the ACK in the journal", || {
        text(&path).contains(&acked)
    });
    s.agent.stop().expect("the agent was running");
    assert!(text(&path).ends_with('}'), "the ACK is the last record");

    // Tear the last record (the ACK) in the middle of its tag.
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 30).unwrap();
    drop(f);

    s.agent.start();
    s.cp.wait_online(&s.node);
    let log = s.agent.log();
    assert!(
        log.contains("torn or corrupt"),
        "the agent reports the cut\n{log}"
    );
    // A new instruction is served.
    let r = s.cp.send(&s.node, "GET_NODE_STATUS", "{}");
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}\n{}", s.logs());
    // The completed entry is still there: its reply (its ACK was lost with the torn record) was
    // resent after WELCOME, acknowledged again, and the control plane stored it only once.
    assert!(
        text(&path).contains(&format!("{{\"rec\":\"finished\",\"tag\":\"{tag}\"")),
        "the earlier entry is kept"
    );
    wait_until(
        Duration::from_secs(20),
        "the reply to be acknowledged again",
        || text(&path).contains(&acked),
    );
    assert_eq!(s.reply_of(&tag, "60s").payload, before.payload);
    let stored =
        s.cp.log()
            .lines()
            .filter(|l| l.contains(&tag) && l.contains("final reply stored"))
            .count();
    assert_eq!(stored, 1, "stored exactly once\n{}", s.logs());
}
