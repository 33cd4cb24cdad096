//! Unit tests of [`super`].
use super::*;
use crate::cluster::model::Mode;

/// A registry holding one served namespace (any file stands for it:
/// its inode is its id) whose listeners are opening.
fn opening_one(file: &Path) -> (Registry, NetnsId) {
    let ns = Arc::new(Netns::open(file).expect("a file"));
    let id = ns.id();
    let entry = Entry {
        ino: id.0,
        netns: Some(ns),
        cookie: Some(NetnsCookie(7)),
        addresses: vec![ip("10.0.0.1")],
        seen: Instant::now(),
        addressed: Some(Instant::now()),
        state: State::Served,
        skip_outbound: vec![5432],
        opening: Some(Opening { listening: BTreeSet::new(), since: Instant::now(), client_address: true }),
    };
    let mut registry = Registry::new(Path::new("/nonexistent"));
    registry.entries.insert(file.to_path_buf(), entry);
    (registry, id)
}

#[test]
fn a_namespace_opens_when_every_executor_listens_and_says_so_once() {
    let file = std::env::current_exe().expect("this test's binary");
    let (mut registry, id) = opening_one(&file);
    assert!(registry.opening());
    assert_eq!(registry.state_of(id.0).map(|(s, o)| (s.clone(), o)), Some((State::Served, true)));
    // Three executors; one says so twice.
    assert!(registry.listening(id, 0, 3).is_none());
    assert!(registry.listening(id, 0, 3).is_none(), "the same executor twice is not two");
    assert!(registry.listening(id, 2, 3).is_none());
    let open = registry.listening(id, 1, 3).expect("open once all three listen");
    assert_eq!((open.cookie, open.skip_outbound.as_slice(), open.client_address), (NetnsCookie(7), &[5432][..], true));
    assert_eq!(open.addresses, [ip("10.0.0.1")]);
    assert!(!registry.opening());
    assert_eq!(registry.state_of(id.0).map(|(s, o)| (s.clone(), o)), Some((State::Served, false)));
    // Late or repeated news changes nothing.
    assert!(registry.listening(id, 1, 3).is_none());
}

#[test]
fn news_of_a_namespace_not_opening_is_ignored() {
    let file = std::env::current_exe().expect("this test's binary");
    let (mut registry, id) = opening_one(&file);
    assert!(registry.listening(NetnsId(id.0 + 1), 0, 1).is_none(), "another namespace");
    // Withdrawn while opening: no longer opening, and never told open.
    registry.entries.values_mut().for_each(|e| {
        e.state = State::WaitingForCertificate(ip("10.0.0.1"));
        e.opening = None;
    });
    assert!(registry.listening(id, 0, 1).is_none());
    assert!(!registry.opening());
}

#[test]
fn every_state_is_listed_once_for_metrics() {
    let states = [
        State::WaitingForAddress,
        State::Unclaimed(ip("10.0.0.1")),
        State::Conflict("a, b".into()),
        State::Passed("namespace_not_opted_in"),
        State::WaitingForCertificate(ip("10.0.0.1")),
        State::Served,
        State::Broken("gone".into()),
    ];
    let labels: std::collections::BTreeSet<_> = states.iter().map(State::label).collect();
    assert_eq!(labels.len(), State::LABELS.len(), "a state without a label of its own, or one listed twice");
    assert!(labels.iter().all(|l| State::LABELS.contains(l)), "{labels:?} against {:?}", State::LABELS);
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn without_a_model_a_pod_moves_from_no_address_to_no_certificate_to_served() {
    let certs = [ip("10.0.0.1")];
    let has = |a: IpAddr| certs.contains(&a);
    // Looks as the CNI and the certificate issuer catch up.
    assert_eq!(decide(&[], None, has).state, State::WaitingForAddress);
    assert_eq!(decide(&[ip("10.0.0.2")], None, has).state, State::WaitingForCertificate(ip("10.0.0.2")));
    assert_eq!(decide(&[ip("10.0.0.1")], None, has).state, State::Served);
    // Every address needs its certificate (dual-homed pods).
    assert_eq!(
        decide(&[ip("10.0.0.1"), ip("10.0.0.3")], None, has).state,
        State::WaitingForCertificate(ip("10.0.0.3"))
    );
}

#[test]
fn with_a_model_only_meshed_local_workloads_are_served() {
    use crate::cluster::model::{Outside, Workload};
    let w = |name: &str, addr: &str, local, mode| Workload {
        namespace: "ns".into(),
        name: name.into(),
        service_account: "sa".into(),
        addresses: vec![ip(addr)],
        local,
        netns: None,
        client_address: true,
        mode,
        labels: Default::default(),
        strict: false,
    };
    let meshed = || Mode::Meshed { skip_outbound: vec![5432], skip_inbound: vec![] };
    let model = Model::new(vec![
        w("web", "10.0.0.1", true, meshed()),
        w("agent", "10.0.0.2", true, Mode::Outside(Outside::NotOptedIn)),
        w("far", "10.0.0.3", false, meshed()),
    ]);
    let all = |_| true;
    let served = decide(&[ip("10.0.0.1")], Some(&model), all);
    assert_eq!(served, Decision { state: State::Served, skip_outbound: vec![5432], client_address: true });
    // The workload's own choice of client address comes with it.
    let mut direct = w("web", "10.0.0.1", true, meshed());
    direct.client_address = false;
    let served = decide(&[ip("10.0.0.1")], Some(&Model::new(vec![direct])), all);
    assert_eq!((served.state, served.client_address), (State::Served, false));
    assert!(decide(&[ip("10.0.0.1")], None, all).client_address, "without a model: on");
    assert_eq!(decide(&[ip("10.0.0.1")], Some(&model), |_| false).state, State::WaitingForCertificate(ip("10.0.0.1")));
    assert_eq!(decide(&[ip("10.0.0.2")], Some(&model), all).state, State::Passed("namespace_not_opted_in"));
    // Another node's pod, or one the API has not shown yet: unclaimed.
    assert_eq!(decide(&[ip("10.0.0.3")], Some(&model), all).state, State::Unclaimed(ip("10.0.0.3")));
    assert_eq!(decide(&[ip("10.0.0.9")], Some(&model), all).state, State::Unclaimed(ip("10.0.0.9")));
    assert_eq!(State::Passed("x").label(), "passed");
}

#[test]
fn a_dual_stack_pod_waits_for_every_address_its_workload_has() {
    use crate::cluster::model::Workload;
    let web = Workload {
        namespace: "ns".into(),
        name: "web".into(),
        service_account: "sa".into(),
        addresses: vec![ip("10.0.0.1"), ip("fd00::1")],
        local: true,
        netns: None,
        client_address: true,
        mode: Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![] },
        labels: Default::default(),
        strict: false,
    };
    let model = Model::new(vec![web]);
    let all = |_| true;
    // The CNI has added the IPv4 address only (so far).
    assert_eq!(decide(&[ip("10.0.0.1")], Some(&model), all).state, State::WaitingForAddress);
    assert_eq!(decide(&[ip("10.0.0.1"), ip("fd00::1")], Some(&model), all).state, State::Served);
    // Outside the mesh, it is passed at once: its connects must not be
    // refused while the second address comes.
    let mut outside = model.workloads().next().expect("web").clone();
    outside.mode = Mode::Outside(crate::cluster::model::Outside::NotOptedIn);
    let model_outside = Model::new(vec![outside]);
    assert_eq!(decide(&[ip("10.0.0.1")], Some(&model_outside), all).state, State::Passed("namespace_not_opted_in"));
    // Both need a certificate.
    let v4_only = |a: IpAddr| a.is_ipv4();
    assert_eq!(
        decide(&[ip("10.0.0.1"), ip("fd00::1")], Some(&model), v4_only).state,
        State::WaitingForCertificate(ip("fd00::1"))
    );
}

#[test]
fn a_file_that_is_gone_or_names_a_new_namespace_is_stale() {
    let entry = |ino| Entry {
        ino,
        netns: None,
        cookie: None,
        addresses: vec![],
        seen: Instant::now(),
        addressed: None,
        state: State::Served,
        skip_outbound: vec![],
        opening: None,
    };
    let entries: BTreeMap<PathBuf, Entry> =
        [("/n/a", 1), ("/n/b", 2), ("/n/c", 3)].into_iter().map(|(p, i)| (PathBuf::from(p), entry(i))).collect();
    // a unchanged, b re-created (new inode: a new pod under the same
    // name), c deleted, d new (not stale: it is enrolled by the scan).
    let present: BTreeMap<PathBuf, u64> =
        [("/n/a", 1), ("/n/b", 20), ("/n/d", 4)].into_iter().map(|(p, i)| (PathBuf::from(p), i)).collect();
    assert_eq!(stale(&entries, &present), [PathBuf::from("/n/b"), PathBuf::from("/n/c")]);
}
