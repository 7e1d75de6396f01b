//! Issue 10, finding 2: a renewal must not plant trust anchors or lock the node out. A hostile
//! control plane that holds the real control plane's server key (so the agent's TLS accepts
//! it), and even its CA key, sits on the agent's L2Sec port. It relays connections to the real
//! control plane until told to attack; then it answers the agent's `RENEW` itself:
//!
//! - a `RENEWED` whose bundle holds three CAs (the real one and two others);
//! - a `RENEWED` with an already expired certificate (right node, right key, real CA);
//! - a `WELCOME` four weeks ahead (which must not make the agent renew at once), followed by
//!   `RENEWED` answers from another CA: alone, as [real, other], and with a cross-certificate
//!   the other CA signed itself.
//!
//! The agent refuses each before staging, keeps its identity, trust and L1Sec pin, says why
//! in `runos status`, and keeps working with the real control plane (and renews with it).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use runos_e2e::{Agent, ControlPlane, DEADLINE, describe, wait_until};
use runos_protocol::Envelope;
use runos_protocol::control::{HeartbeatReply, Renew, Renewed, Welcome, types as ct};
use runos_transport::{FrameReader, FrameWriter, pem};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

const DAY_MS: u64 = 86_400_000;

/// What the hostile control plane does with the next connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    /// `RENEWED` with the bundle [real, X, Y].
    ThreeCas,
    /// `RENEWED` with an expired certificate from the real CA.
    Expired,
    /// `WELCOME` four weeks ahead, then `RENEWED` from another CA in three shapes (one per
    /// `RENEW`).
    FutureClockForeignCa,
}

#[derive(Default)]
struct Script {
    attacks: VecDeque<Attack>,
    /// Relayed connections, aborted to make the agent reconnect.
    relays: Vec<tokio::task::JoinHandle<()>>,
    /// What the hostile sessions saw: "welcome", "heartbeat", "renew".
    events: Vec<String>,
    /// Ends the hostile session in progress.
    close: bool,
}

type Shared = Arc<Mutex<Script>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn t(ms: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).unwrap()
}

fn foreign_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = t(now_ms() - DAY_MS);
    p.not_after = t(now_ms() + 3650 * DAY_MS);
    let key = KeyPair::generate().unwrap();
    let pem = p.self_signed(&key).unwrap().pem();
    (pem, Issuer::new(p, key))
}

/// A certificate for the CSR's key and `node`, from `issuer`, valid between the two times.
fn sign(csr: &str, node: &str, issuer: &Issuer<'_, KeyPair>, from: u64, to: u64) -> String {
    let mut req = CertificateSigningRequestParams::from_pem(csr).unwrap();
    req.params.distinguished_name = rcgen::DistinguishedName::new();
    req.params.distinguished_name.push(DnType::CommonName, node);
    req.params.subject_alt_names = vec![SanType::URI(
        format!("runos://node/{node}").try_into().unwrap(),
    )];
    req.params.not_before = t(from);
    req.params.not_after = t(to);
    req.signed_by(issuer).unwrap().pem()
}

struct Keys {
    /// The node id, once enrolled.
    node: Mutex<String>,
    real_ca_pem: String,
    real: Issuer<'static, KeyPair>,
    tls: Arc<rustls::ServerConfig>,
}

/// The answer to the `n`-th RENEW of `attack`.
fn answer(k: &Keys, attack: Attack, n: usize, csr: &str) -> Renewed {
    let now = now_ms();
    let good = (now - 30_000, now + 30 * DAY_MS);
    let node = k.node.lock().unwrap().clone();
    match attack {
        Attack::ThreeCas => {
            let (x, _) = foreign_ca("X");
            let (y, _) = foreign_ca("Y");
            Renewed {
                certificate_pem: sign(csr, &node, &k.real, good.0, good.1),
                ca_pem: format!("{}{x}{y}", k.real_ca_pem),
                ca_cross_pem: None,
            }
        }
        Attack::Expired => Renewed {
            certificate_pem: sign(csr, &node, &k.real, now - 40 * DAY_MS, now - 10 * DAY_MS),
            ca_pem: k.real_ca_pem.clone(),
            ca_cross_pem: None,
        },
        Attack::FutureClockForeignCa => {
            let (x, xi) = foreign_ca("X");
            // Valid by the hostile's clock, four weeks ahead.
            let ahead = now + 28 * DAY_MS;
            let cert = sign(csr, &node, &xi, ahead - 30_000, ahead + 30 * DAY_MS);
            match n {
                0 => Renewed {
                    certificate_pem: cert,
                    ca_pem: x,
                    ca_cross_pem: None,
                },
                1 => Renewed {
                    certificate_pem: cert,
                    ca_pem: format!("{}{x}", k.real_ca_pem),
                    ca_cross_pem: None,
                },
                _ => {
                    // A "cross-certificate" for X signed by X itself.
                    let mut p = CertificateParams::default();
                    p.distinguished_name.push(DnType::CommonName, "X");
                    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                    let cross = p.signed_by(xi.key(), &xi).unwrap().pem();
                    Renewed {
                        certificate_pem: cert,
                        ca_pem: x,
                        ca_cross_pem: Some(cross),
                    }
                }
            }
        }
    }
}

/// One hostile session: TLS with the real server identity, WELCOME (maybe from the future),
/// heartbeats answered, each RENEW answered per `attack`, until told to close.
async fn hostile(k: Arc<Keys>, tcp: TcpStream, attack: Attack, s: Shared) {
    let Ok(tls) = tokio_rustls::TlsAcceptor::from(k.tls.clone())
        .accept(tcp)
        .await
    else {
        return;
    };
    let (r, w) = tokio::io::split(tls);
    let max = runos_protocol::DEFAULT_MAX_FRAME_BYTES;
    let mut r = FrameReader::new(r, max);
    let mut w = FrameWriter::new(w, max);
    let skew = if attack == Attack::FutureClockForeignCa {
        28 * DAY_MS
    } else {
        0
    };
    let Ok(Some(hello)) = r.read().await else {
        return;
    };
    let welcome = Welcome {
        protocol_version: runos_protocol::PROTOCOL_VERSION,
        server_time_ms: now_ms() + skew,
        heartbeat_interval_ms: 1000,
        max_frame_bytes: max,
        advertised_agent_version: None,
        session_id: "hostile".into(),
    };
    if w.write(&Envelope::with_type(ct::WELCOME, hello.tag, &welcome))
        .await
        .is_err()
    {
        return;
    }
    s.lock().unwrap().events.push("welcome".into());
    let mut renews = 0;
    loop {
        if s.lock().unwrap().close {
            return;
        }
        let env = match tokio::time::timeout(Duration::from_millis(200), r.read()).await {
            Err(_) => continue,
            Ok(Ok(Some(env))) => env,
            Ok(_) => return,
        };
        let reply = if env.is(ct::HEARTBEAT) {
            s.lock().unwrap().events.push("heartbeat".into());
            Envelope::with_type(
                ct::HEARTBEAT_REPLY,
                env.tag,
                &HeartbeatReply {
                    server_time_ms: now_ms() + skew,
                },
            )
        } else if env.is(ct::RENEW) {
            s.lock().unwrap().events.push("renew".into());
            let req: Renew = env.payload().unwrap();
            let a = answer(&k, attack, renews, &req.csr_pem);
            renews += 1;
            Envelope::with_type(ct::RENEWED, env.tag, &a)
        } else {
            continue;
        };
        if w.write(&reply).await.is_err() {
            return;
        }
    }
}

/// The agent's L2Sec port: relays to the real control plane, or attacks.
async fn front(listener: TcpListener, real: std::net::SocketAddr, k: Arc<Keys>, s: Shared) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let next = s.lock().unwrap().attacks.pop_front();
        match next {
            Some(attack) => {
                s.lock().unwrap().close = false;
                tokio::spawn(hostile(k.clone(), tcp, attack, s.clone()));
            }
            None => {
                let h = tokio::spawn(async move {
                    let mut tcp = tcp;
                    if let Ok(mut up) = TcpStream::connect(real).await {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
                    }
                });
                s.lock().unwrap().relays.push(h);
            }
        }
    }
}

/// `line` without ANSI colour sequences.
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn events(s: &Shared, what: &str) -> usize {
    s.lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| *e == what)
        .count()
}

/// The node's identity and trust as files: key, certificate, bundle, L1Sec CA, and the pin.
fn identity(a: &Agent) -> Vec<String> {
    let mut v: Vec<String> = [
        "etc/node.key",
        "etc/node.crt",
        "etc/ca.pem",
        "etc/l1sec-ca.pem",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(a.dir.join(f)).unwrap_or_default())
    .collect();
    let cfg = std::fs::read_to_string(&a.config).unwrap();
    v.push(
        cfg.lines()
            .find(|l| l.starts_with("l1_ca_sha256"))
            .unwrap_or("")
            .to_string(),
    );
    v
}

/// `runos certificate renew` through the agent, answered by the hostile: refused with `why`,
/// nothing staged, the identity unchanged, the reason in `runos status`.
fn renew_is_refused(a: &Agent, s: &Shared, before: &[String], why: &str) {
    let renews = events(s, "renew");
    let out = a.cli(&["certificate", "renew", "--json"], "");
    assert!(
        !out.status.success(),
        "renewal accepted: {}",
        describe(&out)
    );
    assert_eq!(
        events(s, "renew"),
        renews + 1,
        "the RENEW went to the hostile"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("refused") && text.contains(why),
        "{why}: {text}"
    );
    assert_eq!(
        identity(a),
        before,
        "{why}: the identity or the trust changed"
    );
    assert!(
        !a.dir.join("state/credentials.switch").exists(),
        "{why}: something was staged"
    );
    let st = a.status();
    let last = st["renewal"]["lastError"].as_str().unwrap_or("");
    assert!(last.contains(why), "{why}: status shows {last:?}");
}

/// Make the agent reconnect: end the relayed or hostile session it has.
fn drop_sessions(s: &Shared) {
    let mut g = s.lock().unwrap();
    g.close = true;
    for h in g.relays.drain(..) {
        h.abort();
    }
}

/// Wait until the agent has its `n`-th hostile session up (a heartbeat answered on it).
fn wait_welcomes(s: &Shared, n: usize) {
    wait_until(
        DEADLINE,
        "the agent to reach the hostile control plane",
        || events(s, "welcome") >= n,
    );
    let hb = events(s, "heartbeat");
    wait_until(DEADLINE, "a heartbeat on the hostile session", || {
        events(s, "heartbeat") > hb
    });
}

#[test]
fn a_hostile_renewal_is_refused_and_the_node_keeps_working() {
    let root = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&root.path().join("cp"), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut agent = Agent::for_ports(&root.path().join("agent"), cp.endpoints.l1.port(), port, "");

    // The real control plane's secrets, as a peer that stole them would hold them.
    let read = |f: &str| std::fs::read_to_string(cp.dir.join(f)).unwrap();
    let real_ca_pem = read("ca.pem");
    let real = Issuer::from_ca_cert_pem(&real_ca_pem, KeyPair::from_pem(&read("ca.key")).unwrap())
        .unwrap();
    let chain =
        pem::certificates(format!("{}{real_ca_pem}", read("server.pem")).as_bytes()).unwrap();
    let key = pem::private_key(read("server.key").as_bytes()).unwrap();
    let client_cas = pem::certificates(real_ca_pem.as_bytes()).unwrap();
    let tls = runos_transport::tls::server_config(
        chain,
        key,
        runos_protocol::ALPN_L2SEC,
        Some(&client_cas),
    )
    .unwrap();
    let s: Shared = Arc::default();
    let keys = Arc::new(Keys {
        node: Mutex::default(),
        real_ca_pem,
        real,
        tls,
    });
    rt.spawn(front(listener, cp.endpoints.l2, keys.clone(), s.clone()));

    // Enrol (the probe goes through the relay) and connect to the real control plane.
    let node = agent.register(&cp);
    *keys.node.lock().unwrap() = node.clone();
    agent.start();
    cp.wait_online(&node);
    let before = identity(&agent);
    let serial = agent.serial();

    // 1. Three CAs in the bundle.
    s.lock().unwrap().attacks.push_back(Attack::ThreeCas);
    drop_sessions(&s);
    wait_welcomes(&s, 1);
    renew_is_refused(&agent, &s, &before, "holds 3");

    // 2. An expired certificate for the right node and key, from the real CA.
    s.lock().unwrap().attacks.push_back(Attack::Expired);
    drop_sessions(&s);
    wait_welcomes(&s, 2);
    renew_is_refused(&agent, &s, &before, "expired");

    // 3. A WELCOME four weeks ahead: the offset is not acted on, so no renewal starts.
    s.lock()
        .unwrap()
        .attacks
        .push_back(Attack::FutureClockForeignCa);
    drop_sessions(&s);
    wait_welcomes(&s, 3);
    wait_until(DEADLINE, "the ignored clock offset in runos status", || {
        agent.status()["clockOffsetIgnored"] == Value::Bool(true)
    });
    assert!(agent.log().contains("the control plane's time is ignored"));
    // The renewal was scheduled by the node's own clock (weeks away), not at once.
    let scheduled = agent
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("certificate renewal scheduled"))
        .map(strip_ansi)
        .and_then(|l| l.split("due_in_secs").nth(1).map(str::to_string))
        .map(|r| {
            r.chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("the renewal schedule is not logged:\n{}", agent.log()));
    assert!(scheduled > 86_400, "renewal due in {scheduled} s");
    assert_eq!(
        events(&s, "renew"),
        2,
        "no renewal was started by the clock offset"
    );
    // ... and RENEWED from another CA is refused in every shape.
    renew_is_refused(&agent, &s, &before, "does not trust");
    renew_is_refused(&agent, &s, &before, "does not trust");
    renew_is_refused(&agent, &s, &before, "does not trust");

    // Back to the real control plane: the identity works, and renews there.
    drop_sessions(&s);
    cp.wait_online(&node);
    let r = cp.send_with(&node, "GET_NODE_STATUS", "{}", &["--timeout", "60s"]);
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}\n{}", agent.log());
    assert_eq!(agent.serial(), serial);
    wait_until(DEADLINE, "the clock offset to be trusted again", || {
        agent.status()["clockOffsetIgnored"] == Value::Bool(false)
    });
    let out = agent.cli(&["certificate", "renew", "--json"], "");
    assert!(out.status.success(), "{}\n{}", describe(&out), agent.log());
    assert_ne!(agent.serial(), serial);
    cp.wait_online(&node);
    let r = cp.send_with(&node, "GET_NODE_STATUS", "{}", &["--timeout", "60s"]);
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}");
    agent.stop();
}

/// The legitimate rotation for a node that missed the whole overlap: `ca rotate`, then a forced
/// `ca cutover` while the node still holds only A's certificate and trusts only A. Its session
/// from before the cutover lives on; its next renewal brings the bundle [B] and A's
/// cross-certificate for B, which vouches for B under A: the agent admits B, the probe verifies
/// B's server certificate, the L1Sec pin follows B, and the node keeps working.
#[test]
fn a_node_that_missed_the_overlap_follows_the_cutover_through_the_cross_certificate() {
    let s = runos_e2e::Stack::up("");
    let ca = |cp: &ControlPlane, which: &str| -> String {
        let out = cp.cli(&["ca", "status", "--json"]);
        assert!(out.status.success(), "{}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[which]["sha256"].as_str().unwrap_or_default().to_string()
    };
    let a = ca(&s.cp, "active");
    let out = s.cp.cli(&["ca", "rotate", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let b = ca(&s.cp, "incoming");
    assert!(s.cp.dir.join("ca-cross.pem").exists());
    let out = s.cp.cli(&["ca", "cutover", "--force", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(ca(&s.cp, "active"), b);
    assert!(
        s.cp.dir.join("ca-cross.pem").exists(),
        "the cross-certificate outlives A's key"
    );
    let bundle = || std::fs::read_to_string(s.agent.dir.join("etc/ca.pem")).unwrap();
    assert_eq!(bundle().matches("BEGIN CERTIFICATE").count(), 1);
    let config = || std::fs::read_to_string(&s.agent.config).unwrap();
    assert!(config().contains(&a));

    let out = s.agent.cli(&["certificate", "renew", "--json"], "");
    assert!(out.status.success(), "{}\n{}", describe(&out), s.logs());
    assert_eq!(bundle().matches("BEGIN CERTIFICATE").count(), 1);
    let held = pem::certificates(bundle().as_bytes()).unwrap();
    assert_eq!(pem::der_sha256(&held[0]), b, "the node trusts B alone now");
    wait_until(DEADLINE, "the L1Sec pin to follow B", || {
        config().contains(&b)
    });
    s.cp.wait_online(&s.node);
    let r =
        s.cp.send_with(&s.node, "GET_NODE_STATUS", "{}", &["--timeout", "60s"]);
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}\n{}", s.logs());
}
