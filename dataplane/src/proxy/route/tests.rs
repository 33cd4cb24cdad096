//! Every decision [`route`] makes, over a fake of what an executor knows.
use std::{cell::RefCell, collections::HashMap};

use super::*;

/// What an executor would know: Services, the client pod's addresses, pods
/// served here (with the fast path on), and which endpoint it would pick.
#[derive(Default)]
struct Fake {
    services: HashMap<SocketAddr, Arc<Frontend>>,
    client_pod: Vec<IpAddr>,
    here: HashMap<IpAddr, &'static str>,
    /// The client address each endpoint choice was made for.
    chosen_for: RefCell<Vec<IpAddr>>,
}

impl Known for Fake {
    type Load = &'static str;
    type Pod = &'static str;

    fn service(&self, vip: SocketAddr) -> Option<Arc<Frontend>> {
        self.services.get(&vip).cloned()
    }

    fn client_pod_address(&self, like: IpAddr) -> Option<IpAddr> {
        self.client_pod.iter().find(|a| a.is_ipv6() == like.is_ipv6()).copied()
    }

    fn choose_endpoint(&self, _vip: SocketAddr, fe: &Frontend, client: IpAddr) -> Option<(Backend, &'static str)> {
        self.chosen_for.borrow_mut().push(client);
        fe.backends.first().map(|b| (*b, "load"))
    }

    fn same_node(&self, dst: IpAddr) -> Option<(IpAddr, &'static str)> {
        let pod = self.here.get(&dst)?;
        Some((self.client_pod_address(dst)?, *pod))
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

const VIP: &str = "10.96.0.10:80";
const CLIENT: &str = "127.0.0.1:40000";

fn with_service(backends: &[(&str, bool)]) -> Fake {
    let fe = Frontend {
        service: "shop/web".into(),
        backends: backends.iter().map(|(a, meshed)| Backend { addr: addr(a), meshed: *meshed }).collect(),
        client_ip_affinity: None,
    };
    Fake { services: HashMap::from([(addr(VIP), Arc::new(fe))]), client_pod: vec![ip("10.0.0.5")], ..Fake::default() }
}

#[test]
fn a_pod_elsewhere_is_tunnelled_to_as_it_was_addressed() {
    let r = route(&Fake::default(), OrigDstAddr(addr("10.0.1.7:8080")), Some(addr(CLIENT)));
    assert_eq!(r.route, Route::Tunnel { to: OrigDstAddr(addr("10.0.1.7:8080")) });
    assert!(r.service.is_none());
}

#[test]
fn a_service_with_a_meshed_endpoint_is_tunnelled_to_the_endpoint() {
    let fake = with_service(&[("10.0.1.7:8080", true)]);
    let r = route(&fake, OrigDstAddr(addr(VIP)), Some(addr(CLIENT)));
    assert_eq!(r.route, Route::Tunnel { to: OrigDstAddr(addr("10.0.1.7:8080")) });
    let via = r.service.expect("through a Service");
    assert_eq!(
        (via.name.as_str(), via.endpoint, via.how),
        ("shop/web", Some(addr("10.0.1.7:8080")), ServiceRoute::Tunnelled)
    );
    assert_eq!(via.load, Some("load"), "the endpoint's load is held for the connection");
}

#[test]
fn a_service_endpoint_outside_the_mesh_is_passed_through() {
    let fake = with_service(&[("10.0.2.9:5432", false)]);
    let r = route(&fake, OrigDstAddr(addr(VIP)), Some(addr(CLIENT)));
    assert_eq!(r.route, Route::Passthrough { to: OrigDstAddr(addr("10.0.2.9:5432")) });
    assert_eq!(r.service.expect("through a Service").how, ServiceRoute::Passthrough);
}

#[test]
fn a_service_without_endpoints_is_refused_and_blamed_upstream() {
    let fake = with_service(&[]);
    let r = route(&fake, OrigDstAddr(addr(VIP)), Some(addr(CLIENT)));
    let Route::Refuse(refused) = r.route else { panic!("not refused: {:?}", r.route) };
    assert_eq!((refused.blame, refused.reason), (Blame::Upstream, Reason::NoEndpoints));
    assert!(refused.why.contains("shop/web") && refused.why.contains(VIP), "{}", refused.why);
    let via = r.service.expect("counted against the Service");
    assert_eq!((via.how, via.endpoint, via.load), (ServiceRoute::NoEndpoint, None, None));
}

#[test]
fn affinity_goes_by_the_client_pods_address_not_loopback() {
    let fake = with_service(&[("10.0.1.7:8080", true)]);
    route(&fake, OrigDstAddr(addr(VIP)), Some(addr(CLIENT)));
    // Without a known pod address (an IPv6 ClusterIP, the pod has only
    // IPv4), the socket's peer, then the unspecified address.
    let mut v6 = with_service(&[("[fd00::7]:8080", true)]);
    let fe = v6.services.remove(&addr(VIP)).expect("service");
    v6.services.insert(addr("[fd00:96::10]:80"), fe);
    route(&v6, OrigDstAddr(addr("[fd00:96::10]:80")), Some(addr(CLIENT)));
    route(&v6, OrigDstAddr(addr("[fd00:96::10]:80")), None);
    assert_eq!(*fake.chosen_for.borrow(), [ip("10.0.0.5")]);
    assert_eq!(*v6.chosen_for.borrow(), [ip("127.0.0.1"), ip("0.0.0.0")]);
}

#[test]
fn a_pod_served_here_takes_the_same_node_path_from_the_client_pods_address() {
    let fake =
        Fake { client_pod: vec![ip("10.0.0.5")], here: HashMap::from([(ip("10.0.0.6"), "pod-b")]), ..Fake::default() };
    let r = route(&fake, OrigDstAddr(addr("10.0.0.6:80")), Some(addr(CLIENT)));
    assert_eq!(
        r.route,
        Route::SameNode { to: OrigDstAddr(addr("10.0.0.6:80")), from: addr("10.0.0.5:40000"), pod: "pod-b" }
    );
}

#[test]
fn a_service_endpoint_served_here_takes_the_same_node_path_and_counts_as_tunnelled() {
    let mut fake = with_service(&[("10.0.0.6:8080", true)]);
    fake.here.insert(ip("10.0.0.6"), "pod-b");
    let r = route(&fake, OrigDstAddr(addr(VIP)), Some(addr(CLIENT)));
    assert!(
        matches!(r.route, Route::SameNode { to, pod: "pod-b", .. } if to.0 == addr("10.0.0.6:8080")),
        "{:?}",
        r.route
    );
    assert_eq!(r.service.expect("through a Service").how, ServiceRoute::Tunnelled);
}

#[test]
fn the_data_planes_own_ports_on_a_pod_here_are_refused() {
    let fake =
        Fake { client_pod: vec![ip("10.0.0.5")], here: HashMap::from([(ip("10.0.0.6"), "pod-b")]), ..Fake::default() };
    for port in [INBOUND_PORT, OUTBOUND_PORT] {
        let r = route(&fake, OrigDstAddr(SocketAddr::new(ip("10.0.0.6"), port)), Some(addr(CLIENT)));
        let Route::Refuse(refused) = r.route else { panic!("port {port} not refused: {:?}", r.route) };
        assert_eq!((refused.blame, refused.reason), (Blame::Downstream, Reason::NotThisPod));
    }
    // Elsewhere, the remote data plane decides (its inbound side refuses).
    let r = route(&Fake::default(), OrigDstAddr(SocketAddr::new(ip("10.0.1.7"), INBOUND_PORT)), None);
    assert!(matches!(r.route, Route::Tunnel { .. }));
}
