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
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, HashMap, MapData, MapError},
    programs::{links::FdLink, ProgramError},
    Ebpf,
};
use dataplane_bpf::{map, program};
use dataplane_common::maps::{Addr, ClientKey, NetnsCookie, OrigDst};

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

mod capture;
mod splice;

pub use splice::{Pair, SpliceEnd, SpliceMaps, SpliceProgram, Splicer};
