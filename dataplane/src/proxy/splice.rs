//! The same-node fast path in the kernel: a connection between two pods this
//! data plane serves is spliced socket to socket (sockmap, `splice.bpf.c`),
//! so its bytes do not come up to user space.
//!
//! The data plane still decides: it has accepted the client pod's captured
//! connection, checked both pods (it holds both certificates) and opened the
//! connection into the destination pod, exactly as the user-space fast path
//! does; only then are the two sockets handed to the kernel, before either
//! has been read from. It still sees every end: a FIN (it waits until the
//! other socket has taken every byte, then shuts its write side), a reset,
//! and silence (the idle timeout, from the kernel's byte counts, which are
//! also the connection's).
//!
//! The kernel's redirect has no flow control of its own, so it stops a
//! direction that piles bytes up (a fast sender, a slow receiver: see
//! `SPLICE_BACKLOG`); the bytes then stay in the source socket, whose TCP
//! window closes on them, and this process relays that direction from then
//! on, once the destination has sent what the kernel handed it. Bulk
//! transfers end up here; requests and responses stay in the kernel.
//!
//! Waiting: a spliced socket is never waited on for data (the kernel would
//! wake the wait for about every segment it moves on), only for its end
//! (glommio's `hangup`, part of the vendored patch) and for word that the
//! kernel paused it: the verdict writes the socket's cookie to a ring, a
//! thread reads it and tells every executor ([`paused`]); the idle watch
//! also looks at the pause flags, in case the ring was full.
//!
//! When the kernel cannot take a pair (a full map, a socket that was closing
//! already, no sockmap support) the connection is relayed in user space as
//! before, and nothing is lost.
use std::{
    io,
    mem::MaybeUninit,
    net::Shutdown,
    os::fd::{AsFd, BorrowedFd},
    rc::Rc,
    time::{Duration, Instant},
};

use futures_lite::{future, io::AsyncWriteExt};
use glommio::{
    channels::local_channel::{self, LocalReceiver},
    net::TcpStream,
};

use crate::{
    node::ebpf::{Pair, SpliceEnd},
    node::sys,
    proxy::conn::ExecutorCtx,
    proxy::relay::{self, Bytes, End, Progress, RelayError, Side},
    proxy::stats::Count,
};

/// What [`start`] did with a connection.
#[derive(Debug)]
pub enum Start<'a> {
    /// The kernel carries both ways: run it with [`Spliced::relay`].
    Spliced(Box<Spliced<'a>>),
    /// Relay it in user space. `early`: client bytes the kernel carried
    /// before it gave the pair back (they are at the destination already).
    UserSpace {
        /// Bytes already carried downstream to upstream.
        early: u64,
    },
    /// The kernel took client bytes that the destination never took from
    /// it: the connection cannot go on.
    Failed(RelayError),
}

/// A pair of sockets in the splice maps; taken out when dropped.
#[derive(Debug)]
pub struct Spliced<'a> {
    executor: &'a ExecutorCtx,
    pair: Pair,
    /// Both sockets again, on second fds: to wait for a socket's end and to
    /// ask what it has sent while the connection's own streams are split
    /// between the two directions.
    down: TcpStream,
    up: TcpStream,
    /// What each had taken to send before the splice.
    down_base: u64,
    up_base: u64,
}

impl Drop for Spliced<'_> {
    fn drop(&mut self) {
        let mut notices = self.executor.splice_notices.borrow_mut();
        notices.remove(&self.pair.a);
        notices.remove(&self.pair.b);
        if let Some(splicer) = &self.executor.splicer {
            splicer.borrow_mut().unpair(&self.pair);
        }
    }
}

/// The kernel paused the direction whose source socket is `cookie`: wakes
/// it, if this executor splices it.
pub fn paused(executor: &ExecutorCtx, cookie: u64) {
    if let Some(tx) = executor.splice_notices.borrow().get(&cookie) {
        let _ = tx.try_send(());
    }
}

/// Where the word that the kernel paused `cookie`'s direction arrives.
fn notice(executor: &ExecutorCtx, cookie: u64) -> LocalReceiver<()> {
    let (tx, rx) = local_channel::new_bounded(1);
    executor.splice_notices.borrow_mut().insert(cookie, Rc::new(tx));
    rx
}

/// Hands `down` (the accepted client connection) and `up` (the connection
/// into the destination pod, perhaps still connecting) to the kernel, if
/// this executor splices and the kernel takes them. Neither has been read.
pub async fn start<'a>(executor: &'a ExecutorCtx, down: &TcpStream, up: &mut TcpStream, idle: Duration) -> Start<'a> {
    let Some(splicer) = executor.splicer.as_ref() else {
        // No sockmap here (logged once at start).
        executor.with_stats(|s| s.counts[Count::SpliceFallbacks] += 1);
        return Start::UserSpace { early: 0 };
    };
    // Only an established socket can be spliced: wait for the connect (an
    // empty write completes when it has). A failure is the relay's to report.
    match relay::within(executor.limits.handshake, up.write(&[])).await {
        Some(Ok(_)) => {}
        Some(Err(_)) | None => return Start::UserSpace { early: 0 },
    }
    let refused = |what: &str, e: &dyn std::fmt::Display| {
        executor.with_stats(|s| s.counts[Count::SpliceFallbacks] += 1);
        if let Some(left_out) = executor.may_log("splice") {
            tracing::info!(error = %e, left_out, "same-node connection relayed in user space: {what}");
        }
    };
    let prepared = (|| {
        let (d, u) = (sys::borrow_fd(down), sys::borrow_fd(up));
        let cookies = (sys::socket_cookie(d)?, sys::socket_cookie(u)?);
        let fds = (d.try_clone_to_owned()?, u.try_clone_to_owned()?);
        let sent = (sys::tcp_sent(d)?, sys::tcp_sent(u)?);
        io::Result::Ok((cookies, fds, sent))
    })();
    let ((dc, uc), (down_fd, up_fd), (down_sent, up_sent)) = match prepared {
        Ok(p) => p,
        Err(e) => {
            refused("reading its sockets", &e);
            return Start::UserSpace { early: 0 };
        }
    };
    let ends = (
        SpliceEnd { cookie: dc, fd: down_fd.as_fd(), acked: down_sent.0 },
        SpliceEnd { cookie: uc, fd: up_fd.as_fd(), acked: up_sent.0 },
    );
    let pair = match splicer.borrow_mut().pair(ends.0, ends.1) {
        Ok(pair) => pair,
        Err(e) => {
            refused("the kernel did not take it", &e);
            return Start::UserSpace { early: 0 };
        }
    };
    let (down_base, up_base) = (down_sent.0 + down_sent.1, up_sent.0 + up_sent.1);
    let spliced = Spliced {
        executor,
        pair,
        down: sys::glommio_stream(down_fd),
        up: sys::glommio_stream(up_fd),
        down_base,
        up_base,
    };
    if !pair.both_ways {
        refused("the destination was closing", &"not established");
        return half_open(splicer, spliced, idle).await;
    }
    executor.with_stats(|s| s.counts[Count::Spliced] += 1);
    match reset_before(splicer, &spliced) {
        Some(failed) => {
            drop(spliced); // unpaired
            Start::Failed(failed)
        }
        None => Start::Spliced(Box::new(spliced)),
    }
}

/// The destination was closing already when the pair was made. The client's
/// bytes may have started through the kernel: stop them, let the
/// destination send what it was handed, then give both back to user space.
async fn half_open<'a>(
    splicer: &std::cell::RefCell<crate::node::ebpf::Splicer>,
    spliced: Spliced<'a>,
    idle: Duration,
) -> Start<'a> {
    let a = spliced.pair.a;
    let stopped = splicer.borrow_mut().stop(a);
    let moved = splicer.borrow().moved(a).0;
    let bytes = Bytes { sent: moved, received: 0, first_received: None };
    let drained = match stopped {
        Ok(()) => {
            let taken = taken_since(sys::borrow_fd(&spliced.up), spliced.up_base);
            drain(moved, &taken, Side::Upstream, idle).await
        }
        Err(e) => Err(End::Io { side: Side::Upstream, source: io::Error::other(e.to_string()) }),
    };
    drop(spliced); // unpaired
    match drained {
        Ok(()) => Start::UserSpace { early: moved },
        Err(end) => Start::Failed(RelayError { end, bytes }),
    }
}

/// A reset that reached either socket before the splice, with what the
/// kernel moved meanwhile. Bytes queued before the splice (a server that
/// speaks first, a client that did not wait) are moved on at a socket's
/// first read: this peeks, so that nothing could be taken from the stream
/// here. A reset that came before this look is seen here, and only here:
/// the read that sees a socket's error takes it, and a later peek would
/// read an orderly end.
fn reset_before(splicer: &std::cell::RefCell<crate::node::ebpf::Splicer>, spliced: &Spliced<'_>) -> Option<RelayError> {
    let looks =
        [(Side::Downstream, peek(sys::borrow_fd(&spliced.down))), (Side::Upstream, peek(sys::borrow_fd(&spliced.up)))];
    let (side, source) = looks
        .into_iter()
        .find_map(|(side, r)| r.err().filter(|e| e.kind() != io::ErrorKind::WouldBlock).map(|e| (side, e)))?;
    let s = splicer.borrow();
    let bytes = Bytes { sent: s.moved(spliced.pair.a).0, received: s.moved(spliced.pair.b).0, first_received: None };
    Some(RelayError { end: End::Io { side, source }, bytes })
}

/// A read that takes nothing (`MSG_PEEK`) and does not wait: 0 at the end
/// of the stream, 1 if bytes wait for user space.
fn peek(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut probe = [MaybeUninit::<u8>::uninit(); 1];
    socket2::SockRef::from(&fd).recv_with_flags(&mut probe, libc::MSG_PEEK | libc::MSG_DONTWAIT)
}

impl Spliced<'_> {
    /// Runs the connection to its end: both directions have seen EOF (each
    /// passed on once the other socket had taken every byte), either failed,
    /// or neither moved a byte for `idle`. Ends as [`relay::relay`] does.
    pub async fn relay(self, down: &mut TcpStream, up: &mut TcpStream, idle: Duration) -> Result<Bytes, RelayError> {
        let splicer = self.executor.splicer.as_ref().expect("a pair exists only with a splicer");
        let moved = |cookie| move || splicer.borrow().moved(cookie).0;
        let (moved_up, moved_down) = (moved(self.pair.a), moved(self.pair.b));
        let (notice_up, notice_down) = (notice(self.executor, self.pair.a), notice(self.executor, self.pair.b));
        let (to_up, to_down) = (
            taken_since(sys::borrow_fd(&self.up), self.up_base),
            taken_since(sys::borrow_fd(&self.down), self.down_base),
        );
        let now = Instant::now();
        let (sent, received) = (Progress::new(now), Progress::new(now));
        let (dr, dw) = futures_lite::io::split(down);
        let (ur, uw) = futures_lite::io::split(up);
        let upward = Direction {
            executor: self.executor,
            cookie: self.pair.a,
            notice: notice_up,
            watch: &self.down,
            to: sys::borrow_fd(&self.up),
            sides: (Side::Downstream, Side::Upstream),
            moved: &moved_up,
            taken: &to_up,
            progress: &sent,
        };
        let downward = Direction {
            executor: self.executor,
            cookie: self.pair.b,
            notice: notice_down,
            watch: &self.up,
            to: sys::borrow_fd(&self.down),
            sides: (Side::Upstream, Side::Downstream),
            moved: &moved_down,
            taken: &to_down,
            progress: &received,
        };
        // Each look of the idle watch reads both entries once: their counts,
        // and their pause flags, in case the ring's word of a pause was lost
        // (a full ring).
        let look = || {
            let mut total = sent.bytes.get() + received.bytes.get();
            for cookie in [self.pair.a, self.pair.b] {
                let (moved, was_paused) = splicer.borrow().moved(cookie);
                if was_paused {
                    paused(self.executor, cookie);
                }
                total += moved;
            }
            total
        };
        let both = relay::both(upward.run(dr, uw, idle), downward.run(ur, dw, idle));
        let result = future::or(both, async { Err(count_watch(idle, &look).await) }).await;
        let bytes = Bytes {
            sent: moved_up() + sent.bytes.get(),
            received: moved_down() + received.bytes.get(),
            first_received: received.first.get(),
        };
        result.map(|()| bytes).map_err(|end| RelayError { end, bytes })
    }
}

/// One direction of a spliced connection.
struct Direction<'a> {
    executor: &'a ExecutorCtx,
    /// The source socket's cookie.
    cookie: u64,
    /// Word that the kernel paused this direction.
    notice: LocalReceiver<()>,
    /// The source socket (a second stream on it), to wait on.
    watch: &'a TcpStream,
    /// The destination socket.
    to: BorrowedFd<'a>,
    sides: (Side, Side),
    /// What the kernel handed from source to destination.
    moved: &'a dyn Fn() -> u64,
    /// What the destination has taken to send since the splice.
    taken: &'a dyn Fn() -> io::Result<u64>,
    /// What this process relayed once the kernel paused.
    progress: &'a Progress,
}

impl Direction<'_> {
    fn paused(&self) -> bool {
        self.executor.splicer.as_ref().is_some_and(|s| s.borrow().moved(self.cookie).1)
    }

    /// Waits for the source's end while the kernel carries its bytes, then
    /// shuts the destination's write side once it has taken them all (the
    /// kernel sends them from a worker: a FIN sent before them would cut the
    /// stream short). If the kernel pauses the direction instead, relays
    /// the rest here, from `from` to `to` (the connection's own halves),
    /// once the destination has taken what the kernel handed it.
    async fn run<R, W>(self, from: R, to: W, idle: Duration) -> Result<(), End>
    where
        R: futures_lite::AsyncRead + Unpin,
        W: futures_lite::AsyncWrite + Unpin,
    {
        let (from_side, to_side) = self.sides;
        let from_err = |source| End::Io { side: from_side, source };
        let ended = loop {
            let woken = future::or(async { self.watch.hangup().await.map_err(|e| from_err(e.into())) }, async {
                if self.notice.recv().await.is_none() {
                    // No one left to tell us (cannot happen while the
                    // pair is registered): the end is all we wait for.
                    future::pending::<()>().await;
                }
                Ok(())
            });
            woken.await?;
            match peek(sys::borrow_fd(self.watch)) {
                Ok(0) => break true,
                Ok(_) => break false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Paused, the segment that paused it not yet queued.
                    if self.paused() {
                        break false;
                    }
                }
                Err(e) => return Err(from_err(e)),
            }
        };
        if !ended {
            self.executor.with_stats(|s| s.counts[Count::SplicePaused] += 1);
            tracing::debug!(side = %from_side, "the kernel paused a spliced direction: relaying it here");
        }
        drain((self.moved)(), self.taken, to_side, idle).await?;
        if !ended {
            return relay::copy_half(from, to, self.sides, self.progress).await;
        }
        match socket2::SockRef::from(&self.to).shutdown(Shutdown::Write) {
            // Closed already (reset): its own direction reports how.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other.map_err(|source| End::Io { side: to_side, source }),
        }
    }
}

/// Bounds of the pause between two looks at a destination still sending
/// what the kernel handed it.
const DRAIN_MIN: Duration = Duration::from_micros(50);
const DRAIN_MAX: Duration = Duration::from_millis(20);

/// Waits until a socket has taken `want` bytes to send (`taken`); one that
/// takes none for `idle` ends it.
async fn drain(want: u64, taken: &dyn Fn() -> io::Result<u64>, side: Side, idle: Duration) -> Result<(), End> {
    let to_err = |source| End::Io { side, source };
    let mut now = taken().map_err(to_err)?;
    let (mut since, mut pause) = (Instant::now(), DRAIN_MIN);
    while now < want {
        if since.elapsed() >= idle {
            return Err(End::Idle(idle));
        }
        glommio::timer::sleep(pause).await;
        let t = taken().map_err(to_err)?;
        if t == now {
            pause = (pause * 2).min(DRAIN_MAX);
        } else {
            (now, since, pause) = (t, Instant::now(), DRAIN_MIN);
        }
    }
    Ok(())
}

/// Bounds of the pause between two looks of [`count_watch`]: it follows the
/// quiet time, so a busy connection is looked at twice a second and a quiet
/// one every 5 s, and the idle timeout is seen at most that late.
const LOOK_MIN: Duration = Duration::from_millis(500);
const LOOK_MAX: Duration = Duration::from_secs(5);

/// The relay's idle watch for counts only the kernel sees: ends once
/// `moved` has not changed for `idle`.
async fn count_watch(idle: Duration, moved: &dyn Fn() -> u64) -> End {
    let (mut seen, mut last) = (moved(), Instant::now());
    loop {
        let quiet = last.elapsed();
        if quiet >= idle {
            return End::Idle(idle);
        }
        glommio::timer::sleep((idle - quiet).min(quiet.clamp(LOOK_MIN, LOOK_MAX))).await;
        let now = moved();
        if now != seen {
            (seen, last) = (now, Instant::now());
        }
    }
}

/// What the socket `fd` has taken to send since it had taken `base`.
fn taken_since(fd: BorrowedFd<'_>, base: u64) -> impl Fn() -> io::Result<u64> + '_ {
    move || sys::tcp_sent(fd).map(|(acked, queued)| (acked + queued).saturating_sub(base))
}
