//! `CANCEL` end to end: the real control plane cancels a running `RUN_COMMAND` on the real agent,
//! whose whole process tree dies.

use std::time::Duration;

use runos_e2e::{Stack, describe, wait_until};

const SCRIPT: &str = "sleep 1000 & sleep 1000 & wait";

/// `(ppid, pgrp, live)` of `pid` from `/proc/PID/stat` (live: not a zombie).
fn stat(pid: u32) -> Option<(u32, u32, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`; comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let live = !matches!(*f.first()?, "Z" | "X");
    Some((f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?, live))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

fn cmdline(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

/// Live processes descending from `ancestor`, with their process group.
fn tree_under(ancestor: u32) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for pid in all_pids() {
        let Some((_, pgrp, true)) = stat(pid) else {
            continue;
        };
        let mut p = pid;
        for _ in 0..64 {
            match stat(p) {
                Some((pp, _, _)) if pp == ancestor => {
                    found.push((pid, pgrp));
                    break;
                }
                Some((pp, _, _)) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    found
}

/// Live processes in the process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|p| matches!(stat(*p), Some((_, g, true)) if g == pgid))
        .collect()
}

#[test]
fn cancel_kills_a_running_command_and_answers_it_cancelled() {
    let s = Stack::up("");
    let tag = s.send_nowait(&serde_json::json!({"argv": ["sh", "-c", SCRIPT]}));

    // The shell and both sleeps run under the agent, in the shell's process group.
    let agent_pid = s.agent.pid();
    let shell_line = format!("sh\0-c\0{SCRIPT}\0").into_bytes();
    let mut shell = None;
    let mut tree = Vec::new();
    wait_until(
        Duration::from_secs(20),
        "the shell and its two sleeps to run",
        || {
            tree = tree_under(agent_pid);
            shell = tree
                .iter()
                .find(|(p, g)| p == g && cmdline(*p) == shell_line)
                .map(|(p, _)| *p);
            shell.is_some_and(|sh| {
                tree.iter()
                    .filter(|(p, g)| *g == sh && cmdline(*p) == b"sleep\x001000\x00")
                    .count()
                    == 2
            })
        },
    );
    let pgid = shell.unwrap();
    let members: Vec<u32> = tree
        .iter()
        .filter(|(_, g)| *g == pgid)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(members.len(), 3, "{tree:?}");

    // Not answered yet.
    let out = s.cp.cli(&["reply", &tag, "--json"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));

    let r = s.cp.send(
        &s.node,
        "CANCEL",
        &serde_json::json!({ "tag": tag }).to_string(),
    );
    assert_eq!(r.exit, 0, "{r:?}\n{}", s.logs());
    assert_eq!(r.kind, "NO_CONTENT", "{r:?}\n{}", s.logs());
    assert_eq!(r.payload, serde_json::json!({}), "{r:?}");

    let r = s.reply_of(&tag, "10s");
    assert_eq!(r.exit, 1, "{r:?}\n{}", s.logs());
    assert_eq!(r.tag, tag);
    assert_eq!(r.kind, "ERROR", "{r:?}\n{}", s.logs());
    assert_eq!(r.error_code(), Some("cancelled"), "{r:?}\n{}", s.logs());

    let mut left = Vec::new();
    wait_until(
        Duration::from_secs(10),
        "the cancelled command's processes to be gone",
        || {
            left = group_members(pgid);
            left.is_empty()
                && members
                    .iter()
                    .all(|p| !matches!(stat(*p), Some((_, g, true)) if g == pgid))
        },
    );
    // The agent lives on and still answers.
    let r = s.cp.send(&s.node, "GET_NODE_STATUS", "{}");
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}\n{}", s.logs());
    assert!(
        s.agent
            .log()
            .contains("CANCEL: cancelled a running instruction"),
        "{}",
        s.logs()
    );
}
