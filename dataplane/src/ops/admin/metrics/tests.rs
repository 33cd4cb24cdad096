//! Unit tests of [`super`].
use std::time::Duration;

use super::*;
use crate::proxy::stats::{Direction, FlowCount, Hist};

#[test]
fn counters_are_named_after_their_samples() {
    let om = "# HELP x_bytes Bytes.\n# TYPE x_bytes counter\nx_bytes_total 3\n\
              # HELP x_lat_seconds Lat.\n# TYPE x_lat_seconds histogram\n# UNIT x_lat_seconds seconds\n\
              x_lat_seconds_count 1\n# EOF\n";
    let p = openmetrics_to_prometheus(om);
    assert_eq!(
        p,
        "# HELP x_bytes_total Bytes.\n# TYPE x_bytes_total counter\nx_bytes_total 3\n\
         # HELP x_lat_seconds Lat.\n# TYPE x_lat_seconds histogram\nx_lat_seconds_count 1\n"
    );
}

#[test]
fn every_family_renders() {
    let mut s = Snapshot::default();
    s.flow_mut(Direction::Outbound)[FlowCount::Accepted] = 2;
    s.fail(Direction::Inbound, crate::proxy::stats::Blame::Downstream, crate::proxy::reason::Reason::UnknownCa);
    s.record(Hist::Lifetime, Duration::from_millis(3));
    let text = render(
        &s,
        &[(StatIndex::Captured, 5)],
        &Extra { reloads: Reloads { applied: 1, refused: 2 }, ..Extra::default() },
    );
    for want in [
        "dataplane_connections_accepted_total{direction=\"outbound\"} 2",
        "dataplane_connections_failed_total{direction=\"inbound\",side=\"downstream\",reason=\"unknown_ca\"} 1",
        "dataplane_bpf_decisions_total{decision=\"captured\"} 5",
        "dataplane_cert_reload_failures_total 2",
        "dataplane_connection_lifetime_seconds_count 1",
        "dataplane_connection_lifetime_seconds_bucket{le=\"0.005\"} 1",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
}

/// Every data-path counter reaches `/metrics`: each set to a value of its
/// own, each value is found in a sample (failures show by reason, so the
/// `Failed` tally is the one left out).
#[test]
fn every_counter_is_exported() {
    use crate::proxy::stats::Count;
    let mut s = Snapshot::default();
    let mut want = Vec::new();
    for (k, d) in Direction::ALL.into_iter().enumerate() {
        for (i, c) in FlowCount::ALL.into_iter().enumerate() {
            let v = 1000 * (k as u64 + 1) + i as u64 + 1;
            s.flow_mut(d)[c] = v;
            if c != FlowCount::Failed {
                want.push((format!("{c:?} {d}"), v));
            }
        }
    }
    for (i, c) in Count::ALL.into_iter().enumerate() {
        s.counts[c] = 5000 + i as u64;
        want.push((format!("{c:?}"), 5000 + i as u64));
    }
    let text = render(&s, &[], &Extra::default());
    for (what, v) in want {
        let found = text.lines().any(|l| !l.starts_with('#') && l.ends_with(&format!(" {v}")));
        assert!(found, "{what} ({v}) is not exported:\n{text}");
    }
}
