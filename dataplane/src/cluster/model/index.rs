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

mod claims;
mod sandbox;
use crate::cluster::services::{self, Service, Table};
use claims::Claims;
pub use sandbox::Sandbox;

/// One object as a source now sees it (`None`: gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A pod (or a file's workload); shared with the source that keeps it.
    Workload(ObjectRef, Option<Arc<Workload>>),
    /// A Service with its EndpointSlices (`None` too for a headless one).
    /// Boxed: a change is small, and the first update holds one per object
    /// of the cluster.
    Service(ObjectRef, Option<Box<Service>>),
    /// A Kubernetes namespace, and whether it is opted into the mesh.
    Namespace(String, Option<bool>),
    /// A local pod's sandbox, as the CNI plugin reported it.
    Sandbox(ObjectRef, Option<Box<Sandbox>>),
    /// An authorization policy (`None`: gone, or not applied here).
    Policy(ObjectRef, Option<Arc<crate::cluster::policy::Policy>>),
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
    /// ClusterIP:port pairs that came or changed (`Some`: whether one of
    /// its endpoints is meshed) or went (`None`).
    pub vips: BTreeMap<SocketAddr, Option<bool>>,
    /// Whether the namespaces opted into the mesh changed.
    pub namespaces: bool,
    /// Meshed addresses whose workload identity changed: the SPIFFE path
    /// its certificate must carry (`ns/NAMESPACE/sa/SERVICE_ACCOUNT`), or
    /// `None` for an address no longer meshed.
    pub identities: BTreeMap<IpAddr, Option<Arc<str>>>,
    /// Whether an authorization policy came, went or changed.
    pub policies: bool,
}

impl Effects {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.meshed.is_empty()
            && !self.local
            && !self.services
            && self.vips.is_empty()
            && !self.namespaces
            && self.identities.is_empty()
            && !self.policies
    }
}

/// The workloads and Services as the sources last reported them.
#[derive(Debug, Clone, Default)]
pub struct Model {
    workloads: BTreeMap<ObjectRef, Arc<Workload>>,
    /// Every workload claiming an address (two only for a moment: a stale
    /// object beside its successor).
    by_addr: HashMap<IpAddr, Claims>,
    local: BTreeSet<ObjectRef>,
    services: BTreeMap<ObjectRef, Service>,
    /// The Services an address is an endpoint of.
    by_endpoint: HashMap<IpAddr, Claims>,
    /// Every meshed address with the inbound ports its pod leaves alone.
    meshed: BTreeMap<IpAddr, Vec<u16>>,
    /// Every meshed address with the identity its pod's certificate must
    /// carry (a SPIFFE path).
    identities: HashMap<IpAddr, Arc<str>>,
    table: Arc<Table>,
    /// The table entries each Service wrote.
    vips_of: HashMap<ObjectRef, Vec<SocketAddr>>,
    /// Kubernetes namespaces, and whether each is opted in.
    namespaces: BTreeMap<String, bool>,
    /// Local pods' sandboxes, and what the API says of those pods (their
    /// workloads in `workloads` carry the sandbox's addresses).
    sandboxes: HashMap<ObjectRef, Sandbox>,
    api_of_sandboxed: HashMap<ObjectRef, Arc<Workload>>,
    /// Authorization policies, by namespace and name.
    policies: BTreeMap<ObjectRef, Arc<crate::cluster::policy::Policy>>,
    /// The identities, each kept once (a service account's pods share it).
    names: super::Names,
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
        let workloads: BTreeMap<ObjectRef, Arc<Workload>> =
            workloads.into_iter().map(|w| (w.object(), Arc::new(w))).collect();
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
                .map(|(k, s)| Change::Service(k, Some(Box::new(s)))),
        );
        self.apply(changes)
    }

    /// Its workloads and services (to compare a reloaded source with).
    pub fn into_parts(self) -> (Vec<Workload>, Vec<Service>) {
        (self.workloads.into_values().map(Arc::unwrap_or_clone).collect(), self.services.into_values().collect())
    }

    /// Applies changes in order; returns what they changed.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> Effects {
        let mut effects = Effects::default();
        let mut addrs = BTreeSet::new();
        let mut touched_services = BTreeSet::new();
        let mut count = 0usize;
        for change in changes {
            count += 1;
            match change {
                Change::Workload(key, new) => {
                    let new = self.api_reported(&key, new);
                    self.set_workload(key, new, &mut addrs, &mut effects)
                }
                Change::Sandbox(key, sandbox) => {
                    let new = self.set_sandbox(&key, sandbox.map(|s| *s));
                    self.set_workload(key, new, &mut addrs, &mut effects)
                }
                Change::Namespace(name, opted_in) => {
                    for (key, new) in self.set_namespace(name, opted_in, &mut effects) {
                        self.set_workload(key, new, &mut addrs, &mut effects);
                    }
                }
                Change::Service(key, new) => {
                    self.set_service(&key, new.map(|s| *s));
                    touched_services.insert(key);
                }
                Change::Policy(key, new) => {
                    let changed = match new {
                        Some(p) => self.policies.insert(key, p.clone()).as_ref() != Some(&p),
                        None => self.policies.remove(&key).is_some(),
                    };
                    effects.policies |= changed;
                }
            }
        }
        for addr in &addrs {
            let id = self.meshed_identity(*addr).map(|id| self.names.intern(&id));
            if self.identities.get(addr) != id.as_ref() {
                match &id {
                    Some(id) => self.identities.insert(*addr, id.clone()),
                    None => self.identities.remove(addr),
                };
                effects.identities.insert(*addr, id);
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
        if count > 1024 && count >= self.workloads.len() / 2 {
            self.compact();
        }
        effects
    }

    /// Rebuilds the ordered maps in one go, after a batch that made most of
    /// the model (the first, whole one; a workloads file read again whole):
    /// filled one entry at a time in key order, a B-tree's nodes stay about
    /// half empty (at 100,000 pods, megabytes).
    fn compact(&mut self) {
        self.workloads = std::mem::take(&mut self.workloads).into_iter().collect();
        self.meshed = std::mem::take(&mut self.meshed).into_iter().collect();
        self.services = std::mem::take(&mut self.services).into_iter().collect();
    }

    fn set_workload(
        &mut self,
        key: ObjectRef,
        new: Option<Arc<Workload>>,
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

    /// The identity an address's certificate must carry: that of the
    /// workload [`Model::meshed_ports`] takes the address's entry from.
    fn meshed_identity(&self, addr: IpAddr) -> Option<String> {
        let keys = self.by_addr.get(&addr)?;
        keys.iter().rev().find_map(|k| {
            let w = self.workloads.get(k)?;
            matches!(w.mode, Mode::Meshed { .. })
                .then(|| crate::identity::pki::spiffe_path(&w.namespace, &w.service_account))
        })
    }

    /// Every meshed address with the identity its certificate must carry.
    pub fn identities(&self) -> impl Iterator<Item = (IpAddr, &Arc<str>)> {
        self.identities.iter().map(|(a, id)| (*a, id))
    }

    /// Recomputes these Services' entries of the table; whether any
    /// changed. The table is copied (its entries, not the frontends, shared
    /// by `Arc`) at most once per update, and only if an entry changes: the
    /// executors keep the one they hold.
    fn rebuild_frontends(&mut self, keys: &BTreeSet<ObjectRef>, vips: &mut BTreeMap<SocketAddr, Option<bool>>) -> bool {
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
                    vips.insert(*vip, None);
                }
                for (vip, fe) in &new {
                    table.insert(*vip, fe.clone());
                    vips.insert(*vip, None);
                }
            }
            if !new.is_empty() {
                self.vips_of.insert(key.clone(), new.into_iter().map(|(v, _)| v).collect());
            }
        }
        // What the table holds now, whichever Service wrote or removed last
        // (a pair rewritten for its own Service is written again: harmless).
        for (vip, held) in vips.iter_mut() {
            *held = self.table.get(*vip).map(|fe| fe.backends.iter().any(|b| b.meshed));
        }
        changed
    }

    /// The workload named `key`, if there is one.
    pub fn workload(&self, key: &ObjectRef) -> Option<&Workload> {
        self.workloads.get(key).map(|w| &**w)
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
        self.workloads.values().map(|w| &**w)
    }

    /// The workloads on this node.
    pub fn local(&self) -> impl Iterator<Item = &Workload> {
        self.local.iter().filter_map(|k| self.workload(k))
    }

    /// The local workload holding `addr`, if one does. Two local workloads
    /// claiming one address (a stale object beside its successor) give
    /// `Err` with both names: neither is trusted until it clears.
    pub fn local_with(&self, addr: IpAddr) -> Result<Option<&Workload>, String> {
        let mut found =
            self.by_addr.get(&addr).into_iter().flatten().filter_map(|k| self.workload(k)).filter(|w| w.local);
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

    /// The authorization policies that apply to each meshed local pod, by
    /// its addresses (pods no policy selects are not in it).
    pub fn policy_table(&self) -> crate::cluster::policy::Table {
        let mut table = crate::cluster::policy::Table::new();
        for w in self.local().filter(|w| matches!(w.mode, Mode::Meshed { .. })) {
            let from = ObjectRef::new(&w.namespace, "");
            let selecting: Vec<Arc<crate::cluster::policy::Policy>> = self
                .policies
                .range(from..)
                .take_while(|(k, _)| k.namespace == w.namespace)
                .filter(|(_, p)| p.selects(&w.namespace, &w.labels))
                .map(|(_, p)| p.clone())
                .collect();
            if !selecting.is_empty() {
                let selecting: Arc<[_]> = selecting.into();
                for a in &w.addresses {
                    table.insert(*a, selecting.clone());
                }
            }
        }
        table
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
    s.slices.iter().flat_map(|sl| sl.endpoints.iter().map(|e| e.addr))
}

#[cfg(test)]
mod tests;
