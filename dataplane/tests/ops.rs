//! Operations against the real binary: SIGUSR1 dumps under traffic,
//! Prometheus metrics (linted by promtool), readiness, drain on SIGTERM, the
//! eBPF decision counters, and certificate rotation by symlink flip.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use testworld::{
    attached, client, eventually, http_get, metric, peer, run_args, server, two_pods, world, Certs, Cgroup, Dataplane,
    Proc,
};

const IPS: &[&str] = &["10.77.0.1", "10.77.0.2"];

/// Every histogram, outbound and inbound: each connection through one data
/// plane serving both pods is recorded once on each side.
const HISTOGRAMS: [&str; 7] = [
    "tunnel_connect",
    "tls_handshake",
    "first_byte",
    "connection_lifetime",
    "inbound_tls_handshake",
    "inbound_first_byte",
    "inbound_connection_lifetime",
];

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

#[test]
fn sigusr1_dumps_while_traffic_flows() {
    let t = testworld::kernel_test!();
    // Removed on drop, also when an assertion below fails.
    let stats_dir = testworld::TempDir::new(&format!("dptest-stats-{}", testworld::unique(t, "s"))).expect("stats dir");
    let stats = stats_dir.0.clone();
    let stats_s = stats.display().to_string();
    let w = world(t, IPS, &["--stats-dir", &stats_s]);
    let (a, b, workload, dp) = (&w.a, &w.b, &w.workload, &w.dp);
    let _srv = server(b, "0.0.0.0", 8080, "b");

    const N: usize = 40;
    let seen = thread::scope(|s| {
        let traffic = s.spawn(|| client(a, Some(workload), "10.77.0.2", 8080, &["--count", "40"]));
        // A storm of dumps while the connections come and go.
        for _ in 0..20 {
            dp.proc.signal("USR1");
            thread::sleep(Duration::from_millis(10));
        }
        traffic.join().expect("client")
    });
    assert_eq!(seen.len(), N, "every connection completed under the signal storm");
    assert!(seen.iter().all(|s| s.echo == "ping" && s.server == "b"));

    thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    let before_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    dp.proc.signal("USR1");
    let latest = stats.join("latest.json");
    assert!(
        eventually(Duration::from_secs(5), || read_json(&latest)
            .is_some_and(|j| j["unix_ms"].as_u64().is_some_and(|ms| ms >= before_ms))),
        "a dump after the last signal ({:?})",
        asked.elapsed()
    );
    let j = read_json(&latest).expect("latest.json");
    assert_eq!(j["outbound"]["accepted"], N, "{j}");
    assert_eq!(j["outbound"]["completed"], N, "{j}");
    assert_eq!(j["outbound"]["failed"], 0, "{j}");
    assert_eq!(j["inbound"]["completed"], N, "{j}");
    for h in HISTOGRAMS {
        assert_eq!(j["histograms"][h]["count"], N, "{h}: {j}");
        let p50 = j["histograms"][h]["p50_us"].as_u64().expect("p50");
        let max = j["histograms"][h]["max_us"].as_u64().expect("max");
        assert!(p50 > 0 && p50 <= max, "{h}: {j}");
    }
    let dumps = fs::read_dir(&stats)
        .expect("stats dir")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with("dump-") && e.path().extension().is_some_and(|x| x == "json")
        })
        .count();
    assert!(dumps >= 2, "repeated signals gave repeated dumps ({dumps} JSON dumps)");

    // The interval log decodes with HdrHistogram's own reader.
    let log = fs::read(stats.join("latest.hlog")).expect("latest.hlog");
    let mut counts = std::collections::BTreeMap::new();
    for entry in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&log) {
        if let Ok(hdrhistogram::serialization::interval_log::LogEntry::Interval(h)) = entry {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD.decode(h.encoded_histogram()).expect("base64");
            let decoded: hdrhistogram::Histogram<u64> =
                hdrhistogram::serialization::Deserializer::new().deserialize(&mut &raw[..]).expect("V2 histogram");
            counts.insert(h.tag().expect("tag").as_str().to_string(), decoded.len());
        }
    }
    for h in HISTOGRAMS {
        assert_eq!(counts.get(h), Some(&(N as u64)), "{h}: {counts:?}");
    }
    assert_eq!(counts.len(), HISTOGRAMS.len(), "{counts:?}");
    drop(w);
}

#[test]
fn metrics_pass_promtool_and_match_the_traffic() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, IPS);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, b_if) = two_pods(t);
    b.ip(&["addr", "add", "10.77.0.3/24", "dev", &b_if]);
    let _sink = testworld::server_with(&b, &["sink", "0.0.0.0", "9000"], "sink");
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    // Only 10.77.0.2 is captured: 10.77.0.3 goes direct.
    let dp =
        Dataplane::start(&own, &run_args(&workload, "10.77.0.2/32", &certs, &[&a, &b], &["--admin", "127.0.0.1:0"]));
    let admin = dp.admin();

    const CONNS: u64 = 6;
    const N: u64 = 1000;
    for _ in 0..CONNS {
        let r = &peer(&a, Some(&workload), &["transfer", "10.77.0.2", "9000", "1000", "2000"])[0];
        assert_eq!(r["sent_ok"], true, "{r}");
    }
    for _ in 0..3 {
        client(&a, Some(&workload), "10.77.0.3", 8080, &[]);
    }
    let (status, text) = http_get(&admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{text}");

    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    std::io::Write::write_all(lint.stdin.as_mut().expect("stdin"), text.as_bytes()).expect("to promtool");
    let out = lint.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let out = |l: &str| metric(&text, l).unwrap_or_else(|| panic!("{l} in\n{text}"));
    assert_eq!(out("dataplane_connections_accepted_total{direction=\"outbound\"}"), CONNS as f64);
    assert_eq!(out("dataplane_connections_completed_total{direction=\"outbound\"}"), CONNS as f64);
    assert_eq!(out("dataplane_connections_completed_total{direction=\"inbound\"}"), CONNS as f64);
    // Each transfer sends the header "2000 2\n" and N bytes.
    let up = CONNS * (b"2000 2\n".len() as u64 + N);
    assert_eq!(out("dataplane_bytes_total{direction=\"outbound\",flow=\"to_upstream\"}"), up as f64);
    assert_eq!(out("dataplane_bytes_total{direction=\"inbound\",flow=\"to_upstream\"}"), up as f64);
    assert!(out("dataplane_bytes_total{direction=\"outbound\",flow=\"to_downstream\"}") >= (CONNS * 2000) as f64);
    assert_eq!(out("dataplane_tunnel_connect_seconds_count"), CONNS as f64);
    assert_eq!(out("dataplane_inbound_tls_handshake_seconds_count"), CONNS as f64);
    assert_eq!(out("dataplane_inbound_connection_lifetime_seconds_count"), CONNS as f64);

    // What the kernel side decided: exactly our connects.
    assert_eq!(out("dataplane_bpf_decisions_total{decision=\"captured\"}"), CONNS as f64);
    assert_eq!(out("dataplane_bpf_decisions_total{decision=\"orig_dst_stored\"}"), CONNS as f64);
    assert_eq!(out("dataplane_bpf_decisions_total{decision=\"orig_dst_found\"}"), CONNS as f64);
    assert_eq!(out("dataplane_bpf_decisions_total{decision=\"skipped_cidr\"}"), 3.0);
    assert_eq!(out("dataplane_bpf_decisions_total{decision=\"orig_dst_missed\"}"), 0.0);
}

#[test]
fn metrics_need_the_token_when_one_is_set_and_probes_never_do() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, IPS);
    let (workload, own) = (Cgroup::new(t, "w"), Cgroup::new(t, "d"));
    let (a, b, _) = two_pods(t);
    let token = testworld::TempFile(std::env::temp_dir().join(format!("{}.token", testworld::unique(t, "t"))));
    std::fs::write(&token.0, "s3cret-scrape-token\n").expect("token");
    let token_s = token.0.display().to_string();
    let args = ["--admin", "127.0.0.1:0", "--metrics-token-file", &token_s];
    let dp = Dataplane::start(&own, &run_args(&workload, "10.77.0.2/32", &certs, &[&a, &b], &args));
    let get = |path: &str, auth: Option<&str>| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(dp.admin()).expect("admin");
        let header = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n").expect("request");
        let mut text = String::new();
        c.read_to_string(&mut text).expect("answer");
        text
    };
    assert!(get("/metrics", None).starts_with("HTTP/1.1 401"), "no token: {}", get("/metrics", None));
    assert!(get("/metrics", Some("guess")).starts_with("HTTP/1.1 401"));
    let ok = get("/metrics", Some("s3cret-scrape-token"));
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("dataplane_connections_accepted_total"), "{ok}");
    assert!(get("/ready", None).starts_with("HTTP/1.1 200") && get("/live", None).starts_with("HTTP/1.1 200"));
}

#[test]
fn readiness_follows_the_lifecycle_and_drain_lets_connections_finish() {
    let t = testworld::kernel_test!();
    let certs = Certs::new(t, IPS);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");

    // Start by hand to watch /ready from the first moment.
    let mut args =
        run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], &["--admin", "127.0.0.1:0", "--drain-timeout", "3s"]);
    args.insert(0, "run".into());
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("echo $$ > '{}/cgroup.procs' && exec \"$@\"", own.path.display()))
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_dataplane"))
        .args(&args)
        .env("RUST_LOG", "info");
    let mut proc = Proc::spawn(cmd, "dataplane");
    // Poll from the first moment the endpoint can answer: the address is
    // in the log as soon as it is bound, before the eBPF load and the
    // executors, so the first answer comes while it is still starting.
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = proc.try_wait_for("admin endpoint listening", Duration::from_secs(20)).expect("admin endpoint");
    let admin = line.split("bound=").nth(1).and_then(|r| r.split_whitespace().next()).expect("bound=ADDR").to_string();
    let mut seen = Vec::new();
    while seen.last() != Some(&200) {
        assert!(Instant::now() < deadline, "never ready: {seen:?}");
        if let Ok((s, _)) = http_get(&admin, "/ready") {
            if seen.last() != Some(&s) {
                seen.push(s);
            }
        }
    }
    assert_eq!(seen, [503, 200], "503 before the listeners and programs are in place, then 200");
    assert_eq!(http_get(&admin, "/live").expect("live").0, 200);

    // Two slow transfers in flight: one ends within the drain timeout, one not.
    let (short, long) = thread::scope(|s| {
        let short = s.spawn(|| peer(&a, Some(&workload), &["slow", "10.77.0.2", "8080", "1.5"]));
        let long = s.spawn(|| peer(&a, Some(&workload), &["slow", "10.77.0.2", "8080", "10"]));
        thread::sleep(Duration::from_millis(500));
        let sigterm = Instant::now();
        proc.signal("TERM");
        assert!(
            eventually(Duration::from_secs(2), || http_get(&admin, "/ready").is_ok_and(|(s, _)| s == 503)),
            "not ready while draining"
        );
        // A new connect after SIGTERM is not taken by the draining instance.
        let r = &peer(&a, Some(&workload), &["try-connect", "10.77.0.2", "8080"])[0];
        assert_eq!(r["result"], "refused", "{r}");
        let (short, long) = (short.join().expect("short"), long.join().expect("long"));
        let waited = sigterm.elapsed();
        assert!(
            waited < Duration::from_secs(6),
            "the long one was cut at the drain timeout, not at its end ({waited:?})"
        );
        (short[0].clone(), long[0].clone())
    });
    assert_eq!(short["ok"], true, "finished within the drain timeout: {short}");
    assert!(short["lines"].as_u64().expect("lines") >= 5, "it kept flowing while draining: {short}");
    assert_eq!(long["ok"], false, "cut at the drain timeout: {long}");
    let status = proc.wait(Duration::from_secs(10));
    assert!(status.success(), "exit 0 after draining: {status}");
    assert!(attached(&workload.path).is_empty() && attached(&own.path).is_empty(), "nothing left attached");
    assert!(
        eventually(Duration::from_secs(2), || proc.output().iter().any(|l| l.contains("drain timeout"))),
        "the timeout was logged"
    );
}

/// A certificate directory laid out the way the kubelet mounts a Secret:
/// `..data` points at a timestamped directory, and every file is a symlink
/// through `..data`.
struct SecretMount {
    dir: PathBuf,
    version: usize,
}

impl SecretMount {
    fn new(dir: PathBuf, from: &Path) -> Self {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("secret dir");
        let mut m = Self { dir, version: 0 };
        m.publish(from, |_, _| {});
        for e in fs::read_dir(from).expect("source") {
            let name = e.expect("entry").file_name();
            std::os::unix::fs::symlink(Path::new("..data").join(&name), m.dir.join(&name)).expect("file symlink");
        }
        m
    }

    /// Copies `from` into a new version directory (letting `edit` change it),
    /// then flips `..data` to it atomically.
    fn publish(&mut self, from: &Path, edit: impl Fn(&str, &mut Vec<u8>)) {
        self.version += 1;
        let v = format!("..2026_11_26_v{}", self.version);
        fs::create_dir_all(self.dir.join(&v)).expect("version dir");
        for e in fs::read_dir(from).expect("source") {
            let e = e.expect("entry");
            let name = e.file_name().to_string_lossy().into_owned();
            let mut bytes = fs::read(e.path()).expect("read");
            edit(&name, &mut bytes);
            fs::write(self.dir.join(&v).join(&name), bytes).expect("write");
        }
        std::os::unix::fs::symlink(&v, self.dir.join("..data_tmp")).expect("tmp symlink");
        fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).expect("atomic flip");
    }
}

impl Drop for SecretMount {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn certificates_rotate_by_symlink_flip_without_disruption() {
    let t = testworld::kernel_test!();
    let v1 = Certs::new(t, IPS);
    let v2 = Certs::new(&format!("{t}-v2"), &[]);
    fs::copy(v1.dir.join("ca.crt"), v2.dir.join("ca.crt")).expect("ca.crt");
    fs::copy(v1.dir.join("ca.key"), v2.dir.join("ca.key")).expect("ca.key");
    for ip in IPS {
        v2.issue(ip, &[]); // same CA, new keys and serials
    }
    fs::remove_file(v1.dir.join("ca.key")).expect("the data plane never sees the CA key");
    fs::remove_file(v2.dir.join("ca.key")).expect("ca.key");
    let mut mount =
        SecretMount::new(std::env::temp_dir().join(format!("dptest-secret-{}", testworld::unique(t, "m"))), &v1.dir);

    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, _) = two_pods(t);
    let _srv = server(&b, "0.0.0.0", 8080, "b");
    let mut args = run_args(&workload, "10.77.0.0/16", &v1, &[&a, &b], &["--admin", "127.0.0.1:0"]);
    let certs_at = args.iter().position(|x| x == "--certs").expect("--certs") + 1;
    args[certs_at] = mount.dir.display().to_string();
    let dp = Dataplane::start(&own, &args);
    let admin = dp.admin();

    let serial_of = |dir: &Path, ip: &str| {
        peer(&a, None, &["serial", &dir.join(format!("{ip}.crt")).display().to_string()])[0]["serial"]
            .as_str()
            .expect("serial")
            .to_string()
    };
    let ca = mount.dir.join("ca.crt").display().to_string();
    let served = || {
        let crt = v1.dir.join("10.77.0.1.crt").display().to_string();
        let key = v1.dir.join("10.77.0.1.key").display().to_string();
        let r = &peer(&a, None, &["tls", "10.77.0.2", "18001", &ca, &crt, &key, "10.77.0.2:8080"])[0];
        assert!(r["reply"].as_str().is_some_and(|s| s.contains("\"server\": \"b\"")), "tunnel works: {r}");
        r["server_serial"].as_str().expect("server serial").to_string()
    };
    let (old, new) = (serial_of(&v1.dir, "10.77.0.2"), serial_of(&v2.dir, "10.77.0.2"));
    assert_ne!(old, new);
    assert_eq!(served(), old);

    thread::scope(|s| {
        let long = s.spawn(|| peer(&a, Some(&workload), &["slow", "10.77.0.2", "8080", "3"]));
        thread::sleep(Duration::from_millis(500));
        mount.publish(&v2.dir, |_, _| {});
        assert!(
            eventually(Duration::from_secs(1), || served() == new),
            "new handshakes use the new certificate within a second"
        );

        // A broken replacement: the certificate for B is garbage.
        mount.publish(&v2.dir, |name, bytes| {
            if name == "10.77.0.2.crt" {
                *bytes = b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n".to_vec();
            }
        });
        assert!(
            eventually(Duration::from_secs(2), || http_get(&admin, "/metrics")
                .is_ok_and(|(_, m)| metric(&m, "dataplane_cert_reload_failures_total") == Some(1.0))),
            "the broken reload was counted"
        );
        assert_eq!(served(), new, "the previous certificates stay in service");
        let r = &long.join().expect("long transfer")[0];
        assert_eq!(r["ok"], true, "the established connection lived through both reloads: {r}");
    });
    assert!(
        eventually(Duration::from_secs(2), || dp
            .proc
            .output()
            .iter()
            .any(|l| l.contains("certificate reload refused"))),
        "the refusal was logged"
    );
    let seen = client(&a, Some(&workload), "10.77.0.2", 8080, &[]);
    assert_eq!(seen[0].server, "b", "captured traffic still flows");
}
