/* Layouts shared between the eBPF programs (capture.bpf.c) and userspace
 * (common/src/maps.rs). Every struct has explicit padding and a size assert
 * here; the Rust side asserts the same sizes and a test compares both against
 * the BTF of the compiled object. Addresses and ports are in network byte
 * order, exactly as the kernel hands them to the programs. */
#ifndef KMESH_CAPTURE_H
#define KMESH_CAPTURE_H

#include <linux/types.h>

/* Where a captured connect() was going. */
struct orig_dst {
	__u32 ip4;   /* network order */
	__u16 port;  /* network order */
	__u16 _pad;
};
_Static_assert(sizeof(struct orig_dst) == 8, "orig_dst layout");

/* The key the proxy can name from an accepted socket: the client's network
 * namespace plus its address and port. Ports alone collide between pods. */
struct client_key {
	__u64 netns_cookie;
	__u32 ip4;   /* client address, network order */
	__u16 port;  /* client port, network order */
	__u16 _pad;
};
_Static_assert(sizeof(struct client_key) == 16, "client_key layout");

/* Key of the capture CIDR trie (BPF_MAP_TYPE_LPM_TRIE). */
struct cidr_key {
	__u32 prefixlen;
	__u32 ip4;   /* network order */
};
_Static_assert(sizeof(struct cidr_key) == 8, "cidr_key layout");

#define EXCLUDED_PORT_BYTES 8192 /* one bit per port, 65536 ports */

/* The one entry of the config array, written by userspace at start. */
struct capture_config {
	__u32 proxy_ip4;    /* network order, 127.0.0.1 */
	__u16 proxy_port;   /* network order, 18000 */
	__u16 flags;        /* CONFIG_F_* */
	__u32 bypass_mark;  /* SO_MARK of the data plane's own sockets */
	__u32 _pad;
	__u8 excluded_ports[EXCLUDED_PORT_BYTES]; /* bit (port & 7) of byte port >> 3, host order port */
};
_Static_assert(sizeof(struct capture_config) == 16 + EXCLUDED_PORT_BYTES, "capture_config layout");

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

/* A meshed pod's address (meshed_dsts value; key: IPv4 address, network
 * order): connects to it are tunnelled unless the port is one it leaves alone. */
struct meshed_dst {
	__u16 excluded_ports[POD_PORTS]; /* inbound ports left alone, host order; 0 = none */
};
_Static_assert(sizeof(struct meshed_dst) == 16, "meshed_dst layout");

/* A Service's ClusterIP and port (service_vips key): connects to it from a
 * served namespace are captured; the data plane picks the endpoint. */
struct vip_key {
	__u32 ip4;  /* network order */
	__u16 port; /* network order */
	__u16 _pad;
};
_Static_assert(sizeof(struct vip_key) == 8, "vip_key layout");

/* Indices of the per-CPU decision counters. */
enum stat_index {
	STAT_CAPTURED = 0,
	STAT_SKIP_FAMILY,
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
