//! The cluster as last seen, and each watch event turned into the model's
//! changes for only the objects it touched.
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Service as K8sService},
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

/// One resource as last seen, by (namespace, name). The first list is
/// applied whole at its end (nothing is published before every resource is
/// listed); a relist object by object as it comes (a pod created meanwhile
/// is not held back until a list of the whole cluster ends), and at its end
/// the objects it did not show (gone while the watch was down) go.
#[derive(Debug)]
pub(super) struct Store<V> {
    pub(super) items: BTreeMap<Key, V>,
    /// The first list, in progress, in the order it comes.
    pub(super) listing: Option<Vec<(Key, V)>>,
    /// A relist in progress: the objects it showed so far.
    relisted: Option<Vec<Key>>,
    pub(super) listed: bool,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Self { items: BTreeMap::new(), listing: None, relisted: None, listed: false }
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
        view: impl Fn(&Key, &K) -> Option<V>,
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
            // A list over objects already held (a relist; or a first list
            // restarted after some went out) is reconciled object by object.
            watcher::Event::Init if self.listed || !self.items.is_empty() => self.relisted = Some(Vec::new()),
            watcher::Event::Init => self.listing = Some(Vec::new()),
            watcher::Event::InitApply(o) => {
                let k = key(&o);
                let v = view(&k, &o);
                if let Some(seen) = self.relisted.as_mut() {
                    seen.push(k.clone());
                    set(&mut self.items, k, v);
                } else if let (Some(list), Some(v)) = (self.listing.as_mut(), v) {
                    list.push((k, v));
                }
            }
            watcher::Event::InitDone if self.relisted.is_some() => {
                let mut seen = self.relisted.take().unwrap_or_default();
                seen.sort();
                let gone: Vec<Key> = self.items.keys().filter(|k| seen.binary_search(k).is_err()).cloned().collect();
                for k in gone {
                    set(&mut self.items, k, None);
                }
                self.listed = true;
            }
            watcher::Event::InitDone => {
                // Nothing is held yet (see `Init`): the map is built in one
                // go, its nodes full; inserted one by one in key order they
                // stay half empty (at 100,000 pods, 6 MB). Of a key listed
                // twice, the later wins (`collect` keeps the last).
                let listing = self.listing.take().unwrap_or_default();
                changed.extend(listing.iter().map(|(k, _)| (k.clone(), None)));
                self.items = listing.into_iter().collect();
                self.listed = true;
            }
            watcher::Event::Apply(o) => {
                let k = key(&o);
                let v = view(&k, &o);
                set(&mut self.items, k, v)
            }
            watcher::Event::Delete(o) => set(&mut self.items, key(&o), None),
        }
        changed
    }
}

/// A namespace's labels (ours), if it is known.
fn namespace_labels<'a>(
    namespaces: &'a BTreeMap<Key, BTreeMap<String, String>>,
    ns: &Arc<str>,
) -> Option<&'a BTreeMap<String, String>> {
    namespaces.get(&(Arc::from(""), ns.clone()))
}

/// A pod as kept: the workload it is, shared with the model (the agent
/// holds every pod of the cluster, so once), and what its membership is
/// derived from besides its labels and its namespace's, to derive it again
/// when the namespace's labels change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PodEntry {
    pub(super) workload: Arc<Workload>,
    host_network: bool,
    /// Our annotations only.
    annotations: BTreeMap<String, String>,
}

impl PodEntry {
    /// The pod `key` as `view` shows it, in a namespace with these labels.
    fn new(key: &Key, view: PodView, ns_labels: Option<&BTreeMap<String, String>>) -> Self {
        let PodView { service_account, local, addresses, host_network, labels, annotations } = view;
        let workload = Workload {
            namespace: key.0.clone(),
            name: key.1.clone(),
            service_account,
            addresses,
            local,
            netns: None,
            client_address: annotations.get(CLIENT_ADDRESS).map(String::as_str) != Some("off"),
            mode: membership(host_network, ns_labels, &labels, &annotations),
            labels,
            strict: ns_labels.and_then(|l| l.get(MTLS_LABEL)).map(String::as_str) == Some("strict"),
        };
        Self { workload: Arc::new(workload), host_network, annotations }
    }

    /// The same pod in a namespace whose labels are now these.
    fn relabelled(&self, ns_labels: Option<&BTreeMap<String, String>>) -> Self {
        let w = &self.workload;
        let mode = membership(self.host_network, ns_labels, &w.labels, &self.annotations);
        let strict = ns_labels.and_then(|l| l.get(MTLS_LABEL)).map(String::as_str) == Some("strict");
        if mode == w.mode && strict == w.strict {
            return self.clone();
        }
        let workload = Arc::new(Workload { mode, strict, ..Workload::clone(w) });
        Self { workload, ..self.clone() }
    }
}

/// The cluster as last seen.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) node: String,
    /// This node's zone (`topology.kubernetes.io/zone`), read once at start.
    pub(super) zone: Option<String>,
    pub(super) pods: Store<PodEntry>,
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
    Pod(Box<watcher::Event<super::slim::SlimPod>>),
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
                let (node, names, namespaces) = (&self.node, &self.names, &self.namespaces.items);
                let kept =
                    |k: &Key, p: &_| Some(PodEntry::new(k, view(p, node, names)?, namespace_labels(namespaces, &k.0)));
                pods.extend(self.pods.apply(*ev, names, kept).into_iter().map(|(k, _)| k))
            }
            Change::Namespace(ev) => {
                let ns_view = |_: &Key, n: &Namespace| Some(ours(n.labels(), &[MESH_LABEL, MTLS_LABEL]));
                for ((_, ns), _) in self.namespaces.apply(*ev, &self.names, ns_view) {
                    // Every pod of the namespace: its membership may follow
                    // (those of a list in progress too).
                    let labels = namespace_labels(&self.namespaces.items, &ns);
                    let from = (ns.clone(), Arc::from(""));
                    for (k, pod) in self.pods.items.range_mut(from.clone()..).take_while(|(k, _)| k.0 == ns) {
                        *pod = pod.relabelled(labels);
                        pods.insert(k.clone());
                    }
                    for (_, pod) in self.pods.listing.iter_mut().flatten().filter(|(k, _)| k.0 == ns) {
                        *pod = pod.relabelled(labels);
                    }
                    namespaces.insert(ns);
                }
            }
            Change::Service(ev) => {
                let view = |_: &Key, s: &K8sService| service_view(s);
                services.extend(self.services.apply(*ev, &self.names, view).into_iter().map(|(k, _)| k))
            }
            Change::Policy(ev) => {
                let view = |_: &Key, o: &DynamicObject| policy_view(o);
                for ((ns, name), _) in self.policies.apply(*ev, &self.names, view) {
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
                for ((ns, name), old) in self.slices.apply(*ev, &self.names, |_, s| slice_view(s, node, zone)) {
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
            return self.everything();
        }
        let namespaces = namespaces.into_iter().map(|ns| {
            let labels = namespace_labels(&self.namespaces.items, &ns);
            model::Change::Namespace(ns.to_string(), labels.map(|l| model::opted_in(Some(l))))
        });
        let pods = pods.into_iter().map(|k| {
            let w = self.workload(&k);
            model::Change::Workload(ObjectRef { namespace: k.0, name: k.1 }, w)
        });
        let services = services.into_iter().map(|k| {
            let s = self.service(&k);
            model::Change::Service(ObjectRef { namespace: k.0, name: k.1 }, s.map(Box::new))
        });
        // Namespaces first: a sandbox the API has not shown yet is known by
        // its namespace's membership. Policies before the pods they guard.
        namespaces.chain(policies).chain(pods).chain(services).collect()
    }

    /// The whole model, once every list is in: made straight from what is
    /// kept, so that at 100,000 pods the one large update is all the first
    /// model costs on top of the state.
    fn everything(&self) -> Vec<model::Change> {
        let object = |k: &Key| ObjectRef { namespace: k.0.clone(), name: k.1.clone() };
        let namespaces = self
            .namespaces
            .items
            .iter()
            .map(|((_, ns), labels)| model::Change::Namespace(ns.to_string(), Some(model::opted_in(Some(labels)))));
        let policies = self.policies.items.iter().map(|(k, p)| model::Change::Policy(object(k), Some(p.clone())));
        let pods = self.pods.items.iter().map(|(k, p)| model::Change::Workload(object(k), Some(p.workload.clone())));
        let services =
            self.services.items.keys().map(|k| model::Change::Service(object(k), self.service(k).map(Box::new)));
        // As below: namespaces, policies, pods, Services.
        namespaces.chain(policies).chain(pods).chain(services).collect()
    }

    /// The workload a pod is now (the one the model holds too).
    pub(super) fn workload(&self, key: &Key) -> Option<Arc<Workload>> {
        Some(self.pods.items.get(key)?.workload.clone())
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
