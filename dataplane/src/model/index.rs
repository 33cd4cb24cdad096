//! The model as indexes updated in place: workloads by name and by address,
//! the local ones, Services by name and by endpoint address, and what is
//! derived from them (the meshed destinations, the Service table). One
//! object's change costs work in proportion to that object (its addresses,
//! its endpoints), not to the cluster.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use super::{Mode, ObjectRef, Workload};
use crate::services::{self, Service, Table};

/// One object as a source now sees it (`None`: gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A pod (or a file's workload).
    Workload(ObjectRef, Option<Workload>),
    /// A Service with its EndpointSlices (`None` too for a headless one).
    Service(ObjectRef, Option<Service>),
    /// A Kubernetes namespace, and whether it is opted into the mesh.
    Namespace(String, Option<bool>),
    /// A local pod's sandbox, as the CNI plugin reported it.
    Sandbox(ObjectRef, Option<Sandbox>),
}

/// A pod's sandbox on this node as the CNI plugin reported it at ADD: its
/// namespace file and its addresses, known before the kubelet reports them
/// to the API. The pod's workload carries them from then on; a pod the API
/// has not shown yet is known by its namespace's membership alone (outside
/// the mesh when the namespace is not opted in; otherwise unknown until the
/// API shows it, since its own labels may opt it out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The runtime's id of the sandbox.
    pub container_id: String,
    /// Its network namespace file.
    pub netns: PathBuf,
    /// Its addresses (none: as the API says).
    pub addresses: Vec<IpAddr>,
}

/// What an update changed, for the eBPF maps and the executors.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Meshed destinations whose entry changed: the inbound ports their pod
    /// leaves alone, or `None` for an address no longer meshed.
    pub meshed: BTreeMap<IpAddr, Option<Vec<u16>>>,
    /// Whether a local workload came, went or changed (enrolment and
    /// certificates look again).
    pub local: bool,
    /// Whether the Service table changed.
    pub services: bool,
    /// ClusterIP:port pairs that came (`true`) or went (`false`).
    pub vips: BTreeMap<SocketAddr, bool>,
    /// Whether the namespaces opted into the mesh changed.
    pub namespaces: bool,
}

impl Effects {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.meshed.is_empty() && !self.local && !self.services && self.vips.is_empty() && !self.namespaces
    }
}

/// The workloads and Services as the sources last reported them.
#[derive(Debug, Clone, Default)]
pub struct Model {
    workloads: BTreeMap<ObjectRef, Workload>,
    /// Every workload claiming an address (two only for a moment: a stale
    /// object beside its successor).
    by_addr: HashMap<IpAddr, BTreeSet<ObjectRef>>,
    local: BTreeSet<ObjectRef>,
    services: BTreeMap<ObjectRef, Service>,
    /// The Services an address is an endpoint of.
    by_endpoint: HashMap<IpAddr, BTreeSet<ObjectRef>>,
    /// Every meshed address with the inbound ports its pod leaves alone.
    meshed: BTreeMap<IpAddr, Vec<u16>>,
    table: Arc<Table>,
    /// The table entries each Service wrote.
    vips_of: HashMap<ObjectRef, Vec<SocketAddr>>,
    /// Kubernetes namespaces, and whether each is opted in.
    namespaces: BTreeMap<String, bool>,
    /// Local pods' sandboxes, and what the API says of those pods (their
    /// workloads in `workloads` carry the sandbox's addresses).
    sandboxes: HashMap<ObjectRef, Sandbox>,
    api_of_sandboxed: HashMap<ObjectRef, Workload>,
}

impl Model {
    /// A model of these workloads.
    pub fn new(workloads: Vec<Workload>) -> Self {
        Self::with_services(workloads, Vec::new())
    }

    /// A model of these workloads and services.
    pub fn with_services(workloads: Vec<Workload>, services: Vec<Service>) -> Self {
        let mut m = Self::default();
        m.replace(workloads, services);
        m
    }

    /// Becomes a model of exactly these workloads and services (a whole
    /// source reloaded): what differs is applied as changes.
    pub fn replace(&mut self, workloads: Vec<Workload>, services: Vec<Service>) -> Effects {
        let workloads: BTreeMap<ObjectRef, Workload> = workloads.into_iter().map(|w| (w.object(), w)).collect();
        let services: BTreeMap<ObjectRef, Service> =
            services.into_iter().map(|s| (ObjectRef::new(&s.namespace, &s.name), s)).collect();
        let mut changes: Vec<Change> = self
            .workloads
            .keys()
            .filter(|k| !workloads.contains_key(*k))
            .map(|k| Change::Workload(k.clone(), None))
            .chain(
                self.services.keys().filter(|k| !services.contains_key(*k)).map(|k| Change::Service(k.clone(), None)),
            )
            .collect();
        changes.extend(
            workloads
                .into_iter()
                .filter(|(k, w)| self.workloads.get(k) != Some(w))
                .map(|(k, w)| Change::Workload(k, Some(w))),
        );
        changes.extend(
            services
                .into_iter()
                .filter(|(k, s)| self.services.get(k) != Some(s))
                .map(|(k, s)| Change::Service(k, Some(s))),
        );
        self.apply(changes)
    }

    /// Its workloads and services (to compare a reloaded source with).
    pub fn into_parts(self) -> (Vec<Workload>, Vec<Service>) {
        (self.workloads.into_values().collect(), self.services.into_values().collect())
    }

    /// Applies changes in order; returns what they changed.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> Effects {
        let mut effects = Effects::default();
        let mut addrs = BTreeSet::new();
        let mut touched_services = BTreeSet::new();
        for change in changes {
            match change {
                Change::Workload(key, new) => {
                    let new = match self.sandboxes.contains_key(&key) {
                        true => {
                            match new {
                                Some(w) => self.api_of_sandboxed.insert(key.clone(), w),
                                None => self.api_of_sandboxed.remove(&key),
                            };
                            self.with_sandbox(&key)
                        }
                        false => new,
                    };
                    self.set_workload(key, new, &mut addrs, &mut effects)
                }
                Change::Sandbox(key, sandbox) => {
                    let new = match sandbox {
                        Some(sb) => {
                            if !self.sandboxes.contains_key(&key) {
                                if let Some(w) = self.workloads.get(&key) {
                                    self.api_of_sandboxed.insert(key.clone(), w.clone());
                                }
                            }
                            self.sandboxes.insert(key.clone(), sb);
                            self.with_sandbox(&key)
                        }
                        None => {
                            self.sandboxes.remove(&key);
                            self.api_of_sandboxed.remove(&key)
                        }
                    };
                    self.set_workload(key, new, &mut addrs, &mut effects)
                }
                Change::Namespace(name, opted_in) => {
                    let before = match opted_in {
                        Some(o) => self.namespaces.insert(name.clone(), o),
                        None => self.namespaces.remove(&name),
                    };
                    if before == opted_in {
                        continue;
                    }
                    effects.namespaces = true;
                    // Sandboxes the API has not shown yet are known by their
                    // namespace alone.
                    let unknown: Vec<ObjectRef> = self
                        .sandboxes
                        .keys()
                        .filter(|k| k.namespace == name && !self.api_of_sandboxed.contains_key(*k))
                        .cloned()
                        .collect();
                    for key in unknown {
                        let new = self.with_sandbox(&key);
                        self.set_workload(key, new, &mut addrs, &mut effects);
                    }
                }
                Change::Service(key, new) => {
                    self.set_service(&key, new);
                    touched_services.insert(key);
                }
            }
        }
        for addr in addrs {
            let now = self.meshed_ports(addr);
            if self.meshed.get(&addr) == now.as_ref() {
                continue;
            }
            // Whether the address is meshed at all marks the Service
            // endpoints it is.
            if self.meshed.contains_key(&addr) != now.is_some() {
                touched_services.extend(self.by_endpoint.get(&addr).into_iter().flatten().cloned());
            }
            match &now {
                Some(ports) => self.meshed.insert(addr, ports.clone()),
                None => self.meshed.remove(&addr),
            };
            effects.meshed.insert(addr, now);
        }
        effects.services = self.rebuild_frontends(&touched_services, &mut effects.vips);
        effects
    }

    /// A sandboxed pod's workload: the API's with the sandbox's addresses
    /// and namespace file; or, before the API shows the pod, one outside the
    /// mesh if its namespace is not opted in (none otherwise: undecided).
    fn with_sandbox(&self, key: &ObjectRef) -> Option<Workload> {
        let sb = self.sandboxes.get(key)?;
        let mut w = match self.api_of_sandboxed.get(key) {
            Some(w) => w.clone(),
            None if self.namespaces.get(&key.namespace) == Some(&false) => Workload {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                service_account: "default".into(),
                addresses: Vec::new(),
                local: true,
                netns: None,
                client_address: true,
                mode: Mode::Outside(super::Outside::NotOptedIn),
            },
            None => return None,
        };
        if !sb.addresses.is_empty() {
            w.addresses.clone_from(&sb.addresses);
        }
        w.netns = Some(sb.netns.clone());
        w.local = true;
        Some(w)
    }

    fn set_workload(
        &mut self,
        key: ObjectRef,
        new: Option<Workload>,
        addrs: &mut BTreeSet<IpAddr>,
        effects: &mut Effects,
    ) {
        let old = match &new {
            Some(w) => self.workloads.insert(key.clone(), w.clone()),
            None => self.workloads.remove(&key),
        };
        if old == new {
            return;
        }
        if old.as_ref().is_some_and(|w| w.local) || new.as_ref().is_some_and(|w| w.local) {
            effects.local = true;
        }
        for a in old.iter().flat_map(|w| &w.addresses) {
            if let Some(keys) = self.by_addr.get_mut(a) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_addr.remove(a);
                }
            }
            addrs.insert(*a);
        }
        for a in new.iter().flat_map(|w| &w.addresses) {
            self.by_addr.entry(*a).or_default().insert(key.clone());
            addrs.insert(*a);
        }
        match new.as_ref().is_some_and(|w| w.local) {
            true => self.local.insert(key),
            false => self.local.remove(&key),
        };
    }

    fn set_service(&mut self, key: &ObjectRef, new: Option<Service>) {
        let old = match new {
            Some(s) => self.services.insert(key.clone(), s),
            None => self.services.remove(key),
        };
        for ip in old.iter().flat_map(endpoint_addresses) {
            if let Some(keys) = self.by_endpoint.get_mut(&ip) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_endpoint.remove(&ip);
                }
            }
        }
        if let Some(s) = self.services.get(key) {
            for ip in endpoint_addresses(s) {
                self.by_endpoint.entry(ip).or_default().insert(key.clone());
            }
        }
    }

    /// The entry an address gets in the meshed destinations: the skipped
    /// inbound ports of the last meshed workload claiming it, by name.
    fn meshed_ports(&self, addr: IpAddr) -> Option<Vec<u16>> {
        let keys = self.by_addr.get(&addr)?;
        keys.iter().rev().find_map(|k| match &self.workloads.get(k)?.mode {
            Mode::Meshed { skip_inbound, .. } => Some(skip_inbound.clone()),
            Mode::Outside(_) => None,
        })
    }

    /// Recomputes these Services' entries of the table; whether any
    /// changed. The table is copied (its entries, not the frontends, shared
    /// by `Arc`) at most once per update, and only if an entry changes: the
    /// executors keep the one they hold.
    fn rebuild_frontends(&mut self, keys: &BTreeSet<ObjectRef>, vips: &mut BTreeMap<SocketAddr, bool>) -> bool {
        let mut changed = false;
        for key in keys {
            let new = match self.services.get(key) {
                Some(svc) => services::frontends(svc, |ip| self.meshed.contains_key(&ip)),
                None => Vec::new(),
            };
            let old = self.vips_of.remove(key).unwrap_or_default();
            let same =
                old.len() == new.len() && new.iter().all(|(v, fe)| self.table.get(*v).is_some_and(|f| **f == *fe));
            if !same {
                changed = true;
                let name = key.to_string();
                let table = Arc::make_mut(&mut self.table);
                for vip in &old {
                    table.remove(*vip, &name);
                    vips.insert(*vip, false);
                }
                for (vip, fe) in &new {
                    table.insert(*vip, fe.clone());
                    vips.insert(*vip, true);
                }
            }
            if !new.is_empty() {
                self.vips_of.insert(key.clone(), new.into_iter().map(|(v, _)| v).collect());
            }
        }
        // What the table holds now, whichever Service wrote or removed last
        // (a pair rewritten for its own Service is written again: harmless).
        for (vip, held) in vips.iter_mut() {
            *held = self.table.get(*vip).is_some();
        }
        changed
    }

    /// The workload named `key`, if there is one.
    pub fn workload(&self, key: &ObjectRef) -> Option<&Workload> {
        self.workloads.get(key)
    }

    /// The sandbox the CNI reported for the pod `key`, if any.
    pub fn sandbox(&self, key: &ObjectRef) -> Option<&Sandbox> {
        self.sandboxes.get(key)
    }

    /// Every sandbox the CNI reported, by pod.
    pub fn sandboxes(&self) -> impl Iterator<Item = (&ObjectRef, &Sandbox)> {
        self.sandboxes.iter()
    }

    /// Whether a Kubernetes namespace is opted into the mesh (`None`: not
    /// known).
    pub fn opted_in(&self, namespace: &str) -> Option<bool> {
        self.namespaces.get(namespace).copied()
    }

    /// The namespaces opted into the mesh.
    pub fn meshed_namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.iter().filter(|(_, on)| **on).map(|(n, _)| n.as_str())
    }

    /// Every workload, by namespace and name.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values()
    }

    /// The workloads on this node.
    pub fn local(&self) -> impl Iterator<Item = &Workload> {
        self.local.iter().filter_map(|k| self.workloads.get(k))
    }

    /// The local workload holding `addr`, if one does. Two local workloads
    /// claiming one address (a stale object beside its successor) give
    /// `Err` with both names: neither is trusted until it clears.
    pub fn local_with(&self, addr: IpAddr) -> Result<Option<&Workload>, String> {
        let mut found =
            self.by_addr.get(&addr).into_iter().flatten().filter_map(|k| self.workloads.get(k)).filter(|w| w.local);
        match (found.next(), found.next()) {
            (Some(a), Some(b)) => Err(format!("{addr} is claimed by both {} and {}", a.key(), b.key())),
            (first, _) => Ok(first),
        }
    }

    /// Local workloads that name their namespace file.
    pub fn named_netns(&self) -> impl Iterator<Item = &PathBuf> {
        self.local().filter_map(|w| w.netns.as_ref())
    }

    /// Every meshed address, anywhere, with the inbound ports its pod leaves
    /// alone: what `connect4` tunnels to.
    pub fn meshed_destinations(&self) -> &BTreeMap<IpAddr, Vec<u16>> {
        &self.meshed
    }

    /// The service table: every ClusterIP:port and its ready endpoints,
    /// marked meshed when a meshed destination holds the address.
    pub fn service_table(&self) -> &Arc<Table> {
        &self.table
    }

    /// How many local workloads are meshed, and how many are outside for
    /// each reason.
    pub fn local_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for w in self.local() {
            let label = match &w.mode {
                Mode::Meshed { .. } => "meshed",
                Mode::Outside(why) => why.label(),
            };
            *m.entry(label).or_default() += 1;
        }
        m
    }
}

/// The addresses of a Service's endpoints, ready or not (a readiness flip
/// changes the Service itself).
fn endpoint_addresses(s: &Service) -> impl Iterator<Item = IpAddr> + '_ {
    s.slices.iter().flat_map(|sl| sl.endpoints.iter().map(|(ip, _)| *ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::Outside,
        services::{ServicePort, Slice},
    };

    fn workload(name: &str, addr: &str, local: bool, mode: Mode) -> Workload {
        Workload {
            namespace: "ns".into(),
            name: name.into(),
            service_account: "default".into(),
            addresses: vec![addr.parse().expect("addr")],
            local,
            netns: None,
            client_address: true,
            mode,
        }
    }

    fn meshed() -> Mode {
        Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![9090] }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn destinations_are_every_meshed_address_and_local_lookups_see_conflicts() {
        let m = Model::new(vec![
            workload("a", "10.0.0.1", true, meshed()),
            workload("b", "10.0.1.1", false, meshed()),
            workload("c", "10.0.0.2", true, Mode::Outside(Outside::HostNetwork)),
            workload("d", "10.0.0.3", true, meshed()),
            workload("e", "10.0.0.3", true, meshed()),
        ]);
        let dsts = m.meshed_destinations();
        assert_eq!(dsts.keys().map(ToString::to_string).collect::<Vec<_>>(), ["10.0.0.1", "10.0.0.3", "10.0.1.1"]);
        assert_eq!(dsts[&ip("10.0.0.1")], vec![9090]);
        let name = |addr: &str| m.local_with(ip(addr)).map(|w| w.map(|w| w.name.clone()));
        assert_eq!(name("10.0.0.1"), Ok(Some("a".into())));
        assert_eq!(name("10.0.1.1"), Ok(None), "not local");
        assert!(name("10.0.0.3").expect_err("conflict").contains("ns/d and ns/e"));
        assert_eq!(m.local_counts(), [("host_network", 1), ("meshed", 3)].into_iter().collect());
    }

    fn web(endpoints: &[&str]) -> Service {
        Service {
            namespace: "ns".into(),
            name: "web".into(),
            cluster_ips: vec![ip("10.96.0.10")],
            ports: vec![ServicePort { name: "http".into(), port: 80 }],
            client_ip_affinity: false,
            slices: vec![Slice {
                ports: vec![("http".into(), 8080)],
                endpoints: endpoints.iter().map(|e| (ip(e), true)).collect(),
            }],
        }
    }

    fn backends(m: &Model) -> Vec<String> {
        let fe = m.service_table().get("10.96.0.10:80".parse().expect("vip")).expect("web");
        fe.backends.iter().map(|b| format!("{} {}", b.addr, b.meshed)).collect()
    }

    #[test]
    fn one_pods_change_touches_only_its_addresses_and_the_services_it_serves() {
        let mut m = Model::with_services(
            vec![workload("a", "10.0.0.1", true, meshed()), workload("b", "10.0.1.1", false, meshed())],
            vec![web(&["10.0.1.1", "10.0.1.2"])],
        );
        assert_eq!(backends(&m), ["10.0.1.1:8080 true", "10.0.1.2:8080 false"]);
        let table = m.service_table().clone();

        // A remote pod comes at an address no Service names: one entry, and
        // the table the executors hold is still the one they have.
        let c = workload("c", "10.0.1.9", false, meshed());
        let fx = m.apply([Change::Workload(c.object(), Some(c.clone()))]);
        assert_eq!(fx, Effects { meshed: [(ip("10.0.1.9"), Some(vec![9090]))].into(), ..Effects::default() });
        assert!(Arc::ptr_eq(&table, m.service_table()), "the table was not copied");

        // The same object again changes nothing.
        assert!(m.apply([Change::Workload(c.object(), Some(c))]).is_empty());

        // An endpoint's pod becomes meshed: its Service's entry follows.
        let d = workload("d", "10.0.1.2", false, meshed());
        let fx = m.apply([Change::Workload(d.object(), Some(d))]);
        assert!(fx.services && !fx.local);
        assert_eq!(backends(&m), ["10.0.1.1:8080 true", "10.0.1.2:8080 true"]);
        assert_eq!(table.len(), 1, "the executors' copy is untouched");

        // A local pod leaves the mesh: its address goes, and enrolment is
        // told to look.
        let mut a = workload("a", "10.0.0.1", true, Mode::Outside(Outside::OptedOut));
        let fx = m.apply([Change::Workload(a.object(), Some(a.clone()))]);
        assert_eq!(fx, Effects { meshed: [(ip("10.0.0.1"), None)].into(), local: true, ..Effects::default() });
        // ...and moves to another address, then goes.
        a.addresses = vec![ip("10.0.0.7")];
        assert!(m.apply([Change::Workload(a.object(), Some(a.clone()))]).local);
        assert_eq!(m.local_with(ip("10.0.0.7")).expect("one").map(|w| w.name.as_str()), Some("a"));
        assert_eq!(m.local_with(ip("10.0.0.1")), Ok(None), "the old address is forgotten");
        m.apply([Change::Workload(a.object(), None)]);
        assert_eq!(m.local().count(), 0);

        // The Service goes: its entries with it.
        let fx = m.apply([Change::Service(ObjectRef::new("ns", "web"), None)]);
        assert!(fx.services && m.service_table().is_empty());
        assert_eq!(fx.vips, [("10.96.0.10:80".parse().expect("vip"), false)].into(), "connect4 forgets it");
    }

    #[test]
    fn a_stale_pod_beside_its_successor_keeps_the_address_meshed_until_both_go() {
        let mut m = Model::new(vec![workload("old", "10.0.1.1", false, meshed())]);
        let new = workload("new", "10.0.1.1", false, Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![] });
        let fx = m.apply([Change::Workload(new.object(), Some(new.clone()))]);
        assert!(fx.meshed.is_empty(), "the last by name (old) still gives the entry, as before: {fx:?}");
        let fx = m.apply([Change::Workload(ObjectRef::new("ns", "old"), None)]);
        assert_eq!(fx.meshed, [(ip("10.0.1.1"), Some(vec![]))].into(), "the successor's ports");
        let fx = m.apply([Change::Workload(new.object(), None)]);
        assert_eq!(fx.meshed, [(ip("10.0.1.1"), None)].into());
        assert!(m.meshed_destinations().is_empty() && m.workloads().next().is_none());
    }

    #[test]
    fn a_whole_reload_applies_only_the_difference() {
        let a = workload("a", "10.0.0.1", true, meshed());
        let b = workload("b", "10.0.1.1", false, meshed());
        let mut m = Model::with_services(vec![a.clone(), b], vec![web(&["10.0.1.1"])]);
        let b2 = workload("b", "10.0.1.2", false, meshed());
        let fx = m.replace(vec![a, b2], vec![web(&["10.0.1.1"])]);
        assert_eq!(fx.meshed, [(ip("10.0.1.1"), None), (ip("10.0.1.2"), Some(vec![9090]))].into());
        assert!(!fx.local, "a is unchanged");
        assert!(fx.services, "web's endpoint is no longer meshed");
        assert_eq!(backends(&m), ["10.0.1.1:8080 false"]);
        assert!(m.replace(vec![], vec![]).local);
        assert!(m.meshed_destinations().is_empty() && m.service_table().is_empty());
    }

    #[test]
    fn a_sandbox_gives_a_local_pod_its_addresses_before_the_api_does() {
        let mut m = Model::default();
        m.apply([Change::Namespace("ns".into(), Some(true)), Change::Namespace("plain".into(), Some(false))]);
        assert_eq!(m.meshed_namespaces().collect::<Vec<_>>(), ["ns"]);
        // The API shows the pod scheduled here, with no address yet.
        let mut a = workload("a", "10.0.0.1", true, meshed());
        a.addresses.clear();
        m.apply([Change::Workload(a.object(), Some(a.clone()))]);
        let sb =
            Sandbox { container_id: "c1".into(), netns: "/run/netns/cni-a".into(), addresses: vec![ip("10.0.0.1")] };
        let fx = m.apply([Change::Sandbox(a.object(), Some(sb.clone()))]);
        assert!(fx.local && fx.meshed.contains_key(&ip("10.0.0.1")), "{fx:?}");
        let w = m.local_with(ip("10.0.0.1")).expect("one").expect("claimed by its sandbox");
        assert_eq!((w.name.as_str(), w.netns.as_deref()), ("a", Some(std::path::Path::new("/run/netns/cni-a"))));
        // The kubelet's status write (same address) and a label change keep
        // the sandbox's namespace file.
        a.addresses = vec![ip("10.0.0.1")];
        m.apply([Change::Workload(a.object(), Some(a.clone()))]);
        assert!(m.workload(&a.object()).is_some_and(|w| w.netns.is_some()));
        // DEL: back to what the API says.
        m.apply([Change::Sandbox(a.object(), None)]);
        assert_eq!(m.workload(&a.object()), Some(&a));

        // A pod the API has not shown yet: outside the mesh if its namespace
        // is not opted in, undecided if it is.
        let plain = ObjectRef::new("plain", "p");
        let fx =
            m.apply([Change::Sandbox(plain.clone(), Some(Sandbox { addresses: vec![ip("10.0.0.9")], ..sb.clone() }))]);
        assert!(fx.local);
        let w = m.local_with(ip("10.0.0.9")).expect("one").expect("known by its namespace");
        assert_eq!(w.mode, Mode::Outside(Outside::NotOptedIn));
        let early = ObjectRef::new("ns", "early");
        m.apply([Change::Sandbox(early.clone(), Some(Sandbox { addresses: vec![ip("10.0.0.8")], ..sb }))]);
        assert!(m.workload(&early).is_none(), "its own labels may opt it out: wait for the API");
        // Its namespace is opted out meanwhile: now it is known.
        let fx = m.apply([Change::Namespace("ns".into(), Some(false))]);
        assert!(fx.namespaces && fx.local);
        assert_eq!(m.workload(&early).map(|w| &w.mode), Some(&Mode::Outside(Outside::NotOptedIn)));
    }
}
