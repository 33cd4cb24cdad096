//! `cargo bench -p bench --bench e2e [-- --only NAME] [-- --quick]` (root):
//! every workload direct, through the data plane and through a haproxy pair
//! in the same run, with the proxies' CPU; one table,
//! `target/bench/results.json` and `.hgrm` files. See bench/README.md.
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{ExitCode, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context};
use bench::{
    haproxy,
    report::{self, Cpu, Row},
    server, setup,
};
use serde_json::{json, Value};

const ECHO: &str = "127.0.0.1:9001";
const DISCARD: &str = "127.0.0.1:9002";
/// The haproxy pair's routes: plaintext in, mutual TLS across, to the same
/// servers.
const HAPROXY_ECHO: &str = "127.0.0.1:9101";
const HAPROXY_DISCARD: &str = "127.0.0.1:9102";

/// A Service ClusterIP (no interface has it) whose endpoint is the echo
/// server.
const SERVICE_VIP: &str = "10.96.0.10:9001";

/// In the two-node shape the servers live in the server pod.
const NODES_ECHO: &str = "10.98.0.2:9001";
const NODES_DISCARD: &str = "10.98.0.2:9002";
/// The same servers over IPv6 (the pods are dual-stack).
const NODES_ECHO6: &str = "[fd00:98::2]:9001";
const NODES_DISCARD6: &str = "[fd00:98::2]:9002";
/// An echo server that only the same-node connection rate connects to: the
/// client pod's ports towards the first one are still in TIME_WAIT from the
/// two-node connection rates (its direct column read 370-506/s there).
const NODES_ECHO_FRESH: &str = "10.98.0.2:9003";

/// The data planes' `--busy-poll` in the two-node row that has it: long
/// enough to span a round trip through the other node (about 50 µs here), so
/// that the reply is polled for, not woken for.
const BUSY_POLL: &str = "50us";

/// The haproxy pair's routes to the echo and discard servers at `echo` and
/// `discard`, the TLS hop on the server's side.
fn routes(echo: &str, discard: &str) -> anyhow::Result<[haproxy::Route; 2]> {
    let (echo, discard): (SocketAddr, SocketAddr) = (echo.parse()?, discard.parse()?);
    let tls = |server: SocketAddr, port| SocketAddr::new(server.ip(), port);
    Ok([
        haproxy::Route { front: HAPROXY_ECHO.parse()?, tls: tls(echo, 9201), server: echo },
        haproxy::Route { front: HAPROXY_DISCARD.parse()?, tls: tls(discard, 9202), server: discard },
    ])
}

/// A worker run and the CPU time the proxies spent meanwhile.
struct Run {
    out: Value,
    cpu: Duration,
}

impl Run {
    /// A run not made (no haproxy pair for this traffic).
    fn missing() -> Self {
        Self { out: Value::Null, cpu: Duration::ZERO }
    }

    /// `f` of this run, or NaN (printed `-`) for one not made.
    fn or_nan(&self, f: impl Fn(&Run) -> f64) -> f64 {
        if self.out.is_null() {
            f64::NAN
        } else {
            f(self)
        }
    }
}

/// The three paths of one shape: direct, through the data plane(s), through
/// the haproxy pair.
struct Paths<'a> {
    shape: &'a dyn setup::Shape,
    dataplanes: Vec<u32>,
    pair: &'a haproxy::Pair,
    routes: [haproxy::Route; 2],
    /// Whether the pair can carry this shape's traffic (not IPv6): without
    /// it the third run is empty (`Value::Null`) and its columns print `-`.
    haproxy: bool,
}

impl<'a> Paths<'a> {
    /// The three paths of a shape: direct, its data planes, the pair.
    fn new(
        shape: &'a dyn setup::Shape,
        dataplanes: Vec<u32>,
        pair: &'a haproxy::Pair,
        routes: [haproxy::Route; 2],
    ) -> Self {
        Self { shape, dataplanes, pair, routes, haproxy: true }
    }

    /// The same worker arguments aimed at the haproxy pair's front instead.
    fn via_haproxy(&self, args: &[String]) -> Vec<String> {
        let mut a = args.to_vec();
        if let Some(addr) = a.get_mut(1) {
            if let Some(r) = self.routes.iter().find(|r| r.server.to_string() == *addr) {
                *addr = r.front.to_string();
            }
        }
        a
    }

    fn measure(&self, captured: bool, args: &[String], pids: &[u32]) -> anyhow::Result<Run> {
        let before = haproxy::cpu_of(pids);
        let out = work(self.shape, captured, args, pids)?;
        Ok(Run { out, cpu: haproxy::cpu_of(pids).saturating_sub(before) })
    }

    /// Through the data plane(s) and the pair only, beside a `direct` run
    /// made earlier (after a restart of the proxies, say).
    fn proxied(&self, args: &[String], direct: &Run) -> anyhow::Result<[Run; 3]> {
        Ok([
            Run { out: direct.out.clone(), cpu: Duration::ZERO },
            self.measure(true, args, &self.dataplanes)?,
            self.measure(false, &self.via_haproxy(args), &self.pair.pids())?,
        ])
    }

    /// Direct, through the data plane(s) (captured), through the pair.
    fn three(&self, args: &[String]) -> anyhow::Result<[Run; 3]> {
        let third = if self.haproxy {
            self.measure(false, &self.via_haproxy(args), &self.pair.pids())?
        } else {
            Run::missing()
        };
        Ok([self.measure(false, args, &[])?, self.measure(true, args, &self.dataplanes)?, third])
    }
}

/// The latency names' prefix for a row prefix.
fn tag(prefix: &str) -> &'static str {
    match prefix {
        "" => "",
        p if p.starts_with("same node") => "same-node-",
        p if p.contains("IPv6") => "nodes-ipv6-",
        p if p.contains("busy-poll") => "nodes-busy-poll-",
        _ => "nodes-",
    }
}

struct Opts {
    only: Option<String>,
    quick: bool,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worker") {
        return match bench::worker::main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mut opts = Opts { only: None, quick: false };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--only" => opts.only = it.next().cloned(),
            "--quick" => opts.quick = true,
            _ => {} // cargo passes --bench and filters
        }
    }
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Builds the data plane binary (release), which `cargo bench -p bench` does
/// not build by itself (and the CNI plugin beside it); `DP_BINARY` names another one instead (to compare two
/// builds under the same load generator).
fn build_dataplane() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("DP_BINARY") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "dataplane",
            "-p",
            "dataplane-cni",
            "--bin",
            "dataplane",
            "--bin",
            "dataplane-cni",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the data plane failed");
    }
    Ok(target_dir().join("release/dataplane"))
}

/// A row of latencies in milliseconds, with no haproxy column and no CPU.
fn ms_row(workload: String, direct: f64, proxied: f64) -> Row {
    Row { workload, direct, proxied, haproxy: f64::NAN, unit: "ms", higher_is_better: false, cpu: None }
}

/// The rows of one cluster size: start, memory and CPU (no baseline), and
/// enrolment under churn against the same on the idle cluster.
fn cluster_rows(f: &bench::cluster::Figures) -> Vec<Row> {
    let n = f.pods;
    let row = |workload: String, direct: f64, proxied: f64, unit: &'static str| Row {
        workload,
        direct,
        proxied,
        haproxy: f64::NAN,
        unit,
        higher_is_better: false,
        cpu: None,
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let writes = f.writes;
    vec![
        row(format!("{n} pods: start to ready"), f64::NAN, f.ready.as_secs_f64(), "s"),
        row(
            format!("{n} pods: RSS at ready / after churn (direct column: at ready)"),
            mib(f.rss_ready),
            mib(f.rss_end),
            "MiB",
        ),
        row(
            format!("{n} pods: heap allocated after churn (direct column: freed but held)"),
            mib(f.heap_end.1),
            mib(f.heap_end.0),
            "MiB",
        ),
        row(format!("{n} pods: agent CPU while idle, 5 s"), f64::NAN, f.idle_cpu.as_secs_f64(), "CPU-s"),
        row(
            format!("{n} pods: agent CPU during {writes} pod writes in 10 s / the 5 s after (direct column: after)"),
            f.after_cpu.as_secs_f64(),
            f.churn_cpu.as_secs_f64(),
            "CPU-s",
        ),
        row(
            format!("{n} pods: enrolment p50 under churn (direct column: idle)"),
            ms(&f.enrol_idle, 0.5),
            ms(&f.enrol_churn, 0.5),
            "ms",
        ),
        row(
            format!("{n} pods: enrolment max under churn (direct column: idle)"),
            ms(&f.enrol_idle, 1.0),
            ms(&f.enrol_churn, 1.0),
            "ms",
        ),
        row(
            format!("{n} pods: enrolment p50 / max while every watch relists, the pod listed last"),
            ms(&f.enrol_relist, 0.5),
            ms(&f.enrol_relist, 1.0),
            "ms",
        ),
        row(
            format!("{n} pods: enrolment, the agent's part, mean under churn (direct column: idle)"),
            f.agent_part.0.as_secs_f64() * 1000.0,
            f.agent_part.1.as_secs_f64() * 1000.0,
            "ms",
        ),
        row(
            format!(
                "{n} pods: watch event to eBPF map update, p50 / p99 under churn, {:.0} batches (direct column: p50)",
                f.map_updates.0
            ),
            f.map_updates.1.map_or(f64::NAN, |s| s * 1000.0),
            f.map_updates.2.map_or(f64::NAN, |s| s * 1000.0),
            "ms",
        ),
    ]
}

/// Runs a worker to completion and returns its last JSON line (whether
/// it runs in the workload cgroup, `captured`, picks the path). `pids` (the
/// proxies of this run) are in its environment, for a workload that reads
/// their CPU itself ([`bench::worker::PROXY_PIDS`]).
fn work(world: &dyn setup::Shape, captured: bool, args: &[String], pids: &[u32]) -> anyhow::Result<Value> {
    let mut cmd = world.worker(captured, args)?;
    let pids: Vec<_> = pids.iter().map(u32::to_string).collect();
    let out = cmd.env(bench::worker::PROXY_PIDS, pids.join(",")).output().context("running a worker")?;
    if !out.status.success() {
        bail!("worker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().context("worker printed nothing")?;
    Ok(serde_json::from_str(last)?)
}

/// Connections per second of a connection-rate worker's result.
fn per_second(v: &Value) -> f64 {
    v["count"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(1.0)
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// The rows and latency distributions collected so far.
struct Table {
    rows: Vec<Row>,
    latencies: serde_json::Map<String, Value>,
    out_dir: PathBuf,
    secs: f64,
    quick: bool,
}

fn cpu(unit: &'static str, per: &dyn Fn(&Run) -> f64, runs: &[Run; 3]) -> Cpu {
    Cpu { unit, dataplane: per(&runs[1]), haproxy: runs[2].or_nan(per) }
}

impl Table {
    /// Keeps the three latency distributions of `name` (`.hgrm` files and
    /// the JSON); their p99s in µs.
    fn latency(&mut self, name: &str, runs: &[Run; 3]) -> anyhow::Result<Vec<f64>> {
        let mut doc = serde_json::Map::new();
        let mut p99 = Vec::new();
        for (run, label) in runs.iter().zip(["direct", "data_plane", "haproxy"]).filter(|(r, _)| !r.out.is_null()) {
            let h = report::decode(run.out["hist"].as_str().context("hist")?)?;
            report::write_hgrm(&self.out_dir, &format!("{name}-{label}"), &h)?;
            doc.insert(label.into(), report::percentiles(&h));
            p99.push(h.value_at_percentile(99.0) as f64 / 1000.0);
        }
        self.latencies.insert(name.into(), Value::Object(doc));
        Ok(p99)
    }

    /// `streams` bulk streams to the discard server at `discard`.
    fn bulk(&mut self, paths: &Paths, prefix: &str, streams: usize, discard: &str) -> anyhow::Result<()> {
        let runs = paths.three(&[s("bulk"), s(discard), s(streams), s(self.secs)])?;
        let gbits = |v: &Value| v["bytes"].as_f64().unwrap_or(0.0) * 8.0 / 1e9;
        let gbps = |r: &Run| gbits(&r.out) / r.out["seconds"].as_f64().unwrap_or(1.0);
        // CPU seconds per Gbit, as a percentage of one core: %·s/Gbit.
        let per = |r: &Run| r.cpu.as_secs_f64() * 100.0 / gbits(&r.out).max(1e-9);
        self.rows.push(Row {
            workload: format!("{prefix}bulk, {streams} stream(s)"),
            direct: gbps(&runs[0]),
            proxied: gbps(&runs[1]),
            haproxy: runs[2].or_nan(gbps),
            unit: "Gb/s",
            higher_is_better: true,
            cpu: Some(cpu("%·s/Gbit", &per, &runs)),
        });
        Ok(())
    }

    /// Request/response of `size` bytes to the echo server at `echo`.
    fn rr(&mut self, paths: &Paths, prefix: &str, size: usize, echo: &str) -> anyhow::Result<()> {
        let count = if self.quick { 5_000 } else { 20_000 };
        let runs = paths.three(&[s("rr"), s(echo), s(size), s(self.secs), s(count)])?;
        let tag = tag(prefix);
        self.latency(&format!("{tag}rr-{size}B"), &runs)?;
        // One per run, `None` for a run not made.
        let hists = runs
            .iter()
            .map(|r| (!r.out.is_null()).then(|| report::decode(r.out["hist"].as_str().context("hist")?)).transpose())
            .collect::<anyhow::Result<Vec<_>>>()?;
        // CPU µs per round trip, for the data plane(s) and the pair.
        let per_rt =
            |i: usize| hists[i].as_ref().map_or(f64::NAN, |h| runs[i].cpu.as_secs_f64() * 1e6 / h.len().max(1) as f64);
        let rt_cpu = Cpu { unit: "µs/rt", dataplane: per_rt(1), haproxy: per_rt(2) };
        for (label, q) in [("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)] {
            let at = |i: usize| hists[i].as_ref().map_or(f64::NAN, |h| h.value_at_percentile(q) as f64 / 1000.0);
            self.rows.push(Row {
                workload: format!("{prefix}request/response {size} B, {label}"),
                direct: at(0),
                proxied: at(1),
                haproxy: at(2),
                unit: "µs",
                higher_is_better: false,
                cpu: (label == "p50").then_some(rt_cpu),
            });
        }
        Ok(())
    }

    /// The connection-rate rows from runs with resumption and with full
    /// handshakes (the direct run is shared).
    fn connrate(&mut self, prefix: &str, resumed: &[Run; 3], full: &[Run; 3]) -> anyhow::Result<()> {
        self.conn_row(prefix, "TLS resumption", "resumed", resumed, false)?;
        self.conn_row(prefix, "full handshakes", "full", full, true)?;
        Ok(())
    }

    /// One connection-rate row, `(what)` in its name, `name` in its
    /// latency files; `shared_direct`: its direct run is another row's too
    /// (that row reports its failures).
    fn conn_row(
        &mut self,
        prefix: &str,
        what: &str,
        name: &str,
        runs: &[Run; 3],
        shared_direct: bool,
    ) -> anyhow::Result<()> {
        let per = |r: &Run| r.cpu.as_secs_f64() * 1e6 / r.out["count"].as_f64().unwrap_or(0.0).max(1.0);
        self.latency(&format!("{}connrate-{name}", tag(prefix)), runs)?;
        self.rows.push(Row {
            workload: format!("{prefix}new connections/s ({what})"),
            direct: per_second(&runs[0].out),
            proxied: per_second(&runs[1].out),
            haproxy: per_second(&runs[2].out),
            unit: "/s",
            higher_is_better: true,
            cpu: Some(cpu("µs/conn", &per, runs)),
        });
        let labels = ["direct", "through the data plane", "through haproxy"];
        for (run, label) in runs.iter().zip(labels).skip(usize::from(shared_direct)) {
            let e = run.out["errors"].as_u64().unwrap_or(0);
            if e > 0 {
                let first = run.out["first_error"].as_str().unwrap_or("?");
                eprintln!("warning: {e} failed connections in the {prefix}connection-rate run {label} ({what}); the first: {first}");
            }
        }
        Ok(())
    }
}

fn run(opts: &Opts) -> anyhow::Result<()> {
    if !std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false) {
        bail!("the end-to-end benchmarks need root (cgroups, namespaces, eBPF)");
    }
    let want = |name: &str| opts.only.as_deref().is_none_or(|o| name.starts_with(o));
    let secs: f64 = if opts.quick { 1.0 } else { 3.0 };
    let binary = build_dataplane()?;
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    // Through one data plane in loopback mode a connection costs it four
    // sockets (both halves of the tunnel): the open-file limit bounds how
    // many it can hold, and without CAP_SYS_RESOURCE we cannot raise it.
    let fd_limit = dataplane::raise_open_file_limit().unwrap_or(1024);
    let max_conns = ((fd_limit.saturating_sub(200)) / 4) as usize;
    let mut world = setup::World::new(&out_dir)?;
    let echo: SocketAddr = ECHO.parse()?;
    server::start(&world.netns_path(), echo, server::Kind::Echo)?;
    server::start(&world.netns_path(), DISCARD.parse()?, server::Kind::Discard)?;
    let mut dp = world.start_dataplane(&binary, &[])?;
    let certs = world.certs_dir().context("certificates")?.to_path_buf();
    let local = haproxy::Side { netns: world.netns_path(), ip: "127.0.0.1".into(), cpus: None };
    let loopback_routes = routes(ECHO, DISCARD)?;
    let mut pair = haproxy::Pair::start(&local, &local, &certs, &loopback_routes, true)?;
    let mut t = Table {
        rows: Vec::new(),
        latencies: serde_json::Map::new(),
        out_dir: out_dir.clone(),
        secs,
        quick: opts.quick,
    };

    let paths = Paths::new(&world, vec![dp], &pair, loopback_routes);
    if want("bulk") {
        for streams in [1, 4] {
            t.bulk(&paths, "", streams, DISCARD)?;
        }
    }
    if want("rr") {
        for size in [64, 1024] {
            t.rr(&paths, "", size, ECHO)?;
        }
    }
    drop(paths);
    if want("connrate") {
        let args = [s("connrate"), s(ECHO), s(2), s(secs)];
        let paths = Paths::new(&world, vec![dp], &pair, loopback_routes);
        let resumed = paths.three(&args)?;
        // Every handshake a full mutual one, on both.
        dp = world.start_dataplane(&binary, &["--no-tls-resumption"])?;
        drop(pair);
        pair = haproxy::Pair::start(&local, &local, &certs, &loopback_routes, false)?;
        let paths = Paths::new(&world, vec![dp], &pair, loopback_routes);
        let full = paths.proxied(&args, &resumed[0])?;
        t.connrate("", &resumed, &full)?;
        dp = world.start_dataplane(&binary, &[])?;
        drop(pair);
        pair = haproxy::Pair::start(&local, &local, &certs, &loopback_routes, true)?;
    }

    if want("service") {
        // The same echo server, by its address and through a Service whose
        // one endpoint it is: both through the data plane, so the difference
        // is the endpoint choice. The model comes from a workloads file.
        let files = testworld::TempDir::new(&format!("dpbench-service-{}", std::process::id()))?;
        let netns_dir = files.0.join("netns");
        std::fs::create_dir_all(&netns_dir)?;
        let model = files.0.join("workloads.json");
        std::fs::write(
            &model,
            json!({
                "workloads": [{"namespace": "bench", "name": "server", "addresses": ["127.0.0.1"], "mode": "meshed"}],
                "services": [{"namespace": "bench", "name": "echo", "clusterIPs": [SERVICE_VIP.split(':').next()],
                              "ports": [{"name": "echo", "port": 9001}],
                              "endpoints": [{"addresses": ["127.0.0.1"], "ports": [{"name": "echo", "port": 9001}]}]}]
            })
            .to_string(),
        )?;
        let (model_s, dir_s) = (model.display().to_string(), netns_dir.display().to_string());
        dp = world.start_dataplane(&binary, &["--workloads", &model_s, "--netns-dir", &dir_s])?;
        let by_address = work(&world, true, &[s("connrate"), s(ECHO), s(2), s(secs)], &[])?;
        let before = haproxy::cpu_of(&[dp]);
        let via_service = work(&world, true, &[s("connrate"), s(SERVICE_VIP), s(2), s(secs)], &[])?;
        let cpu_service = haproxy::cpu_of(&[dp]).saturating_sub(before);
        t.rows.push(Row {
            workload: "new connections/s via a ClusterIP (direct column: by pod address, also through the data plane)"
                .into(),
            direct: per_second(&by_address),
            proxied: per_second(&via_service),
            haproxy: f64::NAN,
            unit: "/s",
            higher_is_better: true,
            cpu: None,
        });
        t.latencies.insert(
            "service".into(),
            json!({ "by_address": by_address, "via_service": via_service,
                    "cpu_us_per_conn_via_service": cpu_service.as_secs_f64() * 1e6 / via_service["count"].as_f64().unwrap_or(1.0).max(1.0) }),
        );
        dp = world.start_dataplane(&binary, &[])?;
    }
    if want("memory") {
        let n: usize = (if opts.quick { 2_000 } else { 10_000 }).min(max_conns);
        thread::sleep(Duration::from_millis(300));
        let before = setup::rss(dp).context("data plane RSS")?;
        let mut holder =
            world.worker(true, &[s("hold"), s(ECHO), s(n)])?.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let mut lines = BufReader::new(holder.stdout.take().context("stdout")?).lines();
        let first = lines.next().context("holder said nothing")??;
        let held: Value = serde_json::from_str(&first)?;
        anyhow::ensure!(held["held"].as_u64() == Some(n as u64), "holder: {first}");
        thread::sleep(Duration::from_millis(500));
        let during = setup::rss(dp).context("data plane RSS")?;
        drop(holder.stdin.take()); // release them
        let _ = holder.wait();
        let per = during.saturating_sub(before) as f64 / n as f64 / 1024.0;
        t.rows.push(Row {
            workload: format!("RSS per idle proxied connection ({n})"),
            direct: f64::NAN,
            proxied: per,
            haproxy: f64::NAN,
            unit: "KiB",
            higher_is_better: false,
            cpu: None,
        });
        t.latencies.insert("memory".into(), json!({ "connections": n, "rss_before": before, "rss_held": during }));
    }
    if want("fanout") {
        let rate = 2_000;
        let counts: &[usize] = if opts.quick { &[1, 1000] } else { &[1, 100, 1000, 10_000] };
        for &n in counts {
            let last = Some(&n) == counts.last();
            let n = n.min(max_conns);
            // The largest runs long enough for each connection's idle watch
            // to re-poll it once (every 10 s at the most often): what a
            // node's long-lived connections cost. The others: 3 s (2 quick).
            let span = if last && !opts.quick { 12.0 } else { secs.max(2.0) };
            let paths = Paths::new(&world, vec![dp], &pair, loopback_routes);
            let runs = paths.three(&[s("fanout"), s(ECHO), s(n), s(rate), s(span)])?;
            let p99 = t.latency(&format!("fanout-{n}"), &runs)?;
            // The proxies' CPU while the requests ran, as the worker read it:
            // not the N connections' set-up before (their handshakes).
            let per = |r: &Run| r.out["proxy_cpu"].as_f64().unwrap_or(f64::NAN) * 1e6 / (rate as f64 * span);
            t.rows.push(Row {
                workload: format!("p99 at {n} connections ({rate} req/s)"),
                direct: p99[0],
                proxied: p99[1],
                haproxy: p99[2],
                unit: "µs",
                higher_is_better: false,
                cpu: Some(cpu("µs/req", &per, &runs)),
            });
        }
    }
    drop(pair);
    world.stop_dataplane();

    if want("enrol") {
        let n = if opts.quick { 10 } else { 40 };
        for (together, key) in [(false, "enrolment"), (true, "enrolment_together")] {
            let e = bench::enrol::measure(&binary, n, &bench::enrol::me()?, together)?;
            for (q, label) in [(50.0, "p50"), (99.0, "p99")] {
                let workload = if together {
                    format!("pod enrolment, {n} pods at once, {label}")
                } else {
                    format!("pod enrolment, address to first capture, {label} ({n} pods)")
                };
                t.rows.push(ms_row(workload, f64::NAN, e.end_to_end.value_at_quantile(q / 100.0) as f64 / 1000.0));
            }
            t.latencies.insert(
                key.into(),
                json!({ "pods": n, "end_to_end_us": report::encode(&e.end_to_end)?, "dataplane_buckets": e.dataplane_buckets }),
            );
        }
    }

    if want("cni") {
        // What the CNI plugin adds to a pod's start (ADD's time in
        // dataplane-cni), meshed and not, one pod after another and all at
        // once. The plugin is the one beside the data plane's binary.
        std::env::set_var("DP_BINARY", &binary);
        let n = if opts.quick { 10 } else { 40 };
        for (together, key) in [(false, "cni_add"), (true, "cni_add_together")] {
            let adds = bench::cni::measure(&binary, n, together)?;
            let how = if together { format!("{n} pods at once") } else { format!("one at a time, {n} pods") };
            // The runtime's view (the plugin's run, beside its run for
            // VERSION alone), then the agent's own part of it.
            let views = [
                ("meshed", &adds.served, Some(&adds.exec)),
                ("outside the mesh", &adds.passed, Some(&adds.exec)),
                ("meshed, the agent's part", &adds.agent_served, None),
                ("outside the mesh, the agent's part", &adds.agent_passed, None),
            ];
            for (pods, h, baseline) in views {
                for (q, label) in [(50.0, "p50"), (99.0, "p99")] {
                    let at = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(q / 100.0) as f64 / 1000.0;
                    let note = if baseline.is_some() { " (direct column: the plugin's VERSION)" } else { "" };
                    t.rows.push(ms_row(
                        format!("CNI ADD, {pods}, {how}, {label}{note}"),
                        baseline.map_or(f64::NAN, at),
                        at(h),
                    ));
                }
            }
            t.latencies.insert(
                key.into(),
                json!({
                    "pods": n,
                    "served_us": report::encode(&adds.served)?,
                    "passed_us": report::encode(&adds.passed)?,
                    "version_us": report::encode(&adds.exec)?,
                }),
            );
        }
    }

    if want("cluster") {
        // One agent against a simulated cluster of each size in the test
        // API server; the direct column is the same figure on the idle
        // cluster where there is one.
        std::env::set_var("DP_BINARY", &binary);
        let sizes: Vec<usize> = match std::env::var("DP_BENCH_PODS") {
            Ok(list) => list.split(',').map(str::parse).collect::<Result<_, _>>().context("DP_BENCH_PODS")?,
            Err(_) if opts.quick => vec![2_000],
            Err(_) => vec![2_000, 20_000, 100_000],
        };
        for n in sizes {
            let f = bench::cluster::measure(&binary, n, &bench::enrol::me()?)?;
            t.rows.extend(cluster_rows(&f));
            t.latencies.insert(
                format!("cluster_{n}"),
                json!({
                    "pods": n, "ready_s": f.ready.as_secs_f64(), "rss_ready": f.rss_ready, "rss_end": f.rss_end,
                    "heap_end": [f.heap_end.0, f.heap_end.1],
                    "idle_cpu_s": f.idle_cpu.as_secs_f64(), "churn_cpu_s": f.churn_cpu.as_secs_f64(),
                    "after_cpu_s": f.after_cpu.as_secs_f64(), "writes": f.writes,
                    "agent_part_ms": [f.agent_part.0.as_secs_f64() * 1000.0, f.agent_part.1.as_secs_f64() * 1000.0],
                    "enrol_idle_us": report::encode(&f.enrol_idle)?, "enrol_churn_us": report::encode(&f.enrol_churn)?,
                    "enrol_relist_us": report::encode(&f.enrol_relist)?,
                    "map_update_batches": f.map_updates.0,
                    "map_update_p50_s": f.map_updates.1, "map_update_p99_s": f.map_updates.2,
                }),
            );
        }
    }

    let two_nodes = want("nodes");
    if two_nodes || want("same-node") {
        // The two-node shape: each data plane holds one end of every tunnel,
        // the haproxies sit one beside each pod.
        let mut nodes = setup::Nodes::new(&binary, &out_dir)?;
        nodes.serve(NODES_ECHO.parse()?, server::Kind::Echo)?;
        nodes.serve(NODES_DISCARD.parse()?, server::Kind::Discard)?;
        nodes.serve(NODES_ECHO_FRESH.parse()?, server::Kind::Echo)?;
        // Beside each pod, on its node's CPUs in the shape in effect (call
        // after starting the data planes).
        let sides = |nodes: &setup::Nodes| {
            let side = |netns: &testworld::Netns, ip: &str, i| haproxy::Side {
                netns: netns.path(),
                ip: ip.into(),
                cpus: nodes.haproxy_cpus(i),
            };
            (side(&nodes.client, setup::CLIENT_IP, 0), side(&nodes.server, setup::SERVER_IP, 1))
        };
        let node_certs = nodes.certs_dir().to_path_buf();
        let node_routes = routes(NODES_ECHO, NODES_DISCARD)?;
        if two_nodes {
            let dps = nodes.start(&binary, &[])?;
            let (client, server_side) = sides(&nodes);
            let mut pair = haproxy::Pair::start(&client, &server_side, &node_certs, &node_routes, true)?;
            let prefix = "2 nodes: ";
            let streams: &[usize] = if opts.quick { &[1] } else { &[1, 4] };
            let paths = Paths::new(&nodes, dps.clone(), &pair, node_routes);
            for &n in streams {
                t.bulk(&paths, prefix, n, NODES_DISCARD)?;
            }
            t.rr(&paths, prefix, 1024, NODES_ECHO)?;
            // The same over IPv6 (both pods are dual-stack), beside the IPv4
            // rows above. The haproxy pair is set up for IPv4 only: no column.
            drop(paths);
            nodes.serve(NODES_ECHO6.parse()?, server::Kind::Echo)?;
            nodes.serve(NODES_DISCARD6.parse()?, server::Kind::Discard)?;
            let paths = Paths::new(&nodes, dps, &pair, node_routes);
            let v6 = Paths { haproxy: false, ..paths };
            let prefix6 = "2 nodes, IPv6: ";
            t.bulk(&v6, prefix6, 1, NODES_DISCARD6)?;
            t.rr(&v6, prefix6, 1024, NODES_ECHO6)?;
            let paths = Paths { haproxy: true, ..v6 };
            let args = [s("connrate"), s(NODES_ECHO), s(2), s(secs)];
            let resumed = paths.three(&args)?;
            drop(paths);
            let dps = nodes.start(&binary, &["--no-tls-resumption"])?;
            drop(pair);
            pair = haproxy::Pair::start(&client, &server_side, &node_certs, &node_routes, false)?;
            let paths = Paths::new(&nodes, dps, &pair, node_routes);
            let full = paths.proxied(&args, &resumed[0])?;
            t.connrate(prefix, &resumed, &full)?;
            drop(paths);
            // The cost of delivering from the client's address: the same
            // connection rate (resumed handshakes) with it off.
            let off = nodes.start(&binary, &["--no-client-address"])?;
            let before = haproxy::cpu_of(&off);
            let without = work(&nodes, true, &args, &[])?;
            let cpu_off = haproxy::cpu_of(&off).saturating_sub(before);
            let with = &resumed[1];
            let per = |cpu: Duration, v: &Value| cpu.as_secs_f64() * 1e6 / v["count"].as_f64().unwrap_or(0.0).max(1.0);
            t.rows.push(Row {
                workload: "2 nodes: new conn/s, client address on (direct column: off)".into(),
                direct: per_second(&without),
                proxied: per_second(&with.out),
                haproxy: f64::NAN,
                unit: "/s",
                higher_is_better: true,
                cpu: None,
            });
            t.latencies.insert(
                "client_address".into(),
                json!({ "on_per_s": per_second(&with.out), "off_per_s": per_second(&without),
                        "on_cpu_us_per_conn": per(with.cpu, &with.out), "off_cpu_us_per_conn": per(cpu_off, &without) }),
            );
            // Round trips with the executors polling before they sleep
            // (`--busy-poll`): latency bought with CPU.
            let dps = nodes.start(&binary, &["--busy-poll", BUSY_POLL])?;
            let paths = Paths::new(&nodes, dps, &pair, node_routes);
            t.rr(&paths, &format!("2 nodes, --busy-poll {BUSY_POLL}: "), 1024, NODES_ECHO)?;
        }
        // Both pods on one data plane, with the same-node fast path: no
        // tunnel, no TLS. The haproxy pair is the same as above.
        let dps = nodes.start_one(&binary, &["--same-node-fast-path"])?;
        let (client, server_side) = sides(&nodes);
        let pair = haproxy::Pair::start(&client, &server_side, &node_certs, &node_routes, true)?;
        let paths = Paths::new(&nodes, dps, &pair, node_routes);
        let prefix = "same node (fast path): ";
        t.bulk(&paths, prefix, 1, NODES_DISCARD)?;
        t.rr(&paths, prefix, 1024, NODES_ECHO)?;
        // No tunnel, so no handshake: what a connection costs the data plane
        // on its own (accept, connect into the pod, relay), the ceiling for
        // tunnels pooled between nodes. haproxy's column: its pair, as above
        // (to the first echo server: it has no route to the fresh one).
        let fresh = [s("connrate"), s(NODES_ECHO_FRESH), s(2), s(secs)];
        let pair_args = paths.via_haproxy(&[s("connrate"), s(NODES_ECHO), s(2), s(secs)]);
        let third = paths.measure(false, &pair_args, &pair.pids())?;
        let runs = [paths.measure(false, &fresh, &[])?, paths.measure(true, &fresh, &paths.dataplanes)?, third];
        t.conn_row(prefix, "no tunnel", "none", &runs, false)?;
        drop(paths);
        drop(pair);
        nodes.stop();
    }

    let (rows, latencies) = (t.rows, t.latencies);
    let table = report::table(&rows);
    println!("\n{table}");
    let doc = json!({
        "machine": { "open_file_limit": fd_limit, "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim() },
        "rows": report::rows_json(&rows),
        "latency": latencies,
    });
    std::fs::write(out_dir.join("results.json"), serde_json::to_vec_pretty(&doc)?)?;
    println!("results: {}", out_dir.join("results.json").display());
    Ok(())
}
