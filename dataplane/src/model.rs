//! What the data plane knows of the workloads: which addresses belong to
//! meshed pods (anywhere: destinations), and which of them run on this node
//! (to enrol). One model, fed by one source: the Kubernetes API
//! ([`crate::source::kube`]) or a local file ([`crate::source::file`]).
//!
//! Mesh membership is explicit and per pod: a pod is meshed when its
//! namespace carries [`MESH_LABEL`]`=enabled` and the pod does not carry
//! [`MESH_LABEL`]`=disabled`; host-network pods never are. Two annotations
//! name ports to leave alone: [`SKIP_OUTBOUND`] (destination ports the pod's
//! own connects keep going direct to) and [`SKIP_INBOUND`] (ports of the pod
//! that clients reach directly).
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc};

use dataplane_common::{maps::POD_PORTS, INBOUND_PORT, OUTBOUND_PORT};

/// Namespace label (`enabled`) and pod label (`disabled`) of mesh membership.
pub const MESH_LABEL: &str = "dataplane.dev/mesh";
/// Pod annotation: destination ports its connects are never captured for
/// (comma-separated).
pub const SKIP_OUTBOUND: &str = "dataplane.dev/skip-outbound-ports";
/// Pod annotation: its own ports that clients reach directly, not through
/// the tunnel (comma-separated).
pub const SKIP_INBOUND: &str = "dataplane.dev/skip-inbound-ports";

/// Pod annotation: `off` makes the application see connections from the
/// pod's own address instead of the client's.
pub const CLIENT_ADDRESS: &str = "dataplane.dev/client-address";

/// One pod (or, from a file, one workload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Its Kubernetes namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its service account (the identity its certificate will carry).
    pub service_account: String,
    /// Its addresses, IPv4 and IPv6 (none until the CNI has given it one).
    pub addresses: Vec<IpAddr>,
    /// Whether it runs on this node (and so is ours to enrol).
    pub local: bool,
    /// Its network namespace file, when the source names it (a file may);
    /// otherwise found by address under `--netns-dir`.
    pub netns: Option<PathBuf>,
    /// Whether its application sees the client's address (the
    /// [`CLIENT_ADDRESS`] annotation, on unless `off`).
    pub client_address: bool,
    /// Whether and how it is in the mesh.
    pub mode: Mode,
}

/// A workload's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// In the mesh, with the ports it leaves alone.
    Meshed {
        /// Destination ports its own connects go direct to.
        skip_outbound: Vec<u16>,
        /// Its ports that clients reach directly.
        skip_inbound: Vec<u16>,
    },
    /// Not in the mesh, and why.
    Outside(Outside),
}

/// Why a workload is not in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outside {
    /// `hostNetwork: true`: it shares the node's namespace.
    HostNetwork,
    /// Its namespace does not carry the opt-in label.
    NotOptedIn,
    /// It carries the opt-out label.
    OptedOut,
    /// An annotation we cannot read: left alone rather than half-meshed.
    BadAnnotation(String),
    /// Said so by the workloads file.
    Declared,
}

impl Outside {
    /// A label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Outside::HostNetwork => "host_network",
            Outside::NotOptedIn => "namespace_not_opted_in",
            Outside::OptedOut => "pod_opted_out",
            Outside::BadAnnotation(_) => "bad_annotation",
            Outside::Declared => "declared_outside",
        }
    }
}

impl Workload {
    /// Whether it is in the mesh.
    pub fn meshed(&self) -> bool {
        matches!(self.mode, Mode::Meshed { .. })
    }

    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The workloads as one source last reported them. Immutable once built:
/// the control thread swaps whole models.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    workloads: Vec<Workload>,
    services: Vec<crate::services::Service>,
    /// Where the local workloads are in `workloads`: a node's hundred pods
    /// among a cluster's, looked up on every look at the namespace directory.
    local: Vec<usize>,
}

impl Model {
    /// A model of these workloads.
    pub fn new(workloads: Vec<Workload>) -> Arc<Self> {
        Self::with_services(workloads, Vec::new())
    }

    /// A model of these workloads and services.
    pub fn with_services(mut workloads: Vec<Workload>, mut services: Vec<crate::services::Service>) -> Arc<Self> {
        workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let local = workloads.iter().enumerate().filter(|(_, w)| w.local).map(|(i, _)| i).collect();
        Arc::new(Self { workloads, services, local })
    }

    /// The service table: every ClusterIP:port and its ready endpoints,
    /// marked meshed when `meshed` (see [`Model::meshed_destinations`])
    /// holds the address.
    pub fn service_table(&self, meshed: &BTreeMap<IpAddr, Vec<u16>>) -> crate::services::Table {
        crate::services::table(&self.services, |ip| meshed.contains_key(&ip))
    }

    /// Every workload.
    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    /// The workloads on this node.
    pub fn local(&self) -> impl Iterator<Item = &Workload> {
        self.local.iter().map(|i| &self.workloads[*i])
    }

    /// The local workload holding `addr`, if one does. Two local workloads
    /// claiming one address (a stale object beside its successor) give
    /// `Err` with both names: neither is trusted until it clears.
    pub fn local_with(&self, addr: IpAddr) -> Result<Option<&Workload>, String> {
        let mut found = self.local().filter(|w| w.addresses.contains(&addr));
        match (found.next(), found.next()) {
            (Some(a), Some(b)) => Err(format!("{addr} is claimed by both {} and {}", a.key(), b.key())),
            (first, _) => Ok(first),
        }
    }

    /// Local workloads that name their namespace file.
    pub fn named_netns(&self) -> impl Iterator<Item = &PathBuf> {
        self.local().filter_map(|w| w.netns.as_ref())
    }

    /// Every meshed address, anywhere, with the inbound ports its pod leaves
    /// alone: what `connect4` tunnels to.
    pub fn meshed_destinations(&self) -> BTreeMap<IpAddr, Vec<u16>> {
        let mut out = BTreeMap::new();
        for w in &self.workloads {
            if let Mode::Meshed { skip_inbound, .. } = &w.mode {
                for a in &w.addresses {
                    out.insert(*a, skip_inbound.clone());
                }
            }
        }
        out
    }

    /// How many local workloads are meshed, and how many are outside for
    /// each reason.
    pub fn local_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for w in self.local() {
            let label = match &w.mode {
                Mode::Meshed { .. } => "meshed",
                Mode::Outside(why) => why.label(),
            };
            *m.entry(label).or_default() += 1;
        }
        m
    }
}

/// Mesh membership from the labels and annotations of a pod and of its
/// namespace (`None`: the namespace is not known yet, so not opted in).
pub fn membership(
    host_network: bool,
    namespace_labels: Option<&BTreeMap<String, String>>,
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
) -> Mode {
    if host_network {
        return Mode::Outside(Outside::HostNetwork);
    }
    if namespace_labels.and_then(|l| l.get(MESH_LABEL)).map(String::as_str) != Some("enabled") {
        return Mode::Outside(Outside::NotOptedIn);
    }
    if pod_labels.get(MESH_LABEL).map(String::as_str) == Some("disabled") {
        return Mode::Outside(Outside::OptedOut);
    }
    let ports = |key: &str| match pod_annotations.get(key) {
        None => Ok(Vec::new()),
        Some(v) => parse_ports(v).map_err(|e| format!("annotation {key}={v:?}: {e}")),
    };
    match (ports(SKIP_OUTBOUND), ports(SKIP_INBOUND)) {
        (Ok(skip_outbound), Ok(skip_inbound)) => Mode::Meshed { skip_outbound, skip_inbound },
        (Err(e), _) | (_, Err(e)) => Mode::Outside(Outside::BadAnnotation(e)),
    }
}

/// A comma-separated list of at most [`POD_PORTS`] ports, none of them the
/// data plane's own.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: u16 = part.parse().map_err(|_| format!("{part:?} is not a port (1-65535)"))?;
        if p == 0 {
            return Err("port 0".into());
        }
        if p == OUTBOUND_PORT || p == INBOUND_PORT {
            return Err(format!("port {p} is the data plane's own"));
        }
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    if ports.len() > POD_PORTS {
        return Err(format!("{} ports; at most {POD_PORTS} per pod", ports.len()));
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_pod_is_meshed_only_when_its_namespace_opts_in_and_it_does_not_opt_out() {
        let on = labels(&[(MESH_LABEL, "enabled")]);
        let off = labels(&[(MESH_LABEL, "disabled")]);
        let none = labels(&[]);
        let meshed = Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![] };
        assert_eq!(membership(false, Some(&on), &none, &none), meshed);
        assert_eq!(membership(false, Some(&none), &none, &none), Mode::Outside(Outside::NotOptedIn));
        assert_eq!(membership(false, None, &none, &none), Mode::Outside(Outside::NotOptedIn));
        // Any other value of the namespace label is not an opt-in.
        let typo = labels(&[(MESH_LABEL, "true")]);
        assert_eq!(membership(false, Some(&typo), &none, &none), Mode::Outside(Outside::NotOptedIn));
        assert_eq!(membership(false, Some(&on), &off, &none), Mode::Outside(Outside::OptedOut));
        // Host-network pods never, whatever their labels.
        assert_eq!(membership(true, Some(&on), &none, &none), Mode::Outside(Outside::HostNetwork));
    }

    #[test]
    fn annotations_name_the_ports_left_alone() {
        let on = labels(&[(MESH_LABEL, "enabled")]);
        let ann = labels(&[(SKIP_OUTBOUND, "5432, 6379"), (SKIP_INBOUND, "9090")]);
        assert_eq!(
            membership(false, Some(&on), &labels(&[]), &ann),
            Mode::Meshed { skip_outbound: vec![5432, 6379], skip_inbound: vec![9090] }
        );
        let bad = labels(&[(SKIP_INBOUND, "http")]);
        let Mode::Outside(Outside::BadAnnotation(why)) = membership(false, Some(&on), &labels(&[]), &bad) else {
            panic!("a bad annotation leaves the pod alone")
        };
        assert!(why.contains(SKIP_INBOUND) && why.contains("http"), "{why}");
    }

    #[test]
    fn port_lists_are_checked() {
        assert_eq!(parse_ports(""), Ok(vec![]));
        assert_eq!(parse_ports("80,80,443"), Ok(vec![80, 443]));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("65536").is_err());
        assert!(parse_ports("18001").expect_err("own port").contains("own"));
        assert!(parse_ports("1,2,3,4,5,6,7,8,9").expect_err("too many").contains("at most 8"));
    }

    fn workload(name: &str, addr: &str, local: bool, mode: Mode) -> Workload {
        Workload {
            namespace: "ns".into(),
            name: name.into(),
            service_account: "default".into(),
            addresses: vec![addr.parse().expect("addr")],
            local,
            netns: None,
            client_address: true,
            mode,
        }
    }

    #[test]
    fn destinations_are_every_meshed_address_and_local_lookups_see_conflicts() {
        let meshed = || Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![9090] };
        let m = Model::new(vec![
            workload("a", "10.0.0.1", true, meshed()),
            workload("b", "10.0.1.1", false, meshed()),
            workload("c", "10.0.0.2", true, Mode::Outside(Outside::HostNetwork)),
            workload("d", "10.0.0.3", true, meshed()),
            workload("e", "10.0.0.3", true, meshed()),
        ]);
        let dsts = m.meshed_destinations();
        assert_eq!(dsts.keys().map(ToString::to_string).collect::<Vec<_>>(), ["10.0.0.1", "10.0.0.3", "10.0.1.1"]);
        assert_eq!(dsts[&"10.0.0.1".parse::<IpAddr>().expect("ip")], vec![9090]);
        let name = |ip: &str| m.local_with(ip.parse().expect("ip")).map(|w| w.map(|w| w.name.clone()));
        assert_eq!(name("10.0.0.1"), Ok(Some("a".into())));
        assert_eq!(name("10.0.1.1"), Ok(None), "not local");
        assert!(name("10.0.0.3").expect_err("conflict").contains("ns/d and ns/e"));
        assert_eq!(m.local_counts(), [("host_network", 1), ("meshed", 3)].into_iter().collect());
    }
}
