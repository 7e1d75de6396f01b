//! Streaming SHA-256.

use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::Digest;

/// Size of the read buffer of [`sha256_reader`] and [`sha256_file`].
const BUFFER_BYTES: usize = 64 * 1024;

/// An incremental SHA-256: feed it with [`update`](Self::update) (or as an [`io::Write`], for
/// example with `io::copy` while a download is written to disk), then [`finish`](Self::finish).
#[derive(Debug, Clone, Default)]
pub struct Sha256Hasher {
    inner: Sha256,
    len: u64,
}

impl Sha256Hasher {
    /// A hasher that has seen no bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len = self.len.saturating_add(data.len() as u64);
    }

    /// How many bytes were fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest::from_bytes(self.inner.finalize().into())
    }
}

impl Write for Sha256Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// SHA-256 of a byte slice.
pub fn sha256(data: &[u8]) -> Digest {
    Digest::from_bytes(Sha256::digest(data).into())
}

/// SHA-256 of everything `reader` yields until end of file, read through a fixed 64 KiB buffer
/// (memory use does not depend on the input size). `Interrupted` reads are retried; any other
/// read error is returned.
pub fn sha256_reader(mut reader: impl Read) -> io::Result<Digest> {
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; BUFFER_BYTES];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(hasher.finish()),
            Ok(n) => match buf.get(..n) {
                Some(chunk) => hasher.update(chunk),
                None => {
                    return Err(io::Error::other(
                        "reader claimed more bytes than it was given",
                    ));
                }
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// SHA-256 of the file at `path`, streamed (see [`sha256_reader`]).
pub fn sha256_file(path: impl AsRef<Path>) -> io::Result<Digest> {
    sha256_reader(std::fs::File::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn known_answers() {
        assert_eq!(sha256(b"").to_hex(), EMPTY);
        assert_eq!(sha256(b"abc").to_hex(), ABC);
        assert_eq!(sha256_reader(&b"abc"[..]).unwrap().to_hex(), ABC);
    }

    /// A reader that yields one byte at a time and is interrupted between reads.
    struct Trickle<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            match (self.data.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.data = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn short_and_interrupted_reads() {
        let data = b"abc";
        let got = sha256_reader(Trickle {
            data,
            interrupt: false,
        })
        .unwrap();
        assert_eq!(got.to_hex(), ABC);
    }

    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
    }

    #[test]
    fn read_errors_are_returned() {
        assert_eq!(
            sha256_reader(Failing).unwrap_err().to_string(),
            "disk on fire"
        );
    }

    #[test]
    fn larger_than_the_buffer() {
        let data: Vec<u8> = (0..(3 * BUFFER_BYTES + 17)).map(|i| i as u8).collect();
        assert_eq!(sha256_reader(&data[..]).unwrap(), sha256(&data));
        let mut hasher = Sha256Hasher::new();
        assert!(hasher.is_empty());
        io::copy(&mut &data[..], &mut hasher).unwrap();
        assert_eq!(hasher.len(), data.len() as u64);
        assert_eq!(hasher.finish(), sha256(&data));
    }

    #[test]
    fn file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_file(&path).unwrap().to_hex(), ABC);
        assert_eq!(
            sha256_file(dir.path().join("missing")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
