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
//! - `sessionAffinity: ClientIP`: rendezvous hashing of the client address
//!   over the ready endpoints, so every executor (and every data plane)
//!   makes the same choice, and a client moves only when its endpoint goes;
//! - otherwise the power of two choices on this executor's open connections
//!   per endpoint: two at random, the less loaded wins.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

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
    /// `sessionAffinity: ClientIP`.
    pub client_ip_affinity: bool,
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
    /// `sessionAffinity: ClientIP`.
    pub client_ip_affinity: bool,
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
        n if fe.client_ip_affinity => b.iter().max_by_key(|be| rendezvous(client, be.addr)).copied().or(Some(b[n - 1])),
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
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn web() -> Service {
        Service {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ips: vec![ip("10.96.0.10")],
            ports: vec![
                ServicePort { name: "http".into(), port: 80 },
                ServicePort { name: "admin".into(), port: 9000 },
            ],
            client_ip_affinity: false,
            node_local: false,
            zone_hints: false,
            slices: vec![
                // Two slices resolve the named port differently (two
                // versions of a Deployment with different container ports).
                Slice {
                    ports: vec![("http".into(), 8080), ("admin".into(), 9090)],
                    endpoints: vec![ep("10.1.0.5", Readiness::Ready, true), ep("10.1.0.6", Readiness::Out, true)],
                },
                Slice { ports: vec![("http".into(), 8081)], endpoints: vec![ep("10.2.0.7", Readiness::Ready, false)] },
            ],
        }
    }

    fn ep(addr: &str, state: Readiness, local: bool) -> Endpoint {
        Endpoint { addr: ip(addr), state, local, hint: Hint::None }
    }

    fn addrs(t: &Table, vip: &str) -> Vec<String> {
        let fe = t.get(vip.parse().expect("vip"));
        fe.map(|fe| fe.backends.iter().map(|b| b.addr.to_string()).collect()).unwrap_or_default()
    }

    #[test]
    fn conditions_read_as_kube_proxy_reads_them() {
        use Readiness::*;
        let cases = [
            ((None, None, None), Ready),
            ((Some(true), None, None), Ready),
            ((Some(false), None, None), Out),
            ((Some(false), Some(true), Some(true)), Terminating),
            ((Some(false), Some(true), None), Out),
            ((Some(false), Some(false), Some(true)), Out),
        ];
        for ((r, s, t), want) in cases {
            assert_eq!(Readiness::of(r, s, t), want, "ready {r:?} serving {s:?} terminating {t:?}");
        }
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let mut svc = web();
        svc.slices[1].endpoints = vec![ep("10.2.0.7", Readiness::Terminating, false)];
        assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), ["10.1.0.5:8080"], "one is ready");
        svc.slices[0].endpoints =
            vec![ep("10.1.0.5", Readiness::Terminating, true), ep("10.1.0.6", Readiness::Out, true)];
        let t = table(&[svc], |_| true);
        assert_eq!(addrs(&t, "10.96.0.10:80"), ["10.1.0.5:8080", "10.2.0.7:8081"], "a rollout's last ones still serve");
    }

    #[test]
    fn zone_hints_keep_to_this_zone_only_when_every_ready_endpoint_has_them() {
        let mut svc = web();
        svc.zone_hints = true;
        svc.slices[0].endpoints[0].hint = Hint::Here;
        svc.slices[1].endpoints[0].hint = Hint::Elsewhere;
        let all = ["10.1.0.5:8080", "10.2.0.7:8081"];
        assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), ["10.1.0.5:8080"], "this zone's");
        // A ready endpoint without hints (the controller is still at it):
        // all of them.
        svc.slices[1].endpoints[0].hint = Hint::None;
        assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), all);
        // None hinted here: all of them.
        svc.slices[0].endpoints[0].hint = Hint::Elsewhere;
        svc.slices[1].endpoints[0].hint = Hint::Elsewhere;
        assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), all);
        // Hints, but the Service did not ask for them: all of them.
        svc.slices[0].endpoints[0].hint = Hint::Here;
        svc.zone_hints = false;
        assert_eq!(addrs(&table(&[svc], |_| true), "10.96.0.10:80"), all);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_to_this_node() {
        let mut svc = web();
        svc.node_local = true;
        assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), ["10.1.0.5:8080"]);
        // This node's only endpoint terminates: it still serves, alone.
        svc.slices[0].endpoints[0].state = Readiness::Terminating;
        assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), ["10.1.0.5:8080"]);
        // None here at all: nothing, though another node has a ready one.
        svc.slices[0].endpoints.clear();
        assert!(addrs(&table(&[svc], |_| true), "10.96.0.10:80").is_empty());
    }

    #[test]
    fn ready_endpoints_with_their_target_ports_per_slice() {
        let t = table(&[web()], |a| a != ip("10.2.0.7"));
        let http = t.get("10.96.0.10:80".parse().expect("vip")).expect("http");
        assert_eq!(http.service, "shop/web");
        assert_eq!(
            http.backends,
            [
                Backend { addr: "10.1.0.5:8080".parse().expect("a"), meshed: true },
                Backend { addr: "10.2.0.7:8081".parse().expect("a"), meshed: false },
            ],
            "not-ready 10.1.0.6 left out"
        );
        let admin = t.get("10.96.0.10:9000".parse().expect("vip")).expect("admin");
        assert_eq!(admin.backends.len(), 1, "the second slice has no admin port");
        assert!(t.get("10.96.0.10:81".parse().expect("vip")).is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn each_cluster_ip_of_a_dual_stack_service_leads_to_its_own_family() {
        let mut svc = web();
        svc.cluster_ips.push(ip("fd00:96::10"));
        // One slice per family, as the EndpointSlice controller makes them.
        svc.slices = vec![
            Slice { ports: vec![("http".into(), 8080)], endpoints: vec![ep("10.1.0.5", Readiness::Ready, true)] },
            Slice { ports: vec![("http".into(), 8080)], endpoints: vec![ep("fd00:1::5", Readiness::Ready, true)] },
        ];
        let t = table(&[svc], |_| true);
        let v4 = t.get("10.96.0.10:80".parse().expect("vip")).expect("IPv4 ClusterIP");
        assert_eq!(v4.backends, [Backend { addr: "10.1.0.5:8080".parse().expect("a"), meshed: true }]);
        let v6 = t.get("[fd00:96::10]:80".parse().expect("vip")).expect("IPv6 ClusterIP");
        assert_eq!(v6.backends, [Backend { addr: "[fd00:1::5]:8080".parse().expect("a"), meshed: true }]);
    }

    #[test]
    fn two_choices_prefer_the_less_loaded_and_spread_evenly_when_idle() {
        let fe = Frontend {
            service: "s".into(),
            backends: (1..=4)
                .map(|i| Backend { addr: SocketAddr::new(ip(&format!("10.0.0.{i}")), 80), meshed: true })
                .collect(),
            client_ip_affinity: false,
        };
        let busy: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let mut seen = HashMap::new();
        let mut x: u64 = 7;
        for _ in 0..4000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (x >> 11, x.rotate_left(29) >> 7);
            let b = choose(&fe, ip("10.9.9.9"), |a| if a == busy { 100 } else { 0 }, r).expect("a backend");
            *seen.entry(b.addr).or_insert(0u32) += 1;
        }
        assert_eq!(seen.get(&busy), None, "the loaded one never wins a duel");
        for (a, n) in &seen {
            assert!((1100..1600).contains(n), "{a}: {n} of 4000 over three idle backends");
        }
        let empty = Frontend { backends: vec![], ..fe };
        assert_eq!(choose(&empty, ip("10.9.9.9"), |_| 0, (1, 2)), None);
    }

    #[test]
    fn client_ip_affinity_is_the_same_everywhere_and_moves_only_the_clients_of_a_gone_endpoint() {
        let backends: Vec<Backend> =
            (1..=5).map(|i| Backend { addr: SocketAddr::new(ip(&format!("10.0.0.{i}")), 80), meshed: true }).collect();
        let fe = Frontend { service: "s".into(), backends: backends.clone(), client_ip_affinity: true };
        let clients: Vec<IpAddr> =
            (0..200).map(|i| IpAddr::V4(std::net::Ipv4Addr::new(10, 8, (i / 250) as u8, (i % 250) as u8))).collect();
        let before: Vec<Backend> = clients.iter().map(|c| choose(&fe, *c, |_| 0, (1, 2)).expect("b")).collect();
        // Load and randomness change nothing.
        for (c, b) in clients.iter().zip(&before) {
            assert_eq!(choose(&fe, *c, |a| a.port().into(), (99, 3)), Some(*b));
        }
        let spread: std::collections::HashSet<_> = before.iter().collect();
        assert_eq!(spread.len(), 5, "clients spread over every endpoint");
        // 10.0.0.3 goes: only its clients move.
        let gone = backends[2];
        let fewer = Frontend { backends: backends.iter().copied().filter(|b| *b != gone).collect(), ..fe };
        for (c, b) in clients.iter().zip(&before) {
            let now = choose(&fewer, *c, |_| 0, (1, 2)).expect("b");
            if *b != gone {
                assert_eq!(now, *b, "{c} kept its endpoint");
            }
        }
    }
}
