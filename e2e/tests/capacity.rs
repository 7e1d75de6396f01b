//! The real agent against a control plane at its `--max-sessions` ceiling: it is answered
//! `ERROR busy`, keeps running, backs off, and gets in once a slot is free.

use std::time::Duration;

use runos_e2e::{Agent, ControlPlane, wait_until};

#[test]
fn an_agent_refused_busy_at_the_ceiling_backs_off_and_gets_in_when_a_slot_frees() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), &["--max-sessions", "1"]);
    let mut first = Agent::new(&tmp.path().join("first"), &cp, "");
    let first_id = first.register(&cp);
    first.start();
    cp.wait_online(&first_id);

    let mut second = Agent::new(&tmp.path().join("second"), &cp, "");
    let second_id = second.register(&cp);
    second.start();
    wait_until(Duration::from_secs(15), "the busy refusal", || {
        second.log().contains("refused the session (busy)")
    });
    wait_until(Duration::from_secs(15), "a backoff after it", || {
        second.log().contains("reconnecting after backoff")
    });
    assert!(second.is_running(), "{}", second.log());
    assert!(!cp.is_online(&second_id));
    assert!(cp.log().contains("session limit reached (1 sessions)"));

    // The first node leaves: the second gets its slot.
    first.stop();
    cp.wait_online(&second_id);
    let r = cp.send(&second_id, "GET_NODE_STATUS", "{}");
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}");
}
