//! Process limits.
use std::io;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises this process's open-file limit: every proxied connection holds two
/// sockets on each side, so the usual soft limit of 1024 caps us at a few
/// hundred connections. With CAP_SYS_RESOURCE both limits go up to
/// `fs.nr_open` (at most 2^20); without, the soft limit goes up to the hard
/// one. Returns the new soft limit. (Public for the load generators in
/// `bench/`, which hold thousands of sockets too.)
pub fn raise_open_file_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open: u64 =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let want = nr_open.min(1 << 20);
    if want > hard && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(soft.max(hard))
}
