//! The data plane binary, run the way an operator runs it: in a cgroup of
//! its own, configured by its command line, ready when `/ready` says so.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use crate::{http_get, Certs, Cgroup, Netns, Proc};

/// How long a data plane gets to become ready.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// The `dataplane` binary: `$DP_BINARY`, else the one built beside the
/// running executable (`target/<profile>/` for a binary, one level up for a
/// test in `target/<profile>/deps/`).
pub fn dataplane_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("DP_BINARY") {
        return PathBuf::from(p);
    }
    built_beside("dataplane").unwrap_or_else(|| PathBuf::from("dataplane"))
}

/// A binary of the workspace built beside the running executable
/// (`target/<profile>/` for a binary, one level up for a test in
/// `target/<profile>/deps/`).
pub fn built_beside(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors().skip(1).take(2).map(|d| d.join(name)).find(|p| p.is_file())
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

/// `dataplane run` arguments of a node agent as the DaemonSet runs it, with
/// a kubeconfig instead of the in-cluster configuration: this node's name,
/// its namespace directory, its workload cgroup, and `extra` (certificates).
pub fn node_args(
    kubeconfig: &str,
    node: &str,
    dir: &crate::NetnsDir,
    workload: &Cgroup,
    extra: &[&str],
) -> Vec<String> {
    let mut args = crate::strings(&[
        "--kubeconfig",
        kubeconfig,
        "--node-name",
        node,
        "--netns-dir",
        &dir.path(),
        "--workload-cgroup",
        &workload.path.display().to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A running data plane.
#[derive(Debug)]
pub struct Dataplane {
    /// The process (its log lines are collected).
    pub proc: Proc,
    admin: String,
}

impl Dataplane {
    /// Starts `dataplane run ARGS` as a member of `cgroup` and waits until it
    /// is ready, or fails the test. `RUST_LOG` defaults to debug for our
    /// crate.
    pub fn start(cgroup: &Cgroup, args: &[String]) -> Self {
        Self::start_env(cgroup, args, &[])
    }

    /// [`Dataplane::start`] with `env` added to the process's environment.
    pub fn start_env(cgroup: &Cgroup, args: &[String], env: &[(&str, &str)]) -> Self {
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,dataplane=debug".into());
        Self::spawn(&dataplane_binary(), cgroup, args, &log, None, env, READY_WITHIN).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `binary run ARGS` as a member of `cgroup` with `RUST_LOG=log`
    /// and waits until `/ready` answers 200. An admin endpoint is added on a
    /// free loopback port unless `args` name one.
    pub fn launch(binary: &Path, cgroup: &Cgroup, args: &[String], log: &str) -> anyhow::Result<Self> {
        Self::launch_on(binary, cgroup, args, log, None)
    }

    /// [`Dataplane::launch`], waiting up to `within` for it to be ready (a
    /// large cluster to list first).
    pub fn launch_within(
        binary: &Path,
        cgroup: &Cgroup,
        args: &[String],
        log: &str,
        within: Duration,
    ) -> anyhow::Result<Self> {
        Self::spawn(binary, cgroup, args, log, None, &[], within)
    }

    /// [`Dataplane::launch`], with the process's CPU affinity set to `cpus`
    /// (a `taskset` list such as `0` or `2-3`) when given: it runs one
    /// executor per CPU of that list.
    pub fn launch_on(
        binary: &Path,
        cgroup: &Cgroup,
        args: &[String],
        log: &str,
        cpus: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::spawn(binary, cgroup, args, log, cpus, &[], READY_WITHIN)
    }

    fn spawn(
        binary: &Path,
        cgroup: &Cgroup,
        args: &[String],
        log: &str,
        cpus: Option<&str>,
        env: &[(&str, &str)],
        within: Duration,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("{}exec \"$@\"", cgroup.join_prefix())).arg("sh");
        if let Some(cpus) = cpus {
            cmd.args(["taskset", "-c", cpus]);
        }
        cmd.arg(binary).arg("run").args(args);
        if !args.iter().any(|a| a == "--admin" || a.starts_with("--admin=")) {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        // The admin endpoint's address is logged at info by `dataplane::control::run`
        // (which logs nothing finer), whatever the caller's filter.
        let log = if log.contains("dataplane::control::run") {
            log.to_string()
        } else {
            format!("{log},dataplane::control::run=info")
        };
        cmd.env("RUST_LOG", log).env("NO_COLOR", "1").envs(env.iter().copied());
        let mut proc = Proc::try_spawn(cmd, "dataplane")?;
        // The one line read from the log: where the kernel put the admin
        // endpoint (port 0 lets parallel tests never collide).
        let line = proc.try_wait_for("admin endpoint listening", READY_WITHIN)?;
        let admin = line
            .split("bound=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .ok_or_else(|| anyhow::anyhow!("no bound=ADDR in {line:?}"))?
            .to_string();
        let mut dp = Self { proc, admin };
        dp.wait_ready(within)?;
        Ok(dp)
    }

    /// Polls `/ready` until it answers 200.
    pub fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let last = match http_get(&self.admin, "/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                anyhow::bail!(
                    "the data plane exited ({status}) before it was ready:\n{}",
                    self.proc.output().join("\n")
                );
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the data plane was not ready within {within:?} (/ready: {last}):\n{}",
                    self.proc.output().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The admin endpoint's address.
    pub fn admin(&self) -> String {
        self.admin.clone()
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.proc.signal("TERM");
        self.proc.wait(Duration::from_secs(10))
    }
}

/// Program names `bpftool cgroup show` lists for a cgroup.
pub fn attached(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool: {e}"));
    assert!(out.status.success(), "bpftool cgroup show {}: {}", cgroup.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}
