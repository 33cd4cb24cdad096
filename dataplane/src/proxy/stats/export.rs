//! The data path's measurements as Prometheus families: each part
//! registers what it counts ([`Snapshot::register`] for the executors'
//! merged figures), and [`HdrExport`] turns our HdrHistograms into
//! Prometheus histograms with fixed buckets.
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType},
    registry::{Registry, Unit},
};

use super::{Count, Direction, FlowCount, Hist, Shown, Snapshot};

/// A family's labels.
pub type Labels = Vec<(&'static str, String)>;

/// Registers one counter.
pub fn counter(reg: &mut Registry, name: &str, help: &str, n: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(n);
    reg.register(name, help, c);
}

/// Registers a histogram in seconds.
pub fn seconds(reg: &mut Registry, name: &str, help: &str, h: &hdrhistogram::Histogram<u64>) {
    reg.register_with_unit(name, help, Unit::Seconds, HdrExport::from(h));
}

/// A histogram exported from HdrHistogram data, with fixed bucket bounds.
#[derive(Debug)]
pub struct HdrExport {
    sum_seconds: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

/// Bucket bounds in seconds: 50 µs to 60 s.
const BOUNDS: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0, 60.0];

impl HdrExport {
    /// The histogram of `h` (µs) in seconds.
    pub fn from(h: &hdrhistogram::Histogram<u64>) -> Self {
        let mut buckets = Vec::with_capacity(BOUNDS.len() + 1);
        let mut below = 0;
        for b in BOUNDS {
            let upto = h.count_between(0, (b * 1e6) as u64);
            buckets.push((b, upto - below));
            below = upto;
        }
        buckets.push((f64::INFINITY, h.len() - below));
        let sum_us: f64 = h.iter_recorded().map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64).sum();
        Self { sum_seconds: sum_us / 1e6, count: h.len(), buckets }
    }
}

impl EncodeMetric for HdrExport {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum_seconds,
            self.count,
            &self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Counter families filled from [`Shown`] rows, each registered once with
/// every counter that shows in it.
#[derive(Debug, Default)]
pub struct Families(Vec<(Shown, Sink)>);

/// One family: a plain counter, or counters told apart by labels.
#[derive(Debug)]
enum Sink {
    One(Counter),
    Labelled(Family<Labels, Counter>),
}

impl Families {
    /// Adds `n` to the counter `shown` names, with `labels` before its own.
    pub fn add(&mut self, shown: Shown, mut labels: Labels, n: u64) {
        labels.extend(shown.label.map(|(k, v)| (k, v.to_string())));
        let at = match self.0.iter().position(|(s, _)| s.family == shown.family) {
            Some(at) => at,
            None => {
                let sink = match labels.is_empty() {
                    true => Sink::One(Counter::default()),
                    false => Sink::Labelled(Family::default()),
                };
                self.0.push((shown, sink));
                self.0.len() - 1
            }
        };
        match &self.0[at].1 {
            Sink::One(c) => c.inc_by(n),
            Sink::Labelled(f) => f.get_or_create(&labels).inc_by(n),
        };
    }

    /// Registers every family.
    pub fn register(self, reg: &mut Registry) {
        for (shown, sink) in self.0 {
            match sink {
                Sink::One(c) => reg.register(shown.family, shown.help, c),
                Sink::Labelled(f) => reg.register(shown.family, shown.help, f),
            }
        }
    }
}

impl Snapshot {
    /// Registers every family the executors count.
    pub fn register(&self, reg: &mut Registry) {
        let mut families = Families::default();
        for d in Direction::ALL {
            for c in FlowCount::ALL {
                if let Some(shown) = c.shown() {
                    families.add(shown, vec![("direction", d.to_string())], self.flow(d)[c]);
                }
            }
        }
        for c in Count::ALL {
            if let Some(shown) = c.shown() {
                families.add(shown, vec![], self.counts[c]);
            }
        }
        families.register(reg);
        let active = Family::<Labels, Gauge>::default();
        for d in Direction::ALL {
            active.get_or_create(&vec![("direction", d.to_string())]).set(self.flow(d).active() as i64);
        }
        reg.register("connections_active", "Connections open now", active);
        self.register_failures(reg);
        self.register_by_peer(reg);
        for h in Hist::ALL {
            seconds(reg, h.name(), h.help(), &self.hist[h as usize]);
        }
    }

    /// Failures by direction, blamed side and reason.
    fn register_failures(&self, reg: &mut Registry) {
        let failed = Family::<Labels, Counter>::default();
        for ((d, blame, reason), n) in &self.failures {
            failed
                .get_or_create(&vec![
                    ("direction", d.to_string()),
                    ("side", blame.to_string()),
                    ("reason", reason.label().to_string()),
                ])
                .inc_by(*n);
        }
        reg.register(
            "connections_failed",
            "Connections refused or ended early, by the side that failed and why (inbound refusals included)",
            failed,
        );
    }

    /// Connections by Service and by the workload at the other end.
    fn register_by_peer(&self, reg: &mut Registry) {
        if !self.services.is_empty() {
            let services = Family::<Labels, Counter>::default();
            for ((svc, route), n) in &self.services {
                services.get_or_create(&vec![("service", svc.clone()), ("route", route.label().into())]).inc_by(*n);
            }
            reg.register(
                "service_connections",
                "Connections to Service ClusterIPs, by service (namespace/name) and route: tunnelled to a meshed endpoint, passthrough to one outside the mesh, no_endpoint (refused)",
                services,
            );
        }
        if !self.peers.is_empty() {
            let peers = Family::<Labels, Counter>::default();
            for ((d, ns, sa, failed), n) in &self.peers {
                let outcome = if *failed { "failed" } else { "completed" };
                let labels = vec![
                    ("direction", d.to_string()),
                    ("peer_namespace", ns.clone()),
                    ("peer_service_account", sa.clone()),
                    ("outcome", outcome.into()),
                ];
                peers.get_or_create(&labels).inc_by(*n);
            }
            reg.register(
                "workload_connections",
                "Tunnelled connections by the workload at the other end (the namespace and service account its certificate proved: the client's inbound, the server's outbound) and outcome; at most 1,000 pairs per executor, the rest under \"other\"",
                peers,
            );
        }
    }
}
