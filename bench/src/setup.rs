//! The bench's world, from the test world the tests and the demo use: a
//! network namespace with loopback up, a workload cgroup, certificates for
//! 127.0.0.1, and the data plane (release build) serving the namespace.
//! Everything is removed on drop.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use testworld::{Certs, Cgroup, Dataplane, Netns};

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
        let me = std::env::current_exe()?;
        let me = me.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", me.display()))?;
        let mut all = vec!["--worker"];
        all.extend(args.iter().map(String::as_str));
        Ok(self.netns.command(captured.then_some(&self.workload), me, &all))
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
