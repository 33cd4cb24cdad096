//! The connection layer: what the outbound and inbound sides share, below
//! the executors and above the relay and the sockets.
//!
//! Imports go one way: `executor` → `outbound`/`inbound` (→ `splice`, the
//! same-node fast path in the kernel) → `conn` → `relay`, `socket`, `stats`,
//! `reason`, `identity`, `netns`, `ebpf`, `sys`. This module holds
//!
//! - [`ExecutorCtx`]: one executor's own state, shared by its tasks (never
//!   across threads), and the [`Limits`];
//! - [`Record`]: a connection's outcome, recorded exactly once, its log line
//!   limited by [`Quiet`] so a flood cannot flood the log;
//! - [`Admission`]: the bound on unauthenticated connections at 18001.
mod admission;
mod quiet;
mod record;

use std::{
    cell::RefCell,
    net::IpAddr,
    rc::Rc,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

pub use admission::{Admission, Ticket, MAX_IN_FLIGHT, MAX_IN_FLIGHT_PER_SOURCE};
pub use quiet::Quiet;
pub use record::Record;

use crate::{
    identity::Identity,
    node::ebpf::OrigLookup,
    node::netns::{Netns, NetnsId},
    proxy::stats::{Count, Snapshot},
};

/// Handshake and idle limits, and the bound on unauthenticated connections
/// from one address.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// For the TLS handshake and the preamble, together.
    pub handshake: Duration,
    /// For a connection on which no byte moves either way ([`NO_IDLE_TIMEOUT`]:
    /// none, the default; TCP keepalive finds dead peers instead).
    pub idle: Duration,
    /// Handshakes in flight from one source address, per executor (see
    /// [`Admission`]).
    pub handshakes_per_source: u64,
}

/// No idle timeout (`--idle-timeout off`): far enough never to come, near
/// enough that a deadline built from it cannot overflow.
pub const NO_IDLE_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Connections open on one executor: raised and lowered by [`Record`] on its
/// executor, read by the control thread without asking the executor (for
/// drain and memory trimming). One writer, so `Relaxed` is enough.
#[derive(Debug, Default)]
pub struct Open(AtomicU64);

impl Open {
    fn up(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn down(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// How many are open now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One executor's own state, shared by its tasks (never across threads).
#[derive(Debug)]
pub struct ExecutorCtx {
    /// The CPU it is pinned to.
    pub cpu: usize,
    /// SO_MARK of our own sockets.
    pub bypass_mark: u32,
    /// Limits.
    pub limits: Limits,
    /// The certificates, as the control thread last sent them.
    identity: RefCell<Arc<Identity>>,
    stats: RefCell<Snapshot>,
    open: Arc<Open>,
    /// Unauthenticated connections at 18001.
    pub admission: Rc<Admission>,
    quiet: Quiet,
    /// The pinned original-destination map, for what `SO_ORIGINAL_DST`
    /// cannot answer (sockets of a previous instance's cgroup).
    pub orig: Option<OrigLookup>,
    /// The Services, as the control thread last sent them.
    services: RefCell<Arc<crate::cluster::services::Table>>,
    /// With workload identities (`--node-ca`): the trust domain, and the
    /// identity (SPIFFE path) of every meshed pod by address, as the
    /// control thread last sent them. Without: none is checked.
    pub trust_domain: Option<Arc<str>>,
    workloads: RefCell<std::collections::HashMap<IpAddr, Arc<str>>>,
    /// The authorization policies of this node's pods, as the control
    /// thread last sent them.
    policies: RefCell<Arc<crate::cluster::policy::Table>>,
    /// The open connections a policy let in, decided again when the
    /// policies change (see [`ExecutorCtx::admitted`]).
    admitted: RefCell<std::collections::HashMap<u64, Admitted>>,
    next_admitted: std::cell::Cell<u64>,
    /// Open connections per Service endpoint on this executor (for the two
    /// choices), and the state of the random numbers they draw.
    endpoint_load: RefCell<std::collections::HashMap<std::net::SocketAddr, u32>>,
    random: std::cell::Cell<u64>,
    /// `sessionAffinity: ClientIP`: the endpoint each client last used,
    /// shared by every executor of the node.
    pub affinity: Arc<crate::cluster::services::Affinity>,
    /// Whether connections between two pods served here skip the tunnel.
    pub same_node_fast_path: bool,
    /// The pods this executor serves, by address (with the fast path on).
    local: RefCell<std::collections::HashMap<IpAddr, Arc<Netns>>>,
    /// The addresses of every pod this executor serves.
    pods: RefCell<std::collections::HashMap<NetnsId, Vec<IpAddr>>>,
    /// The splice maps, when the fast path runs in the kernel.
    pub splicer: Option<RefCell<crate::node::ebpf::Splicer>>,
    /// Spliced directions waiting to hear that the kernel paused them, by
    /// their source socket's cookie (see [`crate::proxy::splice`]).
    pub splice_notices: RefCell<std::collections::HashMap<u64, Rc<glommio::channels::local_channel::LocalSender<()>>>>,
}

/// An open connection a policy let in.
#[derive(Debug)]
struct Admitted {
    principal: String,
    source: IpAddr,
    dst: std::net::SocketAddr,
    stop: glommio::channels::local_channel::LocalSender<String>,
}

/// Keeps a connection in [`ExecutorCtx::admitted`] while it lives.
#[derive(Debug)]
pub struct AdmittedGuard<'a> {
    executor: &'a ExecutorCtx,
    id: u64,
}

impl Drop for AdmittedGuard<'_> {
    fn drop(&mut self) {
        self.executor.admitted.borrow_mut().remove(&self.id);
    }
}

/// One open connection to a Service endpoint, counted in the executor's
/// load until dropped.
#[derive(Debug)]
pub struct EndpointLoad<'a> {
    executor: &'a ExecutorCtx,
    addr: std::net::SocketAddr,
}

impl Drop for EndpointLoad<'_> {
    fn drop(&mut self) {
        let mut load = self.executor.endpoint_load.borrow_mut();
        if let Some(n) = load.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                load.remove(&self.addr);
            }
        }
    }
}

impl ExecutorCtx {
    /// The state of a new executor.
    pub fn new(
        cpu: usize,
        bypass_mark: u32,
        limits: Limits,
        identity: Arc<Identity>,
        open: Arc<Open>,
        orig: Option<OrigLookup>,
    ) -> Self {
        Self {
            cpu,
            bypass_mark,
            limits,
            identity: RefCell::new(identity),
            stats: RefCell::new(Snapshot::default()),
            open,
            admission: Rc::new(Admission::with_bounds(MAX_IN_FLIGHT, limits.handshakes_per_source)),
            quiet: Quiet::default(),
            orig,
            services: RefCell::new(Arc::default()),
            trust_domain: None,
            workloads: RefCell::new(std::collections::HashMap::new()),
            policies: RefCell::new(Arc::default()),
            admitted: RefCell::new(std::collections::HashMap::new()),
            next_admitted: std::cell::Cell::new(0),
            endpoint_load: RefCell::new(std::collections::HashMap::new()),
            random: std::cell::Cell::new(0x9e37_79b9_7f4a_7c15 ^ (cpu as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)),
            affinity: Arc::default(),
            same_node_fast_path: false,
            local: RefCell::new(std::collections::HashMap::new()),
            pods: RefCell::new(std::collections::HashMap::new()),
            splicer: None,
            splice_notices: RefCell::new(std::collections::HashMap::new()),
        }
    }

    /// Counts a connection to `service` that went `route`.
    pub fn count_service(&self, service: &str, route: crate::proxy::stats::ServiceRoute) {
        self.with_stats(|s| *s.services.entry((service.to_string(), route)).or_default() += 1);
    }

    /// Changed workload identities from the control thread (`None`: no
    /// meshed pod at that address any more).
    pub fn set_workloads(&self, changes: &[(IpAddr, Option<Arc<str>>)]) {
        let mut w = self.workloads.borrow_mut();
        for (addr, id) in changes {
            match id {
                Some(id) => w.insert(*addr, id.clone()),
                None => w.remove(addr),
            };
        }
    }

    /// Checks that `said`, a peer's verified SPIFFE ID, is the identity of
    /// the meshed pod at `ip` (with workload identities on; otherwise any
    /// well-formed one will do). A pod not known here yet is waited for,
    /// looking again every 50 ms: the caller bounds the wait.
    pub async fn check_workload(&self, ip: IpAddr, said: &str) -> Result<(), crate::identity::PeerError> {
        let Some(domain) = &self.trust_domain else { return Ok(()) };
        loop {
            let expected = self.workloads.borrow().get(&ip).cloned();
            if let Some(path) = expected {
                // `spiffe://DOMAIN/PATH`, compared without building it.
                let rest = said.strip_prefix("spiffe://").and_then(|r| r.strip_prefix(&**domain));
                return match rest.and_then(|r| r.strip_prefix('/')) == Some(&*path) {
                    true => Ok(()),
                    false => Err(crate::identity::PeerError::NotTheWorkload {
                        ip,
                        said: said.to_string(),
                        expected: format!("spiffe://{domain}/{path}"),
                    }),
                };
            }
            glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// New authorization policies from the control thread: the open
    /// connections they now refuse are closed (as ztunnel does).
    pub fn set_policies(&self, table: Arc<crate::cluster::policy::Table>) {
        *self.policies.borrow_mut() = table;
        for a in self.admitted.borrow().values() {
            let c = crate::cluster::policy::Conn { principal: &a.principal, source: a.source, dst: a.dst };
            if let Err(denied) = self.authorize(&c) {
                let _ = a.stop.try_send(denied.to_string());
            }
        }
    }

    /// Keeps `c`, just let in, to be decided again when the policies
    /// change: the returned future gives the end to relay until, and the
    /// entry goes when the guard drops.
    pub fn admitted(
        &self,
        c: &crate::cluster::policy::Conn<'_>,
    ) -> (AdmittedGuard<'_>, impl std::future::Future<Output = crate::proxy::relay::End>) {
        let (stop, stopped) = glommio::channels::local_channel::new_bounded(1);
        let id = self.next_admitted.get();
        self.next_admitted.set(id + 1);
        let entry = Admitted { principal: c.principal.to_string(), source: c.source, dst: c.dst, stop };
        self.admitted.borrow_mut().insert(id, entry);
        let end = async move {
            match stopped.recv().await {
                Some(why) => crate::proxy::relay::End::Denied(why),
                None => std::future::pending().await,
            }
        };
        (AdmittedGuard { executor: self, id }, end)
    }

    /// The principal a pod served here proves with its certificate: its
    /// workload identity (`--node-ca`), or the address form `--certs`
    /// certificates carry.
    pub fn local_principal(&self, ip: IpAddr) -> String {
        match (&self.trust_domain, self.workloads.borrow().get(&ip)) {
            (Some(domain), Some(path)) => format!("{domain}/{path}"),
            _ => crate::identity::ca::ip_spiffe_id(ip).trim_start_matches("spiffe://").to_string(),
        }
    }

    /// Whether the policies of the pod at `c.dst` let `c` in.
    pub fn authorize(&self, c: &crate::cluster::policy::Conn<'_>) -> Result<(), crate::cluster::policy::Denied> {
        let policies = self.policies.borrow().get(&c.dst.ip()).cloned();
        policies.map_or(Ok(()), |p| crate::cluster::policy::decide(&p, c))
    }

    /// New Services from the control thread.
    pub fn set_services(&self, table: Arc<crate::cluster::services::Table>) {
        *self.services.borrow_mut() = table;
    }

    /// The Service behind `vip`, if it is one.
    pub fn service(&self, vip: std::net::SocketAddr) -> Option<Arc<crate::cluster::services::Frontend>> {
        self.services.borrow().get(vip).cloned()
    }

    /// Picks an endpoint of `fe` (reached at `vip`) for `client` and counts
    /// a connection to it until the returned guard drops.
    pub fn choose_endpoint(
        &self,
        vip: std::net::SocketAddr,
        fe: &crate::cluster::services::Frontend,
        client: IpAddr,
    ) -> Option<(crate::cluster::services::Backend, EndpointLoad<'_>)> {
        let draw = || {
            // splitmix64: cheap, and good enough to pick two of a few.
            let mut z = self.random.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            self.random.set(z);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let picked = {
            let load = self.endpoint_load.borrow();
            let choose = || {
                crate::cluster::services::choose(fe, client, |a| load.get(&a).copied().unwrap_or(0), (draw(), draw()))
            };
            self.affinity.choose(vip, fe, client, std::time::Instant::now(), choose)?
        };
        *self.endpoint_load.borrow_mut().entry(picked.addr).or_default() += 1;
        Some((picked, EndpointLoad { executor: self, addr: picked.addr }))
    }

    /// Records into this executor's measurements.
    pub fn with_stats<T>(&self, f: impl FnOnce(&mut Snapshot) -> T) -> T {
        f(&mut self.stats.borrow_mut())
    }

    /// A copy of this executor's measurements.
    pub fn snapshot(&self) -> Snapshot {
        self.stats.borrow().clone()
    }

    /// Whether a warning of `kind` may be logged now (and how many like it
    /// were left out since the last one); one left out is counted.
    pub fn may_log(&self, kind: &'static str) -> Option<u64> {
        let allowed = self.quiet.allow(kind);
        if allowed.is_none() {
            self.with_stats(|s| s.counts[Count::LogsSuppressed] += 1);
        }
        allowed
    }

    /// `ns`, whose pod has `addrs`, is served by this executor (indexed by
    /// address too with the fast path on).
    pub fn serve(&self, ns: &Arc<Netns>, addrs: &[IpAddr]) {
        self.pods.borrow_mut().insert(ns.id(), addrs.to_vec());
        if self.same_node_fast_path {
            let mut local = self.local.borrow_mut();
            for ip in addrs {
                local.insert(*ip, ns.clone());
            }
        }
    }

    /// `id` is no longer served here.
    pub fn forget(&self, id: NetnsId) {
        self.pods.borrow_mut().remove(&id);
        self.local.borrow_mut().retain(|_, ns| ns.id() != id);
    }

    /// No pod is served here any more (draining).
    pub fn forget_all(&self) {
        self.pods.borrow_mut().clear();
        self.local.borrow_mut().clear();
    }

    /// The address of the pod in `ns` of the family of `like` (a captured
    /// client's own address is loopback: this is who it is).
    pub fn pod_address(&self, ns: NetnsId, like: IpAddr) -> Option<IpAddr> {
        self.pods.borrow().get(&ns)?.iter().find(|a| a.is_ipv6() == like.is_ipv6()).copied()
    }

    /// With the fast path on, for a connection from the pod in `client`
    /// to `dst`: the client pod's address and the destination pod's
    /// namespace, if this executor serves both and holds certificates for
    /// both (the data plane vouches for both ends, as the tunnel's
    /// handshake would have). The client's address is one of the
    /// destination's family.
    pub fn same_node(&self, client: &Netns, dst: IpAddr) -> Option<(IpAddr, Arc<Netns>)> {
        let dst_ns = self.local.borrow().get(&dst)?.clone();
        let src = self.pod_address(client.id(), dst)?;
        let identity = self.identity.borrow();
        (identity.holds(src) && identity.holds(dst)).then_some((src, dst_ns))
    }

    /// A socket to the application at `dst`, made in its pod's namespace
    /// `ns`: from `client` where the pod's return path is in place; from the
    /// pod's own address otherwise, or if the kernel refuses the transparent
    /// socket (counted). The inbound side and the same-node fast path both
    /// deliver this way.
    pub fn connect_app(
        &self,
        ns: &Netns,
        dst: std::net::SocketAddr,
        client: std::net::SocketAddr,
    ) -> std::io::Result<std::os::fd::OwnedFd> {
        let connect = || {
            if ns.client_address() {
                match crate::node::socket::upstream_from(dst, client, self.bypass_mark) {
                    Ok(fd) => return Ok(fd),
                    Err(e) => {
                        self.with_stats(|s| s.counts[Count::ClientAddressFallbacks] += 1);
                        tracing::debug!(%client, error = %e, "transparent socket refused: connecting from the pod's address");
                    }
                }
            }
            crate::node::socket::upstream(dst, self.bypass_mark)
        };
        ns.run(connect)?
    }

    /// New certificates, for new handshakes.
    pub fn set_identity(&self, identity: Arc<Identity>) {
        *self.identity.borrow_mut() = identity;
    }

    /// The client configuration for a tunnel leaving from `src`.
    pub fn client_config(&self, src: IpAddr) -> Result<Arc<rustls::ClientConfig>, crate::identity::Error> {
        self.identity.borrow().client_config(src)
    }

    /// The server configuration for a tunnel that arrived at `local`.
    pub fn server_config(&self, local: IpAddr) -> Result<Arc<rustls::ServerConfig>, crate::identity::Error> {
        self.identity.borrow().server_config(local)
    }
}
