// SPDX-License-Identifier: (MIT OR GPL-2.0)
/* Transparent capture of pods' outbound TCP connects, IPv4 and IPv6.
 *
 * 1. cgroup/connect4 and cgroup/connect6 (on the workloads' cgroup), with
 *    the same rules for both families: a TCP connect from an
 *    enrolled (NETNS_SERVED) namespace to a meshed destination (an address in
 *    meshed_dsts, a Service ClusterIP:port in service_vips, or a capture
 *    CIDR) on a port that is not excluded (globally,
 *    by the source pod, or by the destination pod) is rewritten to the local
 *    proxy (127.0.0.1:18000, or [::1]:18000 for IPv6); the original
 *    destination is remembered under the socket cookie. A dual-stack
 *    socket's connect to an IPv4-mapped address (::ffff:a.b.c.d) is an IPv4
 *    connect: judged by the IPv4 address, sent to ::ffff:127.0.0.1. From a
 *    namespace not enrolled (yet) such a connect is refused (EPERM): it
 *    never leaves in plaintext; unless it goes to a Service none of whose
 *    endpoints is meshed, which it reaches as without us.
 * 2. sockops ACTIVE_ESTABLISHED (same cgroup): once the client's address and
 *    port are known, the entry moves to a key the proxy can name from its
 *    accepted socket: (netns cookie, client address, client port).
 * 3. cgroup/getsockopt (on the data plane's cgroup): answers
 *    getsockopt(SOL_IP, SO_ORIGINAL_DST) and getsockopt(SOL_IPV6,
 *    IP6T_SO_ORIGINAL_DST) from that map, so the proxy only uses the
 *    standard socket options. Everything else passes through untouched.
 *
 * Every address in the maps is 16 bytes, IPv4 addresses mapped (capture.h).
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
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80
#define IP6T_SO_ORIGINAL_DST 80

/* struct sockaddr_in and sockaddr_in6 without pulling in libc headers. */
struct sockaddr_in4 {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

struct sockaddr_in6_ {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
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
 * evicted entry would let a Service connect go around the mesh); the value
 * is VIP_* flags. */
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
	__type(key, struct addr6);
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

static __always_inline struct addr6 mapped(__u32 ip4)
{
	struct addr6 a = { .w = { 0, 0, bpf_htonl(0xffff), ip4 } };
	return a;
}

static __always_inline int is_mapped(const struct addr6 *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

/* Makes a loaded value opaque to the compiler, so that a choice between two
 * context fields stays a choice between two loads (see capture_sockops). */
#define opaque(x) asm volatile("" : "+r"(x))

enum verdict { LEAVE, CAPTURE, REFUSE };

/* The rules of both connect programs, for a TCP connect to dst:port (network
 * order) from the socket of ctx. On CAPTURE the original destination is
 * remembered under the socket cookie and the port rewritten to the proxy's;
 * the caller rewrites the address, in its family's field. */
static __always_inline enum verdict judge(struct bpf_sock_addr *ctx, const struct capture_config *cfg,
					  const struct addr6 *dst, __u16 dst_port)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP) {
		count(STAT_SKIP_PROTO);
		return LEAVE;
	}
	__u64 netns = bpf_get_netns_cookie(ctx);
	const struct netns_entry *src = bpf_map_lookup_elem(&netns_verdict, &netns);
	if (src && src->verdict == NETNS_PASS) {
		count(STAT_SKIP_NETNS);
		return LEAVE;
	}
	struct bpf_sock *sk = ctx->sk;
	if (sk && cfg->bypass_mark && sk->mark == cfg->bypass_mark) {
		count(STAT_SKIP_MARK);
		return LEAVE;
	}
	__u16 port_host = bpf_ntohs(dst_port);
	const struct meshed_dst *mdst = bpf_map_lookup_elem(&meshed_dsts, dst);
	struct vip_key vk = { .ip = *dst, .port = dst_port };
	const __u8 *vip = mdst ? 0 : bpf_map_lookup_elem(&service_vips, &vk);
	struct cidr_key ck = { .prefixlen = 128, .ip = *dst };
	int in_cidr = !mdst && !vip && bpf_map_lookup_elem(&capture_cidrs, &ck);
	if (!mdst && !vip && !in_cidr) {
		count(STAT_SKIP_CIDR);
		return LEAVE;
	}
	if (port_excluded(cfg, port_host) || (mdst && in_ports(mdst->excluded_ports, port_host)) ||
	    (src && in_ports(src->excluded_ports, port_host))) {
		count(STAT_SKIP_PORT);
		if (tracing(cfg))
			bpf_printk("dataplane connect: skip excluded port %d", port_host);
		return LEAVE;
	}
	if (!src && vip && !(*vip & VIP_MESHED)) {
		/* A namespace not decided yet, to a Service whose endpoints are
		 * all outside the mesh (the API server's own, say): nothing to
		 * keep from it, so it goes as it would without us. */
		count(STAT_SKIP_CIDR);
		return LEAVE;
	}
	if (!src || src->verdict != NETNS_SERVED) {
		count(STAT_REFUSED_UNENROLLED);
		if (tracing(cfg))
			bpf_printk("dataplane connect: refuse netns %llu (not enrolled) to %pI6:%d", netns, dst,
				   port_host);
		return REFUSE; /* EPERM: never plaintext to a meshed destination */
	}
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst od = { .ip = *dst, .port = dst_port };
	if (bpf_map_update_elem(&orig_by_cookie, &cookie, &od, BPF_ANY) != 0) {
		/* Could not remember where it was going: refuse rather than go
		 * out in plaintext or reach a proxy that cannot route it. */
		count(STAT_REFUSED_UNENROLLED);
		return REFUSE;
	}
	ctx->user_port = cfg->proxy_port;
	count(STAT_CAPTURED);
	if (tracing(cfg))
		bpf_printk("dataplane connect: captured cookie %llu to %pI6:%d", cookie, dst, port_host);
	return CAPTURE;
}

static __always_inline const struct capture_config *enabled_config(void)
{
	__u32 zero = 0;
	const struct capture_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !(cfg->flags & CONFIG_F_ENABLED)) {
		count(STAT_SKIP_DISABLED);
		return 0;
	}
	return cfg;
}

SEC("cgroup/connect4")
int capture_connect4(struct bpf_sock_addr *ctx)
{
	const struct capture_config *cfg = enabled_config();
	if (!cfg)
		return 1;
	if (ctx->user_family != AF_INET) {
		count(STAT_SKIP_FAMILY);
		return 1;
	}
	struct addr6 dst = mapped(ctx->user_ip4);
	enum verdict v = judge(ctx, cfg, &dst, (__u16)ctx->user_port);
	if (v == CAPTURE)
		ctx->user_ip4 = cfg->proxy_ip4;
	return v != REFUSE; /* 0: EPERM */
}

SEC("cgroup/connect6")
int capture_connect6(struct bpf_sock_addr *ctx)
{
	const struct capture_config *cfg = enabled_config();
	if (!cfg)
		return 1;
	if (ctx->user_family != AF_INET6) {
		count(STAT_SKIP_FAMILY);
		return 1;
	}
	/* 32-bit context loads: the only width the verifier allows here. */
	struct addr6 dst = { .w = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] } };
	enum verdict v = judge(ctx, cfg, &dst, (__u16)ctx->user_port);
	if (v == CAPTURE && is_mapped(&dst)) {
		/* An IPv4 connect on a dual-stack socket: to the IPv4 proxy,
		 * as ::ffff:127.0.0.1. */
		ctx->user_ip6[3] = cfg->proxy_ip4;
	} else if (v == CAPTURE) {
		ctx->user_ip6[0] = cfg->proxy_ip6.w[0];
		ctx->user_ip6[1] = cfg->proxy_ip6.w[1];
		ctx->user_ip6[2] = cfg->proxy_ip6.w[2];
		ctx->user_ip6[3] = cfg->proxy_ip6.w[3];
	}
	return v != REFUSE; /* 0: EPERM */
}

SEC("sockops")
int capture_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	__u32 family = skops->family;
	if (family != AF_INET && family != AF_INET6)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *od = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (!od)
		return 1; /* not one of ours */
	struct client_key key = {
		.netns_cookie = bpf_get_netns_cookie(skops),
		.port = bpf_htons((__u16)skops->local_port), /* local_port is host order */
	};
	/* An AF_INET6 socket's IPv4 connection has its address mapped here
	 * already, as the accepting side will key it. */
	/* Both families' fields are loaded unconditionally, then chosen by
	 * value: otherwise clang fetches the last word through one computed
	 * context offset (28 or 60), which the verifier rejects. */
	__u32 ip4 = skops->local_ip4;
	__u32 last = skops->local_ip6[3];
	opaque(ip4);
	opaque(last);
	struct addr6 ip6 = { .w = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2], last } };
	key.ip = family == AF_INET ? mapped(ip4) : ip6;
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
		bpf_printk("dataplane sockops: client %pI6:%d netns %llu", &key.ip, skops->local_port,
			   key.netns_cookie);
	return 1;
}

SEC("cgroup/getsockopt")
int capture_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	int v4 = ctx->level == SOL_IP && ctx->optname == SO_ORIGINAL_DST && sk->family == AF_INET;
	int v6 = ctx->level == SOL_IPV6 && ctx->optname == IP6T_SO_ORIGINAL_DST && sk->family == AF_INET6;
	if (!v4 && !v6)
		return 1; /* not ours: untouched, whatever its size */
	struct client_key key = {
		.netns_cookie = bpf_get_netns_cookie(ctx),
		.port = (__u16)sk->dst_port,
	};
	/* Loaded unconditionally, chosen by value: see capture_sockops. */
	__u32 ip4 = sk->dst_ip4;
	__u32 last = sk->dst_ip6[3];
	opaque(ip4);
	opaque(last);
	struct addr6 ip6 = { .w = { sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], last } };
	key.ip = v4 ? mapped(ip4) : ip6;
	struct orig_dst *od = bpf_map_lookup_elem(&orig_by_client, &key);
	__u32 zero = 0;
	const struct capture_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!od) {
		count(STAT_MISSED);
		if (tracing(cfg))
			bpf_printk("dataplane getsockopt: miss for client %pI6:%d", &key.ip, bpf_ntohs(key.port));
		return 1; /* the kernel's own error (ENOENT / ENOPROTOOPT) stands */
	}
	/* The answer is in the socket's family: an IPv4 destination on an
	 * IPv6 socket stays mapped, as ip6tables would give it. */
	if (v4) {
		if (!is_mapped(&od->ip))
			return 1; /* an IPv6 destination cannot be told in IPv4 */
		struct sockaddr_in4 *sin = ctx->optval;
		if ((void *)(sin + 1) > ctx->optval_end)
			return 1; /* caller's buffer too small: leave the kernel's answer */
		sin->family = AF_INET;
		sin->port = od->port;
		sin->addr = od->ip.w[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		*(volatile __s32 *)&ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6_ *sin6 = ctx->optval;
		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		sin6->family = AF_INET6;
		sin6->port = od->port;
		sin6->flowinfo = 0;
		sin6->addr[0] = od->ip.w[0];
		sin6->addr[1] = od->ip.w[1];
		sin6->addr[2] = od->ip.w[2];
		sin6->addr[3] = od->ip.w[3];
		sin6->scope_id = 0;
		*(volatile __s32 *)&ctx->optlen = sizeof(*sin6);
	}
	/* Separate stores: clang may merge adjacent context writes into one
	 * 64-bit store, which the verifier rejects. */
	*(volatile __s32 *)&ctx->retval = 0;
	count(STAT_FOUND);
	if (tracing(cfg))
		bpf_printk("dataplane getsockopt: client %pI6:%d -> %pI6", &key.ip, bpf_ntohs(key.port), &od->ip);
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
