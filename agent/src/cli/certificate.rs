//! `runos certificate status [--json]`: the node certificate, read from `paths.certificate`
//! (works without the daemon). Its remaining validity is judged with the control plane's time
//! when the running daemon reports a clock offset ([`crate::daemon::status`]), else with the local
//! clock (silently).
//!
//! Exit codes: 0 valid; [`Exit::Degraded`] (8) expired; [`Exit::NotRegistered`] (3) when the
//! certificate file is missing or unreadable.

use std::path::Path;
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::cli::status::judged_now;
use crate::config::Config;
use crate::credentials::read_certificate;
use crate::exit::Exit;
use crate::util::time::rfc3339_secs;

/// The percentage of the validity period `[not_before, not_after]` used at `now_s` (0 to 100,
/// one decimal).
pub fn lifetime_used_percent(not_before: i64, not_after: i64, now_s: i64) -> f64 {
    let total = not_after.saturating_sub(not_before);
    if total <= 0 {
        return 100.0;
    }
    let used = now_s.saturating_sub(not_before).clamp(0, total);
    // Both fit f64 exactly for any realistic validity period.
    let pct = used as f64 * 100.0 / total as f64;
    (pct * 10.0).round() / 10.0
}

/// A duration in seconds as `Nd Nh Nm` (largest units first, at least minutes).
pub fn human_secs(secs: i64) -> String {
    let s = secs.unsigned_abs();
    let (d, h, m) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60);
    if d > 0 {
        format!("{d} d {h} h {m} min")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min {} s", s % 60)
    } else {
        format!("{s} s")
    }
}

/// The report of the certificate at `path`, judged at `now` corrected by `offset_ms` (the
/// daemon's clock offset, server − node). `Err` when the file is missing or unreadable.
pub fn report(
    path: &Path,
    ca_file: &Path,
    now: SystemTime,
    offset_ms: Option<i64>,
) -> Result<Value, String> {
    let info = read_certificate(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (now_s, judged_by) = judged_now(now, offset_ms);
    let expires_in = info.not_after.saturating_sub(now_s);
    Ok(json!({
        "nodeId": info.node_id,
        "serial": info.serial_hex,
        "notBefore": rfc3339_secs(info.not_before),
        "notAfter": rfc3339_secs(info.not_after),
        "lifetimeUsedPercent": lifetime_used_percent(info.not_before, info.not_after, now_s),
        "expiresInSecs": expires_in,
        "expired": info.not_after <= now_s,
        "judgedBy": judged_by,
        "clockOffsetMs": offset_ms,
        "path": path.display().to_string(),
        "caFile": ca_file.display().to_string(),
    }))
}

/// The exit code for a report: 8 when expired, else 0.
pub fn exit_of(v: &Value) -> Exit {
    if v["expired"] == json!(true) {
        Exit::Degraded
    } else {
        Exit::Ok
    }
}

fn human(v: &Value) -> String {
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let secs = v["expiresInSecs"].as_i64().unwrap_or(0);
    let expires = if v["expired"] == json!(true) {
        format!("EXPIRED {} ago", human_secs(secs))
    } else {
        human_secs(secs)
    };
    let judged = match v["clockOffsetMs"].as_i64() {
        Some(off) => format!("server time (clock offset {off:+} ms)"),
        None => "local time (the agent daemon reports no clock offset)".to_string(),
    };
    format!(
        "node id:        {}\n\
         serial:         {}\n\
         not before:     {}\n\
         not after:      {}\n\
         lifetime used:  {} %\n\
         expires in:     {expires}\n\
         judged by:      {judged}\n\
         certificate:    {}\n\
         CA file:        {}\n",
        s(&v["nodeId"]),
        s(&v["serial"]),
        s(&v["notBefore"]),
        s(&v["notAfter"]),
        v["lifetimeUsedPercent"],
        s(&v["path"]),
        s(&v["caFile"]),
    )
}

/// Run `runos certificate status`; prints the report and returns the exit code.
pub fn run(cfg: &Config, json_out: bool) -> Exit {
    // The daemon's clock offset, when it runs and has one; silently none otherwise.
    let socket = cfg.paths.admin_socket();
    let offset = crate::cli::status::query(&socket)
        .ok()
        .and_then(|v| v["clockOffsetMs"].as_i64())
        // An offset beyond the bound is not acted on: the node's own clock judges.
        .filter(|o| crate::daemon::status::clock_offset_trusted(*o));
    match report(
        &cfg.paths.certificate,
        &cfg.paths.ca,
        SystemTime::now(),
        offset,
    ) {
        Ok(mut v) => {
            let exit = exit_of(&v);
            v["exitCode"] = json!(exit.code());
            if json_out {
                println!("{v}");
            } else {
                print!("{}", human(&v));
                if exit == Exit::Degraded {
                    println!("the certificate has expired: re-register the node");
                }
            }
            exit
        }
        Err(e) => {
            let exit = Exit::NotRegistered;
            let message = format!(
                "cannot read the node certificate {e}; run `runos register` to enrol this node"
            );
            eprintln!("runos: error: {message}");
            if json_out {
                println!("{}", json!({"error": message, "exitCode": exit.code()}));
            }
            exit
        }
    }
}

/// The exit code of a renewal failure.
pub fn renew_exit(e: &crate::credentials::renew::RenewError) -> Exit {
    use crate::credentials::renew::RenewError;
    match e {
        RenewError::Unreachable(_) => Exit::Unreachable,
        RenewError::Tls(_) => Exit::Tls,
        RenewError::Revoked(_) => Exit::Refused,
        RenewError::Failed(_) | RenewError::Busy(_) => Exit::Failure,
    }
}

fn renew_code_exit(code: &str) -> Exit {
    match code {
        "unreachable" => Exit::Unreachable,
        "tls" => Exit::Tls,
        "revoked" => Exit::Refused,
        _ => Exit::Failure,
    }
}

/// Renew without a daemon: take the agent's lock, open a probe session with the current
/// identity, RENEW, and switch to the new set once it is proven.
/// The outcome and the promoted renewal's cross-certificate (for the L1Sec pin).
async fn renew_direct(
    cfg: &Config,
) -> Result<(crate::credentials::renew::Outcome, Option<String>), (Exit, String)> {
    use crate::credentials::renew::{self, Probe};
    let _lock = crate::util::lock::acquire(&cfg.paths.lock_file()).map_err(|e| match e {
        crate::util::lock::LockError::Held(p) => (
            Exit::Locked,
            format!(
                "a runos agent holds {} but its admin socket does not answer; check it with `systemctl status runos`",
                p.display()
            ),
        ),
        other => (Exit::Failure, other.to_string()),
    })?;
    crate::credentials::recover(&cfg.paths).map_err(|e| {
        (
            Exit::Failure,
            format!("cannot finish an interrupted credential switch: {e}"),
        )
    })?;
    let id = crate::credentials::identity::load(cfg)
        .map_err(|e| (Exit::NotRegistered, e.to_string()))?;
    let err = |e: renew::RenewError| (renew_exit(&e), e.to_string());
    let max_frame = cfg.agent.max_frame_bytes;
    let mut probe = Probe::open(&id, max_frame).await.map_err(err)?;
    let (key_pem, csr_pem, public_key) = renew::new_request().map_err(err)?;
    let answer = probe.renew(csr_pem).await;
    probe.close().await;
    let acc = renew::check_renewed(
        &answer.map_err(err)?,
        &id,
        key_pem,
        &public_key,
        renew::judging_now_s(0), // a CLI process has no measured clock offset
    )
    .map_err(err)?;
    let out = renew::switch_to(
        acc.set,
        cfg.paths.clone(),
        id.host.clone(),
        id.port,
        max_frame,
        Some(id.serial_hex.clone()),
    )
    .await
    .map_err(err)?;
    // For the L1Sec pin ([`renew::follow_ca_logged`]).
    Ok((out, acc.endorsement))
}

/// Run `runos certificate renew`: through the daemon when it answers, else directly.
pub fn renew(
    cfg: &Config,
    config_path: &Path,
    json_out: bool,
    rt: &tokio::runtime::Runtime,
) -> Exit {
    let socket = cfg.paths.admin_socket();
    let wait = crate::daemon::admin::RENEW_WAIT + std::time::Duration::from_secs(5);
    // Directly only when no agent listens at all: an agent that stops answering midway may
    // still be switching, and must not be raced.
    let listening = std::os::unix::net::UnixStream::connect(&socket).is_ok();
    let (result, via) = if listening {
        let r = match crate::util::admin_client::talk_with(&socket, &json!({"op": "renew"}), wait) {
            Ok(v) => match v.get("error").and_then(Value::as_str) {
                None => Ok(v),
                Some(e) => Err((
                    renew_code_exit(v["code"].as_str().unwrap_or("failed")),
                    e.to_string(),
                )),
            },
            Err(e) => Err((
                Exit::Failure,
                format!(
                    "the running agent did not answer ({e}); see `runos status` for the renewal state"
                ),
            )),
        };
        (r, "agent")
    } else {
        let r = rt.block_on(renew_direct(cfg)).map(|(o, endorsement)| {
            crate::credentials::renew::follow_ca_logged(config_path, endorsement, 0);
            o.to_json()
        });
        (r, "direct")
    };
    match result {
        Ok(mut v) => {
            v["via"] = json!(via);
            v["exitCode"] = json!(Exit::Ok.code());
            if json_out {
                println!("{v}");
            } else {
                println!(
                    "renewed: serial {}, valid until {} ({})",
                    v["serial"].as_str().unwrap_or("-"),
                    v["notAfter"].as_str().unwrap_or("-"),
                    if via == "agent" {
                        "by the running agent, which reconnected with it"
                    } else {
                        "no agent was running"
                    }
                );
            }
            Exit::Ok
        }
        Err((exit, message)) => {
            let message = format!(
                "the certificate was not renewed: {message}; the current certificate stays in use"
            );
            eprintln!("runos: error: {message}");
            if json_out {
                println!(
                    "{}",
                    json!({"error": message, "exitCode": exit.code(), "via": via})
                );
            }
            exit
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn lifetime_and_durations() {
        assert_eq!(lifetime_used_percent(0, 1000, 250), 25.0);
        assert_eq!(lifetime_used_percent(0, 1000, -5), 0.0);
        assert_eq!(lifetime_used_percent(0, 1000, 5000), 100.0);
        assert_eq!(lifetime_used_percent(10, 10, 0), 100.0);
        assert_eq!(lifetime_used_percent(0, 3, 1), 33.3);
        assert_eq!(human_secs(42), "42 s");
        assert_eq!(human_secs(-90), "1 min 30 s");
        assert_eq!(human_secs(3 * 86_400 + 2 * 3600 + 60), "3 d 2 h 1 min");
    }

    #[test]
    fn report_judges_expiry_with_server_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.pem");
        let mut params = rcgen::CertificateParams::new(vec!["n".into()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(format!(
                "{}node-7",
                runos_protocol::NODE_URI_PREFIX
            ))
            .unwrap(),
        ));
        params.not_before = rcgen::date_time_ymd(2029, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&p, params.self_signed(&key).unwrap().pem()).unwrap();
        let ca = dir.path().join("ca.pem");
        let not_after: u64 = 1_893_456_000; // 2030-01-01T00:00:00Z
        let local = UNIX_EPOCH + Duration::from_secs(not_after - 60);

        let v = report(&p, &ca, local, None).unwrap();
        assert_eq!(v["nodeId"], "node-7");
        assert_eq!(v["notBefore"], "2029-01-01T00:00:00Z");
        assert_eq!(v["notAfter"], "2030-01-01T00:00:00Z");
        assert_eq!(v["judgedBy"], "local");
        assert_eq!(v["expiresInSecs"], 60);
        assert_eq!(v["caFile"], ca.display().to_string());
        assert!(v["serial"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(exit_of(&v), Exit::Ok);
        assert!(human(&v).contains("node-7"));

        // The control plane's clock is 120 s ahead: by its time the certificate has expired.
        let v = report(&p, &ca, local, Some(120_000)).unwrap();
        assert_eq!(v["judgedBy"], "server");
        assert_eq!(v["expired"], true);
        assert_eq!(v["expiresInSecs"], -60);
        assert_eq!(v["lifetimeUsedPercent"], 100.0);
        assert_eq!(exit_of(&v), Exit::Degraded);
        assert!(human(&v).contains("EXPIRED"));

        assert!(report(&dir.path().join("none"), &ca, local, None).is_err());
    }
}
