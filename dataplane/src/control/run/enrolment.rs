//! Enrolment as the control thread carries it out: what the registry
//! decided for each namespace (listeners opened on every executor, then
//! `connect4` told; withdrawn in the reverse order), the executors' news,
//! and what `connect4` knows of our own namespace.
use std::net::IpAddr;

use tracing::{error, info, warn};

use super::{migrate_requests, Control};
use crate::{control::enroll::Change, node::netns::NetnsId, proxy::executor};
use dataplane_common::maps::{NetnsCookie, NetnsEntry, Verdict};

impl Control {
    /// Enrols and withdraws namespaces from the watched directory.
    pub(super) fn scan_namespaces(&mut self) {
        let Some(registry) = self.registry.as_mut() else { return };
        let changes = registry.scan(self.cfg.identity.as_ref(), self.model.as_ref());
        self.enrolment_changes(changes);
    }

    /// Decides the namespace at `path` alone (a sandbox just handed over by
    /// the CNI plugin): its pod is not kept waiting for a look at every
    /// other namespace of the node.
    pub(super) fn look_at(&mut self, path: &std::path::Path) {
        let Some(registry) = self.registry.as_mut() else { return };
        let changes = registry.look_at(path, self.cfg.identity.as_ref(), self.model.as_ref());
        self.enrolment_changes(changes);
    }

    /// Carries out what enrolment decided.
    pub(super) fn enrolment_changes(&mut self, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Enroll { ns, addresses } => {
                    migrate_requests(&ns);
                    for s in &self.executors {
                        let _ = s.tx.send(executor::ToExecutor::Enroll(ns.clone(), addresses.clone()));
                    }
                }
                Change::Ports(_, cookie, skip) => self.set_netns(cookie, Some(NetnsEntry::new(Verdict::Served, &skip))),
                Change::Withdraw(ns, cookie) => {
                    let id = ns.id();
                    // The return path stays: connections still open through
                    // it keep working to their end (without it the
                    // application's replies would leave the pod). No new
                    // transparent socket is made, so it is inert; it goes
                    // with the namespace, or is re-created if the pod is
                    // served again.
                    ns.set_client_address(false);
                    // connect4 first: new connects stop coming our way...
                    if let Some(cookie) = cookie {
                        self.set_netns(cookie, None);
                    }
                    // ...then the listeners close.
                    for s in &self.executors {
                        let _ = s.tx.send(executor::ToExecutor::Withdraw(id));
                    }
                    if let (Some(cookie), Some(capture)) = (cookie, self.capture.as_mut()) {
                        match capture.forget_netns(cookie) {
                            Ok(n) => info!(?id, entries = n, "forgot the namespace's original destinations"),
                            Err(e) => warn!(?id, error = %e, "could not clean the namespace's map entries"),
                        }
                    }
                }
                Change::Pass(cookie, pass) => {
                    self.set_netns(cookie, pass.then(|| NetnsEntry::new(Verdict::Pass, &[])));
                }
            }
        }
        self.health.set_enrolled(self.enrolled());
        self.sync_strict();
        if let Err(e) = self.sync_own_netns() {
            error!(error = %e, "could not update the capture verdict of our own namespace");
        }
        self.answer_cni();
    }

    /// Drops what `connect4` knows of namespaces we do not (adopted from a
    /// strict predecessor: namespaces that went while no agent ran). Those
    /// we know, served or not yet, keep their entries until we decide.
    pub(super) fn forget_unknown_namespaces(&mut self) {
        let mut known: Vec<NetnsCookie> = self.registry.as_ref().map(|r| r.cookies()).unwrap_or_default();
        known.extend(self.own_netns.as_ref().map(|(_, c, _)| *c));
        known.extend(self.cfg.namespaces.iter().filter_map(|ns| ns.cookie().ok()));
        let Some(capture) = self.capture.as_mut() else { return };
        match capture.keep_netns(|c| known.contains(&c)) {
            Ok(0) => {}
            Ok(entries) => info!(entries, "forgot namespaces that went while no data plane ran"),
            Err(e) => warn!(error = %e, "could not sweep the adopted namespaces"),
        }
    }

    /// Whether a pod with `addresses` that asks for it gets the return path
    /// that lets its application see clients' addresses. A namespace with
    /// no address of its own (loopback only) has no client from elsewhere.
    pub(super) fn wants_return_path(&self, addresses: &[IpAddr]) -> bool {
        self.cfg.client_address && !addresses.is_empty()
    }

    /// An executor's news: once every executor listens in a namespace being
    /// enrolled, `connect4` starts sending its connects to them.
    pub(super) fn executor_event(&mut self, ev: executor::ExecutorEvent) {
        match ev {
            executor::ExecutorEvent::Listening { cpu, netns } => {
                let executors = self.executors.len();
                let Some(open) = self.registry.as_mut().and_then(|r| r.listening(netns, cpu, executors)) else {
                    return;
                };
                self.set_netns(open.cookie, Some(NetnsEntry::new(Verdict::Served, &open.skip_outbound)));
                let took = open.took;
                let _ = self.enrolment.record(took.as_micros().max(1) as u64);
                info!(?netns, ?took, "namespace served: its connects are captured");
                self.answer_cni();
                // Then the return path (some milliseconds of nft and ip, on
                // its own thread): the pod is served meanwhile, from its own
                // address.
                if open.client_address && self.wants_return_path(&open.addresses) {
                    self.return_paths.request(open.ns, open.addresses);
                }
            }
            executor::ExecutorEvent::Failed { cpu, netns, error } => {
                error!(cpu, ?netns, %error, "an executor could not listen in a namespace: its meshed connects stay refused");
            }
            executor::ExecutorEvent::Ready { .. } => {}
        }
    }

    /// Writes what connect4 knows of a namespace; a failure is logged (the
    /// namespace's connects to meshed destinations stay refused).
    pub(super) fn set_netns(&mut self, cookie: NetnsCookie, entry: Option<NetnsEntry>) {
        if let Some(capture) = self.capture.as_mut() {
            if let Err(e) = capture.set_netns(cookie, entry) {
                error!(netns_cookie = cookie.0, error = %e, "could not update the namespace's capture verdict");
            }
        }
    }

    /// Connects from our own namespace are never captured unless we serve it
    /// (a laptop demo serving its own namespace): there is no listener there
    /// for them, and on a node they are the host-network pods'.
    pub(super) fn sync_own_netns(&mut self) -> anyhow::Result<()> {
        let enrolled = self.enrolled();
        let (Some((id, cookie, passed)), Some(capture)) = (self.own_netns.as_mut(), self.capture.as_mut()) else {
            return Ok(());
        };
        let pass = !enrolled.contains(id);
        if *passed != Some(pass) {
            capture.set_netns(*cookie, pass.then(|| NetnsEntry::new(Verdict::Pass, &[])))?;
            info!(netns_cookie = cookie.0, captured = !pass, "our own network namespace (host-network pods)");
            *passed = Some(pass);
        }
        Ok(())
    }

    /// The namespaces every executor must listen in.
    pub(super) fn enrolled(&self) -> Vec<NetnsId> {
        let mut v: Vec<NetnsId> = self.cfg.namespaces.iter().map(|n| n.id()).collect();
        if let Some(r) = &self.registry {
            v.extend(r.served());
        }
        v
    }
}
