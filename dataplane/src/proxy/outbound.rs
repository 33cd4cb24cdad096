//! The outbound side (`127.0.0.1:18000`, and `[::1]:18000` for IPv6, in every
//! enrolled namespace).
//!
//! A captured connection arrives; we ask the kernel where it was going
//! (`SO_ORIGINAL_DST`, answered by our `cgroup/getsockopt` program), connect at
//! once to `<original ip>:18001` from a socket made in the client's own
//! namespace (never waiting for client bytes, so servers that speak first
//! work), run the TLS 1.3 client handshake presenting the certificate of that
//! socket's source address and requiring the server's to be valid for the
//! original IP, send the preamble, and relay.
//!
//! A connection to a Service's ClusterIP gets an endpoint picked here
//! ([`crate::cluster::services`]): a meshed one is tunnelled to (the preamble names
//! the endpoint and its target port), one outside the mesh is connected to
//! directly from the client's namespace (counted as passthrough), and a
//! Service with no ready endpoint is refused at once.
//!
//! A connection whose original destination is unknown, or that cannot be
//! tunnelled, is refused with a reset, never sent anywhere else. Every
//! connection is counted and timed on this executor.
use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    rc::Rc,
    sync::Arc,
    time::Instant,
};

use dataplane_common::{preamble, INBOUND_PORT};
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use rustls::HandshakeKind;
use rustls_pki_types::ServerName;

use crate::{
    cluster::services::{Backend, Frontend},
    node::netns::Netns,
    node::socket,
    node::sys,
    proxy::addrs::{ClientAddr, OrigDstAddr},
    proxy::conn::{EndpointLoad, ExecutorCtx, Record},
    proxy::reason::Reason,
    proxy::relay,
    proxy::route::{route, Known, Refused, Route, Routed},
    proxy::splice::Start,
    proxy::stats::{Blame, Count},
};

type Tls = futures_rustls::client::TlsStream<TcpStream>;

/// Serves one captured connection, start to finish, on this executor
/// (`rec` was opened when it was accepted): its original destination read,
/// its [`route`] decided, then carried out.
pub async fn serve(executor: Rc<ExecutorCtx>, netns: Arc<Netns>, mut downstream: TcpStream, mut rec: Record) {
    let peer = downstream.peer_addr().ok();
    if let Some(client) = peer {
        rec.client(ClientAddr(client));
    }
    let orig = match original_destination(&executor, &netns, &downstream) {
        Ok(orig) => orig,
        Err(refused) => return rec.reset(&downstream, refused),
    };
    rec.dst(orig.0);
    let Routed { route, service } = route(&Here { executor: &executor, netns: &netns }, orig, peer);
    // The load guard counts this connection against the endpoint until it
    // ends.
    let _load = service.map(|via| {
        executor.count_service(&via.name, via.how);
        if let Some(endpoint) = via.endpoint {
            rec.service(&via.name, endpoint);
        }
        via.load
    });
    match route {
        Route::Refuse(refused) => rec.reset(&downstream, refused),
        Route::Passthrough { to } => passthrough(&executor, &netns, downstream, rec, to).await,
        Route::SameNode { to, from, pod } => same_node(&executor, &pod, downstream, rec, to, from).await,
        Route::Tunnel { to } => {
            // Freed once rustls has taken a copy, not held for the connection.
            let early = relay::ready_bytes(&downstream);
            let early_len = early.len() as u64;
            let mut tls = match open_tunnel(&executor, &mut rec, &netns, to, early).await {
                Ok(tls) => tls,
                Err(refused) => return rec.reset(&downstream, refused),
            };
            rec.tunnel_ready();
            let result = relay::relay(&mut downstream, &mut tls, executor.limits.idle).await;
            rec.relayed(early_len, result, &downstream, tls.get_ref().0);
        }
    }
}

/// Where the client was going: `SO_ORIGINAL_DST`, answered by our
/// `cgroup/getsockopt` program, or the pinned map when no program answered.
fn original_destination(executor: &ExecutorCtx, netns: &Netns, downstream: &TcpStream) -> Result<OrigDstAddr, Refused> {
    // With conntrack active in the namespace (any nftables or iptables rule
    // using it, our own return path among them), the kernel answers
    // SO_ORIGINAL_DST for a connection that was never redirected with the
    // address it was made to: this very listener. That is no destination.
    let own = downstream.local_addr().ok();
    let ipv6 = own.is_some_and(|a| a.is_ipv6());
    socket::original_dst(downstream, ipv6)
        .and_then(|o| if Some(o) == own { Err(std::io::Error::from_raw_os_error(libc::ENOENT)) } else { Ok(o) })
        .or_else(|e| from_pinned_map(executor, netns, downstream).ok_or(e))
        .map(OrigDstAddr)
        .map_err(|e| {
            let why = format!("no original destination (not captured by us): {e}");
            Refused::new(Blame::Downstream, Reason::NoOriginalDestination, why)
        })
}

/// What this executor knows, for a connection from the pod in `netns`.
struct Here<'a> {
    executor: &'a ExecutorCtx,
    netns: &'a Netns,
}

impl<'a> Known for Here<'a> {
    type Load = EndpointLoad<'a>;
    type Pod = Arc<Netns>;

    fn service(&self, vip: SocketAddr) -> Option<Arc<Frontend>> {
        self.executor.service(vip)
    }

    fn client_pod_address(&self, like: IpAddr) -> Option<IpAddr> {
        self.executor.pod_address(self.netns.id(), like)
    }

    fn choose_endpoint(&self, vip: SocketAddr, fe: &Frontend, client: IpAddr) -> Option<(Backend, EndpointLoad<'a>)> {
        self.executor.choose_endpoint(vip, fe, client)
    }

    fn same_node(&self, dst: IpAddr) -> Option<(IpAddr, Arc<Netns>)> {
        self.executor.same_node_fast_path.then(|| self.executor.same_node(self.netns, dst)).flatten()
    }
}

/// A Service endpoint outside the mesh: connected to directly from the
/// client's namespace and relayed in plaintext, as it would have been
/// without the mesh (its pod has no tunnel end).
async fn passthrough(executor: &ExecutorCtx, netns: &Netns, mut downstream: TcpStream, rec: Record, to: OrigDstAddr) {
    let mut upstream = match netns.run(|| socket::upstream(to.0, executor.bypass_mark)) {
        Ok(Ok(fd)) => sys::glommio_stream(fd),
        Ok(Err(e)) | Err(e) => {
            return rec
                .reset(&downstream, Refused::new(Blame::Ours, Reason::Socket, format!("connecting to {}: {e}", to.0)))
        }
    };
    let result = relay::relay(&mut downstream, &mut upstream, executor.limits.idle).await;
    rec.relayed(0, result, &downstream, &upstream);
}

/// Both pods are served here (`--same-node-fast-path`): no tunnel. The
/// application's bytes go from the client pod's loopback into a socket made
/// in the destination pod, the one the inbound side would have delivered the
/// tunnel on (from the client's own address where the pod's return path is
/// in place), so they never leave the two pods and this node, and no TLS is
/// needed to keep them there. The kernel carries them socket to socket
/// ([`crate::proxy::splice`]); where it cannot, this process relays them.
async fn same_node(
    executor: &ExecutorCtx,
    dst_ns: &Netns,
    mut downstream: TcpStream,
    rec: Record,
    to: OrigDstAddr,
    client: SocketAddr,
) {
    executor.with_stats(|s| s.counts[Count::SameNode] += 1);
    // No tunnel, so no inbound side: the destination's policies are
    // decided here, with the identity the client pod would have proved.
    let principal = executor.local_principal(client.ip());
    let conn = crate::cluster::policy::Conn { principal: &principal, source: client.ip(), dst: to.0 };
    if let Err(denied) = executor.authorize(&conn) {
        return rec.reset(&downstream, Refused::new(Blame::Downstream, Reason::PolicyDenied, denied.to_string()));
    }
    // Decided again if the policies change while it is open (relayed
    // here; one the kernel splices keeps going until it ends).
    let (_admitted, revoked) = executor.admitted(&conn);
    let mut app = match executor.connect_app(dst_ns, to.0, client) {
        Ok(fd) => sys::glommio_stream(fd),
        Err(e) => {
            let why = format!("connecting to {} in its pod: {e}", to.0);
            return rec.reset(&downstream, Refused::new(Blame::Ours, Reason::Socket, why));
        }
    };
    tracing::debug!(%client, dst = %to.0, netns = %dst_ns.name(), "same-node fast path");
    let idle = executor.limits.idle;
    match crate::proxy::splice::start(executor, &downstream, &mut app, idle).await {
        Start::Spliced(spliced) => {
            let result = spliced.relay(&mut downstream, &mut app, idle).await;
            rec.relayed(0, result, &downstream, &app);
        }
        Start::UserSpace { early } => {
            let result = relay::relay_until(&mut downstream, &mut app, idle, revoked).await;
            rec.relayed(early, result, &downstream, &app);
        }
        Start::Failed(e) => rec.relayed(0, Err(e), &downstream, &app),
    }
}

/// The original destination from the pinned map, for a socket whose
/// `SO_ORIGINAL_DST` found no program (see [`crate::node::ebpf::OrigLookup`]).
fn from_pinned_map(executor: &ExecutorCtx, netns: &Netns, downstream: &TcpStream) -> Option<SocketAddr> {
    let orig = executor.orig.as_ref()?;
    let client = downstream.peer_addr().ok()?;
    let found = orig.get(netns.cookie().ok()?, client);
    if found.is_some() {
        tracing::debug!(%client, netns = %netns.name(), "original destination read from the pinned map");
    }
    found
}

/// Connects to `<orig ip>:18001` from `netns`, runs the mutual-TLS handshake
/// and sends the preamble, then `early` (the client's first bytes), all
/// within the handshake timeout.
async fn open_tunnel(
    executor: &ExecutorCtx,
    rec: &mut Record,
    netns: &Netns,
    orig: OrigDstAddr,
    early: Vec<u8>,
) -> Result<Tls, Refused> {
    let tunnel = SocketAddr::new(orig.ip(), INBOUND_PORT);
    let fd = match netns.run(|| socket::upstream(tunnel, executor.bypass_mark)) {
        Ok(Ok(fd)) => fd,
        Ok(Err(e)) | Err(e) => {
            return Err(Refused::new(Blame::Ours, Reason::Socket, format!("connecting to {tunnel}: {e}")))
        }
    };
    // The source address is chosen at connect(): it names our identity.
    let src = socket2::SockRef::from(&fd)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.ip())
        .ok_or_else(|| Refused::new(Blame::Ours, Reason::Socket, "upstream socket has no local address"))?;
    let config =
        executor.client_config(src).map_err(|e| Refused::new(Blame::Ours, Reason::NoCertificate, e.to_string()))?;
    // The preamble and the client's first bytes are handed to rustls before
    // the handshake: it holds them until the handshake is done (the server
    // verified) and sends them with the client's last flight, one segment
    // instead of three.
    let mut preamble = Vec::with_capacity(preamble::MAX_LEN);
    preamble::encode(&preamble::Preamble { dst: orig.0 }, &mut preamble);
    let mut queued = Ok(());
    let handshake_started = Instant::now();
    let connect = TlsConnector::from(config).connect_with(
        ServerName::IpAddress(orig.ip().into()),
        sys::glommio_stream(fd),
        |conn| {
            let mut w = conn.writer();
            queued = w.write_all(&preamble).and_then(|()| w.write_all(&early));
        },
    );
    drop(early); // rustls has its own copy
    if let Err(e) = queued {
        return Err(Refused::new(Blame::Ours, Reason::Socket, format!("queueing the preamble for {tunnel}: {e}")));
    }
    let tls = match relay::within(executor.limits.handshake, connect).await {
        Some(Ok(tls)) => tls,
        Some(Err(e)) => {
            return Err(Refused::new(
                Blame::Upstream,
                Reason::of(&e),
                format!("TLS handshake with {tunnel} (from {src}): {e}"),
            ))
        }
        None => {
            return Err(Refused::new(
                Blame::Upstream,
                Reason::HandshakeTimeout,
                format!("TLS handshake with {tunnel} timed out"),
            ))
        }
    };
    rec.handshake(handshake_started.elapsed(), tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed));
    let id = crate::identity::peer_identity(tls.get_ref().1.peer_certificates())
        .map_err(|e| Refused::new(Blame::Upstream, Reason::BadIdentity, format!("{tunnel}: {e}")))?;
    // The server must be the pod the API shows at the destination (or the
    // chosen endpoint). Its node could mint it any name in its address
    // range; the preamble and the first bytes already went to that node,
    // which hosts the destination's address and so sees its traffic anyway.
    let waited = relay::within(executor.limits.handshake, executor.check_workload(orig.ip(), &id)).await;
    match waited.unwrap_or(Err(crate::identity::PeerError::UnknownWorkload(orig.ip()))) {
        Ok(()) => rec.peer(id),
        Err(e @ crate::identity::PeerError::UnknownWorkload(_)) => {
            return Err(Refused::new(Blame::Upstream, Reason::UnknownWorkload, format!("{tunnel}: {e}")))
        }
        Err(e) => return Err(Refused::new(Blame::Upstream, Reason::IdentityMismatch, format!("{tunnel}: {e}"))),
    }
    Ok(tls)
}
