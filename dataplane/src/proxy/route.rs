//! Where a captured connection goes, decided from what the executor knows
//! before any socket is made: through the tunnel, straight to a Service
//! endpoint outside the mesh, to a pod on this node without a tunnel, or
//! nowhere (refused, with a reason). [`route`] is pure over [`Known`], so
//! every decision is unit-tested without sockets or root; the outbound side
//! ([`crate::proxy::outbound`]) carries the decision out.
use std::{fmt, net::IpAddr, net::SocketAddr, sync::Arc};

use dataplane_common::{INBOUND_PORT, OUTBOUND_PORT};

use crate::{
    cluster::services::{Backend, Frontend},
    proxy::{
        addrs::OrigDstAddr,
        reason::Reason,
        stats::{Blame, ServiceRoute},
    },
};

/// What the executor knows that a route depends on, for one connection from
/// one pod.
pub trait Known {
    /// Counts a connection to a Service endpoint while it is held.
    type Load;
    /// The destination pod's namespace, for the same-node path.
    type Pod;
    /// The Service whose ClusterIP:port `vip` is.
    fn service(&self, vip: SocketAddr) -> Option<Arc<Frontend>>;
    /// The client pod's own address of `like`'s family.
    fn client_pod_address(&self, like: IpAddr) -> Option<IpAddr>;
    /// An endpoint of `fe` (reached at `vip`) for a client at `client`,
    /// counted while the load is held.
    fn choose_endpoint(&self, vip: SocketAddr, fe: &Frontend, client: IpAddr) -> Option<(Backend, Self::Load)>;
    /// With the same-node fast path on, for a pod at `dst` served here: the
    /// client pod's address (of `dst`'s family) and the destination's pod.
    fn same_node(&self, dst: IpAddr) -> Option<(IpAddr, Self::Pod)>;
}

/// A connection refused before it went anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Whose fault it is.
    pub blame: Blame,
    /// The counted reason.
    pub reason: Reason,
    /// What happened, for the log line.
    pub why: String,
}

impl Refused {
    /// A refused blamed on `blame` for `reason`.
    pub fn new(blame: Blame, reason: Reason, why: impl Into<String>) -> Self {
        Self { blame, reason, why: why.into() }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

/// Where the connection goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<P> {
    /// Through the mutual-TLS tunnel to the data plane at `to`'s address.
    Tunnel {
        /// The destination pod (or the Service endpoint picked).
        to: OrigDstAddr,
    },
    /// A Service endpoint outside the mesh: connected to directly from the
    /// client's namespace, as without the mesh.
    Passthrough {
        /// The endpoint.
        to: OrigDstAddr,
    },
    /// Both pods are served here: no tunnel.
    SameNode {
        /// The destination pod.
        to: OrigDstAddr,
        /// The client pod's address and the client's own port.
        from: SocketAddr,
        /// The destination's namespace.
        pod: P,
    },
    /// Nowhere.
    Refuse(Refused),
}

/// A connection made to a Service's ClusterIP.
#[derive(Debug)]
pub struct ViaService<L> {
    /// `namespace/name`.
    pub name: String,
    /// The endpoint picked, if there was one.
    pub endpoint: Option<SocketAddr>,
    /// How it went, for the Service's counter.
    pub how: ServiceRoute,
    /// Counts the connection against the endpoint until dropped.
    pub load: Option<L>,
}

/// A route, and the Service it went through.
#[derive(Debug)]
pub struct Routed<L, P> {
    /// Where the connection goes.
    pub route: Route<P>,
    /// Set when the original destination was a ClusterIP.
    pub service: Option<ViaService<L>>,
}

/// Decides where a connection from `client` (its socket's peer at our
/// listener) to `orig` goes.
///
/// A ClusterIP gets an endpoint picked (with affinity by the client pod's
/// address, since the socket's own is loopback); a meshed endpoint is then
/// routed as a pod would be, one outside the mesh is passed through, and a
/// Service with no endpoint is refused. A meshed destination served here
/// takes the same-node path (never one of the data plane's own ports);
/// everything else is tunnelled.
pub fn route<K: Known>(known: &K, orig: OrigDstAddr, client: Option<SocketAddr>) -> Routed<K::Load, K::Pod> {
    let mut to = orig;
    let mut service = None;
    if let Some(fe) = known.service(orig.0) {
        let client_ip = known
            .client_pod_address(orig.ip())
            .or(client.map(|c| c.ip()))
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let Some((endpoint, load)) = known.choose_endpoint(orig.0, &fe, client_ip) else {
            let why = format!("service {} ({}) has no ready endpoint", fe.service, orig.0);
            let service =
                ViaService { name: fe.service.clone(), endpoint: None, how: ServiceRoute::NoEndpoint, load: None };
            return Routed {
                route: Route::Refuse(Refused::new(Blame::Upstream, Reason::NoEndpoints, why)),
                service: Some(service),
            };
        };
        to = OrigDstAddr(endpoint.addr);
        let how = if endpoint.meshed { ServiceRoute::Tunnelled } else { ServiceRoute::Passthrough };
        service = Some(ViaService { name: fe.service.clone(), endpoint: Some(endpoint.addr), how, load: Some(load) });
        if !endpoint.meshed {
            return Routed { route: Route::Passthrough { to }, service };
        }
    }
    let route = match known.same_node(to.ip()) {
        Some(_) if to.port() == INBOUND_PORT || to.port() == OUTBOUND_PORT => Route::Refuse(Refused::new(
            Blame::Downstream,
            Reason::NotThisPod,
            format!("{} is the data plane's own port", to.0),
        )),
        Some((src, pod)) => Route::SameNode { to, from: SocketAddr::new(src, client.map_or(0, |c| c.port())), pod },
        None => Route::Tunnel { to },
    };
    Routed { route, service }
}

#[cfg(test)]
mod tests;
