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

fn routes() -> anyhow::Result<[haproxy::Route; 2]> {
    Ok([
        haproxy::Route { front: HAPROXY_ECHO.parse()?, tls: "127.0.0.1:9201".parse()?, server: ECHO.parse()? },
        haproxy::Route { front: HAPROXY_DISCARD.parse()?, tls: "127.0.0.1:9202".parse()?, server: DISCARD.parse()? },
    ])
}

/// The same worker arguments aimed at the haproxy pair's front instead.
fn via_haproxy(args: &[String]) -> Vec<String> {
    let mut a = args.to_vec();
    if let Some(addr) = a.get_mut(1) {
        *addr = match addr.as_str() {
            ECHO => HAPROXY_ECHO.into(),
            DISCARD => HAPROXY_DISCARD.into(),
            other => other.into(),
        };
    }
    a
}

/// A worker run and the CPU time the proxies in `pids` spent meanwhile.
struct Run {
    out: Value,
    cpu: Duration,
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
/// not build by itself; `DP_BINARY` names another one instead (to compare two
/// builds under the same load generator).
fn build_dataplane() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("DP_BINARY") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--locked", "-p", "dataplane", "--bin", "dataplane"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the data plane failed");
    }
    Ok(target_dir().join("release/dataplane"))
}

/// Runs a worker to completion and returns its last JSON line (whether
/// it runs in the workload cgroup, `captured`, picks the path).
fn work(world: &setup::World, captured: bool, args: &[String]) -> anyhow::Result<Value> {
    let out = world.worker(captured, args)?.output().context("running a worker")?;
    if !out.status.success() {
        bail!("worker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().context("worker printed nothing")?;
    Ok(serde_json::from_str(last)?)
}

fn s(v: impl ToString) -> String {
    v.to_string()
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
    let mut pair = haproxy::Pair::start(&world.netns_path(), &certs, &routes()?, true)?;
    let mut rows = Vec::new();
    let mut latencies = serde_json::Map::new();

    let measure = |world: &setup::World, captured: bool, args: &[String], pids: &[u32]| -> anyhow::Result<Run> {
        let before = haproxy::cpu_of(pids);
        let out = work(world, captured, args)?;
        Ok(Run { out, cpu: haproxy::cpu_of(pids).saturating_sub(before) })
    };
    // Direct, through the data plane (captured), through the haproxy pair.
    let three = |world: &setup::World, args: &[String], dp: u32, pair: &haproxy::Pair| -> anyhow::Result<[Run; 3]> {
        Ok([
            measure(world, false, args, &[])?,
            measure(world, true, args, &[dp])?,
            measure(world, false, &via_haproxy(args), &pair.pids())?,
        ])
    };
    let latency =
        |latencies: &mut serde_json::Map<String, Value>, name: &str, runs: &[&Value]| -> anyhow::Result<Vec<f64>> {
            let mut doc = serde_json::Map::new();
            let mut p99 = Vec::new();
            for (run, label) in runs.iter().zip(["direct", "data_plane", "haproxy"]) {
                let h = report::decode(run["hist"].as_str().context("hist")?)?;
                report::write_hgrm(&out_dir, &format!("{name}-{label}"), &h)?;
                doc.insert(label.into(), report::percentiles(&h));
                p99.push(h.value_at_percentile(99.0) as f64 / 1000.0);
            }
            latencies.insert(name.into(), Value::Object(doc));
            Ok(p99)
        };
    let cpu = |unit: &'static str, per: &dyn Fn(&Run) -> f64, runs: &[Run; 3]| Cpu {
        unit,
        dataplane: per(&runs[1]),
        haproxy: per(&runs[2]),
    };

    if want("bulk") {
        for streams in [1, 4] {
            let runs = three(&world, &[s("bulk"), s(DISCARD), s(streams), s(secs)], dp, &pair)?;
            let gbits = |v: &Value| v["bytes"].as_f64().unwrap_or(0.0) * 8.0 / 1e9;
            let gbps = |r: &Run| gbits(&r.out) / r.out["seconds"].as_f64().unwrap_or(1.0);
            // CPU seconds per Gbit, as a percentage of one core: %·s/Gbit.
            let per = |r: &Run| r.cpu.as_secs_f64() * 100.0 / gbits(&r.out).max(1e-9);
            rows.push(Row {
                workload: format!("bulk, {streams} stream(s)"),
                direct: gbps(&runs[0]),
                proxied: gbps(&runs[1]),
                haproxy: gbps(&runs[2]),
                unit: "Gb/s",
                higher_is_better: true,
                cpu: Some(cpu("%·s/Gbit", &per, &runs)),
            });
        }
    }
    if want("rr") {
        for size in [64, 1024] {
            let args = [s("rr"), s(ECHO), s(size), s(secs), s(if opts.quick { 5_000 } else { 20_000 })];
            let runs = three(&world, &args, dp, &pair)?;
            let name = format!("rr-{size}B");
            latency(&mut latencies, &name, &[&runs[0].out, &runs[1].out, &runs[2].out])?;
            let hists = runs
                .iter()
                .map(|r| report::decode(r.out["hist"].as_str().context("hist")?))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let per = |r: &Run| {
                let n = report::decode(r.out["hist"].as_str().unwrap_or_default()).map(|h| h.len()).unwrap_or(0);
                r.cpu.as_secs_f64() * 1e6 / n.max(1) as f64
            };
            for (label, q) in [("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)] {
                let at = |i: usize| hists[i].value_at_percentile(q) as f64 / 1000.0;
                rows.push(Row {
                    workload: format!("request/response {size} B, {label}"),
                    direct: at(0),
                    proxied: at(1),
                    haproxy: at(2),
                    unit: "µs",
                    higher_is_better: false,
                    cpu: (label == "p50").then(|| cpu("µs/rt", &per, &runs)),
                });
            }
        }
    }
    if want("connrate") {
        let args = [s("connrate"), s(ECHO), s(2), s(secs)];
        let rate = |v: &Value| v["count"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(1.0);
        let per = |r: &Run| r.cpu.as_secs_f64() * 1e6 / r.out["count"].as_f64().unwrap_or(0.0).max(1.0);
        let resumed = three(&world, &args, dp, &pair)?;
        latency(&mut latencies, "connrate-resumed", &[&resumed[0].out, &resumed[1].out, &resumed[2].out])?;
        rows.push(Row {
            workload: "new connections/s (TLS resumption)".into(),
            direct: rate(&resumed[0].out),
            proxied: rate(&resumed[1].out),
            haproxy: rate(&resumed[2].out),
            unit: "/s",
            higher_is_better: true,
            cpu: Some(cpu("µs/conn", &per, &resumed)),
        });
        // Every handshake a full mutual one, on both.
        dp = world.start_dataplane(&binary, &["--no-tls-resumption"])?;
        drop(pair);
        pair = haproxy::Pair::start(&world.netns_path(), &certs, &routes()?, false)?;
        let full = [
            Run { out: resumed[0].out.clone(), cpu: Duration::ZERO },
            measure(&world, true, &args, &[dp])?,
            measure(&world, false, &via_haproxy(&args), &pair.pids())?,
        ];
        latency(&mut latencies, "connrate-full", &[&full[0].out, &full[1].out, &full[2].out])?;
        rows.push(Row {
            workload: "new connections/s (full handshakes)".into(),
            direct: rate(&full[0].out),
            proxied: rate(&full[1].out),
            haproxy: rate(&full[2].out),
            unit: "/s",
            higher_is_better: true,
            cpu: Some(cpu("µs/conn", &per, &full)),
        });
        let e: u64 = resumed.iter().chain(&full[1..]).map(|r| r.out["errors"].as_u64().unwrap_or(0)).sum();
        if e > 0 {
            eprintln!("warning: {e} failed connections in the connection-rate runs");
        }
        dp = world.start_dataplane(&binary, &[])?;
        drop(pair);
        pair = haproxy::Pair::start(&world.netns_path(), &certs, &routes()?, true)?;
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
        rows.push(Row {
            workload: format!("RSS per idle proxied connection ({n})"),
            direct: f64::NAN,
            proxied: per,
            haproxy: f64::NAN,
            unit: "KiB",
            higher_is_better: false,
            cpu: None,
        });
        latencies.insert("memory".into(), json!({ "connections": n, "rss_before": before, "rss_held": during }));
    }
    if want("fanout") {
        let rate = 2_000;
        let counts: &[usize] = if opts.quick { &[1, 1000] } else { &[1, 100, 1000, 10_000] };
        for &n in counts {
            let n = n.min(max_conns);
            let span = secs.max(2.0);
            let runs = three(&world, &[s("fanout"), s(ECHO), s(n), s(rate), s(span)], dp, &pair)?;
            let p99 = latency(&mut latencies, &format!("fanout-{n}"), &[&runs[0].out, &runs[1].out, &runs[2].out])?;
            let per = |r: &Run| r.cpu.as_secs_f64() * 1e6 / (rate as f64 * span);
            rows.push(Row {
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
