//! Network namespaces we serve, and the scoped switch into one.
//!
//! A socket keeps the namespace it was created in, so the data plane creates
//! each pod's listeners and upstream sockets inside that pod's namespace and
//! switches straight back ([`Netns::run`]). The switch is per thread and never
//! spans an `.await`: the closure is synchronous. Each thread keeps its home
//! namespace open (ztunnel's `InpodNetns`), so a switch costs two `setns`
//! calls and no file opens; a switch back that fails is fatal to the process.
use std::{
    fmt,
    fs::File,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::node::sys;

/// A namespace's identity (its nsfs inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId(pub u64);

/// A network namespace, held open by a file descriptor.
pub struct Netns {
    path: PathBuf,
    file: File,
    inode: u64,
    /// Whether the return path for the client's address is in place here
    /// (see [`crate::control::return_path`]): set by the control thread, read by
    /// the inbound side for each connection.
    client_address: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "netns({})", self.path.display())
    }
}

impl Netns {
    /// Opens the namespace file at `path` (`/var/run/netns/NAME`,
    /// `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let inode = file.metadata()?.ino();
        Ok(Self { path: path.to_path_buf(), file, inode, client_address: Default::default() })
    }

    /// Whether connections to the application here come from the client's
    /// address.
    pub fn client_address(&self) -> bool {
        self.client_address.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns connections from the client's address on or off here.
    pub fn set_client_address(&self, on: bool) {
        self.client_address.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The namespace the calling thread is in now.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Its identity: the inode of the namespace (the same for every file
    /// that names it; a new namespace behind the same path has a new one).
    pub fn id(&self) -> NetnsId {
        NetnsId(self.inode)
    }

    /// Its addresses, IPv4 and IPv6, other than loopback and IPv6
    /// link-local ones (what its certificate must name), read inside it.
    pub fn addresses(&self) -> io::Result<Vec<std::net::IpAddr>> {
        use std::net::IpAddr;
        let addrs = self.run(nix::ifaddrs::getifaddrs)?.map_err(io::Error::from)?;
        let mut v: Vec<IpAddr> = addrs
            .filter_map(|a| {
                let a = a.address?;
                let v4 = a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip().into()));
                v4.or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .filter(|ip| match ip {
                IpAddr::V4(a) => !a.is_loopback(),
                // fe80::/10 names an interface, not the pod.
                IpAddr::V6(a) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80,
            })
            .collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// The namespace's cookie, as the eBPF programs see it.
    pub fn cookie(&self) -> io::Result<dataplane_common::maps::NetnsCookie> {
        let sock = self.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))??;
        Ok(dataplane_common::maps::NetnsCookie(sys::netns_cookie(std::os::fd::AsFd::as_fd(&sock))?))
    }

    /// Sets `net.ipv4.tcp_migrate_req = 1` inside this namespace: when a
    /// listener of an SO_REUSEPORT group closes, the connections in its
    /// accept queue move to another listener of the group instead of being
    /// reset ([ip-sysctl]). A rolling update then loses no connection: the
    /// old instance's queued connections go to the new one. Linux 5.14+.
    ///
    /// [ip-sysctl]: https://docs.kernel.org/networking/ip-sysctl.html
    pub fn migrate_requests(&self) -> io::Result<()> {
        // /proc/sys/net is the calling thread's namespace's.
        self.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))?
    }

    /// The file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A short name for logs: the file name, or the path for `/proc` ones.
    pub fn name(&self) -> String {
        if self.path.starts_with("/proc") {
            format!("netns:[{}]", self.inode)
        } else {
            self.path.file_name().map_or_else(|| self.path.display().to_string(), |n| n.to_string_lossy().into_owned())
        }
    }

    /// Opens the calling thread's home namespace now, so that it is held
    /// from the thread's start (and a failure shows at start-up, not in the
    /// middle of a connection).
    pub fn pin_home() -> io::Result<()> {
        HOME.with(|home| match home {
            Ok(_) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), format!("opening this thread's own namespace: {e}"))),
        })
    }

    /// Runs `f` with the calling thread inside this namespace, then switches
    /// back, whatever `f` returns. Cheap when the thread is already there.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        HOME.with(|home| {
            let home = match home {
                Ok(home) => home,
                Err(e) => return Err(io::Error::new(e.kind(), format!("opening this thread's own namespace: {e}"))),
            };
            if home.inode == self.inode {
                return Ok(f());
            }
            nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let out = f();
            if let Err(e) = nix::sched::setns(&home.file, nix::sched::CloneFlags::CLONE_NEWNET) {
                // Staying in the pod's namespace would silently serve the
                // wrong pod from this thread, and a dead thread would leave
                // half a node serving: stop everything, loudly.
                tracing::error!(netns = %self.name(), error = %e,
                                "could not switch a thread back to its own network namespace; aborting");
                std::process::abort();
            }
            Ok(out)
        })
    }
}

thread_local! {
    /// The namespace this thread lives in, opened once.
    static HOME: io::Result<Netns> = Netns::current();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_in_the_current_namespace_is_a_no_op() {
        let ns = Netns::current().expect("current netns");
        let before = Netns::current().expect("current netns").inode;
        assert_eq!(ns.id(), NetnsId(before));
        assert_eq!(ns.run(|| 7).expect("run"), 7);
        assert_eq!(Netns::current().expect("current netns").inode, before);
        assert!(ns.name().starts_with("netns:["), "{}", ns.name());
        assert!(ns.cookie().expect("netns cookie").0 != 0);
        assert!(ns.addresses().is_ok());
    }
}
