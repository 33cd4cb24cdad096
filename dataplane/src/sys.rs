//! The one door to `unsafe`: raw syscalls on file descriptors (`setns`,
//! `getsockopt(SO_ORIGINAL_DST)`, CPU affinity) and adopting raw fds into
//! glommio. Every block says why it is sound; nothing else in the crate may
//! use `unsafe`.
#![allow(unsafe_code)]

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd},
};

/// Borrows the fd of anything that owns one (glommio's streams only give
/// `AsRawFd`), for socket2's `SockRef` and the calls below.
pub(crate) fn borrow_fd<T: AsRawFd>(owner: &T) -> BorrowedFd<'_> {
    // SAFETY: `owner` owns the fd and keeps it open for as long as the borrow
    // of `owner` lasts, which the returned lifetime ties to it.
    unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}

/// `SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>`.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// `setns(fd, CLONE_NEWNET)` for the calling thread ([setns(2)]).
///
/// [setns(2)]: https://man7.org/linux/man-pages/man2/setns.2.html
pub(crate) fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads the fd, which the borrow keeps open; it changes
    // the calling thread's namespace, which callers restore (netns::Netns::run).
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`: where a redirected connection was
/// going. Answered by our `cgroup/getsockopt` program (or by conntrack behind
/// an iptables REDIRECT).
pub(crate) fn original_dst(fd: BorrowedFd<'_>) -> io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: optval points at a live sockaddr_in of `len` bytes and optlen at
    // a live socklen_t; the kernel writes at most `len` bytes.
    let rc =
        unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_IP, SO_ORIGINAL_DST, (&raw mut sin).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<libc::sockaddr_in>() || sin.sin_family != libc::AF_INET as u16 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "SO_ORIGINAL_DST returned no IPv4 address"));
    }
    Ok(SocketAddrV4::new(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()), u16::from_be(sin.sin_port)))
}

/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace a socket lives in: the value
/// `bpf_get_netns_cookie` gives the programs for that namespace.
pub(crate) fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: optval points at a live u64 of `len` bytes, optlen at a live
    // socklen_t; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The CPUs this thread may run on ([sched_getaffinity(2)]).
///
/// [sched_getaffinity(2)]: https://man7.org/linux/man-pages/man2/sched_getaffinity.2.html
pub(crate) fn affinity() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads one bit of `set`; every index is below its size.
    Ok((0..max).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect())
}

/// Raises this process's open-file limit: every proxied connection holds two
/// sockets on each side, so the usual soft limit of 1024 caps us at a few
/// hundred connections. With CAP_SYS_RESOURCE both limits go up to
/// `fs.nr_open` (at most 2^20); without, the soft limit goes up to the hard
/// one. Returns the new soft limit.
pub(crate) fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let nr_open: u64 =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let want = nr_open.min(1 << 20);
    if want > lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: want, rlim_max: want };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(want);
        }
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Public for the load generators in `bench/`, which hold thousands of
/// sockets too.
pub fn raise_open_file_limit() -> io::Result<u64> {
    raise_nofile_limit()
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

#[cfg(test)]
mod tests {
    #[test]
    fn affinity_lists_at_least_one_cpu() {
        let cpus = super::affinity().expect("sched_getaffinity");
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]), "sorted: {cpus:?}");
    }
}
