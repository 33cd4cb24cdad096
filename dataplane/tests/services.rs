//! Services against the real kernel and the test API server: connects to a
//! ClusterIP (which no interface owns) are captured, the data plane picks a
//! ready endpoint and tunnels to it, across two "nodes" on one bridge.
use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::json;
use testworld::{
    apiserver::{endpoint_slice, namespace, pod, service},
    client, eventually, http_get, metric, server, ApiServer, Certs, Cgroup, Dataplane, Netns, NetnsDir, Proc, Seen,
};

const MESH: &str = "dataplane.dev/mesh";
const VIP: &str = "10.96.0.10";

/// A data plane as on a node: the API through a kubeconfig, its pods from a
/// namespace directory, certificates from a directory.
struct Node {
    dp: Dataplane,
    workload: Cgroup,
    _own: Cgroup,
    dir: NetnsDir,
}

fn node(t: &str, api: &ApiServer, certs: &Certs, name: &str) -> Node {
    let (workload, own, dir) = (
        Cgroup::new(t, &format!("w{name}")),
        Cgroup::new(t, &format!("d{name}")),
        NetnsDir::new(&format!("{t}-{name}")),
    );
    let certs_dir = certs.path();
    let args = testworld::node_args(&api.kubeconfig(), name, &dir, &workload, &["--certs", &certs_dir]);
    Node { dp: Dataplane::start(&own, &args), workload, _own: own, dir }
}

fn metrics(n: &Node) -> String {
    http_get(&n.dp.admin(), "/metrics").map(|(_, t)| t).unwrap_or_default()
}

fn served(n: &Node, count: f64) -> bool {
    eventually(Duration::from_secs(5), || metric(&metrics(n), "dataplane_namespaces{state=\"served\"}") == Some(count))
}

fn spread(seen: &[Seen]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in seen {
        *m.entry(s.server.clone()).or_default() += 1;
    }
    m
}

/// The world: a bridge; client pod c (10.77.0.1) and endpoint e1
/// (10.77.0.2) on node-a, endpoint e2 (10.77.0.3) on node-b; service web
/// (VIP:80 → the named port "http", 8080; and VIP:9000 → "admin", 9090 on
/// e1 only).
struct World {
    api: ApiServer,
    a: Node,
    b: Node,
    c: Netns,
    e1: Netns,
    e2: Netns,
    net: Netns,
    _servers: Vec<Proc>,
    _certs: Certs,
}

fn world(t: &str) -> World {
    world_with(t, false)
}

/// The world; `dual`: every pod also holds fd00:77::<n> (the same last
/// digit as its IPv4 address), and the certificates name those too.
fn world_with(t: &str, dual: bool) -> World {
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    // Two zones, a node in each (for zone hints).
    for (name, zone) in [("node-a", "z1"), ("node-b", "z2")] {
        let mut n = testworld::apiserver::node(name, &[]);
        n["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!(zone);
        api.put("nodes", n);
    }
    let v6 = |ip: &str| format!("fd00:77::{}", ip.rsplit('.').next().unwrap_or_default());
    for (name, ip, node) in [("c", "10.77.0.1", "node-a"), ("e1", "10.77.0.2", "node-a"), ("e2", "10.77.0.3", "node-b")]
    {
        let mut p = pod("shop", name, node, Some(ip), json!({"app": "web"}), json!({}));
        if dual {
            p["status"]["podIPs"] = json!([{"ip": ip}, {"ip": v6(ip)}]);
        }
        api.put("pods", p);
    }
    api.put(
        "services",
        service("shop", "web", VIP, &[("http", 80, json!("http")), ("admin", 9000, json!("admin"))], false),
    );
    api.put(
        "endpointslices",
        endpoint_slice(
            "shop",
            "web-1",
            "web",
            &[("http", 8080)],
            &[("10.77.0.2", true, "node-a"), ("10.77.0.3", true, "node-b")],
        ),
    );
    api.put(
        "endpointslices",
        endpoint_slice("shop", "web-2", "web", &[("admin", 9090)], &[("10.77.0.2", true, "node-a")]),
    );
    let mut ips = vec!["10.77.0.1".to_string(), "10.77.0.2".into(), "10.77.0.3".into()];
    if dual {
        ips.extend(["10.77.0.1", "10.77.0.2", "10.77.0.3"].map(v6));
    }
    let certs = Certs::new(t, &ips.iter().map(String::as_str).collect::<Vec<_>>());
    let net = testworld::bridge(t, "net");
    let (c, e1, e2) = (Netns::new(t, "c"), Netns::new(t, "e1"), Netns::new(t, "e2"));
    for (pod, ip) in [(&c, "10.77.0.1"), (&e1, "10.77.0.2"), (&e2, "10.77.0.3")] {
        testworld::plug(&net, pod, ip);
        if dual {
            pod.ip(&["-6", "addr", "add", &format!("{}/64", v6(ip)), "dev", "eth0", "nodad"]);
        }
    }
    let any = if dual { "::" } else { "0.0.0.0" };
    let servers = vec![server(&e1, any, 8080, "e1"), server(&e2, any, 8080, "e2"), server(&e1, any, 9090, "e1-admin")];
    let a = node(t, &api, &certs, "node-a");
    let b = node(t, &api, &certs, "node-b");
    a.dir.add(&c);
    a.dir.add(&e1);
    b.dir.add(&e2);
    assert!(served(&a, 2.0) && served(&b, 1.0), "{}", metrics(&a));
    World { api, a, b, c, e1, e2, net, _servers: servers, _certs: certs }
}

#[test]
fn a_dual_stack_service_is_tunnelled_on_its_ipv6_cluster_ip_to_ipv6_endpoints() {
    let t = testworld::kernel_test!();
    let w = world_with(t, true);
    let vip6 = "fd00:96::10";
    let mut svc = service("shop", "web", VIP, &[("http", 80, json!("http"))], false);
    svc["spec"]["clusterIPs"] = json!([VIP, vip6]);
    svc["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    svc["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    w.api.put("services", svc);
    let mut slice6 = endpoint_slice(
        "shop",
        "web-v6",
        "web",
        &[("http", 8080)],
        &[("fd00:77::2", true, "node-a"), ("fd00:77::3", true, "node-b")],
    );
    slice6["addressType"] = json!("IPv6");
    w.api.put("endpointslices", slice6);
    let marker = "SERVICE-V6-MARKER-41d9";
    let (raw, text) = testworld::capture(&w.net, "br0", || {
        // The model reaches the agents shortly after the objects change.
        let mut seen = Vec::new();
        assert!(
            eventually(Duration::from_secs(5), || {
                seen = client(&w.c, Some(&w.a.workload), vip6, 80, &["--count", "40", "--payload", marker]);
                seen.iter().all(|s| s.peer == "[::1]:18000")
            }),
            "connects to the IPv6 ClusterIP captured: {seen:?}"
        );
        for s in &seen {
            assert_eq!(s.echo, marker, "every byte back: {s:?}");
            assert!(s.server_saw.starts_with("[fd00:77::1]:"), "to an IPv6 endpoint, from c's IPv6 address: {s:?}");
        }
        let by = spread(&seen);
        assert!(by.contains_key("e1") && by.contains_key("e2"), "both endpoints: {by:?}");
    });
    assert!(!raw.windows(marker.len()).any(|x| x == marker.as_bytes()), "no plaintext on the bridge");
    assert!(text.contains("fd00:77::3.18001"), "tunnelled over IPv6 to node-b's endpoint:\n{text}");
}

#[test]
fn a_service_spreads_over_its_endpoints_through_the_tunnel() {
    let t = testworld::kernel_test!();
    let w = world(t);
    // kube-proxy's rule for the ClusterIP, in the client's namespace: were
    // the connect not captured first, it would go to e2 in plaintext.
    let rules = "table ip kubeproxy { chain output { type nat hook output priority -100; \
                 ip daddr 10.96.0.10 tcp dport 80 dnat to 10.77.0.3:8080; }; }";
    let ok = w.c.command(None, "nft", &[rules]).status().expect("nft");
    assert!(ok.success(), "the DNAT rule");
    // A pod has a default route (the ClusterIP is routed, then translated).
    w.c.ip(&["route", "add", "default", "dev", "eth0"]);
    // The rule is real: a process outside the mesh's cgroup goes through it.
    let uncaptured = client(&w.c, None, VIP, 80, &[]);
    assert_eq!((uncaptured[0].server.as_str(), uncaptured[0].peer.as_str()), ("e2", "10.96.0.10:80"), "DNAT works");
    let marker = "SERVICE-MARKER-7c2a";
    let pcap_file = testworld::TempFile(std::env::temp_dir().join(format!("{}.pcap", w.net.name)));
    let pcap = &pcap_file.0;
    let pcap_s = pcap.display().to_string();
    let mut dump = Proc::spawn(
        w.net.command(None, "tcpdump", &["--immediate-mode", "-i", "br0", "-n", "-w", &pcap_s, "tcp"]),
        "tcpdump",
    );
    dump.wait_for("listening on", Duration::from_secs(10));
    let seen = client(&w.c, Some(&w.a.workload), VIP, 80, &["--count", "200", "--payload", marker]);
    assert_eq!(seen.len(), 200);
    for s in &seen {
        assert_eq!((s.peer.as_str(), s.echo.as_str()), ("127.0.0.1:18000", marker), "captured, every byte back");
    }
    let by = spread(&seen);
    println!("spread over the endpoints: {by:?}");
    assert!(by.get("e1").is_some_and(|n| *n >= 40) && by.get("e2").is_some_and(|n| *n >= 40), "{by:?}");
    // The second port, resolved by its own name, reaches e1's admin port.
    let admin = client(&w.c, Some(&w.a.workload), VIP, 9000, &[]);
    assert_eq!(admin[0].server, "e1-admin");
    thread::sleep(Duration::from_millis(200));
    dump.signal("INT");
    dump.wait(Duration::from_secs(10));
    let raw = fs::read(pcap).expect("pcap");
    assert!(!raw.windows(marker.len()).any(|x| x == marker.as_bytes()), "only TLS on the wire");
    // And only port 18001: the capture read back, filtered to anything else.
    let all = Command::new("tcpdump").args(["-n", "-r", &pcap_s, "tcp"]).output().expect("tcpdump -r");
    let other =
        Command::new("tcpdump").args(["-n", "-r", &pcap_s, "tcp and not port 18001"]).output().expect("tcpdump -r");
    assert!(all.status.success() && other.status.success());
    assert!(String::from_utf8_lossy(&all.stdout).lines().count() > 400, "the capture saw the tunnels");
    assert_eq!(String::from_utf8_lossy(&other.stdout).trim(), "", "nothing but 18001 between the pods");
    let text = metrics(&w.a);
    assert_eq!(
        metric(&text, "dataplane_service_connections_total{service=\"shop/web\",route=\"tunnelled\"}"),
        Some(201.0),
        "{text}"
    );
}

#[test]
fn endpoints_that_go_stop_getting_connections_within_a_second() {
    let t = testworld::kernel_test!();
    let w = world(t);
    // e2 becomes not ready.
    let changed = Instant::now();
    w.api.put(
        "endpointslices",
        endpoint_slice(
            "shop",
            "web-1",
            "web",
            &[("http", 8080)],
            &[("10.77.0.2", true, "node-a"), ("10.77.0.3", false, "node-b")],
        ),
    );
    thread::sleep(Duration::from_secs(1).saturating_sub(changed.elapsed()));
    let seen = client(&w.c, Some(&w.a.workload), VIP, 80, &["--count", "40"]);
    assert_eq!(spread(&seen), [("e1".to_string(), 40)].into(), "not-ready e2 gets nothing after a second");
    // Then removed, with e1: the service has no endpoint; a connect is
    // ended at once (reset or closed: not left to the client's 10 s
    // timeout), and counted.
    w.api.delete("endpointslices", "shop", "web-1");
    thread::sleep(Duration::from_secs(1));
    let out = testworld::peer(&w.c, Some(&w.a.workload), &["expect-reset", VIP, "80"]);
    assert!(out[0]["result"] == "reset" || out[0]["result"] == "eof", "{out:?}");
    println!("a connect to a Service with no endpoint ended after {} s", out[0]["seconds"]);
    let text = metrics(&w.a);
    assert!(
        metric(&text, "dataplane_service_connections_total{service=\"shop/web\",route=\"no_endpoint\"}") >= Some(1.0),
        "{text}"
    );
    drop(w.e2);
}

#[test]
fn endpoints_as_kube_proxy_chooses_them_terminating_ones_a_local_policy_and_zone_hints() {
    let t = testworld::kernel_test!();
    let w = world(t);
    let both = [("10.77.0.2", true, "node-a"), ("10.77.0.3", true, "node-b")];
    // A Service whose traffic keeps to the client's node.
    let mut local = service("shop", "local", "10.96.0.13", &[("http", 80, json!(8080))], false);
    local["spec"]["internalTrafficPolicy"] = json!("Local");
    w.api.put("services", local);
    w.api.put("endpointslices", endpoint_slice("shop", "local-1", "local", &[("http", 8080)], &both));
    let only = |vip: &str, want: &str| {
        let seen = client(&w.c, Some(&w.a.workload), vip, 80, &["--count", "20"]);
        spread(&seen) == [(want.to_string(), 20)].into()
    };
    assert!(eventually(Duration::from_secs(5), || only("10.96.0.13", "e1")), "node-a's client: node-a's endpoint only");

    // A Service that prefers the client's zone: each endpoint hinted to its
    // own node's zone, and node-a is in z1.
    let mut near = service("shop", "near", "10.96.0.14", &[("http", 80, json!(8080))], false);
    near["spec"]["trafficDistribution"] = json!("PreferClose");
    w.api.put("services", near);
    let mut hinted = endpoint_slice("shop", "near-1", "near", &[("http", 8080)], &both);
    hinted["endpoints"][0]["hints"] = json!({"forZones": [{"name": "z1"}]});
    hinted["endpoints"][1]["hints"] = json!({"forZones": [{"name": "z2"}]});
    w.api.put("endpointslices", hinted);
    assert!(eventually(Duration::from_secs(5), || only("10.96.0.14", "e1")), "z1's client: z1's endpoint only");

    // Every endpoint of web terminating but still serving (the end of a
    // rollout, a drain): kube-proxy still sends to them, so do we.
    let mut draining = endpoint_slice("shop", "web-1", "web", &[("http", 8080)], &both);
    for e in draining["endpoints"].as_array_mut().expect("endpoints") {
        e["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
    }
    w.api.put("endpointslices", draining.clone());
    thread::sleep(Duration::from_secs(1));
    let seen = client(&w.c, Some(&w.a.workload), VIP, 80, &["--count", "40"]);
    let spread = spread(&seen);
    assert_eq!(spread.values().sum::<usize>(), 40, "every connect served: {spread:?}");
    assert_eq!(spread.len(), 2, "by both terminating endpoints: {spread:?}");
    // One of them ready again: it alone.
    draining["endpoints"][0]["conditions"] = json!({"ready": true, "serving": true, "terminating": false});
    w.api.put("endpointslices", draining);
    assert!(eventually(Duration::from_secs(5), || only(VIP, "e1")), "the ready one, and only it");
}

#[test]
fn session_affinity_and_endpoints_outside_the_mesh() {
    let t = testworld::kernel_test!();
    let w = world(t);
    // A sticky service over both endpoints.
    w.api.put("services", service("shop", "sticky", "10.96.0.11", &[("http", 80, json!(8080))], true));
    w.api.put(
        "endpointslices",
        endpoint_slice(
            "shop",
            "sticky-1",
            "sticky",
            &[("http", 8080)],
            &[("10.77.0.2", true, "node-a"), ("10.77.0.3", true, "node-b")],
        ),
    );
    // A service in a namespace outside the mesh, its endpoint a pod there.
    let e3 = Netns::new(t, "e3");
    testworld::plug(&w.net, &e3, "10.77.0.4");
    let _s3 = server(&e3, "0.0.0.0", 8080, "e3");
    w.api.put("namespaces", namespace("legacy", json!({})));
    w.api.put("pods", pod("legacy", "e3", "node-b", Some("10.77.0.4"), json!({}), json!({})));
    w.api.put("services", service("legacy", "plain", "10.96.0.12", &[("", 80, json!(8080))], false));
    w.api.put(
        "endpointslices",
        endpoint_slice("legacy", "plain-1", "plain", &[("", 8080)], &[("10.77.0.4", true, "node-b")]),
    );
    w.b.dir.add(&e3);
    assert!(eventually(Duration::from_secs(5), || metric(&metrics(&w.b), "dataplane_namespaces{state=\"passed\"}")
        == Some(1.0)));
    // Services and their slices arrive on two watches: a Service may be in
    // before its endpoints (and is refused meanwhile). Wait until both
    // answer.
    let answers = |vip: &str| {
        let out = testworld::peer(&w.c, Some(&w.a.workload), &["expect-reset", vip, "80"]);
        out[0]["result"] == "data"
    };
    assert!(eventually(Duration::from_secs(5), || answers("10.96.0.11") && answers("10.96.0.12")));

    let sticky = client(&w.c, Some(&w.a.workload), "10.96.0.11", 80, &["--count", "30"]);
    assert_eq!(spread(&sticky).len(), 1, "one client, one endpoint: {:?}", spread(&sticky));
    // Affinity is by the client pod's address (a captured client's own is
    // loopback, the same for every pod): five more pods on node-a, each
    // sticking to one endpoint, between them reaching both.
    let more: Vec<(Netns, String)> =
        (11..16).map(|i| (Netns::new(t, &format!("k{i}")), format!("10.77.0.{i}"))).collect();
    for (i, (ns, ip)) in more.iter().enumerate() {
        w._certs.issue(ip, &[]);
        testworld::plug(&w.net, ns, ip);
        w.api.put("pods", pod("shop", &format!("k{i}"), "node-a", Some(ip), json!({}), json!({})));
        w.a.dir.add(ns);
    }
    assert!(served(&w.a, 7.0), "{}", metrics(&w.a));
    let mut reached = BTreeMap::new();
    for (ns, ip) in &more {
        let seen = client(ns, Some(&w.a.workload), "10.96.0.11", 80, &["--count", "5"]);
        let by = spread(&seen);
        assert_eq!(by.len(), 1, "{ip} sticks to one endpoint: {by:?}");
        reached.extend(by);
    }
    assert_eq!(reached.len(), 2, "different pods, different endpoints: {reached:?}");

    let passthrough = || {
        metric(&metrics(&w.a), "dataplane_service_connections_total{service=\"legacy/plain\",route=\"passthrough\"}")
            .unwrap_or(0.0)
    };
    let before = passthrough();
    let plain = client(&w.c, Some(&w.a.workload), "10.96.0.12", 80, &[]);
    // Captured (the ClusterIP is the mesh's to route) but connected to
    // directly: the server sees the client pod's own address, not a tunnel.
    assert_eq!(plain[0].server, "e3");
    assert!(plain[0].server_saw.starts_with("10.77.0.1:"), "reached directly: {:?}", plain[0].server_saw);
    assert_eq!(passthrough(), before + 1.0, "counted as passthrough: {}", metrics(&w.a));
    drop(w.e1);
}

#[test]
fn session_affinity_holds_within_its_timeout_and_expires_after_it() {
    let t = testworld::kernel_test!();
    let w = world(t);
    let slice = |name: &str, service: &str, endpoints: &[&str]| {
        let node = |ip: &str| if ip == "10.77.0.2" { "node-a" } else { "node-b" };
        let eps: Vec<(&str, bool, &str)> = endpoints.iter().map(|ip| (*ip, true, node(ip))).collect();
        endpoint_slice("shop", name, service, &[("http", 8080)], &eps)
    };
    let answers = |vip: &str| {
        let out = testworld::peer(&w.c, Some(&w.a.workload), &["expect-reset", vip, "80"]);
        out[0]["result"] == "data"
    };
    let one = |vip: &str| {
        let seen = client(&w.c, Some(&w.a.workload), vip, 80, &[]);
        seen[0].server.clone()
    };
    // The client's fresh choice between the two endpoints (a Service of its
    // own: the choice depends on the client and the endpoints alone).
    w.api.put("services", service("shop", "probe", "10.96.0.13", &[("http", 80, json!(8080))], true));
    w.api.put("endpointslices", slice("probe-1", "probe", &["10.77.0.2", "10.77.0.3"]));
    assert!(eventually(Duration::from_secs(5), || answers("10.96.0.13")));
    let preferred = one("10.96.0.13");
    let (p, o) = if preferred == "e1" { ("10.77.0.2", "10.77.0.3") } else { ("10.77.0.3", "10.77.0.2") };
    let other = if preferred == "e1" { "e2" } else { "e1" };

    // A Service with a 10 s affinity, at first only the other endpoint.
    let mut brief = service("shop", "brief", "10.96.0.14", &[("http", 80, json!(8080))], true);
    brief["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 10}});
    w.api.put("services", brief);
    w.api.put("endpointslices", slice("brief-1", "brief", &[o]));
    assert!(eventually(Duration::from_secs(5), || answers("10.96.0.14")));
    assert_eq!(one("10.96.0.14"), other);
    // The preferred endpoint joins. A Service made after it proves, once it
    // answers, that the agent has the change (one watch, in order); the
    // client keeps coming back meanwhile, so its time never runs out.
    w.api.put("endpointslices", slice("brief-1", "brief", &[o, p]));
    w.api.put("services", service("shop", "witness", "10.96.0.15", &[("http", 80, json!(8080))], false));
    w.api.put("endpointslices", slice("witness-1", "witness", &[p]));
    assert!(eventually(Duration::from_secs(10), || {
        assert_eq!(one("10.96.0.14"), other, "sticks to its endpoint within the timeout");
        answers("10.96.0.15")
    }));
    assert_eq!(one("10.96.0.14"), other, "with both endpoints known: still where it was");
    // Away for longer than the timeout: chosen afresh.
    thread::sleep(Duration::from_secs(11));
    assert_eq!(one("10.96.0.14"), preferred, "the affinity expired");
    assert_eq!(one("10.96.0.14"), preferred, "and the new choice sticks");
}
