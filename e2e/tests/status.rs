//! `runos status` end to end: the real agent's admin socket, read by the real `runos status`.

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::process::Output;

use runos_e2e::{DEADLINE, Stack, describe, wait_until};
use serde_json::Value;

/// A value that must never appear in any status output.
const MARKER: &str = "STATUS-SECRET-MARKER-5f1c2a";

/// `runos status --json`: (exit code, parsed JSON, raw output).
fn status(s: &Stack) -> (i32, Value, Output) {
    let out = s.agent.cli(&["status", "--json"], "");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json output: {e}: {}", describe(&out)));
    (out.status.code().unwrap_or(-1), v, out)
}

fn assert_no_marker(out: &Output) {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(MARKER), "secret in status output: {all}");
}

#[test]
fn connected_agent_reports_status_in_flight_work_and_no_secrets_then_not_running() {
    let mut s = Stack::up("shutdown_grace_secs = 1");
    let sock = s.agent.dir.join("run/admin.sock");

    // Connected, with a round trip (WELCOME counts) and a valid certificate.
    let mut last = Value::Null;
    wait_until(DEADLINE, "status: connected", || {
        let (code, v, _) = status(&s);
        last = v.clone();
        code == 0 && v["connection"]["state"] == "connected" && v["lastRoundTrip"].is_string()
    });
    let v = last;
    assert_eq!(v["running"], true, "{v}");
    assert!(v["agentVersion"].is_string(), "{v}");
    assert!(v["connection"]["sessionId"].is_string(), "{v}");
    assert_eq!(v["certificate"]["expired"], false, "{v}");
    assert!(
        v["certificate"]["expiresInSecs"].as_i64().unwrap() > 0,
        "{v}"
    );
    assert!(v["certificate"]["notAfter"].is_string(), "{v}");
    assert!(v["journal"]["bytes"].as_u64().is_some(), "{v}");
    assert!(v["journal"]["records"].as_u64().is_some(), "{v}");
    assert!(v["recentErrors"].is_array(), "{v}");

    // The socket: a Unix socket of mode 0600.
    let meta = std::fs::symlink_metadata(&sock).expect("admin.sock exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A long RUN_COMMAND carrying a secret in its environment shows up by tag and type only.
    let payload = serde_json::json!({
        "argv": ["sh", "-c", "sleep 600"],
        "env": {"RUNOS_TEST_TOKEN": MARKER},
        "timeoutSecs": 120,
    });
    let tag = s.send_nowait(&payload);
    let mut entry = Value::Null;
    wait_until(DEADLINE, "the RUN_COMMAND in inFlight", || {
        let (_, v, out) = status(&s);
        assert_no_marker(&out);
        entry = v["inFlight"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["tag"] == tag.as_str()).cloned())
            .unwrap_or(Value::Null);
        !entry.is_null()
    });
    assert_eq!(entry["type"], "RUN_COMMAND", "{entry}");
    assert!(entry["startedAt"].is_string(), "{entry}");
    let human = s.agent.cli(&["status"], "");
    assert_eq!(human.status.code(), Some(0), "{}", describe(&human));
    assert!(String::from_utf8_lossy(&human.stdout).contains(&tag));
    assert_no_marker(&human);

    // Stopped agent: exit 9, the certificate is still reported, the socket is gone.
    s.agent.stop();
    assert!(!sock.exists(), "admin.sock removed on shutdown");
    let (code, v, out) = status(&s);
    assert_eq!(code, 9, "{}", describe(&out));
    assert_eq!(v["running"], false, "{v}");
    assert_eq!(v["certificate"]["expired"], false, "{v}");
    assert_no_marker(&out);
    let human = s.agent.cli(&["status"], "");
    assert_eq!(human.status.code(), Some(9), "{}", describe(&human));
    assert!(String::from_utf8_lossy(&human.stdout).contains("certificate"));
}

#[test]
fn control_plane_down_shows_disconnected_with_recent_errors_and_exits_0() {
    let mut s = Stack::up("");
    wait_until(DEADLINE, "status: connected", || {
        let (code, v, _) = status(&s);
        code == 0 && v["connection"]["state"] == "connected"
    });
    s.cp.kill();
    let mut last = Value::Null;
    wait_until(DEADLINE, "status: disconnected with recent errors", || {
        let (code, v, out) = status(&s);
        assert_eq!(
            code,
            0,
            "under 5 minutes is not degraded: {}",
            describe(&out)
        );
        last = v.clone();
        matches!(
            v["connection"]["state"].as_str(),
            Some("disconnected" | "connecting")
        ) && v["recentErrors"].as_array().is_some_and(|a| !a.is_empty())
    });
    assert!(last["connection"]["offlineSince"].is_string(), "{last}");
    assert!(last["lastRoundTrip"].is_string(), "{last}");
    assert!(
        last["degraded"].as_array().is_some_and(Vec::is_empty),
        "{last}"
    );
}

/// `runos certificate status --json`: (exit code, parsed JSON, raw output).
fn cert_status(s: &Stack) -> (i32, Value, Output) {
    let out = s.agent.cli(&["certificate", "status", "--json"], "");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("certificate status --json output: {e}: {}", describe(&out)));
    (out.status.code().unwrap_or(-1), v, out)
}

#[test]
fn clock_offset_and_certificate_status_judged_by_server_time_then_missing_certificate() {
    let s = Stack::up("");

    // Connected: a measured clock offset (same host: small), certificate judged by server time.
    let mut last = Value::Null;
    wait_until(DEADLINE, "status: connected with a clock offset", || {
        let (code, v, _) = status(&s);
        last = v.clone();
        code == 0 && v["connection"]["state"] == "connected" && v["clockOffsetMs"].is_i64()
    });
    let v = last;
    let off = v["clockOffsetMs"].as_i64().unwrap();
    assert!(off.abs() < 5000, "{v}");
    assert!(v["clockOffsetAt"].is_string(), "{v}");
    assert_eq!(v["certificate"]["judgedBy"], "server", "{v}");
    assert!(v["warnings"].as_array().is_some_and(Vec::is_empty), "{v}");

    // `runos certificate status`: the registered node, valid, judged by server time.
    let (code, c, out) = cert_status(&s);
    assert_eq!(code, 0, "{}", describe(&out));
    assert_eq!(c["nodeId"], s.node.as_str(), "{c}");
    assert_eq!(c["expired"], false, "{c}");
    assert_eq!(c["judgedBy"], "server", "{c}");
    assert!(c["expiresInSecs"].as_i64().unwrap() > 0, "{c}");
    assert!(c["serial"].is_string() && c["notBefore"].is_string(), "{c}");
    assert!(c["lifetimeUsedPercent"].is_number(), "{c}");
    assert!(c["caFile"].is_string(), "{c}");
    let human = s.agent.cli(&["certificate", "status"], "");
    assert_eq!(human.status.code(), Some(0), "{}", describe(&human));
    assert!(String::from_utf8_lossy(&human.stdout).contains(&s.node));
    let help = s.agent.cli(&["certificate", "status", "--help"], "");
    assert_eq!(help.status.code(), Some(0), "{}", describe(&help));

    // The certificate file removed: not registered (exit 3), told to run `runos register`.
    std::fs::remove_file(s.agent.dir.join("etc/node.crt")).expect("remove node.crt");
    let (code, c, out) = cert_status(&s);
    assert_eq!(code, 3, "{}", describe(&out));
    assert!(
        c["error"]
            .as_str()
            .is_some_and(|e| e.contains("runos register")),
        "{c}"
    );
}
