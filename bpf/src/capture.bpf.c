// SPDX-License-Identifier: (MIT OR GPL-2.0)
/* Transparent capture of pods' outbound TCP connects.
 *
 * 1. cgroup/connect4 (on the workloads' cgroup): a TCP connect from an
 *    enrolled (NETNS_SERVED) namespace to a meshed destination (an address in
 *    meshed_dsts, a Service ClusterIP:port in service_vips, or a capture
 *    CIDR) on a port that is not excluded (globally,
 *    by the source pod, or by the destination pod) is rewritten to the local
 *    proxy (127.0.0.1:18000); the original destination is remembered under
 *    the socket cookie. From a namespace not enrolled (yet) such a connect is
 *    refused (EPERM): it never leaves in plaintext.
 * 2. sockops ACTIVE_ESTABLISHED (same cgroup): once the client's address and
 *    port are known, the entry moves to a key the proxy can name from its
 *    accepted socket: (netns cookie, client address, client port).
 * 3. cgroup/getsockopt (on the data plane's cgroup): answers
 *    getsockopt(SOL_IP, SO_ORIGINAL_DST) from that map, so the proxy only uses
 *    the standard socket option. Everything else passes through untouched.
 *
 * Connects from a network namespace marked NETNS_PASS in netns_verdict (the
 * node's own, where host-network pods live, unless the data plane serves it;
 * pods outside the mesh) are never touched.
 *
 * Maps are LRU so they can never fill up and wedge the node. Nothing is
 * captured until userspace has written the configuration. Sockets that carry
 * the data plane's bypass mark are never captured. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "capture.h"

#define AF_INET 2
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SO_ORIGINAL_DST 80

/* struct sockaddr_in without pulling in libc headers. */
struct sockaddr_in4 {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

/* Default sizes; userspace may resize them before load. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct orig_dst);
} orig_by_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct client_key);
	__type(value, struct orig_dst);
} orig_by_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_key);
	__type(value, __u8);
} capture_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct capture_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64); /* network-namespace cookie */
	__type(value, struct netns_entry);
} netns_verdict SEC(".maps");

/* Service ClusterIP:port pairs, written from the model (plain hash: an
 * evicted entry would let a Service connect go around the mesh). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vip_key);
	__type(value, __u8);
} service_vips SEC(".maps");

/* Plain hash, not LRU: an evicted meshed address would silently go out in
 * plaintext. Userspace sizes it and counts a full map. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32); /* IPv4 address, network order */
	__type(value, struct meshed_dst);
} meshed_dsts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += 1; /* per-CPU slot: no atomics needed */
}

static __always_inline int tracing(const struct capture_config *cfg)
{
	return cfg && (cfg->flags & CONFIG_F_TRACE);
}

static __always_inline int in_ports(const __u16 *ports, __u16 port_host)
{
#pragma unroll
	for (int i = 0; i < POD_PORTS; i++)
		if (ports[i] && ports[i] == port_host)
			return 1;
	return 0;
}

static __always_inline int port_excluded(const struct capture_config *cfg, __u16 port_host)
{
	__u32 byte = port_host >> 3;
	if (byte >= EXCLUDED_PORT_BYTES)
		return 1;
	return (cfg->excluded_ports[byte] >> (port_host & 7)) & 1;
}

SEC("cgroup/connect4")
int capture_connect4(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	const struct capture_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !(cfg->flags & CONFIG_F_ENABLED)) {
		count(STAT_SKIP_DISABLED);
		return 1;
	}
	if (ctx->user_family != AF_INET) {
		count(STAT_SKIP_FAMILY);
		return 1;
	}
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP) {
		count(STAT_SKIP_PROTO);
		return 1;
	}
	__u64 netns = bpf_get_netns_cookie(ctx);
	const struct netns_entry *src = bpf_map_lookup_elem(&netns_verdict, &netns);
	if (src && src->verdict == NETNS_PASS) {
		count(STAT_SKIP_NETNS);
		return 1;
	}
	struct bpf_sock *sk = ctx->sk;
	if (sk && cfg->bypass_mark && sk->mark == cfg->bypass_mark) {
		count(STAT_SKIP_MARK);
		return 1;
	}
	__u32 dst_ip = ctx->user_ip4;
	__u16 dst_port = (__u16)ctx->user_port;
	__u16 port_host = bpf_ntohs(dst_port);
	const struct meshed_dst *dst = bpf_map_lookup_elem(&meshed_dsts, &dst_ip);
	struct vip_key vk = { .ip4 = dst_ip, .port = dst_port };
	struct cidr_key ck = { .prefixlen = 32, .ip4 = dst_ip };
	if (!dst && !bpf_map_lookup_elem(&service_vips, &vk) && !bpf_map_lookup_elem(&capture_cidrs, &ck)) {
		count(STAT_SKIP_CIDR);
		return 1;
	}
	if (port_excluded(cfg, port_host) || (dst && in_ports(dst->excluded_ports, port_host)) ||
	    (src && in_ports(src->excluded_ports, port_host))) {
		count(STAT_SKIP_PORT);
		if (tracing(cfg))
			bpf_printk("dataplane connect4: skip excluded port %d", port_host);
		return 1;
	}
	if (!src || src->verdict != NETNS_SERVED) {
		count(STAT_REFUSED_UNENROLLED);
		if (tracing(cfg))
			bpf_printk("dataplane connect4: refuse netns %llu (not enrolled) to %pI4:%d", netns, &dst_ip,
				   port_host);
		return 0; /* EPERM: never plaintext to a meshed destination */
	}
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst od = { .ip4 = dst_ip, .port = dst_port };
	if (bpf_map_update_elem(&orig_by_cookie, &cookie, &od, BPF_ANY) != 0) {
		/* Could not remember where it was going: refuse rather than go
		 * out in plaintext or reach a proxy that cannot route it. */
		count(STAT_REFUSED_UNENROLLED);
		return 0;
	}
	ctx->user_ip4 = cfg->proxy_ip4;
	ctx->user_port = cfg->proxy_port;
	count(STAT_CAPTURED);
	if (tracing(cfg))
		bpf_printk("dataplane connect4: captured cookie %llu to %pI4:%d", cookie, &dst_ip,
			   bpf_ntohs(dst_port));
	return 1;
}

SEC("sockops")
int capture_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || skops->family != AF_INET)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *od = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (!od)
		return 1; /* not one of ours */
	struct client_key key = {
		.netns_cookie = bpf_get_netns_cookie(skops),
		.ip4 = skops->local_ip4,
		.port = bpf_htons((__u16)skops->local_port), /* local_port is host order */
	};
	struct orig_dst val = *od;
	bpf_map_delete_elem(&orig_by_cookie, &cookie);
	if (bpf_map_update_elem(&orig_by_client, &key, &val, BPF_ANY) != 0) {
		count(STAT_ORPHANED);
		return 1;
	}
	count(STAT_STORED);
	__u32 zero = 0;
	const struct capture_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (tracing(cfg))
		bpf_printk("dataplane sockops: client %pI4:%d netns %llu", &key.ip4,
			   skops->local_port, key.netns_cookie);
	return 1;
}

SEC("cgroup/getsockopt")
int capture_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		return 1; /* not ours: untouched, whatever its size */
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->family != AF_INET)
		return 1;
	struct client_key key = {
		.netns_cookie = bpf_get_netns_cookie(ctx),
		.ip4 = sk->dst_ip4,
		.port = (__u16)sk->dst_port,
	};
	struct orig_dst *od = bpf_map_lookup_elem(&orig_by_client, &key);
	__u32 zero = 0;
	const struct capture_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!od) {
		count(STAT_MISSED);
		if (tracing(cfg))
			bpf_printk("dataplane getsockopt: miss for client %pI4:%d", &key.ip4,
				   bpf_ntohs(key.port));
		return 1; /* the kernel's own error (ENOENT / ENOPROTOOPT) stands */
	}
	struct sockaddr_in4 *sin = ctx->optval;
	if ((void *)(sin + 1) > ctx->optval_end)
		return 1; /* caller's buffer too small: leave the kernel's answer */
	sin->family = AF_INET;
	sin->port = od->port;
	sin->addr = od->ip4;
	__builtin_memset(sin->zero, 0, sizeof(sin->zero));
	/* Two separate stores: clang may merge adjacent context writes into one
	 * 64-bit store, which the verifier rejects. */
	*(volatile __s32 *)&ctx->optlen = sizeof(*sin);
	*(volatile __s32 *)&ctx->retval = 0;
	count(STAT_FOUND);
	if (tracing(cfg))
		bpf_printk("dataplane getsockopt: client %pI4:%d -> %pI4", &key.ip4,
			   bpf_ntohs(key.port), &od->ip4);
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
