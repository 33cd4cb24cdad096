//! `/metrics`: the merged executor measurements, the eBPF decision counters
//! and the control thread's and admin thread's own counters, as Prometheus
//! text (0.0.4, clean under `promtool check metrics`).
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType},
    registry::Registry,
};

use crate::proxy::stats::{Direction, Hist, Snapshot};
use dataplane_common::maps::StatIndex;

/// A histogram exported from HdrHistogram data, with fixed bucket bounds.
#[derive(Debug)]
struct HdrExport {
    sum_seconds: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

/// Bucket bounds in seconds: 50 µs to 60 s.
const BOUNDS: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0, 60.0];

impl HdrExport {
    fn from(h: &hdrhistogram::Histogram<u64>) -> Self {
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

type Labels = Vec<(&'static str, String)>;

/// What the control thread adds to the executors' figures.
#[derive(Debug, Default)]
pub struct Extra {
    /// Certificate reloads.
    pub reloads: Reloads,
    /// Watched namespaces by state (`served`, `waiting_for_certificate`...),
    /// every state named, zero or not.
    pub namespaces: Vec<(&'static str, u64)>,
    /// Admin connections closed early.
    pub admin: AdminClosed,
    /// This node's workloads in the model, by membership (`meshed`,
    /// `namespace_not_opted_in`...).
    pub pods: std::collections::BTreeMap<&'static str, u64>,
    /// Kubernetes watch interruptions by resource, when watching.
    pub watch_errors: Option<Vec<(&'static str, u64)>>,
    /// From a namespace's address appearing to its listeners open on every
    /// executor and `connect4` told (µs).
    pub enrolment: Option<hdrhistogram::Histogram<u64>>,
    /// With `--node-ca`: node CAs and pod certificates.
    pub certificates: Option<Certificates>,
    /// Namespaces where the client-address return path could not be set up.
    pub return_path_failures: u64,
    /// With `--cni-socket`: what the CNI plugin's sandboxes were told.
    pub cni: Option<CniFigures>,
}

/// Certificate reloads (`--certs`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Reloads {
    /// Reloads that took effect.
    pub applied: u64,
    /// Reloads refused (the previous certificates stayed in service).
    pub refused: u64,
}

/// Admin connections the admin thread closed early.
#[derive(Debug, Default, Clone, Copy)]
pub struct AdminClosed {
    /// At once, because too many were open.
    pub too_many: u64,
    /// For being too slow.
    pub too_slow: u64,
}

/// Node CAs from the issuer and pod certificates minted with them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Certificates {
    /// Node CAs received from the issuer.
    pub node_ca_issued: u64,
    /// Node CA requests denied, unanswered or failed.
    pub node_ca_failed: u64,
    /// Pod certificates minted.
    pub minted: u64,
    /// Pod certificates that could not be minted.
    pub mint_failed: u64,
}

/// The CNI plugin's sandboxes, as the control thread answered them.
#[derive(Debug, Clone)]
pub struct CniFigures {
    /// Answers by verdict (`served`, `passed`, `refused`).
    pub answered: std::collections::BTreeMap<&'static str, u64>,
    /// From a sandbox's ADD reaching the agent to its answer (µs).
    pub decision: hdrhistogram::Histogram<u64>,
}

/// Renders the merged executor measurements, the eBPF decision counters and
/// the control thread's own counters as Prometheus text.
pub fn render(stats: &Snapshot, bpf: &[(StatIndex, u64)], extra: &Extra) -> String {
    let reloads = extra.reloads;
    let mut reg = Registry::with_prefix("dataplane");

    let accepted = Family::<Labels, Counter>::default();
    let completed = Family::<Labels, Counter>::default();
    let active = Family::<Labels, Gauge>::default();
    let bytes = Family::<Labels, Counter>::default();
    for (d, f) in [(Direction::Outbound, &stats.outbound), (Direction::Inbound, &stats.inbound)] {
        let dir = vec![("direction", d.to_string())];
        accepted.get_or_create(&dir).inc_by(f.accepted);
        completed.get_or_create(&dir).inc_by(f.completed);
        active.get_or_create(&dir).set(f.active() as i64);
        bytes.get_or_create(&vec![("direction", d.to_string()), ("flow", "to_upstream".into())]).inc_by(f.bytes_up);
        bytes.get_or_create(&vec![("direction", d.to_string()), ("flow", "to_downstream".into())]).inc_by(f.bytes_down);
    }
    reg.register("connections_accepted", "Connections accepted", accepted);
    reg.register("connections_completed", "Connections that ended with both directions closed normally", completed);
    reg.register("connections_active", "Connections open now", active);
    reg.register("bytes", "Bytes relayed", bytes);

    let failed = Family::<Labels, Counter>::default();
    for ((d, blame, reason), n) in &stats.failures {
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

    let decisions = Family::<Labels, Counter>::default();
    for (i, n) in bpf {
        decisions.get_or_create(&vec![("decision", i.name().to_string())]).inc_by(*n);
    }
    reg.register("bpf_decisions", "Capture decisions of the eBPF programs", decisions);

    let reload_ok = Counter::<u64>::default();
    reload_ok.inc_by(reloads.applied);
    reg.register("cert_reloads", "Certificate directory reloads that took effect", reload_ok);
    let reload_failed = Counter::<u64>::default();
    reload_failed.inc_by(reloads.refused);
    reg.register(
        "cert_reload_failures",
        "Certificate directory reloads refused (the old certificates stay)",
        reload_failed,
    );

    let admin = Family::<Labels, Counter>::default();
    admin.get_or_create(&vec![("why", "too_many".into())]).inc_by(extra.admin.too_many);
    admin.get_or_create(&vec![("why", "too_slow".into())]).inc_by(extra.admin.too_slow);
    reg.register(
        "admin_connections_closed",
        "Admin endpoint connections closed by us: too many open at once, or too slow to send a request",
        admin,
    );
    let accept_errors = Family::<Labels, Counter>::default();
    for (d, n) in
        [(Direction::Outbound, stats.outbound.accept_errors), (Direction::Inbound, stats.inbound.accept_errors)]
    {
        accept_errors.get_or_create(&vec![("direction", d.to_string())]).inc_by(n);
    }
    reg.register(
        "accept_errors",
        "Failed accepts (EMFILE and the like); the executor backs off after each",
        accept_errors,
    );
    let resumed = Family::<Labels, Counter>::default();
    for (d, n) in [(Direction::Outbound, stats.outbound.resumed), (Direction::Inbound, stats.inbound.resumed)] {
        resumed.get_or_create(&vec![("direction", d.to_string())]).inc_by(n);
    }
    reg.register(
        "tls_resumed_handshakes",
        "TLS handshakes that resumed an earlier session (outbound: as client; inbound: as server)",
        resumed,
    );
    let suppressed = Counter::<u64>::default();
    suppressed.inc_by(stats.logs_suppressed);
    reg.register(
        "log_lines_suppressed",
        "Refusal and accept-error log lines left out because the same kind came too often (each kind is logged at most a few times a second, with a count)",
        suppressed,
    );

    let same_node = Counter::<u64>::default();
    same_node.inc_by(stats.same_node);
    reg.register(
        "same_node_connections",
        "Outbound connections between two pods this data plane serves that skipped the tunnel (--same-node-fast-path)",
        same_node,
    );
    let spliced = Family::<Labels, Counter>::default();
    spliced.get_or_create(&vec![("how", "kernel".into())]).inc_by(stats.spliced);
    spliced.get_or_create(&vec![("how", "user_space".into())]).inc_by(stats.splice_fallbacks);
    reg.register(
        "same_node_spliced_connections",
        "Same-node fast-path connections by who carried their bytes: the kernel (spliced socket to socket) or this process (the kernel did not take the pair: a full map, a client that had closed already)",
        spliced,
    );
    let paused = Counter::<u64>::default();
    paused.inc_by(stats.splice_paused);
    reg.register(
        "same_node_splice_paused",
        "Directions of spliced connections the kernel handed back to this process because bytes piled up (a receiver slower than its sender, 4 MiB not yet acknowledged): relayed in user space from then on",
        paused,
    );

    let fallbacks = Family::<Labels, Counter>::default();
    fallbacks.get_or_create(&vec![("why", "return_path".into())]).inc_by(extra.return_path_failures);
    fallbacks.get_or_create(&vec![("why", "socket".into())]).inc_by(stats.client_address_fallbacks);
    reg.register(
        "client_address_unavailable",
        "The application saw the pod's own address instead of the client's: per namespace whose return path could not be set up, and per connection whose transparent socket was refused",
        fallbacks,
    );
    if !stats.services.is_empty() {
        let services = Family::<Labels, Counter>::default();
        for ((svc, route), n) in &stats.services {
            services.get_or_create(&vec![("service", svc.clone()), ("route", route.label().into())]).inc_by(*n);
        }
        reg.register(
            "service_connections",
            "Connections to Service ClusterIPs, by service (namespace/name) and route: tunnelled to a meshed endpoint, passthrough to one outside the mesh, no_endpoint (refused)",
            services,
        );
    }
    if !stats.peers.is_empty() {
        let peers = Family::<Labels, Counter>::default();
        for ((d, ns, sa, failed), n) in &stats.peers {
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
    let namespaces = Family::<Labels, Gauge>::default();
    for (state, n) in &extra.namespaces {
        namespaces.get_or_create(&vec![("state", state.to_string())]).set(*n as i64);
    }
    reg.register(
        "namespaces",
        "Namespaces found in --netns-dir, by state (an address without a certificate waits; passed: outside the mesh; unclaimed: no local workload holds its address)",
        namespaces,
    );
    if !extra.pods.is_empty() {
        let pods = Family::<Labels, Gauge>::default();
        for (m, n) in &extra.pods {
            pods.get_or_create(&vec![("membership", m.to_string())]).set(*n as i64);
        }
        reg.register("pods", "This node's workloads in the model, by mesh membership", pods);
    }
    if let Some(cni) = &extra.cni {
        let answered = Family::<Labels, Counter>::default();
        for verdict in ["served", "passed", "refused"] {
            let n = cni.answered.get(verdict).copied().unwrap_or(0);
            answered.get_or_create(&vec![("verdict", verdict.to_string())]).inc_by(n);
        }
        reg.register(
            "cni_sandboxes",
            "Pod sandboxes the CNI plugin handed over, by the agent's answer (refused: the runtime retries the sandbox)",
            answered,
        );
        reg.register_with_unit(
            "cni_decision_latency",
            "From a pod sandbox's ADD reaching the agent to its answer (what the mesh adds to a pod's start)",
            prometheus_client::registry::Unit::Seconds,
            HdrExport::from(&cni.decision),
        );
    }
    if let Some(by_resource) = &extra.watch_errors {
        let errors = Family::<Labels, Counter>::default();
        for (resource, n) in by_resource {
            errors.get_or_create(&vec![("resource", (*resource).into())]).inc_by(*n);
        }
        reg.register(
            "watch_restarts",
            "Kubernetes watches interrupted and resumed (or relisted after 410 Gone)",
            errors,
        );
    }
    if let Some(c) = extra.certificates {
        for (name, help, n) in [
            ("node_ca_issued", "Node CAs received from the issuer", c.node_ca_issued),
            (
                "node_ca_request_failures",
                "Node CA requests denied, unanswered or failed (retried with backoff)",
                c.node_ca_failed,
            ),
            ("pod_certificates_minted", "Pod certificates minted on this node (in memory)", c.minted),
            ("pod_certificate_failures", "Pod certificates that could not be minted", c.mint_failed),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(n);
            reg.register(name, help, c);
        }
    }
    if let Some(h) = &extra.enrolment {
        reg.register_with_unit(
            "enrolment_latency",
            "From a pod namespace's address appearing to its listeners open on every executor and capture enabled",
            prometheus_client::registry::Unit::Seconds,
            HdrExport::from(h),
        );
    }

    for h in Hist::ALL {
        let help = h.help();
        let export = HdrExport::from(&stats.hist[h as usize]);
        reg.register_with_unit(h.name(), help, prometheus_client::registry::Unit::Seconds, export);
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    openmetrics_to_prometheus(&out)
}

/// prometheus-client writes OpenMetrics, where a counter family is named
/// without its `_total` suffix; the Prometheus text format (0.0.4), which
/// `promtool check metrics` and every scraper read, names HELP and TYPE after
/// the sample. Renames those lines and drops the OpenMetrics-only ones
/// (`# UNIT`, `# EOF`).
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
