//! What the data plane knows of the workloads: which addresses belong to
//! meshed pods (anywhere: destinations), and which of them run on this node
//! (to enrol). One model, fed by one source: the Kubernetes API
//! ([`crate::cluster::source::kube`]) or a local file ([`crate::cluster::source::file`]).
//!
//! Mesh membership is explicit and per pod: a pod is meshed when its
//! namespace carries [`MESH_LABEL`]`=enabled` and the pod does not carry
//! [`MESH_LABEL`]`=disabled`; host-network pods never are. Two annotations
//! name ports to leave alone: [`SKIP_OUTBOUND`] (destination ports the pod's
//! own connects keep going direct to) and [`SKIP_INBOUND`] (ports of the pod
//! that clients reach directly).
//!
//! The model is updated in place, one object at a time ([`Model::apply`]):
//! a pod's change touches that pod's entries and what depends on its
//! addresses (the meshed destinations, the Services it is an endpoint of),
//! never the whole, so its cost does not grow with the cluster. What an
//! update changed comes back as [`Effects`] for the eBPF maps and the
//! executors.
use std::{net::IpAddr, path::PathBuf, sync::Arc};

mod index;
mod membership;
mod names;

pub use index::{Change, Effects, Model, Sandbox};
pub use membership::{membership, opted_in, parse_ports};
pub use names::Names;

/// Namespace label (`enabled`) and pod label (`disabled`) of mesh membership.
pub const MESH_LABEL: &str = "dataplane.dev/mesh";

/// Namespace label: `strict` refuses plaintext connections from outside the
/// mesh to its meshed pods (as Istio's PeerAuthentication STRICT).
pub const MTLS_LABEL: &str = "dataplane.dev/mtls";
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
    /// Its Kubernetes namespace (shared with its key and its namespace's
    /// other pods: the model holds every pod of the cluster).
    pub namespace: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
    /// Its service account (the identity its certificate will carry).
    pub service_account: Arc<str>,
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
    /// Its labels, for the authorization policies that select pods by
    /// them: a local pod's only (policies are enforced where the pod runs).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its namespace carries [`MTLS_LABEL`]`=strict`: only tunnels (and
    /// the node's probes) reach it.
    pub strict: bool,
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

/// A namespaced object's name: a pod's or a Service's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// Its Kubernetes namespace (shared: a cluster has few).
    pub namespace: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
}

impl ObjectRef {
    /// `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Workload {
    /// Whether it is in the mesh.
    pub fn meshed(&self) -> bool {
        matches!(self.mode, Mode::Meshed { .. })
    }

    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        self.object().to_string()
    }

    /// Its name as a key.
    pub fn object(&self) -> ObjectRef {
        ObjectRef { namespace: self.namespace.clone(), name: self.name.clone() }
    }
}
