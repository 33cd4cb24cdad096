//! Faults against the real binary: a data plane killed mid-transfer, peers
//! that stall, original-destination maps under pressure, fail-open after
//! SIGKILL, and 10,000 connections held for 30 seconds.
mod harness;

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use harness::{
    client, eventually, http_get, peer, privileged, run_args, server, server_with, two_pods, veth, Certs, Cgroup,
    Dataplane, Netns,
};

fn fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_destination_data_plane_killed_mid_transfer() {
    let t = "a_destination_data_plane_killed_mid_transfer";
    if !privileged(t) {
        return;
    }
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
    let t = "stalled_peers_are_closed_at_the_timeouts_and_cost_only_their_sockets";
    if !privileged(t) {
        return;
    }
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let extra = ["--handshake-timeout", "1s", "--admin", "127.0.0.1:0"];
    let dp = Dataplane::start(&own, &run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &extra));

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
        let seen = client(a, Some(&workload), "10.77.0.2", 8080, &["--count", "20"]);
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
    assert!(text.contains("reason=\"handshake_timeout\"} 200"), "200 handshake timeouts counted:\n{text}");
    assert!(text.contains("reason=\"preamble_timeout\"} 1"), "one preamble timeout counted");
}

#[test]
fn idle_connections_are_closed_at_the_idle_timeout() {
    let t = "idle_connections_are_closed_at_the_idle_timeout";
    if !privileged(t) {
        return;
    }
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let _dp =
        Dataplane::start(&own, &run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &["--idle-timeout", "1s"]));
    // One echo, then a pause longer than the idle timeout: the data plane
    // closes the connection, and the second echo fails.
    let r = &peer(&a, Some(&workload), &["hold-verify", "10.77.0.2", "8080", "1", "2.5"])[0];
    assert_eq!(r["ok"], 0, "the second payload finds the connection closed: {r}");
    let r = &peer(&a, Some(&workload), &["hold-verify", "10.77.0.2", "8080", "1", "0.3"])[0];
    assert_eq!(r["ok"], 1, "a shorter pause is fine: {r}");
}

#[test]
fn map_pressure_never_misdelivers() {
    let t = "map_pressure_never_misdelivers";
    if !privileged(t) {
        return;
    }
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let ports = ["8081", "8082", "8083", "8084"];
    let _servers: Vec<_> =
        ports.iter().map(|p| server(&b, "0.0.0.0", p.parse().expect("port"), &format!("s{p}"))).collect();
    // 16 entries per map, and bursts of 400 concurrent connects.
    let dp = Dataplane::start(
        &own,
        &run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &["--map-entries", "16", "--admin", "127.0.0.1:0"]),
    );
    let mut totals = (0, 0, 0);
    for _ in 0..3 {
        let mut args = vec!["burst", "10.77.0.2", "400"];
        args.extend_from_slice(&ports);
        let r = &peer(&a, Some(&workload), &args)[0];
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
    let t = "by_default_capture_stops_when_the_data_plane_dies";
    if !privileged(t) {
        return;
    }
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let mut dp = Dataplane::start(&own, &run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &[]));
    assert_eq!(client(&a, Some(&workload), "10.77.0.2", 8080, &[])[0].peer, "127.0.0.1:18000");
    dp.proc.signal("KILL");
    dp.proc.wait(Duration::from_secs(5));
    assert!(
        eventually(Duration::from_secs(3), || harness::attached(&workload.path).is_empty()),
        "the programs went with the process"
    );
    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("10.77.0.2:8080", "b"), "fail open: direct");
}

#[test]
fn ten_thousand_connections_held_for_thirty_seconds() {
    let t = "ten_thousand_connections_held_for_thirty_seconds";
    if !privileged(t) {
        return;
    }
    // Each data plane holds two sockets per connection; the open-file limit
    // here is 20,000 and cannot be raised (no CAP_SYS_RESOURCE), so the
    // 10,000 connections go through four data planes: two client pods and
    // two server pods, 5,000 connections each.
    const PER_PAIR: usize = 5_000;
    let certs = Certs::new(t, &["10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"]);
    let mut cgroups = Vec::new();
    let mut dps = Vec::new();
    let mut pods = Vec::new();
    for pair in 1..=2 {
        let a = Netns::new(t, &format!("a{pair}"));
        let b = Netns::new(t, &format!("b{pair}"));
        veth(&a, &format!("10.77.{pair}.1/24"), &b, &format!("10.77.{pair}.2/24"));
        pods.push((a, b));
    }
    let servers: Vec<_> =
        pods.iter().map(|(_, b)| server_with(b, &["aserve", "0.0.0.0", "8080", "b"], "aserve")).collect();
    for (i, (a, b)) in pods.iter().enumerate() {
        for (tag, pod) in [("a", a), ("b", b)] {
            let w = Cgroup::new(t, &format!("w{tag}{i}"));
            let d = Cgroup::new(t, &format!("d{tag}{i}"));
            dps.push(Dataplane::start(&d, &run_args(&w, "10.77.0.0/16", &certs, &[pod], &[])));
            cgroups.push((w, d));
        }
    }
    thread::sleep(Duration::from_millis(300));
    let pids: Vec<u32> = dps.iter().map(|d| d.proc.pid()).collect();
    let before: Vec<(usize, u64)> = pids.iter().map(|&p| (fds(p), rss_kib(p))).collect();

    let peak = std::sync::Mutex::new(vec![(0usize, 0u64); pids.len()]);
    let results = thread::scope(|s| {
        let clients: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, (a, _))| {
                let w = &cgroups[2 * i].0;
                let dst = format!("10.77.{}.2", i + 1);
                s.spawn(move || peer(a, Some(w), &["hold-verify", &dst, "8080", &PER_PAIR.to_string(), "30"]))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while clients.iter().any(|c| !c.is_finished()) && Instant::now() < deadline {
            let mut p = peak.lock().expect("peak");
            for (k, &pid) in pids.iter().enumerate() {
                p[k] = (p[k].0.max(fds(pid)), p[k].1.max(rss_kib(pid)));
            }
            drop(p);
            thread::sleep(Duration::from_millis(500));
        }
        clients.into_iter().map(|c| c.join().expect("client")[0].clone()).collect::<Vec<_>>()
    });
    for r in &results {
        assert_eq!(r["ok"], PER_PAIR, "every connection's bytes verified before and after the hold: {r}");
    }
    assert_eq!(servers.iter().map(|s| s.accepted()).sum::<usize>(), 2 * PER_PAIR);
    let peak = peak.into_inner().expect("peak");
    for (k, &pid) in pids.iter().enumerate() {
        assert!(
            peak[k].0 >= before[k].0 + 2 * PER_PAIR - 10,
            "data plane {k} held its connections: {:?} -> {:?}",
            before[k],
            peak[k]
        );
        assert!(
            eventually(Duration::from_secs(10), || fds(pid) <= before[k].0),
            "data plane {k}: file descriptors back to {} (now {})",
            before[k].0,
            fds(pid)
        );
        let back = |pid| rss_kib(pid) <= before[k].1 + (peak[k].1 - before[k].1) / 2;
        let came_back = eventually(Duration::from_secs(10), || back(pid));
        let after = rss_kib(pid);
        eprintln!(
            "data plane {k}: fds {} -> {} -> {}, RSS {} -> {} -> {after} KiB",
            before[k].0,
            peak[k].0,
            fds(pid),
            before[k].1,
            peak[k].1
        );
        assert!(
            came_back,
            "data plane {k}: RSS came back down: before {} KiB, peak {} KiB, after {after} KiB",
            before[k].1, peak[k].1
        );
    }
    drop(dps);
}
