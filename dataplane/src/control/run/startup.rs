//! The control thread's one loop, and start-up as gates it passes in order.
//!
//! Every event source is one arm of one `select!`; which arms listen, and
//! what a signal means, depend on the [`Gate`]. Each gate names what it waits
//! for and how long, and what passing it does; capture is attached only
//! after the last, so a captured connect never meets a namespace whose
//! listeners are still opening.
use std::{thread::JoinHandle, time::Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{never, select, Receiver};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{error, info};

use super::{removal, Control, Inputs, QUICK_LOOK, RELOAD_POLL, STARTUP_TIMEOUT, TRIM_EVERY};
use crate::{
    cluster::source, config::Source, control::uninstall::Fate, identity::reload, ops::admin::Phase,
    proxy::executor::ExecutorEvent,
};
use dataplane_common::maps::{NetnsEntry, Verdict};

/// Where start-up stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    /// Every executor opens its listeners in the command line's namespaces,
    /// by the deadline or start-up fails.
    Executors { ready: usize, deadline: Instant },
    /// With a source, nothing is captured before the first model is in:
    /// which pods are meshed decides both what we serve and what `connect4`
    /// refuses.
    Model,
    /// Pods are served once their certificates are minted: after a restart
    /// the issuer gets until the deadline (then we go on; a pod without a
    /// certificate is refused, never plaintext).
    NodeCa { deadline: Instant },
    /// Every namespace already there is enrolled before the programs are
    /// attached: after a restart, pods are served again before anything is
    /// refused for want of a listener (until the deadline).
    Enrolling { deadline: Instant },
    /// Attached and ready: the steady state.
    Ready,
}

impl Gate {
    /// How long the gate waits at most.
    fn deadline(self) -> Option<Instant> {
        match self {
            Gate::Executors { deadline, .. } | Gate::NodeCa { deadline } | Gate::Enrolling { deadline } => {
                Some(deadline)
            }
            Gate::Model | Gate::Ready => None,
        }
    }

    /// Whether the cluster's changes are taken now. Not while the executors
    /// start (the command line's namespaces are served first) nor while the
    /// namespaces there are enrolled (the model they are decided on holds
    /// still until capture is attached).
    fn takes_models(self) -> bool {
        matches!(self, Gate::Model | Gate::NodeCa { .. } | Gate::Ready)
    }
}

/// `r` while `on`, else a channel that never delivers.
fn while_on<'a, T>(on: bool, r: &'a Receiver<T>, off: &'a Receiver<T>) -> &'a Receiver<T> {
    if on {
        r
    } else {
        off
    }
}

impl Control {
    /// Runs start-up and then the steady state, until SIGTERM or SIGINT;
    /// returns the check of whether the DaemonSet is going away (see
    /// [`removal`]), if one was started.
    pub(super) fn serve(
        &mut self,
        io: &mut Inputs,
        executor_events: &Receiver<ExecutorEvent>,
    ) -> anyhow::Result<Option<JoinHandle<Fate>>> {
        let mut gate = Gate::Executors { ready: 0, deadline: Instant::now() + STARTUP_TIMEOUT };
        let mut identity_watch = self.cfg.identity.dir().map(reload::Watch::new);
        let tick = crossbeam_channel::tick(RELOAD_POLL);
        let trim = crossbeam_channel::tick(TRIM_EVERY);
        let mut open_before = 0;
        let mut quick_look = QuickLook::default();
        let (no_cni, no_models, no_cas, no_netns, no_ticks) = (never(), never(), never(), never(), never());
        loop {
            // A source whose thread ended is not listened to again: a
            // disconnected channel is always ready, and the loop would spin.
            let mut gone = (false, false);
            let ready = gate == Gate::Ready;
            let timeout = self.timeout(gate, &mut quick_look);
            let models = while_on(gate.takes_models(), &io.models, &no_models);
            let node_cas = while_on(matches!(gate, Gate::NodeCa { .. } | Gate::Ready), &io.node_cas, &no_cas);
            select! {
                recv(io.signals) -> sig => if let Some(stop) = self.on_signal(sig.ok(), ready)? {
                    return Ok(stop);
                },
                recv(io.admin) -> req => if let Ok(req) = req { self.answer(req) },
                recv(executor_events) -> ev => self.on_executor_event(ev.ok(), &mut gate)?,
                recv(models) -> m => {
                    let batch = m.context("the Kubernetes watch thread stopped")?;
                    let first = self.model.is_none();
                    let local = self.update(batch.changes);
                    if !first {
                        let _ = self.model_updates.record(batch.received.elapsed().as_micros().max(1) as u64);
                    }
                    // Enrolment looks again only when one of this node's
                    // pods changed: the rest of the cluster's churn never
                    // touches it.
                    if local && ready {
                        self.scan_namespaces();
                    }
                },
                recv(node_cas) -> ca => match ca {
                    Ok(ca) => {
                        self.set_node_ca(ca);
                        if ready {
                            self.scan_namespaces();
                        }
                    }
                    Err(_) => gone.0 = true,
                },
                recv(while_on(ready, &io.cni_asks, &no_cni)) -> ask => if let Ok(ask) = ask { self.cni(ask) },
                recv(while_on(ready, &io.netns_events, &no_netns)) -> event => match event {
                    Ok(()) => self.scan_namespaces(),
                    Err(_) => gone.1 = true,
                },
                recv(while_on(ready, &tick, &no_ticks)) -> _ => {
                    if identity_watch.as_mut().is_some_and(reload::Watch::changed) {
                        self.reload();
                    }
                    self.reload_workloads(io);
                    self.refresh_certificates();
                    self.scan_namespaces();
                },
                recv(while_on(ready, &trim, &no_ticks)) -> _ => open_before = self.trim(open_before),
                recv(timeout) -> _ => match gate {
                    Gate::Executors { .. } => bail!("executors did not report listening within {STARTUP_TIMEOUT:?}"),
                    // The deadline opens the gate below.
                    _ if ready => {
                        quick_look.done();
                        self.scan_namespaces();
                    }
                    _ => {}
                },
            }
            if gone.0 {
                error!("the node CA requests stopped: certificates are no longer renewed");
                io.node_cas = never();
            }
            if gone.1 {
                io.netns_events = never();
            }
            gate = self.pass(gate, io)?;
        }
    }

    /// When the loop wakes if nothing else comes: the gate's deadline, or
    /// the quick look while a pod namespace waits for its address.
    fn timeout(&self, gate: Gate, quick_look: &mut QuickLook) -> Receiver<Instant> {
        let waiting = gate == Gate::Ready && self.registry.as_ref().is_some_and(|r| r.waiting());
        match (gate.deadline(), quick_look.deadline(waiting, Instant::now())) {
            (Some(deadline), _) | (None, Some(deadline)) => crossbeam_channel::at(deadline),
            (None, None) => never(),
        }
    }

    /// What a signal means now (`None`: the signal thread is gone): `Some`
    /// to stop and drain, with the check of whether the DaemonSet is going
    /// away; during start-up, SIGTERM and SIGINT fail it.
    fn on_signal(&mut self, sig: Option<i32>, ready: bool) -> anyhow::Result<Option<Option<JoinHandle<Fate>>>> {
        match sig {
            Some(signal @ (SIGTERM | SIGINT)) if ready => {
                info!(signal, "stopping: draining");
                Ok(Some(removal::ask_fate(&self.cfg)))
            }
            Some(SIGTERM | SIGINT) => bail!("stopped during start-up"),
            Some(_) if ready => {
                self.dump();
                Ok(None)
            }
            None if ready => Ok(Some(None)),
            Some(_) | None => Ok(None),
        }
    }

    /// An executor's news: during start-up, counted towards the first gate
    /// (a failure fails start-up); then, enrolment's.
    fn on_executor_event(&mut self, ev: Option<ExecutorEvent>, gate: &mut Gate) -> anyhow::Result<()> {
        match (ev, gate) {
            (Some(ExecutorEvent::Ready { .. }), Gate::Executors { ready, .. }) => *ready += 1,
            (Some(ExecutorEvent::Failed { cpu, error, .. }), Gate::Executors { .. }) => {
                bail!("executor on CPU {cpu}: {error}")
            }
            (Some(ev), _) => self.executor_event(ev),
            (None, Gate::Executors { .. }) => bail!("executors stopped during start-up"),
            (None, _) => {}
        }
        Ok(())
    }

    /// Gives memory back after connections (proxied or to the admin
    /// endpoint) went away; returns how many are open now.
    fn trim(&self, open_before: u64) -> u64 {
        let open = self.open() + self.health.open();
        if open < open_before {
            crate::node::sys::release_free_memory();
        }
        open
    }

    /// Passes every gate whose wait is over (or whose deadline passed),
    /// doing what passing it does; returns the gate now waited at.
    fn pass(&mut self, mut gate: Gate, io: &mut Inputs) -> anyhow::Result<Gate> {
        loop {
            let late = gate.deadline().is_some_and(|d| Instant::now() >= d);
            gate = match gate {
                Gate::Executors { ready, .. } if ready >= self.executors.len() => {
                    self.serve_command_line()?;
                    if let Some(m) = io.loaded.take() {
                        self.reload_model(m);
                    }
                    if self.cfg.source.is_some() && self.model.is_none() {
                        info!("waiting for the first model of the workloads from the Kubernetes API");
                    }
                    Gate::Model
                }
                Gate::Model if self.cfg.source.is_none() || self.model.is_some() => {
                    // Sandboxes the CNI plugin handed a previous agent:
                    // their pods' addresses, before the kubelet reports them.
                    self.restore_sandboxes();
                    if self.minter.is_some() {
                        info!("waiting for this node's CA from the issuer");
                    }
                    Gate::NodeCa { deadline: Instant::now() + STARTUP_TIMEOUT }
                }
                Gate::NodeCa { .. } if late || self.minter.as_ref().is_none_or(|m| m.has_ca()) => {
                    self.scan_namespaces();
                    Gate::Enrolling { deadline: Instant::now() + STARTUP_TIMEOUT }
                }
                Gate::Enrolling { .. } if late || !self.registry.as_ref().is_some_and(|r| r.opening()) => {
                    self.forget_unknown_namespaces();
                    if let Some(c) = self.capture.as_mut() {
                        c.attach(&self.cfg.workload_cgroup, &self.cfg.own_cgroup)?;
                    }
                    self.health.set_phase(Phase::Ready);
                    info!("data plane ready: capturing connects");
                    Gate::Ready
                }
                waiting => return Ok(waiting),
            };
        }
    }

    /// The namespaces given on the command line are served from the start.
    fn serve_command_line(&mut self) -> anyhow::Result<()> {
        let namespaces: Vec<_> =
            self.cfg.namespaces.iter().map(|ns| (ns.clone(), ns.addresses().unwrap_or_default())).collect();
        for (ns, addresses) in namespaces {
            let cookie = ns.cookie().with_context(|| format!("reading the cookie of {}", ns.name()))?;
            self.set_netns(cookie, Some(NetnsEntry::new(Verdict::Served, &[])));
            if self.wants_return_path(&addresses) {
                self.return_paths.now(&ns, &addresses);
            }
        }
        self.sync_own_netns()
    }

    /// The workloads file, read again when it changed; a file that does
    /// not parse leaves the model in service.
    fn reload_workloads(&mut self, io: &mut Inputs) {
        let (Some(w), Some(Source::File { path, node })) = (io.workloads_watch.as_mut(), &self.cfg.source) else {
            return;
        };
        if !w.changed() {
            return;
        }
        match source::file::load(path, node.as_deref()) {
            Ok(m) => {
                info!(workloads = %path.display(), "workloads file reloaded");
                self.reload_model(m);
            }
            Err(e) => error!(error = %e, "workloads file refused: the previous model stays in service"),
        }
    }
}

/// When enrolment looks again while a namespace waits for its address: a
/// deadline kept across the loop's turns. Made anew at each turn, other
/// events pushed it back: under a cluster's churn a model update comes every
/// few milliseconds, and a pod waited for the 250 ms tick instead of 5 ms.
#[derive(Debug, Default)]
struct QuickLook(Option<Instant>);

impl QuickLook {
    /// The deadline while something is `waiting` (`QUICK_LOOK` after the
    /// first turn that found it so); none otherwise.
    fn deadline(&mut self, waiting: bool, now: Instant) -> Option<Instant> {
        if !waiting {
            self.0 = None;
            return None;
        }
        Some(*self.0.get_or_insert(now + QUICK_LOOK))
    }

    /// The look was made: the next wait starts a new deadline.
    fn done(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests;
