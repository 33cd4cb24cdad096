//! Enrolment from the Kubernetes API against the real kernel: the data plane
//! runs with `--kubeconfig` against the test API server (list/watch over
//! HTTPS, through kube-rs as on a cluster), pods are namespaces found in a
//! watched directory, and membership follows labels and annotations.
use std::{
    fs,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use serde_json::json;
use testworld::{
    apiserver::{endpoint_slice, namespace, pod, service},
    client, eventually, http_get, metric, server, two_pods, ApiServer, Certs, Cgroup, Dataplane, Netns, NetnsDir, Proc,
};

const MESH: &str = "dataplane.dev/mesh";

fn metrics(dp: &Dataplane) -> String {
    http_get(&dp.admin(), "/metrics").map(|(_, t)| t).unwrap_or_default()
}

fn namespaces_in(dp: &Dataplane, state: &str) -> Option<f64> {
    metric(&metrics(dp), &format!("dataplane_namespaces{{state=\"{state}\"}}"))
}

fn bpf(dp: &Dataplane, decision: &str) -> f64 {
    metric(&metrics(dp), &format!("dataplane_bpf_decisions_total{{decision=\"{decision}\"}}")).unwrap_or(-1.0)
}

/// The data plane as the DaemonSet runs it, with a kubeconfig instead of
/// the in-cluster configuration.
fn start(api: &ApiServer, certs: &Certs, workload: &Cgroup, own: &Cgroup, dir: &NetnsDir, extra: &[&str]) -> Dataplane {
    let certs_dir = certs.path();
    let mut more = vec!["--certs", certs_dir.as_str()];
    more.extend_from_slice(extra);
    Dataplane::start(own, &testworld::node_args(&api.kubeconfig(), "node-a", dir, workload, &more))
}

/// A bare connect from `ns` in `cgroup`: what the kernel said.
fn raw_connect(ns: &Netns, cgroup: &Cgroup, host: &str, port: u16) -> Output {
    let code =
        format!("import socket\ns = socket.create_connection(('{host}', {port}), timeout=3)\nprint(s.getpeername())");
    ns.command(Some(cgroup), "python3", &["-c", &code]).output().expect("python3")
}

fn shop_pod(
    name: &str,
    ip: Option<&str>,
    labels: serde_json::Value,
    annotations: serde_json::Value,
) -> serde_json::Value {
    pod("shop", name, "node-a", ip, labels, annotations)
}

#[test]
fn pods_join_and_leave_the_mesh_by_label_and_annotation() {
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    api.put("namespaces", namespace("kube-system", json!({})));
    api.put("pods", shop_pod("a", Some("10.77.0.1"), json!({}), json!({})));
    api.put("pods", shop_pod("b", Some("10.77.0.2"), json!({}), json!({"dataplane.dev/skip-inbound-ports": "8081"})));
    // A pod on another node: a meshed destination, never ours to serve.
    api.put("pods", pod("shop", "far", "node-b", Some("10.77.9.9"), json!({}), json!({})));
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    let (a, b, b_if) = two_pods(t);
    let _sa = server(&a, "0.0.0.0", 8080, "a");
    let _sb = server(&b, "0.0.0.0", 8080, "b");
    let _sb2 = server(&b, "0.0.0.0", 8081, "b-skipped");
    dir.add(&a);
    dir.add(&b);
    let dp = start(&api, &certs, &workload, &own, &dir, &[]);
    // Ready means: the model is in, and both pods were served before the
    // programs were attached.
    assert_eq!(namespaces_in(&dp, "served"), Some(2.0), "{}", metrics(&dp));
    assert!(api.requests("list pods") >= 1 && api.requests("watch pods") >= 1, "listed, then watched");

    // Meshed to meshed: tunnelled, only TLS on B's link.
    let marker = "KUBE-MARKER-5d1e";
    let pcap_file = testworld::TempFile(std::env::temp_dir().join(format!("{}.pcap", b.name)));
    let pcap = &pcap_file.0;
    let pcap_s = pcap.display().to_string();
    let mut dump = Proc::spawn(
        b.command(None, "tcpdump", &["--immediate-mode", "-i", &b_if, "-n", "-w", &pcap_s, "tcp"]),
        "tcpdump",
    );
    dump.wait_for("listening on", Duration::from_secs(10));
    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &["--payload", marker]);
    assert_eq!(
        (seen[0].peer.as_str(), seen[0].server.as_str(), seen[0].echo.as_str()),
        ("127.0.0.1:18000", "b", marker)
    );
    // The annotated port goes direct, in plaintext, as asked.
    let skipped = client(&a, Some(&workload), "10.77.0.2", 8081, &[]);
    assert_eq!((skipped[0].peer.as_str(), skipped[0].server.as_str()), ("10.77.0.2:8081", "b-skipped"));
    thread::sleep(Duration::from_millis(200));
    dump.signal("INT");
    dump.wait(Duration::from_secs(10));
    let raw = fs::read(pcap).expect("pcap");
    assert!(raw.len() > 500, "the capture saw the traffic");
    assert!(!raw.windows(marker.len()).any(|w| w == marker.as_bytes()), "only TLS on the link");

    // B opts out with its label: withdrawn without a restart; it is now
    // outside the mesh both ways.
    api.put("pods", shop_pod("b", Some("10.77.0.2"), json!({MESH: "disabled"}), json!({})));
    assert!(eventually(Duration::from_secs(3), || namespaces_in(&dp, "passed") == Some(1.0)), "{}", metrics(&dp));
    assert_eq!(namespaces_in(&dp, "served"), Some(1.0));
    let direct = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!(direct[0].peer, "10.77.0.2:8080", "B is no longer a meshed destination");
    let skipped_before = bpf(&dp, "skipped_netns");
    let from_b = client(&b, Some(&workload), "10.77.0.1", 8080, &[]);
    assert_eq!(from_b[0].peer, "10.77.0.1:8080", "B's own connects are left alone");
    assert_eq!(bpf(&dp, "skipped_netns"), skipped_before + 1.0);

    // Back in: served again.
    api.put("pods", shop_pod("b", Some("10.77.0.2"), json!({}), json!({})));
    assert!(eventually(Duration::from_secs(3), || namespaces_in(&dp, "served") == Some(2.0)), "{}", metrics(&dp));
    assert!(eventually(Duration::from_secs(3), || client(&b, Some(&workload), "10.77.0.1", 8080, &[])[0].peer
        == "127.0.0.1:18000"));

    // The namespace loses its label: both pods leave the mesh.
    api.put("namespaces", namespace("shop", json!({})));
    assert!(eventually(Duration::from_secs(3), || namespaces_in(&dp, "passed") == Some(2.0)), "{}", metrics(&dp));
    assert_eq!(client(&a, Some(&workload), "10.77.0.2", 8080, &[])[0].peer, "10.77.0.2:8080");

    let text = metrics(&dp);
    assert_eq!(metric(&text, "dataplane_pods{membership=\"namespace_not_opted_in\"}"), Some(2.0), "{text}");
    let count = metric(&text, "dataplane_enrolment_latency_seconds_count").expect("enrolment latency");
    assert!(count >= 3.0, "three enrolments measured: {text}");
    drop(dp);
}

#[test]
fn a_pod_the_api_has_not_shown_yet_is_refused_never_plaintext() {
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    // B is known and meshed; A exists on the node (namespace, address, a
    // process about to connect) before the API shows its address.
    api.put("pods", shop_pod("b", Some("10.77.0.2"), json!({}), json!({})));
    api.put("pods", shop_pod("a", None, json!({}), json!({})));
    // A Service into the mesh (B), and one whose endpoint is outside it
    // (a server in A itself, reached through a kube-proxy-like DNAT rule in
    // A, as the API server's own Service is reached).
    api.put("services", service("shop", "b", "10.96.0.21", &[("http", 80, json!(8080))], false));
    api.put("endpointslices", endpoint_slice("shop", "b-1", "b", &[("http", 8080)], &[("10.77.0.2", true, "node-a")]));
    api.put("services", service("default", "api", "10.96.0.20", &[("https", 443, json!(8081))], false));
    api.put(
        "endpointslices",
        endpoint_slice("default", "api-1", "api", &[("https", 8081)], &[("10.77.0.1", true, "node-z")]),
    );
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    let (a, b, b_if) = two_pods(t);
    let _sb = server(&b, "0.0.0.0", 8080, "b");
    dir.add(&b);
    let _api_in_a = server(&a, "10.77.0.1", 8081, "api");
    let rules = "table ip kubeproxy { chain output { type nat hook output priority -100; \
                 ip daddr 10.96.0.20 tcp dport 443 dnat to 10.77.0.1:8081; }; }";
    assert!(a.command(None, "nft", &[rules]).status().expect("nft").success(), "the DNAT rule");
    a.ip(&["route", "add", "10.96.0.0/16", "dev", "lo"]);
    let dp = start(&api, &certs, &workload, &own, &dir, &[]);
    dir.add(&a);
    assert!(eventually(Duration::from_secs(3), || namespaces_in(&dp, "unclaimed") == Some(1.0)), "{}", metrics(&dp));

    let pcap_file = testworld::TempFile(std::env::temp_dir().join(format!("{}.pcap", b.name)));
    let pcap = &pcap_file.0;
    let pcap_s = pcap.display().to_string();
    let filter = "tcp port 8080";
    let mut dump = Proc::spawn(
        b.command(None, "tcpdump", &["--immediate-mode", "-i", &b_if, "-n", "-w", &pcap_s, filter]),
        "tcpdump",
    );
    dump.wait_for("listening on", Duration::from_secs(10));
    let refused = raw_connect(&a, &workload, "10.77.0.2", 8080);
    assert!(!refused.status.success(), "refused: {}", String::from_utf8_lossy(&refused.stdout));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("PermissionError") || err.contains("Operation not permitted"), "{err}");
    assert_eq!(bpf(&dp, "refused_unenrolled"), 1.0);
    // A destination outside the mesh (A's own address, not shown by the
    // API yet) is not affected: the kernel's own answer, a closed port.
    let direct = raw_connect(&a, &workload, "10.77.0.1", 9);
    let err = String::from_utf8_lossy(&direct.stderr);
    assert!(err.contains("ConnectionRefused"), "not refused by us but by the closed port: {err}");
    // Nor is a Service none of whose endpoints is meshed: the connect goes
    // as it would without us (through the DNAT rule, to the server in A)...
    let api_svc = raw_connect(&a, &workload, "10.96.0.20", 443);
    assert!(api_svc.status.success(), "reached: {}", String::from_utf8_lossy(&api_svc.stderr));
    assert!(String::from_utf8_lossy(&api_svc.stdout).contains("10.96.0.20"), "as addressed, not captured");
    // ...while one into the mesh is refused like the meshed pod itself.
    let into_mesh = raw_connect(&a, &workload, "10.96.0.21", 80);
    assert!(String::from_utf8_lossy(&into_mesh.stderr).contains("PermissionError"), "{into_mesh:?}");
    assert_eq!(bpf(&dp, "refused_unenrolled"), 2.0);

    // The API shows A's address: served, and its connects are tunnelled.
    let shown = Instant::now();
    api.put("pods", shop_pod("a", Some("10.77.0.1"), json!({}), json!({})));
    assert!(eventually(Duration::from_secs(3), || namespaces_in(&dp, "served") == Some(2.0)), "{}", metrics(&dp));
    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "b"));
    println!("served {:?} after the API showed the address", shown.elapsed());
    thread::sleep(Duration::from_millis(200));
    dump.signal("INT");
    dump.wait(Duration::from_secs(10));
    let raw = fs::read(pcap).expect("pcap");
    // pcap global header (24 bytes) and nothing else: no packet to port
    // 8080 ever crossed the link, refused or tunnelled.
    assert_eq!(raw.len(), 24, "no plaintext packet to the meshed port on the wire");
}

#[test]
fn watches_survive_api_restarts_and_410_gone() {
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    api.put("pods", shop_pod("a", Some("10.77.0.1"), json!({}), json!({})));
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2", "10.77.0.3"]);
    let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    let (a, b, _) = two_pods(t);
    let _sa = server(&a, "0.0.0.0", 8080, "a");
    dir.add(&a);
    dir.add(&b);
    let mut api = api;
    let dp = start(&api, &certs, &workload, &own, &dir, &[]);
    assert_eq!(namespaces_in(&dp, "served"), Some(1.0));
    assert_eq!(namespaces_in(&dp, "unclaimed"), Some(1.0), "b is not in the API yet");

    // 410 Gone mid-stream; b appears meanwhile: relisted and served.
    let lists = api.requests("list pods");
    let expired = Instant::now();
    api.expire();
    api.put("pods", shop_pod("b", Some("10.77.0.2"), json!({}), json!({})));
    assert!(eventually(Duration::from_secs(10), || namespaces_in(&dp, "served") == Some(2.0)), "{}", metrics(&dp));
    println!("b served {:?} after 410 Gone", expired.elapsed());
    assert!(api.requests("list pods") > lists, "relisted after 410");

    // The API server goes away; while it is down b is deleted and history
    // is compacted (the restarted server cannot replay it): when it is
    // back, the data plane relists and withdraws b.
    let down = Instant::now();
    api.restart_with(Duration::from_millis(700), |api| {
        api.delete("pods", "shop", "b");
        api.expire();
    });
    assert!(
        eventually(Duration::from_secs(15), || namespaces_in(&dp, "served") == Some(1.0)
            && namespaces_in(&dp, "unclaimed") == Some(1.0)),
        "{}",
        metrics(&dp)
    );
    println!("b withdrawn {:?} after the API server went down", down.elapsed());
    let text = metrics(&dp);
    let restarts = metric(&text, "dataplane_watch_restarts_total{resource=\"pods\"}").expect("watch restarts");
    assert!(restarts >= 1.0, "{text}");
    // Nothing was served twice: one listener pair per executor per pod.
    let dp_out = dp.proc.output();
    let served_b = dp_out.iter().filter(|l| l.contains("namespace served")).count();
    assert_eq!(served_b, 2, "a once, b once: {dp_out:#?}");
    // And the data plane still serves a, whose connects are tunnelled.
    let seen = client(&a, Some(&workload), "10.77.0.1", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "a"));
}

#[test]
fn host_network_pods_are_left_alone_with_the_daemonsets_flags() {
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    api.put("namespaces", namespace("monitoring", json!({MESH: "enabled"})));
    api.put("pods", shop_pod("p", Some("10.77.6.2"), json!({}), json!({})));
    // A monitoring agent with hostNetwork in an opted-in namespace: its
    // address is the node's, and it is never meshed.
    let mut agent = pod("monitoring", "agent", "node-a", Some("10.77.6.1"), json!({}), json!({}));
    agent["spec"]["hostNetwork"] = json!(true);
    api.put("pods", agent);
    let certs = Certs::new(t, &["10.77.6.2"]);
    let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    // The data plane runs in this test's namespace, as the DaemonSet runs in
    // the host network; P hangs off it by a veth of our own.
    let p = Netns::new(t, "p");
    let host_if = format!("h{}", &p.name[..p.name.len().min(14)]);
    let ok = std::process::Command::new("ip")
        .args(["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &p.name])
        .status()
        .expect("ip link add");
    assert!(ok.success(), "veth to {}", p.name);
    let ip = |args: &[&str]| {
        assert!(std::process::Command::new("ip").args(args).status().expect("ip").success(), "ip {args:?}")
    };
    ip(&["addr", "add", "10.77.6.1/24", "dev", &host_if]);
    ip(&["link", "set", &host_if, "up"]);
    p.ip(&["addr", "add", "10.77.6.2/24", "dev", "eth0"]);
    p.ip(&["link", "set", "eth0", "up"]);
    let _srv = server(&p, "0.0.0.0", 8080, "p");
    dir.add(&p);
    let dp = start(&api, &certs, &workload, &own, &dir, &[]);
    assert_eq!(namespaces_in(&dp, "served"), Some(1.0), "{}", metrics(&dp));

    // The agent: in the workloads' cgroup, in the node's namespace,
    // connecting to the meshed pod. It reaches P directly.
    let py = testworld::peers_py();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{}exec \"$@\"", workload.join_prefix()))
        .args(["sh", "python3", &py, "connect", "10.77.6.2", "8080"])
        .output()
        .expect("host-network client");
    assert!(out.status.success(), "the host-network connect works: {}", String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!((seen["peer"].as_str(), seen["server"].as_str()), (Some("10.77.6.2:8080"), Some("p")), "{seen}");
    assert_eq!(bpf(&dp, "skipped_netns"), 1.0);
    assert_eq!(bpf(&dp, "captured"), 0.0);
    let text = metrics(&dp);
    assert_eq!(metric(&text, "dataplane_pods{membership=\"host_network\"}"), Some(1.0), "{text}");
    // And P's own connects to the agent's (the node's) address go direct:
    // a host-network pod is no meshed destination. Port 9 is closed there:
    // the kernel's refusal, not a capture.
    let back = raw_connect(&p, &workload, "10.77.6.1", 9);
    assert!(String::from_utf8_lossy(&back.stderr).contains("ConnectionRefused"));
    assert_eq!(bpf(&dp, "captured"), 0.0);
    assert_eq!(bpf(&dp, "skipped_cidr"), 1.0, "not a meshed destination");
}

#[test]
fn a_restarted_agent_rebuilds_from_the_api_and_forgets_what_went_meanwhile() {
    let t = testworld::kernel_test!();
    let bpffs = testworld::BpfFs::new(t);
    let pins = bpffs.0.join("dataplane").display().to_string();
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    api.put("pods", shop_pod("a", Some("10.77.0.1"), json!({}), json!({})));
    api.put("pods", shop_pod("b", Some("10.77.0.2"), json!({}), json!({})));
    // A meshed pod on another node, which goes while no agent runs here.
    api.put("pods", pod("shop", "far", "node-b", Some("10.77.7.7"), json!({}), json!({})));
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    let (a, b, _) = two_pods(t);
    let _sa = server(&a, "0.0.0.0", 8080, "a");
    let _sb = server(&b, "0.0.0.0", 8080, "b");
    dir.add(&a);
    dir.add(&b);
    let strict = ["--strict", "--pin-dir", &pins];
    let mut first = start(&api, &certs, &workload, &own, &dir, &strict);
    assert_eq!(namespaces_in(&first, "served"), Some(2.0));
    let far = raw_connect(&a, &workload, "10.77.7.7", 9);
    assert!(far.status.success() || String::from_utf8_lossy(&far.stderr).contains("Reset"), "captured while meshed");

    // The agent dies; meanwhile b and far are deleted (b's namespace too).
    first.proc.signal("KILL");
    first.proc.wait(Duration::from_secs(10));
    drop(first);
    api.delete("pods", "shop", "far");
    api.delete("pods", "shop", "b");
    dir.remove(&b);
    let second = start(&api, &certs, &workload, &own, &dir, &strict);
    assert_eq!(namespaces_in(&second, "served"), Some(1.0), "{}", metrics(&second));
    assert!(
        second.proc.output().iter().any(|l| l.contains("forgot namespaces that went while no data plane ran")),
        "b's entry, adopted from the pinned map, is dropped"
    );
    assert!(
        second.proc.output().iter().any(|l| l.contains("forgot destinations that went while no data plane ran")),
        "far and b, adopted as meshed destinations, are dropped"
    );
    // far is no meshed destination any more: its connect is not captured
    // (the kernel's own answer: no route from a to it).
    let captured = bpf(&second, "captured");
    let far = raw_connect(&a, &workload, "10.77.7.7", 9);
    let err = String::from_utf8_lossy(&far.stderr);
    assert!(err.contains("unreachable") || err.contains("timed out"), "not captured: {err}");
    assert_eq!(bpf(&second, "captured"), captured);
    // a is served by the new instance; b, gone from the API, is no meshed
    // destination (its server still answers on the link).
    let seen = client(&a, Some(&workload), "10.77.0.1", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "a"));
    assert_eq!(client(&a, Some(&workload), "10.77.0.2", 8080, &[])[0].peer, "10.77.0.2:8080");
    drop(second);
}

#[test]
fn policies_hold_on_the_same_node_fast_path_too() {
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    api.put("pods", shop_pod("a", Some("10.77.0.1"), json!({}), json!({})));
    api.put("pods", shop_pod("b", Some("10.77.0.2"), json!({"app": "db"}), json!({})));
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    let (a, b, _) = two_pods(t);
    let _sb = server(&b, "0.0.0.0", 8080, "b");
    dir.add(&a);
    dir.add(&b);
    let dp = start(&api, &certs, &workload, &own, &dir, &["--same-node-fast-path"]);
    assert!(eventually(Duration::from_secs(5), || namespaces_in(&dp, "served") == Some(2.0)), "{}", metrics(&dp));
    let reaches =
        || testworld::peer(&a, Some(&workload), &["expect-reset", "10.77.0.2", "8080"])[0]["result"] == "data";
    assert!(reaches(), "no policy");
    // No tunnel between the two pods, so no inbound side: the policy of the
    // destination pod is decided on the way out, by the client's address.
    let deny = json!({"action": "DENY", "selector": {"matchLabels": {"app": "db"}},
                      "rules": [{"from": [{"source": {"ipBlocks": ["10.77.0.1"]}}]}]});
    api.put("authorizationpolicies", testworld::apiserver::authorization_policy("shop", "no-a", deny));
    assert!(eventually(Duration::from_secs(5), || !reaches()), "denied");
    let denied =
        "dataplane_connections_failed_total{direction=\"outbound\",side=\"downstream\",reason=\"policy_denied\"}";
    assert!(metric(&metrics(&dp), denied) >= Some(1.0), "{}", metrics(&dp));
    assert!(metric(&metrics(&dp), "dataplane_same_node_connections_total") >= Some(1.0), "the fast path was taken");
    api.delete("authorizationpolicies", "shop", "no-a");
    assert!(eventually(Duration::from_secs(5), reaches), "allowed again");
}

/// A plaintext connect from `ns` outside the captured cgroup (from `src` if
/// given): "data" if the server greeted, else what went wrong.
fn plaintext(ns: &Netns, src: Option<&str>, host: &str, port: u16) -> String {
    let bind = src.map(|s| format!("s.bind(('{s}', 0))")).unwrap_or_default();
    let code = format!(
        "import socket\ns = socket.socket()\n{bind}\ns.settimeout(3)\ntry:\n    s.connect(('{host}', {port}))\n    \
         print('data' if s.recv(100) else 'eof')\nexcept Exception as e:\n    print(type(e).__name__)"
    );
    let out = ns.command(None, "python3", &["-c", &code]).output().expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_strict_namespace_refuses_plaintext_from_outside_the_mesh_but_not_probes() {
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled", "dataplane.dev/mtls": "strict"})));
    api.put("pods", shop_pod("a", Some("10.77.0.1"), json!({}), json!({})));
    let skip = json!({"dataplane.dev/skip-inbound-ports": "9090"});
    api.put("pods", shop_pod("b", Some("10.77.0.2"), json!({}), skip));
    // (a's namespace gets the probe's address too: a certificate for it.)
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2", "10.77.0.99"]);
    let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    let (a, b, _) = two_pods(t);
    let _servers = [server(&b, "0.0.0.0", 8080, "b"), server(&b, "0.0.0.0", 9090, "b-metrics")];
    // The node, whose kubelet probes pods: here an address of a's.
    a.ip(&["addr", "add", "10.77.0.99/32", "dev", "lo"]);
    dir.add(&a);
    dir.add(&b);
    let dp = start(&api, &certs, &workload, &own, &dir, &["--probe-source", "10.77.0.99"]);
    assert!(eventually(Duration::from_secs(5), || namespaces_in(&dp, "served") == Some(2.0)), "{}", metrics(&dp));

    // Plaintext from a process outside the mesh (not in the captured
    // cgroup) to b's application: reset before the application sees it.
    assert!(
        eventually(Duration::from_secs(5), || plaintext(&a, None, "10.77.0.2", 8080) == "ConnectionRefusedError"),
        "refused: {}",
        plaintext(&a, None, "10.77.0.2", 8080)
    );
    // Through the mesh it is served, and the port b leaves alone, and the
    // node's probes, are reached in plaintext as before.
    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "b"), "tunnelled");
    assert_eq!(plaintext(&a, None, "10.77.0.2", 9090), "data", "the skipped inbound port");
    assert_eq!(plaintext(&a, Some("10.77.0.99"), "10.77.0.2", 8080), "data", "the node's probe");

    // Permissive again (the label goes): plaintext is accepted again.
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    assert!(eventually(Duration::from_secs(5), || plaintext(&a, None, "10.77.0.2", 8080) == "data"), "permissive");
}

#[test]
fn an_agent_on_the_api_without_node_ca_idles_without_spinning() {
    // Without --node-ca nothing sends node CAs: a channel with no sender
    // is always ready to the control loop's select, which then spun a
    // core for as long as the agent ran.
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    let certs = Certs::new(t, &["10.77.0.1"]);
    let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    let dp = start(&api, &certs, &workload, &own, &dir, &[]);
    let cpu = || testworld::cpu_time(dp.pid()).expect("the data plane's /proc/PID/stat");
    thread::sleep(Duration::from_millis(500));
    let before = cpu();
    thread::sleep(Duration::from_secs(3));
    let idle = cpu() - before;
    eprintln!("idle agent on the API: {idle:?} of CPU in 3 s");
    assert!(idle < Duration::from_millis(900), "{idle:?} of CPU in 3 s with nothing to do");
}
