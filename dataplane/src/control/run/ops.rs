//! What operators ask of the control thread: measurements merged from
//! every executor (for `/metrics` and the SIGUSR1 dump), certificate
//! reloads, and the drain at the end.
use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use crossbeam_channel::Receiver;
use tracing::{error, info, warn};

use super::{Control, SNAPSHOT_TIMEOUT};
use crate::{
    control::enroll,
    identity::Identity,
    node::ebpf::Capture,
    ops::admin::{self, Phase},
    ops::dump,
    proxy::{executor, stats::Snapshot},
};
use dataplane_common::maps::StatIndex;

impl Control {
    /// Connections open on every executor, read without asking them.
    pub(super) fn open(&self) -> u64 {
        self.executors.iter().map(|s| s.open.get()).sum()
    }

    /// Every executor's measurements, merged (histograms included: for
    /// dumps and scrapes).
    pub(super) fn collect(&self) -> Snapshot {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut asked = 0;
        for s in &self.executors {
            if s.tx.send(executor::ToExecutor::Snapshot(tx.clone())).is_ok() {
                asked += 1;
            }
        }
        let mut merged = Snapshot::default();
        let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
        for _ in 0..asked {
            match rx.recv_deadline(deadline) {
                Ok(r) => merged.merge(&r.stats),
                Err(_) => {
                    warn!(asked, "an executor did not answer a snapshot request in time");
                    break;
                }
            }
        }
        merged
    }

    pub(super) fn bpf_stats(&self) -> Vec<(StatIndex, u64)> {
        match self.capture.as_ref().map(Capture::stats) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                warn!(error = %e, "reading the eBPF counters");
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    pub(super) fn dump(&self) {
        let stats = self.collect();
        if let Err(e) = dump::dump(&stats, &self.bpf_stats(), self.cfg.stats_dir.as_deref(), self.started) {
            error!(error = %e, dir = ?self.cfg.stats_dir, "writing the stats dump");
        }
    }

    pub(super) fn answer(&self, req: admin::Request) {
        let reply = match req.query {
            admin::Query::Metrics => {
                let stats = self.collect();
                let namespaces = match &self.registry {
                    Some(r) => r.counts(),
                    None => enroll::State::LABELS.iter().map(|l| (*l, 0)).collect(),
                };
                let extra = admin::Extra {
                    reloads: self.reloads,
                    namespaces,
                    admin: self.health.closed(),
                    heap: crate::node::sys::heap(),
                    pods: self.model.as_ref().map(|m| m.local_counts()).unwrap_or_default(),
                    watch_errors: self.watch_counters.as_ref().map(|(c, _)| {
                        use std::sync::atomic::Ordering::Relaxed;
                        vec![
                            ("pods", c.pods.load(Relaxed)),
                            ("namespaces", c.namespaces.load(Relaxed)),
                            ("services", c.services.load(Relaxed)),
                            ("authorizationpolicies", c.policies.load(Relaxed)),
                        ]
                    }),
                    certificates: self.minter.as_ref().zip(self.watch_counters.as_ref()).map(|(m, (_, ca))| {
                        use std::sync::atomic::Ordering::Relaxed;
                        let (minted, mint_failed) = m.counts();
                        admin::Certificates {
                            node_ca_issued: ca.issued.load(Relaxed),
                            node_ca_failed: ca.failed.load(Relaxed),
                            minted,
                            mint_failed,
                        }
                    }),
                    enrolment: self.registry.as_ref().map(|_| self.enrolment.clone()),
                    model_updates: self.watch_counters.as_ref().map(|_| self.model_updates.clone()),
                    return_path_failures: self.return_paths.failures(),
                    cni: self.cfg.cni_socket.as_ref().map(|_| self.cni_figures.clone()),
                };
                (200, admin::render(&stats, &self.bpf_stats(), &extra))
            }
        };
        let _ = req.reply.send(reply);
    }

    pub(super) fn reload(&mut self) {
        let Some(dir) = self.cfg.identity.dir().map(std::path::Path::to_path_buf) else { return };
        match Identity::load_with(&dir, self.cfg.identity.resumption()) {
            Ok(id) => {
                let id = Arc::new(id);
                self.cfg.identity = id.clone();
                info!(certs = %dir.display(), identities = ?id.addresses().collect::<Vec<_>>(), "certificates reloaded");
                for s in &self.executors {
                    let _ = s.tx.send(executor::ToExecutor::Identity(id.clone()));
                }
                self.reloads.applied += 1;
            }
            Err(e) => {
                self.reloads.refused += 1;
                error!(certs = %dir.display(), error = %e, "certificate reload refused: the previous certificates stay in service");
            }
        }
    }

    /// Closes the listeners, lets open connections finish until the drain
    /// timeout, detaches the programs; hands back the return-path installer
    /// (a removal waits for what it still has queued).
    pub(super) fn drain(mut self, admin_rx: &Receiver<admin::Request>) -> crate::control::return_path::Installer {
        self.health.set_phase(Phase::Draining);
        for s in &self.executors {
            let _ = s.tx.send(executor::ToExecutor::Drain);
        }
        let deadline = Instant::now() + self.cfg.drain_timeout;
        // First every executor closes its listeners (after that nothing new
        // is accepted, and every accepted connection is counted as open)...
        while !self.executors.iter().all(|s| executor::lock(&s.listening).is_empty()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        // ...then the open connections get until the deadline.
        loop {
            let open = self.open();
            if open == 0 {
                info!("drained: no connection left");
                break;
            }
            if Instant::now() >= deadline {
                warn!(open, timeout = ?self.cfg.drain_timeout, "drain timeout: closing the connections still open");
                break;
            }
            while let Ok(req) = admin_rx.try_recv() {
                self.answer(req);
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.capture = None; // detaches the programs
        info!("detached; exiting");
        // Kept: a removal waits for what it still has to set up.
        self.return_paths
    }
}
