//! The demo README sends every newcomer to: it runs, tells its story with
//! real figures (the handshake line included), and leaves nothing behind.
use std::process::Command;

#[test]
fn the_demo_tells_its_story_and_cleans_up() {
    let _t = testworld::kernel_test!();
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane-demo"))
        .env("DP_BINARY", testworld::dataplane_binary())
        .output()
        .expect("running dataplane-demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the demo failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = |prefix: &str| {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} line in:\n{text}"))
    };
    // 1 + 1 + 20 GETs, each its own connection through the tunnel.
    let tunnelled: u64 = line("connections").split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("count");
    assert_eq!(tunnelled, 22, "{text}");
    assert!(line("connections").contains(" 0 refused"), "{text}");
    // The handshake line: min <= median <= max, all from 22 connections.
    let hs = line("handshake      mutual TLS");
    let nums: Vec<u64> =
        hs.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).filter(|&n| n != 1 && n != 3).collect();
    let (min, p50, max, count) = (nums[0], nums[1], nums[2], nums[3]);
    assert!(min > 0 && min <= p50 && p50 <= max, "{hs}");
    assert_eq!(count, 22, "{hs}");
    assert!(text.contains("PASS: only TLS crossed the wire"), "{text}");
    assert!(text.contains("you came from 10.99.0.1:"), "pod B's server sees pod A's address: {text}");
    assert!(text.contains("was on the wire 0 time(s)"), "{text}");

    // Nothing left behind: namespaces, cgroups, certificates.
    let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns");
    let pid = text.lines().find_map(|l| l.split("netns dpdemo-a-").nth(1)).and_then(|r| r.split(')').next());
    let pid = pid.expect("the demo names its namespaces");
    assert!(!String::from_utf8_lossy(&netns.stdout).contains(&format!("dpdemo-a-{pid}")), "namespace left behind");
    let root = testworld::cgroup2_mount().expect("cgroup2");
    assert!(!root.join(format!("dpdemo-pods-{pid}")).exists(), "cgroup left behind");
    assert!(!std::env::temp_dir().join(format!("dpdemo-{pid}")).exists(), "certificates left behind");
}
