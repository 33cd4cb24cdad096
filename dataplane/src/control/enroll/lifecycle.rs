//! A pod namespace's whole enrolment, step by step, over a fake node: the
//! directory, the namespaces and their addresses are the test's, so no root
//! is needed and every step is asserted.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::*;
use crate::cluster::model::{Mode, Model, Outside, Workload};

/// The node as the registry reads it. Each namespace is stood for by a
/// real temporary file (a [`Netns`] is an open file; its inode is the id).
#[derive(Debug, Clone, Default)]
struct FakeNode(Arc<Mutex<World>>);

#[derive(Debug, Default)]
struct World {
    /// By the path the directory lists: (the fake inode, addresses, the
    /// file standing for the namespace).
    files: BTreeMap<PathBuf, (u64, Vec<IpAddr>, PathBuf)>,
}

impl Drop for World {
    fn drop(&mut self) {
        for (_, _, real) in self.files.values() {
            let _ = std::fs::remove_file(real);
        }
    }
}

const DIR: &str = "/fake/netns";

impl FakeNode {
    /// A namespace file `name` in the directory, with no address yet.
    fn add(&self, name: &str, ino: u64) -> PathBuf {
        let real = std::env::temp_dir().join(format!("dp-enroll-{}-{ino}", std::process::id()));
        std::fs::write(&real, b"").expect("a file to stand for the namespace");
        let path = Path::new(DIR).join(name);
        self.0.lock().expect("world").files.insert(path.clone(), (ino, vec![], real));
        path
    }

    fn address(&self, path: &Path, addresses: &[&str]) {
        let mut w = self.0.lock().expect("world");
        w.files.get_mut(path).expect("a file").1 = addresses.iter().map(|a| a.parse().expect("ip")).collect();
    }

    fn remove(&self, path: &Path) {
        if let Some((_, _, real)) = self.0.lock().expect("world").files.remove(path) {
            let _ = std::fs::remove_file(real);
        }
    }
}

impl Node for FakeNode {
    fn list(&self, dir: &Path) -> Vec<PathBuf> {
        self.0.lock().expect("world").files.keys().filter(|p| p.parent() == Some(dir)).cloned().collect()
    }

    fn identify(&self, path: &Path) -> Option<(u64, u64)> {
        self.0.lock().expect("world").files.get(path).map(|(ino, ..)| (1, *ino))
    }

    fn open(&self, path: &Path) -> std::io::Result<(Netns, NetnsCookie)> {
        let w = self.0.lock().expect("world");
        let (ino, _, real) = w.files.get(path).ok_or(std::io::ErrorKind::NotFound)?;
        Ok((Netns::open(real)?, NetnsCookie(*ino)))
    }

    fn addresses(&self, ns: &Netns) -> std::io::Result<Vec<IpAddr>> {
        let w = self.0.lock().expect("world");
        let found = w.files.values().find(|(_, _, real)| real == ns.path());
        Ok(found.map(|(_, a, _)| a.clone()).unwrap_or_default())
    }
}

/// Certificates held for these addresses.
struct Held(Vec<IpAddr>);

impl Certificates for Held {
    fn holds(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }

    fn dir(&self) -> Option<&Path> {
        None
    }
}

fn all() -> Held {
    Held(vec!["10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip")])
}

/// This node's pod `web` at 10.0.0.1 (and `db` at 10.0.0.2), in `mode`.
fn model(mode: Mode) -> Model {
    let w = |name: &str, addr: &str, mode| Workload {
        namespace: "shop".into(),
        name: name.into(),
        service_account: "sa".into(),
        addresses: vec![addr.parse().expect("ip")],
        local: true,
        netns: None,
        client_address: true,
        mode,
        labels: Default::default(),
        strict: false,
    };
    Model::new(vec![w("web", "10.0.0.1", mode.clone()), w("db", "10.0.0.2", mode)])
}

fn meshed(skip: &[u16]) -> Mode {
    Mode::Meshed { skip_outbound: skip.to_vec(), skip_inbound: vec![] }
}

/// The changes, by kind, for assertions.
fn kinds(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match c {
            Change::Enroll { addresses, .. } => format!("enroll {addresses:?}"),
            Change::Ports(_, cookie, skip) => format!("ports {} {skip:?}", cookie.0),
            Change::Withdraw(_, cookie) => format!("withdraw {:?}", cookie.map(|c| c.0)),
            Change::Pass(cookie, on) => format!("pass {} {on}", cookie.0),
        })
        .collect()
}

fn state(r: &Registry, ino: u64) -> Option<(State, bool)> {
    r.state_of(ino).map(|(s, opening)| (s.clone(), opening))
}

#[test]
fn a_pod_is_seen_addressed_opened_served_passed_and_withdrawn() {
    let node = FakeNode::default();
    let mut r = Registry::on(Path::new(DIR), Box::new(node.clone()));
    let web = node.add("web", 11);
    let m = model(meshed(&[5432]));
    // Seen before the CNI gave it an address: waits, nothing changes.
    assert!(kinds(&r.scan(&all(), Some(&m))).is_empty());
    assert_eq!(state(&r, 11), Some((State::WaitingForAddress, false)));
    assert!(r.waiting());
    // Addressed: listeners open on every executor.
    node.address(&web, &["10.0.0.1"]);
    assert_eq!(kinds(&r.scan(&all(), Some(&m))), ["enroll [10.0.0.1]"]);
    assert_eq!(state(&r, 11), Some((State::Served, true)));
    assert!(kinds(&r.scan(&all(), Some(&m))).is_empty(), "a second look changes nothing");
    // Open once both executors listen: what connect4 is told.
    let id = r.entries[&web].netns.as_ref().expect("opened").id();
    assert!(r.listening(id, 0, 2).is_none());
    let open = r.listening(id, 1, 2).expect("open");
    assert_eq!((open.cookie, open.skip_outbound), (NetnsCookie(11), vec![5432]));
    assert_eq!(state(&r, 11), Some((State::Served, false)));
    // Its namespace's label flips off: withdrawn, then passed.
    let outside = model(Mode::Outside(Outside::NotOptedIn));
    assert_eq!(kinds(&r.scan(&all(), Some(&outside))), ["withdraw Some(11)", "pass 11 true"]);
    assert_eq!(state(&r, 11), Some((State::Passed("namespace_not_opted_in"), false)));
    // And on again: no longer passed, enrolled anew.
    assert_eq!(kinds(&r.scan(&all(), Some(&m))), ["pass 11 false", "enroll [10.0.0.1]"]);
    assert!(r.opening());
    // Its file goes (the pod is deleted): withdrawn, forgotten.
    node.remove(&web);
    assert_eq!(kinds(&r.scan(&all(), Some(&m))), ["withdraw Some(11)"]);
    assert_eq!(state(&r, 11), None);
    assert!(!r.opening(), "a withdrawn namespace is no longer opening");
}

#[test]
fn a_pod_waits_for_its_certificate_and_for_the_api_to_claim_its_address() {
    let node = FakeNode::default();
    let mut r = Registry::on(Path::new(DIR), Box::new(node.clone()));
    let web = node.add("web", 21);
    node.address(&web, &["10.0.0.1"]);
    let m = model(meshed(&[]));
    assert!(kinds(&r.scan(&Held(vec![]), Some(&m))).is_empty());
    assert_eq!(state(&r, 21), Some((State::WaitingForCertificate("10.0.0.1".parse().expect("ip")), false)));
    assert_eq!(kinds(&r.scan(&all(), Some(&m))), ["enroll [10.0.0.1]"]);
    // An address no local workload holds (the API has not shown the pod).
    let stranger = node.add("stranger", 22);
    node.address(&stranger, &["10.0.0.9"]);
    assert!(kinds(&r.scan(&all(), Some(&m))).is_empty());
    assert_eq!(state(&r, 22), Some((State::Unclaimed("10.0.0.9".parse().expect("ip")), false)));
}

#[test]
fn ports_that_change_while_opening_go_out_with_the_opening_then_as_changes() {
    let node = FakeNode::default();
    let mut r = Registry::on(Path::new(DIR), Box::new(node.clone()));
    let web = node.add("web", 31);
    node.address(&web, &["10.0.0.1"]);
    assert_eq!(kinds(&r.scan(&all(), Some(&model(meshed(&[1]))))), ["enroll [10.0.0.1]"]);
    // Changed before every executor listens: nothing to tell connect4 yet.
    assert!(kinds(&r.scan(&all(), Some(&model(meshed(&[2]))))).is_empty());
    let id = r.entries[&web].netns.as_ref().expect("opened").id();
    assert_eq!(r.listening(id, 0, 1).expect("open").skip_outbound, [2]);
    // Once open, a change is told at once.
    assert_eq!(kinds(&r.scan(&all(), Some(&model(meshed(&[3]))))), ["ports 31 [3]"]);
}

#[test]
fn a_sandbox_handed_over_is_decided_alone() {
    let node = FakeNode::default();
    let mut r = Registry::on(Path::new(DIR), Box::new(node.clone()));
    let (web, db) = (node.add("web", 41), node.add("db", 42));
    node.address(&web, &["10.0.0.1"]);
    node.address(&db, &["10.0.0.2"]);
    let m = model(meshed(&[]));
    // The CNI plugin hands over db: web, also ready, waits for the next scan.
    assert_eq!(kinds(&r.look_at(&db, &all(), Some(&m))), ["enroll [10.0.0.2]"]);
    assert_eq!(state(&r, 41), None);
    assert_eq!(kinds(&r.scan(&all(), Some(&m))), ["enroll [10.0.0.1]"]);
}

#[test]
fn a_pod_withdrawn_while_opening_is_never_told_open() {
    let node = FakeNode::default();
    let mut r = Registry::on(Path::new(DIR), Box::new(node.clone()));
    let web = node.add("web", 51);
    node.address(&web, &["10.0.0.1"]);
    assert_eq!(kinds(&r.scan(&all(), Some(&model(meshed(&[]))))), ["enroll [10.0.0.1]"]);
    let id = r.entries[&web].netns.as_ref().expect("opened").id();
    assert!(r.listening(id, 0, 2).is_none());
    // Opted out before the second executor reported.
    let outside = model(Mode::Outside(Outside::NotOptedIn));
    assert_eq!(kinds(&r.scan(&all(), Some(&outside))), ["withdraw Some(51)", "pass 51 true"]);
    assert!(r.listening(id, 1, 2).is_none(), "connect4 must not be told a withdrawn namespace is served");
    assert!(!r.opening());
}
