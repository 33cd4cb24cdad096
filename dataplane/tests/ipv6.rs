//! IPv6 and dual-stack pods against the real kernel: `connect6`, the IPv6
//! listeners, `IP6T_SO_ORIGINAL_DST`, the preamble's IPv6 form, certificates
//! for IPv6 addresses and the return path of both families; the hostile-input,
//! fault, strict-mode and same-node tests of the IPv4 files, over IPv6. Pods
//! A and B each hold an IPv4 and an IPv6 address (ULA, only inside the
//! namespaces the test makes).

use std::{thread, time::Duration};

use testworld::{
    capture, client, metric, peer, run_args, server, server_with, transfer_exact, Certs, Cgroup, Dataplane, Netns,
};

const A4: &str = "10.77.0.1";
const B4: &str = "10.77.0.2";
const A6: &str = "fd00:77::1";
const B6: &str = "fd00:77::2";

/// Pods A and B, dual-stack, joined by veth, and one data plane serving
/// both with certificates for all four addresses. Dropped in field order
/// (the data plane first).
struct Dual {
    dp: Dataplane,
    a: Netns,
    b: Netns,
    b_if: String,
    workload: Cgroup,
    own: Cgroup,
    certs: Certs,
}

fn dual(t: &str, extra: &[&str]) -> Dual {
    let certs = Certs::new(t, &[A4, B4, A6, B6]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, b_if) = testworld::two_pods(t);
    let a_if = format!("v{}", &b.name[..b.name.len().min(14)]);
    // nodad: usable at once, as CNIs configure pods.
    a.ip(&["-6", "addr", "add", &format!("{A6}/64"), "dev", &a_if, "nodad"]);
    b.ip(&["-6", "addr", "add", &format!("{B6}/64"), "dev", &b_if, "nodad"]);
    let cidrs = "10.77.0.0/16,fd00:77::/64";
    let dp = Dataplane::start(&own, &run_args(&workload, cidrs, &certs, &[&a, &b], extra));
    Dual { dp, a, b, b_if, workload, own, certs }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn a_dual_stack_pod_reaches_a_dual_stack_pod_over_both_families_through_the_tunnel() {
    let t = testworld::kernel_test!();
    let w = dual(t, &[]);
    // One server on both families, as most applications listen.
    let _srv = server(&w.b, "::", 8080, "b");
    let secret = "SECRET-V6-MARKER-2d41";
    let control = "PLAINTEXT-V6-CONTROL-9e07";
    let (raw, text) = capture(&w.b, &w.b_if, || {
        // IPv6: captured by connect6, sent to [::1]:18000, tunnelled to
        // [B6]:18001; the server sees A's IPv6 address (client address on).
        let s = client(&w.a, Some(&w.workload), B6, 8080, &["--payload", secret]);
        assert_eq!(s[0].peer, "[::1]:18000", "captured to the IPv6 listener: {s:?}");
        assert_eq!(s[0].echo, secret);
        assert!(s[0].server_saw.starts_with(&format!("[{A6}]:")), "the server sees A's IPv6 address: {s:?}");
        // IPv4 from the same pod, unchanged.
        let s = client(&w.a, Some(&w.workload), B4, 8080, &["--payload", secret]);
        assert_eq!(s[0].peer, "127.0.0.1:18000", "{s:?}");
        assert!(s[0].server_saw.contains(A4), "the server sees A's IPv4 address: {s:?}");
        // A dual-stack socket connecting to an IPv4-mapped address is an
        // IPv4 connect: captured by connect6 as IPv4, to the IPv4 proxy.
        let s = client(&w.a, Some(&w.workload), &format!("::ffff:{B4}"), 8080, &["--payload", secret]);
        assert_eq!(s[0].peer, "[::ffff:127.0.0.1]:18000", "to the IPv4 listener, mapped: {s:?}");
        assert!(s[0].server_saw.contains(A4), "{s:?}");
        // Control: outside the workload cgroup the same IPv6 connect goes
        // direct, in plaintext, and the capture sees it.
        let s = client(&w.a, None, B6, 8080, &["--payload", control]);
        assert_eq!(s[0].peer, format!("[{B6}]:8080"));
    });
    assert!(contains(&raw, control), "the capture sees plaintext when there is some:\n{text}");
    assert!(!contains(&raw, secret), "the tunnelled marker never crossed the wire in clear");
    assert!(text.contains(&format!("{B6}.18001")), "IPv6 tunnel traffic on 18001:\n{text}");
    assert!(text.contains(&format!("{B4}.18001")), "IPv4 tunnel traffic on 18001:\n{text}");

    let (_, m) = testworld::http_get(&w.dp.admin(), "/metrics").expect("metrics");
    assert_eq!(metric(&m, "dataplane_bpf_decisions_total{decision=\"captured\"}"), Some(3.0), "{m}");
    assert_eq!(metric(&m, "dataplane_bpf_decisions_total{decision=\"orig_dst_found\"}"), Some(3.0), "{m}");
}

#[test]
fn exact_bytes_both_ways_over_ipv6() {
    let t = testworld::kernel_test!();
    let w = dual(t, &[]);
    let _sink = server_with(&w.b, &["sink", "::", "9000"], "sink");
    for n in [1u64, 64 * 1024 * 1024] {
        transfer_exact(&w.a, Some(&w.workload), B6, 9000, n);
    }
}

#[test]
fn refusals_at_the_ipv6_tunnel_port() {
    let t = testworld::kernel_test!();
    let w = dual(t, &[]);
    let app = server(&w.b, "::", 8080, "app");
    let ca = format!("{}/ca.crt", w.certs.path());
    let mine = |ip: &str| (format!("{}/{ip}.crt", w.certs.path()), format!("{}/{ip}.key", w.certs.path()));
    let (a_crt, a_key) = mine(A6);
    let (a4_crt, a4_key) = mine(A4);
    // Straight to [B6]:18001 from pod A, outside the workload cgroup.
    let probe =
        |crt: &str, key: &str, dst: &str| peer(&w.a, None, &["tls", B6, "18001", &ca, crt, key, dst])[0].clone();

    let ok = probe(&a_crt, &a_key, &format!("[{B6}]:8080"));
    assert!(ok["reply"].as_str().is_some_and(|r| r.contains("\"server\": \"app\"")), "the probe itself works: {ok}");
    assert_eq!(app.accepted(), 1);
    let refused = [
        ("A's IPv4 certificate from its IPv6 address", probe(&a4_crt, &a4_key, &format!("[{B6}]:8080"))),
        ("a preamble naming B's IPv4 address", probe(&a_crt, &a_key, &format!("{B4}:8080"))),
        ("a preamble naming another IPv6 pod", probe(&a_crt, &a_key, "[fd00:77::9]:8080")),
        ("a preamble naming the pod's loopback", probe(&a_crt, &a_key, "[::1]:8080")),
        ("a garbage preamble", probe(&a_crt, &a_key, "garbage")),
    ];
    for (what, r) in &refused {
        let reply = r["reply"].as_str().unwrap_or("");
        assert!(!reply.contains("server"), "{what}: must get nothing from the app: {r}");
    }
    let garbage = &peer(&w.a, None, &["raw", B6, "18001", "garbage"])[0];
    // At most a TLS alert (7 bytes), then the close.
    let n = garbage["reply_bytes"].as_u64().expect("reply_bytes");
    assert!(n <= 7, "plain HTTP at the IPv6 tunnel port gets nothing back: {garbage}");
    assert!(garbage["seconds"].as_f64().expect("seconds") < 2.5, "closed promptly: {garbage}");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(app.accepted(), 1, "nothing forwarded for any refusal");
    let logs = w.dp.proc.output().join("\n");
    for reason in ["client_ip_mismatch", "not_this_pod", "preamble_version", "not_tls"] {
        assert!(logs.contains(reason), "refusal {reason} logged:\n{logs}");
    }
}

#[test]
fn an_unenrolled_namespace_cannot_reach_a_meshed_ipv6_pod_in_plaintext() {
    let t = testworld::kernel_test!();
    let w = dual(t, &[]);
    // A third namespace in the workloads' cgroup that no data plane serves:
    // connect6 refuses its connect before any route is looked up.
    let c = Netns::new(t, "c");
    let r = &peer(&c, Some(&w.workload), &["try-connect", B6, "8080"])[0];
    assert!(r["result"].as_str().is_some_and(|e| e.contains("Operation not permitted")), "refused with EPERM: {r}");
    let (_, m) = testworld::http_get(&w.dp.admin(), "/metrics").expect("metrics");
    assert_eq!(metric(&m, "dataplane_bpf_decisions_total{decision=\"refused_unenrolled\"}"), Some(1.0), "{m}");
}

#[test]
fn stalled_peers_at_the_ipv6_tunnel_port_are_closed_and_traffic_flows() {
    let t = testworld::kernel_test!();
    let w = dual(t, &["--handshake-timeout", "1s"]);
    let _srv = server(&w.b, "::", 8080, "b");
    thread::scope(|s| {
        // 100 connections to [B6]:18001 that never say a word...
        let stalled = s.spawn(|| peer(&w.a, None, &["stall", B6, "18001", "100"]));
        // ...while real traffic flows as usual.
        thread::sleep(Duration::from_millis(300));
        let seen = client(&w.a, Some(&w.workload), B6, 8080, &["--count", "20"]);
        assert!(seen.iter().all(|s| s.server == "b"), "{seen:?}");
        let st = &stalled.join().expect("stall")[0];
        assert_eq!(st["closed"], 100, "{st}");
        assert!(st["max_seconds"].as_f64().expect("s") < 3.0, "closed at the 1 s handshake timeout: {st}");
    });
    let (_, text) = testworld::http_get(&w.dp.admin(), "/metrics").expect("metrics");
    assert!(text.contains("reason=\"first_bytes_timeout\"} 100"), "100 first-bytes timeouts counted:\n{text}");
}

#[test]
fn by_default_ipv6_capture_stops_when_the_data_plane_dies() {
    let t = testworld::kernel_test!();
    let mut w = dual(t, &[]);
    let _srv = server(&w.b, "::", 8080, "b");
    assert_eq!(client(&w.a, Some(&w.workload), B6, 8080, &[])[0].peer, "[::1]:18000");
    w.dp.proc.signal("KILL");
    w.dp.proc.wait(Duration::from_secs(5));
    assert!(
        testworld::eventually(Duration::from_secs(3), || testworld::attached(&w.workload.path).is_empty()),
        "the programs went with the process"
    );
    let seen = client(&w.a, Some(&w.workload), B6, 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), (format!("[{B6}]:8080").as_str(), "b"), "fail open");
}

#[test]
fn strict_mode_refuses_ipv6_connects_while_no_data_plane_runs() {
    let t = testworld::kernel_test!();
    let bpffs = testworld::BpfFs::new(t);
    let pins = bpffs.0.join("dataplane").display().to_string();
    let mut w = dual(t, &["--strict", "--pin-dir", &pins]);
    let _srv = server(&w.b, "::", 8080, "b");
    assert_eq!(client(&w.a, Some(&w.workload), B6, 8080, &[])[0].server, "b");
    w.dp.proc.signal("KILL");
    w.dp.proc.wait(Duration::from_secs(5));
    // connect6 stays pinned: the captured connect goes to [::1]:18000, where
    // nothing listens now. Never in plaintext.
    for dst in [B6, B4, &format!("::ffff:{B4}")] {
        let r = &peer(&w.a, Some(&w.workload), &["try-connect", dst, "8080"])[0];
        assert_eq!(r["result"], "refused", "{dst}: fail closed: {r}");
    }
    let outside = &peer(&w.a, None, &["try-connect", B6, "8080"])[0];
    assert_eq!(outside["result"], "connected", "a process outside the workloads is not touched: {outside}");
    // The next instance adopts the pins; traffic flows again. Fail open on
    // the way out, so nothing stays pinned after the test.
    let open = run_args(&w.workload, "10.77.0.0/16,fd00:77::/64", &w.certs, &[&w.a, &w.b], &["--pin-dir", &pins]);
    w.dp = Dataplane::start(&w.own, &open);
    assert_eq!(client(&w.a, Some(&w.workload), B6, 8080, &[])[0].peer, "[::1]:18000");
}

#[test]
fn pods_of_one_node_skip_the_tunnel_over_ipv6_when_asked() {
    let t = testworld::kernel_test!();
    let w = dual(t, &["--same-node-fast-path"]);
    let _srv = server(&w.b, "::", 8080, "b");
    const N: usize = 10;
    let (_, text) = capture(&w.b, &w.b_if, || {
        for dst in [B6, B4] {
            let seen = client(&w.a, Some(&w.workload), dst, 8080, &["--count", &N.to_string()]);
            for s in &seen {
                assert_eq!((s.server.as_str(), s.echo.as_str()), ("b", "ping"), "{s:?}");
            }
            let from = if dst == B6 { format!("[{A6}]:") } else { format!("[::ffff:{A4}]:") };
            assert!(seen.iter().all(|s| s.server_saw.starts_with(&from)), "the server saw {from}: {seen:?}");
        }
    });
    assert_eq!(text.trim(), "", "nothing crossed the link");
    let (_, m) = testworld::http_get(&w.dp.admin(), "/metrics").expect("metrics");
    assert_eq!(metric(&m, "dataplane_same_node_connections_total"), Some((2 * N) as f64), "{m}");
}

#[test]
fn ipv6_only_pods_are_served_without_any_ipv4_address() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, &[A6, B6]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, b_if) = testworld::two_pods(t);
    let a_if = format!("v{}", &b.name[..b.name.len().min(14)]);
    for (pod, dev, v4, v6) in [(&a, &a_if, A4, A6), (&b, &b_if, B4, B6)] {
        pod.ip(&["addr", "del", &format!("{v4}/24"), "dev", dev]);
        pod.ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
    }
    let _srv = server(&b, "::", 8080, "b");
    let dp = Dataplane::start(&own, &run_args(&workload, "fd00:77::/64", &certs, &[&a, &b], &[]));
    let seen = client(&a, Some(&workload), B6, 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("[::1]:18000", "b"), "{seen:?}");
    assert!(seen[0].server_saw.starts_with(&format!("[{A6}]:")), "the server sees A's address: {seen:?}");
    let (_, m) = testworld::http_get(&dp.admin(), "/metrics").expect("metrics");
    for why in ["return_path", "socket"] {
        let name = format!("dataplane_client_address_unavailable_total{{why=\"{why}\"}}");
        assert_eq!(metric(&m, &name), Some(0.0), "the IPv6 return path is in place: {m}");
    }
}
