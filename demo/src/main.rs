//! `dataplane-demo`: the one command a newcomer runs (as root) to see the
//! data plane work, in well under a minute, leaving nothing behind.
//!
//! It builds two pods as network namespaces joined by veth, mints their
//! certificates, starts `dataplane run` (the binary beside this one, or
//! `$DP_BINARY`) in a cgroup of its own, serves HTTP from pod B with a
//! server started inside B's namespace, and runs an unmodified `curl` in pod
//! A inside the workload cgroup. A packet socket on pod B's side of the wire
//! records what crossed it; the data plane's own SIGUSR1 dump says what it
//! did. Then it prints the story and cleans up (in `Drop`, also on failure).
//!
//! Everything it makes comes from the test world the tests and the bench use
//! (`testworld`); the daemon itself carries none of it.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, ExitCode},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde_json::Value;
use testworld::{dataplane_binary, run_args, veth, Certs, Cgroup, Dataplane, Netns, TempDir};

const A_IP: &str = "10.99.0.1";
const B_IP: &str = "10.99.0.2";
const PORT: u16 = 8080;
const SECRET: &str = "X-Demo-Secret: swordfish-4e1b7";
const BULK: u64 = 64 * 1024 * 1024;
const HANDSHAKES: usize = 20;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the demo made, dropped in field order: the data plane first, so it
/// is reaped before its cgroup goes.
struct World {
    dp: Option<Dataplane>,
    a: Netns,
    b: Netns,
    workload: Cgroup,
    own: Cgroup,
    dir: TempDir,
}

fn run() -> anyhow::Result<()> {
    check_tools()?;
    let started = Instant::now();
    let id = std::process::id();
    let binary = dataplane_binary();

    println!("== dataplane demo: two pods, one data plane, mutual TLS between them ==\n");
    let (a, b) = (Netns::named(&format!("dpdemo-a-{id}"))?, Netns::named(&format!("dpdemo-b-{id}"))?);
    veth(&a, &format!("{A_IP}/24"), &b, &format!("{B_IP}/24"));
    println!("pods     A = {A_IP} (netns {}), B = {B_IP} (netns {}), joined by veth", a.name, b.name);

    let dir = TempDir::new(&format!("dpdemo-{id}"))?;
    let certs = Certs::create(&binary, dir.0.join("certs"), &[A_IP, B_IP])?;
    println!("certs    CA and one certificate per pod IP in {}", certs.path());
    let workload = Cgroup::named(&format!("dpdemo-pods-{id}"))?;
    let own = Cgroup::named(&format!("dpdemo-dataplane-{id}"))?;
    let mut w = World { dp: None, a, b, workload, own, dir };

    // Pod B's server and the wire tap, both opened inside B's namespace.
    let server = w.b.run(|| TcpListener::bind(("0.0.0.0", PORT)))??;
    let secrets_at_server = Arc::new(AtomicU64::new(0));
    spawn_server(server, secrets_at_server.clone());
    let tap = w.b.run(Tap::open)??;
    let stop_tap = Arc::new(AtomicBool::new(false));
    let tap_thread = {
        let stop = stop_tap.clone();
        thread::spawn(move || tap.run(&stop))
    };

    // The data plane, in its own cgroup, serving both pods.
    let stats = w.dir.0.join("stats");
    let stats_arg = stats.display().to_string();
    let args = run_args(&w.workload, "10.99.0.0/24", &certs, &[&w.a, &w.b], &["--stats-dir", &stats_arg]);
    let dp = Dataplane::launch(&binary, &w.own, &args, "warn").context("starting the data plane")?;
    println!(
        "dataplane running (pid {}), connect4+sockops on {}, getsockopt on {}",
        dp.pid(),
        w.workload.path.display(),
        w.own.path.display()
    );
    w.dp = Some(dp);
    println!("\n-- traffic: unmodified curl in pod A (inside the workload cgroup) to http://{B_IP}:{PORT}/\n");

    let curl = |args: &[&str]| -> anyhow::Result<String> {
        let mut all = vec!["-sS", "--max-time", "20"];
        all.extend_from_slice(args);
        let out =
            w.a.command(Some(&w.workload), "curl", &all).output().context("running curl (apt-get install curl)")?;
        if !out.status.success() {
            bail!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let url = format!("http://{B_IP}:{PORT}/");
    let body = curl(&["-H", SECRET, &url])?;
    println!("GET /          -> {}", body.trim());
    let speed = curl(&["-o", "/dev/null", "-w", "%{speed_download} %{size_download}", &format!("{url}bytes/{BULK}")])?;
    let (bps, size) = speed.split_once(' ').unwrap_or(("0", "0"));
    let bps: f64 = bps.parse().unwrap_or(0.0);
    println!("GET /bytes/64M -> {size} bytes at {:.0} MB/s ({:.2} Gbit/s)", bps / 1e6, bps * 8.0 / 1e9);
    // One curl, many URLs: the server closes each connection, so each GET is
    // a new connect, a new capture and a new mutual-TLS handshake.
    let mut many: Vec<&str> = Vec::new();
    for _ in 0..HANDSHAKES {
        many.extend(["-o", "/dev/null", url.as_str()]);
    }
    curl(&many)?;
    println!("{HANDSHAKES} more GETs  -> {HANDSHAKES} more connections, each a new mutual-TLS handshake");

    // What the data plane measured: its own SIGUSR1 dump.
    let dump = w.dp.as_ref().map(|dp| dump(dp, &stats)).context("no data plane")??;
    stop_tap.store(true, Ordering::Relaxed);
    let wire = tap_thread.join().map_err(|_| anyhow::anyhow!("the wire tap panicked"))??;

    let out = &dump["outbound"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    println!("\n-- what the data plane did (its SIGUSR1 dump, {})\n", stats.join("latest.json").display());
    println!(
        "connections    {} tunnelled, {} refused or failed",
        n(&out["completed"]),
        n(&out["failed"]) + n(&dump["inbound"]["failed"])
    );
    println!(
        "bytes          {} from A's clients, {} back to them",
        n(&out["bytes_to_upstream"]),
        n(&out["bytes_to_downstream"])
    );
    for (line, name) in [
        ("handshake      mutual TLS 1.3", "tls_handshake"),
        ("tunnel ready   connect + TLS + preamble", "tunnel_connect"),
    ] {
        let h = &dump["histograms"][name];
        println!(
            "{line}: min {} µs, median {} µs, max {} µs ({} connections)",
            n(&h["min_us"]),
            n(&h["p50_us"]),
            n(&h["max_us"]),
            n(&h["count"])
        );
    }
    println!("\n-- what crossed the wire between the pods (packet socket on B's veth)\n");
    println!(
        "packets seen   {} TCP, {} of them on port 18001 (the tunnel), {} on port {PORT} (plaintext)",
        wire.tcp, wire.tunnel, wire.plain
    );
    println!("tunnel bytes   {} of TCP payload seen, first record header {}", wire.tunnel_payload, wire.first_record);
    println!(
        "the secret     \"{SECRET}\" reached the server {} time(s) and was on the wire {} time(s)",
        secrets_at_server.load(Ordering::Relaxed),
        wire.secret_seen
    );

    let ok =
        wire.secret_seen == 0 && wire.plain == 0 && wire.tunnel > 0 && secrets_at_server.load(Ordering::Relaxed) == 1;
    let status = w.dp.take().context("no data plane")?.stop();
    println!(
        "\n{} in {:.1} s; data plane exited ({status}); namespaces, cgroups and certificates are removed now.",
        if ok { "PASS: only TLS crossed the wire" } else { "FAIL: plaintext crossed the wire" },
        started.elapsed().as_secs_f64()
    );
    drop(certs);
    drop(w);
    if !ok {
        bail!("the wire carried plaintext");
    }
    Ok(())
}

/// Sends SIGUSR1 and reads the dump it writes into `dir`.
fn dump(dp: &Dataplane, dir: &Path) -> anyhow::Result<Value> {
    let latest = dir.join("latest.json");
    let _ = fs::remove_file(&latest);
    dp.proc.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = fs::read(&latest).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("no dump in {} after SIGUSR1:\n{}", dir.display(), dp.proc.output().join("\n"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Pod B's HTTP server: `/` says hello, `/bytes/N` sends N bytes.
fn spawn_server(listener: TcpListener, secrets: Arc<AtomicU64>) {
    thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let secrets = secrets.clone();
            thread::spawn(move || {
                let _ = serve_http(conn, &secrets);
            });
        }
    });
}

fn serve_http(conn: TcpStream, secrets: &AtomicU64) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        request.push_str(&line);
    }
    if request.contains(SECRET) {
        secrets.fetch_add(1, Ordering::Relaxed);
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let mut out = conn;
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) {
        write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            out.write_all(&chunk[..k])?;
            left -= k as u64;
        }
    } else {
        let body = format!("hello from pod B ({B_IP}); you came from {}\n", out.peer_addr()?);
        write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    }
    Ok(())
}

/// A packet socket (AF_PACKET, every protocol) inside pod B's namespace.
struct Tap {
    sock: socket2::Socket,
}

#[derive(Debug, Default)]
struct Wire {
    tcp: u64,
    tunnel: u64,
    plain: u64,
    tunnel_payload: u64,
    secret_seen: u64,
    first_record: String,
}

impl Tap {
    fn open() -> std::io::Result<Self> {
        // ETH_P_ALL in network byte order.
        let proto = socket2::Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()));
        let sock = socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, Some(proto))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        // A tap, not a recorder: under bulk load the socket buffer overflows
        // and some frames are missed, so the figures say "seen". Ask for a
        // large buffer to miss fewer.
        let _ = sock.set_recv_buffer_size(32 << 20);
        Ok(Self { sock })
    }

    fn run(mut self, stop: &AtomicBool) -> std::io::Result<Wire> {
        let mut wire = Wire::default();
        let mut frame = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let n = match self.sock.read(&mut frame) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) => return Err(e),
            };
            inspect(&frame[..n], &mut wire);
        }
        Ok(wire)
    }
}

/// Tallies one Ethernet frame carrying IPv4/TCP on the veth (loopback frames
/// inside B are B's own business: the inbound proxy talking to the server).
fn inspect(f: &[u8], wire: &mut Wire) {
    if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] || f[..6] == [0; 6] {
        return; // not IPv4, or loopback (all-zero MAC)
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] != 6 || ip.len() < ihl + 20 {
        return;
    }
    let tcp = &ip[ihl..];
    let (sport, dport) = (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]));
    let payload = &tcp[(usize::from(tcp[12] >> 4) * 4).min(tcp.len())..];
    wire.tcp += 1;
    if sport == 18001 || dport == 18001 {
        wire.tunnel += 1;
        wire.tunnel_payload += payload.len() as u64;
        if wire.first_record.is_empty() && payload.len() >= 5 && payload[0] == 0x17 {
            wire.first_record =
                format!("{:02x} {:02x} {:02x} (TLS application data)", payload[0], payload[1], payload[2]);
        }
    }
    if sport == PORT || dport == PORT {
        wire.plain += 1;
    }
    if payload.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()) {
        wire.secret_seen += 1;
    }
}

/// The demo needs these; say so up front rather than half-way.
fn check_tools() -> anyhow::Result<()> {
    for tool in ["ip", "nsenter", "curl"] {
        if Command::new(tool).arg("-V").output().is_err() && Command::new(tool).arg("--version").output().is_err() {
            bail!("`{tool}` not found: run scripts/deps (or apt-get install iproute2 util-linux curl)");
        }
    }
    if !Path::new("/proc/self/ns/net").exists() {
        bail!("no network namespaces here");
    }
    Ok(())
}
