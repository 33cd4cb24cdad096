//! Reading a preamble off a stream: the async edge of the sans-IO codec, kept
//! beside it (linkerd2-proxy's transport header does the same).
//!
//! [`read`] pulls bytes until [`decode`](super::decode) says complete or
//! fails, never asks for more than [`MAX_LEN`](super::MAX_LEN) bytes in all,
//! and hands back whatever client bytes arrived in the same reads, so nothing
//! the client sent after the preamble is lost. It sets no deadline of its own:
//! the caller bounds the handshake and the whole preamble together, so a peer
//! cannot stretch it by dripping one byte per timeout.
use std::io;

use futures_lite::io::{AsyncRead, AsyncReadExt};

use super::{decode, Decoded, Error, Preamble, MAX_LEN};

/// Why no preamble could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes can never become a valid preamble.
    #[error("preamble: {0}")]
    Invalid(#[from] Error),
    /// The stream ended before the preamble was complete.
    #[error("preamble: the stream ended after {0} bytes")]
    Truncated(usize),
    /// The stream failed inside the preamble.
    #[error("preamble: {0}")]
    Io(#[from] io::Error),
}

/// A preamble and the client bytes that followed it in the same reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefaced {
    /// The decoded preamble.
    pub preamble: Preamble,
    /// Client bytes read past the preamble (at most `MAX_LEN - 1`); they go
    /// to the destination first.
    pub early: Vec<u8>,
}

/// Reads one preamble from `stream`.
pub async fn read<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Prefaced, ReadError> {
    let mut buf = vec![0u8; MAX_LEN];
    let mut filled = 0;
    loop {
        if let Decoded::Complete { preamble, len } = decode(&buf[..filled])? {
            buf.truncate(filled);
            buf.drain(..len);
            return Ok(Prefaced { preamble, early: buf });
        }
        // decode() never needs more than MAX_LEN bytes, so there is room.
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(ReadError::Truncated(filled));
        }
        filled += n;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use futures_lite::future::block_on;

    use super::*;
    use crate::preamble::{encode, MAX_EXT};

    /// Yields `data` in reads of the given sizes (the last size repeats),
    /// then EOF.
    struct Chunked {
        data: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
        reads: usize,
    }

    impl Chunked {
        fn new(data: Vec<u8>, sizes: &[usize]) -> Self {
            Self { data, at: 0, sizes: sizes.to_vec(), reads: 0 }
        }
    }

    impl AsyncRead for Chunked {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
            let size = *self.sizes.get(self.reads).or(self.sizes.last()).unwrap_or(&1);
            self.reads += 1;
            let n = size.min(out.len()).min(self.data.len() - self.at);
            out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    fn wire(dst: &str, tail: &[u8]) -> (Preamble, Vec<u8>) {
        let p = Preamble { dst: dst.parse().expect("addr") };
        let mut b = Vec::new();
        encode(&p, &mut b);
        b.extend_from_slice(tail);
        (p, b)
    }

    #[test]
    fn one_byte_at_a_time() {
        let (p, b) = wire("10.0.0.9:8080", b"");
        let got = block_on(read(&mut Chunked::new(b, &[1]))).expect("preamble");
        assert_eq!(got, Prefaced { preamble: p, early: Vec::new() });
    }

    #[test]
    fn split_at_every_offset_keeps_the_client_bytes() {
        let tail = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n";
        for (dst, _) in [("10.0.0.9:8080", 4), ("[fd00::2]:443", 16)] {
            let (p, b) = wire(dst, tail);
            for split in 1..b.len() {
                let mut s = Chunked::new(b.clone(), &[split, b.len()]);
                let got = block_on(read(&mut s)).unwrap_or_else(|e| panic!("{dst} split at {split}: {e}"));
                assert_eq!(got.preamble, p, "split at {split}");
                // Whatever was read past the preamble is kept, and the rest
                // is still in the stream: together, exactly the client's bytes.
                let mut rest = got.early.clone();
                rest.extend_from_slice(&s.data[s.at..]);
                assert_eq!(rest, tail, "{dst} split at {split}");
            }
        }
    }

    #[test]
    fn truncated_and_invalid_are_told_apart() {
        let (_, b) = wire("10.0.0.9:8080", b"");
        for cut in 0..b.len() {
            let err = block_on(read(&mut Chunked::new(b[..cut].to_vec(), &[3]))).expect_err("truncated");
            assert!(matches!(err, ReadError::Truncated(n) if n == cut), "cut {cut}: {err:?}");
        }
        let err = block_on(read(&mut Chunked::new(b"GET / HTTP/1.1\r\n".to_vec(), &[1]))).expect_err("not ours");
        assert!(matches!(err, ReadError::Invalid(Error::Version(b'G'))), "{err:?}");
    }

    #[test]
    fn never_reads_more_than_a_preamble_can_be() {
        // A header announcing the largest extensions block, then endless
        // bytes: the reader stops within MAX_LEN and keeps the surplus.
        let mut b = vec![1, 4, 0, 80, 10, 0, 0, 1];
        b.extend_from_slice(&(MAX_EXT as u16).to_be_bytes());
        let len = b.len() + MAX_EXT;
        b.resize(10 * MAX_LEN, 0xaa);
        let mut s = Chunked::new(b, &[7]);
        let got = block_on(read(&mut s)).expect("largest preamble");
        assert!(s.at <= MAX_LEN, "read {} bytes", s.at);
        assert_eq!(got.early.len(), s.at - len);
    }
}
