//! The capture path against the real kernel: a cgroup with the programs
//! attached, pods as network namespaces joined by veth, unmodified Python
//! clients and servers, and the data plane binary.

use std::{thread, time::Duration};

use testworld::{attached, client, eventually, run_args, server, two_pods, veth, Certs, Cgroup, Dataplane, Netns};

#[test]
fn captured_connect_reaches_its_original_destination() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2", "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let args = run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &[]);
    let _dp = Dataplane::start(&own, &args);

    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.peer, "127.0.0.1:18000", "the connect was rewritten to the proxy: {s:?}");
    assert_eq!(s.server, "b", "the proxy reached the original destination: {s:?}");
    assert_eq!(s.echo, "ping");
    // The inbound proxy delivers from inside pod B, from A's address.
    assert!(s.server_saw.starts_with("10.77.0.1:"), "the application sees the client pod: {s:?}");
}

#[test]
fn pods_with_the_same_source_port_each_get_their_own_destination() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2", "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    // Two client pods, each with its own link to the server pod.
    let a1 = Netns::new(t, "a");
    let a2 = Netns::new(t, "c");
    let b = Netns::new(t, "b");
    veth(&a1, "10.77.1.1/24", &b, "10.77.1.2/24");
    veth(&a2, "10.77.2.1/24", &b, "10.77.2.2/24");
    let _one = server(&b, "10.77.1.2", 8081, "one");
    let _two = server(&b, "10.77.2.2", 8082, "two");
    let args = run_args(&workload, "10.77.0.0/16", &certs, &[&a1, &a2, &b], &[]);
    let _dp = Dataplane::start(&own, &args);

    // Both pods use source ports 21000..21030 at the same time: below the
    // ephemeral range, where the data plane's own tunnel sockets in the pods'
    // namespaces cannot already hold them.
    const ROUNDS: usize = 30;
    let extra = ["--bind-port", "21000", "--count", "30"];
    let (s1, s2) = thread::scope(|scope| {
        let h1 = scope.spawn(|| client(&a1, Some(&workload), "10.77.1.2", 8081, &extra));
        let h2 = scope.spawn(|| client(&a2, Some(&workload), "10.77.2.2", 8082, &extra));
        (h1.join().expect("client 1"), h2.join().expect("client 2"))
    });
    assert_eq!((s1.len(), s2.len()), (ROUNDS, ROUNDS));
    for (x, y) in s1.iter().zip(&s2) {
        assert_eq!(x.local, y.local, "both pods used the same client address and port");
        assert_eq!(x.peer, "127.0.0.1:18000", "captured: {x:?}");
        assert_eq!(y.peer, "127.0.0.1:18000", "captured: {y:?}");
        assert_eq!((x.server.as_str(), y.server.as_str()), ("one", "two"), "each pod reached its own destination");
    }
}

#[test]
fn uncaptured_connects_go_direct() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2", "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, b_if) = two_pods(t);
    b.ip(&["addr", "add", "10.77.0.3/24", "dev", &b_if]);
    let _s80 = server(&b, "0.0.0.0", 8080, "b8080");
    let _s90 = server(&b, "0.0.0.0", 8090, "b8090");
    let args = run_args(&workload, "10.77.0.2/32", &certs, &[&a, &b], &["--exclude-port", "8090"]);
    let _dp = Dataplane::start(&own, &args);

    let direct = |seen: Vec<testworld::Seen>, to: &str, why: &str| {
        assert_eq!(seen[0].peer, to, "{why} must go direct: {:?}", seen[0]);
        assert_eq!(seen[0].server_saw.split(':').next(), Some("10.77.0.1"));
    };
    direct(client(&a, Some(&workload), "10.77.0.3", 8080, &[]), "10.77.0.3:8080", "a destination outside the CIDRs");
    direct(client(&a, Some(&workload), "10.77.0.2", 8090, &[]), "10.77.0.2:8090", "an excluded port");
    direct(client(&a, None, "10.77.0.2", 8080, &[]), "10.77.0.2:8080", "a client outside the workload cgroup");
    // And the control: the same connect from inside the cgroup is captured.
    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "b8080"));
}

#[test]
fn the_data_planes_own_connects_are_never_captured() {
    let t = testworld::kernel_test!();
    // The data plane runs *inside* the workload cgroup, as it does under the
    // kubelet's pods cgroup on a node: connect4 sees its sockets too.
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2", "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"]);
    let workload = Cgroup::new(t, "w");
    let own = workload.child("dataplane");
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let args = run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &[]);
    let dp = Dataplane::start(&own, &args);

    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!(seen[0].peer, "127.0.0.1:18000", "the client was captured");
    assert_eq!(seen[0].server, "b", "the proxy's own connect to 10.77.0.2:8080 went out, not back to itself");
    drop(dp);
    drop(own);
}

#[test]
fn nothing_stays_attached_after_exit_or_sigkill() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2", "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let a = Netns::new(t, "a");
    let args = run_args(&workload, "10.77.0.0/16", &certs, &[&a], &[]);

    let expect_attached = || {
        let mut w = attached(&workload.path);
        w.sort();
        assert_eq!(w, ["capture_connect4", "capture_connect6", "capture_sockops"], "attached to the workload cgroup");
        assert_eq!(attached(&own.path), ["capture_getsockopt"], "attached to the data plane's cgroup");
    };

    let dp = Dataplane::start(&own, &args);
    expect_attached();
    let status = dp.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(attached(&workload.path).is_empty() && attached(&own.path).is_empty(), "detached after SIGTERM");

    let mut dp = Dataplane::start(&own, &args);
    expect_attached();
    dp.proc.signal("KILL");
    dp.proc.wait(Duration::from_secs(5));
    assert!(
        eventually(Duration::from_secs(5), || attached(&workload.path).is_empty() && attached(&own.path).is_empty()),
        "detached after SIGKILL: workload {:?}, own {:?}",
        attached(&workload.path),
        attached(&own.path)
    );
}
