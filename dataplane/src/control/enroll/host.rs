//! What enrolment reads from the host, behind traits so that the registry's
//! every decision is a unit test with fakes: the namespace directory and the
//! namespaces it names ([`Node`], [`Host`] for this host's), the
//! certificates held ([`Certificates`]), and the directory's changes
//! ([`watch_dir`]).
use std::{
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use tracing::warn;

use crate::{identity::Identity, node::netns::Netns};
use dataplane_common::maps::NetnsCookie;

/// What enrolment reads from the node: the namespace directory, which file
/// names which namespace, and the namespaces themselves. [`Host`] reads this
/// host's; the unit tests give fakes, so every step of a pod's enrolment is
/// a test without root.
pub trait Node: std::fmt::Debug {
    /// The files in `dir`.
    fn list(&self, dir: &Path) -> Vec<PathBuf>;
    /// The (device, inode) `path` names, links followed; `None` if nothing.
    fn identify(&self, path: &Path) -> Option<(u64, u64)>;
    /// The namespace at `path`, and its cookie.
    fn open(&self, path: &Path) -> std::io::Result<(Netns, NetnsCookie)>;
    /// The addresses of `ns`'s interfaces (loopback's excepted).
    fn addresses(&self, ns: &Netns) -> std::io::Result<Vec<IpAddr>>;
}

/// This host's directory and namespaces.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl Node for Host {
    fn list(&self, dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect()
    }

    fn identify(&self, path: &Path) -> Option<(u64, u64)> {
        fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    fn open(&self, path: &Path) -> std::io::Result<(Netns, NetnsCookie)> {
        let ns = Netns::open(path)?;
        let cookie = ns.cookie()?;
        Ok((ns, cookie))
    }

    fn addresses(&self, ns: &Netns) -> std::io::Result<Vec<IpAddr>> {
        ns.addresses()
    }
}

/// The certificates enrolment waits for.
pub trait Certificates {
    /// Whether one is held for `ip`.
    fn holds(&self, ip: IpAddr) -> bool;
    /// The directory they are read from (`--certs`), if any.
    fn dir(&self) -> Option<&Path>;
}

impl Certificates for Identity {
    fn holds(&self, ip: IpAddr) -> bool {
        Identity::holds(self, ip)
    }

    fn dir(&self) -> Option<&Path> {
        Identity::dir(self)
    }
}

/// Sends a unit on `tx` whenever an entry of `dir` is created, removed or
/// renamed (coalesced: one message may stand for many), from a thread of its
/// own. Mounting a namespace onto a file raises no event, so the control
/// thread still looks every few hundred milliseconds, and quickly while a
/// namespace is not ready.
pub fn watch_dir(dir: &Path, tx: crossbeam_channel::Sender<()>) -> std::io::Result<()> {
    use inotify::{Inotify, WatchMask};
    let mut inotify = Inotify::init()?;
    inotify.watches().add(
        dir,
        WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_TO | WatchMask::MOVED_FROM | WatchMask::ATTRIB,
    )?;
    std::thread::Builder::new().name("netns-watch".into()).spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match inotify.read_events_blocking(&mut buf) {
                Ok(_) => {
                    if tx.try_send(()).is_err() && tx.is_empty() {
                        return; // the control thread is gone
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(error = %e, "reading inotify events: falling back to periodic looks");
                    return;
                }
            }
        }
    })?;
    Ok(())
}
