//! The bench's worlds, from the test world the tests and the demo use.
//!
//! - [`World`], loopback mode: one network namespace with loopback up, a
//!   workload cgroup, certificates for 127.0.0.1, and one data plane serving
//!   the namespace, so it holds both ends of every tunnel;
//! - [`Nodes`], the two-node shape: a client pod and a server pod joined by
//!   veth, both dual-stack, each served by a data plane of its own, so each
//!   holds one end of every tunnel, as on two nodes. Each node gets half of
//!   the machine's CPUs ([`NodeCpus`]): its proxy, and the client or the
//!   servers of its pod, run there, as on two machines.
//!
//! Everything is removed on drop.
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use nix::{
    sched::{sched_getaffinity, sched_setaffinity, CpuSet},
    unistd::Pid,
};
use testworld::{Certs, Cgroup, Dataplane, Netns};

use crate::server;

/// Some of the bench's CPUs: a `taskset` list and the same as a set.
#[derive(Clone, Debug)]
pub struct Cpus {
    /// For `taskset -c`, e.g. `0` or `2,3`.
    pub list: String,
    set: CpuSet,
}

/// The two nodes' CPUs in the two-node shape: the CPUs this process may run
/// on, split into two halves. On one machine the two nodes would otherwise
/// share every CPU, and where the scheduler put the two proxies relative to
/// each other (one CPU or two) decided the result: round trips and bulk
/// were bimodal from run to run. With a half each, crossing from one node to
/// the other is always a crossing between CPUs, as it is a network hop
/// between machines, and the direct runs cross in the same way.
#[derive(Clone, Debug)]
pub struct NodeCpus {
    /// The client pod's node.
    pub client: Cpus,
    /// The server pod's node.
    pub server: Cpus,
    all: CpuSet,
}

impl NodeCpus {
    /// None on a machine with one CPU (nothing to split).
    pub fn of_this_process() -> anyhow::Result<Option<Self>> {
        let all = sched_getaffinity(Pid::from_raw(0))?;
        let cpus: Vec<usize> = (0..CpuSet::count()).filter(|&c| all.is_set(c).unwrap_or(false)).collect();
        if cpus.len() < 2 {
            return Ok(None);
        }
        let half = |cpus: &[usize]| -> anyhow::Result<Cpus> {
            let mut set = CpuSet::new();
            for &c in cpus {
                set.set(c)?;
            }
            let list = cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
            Ok(Cpus { list, set })
        };
        let (a, b) = cpus.split_at(cpus.len() / 2);
        Ok(Some(Self { client: half(a)?, server: half(b)?, all }))
    }
}

/// Sets the CPUs thread `tid` (of this process) may run on.
fn pin(tid: i32, set: &CpuSet) -> anyhow::Result<()> {
    sched_setaffinity(Pid::from_raw(tid), set)?;
    Ok(())
}

/// Where the load generator runs.
pub trait Shape {
    /// A command for this bench binary's worker `args`, in the client's
    /// namespace, and in the workload cgroup when `captured`.
    fn worker(&self, captured: bool, args: &[String]) -> anyhow::Result<Command>;
}

fn worker_in(
    netns: &Netns,
    workload: &Cgroup,
    captured: bool,
    args: &[String],
    cpus: Option<&Cpus>,
) -> anyhow::Result<Command> {
    let me = std::env::current_exe()?;
    let me = me.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", me.display()))?;
    let mut all = vec!["--worker"];
    all.extend(args.iter().map(String::as_str));
    let cgroup = captured.then_some(workload);
    Ok(match cpus {
        Some(cpus) => netns.command(cgroup, "taskset", &[&["-c", cpus.list.as_str(), me], &all[..]].concat()),
        None => netns.command(cgroup, me, &all),
    })
}

/// What the bench made. Dropped in field order: the data plane first.
#[derive(Debug)]
pub struct World {
    dataplane: Option<Dataplane>,
    /// The namespace the clients, servers and data plane listeners live in.
    pub netns: Netns,
    /// Where captured clients run.
    pub workload: Cgroup,
    own: Cgroup,
    certs: Option<Certs>,
    logs: PathBuf,
}

impl World {
    /// Makes the namespace and cgroups; the data plane's log goes to
    /// `logs/dataplane.log` when it stops.
    pub fn new(logs: &Path) -> anyhow::Result<Self> {
        let id = std::process::id();
        Ok(Self {
            dataplane: None,
            netns: Netns::named(&format!("dpbench-{id}"))?,
            workload: Cgroup::named(&format!("dpbench-clients-{id}"))?,
            own: Cgroup::named(&format!("dpbench-dataplane-{id}"))?,
            certs: None,
            logs: logs.to_path_buf(),
        })
    }

    /// The namespace file.
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    /// Starts the data plane (`extra` flags added) and waits until `/ready`
    /// says so; its PID.
    pub fn start_dataplane(&mut self, binary: &Path, extra: &[&str]) -> anyhow::Result<u32> {
        self.stop_dataplane();
        if self.certs.is_none() {
            let dir = std::env::temp_dir().join(format!("dpbench-certs-{}", std::process::id()));
            self.certs = Some(Certs::create(binary, dir, &["127.0.0.1"])?);
        }
        let certs = self.certs.as_ref().ok_or_else(|| anyhow::anyhow!("no certificates"))?;
        let args = testworld::run_args(&self.workload, "127.0.0.0/8", certs, &[&self.netns], extra);
        let dp = Dataplane::launch(binary, &self.own, &args, "warn")?;
        let pid = dp.pid();
        self.dataplane = Some(dp);
        Ok(pid)
    }

    /// The certificate directory (CA and `127.0.0.1`), once the data plane
    /// has been started.
    pub fn certs_dir(&self) -> Option<&Path> {
        self.certs.as_ref().map(|c| c.dir.as_path())
    }

    /// Stops the data plane, if running, and keeps its log.
    pub fn stop_dataplane(&mut self) {
        if let Some(dp) = self.dataplane.take() {
            let lines = dp.proc.output();
            let _ = dp.stop();
            let _ = fs::write(self.logs.join("dataplane.log"), lines.join("\n"));
        }
    }

    /// A command for this bench binary's worker `args`, in the namespace, and
    /// in the workload cgroup when `captured`.
    pub fn worker(&self, captured: bool, args: &[String]) -> anyhow::Result<Command> {
        worker_in(&self.netns, &self.workload, captured, args, None)
    }
}

impl Shape for World {
    fn worker(&self, captured: bool, args: &[String]) -> anyhow::Result<Command> {
        World::worker(self, captured, args)
    }
}

/// The client pod's address in the two-node shape.
pub const CLIENT_IP: &str = "10.98.0.1";
/// The server pod's address in the two-node shape.
pub const SERVER_IP: &str = "10.98.0.2";
/// The client pod's IPv6 address (both pods are dual-stack).
pub const CLIENT_IP6: &str = "fd00:98::1";
/// The server pod's IPv6 address.
pub const SERVER_IP6: &str = "fd00:98::2";
/// What the data planes capture in the two-node shape.
const NODES_CIDRS: &str = "10.98.0.0/24,fd00:98::/64";

/// The two-node shape. Dropped in field order: the data planes first.
#[derive(Debug)]
pub struct Nodes {
    dataplanes: Vec<Dataplane>,
    /// The client pod.
    pub client: Netns,
    /// The server pod.
    pub server: Netns,
    workload: Cgroup,
    server_workload: Cgroup,
    owns: [Cgroup; 2],
    certs: Certs,
    logs: PathBuf,
    /// Each node's CPUs, if the machine has two or more.
    cpus: Option<NodeCpus>,
    /// The server pod's servers (threads of this process).
    servers: Vec<i32>,
    /// Whether the two-node shape is in effect ([`Nodes::start`]), rather
    /// than one node ([`Nodes::start_one`]).
    two: bool,
}

impl Nodes {
    /// Makes both pods, their link, the cgroups and the certificates.
    pub fn new(binary: &Path, logs: &Path) -> anyhow::Result<Self> {
        let id = std::process::id();
        let client = Netns::named(&format!("dpbench-c-{id}"))?;
        let server = Netns::named(&format!("dpbench-s-{id}"))?;
        let (c_if, s_if) = testworld::veth(&client, &format!("{CLIENT_IP}/24"), &server, &format!("{SERVER_IP}/24"));
        // nodad: usable at once, as CNIs configure pods.
        client.ip(&["-6", "addr", "add", &format!("{CLIENT_IP6}/64"), "dev", &c_if, "nodad"]);
        server.ip(&["-6", "addr", "add", &format!("{SERVER_IP6}/64"), "dev", &s_if, "nodad"]);
        let dir = std::env::temp_dir().join(format!("dpbench-nodes-certs-{id}"));
        Ok(Self {
            dataplanes: Vec::new(),
            certs: Certs::create(binary, dir, &[CLIENT_IP, SERVER_IP, CLIENT_IP6, SERVER_IP6])?,
            workload: Cgroup::named(&format!("dpbench-n-clients-{id}"))?,
            server_workload: Cgroup::named(&format!("dpbench-n-servers-{id}"))?,
            owns: [Cgroup::named(&format!("dpbench-n-dp1-{id}"))?, Cgroup::named(&format!("dpbench-n-dp2-{id}"))?],
            client,
            server,
            logs: logs.to_path_buf(),
            cpus: NodeCpus::of_this_process()?,
            servers: Vec::new(),
            two: false,
        })
    }

    /// Starts a server in the server pod, on its node's CPUs while the
    /// two-node shape is in effect.
    pub fn serve(&mut self, addr: SocketAddr, kind: server::Kind) -> anyhow::Result<()> {
        let tid = server::start(&self.server.path(), addr, kind)?;
        self.servers.push(tid);
        self.pin_servers()
    }

    fn pin_servers(&self) -> anyhow::Result<()> {
        let Some(cpus) = &self.cpus else { return Ok(()) };
        let set = if self.two { &cpus.server.set } else { &cpus.all };
        self.servers.iter().try_for_each(|&tid| pin(tid, set))
    }

    /// (Re)starts both data planes with `extra` flags, each on its node's
    /// CPUs; their PIDs.
    pub fn start(&mut self, binary: &Path, extra: &[&str]) -> anyhow::Result<Vec<u32>> {
        self.stop();
        self.two = true;
        self.pin_servers()?;
        let list = |side| self.node_cpus(side).map(|c| c.list.clone());
        let (a, b) = (list(0), list(1));
        let args = testworld::run_args(&self.workload, NODES_CIDRS, &self.certs, &[&self.client], extra);
        self.dataplanes.push(Dataplane::launch_on(binary, &self.owns[0], &args, "warn", a.as_deref())?);
        let args = testworld::run_args(&self.server_workload, NODES_CIDRS, &self.certs, &[&self.server], extra);
        self.dataplanes.push(Dataplane::launch_on(binary, &self.owns[1], &args, "warn", b.as_deref())?);
        Ok(self.dataplanes.iter().map(Dataplane::pid).collect())
    }

    /// (Re)starts one data plane serving both pods, as on one node, with
    /// `extra` flags; its PID. The node has every CPU.
    pub fn start_one(&mut self, binary: &Path, extra: &[&str]) -> anyhow::Result<Vec<u32>> {
        self.stop();
        self.two = false;
        self.pin_servers()?;
        let args = testworld::run_args(&self.workload, NODES_CIDRS, &self.certs, &[&self.client, &self.server], extra);
        self.dataplanes.push(Dataplane::launch(binary, &self.owns[0], &args, "warn")?);
        Ok(self.dataplanes.iter().map(Dataplane::pid).collect())
    }

    /// The CPUs of the client pod's node (0) or the server pod's (1) in the
    /// shape in effect: none for one node, or on one CPU.
    fn node_cpus(&self, side: usize) -> Option<&Cpus> {
        let cpus = self.cpus.as_ref().filter(|_| self.two)?;
        Some(if side == 0 { &cpus.client } else { &cpus.server })
    }

    /// Where the haproxy beside the client pod (0) or the server pod (1)
    /// runs, in the shape in effect.
    pub fn haproxy_cpus(&self, side: usize) -> Option<String> {
        self.node_cpus(side).map(|c| c.list.clone())
    }

    /// Stops both data planes and keeps their logs.
    pub fn stop(&mut self) {
        for (i, dp) in self.dataplanes.drain(..).enumerate() {
            let lines = dp.proc.output();
            let _ = dp.stop();
            let _ = fs::write(self.logs.join(format!("dataplane-node{}.log", i + 1)), lines.join("\n"));
        }
    }

    /// The certificate directory (CA, both pods).
    pub fn certs_dir(&self) -> &Path {
        &self.certs.dir
    }
}

impl Shape for Nodes {
    fn worker(&self, captured: bool, args: &[String]) -> anyhow::Result<Command> {
        worker_in(&self.client, &self.workload, captured, args, self.node_cpus(0))
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_dataplane();
    }
}

/// Resident set size of a process, in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    Some(testworld::rss_kib(pid) * 1024).filter(|&b| b > 0)
}
