//! An in-memory connected pair of byte streams for deterministic tests of
//! the relay (quinn-proto's `Pair` in spirit): bounded buffers, so writers
//! see back-pressure; half-close (`close` is EOF for the other end's reads);
//! and a reset that fails the other end's next read.
use std::{
    cell::RefCell,
    collections::VecDeque,
    io,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
};

use futures_lite::io::{AsyncRead, AsyncWrite};

#[derive(Default)]
struct Pipe {
    buf: VecDeque<u8>,
    cap: usize,
    closed: bool,
    reset: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

type Shared = Rc<RefCell<Pipe>>;

/// One end: reads from one pipe, writes into the other.
pub(super) struct End {
    rx: Shared,
    tx: Shared,
}

/// Two connected ends; each direction buffers at most `cap` bytes.
pub(super) fn pair(cap: usize) -> (End, End) {
    let p = || Rc::new(RefCell::new(Pipe { cap, ..Pipe::default() }));
    let (ab, ba) = (p(), p());
    (End { rx: ba.clone(), tx: ab.clone() }, End { rx: ab, tx: ba })
}

impl End {
    /// The other end's next read fails with a reset.
    pub(super) fn reset(&self) {
        let mut p = self.tx.borrow_mut();
        p.reset = true;
        if let Some(w) = p.reader.take() {
            w.wake();
        }
    }
}

impl AsyncRead for End {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut p = self.rx.borrow_mut();
        if p.reset {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if p.buf.is_empty() {
            if p.closed {
                return Poll::Ready(Ok(0));
            }
            p.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = out.len().min(p.buf.len());
        for (o, b) in out.iter_mut().zip(p.buf.drain(..n)) {
            *o = b;
        }
        if let Some(w) = p.writer.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for End {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut p = self.tx.borrow_mut();
        if p.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = p.cap - p.buf.len();
        if room == 0 {
            p.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        p.buf.extend(&data[..n]);
        if let Some(w) = p.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut p = self.tx.borrow_mut();
        p.closed = true;
        if let Some(w) = p.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}
