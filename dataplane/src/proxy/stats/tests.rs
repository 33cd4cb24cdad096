//! Unit tests of [`super`].
use super::*;

#[test]
fn peers_are_counted_by_workload_and_bounded() {
    let mut s = Snapshot::default();
    s.count_peer(Direction::Inbound, "spiffe://cluster.local/ns/shop/sa/web", false);
    s.count_peer(Direction::Inbound, "spiffe://cluster.local/ns/shop/sa/web", true);
    s.count_peer(Direction::Inbound, "spiffe://cluster.local/ip/10.0.0.1", false);
    let key = |ns: &str, sa: &str, failed| (Direction::Inbound, ns.to_string(), sa.to_string(), failed);
    assert_eq!(s.peers[&key("shop", "web", false)], 1);
    assert_eq!(s.peers[&key("shop", "web", true)], 1);
    assert_eq!(s.peers[&key("-", "-", false)], 1, "an address-form ID names no workload");
    for i in 0..2 * MAX_PEERS {
        s.count_peer(Direction::Outbound, &format!("spiffe://cluster.local/ns/n{i}/sa/a"), false);
    }
    assert_eq!(s.peers.len(), MAX_PEERS + 1, "bounded, plus the overflow");
    assert!(s.peers[&(Direction::Outbound, "other".into(), "other".into(), false)] > 0);
}

#[test]
fn merge_adds_counts_and_histograms() {
    let mut a = Snapshot::default();
    a.flow_mut(Direction::Outbound)[FlowCount::Accepted] = 2;
    a.flow_mut(Direction::Outbound)[FlowCount::Completed] = 1;
    a.record(Hist::Lifetime, Duration::from_millis(5));
    a.fail(Direction::Inbound, Blame::Downstream, Reason::UnknownCa);
    let mut b = Snapshot::default();
    b.flow_mut(Direction::Outbound)[FlowCount::Accepted] = 3;
    b.record(Hist::Lifetime, Duration::from_millis(7));
    b.fail(Direction::Inbound, Blame::Downstream, Reason::UnknownCa);
    a.merge(&b);
    assert_eq!(a.flow(Direction::Outbound)[FlowCount::Accepted], 5);
    assert_eq!(a.flow(Direction::Outbound).active(), 4);
    assert_eq!(a.hist[Hist::Lifetime as usize].len(), 2);
    assert_eq!(a.failures_of(Direction::Inbound, Reason::UnknownCa), 2);
    assert_eq!(a.flow(Direction::Inbound)[FlowCount::Failed], 2);
}

#[test]
fn durations_beyond_the_top_saturate() {
    let mut s = Snapshot::default();
    s.record(Hist::Lifetime, Duration::from_secs(10 * 3600));
    s.record(Hist::Lifetime, Duration::ZERO);
    let h = &s.hist[Hist::Lifetime as usize];
    assert_eq!(h.len(), 2);
    assert!(h.max() >= MAX_MICROS / 2 && h.min() == 1);
}
