//! The tunnel preamble: the first bytes the outbound proxy sends inside the
//! TLS stream, telling the inbound proxy where the client was going.
//!
//! ALPN names the protocol version ([`ALPN`]); the preamble repeats it in its
//! first byte so a mismatch is caught even without ALPN. Wire format (all
//! integers big-endian):
//!
//! ```text
//! 0      1        2       4            4+A        6+A          6+A+E
//! +------+--------+-------+------------+----------+------------+
//! | ver  | family | port  | address    | ext len  | extensions |
//! | = 1  | 4 | 6  | u16   | 4|16 bytes | u16 <= MAX_EXT |  ignored   |
//! +------+--------+-------+------------+----------+------------+
//! ```
//!
//! Sans-IO: [`encode`] appends to a buffer; [`decode`] reads from a slice and
//! says complete (with the bytes consumed), need-more, or a typed error. A
//! preamble is never longer than [`MAX_LEN`], checked before anything is
//! allocated, and decoding never panics on any input. [`read`] is the async
//! edge: it reads a preamble off a stream and keeps the client bytes after it.
#![forbid(unsafe_code)]

mod read;

pub use read::{read, Prefaced, ReadError};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// ALPN protocol name of this tunnel version.
pub const ALPN: &[u8] = b"dataplane-tunnel/1";
/// The version byte this codec speaks.
pub const VERSION: u8 = 1;
/// Largest extensions block accepted.
pub const MAX_EXT: usize = 256;
/// Largest preamble: header, IPv6 address, extensions.
pub const MAX_LEN: usize = 4 + 16 + 2 + MAX_EXT;

/// What the inbound side needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    /// The client's original destination.
    pub dst: SocketAddr,
}

/// The result of [`decode`] on input that is not (yet) an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole preamble, which took the first `len` bytes of the input.
    Complete {
        /// The preamble.
        preamble: Preamble,
        /// Bytes it occupied; what follows is the client's data.
        len: usize,
    },
    /// Not enough bytes yet: at least this many more are needed.
    NeedMore(usize),
}

/// A preamble that can never become valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The version byte is not [`VERSION`].
    #[error("unsupported preamble version {0}")]
    Version(u8),
    /// The family byte is neither 4 nor 6.
    #[error("unknown address family {0}")]
    Family(u8),
    /// Port 0 is never a destination.
    #[error("destination port 0")]
    PortZero,
    /// The extensions block is longer than [`MAX_EXT`].
    #[error("extensions of {0} bytes exceed the {MAX_EXT}-byte limit")]
    TooLong(usize),
}

/// Appends the encoding of `p` to `out`.
pub fn encode(p: &Preamble, out: &mut Vec<u8>) {
    out.push(VERSION);
    match p.dst.ip() {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&p.dst.port().to_be_bytes());
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&p.dst.port().to_be_bytes());
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&0u16.to_be_bytes()); // no extensions yet
}

/// Decodes a preamble from the start of `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded, Error> {
    let need = |n: usize| Ok(Decoded::NeedMore(n - buf.len()));
    let Some(&version) = buf.first() else { return need(1) };
    if version != VERSION {
        return Err(Error::Version(version));
    }
    let Some(&family) = buf.get(1) else { return need(2) };
    let addr_len = match family {
        4 => 4,
        6 => 16,
        other => return Err(Error::Family(other)),
    };
    let header = 4 + addr_len + 2;
    if buf.len() < header {
        return need(header);
    }
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    if port == 0 {
        return Err(Error::PortZero);
    }
    let addr = &buf[4..4 + addr_len];
    let ip = match <[u8; 4]>::try_from(addr) {
        Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        Err(_) => {
            let mut v6 = [0u8; 16];
            v6.copy_from_slice(addr);
            IpAddr::V6(Ipv6Addr::from(v6))
        }
    };
    let ext = usize::from(u16::from_be_bytes([buf[header - 2], buf[header - 1]]));
    if ext > MAX_EXT {
        return Err(Error::TooLong(ext));
    }
    let len = header + ext;
    if buf.len() < len {
        return need(len);
    }
    Ok(Decoded::Complete { preamble: Preamble { dst: SocketAddr::new(ip, port) }, len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(p: &Preamble) -> Vec<u8> {
        let mut v = Vec::new();
        encode(p, &mut v);
        v
    }

    #[test]
    fn v4_round_trip_and_layout() {
        let p = Preamble { dst: "10.1.2.3:8080".parse().expect("addr") };
        let b = enc(&p);
        assert_eq!(b, [1, 4, 0x1f, 0x90, 10, 1, 2, 3, 0, 0]);
        assert_eq!(decode(&b), Ok(Decoded::Complete { preamble: p, len: 10 }));
    }

    #[test]
    fn trailing_client_bytes_are_not_consumed() {
        let p = Preamble { dst: "[fd00::1]:443".parse().expect("addr") };
        let mut b = enc(&p);
        let len = b.len();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(decode(&b), Ok(Decoded::Complete { preamble: p, len }));
    }

    #[test]
    fn every_prefix_needs_more() {
        let b = enc(&Preamble { dst: "10.1.2.3:8080".parse().expect("addr") });
        for n in 0..b.len() {
            match decode(&b[..n]) {
                Ok(Decoded::NeedMore(k)) => assert!(k >= 1 && n + k <= b.len(), "prefix {n}: need {k}"),
                other => panic!("prefix {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_fields_are_typed_errors() {
        assert_eq!(decode(&[2]), Err(Error::Version(2)));
        assert_eq!(decode(b"GET / HTTP/1.1"), Err(Error::Version(b'G')));
        assert_eq!(decode(&[1, 5]), Err(Error::Family(5)));
        assert_eq!(decode(&[1, 4, 0, 0, 10, 0, 0, 1, 0, 0]), Err(Error::PortZero));
        assert_eq!(decode(&[1, 4, 0, 80, 10, 0, 0, 1, 0xff, 0xff]), Err(Error::TooLong(0xffff)));
    }

    #[test]
    fn extensions_are_skipped() {
        let mut b = vec![1, 4, 0, 80, 10, 0, 0, 1, 0, 3, 9, 9, 9];
        b.push(42);
        let p = Preamble { dst: "10.0.0.1:80".parse().expect("addr") };
        assert_eq!(decode(&b), Ok(Decoded::Complete { preamble: p, len: 13 }));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        #[test]
        fn decode_never_panics_and_stays_bounded(buf in proptest::collection::vec(any::<u8>(), 0..400)) {
            match decode(&buf) {
                Ok(Decoded::Complete { len, .. }) => prop_assert!(len <= MAX_LEN && len <= buf.len()),
                Ok(Decoded::NeedMore(n)) => prop_assert!(buf.len() + n <= MAX_LEN),
                Err(_) => {}
            }
        }

        #[test]
        fn round_trips(ip in any::<IpAddr>(), port in 1u16.., tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let p = Preamble { dst: SocketAddr::new(ip, port) };
            let mut b = enc(&p);
            let len = b.len();
            b.extend_from_slice(&tail);
            prop_assert_eq!(decode(&b), Ok(Decoded::Complete { preamble: p, len }));
        }
    }
}
