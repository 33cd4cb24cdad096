//! Hostile input against the real binary: whatever arrives at 18001 or
//! 18000, or whatever certificate the far side presents, is refused, logged
//! and counted, and nothing reaches an application.

use std::{fs, thread, time::Duration};

use testworld::{http_get, metric, peer, run_args, server, two_pods, world, Certs, Cgroup, Dataplane};

fn refused(admin: &str, direction: &str, reason: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").expect("metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("dataplane_connections_failed_total{")
                && l.contains(&format!("direction=\"{direction}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A second certificate directory with the same CA as `certs`.
fn sibling(certs: &Certs, test: &str) -> Certs {
    let other = Certs::new(test, &[]);
    for f in ["ca.crt", "ca.key"] {
        fs::copy(certs.dir.join(f), other.dir.join(f)).expect("copy the CA");
    }
    other
}

#[test]
fn the_tunnel_port_refuses_everything_hostile() {
    let t = testworld::kernel_test!();
    let w =
        world(t, &["10.77.0.1", "10.77.0.2", "10.77.0.9"], &["--admin", "127.0.0.1:0", "--handshake-timeout", "2s"]);
    let (a, b, certs, dp) = (&w.a, &w.b, &w.certs, &w.dp);
    let app = server(b, "0.0.0.0", 8080, "app");
    let admin = dp.admin();

    let expired = sibling(certs, &format!("{t}-expired"));
    expired.issue("10.77.0.1", &["--not-before-days", "10", "--days", "5"]);
    let future = sibling(certs, &format!("{t}-future"));
    future.issue("10.77.0.1", &["--not-before-days", "-2", "--days", "5"]);
    let other_ca = Certs::new(&format!("{t}-other"), &["10.77.0.1"]);

    let ca = format!("{}/ca.crt", certs.path());
    let pair = |c: &Certs, ip: &str| (format!("{}/{ip}.crt", c.path()), format!("{}/{ip}.key", c.path()));
    let probe = |(crt, key): &(String, String), dst: &str, extra: &[&str]| {
        let mut args = vec!["tls", "10.77.0.2", "18001", &ca, crt.as_str(), key.as_str(), dst];
        args.extend_from_slice(extra);
        peer(a, None, &args)[0].clone()
    };
    let good = pair(certs, "10.77.0.1");
    let ok = probe(&good, "10.77.0.2:8080", &[]);
    assert!(ok["reply"].as_str().is_some_and(|r| r.contains("\"server\": \"app\"")), "the probe works: {ok}");

    let none = ("-".to_string(), "-".to_string());
    // (what, the reason the data plane must count, the probe's result)
    let cases = [
        ("no client certificate", "no_client_certificate", probe(&none, "10.77.0.2:8080", &[])),
        // Both CAs are named "dataplane cluster CA": the chain is matched by
        // name and fails on the signature.
        ("a certificate from another CA", "bad_signature", probe(&pair(&other_ca, "10.77.0.1"), "10.77.0.2:8080", &[])),
        ("an expired certificate", "expired", probe(&pair(&expired, "10.77.0.1"), "10.77.0.2:8080", &[])),
        ("a not-yet-valid certificate", "not_yet_valid", probe(&pair(&future, "10.77.0.1"), "10.77.0.2:8080", &[])),
        ("a certificate for another IP", "client_ip_mismatch", probe(&pair(certs, "10.77.0.9"), "10.77.0.2:8080", &[])),
        ("TLS 1.2", "incompatible_peer", probe(&good, "10.77.0.2:8080", &["tls12"])),
        ("a garbage preamble", "preamble_version", probe(&good, "garbage", &[])),
        ("a truncated preamble", "preamble_truncated", probe(&good, "truncated", &[])),
        ("an oversized preamble", "preamble_too_long", probe(&good, "oversized", &[])),
        ("a wrong-version preamble", "preamble_version", probe(&good, "version2", &[])),
        ("a preamble naming another host", "not_this_pod", probe(&good, "10.77.0.9:8080", &[])),
        ("a preamble naming the node's loopback", "not_this_pod", probe(&good, "127.0.0.1:8080", &[])),
        ("a preamble naming another pod", "not_this_pod", probe(&good, "10.77.0.1:8080", &[])),
    ];
    for (what, _, r) in &cases {
        let reply = r["reply"].as_str().unwrap_or("");
        assert!(!reply.contains("server"), "{what}: nothing from the app: {r}");
    }
    // Not TLS at all.
    for what in ["garbage", "random"] {
        let r = &peer(a, None, &["raw", "10.77.0.2", "18001", what])[0];
        assert!(r["seconds"].as_f64().expect("seconds") < 2.5, "{what}: closed promptly: {r}");
    }
    thread::sleep(Duration::from_millis(300));
    assert_eq!(app.accepted(), 1, "only the good probe reached the application");
    for (what, reason, _) in &cases {
        assert!(refused(&admin, "inbound", reason) >= 1.0, "{what}: counted as {reason}");
    }
    assert!(refused(&admin, "inbound", "not_tls") >= 2.0, "garbage and random bytes counted as not_tls");
    let logged = dp.proc.output().iter().filter(|l| l.contains("inbound refused")).count();
    assert_eq!(logged, cases.len() + 2, "every refusal logged once");
}

#[test]
fn an_uncaptured_connection_to_the_outbound_port_is_refused() {
    let t = testworld::kernel_test!();
    let w = world(t, &["10.77.0.1", "10.77.0.2"], &["--admin", "127.0.0.1:0"]);
    let (a, b, dp) = (&w.a, &w.b, &w.dp);
    let _app = server(b, "0.0.0.0", 8080, "app");
    // Straight to 127.0.0.1:18000 from pod A, not through a captured connect.
    let r = &peer(a, None, &["expect-reset", "127.0.0.1", "18000"])[0];
    assert_eq!(r["result"], "reset", "{r}");
    assert_eq!(refused(&dp.admin(), "outbound", "no_original_destination"), 1.0);
    let (_, text) = http_get(&dp.admin(), "/metrics").expect("metrics");
    assert_eq!(metric(&text, "dataplane_bpf_decisions_total{decision=\"orig_dst_missed\"}"), Some(1.0));
}

#[test]
fn a_server_certificate_for_another_ip_is_refused_and_nothing_is_sent() {
    let t = testworld::kernel_test!();
    // B's data plane holds, under B's address, a certificate for 10.77.0.9.
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.9"]);
    fs::copy(certs.dir.join("10.77.0.9.crt"), certs.dir.join("10.77.0.2.crt")).expect("crt");
    fs::copy(certs.dir.join("10.77.0.9.key"), certs.dir.join("10.77.0.2.key")).expect("key");
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let app = server(&b, "0.0.0.0", 8080, "app");
    let dp =
        Dataplane::start(&own, &run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &["--admin", "127.0.0.1:0"]));
    let r = &peer(&a, Some(&workload), &["expect-reset", "10.77.0.2", "8080"])[0];
    assert_eq!(r["result"], "reset", "the client is refused: {r}");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(app.accepted(), 0, "nothing reached the application");
    assert_eq!(refused(&dp.admin(), "outbound", "wrong_name"), 1.0, "counted on the outbound side");
    // A normal client sees the same.
    let out = testworld::Netns::command(
        &a,
        Some(&workload),
        "python3",
        &[&testworld::peers_py(), "connect", "10.77.0.2", "8080"],
    )
    .output()
    .expect("client");
    assert!(!out.status.success(), "the connection is refused, not delivered");
}
