//! Unit tests of [`super`].
use super::*;
use super::{state::*, views::*};
use crate::cluster::model::{Mode, Model, Outside};
use crate::cluster::{
    model::{self, ObjectRef, MESH_LABEL},
    services::{Endpoint, Hint, Readiness},
};
use std::net::IpAddr;

fn pod(json: serde_json::Value) -> super::slim::SlimPod {
    serde_json::from_value(json).expect("a pod")
}

fn shop_pod(name: &str, ip: &str, node: &str) -> super::slim::SlimPod {
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
    let mut m = Model::default();
    let mut apply = |s: &mut State, c: Change| {
        let changes = s.apply(c);
        let n = changes.len();
        m.apply(changes);
        (n, m.clone())
    };
    apply(&mut s, Change::Pod(Box::new(watcher::Event::Init)));
    apply(&mut s, Change::Pod(Box::new(watcher::Event::InitApply(shop_pod("web-1", "10.0.0.2", "a")))));
    apply(&mut s, Change::Pod(Box::new(watcher::Event::InitApply(shop_pod("web-2", "10.0.1.2", "b")))));
    assert_eq!(apply(&mut s, Change::Pod(Box::new(watcher::Event::InitDone))).0, 0, "namespaces not listed yet");
    apply(&mut s, Change::Namespace(Box::new(watcher::Event::Init)));
    apply(&mut s, Change::Namespace(Box::new(watcher::Event::InitApply(ns("shop", true)))));
    let (n, _) = apply(&mut s, Change::Namespace(Box::new(watcher::Event::InitDone)));
    assert_eq!(n, 0, "services and slices not listed yet");
    // A cluster without the AuthorizationPolicy resource: none (the
    // model waits for that word too).
    assert_eq!(apply(&mut s, Change::NoPolicies).0, 0);
    // A service with a named target port, and its slice.
    let svc: K8sService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "sessionAffinity": "ClientIP",
                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
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
    apply(&mut s, Change::Service(Box::new(watcher::Event::Init)));
    apply(&mut s, Change::Service(Box::new(watcher::Event::InitApply(svc))));
    apply(&mut s, Change::Service(Box::new(watcher::Event::InitDone)));
    apply(&mut s, Change::Slice(Box::new(watcher::Event::Init)));
    apply(&mut s, Change::Slice(Box::new(watcher::Event::InitApply(slice.clone()))));
    let (n, m) = apply(&mut s, Change::Slice(Box::new(watcher::Event::InitDone)));
    assert_eq!(n, 4, "all listed: the whole model, once (a namespace, two pods, one Service)");
    let table = m.service_table();
    let web = table.get("10.96.0.10:80".parse().expect("vip")).expect("the TCP port");
    assert_eq!(web.client_ip_affinity, Some(std::time::Duration::from_secs(60)), "ClientIP, with its timeout");
    let backends: Vec<String> = web.backends.iter().map(|b| format!("{} {}", b.addr, b.meshed)).collect();
    assert_eq!(backends, ["10.0.0.2:8080 true", "10.0.1.2:8080 true"], "ready (or unsaid) only; both pods meshed");
    assert_eq!(table.len(), 1, "the UDP port is not ours");
    assert_eq!(m.meshed_destinations().len(), 2, "both nodes' pods are destinations");
    let local: Vec<_> = m.local().map(|w| &*w.name).collect();
    assert_eq!(local, ["web-1"]);
    // The same slice again (a resync) changes nothing.
    assert_eq!(apply(&mut s, Change::Slice(Box::new(watcher::Event::Apply(slice)))).0, 0);
    // A relist after 410 Gone in which web-1 is gone: it goes, even
    // though no Delete event was seen; web-2, unchanged, is not sent; web-3,
    // new, is sent as soon as the relist shows it, not at its end.
    apply(&mut s, Change::Pod(Box::new(watcher::Event::Init)));
    let (n, m) = apply(&mut s, Change::Pod(Box::new(watcher::Event::InitApply(shop_pod("web-2", "10.0.1.2", "b")))));
    assert_eq!((n, m.workloads().count()), (0, 2), "unchanged: nothing sent, and web-1 serves until the relist ends");
    let (n, m) = apply(&mut s, Change::Pod(Box::new(watcher::Event::InitApply(shop_pod("web-3", "10.0.1.3", "b")))));
    assert_eq!((n, m.workloads().count()), (1, 3), "a new pod at once");
    let (n, m) = apply(&mut s, Change::Pod(Box::new(watcher::Event::InitDone)));
    assert_eq!((n, m.workloads().count()), (1, 2), "only web-1's removal");
    apply(&mut s, Change::Pod(Box::new(watcher::Event::Delete(shop_pod("web-3", "10.0.1.3", "b")))));
    // The namespace loses its label: its pods leave the mesh.
    let (_, m) = apply(&mut s, Change::Namespace(Box::new(watcher::Event::Apply(ns("shop", false)))));
    assert_eq!(m.workloads().next().expect("web-2").mode, Mode::Outside(Outside::NotOptedIn));
    assert!(m.meshed_destinations().is_empty());
    // Another pod's labels or annotations we do not read change nothing.
    let mut noisy = shop_pod("web-2", "10.0.1.2", "b");
    noisy.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
    assert_eq!(apply(&mut s, Change::Pod(Box::new(watcher::Event::Apply(noisy)))).0, 0);
}

#[test]
fn finished_pods_and_host_network_pods_are_read_as_such() {
    let mut done = shop_pod("job", "10.0.0.9", "a");
    done.status.as_mut().expect("status").phase = Some("Succeeded".into());
    assert!(view(&done, "a", &Names::default()).is_none(), "its address may already be another pod's");
    let mut host = shop_pod("agent", "192.168.0.10", "a");
    host.spec.as_mut().expect("spec").host_network = Some(true);
    let v = view(&host, "a", &Names::default()).expect("view");
    assert!(v.host_network);
    let pending = pod(serde_json::json!({
        "metadata": {"name": "p", "namespace": "shop"}, "spec": {"containers": []}
    }));
    let v = view(&pending, "a", &Names::default()).expect("a pod with no address yet");
    assert!(v.addresses.is_empty() && !v.local, "no node yet: not ours");
    assert!(view(&shop_pod("mine", "10.0.0.1", "a"), "a", &Names::default()).expect("view").local);
    assert!(!view(&shop_pod("theirs", "10.0.0.2", "b"), "a", &Names::default()).expect("view").local);
}

#[test]
fn a_dual_stack_pod_has_both_addresses_and_an_ipv6_slice_its_endpoints() {
    let mut dual = shop_pod("web", "10.0.0.5", "a");
    dual.status.as_mut().expect("status").pod_ips =
        Some(["10.0.0.5", "fd00::5"].map(|ip| super::slim::PodIp { ip: ip.into() }).to_vec());
    let v = view(&dual, "a", &Names::default()).expect("view");
    let want: Vec<IpAddr> = vec!["10.0.0.5".parse().expect("ip"), "fd00::5".parse().expect("ip")];
    assert_eq!(v.addresses, want);
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-v6", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv6",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": true}}]
    }))
    .expect("a slice");
    let v = slice_view(&slice, "a", None).expect("an IPv6 slice is routed");
    let want =
        Endpoint { addr: "fd00::5".parse().expect("ip"), state: Readiness::Ready, local: false, hint: Hint::None };
    assert_eq!(v.slice.endpoints, [want]);
    let mut fqdn = slice;
    fqdn.address_type = "FQDN".into();
    assert!(slice_view(&fqdn, "a", None).is_none(), "FQDN slices are not");
}

#[test]
fn policies_come_with_the_model_and_go_with_their_resource() {
    let mut s = State { node: "a".into(), ..State::default() };
    for c in [
        Change::Pod(Box::new(watcher::Event::InitDone)),
        Change::Namespace(Box::new(watcher::Event::InitDone)),
        Change::Service(Box::new(watcher::Event::InitDone)),
        Change::Slice(Box::new(watcher::Event::InitDone)),
    ] {
        assert!(s.apply(c).is_empty(), "the policies are not listed yet");
    }
    let policy: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "db", "namespace": "shop"}, "spec": {"action": "DENY", "rules": [{}]}
    }))
    .expect("a policy");
    s.apply(Change::Policy(Box::new(watcher::Event::Init)));
    s.apply(Change::Policy(Box::new(watcher::Event::InitApply(policy))));
    let first = s.apply(Change::Policy(Box::new(watcher::Event::InitDone)));
    let key = ObjectRef { namespace: "shop".into(), name: "db".into() };
    assert!(first.iter().any(|c| matches!(c, model::Change::Policy(k, Some(_)) if *k == key)), "{first:?}");
    // The resource goes (its CRD deleted): so do its policies.
    let gone = s.apply(Change::NoPolicies);
    assert_eq!(gone, [model::Change::Policy(key, None)]);
}

#[test]
fn endpoint_conditions_and_nodes_are_read_as_kube_proxy_reads_them() {
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.0.0.2"], "nodeName": "a", "conditions": {"ready": true, "serving": true, "terminating": false},
             "hints": {"forZones": [{"name": "z1"}]}},
            {"addresses": ["10.0.0.3"], "nodeName": "b", "conditions": {"ready": false, "serving": true, "terminating": true},
             "hints": {"forZones": [{"name": "z2"}]}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": false, "terminating": true}}]
    }))
    .expect("slice");
    let v = slice_view(&slice, "a", Some("z1")).expect("view");
    let got: Vec<(String, Readiness, bool, Hint)> =
        v.slice.endpoints.iter().map(|e| (e.addr.to_string(), e.state, e.local, e.hint)).collect();
    assert_eq!(
        got,
        [
            ("10.0.0.2".into(), Readiness::Ready, true, Hint::Here),
            ("10.0.0.3".into(), Readiness::Terminating, false, Hint::Elsewhere),
            ("10.0.0.4".into(), Readiness::Out, false, Hint::None)
        ]
    );
    let svc: K8sService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIPs": ["10.96.0.10"], "internalTrafficPolicy": "Local",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .expect("service");
    let v = service_view(&svc).expect("view");
    assert!(v.node_local && !v.zone_hints);
    let svc: K8sService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop", "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
        "spec": {"clusterIPs": ["10.96.0.10"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .expect("service");
    assert!(service_view(&svc).expect("view").zone_hints, "the annotation asks for them");
    let mut svc = svc;
    svc.metadata.annotations = None;
    svc.spec.as_mut().expect("spec").traffic_distribution = Some("PreferClose".into());
    assert!(service_view(&svc).expect("view").zone_hints, "trafficDistribution too");
}

#[test]
fn a_410_is_relisted_within_a_second_spread_and_other_failures_back_off() {
    let mut backoff = watcher::DefaultBackoff::default();
    let gone = kube::core::Status { code: 410, reason: "Expired".into(), ..kube::core::Status::default() };
    let expired: watcher::Result<()> = Err(watcher::Error::WatchError(Box::new(gone)));
    let waits: Vec<Duration> = (0..20).map(|_| wait_after(&expired, &mut backoff).expect("a spread")).collect();
    assert!(waits.iter().all(|w| *w < RELIST_SPREAD), "relisted within the spread: {waits:?}");
    assert!(waits.iter().any(|w| *w != waits[0]), "spread, not one fixed delay: {waits:?}");
    let down: watcher::Result<()> = Err(watcher::Error::NoResourceVersion);
    let first = wait_after(&down, &mut backoff).expect("a back-off");
    assert!(first > Duration::ZERO);
    assert_eq!(wait_after(&Ok(()), &mut backoff), None);
}

/// What 100,000 pods (and 10,000 Services of 10 endpoints) cost, stage by
/// stage, in allocated bytes: `cargo test --release memory_per_pod --
/// --ignored --nocapture`. A measurement, not a check: run by hand.
#[test]
#[ignore]
fn memory_per_pod() {
    let n = 100_000usize;
    let ip = |i: usize| std::net::Ipv4Addr::from(0x0a00_0000 + i as u32 + 1).to_string();
    let heap = || crate::node::sys::heap().0 as f64 / 1e6;
    let mut s = State { node: "node-local".into(), ..State::default() };
    let start = heap();
    let mut out = Vec::new();
    let mut take = |c: Change, s: &mut State| out.extend(s.apply(c));
    take(Change::Namespace(Box::new(watcher::Event::Init)), &mut s);
    for i in 0..200 {
        take(Change::Namespace(Box::new(watcher::Event::InitApply(ns(&format!("ns-{i}"), i < 100)))), &mut s);
    }
    take(Change::Namespace(Box::new(watcher::Event::InitDone)), &mut s);
    take(Change::Pod(Box::new(watcher::Event::Init)), &mut s);
    for i in 0..n {
        let p = pod(serde_json::json!({
            "metadata": {"name": format!("pod-{i}"), "namespace": format!("ns-{}", i % 200),
                         "labels": {"app": format!("svc-{}", i / 10)}},
            "spec": {"nodeName": format!("node-{}", i % 500), "serviceAccountName": "default", "containers": []},
            "status": {"phase": "Running", "podIP": ip(i), "podIPs": [{"ip": ip(i)}]}
        }));
        take(Change::Pod(Box::new(watcher::Event::InitApply(p))), &mut s);
    }
    take(Change::Pod(Box::new(watcher::Event::InitDone)), &mut s);
    let pods = heap();
    take(Change::Service(Box::new(watcher::Event::Init)), &mut s);
    take(Change::Slice(Box::new(watcher::Event::Init)), &mut s);
    for i in 0..n / 10 {
        let (ns, name) = (format!("ns-{}", i % 200), format!("svc-{i}"));
        let vip = std::net::Ipv4Addr::from(0x0a60_0000 + i as u32).to_string();
        let svc: K8sService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": vip, "clusterIPs": [vip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        }))
        .expect("service");
        take(Change::Service(Box::new(watcher::Event::InitApply(svc))), &mut s);
        let endpoints: Vec<serde_json::Value> = (10 * i..10 * i + 10)
            .map(|e| serde_json::json!({"addresses": [ip(e)], "conditions": {"ready": true}, "nodeName": format!("node-{}", e % 500)}))
            .collect();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{name}-1"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints
        }))
        .expect("slice");
        take(Change::Slice(Box::new(watcher::Event::InitApply(slice))), &mut s);
    }
    take(Change::Service(Box::new(watcher::Event::InitDone)), &mut s);
    let services = heap();
    take(Change::Slice(Box::new(watcher::Event::InitDone)), &mut s);
    take(Change::NoPolicies, &mut s);
    let published = heap();
    let mut m = Model::default();
    let (services_changes, rest): (Vec<_>, Vec<_>) =
        std::mem::take(&mut out).into_iter().partition(|c| matches!(c, model::Change::Service(..)));
    let (n_rest, n_services) = (rest.len(), services_changes.len());
    m.apply(rest);
    let model_pods = heap();
    m.apply(services_changes);
    let model = heap();
    println!(
        "model: workloads ({n_rest} changes) {:.1}, then Services ({n_services}) {:.1} (each with its changes dropped)",
        model_pods - published,
        model - model_pods
    );
    println!(
        "MB allocated: pods in the watch state {:.1}, Services and slices {:.1}, the first update (changes) {:.1}, model {:.1} (the changes dropped); total {:.1} ({} changes)",
        pods - start,
        services - pods,
        published - services,
        model - published,
        model - start,
        n
    );
    drop(m);
    println!("without the model: {:.1}", heap() - start);
}
