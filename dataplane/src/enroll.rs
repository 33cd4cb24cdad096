//! Enrolment of pod network namespaces from a watched directory (node mode).
//!
//! The control thread scans `--netns-dir` (e.g. `/var/run/netns`, where CNI
//! plugins and `ip netns` put namespace files) four times a second. A file
//! that names a new namespace (by nsfs inode, so a pod re-created under the
//! same name or with the same IP is a new namespace) goes through:
//!
//! - waiting for an address: the CNI adds the pod's IPv4 address after it
//!   creates the namespace; re-checked on every scan;
//! - waiting for a certificate: an address with no `<ip>.crt` in `--certs` is
//!   reported once and counted; re-checked on every scan, so the pod is served
//!   once its certificate appears;
//! - served: every executor opens its listeners in it.
//!
//! A file that disappears (or now names another namespace) is withdrawn: the
//! executors close its listeners, the eBPF entries of its clients are
//! deleted, and our handle on the namespace is dropped.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use tracing::{info, warn};

use crate::{
    identity::Identity,
    netns::{Netns, NetnsId},
};
use dataplane_common::maps::NetnsCookie;

/// Where an enrolled namespace stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No IPv4 address yet.
    WaitingForAddress,
    /// An address without a certificate.
    WaitingForCertificate(Ipv4Addr),
    /// Listeners open on every executor.
    Served,
    /// Not a namespace we can enter (reported once, ignored until it changes).
    Broken(String),
}

impl State {
    /// A label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            State::WaitingForAddress => "waiting_for_address",
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
    state: State,
}

/// A change for the executors and the eBPF maps.
#[derive(Debug)]
pub enum Change {
    /// Open listeners in this namespace.
    Enroll(Arc<Netns>),
    /// Close the listeners of this namespace and forget its clients.
    Withdraw(NetnsId, Option<NetnsCookie>),
}

/// The namespaces found in one directory.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    entries: BTreeMap<PathBuf, Entry>,
}

impl Registry {
    /// Watches `dir` (nothing is enrolled until the first [`Registry::scan`]).
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), entries: BTreeMap::new() }
    }

    /// The served namespaces.
    pub fn served(&self) -> impl Iterator<Item = NetnsId> + '_ {
        self.entries.values().filter(|e| e.state == State::Served).filter_map(|e| Some(e.netns.as_ref()?.id()))
    }

    /// How many namespaces are in each state.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for e in self.entries.values() {
            *m.entry(e.state.label()).or_default() += 1;
        }
        m
    }

    /// Looks at the directory again; returns what must change.
    pub fn scan(&mut self, identity: &Identity) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut present = BTreeMap::new();
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let path = e.path();
                // Follows symlinks: the inode is the namespace's.
                if let Ok(m) = fs::metadata(&path) {
                    present.insert(path, m.ino());
                }
            }
        }
        // Gone, or replaced by another namespace under the same name.
        let stale: Vec<PathBuf> =
            self.entries.iter().filter(|(p, e)| present.get(*p) != Some(&e.ino)).map(|(p, _)| p.clone()).collect();
        for path in stale {
            if let Some(e) = self.entries.remove(&path) {
                if let (State::Served, Some(ns)) = (&e.state, &e.netns) {
                    info!(netns = %path.display(), "namespace gone: withdrawing");
                    changes.push(Change::Withdraw(ns.id(), e.cookie));
                }
            }
        }
        for (path, ino) in present {
            let entry = self.entries.entry(path.clone()).or_insert_with(|| {
                let (netns, state) = match Netns::open(&path) {
                    Ok(ns) => (Some(Arc::new(ns)), State::WaitingForAddress),
                    Err(e) => (None, State::Broken(e.to_string())),
                };
                if let State::Broken(why) = &state {
                    warn!(netns = %path.display(), error = %why, "not a namespace we can serve; ignoring it");
                }
                Entry { ino, netns, cookie: None, state }
            });
            let Some(ns) = entry.netns.clone() else { continue };
            if entry.state == State::Served {
                continue;
            }
            let next = match ns.ipv4_addresses() {
                Err(e) => State::Broken(format!("reading its addresses: {e}")),
                Ok(addrs) => match addrs.iter().find(|a| identity.server_config(IpAddr::V4(**a)).is_err()) {
                    _ if addrs.is_empty() => State::WaitingForAddress,
                    Some(missing) => State::WaitingForCertificate(*missing),
                    None => State::Served,
                },
            };
            if next == entry.state {
                continue;
            }
            match &next {
                State::WaitingForCertificate(ip) => {
                    warn!(netns = %path.display(), %ip, certs = %identity.dir().display(),
                          "pod address has no certificate: not serving it until {ip}.crt appears")
                }
                State::Broken(why) => warn!(netns = %path.display(), error = %why, "cannot serve this namespace"),
                State::Served => {
                    entry.cookie = ns.cookie().ok();
                    info!(netns = %path.display(), addresses = ?ns.ipv4_addresses().unwrap_or_default(), "enrolling namespace");
                    changes.push(Change::Enroll(ns));
                }
                State::WaitingForAddress => {}
            }
            entry.state = next;
        }
        changes
    }
}
