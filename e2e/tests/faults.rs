//! Delivery under faults of the control plane, end to end with the real binaries: every
//! instruction is answered exactly once and no command runs twice. Side effects are counted in a
//! file that each command appends to.

use std::collections::BTreeMap;
use std::time::Duration;

use runos_e2e::{Stack, file_lines, signal, wait_until};
use serde_json::json;

/// The control plane dies (SIGKILL) while an instruction runs; the command finishes while it is
/// down; after the restart the reply arrives, is stored once, and the command ran once.
#[test]
fn a_reply_produced_while_the_control_plane_is_down_arrives_once_after_restart() {
    let mut s = Stack::up("");
    let counter = s.tmp.path().join("ran.txt");
    let flag = s.tmp.path().join("go");
    let script = "while [ ! -e \"$1\" ]; do sleep 0.05; done; echo ran >> \"$2\"; echo done";
    let tag = s.send_nowait(&json!({"argv": ["sh", "-c", script, "sh", flag, counter]}));
    wait_until(Duration::from_secs(20), "the command to start", || {
        s.agent.log().contains(&tag)
    });
    s.cp.kill();
    // Let the command finish while the control plane is down.
    std::fs::write(&flag, b"").unwrap();
    wait_until(Duration::from_secs(20), "the command to run", || {
        file_lines(&counter).len() == 1
    });
    s.cp.restart();
    s.cp.wait_online(&s.node);
    let r = s.reply_of(&tag, "60s");
    assert_eq!(r.kind, "RUN_COMMAND_RESPONSE", "{r:?}\n{}", s.logs());
    assert_eq!(r.payload["stdout"], json!({"text": "done\n"}));
    // One more round trip: any duplicate of the reply would have arrived by now.
    let r = s.cp.send(&s.node, "GET_NODE_STATUS", "{}");
    assert_eq!(r.kind, "NODE_STATUS");
    assert_eq!(
        file_lines(&counter),
        vec!["ran"],
        "the command must run exactly once"
    );
    let stored =
        s.cp.log()
            .lines()
            .filter(|l| l.contains(&tag) && l.contains("final reply stored"))
            .count();
    assert_eq!(
        stored,
        1,
        "the reply must be stored exactly once\n{}",
        s.logs()
    );
}

/// The control plane freezes (SIGSTOP) while 200 pipelined instructions run: the agent declares
/// it dead, reconnects when it thaws, and every tag is answered exactly once with its own
/// output, while no command runs twice.
#[test]
fn a_frozen_control_plane_during_200_pipelined_instructions_loses_and_repeats_nothing() {
    let s = Stack::up("");
    let counter = s.tmp.path().join("ran.txt");
    let script = "sleep 0.4; echo \"$1\" >> \"$2\"; echo \"$1\"";
    let mut tags = BTreeMap::new();
    for i in 0..200 {
        let tag =
            s.send_nowait(&json!({"argv": ["sh", "-c", script, "sh", i.to_string(), counter]}));
        tags.insert(tag, i);
    }
    signal(s.cp.pid(), rustix::process::Signal::STOP);
    // The freeze must land in the middle of the work for the test to mean anything.
    let done_at_freeze = file_lines(&counter).len();
    assert!(done_at_freeze < 200, "all 200 finished before the freeze");
    let detected = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(20), "dead-peer detection", || {
            s.agent
                .log()
                .to_lowercase()
                .contains("no heartbeat_reply within")
        })
    }));
    signal(s.cp.pid(), rustix::process::Signal::CONT);
    if let Err(e) = detected {
        panic!("{e:?}\n{}", s.logs());
    }
    for (tag, i) in &tags {
        let r = s.reply_of(tag, "60s");
        assert_eq!(r.kind, "RUN_COMMAND_RESPONSE", "{tag}: {r:?}\n{}", s.logs());
        assert_eq!(r.tag, *tag);
        assert_eq!(
            r.payload["stdout"],
            json!({"text": format!("{i}\n")}),
            "{r:?}"
        );
    }
    let mut ran: Vec<u32> = file_lines(&counter)
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    ran.sort_unstable();
    assert_eq!(
        ran,
        (0..200).collect::<Vec<_>>(),
        "each command must run exactly once"
    );
    let log = s.cp.log();
    for tag in tags.keys() {
        let stored = log
            .lines()
            .filter(|l| l.contains(tag.as_str()) && l.contains("final reply stored"))
            .count();
        assert_eq!(stored, 1, "{tag} stored {stored} times");
    }
}
