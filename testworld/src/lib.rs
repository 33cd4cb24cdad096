//! One test world, used by the kernel tests, the bench and the demo alike:
//! cgroups, network namespaces joined by veth ("pods" and "nodes"),
//! certificates minted with `dataplane ca`, peers run as child processes
//! inside a given cgroup and namespace, and the data plane process itself,
//! started and found ready through its own `/ready`.
//!
//! Everything a test makes is named after the test (plus our PID), so tests
//! run in parallel, and torn down in `Drop`, so a failing test leaves nothing
//! behind. The calling process never joins a workload cgroup: children join
//! theirs in `sh` before `exec`.
//!
//! Under `CI` (any value but empty), a missing privilege fails a test
//! ([`kernel_test!`]) instead of skipping it.
//!
//! - [`apiserver`]: the cluster's double, a Kubernetes API server speaking
//!   list/watch over HTTPS;
//! - [`cgroup`], [`netns`]: the kernel objects;
//! - [`certs`]: a certificate directory;
//! - [`proc`]: child processes with their output collected;
//! - [`peers`]: the Python peers (`peers.py`): servers, clients, hostile ones;
//! - [`dataplane`]: the data plane binary, started and stopped;
//! - [`mod@world`]: two pods and a data plane serving them.
pub mod apiserver;
pub mod certs;
pub mod cgroup;
pub mod cni;
pub mod dataplane;
pub mod netns;
pub mod peers;
pub mod proc;
pub mod world;

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

pub use apiserver::ApiServer;
pub use certs::Certs;
pub use cgroup::{cgroup2_mount, Cgroup};
pub use dataplane::{attached, dataplane_binary, node_args, run_args, Dataplane};
pub use netns::{bridge, bridge_port, capture, plug, two_pods, veth, Netns, NetnsDir};
pub use peers::{client, how_it_ended, open_quiet, peer, peers_py, server, server_with, transfer_exact, Seen};
pub use proc::Proc;
pub use world::{world, World};

/// The start of every test that needs root and the kernel: evaluates to the
/// test's name (which names everything the test makes), or returns from the
/// test when it cannot run here (and fails it under `CI`).
#[macro_export]
macro_rules! kernel_test {
    () => {{
        fn here() {}
        let name = $crate::test_name(std::any::type_name_of_val(&here));
        if !$crate::privileged(name) {
            return;
        }
        name
    }};
}

/// The test function's name from the path of a function nested in it.
pub fn test_name(nested: &'static str) -> &'static str {
    let path = nested.strip_suffix("::here").unwrap_or(nested);
    path.rsplit("::").next().unwrap_or(path)
}

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

/// Runs a command to success or fails with its stderr.
pub fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().map_err(|e| anyhow::anyhow!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn run(cmd: &mut Command) {
    if let Err(e) = sh(cmd) {
        panic!("{e}");
    }
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

/// A metric's value in Prometheus text (the sample that starts with
/// `name_and_labels `).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// CPU time (user + system) of a process and all its threads so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis((utime + stime) * 10))
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

/// Owned copies of `args`, for a command line.
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A BPF file system of the test's own (strict mode's pins), unmounted
/// (dropping every pin in it) on drop.
#[derive(Debug)]
pub struct BpfFs(pub PathBuf);

impl BpfFs {
    /// Mounts one under `$TMPDIR`, named after the test.
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dptest-bpffs-{}", unique(test, "b")));
        fs::create_dir_all(&dir).expect("bpffs dir");
        let ok = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir).status().expect("mount");
        assert!(ok.success(), "mounting a BPF file system at {}", dir.display());
        Self(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// A file a test writes (a packet capture, say), removed on drop, so a
/// failing test leaves it behind no more than a passing one.
#[derive(Debug)]
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A temporary directory for this test, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/<name>`, emptied first.
    pub fn new(name: &str) -> std::io::Result<Self> {
        let d = std::env::temp_dir().join(name);
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d)?;
        Ok(Self(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_macro_names_the_test() {
        fn here() {}
        assert_eq!(super::test_name(std::any::type_name_of_val(&here)), "the_macro_names_the_test");
        assert_eq!(super::unique("t", "a").len(), super::unique("t", "b").len());
    }
}
