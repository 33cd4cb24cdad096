//! `/metrics`: the merged executor measurements, the eBPF decision counters
//! and the control thread's and admin thread's own counters, as Prometheus
//! text (0.0.4, clean under `promtool check metrics`).
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::proxy::stats::{
    export::{counter, seconds, Labels},
    Count, Snapshot,
};
use dataplane_common::maps::StatIndex;

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
    /// When watching the API: from a batch of watch events reaching the
    /// agent to its changes written to the eBPF maps and sent to the
    /// executors (µs).
    pub model_updates: Option<hdrhistogram::Histogram<u64>>,
    /// With `--node-ca`: node CAs and pod certificates.
    pub certificates: Option<Certificates>,
    /// Namespaces where the client-address return path could not be set up.
    pub return_path_failures: u64,
    /// The allocator's bytes: allocated, and freed but held.
    pub heap: (u64, u64),
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
/// the control thread's own figures as Prometheus text.
pub fn render(stats: &Snapshot, bpf: &[(StatIndex, u64)], extra: &Extra) -> String {
    let mut reg = Registry::with_prefix("dataplane");
    stats.register(&mut reg);
    let decisions = Family::<Labels, Counter>::default();
    for (i, n) in bpf {
        decisions.get_or_create(&vec![("decision", i.name().to_string())]).inc_by(*n);
    }
    reg.register("bpf_decisions", "Capture decisions of the eBPF programs", decisions);

    extra.register(&mut reg);
    // One family, two producers: per namespace (the control thread's
    // return path) and per connection (an executor's transparent socket).
    let fallbacks = Family::<Labels, Counter>::default();
    fallbacks.get_or_create(&vec![("why", "return_path".into())]).inc_by(extra.return_path_failures);
    fallbacks.get_or_create(&vec![("why", "socket".into())]).inc_by(stats.counts[Count::ClientAddressFallbacks]);
    reg.register(
        "client_address_unavailable",
        "The application saw the pod's own address instead of the client's: per namespace whose return path could not be set up, and per connection whose transparent socket was refused",
        fallbacks,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    openmetrics_to_prometheus(&out)
}

impl Extra {
    /// Registers the control thread's and the admin thread's figures.
    fn register(&self, reg: &mut Registry) {
        let reloads = self.reloads;
        counter(reg, "cert_reloads", "Certificate directory reloads that took effect", reloads.applied);
        counter(
            reg,
            "cert_reload_failures",
            "Certificate directory reloads refused (the old certificates stay)",
            reloads.refused,
        );

        let admin = Family::<Labels, Counter>::default();
        admin.get_or_create(&vec![("why", "too_many".into())]).inc_by(self.admin.too_many);
        admin.get_or_create(&vec![("why", "too_slow".into())]).inc_by(self.admin.too_slow);
        reg.register(
            "admin_connections_closed",
            "Admin endpoint connections closed by us: too many open at once, or too slow to send a request",
            admin,
        );
        let heap = Family::<Labels, Gauge>::default();
        heap.get_or_create(&vec![("state", "allocated".into())]).set(self.heap.0 as i64);
        heap.get_or_create(&vec![("state", "free".into())]).set(self.heap.1 as i64);
        reg.register_with_unit(
            "heap",
            "The allocator's memory, every thread's: allocated by the data plane, and freed but still held (fragmentation: RSS the data does not use)",
            prometheus_client::registry::Unit::Bytes,
            heap,
        );
        let namespaces = Family::<Labels, Gauge>::default();
        for (state, n) in &self.namespaces {
            namespaces.get_or_create(&vec![("state", state.to_string())]).set(*n as i64);
        }
        reg.register(
            "namespaces",
            "Namespaces found in --netns-dir, by state (an address without a certificate waits; passed: outside the mesh; unclaimed: no local workload holds its address)",
            namespaces,
        );
        if !self.pods.is_empty() {
            let pods = Family::<Labels, Gauge>::default();
            for (m, n) in &self.pods {
                pods.get_or_create(&vec![("membership", m.to_string())]).set(*n as i64);
            }
            reg.register("pods", "This node's workloads in the model, by mesh membership", pods);
        }
        self.register_cluster(reg);
    }

    /// The CNI plugin's answers, the watches and the certificates.
    fn register_cluster(&self, reg: &mut Registry) {
        if let Some(cni) = &self.cni {
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
            seconds(
                reg,
                "cni_decision_latency",
                "From a pod sandbox's ADD reaching the agent to its answer (what the mesh adds to a pod's start)",
                &cni.decision,
            );
        }
        if let Some(by_resource) = &self.watch_errors {
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
        if let Some(c) = self.certificates {
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
        if let Some(h) = &self.enrolment {
            seconds(
                reg,
                "enrolment_latency",
                "From a pod namespace's address appearing to its listeners open on every executor and capture enabled",
                h,
            );
        }
        if let Some(h) = &self.model_updates {
            seconds(
                reg,
                "model_update_latency",
                "From a batch of Kubernetes watch events reaching the agent to its changes written to the eBPF maps and sent to the executors (the first, whole model not counted)",
                h,
            );
        }
    }
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
