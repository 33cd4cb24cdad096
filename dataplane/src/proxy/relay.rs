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
//! - Buffers are bounded and cost nothing while idle: reads go into one
//!   scratch buffer per executor thread ([`MAX_BUF`], a TLS record) and are
//!   written on in the same poll; only bytes the destination cannot take at
//!   once are kept, in a per-connection spill buffer freed once written.
use std::{
    cell::{Cell, RefCell},
    fmt, io,
    pin::{pin, Pin},
    task::Poll,
    time::{Duration, Instant},
};

use futures_lite::{
    future,
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
};

/// Size of the per-thread read buffer: one maximum-size TLS record.
pub const MAX_BUF: usize = 16 * 1024;

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
    /// An authorization policy that came since refuses the connection.
    #[error("closed: {0}")]
    Denied(String),
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

/// What one direction has carried, and when.
pub(crate) struct Progress {
    pub(crate) bytes: Cell<u64>,
    last: Cell<Instant>,
    pub(crate) first: Cell<Option<Instant>>,
}

impl Progress {
    pub(crate) fn new(now: Instant) -> Self {
        Self { bytes: Cell::new(0), last: Cell::new(now), first: Cell::new(None) }
    }
}

thread_local! {
    /// One read buffer per executor thread. It is borrowed only inside a
    /// single poll (read, then write as much as the destination takes at
    /// once), never across an `.await`, so an idle connection holds none.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_BUF]);
}

/// The bytes `from` already holds (at most [`MAX_BUF`]), taken without
/// waiting: none when it holds none, is at its end, or failed (the relay's
/// first read says so). The tunnel's first flight carries them, so a client
/// that speaks first costs one segment less.
pub(crate) fn ready_bytes(from: &impl std::os::fd::AsRawFd) -> Vec<u8> {
    use nix::sys::socket::{recv, MsgFlags};
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        match recv(from.as_raw_fd(), &mut buf[..], MsgFlags::MSG_DONTWAIT) {
            Ok(n) => buf[..n].to_vec(),
            Err(_) => Vec::new(),
        }
    })
}

/// What one poll of a direction did.
enum Step {
    /// The source reached EOF.
    Eof,
    /// Bytes moved (some may wait in the spill buffer).
    Moved(usize),
}

/// Copies `from` into `to` until EOF, then closes `to`'s write side.
///
/// Bytes are read into the thread's scratch buffer and written on in the
/// same poll; only what the destination does not take at once is copied into
/// a spill buffer owned by this connection, which is freed once written.
/// TLS destinations are flushed after every write, so no record is left in
/// rustls's buffer while we wait on the other side.
pub(crate) async fn copy_half<R, W>(mut from: R, mut to: W, sides: (Side, Side), progress: &Progress) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (from_side, to_side) = sides;
    let to_err = |source| End::Io { side: to_side, source };
    let mut spill: Vec<u8> = Vec::new();
    let mut unflushed = false;
    loop {
        if !spill.is_empty() {
            to.write_all(&spill).await.map_err(to_err)?;
            spill = Vec::new();
            unflushed = true;
        }
        if unflushed {
            to.flush().await.map_err(to_err)?;
            unflushed = false;
        }
        let step = std::future::poll_fn(|cx| {
            SCRATCH.with(|scratch| {
                let mut buf = scratch.borrow_mut();
                let n = match Pin::new(&mut from).poll_read(cx, &mut buf[..]) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(source)) => return Poll::Ready(Err(End::Io { side: from_side, source })),
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Step::Eof)),
                    Poll::Ready(Ok(n)) => n,
                };
                let mut off = 0;
                while off < n {
                    match Pin::new(&mut to).poll_write(cx, &buf[off..n]) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(to_err(io::ErrorKind::WriteZero.into()))),
                        Poll::Ready(Ok(k)) => off += k,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(to_err(e))),
                        Poll::Pending => break,
                    }
                }
                spill.extend_from_slice(&buf[off..n]);
                match Pin::new(&mut to).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(to_err(e))),
                    Poll::Pending => unflushed = true,
                }
                Poll::Ready(Ok(Step::Moved(n)))
            })
        })
        .await?;
        match step {
            Step::Eof => {
                to.close().await.map_err(to_err)?;
                return Ok(());
            }
            Step::Moved(n) => {
                let now = Instant::now();
                if progress.first.get().is_none() {
                    progress.first.set(Some(now));
                }
                progress.bytes.set(progress.bytes.get() + n as u64);
                progress.last.set(now);
            }
        }
    }
}

/// Ends once neither direction has moved a byte for `idle`.
///
/// Meanwhile it also wakes the relay now and then, which re-polls both
/// directions: a safety net. Between two data planes whose executors had
/// nothing else to do, a read readiness was once seen to go unannounced (a
/// bulk transfer both ways stalled in about one run in six, data waiting in
/// the socket); it has not been seen since glommio's sleep path was patched
/// (README, "Known limits"), and the cause was never pinned down. A re-poll
/// would find the data. The interval follows the quiet time, between 10 s
/// and a minute: at half a second to 5 s, as it was while the stall was
/// live, 4,950 connections at 2,000 requests/s cost twice the CPU per
/// request of one connection, or, with the wake-ups put on a shared grid,
/// a p99 of 2.4 ms (a burst of re-polls every step).
async fn idle_watch(idle: Duration, a: &Progress, b: &Progress) -> End {
    loop {
        let last = a.last.get().max(b.last.get());
        let quiet = last.elapsed();
        if quiet >= idle {
            return End::Idle(idle);
        }
        let tick = quiet.clamp(REPOLL_MIN, REPOLL_MAX);
        sleep_on_grid((idle - quiet).min(tick)).await;
    }
}

/// Bounds of the re-poll interval of [`idle_watch`].
const REPOLL_MIN: Duration = Duration::from_secs(10);
const REPOLL_MAX: Duration = Duration::from_secs(60);

/// The step of the grid the idle watches' timers fire on.
const GRID: Duration = Duration::from_millis(50);

/// Sleeps at least `d`, until the next point of a grid of [`GRID`] steps
/// shared by every connection of this executor thread: the watches of many
/// connections fire together, in one wake-up of the executor, instead of
/// one wake-up each, and a step is short enough that the watches due in it
/// make no burst that a request would wait behind (4,950 connections
/// re-polled every 10 s: about 25 per step per executor). A watch wakes at
/// most one step late.
async fn sleep_on_grid(d: Duration) {
    thread_local! {
        static EPOCH: Instant = Instant::now();
    }
    let epoch = EPOCH.with(|e| *e);
    let now = Instant::now();
    let due = (now + d).saturating_duration_since(epoch).as_nanos();
    let step = GRID.as_nanos();
    let at = u64::try_from(due.div_ceil(step) * step).map_or(now + d, |n| epoch + Duration::from_nanos(n));
    glommio::timer::sleep(at.saturating_duration_since(now)).await;
}

/// Relays between `downstream` and `upstream` until both directions have
/// seen EOF, either fails, or both are idle for `idle`.
pub async fn relay<D, U>(downstream: &mut D, upstream: &mut U, idle: Duration) -> Result<Bytes, RelayError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    relay_until(downstream, upstream, idle, future::pending()).await
}

/// [`relay`], also ended when `stop` gives an end (a policy change).
pub async fn relay_until<D, U>(
    downstream: &mut D,
    upstream: &mut U,
    idle: Duration,
    stop: impl std::future::Future<Output = End>,
) -> Result<Bytes, RelayError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (dr, dw) = futures_lite::io::split(downstream);
    let (ur, uw) = futures_lite::io::split(upstream);
    let now = Instant::now();
    let sent = Progress::new(now);
    let received = Progress::new(now);
    let up = copy_half(dr, uw, (Side::Downstream, Side::Upstream), &sent);
    let down = copy_half(ur, dw, (Side::Upstream, Side::Downstream), &received);
    let ends = future::or(async { Err(idle_watch(idle, &sent, &received).await) }, async { Err(stop.await) });
    let result = future::or(both(up, down), ends).await;
    let bytes = Bytes { sent: sent.bytes.get(), received: received.bytes.get(), first_received: received.first.get() };
    result.map(|()| bytes).map_err(|end| RelayError { end, bytes })
}

/// Runs both directions: whichever finishes first, on success keep waiting
/// for the other, on error stop both.
pub(crate) async fn both(
    up: impl std::future::Future<Output = Result<(), End>>,
    down: impl std::future::Future<Output = Result<(), End>>,
) -> Result<(), End> {
    let (mut up, mut down) = (pin!(up), pin!(down));
    let first = future::or(async { (true, up.as_mut().await) }, async { (false, down.as_mut().await) }).await;
    match first {
        (_, Err(e)) => Err(e),
        (true, Ok(())) => down.as_mut().await,
        (false, Ok(())) => up.as_mut().await,
    }
}

/// Runs `fut` to the end, re-polling it every `every` while it waits: the
/// lost readiness wake-up of [`within`] guards also for waits with no
/// deadline (an accept loop). The re-polls fall on `sleep_on_grid`'s
/// grid: a node's hundreds of listeners per executor wake it together, not
/// once each.
pub async fn repolled<T>(every: Duration, fut: impl std::future::Future<Output = T>) -> T {
    future::or(fut, async {
        loop {
            sleep_on_grid(every).await;
        }
    })
    .await
}

/// Runs `fut`, giving up after `limit`.
///
/// While it waits, `fut` is re-polled after 50 ms, then at doubling
/// intervals up to a second: the same lost readiness wake-up that
/// the relay's idle watch guards against was seen to hold a TLS handshake
/// until its deadline (10 s), where the timer's wake-up found it complete.
pub async fn within<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    future::or(async { Some(fut.await) }, async {
        let deadline = Instant::now() + limit;
        let mut tick = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            glommio::timer::sleep(left.min(tick)).await;
            tick = (tick * 2).min(Duration::from_secs(1));
        }
    })
    .await
}

#[cfg(test)]
mod duplex;

#[cfg(test)]
mod tests;
