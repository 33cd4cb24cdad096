// SPDX-License-Identifier: GPL-2.0
/* The same-node splice: bytes between two pods this data plane serves move
 * from socket to socket inside the kernel, never through user space.
 *
 * The data plane accepts the client pod's captured connection (A) and opens
 * the connection into the destination pod (B) as before, checks both pods,
 * then writes each socket's peer into splice_peers and puts both sockets
 * into splice_targets, then into splice_sources. splice_sources carries the
 * stream verdict below: every segment A receives is handed to B's send side
 * (and B's to A's) by the kernel (sockmap egress redirect, sent from a
 * kworker). Sockets only ever enter splice_sources after their peer is in
 * splice_targets, so a redirect never finds its target missing while the
 * pair is being set up.
 *
 * What the kernel does not carry is the end of a stream: a FIN is seen by
 * the data plane (a read of A returns 0), which waits until B has taken
 * every byte counted here for that direction, then shuts B's write side.
 * The counts are also the connection's byte counts.
 *
 * The redirect has no flow control: A's window reopens as soon as a segment
 * is handed on, whatever B can send. So a direction whose bytes pile up
 * (SPLICE_BACKLOG handed on and not acknowledged at the far end) is paused
 * for good: its segments stay in A, whose window then closes, and the data
 * plane, told through splice_paused, relays them itself once B has sent what
 * it was handed. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "splice.h"

/* The one field of the kernel's struct tcp_sock read here, found in the
 * running kernel's BTF at load time (CO-RE): its offset is not ABI. */
struct tcp_sock___splice {
	__u64 bytes_acked;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536); /* 32,768 spliced connections per node */
	__type(key, __u64);         /* socket cookie */
	__type(value, __u32);       /* a socket fd, from userspace */
} splice_sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} splice_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* costs nothing until used */
	__type(key, __u64); /* socket cookie */
	__type(value, struct splice_peer);
} splice_peers SEC(".maps");

/* The cookie of each socket whose direction the verdict pauses, for the data
 * plane, which waits on the socket for its end alone (not for data: it would
 * be woken for every segment handed on) and relays a paused direction itself. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} splice_paused SEC(".maps");

SEC("sk_skb/stream_verdict")
int splice_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct splice_peer *p = bpf_map_lookup_elem(&splice_peers, &cookie);
	struct bpf_sock *peer;
	struct tcp_sock___splice *tp;
	__u64 acked;

	/* No peer: the pair is being taken down; paused: this direction is
	 * user space's now. Either way the bytes stay in this socket (for a
	 * read, charged to its receive buffer: TCP's window closes on them). */
	if (!p || p->paused)
		return SK_PASS;
	/* A segment with no bytes is a bare FIN (TCP has taken it already: a
	 * read now returns 0). Handed on, the kworker would send nothing after
	 * the data plane has shut the peer's write side, and the failed send
	 * would set an error (EPIPE) on the peer. */
	if (skb->len == 0)
		return SK_DROP;
	/* Flow control: what was handed on and not yet acknowledged at the far
	 * end must stay under SPLICE_BACKLOG. */
	peer = bpf_map_lookup_elem(&splice_targets, &p->peer);
	if (!peer)
		return SK_PASS;
	tp = (struct tcp_sock___splice *)bpf_skc_to_tcp_sock(peer);
	acked = tp ? tp->bytes_acked : 0;
	bpf_sk_release(peer);
	if (!tp || p->bytes - (acked - p->acked_base) > SPLICE_BACKLOG) {
		p->paused = 1;
		/* If the ring is full the data plane finds the flag at its next
		 * look at the counts instead (at most a few seconds). */
		bpf_ringbuf_output(&splice_paused, &cookie, sizeof(cookie), 0);
		return SK_PASS;
	}
	__sync_fetch_and_add(&p->bytes, skb->len);
	/* Fails (SK_DROP) only if the peer has left splice_targets, i.e. it
	 * is closed; the data plane then finds the count never reached. */
	return bpf_sk_redirect_hash(skb, &splice_targets, &p->peer, 0);
}

char LICENSE[] SEC("license") = "GPL";
