//! Network namespaces as pods and nodes, joined by veth.
use std::{
    fs::{self, File},
    path::PathBuf,
    process::Command,
};

use crate::{run, sh, unique, Cgroup, Proc};

/// A network namespace made with `ip netns add`, loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its `ip netns` name.
    pub name: String,
}

impl Netns {
    /// A namespace named after the test.
    pub fn new(test: &str, tag: &str) -> Self {
        Self::named(&unique(test, tag)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A namespace called `name`.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        sh(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self { name: name.to_string() };
        sh(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// Its file.
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
        let join = cgroup.map(Cgroup::join_prefix).unwrap_or_default();
        c.arg("-c").arg(format!("{join}exec \"$@\"")).arg("sh");
        c.arg("nsenter").arg(format!("--net={}", self.path().display())).arg(program).args(args);
        c
    }

    /// Runs `f` on this thread inside the namespace (sockets made there stay
    /// there), then switches back.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> anyhow::Result<T> {
        use nix::sched::{setns, CloneFlags};
        let home = File::open("/proc/thread-self/ns/net")?;
        let ns = File::open(self.path())?;
        setns(&ns, CloneFlags::CLONE_NEWNET)?;
        let out = f();
        if let Err(e) = setns(&home, CloneFlags::CLONE_NEWNET) {
            // Carrying on in the wrong namespace would make every later
            // step lie; there is no sane way to continue.
            eprintln!("fatal: could not switch back to this thread's namespace: {e}");
            std::process::abort();
        }
        Ok(out)
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

/// A directory of namespace files (symlinks to `ip netns` files), as
/// A namespace with a bridge `br0` (up): the network of a few pods.
pub fn bridge(test: &str, tag: &str) -> Netns {
    let net = Netns::new(test, tag);
    net.ip(&["link", "add", "br0", "type", "bridge"]);
    net.ip(&["link", "set", "br0", "up"]);
    net
}

/// Plugs `pod` into the bridge `br0` of `net` with address `addr/24`, as
/// `eth0`; the bridge side is named after the pod (`v<name>`, see
/// [`bridge_port`]).
pub fn plug(net: &Netns, pod: &Netns, addr: &str) {
    let (pod_if, net_if) = ("eth0", bridge_port(pod));
    run(Command::new("ip").args([
        "link", "add", pod_if, "netns", &pod.name, "type", "veth", "peer", "name", &net_if, "netns", &net.name,
    ]));
    net.ip(&["link", "set", &net_if, "master", "br0", "up"]);
    pod.ip(&["addr", "add", &format!("{addr}/24"), "dev", pod_if]);
    pod.ip(&["link", "set", pod_if, "up"]);
}

/// The bridge-side interface of a pod plugged with [`plug`].
pub fn bridge_port(pod: &Netns) -> String {
    format!("v{}", &pod.name[..pod.name.len().min(14)])
}

/// A directory of namespace files (symlinks to `ip netns` files), as
/// containerd keeps under /var/run/netns; removed on drop.
#[derive(Debug)]
pub struct NetnsDir(PathBuf);

impl NetnsDir {
    /// An empty directory named after the test.
    pub fn new(test: &str) -> Self {
        let d = std::env::temp_dir().join(format!("dptest-netns-{}", unique(test, "n")));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("netns dir");
        Self(d)
    }
    /// Adds `pod` under its own name.
    pub fn add(&self, pod: &Netns) {
        std::os::unix::fs::symlink(pod.path(), self.0.join(&pod.name)).expect("netns symlink");
    }
    /// Removes `pod`.
    pub fn remove(&self, pod: &Netns) {
        fs::remove_file(self.0.join(&pod.name)).expect("netns symlink removed");
    }
    /// The directory, for `--netns-dir`.
    pub fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for NetnsDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Captures TCP on `dev` in `ns` with tcpdump while `f` runs (immediate mode:
/// with the default TPACKET_V3 buffering this kernel and libpcap 1.10 capture
/// nothing); returns the raw capture and tcpdump's text rendering of it.
pub fn capture(ns: &Netns, dev: &str, f: impl FnOnce()) -> (Vec<u8>, String) {
    use std::{thread, time::Duration};
    let file = crate::TempFile(std::env::temp_dir().join(format!("{}.pcap", ns.name)));
    let file_s = file.0.display().to_string();
    let mut dump = Proc::spawn(
        ns.command(None, "tcpdump", &["--immediate-mode", "-i", dev, "-n", "-s", "0", "-w", &file_s, "tcp"]),
        "tcpdump",
    );
    dump.wait_for("listening on", Duration::from_secs(10));
    f();
    thread::sleep(Duration::from_millis(200));
    dump.signal("INT");
    dump.wait(Duration::from_secs(10));
    let raw = fs::read(&file.0).expect("pcap written");
    let text = Command::new("tcpdump").args(["-n", "-r", &file_s]).output().expect("tcpdump -r");
    assert!(text.status.success(), "tcpdump -r {file_s}: {}", String::from_utf8_lossy(&text.stderr));
    (raw, String::from_utf8_lossy(&text.stdout).into_owned())
}
