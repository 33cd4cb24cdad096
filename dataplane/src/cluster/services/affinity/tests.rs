use std::net::Ipv4Addr;

use super::*;
use crate::cluster::services::{choose, DEFAULT_AFFINITY_TIMEOUT};

const TIMEOUT: Duration = Duration::from_secs(10);

fn backend(last: u8) -> Backend {
    Backend { addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)), 8080), meshed: true }
}

fn frontend(backends: &[Backend], affinity: Option<Duration>) -> Frontend {
    Frontend { service: "ns/db".into(), backends: backends.to_vec(), client_ip_affinity: affinity }
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), port)
}

/// A client address whose fresh choice between `a` and `b` is `b`.
fn client_preferring(b: Backend, among: &Frontend) -> IpAddr {
    (1..=250u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 8, 0, i)))
        .find(|c| choose(among, *c, |_| 0, (1, 2)) == Some(b))
        .expect("some client's hash prefers b")
}

/// The pick `affinity` makes for `client` at `now`, choosing afresh as the
/// executors do.
fn pick(affinity: &Affinity, at: SocketAddr, fe: &Frontend, client: IpAddr, now: Instant) -> Option<SocketAddr> {
    affinity.choose(at, fe, client, now, || choose(fe, client, |_| 0, (1, 2))).map(|b| b.addr)
}

#[test]
fn a_client_keeps_its_endpoint_until_it_stays_away_longer_than_the_timeout() {
    let (a, b) = (backend(1), backend(2));
    let both = frontend(&[a, b], Some(TIMEOUT));
    let client = client_preferring(b, &both);
    let affinity = Affinity::default();
    let t0 = Instant::now();
    // Only a at first: the client is sent there.
    assert_eq!(pick(&affinity, vip(5432), &frontend(&[a], Some(TIMEOUT)), client, t0), Some(a.addr));
    // b arrives, and a fresh choice would be b: the client stays with a,
    // each connection starting its time again, past the first timeout.
    for step in 1..=3 {
        let now = t0 + step * TIMEOUT * 3 / 4;
        assert_eq!(pick(&affinity, vip(5432), &both, client, now), Some(a.addr), "step {step}");
    }
    // Away for longer than the timeout: chosen afresh, and kept there.
    let later = t0 + 3 * TIMEOUT * 3 / 4 + TIMEOUT + Duration::from_millis(1);
    assert_eq!(pick(&affinity, vip(5432), &both, client, later), Some(b.addr));
    assert_eq!(pick(&affinity, vip(5432), &both, client, later + TIMEOUT), Some(b.addr), "exactly the timeout");
}

#[test]
fn an_endpoint_that_goes_takes_its_clients_affinity_with_it() {
    let (a, b) = (backend(1), backend(2));
    let both = frontend(&[a, b], Some(TIMEOUT));
    let client = client_preferring(b, &both);
    let affinity = Affinity::default();
    let t0 = Instant::now();
    assert_eq!(pick(&affinity, vip(5432), &both, client, t0), Some(b.addr));
    let only_a = frontend(&[a], Some(TIMEOUT));
    assert_eq!(pick(&affinity, vip(5432), &only_a, client, t0 + Duration::from_secs(1)), Some(a.addr));
    // b is back within the timeout: the client stays where it went.
    assert_eq!(pick(&affinity, vip(5432), &both, client, t0 + Duration::from_secs(2)), Some(a.addr));
    // No endpoint at all: none, and nothing invented.
    assert_eq!(pick(&affinity, vip(5432), &frontend(&[], Some(TIMEOUT)), client, t0), None);
}

#[test]
fn each_service_port_has_its_own_affinity_and_services_without_it_are_not_remembered() {
    let (a, b) = (backend(1), backend(2));
    let both = frontend(&[a, b], Some(DEFAULT_AFFINITY_TIMEOUT));
    let client = client_preferring(b, &both);
    let affinity = Affinity::default();
    let t0 = Instant::now();
    assert_eq!(pick(&affinity, vip(5432), &frontend(&[a], Some(DEFAULT_AFFINITY_TIMEOUT)), client, t0), Some(a.addr));
    // Another port of the same ClusterIP: a choice of its own.
    assert_eq!(pick(&affinity, vip(5433), &both, client, t0), Some(b.addr));
    // Without affinity the choice is made every time, and not kept.
    let none = frontend(&[a, b], None);
    let chosen = affinity.choose(vip(80), &none, client, t0, || Some(a));
    assert_eq!(chosen.map(|b| b.addr), Some(a.addr));
    assert_eq!(affinity.choose(vip(80), &none, client, t0, || Some(b)).map(|b| b.addr), Some(b.addr));
    assert_eq!(affinity.inner.lock().expect("lock").stuck.len(), 2);
}

#[test]
fn clients_gone_past_their_timeout_are_swept() {
    let a = backend(1);
    let fe = frontend(&[a], Some(TIMEOUT));
    let affinity = Affinity::default();
    let t0 = Instant::now();
    let client = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a08_0000 + i));
    for i in 0..1_000 {
        pick(&affinity, vip(5432), &fe, client(i), t0);
    }
    // Long after: new clients come; the old ones' entries go at the next
    // sweep, so the table holds only what is live.
    let later = t0 + 2 * TIMEOUT;
    for i in 1_000..1_100 {
        pick(&affinity, vip(5432), &fe, client(i), later);
    }
    let len = affinity.inner.lock().expect("lock").stuck.len();
    assert!(len <= 100 + 1, "{len} entries: the expired ones were not swept");
}
