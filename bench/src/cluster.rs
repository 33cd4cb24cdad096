//! What a cluster's size costs one agent: the test API server (the real
//! list/watch protocol over HTTPS, paged lists) holds a simulated cluster of
//! N pods over 500 nodes in 200 namespaces, half of them opted in, with N/10
//! Services of 10 endpoints each; one agent in node mode, as the DaemonSet
//! runs it, is started against it. Measured:
//!
//! - start to ready (the model listed, every served pod open), and the
//!   resident memory then;
//! - CPU while idle (no API writes at all);
//! - pod enrolment (the address given to ready-to-capture, as
//!   [`crate::enrol`] measures it, the pod shown by the API at the same
//!   moment, as a kubelet reports it), one pod after another, on the idle
//!   cluster and again while 200 pods of other nodes change per second
//!   (new addresses, label flips, deletions and re-creations): a change
//!   elsewhere must not delay a pod here;
//! - the agent's CPU during that churn and after it, and its memory at the
//!   end;
//! - enrolment again while every watch relists: before each pod the API
//!   server ends all watches with `410 Gone`, and the pod is in a namespace
//!   that sorts after every other (the last a relist shows);
//! - from a batch of watch events reaching the agent to its changes in the
//!   eBPF maps and with the executors, p50 and p99 during the churn (the
//!   agent's `dataplane_model_update_latency_seconds`, read as Prometheus's
//!   `histogram_quantile` reads it: interpolated within a bucket).
use std::{
    net::Ipv4Addr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::enrol::{empty_pod, pod_address, served_after, PROBE_DST};
use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use testworld::{
    apiserver::{endpoint_slice, namespace, pod, service},
    ApiServer, Cgroup, Dataplane, Netns, NetnsDir,
};

/// The node the agent runs as; every other pod is on `node-0`..`node-499`.
const NODE: &str = "node-local";
/// Local pods enrolled per phase (idle, then under churn).
const PODS_PER_PHASE: usize = 10;
/// Pod writes per second during the churn, and for how long.
const CHURN_RATE: u64 = 200;
const CHURN_FOR: Duration = Duration::from_secs(10);
/// How long a probe waits to be served before it counts as never served.
const PROBE_WITHIN_S: &str = "30";
/// The namespace of the pods enrolled while the watches relist: after every
/// other in a list's order.
const LAST_NAMESPACE: &str = "zz-bench";
/// A pod's labels key that the churn flips.
const MESH: &str = "dataplane.dev/mesh";

/// What one cluster size measured.
#[derive(Debug)]
pub struct Figures {
    /// Pods in the cluster.
    pub pods: usize,
    /// Start to ready.
    pub ready: Duration,
    /// Resident memory at ready, in bytes.
    pub rss_ready: u64,
    /// Resident memory after the churn.
    pub rss_end: u64,
    /// The allocator's bytes after the churn: allocated, and freed but held.
    pub heap_end: (u64, u64),
    /// The agent's CPU over 5 s idle, after ready.
    pub idle_cpu: Duration,
    /// The agent's CPU while the churn ran (`CHURN_FOR`).
    pub churn_cpu: Duration,
    /// The agent's CPU over the 5 s after the churn stopped.
    pub after_cpu: Duration,
    /// Pod writes the churn made.
    pub writes: u64,
    /// Enrolment, idle cluster (µs).
    pub enrol_idle: Histogram<u64>,
    /// Enrolment during the churn (µs).
    pub enrol_churn: Histogram<u64>,
    /// Enrolment while every watch relists (µs).
    pub enrol_relist: Histogram<u64>,
    /// The agent's own part of it (its address seen to served), mean of
    /// each phase, idle then under churn.
    pub agent_part: (Duration, Duration),
    /// Watch events to map updates during the churn: how many batches, and
    /// their p50 and p99 (seconds; `None` if there were none).
    pub map_updates: (f64, Option<f64>, Option<f64>),
}

/// The agent's `/metrics` (empty if it does not answer: every figure read
/// from it is then missing, not an error of the run).
fn metrics(dp: &Dataplane) -> String {
    testworld::http_get(&dp.admin(), "/metrics").map(|(_, t)| t).unwrap_or_default()
}

/// The agent's enrolment histogram's (sum, count) so far.
fn agent_enrolments(dp: &Dataplane) -> (f64, f64) {
    let text = metrics(dp);
    let get = |name: &str| testworld::metric(&text, name).unwrap_or(0.0);
    (get("dataplane_enrolment_latency_seconds_sum"), get("dataplane_enrolment_latency_seconds_count"))
}

/// The agent's model-update histogram so far: its cumulative buckets, as
/// (upper bound in seconds, count).
fn update_buckets(dp: &Dataplane) -> Vec<(f64, f64)> {
    let text = metrics(dp);
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("dataplane_model_update_latency_seconds_bucket{")?;
            let (labels, count) = rest.split_once("} ")?;
            let le = labels.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The number recorded between two readings of the buckets, and its `q`
/// quantiles, interpolated within their bucket as Prometheus's
/// `histogram_quantile` does.
fn quantiles_between(before: &[(f64, f64)], after: &[(f64, f64)], qs: [f64; 2]) -> (f64, [Option<f64>; 2]) {
    let counts: Vec<(f64, f64)> =
        after.iter().map(|(le, c)| (*le, c - before.iter().find(|(l, _)| l == le).map_or(0.0, |(_, b)| *b))).collect();
    let total = counts.last().map_or(0.0, |(_, c)| *c);
    let quantile = |q: f64| {
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut below = (0.0, 0.0);
        for (le, c) in &counts {
            if *c >= rank {
                if le.is_infinite() {
                    return Some(below.0);
                }
                return Some(below.0 + (le - below.0) * (rank - below.1) / (c - below.1).max(f64::MIN_POSITIVE));
            }
            below = (*le, *c);
        }
        None
    };
    (total, qs.map(quantile))
}

/// The agent's heap: (allocated, freed but held) bytes.
fn heap(dp: &Dataplane) -> (u64, u64) {
    let text = metrics(dp);
    let get =
        |state: &str| testworld::metric(&text, &format!("dataplane_heap_bytes{{state=\"{state}\"}}")).unwrap_or(0.0);
    (get("allocated") as u64, get("free") as u64)
}

/// The mean of what was recorded between `before` and `after`.
fn mean_between(before: (f64, f64), after: (f64, f64)) -> Duration {
    let n = after.1 - before.1;
    Duration::from_secs_f64(if n > 0.0 { (after.0 - before.0) / n } else { 0.0 })
}

fn remote_ip(i: usize) -> String {
    Ipv4Addr::from(0x0a00_0000 + i as u32 + 1).to_string()
}

fn remote_pod(i: usize, ip: &str, labels: Value) -> Value {
    pod(&format!("ns-{}", i % 200), &format!("pod-{i}"), &format!("node-{}", i % 500), Some(ip), labels, json!({}))
}

fn labels(i: usize) -> Value {
    json!({ "app": format!("svc-{}", i / 10) })
}

/// Puts a cluster of `n` pods (and its namespaces and Services) into `api`,
/// and forgets the history: the agent lists what is there.
fn load(api: &ApiServer, n: usize) {
    for ns in 0..200 {
        let opted = if ns < 100 { json!({ MESH: "enabled" }) } else { json!({}) };
        api.put("namespaces", namespace(&format!("ns-{ns}"), opted));
    }
    api.put("namespaces", namespace("bench", json!({ MESH: "enabled" })));
    api.put("namespaces", namespace(LAST_NAMESPACE, json!({ MESH: "enabled" })));
    for i in 0..n {
        api.put("pods", remote_pod(i, &remote_ip(i), labels(i)));
    }
    let dst = PROBE_DST.split(':').next().unwrap_or_default();
    api.put("pods", pod("ns-0", "probe-destination", "node-1", Some(dst), json!({}), json!({})));
    // Service s has pods 10s..10s+9 as endpoints (the slice says so; the
    // agent does not read selectors).
    for s in 0..n / 10 {
        let (ns, name) = (format!("ns-{}", s % 200), format!("svc-{s}"));
        let vip = Ipv4Addr::from(0x0a60_0000 + s as u32).to_string();
        api.put("services", service(&ns, &name, &vip, &[("http", 80, json!(8080))], false));
        let ips: Vec<String> = (10 * s..10 * s + 10).map(remote_ip).collect();
        let nodes: Vec<String> = (10 * s..10 * s + 10).map(|i| format!("node-{}", i % 500)).collect();
        let eps: Vec<(&str, bool, &str)> =
            ips.iter().zip(&nodes).map(|(ip, node)| (ip.as_str(), true, node.as_str())).collect();
        api.put("endpointslices", endpoint_slice(&ns, &format!("{name}-1"), &name, &[("http", 8080)], &eps));
    }
    api.compact();
}

/// Changes `CHURN_RATE` pods of other nodes per second for `CHURN_FOR`:
/// in turn a new address, a label flip (in and out of the mesh), a
/// deletion and the same pod created again. Returns the writes made.
fn churn(api: &ApiServer, n: usize) -> u64 {
    let start = Instant::now();
    let mut k = 0u64;
    let mut deleted = None;
    while start.elapsed() < CHURN_FOR && k < CHURN_RATE * CHURN_FOR.as_secs() {
        let i = (k as usize * 7919) % n;
        match (k % 4, deleted.take()) {
            (3, Some(j)) => {
                api.put("pods", remote_pod(j, &remote_ip(j), labels(j)));
            }
            (2, _) => {
                api.delete("pods", &format!("ns-{}", i % 200), &format!("pod-{i}"));
                deleted = Some(i);
            }
            (1, _) => {
                let mut l = labels(i);
                l[MESH] = json!(if k % 8 == 1 { "disabled" } else { "enabled" });
                api.put("pods", remote_pod(i, &remote_ip(i), l));
            }
            _ => {
                let moved = Ipv4Addr::from(0x0ac8_0000 + k as u32).to_string();
                api.put("pods", remote_pod(i, &moved, labels(i)));
            }
        }
        k += 1;
        let due = start + Duration::from_secs_f64(k as f64 / CHURN_RATE as f64);
        thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    k
}

/// The pods of one phase, made and enrolled one after another.
struct Enrol<'a> {
    api: &'a ApiServer,
    dir: &'a NetnsDir,
    workload: &'a Cgroup,
    me: &'a str,
    made: Vec<Netns>,
}

impl Enrol<'_> {
    /// Makes local pod `i` (address `ip`) and returns how long it took from
    /// the address to its first captured connect (µs).
    fn one(&mut self, i: usize, ip: &str) -> anyhow::Result<u64> {
        self.one_in("bench", i, ip)
    }

    /// The same, the pod in `namespace`.
    fn one_in(&mut self, namespace: &str, i: usize, ip: &str) -> anyhow::Result<u64> {
        let ns = empty_pod(&format!("dpbench-cl-{}-{i}", std::process::id()), Path::new(&self.dir.path()))?;
        // The runtime made the sandbox; the CNI gives the address as the
        // kubelet reports the pod to the API.
        thread::sleep(Duration::from_millis(20));
        self.api.put("pods", pod(namespace, &format!("local-{i}"), NODE, Some(ip), json!({}), json!({})));
        let cidr = format!("{ip}/32");
        let args = ["--worker", "enrol-probe", PROBE_DST, &cidr, "eth0", PROBE_WITHIN_S];
        let out = ns.command(Some(self.workload), self.me, &args).output()?;
        self.made.push(ns);
        served_after(&format!("local pod {i}"), &out)
    }
}

/// Runs one agent (`binary`) against a cluster of `n` pods.
pub fn measure(binary: &Path, n: usize, me: &Path) -> anyhow::Result<Figures> {
    let id = std::process::id();
    let tag = format!("dpbench-cluster-{id}");
    let api = ApiServer::start(&tag);
    load(&api, n);
    let (workload, own) = (Cgroup::named(&format!("{tag}-w"))?, Cgroup::named(&format!("{tag}-d"))?);
    let dir = NetnsDir::new(&tag);
    let tmp = testworld::TempDir::new(&tag)?;
    let ips: Vec<String> = (0..3 * PODS_PER_PHASE).map(pod_address).collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let certs = testworld::Certs::create(binary, tmp.0.join("certs"), &refs)?;
    let certs_dir = certs.path();
    let args = testworld::node_args(&api.kubeconfig(), NODE, &dir, &workload, &["--certs", &certs_dir]);
    let started = Instant::now();
    let dp = Dataplane::launch_within(binary, &own, &args, "warn", Duration::from_secs(120))?;
    let ready = started.elapsed();
    let pid = dp.pid();
    let rss_ready = crate::setup::rss(pid).unwrap_or(0);
    let cpu = || testworld::cpu_time(pid).unwrap_or_default();
    let before = cpu();
    thread::sleep(Duration::from_secs(5));
    let idle_cpu = cpu() - before;

    let me = me.to_str().context("bench path")?;
    let mut enrol = Enrol { api: &api, dir: &dir, workload: &workload, me, made: Vec::new() };
    let mut enrol_idle = crate::report::histogram();
    let at_start = agent_enrolments(&dp);
    for (i, ip) in ips.iter().enumerate().take(PODS_PER_PHASE) {
        enrol_idle.record(enrol.one(i, ip)?)?;
    }
    let mut enrol_churn = crate::report::histogram();
    let after_idle = agent_enrolments(&dp);
    let updates_before = update_buckets(&dp);
    let before = cpu();
    let (writes, served) = thread::scope(|s| -> anyhow::Result<_> {
        let writer = s.spawn(|| churn(&api, n));
        // The churn has begun before the first pod.
        thread::sleep(Duration::from_millis(500));
        let mut served = Vec::new();
        for (i, ip) in ips.iter().enumerate().skip(PODS_PER_PHASE).take(PODS_PER_PHASE) {
            served.push(enrol.one(i, ip));
        }
        let writes = writer.join().map_err(|_| anyhow::anyhow!("the churn panicked"))?;
        Ok((writes, served))
    })?;
    let churn_cpu = cpu() - before;
    let (batches, [p50, p99]) = quantiles_between(&updates_before, &update_buckets(&dp), [0.5, 0.99]);
    let agent_part = (mean_between(at_start, after_idle), mean_between(after_idle, agent_enrolments(&dp)));
    for us in served {
        enrol_churn.record(us?)?;
    }
    let before = cpu();
    thread::sleep(Duration::from_secs(5));
    let after_cpu = cpu() - before;
    let rss_end = crate::setup::rss(pid).unwrap_or(0);
    let heap_end = heap(&dp);
    let mut enrol_relist = crate::report::histogram();
    for (i, ip) in ips.iter().enumerate().skip(2 * PODS_PER_PHASE) {
        api.expire();
        enrol_relist.record(enrol.one_in(LAST_NAMESPACE, i, ip)?)?;
    }
    drop(dp);
    drop(enrol);
    drop(tmp);
    Ok(Figures {
        pods: n,
        ready,
        rss_ready,
        rss_end,
        heap_end,
        idle_cpu,
        churn_cpu,
        after_cpu,
        writes,
        enrol_idle,
        enrol_churn,
        enrol_relist,
        agent_part,
        map_updates: (batches, p50, p99),
    })
}

#[cfg(test)]
mod tests {
    use super::quantiles_between;

    #[test]
    fn quantiles_are_read_from_the_buckets_recorded_in_between() {
        let before = [(0.001, 10.0), (0.005, 10.0), (f64::INFINITY, 10.0)];
        // 100 more: 50 under 1 ms, 48 between 1 and 5 ms, 2 above.
        let after = [(0.001, 60.0), (0.005, 108.0), (f64::INFINITY, 110.0)];
        let (n, [p50, p99]) = quantiles_between(&before, &after, [0.5, 0.99]);
        assert_eq!(n, 100.0);
        assert_eq!(p50, Some(0.001), "the 50th of 100 is the last under 1 ms");
        assert_eq!(p99, Some(0.005), "above the last finite bound: that bound");
        let (n, [p50, _]) = quantiles_between(&after, &after, [0.5, 0.99]);
        assert_eq!((n, p50), (0.0, None), "nothing recorded: no quantile");
        let (_, [p75, _]) = quantiles_between(&before, &after, [0.75, 0.99]);
        let p75 = p75.expect("p75");
        assert!((p75 - (0.001 + 0.004 * 25.0 / 48.0)).abs() < 1e-9, "interpolated within its bucket: {p75}");
    }
}
