//! The envelope every message travels in, and its typed parts.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Maximum length of a message type name.
pub const MAX_TYPE_LEN: usize = 64;

/// A message tag: a UUID, written in lowercase hyphenated form (`8-4-4-4-12`).
///
/// Instructions carry the tag the control plane chose; every reply, log line and ACK for that
/// instruction carries the same tag. Agent-initiated requests use fresh tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Uuid);

impl Tag {
    /// A fresh random (v4) tag.
    pub fn random() -> Self {
        Tag(Uuid::new_v4())
    }

    /// The tag as a UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// Parse a tag from its text form. Accepts only the hyphenated 36-character form.
    pub fn parse(s: &str) -> Result<Self, TagError> {
        if s.len() != 36 {
            return Err(TagError);
        }
        Uuid::try_parse(s).map(Tag).map_err(|_| TagError)
    }
}

impl From<Uuid> for Tag {
    fn from(u: Uuid) -> Self {
        Tag(u)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

impl std::str::FromStr for Tag {
    type Err = TagError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tag::parse(s)
    }
}

/// A tag that is not a hyphenated UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tag is not a hyphenated UUID")]
pub struct TagError;

impl Serialize for Tag {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Tag::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A message type name such as `RUN_COMMAND`: 1 to 64 ASCII letters, digits or underscores.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageType(String);

impl MessageType {
    /// Validate and wrap a type name.
    pub fn new(s: impl Into<String>) -> Result<Self, MessageTypeError> {
        let s = s.into();
        if s.is_empty()
            || s.len() > MAX_TYPE_LEN
            || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(MessageTypeError);
        }
        Ok(MessageType(s))
    }

    /// The type name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for MessageType {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for MessageType {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A type name that is empty, too long, or has characters outside `[A-Za-z0-9_]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message type must be 1 to 64 characters of [A-Za-z0-9_]")]
pub struct MessageTypeError;

impl Serialize for MessageType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MessageType::new(s).map_err(serde::de::Error::custom)
    }
}

/// One message on the wire.
///
/// `json_b64` holds the standard (padded) base64 encoding of a UTF-8 JSON document; it is kept
/// encoded here so that an envelope can be routed (by type and tag) without trusting its payload.
/// [`Envelope::payload`] decodes it into a typed struct.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The message type.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// The tag that correlates an instruction with its log lines, reply and ACK.
    pub tag: Tag,
    /// Standard base64 of a UTF-8 JSON document.
    #[serde(rename = "jsonB64")]
    pub json_b64: String,
    /// For instructions: how long the control plane allows the agent to work on it, in
    /// milliseconds. Absent means the catalog's default for the type.
    #[serde(rename = "timeoutMs", default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Why a payload could not be decoded into the type its envelope names.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// `jsonB64` is not standard padded base64.
    #[error("jsonB64 is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The decoded bytes are not valid UTF-8.
    #[error("jsonB64 does not decode to UTF-8 text")]
    Utf8,
    /// The decoded text is not a JSON document of the expected shape.
    #[error("payload does not match the schema: {0}")]
    Json(#[from] serde_json::Error),
}

impl Envelope {
    /// An envelope whose payload is `payload` serialized to JSON.
    pub fn new<T: Serialize + ?Sized>(kind: MessageType, tag: Tag, payload: &T) -> Self {
        // Serializing our own payload types cannot fail: they hold only strings, numbers,
        // booleans, maps with string keys and sequences. Fall back to `{}` rather than panic.
        let json = serde_json::to_vec(payload).unwrap_or_else(|_| b"{}".to_vec());
        Envelope {
            kind,
            tag,
            json_b64: STANDARD.encode(json),
            timeout_ms: None,
        }
    }

    /// An envelope for a message type known at compile time. Panics only if `kind` is not a
    /// valid type name, which is a programming error caught by tests of the constants.
    pub fn with_type<T: Serialize + ?Sized>(kind: &'static str, tag: Tag, payload: &T) -> Self {
        let kind = MessageType::new(kind).unwrap_or_else(|_| {
            // All constant names in this crate are valid; see `instructions::tests`.
            MessageType("INVALID".to_string())
        });
        Envelope::new(kind, tag, payload)
    }

    /// An envelope carrying the raw JSON text `json` (already serialized).
    pub fn from_json_text(kind: MessageType, tag: Tag, json: &str) -> Self {
        Envelope {
            kind,
            tag,
            json_b64: STANDARD.encode(json.as_bytes()),
            timeout_ms: None,
        }
    }

    /// Set the instruction timeout.
    pub fn with_timeout_ms(mut self, ms: Option<u64>) -> Self {
        self.timeout_ms = ms;
        self
    }

    /// The decoded JSON text of the payload.
    pub fn payload_text(&self) -> Result<String, PayloadError> {
        let bytes = STANDARD.decode(self.json_b64.as_bytes())?;
        String::from_utf8(bytes).map_err(|_| PayloadError::Utf8)
    }

    /// Decode the payload into `T`.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        let text = self.payload_text()?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Whether the envelope's type is `kind`.
    pub fn is(&self, kind: &str) -> bool {
        self.kind.as_str() == kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_round_trips_and_rejects_other_forms() {
        let t = Tag::random();
        assert_eq!(Tag::parse(&t.to_string()).unwrap(), t);
        assert!(Tag::parse("not-a-uuid").is_err());
        // simple (unhyphenated) form is refused
        assert!(Tag::parse(&t.as_uuid().simple().to_string()).is_err());
        assert!(Tag::parse("").is_err());
    }

    #[test]
    fn message_type_validation() {
        assert!(MessageType::new("RUN_COMMAND").is_ok());
        assert!(MessageType::new("UpgradeNodeK8sLog").is_ok());
        assert!(MessageType::new("").is_err());
        assert!(MessageType::new("A B").is_err());
        assert!(MessageType::new("X".repeat(65)).is_err());
    }

    #[test]
    fn envelope_json_uses_go_field_names() {
        let tag = Tag::parse("3f0e4b8e-3c55-4b8f-9d6a-3e9a1b0c2d4e").unwrap();
        let e = Envelope::with_type("NO_CONTENT", tag, &serde_json::json!({}));
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"type":"NO_CONTENT","tag":"3f0e4b8e-3c55-4b8f-9d6a-3e9a1b0c2d4e","jsonB64":"e30="}"#
        );
    }

    #[test]
    fn payload_errors_are_distinguished() {
        let tag = Tag::random();
        let mut e = Envelope::with_type("X", tag, &serde_json::json!({}));
        e.json_b64 = "%%%".into();
        assert!(matches!(
            e.payload::<serde_json::Value>(),
            Err(PayloadError::Base64(_))
        ));
        e.json_b64 = STANDARD.encode([0xff, 0xfe]);
        assert!(matches!(
            e.payload::<serde_json::Value>(),
            Err(PayloadError::Utf8)
        ));
        e.json_b64 = STANDARD.encode("{not json");
        assert!(matches!(
            e.payload::<serde_json::Value>(),
            Err(PayloadError::Json(_))
        ));
    }
}
