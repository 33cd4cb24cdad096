//! Services: traffic to a ClusterIP goes through the mesh too.
//!
//! `connect4` (or `connect6`) sees the ClusterIP before kube-proxy (or Cilium's socket load
//! balancer on the root cgroup) translates it, so the data plane picks the
//! endpoint itself: the model's Services and EndpointSlices become a
//! [`Table`] (ClusterIP:port → the endpoints kube-proxy would use, their
//! target ports resolved per EndpointSlice, each marked meshed or not),
//! handed to every executor as an immutable snapshot. The endpoints are
//! kube-proxy's: the ready ones; if none is ready, those still serving while
//! they terminate (a rollout, a drain); with `internalTrafficPolicy: Local`,
//! only this node's, by the same rule (none: the connect fails, as kube-proxy
//! drops it); with `trafficDistribution` (or the `topology-mode: Auto`
//! annotation), only the ready endpoints whose zone hints name this node's
//! zone, when every ready endpoint has hints and one names it. [`choose`]
//! picks one:
//!
//! - `sessionAffinity: ClientIP`: the endpoint the client last used on that
//!   port, while it comes back within the timeout ([`Affinity`], kube-proxy's
//!   rule); a new client (or one whose time ran out) by rendezvous hashing
//!   of its address over the endpoints, so every data plane makes the same
//!   first choice;
//! - otherwise the power of two choices on this executor's open connections
//!   per endpoint: two at random, the less loaded wins.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

mod affinity;
pub use affinity::Affinity;

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when a Service does not
/// say (the API's default: 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// One endpoint of a service port: where to connect, and whether its pod is
/// in the mesh (tunnelled) or not (reached directly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Endpoint address and resolved target port.
    pub addr: SocketAddr,
    /// Its pod is meshed.
    pub meshed: bool,
}

/// What a ClusterIP:port leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name`, for logs and metrics.
    pub service: String,
    /// The ready endpoints.
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP`, with its timeout.
    pub client_ip_affinity: Option<Duration>,
}

/// Every service port, by ClusterIP:port. Immutable: the control thread
/// sends a new one when the model changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    by_vip: HashMap<SocketAddr, Arc<Frontend>>,
}

impl Table {
    /// A table of these frontends.
    pub fn new(entries: impl IntoIterator<Item = (SocketAddr, Frontend)>) -> Self {
        Self { by_vip: entries.into_iter().map(|(k, v)| (k, Arc::new(v))).collect() }
    }

    /// The service behind `vip`, if it is one.
    pub fn get(&self, vip: SocketAddr) -> Option<&Arc<Frontend>> {
        self.by_vip.get(&vip)
    }

    /// Every ClusterIP:port (what `connect4` must capture).
    pub fn vips(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.by_vip.keys().copied()
    }

    /// Sets what `vip` leads to.
    pub fn insert(&mut self, vip: SocketAddr, fe: Frontend) {
        self.by_vip.insert(vip, Arc::new(fe));
    }

    /// Forgets `vip` if `service` (`namespace/name`) holds it: two Services
    /// never share a ClusterIP:port, but a moment of a stale one beside its
    /// successor must not take the successor's entry.
    pub fn remove(&mut self, vip: SocketAddr, service: &str) {
        if self.by_vip.get(&vip).is_some_and(|fe| fe.service == service) {
            self.by_vip.remove(&vip);
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.by_vip.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_vip.is_empty()
    }
}

/// A service as the model holds it (from the API or a file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.clusterIPs`, of either family (a dual-stack Service has two).
    pub cluster_ips: Vec<IpAddr>,
    /// TCP ports.
    pub ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP`, with its timeout.
    pub client_ip_affinity: Option<Duration>,
    /// `internalTrafficPolicy: Local`: this node's endpoints only.
    pub node_local: bool,
    /// `trafficDistribution` set (or `service.kubernetes.io/topology-mode:
    /// Auto`): the endpoints' zone hints are followed.
    pub zone_hints: bool,
    /// Its EndpointSlices, reduced to what routing needs.
    pub slices: Vec<Slice>,
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Its name (`""` for a lone unnamed port): EndpointSlices name their
    /// ports after it.
    pub name: String,
    /// The port on the ClusterIP.
    pub port: u16,
}

/// An EndpointSlice: its ports (service port name → target port, resolved
/// for the pods in this slice) and endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// (port name, target port).
    pub ports: Vec<(String, u16)>,
    /// Its endpoints' addresses.
    pub endpoints: Vec<Endpoint>,
}

/// An endpoint address, as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The address.
    pub addr: IpAddr,
    /// Where it stands.
    pub state: Readiness,
    /// On this node (`nodeName`): for `internalTrafficPolicy: Local`.
    pub local: bool,
    /// Its zone hints (`hints.forZones`) against this node's zone.
    pub hint: Hint,
}

/// An endpoint's zone hints, against this node's zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hint {
    /// None (or this node's zone is not known).
    #[default]
    None,
    /// They name this node's zone.
    Here,
    /// They name other zones only.
    Elsewhere,
}

/// An endpoint's conditions, as kube-proxy reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `ready` (or unsaid: "nil means true"): used.
    Ready,
    /// Not ready, but `serving` while `terminating`: used when no endpoint
    /// is ready.
    Terminating,
    /// Neither: never used.
    Out,
}

impl Readiness {
    /// From an EndpointSlice's conditions (`None`: not given; `serving`
    /// unsaid is `ready`, `terminating` unsaid is false).
    pub fn of(ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Self {
        let ready = ready.unwrap_or(true);
        match (ready, serving.unwrap_or(ready), terminating.unwrap_or(false)) {
            (true, ..) => Self::Ready,
            (false, true, true) => Self::Terminating,
            _ => Self::Out,
        }
    }
}

/// The endpoints kube-proxy would use of `all` (with their target ports):
/// the ready ones (those hinted to this zone, if `zone_hints` and every
/// ready one has hints and one names this zone), else those serving while
/// they terminate.
fn usable(all: Vec<(Endpoint, u16)>, zone_hints: bool) -> Vec<(Endpoint, u16)> {
    let ready: Vec<_> = all.iter().filter(|(e, _)| e.state == Readiness::Ready).copied().collect();
    if !ready.is_empty() {
        let hinted = !ready.iter().any(|(e, _)| e.hint == Hint::None);
        if zone_hints && hinted && ready.iter().any(|(e, _)| e.hint == Hint::Here) {
            return ready.into_iter().filter(|(e, _)| e.hint == Hint::Here).collect();
        }
        return ready;
    }
    all.into_iter().filter(|(e, _)| e.state == Readiness::Terminating).collect()
}

/// The table for `services`, marking endpoints whose address is meshed.
pub fn table<'a>(services: impl IntoIterator<Item = &'a Service>, meshed: impl Fn(IpAddr) -> bool) -> Table {
    Table::new(services.into_iter().flat_map(|svc| frontends(svc, &meshed)))
}

/// One service's entries: a frontend for each ClusterIP and TCP port, with
/// the endpoints kube-proxy would use (see the module comment), marked
/// meshed when `meshed` holds their address.
pub fn frontends(svc: &Service, meshed: impl Fn(IpAddr) -> bool) -> Vec<(SocketAddr, Frontend)> {
    let mut entries = Vec::new();
    for sp in &svc.ports {
        let all: Vec<(Endpoint, u16)> = svc
            .slices
            .iter()
            .filter_map(|sl| sl.ports.iter().find(|(n, _)| *n == sp.name).map(|(_, p)| (sl, *p)))
            .flat_map(|(sl, target)| sl.endpoints.iter().map(move |e| (*e, target)))
            .filter(|(e, _)| e.local || !svc.node_local)
            .collect();
        let mut backends: Vec<Backend> = usable(all, svc.zone_hints)
            .into_iter()
            .map(|(e, target)| SocketAddr::new(e.addr, target))
            .map(|addr| Backend { addr, meshed: meshed(addr.ip()) })
            .collect();
        backends.sort();
        backends.dedup();
        for vip in &svc.cluster_ips {
            // Each ClusterIP leads to the endpoints of its own family, as
            // kube-proxy does.
            let fe = Frontend {
                service: format!("{}/{}", svc.namespace, svc.name),
                backends: backends.iter().filter(|b| b.addr.is_ipv6() == vip.is_ipv6()).copied().collect(),
                client_ip_affinity: svc.client_ip_affinity,
            };
            entries.push((SocketAddr::new(*vip, sp.port), fe));
        }
    }
    entries
}

/// Picks a backend for a client at `client`: see the module comment.
/// `load` is this executor's open connections to a backend; `random` two
/// random numbers. `None`: no ready endpoint.
pub fn choose(fe: &Frontend, client: IpAddr, load: impl Fn(SocketAddr) -> u32, random: (u64, u64)) -> Option<Backend> {
    let b = &fe.backends;
    match b.len() {
        0 => None,
        1 => Some(b[0]),
        n if fe.client_ip_affinity.is_some() => {
            b.iter().max_by_key(|be| rendezvous(client, be.addr)).copied().or(Some(b[n - 1]))
        }
        n => {
            let i = (random.0 % n as u64) as usize;
            let mut j = (random.1 % (n as u64 - 1)) as usize;
            if j >= i {
                j += 1;
            }
            let (x, y) = (b[i], b[j]);
            Some(if load(y.addr) < load(x.addr) { y } else { x })
        }
    }
}

/// The rendezvous weight of `backend` for `client`: stable across
/// processes (a fixed hash, not the per-process random one).
fn rendezvous(client: IpAddr, backend: SocketAddr) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    client.hash(&mut h);
    backend.hash(&mut h);
    // FNV alone mixes the last bytes poorly: finish with a 64-bit mixer.
    let mut x = h.finish();
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// FNV-1a, 64-bit.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests;
