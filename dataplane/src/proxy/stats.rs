//! Per-executor measurements: latency histograms and counters, owned by the
//! executor that records them (no locks, no atomics on the data path), and
//! merged on the control thread from snapshots sent on request.
//!
//! Histograms hold microseconds with 3 significant figures, up to one hour
//! (longer values saturate at the top).
use std::{collections::BTreeMap, fmt, time::Duration};

use hdrhistogram::Histogram;

use crate::proxy::reason::Reason;

/// The latency histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hist {
    /// Outbound: accept to tunnel ready (original destination, TCP connect,
    /// TLS handshake, preamble sent).
    TunnelConnect,
    /// Outbound: the TLS client handshake (it overlaps the TCP connect, which
    /// is started non-blocking just before).
    TlsHandshake,
    /// Outbound: accept to the first byte from the destination.
    FirstByte,
    /// Outbound: accept to close.
    Lifetime,
    /// Inbound: the TLS server handshake.
    InboundTlsHandshake,
    /// Inbound: accept to the first byte from the application.
    InboundFirstByte,
    /// Inbound: accept to close.
    InboundLifetime,
}

/// How many histograms there are.
pub const HISTS: usize = Hist::ALL.len();

impl Hist {
    /// Every histogram, in index order.
    pub const ALL: [Hist; 7] = [
        Hist::TunnelConnect,
        Hist::TlsHandshake,
        Hist::FirstByte,
        Hist::Lifetime,
        Hist::InboundTlsHandshake,
        Hist::InboundFirstByte,
        Hist::InboundLifetime,
    ];

    /// A stable snake_case name (JSON keys, metric names, log tags).
    pub fn name(self) -> &'static str {
        match self {
            Hist::TunnelConnect => "tunnel_connect",
            Hist::TlsHandshake => "tls_handshake",
            Hist::FirstByte => "first_byte",
            Hist::Lifetime => "connection_lifetime",
            Hist::InboundTlsHandshake => "inbound_tls_handshake",
            Hist::InboundFirstByte => "inbound_first_byte",
            Hist::InboundLifetime => "inbound_connection_lifetime",
        }
    }

    /// What it measures, for `/metrics` help text.
    pub fn help(self) -> &'static str {
        match self {
            Hist::TunnelConnect => "Outbound: accept to tunnel ready (connect, mutual TLS, preamble)",
            Hist::TlsHandshake => "Outbound: TLS client handshake, overlapping the TCP connect",
            Hist::FirstByte => "Outbound: accept to the first byte from the destination",
            Hist::Lifetime => "Outbound: connection lifetime",
            Hist::InboundTlsHandshake => "Inbound: TLS server handshake",
            Hist::InboundFirstByte => "Inbound: accept to the first byte from the application",
            Hist::InboundLifetime => "Inbound: connection lifetime",
        }
    }
}

/// Where a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Captured at 18000, leaving the pod.
    Outbound,
    /// Arrived at 18001 for the pod.
    Inbound,
}

impl Direction {
    /// Both, in index order.
    pub const ALL: [Direction; 2] = [Direction::Outbound, Direction::Inbound];
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        })
    }
}

/// Which side a failure is blamed on (pingora's `ErrorSource`): the peer
/// that connected to us, the one we connected to, or ourselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Blame {
    /// The client (outbound) or the remote data plane (inbound).
    Downstream,
    /// The tunnel (outbound) or the application (inbound).
    Upstream,
    /// Us: no certificate, a socket we could not make.
    Ours,
}

impl fmt::Display for Blame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Blame::Downstream => "downstream",
            Blame::Upstream => "upstream",
            Blame::Ours => "ours",
        })
    }
}

impl From<crate::proxy::relay::Side> for Blame {
    fn from(s: crate::proxy::relay::Side) -> Self {
        match s {
            crate::proxy::relay::Side::Downstream => Blame::Downstream,
            crate::proxy::relay::Side::Upstream => Blame::Upstream,
        }
    }
}

/// Everything an executor counts.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Counters by direction, indexed like [`Direction::ALL`].
    pub flows: [Flow; 2],
    /// Counters of the executor as a whole.
    pub counts: Counts,
    /// Failures by direction, blamed side and reason.
    pub failures: BTreeMap<(Direction, Blame, Reason), u64>,
    /// Latency histograms, indexed like [`Hist::ALL`].
    pub hist: [Histogram<u64>; HISTS],
    /// Connections to Services, by `namespace/name` and how they went.
    pub services: BTreeMap<(String, ServiceRoute), u64>,
    /// Tunnelled connections by the workload at the other end (the
    /// namespace and service account its certificate proved) and whether
    /// they failed; at most [`MAX_PEERS`] pairs per executor, the rest
    /// counted under `other`.
    pub peers: BTreeMap<(Direction, String, String, bool), u64>,
}

/// How a connection to a Service went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceRoute {
    /// Tunnelled to a meshed endpoint.
    Tunnelled,
    /// Connected directly to an endpoint outside the mesh.
    Passthrough,
    /// Refused: no ready endpoint.
    NoEndpoint,
}

impl ServiceRoute {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ServiceRoute::Tunnelled => "tunnelled",
            ServiceRoute::Passthrough => "passthrough",
            ServiceRoute::NoEndpoint => "no_endpoint",
        }
    }
}

const MAX_MICROS: u64 = 3_600_000_000;

/// Peer workload series per executor (see [`Snapshot::peers`]): a cluster's
/// service accounts are many, a scrape must stay small.
pub const MAX_PEERS: usize = 1000;

/// The namespace and service account of a workload SPIFFE ID.
fn workload_of(spiffe: &str) -> Option<(&str, &str)> {
    let path = spiffe.strip_prefix("spiffe://")?.split_once('/')?.1;
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["ns", ns, "sa", sa] => Some((ns, sa)),
        _ => None,
    }
}

/// An empty histogram of microseconds, 1 µs to an hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("static histogram bounds are valid")
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            flows: Default::default(),
            counts: Counts::default(),
            failures: BTreeMap::new(),
            hist: std::array::from_fn(|_| histogram()),
            services: BTreeMap::new(),
            peers: BTreeMap::new(),
        }
    }
}

impl Snapshot {
    /// Records a duration in a histogram.
    pub fn record(&mut self, h: Hist, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(MAX_MICROS).clamp(1, MAX_MICROS);
        self.hist[h as usize].saturating_record(us);
    }

    /// The counters of one direction.
    pub fn flow(&self, d: Direction) -> &Flow {
        &self.flows[d as usize]
    }

    /// The counters of one direction, to count in.
    pub fn flow_mut(&mut self, d: Direction) -> &mut Flow {
        &mut self.flows[d as usize]
    }

    /// Counts a failed connection.
    pub fn fail(&mut self, d: Direction, blame: Blame, reason: Reason) {
        self.flow_mut(d)[FlowCount::Failed] += 1;
        *self.failures.entry((d, blame, reason)).or_default() += 1;
    }

    /// Adds `other` into this one.
    pub fn merge(&mut self, other: &Snapshot) {
        for (mine, theirs) in self.flows.iter_mut().zip(&other.flows) {
            mine.merge(theirs);
        }
        self.counts.merge(&other.counts);
        for (k, v) in &other.failures {
            *self.failures.entry(*k).or_default() += v;
        }
        for (k, v) in &other.services {
            *self.services.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.peers {
            *self.peers.entry(k.clone()).or_default() += v;
        }
        for (mine, theirs) in self.hist.iter_mut().zip(&other.hist) {
            // Same bounds on both sides: cannot fail.
            let _ = mine.add(theirs);
        }
    }

    /// Counts a tunnelled connection of `d` with the peer `spiffe` (a
    /// workload's `spiffe://DOMAIN/ns/NS/sa/SA`; any other form counts as
    /// `-`), completed or `failed`. Bounded: past [`MAX_PEERS`] pairs, new
    /// ones are counted as `other`.
    pub fn count_peer(&mut self, d: Direction, spiffe: &str, failed: bool) {
        let (ns, sa) = workload_of(spiffe).unwrap_or(("-", "-"));
        let key = (d, ns.to_string(), sa.to_string(), failed);
        let key = match self.peers.contains_key(&key) || self.peers.len() < MAX_PEERS {
            true => key,
            false => (d, "other".into(), "other".into(), failed),
        };
        *self.peers.entry(key).or_default() += 1;
    }

    /// Failures of `d` for `reason`, whoever was blamed.
    pub fn failures_of(&self, d: Direction, reason: Reason) -> u64 {
        self.failures.iter().filter(|((dd, _, r), _)| *dd == d && *r == reason).map(|(_, v)| v).sum()
    }
}

mod counts;
pub mod export;
pub use counts::{Count, Counts, Flow, FlowCount, Shown};

#[cfg(test)]
mod tests;
