//! Why a configuration cannot run, naming the flag.
use std::{path::PathBuf, time::Duration};

use crate::node::cores;

/// A configuration the data plane cannot run with, naming the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No `--workload-cgroup`, and no kubelet cgroup to default to.
    #[error("--workload-cgroup not given and no kubepods.slice or kubepods under {}: give it", .0.display())]
    NoWorkloadCgroup(PathBuf),
    /// No cgroup v2 mount.
    #[error("--workload-cgroup: {0} (cgroup v2 is required)")]
    NoCgroup2(#[source] std::io::Error),
    /// No model and no capture CIDR: nothing would ever be captured.
    #[error("--capture-cidr is required without a model (--kube, --kubeconfig or --workloads)")]
    NoDestinations,
    /// A model needs a flag it was not given.
    #[error("{0} needs {1}")]
    Needs(&'static str, &'static str),
    /// `--workloads` does not load.
    #[error(transparent)]
    Workloads(#[from] crate::cluster::source::file::Error),
    /// `--netns-dir` is not a directory.
    #[error("--netns-dir {}: not a directory", .0.display())]
    NetnsDir(PathBuf),
    /// `--workload-cgroup` is not a cgroup v2 directory.
    #[error("--workload-cgroup {}: not a cgroup v2 directory (no cgroup.procs / cgroup.controllers)", .0.display())]
    WorkloadCgroup(PathBuf),
    /// A `--netns` file could not be opened.
    #[error("--netns {}: {source}", path.display())]
    Netns {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `--cores` cannot be satisfied.
    #[error(transparent)]
    Cores(#[from] cores::CoresError),
    /// The CPUs could not be read.
    #[error("--cores: reading the CPUs available to this process: {0}")]
    CpuProbe(#[source] std::io::Error),
    /// `--map-entries 0`.
    #[error("--map-entries 0: the original-destination maps need at least one entry")]
    MapEntries,
    /// The certificate directory does not load.
    #[error("--certs: {0}")]
    Certs(#[from] crate::identity::Error),
    /// A zero timeout.
    #[error("--{0} 0s: must be longer than zero")]
    ZeroTimeout(&'static str),
    /// `--metrics-token-file` unreadable or empty.
    #[error("--metrics-token-file {file}: {why}")]
    MetricsToken {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// `--tcp-keepalive` under a second.
    #[error("--tcp-keepalive {0:?}: at least 1s (the kernel counts it in whole seconds)")]
    KeepaliveTooShort(Duration),
    /// `--max-handshakes-per-source` outside 1 to the executor's bound.
    #[error("--max-handshakes-per-source {0}: must be 1 to {max} (the handshakes one executor holds)", max = crate::proxy::conn::MAX_IN_FLIGHT)]
    HandshakesPerSource(u64),
    /// `--busy-poll` zero or too long.
    #[error("--busy-poll {0:?}: must be longer than zero and at most 10ms (leave it out to sleep at once)")]
    BusyPoll(Duration),
    /// Our own cgroup could not be found.
    #[error("finding the data plane's own cgroup v2 directory: {0}")]
    OwnCgroup(#[source] std::io::Error),
}
