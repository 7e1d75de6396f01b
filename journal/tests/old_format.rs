//! A journal written by the agent before the journal became its own crate (hand-written
//! CRC-32C table, `runos-agent` 0.1) opens unchanged: every frame checks, every entry is back.
//!
//! `fixtures/journal-v0.1.log` was produced by that code: an acknowledged `RUN_COMMAND`, a
//! `GET_NODE_STATUS` answered and not acknowledged, an `unknown_type` answered without an
//! executor, and a `RUN_COMMAND` left running (the "crash").

use runos_journal::{EntryState, Journal, LOG_FILE, Limits, Lookup, Policy};
use runos_protocol::{ErrorCode, ErrorPayload, Tag};

const POLICY: Policy = Policy {
    safe_to_rerun: |k| k == "GET_NODE_STATUS",
    secret_reply: |_| false,
};

const FIXTURE: &[u8] = include_bytes!("fixtures/journal-v0.1.log");

fn tag(s: &str) -> Tag {
    s.parse().unwrap()
}

#[test]
fn a_journal_of_the_previous_format_opens_with_every_entry() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(LOG_FILE), FIXTURE).unwrap();
    // The fixture's ACK is weeks old by now: a retention long enough that it is still held
    // (with the default 24 h the acknowledged entry expires at open, whatever today's date).
    let limits = Limits {
        retention: std::time::Duration::from_secs(100 * 365 * 86_400),
        ..Limits::default()
    };
    let (j, rec) = Journal::open(d.path(), limits, POLICY).unwrap();
    assert_eq!(rec.truncated, None, "every frame's CRC-32C checks");
    let (acked, unacked, unknown, running) = (
        tag("11111111-1111-4111-8111-111111111111"),
        tag("22222222-2222-4222-8222-222222222222"),
        tag("33333333-3333-4333-8333-333333333333"),
        tag("44444444-4444-4444-8444-444444444444"),
    );

    let v = j.get(&acked).unwrap();
    assert_eq!(v.state, EntryState::Acked);
    assert_eq!(v.kind, "RUN_COMMAND");
    assert_eq!(v.payload_sha256, "ab".repeat(32));
    assert_eq!(v.pgid, Some(4242));
    let Lookup::Done(r) = j.lookup(&acked) else {
        panic!("the acknowledged reply is kept")
    };
    let body: serde_json::Value = r.payload().unwrap();
    assert_eq!(body["stdout"]["text"], "hello\n");

    assert_eq!(j.get(&unacked).unwrap().state, EntryState::Finished);
    assert_eq!(
        j.get(&unknown).unwrap().error_code.as_deref(),
        Some("unknown_type")
    );
    // Left running, not safe to re-run: answered `interrupted` at this open.
    assert_eq!(rec.interrupted.len(), 1);
    assert_eq!(rec.interrupted[0].tag, running);
    assert_eq!(rec.leftover_pgids(), vec![77]);
    let held = j.unacked();
    assert_eq!(
        held.iter().map(|e| e.tag).collect::<Vec<_>>(),
        vec![unacked, unknown, running]
    );
    let p: ErrorPayload = held[2].payload().unwrap();
    assert_eq!(p.code, ErrorCode::Interrupted);
}

#[test]
fn the_fixture_frames_check_with_the_crc32c_crate() {
    // Walk the frames by hand: length, CRC-32C (as the old table computed it), body.
    let mut off = 0;
    let mut frames = 0;
    while off < FIXTURE.len() {
        let len = u32::from_be_bytes(FIXTURE[off..off + 4].try_into().unwrap()) as usize;
        let crc = u32::from_be_bytes(FIXTURE[off + 4..off + 8].try_into().unwrap());
        let body = &FIXTURE[off + 8..off + 8 + len];
        assert_eq!(crc32c::crc32c(body), crc, "frame {frames}");
        off += 8 + len;
        frames += 1;
    }
    assert_eq!(frames, 11);
}
