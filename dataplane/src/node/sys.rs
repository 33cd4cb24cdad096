//! The one door to `unsafe`: what no dependency offers as a safe call
//! (`SO_NETNS_COOKIE`, `SO_COOKIE`, `IP_BIND_ADDRESS_NO_PORT`, how much a TCP socket has taken to send, `malloc_trim`, borrowing glommio's raw fds, adopting
//! raw fds into glommio). Every block says why it is sound; nothing else in
//! the crate may use `unsafe`. (`setns`, `SO_ORIGINAL_DST`, CPU affinity and
//! rlimits come safe from nix and socket2.)
#![allow(unsafe_code)]

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd},
};

/// Borrows the fd of anything that owns one (glommio's streams only give
/// `AsRawFd`), for socket2's `SockRef` and the calls below.
pub(crate) fn borrow_fd<T: AsRawFd>(owner: &T) -> BorrowedFd<'_> {
    // SAFETY: `owner` owns the fd and keeps it open for as long as the borrow
    // of `owner` lasts, which the returned lifetime ties to it.
    unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}

/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace a socket lives in: the value
/// `bpf_get_netns_cookie` gives the programs for that namespace.
pub(crate) fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    socket_u64(fd, SO_NETNS_COOKIE)
}

/// `SO_COOKIE` from `<asm-generic/socket.h>` (Linux 4.13+).
const SO_COOKIE: libc::c_int = 57;

/// The cookie of a socket: the value `bpf_get_socket_cookie` gives the
/// programs for it (the splice maps' key).
pub(crate) fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    socket_u64(fd, SO_COOKIE)
}

/// `IP_BIND_ADDRESS_NO_PORT`: a socket bound to an address with port 0 gets
/// its port at `connect`, where the kernel needs it unique only for that
/// destination (and may take one held by a TIME_WAIT to elsewhere), not at
/// `bind`, where it must be free for any destination. Applies to IPv6
/// sockets too.
pub(crate) fn bind_address_no_port(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: optval points at a live c_int of the length given; the kernel
    // only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `SOL_SOCKET` option whose value is a `u64` (the two cookies above).
fn socket_u64(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: optval points at a live u64 of `len` bytes, optlen at a live
    // socklen_t; the kernel writes at most `len` bytes.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, option, (&raw mut value).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// What a TCP socket has sent: bytes acknowledged by its peer
/// (`tcpi_bytes_acked`), then bytes still queued (`SIOCOUTQ`). Read in that
/// order, so their sum, what the socket has taken to send, is under-, never
/// over-stated when they move between the two reads.
pub(crate) fn tcp_sent(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: optval points at a live tcp_info of `len` bytes; the kernel
    // writes at most `len` bytes and says how many in `len`.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) {
        return Err(io::Error::other("the kernel's tcp_info has no tcpi_bytes_acked"));
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which is live.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.tcpi_bytes_acked, queued.max(0) as u64))
}

/// Gives freed heap memory back to the kernel ([malloc_trim(3)], every
/// arena): after a wave of connections closes, glibc would otherwise keep the
/// executors' freed buffers and RSS would stay at its peak.
///
/// [malloc_trim(3)]: https://man7.org/linux/man-pages/man3/malloc_trim.3.html
pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it
    // takes no pointer from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The allocator's figures, every arena ([mallinfo2(3)]): bytes the
/// program has allocated, and bytes freed but still held by the allocator
/// (the part of RSS that is fragmentation, not data).
///
/// [mallinfo2(3)]: https://man7.org/linux/man-pages/man3/mallinfo.3.html
pub(crate) fn heap() -> (u64, u64) {
    // SAFETY: mallinfo2 reads glibc's own arenas under their locks and
    // returns a plain struct; it takes no pointer from us.
    let m = unsafe { libc::mallinfo2() };
    ((m.uordblks + m.hblkhd) as u64, m.fordblks as u64)
}

/// Adopts a listening socket into the current glommio executor.
pub(crate) fn glommio_listener(fd: OwnedFd) -> glommio::net::TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is an owned, open, listening TCP socket; ownership moves to
    // the listener, which closes it.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) }
}

/// Adopts a (possibly still connecting) non-blocking TCP socket into the
/// current glommio executor.
pub(crate) fn glommio_stream(fd: OwnedFd) -> glommio::net::TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is an owned, open TCP socket; ownership moves to the stream,
    // which closes it.
    unsafe { glommio::net::TcpStream::from_raw_fd(fd.into_raw_fd()) }
}
