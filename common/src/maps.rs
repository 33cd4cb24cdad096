//! Map keys and values shared with the eBPF programs (`bpf/src/capture.h`).
//!
//! Every struct is `#[repr(C)]` with explicit padding, its size asserted at
//! compile time here and by `_Static_assert` in C; `tests` compares the sizes
//! with the map definitions of the compiled object. Addresses and ports are
//! stored in network byte order, as the kernel gives them to the programs;
//! the constructors and accessors take and return host types. Every address
//! is 16 bytes ([`Addr`]): IPv6 as it is, IPv4 mapped (`::ffff:a.b.c.d`), so
//! one map holds both families.
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4};

/// An address of either family as the programs store it (`struct addr6`):
/// an IPv4 address is IPv4-mapped, and comes back as IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr([u8; 16]);

impl Addr {
    /// The stored form of `ip`.
    pub fn new(ip: IpAddr) -> Self {
        Self(match ip {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        })
    }

    /// The address, IPv4 again if it was mapped.
    pub fn ip(&self) -> IpAddr {
        Ipv6Addr::from(self.0).to_canonical()
    }
}

/// Where a captured `connect()` was going (`struct orig_dst`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    ip: Addr,
    port: u16,
    _pad: u16,
}

impl OrigDst {
    /// The entry for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self { ip: Addr::new(addr.ip()), port: addr.port().to_be(), _pad: 0 }
    }

    /// The original destination (IPv4 for a mapped address).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.ip(), u16::from_be(self.port))
    }
}

/// A network namespace's cookie, as `bpf_get_netns_cookie` returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetnsCookie(pub u64);

/// Key of `orig_by_client` (`struct client_key`): unique per client socket on
/// a node, because the namespace cookie tells pods apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientKey {
    netns_cookie: u64,
    ip: Addr,
    port: u16,
    _pad: u16,
    _pad2: u32,
}

impl ClientKey {
    /// The key for a client at `client` in namespace `netns`.
    pub fn new(netns: NetnsCookie, client: SocketAddr) -> Self {
        Self { netns_cookie: netns.0, ip: Addr::new(client.ip()), port: client.port().to_be(), _pad: 0, _pad2: 0 }
    }

    /// The namespace part of the key.
    pub fn netns(&self) -> NetnsCookie {
        NetnsCookie(self.netns_cookie)
    }

    /// The client address part of the key.
    pub fn client(&self) -> SocketAddr {
        SocketAddr::new(self.ip.ip(), u16::from_be(self.port))
    }
}

/// Bytes of the excluded-port bitmap: one bit per port.
pub const EXCLUDED_PORT_BYTES: usize = 8192;

/// `CONFIG_F_ENABLED`: capture nothing until the configuration is written.
pub const CONFIG_F_ENABLED: u16 = 1;
/// `CONFIG_F_TRACE`: log every decision to the kernel trace pipe.
pub const CONFIG_F_TRACE: u16 = 2;

/// The one entry of the `config` array (`struct capture_config`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CaptureConfig {
    proxy_ip4: u32,
    proxy_port: u16,
    flags: u16,
    bypass_mark: u32,
    _pad: u32,
    proxy_ip6: Addr,
    excluded_ports: [u8; EXCLUDED_PORT_BYTES],
}

impl CaptureConfig {
    /// A configuration that sends captured connects to `proxy` (IPv4) or
    /// `proxy6` (IPv6, the same port), leaves sockets marked `bypass_mark`
    /// alone and never captures `excluded` ports.
    pub fn new(proxy: SocketAddrV4, proxy6: Ipv6Addr, bypass_mark: u32, excluded: &[u16], flags: u16) -> Self {
        let mut cfg = Self {
            proxy_ip4: u32::from_ne_bytes(proxy.ip().octets()),
            proxy_port: proxy.port().to_be(),
            flags,
            bypass_mark,
            _pad: 0,
            proxy_ip6: Addr::new(IpAddr::V6(proxy6)),
            excluded_ports: [0; EXCLUDED_PORT_BYTES],
        };
        for &p in excluded {
            cfg.excluded_ports[usize::from(p >> 3)] |= 1 << (p & 7);
        }
        cfg
    }

    /// Whether `port` is excluded from capture.
    pub fn is_excluded(&self, port: u16) -> bool {
        self.excluded_ports[usize::from(port >> 3)] & (1 << (port & 7)) != 0
    }

    /// The `CONFIG_F_*` flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }
}

/// Ports a pod leaves alone by annotation, per direction (`POD_PORTS`).
pub const POD_PORTS: usize = 8;

/// What the data plane knows of a network namespace (`struct netns_entry`,
/// the `netns_verdict` value). A namespace with no entry is not enrolled:
/// its connects to meshed destinations are refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsEntry {
    verdict: u32,
    excluded_ports: [u16; POD_PORTS],
}

/// Where a namespace stands for `connect4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Never captured: not in the mesh (host network, pods not opted in).
    Pass,
    /// A meshed pod served on every executor: its connects to meshed
    /// destinations are tunnelled.
    Served,
}

impl NetnsEntry {
    /// An entry; ports beyond [`POD_PORTS`] are the caller's to refuse.
    pub fn new(verdict: Verdict, excluded_ports: &[u16]) -> Self {
        let verdict = match verdict {
            Verdict::Pass => 1,
            Verdict::Served => 2,
        };
        Self { verdict, excluded_ports: ports(excluded_ports) }
    }

    /// The verdict, if the kernel holds a known one.
    pub fn verdict(&self) -> Option<Verdict> {
        match self.verdict {
            1 => Some(Verdict::Pass),
            2 => Some(Verdict::Served),
            _ => None,
        }
    }
}

/// A meshed pod's address's entry (`struct meshed_dst`): the inbound ports
/// its pod leaves alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshedDst {
    excluded_ports: [u16; POD_PORTS],
}

impl MeshedDst {
    /// An entry; ports beyond [`POD_PORTS`] are the caller's to refuse.
    pub fn new(excluded_ports: &[u16]) -> Self {
        Self { excluded_ports: ports(excluded_ports) }
    }
}

/// A Service's ClusterIP and port (`struct vip_key`, the `service_vips` key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipKey {
    ip: Addr,
    port: u16,
    _pad: u16,
}

impl VipKey {
    /// The key for `vip`.
    pub fn new(vip: SocketAddr) -> Self {
        Self { ip: Addr::new(vip.ip()), port: vip.port().to_be(), _pad: 0 }
    }

    /// The ClusterIP and port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.ip(), u16::from_be(self.port))
    }
}

/// The `service_vips` value for a ClusterIP:port (`VIP_*` flags): held,
/// and whether one of its endpoints is a meshed pod (only then is a
/// namespace not decided yet refused it).
pub fn vip_flags(meshed: bool) -> u8 {
    const VIP_HELD: u8 = 1;
    const VIP_MESHED: u8 = 2;
    VIP_HELD | if meshed { VIP_MESHED } else { 0 }
}

/// One socket of a spliced pair (`struct splice_peer`, the `splice_peers`
/// value; key: the socket's cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplicePeer {
    /// The other socket's cookie.
    pub peer: u64,
    /// Bytes this socket received and the kernel handed to the peer.
    pub bytes: u64,
    /// The peer's `tcpi_bytes_acked` when the pair was made.
    pub acked_base: u64,
    /// Set by the kernel, once: this socket's bytes are left for user space.
    pub paused: u32,
    _pad: u32,
}

impl SplicePeer {
    /// The entry of a socket whose peer is `peer`, which had `acked_base`
    /// bytes acknowledged when the pair was made.
    pub fn new(peer: u64, acked_base: u64) -> Self {
        Self { peer, bytes: 0, acked_base, paused: 0, _pad: 0 }
    }
}

fn ports(given: &[u16]) -> [u16; POD_PORTS] {
    let mut out = [0; POD_PORTS];
    for (slot, p) in out.iter_mut().zip(given) {
        *slot = *p;
    }
    out
}

/// Indices of the per-CPU decision counters (`enum stat_index`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum StatIndex {
    /// Connect rewritten to the proxy.
    Captured = 0,
    /// A connect program saw another family than its own.
    SkipFamily,
    /// Not a TCP stream socket.
    SkipProto,
    /// Destination not meshed: no meshed pod, Service or capture CIDR;
    /// or, from a namespace not decided yet, a Service none of whose
    /// endpoints is meshed.
    SkipCidr,
    /// Destination port excluded.
    SkipPort,
    /// The data plane's own socket (bypass mark).
    SkipMark,
    /// Capture disabled, or the destination could not be remembered.
    SkipDisabled,
    /// Original destination re-keyed by client address on establishment.
    Stored,
    /// Established, but the re-keyed entry could not be written.
    Orphaned,
    /// `SO_ORIGINAL_DST` answered.
    Found,
    /// `SO_ORIGINAL_DST` asked for a connection we do not know.
    Missed,
    /// The socket's network namespace is marked pass ([`Verdict::Pass`]).
    SkipNetns,
    /// A namespace not enrolled (yet) connected to a meshed destination:
    /// refused rather than sent in plaintext.
    RefusedUnenrolled,
}

impl StatIndex {
    /// Every counter, in index order.
    pub const ALL: [StatIndex; 13] = [
        Self::Captured,
        Self::SkipFamily,
        Self::SkipProto,
        Self::SkipCidr,
        Self::SkipPort,
        Self::SkipMark,
        Self::SkipDisabled,
        Self::Stored,
        Self::Orphaned,
        Self::Found,
        Self::Missed,
        Self::SkipNetns,
        Self::RefusedUnenrolled,
    ];
    /// Number of counters (`STAT_MAX`).
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// A stable snake_case name for metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Captured => "captured",
            Self::SkipFamily => "skipped_family",
            Self::SkipProto => "skipped_protocol",
            Self::SkipCidr => "skipped_cidr",
            Self::SkipPort => "skipped_port",
            Self::SkipMark => "skipped_own_socket",
            Self::SkipDisabled => "skipped_disabled",
            Self::Stored => "orig_dst_stored",
            Self::Orphaned => "orig_dst_orphaned",
            Self::Found => "orig_dst_found",
            Self::Missed => "orig_dst_missed",
            Self::SkipNetns => "skipped_netns",
            Self::RefusedUnenrolled => "refused_unenrolled",
        }
    }
}

const _: () = {
    assert!(size_of::<Addr>() == 16);
    assert!(size_of::<OrigDst>() == 20);
    assert!(std::mem::offset_of!(OrigDst, port) == 16);
    assert!(size_of::<ClientKey>() == 32);
    assert!(std::mem::offset_of!(ClientKey, ip) == 8);
    assert!(std::mem::offset_of!(ClientKey, port) == 24);
    assert!(size_of::<CaptureConfig>() == 32 + EXCLUDED_PORT_BYTES);
    assert!(std::mem::offset_of!(CaptureConfig, bypass_mark) == 8);
    assert!(std::mem::offset_of!(CaptureConfig, proxy_ip6) == 16);
    assert!(std::mem::offset_of!(CaptureConfig, excluded_ports) == 32);
    assert!(size_of::<NetnsEntry>() == 20);
    assert!(size_of::<MeshedDst>() == 16);
    assert!(size_of::<VipKey>() == 20);
    assert!(size_of::<SplicePeer>() == 32);
};

#[cfg(feature = "aya")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, has explicit padding fields so
    // every byte is initialised, and contains only integers: any bit pattern
    // the kernel writes back is a valid value.
    unsafe impl aya::Pod for super::Addr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CaptureConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetnsEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MeshedDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SplicePeer {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn object_maps() -> HashMap<String, aya_obj::Map> {
        aya_obj::Object::parse(dataplane_bpf::object()).expect("compiled BPF object parses").maps
    }

    #[test]
    fn layouts_match_the_compiled_object() {
        let maps = object_maps();
        let sizes = |name: &str| {
            let m = maps.get(name).unwrap_or_else(|| panic!("map {name} in the object"));
            (m.key_size() as usize, m.value_size() as usize)
        };
        use dataplane_bpf::map;
        assert_eq!(sizes(map::ORIG_BY_COOKIE), (8, size_of::<OrigDst>()));
        assert_eq!(sizes(map::ORIG_BY_CLIENT), (size_of::<ClientKey>(), size_of::<OrigDst>()));
        // struct cidr_key is aya's lpm_trie::Key<Addr>: prefix length, then the address.
        assert_eq!(sizes(map::CAPTURE_CIDRS), (size_of::<u32>() + size_of::<Addr>(), 1));
        assert_eq!(sizes(map::CONFIG), (4, size_of::<CaptureConfig>()));
        assert_eq!(sizes(map::STATS), (4, 8));
        assert_eq!(sizes(map::NETNS_VERDICT), (size_of::<NetnsCookie>(), size_of::<NetnsEntry>()));
        assert_eq!(sizes(map::MESHED_DSTS), (size_of::<Addr>(), size_of::<MeshedDst>()));
        assert_eq!(sizes(map::SERVICE_VIPS), (size_of::<VipKey>(), 1));
        let stats = maps.get(map::STATS).expect("stats map");
        assert_eq!(stats.max_entries(), StatIndex::COUNT, "one counter per StatIndex");

        let splice = aya_obj::Object::parse(dataplane_bpf::splice_object()).expect("splice object parses").maps;
        let sizes = |name: &str| {
            let m = splice.get(name).unwrap_or_else(|| panic!("map {name} in the splice object"));
            (m.key_size() as usize, m.value_size() as usize)
        };
        assert_eq!(sizes(map::SPLICE_PEERS), (8, size_of::<SplicePeer>()));
        // Sockhashes: a cookie, and the fd userspace passes (aya's RawFd).
        assert_eq!(sizes(map::SPLICE_SOURCES), (8, 4));
        assert_eq!(sizes(map::SPLICE_TARGETS), (8, 4));
    }

    #[test]
    fn network_order_round_trips() {
        for a in ["10.1.2.3:8080", "[fd00::1:2]:8080"] {
            let a: SocketAddr = a.parse().expect("addr");
            assert_eq!(OrigDst::new(a).addr(), a);
            let k = ClientKey::new(NetnsCookie(42), a);
            assert_eq!((k.netns(), k.client()), (NetnsCookie(42), a));
            assert_eq!(VipKey::new(a).addr(), a);
        }
        // The kernel's view: bytes in wire order, IPv4 mapped.
        let od = OrigDst::new("10.1.2.3:8080".parse().expect("addr"));
        assert_eq!(od.ip.0, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]);
        assert_eq!(od.port.to_ne_bytes(), 8080u16.to_be_bytes());
        // A mapped address from a dual-stack socket is the IPv4 one.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(Addr::new(mapped), Addr::new("10.1.2.3".parse().expect("ip")));
    }

    proptest::proptest! {
        #[test]
        fn excluded_ports_are_exactly_those_given(ports in proptest::collection::vec(proptest::num::u16::ANY, 0..64), probe: u16) {
            let cfg = CaptureConfig::new("127.0.0.1:18000".parse().expect("addr"), Ipv6Addr::LOCALHOST, 0, &ports, CONFIG_F_ENABLED);
            proptest::prop_assert_eq!(cfg.is_excluded(probe), ports.contains(&probe));
            for p in &ports { proptest::prop_assert!(cfg.is_excluded(*p)); }
        }
    }
}
