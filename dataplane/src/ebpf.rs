//! The typed door to the eBPF side: loads the embedded object with aya,
//! writes the capture configuration, attaches the three programs, reads the
//! decision counters. No program or map is named by a string outside this
//! module (the names live in `dataplane-bpf`).
//!
//! Attachments are BPF links owned by [`Capture`]: dropping it, or the
//! process dying in any way (SIGKILL included), closes the link fds and the
//! kernel detaches the programs, so traffic flows directly again.
use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapError, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps},
    Ebpf, EbpfLoader,
};
use dataplane_bpf::{map, program};
use dataplane_common::maps::{
    CaptureConfig, ClientKey, NetnsCookie, OrigDst, StatIndex, CONFIG_F_ENABLED, CONFIG_F_TRACE,
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

/// A capture CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address, host bits zero.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

/// What the programs are told at start-up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where captured connects go (127.0.0.1:18000).
    pub proxy: SocketAddrV4,
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
}

/// The loaded and attached capture programs. Dropping it detaches them.
#[derive(Debug)]
pub struct Capture {
    ebpf: Ebpf,
}

fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

fn open_cgroup(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Cgroup { path: path.to_path_buf(), source })
}

impl Capture {
    /// Loads the programs and writes `settings` into their maps. Nothing is
    /// attached yet.
    pub fn load(settings: &Settings) -> Result<Self, Error> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map::ORIG_BY_COOKIE, settings.map_entries)
            .map_max_entries(map::ORIG_BY_CLIENT, settings.map_entries)
            .load(dataplane_bpf::object())
            .map_err(|e| Error::Load(Box::new(e)))?;

        let mut cidrs: LpmTrie<_, u32, u8> = ebpf
            .map_mut(map::CAPTURE_CIDRS)
            .ok_or(Error::Map {
                name: map::CAPTURE_CIDRS,
                source: MapError::InvalidName { name: map::CAPTURE_CIDRS.into() },
            })?
            .try_into()
            .map_err(map_err(map::CAPTURE_CIDRS))?;
        for c in &settings.cidrs {
            let key = Key::new(u32::from(c.prefix), u32::from_ne_bytes(c.addr.octets()));
            cidrs.insert(&key, 1, 0).map_err(map_err(map::CAPTURE_CIDRS))?;
        }

        let flags = CONFIG_F_ENABLED | if settings.trace { CONFIG_F_TRACE } else { 0 };
        let cfg = CaptureConfig::new(settings.proxy, settings.bypass_mark, &settings.excluded_ports, flags);
        let mut config: Array<_, CaptureConfig> = ebpf
            .map_mut(map::CONFIG)
            .ok_or(Error::Map { name: map::CONFIG, source: MapError::InvalidName { name: map::CONFIG.into() } })?
            .try_into()
            .map_err(map_err(map::CONFIG))?;
        config.set(0, cfg, 0).map_err(map_err(map::CONFIG))?;

        for name in [program::CONNECT4, program::SOCKOPS, program::GETSOCKOPT] {
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
        Ok(Self { ebpf })
    }

    /// Attaches connect4 and sockops to the workloads' cgroup and getsockopt to
    /// the data plane's own cgroup.
    pub fn attach(&mut self, workload_cgroup: &Path, own_cgroup: &Path) -> Result<(), Error> {
        let workload = open_cgroup(workload_cgroup)?;
        let own = open_cgroup(own_cgroup)?;
        // The kernel attaches through BPF links, which ignore these flags and
        // always allow other programs beside ours (aya issue 1078 for Multiple).
        let mode = CgroupAttachMode::Single;

        let connect4: &mut CgroupSockAddr = self.program(program::CONNECT4)?;
        connect4.attach(&workload, mode).map_err(program_err(program::CONNECT4))?;
        let sockops: &mut SockOps = self.program(program::SOCKOPS)?;
        sockops.attach(&workload, mode).map_err(program_err(program::SOCKOPS))?;
        let getsockopt: &mut CgroupSockopt = self.program(program::GETSOCKOPT)?;
        getsockopt.attach(&own, mode).map_err(program_err(program::GETSOCKOPT))?;
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

    /// Deletes the original destinations recorded for clients in a namespace
    /// that is gone, so a deleted pod leaves nothing in the maps. Returns how
    /// many entries went.
    pub fn forget_netns(&mut self, netns: NetnsCookie) -> Result<usize, Error> {
        let name = map::ORIG_BY_CLIENT;
        let mut m: HashMap<_, ClientKey, OrigDst> = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::Map { name, source: MapError::InvalidName { name: name.into() } })?
            .try_into()
            .map_err(map_err(name))?;
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
            .ok_or(Error::Map { name: map::STATS, source: MapError::InvalidName { name: map::STATS.into() } })?
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
