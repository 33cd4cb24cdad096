//! The chained CNI plugin against the real kernel and the reference
//! plugins: pods are made as a container runtime makes them (a namespace
//! pinned, then `bridge` + `host-local`, then `dataplane-cni`, executed per
//! the CNI spec by `testworld::cni`), the agent runs as the DaemonSet does
//! (`--kubeconfig` to the test API server, `--cni-socket`), and each pod's
//! process starts the moment ADD returns. The kubelet never writes a pod's
//! status here: the sandbox alone must be enough.
use std::{thread, time::Duration};

use serde_json::{json, Value};
use testworld::{
    apiserver::{namespace, pod},
    client,
    cni::Network,
    http_get, metric, server, unique, ApiServer, Certs, Cgroup, Dataplane, Netns, NetnsDir, TempDir,
};

const MESH: &str = "dataplane.dev/mesh";

/// The first address a result gives.
fn address(result: &Value) -> String {
    let a = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {result}"));
    a.split('/').next().expect("address").to_string()
}

/// The CNI error code a failed ADD gave.
fn code(err: &Value) -> u64 {
    err["error"]["code"].as_u64().unwrap_or_else(|| panic!("not a CNI error: {err}"))
}

struct Node {
    api: ApiServer,
    net: Network,
    dir: NetnsDir,
    workload: Cgroup,
    /// The agent (none while it is stopped), and how it was started.
    dp: Option<Dataplane>,
    args: Vec<String>,
    // The agent's cgroup: its drop ends the agent.
    own: Cgroup,
    _certs: Certs,
    _sockets: TempDir,
}

/// An API server with a meshed namespace (`shop`) and one outside (`plain`),
/// and an agent for node-a serving the CNI plugin.
fn node(t: &str) -> Node {
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    api.put("namespaces", namespace("plain", json!({})));
    // host-local hands out 10.88.0.2 upwards; certificates for the first
    // forty (a pod beyond them waits for its certificate, then is refused).
    let ips: Vec<String> = (2..42).map(|i| format!("10.88.0.{i}")).collect();
    let certs = Certs::new(t, &ips.iter().map(String::as_str).collect::<Vec<_>>());
    let sockets = TempDir::new(&format!("dptest-cni-{}", unique(t, "s"))).expect("socket directory");
    let socket = sockets.0.join("cni.sock");
    let net = Network::new(t, "10.88.0.0/24", Some(&socket));
    let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    let certs_dir = certs.path();
    let socket_arg = socket.display().to_string();
    let extra = ["--certs", certs_dir.as_str(), "--cni-socket", socket_arg.as_str()];
    let args = testworld::node_args(&api.kubeconfig(), "node-a", &dir, &workload, &extra);
    let dp = Some(Dataplane::start(&own, &args));
    Node { api, net, dir, workload, dp, args, own, _certs: certs, _sockets: sockets }
}

impl Node {
    /// A pod scheduled here, as the API shows it before its sandbox exists:
    /// no address.
    fn schedule(&self, ns: &str, name: &str) {
        self.api.put("pods", pod(ns, name, "node-a", None, json!({}), json!({})));
    }

    /// Its sandbox: the namespace pinned where the runtime pins them, then
    /// the chain's ADD.
    fn sandbox(&self, t: &str, ns: &str, name: &str) -> (Netns, Result<Value, Value>) {
        let netns = Netns::new(t, name);
        self.dir.add(&netns);
        let added = self.net.add(&netns, ns, name, &format!("c-{name}"));
        (netns, added)
    }

    fn dp(&self) -> &Dataplane {
        self.dp.as_ref().expect("the agent runs")
    }

    fn cni_count(&self, verdict: &str) -> f64 {
        let text = http_get(&self.dp().admin(), "/metrics").map(|(_, t)| t).unwrap_or_default();
        metric(&text, &format!("dataplane_cni_sandboxes_total{{verdict=\"{verdict}\"}}")).unwrap_or(-1.0)
    }
}

#[test]
fn a_pod_is_served_from_its_first_connect_and_pods_outside_are_never_refused() {
    let t = testworld::kernel_test!();
    let n = node(t);
    for (ns, name) in [("shop", "db"), ("shop", "web"), ("plain", "tool")] {
        n.schedule(ns, name);
    }
    let (db, added) = n.sandbox(t, "shop", "db");
    let db_ip = address(&added.unwrap_or_else(|e| panic!("db's sandbox: {e}\n{:#?}", n.dp().proc.output())));
    let _db = server(&db, "0.0.0.0", 8080, "db");

    // A meshed pod's very first connect, to a meshed pod, is tunnelled.
    let (web, added) = n.sandbox(t, "shop", "web");
    added.expect("web's sandbox");
    let seen = client(&web, Some(&n.workload), &db_ip, 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "db"), "captured: {seen:?}");

    // A pod outside the mesh is never refused and never captured, from its
    // first connect: it reaches the meshed pod directly.
    let (tool, added) = n.sandbox(t, "plain", "tool");
    added.expect("tool's sandbox");
    let seen = client(&tool, Some(&n.workload), &db_ip, 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), (format!("{db_ip}:8080").as_str(), "db"));

    // A sandbox whose pod the API has not shown yet, in a meshed namespace:
    // its own labels could still opt it out, so ADD waits for the API...
    let early = thread::scope(|s| {
        let waiting = s.spawn(|| n.sandbox(t, "shop", "early"));
        thread::sleep(Duration::from_millis(500));
        assert!(!waiting.is_finished(), "ADD returned before the API showed the pod");
        n.schedule("shop", "early");
        waiting.join().expect("the ADD thread")
    });
    let (early_ns, added) = early;
    added.expect("decided once the API showed the pod");
    let seen = client(&early_ns, Some(&n.workload), &db_ip, 8080, &[]);
    assert_eq!(seen[0].peer, "127.0.0.1:18000", "served from its first connect");

    // ...while one of a namespace outside the mesh passes at once, without
    // its pod object.
    let (_stray, added) = n.sandbox(t, "plain", "stray");
    added.expect("passed on its namespace alone");

    // DEL for a sandbox the agent never saw, and for one it serves.
    let ghost = Netns::new(t, "ghost");
    n.net.del(&ghost, "shop", "ghost", "c-ghost").expect("DEL of an unknown sandbox succeeds");
    n.net.del(&web, "shop", "web", "c-web").expect("DEL");
    assert_eq!((n.cni_count("served"), n.cni_count("passed"), n.cni_count("refused")), (3.0, 2.0, 0.0));
    decisions(&n, "one at a time; one waited for the API");
}

#[test]
fn with_the_agent_down_meshed_pods_wait_and_others_start_then_the_retry_is_served() {
    let t = testworld::kernel_test!();
    let mut n = node(t);
    for (ns, name) in [("shop", "db"), ("shop", "web"), ("plain", "tool")] {
        n.schedule(ns, name);
    }
    let (db, added) = n.sandbox(t, "shop", "db");
    let db_ip = address(&added.expect("db's sandbox"));
    let _db = server(&db, "0.0.0.0", 8080, "db");
    assert!(n.dp.take().expect("the agent").stop().success(), "the agent stops cleanly");

    let (web, added) = n.sandbox(t, "shop", "web");
    let err = added.expect_err("a meshed pod does not start unprotected");
    assert_eq!(code(&err), 11, "try again later: {err}");
    assert!(err.to_string().contains("namespace shop is in the mesh"), "{err}");
    let (tool, added) = n.sandbox(t, "plain", "tool");
    added.expect("a pod outside the mesh starts at once");
    let seen = client(&tool, Some(&n.workload), &db_ip, 8080, &[]);
    assert_eq!(seen[0].server, "db", "and reaches the meshed pod directly");

    // The agent is back: the kubelet's retry (DEL, then ADD) is served.
    n.dp = Some(Dataplane::start(&n.own, &n.args));
    n.net.del(&web, "shop", "web", "c-web").expect("DEL of the failed sandbox");
    let added = n.net.add(&web, "shop", "web", "c-web-2");
    added.unwrap_or_else(|e| panic!("the retry: {e}\n{:#?}", n.dp().proc.output()));
    let seen = client(&web, Some(&n.workload), &db_ip, 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "db"));
}

#[test]
fn twenty_pods_at_once_none_refused_none_in_plaintext() {
    let t = testworld::kernel_test!();
    let n = node(t);
    n.schedule("shop", "db");
    let (db, added) = n.sandbox(t, "shop", "db");
    let db_ip = address(&added.expect("db's sandbox"));
    let _db = server(&db, "0.0.0.0", 8080, "db");
    let pods: Vec<(&str, String)> =
        (0..20).map(|i| (if i % 2 == 0 { "shop" } else { "plain" }, format!("p{i}"))).collect();
    for (ns, name) in &pods {
        n.schedule(ns, name);
    }
    // Every sandbox at once, each pod's process started as its ADD returns.
    let seen: Vec<(String, String)> = thread::scope(|s| {
        let running: Vec<_> = pods
            .iter()
            .map(|(ns, name)| {
                let n = &n;
                let db_ip = &db_ip;
                s.spawn(move || {
                    let (netns, added) = n.sandbox(t, ns, name);
                    added.unwrap_or_else(|e| panic!("{ns}/{name}: {e}"));
                    let seen = client(&netns, Some(&n.workload), db_ip, 8080, &[]);
                    (ns.to_string(), seen[0].peer.clone())
                })
            })
            .collect();
        running.into_iter().map(|h| h.join().expect("a pod's thread")).collect()
    });
    for (ns, peer) in &seen {
        let want = if ns == "shop" { "127.0.0.1:18000".to_string() } else { format!("{db_ip}:8080") };
        assert_eq!(peer, &want, "{ns}: tunnelled if meshed, direct if not");
    }
    assert_eq!((n.cni_count("served"), n.cni_count("passed"), n.cni_count("refused")), (11.0, 10.0, 0.0));
    decisions(&n, "at once");
}

/// Prints what ADD added to each pod's start, as the agent measured it
/// (figures only: a busy machine stretches them).
fn decisions(n: &Node, how: &str) {
    for verdict in ["served", "passed"] {
        let mut took: Vec<f64> = n
            .dp()
            .proc
            .output()
            .iter()
            .filter(|l| l.contains("CNI ADD answered") && l.contains(&format!("verdict=\"{verdict}\"")))
            .filter_map(|l| millis(l.rsplit("took=").next()?))
            .collect();
        took.sort_by(f64::total_cmp);
        let at = |q: f64| took.get(((took.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
        println!("ADD {verdict} ({how}): {} sandboxes, p50 {:.2} ms, max {:.2} ms", took.len(), at(0.5), at(1.0));
    }
}

/// A `Debug` duration (`1.234ms`, `56.7µs`, `1.2s`) in milliseconds.
fn millis(d: &str) -> Option<f64> {
    let d = d.split_whitespace().next()?;
    let split = d.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (n, unit) = d.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "s" => n * 1e3,
        "ms" => n,
        "µs" => n / 1e3,
        "ns" => n / 1e6,
        _ => return None,
    })
}
