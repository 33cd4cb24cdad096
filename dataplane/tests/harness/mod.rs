//! Test harness for the tests that touch the kernel: cgroups, network
//! namespaces joined by veth ("pods" and "nodes"), peers run as child
//! processes inside a given cgroup and namespace, and the data plane itself.
//!
//! Everything is named after the test (plus our PID) so tests run in
//! parallel, and torn down in `Drop`, so a failing test leaves nothing
//! behind. The test process itself never joins a workload cgroup: children
//! join theirs in `sh` before `exec`.
//!
//! Under `CI` (any value but empty), a missing privilege fails the test
//! instead of skipping it.
#![allow(dead_code, unreachable_pub)] // each test binary uses part of it

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Whether the kernel tests can run here. Off root: skipped locally, failed
/// under CI.
pub fn privileged(test: &str) -> bool {
    let root = fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let tools = Command::new("ip").arg("-V").output().is_ok() && Command::new("nsenter").arg("-V").output().is_ok();
    let cgroup2 = cgroup2_mount().is_some();
    if root && tools && cgroup2 {
        return true;
    }
    let why =
        format!("{test}: needs root, iproute2, nsenter and cgroup v2 (root={root} tools={tools} cgroup2={cgroup2})");
    if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
        panic!("{why}: CI is set, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {why}");
    false
}

/// A short name unique to this test and process (fits interface names).
pub fn unique(test: &str, tag: &str) -> String {
    let mut h: u32 = 2166136261;
    for b in test.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    format!("{tag}{:05x}{:x}", h & 0xfffff, std::process::id() & 0xffff)
}

pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A cgroup v2 directory, removed (after killing what is left in it) on drop.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(test: &str, tag: &str) -> Self {
        let root = cgroup2_mount().expect("cgroup v2 mount");
        Self::at(root.join(format!("dptest-{}", unique(test, tag))))
    }

    /// A cgroup below this one.
    pub fn child(&self, name: &str) -> Self {
        Self::at(self.path.join(name))
    }

    fn at(path: PathBuf) -> Self {
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path }
    }

    fn procs(&self) -> String {
        fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.procs().trim().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("warning: removing cgroup {}: {e}", self.path.display());
        }
    }
}

/// A network namespace made with `ip netns add`, loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(test: &str, tag: &str) -> Self {
        let name = unique(test, tag);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// A command that runs inside this namespace (and optionally a cgroup).
    /// `nsenter` rather than `ip netns exec`, which remounts /sys and so hides
    /// the cgroup tree.
    pub fn command(&self, cgroup: Option<&Cgroup>, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        let join = cgroup.map(|cg| format!("echo $$ > '{}/cgroup.procs' && ", cg.path.display())).unwrap_or_default();
        c.arg("-c").arg(format!("{join}exec \"$@\"")).arg("sh");
        c.arg("nsenter").arg(format!("--net={}", self.path().display())).arg(program).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Joins `a` and `b` with a veth pair and gives each end an address
/// (`10.x.y.z/24` form). Each end is named after the namespace it leads to;
/// returns (A's interface, B's interface).
pub fn veth(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> (String, String) {
    let an = format!("v{}", &b.name[..b.name.len().min(14)]);
    let bn = format!("v{}", &a.name[..a.name.len().min(14)]);
    run(Command::new("ip")
        .args(["link", "add", &an, "netns", &a.name, "type", "veth", "peer", "name", &bn, "netns", &b.name]));
    a.ip(&["addr", "add", a_addr, "dev", &an]);
    b.ip(&["addr", "add", b_addr, "dev", &bn]);
    a.ip(&["link", "set", &an, "up"]);
    b.ip(&["link", "set", &bn, "up"]);
    (an, bn)
}

/// Two pods, A (10.77.0.1) and B (10.77.0.2), joined by veth; also B's
/// interface name.
pub fn two_pods(test: &str) -> (Netns, Netns, String) {
    let a = Netns::new(test, "a");
    let b = Netns::new(test, "b");
    let (_, b_if) = veth(&a, "10.77.0.1/24", &b, "10.77.0.2/24");
    (a, b, b_if)
}

/// `dataplane run` arguments: the workload cgroup, a capture CIDR, the
/// certificates, the pods served, and `extra`.
pub fn run_args(workload: &Cgroup, cidr: &str, certs: &Certs, pods: &[&Netns], extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--workload-cgroup".to_string(),
        workload.path.display().to_string(),
        "--capture-cidr".into(),
        cidr.into(),
        "--certs".into(),
        certs.path(),
    ];
    for p in pods {
        args.extend(["--netns".to_string(), p.path().display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Path of the Python peers (`tests/peers.py`).
pub fn peers_py() -> String {
    format!("{}/tests/peers.py", env!("CARGO_MANIFEST_DIR"))
}

/// A child process killed on drop, its output collected line by line.
pub struct Proc {
    pub child: Child,
    pub what: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: &str) -> Self {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let lines = lines.clone();
            let tag = what.to_string();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("DP_TEST_VERBOSE").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    lines.lock().expect("lines").push(line);
                }
            });
        }
        Self { child, what: what.to_string(), lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Waits until a line containing `needle` appears.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().iter().any(|l| l.contains(needle)) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(50)); // let the readers drain
                panic!("{} exited ({status}) before printing {needle:?}:\n{}", self.what, self.output().join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "{} did not print {needle:?} within {timeout:?}:\n{}",
                self.what,
                self.output().join("\n")
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: &str) {
        run(Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]));
    }

    /// Waits for exit, killing it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                thread::sleep(Duration::from_millis(50));
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not exit within {timeout:?}:\n{}", self.what, self.output().join("\n"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A Python server in `ns` on `host:port` that names itself `name`.
pub fn server(ns: &Netns, host: &str, port: u16, name: &str) -> Proc {
    server_with(ns, &["serve", host, &port.to_string(), name], &format!("server {name}"))
}

/// What a client saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub local: String,
    pub peer: String,
    pub server: String,
    pub server_saw: String,
    pub echo: String,
}

fn field(line: &str, key: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("peer printed {line:?}: {e}"));
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {line}")).to_string()
}

/// Runs `peers.py ARGS` to completion in `ns` (and `cgroup`); returns each
/// JSON line it printed.
pub fn peer(ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Vec<serde_json::Value> {
    let py = peers_py();
    let mut all = vec![py.as_str()];
    all.extend_from_slice(args);
    let out = ns.command(cgroup, "python3", &all).output().expect("running a peer");
    assert!(out.status.success(), "peers.py {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("peers.py {args:?} printed {l:?}: {e}")))
        .collect()
}

/// A `peers.py` server (`serve`, `sink`, `reset`) in `ns`, ready.
pub fn server_with(ns: &Netns, args: &[&str], what: &str) -> Proc {
    let py = peers_py();
    let mut all = vec![py.as_str()];
    all.extend_from_slice(args);
    let mut p = Proc::spawn(ns.command(None, "python3", &all), what);
    p.wait_for("listening", Duration::from_secs(10));
    p
}

impl Proc {
    /// How many connections a `peers.py` server accepted.
    pub fn accepted(&self) -> usize {
        self.output().iter().filter(|l| l.starts_with("accepted ")).count()
    }
}

/// Runs the Python client to completion in `ns` (and `cgroup`) and returns
/// one `Seen` per connection.
pub fn client(ns: &Netns, cgroup: Option<&Cgroup>, host: &str, port: u16, extra: &[&str]) -> Vec<Seen> {
    let mut args = vec![peers_py(), "connect".into(), host.into(), port.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ns.command(cgroup, "python3", &args).output().expect("running the client");
    assert!(out.status.success(), "client to {host}:{port} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| Seen {
            local: field(l, "local"),
            peer: field(l, "peer"),
            server: field(l, "server"),
            server_saw: field(l, "server_saw"),
            echo: field(l, "echo"),
        })
        .collect()
}

/// A certificate directory with a CA and a certificate per IP, minted with
/// `dataplane ca`; removed on drop.
#[derive(Debug)]
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn new(test: &str, ips: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("dptest-certs-{}", unique(test, "c")));
        let _ = fs::remove_dir_all(&dir);
        let certs = Self { dir };
        certs.ca(&["init"]);
        for ip in ips {
            certs.issue(ip, &[]);
        }
        certs
    }

    /// `dataplane ca ARGS --dir DIR`.
    pub fn ca(&self, args: &[&str]) {
        run(Command::new(env!("CARGO_BIN_EXE_dataplane")).arg("ca").args(args).arg("--dir").arg(&self.dir));
    }

    /// Issues (or re-issues) the certificate for `ip`.
    pub fn issue(&self, ip: &str, extra: &[&str]) {
        let mut args = vec!["issue", "--ip", ip];
        args.extend_from_slice(extra);
        self.ca(&args);
    }

    pub fn path(&self) -> String {
        self.dir.display().to_string()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The data plane binary, running in its own cgroup.
pub struct Dataplane {
    pub proc: Proc,
}

impl Dataplane {
    /// Starts `dataplane run ARGS` as a member of `cgroup` and waits until it
    /// is ready.
    pub fn start(cgroup: &Cgroup, args: &[String]) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo $$ > '{}/cgroup.procs' && exec \"$@\"", cgroup.path.display()))
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_dataplane"))
            .arg("run")
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info,dataplane=debug".into()));
        let mut proc = Proc::spawn(cmd, "dataplane");
        proc.wait_for("data plane ready", Duration::from_secs(20));
        Self { proc }
    }

    /// The admin endpoint's address, from the start-up log (`--admin
    /// 127.0.0.1:0` lets the kernel pick a free port).
    pub fn admin(&self) -> String {
        let lines = self.proc.output();
        let line = lines.iter().find(|l| l.contains("admin endpoint listening")).expect("admin endpoint in the log");
        line.split("bound=").nth(1).and_then(|r| r.split_whitespace().next()).expect("bound=ADDR").to_string()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.proc.signal("TERM");
        self.proc.wait(Duration::from_secs(10))
    }
}

/// Program names `bpftool cgroup show` lists for a cgroup.
pub fn attached(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup).output().expect("running bpftool");
    assert!(out.status.success(), "bpftool cgroup show {}: {}", cgroup.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

/// `GET path` on `addr` (HTTP/1.1): status and body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    c.read_to_string(&mut text)?;
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Pods A (10.77.0.1) and B (10.77.0.2) joined by veth, and one data plane
/// serving both (capturing 10.77.0.0/16, with `extra` flags). Dropped in
/// field order: the data plane first, so its process is reaped before its
/// cgroup is removed (a zombie keeps a cgroup populated). Use the fields
/// through the struct (or references to them): moving them out would let
/// them drop in another order.
pub struct World {
    pub dp: Dataplane,
    pub a: Netns,
    pub b: Netns,
    /// B's interface (to add addresses).
    pub b_if: String,
    pub workload: Cgroup,
    pub own: Cgroup,
    pub certs: Certs,
}

/// A [`World`] with certificates for `ips`.
pub fn world(t: &str, ips: &[&str], extra: &[&str]) -> World {
    let certs = Certs::new(t, ips);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, b_if) = two_pods(t);
    let dp = Dataplane::start(&own, &run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], extra));
    World { dp, a, b, b_if, workload, own, certs }
}

/// A metric's value in Prometheus text (the sample that starts with
/// `name_and_labels `).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
