//! The chained CNI plugin against the real kernel and the reference
//! plugins: pods are made as a container runtime makes them (a namespace
//! pinned, then `bridge` + `host-local`, then `dataplane-cni`, executed per
//! the CNI spec by `testworld::cni`), the agent runs as the DaemonSet does
//! (`--kubeconfig` to the test API server, `--cni-socket`), and each pod's
//! process starts the moment ADD returns. The kubelet never writes a pod's
//! status here: the sandbox alone must be enough.
use std::{
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::Duration,
};

use serde_json::{json, Value};
use testworld::{
    apiserver::{daemonset, namespace, pod},
    attached, client,
    cni::Network,
    eventually, http_get, metric, server, unique, ApiServer, BpfFs, Certs, Cgroup, Dataplane, Netns, NetnsDir, Proc,
    TempDir,
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
    // host-local hands out 10.88.0.2 upwards; certificates for the first
    // forty (a pod beyond them waits for its certificate, then is refused).
    node_with(t, "10.88.0.0/24", 40)
}

/// [`node`] with pods in `subnet` (10.x.0.0/n), certificates for the first
/// `pods` addresses host-local hands out.
fn node_with(t: &str, subnet: &str, pods: u32) -> Node {
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    api.put("namespaces", namespace("plain", json!({})));
    let base: std::net::Ipv4Addr = subnet.split('/').next().and_then(|a| a.parse().ok()).expect("subnet");
    let ips: Vec<String> = (2..2 + pods).map(|i| std::net::Ipv4Addr::from(u32::from(base) + i).to_string()).collect();
    let certs = Certs::new(t, &ips.iter().map(String::as_str).collect::<Vec<_>>());
    let sockets = TempDir::new(&format!("dptest-cni-{}", unique(t, "s"))).expect("socket directory");
    let socket = sockets.0.join("cni.sock");
    let net = Network::new(t, subnet, Some(&socket));
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

/// A sandbox made as a runtime makes it (the namespace pinned, then ADD)
/// on a node's network and namespace directory.
fn sandbox_on(net: &Network, dir: &NetnsDir, t: &str, ns: &str, name: &str, id: &str) -> (Netns, Result<Value, Value>) {
    let netns = Netns::new(t, name);
    dir.add(&netns);
    let added = net.add(&netns, ns, name, id);
    (netns, added)
}

/// ADD as the kubelet drives it: a sandbox that fails with "try again
/// later" (11) is deleted and made again, with a new container ID, until it
/// succeeds (at most a minute); how many attempts it took.
fn add_until_admitted(net: &Network, netns: &Netns, ns: &str, name: &str, refused: &AtomicUsize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for attempt in 1.. {
        let id = format!("c-{name}-{attempt}");
        match net.add(netns, ns, name, &id) {
            Ok(_) => return attempt,
            Err(e) if code(&e) == 11 && std::time::Instant::now() < deadline => {
                refused.fetch_add(1, Ordering::Relaxed);
                net.del(netns, ns, name, &id).expect("DEL of a failed sandbox");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{ns}/{name}, attempt {attempt}: {e}"),
        }
    }
    unreachable!()
}

#[test]
fn runtime_retries_agent_restarts_and_api_restarts_lose_no_pod_and_leak_no_plaintext() {
    let t = testworld::kernel_test!();
    let mut n = node(t);
    n.schedule("shop", "db");
    let (db, added) = n.sandbox(t, "shop", "db");
    let db_ip = address(&added.expect("db's sandbox"));
    let _db = server(&db, "0.0.0.0", 8080, "db");
    let tunnelled = |pod: &Netns, workload: &Cgroup| client(pod, Some(workload), &db_ip, 8080, &[])[0].peer.clone();

    // ADD twice for one container (a runtime retrying after a timeout, with
    // DEL between, as the spec has it): served both times, one sandbox.
    n.schedule("shop", "twice");
    let (twice, added) = n.sandbox(t, "shop", "twice");
    added.expect("the first ADD");
    n.net.del(&twice, "shop", "twice", "c-twice").expect("DEL");
    n.net.add(&twice, "shop", "twice", "c-twice").expect("the same ADD again");
    assert_eq!(tunnelled(&twice, &n.workload), "127.0.0.1:18000");

    // The agent killed while sandboxes are being added: each ADD is
    // answered, or fails with 11 and the kubelet's retry is served by the
    // next agent; none starts unprotected.
    let pods: Vec<&'static str> = vec!["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "k10", "k11"];
    for name in &pods {
        n.schedule("shop", name);
    }
    // Refusals of the sandboxes added while the agent is down, and of the
    // others.
    static REFUSED_DOWN: AtomicUsize = AtomicUsize::new(0);
    static REFUSED_ELSE: AtomicUsize = AtomicUsize::new(0);
    let (refused_down, refused_else) = (&REFUSED_DOWN, &REFUSED_ELSE);
    let made: Vec<(Netns, usize)> = thread::scope(|s| {
        let Node { net, dir, dp: agent, own, args, .. } = &mut n;
        let (net, dir) = (&*net, &*dir);
        let add = |name: &'static str, refused: &'static AtomicUsize| {
            s.spawn(move || {
                let netns = Netns::new(t, name);
                dir.add(&netns);
                let attempts = add_until_admitted(net, &netns, "shop", name, refused);
                (netns, attempts)
            })
        };
        // Four while the agent runs (some may be mid-ADD as it dies), four
        // while it is down (each refused, then retried), four as it comes
        // back; the agent returns only once the second four have each been
        // refused at least once.
        let mut adding: Vec<_> = pods[..4].iter().map(|n| add(n, refused_else)).collect();
        let mut dp = agent.take().expect("the agent");
        dp.proc.signal("KILL");
        dp.proc.wait(Duration::from_secs(5));
        adding.extend(pods[4..8].iter().map(|n| add(n, refused_down)));
        let down = std::time::Instant::now();
        while refused_down.load(Ordering::Relaxed) < 4 && down.elapsed() < Duration::from_secs(60) {
            thread::sleep(Duration::from_millis(20));
        }
        *agent = Some(Dataplane::start(own, args));
        adding.extend(pods[8..].iter().map(|n| add(n, refused_else)));
        adding.into_iter().map(|h| h.join().expect("a sandbox's thread")).collect()
    });
    for (netns, attempts) in &made {
        assert_eq!(tunnelled(netns, &n.workload), "127.0.0.1:18000", "{} after {attempts} attempts", netns.name);
    }
    let attempts: Vec<usize> = made.iter().map(|m| m.1).collect();
    println!("agent killed mid-ADD: attempts per sandbox {attempts:?}");
    assert!(attempts[4..8].iter().all(|a| *a > 1), "those added while it was down were refused first: {attempts:?}");

    // The API server restarts while pods are being added: pods it showed
    // only just before going down wait for it (a meshed namespace) or
    // start at once (one outside), and are served once it is back.
    let pods: Vec<(&str, String)> =
        (0..6).map(|i| (if i % 2 == 0 { "shop" } else { "plain" }, format!("r{i}"))).collect();
    let down = std::sync::atomic::AtomicBool::new(false);
    let Node { api, net, dir, workload, .. } = &mut n;
    let made: Vec<(&str, Netns)> = thread::scope(|s| {
        let (net, dir, down) = (&*net, &*dir, &down);
        let adding: Vec<_> = pods
            .iter()
            .map(|(ns, name)| {
                s.spawn(move || {
                    while !down.load(std::sync::atomic::Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(10));
                    }
                    let (netns, added) = sandbox_on(net, dir, t, ns, name, &format!("c-{name}"));
                    added.unwrap_or_else(|e| panic!("{ns}/{name}: {e}"));
                    (*ns, netns)
                })
            })
            .collect();
        api.restart_with(Duration::from_secs(2), |api| {
            for (ns, name) in &pods {
                api.put("pods", pod(ns, name, "node-a", None, json!({}), json!({})));
            }
            down.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        adding.into_iter().map(|h| h.join().expect("a sandbox's thread")).collect()
    });
    for (ns, netns) in &made {
        let want = if *ns == "shop" { "127.0.0.1:18000".to_string() } else { format!("{db_ip}:8080") };
        assert_eq!(tunnelled(netns, workload), want, "{ns}/{}", netns.name);
    }
    assert_eq!(n.cni_count("refused"), 0.0, "the restarted agent refused nothing");
}

#[test]
fn five_hundred_pods_at_once_none_refused_none_in_plaintext() {
    let t = testworld::kernel_test!();
    let n = node_with(t, "10.89.0.0/22", 520);
    n.schedule("shop", "db");
    let (db, added) = n.sandbox(t, "shop", "db");
    let db_ip = address(&added.expect("db's sandbox"));
    let _db = server(&db, "0.0.0.0", 8080, "db");
    let pods: Vec<(&str, String)> =
        (0..500).map(|i| (if i % 2 == 0 { "shop" } else { "plain" }, format!("p{i}"))).collect();
    for (ns, name) in &pods {
        n.schedule(ns, name);
    }
    // Every sandbox at once, as fast as the runtime's workers make them
    // (32 here), each pod's process started the moment its ADD returns.
    let next = std::sync::Mutex::new(pods.iter());
    let started = std::time::Instant::now();
    let seen: Vec<(String, String, Duration)> = thread::scope(|s| {
        let workers: Vec<_> = (0..32)
            .map(|_| {
                let (n, db_ip, next) = (&n, &db_ip, &next);
                s.spawn(move || {
                    let mut out = Vec::new();
                    let take = || next.lock().expect("the queue").next();
                    while let Some((ns, name)) = take() {
                        let begun = std::time::Instant::now();
                        let (netns, added) = n.sandbox(t, ns, name);
                        added.unwrap_or_else(|e| panic!("{ns}/{name}: {e}"));
                        let took = begun.elapsed();
                        let seen = client(&netns, Some(&n.workload), db_ip, 8080, &[]);
                        out.push((ns.to_string(), seen[0].peer.clone(), took));
                    }
                    out
                })
            })
            .collect();
        workers.into_iter().flat_map(|h| h.join().expect("a runtime worker")).collect()
    });
    let all = started.elapsed();
    assert_eq!(seen.len(), 500);
    for (ns, peer, _) in &seen {
        let want = if ns == "shop" { "127.0.0.1:18000".to_string() } else { format!("{db_ip}:8080") };
        assert_eq!(peer, &want, "{ns}: tunnelled if meshed, direct if not");
    }
    assert_eq!((n.cni_count("served"), n.cni_count("passed"), n.cni_count("refused")), (251.0, 250.0, 0.0));
    for ns in ["shop", "plain"] {
        let mut took: Vec<Duration> = seen.iter().filter(|s| s.0 == ns).map(|s| s.2).collect();
        took.sort();
        let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
        println!("{ns}: the whole chain (netns, bridge, host-local, ours) p50 {:?}, p99 {:?}", at(0.5), at(0.99));
    }
    println!("500 sandboxes and their first connects in {all:?}");
    decisions(&n, "500 at once");
}

/// Prints what ADD added to each pod's start, as the agent measured it
/// (figures only: a busy machine stretches them).
fn decisions(n: &Node, how: &str) {
    let all = testworld::cni::decisions(&n.dp().proc.output());
    for verdict in ["served", "passed"] {
        let mut took: Vec<f64> = all.iter().filter(|(v, _)| v == verdict).map(|(_, d)| d.as_secs_f64() * 1e3).collect();
        took.sort_by(f64::total_cmp);
        let at = |q: f64| took.get(((took.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
        println!(
            "ADD {verdict} ({how}): {} sandboxes, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            took.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
}

/// A node with the CNI files where a node keeps them (a configuration and
/// a binary directory, the primary list in it), an agent and a
/// `cni-install` container as the DaemonSet runs them, strict.
struct Installed {
    api: ApiServer,
    net: Network,
    dir: NetnsDir,
    workload: Cgroup,
    own: Cgroup,
    conf_dir: std::path::PathBuf,
    bin_dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    pins: std::path::PathBuf,
    agent_args: Vec<String>,
    install_args: Vec<String>,
    _bpffs: BpfFs,
    _certs: Certs,
    _host: TempDir,
}

const DAEMONSET: &str = "dataplane-system/dataplane";

impl Installed {
    fn new(t: &str) -> Self {
        let api = ApiServer::start(t);
        api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
        api.put("daemonsets", daemonset("dataplane-system", "dataplane"));
        let ips: Vec<String> = (2..12).map(|i| format!("10.88.0.{i}")).collect();
        let certs = Certs::new(t, &ips.iter().map(String::as_str).collect::<Vec<_>>());
        let host = TempDir::new(&format!("dptest-host-{}", unique(t, "h"))).expect("the node's directories");
        let (conf_dir, bin_dir, run) = (host.0.join("net.d"), host.0.join("bin"), host.0.join("run"));
        for d in [&conf_dir, &bin_dir, &run] {
            std::fs::create_dir_all(d).expect("a node directory");
        }
        let socket = run.join("cni.sock");
        let net = Network::on_node(t, "10.88.0.0/24", &conf_dir, &bin_dir);
        let bpffs = BpfFs::new(t);
        let pins = bpffs.0.join("dataplane");
        let (workload, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
        let s = |p: &std::path::Path| p.display().to_string();
        let (certs_dir, socket_s, pins_s) = (certs.path(), s(&socket), s(&pins));
        let extra = [
            "--certs",
            &certs_dir,
            "--cni-socket",
            &socket_s,
            "--strict",
            "--pin-dir",
            &pins_s,
            "--daemonset",
            DAEMONSET,
            "--drain-timeout",
            "2s",
        ];
        let agent_args = testworld::node_args(&api.kubeconfig(), "node-a", &dir, &workload, &extra);
        let install_args = testworld::strings(&[
            "cni",
            "install",
            "--watch",
            "--bin-dir",
            &s(&bin_dir),
            "--conf-dir",
            &s(&conf_dir),
            "--socket",
            &socket_s,
            "--plugin",
            &s(&testworld::cni::cni_binary()),
            "--kubeconfig",
            &api.kubeconfig(),
            "--daemonset",
            DAEMONSET,
        ]);
        Installed {
            api,
            net,
            dir,
            workload,
            own,
            conf_dir,
            bin_dir,
            socket,
            pins,
            agent_args,
            install_args,
            _bpffs: bpffs,
            _certs: certs,
            _host: host,
        }
    }

    /// The DaemonSet's pod on this node: the agent, and the container that
    /// chains the plugin (once it has).
    fn start(&self) -> (Dataplane, Proc) {
        let dp = Dataplane::start(&self.own, &self.agent_args);
        let mut cmd = std::process::Command::new(testworld::dataplane_binary());
        cmd.args(&self.install_args);
        let install = Proc::spawn(cmd, "cni-install");
        assert!(eventually(Duration::from_secs(10), || self.conflist().contains("dataplane-cni")), "chained");
        (dp, install)
    }

    /// The pod stops, as the kubelet stops it: SIGTERM to both containers.
    fn stop(&self, (dp, mut install): (Dataplane, Proc)) {
        install.signal("TERM");
        assert!(dp.stop().success(), "the agent exits 0");
        assert!(install.wait(Duration::from_secs(15)).success(), "cni-install exits 0:\n{:#?}", install.output());
    }

    fn conflist(&self) -> String {
        std::fs::read_to_string(self.conf_dir.join("10-bridge.conflist")).unwrap_or_default()
    }

    fn sandbox(&self, t: &str, ns: &str, name: &str) -> (Netns, Result<Value, Value>) {
        self.api.put("pods", pod(ns, name, "node-a", None, json!({}), json!({})));
        let netns = Netns::new(t, name);
        self.dir.add(&netns);
        let added = self.net.add(&netns, ns, name, &format!("c-{name}"));
        (netns, added)
    }

    /// What of ours is on the node: the plugin's entry and files, the pins,
    /// attached programs, and the return path in `pods`.
    fn left(&self, pods: &[&Netns]) -> Vec<String> {
        let mut left = Vec::new();
        if self.conflist().contains("dataplane-cni") {
            left.push("the conflist entry".to_string());
        }
        for f in
            [self.bin_dir.join("dataplane-cni"), self.socket.clone(), self.socket.with_extension("sock.namespaces")]
        {
            if f.exists() {
                left.push(f.display().to_string());
            }
        }
        if self.pins.exists() {
            left.push(format!("pins: {:?}", std::fs::read_dir(&self.pins).map(|d| d.count())));
        }
        left.extend(attached(&self.workload.path));
        for p in pods {
            let tables = p.command(None, "nft", &["list", "tables"]).output().expect("nft").stdout;
            if String::from_utf8_lossy(&tables).contains("dataplane") {
                left.push(format!("nft table in {}", p.name));
            }
            let rules = p.command(None, "ip", &["rule", "show"]).output().expect("ip").stdout;
            if String::from_utf8_lossy(&rules).contains("lookup 18001") {
                left.push(format!("ip rule in {}", p.name));
            }
        }
        left
    }
}

#[test]
fn deleting_the_daemonset_takes_everything_off_the_node_and_an_update_takes_nothing() {
    let t = testworld::kernel_test!();
    let node = Installed::new(t);
    let primary = node.conflist();
    let running = node.start();
    let (db, added) = node.sandbox(t, "shop", "db");
    let db_ip = address(&added.expect("db's sandbox"));
    let _db = server(&db, "0.0.0.0", 8080, "db");
    let (web, added) = node.sandbox(t, "shop", "web");
    added.expect("web's sandbox");
    let seen = client(&web, Some(&node.workload), &db_ip, 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "db"), "tunnelled");
    assert!(eventually(Duration::from_secs(5), || node.left(&[&db]).iter().any(|l| l.contains("nft table"))));

    // An update (or a restart): the DaemonSet stays, so does everything; a
    // meshed pod made meanwhile waits (fail closed).
    node.stop(running);
    let left = node.left(&[&db]);
    for part in ["the conflist entry", "dataplane-cni", "capture_connect4", "nft table"] {
        assert!(left.iter().any(|l| l.contains(part)), "{part} stays through an update: {left:?}");
    }
    let (late, added) = node.sandbox(t, "shop", "late");
    assert_eq!(code(&added.expect_err("no agent: the sandbox waits")), 11);
    let running = node.start();
    node.net.del(&late, "shop", "late", "c-late").expect("DEL of the failed sandbox");
    node.net.add(&late, "shop", "late", "c-late-2").expect("the kubelet's retry is served");

    // The DaemonSet is deleted: its pod's containers take everything off.
    node.api.delete("daemonsets", "dataplane-system", "dataplane");
    node.stop(running);
    let gone = || node.left(&[&db, &web, &late]).is_empty();
    assert!(eventually(Duration::from_secs(3), gone), "left behind: {:?}", node.left(&[&db, &web, &late]));
    let json = |text: &str| serde_json::from_str::<Value>(text).expect("a configuration list");
    assert_eq!(json(&node.conflist()), json(&primary), "the primary list as it was");
    // The pods keep working, now without the mesh, and new ones start.
    let seen = client(&web, Some(&node.workload), &db_ip, 8080, &[]);
    assert_eq!(seen[0].peer, format!("{db_ip}:8080"), "direct");
    let (after, added) = node.sandbox(t, "shop", "after");
    added.expect("a sandbox without the plugin");
    assert_eq!(client(&after, Some(&node.workload), &db_ip, 8080, &[])[0].server, "db");

    // A fresh install on the same node: served again (pods from before it
    // are known from the API, where the kubelet has long written their
    // addresses).
    node.api.put("pods", pod("shop", "db", "node-a", Some(&db_ip), json!({}), json!({})));
    node.api.put("daemonsets", daemonset("dataplane-system", "dataplane"));
    let running = node.start();
    let (again, added) = node.sandbox(t, "shop", "again");
    added.expect("served by the new install");
    let seen = client(&again, Some(&node.workload), &db_ip, 8080, &[]);
    assert_eq!(seen[0].peer, "127.0.0.1:18000", "tunnelled again");

    // Killed outright (a forced delete, a node gone wrong): everything stays
    // until `dataplane uninstall` takes it off by hand.
    let (mut dp, mut install) = running;
    install.signal("KILL");
    dp.proc.signal("KILL");
    install.wait(Duration::from_secs(5));
    dp.proc.wait(Duration::from_secs(5));
    assert!(node.left(&[&db, &again]).len() >= 4, "{:?}", node.left(&[&db, &again]));
    let s = |p: &std::path::Path| p.display().to_string();
    let out = std::process::Command::new(testworld::dataplane_binary())
        .args(["uninstall", "--bin-dir", &s(&node.bin_dir), "--conf-dir", &s(&node.conf_dir)])
        .args(["--socket", &s(&node.socket), "--pin-dir", &s(&node.pins), "--netns-dir", &node.dir.path()])
        .output()
        .expect("dataplane uninstall");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("removed the return path in") && said.contains("links"), "says what it removed: {said}");
    assert!(eventually(Duration::from_secs(3), || node.left(&[&db, &again]).is_empty()), "{said}");
}
