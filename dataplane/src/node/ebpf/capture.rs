//! Loading, configuring, attaching and (in strict mode) pinning the capture
//! programs, and what the control thread writes into their maps.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, LpmTrie, MapError, PerCpuArray},
    programs::{links::PinnedLink, CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps},
    EbpfLoader,
};
use dataplane_bpf::{map, program};
use dataplane_common::maps::{
    Addr, CaptureConfig, ClientKey, MeshedDst, NetnsCookie, NetnsEntry, OrigDst, StatIndex, VipKey, CONFIG_F_ENABLED,
    CONFIG_F_TRACE,
};

use super::*;

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
        self.write(map::NETNS_VERDICT, netns.0, entry)
    }

    /// Marks a Service ClusterIP:port captured, with whether one of its
    /// endpoints is meshed (`Some`), or not captured (`None`).
    pub fn set_service_vip(&mut self, vip: SocketAddr, meshed: Option<bool>) -> Result<(), Error> {
        self.write(map::SERVICE_VIPS, VipKey::new(vip), meshed.map(dataplane_common::maps::vip_flags))
    }

    /// Writes a meshed destination address; `None` removes it (connects to
    /// it go direct again, unless a capture CIDR holds it).
    pub fn set_meshed(&mut self, addr: IpAddr, entry: Option<MeshedDst>) -> Result<(), Error> {
        self.write(map::MESHED_DSTS, Addr::new(addr), entry)
    }

    /// Adoption: forgets the namespaces a previous instance left that
    /// `known` does not name; returns how many.
    pub fn keep_netns(&mut self, known: impl Fn(NetnsCookie) -> bool) -> Result<usize, Error> {
        self.keep_only::<u64, NetnsEntry>(map::NETNS_VERDICT, |k| known(NetnsCookie(*k)))
    }

    /// Adoption: removes the meshed destinations a previous instance wrote
    /// that `wanted` does not keep; returns how many.
    pub fn keep_meshed(&mut self, wanted: impl Fn(IpAddr) -> bool) -> Result<usize, Error> {
        self.keep_only::<Addr, MeshedDst>(map::MESHED_DSTS, |k| wanted(k.ip()))
    }

    /// Adoption: removes the ClusterIPs a previous instance wrote that
    /// `wanted` does not keep; returns how many.
    pub fn keep_service_vips(&mut self, wanted: impl Fn(SocketAddr) -> bool) -> Result<usize, Error> {
        self.keep_only::<VipKey, u8>(map::SERVICE_VIPS, |k| wanted(k.addr()))
    }

    /// The one way the control thread writes a map: `Some` inserts or
    /// replaces the entry, `None` removes it (one already gone is no error).
    fn write<K: aya::Pod, V: aya::Pod>(&mut self, name: &'static str, key: K, value: Option<V>) -> Result<(), Error> {
        let mut m: HashMap<_, K, V> = typed_map_mut(&mut self.ebpf, name)?;
        let done = match value {
            Some(v) => m.insert(key, v, 0),
            None => match m.remove(&key) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        };
        done.map_err(map_err(name))
    }

    /// The one way adopted maps are brought to what this instance wants:
    /// every entry `wanted` does not keep is removed (an entry gone
    /// meanwhile is fine); returns how many were.
    fn keep_only<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        wanted: impl Fn(&K) -> bool,
    ) -> Result<usize, Error> {
        let mut m: HashMap<_, K, V> = typed_map_mut(&mut self.ebpf, name)?;
        let stale: Vec<K> = m.keys().filter_map(Result::ok).filter(|k| !wanted(k)).collect();
        for k in &stale {
            let _ = m.remove(k);
        }
        Ok(stale.len())
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
