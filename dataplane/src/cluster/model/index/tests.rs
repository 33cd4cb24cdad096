//! The model's unit tests: what each change touches, and what it leaves.
use super::*;
use crate::{
    cluster::model::Outside,
    cluster::services::{Endpoint, Hint, Readiness, ServicePort, Slice},
};

fn workload(name: &str, addr: &str, local: bool, mode: Mode) -> Workload {
    Workload {
        namespace: "ns".into(),
        name: name.into(),
        service_account: "default".into(),
        addresses: vec![addr.parse().expect("addr")],
        local,
        netns: None,
        client_address: true,
        mode,
        labels: BTreeMap::new(),
        strict: false,
    }
}

fn meshed() -> Mode {
    Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![9090] }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn destinations_are_every_meshed_address_and_local_lookups_see_conflicts() {
    let m = Model::new(vec![
        workload("a", "10.0.0.1", true, meshed()),
        workload("b", "10.0.1.1", false, meshed()),
        workload("c", "10.0.0.2", true, Mode::Outside(Outside::HostNetwork)),
        workload("d", "10.0.0.3", true, meshed()),
        workload("e", "10.0.0.3", true, meshed()),
    ]);
    let dsts = m.meshed_destinations();
    assert_eq!(dsts.keys().map(ToString::to_string).collect::<Vec<_>>(), ["10.0.0.1", "10.0.0.3", "10.0.1.1"]);
    assert_eq!(dsts[&ip("10.0.0.1")], vec![9090]);
    let name = |addr: &str| m.local_with(ip(addr)).map(|w| w.map(|w| w.name.clone()));
    assert_eq!(name("10.0.0.1"), Ok(Some("a".into())));
    assert_eq!(name("10.0.1.1"), Ok(None), "not local");
    assert!(name("10.0.0.3").expect_err("conflict").contains("ns/d and ns/e"));
    assert_eq!(m.local_counts(), [("host_network", 1), ("meshed", 3)].into_iter().collect());
}

fn web(endpoints: &[&str]) -> Service {
    Service {
        namespace: "ns".into(),
        name: "web".into(),
        cluster_ips: vec![ip("10.96.0.10")],
        ports: vec![ServicePort { name: "http".into(), port: 80 }],
        client_ip_affinity: None,
        node_local: false,
        zone_hints: false,
        slices: vec![Slice {
            ports: vec![("http".into(), 8080)],
            endpoints: endpoints
                .iter()
                .map(|e| Endpoint { addr: ip(e), state: Readiness::Ready, local: false, hint: Hint::None })
                .collect(),
        }],
    }
}

fn backends(m: &Model) -> Vec<String> {
    let fe = m.service_table().get("10.96.0.10:80".parse().expect("vip")).expect("web");
    fe.backends.iter().map(|b| format!("{} {}", b.addr, b.meshed)).collect()
}

#[test]
fn one_pods_change_touches_only_its_addresses_and_the_services_it_serves() {
    let mut m = Model::with_services(
        vec![workload("a", "10.0.0.1", true, meshed()), workload("b", "10.0.1.1", false, meshed())],
        vec![web(&["10.0.1.1", "10.0.1.2"])],
    );
    assert_eq!(backends(&m), ["10.0.1.1:8080 true", "10.0.1.2:8080 false"]);
    let table = m.service_table().clone();

    // A remote pod comes at an address no Service names: one entry, and
    // the table the executors hold is still the one they have.
    let c = workload("c", "10.0.1.9", false, meshed());
    let fx = m.apply([Change::Workload(c.object(), Some(Arc::new(c.clone())))]);
    let identities = [(ip("10.0.1.9"), Some(Arc::from("ns/ns/sa/default")))].into();
    assert_eq!(fx, Effects { meshed: [(ip("10.0.1.9"), Some(vec![9090]))].into(), identities, ..Effects::default() });
    assert!(Arc::ptr_eq(&table, m.service_table()), "the table was not copied");

    // The same object again changes nothing.
    assert!(m.apply([Change::Workload(c.object(), Some(Arc::new(c)))]).is_empty());

    // An endpoint's pod becomes meshed: its Service's entry follows.
    let d = workload("d", "10.0.1.2", false, meshed());
    let fx = m.apply([Change::Workload(d.object(), Some(Arc::new(d)))]);
    assert!(fx.services && !fx.local);
    assert_eq!(backends(&m), ["10.0.1.1:8080 true", "10.0.1.2:8080 true"]);
    assert_eq!(table.len(), 1, "the executors' copy is untouched");

    // A local pod leaves the mesh: its address goes, and enrolment is
    // told to look.
    let mut a = workload("a", "10.0.0.1", true, Mode::Outside(Outside::OptedOut));
    let fx = m.apply([Change::Workload(a.object(), Some(Arc::new(a.clone())))]);
    let identities = [(ip("10.0.0.1"), None)].into();
    assert_eq!(fx, Effects { meshed: [(ip("10.0.0.1"), None)].into(), local: true, identities, ..Effects::default() });
    // ...and moves to another address, then goes.
    a.addresses = vec![ip("10.0.0.7")];
    assert!(m.apply([Change::Workload(a.object(), Some(Arc::new(a.clone())))]).local);
    assert_eq!(m.local_with(ip("10.0.0.7")).expect("one").map(|w| &*w.name), Some("a"));
    assert_eq!(m.local_with(ip("10.0.0.1")), Ok(None), "the old address is forgotten");
    m.apply([Change::Workload(a.object(), None)]);
    assert_eq!(m.local().count(), 0);

    // The Service goes: its entries with it.
    let fx = m.apply([Change::Service(ObjectRef::new("ns", "web"), None)]);
    assert!(fx.services && m.service_table().is_empty());
    assert_eq!(fx.vips, [("10.96.0.10:80".parse().expect("vip"), None)].into(), "connect4 forgets it");
}

#[test]
fn every_meshed_address_has_the_identity_of_its_pod() {
    let mut m = Model::new(vec![workload("a", "10.0.1.1", false, meshed())]);
    let id = |m: &Model| m.identities().find(|(a, _)| *a == ip("10.0.1.1")).map(|(_, id)| id.to_string());
    assert_eq!(id(&m).as_deref(), Some("ns/ns/sa/default"));
    // Its service account changes (a pod re-created under the same name
    // and address): the executors are told, connect4 is not.
    let mut a = workload("a", "10.0.1.1", false, meshed());
    a.service_account = "web".into();
    let fx = m.apply([Change::Workload(a.object(), Some(Arc::new(a.clone())))]);
    assert_eq!(fx.identities, [(ip("10.0.1.1"), Some(Arc::from("ns/ns/sa/web")))].into());
    assert!(fx.meshed.is_empty());
    // It leaves the mesh: no identity any more (a peer at that address is
    // not a meshed pod).
    a.mode = Mode::Outside(Outside::OptedOut);
    assert_eq!(m.apply([Change::Workload(a.object(), Some(Arc::new(a)))]).identities, [(ip("10.0.1.1"), None)].into());
    assert_eq!(id(&m), None);
}

#[test]
fn connect4_learns_whether_a_service_leads_into_the_mesh() {
    let vip = |meshed| [("10.96.0.10:80".parse().expect("vip"), Some(meshed))].into();
    let mut m = Model::with_services(vec![], vec![web(&["10.0.1.2"])]);
    // Its one endpoint's pod joins the mesh: a namespace not decided yet is
    // refused it from now on...
    let d = workload("d", "10.0.1.2", false, meshed());
    assert_eq!(m.apply([Change::Workload(d.object(), Some(Arc::new(d.clone())))]).vips, vip(true));
    // ...and reaches it as without us once the pod is gone again.
    assert_eq!(m.apply([Change::Workload(d.object(), None)]).vips, vip(false));
}

#[test]
fn a_stale_pod_beside_its_successor_keeps_the_address_meshed_until_both_go() {
    let mut m = Model::new(vec![workload("old", "10.0.1.1", false, meshed())]);
    let new = workload("new", "10.0.1.1", false, Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![] });
    let fx = m.apply([Change::Workload(new.object(), Some(Arc::new(new.clone())))]);
    assert!(fx.meshed.is_empty(), "the last by name (old) still gives the entry, as before: {fx:?}");
    let fx = m.apply([Change::Workload(ObjectRef::new("ns", "old"), None)]);
    assert_eq!(fx.meshed, [(ip("10.0.1.1"), Some(vec![]))].into(), "the successor's ports");
    let fx = m.apply([Change::Workload(new.object(), None)]);
    assert_eq!(fx.meshed, [(ip("10.0.1.1"), None)].into());
    assert!(m.meshed_destinations().is_empty() && m.workloads().next().is_none());
}

#[test]
fn a_whole_reload_applies_only_the_difference() {
    let a = workload("a", "10.0.0.1", true, meshed());
    let b = workload("b", "10.0.1.1", false, meshed());
    let mut m = Model::with_services(vec![a.clone(), b], vec![web(&["10.0.1.1"])]);
    let b2 = workload("b", "10.0.1.2", false, meshed());
    let fx = m.replace(vec![a, b2], vec![web(&["10.0.1.1"])]);
    assert_eq!(fx.meshed, [(ip("10.0.1.1"), None), (ip("10.0.1.2"), Some(vec![9090]))].into());
    assert!(!fx.local, "a is unchanged");
    assert!(fx.services, "web's endpoint is no longer meshed");
    assert_eq!(backends(&m), ["10.0.1.1:8080 false"]);
    assert!(m.replace(vec![], vec![]).local);
    assert!(m.meshed_destinations().is_empty() && m.service_table().is_empty());
}

#[test]
fn a_sandbox_gives_a_local_pod_its_addresses_before_the_api_does() {
    let mut m = Model::default();
    m.apply([Change::Namespace("ns".into(), Some(true)), Change::Namespace("plain".into(), Some(false))]);
    assert_eq!(m.meshed_namespaces().collect::<Vec<_>>(), ["ns"]);
    // The API shows the pod scheduled here, with no address yet.
    let mut a = workload("a", "10.0.0.1", true, meshed());
    a.addresses.clear();
    m.apply([Change::Workload(a.object(), Some(Arc::new(a.clone())))]);
    let sb = Sandbox { container_id: "c1".into(), netns: "/run/netns/cni-a".into(), addresses: vec![ip("10.0.0.1")] };
    let fx = m.apply([Change::Sandbox(a.object(), Some(Box::new(sb.clone())))]);
    assert!(fx.local && fx.meshed.contains_key(&ip("10.0.0.1")), "{fx:?}");
    let w = m.local_with(ip("10.0.0.1")).expect("one").expect("claimed by its sandbox");
    assert_eq!((&*w.name, w.netns.as_deref()), ("a", Some(std::path::Path::new("/run/netns/cni-a"))));
    // The kubelet's status write (same address) and a label change keep
    // the sandbox's namespace file.
    a.addresses = vec![ip("10.0.0.1")];
    m.apply([Change::Workload(a.object(), Some(Arc::new(a.clone())))]);
    assert!(m.workload(&a.object()).is_some_and(|w| w.netns.is_some()));
    // DEL: back to what the API says.
    m.apply([Change::Sandbox(a.object(), None)]);
    assert_eq!(m.workload(&a.object()), Some(&a));

    // A pod the API has not shown yet: outside the mesh if its namespace
    // is not opted in, undecided if it is.
    let plain = ObjectRef::new("plain", "p");
    let fx = m.apply([Change::Sandbox(
        plain.clone(),
        Some(Box::new(Sandbox { addresses: vec![ip("10.0.0.9")], ..sb.clone() })),
    )]);
    assert!(fx.local);
    let w = m.local_with(ip("10.0.0.9")).expect("one").expect("known by its namespace");
    assert_eq!(w.mode, Mode::Outside(Outside::NotOptedIn));
    let early = ObjectRef::new("ns", "early");
    m.apply([Change::Sandbox(early.clone(), Some(Box::new(Sandbox { addresses: vec![ip("10.0.0.8")], ..sb })))]);
    assert!(m.workload(&early).is_none(), "its own labels may opt it out: wait for the API");
    // Its namespace is opted out meanwhile: now it is known.
    let fx = m.apply([Change::Namespace("ns".into(), Some(false))]);
    assert!(fx.namespaces && fx.local);
    assert_eq!(m.workload(&early).map(|w| &w.mode), Some(&Mode::Outside(Outside::NotOptedIn)));
}
