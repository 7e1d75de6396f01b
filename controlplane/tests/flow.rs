//! Flow control of a session (the in-flight window) and instructions the agent refused with
//! `busy` or `shutting_down`, which are sent again with the same tag instead of being stored as
//! final replies.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::*;
use runos_controlplane::SendRequest;
use runos_controlplane::admin::Request;
use runos_controlplane::cli::Client;
use runos_protocol::control::{self, types};
use runos_protocol::{Envelope, Tag};
use tokio::time::Instant;

fn status_request(node: &str) -> SendRequest {
    SendRequest {
        node: node.to_string(),
        kind: "GET_NODE_STATUS".into(),
        payload: None,
        raw_b64: None,
        timeout_ms: Some(5000),
    }
}

fn status_reply(tag: Tag) -> Envelope {
    Envelope::with_type("NODE_STATUS", tag, &serde_json::json!({"hostname": "h"}))
}

fn error_reply(tag: Tag, code: &str) -> Envelope {
    Envelope::with_type(
        types::ERROR,
        tag,
        &serde_json::json!({"code": code, "message": "nothing was run, retry later"}),
    )
}

/// Send a HEARTBEAT and read up to its HEARTBEAT_REPLY: the frames that came before it.
async fn barrier(c: &mut Conn) -> Vec<Envelope> {
    let hb = Envelope::with_type(
        types::HEARTBEAT,
        Tag::random(),
        &control::Heartbeat {
            sent_at_ms: 1,
            in_flight: 0,
        },
    );
    c.send(&hb).await;
    let mut seen = Vec::new();
    loop {
        let e = c.next().await.unwrap().expect("a frame before the close");
        if e.is(types::HEARTBEAT_REPLY) && e.tag == hb.tag {
            return seen;
        }
        seen.push(e);
    }
}

/// The next frame that is not a HEARTBEAT_REPLY; it must be an instruction.
async fn next_instruction(c: &mut Conn) -> Envelope {
    let e = c.next_non_heartbeat().await.expect("a frame");
    assert!(!e.is(types::ACK) && !e.is(types::ERROR), "{e:?}");
    e
}

async fn expect_ack(c: &mut Conn, tag: Tag) {
    let e = c.next_non_heartbeat().await.expect("an ACK");
    assert!(e.is(types::ACK), "{e:?}");
    assert_eq!(e.tag, tag);
}

#[tokio::test]
async fn at_most_max_in_flight_instructions_are_unanswered() {
    const WINDOW: usize = 4;
    const TOTAL: usize = 10;
    let cp = start_with(|o| o.max_in_flight = WINDOW as u32).await;
    let node = enrol(&cp).await;
    let api = cp.server.api();
    let queued: Vec<Tag> = (0..TOTAL)
        .map(|_| api.send(&status_request(&node.id)).unwrap())
        .collect();
    let (mut c, _) = session(&cp, &node).await;

    let mut received: Vec<Tag> = Vec::new();
    let mut unanswered: VecDeque<Tag> = VecDeque::new();
    let mut acks_due: VecDeque<Tag> = VecDeque::new();
    let mut max_seen = 0;
    let mut note = |e: Envelope,
                    received: &mut Vec<Tag>,
                    unanswered: &mut VecDeque<Tag>,
                    acks_due: &mut VecDeque<Tag>| {
        if e.is(types::ACK) {
            assert_eq!(acks_due.pop_front(), Some(e.tag), "unexpected {e:?}");
            return;
        }
        assert!(e.is("GET_NODE_STATUS"), "{e:?}");
        assert!(
            unanswered.len() < WINDOW,
            "instruction {} sent while {WINDOW} were unanswered",
            e.tag
        );
        assert!(!received.contains(&e.tag), "{} sent twice", e.tag);
        received.push(e.tag);
        unanswered.push_back(e.tag);
        max_seen = max_seen.max(unanswered.len());
    };
    while received.len() < TOTAL || !unanswered.is_empty() {
        if unanswered.len() == WINDOW || received.len() == TOTAL {
            // Nothing more may arrive before we answer: check up to a heartbeat's reply.
            for e in barrier(&mut c).await {
                note(e, &mut received, &mut unanswered, &mut acks_due);
            }
            let tag = unanswered.pop_front().unwrap();
            c.send(&status_reply(tag)).await;
            acks_due.push_back(tag);
        } else {
            let e = c.next_non_heartbeat().await.expect("a frame");
            note(e, &mut received, &mut unanswered, &mut acks_due);
        }
    }
    for e in barrier(&mut c).await {
        note(e, &mut received, &mut unanswered, &mut acks_due);
    }
    assert!(acks_due.is_empty(), "not acknowledged: {acks_due:?}");
    assert_eq!(max_seen, WINDOW);
    assert_eq!(received, queued, "all of them, in order, each once");
    for tag in &queued {
        assert_eq!(api.reply(tag).unwrap().unwrap().kind, "NODE_STATUS");
    }
    assert_eq!(api.nodes().unwrap()[0].pending, 0);
    cp.server.shutdown().await;
}

#[tokio::test]
async fn busy_is_not_final_and_the_same_instruction_comes_again() {
    // A window of one also shows that the waiting instruction keeps its place in it.
    let cp = start_with(|o| o.max_in_flight = 1).await;
    let node = enrol(&cp).await;
    let api = cp.server.api();
    let client = Client::new(cp.server.admin_socket());
    let (mut c, _) = session(&cp, &node).await;
    wait_until(|| api.is_online(&node.id)).await;

    // `send --wait` over the operator socket.
    let waiter = {
        let client = client.clone();
        let id = node.id.clone();
        tokio::spawn(async move {
            client
                .request(
                    &Request::Send {
                        node: id,
                        kind: "GET_NODE_STATUS".into(),
                        payload: None,
                        raw_b64: None,
                        timeout_ms: Some(5000),
                        wait_ms: Some(30_000),
                        tag: None,
                    },
                    Duration::from_secs(40),
                )
                .await
        })
    };
    let first = next_instruction(&mut c).await;
    assert!(first.is("GET_NODE_STATUS"));
    let tag = first.tag;
    let other = api.send(&status_request(&node.id)).unwrap();

    // Refused twice: resent after 1 s, then after 2 s, each time the same envelope.
    for min_wait in [Duration::from_secs(1), Duration::from_secs(2)] {
        let refused_at = Instant::now();
        c.send(&error_reply(tag, "busy")).await;
        expect_ack(&mut c, tag).await;
        assert!(api.reply(&tag).unwrap().is_none(), "busy was stored");
        let again = next_instruction(&mut c).await;
        let waited = refused_at.elapsed();
        assert_eq!(again, first, "not the same instruction (window of one)");
        assert!(
            waited >= min_wait - Duration::from_millis(50),
            "resent after {waited:?}"
        );
        assert!(!waiter.is_finished(), "send --wait returned the busy error");
    }
    assert!(api.reply(&tag).unwrap().is_none());

    // The real reply is the final one; then the next instruction gets its turn.
    c.send(&status_reply(tag)).await;
    expect_ack(&mut c, tag).await;
    let v = waiter.await.unwrap().unwrap();
    assert_eq!(v["tag"], tag.to_string());
    assert_eq!(v["type"], "NODE_STATUS");
    assert_eq!(v["payload"]["hostname"], "h");
    let next = next_instruction(&mut c).await;
    assert_eq!(next.tag, other);
    c.send(&status_reply(other)).await;
    expect_ack(&mut c, other).await;
    assert_eq!(api.nodes().unwrap()[0].pending, 0);
    cp.server.shutdown().await;
}

#[tokio::test]
async fn shutting_down_is_not_final_and_is_redelivered_in_the_next_session() {
    let cp = start().await;
    let node = enrol(&cp).await;
    let api = cp.server.api();
    let (mut c, _) = session(&cp, &node).await;
    wait_until(|| api.is_online(&node.id)).await;
    let tag = api.send(&status_request(&node.id)).unwrap();
    let waiter = {
        let api = cp.server.api();
        tokio::spawn(async move { api.wait_reply(&tag, Duration::from_secs(30)).await })
    };
    let first = next_instruction(&mut c).await;
    assert_eq!(first.tag, tag);

    // In the same session: resent after about 1 s.
    let refused_at = Instant::now();
    c.send(&error_reply(tag, "shutting_down")).await;
    expect_ack(&mut c, tag).await;
    assert!(
        api.reply(&tag).unwrap().is_none(),
        "shutting_down was stored"
    );
    let again = next_instruction(&mut c).await;
    assert_eq!(again, first);
    assert!(refused_at.elapsed() >= Duration::from_millis(950));
    assert!(!waiter.is_finished());

    // Refused again and the agent goes away: the next session gets it at once.
    c.send(&error_reply(tag, "shutting_down")).await;
    expect_ack(&mut c, tag).await;
    drop(c);
    wait_until(|| !api.is_online(&node.id)).await;
    assert_eq!(api.nodes().unwrap()[0].pending, 1);
    let (mut c, _) = session(&cp, &node).await;
    let again = next_instruction(&mut c).await;
    assert_eq!(again, first);
    assert!(!waiter.is_finished());

    c.send(&status_reply(tag)).await;
    expect_ack(&mut c, tag).await;
    let r = waiter.await.unwrap().unwrap();
    assert_eq!(r.kind, "NODE_STATUS");
    assert_eq!(api.reply(&tag).unwrap().unwrap().kind, "NODE_STATUS");
    // Other errors stay final.
    let tag2 = api.send(&status_request(&node.id)).unwrap();
    assert_eq!(next_instruction(&mut c).await.tag, tag2);
    c.send(&error_reply(tag2, "internal")).await;
    expect_ack(&mut c, tag2).await;
    let r = api.wait_reply(&tag2, DEADLINE).await.unwrap();
    assert_eq!(r.kind, "ERROR");
    assert_eq!(r.payload["code"], "internal");
    cp.server.shutdown().await;
}
