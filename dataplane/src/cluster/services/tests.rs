//! Unit tests of [`super`].
use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn web() -> Service {
    Service {
        namespace: "shop".into(),
        name: "web".into(),
        cluster_ips: vec![ip("10.96.0.10")],
        ports: vec![ServicePort { name: "http".into(), port: 80 }, ServicePort { name: "admin".into(), port: 9000 }],
        client_ip_affinity: None,
        node_local: false,
        zone_hints: false,
        slices: vec![
            // Two slices resolve the named port differently (two
            // versions of a Deployment with different container ports).
            Slice {
                ports: vec![("http".into(), 8080), ("admin".into(), 9090)],
                endpoints: vec![ep("10.1.0.5", Readiness::Ready, true), ep("10.1.0.6", Readiness::Out, true)],
            },
            Slice { ports: vec![("http".into(), 8081)], endpoints: vec![ep("10.2.0.7", Readiness::Ready, false)] },
        ],
    }
}

fn ep(addr: &str, state: Readiness, local: bool) -> Endpoint {
    Endpoint { addr: ip(addr), state, local, hint: Hint::None }
}

fn addrs(t: &Table, vip: &str) -> Vec<String> {
    let fe = t.get(vip.parse().expect("vip"));
    fe.map(|fe| fe.backends.iter().map(|b| b.addr.to_string()).collect()).unwrap_or_default()
}

#[test]
fn conditions_read_as_kube_proxy_reads_them() {
    use Readiness::*;
    let cases = [
        ((None, None, None), Ready),
        ((Some(true), None, None), Ready),
        ((Some(false), None, None), Out),
        ((Some(false), Some(true), Some(true)), Terminating),
        ((Some(false), Some(true), None), Out),
        ((Some(false), Some(false), Some(true)), Out),
    ];
    for ((r, s, t), want) in cases {
        assert_eq!(Readiness::of(r, s, t), want, "ready {r:?} serving {s:?} terminating {t:?}");
    }
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let mut svc = web();
    svc.slices[1].endpoints = vec![ep("10.2.0.7", Readiness::Terminating, false)];
    assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), ["10.1.0.5:8080"], "one is ready");
    svc.slices[0].endpoints = vec![ep("10.1.0.5", Readiness::Terminating, true), ep("10.1.0.6", Readiness::Out, true)];
    let t = table(&[svc], |_| true);
    assert_eq!(addrs(&t, "10.96.0.10:80"), ["10.1.0.5:8080", "10.2.0.7:8081"], "a rollout's last ones still serve");
}

#[test]
fn zone_hints_keep_to_this_zone_only_when_every_ready_endpoint_has_them() {
    let mut svc = web();
    svc.zone_hints = true;
    svc.slices[0].endpoints[0].hint = Hint::Here;
    svc.slices[1].endpoints[0].hint = Hint::Elsewhere;
    let all = ["10.1.0.5:8080", "10.2.0.7:8081"];
    assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), ["10.1.0.5:8080"], "this zone's");
    // A ready endpoint without hints (the controller is still at it):
    // all of them.
    svc.slices[1].endpoints[0].hint = Hint::None;
    assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), all);
    // None hinted here: all of them.
    svc.slices[0].endpoints[0].hint = Hint::Elsewhere;
    svc.slices[1].endpoints[0].hint = Hint::Elsewhere;
    assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), all);
    // Hints, but the Service did not ask for them: all of them.
    svc.slices[0].endpoints[0].hint = Hint::Here;
    svc.zone_hints = false;
    assert_eq!(addrs(&table(&[svc], |_| true), "10.96.0.10:80"), all);
}

#[test]
fn internal_traffic_policy_local_keeps_to_this_node() {
    let mut svc = web();
    svc.node_local = true;
    assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), ["10.1.0.5:8080"]);
    // This node's only endpoint terminates: it still serves, alone.
    svc.slices[0].endpoints[0].state = Readiness::Terminating;
    assert_eq!(addrs(&table(&[svc.clone()], |_| true), "10.96.0.10:80"), ["10.1.0.5:8080"]);
    // None here at all: nothing, though another node has a ready one.
    svc.slices[0].endpoints.clear();
    assert!(addrs(&table(&[svc], |_| true), "10.96.0.10:80").is_empty());
}

#[test]
fn ready_endpoints_with_their_target_ports_per_slice() {
    let t = table(&[web()], |a| a != ip("10.2.0.7"));
    let http = t.get("10.96.0.10:80".parse().expect("vip")).expect("http");
    assert_eq!(http.service, "shop/web");
    assert_eq!(
        http.backends,
        [
            Backend { addr: "10.1.0.5:8080".parse().expect("a"), meshed: true },
            Backend { addr: "10.2.0.7:8081".parse().expect("a"), meshed: false },
        ],
        "not-ready 10.1.0.6 left out"
    );
    let admin = t.get("10.96.0.10:9000".parse().expect("vip")).expect("admin");
    assert_eq!(admin.backends.len(), 1, "the second slice has no admin port");
    assert!(t.get("10.96.0.10:81".parse().expect("vip")).is_none());
    assert_eq!(t.len(), 2);
}

#[test]
fn each_cluster_ip_of_a_dual_stack_service_leads_to_its_own_family() {
    let mut svc = web();
    svc.cluster_ips.push(ip("fd00:96::10"));
    // One slice per family, as the EndpointSlice controller makes them.
    svc.slices = vec![
        Slice { ports: vec![("http".into(), 8080)], endpoints: vec![ep("10.1.0.5", Readiness::Ready, true)] },
        Slice { ports: vec![("http".into(), 8080)], endpoints: vec![ep("fd00:1::5", Readiness::Ready, true)] },
    ];
    let t = table(&[svc], |_| true);
    let v4 = t.get("10.96.0.10:80".parse().expect("vip")).expect("IPv4 ClusterIP");
    assert_eq!(v4.backends, [Backend { addr: "10.1.0.5:8080".parse().expect("a"), meshed: true }]);
    let v6 = t.get("[fd00:96::10]:80".parse().expect("vip")).expect("IPv6 ClusterIP");
    assert_eq!(v6.backends, [Backend { addr: "[fd00:1::5]:8080".parse().expect("a"), meshed: true }]);
}

#[test]
fn two_choices_prefer_the_less_loaded_and_spread_evenly_when_idle() {
    let fe = Frontend {
        service: "s".into(),
        backends: (1..=4)
            .map(|i| Backend { addr: SocketAddr::new(ip(&format!("10.0.0.{i}")), 80), meshed: true })
            .collect(),
        client_ip_affinity: None,
    };
    let busy: SocketAddr = "10.0.0.1:80".parse().expect("addr");
    let mut seen = HashMap::new();
    let mut x: u64 = 7;
    for _ in 0..4000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let r = (x >> 11, x.rotate_left(29) >> 7);
        let b = choose(&fe, ip("10.9.9.9"), |a| if a == busy { 100 } else { 0 }, r).expect("a backend");
        *seen.entry(b.addr).or_insert(0u32) += 1;
    }
    assert_eq!(seen.get(&busy), None, "the loaded one never wins a duel");
    for (a, n) in &seen {
        assert!((1100..1600).contains(n), "{a}: {n} of 4000 over three idle backends");
    }
    let empty = Frontend { backends: vec![], ..fe };
    assert_eq!(choose(&empty, ip("10.9.9.9"), |_| 0, (1, 2)), None);
}

#[test]
fn client_ip_affinity_is_the_same_everywhere_and_moves_only_the_clients_of_a_gone_endpoint() {
    let backends: Vec<Backend> =
        (1..=5).map(|i| Backend { addr: SocketAddr::new(ip(&format!("10.0.0.{i}")), 80), meshed: true }).collect();
    let fe = Frontend {
        service: "s".into(),
        backends: backends.clone(),
        client_ip_affinity: Some(DEFAULT_AFFINITY_TIMEOUT),
    };
    let clients: Vec<IpAddr> =
        (0..200).map(|i| IpAddr::V4(std::net::Ipv4Addr::new(10, 8, (i / 250) as u8, (i % 250) as u8))).collect();
    let before: Vec<Backend> = clients.iter().map(|c| choose(&fe, *c, |_| 0, (1, 2)).expect("b")).collect();
    // Load and randomness change nothing.
    for (c, b) in clients.iter().zip(&before) {
        assert_eq!(choose(&fe, *c, |a| a.port().into(), (99, 3)), Some(*b));
    }
    let spread: std::collections::HashSet<_> = before.iter().collect();
    assert_eq!(spread.len(), 5, "clients spread over every endpoint");
    // 10.0.0.3 goes: only its clients move.
    let gone = backends[2];
    let fewer = Frontend { backends: backends.iter().copied().filter(|b| *b != gone).collect(), ..fe };
    for (c, b) in clients.iter().zip(&before) {
        let now = choose(&fewer, *c, |_| 0, (1, 2)).expect("b");
        if *b != gone {
            assert_eq!(now, *b, "{c} kept its endpoint");
        }
    }
}
