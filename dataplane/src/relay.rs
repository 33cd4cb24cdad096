//! Copies bytes both ways between two connected streams until both directions
//! are done.
//!
//! - Both directions run concurrently on the calling task.
//! - Half-close is propagated: EOF on one side closes the write side of the
//!   other (for TCP a FIN, for TLS a close_notify then FIN), and the other
//!   direction keeps flowing.
//! - An error in either direction ends the relay at once and says which side
//!   failed; the caller resets the other side so the failure reaches it.
//! - Buffers are bounded: one fixed buffer per direction.
use std::{fmt, io, pin::pin};

use futures_lite::{
    future,
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
};

/// Size of each direction's copy buffer.
pub const BUF_SIZE: usize = 64 * 1024;

/// Which end of a proxied connection something happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client that connected to us.
    Downstream,
    /// The connection we opened towards the destination.
    Upstream,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
        })
    }
}

/// A relay that ended on an I/O error.
#[derive(Debug, thiserror::Error)]
#[error("{side} failed: {source}")]
pub struct RelayError {
    /// The side whose read or write failed.
    pub side: Side,
    /// The error.
    #[source]
    pub source: io::Error,
    /// Bytes carried before the error.
    pub bytes: Bytes,
}

/// Bytes carried in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    /// Downstream to upstream.
    pub sent: u64,
    /// Upstream to downstream.
    pub received: u64,
}

/// Copies `from` into `to` until EOF, then closes `to`'s write side.
/// Errors name the side they happened on.
async fn copy_half<R, W>(
    mut from: R,
    mut to: W,
    from_side: Side,
    to_side: Side,
    count: &std::cell::Cell<u64>,
) -> Result<(), (Side, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await.map_err(|e| (from_side, e))?;
        if n == 0 {
            to.close().await.map_err(|e| (to_side, e))?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(|e| (to_side, e))?;
        count.set(count.get() + n as u64);
    }
}

/// Relays between `downstream` and `upstream` until both directions have
/// seen EOF, or either fails.
pub async fn relay<D, U>(downstream: &mut D, upstream: &mut U) -> Result<Bytes, RelayError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (dr, dw) = futures_lite::io::split(downstream);
    let (ur, uw) = futures_lite::io::split(upstream);
    let sent = std::cell::Cell::new(0);
    let received = std::cell::Cell::new(0);
    let mut up = pin!(copy_half(dr, uw, Side::Downstream, Side::Upstream, &sent));
    let mut down = pin!(copy_half(ur, dw, Side::Upstream, Side::Downstream, &received));

    // Whichever direction finishes first: on success keep waiting for the
    // other, on error stop both.
    let first = future::or(async { (true, up.as_mut().await) }, async { (false, down.as_mut().await) }).await;
    let result = match first {
        (_, Err(e)) => Err(e),
        (true, Ok(())) => down.as_mut().await,
        (false, Ok(())) => up.as_mut().await,
    };
    let bytes = Bytes { sent: sent.get(), received: received.get() };
    match result {
        Ok(()) => Ok(bytes),
        Err((side, source)) => Err(RelayError { side, source, bytes }),
    }
}
