//! Framed envelope I/O over async streams.

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

/// Reads envelopes from a stream, refusing frames above a maximum size before allocating.
///
/// `read` is not cancellation safe: own the reader in one task and do not race `read` against
/// other futures in a `select!` that may drop it.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    max: u32,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wrap a stream; frames above `max` bytes are a protocol error.
    pub fn new(inner: R, max: u32) -> Self {
        FrameReader { inner, max }
    }

    /// Change the maximum frame size.
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// The next envelope, or `None` when the peer closed the stream cleanly between frames.
    pub async fn read(&mut self) -> Result<Option<Envelope>, FrameError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let n = self.inner.read(&mut header[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            got += n;
        }
        let len = frame::check_len(header, self.max)?;
        let mut body = vec![0u8; len];
        self.inner.read_exact(&mut body).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                FrameError::Truncated
            } else {
                FrameError::Io(e)
            }
        })?;
        Ok(Some(frame::decode_body(&body)?))
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
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wrap a stream; `max` is the largest frame the peer accepts.
    pub fn new(inner: W, max: u32) -> Self {
        FrameWriter { inner, max }
    }

    /// Change the maximum frame size (after the peer advertised its own).
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// The maximum frame size in force.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Send one envelope and flush it.
    pub async fn write(&mut self, env: &Envelope) -> Result<(), FrameError> {
        let bytes = frame::encode_frame(env, self.max)?;
        self.inner.write_all(&bytes).await?;
        self.inner.flush().await?;
        Ok(())
    }

    /// Shut down the write side (TLS close_notify, then FIN).
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}
