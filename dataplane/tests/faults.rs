//! Faults against the real binary: a data plane killed mid-transfer, peers
//! that stall, original-destination maps under pressure, fail-open after
//! SIGKILL. (10,000 connections held for 30 s: `soak.rs`.)

use std::{
    thread,
    time::{Duration, Instant},
};

use testworld::{client, eventually, http_get, peer, run_args, server, two_pods, world, Certs, Cgroup, Dataplane};

#[test]
fn a_destination_data_plane_killed_mid_transfer() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let (w1, d1, w2, d2) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"), Cgroup::new(t, "x"), Cgroup::new(t, "e"));
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let _dp1 = Dataplane::start(&d1, &run_args(&w1, "10.77.0.0/16", &certs, &[&a], &[]));
    let args2 = run_args(&w2, "10.77.0.0/16", &certs, &[&b], &[]);
    let mut dp2 = Dataplane::start(&d2, &args2);

    let (result, after_kill) = thread::scope(|s| {
        let transfer = s.spawn(|| peer(&a, Some(&w1), &["slow", "10.77.0.2", "8080", "20"]));
        thread::sleep(Duration::from_millis(1000));
        dp2.proc.signal("KILL");
        let killed = Instant::now();
        let r = transfer.join().expect("client");
        (r[0].clone(), killed.elapsed())
    });
    assert_eq!(result["ok"], false, "the client saw the failure: {result}");
    assert!(result["lines"].as_u64().expect("lines") >= 5, "it was flowing before: {result}");
    assert!(after_kill < Duration::from_secs(2), "an error within 2 s, not a hang ({after_kill:?}): {result}");
    dp2.proc.wait(Duration::from_secs(5));

    // Back as soon as it reports ready.
    let _dp2 = Dataplane::start(&d2, &args2);
    let seen = client(&a, Some(&w1), "10.77.0.2", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "b"));
}

#[test]
fn stalled_peers_are_closed_at_the_timeouts_and_cost_only_their_sockets() {
    let t = testworld::kernel_test!();
    let w = world(t, &["10.77.0.1", "10.77.0.2"], &["--handshake-timeout", "1s", "--admin", "127.0.0.1:0"]);
    let (a, b, workload, certs, dp) = (&w.a, &w.b, &w.workload, &w.certs, &w.dp);
    let _srv = server(b, "0.0.0.0", 8080, "b");

    let a = &a;
    thread::scope(|s| {
        // 200 connections to 18001 that never say a word (slowloris)...
        let stalled = s.spawn(move || peer(a, None, &["stall", "10.77.0.2", "18001", "200"]));
        // ...one that completes the handshake and then says nothing...
        let ca = format!("{}/ca.crt", certs.path());
        let (crt, key) = (format!("{}/10.77.0.1.crt", certs.path()), format!("{}/10.77.0.1.key", certs.path()));
        let quiet = s.spawn(move || peer(a, None, &["tls", "10.77.0.2", "18001", &ca, &crt, &key, "stall"]));
        // ...while real traffic flows as usual.
        thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let seen = client(a, Some(workload), "10.77.0.2", 8080, &["--count", "20"]);
        assert_eq!(seen.len(), 20);
        assert!(t0.elapsed() < Duration::from_secs(5), "normal connections are not held up ({:?})", t0.elapsed());
        let st = &stalled.join().expect("stall")[0];
        assert_eq!(st["closed"], 200, "{st}");
        assert!(st["max_seconds"].as_f64().expect("s") < 3.0, "closed at the 1 s handshake timeout: {st}");
        let q = &quiet.join().expect("quiet")[0];
        let after = q["closed_after"].as_f64().expect("closed_after");
        assert!(after > 0.5 && after < 3.0, "closed at the preamble timeout: {q}");
    });
    let (_, text) = http_get(&dp.admin(), "/metrics").expect("metrics");
    // Silent ones are let go at the first-bytes deadline (here the 1 s
    // handshake timeout, the shorter of the two).
    assert!(text.contains("reason=\"first_bytes_timeout\"} 200"), "200 first-bytes timeouts counted:\n{text}");
    assert!(text.contains("reason=\"preamble_timeout\"} 1"), "one preamble timeout counted");
}

#[test]
fn a_preamble_dripped_byte_by_byte_is_cut_at_the_handshake_timeout_in_total() {
    let t = testworld::kernel_test!();
    let w = world(t, &["10.77.0.1", "10.77.0.2"], &["--handshake-timeout", "1s"]);
    let srv = server(&w.b, "0.0.0.0", 8080, "b");
    // An authenticated peer (pod A's own certificate) sends a valid 10-byte
    // preamble one byte every 0.3 s: every gap is well inside the timeout,
    // the whole would take 3 s.
    let c = |f: &str| format!("{}/{f}", w.certs.path());
    let (ca, crt, key) = (c("ca.crt"), c("10.77.0.1.crt"), c("10.77.0.1.key"));
    let r = &peer(&w.a, None, &["tls", "10.77.0.2", "18001", &ca, &crt, &key, "drip:10.77.0.2:8080"])[0];
    assert_eq!(r["handshake"], "ok", "{r}");
    assert!(r["sent"].as_u64().expect("sent") < 10, "cut before the preamble was complete: {r}");
    let after = r["closed_after"].as_f64().expect("closed_after");
    assert!(after < 2.0, "closed about 1 s after the handshake began, not per byte: {r}");
    assert!(r["reply"].is_null(), "nothing was delivered: {r}");
    assert_eq!(srv.accepted(), 0, "the application never saw a connection");
    let (_, text) = http_get(&w.dp.admin(), "/metrics").expect("metrics");
    assert!(text.contains("reason=\"preamble_timeout\"} 1"), "one preamble timeout counted:\n{text}");
}

#[test]
fn idle_connections_are_closed_at_the_idle_timeout() {
    let t = testworld::kernel_test!();
    let w = world(t, &["10.77.0.1", "10.77.0.2"], &["--idle-timeout", "1s"]);
    let (a, b, workload) = (&w.a, &w.b, &w.workload);
    let _srv = server(b, "0.0.0.0", 8080, "b");
    // One echo, then a pause longer than the idle timeout: the data plane
    // closes the connection, and the second echo fails.
    let r = &peer(a, Some(workload), &["hold-verify", "10.77.0.2", "8080", "1", "2.5"])[0];
    assert_eq!(r["ok"], 0, "the second payload finds the connection closed: {r}");
    let r = &peer(a, Some(workload), &["hold-verify", "10.77.0.2", "8080", "1", "0.3"])[0];
    assert_eq!(r["ok"], 1, "a shorter pause is fine: {r}");
}

#[test]
fn idle_connections_stay_open_and_keepalive_finds_a_peer_gone_silent() {
    let t = testworld::kernel_test!();
    let w = world(t, &["10.77.0.1", "10.77.0.2"], &["--tcp-keepalive", "1s"]);
    let (a, b, workload) = (&w.a, &w.b, &w.workload);
    let _srv = server(b, "0.0.0.0", 8080, "b");
    // No idle timeout by default: a pause of 4 s (four keepalive idle times)
    // leaves the connection as it was.
    let r = &peer(a, Some(workload), &["hold-verify", "10.77.0.2", "8080", "1", "4"])[0];
    assert_eq!(r["ok"], 1, "the connection outlived the pause: {r}");

    // The application's end goes silent without a word (every packet of
    // port 8080 in its namespace dropped, as when its node is gone): the
    // data plane's keepalive probes go unanswered, and the client's
    // connection is closed, where it would otherwise stay open forever.
    let open = testworld::open_quiet(a, Some(workload), "10.77.0.2", 8080, 30);
    let rules = "table inet gone { chain o { type filter hook output priority 0; \
                 tcp dport 8080 drop; tcp sport 8080 drop; }; }";
    assert!(b.command(None, "nft", &[rules]).status().expect("nft").success(), "the drop rules");
    let r = &testworld::how_it_ended(open, Duration::from_secs(40));
    assert!(r["result"] == "eof" || r["result"] == "reset", "closed, not left open: {r}");
    println!("a silent peer found after {:.1} s (keepalive 1 s, six probes 1 s apart)", r["seconds"]);
}

#[test]
fn map_pressure_never_misdelivers() {
    let t = testworld::kernel_test!();
    // 16 entries per map, and bursts of 400 concurrent connects.
    let w = world(t, &["10.77.0.1", "10.77.0.2"], &["--map-entries", "16", "--admin", "127.0.0.1:0"]);
    let (a, b, workload, dp) = (&w.a, &w.b, &w.workload, &w.dp);
    let ports = ["8081", "8082", "8083", "8084"];
    let _servers: Vec<_> =
        ports.iter().map(|p| server(b, "0.0.0.0", p.parse().expect("port"), &format!("s{p}"))).collect();
    let mut totals = (0, 0, 0);
    for _ in 0..3 {
        let mut args = vec!["burst", "10.77.0.2", "400"];
        args.extend_from_slice(&ports);
        let r = &peer(a, Some(workload), &args)[0];
        let n = |k: &str| r[k].as_u64().expect(k);
        assert_eq!(n("wrong"), 0, "no connection reached the wrong server: {r}");
        assert_eq!(n("right") + n("refused"), 400, "{r}");
        totals = (totals.0 + n("right"), totals.1 + n("refused"), totals.2 + n("wrong"));
    }
    eprintln!("map pressure: {} delivered, {} refused, {} misdelivered", totals.0, totals.1, totals.2);
    let (_, text) = http_get(&dp.admin(), "/metrics").expect("metrics");
    assert!(text.contains("dataplane_bpf_decisions_total{decision=\"captured\"} 1200"), "every connect was captured");
}

#[test]
fn by_default_capture_stops_when_the_data_plane_dies() {
    let t = testworld::kernel_test!();
    let mut w = world(t, &["10.77.0.1", "10.77.0.2"], &[]);
    let (a, b, workload) = (&w.a, &w.b, &w.workload);
    let _srv = server(b, "0.0.0.0", 8080, "b");
    assert_eq!(client(a, Some(workload), "10.77.0.2", 8080, &[])[0].peer, "127.0.0.1:18000");
    w.dp.proc.signal("KILL");
    w.dp.proc.wait(Duration::from_secs(5));
    assert!(
        eventually(Duration::from_secs(3), || testworld::attached(&workload.path).is_empty()),
        "the programs went with the process"
    );
    let seen = client(a, Some(workload), "10.77.0.2", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("10.77.0.2:8080", "b"), "fail open: direct");
}
