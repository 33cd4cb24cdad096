//! The typed door to the eBPF side: loads the embedded capture object with
//! aya, writes the capture configuration, attaches its programs, reads the
//! decision counters; and, with `--same-node-fast-path`, the splice object
//! ([`SpliceProgram`], [`Splicer`]: not pinned, it lives and dies with the
//! process). No program or map is named by a string outside this module (the
//! names live in `dataplane-bpf`).
//!
//! Attachments are BPF links owned by [`Capture`]: dropping it, or the
//! process dying in any way (SIGKILL included), closes the link fds and the
//! kernel detaches the programs, so traffic flows directly again (fail open).
//!
//! Strict mode (fail closed): the maps and the connect4, connect6 and sockops
//! links are pinned under `--pin-dir` (a BPF file system), so they outlive
//! the process and captured connects keep going to 127.0.0.1:18000 (or
//! `[::1]:18000`), where nothing listens: they are refused until a data plane
//! returns. The next instance,
//! strict or not, adopts what it finds pinned: it reuses the pinned maps,
//! attaches its own programs, then unpins and drops the old links (both run
//! for a moment; the second connect4 sees 127.0.0.1:18000, an excluded port,
//! and leaves it alone), and pins its own only if it is strict itself.
//! getsockopt is never pinned: it only matters while a data plane runs.
//! Pinned maps of another layout (an older version's) are never adopted:
//! the new instance starts on maps of its own, pins them in their place, and
//! replaces the old links as it would adopt them.
//!
//! One catch, and [`OrigLookup`] for it: an accepted socket belongs to the
//! cgroup of the listener that took its SYN, and getsockopt programs run by
//! the socket's cgroup. A connection queued on the previous instance's
//! listener and handed to ours when that listener closed
//! (`net.ipv4.tcp_migrate_req`) finds no program once the previous instance
//! is gone. The entry is still in the shared, pinned map, so on such a miss
//! the executor looks it up there itself, under the same key.
use std::{
    fs::File,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SkSkb, SockOps,
    },
    Ebpf, EbpfLoader,
};
use dataplane_bpf::{map, program};
use dataplane_common::maps::{
    Addr, CaptureConfig, ClientKey, MeshedDst, NetnsCookie, NetnsEntry, OrigDst, SplicePeer, StatIndex, VipKey,
    CONFIG_F_ENABLED, CONFIG_F_TRACE,
};

/// What failed on the eBPF side, naming the program, map or cgroup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object could not be loaded (maps created, relocations applied).
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program is missing from the object or has an unexpected type.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        #[source]
        source: ProgramError,
    },
    /// A map is missing or could not be read or written.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: MapError,
    },
    /// Pinning or adopting under the pin directory failed.
    #[error("--pin-dir {}: {what}: {reason}", path.display())]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A map's file descriptor could not be duplicated for an executor, or
    /// its reader thread started.
    #[error("eBPF map {name}: {what}: {source}")]
    MapIo {
        /// Map name.
        name: &'static str,
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup directory could not be opened.
    #[error("cgroup {}: {source}", path.display())]
    Cgroup {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A capture CIDR, of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address, host bits zero.
    pub addr: IpAddr,
    /// Prefix length, 0..=32 (IPv4) or 0..=128 (IPv6).
    pub prefix: u8,
}

impl Cidr {
    /// The trie's key: an IPv4 prefix /n is the IPv4-mapped prefix /(96 + n).
    fn key(&self) -> Key<Addr> {
        let prefix = match self.addr {
            IpAddr::V4(_) => 96 + u32::from(self.prefix),
            IpAddr::V6(_) => u32::from(self.prefix),
        };
        Key::new(prefix, Addr::new(self.addr))
    }
}

/// What the programs are told at start-up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where captured IPv4 connects go (127.0.0.1:18000).
    pub proxy: SocketAddrV4,
    /// Where captured IPv6 connects go (::1, the same port).
    pub proxy6: std::net::Ipv6Addr,
    /// Destinations to capture.
    pub cidrs: Vec<Cidr>,
    /// Destination ports never captured (18000 and 18001 included by the caller).
    pub excluded_ports: Vec<u16>,
    /// SO_MARK of the data plane's own sockets, never captured.
    pub bypass_mark: u32,
    /// Log every decision to the kernel trace pipe.
    pub trace: bool,
    /// Entries of each original-destination map (LRU).
    pub map_entries: u32,
    /// Where pinned maps and links live (a BPF file system).
    pub pin_dir: PathBuf,
    /// Fail closed: leave connect4, connect6 and sockops pinned when we exit.
    pub strict: bool,
}

/// The programs whose links strict mode pins.
const PINNED_PROGRAMS: [&str; 3] = [program::CONNECT4, program::CONNECT6, program::SOCKOPS];
/// The maps a strict instance shares with the next one.
const SHARED_MAPS: [&str; 8] = [
    map::ORIG_BY_COOKIE,
    map::ORIG_BY_CLIENT,
    map::CAPTURE_CIDRS,
    map::CONFIG,
    map::STATS,
    map::NETNS_VERDICT,
    map::MESHED_DSTS,
    map::SERVICE_VIPS,
];

/// Reads the original destinations straight from the pinned map, for the
/// sockets `SO_ORIGINAL_DST` cannot answer for (see the module doc). One per
/// executor: each holds its own map fd.
#[derive(Debug)]
pub struct OrigLookup(HashMap<MapData, ClientKey, OrigDst>);

impl OrigLookup {
    /// Opens the pinned map at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let data = MapData::from_pin(path).map_err(map_err(map::ORIG_BY_CLIENT))?;
        let map = HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err(map::ORIG_BY_CLIENT))?;
        Ok(Self(map))
    }

    /// Where the client at `client` in the namespace `netns` was going.
    pub fn get(&self, netns: NetnsCookie, client: SocketAddr) -> Option<SocketAddr> {
        self.0.get(&ClientKey::new(netns, client), 0).ok().map(|o| o.addr())
    }
}

/// The loaded and attached capture programs. Dropping it detaches them
/// (except the links strict mode pinned).
#[derive(Debug)]
pub struct Capture {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    strict: bool,
    /// Whether a previous strict instance left links to adopt.
    adopting: bool,
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

fn pin_err(path: &Path, what: &'static str, reason: impl ToString) -> Error {
    Error::Pin { path: path.to_path_buf(), what, reason: reason.to_string() }
}

fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// For a map fd that could not be duplicated.
fn dup_err(name: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::MapIo { name, what: "duplicating its fd", source }
}

fn missing_map(name: &'static str) -> Error {
    Error::Map { name, source: MapError::InvalidName { name: name.into() } }
}

/// The map `name`, as the typed aya map `T`.
fn typed_map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    ebpf.map_mut(name).ok_or_else(|| missing_map(name))?.try_into().map_err(map_err(name))
}

fn typed_map<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a aya::maps::Map, Error = MapError>,
{
    ebpf.map(name).ok_or_else(|| missing_map(name))?.try_into().map_err(map_err(name))
}

/// Pins `link`, of the program `name`, under `links` for the next instance.
fn pin_link<L>(links: &Path, name: &'static str, link: L) -> Result<(), Error>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let path = links.join(name);
    let link = FdLink::try_from(link).map_err(|e| pin_err(&path, "converting the link", e))?;
    link.pin(&path).map_err(|e| pin_err(&path, "pinning the link", e))?;
    Ok(())
}

fn open_cgroup(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Cgroup { path: path.to_path_buf(), source })
}

/// The first pinned map whose key or value size differs from the object's
/// (a previous version's layout, e.g. before IPv6), described: adopting it
/// would have the new programs read the old entries wrongly.
fn other_layout(maps: &[(&'static str, PathBuf)]) -> Result<Option<String>, Error> {
    let object = aya_obj::Object::parse(dataplane_bpf::object())
        .map_err(|e| pin_err(Path::new("-"), "parsing the object", e))?;
    for (name, path) in maps {
        if !path.exists() {
            continue;
        }
        let Some(ours) = object.maps.get(*name) else { continue };
        let pinned = MapData::from_pin(path).and_then(|m| m.info()).map_err(map_err(name))?;
        let (key, value) = (pinned.key_size(), pinned.value_size());
        if (key, value) != (ours.key_size(), ours.value_size()) {
            return Ok(Some(format!(
                "{name}: key {key} and value {value} bytes, this version's {} and {}",
                ours.key_size(),
                ours.value_size()
            )));
        }
    }
    Ok(None)
}

/// Removes what strict mode pins under `pin_dir` (the links, which
/// detaches their programs once no process holds them, and the maps) and
/// the directories if they are left empty; returns what was removed.
/// Nothing pinned is not an error.
pub fn unpin_all(pin_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut removed = Vec::new();
    let files = PINNED_PROGRAMS
        .iter()
        .map(|p| links_dir(pin_dir).join(p))
        .chain(SHARED_MAPS.iter().map(|m| maps_dir(pin_dir).join(m)));
    for path in files {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(pin_err(&path, "removing a pin", e)),
        }
    }
    for dir in [links_dir(pin_dir), maps_dir(pin_dir), pin_dir.to_path_buf()] {
        if std::fs::remove_dir(&dir).is_ok() {
            removed.push(dir);
        }
    }
    Ok(removed)
}

impl Capture {
    /// Loads the programs and writes `settings` into their maps. Nothing is
    /// attached yet.
    pub fn load(settings: &Settings) -> Result<Self, Error> {
        let adopting = PINNED_PROGRAMS.iter().any(|p| links_dir(&settings.pin_dir).join(p).exists());
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map::ORIG_BY_COOKIE, settings.map_entries)
            .map_max_entries(map::ORIG_BY_CLIENT, settings.map_entries);
        let maps = maps_dir(&settings.pin_dir);
        let map_paths: Vec<(&str, PathBuf)> = SHARED_MAPS.iter().map(|m| (*m, maps.join(m))).collect();
        if settings.strict || adopting {
            // Reuse the maps the pinned programs use (or pin new ones for
            // the next instance), if they have our layout. If they have
            // another version's (an upgrade that changed one), this version
            // starts on maps of its own: the old pins go (the old programs
            // keep theirs until their links are replaced in `attach`), and
            // the model fills the new maps before anything is attached.
            if let Some(other) = other_layout(&map_paths)? {
                tracing::warn!(
                    pin_dir = %settings.pin_dir.display(),
                    pinned = other,
                    "the pinned maps have another version's layout: starting on maps of this version's own \
                     (connects captured by the previous programs in the instant of the switch may be reset)"
                );
                for (_, path) in &map_paths {
                    if let Err(e) = std::fs::remove_file(path) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            return Err(pin_err(path, "removing a map of another layout", e));
                        }
                    }
                }
            }
            std::fs::create_dir_all(&maps).map_err(|e| pin_err(&maps, "creating the maps directory", e))?;
            for (name, path) in &map_paths {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader.load(dataplane_bpf::object()).map_err(|e| Error::Load(Box::new(e)))?;

        let mut cidrs: LpmTrie<_, Addr, u8> = typed_map_mut(&mut ebpf, map::CAPTURE_CIDRS)?;
        for c in &settings.cidrs {
            cidrs.insert(&c.key(), 1, 0).map_err(map_err(map::CAPTURE_CIDRS))?;
        }

        let flags = CONFIG_F_ENABLED | if settings.trace { CONFIG_F_TRACE } else { 0 };
        let cfg =
            CaptureConfig::new(settings.proxy, settings.proxy6, settings.bypass_mark, &settings.excluded_ports, flags);
        let mut config: Array<_, CaptureConfig> = typed_map_mut(&mut ebpf, map::CONFIG)?;
        config.set(0, cfg, 0).map_err(map_err(map::CONFIG))?;

        for name in [program::CONNECT4, program::CONNECT6, program::SOCKOPS, program::GETSOCKOPT] {
            let p = ebpf
                .program_mut(name)
                .ok_or(Error::Program { name, source: ProgramError::InvalidName { name: name.into() } })?;
            match p {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                aya::programs::Program::CgroupSockopt(p) => p.load(),
                _ => Err(ProgramError::UnexpectedProgramType),
            }
            .map_err(program_err(name))?;
        }
        Ok(Self { ebpf, pin_dir: settings.pin_dir.clone(), strict: settings.strict, adopting })
    }

    /// Attaches connect4, connect6 and sockops to the workloads' cgroup and
    /// getsockopt to the data plane's own cgroup.
    pub fn attach(&mut self, workload_cgroup: &Path, own_cgroup: &Path) -> Result<(), Error> {
        let workload = open_cgroup(workload_cgroup)?;
        let own = open_cgroup(own_cgroup)?;
        // The kernel attaches through BPF links, which ignore these flags and
        // always allow other programs beside ours (aya issue 1078 for Multiple).
        let mode = CgroupAttachMode::Single;

        let links = links_dir(&self.pin_dir);
        let old: Vec<PinnedLink> = if self.adopting {
            PINNED_PROGRAMS.iter().filter_map(|p| PinnedLink::from_pin(links.join(p)).ok()).collect()
        } else {
            Vec::new()
        };

        let connect4: &mut CgroupSockAddr = self.program(program::CONNECT4)?;
        let c4 = connect4.attach(&workload, mode).map_err(program_err(program::CONNECT4))?;
        let connect6: &mut CgroupSockAddr = self.program(program::CONNECT6)?;
        let c6 = connect6.attach(&workload, mode).map_err(program_err(program::CONNECT6))?;
        let sockops: &mut SockOps = self.program(program::SOCKOPS)?;
        let so = sockops.attach(&workload, mode).map_err(program_err(program::SOCKOPS))?;
        let getsockopt: &mut CgroupSockopt = self.program(program::GETSOCKOPT)?;
        getsockopt.attach(&own, mode).map_err(program_err(program::GETSOCKOPT))?;

        // Ours are attached: now the previous instance's can go.
        let adopted = old.len();
        for link in old {
            let unpinned = link.unpin().map_err(|e| pin_err(&links, "unpinning the previous instance's link", e))?;
            drop(unpinned); // closes the last reference: detached
        }
        if adopted > 0 {
            tracing::info!(links = adopted, pin_dir = %self.pin_dir.display(), "adopted the pinned capture programs");
        }

        if self.strict {
            std::fs::create_dir_all(&links).map_err(|e| pin_err(&links, "creating the links directory", e))?;
            for (name, id) in [(program::CONNECT4, c4), (program::CONNECT6, c6)] {
                let link = self.program::<CgroupSockAddr>(name)?.take_link(id).map_err(program_err(name))?;
                pin_link(&links, name, link)?;
            }
            let link =
                self.program::<SockOps>(program::SOCKOPS)?.take_link(so).map_err(program_err(program::SOCKOPS))?;
            pin_link(&links, program::SOCKOPS, link)?;
        } else if self.adopting {
            // Back to fail-open: nothing of ours outlives us.
            for m in SHARED_MAPS {
                let _ = std::fs::remove_file(maps_dir(&self.pin_dir).join(m));
            }
            let _ = std::fs::remove_dir(maps_dir(&self.pin_dir));
            let _ = std::fs::remove_dir(&links);
        }
        Ok(())
    }

    fn program<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, Error>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(Error::Program { name, source: ProgramError::InvalidName { name: name.into() } })?
            .try_into()
            .map_err(program_err(name))
    }

    /// Where the original-destination map is pinned, when it is (strict mode,
    /// or adopting a strict instance's pins), for [`OrigLookup`].
    pub fn pinned_orig(&self) -> Option<PathBuf> {
        let path = maps_dir(&self.pin_dir).join(map::ORIG_BY_CLIENT);
        (self.strict || self.adopting).then_some(path).filter(|p| p.exists())
    }

    /// Writes what `connect4` knows of a namespace; `None` forgets it (its
    /// connects to meshed destinations are refused again).
    pub fn set_netns(&mut self, netns: NetnsCookie, entry: Option<NetnsEntry>) -> Result<(), Error> {
        let mut m: HashMap<_, u64, NetnsEntry> = typed_map_mut(&mut self.ebpf, map::NETNS_VERDICT)?;
        let done = match entry {
            Some(e) => m.insert(netns.0, e, 0),
            None => match m.remove(&netns.0) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        };
        done.map_err(map_err(map::NETNS_VERDICT))
    }

    /// The namespaces `connect4` knows now (a strict predecessor's entries
    /// included, when adopting its maps).
    pub fn netns_cookies(&self) -> Result<Vec<NetnsCookie>, Error> {
        let m: HashMap<_, u64, NetnsEntry> = typed_map(&self.ebpf, map::NETNS_VERDICT)?;
        Ok(m.keys().filter_map(Result::ok).map(NetnsCookie).collect())
    }

    /// The meshed destination addresses written now (a strict
    /// predecessor's included, when adopting its maps).
    pub fn meshed_addresses(&self) -> Result<Vec<IpAddr>, Error> {
        let m: HashMap<_, Addr, MeshedDst> = typed_map(&self.ebpf, map::MESHED_DSTS)?;
        Ok(m.keys().filter_map(Result::ok).map(|k| k.ip()).collect())
    }

    /// The Service ClusterIP:port pairs written now (a strict
    /// predecessor's included, when adopting its maps).
    pub fn service_vips(&self) -> Result<Vec<SocketAddr>, Error> {
        let m: HashMap<_, VipKey, u8> = typed_map(&self.ebpf, map::SERVICE_VIPS)?;
        Ok(m.keys().filter_map(Result::ok).map(|k| k.addr()).collect())
    }

    /// Marks a Service ClusterIP:port captured, with whether one of its
    /// endpoints is meshed (`Some`), or not captured (`None`).
    pub fn set_service_vip(&mut self, vip: SocketAddr, meshed: Option<bool>) -> Result<(), Error> {
        let mut m: HashMap<_, VipKey, u8> = typed_map_mut(&mut self.ebpf, map::SERVICE_VIPS)?;
        let done = if let Some(meshed) = meshed {
            m.insert(VipKey::new(vip), dataplane_common::maps::vip_flags(meshed), 0)
        } else {
            match m.remove(&VipKey::new(vip)) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        };
        done.map_err(map_err(map::SERVICE_VIPS))
    }

    /// Writes a meshed destination address; `None` removes it (connects to
    /// it go direct again, unless a capture CIDR holds it).
    pub fn set_meshed(&mut self, addr: IpAddr, entry: Option<MeshedDst>) -> Result<(), Error> {
        let mut m: HashMap<_, Addr, MeshedDst> = typed_map_mut(&mut self.ebpf, map::MESHED_DSTS)?;
        let key = Addr::new(addr);
        let done = match entry {
            Some(e) => m.insert(key, e, 0),
            None => match m.remove(&key) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        };
        done.map_err(map_err(map::MESHED_DSTS))
    }

    pub fn forget_netns(&mut self, netns: NetnsCookie) -> Result<usize, Error> {
        let mut m: HashMap<_, ClientKey, OrigDst> = typed_map_mut(&mut self.ebpf, map::ORIG_BY_CLIENT)?;
        let stale: Vec<ClientKey> = m.keys().filter_map(Result::ok).filter(|k| k.netns() == netns).collect();
        for k in &stale {
            // Already evicted by the LRU in the meantime is fine.
            let _ = m.remove(k);
        }
        Ok(stale.len())
    }

    /// The decision counters, summed over CPUs, in [`StatIndex::ALL`] order.
    pub fn stats(&self) -> Result<Vec<(StatIndex, u64)>, Error> {
        let stats: PerCpuArray<_, u64> = self
            .ebpf
            .map(map::STATS)
            .ok_or_else(|| missing_map(map::STATS))?
            .try_into()
            .map_err(map_err(map::STATS))?;
        StatIndex::ALL
            .iter()
            .map(|&i| {
                let per_cpu = stats.get(&(i as u32), 0).map_err(map_err(map::STATS))?;
                Ok((i, per_cpu.iter().sum()))
            })
            .collect()
    }
}

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
