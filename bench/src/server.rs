//! The servers the load goes to, on loopback inside the bench's namespace:
//! an echo server (request/response, connection rate, idle connections)
//! and a discard server (bulk), each one mio event loop on its own thread.
//! They serve direct and proxied clients alike.
use std::{
    collections::HashMap,
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr},
    path::Path,
    thread,
};

use anyhow::Context;
use mio::{
    net::{TcpListener, TcpStream},
    Events, Interest, Poll, Token,
};

/// What a server does with what it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Send it back.
    Echo,
    /// Drop it; close after the client's EOF.
    Discard,
}

/// Starts a server on `addr` inside the namespace at `netns`.
/// Returns the server thread's id, for pinning it ([`crate::setup::Nodes::serve`]).
pub fn start(netns: &Path, addr: SocketAddr, kind: Kind) -> anyhow::Result<i32> {
    let ns = dataplane::node::netns::Netns::open(netns)?;
    let std_listener = ns.run(|| std::net::TcpListener::bind(addr))?.with_context(|| format!("binding {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    thread::Builder::new().name(format!("server-{kind:?}")).spawn(move || {
        let _ = tid_tx.send(thread_id());
        if let Err(e) = run(listener, kind) {
            eprintln!("bench server {kind:?} stopped: {e}");
        }
    })?;
    tid_rx.recv()?.context("the server thread's id")
}

/// This thread's id, from `/proc/thread-self` (`PID/task/TID`).
fn thread_id() -> anyhow::Result<i32> {
    let link = std::fs::read_link("/proc/thread-self")?;
    let tid = link.file_name().and_then(|t| t.to_str()).and_then(|t| t.parse().ok());
    tid.with_context(|| format!("no thread id in {}", link.display()))
}

struct Conn {
    stream: TcpStream,
    pending: Vec<u8>,
    eof: bool,
}

const LISTENER: Token = Token(usize::MAX);

fn run(mut listener: TcpListener, kind: Kind) -> io::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut next = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            // A signal handled elsewhere in this process: poll again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            next += 1;
                            poll.registry().register(
                                &mut stream,
                                Token(next),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            conns.insert(next, Conn { stream, pending: Vec::new(), eof: false });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => break, // EMFILE and friends: try again on the next event
                    }
                }
                continue;
            }
            let id = ev.token().0;
            let Some(c) = conns.get_mut(&id) else { continue };
            let done = serve(c, kind, &mut buf).unwrap_or(true);
            if done {
                if let Some(mut c) = conns.remove(&id) {
                    let _ = poll.registry().deregister(&mut c.stream);
                }
            }
        }
    }
}

/// Reads what there is, writes what it can; true when the connection is done.
fn serve(c: &mut Conn, kind: Kind, buf: &mut [u8]) -> io::Result<bool> {
    loop {
        if !c.pending.is_empty() {
            match c.stream.write(&c.pending) {
                Ok(n) => {
                    c.pending.drain(..n);
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if c.eof {
            let _ = c.stream.shutdown(Shutdown::Write);
            return Ok(true);
        }
        match c.stream.read(buf) {
            Ok(0) => c.eof = true,
            Ok(n) if kind == Kind::Echo => c.pending.extend_from_slice(&buf[..n]),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}
