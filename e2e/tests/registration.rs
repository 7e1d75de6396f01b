//! Enrolment over L1Sec, end to end: the real `runos register` against the real
//! `runos-controlplane serve`, over TLS on loopback.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use runos_e2e::{Agent, ControlPlane, describe, wait_until};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn a_good_token_enrols_and_the_key_stays_private() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let mut agent = Agent::new(&tmp.path().join("node"), &cp, "");
    let node = agent.register(&cp);

    assert_eq!(mode(&agent.dir.join("etc/node.key")), 0o600);
    let cert = std::fs::read(agent.dir.join("etc/node.crt")).unwrap();
    let certs = runos_transport::pem::certificates(&cert).unwrap();
    let info = runos_transport::identity::cert_info(&certs[0]).unwrap();
    assert_eq!(info.node_id.as_deref(), Some(node.as_str()));
    assert!(agent.dir.join("etc/ca.pem").exists());
    // The control plane knows the node, and never saw the private key: the key on disk is not
    // in its database or data directory.
    assert!(cp.node(&node).is_some(), "nodes: {:?}", cp.nodes());
    let key = std::fs::read_to_string(agent.dir.join("etc/node.key")).unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    // Skip the PKCS#8 header every P-256 key shares; what follows is the private scalar.
    let secret = &key_body[48..88];
    for entry in std::fs::read_dir(&cp.dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(secret),
            "private key found on the control plane"
        );
    }
}

#[test]
fn a_used_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let (token, pin) = cp.token("10m");
    let mut first = Agent::new(&tmp.path().join("a"), &cp, "");
    let out = first.register_with(&cp, &token, &pin);
    assert!(out.status.success(), "{}", describe(&out));

    let mut second = Agent::new(&tmp.path().join("b"), &cp, "");
    let out = second.register_with(&cp, &token, &pin);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token"), "error should name the token: {err}");
    assert!(!err.contains(&token), "the token must not be echoed: {err}");
    assert!(!second.dir.join("etc/node.crt").exists());
}

#[test]
fn an_unknown_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let (_, pin) = cp.token("10m");
    let mut agent = Agent::new(&tmp.path().join("node"), &cp, "");
    let bogus = "runos-not-a-real-token-0123456789abcdef";
    let out = agent.register_with(&cp, bogus, &pin);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(bogus));
}

#[test]
fn an_expired_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let out = cp.cli(&["token", "create", "--ttl", "1s", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let pin = v["caSha256"].as_str().unwrap().to_string();
    let created = std::time::Instant::now();
    // Wait (on the clock, with a deadline) until the token's lifetime has passed.
    wait_until(Duration::from_secs(5), "the token to expire", || {
        created.elapsed() > Duration::from_millis(1500)
    });
    let mut agent = Agent::new(&tmp.path().join("node"), &cp, "");
    let out = agent.register_with(&cp, &token, &pin);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_ca_pin_mismatch_is_refused_before_the_token_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let (token, _) = cp.token("10m");
    let mut agent = Agent::new(&tmp.path().join("node"), &cp, "");
    let wrong = "ab".repeat(32);
    let out = agent.register_with(&cp, &token, &wrong);
    assert_eq!(out.status.code(), Some(6), "{}", describe(&out));
    assert!(!agent.dir.join("etc/node.key").exists() || !agent.dir.join("etc/node.crt").exists());
    // The token was never presented, so it still works with the right pin.
    let (_, pin) = cp.token("10m");
    let out = agent.register_with(&cp, &token, &pin);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn an_unreachable_server_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let (token, pin) = cp.token("10m");
    let mut agent = Agent::new(&tmp.path().join("node"), &cp, "");
    cp.kill();
    let out = agent.register_with(&cp, &token, &pin);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&cp.endpoints.l1.port().to_string()),
        "error should name the address: {err}"
    );
}

/// A CA file that holds the pinned CA and another one: only the pinned certificate is trusted,
/// so an impostor whose CA rides along in the file is refused before the token is sent.
#[test]
fn a_pin_trusts_only_the_pinned_certificate_of_a_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let real = ControlPlane::start(&tmp.path().join("real"), &[]);
    let impostor = ControlPlane::start(&tmp.path().join("impostor"), &[]);
    // A token of the real control plane: it carries the real CA's pin.
    let (real_token, real_pin) = real.token("10m");
    let real_ca = std::fs::read_to_string(real.ca_file()).unwrap();
    let impostor_ca = std::fs::read_to_string(impostor.ca_file()).unwrap();
    for (name, bundle) in [
        ("real first", format!("{real_ca}{impostor_ca}")),
        ("impostor first", format!("{impostor_ca}{real_ca}")),
    ] {
        let bundle_file = tmp.path().join("bundle.pem");
        std::fs::write(&bundle_file, bundle).unwrap();
        // The node is pointed at the impostor (DNS hijack, say); the impostor's CA rides along
        // in the CA file. Only the pinned (real) CA is trusted, so the TLS handshake fails.
        let mut agent = Agent::new(
            &tmp.path().join(format!("node-{}", name.len())),
            &impostor,
            "",
        );
        let out = agent.register_ca(&bundle_file, &real_token, &real_pin);
        assert_eq!(out.status.code(), Some(6), "{name}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            err.contains("tls") || err.contains("certificate"),
            "{name}: {err}"
        );
        assert!(!agent.dir.join("etc/node.crt").exists(), "{name}");
    }
    // The token was never presented: it still enrols with the real control plane.
    let mut agent = Agent::new(&tmp.path().join("node-ok"), &real, "");
    let out = agent.register_with(&real, &real_token, &real_pin);
    assert!(out.status.success(), "{}", describe(&out));
}

/// Issue 4: the token carries the CA pin, so `--ca-sha256` is optional, and the pin used is
/// kept in the configuration.
#[test]
fn the_token_carries_the_ca_pin() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let (token, pin) = cp.token("10m");
    assert!(token.starts_with(&format!("runos1.{pin}.")), "{pin}");
    let agent = Agent::new(&tmp.path().join("node"), &cp, "");
    let ca = cp.ca_file().display().to_string();
    let args = [
        "register",
        "--server",
        "127.0.0.1",
        "--token",
        "-",
        "--ca-file",
        &ca,
        "--json",
    ];
    let out = agent.cli(&args, &token);
    assert!(out.status.success(), "{}", describe(&out));
    let config = std::fs::read_to_string(&agent.config).unwrap();
    assert!(
        config.contains(&format!("l1_ca_sha256 = \"{pin}\"")),
        "{config}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("WARNING"));
}

/// A token whose pin does not match the CA file is refused before the token is sent.
#[test]
fn a_token_pin_that_does_not_match_the_ca_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let other = ControlPlane::start(&tmp.path().join("other"), &[]);
    let (token, _) = cp.token("10m");
    let agent = Agent::new(&tmp.path().join("node"), &cp, "");
    let register = |ca: &std::path::Path| {
        let ca = ca.display().to_string();
        agent.cli(
            &[
                "register",
                "--server",
                "127.0.0.1",
                "--token",
                "-",
                "--ca-file",
                &ca,
                "--json",
            ],
            &token,
        )
    };
    // The wrong CA file: no certificate in it matches the token's pin.
    let out = register(&other.ca_file());
    assert_eq!(out.status.code(), Some(6), "{}", describe(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&token));
    assert!(!agent.dir.join("etc/node.crt").exists());
    // The token was never presented: it still works with the right CA file.
    let out = register(&cp.ca_file());
    assert!(out.status.success(), "{}", describe(&out));
}

/// Without a CA file, a token that carries the pin is enough: `register` learns the CA from the
/// chain the L1Sec server presents (sending nothing on that connection), keeps it only because it
/// matches the pin, and stores it as the L1Sec CA. A server whose CA does not match the token's
/// pin (another control plane) is refused with exit 6 before the token is sent.
#[test]
fn without_a_ca_file_the_token_pin_checks_the_ca_the_server_presents() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &[]);
    let other = ControlPlane::start(&tmp.path().join("other"), &[]);
    let mut agent = Agent::new(&tmp.path().join("node"), &cp, "");
    let register = |agent: &Agent, token: &str| {
        agent.cli(
            &[
                "register",
                "--server",
                "127.0.0.1",
                "--token",
                "-",
                "--json",
            ],
            token,
        )
    };

    // A token of the other control plane, against this one: its pin matches nothing here.
    let (foreign, _) = other.token("10m");
    let out = register(&agent, &foreign);
    assert_eq!(out.status.code(), Some(6), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("presented no CA matching the pin"),
        "{}",
        describe(&out)
    );
    assert!(!agent.dir.join("etc/node.key").exists());
    assert!(
        !other.log().contains("enrolment refused"),
        "the token must not have been sent anywhere"
    );

    let (token, pin) = cp.token("10m");
    let out = register(&agent, &token);
    assert!(out.status.success(), "{}", describe(&out));
    let l1_ca = std::fs::read(agent.dir.join("etc/l1sec-ca.pem")).unwrap();
    let certs = runos_transport::pem::certificates(&l1_ca).unwrap();
    assert_eq!(certs.len(), 1);
    assert_eq!(runos_transport::pem::der_sha256(&certs[0]), pin);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    agent.node_id = v["nodeId"].as_str().map(str::to_string);
    agent.start();
    cp.wait_online(agent.node_id.as_deref().unwrap());
}
