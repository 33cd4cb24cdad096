//! The cluster as last seen, and each watch event turned into the model's
//! changes for only the objects it touched.
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service as K8sService},
    discovery::v1::EndpointSlice,
};
use kube::{api::DynamicObject, runtime::watcher, ResourceExt};

use crate::{
    cluster::model::{self, membership, ObjectRef, Workload, CLIENT_ADDRESS, MESH_LABEL, MTLS_LABEL},
    cluster::policy::Policy,
    cluster::services::Service,
};

use super::views::*;

/// An object's (namespace, name); a Namespace's namespace is empty.
pub(super) type Key = (Arc<str>, Arc<str>);

/// Namespaces' and service accounts' names, kept once: every pod of a
/// namespace holds the same one, and so do the model's entries made from
/// it. (In a cell: the views that intern are called while a store is
/// borrowed.)
#[derive(Debug, Default)]
pub(super) struct Names(RefCell<model::Names>);

impl Names {
    /// The one copy of `s`.
    pub(super) fn intern(&self, s: &str) -> Arc<str> {
        self.0.borrow_mut().intern(s)
    }
}

/// One resource as last seen, by (namespace, name): a (re)list in progress is
/// applied whole at its end, so objects that vanished meanwhile go with it.
#[derive(Debug)]
pub(super) struct Store<V> {
    pub(super) items: BTreeMap<Key, V>,
    pub(super) listing: Option<BTreeMap<Key, V>>,
    pub(super) listed: bool,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Self { items: BTreeMap::new(), listing: None, listed: false }
    }
}

impl<V: PartialEq> Store<V> {
    /// Applies a watcher event; `view` reduces an object to what we keep
    /// (`None`: not kept, e.g. a finished pod). Returns the objects whose
    /// view changed, with their previous view: a relist, at its end, only
    /// those that differ from before it.
    fn apply<K: ResourceExt>(
        &mut self,
        ev: watcher::Event<K>,
        names: &Names,
        view: impl Fn(&K) -> Option<V>,
    ) -> Vec<(Key, Option<V>)> {
        let key = |o: &K| (names.intern(o.meta().namespace.as_deref().unwrap_or_default()), Arc::from(o.name_any()));
        let mut changed = Vec::new();
        let mut set = |items: &mut BTreeMap<Key, V>, k: Key, v: Option<V>| {
            let old = match v {
                Some(v) if items.get(&k) == Some(&v) => return,
                Some(v) => items.insert(k.clone(), v),
                None => items.remove(&k),
            };
            if old.is_some() || items.contains_key(&k) {
                changed.push((k, old));
            }
        };
        match ev {
            watcher::Event::Init => self.listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                if let (Some(list), Some(v)) = (self.listing.as_mut(), view(&o)) {
                    list.insert(key(&o), v);
                }
            }
            watcher::Event::InitDone => {
                let mut listing = self.listing.take().unwrap_or_default();
                let gone: Vec<Key> = self.items.keys().filter(|k| !listing.contains_key(*k)).cloned().collect();
                for k in gone {
                    set(&mut self.items, k, None);
                }
                while let Some((k, v)) = listing.pop_first() {
                    set(&mut self.items, k, Some(v));
                }
                self.listed = true;
            }
            watcher::Event::Apply(o) => set(&mut self.items, key(&o), view(&o)),
            watcher::Event::Delete(o) => set(&mut self.items, key(&o), None),
        }
        changed
    }
}

/// The cluster as last seen.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) node: String,
    /// This node's zone (`topology.kubernetes.io/zone`), read once at start.
    pub(super) zone: Option<String>,
    pub(super) pods: Store<PodView>,
    pub(super) namespaces: Store<BTreeMap<String, String>>,
    pub(super) services: Store<ServiceView>,
    pub(super) slices: Store<SliceView>,
    pub(super) policies: Store<Arc<Policy>>,
    /// Namespaces' and service accounts' names, each kept once.
    pub(super) names: Names,
    /// Whether the whole model has gone out once (after every first list).
    pub(super) published: bool,
}

pub(super) enum Change {
    // Boxed: objects are large, and one change is in flight at a time.
    Pod(Box<watcher::Event<Pod>>),
    Namespace(Box<watcher::Event<Namespace>>),
    Service(Box<watcher::Event<K8sService>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Policy(Box<watcher::Event<DynamicObject>>),
    /// The cluster has no AuthorizationPolicy resource: there are none.
    NoPolicies,
}

impl State {
    /// Applies a watcher event; returns the model's changes. Nothing before
    /// every resource has been listed once (the control thread neither
    /// captures nor enrols on half a picture); then the whole model once,
    /// then only what each event changed.
    pub(super) fn apply(&mut self, change: Change) -> Vec<model::Change> {
        let mut pods: BTreeSet<Key> = BTreeSet::new();
        let mut services: BTreeSet<Key> = BTreeSet::new();
        let mut namespaces: BTreeSet<Arc<str>> = BTreeSet::new();
        let mut policies: Vec<model::Change> = Vec::new();
        match change {
            Change::Pod(ev) => {
                let node = &self.node;
                pods.extend(
                    self.pods.apply(*ev, &self.names, |p| view(p, node, &self.names)).into_iter().map(|(k, _)| k),
                )
            }
            Change::Namespace(ev) => {
                let ns_view = |n: &Namespace| Some(ours(n.labels(), &[MESH_LABEL, MTLS_LABEL]));
                for ((_, ns), _) in self.namespaces.apply(*ev, &self.names, ns_view) {
                    // Every pod of the namespace: its membership may follow.
                    let from = (ns.clone(), Arc::from(""));
                    pods.extend(self.pods.items.range(from..).take_while(|(k, _)| k.0 == ns).map(|(k, _)| k.clone()));
                    namespaces.insert(ns);
                }
            }
            Change::Service(ev) => {
                services.extend(self.services.apply(*ev, &self.names, service_view).into_iter().map(|(k, _)| k))
            }
            Change::Policy(ev) => {
                for ((ns, name), _) in self.policies.apply(*ev, &self.names, policy_view) {
                    let now = self.policies.items.get(&(ns.clone(), name.clone())).cloned();
                    policies.push(model::Change::Policy(ObjectRef { namespace: ns, name }, now));
                }
            }
            Change::NoPolicies => {
                // No such resource (any more: a CRD deleted takes its
                // objects with it).
                self.policies.listed = true;
                for ((ns, name), _) in std::mem::take(&mut self.policies.items) {
                    policies.push(model::Change::Policy(ObjectRef { namespace: ns, name }, None));
                }
            }
            Change::Slice(ev) => {
                let (node, zone) = (&self.node, self.zone.as_deref());
                for ((ns, name), old) in self.slices.apply(*ev, &self.names, |s| slice_view(s, node, zone)) {
                    services.extend(old.map(|v| (ns.clone(), v.service)));
                    services.extend(self.slices.items.get(&(ns.clone(), name)).map(|v| (ns, v.service.clone())));
                }
            }
        }
        if !self.published {
            // The policies too (or word that there are none): a pod served
            // before its policies are in would be open to every client.
            let lists = [self.pods.listed, self.namespaces.listed, self.services.listed, self.slices.listed];
            if !(lists.iter().all(|l| *l) && self.policies.listed) {
                return Vec::new();
            }
            self.published = true;
            pods = self.pods.items.keys().cloned().collect();
            services = self.services.items.keys().cloned().collect();
            namespaces = self.namespaces.items.keys().map(|(_, n)| n.clone()).collect();
            policies = self
                .policies
                .items
                .iter()
                .map(|((ns, name), p)| {
                    model::Change::Policy(ObjectRef { namespace: ns.clone(), name: name.clone() }, Some(p.clone()))
                })
                .collect();
        }
        let namespaces = namespaces.into_iter().map(|ns| {
            let labels = self.namespaces.items.get(&(Arc::from(""), ns.clone()));
            model::Change::Namespace(ns.to_string(), labels.map(|l| model::opted_in(Some(l))))
        });
        let pods = pods.into_iter().map(|k| {
            let w = self.workload(&k);
            model::Change::Workload(ObjectRef { namespace: k.0, name: k.1 }, w)
        });
        let services = services.into_iter().map(|k| {
            let s = self.service(&k);
            model::Change::Service(ObjectRef { namespace: k.0, name: k.1 }, s)
        });
        // Namespaces first: a sandbox the API has not shown yet is known by
        // its namespace's membership. Policies before the pods they guard.
        namespaces.chain(policies).chain(pods).chain(services).collect()
    }

    /// The workload a pod is now.
    pub(super) fn workload(&self, key: &Key) -> Option<Workload> {
        let p = self.pods.items.get(key)?;
        let ns_labels = self.namespaces.items.get(&(Arc::from(""), key.0.clone()));
        Some(Workload {
            namespace: key.0.clone(),
            name: key.1.clone(),
            service_account: p.service_account.clone(),
            addresses: p.addresses.clone(),
            local: p.local,
            netns: None,
            client_address: p.annotations.get(CLIENT_ADDRESS).map(String::as_str) != Some("off"),
            mode: membership(p.host_network, ns_labels, &p.labels, &p.annotations),
            labels: p.labels.clone(),
            strict: ns_labels.and_then(|l| l.get(MTLS_LABEL)).map(String::as_str) == Some("strict"),
        })
    }

    /// A Service with its EndpointSlices, as it is now (`None`: gone, or
    /// headless).
    pub(super) fn service(&self, key: &Key) -> Option<Service> {
        let v = self.services.items.get(key).filter(|v| !v.cluster_ips.is_empty())?;
        // The namespace's slices, those of this Service.
        let from = (key.0.clone(), Arc::from(""));
        let slices = self
            .slices
            .items
            .range(from..)
            .take_while(|(k, _)| k.0 == key.0)
            .filter(|(_, s)| s.service == key.1)
            .map(|(_, s)| s.slice.clone())
            .collect();
        Some(Service {
            namespace: key.0.to_string(),
            name: key.1.to_string(),
            cluster_ips: v.cluster_ips.clone(),
            ports: v.ports.clone(),
            client_ip_affinity: v.client_ip_affinity,
            node_local: v.node_local,
            zone_hints: v.zone_hints,
            slices,
        })
    }
}
