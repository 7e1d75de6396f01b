//! The `runos agent` process: signals, the instance lock and systemd notification, with the real
//! binary against the real control plane.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use runos_e2e::{Agent, Stack, describe, signal, wait_until};

#[test]
fn sighup_reloads_without_exiting() {
    let mut s = Stack::up("");
    signal(s.agent.pid(), rustix::process::Signal::HUP);
    wait_until(Duration::from_secs(10), "the reload to be logged", || {
        s.agent.log().to_lowercase().contains("reload")
    });
    assert!(
        s.agent.is_running(),
        "SIGHUP must not stop the agent\n{}",
        s.logs()
    );
    let r = s.cp.send(&s.node, "GET_NODE_STATUS", "{}");
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}");
}

#[test]
fn sigterm_shuts_down_gracefully_and_lets_a_running_command_finish() {
    let mut s = Stack::up("");
    // Start a short command without waiting, then ask the agent to stop while it runs.
    let tag = s.send_nowait(&serde_json::json!({"argv":["sh","-c","sleep 1; echo done"]}));
    wait_until(Duration::from_secs(10), "the command to start", || {
        s.agent.log().contains(&tag)
    });
    let status = s.agent.stop().expect("agent was running");
    assert!(
        status.success(),
        "graceful shutdown exits 0, got {status}\n{}",
        s.logs()
    );
    // Its reply was delivered before the agent left (nobody else could deliver it now).
    let r = s.reply_of(&tag, "10s");
    assert_eq!(r.exit, 0, "{r:?}\n{}", s.logs());
    assert_eq!(r.tag, tag);
    assert_eq!(r.kind, "RUN_COMMAND_RESPONSE", "{r:?}\n{}", s.logs());
    assert_eq!(r.payload["stdout"]["text"], "done\n", "{r:?}");
}

/// Processes whose command line is exactly `sleep 30` and that descend from `ancestor`.
fn sleeps_under(ancestor: u32) -> Vec<u32> {
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(1)?.parse().ok()
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if !is_sleep_30(pid) {
            continue;
        }
        let mut p = pid;
        for _ in 0..64 {
            match parent(p) {
                Some(pp) if pp == ancestor => {
                    found.push(pid);
                    break;
                }
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    found
}

/// Whether `pid` is a live `sleep 30` (a zombie has an empty command line).
fn is_sleep_30(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x0030\x00")
}

#[test]
fn shutdown_grace_running_out_interrupts_a_running_command() {
    let mut s = Stack::up("shutdown_grace_secs = 1");
    let tag = s.send_nowait(&serde_json::json!({"argv":["sleep","30"]}));
    wait_until(Duration::from_secs(10), "the command to start", || {
        s.agent.log().contains(&tag)
    });
    let agent_pid = s.agent.pid();
    let mut sleeps = Vec::new();
    wait_until(Duration::from_secs(10), "the sleep process to run", || {
        sleeps = sleeps_under(agent_pid);
        !sleeps.is_empty()
    });
    // Not answered yet.
    let out = s.cp.cli(&["reply", &tag, "--json"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));

    let start = Instant::now();
    let status = s.agent.stop().expect("agent was running");
    let took = start.elapsed();
    assert!(
        status.success(),
        "shutdown after the grace exits 0, got {status}\n{}",
        s.logs()
    );
    assert!(
        took < Duration::from_secs(10),
        "the agent took {took:?} to stop with a 1 s grace\n{}",
        s.logs()
    );
    wait_until(
        Duration::from_secs(10),
        "the sleep process to be gone",
        || sleeps.iter().all(|p| !is_sleep_30(*p)),
    );

    // The instruction was answered `interrupted` before the agent left.
    let r = s.reply_of(&tag, "10s");
    assert_eq!(r.exit, 1, "{r:?}\n{}", s.logs());
    assert_eq!(r.tag, tag);
    assert_eq!(r.kind, "ERROR", "{r:?}\n{}", s.logs());
    assert_eq!(r.error_code(), Some("interrupted"), "{r:?}\n{}", s.logs());
}

#[test]
fn a_second_agent_on_the_same_node_is_refused_by_the_lock() {
    let s = Stack::up("");
    let out = s.agent.cli(&["agent"], "");
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lock"),
        "{}",
        describe(&out)
    );
}

#[test]
fn an_unregistered_agent_exits_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = runos_e2e::ControlPlane::start(&tmp.path().join("cp"), &[]);
    let agent = Agent::new(&tmp.path().join("node"), &cp, "");
    let out = agent.cli(&["agent"], "");
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("register"),
        "the error should say to run `runos register`: {}",
        describe(&out)
    );
}

/// The agent tells systemd it is ready through `$NOTIFY_SOCKET` (a datagram socket we bind, as
/// systemd would), and says `STOPPING=1` on shutdown.
#[test]
fn sd_notify_ready_and_stopping() {
    let mut s = Stack::up("");
    s.agent.stop();
    let sock_path = s.tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let path = sock_path.display().to_string();
    s.agent.start_with_env(&[("NOTIFY_SOCKET", &path)]);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(20);
    while !seen.contains("READY=1") && Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    assert!(
        seen.contains("READY=1"),
        "no READY=1; got {seen:?}\n{}",
        s.logs()
    );
    signal(s.agent.pid(), rustix::process::Signal::TERM);
    let end = Instant::now() + Duration::from_secs(20);
    while !seen.contains("STOPPING=1") && Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    assert!(seen.contains("STOPPING=1"), "no STOPPING=1; got {seen:?}");
}

/// A `kill -9` between the journal's `finished` record and the audit write lost the instruction's
/// audit line for good (issue 10, finding 7). The state such a kill leaves (the reply in the
/// journal, no audit line) is made exactly: the agent is killed after answering and the line is
/// cut from `audit.jsonl`. The next start writes it back from the journal, once.
#[test]
fn an_audit_line_a_crash_lost_is_written_back_from_the_journal() {
    let mut s = Stack::up("");
    let r = s.cp.send(&s.node, "RUN_COMMAND", r#"{"argv":["true"]}"#);
    assert_eq!(r.kind, "RUN_COMMAND_RESPONSE", "{r:?}\n{}", s.logs());
    let audit = s.agent.dir.join("state").join("audit.jsonl");
    let lines_of = |tag: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["tag"] == tag)
            .collect()
    };
    wait_until(Duration::from_secs(10), "the audit line", || {
        lines_of(&r.tag).len() == 1
    });
    s.agent.kill();
    let text = std::fs::read_to_string(&audit).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.contains(&r.tag))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&audit, kept).unwrap();
    assert!(lines_of(&r.tag).is_empty());

    s.agent.start();
    s.cp.wait_online(&s.node);
    let back = lines_of(&r.tag);
    assert_eq!(back.len(), 1, "{back:?}\n{}", s.logs());
    assert_eq!(back[0]["recovered"], true, "{:?}", back[0]);
    assert_eq!(back[0]["type"], "RUN_COMMAND", "{:?}", back[0]);
    assert_eq!(back[0]["outcome"], "RUN_COMMAND_RESPONSE", "{:?}", back[0]);

    // A restart with nothing lost writes nothing more.
    s.agent.stop();
    s.agent.start();
    s.cp.wait_online(&s.node);
    assert_eq!(lines_of(&r.tag).len(), 1);
}
