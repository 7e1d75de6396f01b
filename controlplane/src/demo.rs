//! `runos-controlplane demo`: a control plane and a `runos` agent in a temporary directory (no
//! root needed), enrolment, a few instructions with their replies, and a clean stop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Command;

use crate::api::{Api, ReplyInfo, SendRequest};
use crate::server::{ServeOptions, serve};
use crate::{Error, util};

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The agent binary; default `runos` next to the current executable.
    pub agent_bin: Option<PathBuf>,
    /// Keep the temporary directory.
    pub keep: bool,
}

const ONLINE_DEADLINE: Duration = Duration::from_secs(30);
const REPLY_DEADLINE: Duration = Duration::from_secs(30);
const REGISTER_DEADLINE: Duration = Duration::from_secs(30);
const AGENT_STOP_DEADLINE: Duration = Duration::from_secs(20);

fn default_agent_bin() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("current exe: {e}")))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::Internal("the current executable has no directory".into()))?;
    // Test binaries live in target/<profile>/deps; the agent one level up.
    let here = dir.join("runos");
    if here.exists() {
        return Ok(here);
    }
    if dir.ends_with("deps")
        && let Some(up) = dir.parent()
    {
        return Ok(up.join("runos"));
    }
    Ok(here)
}

/// The agent configuration the demo writes (schema of `agent/src/config.rs`).
/// It has no `server.l1_ca_sha256`: the pin comes inside the enrolment token and `runos register`
/// writes it there.
pub fn agent_config_toml(dir: &Path, l1_port: u16, l2_port: u16) -> String {
    let p = |name: &str| Value::String(dir.join(name).display().to_string());
    let cfg = json!({
        "server": {
            "host": "127.0.0.1",
            "l1_port": l1_port,
            "l2_port": l2_port,
        },
        "paths": {
            "key": p("node.key"),
            "certificate": p("node.crt"),
            "ca": p("ca.pem"),
            "l1_ca": p("l1sec-ca.pem"),
            "state_dir": p("state"),
            "run_dir": p("run"),
        },
        "log": { "level": "info", "format": "text" },
        "agent": {
            "reconnect_initial_ms": 200,
            "reconnect_max_ms": 2000,
            "shutdown_grace_secs": 5,
        },
    });
    toml::to_string(&cfg).unwrap_or_default()
}

struct Step {
    kind: &'static str,
    payload: Value,
    expect: &'static str,
    check: fn(&ReplyInfo) -> bool,
}

fn run_response(r: &ReplyInfo) -> Option<&Value> {
    (r.kind == runos_protocol::instructions::types::RUN_COMMAND_RESPONSE).then_some(&r.payload)
}

fn text(v: &Value, field: &str) -> Option<String> {
    v.get(field)
        .and_then(|o| o.get("text"))
        .and_then(|t| t.as_str())
        .map(str::to_string)
}

fn steps() -> Vec<Step> {
    vec![
        Step {
            kind: "GET_NODE_STATUS",
            payload: json!({}),
            expect: "NODE_STATUS",
            check: |r| r.kind == "NODE_STATUS",
        },
        Step {
            kind: "RUN_COMMAND",
            payload: json!({"argv": ["uname", "-a"]}),
            expect: "RUN_COMMAND_RESPONSE with exit code 0",
            check: |r| run_response(r).is_some_and(|p| p.get("exitCode") == Some(&json!(0))),
        },
        Step {
            kind: "RUN_COMMAND",
            payload: json!({"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]}),
            expect: "RUN_COMMAND_RESPONSE with exit code 3, stdout \"out\", stderr \"err\"",
            check: |r| {
                run_response(r).is_some_and(|p| {
                    p.get("exitCode") == Some(&json!(3))
                        && text(p, "stdout").as_deref() == Some("out\n")
                        && text(p, "stderr").as_deref() == Some("err\n")
                })
            },
        },
        Step {
            kind: "RUN_COMMAND",
            payload: json!({"argv": ["sleep", "5"], "timeoutSecs": 1}),
            expect: "timed out (timedOut=true, or ERROR timeout)",
            check: |r| {
                run_response(r).is_some_and(|p| p.get("timedOut") == Some(&json!(true)))
                    || r.error_code() == Some("timeout")
            },
        },
        Step {
            kind: "NO_SUCH_THING",
            payload: json!({}),
            expect: "ERROR unknown_type",
            check: |r| r.error_code() == Some("unknown_type"),
        },
    ]
}

fn describe(r: &ReplyInfo) -> String {
    if let Some(p) = run_response(r) {
        let mut s = String::new();
        let field = |k: &str| p.get(k).map(Value::to_string).unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "    exitCode={} signal={} timedOut={} durationMs={}\n",
            field("exitCode"),
            field("signal"),
            field("timedOut"),
            field("durationMs")
        ));
        for stream in ["stdout", "stderr"] {
            let body = text(p, stream)
                .unwrap_or_else(|| p.get(stream).map(Value::to_string).unwrap_or_default());
            if body.is_empty() {
                s.push_str(&format!("    {stream}: (empty)\n"));
            } else {
                s.push_str(&format!("    {stream}:\n"));
                for line in body.lines() {
                    s.push_str(&format!("      | {line}\n"));
                }
            }
        }
        return s;
    }
    let pretty = serde_json::to_string_pretty(&r.payload).unwrap_or_default();
    pretty
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>()
}

async fn tail(path: &Path, lines: usize) -> String {
    let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// Send SIGTERM to a process (via `kill(1)`, keeping this crate free of unsafe code and extra
/// dependencies).
async fn sigterm(pid: u32) -> bool {
    Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Run the demo. Returns the process exit code: 0 when every reply was as expected.
pub async fn run(opts: DemoOptions) -> Result<u8, Error> {
    let agent_bin = match opts.agent_bin {
        Some(p) => p,
        None => default_agent_bin()?,
    };
    if !agent_bin.is_file() {
        return Err(Error::BadRequest(format!(
            "the agent binary {} does not exist; build it (cargo build -p runos-agent) or pass \
             --agent-bin",
            agent_bin.display()
        )));
    }
    let tmp = tempfile::Builder::new()
        .prefix("runos-demo-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let root = tmp.path().to_path_buf();
    util::chmod(&root, 0o700)?;
    let result = run_in(&root, &agent_bin).await;
    if opts.keep {
        let kept = tmp.keep();
        println!("kept the demo directory {}", kept.display());
    }
    result
}

async fn run_in(root: &Path, agent_bin: &Path) -> Result<u8, Error> {
    let cp_dir = root.join("controlplane");
    let agent_dir = root.join("agent");
    util::ensure_private_dir(&agent_dir)?;
    let mut sopts = ServeOptions::ephemeral(&cp_dir);
    sopts.heartbeat_interval = Duration::from_secs(2);
    let server = serve(sopts).await?;
    println!(
        "control plane: L1Sec {}  L2Sec {}",
        server.l1_addr(),
        server.l2_addr()
    );
    println!("               data in {}", cp_dir.display());
    let api = server.api();
    let outcome = drive(
        &api,
        root,
        &agent_dir,
        server.l1_addr().port(),
        server.l2_addr().port(),
        &server.ca_sha256(),
        agent_bin,
    )
    .await;
    server.shutdown().await;
    let log = agent_dir.join("agent.log");
    match outcome {
        Ok(true) => Ok(0),
        Ok(false) => {
            println!("\n--- agent log (tail) ---\n{}", tail(&log, 40).await);
            Ok(1)
        }
        Err(e) => {
            println!("\ndemo failed: {e}");
            println!("\n--- agent log (tail) ---\n{}", tail(&log, 40).await);
            Ok(1)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    api: &Api,
    root: &Path,
    agent_dir: &Path,
    l1_port: u16,
    l2_port: u16,
    pin: &str,
    agent_bin: &Path,
) -> Result<bool, Error> {
    let token = api.create_token(Duration::from_secs(600))?;
    let token_file = root.join("token");
    util::atomic_write(&token_file, token.token.as_bytes(), 0o600)?;
    let config = agent_dir.join("config.toml");
    util::atomic_write(
        &config,
        agent_config_toml(agent_dir, l1_port, l2_port).as_bytes(),
        0o600,
    )?;

    println!(
        "\n$ runos --config {} register --server 127.0.0.1 ...",
        config.display()
    );
    let reg = Command::new(agent_bin)
        .arg("--config")
        .arg(&config)
        .args(["register", "--server", "127.0.0.1", "--token-file"])
        .arg(&token_file)
        // No --ca-file and no --ca-sha256: the token carries the CA pin; register learns the
        // CA from the chain the server presents, keeps it because it matches the pin, and
        // writes the pin to the config.
        .arg("--json")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let reg = tokio::time::timeout(REGISTER_DEADLINE, reg)
        .await
        .map_err(|_| Error::Internal("runos register did not finish in time".into()))?
        .map_err(|e| Error::io(agent_bin, e))?;
    if !reg.status.success() {
        println!(
            "register failed ({}):\n{}",
            reg.status,
            String::from_utf8_lossy(&reg.stderr)
        );
        return Ok(false);
    }
    let out = String::from_utf8_lossy(&reg.stdout);
    let node_id = serde_json::from_str::<Value>(out.trim())
        .ok()
        .and_then(|v| v.get("nodeId").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_else(|| out.trim().to_string());
    let node_id = api.resolve_node(&node_id)?;
    println!("registered node {node_id}");
    // The pin came from the token; register kept it in the configuration.
    let written = std::fs::read_to_string(&config).map_err(|e| Error::io(&config, e))?;
    if !written.contains(&format!("l1_ca_sha256 = \"{pin}\"")) {
        println!(
            "register did not record the CA pin {pin} in {}",
            config.display()
        );
        return Ok(false);
    }
    println!(
        "no CA file was given: register took the CA the server presented because it matches the \
         token's pin, which is now server.l1_ca_sha256 in the configuration"
    );

    let log_path = agent_dir.join("agent.log");
    let log = std::fs::File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
    println!(
        "$ runos --config {} agent   (log: {})",
        config.display(),
        log_path.display()
    );
    let mut agent = Command::new(agent_bin)
        .arg("--config")
        .arg(&config)
        .arg("agent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::io(agent_bin, e))?;

    // Wait until the node is online (polling a condition, with a deadline).
    let deadline = tokio::time::Instant::now() + ONLINE_DEADLINE;
    while !api.is_online(&node_id) {
        if let Ok(Some(status)) = agent.try_wait() {
            println!("the agent exited early: {status}");
            return Ok(false);
        }
        if tokio::time::Instant::now() >= deadline {
            println!("the agent did not come online within {ONLINE_DEADLINE:?}");
            let _ = agent.kill().await;
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("node is online\n");

    let mut passed = 0usize;
    let all = steps();
    for step in &all {
        println!("==> {} {}", step.kind, step.payload);
        let req = SendRequest {
            node: node_id.clone(),
            kind: step.kind.to_string(),
            payload: Some(step.payload.clone()),
            raw_b64: None,
            timeout_ms: None,
        };
        match api.send_and_wait(&req, REPLY_DEADLINE).await {
            Ok(r) => {
                println!("<== {} (tag {})", r.kind, r.tag);
                print!("{}", describe(&r));
                if (step.check)(&r) {
                    passed += 1;
                    println!("    ok: {}\n", step.expect);
                } else {
                    println!("    UNEXPECTED: wanted {}\n", step.expect);
                }
            }
            Err(e) => println!(
                "<== no reply: {e}\n    UNEXPECTED: wanted {}\n",
                step.expect
            ),
        }
    }

    // Online certificate renewal: through the running agent, on its live session.
    let serial = || -> Option<String> {
        let cert = std::fs::read(agent_dir.join("node.crt")).ok()?;
        let der = runos_transport::pem::certificates(&cert)
            .ok()?
            .into_iter()
            .next()?;
        runos_transport::identity::cert_info(&der)
            .ok()
            .map(|i| i.serial_hex)
    };
    let before = serial();
    println!(
        "$ runos --config {} certificate renew --json",
        config.display()
    );
    let renew = Command::new(agent_bin)
        .arg("--config")
        .arg(&config)
        .args(["certificate", "renew", "--json"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let renewed = match tokio::time::timeout(REGISTER_DEADLINE, renew).await {
        Ok(Ok(out)) if out.status.success() => {
            let after = serial();
            let status_ok = api
                .send_and_wait(
                    &SendRequest {
                        node: node_id.clone(),
                        kind: "GET_NODE_STATUS".into(),
                        payload: Some(json!({})),
                        raw_b64: None,
                        timeout_ms: None,
                    },
                    REPLY_DEADLINE,
                )
                .await
                .is_ok_and(|r| r.kind == "NODE_STATUS");
            println!(
                "    certificate serial {} -> {}; the agent reconnected with the new key{}",
                before.as_deref().unwrap_or("?"),
                after.as_deref().unwrap_or("?"),
                if status_ok {
                    " and answers instructions"
                } else {
                    ", but GET_NODE_STATUS failed"
                }
            );
            let ok = status_ok && after.is_some() && after != before;
            println!(
                "    {}\n",
                if ok {
                    "ok: renewed online"
                } else {
                    "UNEXPECTED: wanted a new serial and a working session"
                }
            );
            ok
        }
        Ok(Ok(out)) => {
            println!(
                "    UNEXPECTED: renew failed ({}): {}\n",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        _ => {
            println!("    UNEXPECTED: renew did not finish in time\n");
            false
        }
    };

    let mut stopped_ok = false;
    match agent.id() {
        Some(pid) if sigterm(pid).await => {
            match tokio::time::timeout(AGENT_STOP_DEADLINE, agent.wait()).await {
                Ok(Ok(status)) => {
                    stopped_ok = status.success();
                    println!("agent stopped on SIGTERM: {status}");
                }
                Ok(Err(e)) => println!("waiting for the agent failed: {e}"),
                Err(_) => {
                    println!("the agent did not stop within {AGENT_STOP_DEADLINE:?}; killed");
                    let _ = agent.kill().await;
                }
            }
        }
        _ => {
            println!("could not send SIGTERM to the agent; killed");
            let _ = agent.kill().await;
        }
    }
    println!(
        "\nsummary: {passed}/{} replies as expected; certificate {}; agent {}",
        all.len(),
        if renewed {
            "renewed online"
        } else {
            "NOT renewed"
        },
        if stopped_ok {
            "exited cleanly"
        } else {
            "did NOT exit cleanly"
        }
    );
    Ok(passed == all.len() && renewed && stopped_ok)
}
