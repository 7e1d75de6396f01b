//! Every control message is a JSON object on the wire (protocol.md §3, §4): the protocol's one
//! payload decoder refuses the array form serde_json would otherwise read as a struct.

use runos_protocol::control::{
    self, Ack, Heartbeat, HeartbeatReply, Hello, LogLine, NoContent, Register, Registered, Renew,
    Renewed, Welcome,
};
use runos_protocol::{Envelope, ErrorPayload, MessageType, PayloadError, Tag};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn envelope(kind: &str, payload: &Value) -> Envelope {
    Envelope::new(MessageType::new(kind).unwrap(), Tag::random(), payload)
}

/// `object` decodes as `T`; the array of its values, and `[]`, do not.
fn objects_only<T: DeserializeOwned>(kind: &str, object: Value) {
    envelope(kind, &object)
        .payload::<T>()
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
    let values: Vec<Value> = object.as_object().unwrap().values().cloned().collect();
    for bad in [Value::Array(values), json!([]), json!(null), json!("x")] {
        let err = envelope(kind, &bad)
            .payload::<T>()
            .err()
            .unwrap_or_else(|| panic!("{kind} accepted {bad}"));
        assert!(matches!(err, PayloadError::Json(_)), "{kind}: {err}");
    }
}

#[test]
fn every_control_payload_is_an_object() {
    let pem = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
    objects_only::<Register>(
        control::types::REGISTER,
        json!({"protocolVersion": 1, "token": "t", "hostname": "h", "machineId": "m",
               "os": "linux", "agentVersion": "0.1.0", "csrPem": pem}),
    );
    objects_only::<Registered>(
        control::types::REGISTERED,
        json!({"nodeId": "n", "certificatePem": pem, "caPem": pem}),
    );
    objects_only::<Hello>(
        control::types::HELLO,
        json!({"protocolVersion": 1, "agentVersion": "0.1.0", "nodeId": "n", "hostname": "h",
               "bootId": "b", "instructionTypes": [], "pendingReplies": []}),
    );
    objects_only::<Welcome>(
        control::types::WELCOME,
        json!({"protocolVersion": 1, "serverTimeMs": 1, "heartbeatIntervalMs": 15000,
               "maxFrameBytes": 65536, "sessionId": "s"}),
    );
    objects_only::<Renew>(control::types::RENEW, json!({"csrPem": pem}));
    objects_only::<Renewed>(
        control::types::RENEWED,
        json!({"certificatePem": pem, "caPem": pem}),
    );
    objects_only::<Heartbeat>(
        control::types::HEARTBEAT,
        json!({"sentAtMs": 1, "inFlight": 0}),
    );
    objects_only::<HeartbeatReply>(control::types::HEARTBEAT_REPLY, json!({"serverTimeMs": 1}));
    objects_only::<Ack>(control::types::ACK, json!({"x": 1}));
    objects_only::<NoContent>(control::types::NO_CONTENT, json!({"x": 1}));
    objects_only::<LogLine>(
        control::types::LOG,
        json!({"level": "info", "message": "m"}),
    );
    objects_only::<ErrorPayload>(
        control::types::ERROR,
        json!({"code": "failed", "message": "m"}),
    );
}
