//! The model from the Kubernetes API: kube-rs watchers of Pods (every node's:
//! meshed pods elsewhere are the destinations we tunnel to; this node's are
//! the ones we enrol), Namespaces (their opt-in label), Services and
//! EndpointSlices (ClusterIPs and their endpoints), on a
//! single-threaded tokio runtime of their own thread. Executors never see
//! it; the control thread receives the model's changes
//! ([`model::Change`]): each event becomes the changes of the objects it
//! touched (a pod; a Namespace's pods, when its label flips; a Service,
//! when it or one of its EndpointSlices changes), never a whole model.
//!
//! kube-rs's watcher lists, then watches from the list's resourceVersion with
//! bookmarks; a dropped connection or an API server restart resumes the
//! watch, and `410 Gone` (history compacted) relists. Each (re)list is
//! applied as a whole when it completes (objects that vanished meanwhile go
//! with it, and only what differs is sent on), so no pod is lost or kept. Errors back off exponentially and are
//! counted per resource ([`Counters`]). Nothing is published until both
//! resources have been listed once: the control thread does not capture or
//! enrol on half a picture.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use crossbeam_channel::Sender;
use futures_util::{stream, Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service as K8sService},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::watcher,
    Api, Client, ResourceExt,
};
use tracing::{info, warn};

use crate::{
    cluster::model::{
        self, membership, ObjectRef, Workload, CLIENT_ADDRESS, MESH_LABEL, MTLS_LABEL, SKIP_INBOUND, SKIP_OUTBOUND,
    },
    cluster::policy::{Parsed, Policy},
    cluster::services::{Endpoint, Hint, Readiness, Service, ServicePort, Slice},
};

pub use dataplane_pki::api::{client, Access};

/// Watch errors (each followed by a retry, relist or resumed watch), per
/// resource, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Pods watch.
    pub pods: AtomicU64,
    /// Namespaces watch.
    pub namespaces: AtomicU64,
    /// Services and EndpointSlices watches.
    pub services: AtomicU64,
    /// AuthorizationPolicies watch.
    pub policies: AtomicU64,
}

/// What a pod contributes to the model: only the fields we use, and of its
/// labels and annotations only ours (a pod's other metadata is most of its
/// size, and an agent keeps every pod of the cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodView {
    service_account: String,
    node: Option<String>,
    addresses: Vec<IpAddr>,
    host_network: bool,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// The labels or annotations among `all` that the model reads.
fn ours(all: &BTreeMap<String, String>, keys: &[&str]) -> BTreeMap<String, String> {
    keys.iter().filter_map(|k| Some((k.to_string(), all.get(*k)?.clone()))).collect()
}

/// What the model keeps of a pod: of one of another node, only our label
/// (the cluster's pods are many); of one of `node`, every label, for the
/// authorization policies that select it.
fn view(pod: &Pod, node: &str) -> Option<PodView> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    // A finished pod's address goes back to the pool: never trust it.
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return None;
    }
    // Every family: a dual-stack pod has one address of each.
    let mut addresses: Vec<IpAddr> =
        status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().filter_map(|ip| ip.ip.parse().ok()).collect();
    if addresses.is_empty() {
        addresses.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    Some(PodView {
        service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()),
        addresses,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        labels: match spec.and_then(|s| s.node_name.as_deref()) == Some(node) {
            true => pod.labels().clone(),
            false => ours(pod.labels(), &[MESH_LABEL]),
        },
        annotations: ours(pod.annotations(), &[SKIP_OUTBOUND, SKIP_INBOUND, CLIENT_ADDRESS]),
    })
}

/// An object's (namespace, name); a Namespace's namespace is empty.
type Key = (String, String);

/// One resource as last seen, by (namespace, name): a (re)list in progress is
/// applied whole at its end, so objects that vanished meanwhile go with it.
#[derive(Debug)]
struct Store<V> {
    items: BTreeMap<Key, V>,
    listing: Option<BTreeMap<Key, V>>,
    listed: bool,
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
        view: impl Fn(&K) -> Option<V>,
    ) -> Vec<(Key, Option<V>)> {
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
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
struct State {
    node: String,
    /// This node's zone (`topology.kubernetes.io/zone`), read once at start.
    zone: Option<String>,
    pods: Store<PodView>,
    namespaces: Store<BTreeMap<String, String>>,
    services: Store<ServiceView>,
    slices: Store<SliceView>,
    policies: Store<Arc<Policy>>,
    /// Whether the whole model has gone out once (after every first list).
    published: bool,
}

enum Change {
    // Boxed: objects are large, and one change is in flight at a time.
    Pod(Box<watcher::Event<Pod>>),
    Namespace(Box<watcher::Event<Namespace>>),
    Service(Box<watcher::Event<K8sService>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Policy(Box<watcher::Event<DynamicObject>>),
    /// The cluster has no AuthorizationPolicy resource: there are none.
    NoPolicies,
}

/// Istio's `security.istio.io/v1` `AuthorizationPolicy` (its CRD ships in
/// `deploy/`, for clusters without Istio).
fn authorization_policies() -> ApiResource {
    ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    }
}

/// A policy as applied here (`None`: not applied: `AUDIT`, `CUSTOM`,
/// waypoints). What cannot be enforced is logged with the policy's name.
fn policy_view(o: &DynamicObject) -> Option<Arc<Policy>> {
    let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
    let spec = o.data.get("spec").cloned().unwrap_or(serde_json::Value::Null);
    match crate::cluster::policy::parse(&ns, &name, &spec) {
        Parsed::Policy(p) => {
            if !p.unsupported.is_empty() {
                warn!(policy = p.name, unsupported = ?p.unsupported,
                      "authorization policy: what needs L7 (or does not parse) is applied the safe way: an ALLOW rule naming it allows nothing, a DENY rule denies by its L4 fields");
            }
            Some(Arc::new(p))
        }
        Parsed::Ignored(why) => {
            info!(policy = %format!("{ns}/{name}"), why, "authorization policy not applied here");
            None
        }
    }
}

/// What a Service contributes: its ClusterIPs (none for a headless one),
/// TCP ports and affinity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceView {
    cluster_ips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    client_ip_affinity: bool,
    /// `internalTrafficPolicy: Local`.
    node_local: bool,
    /// `trafficDistribution` set, or `topology-mode: Auto`: zone hints
    /// followed.
    zone_hints: bool,
}

/// The annotation that asked for zone hints before `trafficDistribution`.
const TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";

fn service_view(s: &K8sService) -> Option<ServiceView> {
    let spec = s.spec.as_ref()?;
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.clone());
    }
    let cluster_ips: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some(ServicePort { name: p.name.clone().unwrap_or_default(), port: u16::try_from(p.port).ok()? })
        })
        .collect();
    Some(ServiceView {
        cluster_ips,
        ports,
        client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
        node_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        zone_hints: spec.traffic_distribution.is_some()
            || matches!(s.annotations().get(TOPOLOGY_MODE).map(String::as_str), Some("Auto" | "auto")),
    })
}

/// What an EndpointSlice contributes: the service it belongs to, its
/// resolved ports and its endpoints (IPv4 and IPv6 slices; FQDN ones are
/// not routed).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SliceView {
    service: String,
    slice: Slice,
}

fn slice_view(s: &EndpointSlice, node: &str, zone: Option<&str>) -> Option<SliceView> {
    if s.address_type != "IPv4" && s.address_type != "IPv6" {
        return None;
    }
    let service = s.labels().get("kubernetes.io/service-name")?.clone();
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u16::try_from(p.port?).ok()?)))
        .collect();
    let endpoints = s
        .endpoints
        .iter()
        .flat_map(|e| {
            // "ready: nil should be interpreted as true"; serving nil is
            // ready; terminating nil is false (discovery/v1).
            let c = e.conditions.as_ref();
            let state =
                Readiness::of(c.and_then(|c| c.ready), c.and_then(|c| c.serving), c.and_then(|c| c.terminating));
            let local = e.node_name.as_deref() == Some(node);
            let zones = e.hints.as_ref().and_then(|h| h.for_zones.as_ref()).filter(|z| !z.is_empty());
            let hint = match (zones, zone) {
                (Some(zones), Some(ours)) if zones.iter().any(|z| z.name == ours) => Hint::Here,
                (Some(_), Some(_)) => Hint::Elsewhere,
                _ => Hint::None,
            };
            e.addresses.iter().filter_map(move |a| Some(Endpoint { addr: a.parse().ok()?, state, local, hint }))
        })
        .collect();
    Some(SliceView { service, slice: Slice { ports, endpoints } })
}

impl State {
    /// Applies a watcher event; returns the model's changes. Nothing before
    /// every resource has been listed once (the control thread neither
    /// captures nor enrols on half a picture); then the whole model once,
    /// then only what each event changed.
    fn apply(&mut self, change: Change) -> Vec<model::Change> {
        let mut pods: BTreeSet<Key> = BTreeSet::new();
        let mut services: BTreeSet<Key> = BTreeSet::new();
        let mut namespaces: BTreeSet<String> = BTreeSet::new();
        let mut policies: Vec<model::Change> = Vec::new();
        match change {
            Change::Pod(ev) => {
                let node = &self.node;
                pods.extend(self.pods.apply(*ev, |p| view(p, node)).into_iter().map(|(k, _)| k))
            }
            Change::Namespace(ev) => {
                let ns_view = |n: &Namespace| Some(ours(n.labels(), &[MESH_LABEL, MTLS_LABEL]));
                for ((_, ns), _) in self.namespaces.apply(*ev, ns_view) {
                    // Every pod of the namespace: its membership may follow.
                    let from = (ns.clone(), String::new());
                    pods.extend(self.pods.items.range(from..).take_while(|(k, _)| k.0 == ns).map(|(k, _)| k.clone()));
                    namespaces.insert(ns);
                }
            }
            Change::Service(ev) => services.extend(self.services.apply(*ev, service_view).into_iter().map(|(k, _)| k)),
            Change::Policy(ev) => {
                for ((ns, name), _) in self.policies.apply(*ev, policy_view) {
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
                for ((ns, name), old) in self.slices.apply(*ev, |s| slice_view(s, node, zone)) {
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
            let labels = self.namespaces.items.get(&(String::new(), ns.clone()));
            model::Change::Namespace(ns, labels.map(|l| model::opted_in(Some(l))))
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
    fn workload(&self, key: &Key) -> Option<Workload> {
        let p = self.pods.items.get(key)?;
        let ns_labels = self.namespaces.items.get(&(String::new(), key.0.clone()));
        Some(Workload {
            namespace: key.0.clone(),
            name: key.1.clone(),
            service_account: p.service_account.clone(),
            addresses: p.addresses.clone(),
            local: p.node.as_deref() == Some(self.node.as_str()),
            netns: None,
            client_address: p.annotations.get(CLIENT_ADDRESS).map(String::as_str) != Some("off"),
            mode: membership(p.host_network, ns_labels, &p.labels, &p.annotations),
            labels: p.labels.clone(),
            strict: ns_labels.and_then(|l| l.get(MTLS_LABEL)).map(String::as_str) == Some("strict"),
        })
    }

    /// A Service with its EndpointSlices, as it is now (`None`: gone, or
    /// headless).
    fn service(&self, key: &Key) -> Option<Service> {
        let v = self.services.items.get(key).filter(|v| !v.cluster_ips.is_empty())?;
        // The namespace's slices, those of this Service.
        let from = (key.0.clone(), String::new());
        let slices = self
            .slices
            .items
            .range(from..)
            .take_while(|(k, _)| k.0 == key.0)
            .filter(|(_, s)| s.service == key.1)
            .map(|(_, s)| s.slice.clone())
            .collect();
        Some(Service {
            namespace: key.0.clone(),
            name: key.1.clone(),
            cluster_ips: v.cluster_ips.clone(),
            ports: v.ports.clone(),
            client_ip_affinity: v.client_ip_affinity,
            node_local: v.node_local,
            zone_hints: v.zone_hints,
            slices,
        })
    }
}

/// Starts the watchers on a thread of their own; every model that differs
/// from the last goes to `tx`. With `node_ca`, the same runtime also requests
/// this node's CA ([`super::nodeca`]). The thread ends when the receivers
/// are gone (each task notices at its next result).
pub fn start(
    access: Access,
    node: String,
    tx: Sender<Vec<model::Change>>,
    node_ca: Option<(super::nodeca::Spec, Sender<Arc<crate::identity::pki::NodeCa>>)>,
) -> anyhow::Result<(Arc<Counters>, Arc<super::nodeca::Counters>)> {
    let counters = Arc::new(Counters::default());
    let ca_counters = Arc::new(super::nodeca::Counters::default());
    let (c, cc) = (counters.clone(), ca_counters.clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // The client is built here, so a bad kubeconfig fails start-up with its
    // reason instead of a retry loop.
    let client = rt.block_on(client(&access))?;
    info!(?access, node, "watching the Kubernetes API");
    thread::Builder::new().name("kube".into()).spawn(move || {
        rt.block_on(async move {
            let requests = async {
                if let Some((spec, ca_tx)) = node_ca {
                    super::nodeca::run(client.clone(), spec, ca_tx, cc).await;
                }
            };
            futures_util::future::join(watch(client.clone(), node, tx, c), requests).await;
        })
    })?;
    Ok((counters, ca_counters))
}

/// A watch whose failures are retried after a back-off (exponential from
/// 0.8 s to 30 s, jittered, as kube-rs's default), except `410 Gone`: an
/// expected answer after an API server restart or a compaction, for which
/// the watcher relists at once (a back-off there only delays every pod
/// created meanwhile).
fn retried<K: Send + 'static>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send {
    let start = (Box::pin(events), watcher::DefaultBackoff::default(), None);
    stream::unfold(start, |(mut events, mut backoff, wait)| async move {
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
        let item = events.next().await?;
        let wait = wait_after(&item, &mut backoff);
        Some((item, (events, backoff, wait)))
    })
}

/// How long to wait before polling a watch again after `item`.
fn wait_after<T>(item: &watcher::Result<T>, backoff: &mut impl kube::runtime::utils::Backoff) -> Option<Duration> {
    match item {
        Ok(_) => {
            backoff.reset();
            None
        }
        Err(watcher::Error::WatchError(status)) if status.code == 410 => None,
        Err(_) => backoff.next(),
    }
}

/// The node's zone label, for Services' zone hints; read once (a node's
/// zone does not change while it runs). `None` if it has none or cannot be
/// read: zone hints are then not followed, as kube-proxy does.
async fn zone_of(client: &Client, node: &str) -> Option<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let read = tokio::time::timeout(Duration::from_secs(10), nodes.get_opt(node)).await;
    match read {
        Ok(Ok(Some(n))) => {
            let zone = n.labels().get(ZONE_LABEL).cloned();
            info!(node, zone = zone.as_deref().unwrap_or("none"), "this node's zone (for Services' zone hints)");
            zone
        }
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            warn!(node, error = %e, "cannot read this node's zone: Services' zone hints are not followed");
            None
        }
        Err(_) => {
            warn!(node, "no answer for this node's zone within 10 s: Services' zone hints are not followed");
            None
        }
    }
}

/// The well-known zone label.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

async fn watch(client: Client, node: String, tx: Sender<Vec<model::Change>>, counters: Arc<Counters>) {
    let pods = retried(watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()))
        .map(|r| r.map(|e| Change::Pod(Box::new(e))).map_err(|e| ("pods", e)));
    let namespaces = retried(watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default()))
        .map(|r| r.map(|e| Change::Namespace(Box::new(e))).map_err(|e| ("namespaces", e)));
    let services = retried(watcher(Api::<K8sService>::all(client.clone()), watcher::Config::default()))
        .map(|r| r.map(|e| Change::Service(Box::new(e))).map_err(|e| ("services", e)));
    let slices = retried(watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default()))
        .map(|r| r.map(|e| Change::Slice(Box::new(e))).map_err(|e| ("endpointslices", e)));
    // A cluster without the resource (no Istio, our CRD not applied) has no
    // policies: said once, then the watch stops asking.
    let policies = retried(watcher(
        Api::<DynamicObject>::all_with(client.clone(), &authorization_policies()),
        watcher::Config::default(),
    ))
    .map(|r| match r {
        Ok(e) => Ok(Change::Policy(Box::new(e))),
        Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.is_not_found() => Ok(Change::NoPolicies),
        // Not ours to read (RBAC without the rule deployment.yaml grants):
        // none can be applied, and pods must not wait for them forever.
        Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 403 => {
            tracing::error!("AuthorizationPolicies cannot be read (forbidden): none is applied; grant list and watch on authorizationpolicies.security.istio.io");
            Ok(Change::NoPolicies)
        }
        Err(e) => Err(("authorizationpolicies", e)),
    })
    .scan(false, |said, r| {
        // "None" once per stretch of 404s (the watch asks again after its
        // back-off); a CRD applied later brings its policies in as usual.
        let none = matches!(r, Ok(Change::NoPolicies));
        let again = none && *said;
        *said = none;
        futures_util::future::ready(Some((!again).then_some(r)))
    })
    .filter_map(futures_util::future::ready);
    let mut changes = std::pin::pin!(stream::select(
        stream::select(stream::select(pods, namespaces), stream::select(services, slices)),
        policies
    ));
    let zone = zone_of(&client, &node).await;
    let mut state = State { node, zone, ..State::default() };
    while let Some(first) = changes.next().await {
        // Take every change already waiting before publishing: a relist of
        // thousands of pods goes out as one update.
        let mut batch = vec![first];
        while let Some(Some(more)) = futures_util::FutureExt::now_or_never(changes.next()) {
            batch.push(more);
        }
        let was_published = state.published;
        let mut update = Vec::new();
        for item in batch {
            match item {
                Ok(change) => update.extend(state.apply(change)),
                Err((resource, e)) => {
                    let counter = match resource {
                        "pods" => &counters.pods,
                        "namespaces" => &counters.namespaces,
                        "authorizationpolicies" => &counters.policies,
                        _ => &counters.services,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    warn!(resource, error = %e, "Kubernetes watch interrupted; resuming (relisting if needed)");
                }
            }
        }
        // The first update goes out even if the cluster is empty: it says
        // that every list is in.
        if (!update.is_empty() || state.published != was_published) && tx.send(update).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
