//! `dataplane demo`: the one command a newcomer runs (as root) to see the
//! data plane work, in well under a minute, leaving nothing behind.
//!
//! It builds two pods as network namespaces joined by veth, mints their
//! certificates, starts `dataplane run` (this binary) in a cgroup of its own,
//! serves HTTP from pod B with a server started inside B's namespace, and runs
//! an unmodified `curl` in pod A inside the workload cgroup. A packet socket
//! on pod B's side of the wire records what crossed it. Then it prints the
//! story and cleans up (in `Drop`, also on failure).
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{ca, cgroup, netns::Netns};

const A_IP: &str = "10.99.0.1";
const B_IP: &str = "10.99.0.2";
const PORT: u16 = 8080;
const SECRET: &str = "X-Demo-Secret: swordfish-4e1b7";
const BULK: u64 = 64 * 1024 * 1024;
const HANDSHAKES: usize = 20;

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    check_tools()?;
    let started = Instant::now();
    let id = std::process::id();
    let mut w = World { netns: Vec::new(), cgroups: Vec::new(), dir: None, dataplane: None };

    println!("== dataplane demo: two pods, one data plane, mutual TLS between them ==\n");
    let root = cgroup::cgroup2_mount().context("finding cgroup v2 (needs root and cgroup v2)")?;
    let (a, b) = (format!("dpdemo-a-{id}"), format!("dpdemo-b-{id}"));
    for ns in [&a, &b] {
        sh("ip", &["netns", "add", ns])?;
        w.netns.push(ns.clone());
        sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    }
    sh("ip", &["link", "add", "dpdemo-a", "netns", &a, "type", "veth", "peer", "name", "dpdemo-b", "netns", &b])?;
    sh("ip", &["-n", &a, "addr", "add", &format!("{A_IP}/24"), "dev", "dpdemo-a"])?;
    sh("ip", &["-n", &b, "addr", "add", &format!("{B_IP}/24"), "dev", "dpdemo-b"])?;
    sh("ip", &["-n", &a, "link", "set", "dpdemo-a", "up"])?;
    sh("ip", &["-n", &b, "link", "set", "dpdemo-b", "up"])?;
    println!("pods     A = {A_IP} (netns {a}), B = {B_IP} (netns {b}), joined by veth");

    let dir = std::env::temp_dir().join(format!("dpdemo-{id}"));
    w.dir = Some(dir.clone());
    ca::init(&dir)?;
    for ip in [A_IP, B_IP] {
        ca::issue(&dir, ip.parse()?, ca::Validity::default())?;
    }
    println!("certs    CA and one certificate per pod IP in {}", dir.display());

    let workload = root.join(format!("dpdemo-pods-{id}"));
    let own = root.join(format!("dpdemo-dataplane-{id}"));
    for cg in [&workload, &own] {
        fs::create_dir(cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
        w.cgroups.push(cg.clone());
    }

    // Pod B's server and the wire tap, both opened inside B's namespace.
    let b_ns = Netns::open(&PathBuf::from("/var/run/netns").join(&b))?;
    let server = b_ns.run(|| TcpListener::bind(("0.0.0.0", PORT)))??;
    let secrets_at_server = Arc::new(AtomicU64::new(0));
    spawn_server(server, secrets_at_server.clone());
    let tap = b_ns.run(Tap::open)??;
    let stop_tap = Arc::new(AtomicBool::new(false));
    let tap_thread = {
        let stop = stop_tap.clone();
        thread::spawn(move || tap.run(&stop))
    };

    // The data plane, in its own cgroup, serving both pods.
    let exe = std::env::current_exe().context("finding this binary")?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("echo $$ > '{}/cgroup.procs' && exec \"$@\"", own.display()))
        .arg("sh")
        .arg(&exe)
        .arg("run")
        .args(["--workload-cgroup".as_ref(), workload.as_os_str()])
        .args(["--capture-cidr", "10.99.0.0/24", "--certs"])
        .arg(&dir)
        .args(["--netns", &format!("/var/run/netns/{a}"), "--netns", &format!("/var/run/netns/{b}")])
        .env("RUST_LOG", "warn,dataplane=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting dataplane run")?;
    let stderr = child.stderr.take().context("dataplane stderr")?;
    w.dataplane = Some(child);
    let (log_tx, log_rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if log_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut logs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !logs.iter().any(|l: &String| l.contains("data plane ready")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match log_rx.recv_timeout(left) {
            Ok(l) => logs.push(l),
            Err(_) => bail!("the data plane did not become ready:\n{}", logs.join("\n")),
        }
    }
    println!(
        "dataplane running (pid {}), connect4+sockops on {}, getsockopt on {}",
        w.pid(),
        workload.display(),
        own.display()
    );
    println!("\n-- traffic: unmodified curl in pod A (inside the workload cgroup) to http://{B_IP}:{PORT}/\n");

    let curl = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > '{}/cgroup.procs' && exec \"$@\"", workload.display()))
            .arg("sh")
            .args(["nsenter", &format!("--net=/var/run/netns/{a}"), "curl", "-sS", "--max-time", "20"])
            .args(args)
            .output()
            .context("running curl (apt-get install curl util-linux)")?;
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
    println!("{HANDSHAKES} more GETs  -> {HANDSHAKES} more connections, each a full mutual-TLS handshake");

    // Let the last connection's log lines arrive, then read the tap.
    thread::sleep(Duration::from_millis(300));
    stop_tap.store(true, Ordering::Relaxed);
    let wire = tap_thread.join().map_err(|_| anyhow::anyhow!("the wire tap panicked"))??;
    logs.extend(log_rx.try_iter());

    let closed: Vec<&String> = logs.iter().filter(|l| l.contains("outbound closed")).collect();
    let mut handshakes: Vec<u64> = closed.iter().filter_map(|l| field(l, "handshake_us")).collect();
    handshakes.sort_unstable();
    let sent: u64 = closed.iter().filter_map(|l| field(l, "sent")).sum();
    let received: u64 = closed.iter().filter_map(|l| field(l, "received")).sum();
    let refused = logs.iter().filter(|l| l.contains("refused")).count();

    println!("\n-- what the data plane did\n");
    println!("connections    {} tunnelled, {refused} refused", closed.len());
    println!("bytes          {sent} from A's clients, {received} back to them");
    if let (Some(min), Some(max)) = (handshakes.first(), handshakes.last()) {
        let p50 = handshakes[handshakes.len() / 2];
        println!("handshake      tunnel connect + mutual TLS 1.3: min {min} µs, median {p50} µs, max {max} µs");
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
    let status = w.stop_dataplane()?;
    println!(
        "\n{} in {:.1} s; data plane exited ({status}); namespaces, cgroups and certificates are removed now.",
        if ok { "PASS: only TLS crossed the wire" } else { "FAIL: plaintext crossed the wire" },
        started.elapsed().as_secs_f64()
    );
    drop(w);
    if !ok {
        bail!("the wire carried plaintext");
    }
    Ok(())
}

/// `key=123` from a tracing text line.
fn field(line: &str, key: &str) -> Option<u64> {
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    line[start..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (apt-get install iproute2)"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// What the demo created, removed on drop whatever happened.
struct World {
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    dir: Option<PathBuf>,
    dataplane: Option<Child>,
}

impl World {
    fn pid(&self) -> u32 {
        self.dataplane.as_ref().map_or(0, Child::id)
    }

    fn stop_dataplane(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.dataplane.take().context("no data plane")?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        Ok(child.wait()?)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut c) = self.dataplane.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for cg in self.cgroups.iter().rev() {
            let _ = fs::write(cg.join("cgroup.kill"), "1");
            for _ in 0..100 {
                if fs::remove_dir(cg).is_ok() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(d) = &self.dir {
            let _ = fs::remove_dir_all(d);
        }
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
