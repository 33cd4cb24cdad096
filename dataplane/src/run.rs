//! The control thread of `dataplane run`: loads the eBPF programs, starts the
//! executors, attaches the programs once every executor listens (so no
//! captured connect ever meets a closed port), then waits for SIGTERM or
//! SIGINT and detaches everything before exiting.
use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context};
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use tracing::info;

use crate::{config::Config, ebpf::Capture, shard};

/// How long executors get to open their listeners.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until SIGTERM or SIGINT.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    info!(
        workload_cgroup = %cfg.workload_cgroup.display(),
        own_cgroup = %cfg.own_cgroup.display(),
        namespaces = ?cfg.namespaces.iter().map(|n| n.name()).collect::<Vec<_>>(),
        cores = ?cfg.cores,
        capture = ?cfg.capture.cidrs,
        excluded_ports = ?cfg.capture.excluded_ports,
        bypass_mark = format_args!("{:#x}", cfg.capture.bypass_mark),
        map_entries = cfg.capture.map_entries,
        bpf_trace = cfg.capture.trace,
        certs = %cfg.identity.dir().display(),
        identities = ?cfg.identity.addresses().collect::<Vec<_>>(),
        handshake_timeout = ?cfg.timeouts.handshake,
        idle_timeout = ?cfg.timeouts.idle,
        "starting"
    );
    match crate::sys::raise_nofile_limit() {
        Ok(n) => info!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    // Signals first: a SIGTERM during start-up must still detach cleanly.
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let mut capture = Capture::load(&cfg.capture)?;

    let (tx, rx) = crossbeam_channel::unbounded();
    let spec = Arc::new(shard::ShardSpec {
        namespaces: cfg.namespaces.clone(),
        bypass_mark: cfg.capture.bypass_mark,
        identity: cfg.identity.clone(),
        timeouts: cfg.timeouts,
    });
    let _shards = shard::spawn(&cfg.cores, spec, tx)?;
    for _ in &cfg.cores {
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(shard::ShardEvent::Ready { .. }) => {}
            Ok(shard::ShardEvent::Failed { cpu, error }) => bail!("executor on CPU {cpu}: {error}"),
            Err(_) => bail!("executors did not report listening within {STARTUP_TIMEOUT:?}"),
        }
    }
    capture.attach(&cfg.workload_cgroup, &cfg.own_cgroup)?;
    info!("data plane ready: capturing connects");

    let signal = signals.forever().next().unwrap_or(SIGTERM);
    info!(signal, "stopping: detaching the eBPF programs");
    drop(capture);
    info!("detached; exiting");
    Ok(())
}
