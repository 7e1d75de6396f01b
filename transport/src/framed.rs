//! Framed envelope I/O over async streams.
//!
//! Both halves buffer: the reader keeps what it read past a frame for the next call (so
//! [`FrameReader::read`] is cancellation safe and one `read` of the socket may yield several
//! frames), and the writer collects frames with [`FrameWriter::push`] and sends them with one
//! write and one flush ([`FrameWriter::flush`]): over TLS, frames pushed together leave in one
//! record where they fit, instead of one record and one `write` each.

use runos_protocol::Envelope;
use runos_protocol::frame::{self, DecodeError, EncodeError, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A read or write of a frame failed. Every variant ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a valid frame.
    #[error("protocol error: {0}")]
    Decode(#[from] DecodeError),
    /// We tried to send a message larger than the peer accepts.
    #[error("cannot send: {0}")]
    Encode(#[from] EncodeError),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// How much the reader asks the stream for at least, per read.
const READ_CHUNK: usize = 16 * 1024;
/// A buffer larger than this (left by a large frame) is given back once it is empty.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Reads envelopes from a stream, refusing frames above a maximum size before allocating.
///
/// [`FrameReader::read`] is cancellation safe: bytes read before the future is dropped stay in
/// the reader's buffer for the next call, so it may be raced against other futures in a
/// `select!`. The buffer holds at most one frame (bounded by the maximum) plus one read.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    max: u32,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames.
    start: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wrap a stream; frames above `max` bytes are a protocol error.
    pub fn new(inner: R, max: u32) -> Self {
        FrameReader {
            inner,
            max,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// Change the maximum frame size.
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// Bytes read from the stream and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// A whole frame from the buffer, if it holds one. The length is checked before anything is
    /// reserved for the body.
    fn take_frame(&mut self) -> Result<Option<Envelope>, FrameError> {
        match frame::decode_frame(&self.buf[self.start..], self.max)? {
            Some((env, used)) => {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                    if self.buf.capacity() > KEEP_CAPACITY {
                        self.buf = Vec::new();
                    }
                }
                Ok(Some(env))
            }
            None => Ok(None),
        }
    }

    /// Make room for the rest of the frame being read (its length is known and checked once
    /// the header is in), or for a chunk.
    fn reserve(&mut self) -> Result<(), FrameError> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let have = self.buf.len();
        let want = if have >= HEADER_LEN {
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&self.buf[..HEADER_LEN]);
            HEADER_LEN + frame::check_len(h, self.max)?
        } else {
            HEADER_LEN
        };
        let need = want.saturating_sub(have).max(READ_CHUNK);
        if self.buf.capacity() - have < need {
            self.buf.reserve(need);
        }
        Ok(())
    }

    /// The next envelope, or `None` when the peer closed the stream cleanly between frames.
    /// Cancellation safe (see the type's documentation).
    pub async fn read(&mut self) -> Result<Option<Envelope>, FrameError> {
        loop {
            if let Some(env) = self.take_frame()? {
                return Ok(Some(env));
            }
            self.reserve()?;
            // `read_buf` is cancellation safe: dropped before it completes, nothing was read.
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buffered() == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes envelopes to a stream, refusing messages above the peer's maximum frame size.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    max: u32,
    /// Frames pushed and not yet flushed.
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wrap a stream; `max` is the largest frame the peer accepts.
    pub fn new(inner: W, max: u32) -> Self {
        FrameWriter {
            inner,
            max,
            buf: Vec::new(),
        }
    }

    /// Change the maximum frame size (after the peer advertised its own).
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// The maximum frame size in force.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Bytes pushed and not yet flushed.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Encode one envelope after the frames already pushed; nothing is sent until
    /// [`FrameWriter::flush`]. A message above the maximum is refused and leaves the buffer as
    /// it was.
    pub fn push(&mut self, env: &Envelope) -> Result<(), FrameError> {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0u8; HEADER_LEN]);
        // Serializing an Envelope (strings and an optional integer) into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, env);
        let len = self.buf.len() - at - HEADER_LEN;
        match u32::try_from(len) {
            Ok(l) if l <= self.max => {
                self.buf[at..at + HEADER_LEN].copy_from_slice(&l.to_be_bytes());
                Ok(())
            }
            _ => {
                self.buf.truncate(at);
                Err(EncodeError::TooLarge { len, max: self.max }.into())
            }
        }
    }

    /// Send every pushed frame with one write, then flush. Not cancellation safe: dropped
    /// midway, part of the frames may have been sent (end the connection then).
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        if !self.buf.is_empty() {
            let res = self.inner.write_all(&self.buf).await;
            self.buf.clear();
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            }
            res?;
        }
        self.inner.flush().await?;
        Ok(())
    }

    /// Send one envelope (with any frames pushed before it) and flush.
    pub async fn write(&mut self, env: &Envelope) -> Result<(), FrameError> {
        self.push(env)?;
        self.flush().await
    }

    /// Shut down the write side (TLS close_notify, then FIN).
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runos_protocol::Tag;

    fn env(n: usize) -> Envelope {
        Envelope::with_type(
            "GET_NODE_STATUS",
            Tag::random(),
            &serde_json::json!({ "pad": "x".repeat(n) }),
        )
    }

    /// Frames pushed together arrive as separate frames; one too large is refused and leaves
    /// the others intact.
    #[tokio::test]
    async fn pushed_frames_arrive_whole_and_in_order() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a, 4096);
        let sent: Vec<Envelope> = (0..5).map(|i| env(i * 100)).collect();
        for e in &sent[..3] {
            w.push(e).unwrap();
        }
        assert!(matches!(
            w.push(&env(10_000)),
            Err(FrameError::Encode(EncodeError::TooLarge { .. }))
        ));
        for e in &sent[3..] {
            w.push(e).unwrap();
        }
        w.flush().await.unwrap();
        assert_eq!(w.pending(), 0);
        drop(w);
        let mut r = FrameReader::new(b, 4096);
        for e in &sent {
            let got = r.read().await.unwrap().unwrap();
            assert_eq!(got.tag, e.tag);
            assert_eq!(got.json_b64, e.json_b64);
        }
        assert!(r.read().await.unwrap().is_none());
    }

    /// A read dropped midway (the frame arrives a byte at a time) loses nothing: the next call
    /// returns the whole frame.
    #[tokio::test]
    async fn read_is_cancellation_safe() {
        let (mut a, b) = tokio::io::duplex(64);
        let e = env(300);
        let bytes = frame::encode_frame(&e, 4096).unwrap();
        let mut r = FrameReader::new(b, 4096);
        for byte in &bytes[..bytes.len() - 1] {
            a.write_all(std::slice::from_ref(byte)).await.unwrap();
            let polled = tokio::time::timeout(std::time::Duration::from_millis(1), r.read()).await;
            assert!(polled.is_err(), "no frame before its last byte");
        }
        a.write_all(&bytes[bytes.len() - 1..]).await.unwrap();
        let got = r.read().await.unwrap().unwrap();
        assert_eq!(got.tag, e.tag);
        assert_eq!(r.buffered(), 0);
    }

    /// A length over the maximum is refused from the header alone, before the body arrives.
    #[tokio::test]
    async fn oversized_length_is_refused_from_the_header() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&100_000u32.to_be_bytes()).await.unwrap();
        let mut r = FrameReader::new(b, 4096);
        assert!(matches!(
            r.read().await,
            Err(FrameError::Decode(DecodeError::TooLarge { .. }))
        ));
    }

    /// A stream cut inside a frame is `Truncated`; cut between frames, a clean end.
    #[tokio::test]
    async fn a_cut_inside_a_frame_is_truncated() {
        let (mut a, b) = tokio::io::duplex(4096);
        let bytes = frame::encode_frame(&env(10), 4096).unwrap();
        a.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b, 4096);
        assert!(matches!(r.read().await, Err(FrameError::Truncated)));
    }
}
