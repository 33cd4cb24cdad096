//! cgroup v2 directories.
use std::{
    fs,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use crate::unique;

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hybrid hosts), from `/proc/mounts`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

/// A cgroup v2 directory, removed (after killing what is left in it) on drop.
#[derive(Debug)]
pub struct Cgroup {
    /// Its directory.
    pub path: PathBuf,
}

impl Cgroup {
    /// `dptest-<unique>` under the cgroup v2 root, for a test.
    pub fn new(test: &str, tag: &str) -> Self {
        Self::named(&format!("dptest-{}", unique(test, tag))).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `name` under the cgroup v2 root.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        let root = cgroup2_mount().ok_or_else(|| anyhow::anyhow!("no cgroup v2 mount (needs root and cgroup v2)"))?;
        Self::at(root.join(name))
    }

    /// A cgroup below this one.
    pub fn child(&self, name: &str) -> Self {
        Self::at(self.path.join(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(path: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir(&path).map_err(|e| anyhow::anyhow!("creating cgroup {}: {e}", path.display()))?;
        Ok(Self { path })
    }

    /// A shell prefix that moves the shell into this cgroup before it
    /// `exec`s the command.
    pub fn join_prefix(&self) -> String {
        format!("echo $$ > '{}/cgroup.procs' && ", self.path.display())
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
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Err(e) = fs::remove_dir(&self.path) {
            if Instant::now() > deadline {
                eprintln!("warning: removing cgroup {}: {e}", self.path.display());
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}
