//! Secret replies: once acknowledged, the journal keeps only their type, error code and sha256,
//! in memory and in the file; a crash at any point never leaves an acknowledged secret reply
//! readable after the next open.

use std::fs;
use std::path::Path;

use base64::Engine as _;
use runos_journal::{
    Discarded, EntryState, Journal, LOG_FILE, Limits, Lookup, Policy, TMP_FILE, payload_sha256,
};
use runos_protocol::{Envelope, Tag};

/// `GET_CLUSTER_JOIN_CMD` is secret and safe to re-run, `RUN_REMOTE_SCRIPT` secret and not,
/// `RUN_COMMAND` neither.
const POLICY: Policy = Policy {
    safe_to_rerun: |k| matches!(k, "GET_NODE_STATUS" | "GET_CLUSTER_JOIN_CMD"),
    secret_reply: |k| matches!(k, "GET_CLUSTER_JOIN_CMD" | "RUN_REMOTE_SCRIPT"),
};

const SECRET: &str = "s3cr3t-j0in-t0ken.0123456789abcdef-ZQX";

fn open(dir: &Path) -> Journal {
    Journal::open(dir, Limits::default(), POLICY).unwrap().0
}

fn sha() -> String {
    "cd".repeat(32)
}

fn secret_reply(kind: &'static str, tag: Tag) -> Envelope {
    Envelope::with_type(
        kind,
        tag,
        &serde_json::json!({
            "joinCmd": format!("kubeadm join --token {SECRET}"),
            "encryptionKey": SECRET,
            "for": tag.to_string(),
        }),
    )
}

/// Accept, start and finish `tag` of type `kind` with a reply carrying [`SECRET`].
fn run(j: &mut Journal, tag: Tag, kind: &str, reply_kind: &'static str) -> Envelope {
    let r = secret_reply(reply_kind, tag);
    j.accepted(tag, kind, &sha()).unwrap();
    j.started(tag, None).unwrap();
    j.finished(tag, &r).unwrap();
    r
}

/// Every form in which the secret can reach the file: as is, and inside the base64 of an
/// envelope's payload at any of the three alignments.
fn forms() -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = vec![SECRET.as_bytes().to_vec()];
    for k in 0..3 {
        let part = &SECRET.as_bytes()[k..];
        let part = &part[..part.len() / 3 * 3];
        out.push(b64.encode(part).into_bytes());
    }
    out
}

fn holds_secret(dir: &Path) -> bool {
    let mut bytes = Vec::new();
    for f in [LOG_FILE, TMP_FILE] {
        if let Ok(b) = fs::read(dir.join(f)) {
            bytes.extend(b);
        }
    }
    forms()
        .iter()
        .any(|f| bytes.windows(f.len()).any(|w| w == f.as_slice()))
}

#[test]
fn an_acknowledged_secret_reply_leaves_the_file_and_memory() {
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path());
    let (script, join, plain) = (Tag::random(), Tag::random(), Tag::random());
    let r_script = run(
        &mut j,
        script,
        "RUN_REMOTE_SCRIPT",
        "RUN_REMOTE_SCRIPT_RESPONSE",
    );
    let r_join = run(&mut j, join, "GET_CLUSTER_JOIN_CMD", "CLUSTER_JOIN_CMD");
    let r_plain = run(&mut j, plain, "RUN_COMMAND", "RUN_COMMAND_RESPONSE");
    // Not yet acknowledged: kept in full (it may have to be resent), and in the file.
    assert!(
        holds_secret(d.path()),
        "the check finds the secret when it is there"
    );
    assert_eq!(j.lookup(&script), Lookup::Done(r_script.clone()));
    assert_eq!(
        j.unacked(),
        vec![r_script.clone(), r_join.clone(), r_plain.clone()]
    );

    assert!(j.acked(script).unwrap());
    assert!(j.acked(join).unwrap());
    assert!(j.acked(plain).unwrap());
    // The plain reply still holds the secret (its type is not secret); drop it from the file
    // to test the others alone.
    assert_eq!(j.lookup(&plain), Lookup::Done(r_plain));
    let discarded = Discarded {
        reply_type: "RUN_REMOTE_SCRIPT_RESPONSE".into(),
        error_code: None,
        reply_sha256: payload_sha256(&r_script),
    };
    assert_eq!(j.lookup(&script), Lookup::Discarded(discarded.clone()));
    // Safe to re-run: a redelivery is new and runs again.
    assert_eq!(j.lookup(&join), Lookup::New);
    assert!(j.unacked().is_empty());
    // The view keeps what `runos journal` and the audit log show.
    let v = j.get(&script).unwrap();
    assert_eq!(v.state, EntryState::Acked);
    assert_eq!(v.reply_type.as_deref(), Some("RUN_REMOTE_SCRIPT_RESPONSE"));
    assert!(!format!("{j:?}").contains(SECRET));
    drop(j);

    let bytes = fs::read(d.path().join(LOG_FILE)).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(text.matches(&payload_sha256(&r_script)).count(), 1);
    // Only the plain reply's payload still holds the secret.
    assert_eq!(payloads_with_secret(&bytes), 1);

    // Across a reopen: still discarded, nothing to resend, nothing rewritten.
    let mut j = open(d.path());
    assert_eq!(j.lookup(&script), Lookup::Discarded(discarded));
    assert_eq!(j.lookup(&join), Lookup::New);
    assert_eq!(j.stats().compactions, 0);
    // The re-run of the safe type replaces the entry.
    let again = run(&mut j, join, "GET_CLUSTER_JOIN_CMD", "CLUSTER_JOIN_CMD");
    assert_eq!(j.lookup(&join), Lookup::Done(again));
    assert!(matches!(
        j.accepted(script, "RUN_REMOTE_SCRIPT", &sha()),
        Err(runos_journal::JournalError::AlreadyRecorded { .. })
    ));
}

/// How many envelopes in the file carry a `jsonB64` with the secret (by decoding each one).
fn payloads_with_secret(bytes: &[u8]) -> usize {
    let text = String::from_utf8_lossy(bytes);
    text.split("\"jsonB64\":\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .filter(|p| String::from_utf8_lossy(p).contains(SECRET))
        .count()
}

#[test]
fn no_secret_in_the_file_after_the_ack() {
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path());
    let t = Tag::random();
    run(&mut j, t, "RUN_REMOTE_SCRIPT", "RUN_REMOTE_SCRIPT_RESPONSE");
    assert!(holds_secret(d.path()));
    assert!(j.acked(t).unwrap());
    // The ACK returned: the rewrite is synced and renamed.
    assert!(!holds_secret(d.path()));
    assert_eq!(j.stats().compactions, 1);
    // An error reply of a secret type is discarded too (a tool's stderr may hold anything).
    let e = Tag::random();
    j.accepted(e, "GET_CLUSTER_JOIN_CMD", &sha()).unwrap();
    j.finished(
        e,
        &Envelope::with_type(
            "ERROR",
            e,
            &runos_protocol::ErrorPayload::new(runos_protocol::ErrorCode::Failed, SECRET),
        ),
    )
    .unwrap();
    assert!(holds_secret(d.path()));
    j.acked(e).unwrap();
    assert!(!holds_secret(d.path()));
    assert_eq!(j.get(&e).unwrap().error_code.as_deref(), Some("failed"));
}

#[test]
fn a_crash_before_the_rewrite_keeps_the_reply_unacknowledged() {
    // The ACK reaches the disk only inside the rewrite: the file as it was before the rename
    // has the reply, not acknowledged, so it is resent (and acknowledged again).
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path());
    let t = Tag::random();
    let r = run(&mut j, t, "RUN_REMOTE_SCRIPT", "RUN_REMOTE_SCRIPT_RESPONSE");
    let before = fs::read(d.path().join(LOG_FILE)).unwrap();
    assert!(j.acked(t).unwrap());
    drop(j);
    fs::write(d.path().join(LOG_FILE), &before).unwrap(); // the old file: the rename was lost
    let mut j = open(d.path());
    assert_eq!(j.unacked(), vec![r]);
    assert!(j.acked(t).unwrap());
    assert!(!holds_secret(d.path()));
}

#[test]
fn a_crash_between_the_ack_and_the_rewrite_is_scrubbed_at_open() {
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path());
    let t = Tag::random();
    run(&mut j, t, "RUN_REMOTE_SCRIPT", "RUN_REMOTE_SCRIPT_RESPONSE");
    // Make the rewrite fail (a directory where its temporary file goes): the ACK is appended
    // to the old file, which still holds the reply.
    fs::create_dir(d.path().join(TMP_FILE)).unwrap();
    assert!(j.acked(t).unwrap());
    assert!(
        matches!(j.lookup(&t), Lookup::Discarded(_)),
        "discarded in memory at once"
    );
    assert!(holds_secret(d.path()));
    drop(j); // the crash, before any retry could succeed

    // Reopened while the rewrite still fails: the reply stays discarded in memory.
    let j = open(d.path());
    assert!(matches!(j.lookup(&t), Lookup::Discarded(_)));
    assert!(j.unacked().is_empty());
    drop(j);
    fs::remove_dir(d.path().join(TMP_FILE)).unwrap();
    // The next open completes the scrub before anything else.
    let j = open(d.path());
    assert!(!holds_secret(d.path()));
    assert_eq!(j.get(&t).unwrap().state, EntryState::Acked);
    assert!(matches!(j.lookup(&t), Lookup::Discarded(_)));
}

#[test]
fn a_failed_rewrite_is_retried_at_the_next_write() {
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path());
    let t = Tag::random();
    run(&mut j, t, "RUN_REMOTE_SCRIPT", "RUN_REMOTE_SCRIPT_RESPONSE");
    fs::create_dir(d.path().join(TMP_FILE)).unwrap();
    assert!(j.acked(t).unwrap());
    assert!(holds_secret(d.path()));
    fs::remove_dir(d.path().join(TMP_FILE)).unwrap();
    j.accepted(Tag::random(), "RUN_COMMAND", &sha()).unwrap();
    assert!(!holds_secret(d.path()));
    drop(j);
    let j = open(d.path());
    assert!(matches!(j.lookup(&t), Lookup::Discarded(_)));
}

#[test]
fn a_type_that_became_secret_is_scrubbed_at_open() {
    // Written by a version for which the type was not secret.
    let d = tempfile::tempdir().unwrap();
    let not_secret = Policy {
        secret_reply: |_| false,
        ..POLICY
    };
    let (mut j, _) = Journal::open(d.path(), Limits::default(), not_secret).unwrap();
    let t = Tag::random();
    run(&mut j, t, "RUN_REMOTE_SCRIPT", "RUN_REMOTE_SCRIPT_RESPONSE");
    j.acked(t).unwrap();
    drop(j);
    assert!(holds_secret(d.path()));
    let j = open(d.path());
    assert!(!holds_secret(d.path()));
    assert!(matches!(j.lookup(&t), Lookup::Discarded(_)));
}
