//! CA rotation with overlap and cutover in a running control plane: real TLS on loopback,
//! restarts in each phase, the operator commands and their exit codes, and a v1 database.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;
use runos_controlplane::Error;
use runos_controlplane::api::DEFAULT_SEEN_WITHIN;
use runos_controlplane::ca::{CA_KEY_FILE, CA_NEXT_CERT_FILE, CA_NEXT_KEY_FILE, CA_RETIRED_PREFIX};
use runos_protocol::control::{self, Renewed, types};
use runos_protocol::{Envelope, Tag};
use rustls_pki_types::CertificateDer;

const BIN: &str = env!("CARGO_BIN_EXE_runos-controlplane");

fn der(pem: &str, i: usize) -> CertificateDer<'static> {
    runos_transport::pem::certificates(pem.as_bytes())
        .unwrap()
        .remove(i)
}

/// Whether `cross_pem` is a cross-certificate for the CA `ca`: its subject and key, issued by
/// `issuer`.
fn cross_for(cross_pem: &str, ca: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> bool {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let x = der(cross_pem, 0);
    let (_, x) = X509Certificate::from_der(&x).unwrap();
    let (_, c) = X509Certificate::from_der(ca).unwrap();
    let (_, i) = X509Certificate::from_der(issuer).unwrap();
    x.subject().as_raw() == c.subject().as_raw()
        && x.public_key().raw == c.public_key().raw
        && x.issuer().as_raw() == i.subject().as_raw()
        && x.is_ca()
}

/// RENEW on an open session: the RENEWED payload and the renewed node.
async fn renew(c: &mut Conn, node: &Node) -> (Renewed, Node) {
    let (key, csr) = csr();
    // A node gets one certificate every 2 s: ask again while the answer is `busy`.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let (env, r) = loop {
        let env = Envelope::with_type(
            types::RENEW,
            Tag::random(),
            &control::Renew {
                csr_pem: csr.clone(),
            },
        );
        c.send(&env).await;
        let r = c.next_non_heartbeat().await.expect("RENEWED");
        if r.is(types::ERROR) && error_code(&r) == "busy" && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            continue;
        }
        break (env, r);
    };
    assert!(r.is(types::RENEWED), "{r:?}");
    assert_eq!(r.tag, env.tag);
    let renewed: Renewed = r.payload().unwrap();
    let node = Node {
        id: node.id.clone(),
        cert_pem: renewed.certificate_pem.clone(),
        key,
    };
    (renewed, node)
}

async fn heartbeat_answered(c: &mut Conn) {
    let hb = Envelope::with_type(
        types::HEARTBEAT,
        Tag::random(),
        &control::Heartbeat {
            sent_at_ms: 1,
            in_flight: 0,
        },
    );
    c.send(&hb).await;
    let r = c.next().await.unwrap().expect("HEARTBEAT_REPLY");
    assert!(r.is(types::HEARTBEAT_REPLY), "{r:?}");
    assert_eq!(r.tag, hb.tag);
}

/// The node's certificate is refused at L2Sec by a client that trusts `roots`: no WELCOME.
async fn refused_at_l2(cp: &Cp, roots: &[CertificateDer<'static>], node: &Node) {
    match l2_tls_trusting(cp, roots, node.identity()).await {
        Err(_) => {}
        Ok(tls) => {
            // TLS 1.3: a refused client certificate shows up after the client's handshake.
            let (r, w) = tokio::io::split(tls);
            let mut c = Conn {
                reader: runos_transport::FrameReader::new(r, 1 << 20),
                writer: runos_transport::FrameWriter::new(w, 1 << 20),
            };
            let _ = c
                .writer
                .write(&hello_env(&node.id, runos_protocol::PROTOCOL_VERSION))
                .await;
            let seen = c.until_closed().await;
            assert!(
                seen.iter().all(|e| !e.is(types::WELCOME)),
                "a refused certificate got a WELCOME"
            );
        }
    }
}

/// Enrol a node trusting only the active CA on L1Sec, with a token made now.
async fn enrol_now(cp: &Cp) -> (Node, String) {
    let token = cp
        .server
        .api()
        .create_token(Duration::from_secs(600))
        .unwrap();
    assert_eq!(
        token.ca_sha256,
        cp.server.ca_sha256(),
        "tokens pin the active CA"
    );
    let (key, csr) = csr();
    let r = register(cp, &token.token, &csr).await.unwrap();
    (
        Node {
            id: r.node_id,
            cert_pem: r.certificate_pem,
            key,
        },
        r.ca_pem,
    )
}

#[tokio::test]
async fn a_rotation_overlaps_and_a_cutover_switches_without_a_restart() {
    let cp = start().await;
    let api = cp.server.api();
    let a_der = cp.ca_der();
    let a = cp.server.ca_sha256();
    let (old, bundle) = enrol_now(&cp).await;
    assert_eq!(pins(&bundle), vec![a.clone()]);
    let (stays, _) = enrol_now(&cp).await;
    // A session opened before the rotation, kept open through rotation and cutover.
    let (mut live, _) = session(&cp, &old).await;
    let st = api.ca_status(DEFAULT_SEEN_WITHIN).unwrap();
    assert_eq!(st.phase, "normal");
    assert_eq!(st.active.sha256, a);
    assert_eq!(st.active.nodes, 2);
    assert!(st.incoming.is_none() && st.blocking.is_empty());
    assert!(st.warnings.is_empty(), "{:?}", st.warnings);

    // Rotate: both CAs are trusted and bundled; new certificates come from B.
    let change = api.ca_rotate().await.unwrap();
    assert_eq!(change.action, "rotate");
    let b = change.status.incoming.clone().unwrap().sha256;
    assert_ne!(a, b);
    assert_eq!(change.status.phase, "rotating");
    assert!(change.status.rotating_since.is_some());
    assert_eq!(pins(&cp.server.ca_pem()), vec![a.clone(), b.clone()]);
    assert_eq!(cp.server.ca_sha256(), a, "the server certificate stays A's");
    let b_der = der(&cp.server.ca_pem(), 1);
    let (fresh, bundle) = enrol_now(&cp).await;
    assert_eq!(pins(&bundle), vec![a.clone(), b.clone()], "REGISTERED");
    // The server certificate is still A's (the client trusts only A), and the new node's
    // certificate from B is accepted.
    let (mut c, _) = session_trusting(&cp, std::slice::from_ref(&a_der), &fresh).await;
    heartbeat_answered(&mut c).await;
    drop(c);
    // A certificate from A still works during the overlap.
    let (mut c, _) = session_trusting(&cp, std::slice::from_ref(&a_der), &stays).await;
    heartbeat_answered(&mut c).await;
    drop(c);
    // The session opened before the rotation renews: RENEWED carries both CAs and a
    // certificate from B.
    let (renewed, old_renewed) = renew(&mut live, &old).await;
    assert_eq!(pins(&renewed.ca_pem), vec![a.clone(), b.clone()], "RENEWED");
    // ... and A's cross-certificate for B, which the agent needs to admit B.
    let cross = renewed
        .ca_cross_pem
        .clone()
        .expect("caCrossPem during the overlap");
    assert!(cross_for(&cross, &b_der, &a_der));
    prove(&cp, std::slice::from_ref(&a_der), &old_renewed).await;
    let st = api.ca_status(DEFAULT_SEEN_WITHIN).unwrap();
    assert_eq!(st.incoming.as_ref().unwrap().nodes, 2, "fresh and old");
    assert_eq!(
        st.active.nodes, 2,
        "old still holds its A certificate, and stays"
    );
    assert_eq!(st.blocking_total, 1);
    assert_eq!(st.blocking[0].id, stays.id);
    assert!(matches!(api.ca_rotate().await, Err(Error::CaPhase(_))));

    // Cutover is refused while `stays` holds only A certificates, and nothing changes.
    match api.ca_cutover(false, DEFAULT_SEEN_WITHIN).await {
        Err(Error::CutoverBlocked(m)) => assert!(m.contains(&stays.id), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(pins(&cp.server.ca_pem()), vec![a.clone(), b.clone()]);
    let change = api.ca_cutover(true, DEFAULT_SEEN_WITHIN).await.unwrap();
    assert_eq!(change.action, "cutover");
    assert_eq!(change.forced_past_total, 1);
    assert_eq!(change.forced_past[0].id, stays.id);
    assert_eq!(change.retired_sha256.as_deref(), Some(a.as_str()));
    assert_eq!(change.status.phase, "normal");
    assert_eq!(pins(&cp.server.ca_pem()), vec![b.clone()]);
    assert_eq!(cp.server.ca_sha256(), b);
    assert!(matches!(
        api.ca_cutover(true, DEFAULT_SEEN_WITHIN).await,
        Err(Error::CaPhase(_))
    ));

    // The live session survived both steps.
    heartbeat_answered(&mut live).await;
    drop(live);
    // The server chain is B's: a client trusting only A refuses it.
    let e = l2_tls_trusting(&cp, std::slice::from_ref(&a_der), fresh.identity()).await;
    assert!(e.is_err(), "a client trusting only A accepted the server");
    // A client certificate from A is refused; certificates from B connect.
    refused_at_l2(&cp, std::slice::from_ref(&b_der), &stays).await;
    let (mut c, _) = session_trusting(&cp, std::slice::from_ref(&b_der), &old_renewed).await;
    heartbeat_answered(&mut c).await;
    drop(c);
    let (mut c, _) = session_trusting(&cp, std::slice::from_ref(&b_der), &fresh).await;
    heartbeat_answered(&mut c).await;
    drop(c);
    // Enrolment: new tokens pin B, L1Sec serves B's chain, the bundle is B alone.
    let (late, bundle) = enrol_now(&cp).await;
    assert_eq!(pins(&bundle), vec![b.clone()]);
    let (mut c, _) = session_trusting(&cp, std::slice::from_ref(&b_der), &late).await;
    // After the cutover the bundle is [B] and the cross-certificate still comes with it, so a
    // node that missed the overlap can follow B.
    let (after, _) = renew(&mut c, &late).await;
    assert_eq!(pins(&after.ca_pem), vec![b.clone()]);
    assert_eq!(after.ca_cross_pem.as_deref(), Some(cross.as_str()));
    drop(c);
    cp.server.shutdown().await;
}

#[tokio::test]
async fn each_phase_survives_a_restart() {
    let cp = start().await;
    let a = cp.server.ca_sha256();
    let a_der = cp.ca_der();
    let (node, _) = enrol_now(&cp).await;
    let change = cp.server.api().ca_rotate().await.unwrap();
    let b = change.status.incoming.unwrap().sha256;

    let cp = cp.restart().await;
    let api = cp.server.api();
    let st = api.ca_status(DEFAULT_SEEN_WITHIN).unwrap();
    assert_eq!(st.phase, "rotating");
    assert_eq!(st.active.sha256, a);
    assert_eq!(st.incoming.as_ref().unwrap().sha256, b);
    assert_eq!(pins(&cp.server.ca_pem()), vec![a.clone(), b.clone()]);
    assert_eq!(st.blocking_total, 1);
    // The A node connects (server still A's) and renews to B.
    let (mut c, _) = session_trusting(&cp, std::slice::from_ref(&a_der), &node).await;
    let (renewed, node) = renew(&mut c, &node).await;
    assert_eq!(pins(&renewed.ca_pem), vec![a.clone(), b.clone()]);
    drop(c);
    prove(&cp, std::slice::from_ref(&a_der), &node).await;
    assert_eq!(
        api.ca_status(DEFAULT_SEEN_WITHIN).unwrap().blocking_total,
        0
    );
    let change = api.ca_cutover(false, DEFAULT_SEEN_WITHIN).await.unwrap();
    assert_eq!(change.forced_past_total, 0);
    let retired = change.retired_file.unwrap();

    let cp = cp.restart().await;
    let dir = cp.server.data_dir().to_path_buf();
    let st = cp.server.api().ca_status(DEFAULT_SEEN_WITHIN).unwrap();
    assert_eq!(st.phase, "normal");
    assert_eq!(st.active.sha256, b);
    assert_eq!(st.active.nodes, 1);
    assert_eq!(pins(&cp.server.ca_pem()), vec![b.clone()]);
    assert!(!dir.join(CA_NEXT_CERT_FILE).exists());
    assert!(!dir.join(CA_NEXT_KEY_FILE).exists());
    assert_eq!(pins(&std::fs::read_to_string(&retired).unwrap()), vec![a]);
    assert!(
        std::path::Path::new(&retired)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(CA_RETIRED_PREFIX)
    );
    let key_files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".key") && n.starts_with("ca"))
        .collect();
    assert_eq!(key_files, vec![CA_KEY_FILE.to_string()], "A's key is gone");
    let b_der = cp.ca_der();
    let (mut c, _) = session_trusting(&cp, std::slice::from_ref(&b_der), &node).await;
    heartbeat_answered(&mut c).await;
    drop(c);
    cp.server.shutdown().await;
}

/// What an agent does with a renewed certificate before switching to it: a probe session with
/// it (which also marks it used, so it counts in `ca status`).
async fn prove(cp: &Cp, roots: &[rustls_pki_types::CertificateDer<'static>], node: &Node) {
    let tls = l2_tls_trusting(cp, roots, node.identity()).await.unwrap();
    let (r, w) = tokio::io::split(tls);
    let mut c = Conn {
        reader: runos_transport::FrameReader::new(r, 1 << 20),
        writer: runos_transport::FrameWriter::new(w, 1 << 20),
    };
    let mut hello: runos_protocol::control::Hello =
        hello_env(&node.id, runos_protocol::PROTOCOL_VERSION)
            .payload()
            .unwrap();
    hello.probe = true;
    c.send(&Envelope::with_type(types::HELLO, Tag::random(), &hello))
        .await;
    let w = c.next().await.unwrap().expect("WELCOME");
    assert!(w.is(types::WELCOME), "{w:?}");
}

#[tokio::test]
async fn certificates_from_a_v1_database_count_for_the_active_ca() {
    let cp = start().await;
    let (node, _) = enrol_now(&cp).await;
    let data = cp.server.data_dir().to_path_buf();
    cp.server.shutdown().await;
    // Turn the database back into schema v1.
    {
        let c = rusqlite::Connection::open(data.join("state.db")).unwrap();
        c.execute_batch(
            "DROP INDEX certificates_ca;
             ALTER TABLE certificates DROP COLUMN ca_sha256;
             ALTER TABLE certificates DROP COLUMN used_at;
             ALTER TABLE nodes DROP COLUMN last_update;
             ALTER TABLE nodes DROP COLUMN wireguard_public_key;
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let cp = Cp {
        server: runos_controlplane::serve(runos_controlplane::ServeOptions::ephemeral(&data))
            .await
            .unwrap(),
        dir: cp.dir,
    };
    let api = cp.server.api();
    let st = api.ca_status(DEFAULT_SEEN_WITHIN).unwrap();
    assert_eq!(st.active.nodes, 1);
    {
        let c = rusqlite::Connection::open(data.join("state.db")).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 5);
    }
    // The migrated certificate is A's: it blocks a cutover.
    api.ca_rotate().await.unwrap();
    let st = api.ca_status(DEFAULT_SEEN_WITHIN).unwrap();
    assert_eq!(st.blocking_total, 1);
    assert_eq!(st.blocking[0].id, node.id);
    // It still connects during the overlap.
    let (_c, _) = session(&cp, &node).await;
    cp.server.shutdown().await;
}

async fn cli(cp: &Cp, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--admin-socket")
        .arg(cp.server.admin_socket())
        .stdin(std::process::Stdio::null())
        .output();
    tokio::time::timeout(DEADLINE, run).await.unwrap().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[tokio::test]
async fn ca_commands_and_their_exit_codes() {
    let cp = start().await;
    let a = cp.server.ca_sha256();
    let out = cli(&cp, &["ca", "cutover"]).await;
    assert_eq!(out.status.code(), Some(8), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca rotate"));
    let out = cli(&cp, &["ca", "status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let st = json(&out);
    assert_eq!(st["phase"], "normal");
    assert_eq!(st["active"]["sha256"], a.as_str());
    assert_eq!(st["active"]["nodes"], 0);
    assert!(st["incoming"].is_null());
    let (old, _) = enrol_now(&cp).await;

    let out = cli(&cp, &["ca", "rotate", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let b = json(&out)["status"]["incoming"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let out = cli(&cp, &["ca", "rotate"]).await;
    assert_eq!(out.status.code(), Some(8), "{out:?}");
    // A node enrolled during the overlap holds a certificate from B: it does not block.
    let (_fresh, _) = enrol_now(&cp).await;

    let out = cli(&cp, &["ca", "status"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rotating since"), "{text}");
    assert!(text.contains(&b), "{text}");
    assert!(
        text.contains("blocked by 1 node") && text.contains(&old.id),
        "{text}"
    );
    let out = cli(&cp, &["ca", "cutover"]).await;
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&old.id));
    let st = json(&cli(&cp, &["ca", "status", "--json"]).await);
    assert_eq!(st["blockingTotal"], 1);
    assert_eq!(st["blocking"][0]["id"], old.id.as_str());
    assert_eq!(st["incoming"]["nodes"], 1);
    // Revoking the node unblocks the cutover.
    cp.server.api().revoke(&old.id).unwrap();
    let out = cli(&cp, &["ca", "cutover", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let c = json(&out);
    assert_eq!(c["forcedPastTotal"], 0);
    assert_eq!(c["retiredSha256"], a.as_str());
    assert_eq!(c["status"]["phase"], "normal");
    assert_eq!(c["status"]["active"]["sha256"], b.as_str());
    cp.server.shutdown().await;
}

#[tokio::test]
async fn a_forced_cutover_through_the_cli_lists_the_nodes_locked_out() {
    let cp = start().await;
    let (old, _) = enrol_now(&cp).await;
    let out = cli(&cp, &["ca", "rotate"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = cli(&cp, &["ca", "cutover", "--force"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains(&old.id), "{stdout}");
    assert!(
        stderr.contains("--force") && stderr.contains("tokens"),
        "{stderr}"
    );
    let out = cli(&cp, &["ca", "status", "--seen-within", "bogus"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    cp.server.shutdown().await;
}
