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
    let out = s.cp.cli(&[
        "send",
        &s.node,
        "RUN_COMMAND",
        r#"{"argv":["sh","-c","sleep 1; echo done"]}"#,
        "--json",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tag = v["tag"].as_str().expect("send prints the tag").to_string();
    wait_until(Duration::from_secs(10), "the command to start", || {
        s.agent.log().contains(&tag)
    });
    let status = s.agent.stop().expect("agent was running");
    assert!(
        status.success(),
        "graceful shutdown exits 0, got {status}\n{}",
        s.logs()
    );
    // Its reply was delivered before the agent left.
    let log = s.cp.log();
    assert!(
        log.contains(&tag),
        "control plane never saw the reply\n{}",
        s.logs()
    );
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
