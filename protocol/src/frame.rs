//! Framing: a 4-byte big-endian length, then that many bytes of envelope JSON.

use crate::envelope::Envelope;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be decoded. Every variant is fatal for the connection: after a framing
/// error the receiver cannot know where the next frame starts.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix exceeds the receiver's maximum; nothing was allocated.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The receiver's maximum.
        max: u32,
    },
    /// A zero-length frame.
    #[error("empty frame")]
    Empty,
    /// The frame body is not an envelope. The message never repeats a value from the frame
    /// (only what was expected, and field names).
    #[error(
        "frame is not a valid envelope: {}",
        crate::envelope::safe_json_message(.0, "envelope")
    )]
    Envelope(#[from] serde_json::Error),
}

/// Why an envelope could not be framed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded envelope would exceed the maximum frame size the peer accepts.
    #[error("message of {len} bytes exceeds the maximum frame size of {max} bytes")]
    TooLarge {
        /// The encoded length.
        len: usize,
        /// The maximum.
        max: u32,
    },
}

/// Check a length prefix against the maximum before anything is allocated for the body.
pub fn check_len(header: [u8; HEADER_LEN], max: u32) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(header);
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok(len as usize)
}

/// Decode the body of one frame (the bytes after the length prefix). The envelope must be a
/// JSON object ([`crate::shape`]).
pub fn decode_body(body: &[u8]) -> Result<Envelope, DecodeError> {
    Ok(crate::shape::from_slice(body)?)
}

/// Encode one envelope as a complete frame (prefix and body).
pub fn encode_frame(env: &Envelope, max: u32) -> Result<Vec<u8>, EncodeError> {
    // Serializing an Envelope (strings and an optional integer) cannot fail.
    let body = serde_json::to_vec(env).unwrap_or_default();
    if body.len() > max as usize {
        return Err(EncodeError::TooLarge {
            len: body.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode one frame from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more and call again),
/// `Ok(Some((envelope, consumed)))` when it does, and an error when the bytes can never become
/// a valid frame. The length is checked against `max` before the body is looked at.
pub fn decode_frame(buf: &[u8], max: u32) -> Result<Option<(Envelope, usize)>, DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(header);
    let len = check_len(h, max)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let env = decode_body(body)?;
    Ok(Some((env, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tag;

    fn sample() -> Envelope {
        Envelope::with_type(
            "GET_NODE_STATUS",
            Tag::parse("00000000-0000-4000-8000-000000000001").unwrap(),
            &serde_json::json!({}),
        )
    }

    #[test]
    fn round_trip() {
        let f = encode_frame(&sample(), 1024).unwrap();
        let (e, n) = decode_frame(&f, 1024).unwrap().unwrap();
        assert_eq!(e, sample());
        assert_eq!(n, f.len());
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let f = encode_frame(&sample(), 1024).unwrap();
        for cut in 0..f.len() {
            assert!(
                decode_frame(&f[..cut], 1024).unwrap().is_none(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn too_large_is_refused_from_the_header_alone() {
        let header = (1025u32).to_be_bytes();
        assert!(matches!(
            decode_frame(&header, 1024),
            Err(DecodeError::TooLarge {
                len: 1025,
                max: 1024
            })
        ));
        assert!(matches!(
            encode_frame(&sample(), 10),
            Err(EncodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn zero_length_and_garbage_are_errors() {
        assert!(matches!(
            decode_frame(&[0, 0, 0, 0], 1024),
            Err(DecodeError::Empty)
        ));
        let mut f = vec![0, 0, 0, 3];
        f.extend_from_slice(b"abc");
        assert!(matches!(
            decode_frame(&f, 1024),
            Err(DecodeError::Envelope(_))
        ));
    }

    #[test]
    fn unknown_envelope_fields_are_refused() {
        let body = br#"{"type":"X","tag":"00000000-0000-4000-8000-000000000001","jsonB64":"e30=","extra":1}"#;
        assert!(decode_body(body).is_err());
    }

    #[test]
    fn envelopes_are_objects_only() {
        // serde_json alone reads a struct from an array; an envelope must be an object (§3).
        let body = br#"["GET_NODE_STATUS","00000000-0000-4000-8000-000000000001","e30="]"#;
        assert!(serde_json::from_slice::<Envelope>(body).is_ok());
        assert!(matches!(decode_body(body), Err(DecodeError::Envelope(_))));
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        assert!(decode_frame(&f, 1024).is_err());
        for body in [&b"[]"[..], b"null", b"\"e30=\"", b"{}"] {
            assert!(decode_body(body).is_err());
        }
        // Errors name what was expected, never a value of the frame.
        for body in [
            &br#"{"type":"X","tag":"00000000-0000-4000-8000-000000000001","jsonB64":"e30=","timeoutMs":"hunter2"}"#[..],
            br#"{"type":"hunter2!","tag":"00000000-0000-4000-8000-000000000001","jsonB64":"e30="}"#,
            br#"{"type":"X","tag":"hunter2","jsonB64":"e30="}"#,
            br#"["hunter2"]"#,
        ] {
            let e = decode_body(body).unwrap_err().to_string();
            assert!(e.starts_with("frame is not a valid envelope"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn golden_frame() {
        let f = encode_frame(&sample(), 1024).unwrap();
        let expected: &[u8] = br#"{"type":"GET_NODE_STATUS","tag":"00000000-0000-4000-8000-000000000001","jsonB64":"e30="}"#;
        assert_eq!(&f[..4], &(expected.len() as u32).to_be_bytes());
        assert_eq!(&f[4..], expected);
    }
}
