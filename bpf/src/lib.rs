//! The capture programs (`capture.bpf.c`) and the same-node splice
//! (`splice.bpf.c`), compiled by `build.rs` and embedded.
//!
//! The bytes are 8-byte aligned: the ELF parser reads them in place.
#![forbid(unsafe_code)]

#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

static OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/capture.bpf.o")));
static SPLICE: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/splice.bpf.o")));

/// The compiled capture object, with BTF.
pub fn object() -> &'static [u8] {
    &OBJECT.0
}

/// The compiled splice object (`splice.bpf.c`), with BTF: loaded on its own,
/// only with `--same-node-fast-path`.
pub fn splice_object() -> &'static [u8] {
    &SPLICE.0
}

/// Program names (the C function names) as aya sees them.
pub mod program {
    /// `cgroup/connect4`: rewrites captured connects to the proxy.
    pub const CONNECT4: &str = "capture_connect4";
    /// `cgroup/connect6`: the same for IPv6 (and IPv4-mapped) connects.
    pub const CONNECT6: &str = "capture_connect6";
    /// `sockops`: re-keys the original destination by client address.
    pub const SOCKOPS: &str = "capture_sockops";
    /// `cgroup/getsockopt`: answers `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST`.
    pub const GETSOCKOPT: &str = "capture_getsockopt";
    /// `sk_skb/stream_verdict` (splice object): hands a spliced socket's
    /// received bytes to its peer's send side.
    pub const SPLICE_VERDICT: &str = "splice_verdict";
}

/// Map names as declared in the C source.
pub mod map {
    /// LRU hash: socket cookie → original destination, until established.
    pub const ORIG_BY_COOKIE: &str = "orig_by_cookie";
    /// LRU hash: (netns cookie, client ip, client port) → original destination.
    pub const ORIG_BY_CLIENT: &str = "orig_by_client";
    /// LPM trie of captured CIDRs.
    pub const CAPTURE_CIDRS: &str = "capture_cidrs";
    /// Array of one `capture_config`.
    pub const CONFIG: &str = "config";
    /// Hash: network-namespace cookie → what the data plane knows of it (pass, served).
    pub const NETNS_VERDICT: &str = "netns_verdict";
    /// Addresses of meshed pods, with the inbound ports each leaves alone.
    pub const MESHED_DSTS: &str = "meshed_dsts";
    /// Service ClusterIP:port pairs.
    pub const SERVICE_VIPS: &str = "service_vips";
    /// Per-CPU decision counters, indexed by `StatIndex`.
    pub const STATS: &str = "stats";
    /// Sockhash (splice object): spliced sockets, with the verdict attached.
    pub const SPLICE_SOURCES: &str = "splice_sources";
    /// Sockhash (splice object): the sockets redirects may send from.
    pub const SPLICE_TARGETS: &str = "splice_targets";
    /// Hash (splice object): socket cookie → its peer's cookie and byte count.
    pub const SPLICE_PEERS: &str = "splice_peers";
    /// Ring buffer (splice object): cookies of sockets whose direction the
    /// verdict paused.
    pub const SPLICE_PAUSED: &str = "splice_paused";
}

#[cfg(test)]
mod tests {
    #[test]
    fn objects_are_bpf_elf() {
        for o in [super::object(), super::splice_object()] {
            assert_eq!(&o[..4], b"\x7fELF", "embedded object is an ELF file");
            // e_machine at offset 18, little-endian: EM_BPF = 247.
            assert_eq!(u16::from_le_bytes([o[18], o[19]]), 247, "ELF machine is BPF");
            assert_eq!(o.as_ptr() as usize % 8, 0, "object is 8-byte aligned");
        }
    }
}
