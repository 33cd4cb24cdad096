//! The same-node fast path spliced in the kernel (sockmap), against the real
//! kernel: two pods on one node's bridge, one data plane serving both with
//! `--same-node-fast-path`. What the kernel carries must arrive exactly,
//! end exactly as the client or server ended it, stay bounded when a reader
//! stalls, and be counted.

use std::time::Duration;

use testworld::{
    eventually, http_get, metric, peer, run_args, server, server_with, Certs, Cgroup, Dataplane, Netns, NetnsDir, Proc,
};

/// One node: a data plane with the fast path serving pods p1 (10.77.0.1)
/// and p2 (10.77.0.2), with `extra` flags.
struct Node {
    workload: Cgroup,
    pods: Vec<Netns>,
    dp: Dataplane,
    _rest: (Certs, Cgroup, Netns, NetnsDir),
}

impl Node {
    fn new(t: &str, extra: &[&str]) -> Self {
        let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
        let (workload, own) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"));
        let node = testworld::bridge(t, "node");
        let dir = NetnsDir::new(t);
        let dir_s = dir.path();
        let mut args = vec!["--netns-dir", &dir_s, "--admin", "127.0.0.1:0", "--same-node-fast-path"];
        args.extend_from_slice(extra);
        let dp = Dataplane::start(&own, &run_args(&workload, "10.77.0.0/16", &certs, &[], &args));
        let pods: Vec<Netns> = (1..=2).map(|i| Netns::new(t, &format!("p{i}"))).collect();
        for (i, p) in pods.iter().enumerate() {
            testworld::plug(&node, p, &format!("10.77.0.{}", i + 1));
            dir.add(p);
        }
        let admin = dp.admin();
        let served = || {
            http_get(&admin, "/metrics").ok().and_then(|(_, m)| metric(&m, "dataplane_namespaces{state=\"served\"}"))
        };
        assert!(eventually(Duration::from_secs(5), || served() == Some(2.0)), "both pods served");
        Self { workload, pods, dp, _rest: (certs, own, node, dir) }
    }

    /// Runs a `peers.py` client in p1, captured.
    fn client(&self, args: &[&str]) -> Vec<serde_json::Value> {
        peer(&self.pods[0], Some(&self.workload), args)
    }

    fn metrics(&self) -> String {
        http_get(&self.dp.admin(), "/metrics").expect("metrics").1
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics(), name).unwrap_or(0.0)
    }
}

fn sink(n: &Node) -> Proc {
    server_with(&n.pods[1], &["sink", "0.0.0.0", "8080"], "sink")
}

/// Request and reply both under the kernel's backlog bound, the client
/// waiting until it is spliced before it sends: the kernel carries both
/// ways, and each end's FIN is passed on only after every byte before it.
/// Then 48 MiB each way, to a server that starts reading only after half a
/// second: the kernel pauses the client's direction (it would pile up) and
/// this process relays the rest, after what the kernel had handed on.
/// Every byte arrives once, in order, and is counted once, whoever
/// carried it.
#[test]
fn spliced_bytes_arrive_exactly_and_in_order_with_half_close() {
    let t = testworld::kernel_test!();
    let n = Node::new(t, &[]);
    let _sink = sink(&n);
    let _late = server_with(&n.pods[1], &["sink", "0.0.0.0", "8081", "0.5"], "late sink");
    let mut total = 0u64;
    for (size, wait, port) in [(1_000_003u64, "0.3", "8080"), (48 << 20, "0", "8081")] {
        let s = size.to_string();
        let r = &n.client(&["transfer", "10.77.0.2", port, &s, &s, wait])[0];
        assert_eq!(r["server_got"].as_u64(), Some(size), "{size} bytes to the server: {r}");
        assert_eq!((r["sent_ok"].as_bool(), r["received_ok"].as_bool()), (Some(true), Some(true)), "{size}: {r}");
        assert_eq!(r["received"].as_u64(), Some(size), "{size} bytes back: {r}");
        // The request starts with a header line "SIZE 2\n".
        total += size + s.len() as u64 + 3;
    }
    let text = n.metrics();
    let m = |name: &str| metric(&text, name).unwrap_or(0.0);
    assert_eq!(m("dataplane_same_node_spliced_connections_total{how=\"kernel\"}"), 2.0, "{text}");
    assert!(m("dataplane_same_node_splice_paused_total") >= 1.0, "48 MiB were handed back to user space: {text}");
    assert_eq!(m("dataplane_connections_completed_total{direction=\"outbound\"}"), 2.0, "{text}");
    let up = m("dataplane_bytes_total{direction=\"outbound\",flow=\"to_upstream\"}");
    assert_eq!(up, total as f64, "every byte to the server counted once: {text}");
}

/// A server that writes and closes at once, reading nothing, and a client
/// that only reads: however the race with the splice goes (the server's
/// socket may be closing already when the pair is made), the client gets
/// every byte, then EOF.
#[test]
fn a_server_that_writes_and_closes_at_once_is_read_to_the_end() {
    let t = testworld::kernel_test!();
    let n = Node::new(t, &[]);
    let _greet = server_with(&n.pods[1], &["greet", "0.0.0.0", "8080", "3000001"], "greet");
    for _ in 0..10 {
        let r = &n.client(&["read", "10.77.0.2", "8080", "3000001"])[0];
        assert_eq!((r["got"].as_u64(), r["ok"].as_bool()), (Some(3_000_001), Some(true)), "{r}");
    }
    let text = n.metrics();
    let m = |name: &str| metric(&text, name).unwrap_or(0.0);
    let (kernel, user) = (
        m("dataplane_same_node_spliced_connections_total{how=\"kernel\"}"),
        m("dataplane_same_node_spliced_connections_total{how=\"user_space\"}"),
    );
    assert_eq!(kernel + user, 10.0, "each connection went one way or the other: {text}");
    assert_eq!(m("dataplane_connections_completed_total{direction=\"outbound\"}"), 10.0, "{text}");
}

/// A server that resets the connection: the client sees a reset, not an EOF.
#[test]
fn a_reset_on_one_side_is_a_reset_on_the_other() {
    let t = testworld::kernel_test!();
    let n = Node::new(t, &[]);
    let _reset = server_with(&n.pods[1], &["reset", "0.0.0.0", "8080"], "reset");
    let r = &n.client(&["expect-reset", "10.77.0.2", "8080"])[0];
    assert_eq!(r["result"], "reset", "{r}");
    assert_eq!(n.metric("dataplane_same_node_spliced_connections_total{how=\"kernel\"}"), 1.0);
}

/// Silence: a spliced connection on which nothing moves either way ends at
/// the idle timeout, though this process never sees its bytes.
#[test]
fn silence_ends_a_spliced_connection_at_the_idle_timeout() {
    let t = testworld::kernel_test!();
    let n = Node::new(t, &["--idle-timeout", "1s"]);
    let _srv = server(&n.pods[1], "0.0.0.0", 8080, "p2");
    let r = &n.client(&["stall", "10.77.0.2", "8080", "2"])[0];
    assert_eq!(r["closed"].as_u64(), Some(2), "{r}");
    let secs = r["max_seconds"].as_f64().unwrap_or(f64::MAX);
    assert!((1.0..4.0).contains(&secs), "closed after {secs} s, idle timeout 1 s: {r}");
    let text = n.metrics();
    assert_eq!(metric(&text, "dataplane_same_node_spliced_connections_total{how=\"kernel\"}"), Some(2.0), "{text}");
    let idle = metric(
        &text,
        "dataplane_connections_failed_total{direction=\"outbound\",side=\"ours\",reason=\"idle_timeout\"}",
    );
    assert_eq!(idle, Some(2.0), "{text}");
}

/// A server writing as fast as it can to a client that reads nothing: the
/// kernel's redirect has no flow control of its own, so without the bound
/// it would queue the server's bytes without end. The direction is paused
/// and the server is held back by TCP, and the connection still ends at
/// the idle timeout.
#[test]
fn a_stalled_reader_pauses_the_splice_and_holds_the_sender_back() {
    let t = testworld::kernel_test!();
    let n = Node::new(t, &["--idle-timeout", "3s"]);
    let _blast = server_with(&n.pods[1], &["blast", "0.0.0.0", "8080"], "blast");
    // One connection that reads nothing for 2 s (it prints "stalled" first).
    let py = testworld::peers_py();
    let out = n.pods[0]
        .command(Some(&n.workload), "python3", &[&py, "slow-readers", "10.77.0.2", "8080", "1", "2"])
        .output()
        .expect("slow reader");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("{\"open\": 1}"));
    let ended = || n.metric("dataplane_connections_active{direction=\"outbound\"}") == 0.0;
    assert!(eventually(Duration::from_secs(10), ended), "the connection ended: {}", n.metrics());
    let text = n.metrics();
    let m = |name: &str| metric(&text, name).unwrap_or(0.0);
    assert_eq!(m("dataplane_same_node_spliced_connections_total{how=\"kernel\"}"), 1.0, "{text}");
    // What the server got rid of is bounded by the socket buffers on the
    // way and the splice's backlog bound (4 MiB), not by time.
    let down = m("dataplane_bytes_total{direction=\"outbound\",flow=\"to_downstream\"}");
    assert!(down > 0.0 && down < (64u64 << 20) as f64, "{down} bytes went towards a reader that read none: {text}");
    assert!(m("dataplane_same_node_splice_paused_total") >= 1.0, "the kernel paused the server's direction: {text}");
}
