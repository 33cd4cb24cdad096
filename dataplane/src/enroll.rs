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
        for path in stale(&self.entries, &present) {
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
            let next = next_state(ns.ipv4_addresses(), |a| identity.holds(IpAddr::V4(a)));
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

/// Entries whose file is gone, or now names another namespace (another
/// inode) under the same name.
fn stale(entries: &BTreeMap<PathBuf, Entry>, present: &BTreeMap<PathBuf, u64>) -> Vec<PathBuf> {
    entries.iter().filter(|(p, e)| present.get(*p) != Some(&e.ino)).map(|(p, _)| p.clone()).collect()
}

/// Where a namespace not yet served stands, from its addresses (as read
/// inside it) and whether a certificate exists for an address.
fn next_state(addresses: std::io::Result<Vec<Ipv4Addr>>, has_cert: impl Fn(Ipv4Addr) -> bool) -> State {
    match addresses {
        Err(e) => State::Broken(format!("reading its addresses: {e}")),
        Ok(addrs) if addrs.is_empty() => State::WaitingForAddress,
        Ok(addrs) => match addrs.into_iter().find(|a| !has_cert(*a)) {
            Some(missing) => State::WaitingForCertificate(missing),
            None => State::Served,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_pod_moves_from_no_address_to_no_certificate_to_served() {
        let certs = [ip("10.0.0.1")];
        let has = |a: Ipv4Addr| certs.contains(&a);
        // Scans as the CNI and the certificate issuer catch up.
        assert_eq!(next_state(Ok(vec![]), has), State::WaitingForAddress);
        assert_eq!(next_state(Ok(vec![ip("10.0.0.2")]), has), State::WaitingForCertificate(ip("10.0.0.2")));
        assert_eq!(next_state(Ok(vec![ip("10.0.0.1")]), has), State::Served);
        // Every address needs its certificate (dual-homed pods).
        let two = vec![ip("10.0.0.1"), ip("10.0.0.3")];
        assert_eq!(next_state(Ok(two), has), State::WaitingForCertificate(ip("10.0.0.3")));
        let broken = next_state(Err(std::io::ErrorKind::PermissionDenied.into()), has);
        assert!(matches!(broken, State::Broken(ref why) if why.contains("addresses")), "{broken:?}");
        assert_eq!(broken.label(), "unusable");
    }

    #[test]
    fn a_file_that_is_gone_or_names_a_new_namespace_is_stale() {
        let entry = |ino| Entry { ino, netns: None, cookie: None, state: State::Served };
        let entries: BTreeMap<PathBuf, Entry> =
            [("/n/a", 1), ("/n/b", 2), ("/n/c", 3)].into_iter().map(|(p, i)| (PathBuf::from(p), entry(i))).collect();
        // a unchanged, b re-created (new inode: a new pod under the same
        // name), c deleted, d new (not stale: it is enrolled by the scan).
        let present: BTreeMap<PathBuf, u64> =
            [("/n/a", 1), ("/n/b", 20), ("/n/d", 4)].into_iter().map(|(p, i)| (PathBuf::from(p), i)).collect();
        assert_eq!(stale(&entries, &present), [PathBuf::from("/n/b"), PathBuf::from("/n/c")]);
    }
}
