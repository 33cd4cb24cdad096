//! Fail-open and fail-closed against the real kernel: by default capture
//! stops with the data plane; with `--strict` the programs stay pinned, so
//! captured connects are refused until a data plane returns, and the next
//! instance adopts them.

use std::{
    fs,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use testworld::{attached, client, eventually, peer, run_args, server, two_pods, BpfFs, Certs, Cgroup, Dataplane};

#[test]
fn strict_mode_fails_closed_and_the_next_instance_adopts() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let bpffs = BpfFs::new(t);
    let pins = bpffs.0.join("dataplane").display().to_string();
    let strict = run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &["--strict", "--pin-dir", &pins]);
    let programs = || {
        let mut p = attached(&workload.path);
        p.sort();
        p
    };
    let refused = || peer(&a, Some(&workload), &["try-connect", "10.77.0.2", "8080"])[0]["result"] == "refused";

    let mut dp = Dataplane::start(&own, &strict);
    assert_eq!(client(&a, Some(&workload), "10.77.0.2", 8080, &[])[0].server, "b");
    dp.proc.signal("KILL");
    dp.proc.wait(Duration::from_secs(5));
    assert_eq!(programs(), ["capture_connect4", "capture_connect6", "capture_sockops"], "still attached after SIGKILL");
    assert!(refused(), "fail closed: a captured connect is refused, never sent in plaintext");

    // A new strict instance adopts: one set of programs, traffic flows.
    let dp = Dataplane::start(&own, &strict);
    assert!(dp.proc.output().iter().any(|l| l.contains("adopted the pinned capture programs")));
    assert_eq!(
        programs(),
        ["capture_connect4", "capture_connect6", "capture_sockops"],
        "the old links were replaced, not added to"
    );
    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "b"));
    assert!(dp.stop().success(), "a strict instance drains and exits 0");
    assert_eq!(
        programs(),
        ["capture_connect4", "capture_connect6", "capture_sockops"],
        "and leaves the capture pinned"
    );
    assert!(refused());

    // A default (fail-open) instance adopts too, and takes the pins away.
    let open = run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &["--pin-dir", &pins]);
    let dp = Dataplane::start(&own, &open);
    assert_eq!(client(&a, Some(&workload), "10.77.0.2", 8080, &[])[0].peer, "127.0.0.1:18000");
    assert!(fs::read_dir(&pins).map(|d| d.count()).unwrap_or(0) == 0, "nothing left pinned in {pins}");
    assert!(dp.stop().success());
    assert!(eventually(Duration::from_secs(3), || programs().is_empty()), "fail open again after exit");
    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!(seen[0].peer, "10.77.0.2:8080", "direct once no data plane runs");
}

#[test]
fn an_upgrade_whose_maps_changed_layout_takes_over_without_a_manual_step() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let bpffs = BpfFs::new(t);
    let pins = bpffs.0.join("dataplane");
    let old = pins.join("maps/orig_by_client");
    let pins_s = pins.display().to_string();
    let strict = run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &["--strict", "--pin-dir", &pins_s]);
    // The previous version ran strict, and died: its links are pinned and
    // refuse meanwhile...
    let mut dp = Dataplane::start(&own, &strict);
    dp.proc.signal("KILL");
    dp.proc.wait(Duration::from_secs(5));
    // ...and its maps had another layout (as before IPv6: 16-byte client
    // keys, 8-byte destinations).
    fs::remove_file(&old).expect("the pinned map");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old)
        .args(["type", "lru_hash", "key", "16", "value", "8", "entries", "64", "name", "orig_by_client"])
        .status()
        .expect("bpftool");
    assert!(made.success(), "bpftool map create");

    let dp = Dataplane::start(&own, &strict);
    assert!(dp.proc.output().iter().any(|l| l.contains("another version's layout")), "{:#?}", dp.proc.output());
    let mut programs = attached(&workload.path);
    programs.sort();
    assert_eq!(programs, ["capture_connect4", "capture_connect6", "capture_sockops"], "the old links replaced");
    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "b"), "served");
    // Its own maps are pinned in their place, for the next instance.
    let shown = Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(&old).output().expect("bpftool");
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("bpftool's JSON");
    assert_eq!(shown["bytes_key"], 32, "this version's client key: {shown}");
}

#[test]
fn twenty_rolling_updates_refuse_no_connect() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, &["10.77.0.1", "10.77.0.2"]);
    let workload = Cgroup::new(t, "w");
    let owns = [Cgroup::new(t, "d"), Cgroup::new(t, "e")];
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let bpffs = BpfFs::new(t);
    let pins = bpffs.0.join("dataplane").display().to_string();
    let args = run_args(
        &workload,
        "10.77.0.0/16",
        &certs,
        &[&a, &b],
        &["--strict", "--pin-dir", &pins, "--drain-timeout", "2s"],
    );
    let mut current = Dataplane::start(&owns[0], &args);
    for ns in [&a, &b] {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "cat", "/proc/sys/net/ipv4/tcp_migrate_req"])
            .output()
            .expect("reading the sysctl");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "queued connections migrate in {}", ns.name);
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // A steady stream of connects through both sides of the tunnel (one
        // data plane serves both pods) for the whole time. Each batch fails
        // the test if any of its connects fails.
        let traffic = s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &["--count", "25"]);
                assert!(seen.iter().all(|x| x.server == "b" && x.peer == "127.0.0.1:18000"), "{seen:?}");
                n += seen.len();
            }
            n
        });
        for i in 1..=20 {
            // The new instance starts beside the old one (same SO_REUSEPORT
            // ports, adopting its pins), then the old one drains and exits.
            let next = Dataplane::start(&owns[i % 2], &args);
            let old = std::mem::replace(&mut current, next);
            assert!(old.stop().success(), "hand-over {i}: the old instance drained and exited 0");
        }
        stop.store(true, Ordering::Relaxed);
        let n = traffic.join().expect("every connect succeeded through twenty hand-overs");
        println!("{n} connects through 20 rolling updates, none failed");
        assert!(n >= 200, "traffic flowed throughout ({n})");
    });
    drop(current);
}
