//! The bench's world: a network namespace with loopback up, a workload
//! cgroup, certificates for 127.0.0.1, and the data plane (release build)
//! serving the namespace. Everything is removed on drop.
use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// What the bench made.
#[derive(Debug)]
pub struct World {
    /// `ip netns` name.
    pub netns: String,
    /// Where captured clients run.
    pub workload: PathBuf,
    own: PathBuf,
    certs: PathBuf,
    logs: PathBuf,
    dataplane: Option<Child>,
}

fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl World {
    /// Makes the namespace, cgroups and certificates; the data plane's log
    /// goes to `logs/dataplane.log`.
    pub fn new(logs: &Path) -> anyhow::Result<Self> {
        let id = std::process::id();
        let root = dataplane::cgroup::cgroup2_mount().context("cgroup v2 (run as root)")?;
        let w = Self {
            netns: format!("dpbench-{id}"),
            workload: root.join(format!("dpbench-clients-{id}")),
            own: root.join(format!("dpbench-dataplane-{id}")),
            certs: std::env::temp_dir().join(format!("dpbench-certs-{id}")),
            logs: logs.to_path_buf(),
            dataplane: None,
        };
        sh("ip", &["netns", "add", &w.netns])?;
        sh("ip", &["-n", &w.netns, "link", "set", "lo", "up"])?;
        for cg in [&w.workload, &w.own] {
            fs::create_dir(cg).with_context(|| format!("creating {}", cg.display()))?;
        }
        dataplane::ca::init(&w.certs)?;
        dataplane::ca::issue(&w.certs, "127.0.0.1".parse()?, dataplane::ca::Validity::default())?;
        Ok(w)
    }

    /// The namespace file.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.netns)
    }

    /// Starts the data plane (`extra` flags added) and waits until ready.
    pub fn start_dataplane(&mut self, binary: &Path, extra: &[&str]) -> anyhow::Result<u32> {
        self.stop_dataplane();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo $$ > '{}/cgroup.procs' && exec \"$@\"", self.own.display()))
            .arg("sh")
            .arg(binary)
            .arg("run")
            .arg("--workload-cgroup")
            .arg(&self.workload)
            .args(["--capture-cidr", "127.0.0.0/8", "--certs"])
            .arg(&self.certs)
            .arg("--netns")
            .arg(self.netns_path())
            .args(extra)
            .env("RUST_LOG", "warn,dataplane::run=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting the data plane")?;
        let stderr = child.stderr.take().context("stderr")?;
        let pid = child.id();
        self.dataplane = Some(child);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains("data plane ready") => break,
                Ok(l) => lines.push(l),
                Err(_) => bail!("the data plane did not become ready:\n{}", lines.join("\n")),
            }
        }
        // Keep draining its stderr so it never blocks on a full pipe; keep
        // the warnings for whoever reads the results.
        let log = self.logs.join("dataplane.log");
        thread::spawn(move || {
            let mut text = lines.join("\n");
            for l in rx {
                text.push('\n');
                text.push_str(&l);
                let _ = fs::write(&log, &text);
            }
        });
        Ok(pid)
    }

    /// Stops the data plane, if running.
    pub fn stop_dataplane(&mut self) {
        if let Some(mut c) = self.dataplane.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A command for this bench binary's worker `args`, in the namespace, and
    /// in the workload cgroup when `captured`.
    pub fn worker(&self, captured: bool, args: &[String]) -> anyhow::Result<Command> {
        let me = std::env::current_exe()?;
        let join =
            if captured { format!("echo $$ > '{}/cgroup.procs' && ", self.workload.display()) } else { String::new() };
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("{join}exec \"$@\""))
            .arg("sh")
            .arg("nsenter")
            .arg(format!("--net={}", self.netns_path().display()))
            .arg(me)
            .arg("--worker")
            .args(args);
        Ok(c)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_dataplane();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
        for cg in [&self.workload, &self.own] {
            let _ = fs::write(cg.join("cgroup.kill"), "1");
            for _ in 0..100 {
                if fs::remove_dir(cg).is_ok() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = fs::remove_dir_all(&self.certs);
    }
}

/// Resident set size of a process, in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}
