//! What the model keeps of each API object: only the fields we use.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::{core::v1::Service as K8sService, discovery::v1::EndpointSlice};
use kube::{
    api::{ApiResource, DynamicObject},
    ResourceExt,
};
use tracing::{info, warn};

use crate::{
    cluster::model::{CLIENT_ADDRESS, MESH_LABEL, SKIP_INBOUND, SKIP_OUTBOUND},
    cluster::policy::{Parsed, Policy},
    cluster::services::{Endpoint, Hint, Readiness, ServicePort, Slice, DEFAULT_AFFINITY_TIMEOUT},
};

/// What a pod contributes to the model: only the fields we use, and of its
/// labels and annotations only ours (a pod's other metadata is most of its
/// size, and an agent keeps every pod of the cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PodView {
    /// Kept once for all the pods that share it.
    pub(super) service_account: Arc<str>,
    /// Whether it runs on this node (its node's name is not kept: one string
    /// per pod of the cluster).
    pub(super) local: bool,
    pub(super) addresses: Vec<IpAddr>,
    pub(super) host_network: bool,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) annotations: BTreeMap<String, String>,
}

/// The labels or annotations among `all` that the model reads.
pub(super) fn ours(all: &BTreeMap<String, String>, keys: &[&str]) -> BTreeMap<String, String> {
    keys.iter().filter_map(|k| Some((k.to_string(), all.get(*k)?.clone()))).collect()
}

/// What the model keeps of a pod: of one of another node, only our label
/// (the cluster's pods are many); of one of `node`, every label, for the
/// authorization policies that select it.
pub(super) fn view(pod: &super::slim::SlimPod, node: &str, names: &super::state::Names) -> Option<PodView> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    // A finished pod's address goes back to the pool: never trust it.
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return None;
    }
    // Every family: a dual-stack pod has one address of each.
    let mut addresses: Vec<IpAddr> =
        status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().filter_map(|ip| ip.ip.parse().ok()).collect();
    if addresses.is_empty() {
        addresses.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    // Kept for as long as the pod lives: no room for a second address.
    addresses.shrink_to_fit();
    let local = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
    Some(PodView {
        service_account: names.intern(spec.and_then(|s| s.service_account_name.as_deref()).unwrap_or("default")),
        local,
        addresses,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        labels: match local {
            true => pod.labels().clone(),
            false => ours(pod.labels(), &[MESH_LABEL]),
        },
        annotations: ours(pod.annotations(), &[SKIP_OUTBOUND, SKIP_INBOUND, CLIENT_ADDRESS]),
    })
}

/// Istio's `security.istio.io/v1` `AuthorizationPolicy` (its CRD ships in
/// `deploy/`, for clusters without Istio).
pub(super) fn authorization_policies() -> ApiResource {
    ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    }
}

/// A policy as applied here (`None`: not applied: `AUDIT`, `CUSTOM`,
/// waypoints). What cannot be enforced is logged with the policy's name.
pub(super) fn policy_view(o: &DynamicObject) -> Option<Arc<Policy>> {
    let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
    let spec = o.data.get("spec").cloned().unwrap_or(serde_json::Value::Null);
    match crate::cluster::policy::parse(&ns, &name, &spec) {
        Parsed::Policy(p) => {
            if !p.unsupported.is_empty() {
                warn!(policy = p.name, unsupported = ?p.unsupported,
                      "authorization policy: what needs L7 (or does not parse) is applied the safe way: an ALLOW rule naming it allows nothing, a DENY rule denies by its L4 fields");
            }
            Some(Arc::new(p))
        }
        Parsed::Ignored(why) => {
            info!(policy = %format!("{ns}/{name}"), why, "authorization policy not applied here");
            None
        }
    }
}

/// What a Service contributes: its ClusterIPs (none for a headless one),
/// TCP ports and affinity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServiceView {
    pub(super) cluster_ips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP`, with its timeout.
    pub(super) client_ip_affinity: Option<std::time::Duration>,
    /// `internalTrafficPolicy: Local`.
    pub(super) node_local: bool,
    /// `trafficDistribution` set, or `topology-mode: Auto`: zone hints
    /// followed.
    pub(super) zone_hints: bool,
}

/// The annotation that asked for zone hints before `trafficDistribution`.
pub(super) const TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";

pub(super) fn service_view(s: &K8sService) -> Option<ServiceView> {
    let spec = s.spec.as_ref()?;
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.clone());
    }
    let cluster_ips: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some(ServicePort { name: p.name.clone().unwrap_or_default(), port: u16::try_from(p.port).ok()? })
        })
        .collect();
    Some(ServiceView {
        cluster_ips,
        ports,
        client_ip_affinity: (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            let config = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref());
            config
                .and_then(|c| c.timeout_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map_or(DEFAULT_AFFINITY_TIMEOUT, std::time::Duration::from_secs)
        }),
        node_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        zone_hints: spec.traffic_distribution.is_some()
            || matches!(s.annotations().get(TOPOLOGY_MODE).map(String::as_str), Some("Auto" | "auto")),
    })
}

/// What an EndpointSlice contributes: the service it belongs to, its
/// resolved ports and its endpoints (IPv4 and IPv6 slices; FQDN ones are
/// not routed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SliceView {
    pub(super) service: Arc<str>,
    pub(super) slice: Slice,
}

pub(super) fn slice_view(s: &EndpointSlice, node: &str, zone: Option<&str>) -> Option<SliceView> {
    if s.address_type != "IPv4" && s.address_type != "IPv6" {
        return None;
    }
    let service: Arc<str> = s.labels().get("kubernetes.io/service-name")?.as_str().into();
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u16::try_from(p.port?).ok()?)))
        .collect();
    let endpoints = s
        .endpoints
        .iter()
        .flat_map(|e| {
            // "ready: nil should be interpreted as true"; serving nil is
            // ready; terminating nil is false (discovery/v1).
            let c = e.conditions.as_ref();
            let state =
                Readiness::of(c.and_then(|c| c.ready), c.and_then(|c| c.serving), c.and_then(|c| c.terminating));
            let local = e.node_name.as_deref() == Some(node);
            let zones = e.hints.as_ref().and_then(|h| h.for_zones.as_ref()).filter(|z| !z.is_empty());
            let hint = match (zones, zone) {
                (Some(zones), Some(ours)) if zones.iter().any(|z| z.name == ours) => Hint::Here,
                (Some(_), Some(_)) => Hint::Elsewhere,
                _ => Hint::None,
            };
            e.addresses.iter().filter_map(move |a| Some(Endpoint { addr: a.parse().ok()?, state, local, hint }))
        })
        .collect();
    Some(SliceView { service, slice: Slice { ports, endpoints } })
}
