//! The application sees the real client address, against the real kernel:
//! the inbound side connects from the client pod's address with
//! IP_TRANSPARENT, and the return path (an nftables table and a policy
//! routing rule in the pod's namespace) keeps the replies inside the pod.
use std::{fs, os::unix::fs::PermissionsExt, process::Command, thread, time::Duration};

use testworld::{
    client, eventually, http_get, metric, peer, run_args, server, Certs, Cgroup, Dataplane, Netns, NetnsDir, Proc,
};

/// Clients a (10.77.0.1) and c (10.77.0.3) on one node, server b
/// (10.77.0.2) on another, one bridge between them.
struct World {
    node1: Dataplane,
    node2: Dataplane,
    w1: Cgroup,
    dir2: NetnsDir,
    a: Netns,
    b: Netns,
    c: Netns,
    net: Netns,
    certs: Certs,
    own2: Cgroup,
    w2: Cgroup,
    _own1: Cgroup,
    _dir1: NetnsDir,
}

fn start(w: &Cgroup, own: &Cgroup, dir: &NetnsDir, certs: &Certs, extra: &[&str]) -> Dataplane {
    let dir_s = dir.path();
    let mut more = vec!["--netns-dir", dir_s.as_str()];
    more.extend_from_slice(extra);
    Dataplane::start(own, &run_args(w, "10.77.0.0/16", certs, &[], &more))
}

fn served(dp: &Dataplane, n: f64) -> bool {
    eventually(Duration::from_secs(5), || {
        http_get(&dp.admin(), "/metrics")
            .is_ok_and(|(_, t)| metric(&t, "dataplane_namespaces{state=\"served\"}") == Some(n))
    })
}

fn world(t: &str, extra: &[&str]) -> World {
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2", "10.77.0.3"]);
    let net = testworld::bridge(t, "net");
    let (a, b, c) = (Netns::new(t, "a"), Netns::new(t, "b"), Netns::new(t, "c"));
    testworld::plug(&net, &a, "10.77.0.1");
    testworld::plug(&net, &b, "10.77.0.2");
    testworld::plug(&net, &c, "10.77.0.3");
    let (w1, own1, dir1) = (Cgroup::new(t, "w1"), Cgroup::new(t, "d1"), NetnsDir::new(&format!("{t}-1")));
    let (w2, own2, dir2) = (Cgroup::new(t, "w2"), Cgroup::new(t, "d2"), NetnsDir::new(&format!("{t}-2")));
    dir1.add(&a);
    dir1.add(&c);
    dir2.add(&b);
    let node1 = start(&w1, &own1, &dir1, &certs, extra);
    let node2 = start(&w2, &own2, &dir2, &certs, extra);
    assert!(served(&node1, 2.0) && served(&node2, 1.0));
    // The return path follows shortly after a pod is served.
    if !extra.contains(&"--no-client-address") {
        assert!(eventually(Duration::from_secs(5), || rules_in(&b).0.contains("table ip dataplane")));
    }
    World { node1, node2, w1, dir2, a, b, c, net, certs, own2, w2, _own1: own1, _dir1: dir1 }
}

fn rules_in(ns: &Netns) -> (String, String) {
    let nft = ns.command(None, "nft", &["list", "ruleset"]).output().expect("nft");
    let ip = ns.command(None, "ip", &["-4", "rule", "show"]).output().expect("ip rule");
    (String::from_utf8_lossy(&nft.stdout).into_owned(), String::from_utf8_lossy(&ip.stdout).into_owned())
}

#[test]
fn an_unmodified_http_server_logs_the_client_pods_address() {
    let t = testworld::kernel_test!();
    let w = world(t, &[]);
    // python3 -m http.server logs "CLIENT - - [date] \"GET / HTTP/1.1\" 200 -".
    let files = testworld::TempDir::new(&format!("dptest-www-{}", testworld::unique(t, "w"))).expect("dir");
    fs::write(files.0.join("index.html"), "hello\n").expect("page");
    let dir = files.0.display().to_string();
    let mut http =
        Proc::spawn(w.b.command(None, "python3", &["-m", "http.server", "8000", "--directory", &dir]), "http.server");
    http.wait_for("Serving HTTP", Duration::from_secs(10));
    let out =
        w.a.command(Some(&w.w1), "curl", &["-sS", "--max-time", "5", "http://10.77.0.2:8000/"]).output().expect("curl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert!(
        eventually(Duration::from_secs(3), || http
            .output()
            .iter()
            .any(|l| l.starts_with("10.77.0.1 - - ") && l.contains("GET /"))),
        "the server logged the client pod's address: {:#?}",
        http.output()
    );
}

#[test]
fn replies_never_leave_the_pod_during_big_transfers_both_ways() {
    let t = testworld::kernel_test!();
    let w = world(t, &[]);
    let sink = testworld::server_with(&w.b, &["sink", "0.0.0.0", "8080"], "sink");
    let b_link = testworld::bridge_port(&w.b);
    let pcap_file = testworld::TempFile(std::env::temp_dir().join(format!("{}.pcap", w.b.name)));
    let pcap = &pcap_file.0;
    let pcap_s = pcap.display().to_string();
    let mut dump = Proc::spawn(
        w.net.command(None, "tcpdump", &["--immediate-mode", "-i", &b_link, "-n", "-s", "96", "-w", &pcap_s, "tcp"]),
        "tcpdump",
    );
    dump.wait_for("listening on", Duration::from_secs(10));
    let mib64 = (64u64 << 20).to_string();
    let out = peer(&w.a, Some(&w.w1), &["transfer", "10.77.0.2", "8080", &mib64, &mib64]);
    assert!(out[0]["sent_ok"] == true && out[0]["received_ok"] == true, "64 MiB each way, byte-exact: {}", out[0]);
    assert!(
        sink.output().iter().any(|l| l.starts_with("accepted 10.77.0.1:")),
        "from a's address: {:#?}",
        sink.output()
    );
    thread::sleep(Duration::from_millis(200));
    dump.signal("INT");
    dump.wait(Duration::from_secs(10));
    let other =
        Command::new("tcpdump").args(["-n", "-r", &pcap_s, "tcp and not port 18001"]).output().expect("tcpdump");
    let all = Command::new("tcpdump").args(["-n", "-r", &pcap_s, "tcp"]).output().expect("tcpdump");
    assert!(String::from_utf8_lossy(&all.stdout).lines().count() > 1000, "the capture saw the transfer");
    assert_eq!(String::from_utf8_lossy(&other.stdout).trim(), "", "nothing but the tunnel on B's link");
}

#[test]
fn two_clients_with_the_same_source_port_at_once_each_keep_their_address() {
    let t = testworld::kernel_test!();
    let w = world(t, &[]);
    let _s = server(&w.b, "0.0.0.0", 8080, "b");
    let (a, c, w1) = (&w.a, &w.c, &w.w1);
    // Below the ephemeral range (32768-60999), as applications that pick their
    // source port do: the data plane's tunnels leave each pod's namespace from
    // ephemeral ports, and one of those (or its TIME_WAIT) on 40100+i made the
    // client's bind fail with EADDRINUSE in CI.
    let extra = ["--bind-port", "20100", "--count", "20"];
    let (from_a, from_c) = thread::scope(|s| {
        let x = s.spawn(|| client(a, Some(w1), "10.77.0.2", 8080, &extra));
        let y = s.spawn(|| client(c, Some(w1), "10.77.0.2", 8080, &extra));
        (x.join().expect("a"), y.join().expect("c"))
    });
    for (seen, ip) in [(&from_a, "10.77.0.1:"), (&from_c, "10.77.0.3:")] {
        assert_eq!(seen.len(), 20);
        for s in seen {
            assert!(s.server_saw.starts_with(ip), "{s:?}");
            assert_eq!(s.peer, "127.0.0.1:18000");
        }
    }
}

#[test]
fn client_ports_reused_while_their_last_connections_are_in_time_wait_still_connect() {
    let t = testworld::kernel_test!();
    // A and C on one node, with the same-node fast path: C's application
    // sees A's address and A's own port (through a tunnel it would see the
    // tunnel's port). In C the data plane's sockets close first (they pass
    // on the client's end), so their connections wait in TIME_WAIT there;
    // the client's kernel does not see those. C's ephemeral range is three
    // ports, as a busy node's is soon all in TIME_WAIT.
    let w = world(t, &["--same-node-fast-path"]);
    let range = w.c.command(None, "sysctl", &["-w", "net.ipv4.ip_local_port_range=40000 40002"]).output();
    assert!(range.is_ok_and(|o| o.status.success()), "narrowing C's port range");
    let (_s1, _s2) = (server(&w.c, "0.0.0.0", 8080, "c"), server(&w.c, "0.0.0.0", 8081, "c1"));
    let from = |port: &str, to: u16| {
        let seen = client(&w.a, Some(&w.w1), "10.77.0.3", to, &["--bind-port", port]);
        assert_eq!(seen[0].echo, "ping", "from port {port} to {to}");
        seen[0].server_saw.clone()
    };
    // Two of C's three ephemeral ports end in TIME_WAIT with C:8081.
    assert_eq!(from("40000", 8081), "10.77.0.1:40000");
    assert_eq!(from("40001", 8081), "10.77.0.1:40001");
    // The client's own TIME_WAIT (on loopback) may be reused after a second.
    thread::sleep(Duration::from_millis(1500));
    // Port 40000 again, to another server: nothing in TIME_WAIT between
    // these two, so the client's port is kept (it was refused, and a port
    // looked for in C's range at bind found none free: the client was reset).
    assert_eq!(from("40000", 8080), "10.77.0.1:40000");
    // Port 40001 again, to the same server: that very connection is in
    // TIME_WAIT (which the kernel lets a new one take over after a second
    // when, as here, it runs over loopback; otherwise another port): either
    // way, connected, and from the client's address.
    assert!(from("40001", 8081).starts_with("10.77.0.1:"));
}

#[test]
fn a_killed_data_plane_leaves_the_pod_working_and_the_next_one_cleans_up() {
    let t = testworld::kernel_test!();
    let mut w = world(t, &[]);
    let _s = server(&w.b, "0.0.0.0", 8080, "b");
    let (nft, rules) = rules_in(&w.b);
    assert!(nft.contains("table ip dataplane") && rules.contains("lookup 18001"), "{nft}\n{rules}");
    w.node2.proc.signal("KILL");
    w.node2.proc.wait(Duration::from_secs(10));
    // The pod's own traffic, outside the mesh: both ways.
    let direct = client(&w.a, None, "10.77.0.2", 8080, &[]);
    assert_eq!((direct[0].peer.as_str(), direct[0].server.as_str()), ("10.77.0.2:8080", "b"));
    let _sa = server(&w.a, "0.0.0.0", 8080, "a");
    let out = client(&w.b, None, "10.77.0.1", 8080, &[]);
    assert_eq!(out[0].server, "a", "b's own connects still work");
    // A new data plane re-installs, once.
    w.node2 = start(&w.w2, &w.own2, &w.dir2, &w.certs, &[]);
    assert!(served(&w.node2, 1.0));
    assert!(eventually(Duration::from_secs(5), || rules_in(&w.b).1.contains("lookup 18001")));
    let (nft, rules) = rules_in(&w.b);
    assert_eq!(nft.matches("table ip dataplane").count(), 1, "{nft}");
    assert_eq!(rules.matches("lookup 18001").count(), 1, "{rules}");
    let seen = client(&w.a, Some(&w.w1), "10.77.0.2", 8080, &[]);
    assert!(seen[0].server_saw.starts_with("10.77.0.1:"), "{:?}", seen[0]);
    // Withdrawal (the pod leaves the mesh, say by a label, while it runs)
    // leaves the return path in place: a connection open through it keeps
    // working to its end. Removing it cut such connections off (the
    // application's replies left the pod for an address it does not own).
    let py = testworld::peers_py();
    let mut slow =
        Proc::spawn(w.a.command(Some(&w.w1), "python3", &[&py, "slow", "10.77.0.2", "8080", "3"]), "slow client");
    thread::sleep(Duration::from_millis(800));
    w.dir2.remove(&w.b);
    assert!(served(&w.node2, 0.0));
    assert!(slow.wait(Duration::from_secs(15)).success());
    let out = slow.output().join("\n");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert!(r["ok"] == true && r["lines"].as_u64() >= Some(20), "the open connection outlived the withdrawal: {r}");
    let (nft, rules) = rules_in(&w.b);
    assert!(nft.contains("table ip dataplane") && rules.contains("lookup 18001"), "left, inert: {nft}\n{rules}");
}

#[test]
fn pods_enrolled_together_do_not_wait_for_each_others_return_path() {
    let t = testworld::kernel_test!();
    // An nft that notes each run and takes 2 s, first on the data plane's
    // PATH. The return paths are set up one after another; on the thread
    // that enrols pods, the third pod would be served after 4 s.
    let bin = testworld::TempDir::new(&format!("dptest-bin-{}", testworld::unique(t, "bin"))).expect("dir");
    let (nft, runs) = (bin.0.join("nft"), bin.0.join("runs"));
    let real = Command::new("sh").args(["-c", "command -v nft"]).output().expect("sh");
    let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
    assert!(!real.is_empty(), "nft is installed");
    let script = format!("#!/bin/sh\necho run >> {}\nsleep 2\nexec {real} \"$@\"\n", runs.display());
    fs::write(&nft, script).expect("the nft wrapper");
    fs::set_permissions(&nft, fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!("{}:{}", bin.0.display(), std::env::var("PATH").unwrap_or_default());

    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2", "10.77.0.3"]);
    let net = testworld::bridge(t, "net");
    let pods = [Netns::new(t, "a"), Netns::new(t, "b"), Netns::new(t, "c")];
    for (pod, ip) in pods.iter().zip(["10.77.0.1", "10.77.0.2", "10.77.0.3"]) {
        testworld::plug(&net, pod, ip);
    }
    let (w, own, dir) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), NetnsDir::new(t));
    let dir_s = dir.path();
    let args = run_args(&w, "10.77.0.0/16", &certs, &[], &["--netns-dir", dir_s.as_str()]);
    let dp = Dataplane::start_env(&own, &args, &[("PATH", &path)]);
    for pod in &pods {
        dir.add(pod);
    }
    // Served: connect4 sends the pod's connects to the executors.
    let all_served =
        || dp.proc.output().iter().filter(|l| l.contains("namespace served: its connects are captured")).count() == 3;
    assert!(eventually(Duration::from_secs(3), all_served), "all three served without waiting for return paths");
    // Then each gets its return path, through the slow nft.
    assert!(
        eventually(Duration::from_secs(15), || pods.iter().all(|p| rules_in(p).1.contains("lookup 18001"))),
        "every pod's return path, in the end"
    );
    let noted = fs::read_to_string(&runs).unwrap_or_default();
    assert_eq!(noted.lines().count(), 3, "the slow nft set up all three: {noted:?}");
}

#[test]
fn the_flag_turns_it_off() {
    let t = testworld::kernel_test!();
    let w = world(t, &["--no-client-address"]);
    let _s = server(&w.b, "0.0.0.0", 8080, "b");
    let seen = client(&w.a, Some(&w.w1), "10.77.0.2", 8080, &[]);
    assert!(seen[0].server_saw.starts_with("10.77.0.2:"), "from the pod's own address: {:?}", seen[0]);
    let (nft, rules) = rules_in(&w.b);
    assert!(!nft.contains("dataplane") && !rules.contains("18001"), "nothing installed: {nft}\n{rules}");
    let _ = &w.node1;
}
