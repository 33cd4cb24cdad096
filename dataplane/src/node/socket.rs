//! The one socket factory: every socket the data plane creates gets its
//! options here, before `bind`/`connect`, in one place.
//!
//! - listeners: `SO_REUSEADDR` + `SO_REUSEPORT` (one listener per executor,
//!   the kernel spreads connections across them), `TCP_NODELAY` (inherited by
//!   accepted sockets), non-blocking; IPv6 ones `IPV6_V6ONLY`, beside the
//!   IPv4 ones on the same port;
//! - upstream sockets: `SO_MARK` with the bypass mark, so our own connects are
//!   never captured by `cgroup/connect4`, `TCP_NODELAY`, non-blocking connect;
//! - both: TCP keepalive (`--tcp-keepalive`, [`set_keepalive`]), so a peer
//!   that went away without a word (a node gone, a pod's namespace torn
//!   down under its connections) is found and its connection closed, with no
//!   idle timeout cutting connections whose peers are alive.
//!
//! Sockets are made with socket2 0.6 and handed to glommio (which uses
//! socket2 0.4) as owned fds.
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};

use crate::node::sys;

/// The keepalive idle time of every connection socket, fixed at start-up
/// (unset: none).
static KEEPALIVE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();

/// Probes after the first, and the longest wait between two.
const KEEPALIVE_PROBES: u32 = 6;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Sets the keepalive of every socket made from now on (`--tcp-keepalive`):
/// the first probe after `idle` without traffic, then one every 10 s (or
/// `idle`, if shorter); six unanswered and the socket fails. Once, at
/// start-up; a second call changes nothing.
pub fn set_keepalive(idle: Option<Duration>) {
    let _ = KEEPALIVE.set(idle);
}

fn keepalive(s: &Socket) -> io::Result<()> {
    let Some(Some(idle)) = KEEPALIVE.get().copied() else { return Ok(()) };
    let ka =
        TcpKeepalive::new().with_time(idle).with_interval(idle.min(KEEPALIVE_INTERVAL)).with_retries(KEEPALIVE_PROBES);
    s.set_tcp_keepalive(&ka)
}

/// Listen backlog for the proxy listeners.
const BACKLOG: i32 = 4096;

/// A non-blocking SO_REUSEPORT listener bound to `addr` in the calling
/// thread's network namespace. With `incoming_cpu`, the group's choice of
/// listener for a new connection prefers this one when the kernel sets the
/// connection up on that CPU (`SO_INCOMING_CPU`, honoured by SO_REUSEPORT
/// groups since Linux 6.2; earlier kernels keep hashing).
pub fn listener(addr: SocketAddr, incoming_cpu: Option<usize>) -> io::Result<OwnedFd> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    // Inherited by the accepted sockets, as TCP_NODELAY is.
    keepalive(&s)?;
    if let Some(cpu) = incoming_cpu {
        s.set_cpu_affinity(cpu)?;
    }
    s.bind(&SockAddr::from(addr))?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// A blocking SO_REUSEPORT listener for the admin endpoint (a plain thread).
pub fn blocking_listener(addr: SocketAddr) -> io::Result<OwnedFd> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(128)?;
    Ok(s.into())
}

/// A non-blocking TCP socket, marked with `mark`, whose connect to `dst` has
/// been started in the calling thread's network namespace. A refused
/// connect shows up on the first I/O.
pub fn upstream(dst: SocketAddr, mark: u32) -> io::Result<OwnedFd> {
    start_connect(marked_stream(dst, mark)?, dst)
}

/// A non-blocking TCP socket for `dst`'s family, marked with `mark` (0:
/// none), with Nagle off.
fn marked_stream(dst: SocketAddr, mark: u32) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    s.set_tcp_nodelay(true)?;
    keepalive(&s)?;
    Ok(s)
}

/// Starts `s`'s connect to `dst`; the outcome shows on the first I/O.
fn start_connect(s: Socket, dst: SocketAddr) -> io::Result<OwnedFd> {
    match s.connect(&SockAddr::from(dst)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}

/// Like [`upstream`], but from `from` (an address this namespace does not
/// own: the client's), with `IP_TRANSPARENT`. The client's port too, unless
/// a connection between the same two addresses and ports is still in
/// TIME_WAIT here (or a socket that did not allow sharing holds the port);
/// then the client's address with another port.
///
/// The client's kernel chose its port free of its own connections, not of
/// ours in this namespace: its socket is connected to our listener. So at
/// thousands of connections a second to one server the client reuses ports
/// whose last connection through us is in TIME_WAIT here. The port is
/// therefore shared as the client's kernel would share it (`SO_REUSEADDR`,
/// unique per destination at `connect`), and another port is found at
/// `connect` too (`IP_BIND_ADDRESS_NO_PORT`): found at `bind`, it had to
/// be free of every TIME_WAIT here, and a busy node ran out of them
/// (`EADDRNOTAVAIL`, and the client was reset).
pub fn upstream_from(dst: SocketAddr, from: SocketAddr, mark: u32) -> io::Result<OwnedFd> {
    match transparent_connect(dst, from, mark) {
        Err(e) if from.port() != 0 && matches!(e.raw_os_error(), Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)) => {
            transparent_connect(dst, SocketAddr::new(from.ip(), 0), mark)
        }
        other => other,
    }
}

/// A transparent socket bound to `from` (port 0: chosen at `connect`),
/// connecting to `dst`.
fn transparent_connect(dst: SocketAddr, from: SocketAddr, mark: u32) -> io::Result<OwnedFd> {
    let s = marked_stream(dst, mark)?;
    if dst.is_ipv6() {
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.set_reuse_address(true)?;
    if from.port() == 0 {
        sys::bind_address_no_port(sys::borrow_fd(&s))?;
    }
    s.bind(&SockAddr::from(from))?;
    start_connect(s, dst)
}

/// Where a redirected connection was going, asked in the accepted socket's
/// family (`ipv6`): `getsockopt(SOL_IP, SO_ORIGINAL_DST)` or
/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`, answered by our
/// `cgroup/getsockopt` program (or by conntrack behind an iptables or
/// ip6tables REDIRECT).
pub fn original_dst<T: AsRawFd>(owner: &T, ipv6: bool) -> io::Result<SocketAddr> {
    let fd = sys::borrow_fd(owner);
    let sock = SockRef::from(&fd);
    let addr = if ipv6 { sock.original_dst_v6()? } else { sock.original_dst_v4()? };
    // An IPv4 destination told to an IPv6 socket comes IPv4-mapped.
    addr.as_socket()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the original destination is not an IP address"))
}

/// Makes the socket's close send a reset (SO_LINGER 0) instead of a FIN, so a
/// failure on one side of a relay reaches the other as an error, not an EOF.
pub fn reset_on_close<T: AsRawFd>(owner: &T) {
    let fd = sys::borrow_fd(owner);
    if let Err(e) = SockRef::from(&fd).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; the peer will see a FIN instead of a reset");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_listeners_share_a_port() {
        let a = listener("127.0.0.1:0".parse().expect("addr"), None).expect("first listener");
        let port = socket2::SockRef::from(&a).local_addr().expect("local").as_socket().expect("inet").port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        listener(addr, None).expect("second SO_REUSEPORT listener on the same port");
    }

    #[test]
    fn upstream_starts_a_connect() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let fd = upstream(l.local_addr().expect("addr"), 0).expect("upstream");
        let (_conn, peer) = l.accept().expect("accepted");
        let local = socket2::SockRef::from(&fd).local_addr().expect("local").as_socket().expect("inet");
        assert_eq!(peer, local);
    }
}
