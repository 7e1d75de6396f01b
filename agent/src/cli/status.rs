//! `runos status [--json]`: asks the running daemon over the admin socket ([`crate::daemon::admin`]) and
//! reads the certificate itself (so its expiry is reported even when the daemon is down).
//!
//! Exit codes: 0 healthy; [`Exit::Degraded`] (8) when disconnected for more than
//! [`DEGRADED_AFTER`], revoked, or the certificate is expired or unreadable;
//! [`Exit::NotRunning`] (9) when no daemon answers on the socket (what can be known, the
//! certificate, is still printed).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::config::Config;
use crate::exit::Exit;
use crate::util::admin_client::{AdminError, request};
use crate::util::time::rfc3339_secs;

/// Disconnected (or connecting) for longer than this is degraded.
pub const DEGRADED_AFTER: Duration = Duration::from_secs(5 * 60);
/// A certificate expiring within this is reported with a warning (not degraded).
pub const CERT_WARN_WITHIN: Duration = Duration::from_secs(24 * 3600);

/// The time certificate validity is judged at, in seconds since the Unix epoch, and by whose
/// clock: the control plane's (`now` corrected by the daemon's measured clock offset, in ms,
/// server − node) when an offset is known, else the node's own.
pub fn judged_now(now: SystemTime, offset_ms: Option<i64>) -> (i64, &'static str) {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    match offset_ms {
        Some(o) => (now_ms.saturating_add(o).div_euclid(1000), "server"),
        None => (now_ms.div_euclid(1000), "local"),
    }
}

/// The certificate part of the status, read from `paths.certificate` and judged at `now`
/// corrected by `offset_ms` (see [`judged_now`]).
pub fn certificate(path: &Path, now: SystemTime, offset_ms: Option<i64>) -> Value {
    match crate::credentials::read_certificate(path) {
        Ok(info) => {
            let (now_s, judged_by) = judged_now(now, offset_ms);
            json!({
                "path": path.display().to_string(),
                "notAfter": rfc3339_secs(info.not_after),
                "expiresInSecs": info.not_after.saturating_sub(now_s),
                "expired": info.not_after <= now_s,
                "judgedBy": judged_by,
            })
        }
        Err(e) => json!({
            "path": path.display().to_string(),
            "error": format!("cannot read the certificate: {e}"),
        }),
    }
}

/// Ask the daemon at `socket` for its status. `Err` when no daemon answers.
pub fn query(socket: &Path) -> Result<Value, String> {
    match request(socket, &json!({"op": "status"})) {
        Ok(v) => Ok(v),
        Err(AdminError::NotRunning(e) | AdminError::Refused(e)) => Err(e),
    }
}

/// Judge a full status: `(degraded reasons, warnings)`.
pub fn judge(v: &Value) -> (Vec<String>, Vec<String>) {
    let mut degraded = Vec::new();
    let mut warnings = Vec::new();
    let cert = &v["certificate"];
    if cert["expired"] == json!(true) {
        degraded.push("the certificate has expired: re-register the node".to_string());
    } else if let Some(e) = cert["error"].as_str() {
        degraded.push(e.to_string());
    } else if let Some(secs) = cert["expiresInSecs"].as_i64()
        && secs < i64::try_from(CERT_WARN_WITHIN.as_secs()).unwrap_or(i64::MAX)
    {
        warnings.push(format!("the certificate expires in {} h", secs / 3600));
    }
    if let Some(off) = v["clockOffsetMs"].as_i64()
        && crate::daemon::status::clock_offset_exceeds(off)
    {
        warnings.push(format!(
            "{} (more than {} s); certificate validity is judged with the control plane's time",
            crate::daemon::status::clock_offset_text(off),
            crate::daemon::status::MAX_CLOCK_OFFSET.as_secs()
        ));
    }
    let r = &v["renewal"];
    if r["state"] == json!("failing") {
        warnings.push(format!(
            "certificate renewal is failing ({} attempts; last: {}); the current certificate stays in use until it expires",
            r["failures"],
            r["lastError"].as_str().unwrap_or("-")
        ));
    }
    if let Some(n) = v["sessionPanics"].as_u64()
        && n > 0
    {
        warnings.push(format!(
            "{n} session(s) ended with a panic, a bug in the agent (it reconnected each time; last: {}); please report it",
            v["lastSessionPanic"]["message"].as_str().unwrap_or("-")
        ));
    }
    let conn = &v["connection"];
    match conn["state"].as_str() {
        Some("revoked") => degraded.push("the control plane revoked this node".into()),
        Some("connecting" | "disconnected") => {
            let secs = conn["offlineForSecs"].as_u64().unwrap_or(0);
            if secs > DEGRADED_AFTER.as_secs() {
                degraded.push(format!(
                    "disconnected for {secs} s (more than {} s)",
                    DEGRADED_AFTER.as_secs()
                ));
            }
        }
        _ => {}
    }
    (degraded, warnings)
}

fn human(v: &Value) -> String {
    let mut o = String::new();
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    if v["running"] == json!(true) {
        o += &format!(
            "agent:          running (version {}, pid {}, since {})\n",
            s(&v["agentVersion"]),
            v["pid"],
            s(&v["startedAt"])
        );
        let c = &v["connection"];
        let mut line = format!(
            "connection:     {} since {}",
            s(&c["state"]),
            s(&c["since"])
        );
        if let Some(srv) = c["server"].as_str() {
            line += &format!(" ({srv})");
        }
        o += &line;
        o += "\n";
        if let Some(e) = c["lastError"].as_str() {
            o += &format!("last error:     {e}\n");
        }
        if let Some(m) = c["message"].as_str() {
            o += &format!("revoked:        {m}\n");
        }
        o += &format!("last round trip: {}\n", s(&v["lastRoundTrip"]));
        o += &match v["clockOffsetMs"].as_i64() {
            Some(off) => format!("clock offset:   {off:+} ms (control plane − node)\n"),
            None => "clock offset:   - (never connected)\n".to_string(),
        };
        let ov = &v["overlay"];
        if ov["managed"] == json!(true) {
            o += &format!(
                "overlay:        {}, generation {}, {} peer(s), {} (runos vpn status)\n",
                s(&ov["interface"]),
                ov["generation"]
                    .as_i64()
                    .map_or("none".to_string(), |g| g.to_string()),
                ov["peers"],
                match ov["vipHeld"].as_i64() {
                    Some(g) => format!("VIP held (generation {g})"),
                    None => "VIP not held".to_string(),
                }
            );
        } else if ov.is_object() {
            o += "overlay:        not set up (no SET_VPN_PEERS yet)\n";
        }
        if let Some(n) = v["sessionPanics"].as_u64()
            && n > 0
        {
            let p = &v["lastSessionPanic"];
            o += &format!(
                "session panics: {n} (last at {}: {})\n",
                s(&p["at"]),
                s(&p["message"])
            );
        }
    } else {
        o += &format!(
            "agent:          NOT RUNNING (no answer on the admin socket: {})\n",
            s(&v["reason"])
        );
    }
    let c = &v["certificate"];
    match c["error"].as_str() {
        Some(e) => o += &format!("certificate:    {e}\n"),
        None => {
            o += &format!(
                "certificate:    valid until {}{} (judged by {} time)\n",
                s(&c["notAfter"]),
                if c["expired"] == json!(true) {
                    " (EXPIRED)"
                } else {
                    ""
                },
                s(&c["judgedBy"])
            )
        }
    }
    if v["running"] == json!(true) {
        let r = &v["renewal"];
        let mut line = format!("renewal:        {}", s(&r["state"]));
        if let Some(t) = r["nextAttemptAt"].as_str() {
            line += &format!(", next at {t}");
        }
        if let Some(t) = r["lastRenewedAt"].as_str() {
            line += &format!(", last renewed {t}");
        }
        if r["state"] == json!("failing") {
            line += &format!(
                " ({} failures; last: {})",
                r["failures"],
                r["lastError"].as_str().unwrap_or("-")
            );
        }
        o += &line;
        o += "\n";
        let list = |x: &Value| -> Vec<String> {
            x.as_array()
                .map(|a| {
                    a.iter()
                        .map(|t| {
                            let mut l = format!("  {} {}", s(&t["tag"]), s(&t["type"]));
                            if let Some(at) = t["startedAt"].as_str() {
                                l += &format!(" (started {at})");
                            }
                            l
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        o += &format!("in flight:      {}\n", v["counts"]["inFlight"]);
        for l in list(&v["inFlight"]) {
            o += &l;
            o += "\n";
        }
        o += &format!("queued:         {}\n", v["counts"]["queued"]);
        for l in list(&v["queued"]) {
            o += &l;
            o += "\n";
        }
        o += "journal:        ";
        o += &(if v["journal"].is_null() {
            "-".to_string()
        } else {
            format!(
                "{} entries, {} bytes",
                v["journal"]["records"], v["journal"]["bytes"]
            )
        });
        o += "\n";
        let errs = v["recentErrors"].as_array().cloned().unwrap_or_default();
        o += &format!("recent errors:  {}\n", errs.len());
        for e in errs {
            o += &format!(
                "  {} {} {}\n",
                s(&e["at"]),
                s(&e["level"]),
                s(&e["message"])
            );
        }
    }
    if let Some(u) = v["lastUpdate"].as_object() {
        o += &format!(
            "last update:    {} -> {}: {} at {} ({})\n",
            s(&u["from"]),
            s(&u["to"]),
            s(&u["outcome"]),
            s(&u["time"]),
            s(&u["message"])
        );
    }
    for w in v["warnings"].as_array().into_iter().flatten() {
        o += &format!("warning:        {}\n", s(w));
    }
    for d in v["degraded"].as_array().into_iter().flatten() {
        o += &format!("DEGRADED:       {}\n", s(d));
    }
    o
}

/// The last update's outcome from `<state_dir>/update.json` (`null` when none; an object with
/// `error` when the file is unreadable).
pub fn last_update(state_dir: &Path) -> Value {
    match crate::update::state::UpdateState::load(state_dir) {
        Ok(st) => st.last.map_or(Value::Null, |l| json!(l)),
        Err(e) => json!({"error": e}),
    }
}

/// Run `runos status`; prints the report and returns the exit code.
pub fn run(cfg: &Config, json_out: bool) -> Exit {
    let socket = cfg.paths.admin_socket();
    let now = SystemTime::now();
    let (mut v, exit) = match query(&socket) {
        Ok(mut v) => {
            v["running"] = json!(true);
            // An offset beyond the bound is not acted on: the node's own clock judges.
            let offset = v["clockOffsetMs"]
                .as_i64()
                .filter(|o| crate::daemon::status::clock_offset_trusted(*o));
            v["certificate"] = certificate(&cfg.paths.certificate, now, offset);
            (v, Exit::Ok)
        }
        Err(e) => (
            json!({
                "agentVersion": crate::agent_version(),
                "running": false,
                "reason": e,
                "connection": null,
                "lastRoundTrip": null,
                "clockOffsetMs": null,
                "certificate": certificate(&cfg.paths.certificate, now, None),
                "inFlight": null,
                "queued": null,
                "journal": null,
                "recentErrors": null,
            }),
            Exit::NotRunning,
        ),
    };
    v["lastUpdate"] = last_update(&cfg.paths.state_dir);
    let (degraded, warnings) = judge(&v);
    let exit = match exit {
        Exit::Ok if !degraded.is_empty() => Exit::Degraded,
        e => e,
    };
    v["degraded"] = json!(degraded);
    v["warnings"] = json!(warnings);
    v["exitCode"] = json!(exit.code());
    if json_out {
        println!("{v}");
    } else {
        print!("{}", human(&v));
    }
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degraded_rules() {
        let ok = json!({"connection": {"state": "connected"}, "certificate": {"expired": false, "expiresInSecs": 999_999}});
        assert_eq!(judge(&ok), (vec![], vec![]));
        let soon = json!({"connection": {"state": "connected"}, "certificate": {"expired": false, "expiresInSecs": 3600}});
        let (d, w) = judge(&soon);
        assert!(d.is_empty());
        assert_eq!(w.len(), 1);
        let expired = json!({"connection": {"state": "connected"}, "certificate": {"expired": true, "expiresInSecs": -5}});
        assert_eq!(judge(&expired).0.len(), 1);
        let short = json!({"connection": {"state": "disconnected", "offlineForSecs": 60}, "certificate": {"expired": false, "expiresInSecs": 999_999}});
        assert!(judge(&short).0.is_empty());
        let long = json!({"connection": {"state": "connecting", "offlineForSecs": DEGRADED_AFTER.as_secs() + 1}, "certificate": {"expired": false, "expiresInSecs": 999_999}});
        assert_eq!(judge(&long).0.len(), 1);
        let revoked = json!({"connection": {"state": "revoked"}, "certificate": {"expired": false, "expiresInSecs": 999_999}});
        assert_eq!(judge(&revoked).0.len(), 1);
        // A caught session panic is a warning, not degraded (the agent reconnected).
        let panicked = json!({"connection": {"state": "connected"}, "sessionPanics": 1,
            "lastSessionPanic": {"at": "t", "message": "boom"},
            "certificate": {"expired": false, "expiresInSecs": 999_999}});
        let (d, w) = judge(&panicked);
        assert!(d.is_empty());
        assert!(w.len() == 1 && w[0].contains("boom"), "{w:?}");
        assert!(human(&json!({"running": true, "sessionPanics": 1, "lastSessionPanic": {"at": "t", "message": "boom"}})).contains("session panics: 1 (last at t: boom)"));
    }

    #[test]
    fn judged_now_uses_the_offset() {
        let now = UNIX_EPOCH + Duration::from_millis(1_800_000_000_500);
        assert_eq!(judged_now(now, None), (1_800_000_000, "local"));
        assert_eq!(judged_now(now, Some(120_000)), (1_800_000_120, "server"));
        assert_eq!(judged_now(now, Some(-1_000)), (1_799_999_999, "server"));
        assert_eq!(judged_now(now, Some(-600)), (1_799_999_999, "server"));
    }

    #[test]
    fn clock_skew_is_a_warning() {
        let sent = 1_800_000_000_000;
        let skewed = crate::daemon::status::clock_offset_ms(sent + 120_000 + 40, sent, 80);
        assert_eq!(skewed, 120_000);
        let v = json!({"connection": {"state": "connected"}, "clockOffsetMs": skewed, "certificate": {"expired": false, "expiresInSecs": 999_999}});
        let (d, w) = judge(&v);
        assert!(d.is_empty());
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("behind") && w[0].contains("120 s"), "{w:?}");
        let fine = json!({"connection": {"state": "connected"}, "clockOffsetMs": 3, "certificate": {"expired": false, "expiresInSecs": 999_999}});
        assert_eq!(judge(&fine), (vec![], vec![]));
    }

    #[test]
    fn certificate_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.pem");
        let mut params = rcgen::CertificateParams::new(vec!["n".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(&p, cert.pem()).unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000); // 2027
        let v = certificate(&p, at, None);
        assert_eq!(v["notAfter"], "2030-01-01T00:00:00Z");
        assert_eq!(v["expired"], false);
        assert_eq!(v["judgedBy"], "local");
        assert!(v["expiresInSecs"].as_i64().unwrap() > 0);
        let later = UNIX_EPOCH + Duration::from_secs(1_950_000_000); // 2031
        assert_eq!(certificate(&p, later, None)["expired"], true);
        assert!(certificate(&dir.path().join("none"), at, None)["error"].is_string());

        // Judged by server time: 120 s before notAfter by the local clock, but the control
        // plane's clock is 120 s + 1 s ahead: expired.
        let not_after = 1_893_456_000; // 2030-01-01T00:00:00Z
        let local = UNIX_EPOCH + Duration::from_secs(not_after - 120);
        let v = certificate(&p, local, None);
        assert_eq!(
            (v["expired"].clone(), v["expiresInSecs"].clone()),
            (json!(false), json!(120))
        );
        let v = certificate(&p, local, Some(121_000));
        assert_eq!(v["judgedBy"], "server");
        assert_eq!(v["expired"], true);
        assert_eq!(v["expiresInSecs"], -1);
        // A node clock 120 s ahead (server behind): more time left by the server's clock.
        assert_eq!(certificate(&p, local, Some(-120_000))["expiresInSecs"], 240);
    }

    #[test]
    fn no_daemon_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(query(&dir.path().join("admin.sock")).is_err());
    }
}
