//! Copies bytes both ways between two connected streams until both directions
//! are done.
//!
//! - Both directions run concurrently on the calling task.
//! - Half-close is propagated: EOF on one side closes the write side of the
//!   other (for TCP a FIN, for TLS a close_notify then FIN), and the other
//!   direction keeps flowing.
//! - An error in either direction ends the relay at once and says which side
//!   failed; the caller resets the other side so the failure reaches it.
//! - No byte in either direction for the idle timeout ends it too.
//! - Buffers are bounded: one fixed buffer per direction.
use std::{
    cell::Cell,
    fmt, io,
    pin::pin,
    time::{Duration, Instant},
};

use futures_lite::{
    future,
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
};

/// Size of each direction's copy buffer: one maximum-size TLS record.
pub const BUF_SIZE: usize = 16 * 1024;

/// Which end of a proxied connection something happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The peer that connected to us (the client, or the outbound proxy).
    Downstream,
    /// The connection we opened (to the tunnel, or to the application).
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

/// Why a relay ended early.
#[derive(Debug, thiserror::Error)]
pub enum End {
    /// A read or write failed on one side.
    #[error("{side} failed: {source}")]
    Io {
        /// The side whose read or write failed.
        side: Side,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Nothing moved in either direction for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
}

/// A relay that ended early, with what it carried before.
#[derive(Debug, thiserror::Error)]
#[error("{end}")]
pub struct RelayError {
    /// Why.
    pub end: End,
    /// Bytes carried before the end.
    pub bytes: Bytes,
}

/// Bytes carried in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    /// Downstream to upstream.
    pub sent: u64,
    /// Upstream to downstream.
    pub received: u64,
    /// When the first byte from upstream was passed downstream.
    pub first_received: Option<Instant>,
}

struct Progress {
    bytes: Cell<u64>,
    last: Cell<Instant>,
    first: Cell<Option<Instant>>,
}

impl Progress {
    fn new(now: Instant) -> Self {
        Self { bytes: Cell::new(0), last: Cell::new(now), first: Cell::new(None) }
    }
}

/// Copies `from` into `to` until EOF, then closes `to`'s write side.
async fn copy_half<R, W>(mut from: R, mut to: W, sides: (Side, Side), progress: &Progress) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (from_side, to_side) = sides;
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await.map_err(|source| End::Io { side: from_side, source })?;
        if n == 0 {
            to.close().await.map_err(|source| End::Io { side: to_side, source })?;
            return Ok(());
        }
        let now = Instant::now();
        if progress.first.get().is_none() {
            progress.first.set(Some(now));
        }
        to.write_all(&buf[..n]).await.map_err(|source| End::Io { side: to_side, source })?;
        progress.bytes.set(progress.bytes.get() + n as u64);
        progress.last.set(Instant::now());
    }
}

/// Ends once neither direction has moved a byte for `idle`.
async fn idle_watch(idle: Duration, a: &Progress, b: &Progress) -> End {
    loop {
        let last = a.last.get().max(b.last.get());
        let quiet = last.elapsed();
        if quiet >= idle {
            return End::Idle(idle);
        }
        glommio::timer::sleep(idle - quiet).await;
    }
}

/// Relays between `downstream` and `upstream` until both directions have
/// seen EOF, either fails, or both are idle for `idle`.
pub async fn relay<D, U>(downstream: &mut D, upstream: &mut U, idle: Duration) -> Result<Bytes, RelayError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (dr, dw) = futures_lite::io::split(downstream);
    let (ur, uw) = futures_lite::io::split(upstream);
    let now = Instant::now();
    let sent = Progress::new(now);
    let received = Progress::new(now);
    let mut up = pin!(copy_half(dr, uw, (Side::Downstream, Side::Upstream), &sent));
    let mut down = pin!(copy_half(ur, dw, (Side::Upstream, Side::Downstream), &received));

    let result = future::or(
        async {
            // Whichever direction finishes first: on success keep waiting for
            // the other, on error stop both.
            let first = future::or(async { (true, up.as_mut().await) }, async { (false, down.as_mut().await) }).await;
            match first {
                (_, Err(e)) => Err(e),
                (true, Ok(())) => down.as_mut().await,
                (false, Ok(())) => up.as_mut().await,
            }
        },
        async { Err(idle_watch(idle, &sent, &received).await) },
    )
    .await;
    let bytes = Bytes { sent: sent.bytes.get(), received: received.bytes.get(), first_received: received.first.get() };
    result.map(|()| bytes).map_err(|end| RelayError { end, bytes })
}

/// Runs `fut`, giving up after `limit`.
pub async fn within<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(limit).await;
        None
    })
    .await
}
