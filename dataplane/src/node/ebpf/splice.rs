//! The same-node splice program and one executor's hands on its maps.
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use aya::{
    maps::{HashMap, Map, MapData, MapError, RingBuf, SockHash},
    programs::{ProgramError, SkSkb},
    Ebpf,
};
use dataplane_bpf::{map, program};
use dataplane_common::maps::SplicePeer;

use super::*;

/// The same-node splice (`splice.bpf.c`), loaded on its own beside the
/// capture programs: its stream verdict attached to `splice_sources`.
/// Dropping it detaches the verdict; sockets still in the maps then simply
/// stop being spliced (the maps go with their last fd).
#[derive(Debug)]
pub struct SpliceProgram {
    ebpf: Ebpf,
}

/// The splice maps' fds, for one executor's [`Splicer`].
#[derive(Debug)]
pub struct SpliceMaps {
    sources: OwnedFd,
    targets: OwnedFd,
    peers: OwnedFd,
}

impl SpliceMaps {
    /// Another set of fds for the same maps.
    pub fn try_clone(&self) -> Result<Self, Error> {
        let dup = |fd: &OwnedFd, name| fd.try_clone().map_err(dup_err(name));
        Ok(Self {
            sources: dup(&self.sources, map::SPLICE_SOURCES)?,
            targets: dup(&self.targets, map::SPLICE_TARGETS)?,
            peers: dup(&self.peers, map::SPLICE_PEERS)?,
        })
    }
}

fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, Error> {
    let data = match ebpf.map(name).ok_or_else(|| missing_map(name))? {
        Map::SockHash(d) | Map::HashMap(d) => d,
        _ => return Err(Error::Map { name, source: MapError::InvalidName { name: name.into() } }),
    };
    data.fd().as_fd().try_clone_to_owned().map_err(dup_err(name))
}

impl SpliceProgram {
    /// Loads the splice object and attaches its verdict.
    pub fn load() -> Result<Self, Error> {
        let mut ebpf = Ebpf::load(dataplane_bpf::splice_object()).map_err(|e| Error::Load(Box::new(e)))?;
        let sources: SockHash<_, u64> = typed_map(&ebpf, map::SPLICE_SOURCES)?;
        let sources = sources.fd().try_clone().map_err(dup_err(map::SPLICE_SOURCES))?;
        let name = program::SPLICE_VERDICT;
        let verdict: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or(Error::Program { name, source: ProgramError::InvalidName { name: name.into() } })?
            .try_into()
            .map_err(program_err(name))?;
        verdict.load().map_err(program_err(name))?;
        verdict.attach(&sources).map_err(program_err(name))?;
        Ok(Self { ebpf })
    }

    /// Calls `paused` from a thread of its own with the cookie of each
    /// socket whose direction the kernel pauses (see `splice.bpf.c`), as
    /// soon as it does; the thread ends when `paused` returns false.
    pub fn on_pause(&mut self, paused: impl Fn(u64) -> bool + Send + 'static) -> Result<(), Error> {
        let name = map::SPLICE_PAUSED;
        let map = self.ebpf.take_map(name).ok_or_else(|| missing_map(name))?;
        let mut ring = RingBuf::try_from(map).map_err(map_err(name))?;
        let spawned = std::thread::Builder::new().name("splice-paused".into()).spawn(move || loop {
            use nix::poll::{poll, PollFd, PollFlags};
            let ready = poll(&mut [PollFd::new(&ring, PollFlags::POLLIN)], 1000);
            if matches!(ready, Err(e) if e != nix::errno::Errno::EINTR) {
                tracing::warn!(error = ?ready, "waiting on the splice's pause ring: paused directions are found by the idle watch");
                return;
            }
            while let Some(item) = ring.next() {
                let Ok(cookie) = <[u8; 8]>::try_from(&item[..]) else { continue };
                if !paused(u64::from_ne_bytes(cookie)) {
                    return;
                }
            }
        });
        spawned.map(drop).map_err(|source| Error::MapIo { name, what: "starting its reader thread", source })
    }

    /// The maps' fds, for an executor.
    pub fn maps(&self) -> Result<SpliceMaps, Error> {
        Ok(SpliceMaps {
            sources: map_fd(&self.ebpf, map::SPLICE_SOURCES)?,
            targets: map_fd(&self.ebpf, map::SPLICE_TARGETS)?,
            peers: map_fd(&self.ebpf, map::SPLICE_PEERS)?,
        })
    }
}

/// One executor's hands on the splice maps.
pub struct Splicer {
    sources: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, SplicePeer>,
}

/// Two sockets [`Splicer::pair`] spliced, by cookie, and which way the
/// kernel carries their bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    /// The first socket's cookie.
    pub a: u64,
    /// The second socket's cookie.
    pub b: u64,
    /// `b`'s bytes go to `a` in the kernel too (`a`'s always do). When not
    /// (`b` was closing already), the caller stops `a`'s with
    /// [`Splicer::stop`] and relays both ways in user space.
    pub both_ways: bool,
}

/// A socket to splice: its cookie, its fd, and its `tcpi_bytes_acked` now.
#[derive(Clone, Copy, Debug)]
pub struct SpliceEnd<'a> {
    /// `SO_COOKIE`.
    pub cookie: u64,
    /// The socket.
    pub fd: BorrowedFd<'a>,
    /// Bytes its peer has acknowledged so far.
    pub acked: u64,
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl std::fmt::Debug for Splicer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splicer").finish_non_exhaustive()
    }
}

impl Splicer {
    /// Opens an executor's handles on the maps.
    pub fn open(maps: SpliceMaps) -> Result<Self, Error> {
        let open = |fd, name: &'static str| MapData::from_fd(fd).map_err(map_err(name));
        let sources = SockHash::try_from(Map::SockHash(open(maps.sources, map::SPLICE_SOURCES)?))
            .map_err(map_err(map::SPLICE_SOURCES))?;
        let targets = SockHash::try_from(Map::SockHash(open(maps.targets, map::SPLICE_TARGETS)?))
            .map_err(map_err(map::SPLICE_TARGETS))?;
        let peers = HashMap::try_from(Map::HashMap(open(maps.peers, map::SPLICE_PEERS)?))
            .map_err(map_err(map::SPLICE_PEERS))?;
        Ok(Self { sources, targets, peers })
    }

    /// Splices the connected sockets `a` and `b` (with their cookies): from
    /// now on the kernel hands what `a` receives to `b`'s send side, and
    /// (if `b` is not closing already, see [`Pair::both_ways`]) the other
    /// way round. Peers first, then both sockets as targets, then as
    /// sources: a redirect never finds its target missing.
    ///
    /// Neither socket may have been read from: bytes already queued on them
    /// are spliced in order at their first read. On an error nothing is
    /// spliced and nothing is left in the maps (a full map, a socket no
    /// longer established): the caller relays in user space.
    pub fn pair(&mut self, a: SpliceEnd<'_>, b: SpliceEnd<'_>) -> Result<Pair, Error> {
        let mut pair = Pair { a: a.cookie, b: b.cookie, both_ways: false };
        let done = self.put(a, b);
        if let Err(e) = done {
            self.unpair(&pair);
            return Err(e);
        }
        pair.both_ways = self.sources.insert(b.cookie, b.fd, 0).is_ok();
        Ok(pair)
    }

    fn put(&mut self, a: SpliceEnd<'_>, b: SpliceEnd<'_>) -> Result<(), Error> {
        let peers = |source| Error::Map { name: map::SPLICE_PEERS, source };
        self.peers.insert(a.cookie, SplicePeer::new(b.cookie, b.acked), 0).map_err(peers)?;
        self.peers.insert(b.cookie, SplicePeer::new(a.cookie, a.acked), 0).map_err(peers)?;
        self.targets.insert(a.cookie, a.fd, 0).map_err(map_err(map::SPLICE_TARGETS))?;
        self.targets.insert(b.cookie, b.fd, 0).map_err(map_err(map::SPLICE_TARGETS))?;
        self.sources.insert(a.cookie, a.fd, 0).map_err(map_err(map::SPLICE_SOURCES))
    }

    /// Stops handing `cookie`'s bytes on (its peer stays a target until
    /// [`Splicer::unpair`]: what the kernel has queued for it is still sent).
    pub fn stop(&mut self, cookie: u64) -> Result<(), Error> {
        ignore_missing(self.sources.remove(&cookie)).map_err(map_err(map::SPLICE_SOURCES))
    }

    /// How many of the bytes the socket `cookie` received the kernel handed
    /// to its peer, and whether it has paused that direction (the rest are
    /// for user space). `(0, false)` once unpaired.
    pub fn moved(&self, cookie: u64) -> (u64, bool) {
        self.peers.get(&cookie, 0).map(|p| (p.bytes, p.paused != 0)).unwrap_or((0, false))
    }

    /// Takes a pair out of the maps (closing the sockets would take them
    /// out of the sockhashes too; the peers map is ours to clean).
    pub fn unpair(&mut self, pair: &Pair) {
        for c in [pair.a, pair.b] {
            let _ = ignore_missing(self.sources.remove(&c));
            let _ = ignore_missing(self.targets.remove(&c));
            if let Err(e) = ignore_missing(self.peers.remove(&c)) {
                tracing::warn!(cookie = c, error = %e, "removing a spliced socket's entry");
            }
        }
    }
}
