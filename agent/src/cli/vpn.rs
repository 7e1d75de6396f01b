//! `runos vpn status [--json]`: the overlay as the running daemon sees it, over the admin socket
//! ([`crate::daemon::admin`], op `vpn`).
//!
//! Exit codes: 0; [`Exit::Failure`] (1) when a peer set is applied but the device cannot be read
//! (or the daemon refused the request); [`Exit::NotRunning`] (9) when no daemon answers.

use serde_json::{Value, json};

use crate::cli::report_error as fail;
use crate::config::Config;
use crate::exit::Exit;
use crate::util::admin_client::{AdminError, request};

/// Bytes, compact.
fn bytes(v: &Value) -> String {
    let n = v.as_u64().unwrap_or(0);
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// The human form.
pub fn text(v: &Value) -> String {
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let mut o = String::new();
    o += &format!("interface:   {}\n", s(&v["interface"]));
    o += &format!("backend:     {}\n", s(&v["backend"]));
    o += &format!("public key:  {}\n", s(&v["publicKey"]));
    o += &format!(
        "generation:  {}{}\n",
        v["generation"]
            .as_i64()
            .map_or("none".to_string(), |g| g.to_string()),
        if v["complete"].as_bool() == Some(true) {
            " (complete set)"
        } else {
            ""
        }
    );
    if let Some(e) = v["error"].as_str() {
        o += &format!("device:      cannot be read: {e}\n");
    }
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    o += &format!("peers:       {}\n", peers.len());
    for p in &peers {
        let hs = p["lastHandshakeSecsAgo"]
            .as_u64()
            .map_or("never".to_string(), |t| format!("{t} s ago"));
        let ips: Vec<String> = p["allowedIps"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        o += &format!(
            "  {}  endpoint {}  allowed {}  handshake {}  rx {}  tx {}\n",
            s(&p["pubKey"]),
            s(&p["endpoint"]),
            if ips.is_empty() {
                "-".into()
            } else {
                ips.join(",")
            },
            hs,
            bytes(&p["rxBytes"]),
            bytes(&p["txBytes"]),
        );
    }
    o
}

/// Run `runos vpn status`.
pub fn run(cfg: &Config, json_out: bool) -> Exit {
    let v = match request(&cfg.paths.admin_socket(), &json!({"op": "vpn"})) {
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
    // A device that cannot be read matters only once a set was applied (else: no overlay yet).
    let applied = !v["generation"].is_null() || !v["peers"].as_array().is_none_or(Vec::is_empty);
    let degraded = v["error"].is_string() && applied;
    let exit = if degraded { Exit::Failure } else { Exit::Ok };
    if json_out {
        let mut out = v.clone();
        out["exitCode"] = json!(exit.code());
        println!("{out}");
    } else {
        print!("{}", text(&v));
    }
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_form_shows_every_peer() {
        let v = json!({"interface": "wg0", "backend": "userspace", "publicKey": "K=",
            "generation": 3, "complete": true, "error": null,
            "peers": [{"pubKey": "P=", "endpoint": "10.0.0.2:51820", "allowedIps": ["10.99.0.2/32"],
                       "lastHandshakeSecsAgo": 4, "rxBytes": 2048, "txBytes": 10}]});
        let t = text(&v);
        assert!(t.contains("generation:  3 (complete set)"), "{t}");
        assert!(t.contains("P=  endpoint 10.0.0.2:51820  allowed 10.99.0.2/32  handshake 4 s ago  rx 2.0 KiB  tx 10 B"), "{t}");
    }
}
