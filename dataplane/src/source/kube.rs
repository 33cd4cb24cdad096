//! The model from the Kubernetes API: kube-rs watchers of Pods (every node's:
//! meshed pods elsewhere are the destinations we tunnel to; this node's are
//! the ones we enrol), Namespaces (their opt-in label), Services and
//! EndpointSlices (ClusterIPs and their endpoints), on a
//! single-threaded tokio runtime of their own thread. Executors never see
//! it; the control thread receives whole models.
//!
//! kube-rs's watcher lists, then watches from the list's resourceVersion with
//! bookmarks; a dropped connection or an API server restart resumes the
//! watch, and `410 Gone` (history compacted) relists. Each (re)list is
//! applied as a whole when it completes (objects that vanished meanwhile go
//! with it), so no pod is lost or kept. Errors back off exponentially and are
//! counted per resource ([`Counters`]). Nothing is published until both
//! resources have been listed once: the control thread does not capture or
//! enrol on half a picture.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
};

use crossbeam_channel::Sender;
use futures_util::{stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service as K8sService},
    discovery::v1::EndpointSlice,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};
use tracing::{info, warn};

use crate::{
    model::{membership, Model, Workload, CLIENT_ADDRESS},
    services::{Service, ServicePort, Slice},
};

/// Where the client finds the API server.
#[derive(Debug, Clone)]
pub enum Access {
    /// The ServiceAccount token and `KUBERNETES_SERVICE_*` of a pod.
    InCluster,
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
}

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
}

/// What a pod contributes to the model.
#[derive(Debug, Clone)]
struct PodView {
    namespace: String,
    name: String,
    service_account: String,
    node: Option<String>,
    addresses: Vec<IpAddr>,
    host_network: bool,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn view(pod: &Pod) -> Option<PodView> {
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
        namespace: pod.namespace()?,
        name: pod.name_any(),
        service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()),
        addresses,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        labels: pod.labels().clone(),
        annotations: pod.annotations().clone(),
    })
}

/// One resource as last seen, by (namespace, name): a (re)list in progress is
/// applied whole at its end, so objects that vanished meanwhile go with it.
#[derive(Debug)]
struct Store<V> {
    items: BTreeMap<(String, String), V>,
    listing: Option<BTreeMap<(String, String), V>>,
    listed: bool,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Self { items: BTreeMap::new(), listing: None, listed: false }
    }
}

impl<V> Store<V> {
    /// Applies a watcher event; `view` reduces an object to what we keep
    /// (`None`: not kept, e.g. a finished pod).
    fn apply<K: ResourceExt>(&mut self, ev: watcher::Event<K>, view: impl Fn(&K) -> Option<V>) {
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        match ev {
            watcher::Event::Init => self.listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                if let (Some(list), Some(v)) = (self.listing.as_mut(), view(&o)) {
                    list.insert(key(&o), v);
                }
            }
            watcher::Event::InitDone => {
                self.items = self.listing.take().unwrap_or_default();
                self.listed = true;
            }
            watcher::Event::Apply(o) => match view(&o) {
                Some(v) => {
                    self.items.insert(key(&o), v);
                }
                None => {
                    self.items.remove(&key(&o));
                }
            },
            watcher::Event::Delete(o) => {
                self.items.remove(&key(&o));
            }
        }
    }
}

/// The cluster as last seen.
#[derive(Debug, Default)]
struct State {
    node: String,
    pods: Store<PodView>,
    namespaces: Store<BTreeMap<String, String>>,
    services: Store<ServiceView>,
    slices: Store<SliceView>,
}

enum Change {
    // Boxed: objects are large, and one change is in flight at a time.
    Pod(Box<watcher::Event<Pod>>),
    Namespace(Box<watcher::Event<Namespace>>),
    Service(Box<watcher::Event<K8sService>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
}

/// What a Service contributes: its ClusterIPs (none for a headless one),
/// TCP ports and affinity.
#[derive(Debug, Clone)]
struct ServiceView {
    cluster_ips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    client_ip_affinity: bool,
}

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
    Some(ServiceView { cluster_ips, ports, client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP") })
}

/// What an EndpointSlice contributes: the service it belongs to, its
/// resolved ports and its endpoints (IPv4 and IPv6 slices; FQDN ones are
/// not routed).
#[derive(Debug, Clone)]
struct SliceView {
    service: String,
    slice: Slice,
}

fn slice_view(s: &EndpointSlice) -> Option<SliceView> {
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
            // "ready: nil should be interpreted as true" (discovery/v1).
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            e.addresses.iter().filter_map(move |a| Some((a.parse::<IpAddr>().ok()?, ready)))
        })
        .collect();
    Some(SliceView { service, slice: Slice { ports, endpoints } })
}

impl State {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Pod(ev) => self.pods.apply(*ev, view),
            Change::Namespace(ev) => self.namespaces.apply(*ev, |n| Some(n.labels().clone())),
            Change::Service(ev) => self.services.apply(*ev, service_view),
            Change::Slice(ev) => self.slices.apply(*ev, slice_view),
        }
    }

    fn model(&self) -> Option<Arc<Model>> {
        if !(self.pods.listed && self.namespaces.listed && self.services.listed && self.slices.listed) {
            return None;
        }
        let ns_labels = |ns: &str| self.namespaces.items.get(&(String::new(), ns.to_string()));
        let workloads = self
            .pods
            .items
            .values()
            .map(|p| Workload {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                service_account: p.service_account.clone(),
                addresses: p.addresses.clone(),
                local: p.node.as_deref() == Some(self.node.as_str()),
                netns: None,
                client_address: p.annotations.get(CLIENT_ADDRESS).map(String::as_str) != Some("off"),
                mode: membership(p.host_network, ns_labels(&p.namespace), &p.labels, &p.annotations),
            })
            .collect();
        let mut slices: BTreeMap<(&str, &str), Vec<Slice>> = BTreeMap::new();
        for ((ns, _), v) in &self.slices.items {
            slices.entry((ns.as_str(), v.service.as_str())).or_default().push(v.slice.clone());
        }
        let services = self
            .services
            .items
            .iter()
            .filter(|(_, v)| !v.cluster_ips.is_empty())
            .map(|((ns, name), v)| Service {
                namespace: ns.clone(),
                name: name.clone(),
                cluster_ips: v.cluster_ips.clone(),
                ports: v.ports.clone(),
                client_ip_affinity: v.client_ip_affinity,
                slices: slices.get(&(ns.as_str(), name.as_str())).cloned().unwrap_or_default(),
            })
            .collect();
        Some(Model::with_services(workloads, services))
    }
}

/// Starts the watchers on a thread of their own; every model that differs
/// from the last goes to `tx`. With `node_ca`, the same runtime also requests
/// this node's CA ([`super::nodeca`]). The thread ends when the receivers
/// are gone (each task notices at its next result).
pub fn start(
    access: Access,
    node: String,
    tx: Sender<Arc<Model>>,
    node_ca: Option<(super::nodeca::Spec, Sender<Arc<crate::pki::NodeCa>>)>,
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

/// A client for the API server `access` names.
pub async fn client(access: &Access) -> anyhow::Result<Client> {
    use anyhow::Context;
    let config = match access {
        Access::InCluster => kube::Config::incluster().context("in-cluster Kubernetes configuration")?,
        Access::Kubeconfig(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
    };
    Client::try_from(config).context("building the Kubernetes client")
}

async fn watch(client: Client, node: String, tx: Sender<Arc<Model>>, counters: Arc<Counters>) {
    let pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(|r| r.map(|e| Change::Pod(Box::new(e))).map_err(|e| ("pods", e)));
    let namespaces = watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(|r| r.map(|e| Change::Namespace(Box::new(e))).map_err(|e| ("namespaces", e)));
    let services = watcher(Api::<K8sService>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(|r| r.map(|e| Change::Service(Box::new(e))).map_err(|e| ("services", e)));
    let slices = watcher(Api::<EndpointSlice>::all(client), watcher::Config::default())
        .default_backoff()
        .map(|r| r.map(|e| Change::Slice(Box::new(e))).map_err(|e| ("endpointslices", e)));
    let mut changes =
        std::pin::pin!(stream::select(stream::select(pods, namespaces), stream::select(services, slices)));
    let mut state = State { node, ..State::default() };
    let mut last: Option<Arc<Model>> = None;
    while let Some(first) = changes.next().await {
        // Take every change already waiting before building a model: a
        // relist of thousands of pods publishes once.
        let mut batch = vec![first];
        while let Some(Some(more)) = futures_util::FutureExt::now_or_never(changes.next()) {
            batch.push(more);
        }
        for item in batch {
            match item {
                Ok(change) => state.apply(change),
                Err((resource, e)) => {
                    let counter = match resource {
                        "pods" => &counters.pods,
                        "namespaces" => &counters.namespaces,
                        _ => &counters.services,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    warn!(resource, error = %e, "Kubernetes watch interrupted; resuming (relisting if needed)");
                }
            }
        }
        if let Some(model) = state.model() {
            if last.as_deref() != Some(&*model) {
                if tx.send(model.clone()).is_err() {
                    return;
                }
                last = Some(model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, Outside, MESH_LABEL};

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("a pod")
    }

    fn shop_pod(name: &str, ip: &str, node: &str) -> Pod {
        pod(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1"},
            "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
    }

    fn ns(name: &str, meshed: bool) -> Namespace {
        let labels = if meshed { serde_json::json!({MESH_LABEL: "enabled"}) } else { serde_json::json!({}) };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}
        }))
        .expect("a namespace")
    }

    #[test]
    fn nothing_is_published_before_both_lists_and_a_relist_replaces_the_whole() {
        let mut s = State { node: "a".into(), ..State::default() };
        s.apply(Change::Pod(Box::new(watcher::Event::Init)));
        s.apply(Change::Pod(Box::new(watcher::Event::InitApply(shop_pod("web-1", "10.0.0.2", "a")))));
        s.apply(Change::Pod(Box::new(watcher::Event::InitApply(shop_pod("web-2", "10.0.1.2", "b")))));
        s.apply(Change::Pod(Box::new(watcher::Event::InitDone)));
        assert!(s.model().is_none(), "namespaces not listed yet");
        s.apply(Change::Namespace(Box::new(watcher::Event::Init)));
        s.apply(Change::Namespace(Box::new(watcher::Event::InitApply(ns("shop", true)))));
        s.apply(Change::Namespace(Box::new(watcher::Event::InitDone)));
        assert!(s.model().is_none(), "services and slices not listed yet");
        // A service with a named target port, and its slice.
        let svc: K8sService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "sessionAffinity": "ClientIP",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }))
        .expect("service");
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                          {"addresses": ["10.0.1.2"]},
                          {"addresses": ["10.0.1.3"], "conditions": {"ready": false}}]
        }))
        .expect("slice");
        s.apply(Change::Service(Box::new(watcher::Event::Init)));
        s.apply(Change::Service(Box::new(watcher::Event::InitApply(svc))));
        s.apply(Change::Service(Box::new(watcher::Event::InitDone)));
        s.apply(Change::Slice(Box::new(watcher::Event::Init)));
        s.apply(Change::Slice(Box::new(watcher::Event::InitApply(slice))));
        s.apply(Change::Slice(Box::new(watcher::Event::InitDone)));
        let m = s.model().expect("all listed");
        let table = m.service_table(&m.meshed_destinations());
        let web = table.get("10.96.0.10:80".parse().expect("vip")).expect("the TCP port");
        assert!(web.client_ip_affinity);
        let backends: Vec<String> = web.backends.iter().map(|b| format!("{} {}", b.addr, b.meshed)).collect();
        assert_eq!(backends, ["10.0.0.2:8080 true", "10.0.1.2:8080 true"], "ready (or unsaid) only; both pods meshed");
        assert_eq!(table.len(), 1, "the UDP port is not ours");
        assert_eq!(m.meshed_destinations().len(), 2, "both nodes' pods are destinations");
        let local: Vec<_> = m.workloads().iter().filter(|w| w.local).map(|w| w.name.as_str()).collect();
        assert_eq!(local, ["web-1"]);
        // A relist after 410 Gone in which web-1 is gone: it goes, even
        // though no Delete event was seen.
        s.apply(Change::Pod(Box::new(watcher::Event::Init)));
        s.apply(Change::Pod(Box::new(watcher::Event::InitApply(shop_pod("web-2", "10.0.1.2", "b")))));
        assert_eq!(s.model().expect("model").workloads().len(), 2, "the old view serves until the relist ends");
        s.apply(Change::Pod(Box::new(watcher::Event::InitDone)));
        assert_eq!(s.model().expect("model").workloads().len(), 1);
        // The namespace loses its label: its pods leave the mesh.
        s.apply(Change::Namespace(Box::new(watcher::Event::Apply(ns("shop", false)))));
        let m = s.model().expect("model");
        assert_eq!(m.workloads()[0].mode, Mode::Outside(Outside::NotOptedIn));
        assert!(m.meshed_destinations().is_empty());
    }

    #[test]
    fn finished_pods_and_host_network_pods_are_read_as_such() {
        let mut done = shop_pod("job", "10.0.0.9", "a");
        done.status.as_mut().expect("status").phase = Some("Succeeded".into());
        assert!(view(&done).is_none(), "its address may already be another pod's");
        let mut host = shop_pod("agent", "192.168.0.10", "a");
        host.spec.as_mut().expect("spec").host_network = Some(true);
        let v = view(&host).expect("view");
        assert!(v.host_network);
        let pending = pod(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop"}, "spec": {"containers": []}
        }));
        let v = view(&pending).expect("a pod with no address yet");
        assert!(v.addresses.is_empty() && v.node.is_none());
    }

    #[test]
    fn a_dual_stack_pod_has_both_addresses_and_an_ipv6_slice_its_endpoints() {
        let mut dual = shop_pod("web", "10.0.0.5", "a");
        dual.status.as_mut().expect("status").pod_ips =
            Some(["10.0.0.5", "fd00::5"].map(|ip| k8s_openapi::api::core::v1::PodIP { ip: ip.into() }).to_vec());
        let v = view(&dual).expect("view");
        let want: Vec<IpAddr> = vec!["10.0.0.5".parse().expect("ip"), "fd00::5".parse().expect("ip")];
        assert_eq!(v.addresses, want);
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-v6", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": true}}]
        }))
        .expect("a slice");
        let v = slice_view(&slice).expect("an IPv6 slice is routed");
        assert_eq!(v.slice.endpoints, [("fd00::5".parse().expect("ip"), true)]);
        let mut fqdn = slice;
        fqdn.address_type = "FQDN".into();
        assert!(slice_view(&fqdn).is_none(), "FQDN slices are not");
    }
}
