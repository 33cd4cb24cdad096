//! A test API server: the cluster's double, not a mock inside the daemon.
//! It speaks the Kubernetes list/watch protocol over HTTPS with a bearer
//! token, for the resources the data plane reads (Pods, Namespaces, Services,
//! EndpointSlices, DaemonSets...), and the
//! daemon reaches it through kube-rs and a kubeconfig exactly as it would a
//! real cluster:
//!
//! - `GET /api/v1/{pods,namespaces}` (and `/api/v1/namespaces/NS/pods`):
//!   a list with `metadata.resourceVersion`, items without `kind` (as a real
//!   server sends them), `limit`/`continue` pages, `fieldSelector`
//!   (`spec.nodeName`, `metadata.name`, `metadata.namespace`, `=`, `==`, `!=`)
//!   and `labelSelector` (`k=v`, `k!=v`, `k`, `!k`);
//! - `?watch=true&resourceVersion=N`: newline-delimited events after N
//!   (`ADDED`, `MODIFIED`, `DELETED`; an object leaving a selector is a
//!   `DELETED`, entering it an `ADDED`), `BOOKMARK`s every second with
//!   `allowWatchBookmarks=true`, ends after `timeoutSeconds`; a version older
//!   than the compacted history gets the `ERROR` event with a `410 Expired`
//!   Status, as etcd's compaction causes.
//!
//! The tests drive it: create, update and delete objects
//! ([`ApiServer::put`], [`ApiServer::delete`]), expire every watch with
//! `410 Gone` ([`ApiServer::expire`]), and restart it on the same port
//! ([`ApiServer::restart`]), keeping its objects as etcd would.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::Duration,
};

use anyhow::Context;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::Certs;

/// A resource served.
#[derive(Debug, Clone, Copy)]
struct Resource {
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// The group's path prefix, and its apiVersion.
    prefix: &'static str,
    api_version: &'static str,
}

const RESOURCES: [Resource; 10] = [
    Resource { plural: "pods", kind: "Pod", namespaced: true, prefix: "/api/v1/", api_version: "v1" },
    Resource { plural: "namespaces", kind: "Namespace", namespaced: false, prefix: "/api/v1/", api_version: "v1" },
    Resource { plural: "nodes", kind: "Node", namespaced: false, prefix: "/api/v1/", api_version: "v1" },
    Resource { plural: "secrets", kind: "Secret", namespaced: true, prefix: "/api/v1/", api_version: "v1" },
    Resource { plural: "configmaps", kind: "ConfigMap", namespaced: true, prefix: "/api/v1/", api_version: "v1" },
    Resource { plural: "services", kind: "Service", namespaced: true, prefix: "/api/v1/", api_version: "v1" },
    Resource {
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        prefix: "/apis/discovery.k8s.io/v1/",
        api_version: "discovery.k8s.io/v1",
    },
    Resource {
        plural: "daemonsets",
        kind: "DaemonSet",
        namespaced: true,
        prefix: "/apis/apps/v1/",
        api_version: "apps/v1",
    },
    Resource {
        plural: "authorizationpolicies",
        kind: "AuthorizationPolicy",
        namespaced: true,
        prefix: "/apis/security.istio.io/v1/",
        api_version: "security.istio.io/v1",
    },
    Resource {
        plural: "certificatesigningrequests",
        kind: "CertificateSigningRequest",
        namespaced: false,
        prefix: "/apis/certificates.k8s.io/v1/",
        api_version: "certificates.k8s.io/v1",
    },
];

/// The bearer token of the default kubeconfig (a cluster admin).
const TOKEN: &str = "test-token-for-the-data-plane";

/// Who a token authenticates, as the API server records it in a CSR's spec
/// (`username`, `groups`, `extra`: a pod-bound ServiceAccount token adds the
/// node and pod it is bound to).
#[derive(Debug, Clone, Default)]
pub struct User {
    /// `system:serviceaccount:NS:NAME` for a ServiceAccount.
    pub username: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// Extra claims (e.g. `authentication.kubernetes.io/node-name`).
    pub extra: BTreeMap<String, Vec<String>>,
}

impl User {
    /// A ServiceAccount's pod-bound token, for a pod on `node`.
    pub fn service_account_on(namespace: &str, name: &str, node: &str) -> Self {
        let mut extra = BTreeMap::new();
        extra.insert("authentication.kubernetes.io/node-name".to_string(), vec![node.to_string()]);
        extra.insert("authentication.kubernetes.io/pod-name".to_string(), vec![format!("{name}-{node}")]);
        Self {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            extra,
        }
    }
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    resource: &'static str,
    kind: &'static str, // ADDED, MODIFIED, DELETED
    object: Value,
    /// The object before a MODIFIED (for selectors).
    old: Option<Value>,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Event>,
    /// Versions at or below this are gone from the history.
    compacted: u64,
    /// Bumped by [`ApiServer::expire`]: open watches end with 410.
    epoch: u64,
    /// Requests served, by kind (`list pods`, `watch namespaces`...).
    requests: BTreeMap<String, u64>,
    /// Bearer tokens and who they are.
    users: BTreeMap<String, User>,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    /// Wakes open watches: the latest resource version.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: thread::JoinHandle<()>,
}

/// A running test API server with its kubeconfig.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    certs: Certs,
    kubeconfig: PathBuf,
    running: Option<Running>,
}

impl ApiServer {
    /// Starts one on a free loopback port, with a CA and certificate of its
    /// own and a kubeconfig that trusts them.
    pub fn start(test: &str) -> Self {
        Self::try_start(test).unwrap_or_else(|e| panic!("test API server: {e:#}"))
    }

    fn try_start(test: &str) -> anyhow::Result<Self> {
        let certs = Certs::new(&format!("{test}-api"), &["127.0.0.1"]);
        let (changed, _) = tokio::sync::watch::channel(0);
        let mut store = Store::default();
        store.users.insert(
            TOKEN.into(),
            User { username: "kubernetes-admin".into(), groups: vec!["system:masters".into()], ..User::default() },
        );
        let shared = Arc::new(Shared { store: Mutex::new(store), changed });
        let kubeconfig = certs.dir.join("kubeconfig");
        let mut server = Self { addr: "127.0.0.1:0".parse()?, shared, certs, kubeconfig, running: None };
        server.serve()?;
        server.write_kubeconfig(&server.kubeconfig.clone(), TOKEN)?;
        Ok(server)
    }

    fn write_kubeconfig(&self, path: &std::path::Path, token: &str) -> anyhow::Result<()> {
        let kubeconfig = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": format!("https://{}", self.addr),
                "certificate-authority": self.certs.dir.join("ca.crt"),
            }}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        });
        fs::write(path, serde_json::to_vec_pretty(&kubeconfig)?)?;
        Ok(())
    }

    /// A kubeconfig authenticating as `user` (a token of its own), named
    /// `name` in the server's directory.
    pub fn kubeconfig_as(&self, name: &str, user: User) -> String {
        let token = format!("token-{name}-{}", self.shared.store().users.len());
        self.shared.store().users.insert(token.clone(), user);
        let path = self.certs.dir.join(format!("kubeconfig-{name}"));
        self.write_kubeconfig(&path, &token).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.display().to_string()
    }

    /// An object as stored now, if there is one.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let r = resource_of(resource);
        self.shared.store().objects.get(&(r.plural, namespace.to_string(), name.to_string())).cloned()
    }

    /// Every object of a resource, as stored now.
    pub fn all(&self, resource: &str) -> Vec<Value> {
        let r = resource_of(resource);
        self.shared.store().objects.iter().filter(|((p, ..), _)| *p == r.plural).map(|(_, o)| o.clone()).collect()
    }

    /// Creates an object as `user` would through the API (for a CSR, the
    /// server records who asked).
    pub fn create_as(&self, user: &User, resource: &str, object: Value) -> Result<Value, String> {
        create(&self.shared, resource_of(resource), user, object)
    }

    /// The kubeconfig file to give `--kubeconfig`.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig.display().to_string()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn serve(&mut self) -> anyhow::Result<()> {
        let tls = tls_config(&self.certs)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener =
            rt.block_on(tokio::net::TcpListener::bind(self.addr)).with_context(|| format!("binding {}", self.addr))?;
        self.addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        let thread = thread::Builder::new().name("test-apiserver".into()).spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    _ = accept_loop(listener, tls, shared) => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops every connection: clients see the
            // server go away, as in a real restart.
        })?;
        self.running = Some(Running { stop, thread });
        Ok(())
    }

    /// Stops it (every connection drops), waits `down`, and starts it again
    /// on the same port with the same objects and history.
    pub fn restart(&mut self, down: Duration) {
        self.restart_with(down, |_| {});
    }

    /// [`ApiServer::restart`], doing `meanwhile` while it is down (objects
    /// change in etcd while no API server answers).
    pub fn restart_with(&mut self, down: Duration, meanwhile: impl FnOnce(&Self)) {
        self.shutdown();
        meanwhile(self);
        thread::sleep(down);
        self.serve().unwrap_or_else(|e| panic!("restarting the test API server: {e:#}"));
    }

    fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(());
            let _ = r.thread.join();
        }
    }

    /// Creates or replaces an object of `resource` (`pods`, `namespaces`);
    /// returns its new resource version.
    pub fn put(&self, resource: &str, object: Value) -> u64 {
        store_object(&self.shared, resource_of(resource), object)
    }

    /// Deletes an object (namespace `""` for cluster-scoped ones).
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let resource = resource_of(resource).plural;
        let mut s = self.shared.store();
        let Some(mut object) = s.objects.remove(&(resource, namespace.to_string(), name.to_string())) else {
            panic!("deleting {resource} {namespace}/{name}: no such object")
        };
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push(Event { rv, resource, kind: "DELETED", object, old: None });
        drop(s);
        self.shared.changed.send_replace(rv);
    }

    /// Compacts the history to now and ends every open watch with `410
    /// Gone`: watchers must relist.
    pub fn expire(&self) {
        let mut s = self.shared.store();
        s.compacted = s.rv;
        s.history.clear();
        s.epoch += 1;
        let rv = s.rv;
        drop(s);
        self.shared.changed.send_replace(rv);
    }

    /// Forgets the history up to now without ending open watches (they
    /// have seen it): a cluster loaded in bulk before any agent watches
    /// costs nothing to the watches that come after.
    pub fn compact(&self) {
        let mut s = self.shared.store();
        s.compacted = s.rv;
        s.history.clear();
    }

    /// How many requests of a kind (`list pods`, `watch namespaces`) it served.
    pub fn requests(&self, what: &str) -> u64 {
        self.shared.store().requests.get(what).copied().unwrap_or(0)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A pod shaped as the API serves it: on `node`, with `ip` (none: not yet
/// given one by the CNI), labels and annotations.
pub fn pod(namespace: &str, name: &str, node: &str, ip: Option<&str>, labels: Value, annotations: Value) -> Value {
    let mut status = json!({
        "phase": if ip.is_some() { "Running" } else { "Pending" },
        "hostIP": "192.0.2.10",
        "hostIPs": [{"ip": "192.0.2.10"}],
        "qosClass": "BestEffort",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
    });
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "default",
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
        },
        "status": status,
    })
}

/// A node with its pod CIDRs (`spec.podCIDRs`; none, as some CNIs leave it).
pub fn node(name: &str, pod_cidrs: &[&str]) -> Value {
    let mut spec = json!({});
    if let Some(first) = pod_cidrs.first() {
        spec = json!({"podCIDR": first, "podCIDRs": pod_cidrs});
    }
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": spec,
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}], "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

/// A Service with a ClusterIP: `ports` as (name, port, targetPort: a
/// number or a container port's name).
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, Value)],
    client_ip_affinity: bool,
) -> Value {
    let ports: Vec<Value> =
        ports.iter().map(|(n, p, t)| json!({"name": n, "port": p, "targetPort": t, "protocol": "TCP"})).collect();
    json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ipFamilies": ["IPv4"],
            "ports": ports, "sessionAffinity": if client_ip_affinity { "ClientIP" } else { "None" },
            "selector": {"app": name},
        },
        "status": {"loadBalancer": {}},
    })
}

/// An EndpointSlice of service `service`: `ports` as (name, resolved
/// port), `endpoints` as (address, ready, node).
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[(&str, bool, &str)],
) -> Value {
    let ports: Vec<Value> = ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(a, ready, node)| {
            json!({"addresses": [a], "conditions": {"ready": ready, "serving": ready, "terminating": false}, "nodeName": node})
        })
        .collect();
    json!({
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// The data plane's DaemonSet as `deployment.yaml` names it (what its
/// containers ask about when they stop).
pub fn daemonset(namespace: &str, name: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-ds-{name}"), "generation": 1},
        "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                 "template": {"metadata": {"labels": {"app.kubernetes.io/name": name}},
                              "spec": {"containers": [{"name": "dataplane", "image": "dataplane/dataplane:dev"}]}}},
        "status": {"currentNumberScheduled": 1, "desiredNumberScheduled": 1, "numberMisscheduled": 0, "numberReady": 1},
    })
}

/// An Istio `AuthorizationPolicy` with this `spec`.
pub fn authorization_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

/// A namespace with labels.
pub fn namespace(name: &str, labels: Value) -> Value {
    let mut labels = labels;
    labels["kubernetes.io/metadata.name"] = json!(name);
    json!({"metadata": {"name": name, "labels": labels}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn resource_of(plural: &str) -> Resource {
    RESOURCES
        .iter()
        .find(|r| r.plural == plural)
        .copied()
        .unwrap_or_else(|| panic!("the test API server does not serve {plural}"))
}

/// Stores `object` (created or replaced) with a new resource version;
/// returns the version.
fn store_object(shared: &Shared, r: Resource, mut object: Value) -> u64 {
    let mut s = shared.store();
    s.rv += 1;
    let rv = s.rv;
    let (ns, name) = ns_name(&object);
    let key = (r.plural, ns, name.clone());
    object["apiVersion"] = json!(r.api_version);
    object["kind"] = json!(r.kind);
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let old = s.objects.get(&key).cloned();
    let uid = old.as_ref().and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string));
    object["metadata"]["uid"] = json!(uid.unwrap_or_else(|| format!("00000000-0000-4000-8000-{rv:012}")));
    if old.is_none() {
        object["metadata"]["creationTimestamp"] = json!("2026-11-29T00:00:00Z");
    }
    s.objects.insert(key, object.clone());
    let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
    s.history.push(Event { rv, resource: r.plural, kind, object, old });
    drop(s);
    shared.changed.send_replace(rv);
    rv
}

/// A create through the API: 409 if it exists; a CSR gets its requester.
fn create(shared: &Shared, r: Resource, user: &User, mut object: Value) -> Result<Value, String> {
    let (ns, name) = ns_name(&object);
    if name.is_empty() {
        return Err("metadata.name: Required value".into());
    }
    if shared.store().objects.contains_key(&(r.plural, ns.clone(), name.clone())) {
        return Err(format!("{} {name:?} already exists", r.plural));
    }
    if r.plural == "certificatesigningrequests" {
        object["spec"]["username"] = json!(user.username);
        object["spec"]["groups"] = json!(user.groups);
        object["spec"]["extra"] = json!(user.extra);
        object["status"] = json!({});
    }
    store_object(shared, r, object);
    Ok(shared.store().objects.get(&(r.plural, ns, name)).cloned().unwrap_or_default())
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn ns_name(object: &Value) -> (String, String) {
    let m = &object["metadata"];
    (m["namespace"].as_str().unwrap_or_default().to_string(), m["name"].as_str().unwrap_or_default().to_string())
}

fn tls_config(certs: &Certs) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs.dir.join("127.0.0.1.crt"))?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(certs.dir.join("127.0.0.1.key"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

async fn accept_loop(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>, shared: Arc<Shared>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else { return };
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = BoxBody<bytes::Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(bytes::Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// What a request asks for.
struct Query {
    resource: &'static str,
    kind: &'static str,
    r: Resource,
    namespace: Option<String>,
    /// One object (`.../NAME`), and a subresource (`.../NAME/status`).
    name: Option<String>,
    sub: Option<String>,
    params: BTreeMap<String, String>,
}

/// The query, or why the path names nothing served here (a 404).
fn parse(req: &Request<hyper::body::Incoming>) -> Result<Query, String> {
    let path = req.uri().path();
    let not_found = || format!("the server could not find {path}");
    let (prefix, rest) = RESOURCES
        .iter()
        .find_map(|r| path.strip_prefix(r.prefix).map(|rest| (r.prefix, rest)))
        .ok_or_else(not_found)?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    // `namespaces/NS/PLURAL...` is a namespaced path when PLURAL is a
    // namespaced resource of this group; otherwise (`namespaces/NAME/status`)
    // it names a Namespace.
    let namespaced_path =
        |plural: &str| RESOURCES.iter().any(|r| r.prefix == prefix && r.namespaced && r.plural == plural);
    let (namespace, rest) = match parts.as_slice() {
        ["namespaces", ns, plural, rest @ ..] if namespaced_path(plural) => (Some(ns.to_string()), {
            let mut v = vec![*plural];
            v.extend_from_slice(rest);
            v
        }),
        other => (None, other.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(not_found()),
    };
    let r = RESOURCES.iter().find(|r| r.plural == plural && r.prefix == prefix).copied().ok_or_else(not_found)?;
    if namespace.is_some() && !r.namespaced {
        return Err(not_found());
    }
    let params = form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
    Ok(Query { resource: r.plural, kind: r.kind, r, namespace, name, sub, params })
}

/// Whether an object passes the request's namespace and selectors.
fn selected(q: &Query, object: &Value) -> Result<bool, String> {
    let (ns, name) = ns_name(object);
    if q.namespace.as_ref().is_some_and(|want| *want != ns) {
        return Ok(false);
    }
    if let Some(sel) = q.params.get("fieldSelector").filter(|s| !s.is_empty()) {
        for term in sel.split(',') {
            let (key, negate, want) = split_term(term)?;
            let have = match key {
                "spec.nodeName" => object["spec"]["nodeName"].as_str().unwrap_or_default().to_string(),
                "metadata.name" => name.clone(),
                "metadata.namespace" => ns.clone(),
                other => return Err(format!("field label not supported: {other}")),
            };
            if (have == want) == negate {
                return Ok(false);
            }
        }
    }
    if let Some(sel) = q.params.get("labelSelector").filter(|s| !s.is_empty()) {
        let labels = &object["metadata"]["labels"];
        for term in sel.split(',') {
            let ok = if let Some(key) = term.strip_prefix('!') {
                labels.get(key).is_none()
            } else if term.contains('=') {
                let (key, negate, want) = split_term(term)?;
                (labels.get(key).and_then(Value::as_str) == Some(want)) != negate
            } else {
                labels.get(term).is_some()
            };
            if !ok {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn split_term(term: &str) -> Result<(&str, bool, &str), String> {
    if let Some((k, v)) = term.split_once("!=") {
        Ok((k, true, v))
    } else if let Some((k, v)) = term.split_once("==") {
        Ok((k, false, v))
    } else if let Some((k, v)) = term.split_once('=') {
        Ok((k, false, v))
    } else {
        Err(format!("invalid selector term {term:?}"))
    }
}

async fn handle(req: Request<hyper::body::Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    let token =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(user) = token.and_then(|t| shared.store().users.get(t).cloned()) else {
        return full(StatusCode::UNAUTHORIZED, status(401, "Unauthorized", "Unauthorized"));
    };
    let q = match parse(&req) {
        Ok(q) => q,
        Err(why) => return full(StatusCode::NOT_FOUND, status(404, "NotFound", &why)),
    };
    if let Err(e) = selected(&q, &json!({})) {
        return full(StatusCode::BAD_REQUEST, status(400, "BadRequest", &e));
    }
    let method = req.method().clone();
    let watch = q.params.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (&method, &q.name, watch) {
        (&hyper::Method::GET, None, true) => "watch",
        (&hyper::Method::GET, None, false) => "list",
        (&hyper::Method::GET, Some(_), _) => "get",
        (&hyper::Method::POST, None, _) => "create",
        (&hyper::Method::PATCH, Some(_), _) => "patch",
        _ => return full(StatusCode::METHOD_NOT_ALLOWED, status(405, "MethodNotAllowed", "not served here")),
    };
    let what = match &q.sub {
        Some(sub) => format!("{verb} {}/{sub}", q.resource),
        None => format!("{verb} {}", q.resource),
    };
    *shared.store().requests.entry(what).or_default() += 1;
    let body = if matches!(verb, "create" | "patch") {
        match req.into_body().collect().await.map(|b| b.to_bytes()) {
            Ok(b) => match serde_json::from_slice::<Value>(&b) {
                Ok(v) => v,
                Err(e) => return full(StatusCode::BAD_REQUEST, status(400, "BadRequest", &e.to_string())),
            },
            Err(e) => return full(StatusCode::BAD_REQUEST, status(400, "BadRequest", &e.to_string())),
        }
    } else {
        Value::Null
    };
    let key = |name: &String| (q.resource, q.namespace.clone().unwrap_or_default(), name.clone());
    match verb {
        "watch" => watch_response(q, shared),
        "list" => list(&q, shared),
        "get" => match q.name.as_ref().and_then(|n| shared.store().objects.get(&key(n)).cloned()) {
            Some(o) => full(StatusCode::OK, o),
            None => full(StatusCode::NOT_FOUND, status(404, "NotFound", &format!("{} not found", q.resource))),
        },
        "create" => match create(shared, q.r, &user, {
            let mut body = body;
            if let (Some(ns), true) = (&q.namespace, body["metadata"]["namespace"].is_null()) {
                body["metadata"]["namespace"] = json!(ns);
            }
            body
        }) {
            Ok(o) => full(StatusCode::CREATED, o),
            Err(e) if e.contains("already exists") => full(StatusCode::CONFLICT, status(409, "AlreadyExists", &e)),
            Err(e) => full(StatusCode::UNPROCESSABLE_ENTITY, status(422, "Invalid", &e)),
        },
        _ => {
            let Some(name) = q.name.as_ref() else { return full(StatusCode::NOT_FOUND, status(404, "NotFound", "")) };
            let Some(mut object) = shared.store().objects.get(&key(name)).cloned() else {
                return full(
                    StatusCode::NOT_FOUND,
                    status(404, "NotFound", &format!("{} {name} not found", q.resource)),
                );
            };
            // A subresource takes only its own part of the patch, as the
            // real one does: approval the conditions, status the rest of
            // the status; the main resource never the status.
            let patch = match q.sub.as_deref() {
                Some("approval") => json!({"status": {"conditions": body["status"]["conditions"]}}),
                Some("status") => json!({"status": body["status"]}),
                None => {
                    let mut b = body;
                    if let Some(m) = b.as_object_mut() {
                        m.remove("status");
                    }
                    b
                }
                Some(other) => {
                    return full(StatusCode::NOT_FOUND, status(404, "NotFound", &format!("no subresource {other}")))
                }
            };
            // A CSR's certificate, once issued, cannot be changed (the real
            // server's validation: "updates may not modify existing
            // certificate content").
            let issued = object["status"]["certificate"].as_str().filter(|c| !c.is_empty()).map(str::to_string);
            let new = patch["status"]["certificate"].as_str();
            if let (Some(old), Some(new)) = (issued, new) {
                if q.resource == "certificatesigningrequests" && old != new {
                    let why = "status.certificate: Forbidden: updates may not modify existing certificate content";
                    return full(StatusCode::UNPROCESSABLE_ENTITY, status(422, "Invalid", why));
                }
            }
            merge(&mut object, &patch);
            store_object(shared, q.r, object);
            full(StatusCode::OK, shared.store().objects.get(&key(name)).cloned().unwrap_or_default())
        }
    }
}

fn list(q: &Query, shared: &Arc<Shared>) -> Response<Body> {
    let s = shared.store();
    // A continue token is "<list version>/<namespace>/<name>" of the last
    // item sent: a page always comes from the current objects (good enough
    // for a test double), and costs its own length, not the list's, so a
    // cluster of 100,000 pods lists in pages as fast as a real server.
    let (rv, after) = match q.params.get("continue") {
        Some(c) => match c.split_once('/').and_then(|(rv, key)| Some((rv.parse().ok()?, key.split_once('/')?))) {
            Some((rv, (ns, name))) => (rv, Some((ns.to_string(), name.to_string()))),
            None => return full(StatusCode::BAD_REQUEST, status(400, "BadRequest", "invalid continue token")),
        },
        None => (s.rv, None),
    };
    let limit = q.params.get("limit").and_then(|l| l.parse().ok()).filter(|l: &usize| *l > 0).unwrap_or(usize::MAX);
    let from = match &after {
        Some((ns, name)) => std::ops::Bound::Excluded((q.resource, ns.clone(), name.clone())),
        None => std::ops::Bound::Included((q.resource, String::new(), String::new())),
    };
    let mut selected_items = s
        .objects
        .range((from, std::ops::Bound::Unbounded))
        .take_while(|((r, ..), _)| *r == q.resource)
        .filter(|(_, o)| selected(q, o).unwrap_or(false));
    let mut page = Vec::new();
    let mut last = None;
    for (key, o) in selected_items.by_ref().take(limit) {
        let mut o = o.clone();
        // Items of a list carry no kind, as a real server sends them.
        if let Some(m) = o.as_object_mut() {
            m.remove("kind");
            m.remove("apiVersion");
        }
        page.push(o);
        last = Some(key);
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let (Some((_, ns, name)), Some(_)) = (last, selected_items.next()) {
        metadata["continue"] = json!(format!("{rv}/{ns}/{name}"));
    }
    full(
        StatusCode::OK,
        json!({"kind": format!("{}List", q.kind), "apiVersion": "v1", "metadata": metadata, "items": page}),
    )
}

fn watch_response(q: Query, shared: &Arc<Shared>) -> Response<Body> {
    let from: u64 = q.params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.params.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(q.params.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, Infallible>>(64);
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut changed = shared.changed.subscribe();
        let mut last = from;
        let epoch = shared.store().epoch;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            let lines = {
                let s = shared.store();
                if s.epoch != epoch || last < s.compacted {
                    let msg = format!("too old resource version: {last} ({})", s.compacted + 1);
                    vec![json!({"type": "ERROR", "object": status(410, "Expired", &msg)})]
                } else {
                    // The history is in version order: only what is newer
                    // is looked at.
                    let newer = s.history.partition_point(|e| e.rv <= last);
                    let out: Vec<Value> = s.history[newer..]
                        .iter()
                        .filter(|e| e.resource == q.resource)
                        .filter_map(|e| event(&q, e))
                        .collect();
                    last = s.rv.max(last);
                    out
                }
            };
            let expired = lines.first().is_some_and(|l| l["type"] == "ERROR");
            for l in lines {
                if tx.send(Ok(Frame::data(bytes::Bytes::from(format!("{l}\n"))))).await.is_err() {
                    return;
                }
            }
            if expired {
                return;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = tick.tick() => if bookmarks {
                    let line = json!({"type": "BOOKMARK", "object": {"kind": q.kind, "apiVersion": "v1",
                                      "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(Ok(Frame::data(bytes::Bytes::from(format!("{line}\n"))))).await.is_err() {
                        return;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx)).boxed();
    let mut r = Response::new(body);
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

/// A watch event as the client sees it, or none when the object is not
/// (and was not) selected.
fn event(q: &Query, e: &Event) -> Option<Value> {
    let now = selected(q, &e.object).unwrap_or(false);
    let before = e.old.as_ref().map(|o| selected(q, o).unwrap_or(false));
    let kind = match (e.kind, now, before) {
        ("MODIFIED", true, Some(false)) => "ADDED",
        ("MODIFIED", false, Some(true)) => "DELETED",
        (_, true, _) => e.kind,
        _ => return None,
    };
    Some(json!({"type": kind, "object": e.object}))
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
