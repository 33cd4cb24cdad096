/* Layouts shared between the eBPF programs (capture.bpf.c) and userspace
 * (common/src/maps.rs). Every struct has explicit padding and a size assert
 * here; the Rust side asserts the same sizes and a test compares both against
 * the BTF of the compiled object. Addresses and ports are in network byte
 * order, exactly as the kernel hands them to the programs. Every address is
 * 16 bytes, as IPv6: an IPv4 address is stored IPv4-mapped (::ffff:a.b.c.d),
 * so one map serves both families and a dual-stack socket's connect to a
 * mapped address is the IPv4 connect it is. */
#ifndef KMESH_CAPTURE_H
#define KMESH_CAPTURE_H

#include <linux/types.h>

/* An address of either family (IPv4 mapped), network order. */
struct addr6 {
	__u32 w[4];
};
_Static_assert(sizeof(struct addr6) == 16, "addr6 layout");

/* Where a captured connect() was going. */
struct orig_dst {
	struct addr6 ip; /* network order */
	__u16 port;      /* network order */
	__u16 _pad;
};
_Static_assert(sizeof(struct orig_dst) == 20, "orig_dst layout");

/* The key the proxy can name from an accepted socket: the client's network
 * namespace plus its address and port. Ports alone collide between pods. */
struct client_key {
	__u64 netns_cookie;
	struct addr6 ip; /* client address, network order */
	__u16 port;      /* client port, network order */
	__u16 _pad;
	__u32 _pad2;
};
_Static_assert(sizeof(struct client_key) == 32, "client_key layout");

/* Key of the capture CIDR trie (BPF_MAP_TYPE_LPM_TRIE); an IPv4 prefix /n
 * is the mapped prefix /(96 + n). */
struct cidr_key {
	__u32 prefixlen;
	struct addr6 ip; /* network order */
};
_Static_assert(sizeof(struct cidr_key) == 20, "cidr_key layout");

#define EXCLUDED_PORT_BYTES 8192 /* one bit per port, 65536 ports */

/* The one entry of the config array, written by userspace at start. */
struct capture_config {
	__u32 proxy_ip4;    /* network order, 127.0.0.1 */
	__u16 proxy_port;   /* network order, 18000 (both families) */
	__u16 flags;        /* CONFIG_F_* */
	__u32 bypass_mark;  /* SO_MARK of the data plane's own sockets */
	__u32 _pad;
	struct addr6 proxy_ip6; /* network order, ::1 */
	__u8 excluded_ports[EXCLUDED_PORT_BYTES]; /* bit (port & 7) of byte port >> 3, host order port */
};
_Static_assert(sizeof(struct capture_config) == 32 + EXCLUDED_PORT_BYTES, "capture_config layout");

#define CONFIG_F_ENABLED 1 /* capture nothing until userspace has written the config */
#define CONFIG_F_TRACE   2 /* log every decision to the trace pipe */

/* What the data plane knows of a network namespace (netns_verdict value; key:
 * network-namespace cookie). A namespace with no entry is one the data plane
 * has not enrolled (yet): its connects to meshed destinations are refused,
 * never sent in plaintext; the rest go direct. */
#define NETNS_PASS   1 /* never capture: not in the mesh (host network, pods not opted in) */
#define NETNS_SERVED 2 /* a meshed pod whose listeners are open on every executor */
#define POD_PORTS 8    /* ports per pod left alone by annotation */

struct netns_entry {
	__u32 verdict;                   /* NETNS_PASS or NETNS_SERVED */
	__u16 excluded_ports[POD_PORTS]; /* outbound destination ports left alone, host order; 0 = none */
};
_Static_assert(sizeof(struct netns_entry) == 20, "netns_entry layout");

/* A meshed pod's address (meshed_dsts value; key: struct addr6): connects to it are tunnelled unless the port is one it leaves alone. */
struct meshed_dst {
	__u16 excluded_ports[POD_PORTS]; /* inbound ports left alone, host order; 0 = none */
};
_Static_assert(sizeof(struct meshed_dst) == 16, "meshed_dst layout");

/* A Service's ClusterIP and port (service_vips key): connects to it from a
 * served namespace are captured; the data plane picks the endpoint. The
 * value is flags: VIP_HELD always, VIP_MESHED when one of its endpoints is
 * a meshed pod (only then is a namespace not decided yet refused it). */
#define VIP_HELD   1
#define VIP_MESHED 2

struct vip_key {
	struct addr6 ip; /* network order */
	__u16 port;      /* network order */
	__u16 _pad;
};
_Static_assert(sizeof(struct vip_key) == 20, "vip_key layout");

/* Indices of the per-CPU decision counters. */
enum stat_index {
	STAT_CAPTURED = 0,
	STAT_SKIP_FAMILY, /* connect4 asked for another family; IPv6 connects of an IPv4-only socket */
	STAT_SKIP_PROTO,
	STAT_SKIP_CIDR,
	STAT_SKIP_PORT,
	STAT_SKIP_MARK,
	STAT_SKIP_DISABLED,
	STAT_STORED,
	STAT_ORPHANED,  /* sockops saw an established capture with no cookie entry */
	STAT_FOUND,
	STAT_MISSED,
	STAT_SKIP_NETNS, /* the socket's network namespace is marked NETNS_PASS */
	STAT_REFUSED_UNENROLLED, /* a namespace not enrolled (yet) connecting to a meshed destination */
	STAT_MAX,
};

#endif
