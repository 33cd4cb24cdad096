/* Layouts shared between splice.bpf.c and userspace (common/src/maps.rs,
 * SplicePeer); a test compares both against the BTF of the compiled object. */
#ifndef KMESH_SPLICE_H
#define KMESH_SPLICE_H

#include <linux/types.h>

/* The most the kernel holds for a peer, handed on but not yet acknowledged
 * by the peer's own peer (in the redirect queue and the peer's send buffer),
 * before the direction is given back to user space: the redirect has no
 * flow control of its own. */
#define SPLICE_BACKLOG (4u << 20)

/* One socket of a spliced pair (splice_peers value; key: its cookie). */
struct splice_peer {
	__u64 peer;       /* the other socket's cookie */
	__u64 bytes;      /* bytes this socket received and handed to the peer */
	__u64 acked_base; /* the peer's tcpi_bytes_acked when the pair was made */
	__u32 paused;     /* set once: bytes stay in this socket for user space */
	__u32 _pad;
};
_Static_assert(sizeof(struct splice_peer) == 32, "splice_peer layout");

#endif
