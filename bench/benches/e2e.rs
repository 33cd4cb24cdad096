//! `cargo bench -p bench --bench e2e [-- --only NAME] [-- --quick]` (root):
//! every workload direct and through the data plane in the same run, one
//! table, `target/bench/results.json` and `.hgrm` files. See bench/README.md.
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
    report::{self, Row},
    server, setup,
};
use serde_json::{json, Value};

const ECHO: &str = "127.0.0.1:9001";
const DISCARD: &str = "127.0.0.1:9002";

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

/// Runs a worker to completion and returns its last JSON line.
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
    let dp = world.start_dataplane(&binary, &[])?;
    let mut rows = Vec::new();
    let mut latencies = serde_json::Map::new();

    let both = |world: &setup::World, args: Vec<String>| -> anyhow::Result<(Value, Value)> {
        Ok((work(world, false, &args)?, work(world, true, &args)?))
    };
    let latency = |latencies: &mut serde_json::Map<String, Value>,
                   name: &str,
                   d: &Value,
                   p: &Value|
     -> anyhow::Result<(f64, f64)> {
        let (hd, hp) = (
            report::decode(d["hist"].as_str().context("hist")?)?,
            report::decode(p["hist"].as_str().context("hist")?)?,
        );
        report::write_hgrm(&out_dir, &format!("{name}-direct"), &hd)?;
        report::write_hgrm(&out_dir, &format!("{name}-dataplane"), &hp)?;
        latencies
            .insert(name.into(), json!({ "direct": report::percentiles(&hd), "data_plane": report::percentiles(&hp) }));
        Ok((hd.value_at_percentile(99.0) as f64 / 1000.0, hp.value_at_percentile(99.0) as f64 / 1000.0))
    };

    if want("bulk") {
        for streams in [1, 4] {
            let (d, p) = both(&world, vec![s("bulk"), s(DISCARD), s(streams), s(secs)])?;
            let gbps =
                |v: &Value| v["bytes"].as_f64().unwrap_or(0.0) * 8.0 / v["seconds"].as_f64().unwrap_or(1.0) / 1e9;
            rows.push(Row {
                workload: format!("bulk, {streams} stream(s)"),
                direct: gbps(&d),
                proxied: gbps(&p),
                unit: "Gb/s",
                higher_is_better: true,
            });
        }
    }
    if want("rr") {
        for size in [64, 1024] {
            let (d, p) =
                both(&world, vec![s("rr"), s(ECHO), s(size), s(secs), s(if opts.quick { 5_000 } else { 20_000 })])?;
            let name = format!("rr-{size}B");
            latency(&mut latencies, &name, &d, &p)?;
            let (hd, hp) = (
                report::decode(d["hist"].as_str().context("hist")?)?,
                report::decode(p["hist"].as_str().context("hist")?)?,
            );
            for (label, q) in [("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)] {
                rows.push(Row {
                    workload: format!("request/response {size} B, {label}"),
                    direct: hd.value_at_percentile(q) as f64 / 1000.0,
                    proxied: hp.value_at_percentile(q) as f64 / 1000.0,
                    unit: "µs",
                    higher_is_better: false,
                });
            }
        }
    }
    if want("connrate") {
        let (d, p) = both(&world, vec![s("connrate"), s(ECHO), s(2), s(secs)])?;
        let rate = |v: &Value| v["count"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(1.0);
        latency(&mut latencies, "connrate-resumed", &d, &p)?;
        rows.push(Row {
            workload: "new connections/s (TLS resumption)".into(),
            direct: rate(&d),
            proxied: rate(&p),
            unit: "/s",
            higher_is_better: true,
        });
        // Every handshake a full mutual one.
        world.start_dataplane(&binary, &["--no-tls-resumption"])?;
        let full = work(&world, true, &[s("connrate"), s(ECHO), s(2), s(secs)])?;
        latency(&mut latencies, "connrate-full", &d, &full)?;
        rows.push(Row {
            workload: "new connections/s (full handshakes)".into(),
            direct: rate(&d),
            proxied: rate(&full),
            unit: "/s",
            higher_is_better: true,
        });
        let e = full["errors"].as_u64().unwrap_or(0) + p["errors"].as_u64().unwrap_or(0);
        if e > 0 {
            eprintln!("warning: {e} failed connections in the connection-rate runs");
        }
    }
    let dp = if want("connrate") { world.start_dataplane(&binary, &[])? } else { dp };

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
            unit: "KiB",
            higher_is_better: false,
        });
        latencies.insert("memory".into(), json!({ "connections": n, "rss_before": before, "rss_held": during }));
    }
    if want("fanout") {
        let rate = 2_000;
        let counts: &[usize] = if opts.quick { &[1, 100, 1000] } else { &[1, 100, 1000, 10_000] };
        for &n in counts {
            let n = n.min(max_conns);
            let (d, p) = both(&world, vec![s("fanout"), s(ECHO), s(n), s(rate), s(secs.max(2.0))])?;
            let (d99, p99) = latency(&mut latencies, &format!("fanout-{n}"), &d, &p)?;
            rows.push(Row {
                workload: format!("p99 at {n} connections ({rate} req/s)"),
                direct: d99,
                proxied: p99,
                unit: "µs",
                higher_is_better: false,
            });
        }
    }
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
