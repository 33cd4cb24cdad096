//! Enrolment of pod network namespaces found in a directory (node mode).
//!
//! The control thread looks at `--netns-dir` (e.g. `/var/run/netns`, where
//! containerd, CRI-O and `ip netns` pin namespaces) whenever inotify says it
//! changed, and again every few milliseconds while a namespace waits for its
//! address. A file names a namespace (by nsfs inode, so a pod re-created
//! under the same name or with the same IP is a new namespace), which goes
//! through:
//!
//! - waiting for an address: the CNI adds the pod's address after it creates
//!   the namespace (a meshed dual-stack pod waits for every address the model
//!   shows for it, so that both families get listeners);
//! - with a model (the Kubernetes API or `--workloads`), its address is
//!   matched to a local workload: none yet is *unclaimed* (the API has not
//!   shown the pod's address yet: its connects to meshed destinations are
//!   refused meanwhile); a workload outside the mesh is *passed* (never
//!   captured); a meshed one goes on. Without a model every namespace goes
//!   on (the mode before the cluster layer);
//! - waiting for a certificate: an address with no `<ip>.crt` in `--certs`;
//! - served, opening: every executor opens its listeners in it; once all
//!   have said so ([`Registry::listening`]), it is open and the control
//!   thread tells `connect4` (see `run/enrolment.rs`).
//!
//! The registry is the one place that knows where a namespace stands,
//! opening included; it decides, and the control thread carries out the
//! [`Change`]s and the [`Opened`] it returns.
//!
//! Every look re-decides every namespace against the current model, so a
//! label flipped in the API enrols or withdraws a pod without a restart. A
//! file that disappears (or now names another namespace) is withdrawn: the
//! executors close its listeners, its eBPF entries are deleted, and our
//! handle on the namespace is dropped.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    cluster::model::Model,
    node::netns::{Netns, NetnsId},
};
use dataplane_common::maps::NetnsCookie;

/// Where an enrolled namespace stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No address yet (or not all the addresses its workload has).
    WaitingForAddress,
    /// No local workload holds this address (yet).
    Unclaimed(IpAddr),
    /// Two workloads claim the address: neither is trusted.
    Conflict(String),
    /// Its workload is outside the mesh (the reason's label): never captured.
    Passed(&'static str),
    /// An address without a certificate.
    WaitingForCertificate(IpAddr),
    /// Listeners open (or opening) on every executor.
    Served,
    /// Not a namespace we can enter (reported once, ignored until it changes).
    Broken(String),
}

impl State {
    /// Every state's label, in the order `/metrics` lists them.
    pub const LABELS: [&'static str; 7] = [
        "served",
        "passed",
        "unclaimed",
        "address_conflict",
        "waiting_for_address",
        "waiting_for_certificate",
        "unusable",
    ];

    /// A label for metrics (one of [`State::LABELS`]).
    pub fn label(&self) -> &'static str {
        match self {
            State::WaitingForAddress => "waiting_for_address",
            State::Unclaimed(_) => "unclaimed",
            State::Conflict(_) => "address_conflict",
            State::Passed(_) => "passed",
            State::WaitingForCertificate(_) => "waiting_for_certificate",
            State::Served => "served",
            State::Broken(_) => "unusable",
        }
    }
}

#[derive(Debug)]
struct Entry {
    ino: u64,
    netns: Option<Arc<Netns>>,
    cookie: Option<NetnsCookie>,
    /// Its addresses, once it has all it will have (a pod's never change).
    addresses: Vec<IpAddr>,
    /// When the file was first seen, and its address.
    seen: Instant,
    addressed: Option<Instant>,
    state: State,
    /// Destination ports its connects go direct to (its workload's
    /// annotation).
    skip_outbound: Vec<u16>,
    /// Served, with listeners still opening on some executors.
    opening: Option<Opening>,
}

/// A served namespace whose listeners are opening.
#[derive(Debug)]
struct Opening {
    /// The executors (by CPU) listening in it so far.
    listening: BTreeSet<usize>,
    /// When its address appeared (for the enrolment latency).
    since: Instant,
    /// Whether its application should see clients' addresses.
    client_address: bool,
}

/// A namespace now open on every executor: what `connect4` must be told.
#[derive(Debug)]
pub struct Opened {
    /// The namespace.
    pub ns: Arc<Netns>,
    /// Its cookie.
    pub cookie: NetnsCookie,
    /// Destination ports its connects go direct to.
    pub skip_outbound: Vec<u16>,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// From its address appearing to now.
    pub took: Duration,
    /// Whether its application should see clients' addresses.
    pub client_address: bool,
}

/// A change for the executors and the eBPF maps.
#[derive(Debug)]
pub enum Change {
    /// Open listeners in this namespace (each executor says when it has:
    /// [`Registry::listening`]).
    Enroll {
        /// The namespace.
        ns: Arc<Netns>,
        /// Its addresses.
        addresses: Vec<IpAddr>,
    },
    /// An open namespace's skipped ports changed.
    Ports(NetnsId, NetnsCookie, Vec<u16>),
    /// Close the listeners of this namespace, forget its clients and what
    /// `connect4` knew of it.
    Withdraw(Arc<Netns>, Option<NetnsCookie>),
    /// Never capture this namespace's connects (`true`), or forget that.
    Pass(NetnsCookie, bool),
}

/// The namespaces found in one directory (and those the model names), and
/// where each stands: the one record of a pod namespace's enrolment.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    entries: BTreeMap<PathBuf, Entry>,
    node: Box<dyn Node>,
}

impl Registry {
    /// Watches `dir` (nothing is enrolled until the first [`Registry::scan`]).
    pub fn new(dir: &Path) -> Self {
        Self::on(dir, Box::new(Host))
    }

    /// Watches `dir` as `node` shows it.
    pub fn on(dir: &Path, node: Box<dyn Node>) -> Self {
        Self { dir: dir.to_path_buf(), entries: BTreeMap::new(), node }
    }

    /// The served namespaces.
    pub fn served(&self) -> impl Iterator<Item = NetnsId> + '_ {
        self.entries.values().filter(|e| e.state == State::Served).filter_map(|e| Some(e.netns.as_ref()?.id()))
    }

    /// The served namespaces, with their addresses.
    pub fn served_pods(&self) -> impl Iterator<Item = (&Arc<Netns>, &[IpAddr])> + '_ {
        self.entries
            .values()
            .filter(|e| e.state == State::Served)
            .filter_map(|e| Some((e.netns.as_ref()?, e.addresses.as_slice())))
    }

    /// An executor listens in `netns`; once all `executors` do, the
    /// namespace is open: returned once, with what `connect4` must be told.
    /// News of a namespace no longer opening (withdrawn meanwhile) is
    /// ignored.
    pub fn listening(&mut self, netns: NetnsId, cpu: usize, executors: usize) -> Option<Opened> {
        let entry = self.entries.values_mut().find(|e| e.netns.as_ref().is_some_and(|n| n.id() == netns))?;
        let opening = entry.opening.as_mut()?;
        opening.listening.insert(cpu);
        if opening.listening.len() < executors {
            return None;
        }
        let opening = entry.opening.take()?;
        Some(Opened {
            ns: entry.netns.clone()?,
            cookie: entry.cookie?,
            skip_outbound: entry.skip_outbound.clone(),
            addresses: entry.addresses.clone(),
            took: opening.since.elapsed(),
            client_address: opening.client_address,
        })
    }

    /// Whether a served namespace still waits for an executor's listeners.
    pub fn opening(&self) -> bool {
        self.entries.values().any(|e| e.opening.is_some())
    }

    /// The cookies of every namespace found, whatever its state.
    pub fn cookies(&self) -> Vec<NetnsCookie> {
        self.entries.values().filter_map(|e| e.cookie).collect()
    }

    /// Whether a namespace waits for its address, or was not yet one a
    /// moment ago (a file about to be mounted over): look again soon.
    pub fn waiting(&self) -> bool {
        self.entries.values().any(|e| {
            e.state == State::WaitingForAddress
                || (matches!(e.state, State::Broken(_)) && e.seen.elapsed() < std::time::Duration::from_secs(2))
        })
    }

    /// Where the namespace whose file has inode `ino` stands, and whether
    /// its listeners are still opening.
    pub fn state_of(&self, ino: u64) -> Option<(&State, bool)> {
        self.entries.values().find(|e| e.ino == ino).map(|e| (&e.state, e.opening.is_some()))
    }

    /// How many namespaces are in each state, every state named (for
    /// `/metrics`, where a state that empties must read 0, not vanish).
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        State::LABELS
            .iter()
            .map(|label| (*label, self.entries.values().filter(|e| e.state.label() == *label).count() as u64))
            .collect()
    }

    /// Looks at the directory again and re-decides every namespace against
    /// `model` (`None`: no model, every namespace with a certificate is
    /// served); returns what must change.
    pub fn scan(&mut self, certs: &dyn Certificates, model: Option<&Model>) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut present = BTreeMap::new();
        let named = model.into_iter().flat_map(|m| m.named_netns().cloned());
        let listed = self.node.list(&self.dir);
        let mut seen = std::collections::HashSet::new();
        for path in listed.into_iter().chain(named) {
            // Follows symlinks: the inode is the namespace's. One namespace
            // is one entry: a file the model names (the CNI's) that the
            // directory also shows, under another path, is not a second.
            if let Some((dev, ino)) = self.node.identify(&path) {
                if seen.insert((dev, ino)) {
                    present.insert(path, ino);
                }
            }
        }
        for path in stale(&self.entries, &present) {
            if let Some(e) = self.entries.remove(&path) {
                match (&e.state, &e.netns) {
                    (State::Served, Some(ns)) => {
                        info!(netns = %path.display(), "namespace gone: withdrawing");
                        changes.push(Change::Withdraw(ns.clone(), e.cookie));
                    }
                    (State::Passed(_), _) => changes.extend(e.cookie.map(|c| Change::Pass(c, false))),
                    _ => {}
                }
            }
        }
        for (path, ino) in present {
            self.look(path, ino, certs, model, &mut changes);
        }
        changes
    }

    /// Decides the namespace at `path` alone: a sandbox the CNI plugin has
    /// just handed over, while the rest of the directory is as the last
    /// scan left it (the next scan looks at everything again). Under the
    /// path the scan knows it by, if it lists it under another.
    pub fn look_at(&mut self, path: &Path, certs: &dyn Certificates, model: Option<&Model>) -> Vec<Change> {
        let mut changes = Vec::new();
        let Some(id) = self.node.identify(path) else { return changes };
        let same = |p: &Path| self.node.identify(p) == Some(id);
        let listed = path.file_name().map(|n| self.dir.join(n)).filter(|p| same(p));
        let known = self.entries.iter().find(|(p, e)| e.ino == id.1 && same(p)).map(|(p, _)| p.clone());
        let path = known.or(listed).unwrap_or_else(|| path.to_path_buf());
        self.look(path, id.1, certs, model, &mut changes);
        changes
    }

    /// (Re-)decides one namespace, found at `path` with inode `ino`.
    fn look(
        &mut self,
        path: PathBuf,
        ino: u64,
        certs: &dyn Certificates,
        model: Option<&Model>,
        changes: &mut Vec<Change>,
    ) {
        let node = &*self.node;
        let entry = self.entries.entry(path.clone()).or_insert_with(|| open(node, &path, ino));
        let Some(ns) = entry.netns.clone() else { return };
        // Read until served: the CNI may add a dual-stack pod's two
        // addresses one after the other, and the model says how many
        // to wait for.
        if matches!(entry.state, State::WaitingForAddress | State::Unclaimed(_) | State::WaitingForCertificate(_)) {
            match node.addresses(&ns) {
                Ok(a) if !a.is_empty() => {
                    entry.addressed = entry.addressed.or(Some(Instant::now()));
                    entry.addresses = a;
                }
                Ok(_) => {}
                Err(e) => {
                    if !matches!(entry.state, State::Broken(_)) {
                        warn!(netns = %path.display(), error = %e, "cannot read the namespace's addresses");
                    }
                    entry.state = State::Broken(format!("reading its addresses: {e}"));
                    return;
                }
            }
        }
        let Decision { state: next, skip_outbound: skip, client_address } =
            decide(&entry.addresses, model, |a| certs.holds(a));
        let (Some(cookie), before) = (entry.cookie, entry.state.clone()) else { return };
        if next == before {
            if next == State::Served && skip != entry.skip_outbound {
                // While opening, the ports go out with [`Opened`].
                if entry.opening.is_none() {
                    changes.push(Change::Ports(ns.id(), cookie, skip.clone()));
                }
                entry.skip_outbound = skip;
            }
            return;
        }
        let name = path.display();
        match &before {
            State::Served => {
                info!(netns = %name, now = next.label(), "namespace no longer meshed: withdrawing");
                entry.opening = None;
                changes.push(Change::Withdraw(ns.clone(), Some(cookie)));
            }
            State::Passed(_) => changes.push(Change::Pass(cookie, false)),
            _ => {}
        }
        match &next {
            State::WaitingForCertificate(ip) => match certs.dir() {
                Some(certs) => warn!(netns = %name, %ip, certs = %certs.display(),
                                     "pod address has no certificate: not serving it until {ip}.crt appears"),
                None => info!(netns = %name, %ip, "waiting for the node CA to mint the pod's certificate"),
            },
            State::Unclaimed(ip) => {
                info!(netns = %name, %ip, "no local workload holds this address yet: its connects to meshed destinations are refused until one does")
            }
            State::Conflict(why) => warn!(netns = %name, why, "address conflict: not serving it"),
            State::Passed(why) => {
                info!(netns = %name, addresses = ?entry.addresses, why, "outside the mesh: never captured");
                changes.push(Change::Pass(cookie, true));
            }
            State::Served => {
                info!(netns = %name, addresses = ?entry.addresses, "enrolling namespace");
                let since = entry.addressed.unwrap_or_else(Instant::now);
                entry.opening = Some(Opening { listening: BTreeSet::new(), since, client_address });
                changes.push(Change::Enroll { ns, addresses: entry.addresses.clone() });
            }
            State::WaitingForAddress | State::Broken(_) => {}
        }
        entry.state = next;
        entry.skip_outbound = skip;
    }
}

fn open(node: &dyn Node, path: &Path, ino: u64) -> Entry {
    let (netns, cookie, state) = match node.open(path) {
        Ok((ns, cookie)) => (Some(Arc::new(ns)), Some(cookie), State::WaitingForAddress),
        Err(e) => {
            // Often a file the runtime has created but not mounted the
            // namespace onto yet: looked at again shortly (a new inode then).
            info!(netns = %path.display(), error = %e, "not a namespace (yet); ignoring it until it changes");
            (None, None, State::Broken(e.to_string()))
        }
    };
    Entry {
        ino,
        netns,
        cookie,
        addresses: Vec::new(),
        seen: Instant::now(),
        addressed: None,
        state,
        skip_outbound: Vec::new(),
        opening: None,
    }
}

/// Entries whose file is gone, or now names another namespace (another
/// inode) under the same name.
fn stale(entries: &BTreeMap<PathBuf, Entry>, present: &BTreeMap<PathBuf, u64>) -> Vec<PathBuf> {
    entries.iter().filter(|(p, e)| present.get(*p) != Some(&e.ino)).map(|(p, _)| p.clone()).collect()
}

mod decide;
mod host;

use decide::{decide, Decision};
pub use host::{watch_dir, Certificates, Host, Node};

#[cfg(test)]
mod lifecycle;
#[cfg(test)]
mod tests;
