//! `runos journal [--tag T] [--limit N] [--json]`: recent instructions and their outcomes, asked
//! of the running daemon over the admin socket ([`crate::daemon::admin`], op `journal`).
//!
//! Exit codes: 0; [`Exit::Failure`] (1) when `--tag` names no journal entry (or the daemon
//! refused the request); [`Exit::NotRunning`] (9) when no daemon answers on the socket. A
//! malformed tag or limit is a usage error (2), caught by the command line parser.

use serde_json::{Value, json};

use crate::cli::report_error as fail;
use crate::config::Config;
use crate::exit::Exit;
use crate::util::admin_client::{AdminError, request};

/// A duration in ms, compact.
fn duration(v: &Value) -> String {
    match v.as_u64() {
        None => "-".into(),
        Some(ms) if ms < 10_000 => format!("{ms}ms"),
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
    }
}

/// The outcome column: the error code of an `ERROR`, else the reply type, else `-`.
fn outcome(e: &Value) -> String {
    e["errorCode"]
        .as_str()
        .or_else(|| e["replyType"].as_str())
        .unwrap_or("-")
        .to_string()
}

/// The human table, newest first.
pub fn table(entries: &[Value]) -> String {
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|e| {
            [
                s(&e["acceptedAt"]),
                s(&e["tag"]),
                s(&e["type"]),
                s(&e["state"]),
                duration(&e["durationMs"]),
                outcome(e),
            ]
        })
        .collect();
    let head = ["ACCEPTED", "TAG", "TYPE", "STATE", "DURATION", "OUTCOME"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 6]| -> String {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                l += c;
            } else {
                l += &format!("{c:<w$}  ");
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut o = line(head);
    for r in &rows {
        o += &line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
    o
}

/// One entry in full (for `--tag`).
pub fn detail(e: &Value) -> String {
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let mut o = String::new();
    for (k, v) in [
        ("tag", s(&e["tag"])),
        ("type", s(&e["type"])),
        ("payload sha256", s(&e["payloadSha256"])),
        ("state", s(&e["state"])),
        ("accepted", s(&e["acceptedAt"])),
        ("started", s(&e["startedAt"])),
        ("finished", s(&e["finishedAt"])),
        ("acked", s(&e["ackedAt"])),
        ("duration", duration(&e["durationMs"])),
        ("reply type", s(&e["replyType"])),
        ("error code", s(&e["errorCode"])),
    ] {
        o += &format!("{:<16}{v}\n", format!("{k}:"));
    }
    o
}

/// Run `runos journal`; prints the entries and returns the exit code.
pub fn run(cfg: &Config, tag: Option<runos_protocol::Tag>, limit: usize, json_out: bool) -> Exit {
    let socket = cfg.paths.admin_socket();
    let mut req = json!({"op": "journal", "limit": limit});
    if let Some(t) = tag {
        req["tag"] = json!(t.to_string());
    }
    let v = match request(&socket, &req) {
        Ok(v) => v,
        Err(AdminError::NotRunning(e)) => {
            return fail(
                json_out,
                Exit::NotRunning,
                &format!("the agent is not running (no answer on the admin socket: {e})"),
            );
        }
        Err(AdminError::Refused(e)) => return fail(json_out, Exit::Failure, &e),
    };
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    if let Some(t) = tag
        && entries.is_empty()
    {
        return fail(
            json_out,
            Exit::Failure,
            &format!("no journal entry for {t}"),
        );
    }
    if json_out {
        println!("{}", json!({"entries": entries, "exitCode": 0}));
    } else if tag.is_some() {
        print!("{}", entries.iter().map(detail).collect::<String>());
    } else {
        print!("{}", table(&entries));
    }
    Exit::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(code: Option<&str>) -> Value {
        json!({
            "tag": "3f2a3c9e-0000-4000-8000-000000000000",
            "type": "RUN_COMMAND",
            "payloadSha256": "ab".repeat(32),
            "state": "acked",
            "acceptedAt": "2026-01-01T00:00:00Z",
            "startedAt": "2026-01-01T00:00:00Z",
            "finishedAt": "2026-01-01T00:00:01Z",
            "ackedAt": null,
            "durationMs": 12,
            "replyType": if code.is_some() { "ERROR" } else { "RUN_COMMAND_RESPONSE" },
            "errorCode": code,
        })
    }

    #[test]
    fn table_and_detail() {
        let t = table(&[entry(None), entry(Some("timeout"))]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ACCEPTED"), "{t}");
        assert!(lines[1].ends_with("12ms      RUN_COMMAND_RESPONSE"), "{t}");
        assert!(lines[2].ends_with("timeout"), "{t}");
        let d = detail(&entry(Some("timeout")));
        assert!(d.contains("error code:     timeout"), "{d}");
        assert!(d.contains("acked:          -"), "{d}");
        assert_eq!(duration(&json!(12_345)), "12.3s");
    }
}
