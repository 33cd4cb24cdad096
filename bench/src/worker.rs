//! The load generators. The bench runs itself again as `--worker MODE ...`
//! inside its namespace (and, for the captured runs, inside the workload
//! cgroup), because cgroup membership belongs to a process. Each mode prints
//! one JSON line; latencies travel as serialized HdrHistograms.
//!
//! Every loop is bounded by a count or a deadline, whichever comes first.
use std::{
    collections::HashMap,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

use crate::report::{encode, histogram};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> anyhow::Result<T> {
    args.get(i).and_then(|s| s.parse().ok()).with_context(|| format!("worker argument {i} ({what})"))
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Runs the worker mode in `args` and prints its result.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let _ = dataplane::raise_open_file_limit();
    let mode = args.first().map(String::as_str).unwrap_or("");
    let addr: SocketAddr = arg(args, 1, "address")?;
    let out = match mode {
        "bulk" => bulk(addr, arg(args, 2, "streams")?, Duration::from_secs_f64(arg(args, 3, "seconds")?))?,
        "rr" => {
            rr(addr, arg(args, 2, "size")?, Duration::from_secs_f64(arg(args, 3, "seconds")?), arg(args, 4, "count")?)?
        }
        "connrate" => connrate(addr, arg(args, 2, "threads")?, Duration::from_secs_f64(arg(args, 3, "seconds")?))?,
        "hold" => hold(addr, arg(args, 2, "connections")?)?,
        "fanout" => fanout(
            addr,
            arg(args, 2, "connections")?,
            arg(args, 3, "rate")?,
            Duration::from_secs_f64(arg(args, 4, "seconds")?),
        )?,
        "enrol-probe" => {
            // At most 5 s unless told (seconds, after the device).
            let within = args.get(4).map(|s| s.parse()).transpose().context("seconds")?.unwrap_or(5);
            let (cidr, dev) = (args.get(2).context("address/prefix")?, args.get(3).context("device")?);
            crate::enrol::probe(addr, cidr, dev, Duration::from_secs(within))?
        }
        other => bail!("unknown worker mode {other:?}"),
    };
    println!("{out}");
    Ok(())
}

/// `streams` connections each write 64 KiB chunks until the deadline, then
/// half-close and wait for the server to close: every byte has arrived.
fn bulk(addr: SocketAddr, streams: usize, secs: Duration) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            thread::spawn(move || -> anyhow::Result<u64> {
                let mut s = connect(addr)?;
                let chunk = vec![0x5au8; 64 * 1024];
                let mut sent = 0u64;
                while start.elapsed() < secs {
                    s.write_all(&chunk)?;
                    sent += chunk.len() as u64;
                }
                s.shutdown(Shutdown::Write)?;
                let mut sink = [0u8; 16];
                while s.read(&mut sink)? != 0 {}
                Ok(sent)
            })
        })
        .collect();
    let mut bytes = 0;
    for h in handles {
        bytes += h.join().map_err(|_| anyhow::anyhow!("bulk stream panicked"))??;
    }
    Ok(json!({ "bytes": bytes, "seconds": start.elapsed().as_secs_f64() }))
}

/// One persistent connection: send `size` bytes, read them back, record the
/// round trip; the first 10% are warm-up.
fn rr(addr: SocketAddr, size: usize, secs: Duration, count: u64) -> anyhow::Result<serde_json::Value> {
    let mut s = connect(addr)?;
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    let mut h = histogram();
    let warmup = count / 10;
    let start = Instant::now();
    let mut done = 0u64;
    while done < count + warmup && start.elapsed() < secs {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if done >= warmup {
            h.saturating_record(t.elapsed().as_nanos() as u64);
        }
        done += 1;
    }
    Ok(json!({ "count": h.len(), "hist": encode(&h)? }))
}

/// `threads` loops of connect, 1-byte echo, close, until the deadline.
fn connrate(addr: SocketAddr, threads: usize, secs: Duration) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || -> (Histogram<u64>, u64, Option<String>) {
                let mut h = histogram();
                let mut errors = 0;
                let mut first = None;
                while start.elapsed() < secs {
                    let t = Instant::now();
                    let ok = (|| -> anyhow::Result<()> {
                        let mut s = connect(addr)?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(())
                    })();
                    match ok {
                        Ok(()) => h.saturating_record(t.elapsed().as_nanos() as u64),
                        Err(e) => {
                            errors += 1;
                            first.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (h, errors, first)
            })
        })
        .collect();
    let mut all = histogram();
    let (mut errors, mut first_error) = (0, None);
    for th in handles {
        let (h, e, first) = th.join().map_err(|_| anyhow::anyhow!("connrate thread panicked"))?;
        all.add(&h)?;
        errors += e;
        first_error = first_error.or(first);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(
        json!({ "count": all.len(), "errors": errors, "first_error": first_error, "seconds": seconds, "hist": encode(&all)? }),
    )
}

/// Opens `n` connections, each proven live by a 1-byte echo, then holds them
/// idle until stdin closes (the bench measures memory meanwhile).
fn hold(addr: SocketAddr, n: usize) -> anyhow::Result<serde_json::Value> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = connect(addr).with_context(|| format!("connection {i}"))?;
        s.write_all(b"h").with_context(|| format!("connection {i}"))?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).with_context(|| format!("connection {i}"))?;
        conns.push(s);
    }
    println!("{}", json!({ "held": conns.len() }));
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink); // until the bench closes it
    Ok(json!({ "released": conns.len() }))
}

/// The environment variable that names the proxies of a run (PIDs, comma
/// separated; empty for a direct run), for workloads that read their CPU.
pub const PROXY_PIDS: &str = "BENCH_PROXY_PIDS";

/// The proxies' CPU so far ([`PROXY_PIDS`]).
fn proxy_cpu() -> anyhow::Result<Duration> {
    let pids = std::env::var(PROXY_PIDS).unwrap_or_default();
    let pids = pids.split(',').filter(|p| !p.is_empty()).map(str::parse).collect::<Result<Vec<u32>, _>>()?;
    Ok(crate::haproxy::cpu_of(&pids))
}

/// `n` connections share a fixed total request rate (64-byte echoes), so the
/// latency reflects the number of connections, not a growing offered load.
/// `proxy_cpu`: what the proxies spent while the requests ran, in seconds
/// (not the connections' set-up).
fn fanout(addr: SocketAddr, n: usize, rate: u64, secs: Duration) -> anyhow::Result<serde_json::Value> {
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(n);
    let msg = [0x42u8; 64];
    for i in 0..n {
        // One echo first: through the data plane that waits out the tunnel's
        // handshake, which is not what this measures.
        let mut s = connect(addr).with_context(|| format!("connection {i}"))?;
        s.write_all(&msg)?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back)?;
        s.set_nonblocking(true)?;
        let mut s = mio::net::TcpStream::from_std(s);
        poll.registry().register(&mut s, Token(i), Interest::READABLE)?;
        conns.push(s);
    }
    let mut inflight: HashMap<usize, (Instant, usize)> = HashMap::new();
    let mut h = histogram();
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 64];
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let cpu_before = proxy_cpu()?;
    let start = Instant::now();
    let warmup = start + secs / 10;
    let mut next_send = start;
    let mut turn = 0usize;
    let mut skipped = 0u64;
    while start.elapsed() < secs {
        let now = Instant::now();
        while next_send <= now {
            // The next connection in turn that is idle gets the request.
            let i = turn % n;
            turn += 1;
            next_send += interval;
            if inflight.contains_key(&i) {
                skipped += 1;
                continue;
            }
            match conns[i].write(&msg) {
                Ok(64) => {
                    inflight.insert(i, (Instant::now(), 0));
                }
                _ => skipped += 1,
            }
        }
        poll.poll(&mut events, Some(next_send.saturating_duration_since(Instant::now())))?;
        for ev in events.iter() {
            let i = ev.token().0;
            loop {
                match conns[i].read(&mut buf) {
                    Ok(0) => bail!("connection {i} closed"),
                    Ok(k) => {
                        if let Some((t, got)) = inflight.get_mut(&i) {
                            *got += k;
                            if *got >= msg.len() {
                                if *t >= warmup {
                                    h.saturating_record(t.elapsed().as_nanos() as u64);
                                }
                                inflight.remove(&i);
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    let cpu = proxy_cpu()?.saturating_sub(cpu_before);
    Ok(json!({ "count": h.len(), "skipped": skipped, "hist": encode(&h)?, "proxy_cpu": cpu.as_secs_f64() }))
}
