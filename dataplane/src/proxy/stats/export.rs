//! The data path's measurements as Prometheus families: each part
//! registers what it counts ([`Snapshot::register`] for the executors'
//! merged figures), and [`HdrExport`] turns our HdrHistograms into
//! Prometheus histograms with fixed buckets.
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType},
    registry::{Registry, Unit},
};

use super::{Direction, Hist, Snapshot};

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

impl Snapshot {
    /// Registers every family the executors count.
    pub fn register(&self, reg: &mut Registry) {
        self.register_flows(reg);
        self.register_failures(reg);
        self.register_same_node(reg);
        self.register_by_peer(reg);
        for h in Hist::ALL {
            seconds(reg, h.name(), h.help(), &self.hist[h as usize]);
        }
    }

    /// Connections and bytes by direction.
    fn register_flows(&self, reg: &mut Registry) {
        let accepted = Family::<Labels, Counter>::default();
        let completed = Family::<Labels, Counter>::default();
        let active = Family::<Labels, Gauge>::default();
        let bytes = Family::<Labels, Counter>::default();
        for (d, f) in [(Direction::Outbound, &self.outbound), (Direction::Inbound, &self.inbound)] {
            let dir = vec![("direction", d.to_string())];
            accepted.get_or_create(&dir).inc_by(f.accepted);
            completed.get_or_create(&dir).inc_by(f.completed);
            active.get_or_create(&dir).set(f.active() as i64);
            bytes.get_or_create(&vec![("direction", d.to_string()), ("flow", "to_upstream".into())]).inc_by(f.bytes_up);
            bytes
                .get_or_create(&vec![("direction", d.to_string()), ("flow", "to_downstream".into())])
                .inc_by(f.bytes_down);
        }
        reg.register("connections_accepted", "Connections accepted", accepted);
        reg.register("connections_completed", "Connections that ended with both directions closed normally", completed);
        reg.register("connections_active", "Connections open now", active);
        reg.register("bytes", "Bytes relayed", bytes);
    }

    /// Failures, failed accepts, resumed handshakes, left-out log lines.
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

        let accept_errors = Family::<Labels, Counter>::default();
        for (d, n) in
            [(Direction::Outbound, self.outbound.accept_errors), (Direction::Inbound, self.inbound.accept_errors)]
        {
            accept_errors.get_or_create(&vec![("direction", d.to_string())]).inc_by(n);
        }
        reg.register(
            "accept_errors",
            "Failed accepts (EMFILE and the like); the executor backs off after each",
            accept_errors,
        );
        let resumed = Family::<Labels, Counter>::default();
        for (d, n) in [(Direction::Outbound, self.outbound.resumed), (Direction::Inbound, self.inbound.resumed)] {
            resumed.get_or_create(&vec![("direction", d.to_string())]).inc_by(n);
        }
        reg.register(
            "tls_resumed_handshakes",
            "TLS handshakes that resumed an earlier session (outbound: as client; inbound: as server)",
            resumed,
        );
        counter(reg, "log_lines_suppressed", "Refusal and accept-error log lines left out because the same kind came too often (each kind is logged at most a few times a second, with a count)", self.logs_suppressed);
    }

    /// The same-node fast path.
    fn register_same_node(&self, reg: &mut Registry) {
        counter(reg, "same_node_connections", "Outbound connections between two pods this data plane serves that skipped the tunnel (--same-node-fast-path)", self.same_node);
        let spliced = Family::<Labels, Counter>::default();
        spliced.get_or_create(&vec![("how", "kernel".into())]).inc_by(self.spliced);
        spliced.get_or_create(&vec![("how", "user_space".into())]).inc_by(self.splice_fallbacks);
        reg.register(
            "same_node_spliced_connections",
            "Same-node fast-path connections by who carried their bytes: the kernel (spliced socket to socket) or this process (the kernel did not take the pair: a full map, a client that had closed already)",
            spliced,
        );
        counter(reg, "same_node_splice_paused", "Directions of spliced connections the kernel handed back to this process because bytes piled up (a receiver slower than its sender, 4 MiB not yet acknowledged): relayed in user space from then on", self.splice_paused);
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
