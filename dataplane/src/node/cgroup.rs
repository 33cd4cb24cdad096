//! Finding cgroup v2 directories: the mount point (from `/proc/mounts`, since
//! it is `/sys/fs/cgroup` on most nodes and `/sys/fs/cgroup/unified` on hybrid
//! hosts) and the cgroup this process runs in (from `/proc/self/cgroup`).
use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The cgroup v2 mount point named in a `/proc/mounts` text.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_src, target, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    })
}

/// The cgroup v2 path (`0::/...` line) in a `/proc/PID/cgroup` text.
pub fn unified_path_in(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The cgroup v2 mount point of this machine.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    cgroup2_mount_in(&mounts)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 file system in /proc/mounts"))
}

/// The cgroup v2 directory this process runs in.
pub fn own_cgroup() -> io::Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let rel = unified_path_in(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 entry in /proc/self/cgroup"))?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Whether `dir` is a cgroup v2 directory.
pub fn is_cgroup2_dir(dir: &Path) -> bool {
    dir.join("cgroup.procs").is_file() && dir.join("cgroup.controllers").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_mount_on_a_hybrid_host() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn reads_the_v2_line() {
        let text = "4:memory:/x\n0::/kubepods.slice/pod1\n";
        assert_eq!(unified_path_in(text), Some("/kubepods.slice/pod1"));
        assert_eq!(unified_path_in("1:cpu:/\n"), None);
    }
}
