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
///
/// `Display` and `Debug` never show a value from the payload: serde's messages quote the
/// offending value (`invalid type: string "hunter2", expected u64`), so both print
/// [`PayloadError::safe_message`] instead. The underlying error stays available by matching
/// the variant; it is deliberately not exposed as [`std::error::Error::source`], so error
/// chains printed by callers cannot leak it either.
pub enum PayloadError {
    /// `jsonB64` is not standard padded base64.
    Base64(base64::DecodeError),
    /// The decoded bytes are not valid UTF-8.
    Utf8,
    /// The decoded text is not a JSON document of the expected shape.
    Json(serde_json::Error),
}

impl From<base64::DecodeError> for PayloadError {
    fn from(e: base64::DecodeError) -> Self {
        PayloadError::Base64(e)
    }
}

impl From<serde_json::Error> for PayloadError {
    fn from(e: serde_json::Error) -> Self {
        PayloadError::Json(e)
    }
}

impl PayloadError {
    /// A description fit for an `ERROR` message and for logs: it names the problem, the
    /// position, the expected type and (for missing, unknown or duplicate fields) the field,
    /// but never repeats a value from the payload.
    pub fn safe_message(&self) -> String {
        match self {
            PayloadError::Base64(_) => "jsonB64 is not valid standard padded base64".to_string(),
            PayloadError::Utf8 => "jsonB64 does not decode to UTF-8 text".to_string(),
            PayloadError::Json(e) => safe_json_message(e, "payload"),
        }
    }
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.safe_message())
    }
}

impl fmt::Debug for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let variant = match self {
            PayloadError::Base64(_) => "Base64",
            PayloadError::Utf8 => "Utf8",
            PayloadError::Json(_) => "Json",
        };
        f.debug_tuple(variant).field(&self.safe_message()).finish()
    }
}

impl std::error::Error for PayloadError {}

/// Longest field name repeated in a payload error message.
const MAX_FIELD_NAME_IN_MESSAGE: usize = 64;

/// A serde_json error message with every value removed.
///
/// serde quotes values with `` ` `` or `"`; field names in `missing field`, `unknown field`
/// and `duplicate field` are keys, not values, and are kept when they are short identifiers.
/// Anything else that still contains a quote is replaced by a generic description.
pub(crate) fn safe_json_message(e: &serde_json::Error, what: &str) -> String {
    use serde_json::error::Category;
    let position = if e.line() == 0 {
        String::new()
    } else {
        format!(" at line {} column {}", e.line(), e.column())
    };
    let what = match e.classify() {
        Category::Io => format!("{what} could not be read"),
        Category::Eof => format!("{what} is not valid JSON (unexpected end)"),
        Category::Syntax => format!("{what} is not valid JSON"),
        Category::Data => {
            let full = e.to_string();
            let msg = full.strip_suffix(position.as_str()).unwrap_or(&full);
            safe_data_message(msg, what)
        }
    };
    format!("{what}{position}")
}

fn safe_data_message(msg: &str, what: &str) -> String {
    let generic = format!("{what} does not match the schema");
    for prefix in ["missing field `", "unknown field `", "duplicate field `"] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let name = rest.split('`').next().unwrap_or_default();
            let label = prefix.trim_end_matches(" `");
            let printable = !name.is_empty()
                && name.len() <= MAX_FIELD_NAME_IN_MESSAGE
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            return if printable {
                format!("{generic}: {label} `{name}`")
            } else {
                format!("{generic}: {label}")
            };
        }
    }
    // `invalid type: <value>, expected <our description>` and the like: keep only what we
    // expected, which comes from our own type definitions.
    for (prefix, label) in [
        ("invalid type: ", "wrong type"),
        ("invalid value: ", "invalid value"),
        ("unknown variant ", "unknown variant"),
        ("invalid length ", "wrong length"),
    ] {
        if msg.starts_with(prefix) {
            return match msg.rsplit_once(", expected ") {
                Some((_, expected)) if !expected.contains('"') => {
                    format!("{generic}: {label}, expected {expected}")
                }
                _ => format!("{generic}: {label}"),
            };
        }
    }
    // Custom messages from this crate's own deserializers (tags, type names) carry no value;
    // anything quoted might.
    if msg.contains('"') || msg.contains('`') || msg.len() > 200 {
        generic
    } else {
        format!("{generic}: {msg}")
    }
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

    /// Decode the payload into `T`. Every struct in `T` must be a JSON object on the wire
    /// ([`crate::shape`]): this is the one decoder of payloads, for control messages and
    /// instructions alike.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        let text = self.payload_text()?;
        Ok(crate::shape::from_slice(text.as_bytes())?)
    }

    /// Whether the envelope's type is `kind`.
    pub fn is(&self, kind: &str) -> bool {
        self.kind.as_str() == kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

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

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        n: u64,
        #[serde(default)]
        s: String,
        #[serde(default)]
        level: Option<crate::control::LogLevel>,
    }

    fn json_error(text: &str) -> PayloadError {
        let tag = Tag::random();
        let e = Envelope::from_json_text(MessageType::new("X").unwrap(), tag, text);
        e.payload::<Strict>().unwrap_err()
    }

    #[test]
    fn payload_error_messages_never_repeat_values() {
        for (text, expect) in [
            (r#"{"n":"hunter2"}"#, "wrong type, expected u64"),
            (r#"{"n":1,"s":7}"#, "wrong type, expected a string"),
            (r#"{"n":1,"hunter2":1}"#, "unknown field `hunter2`"),
            (r#"{"n":1,"hunter2 x":1}"#, "unknown field at line"),
            (r#"{"s":"hunter2"}"#, "missing field `n`"),
            (
                r#"{"n":1,"level":"hunter2"}"#,
                "unknown variant, expected one of",
            ),
            (r#"{"n":1,"n":2}"#, "duplicate field `n`"),
            (r#"{"n":-1}"#, "invalid value, expected u64"),
            (r#"{"n":1,"s":"hunter2"#, "payload is not valid JSON"),
            (r#"hunter2"#, "payload is not valid JSON"),
        ] {
            let e = json_error(text);
            let msg = e.safe_message();
            assert!(msg.contains(expect), "{text}: {msg}");
            if !expect.contains("hunter2") {
                let shown = format!("{e} {e:?}");
                let unknown_field_is_a_key = text.contains(r#""hunter2":"#);
                if !unknown_field_is_a_key {
                    assert!(!shown.contains("hunter2"), "{text}: {shown}");
                }
            }
        }
        let mut e = Envelope::with_type("X", Tag::random(), &serde_json::json!({}));
        e.json_b64 = "aHVudGVyMg=!".into();
        let msg = e.payload::<Strict>().unwrap_err().to_string();
        assert_eq!(msg, "jsonB64 is not valid standard padded base64");
    }
}
