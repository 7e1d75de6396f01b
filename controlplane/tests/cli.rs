//! The `runos-controlplane` binary: serve, operator commands, exit codes, SIGTERM.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_runos-controlplane");
const DEADLINE: Duration = Duration::from_secs(15);

fn cp(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "condition not met in time");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn serve_token_nodes_send_and_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Command::new(BIN)
        .args([
            "serve",
            "--l1-addr",
            "127.0.0.1:0",
            "--l2-addr",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "1s",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(|| dir.join("endpoints.json").exists());
    let ep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("endpoints.json")).unwrap()).unwrap();
    assert!(ep["l1Addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(!ep["l2Addr"].as_str().unwrap().ends_with(":0"));

    let out = cp(&["token", "create", "--ttl", "10m", "--json"], &dir);
    assert!(out.status.success(), "{out:?}");
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(t["token"].as_str().unwrap().len() > 32);
    assert_eq!(t["caSha256"].as_str().unwrap().len(), 64);
    // The token is stored hashed only.
    let db = std::fs::read(dir.join("state.db")).unwrap();
    let token = t["token"].as_str().unwrap().as_bytes();
    assert!(!db.windows(token.len()).any(|w| w == token));

    let out = cp(&["nodes", "--json"], &dir);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    let out = cp(&["send", "no-such-node", "GET_NODE_STATUS", "--wait"], &dir);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = cp(&["revoke", "no-such-node"], &dir);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let ok = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < DEADLINE, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(status.success(), "{status}");
    assert!(!dir.join("admin.sock").exists());

    // Nothing listening: unreachable.
    let out = cp(&["nodes"], &dir);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
}

#[test]
fn help_documents_exit_codes_and_usage_errors_exit_2() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Exit codes:"));
    assert!(help.contains("3  unknown node or tag"), "{help}");
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args([
            "serve",
            "--heartbeat-interval",
            "0s",
            "--data-dir",
            "/nonexistent/x",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
}
