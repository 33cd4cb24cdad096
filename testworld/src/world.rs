//! The usual test world: two pods and one data plane serving both.
use crate::{run_args, two_pods, Certs, Cgroup, Dataplane, Netns};

/// Pods A (10.77.0.1) and B (10.77.0.2) joined by veth, and one data plane
/// serving both (capturing 10.77.0.0/16, with `extra` flags). Dropped in
/// field order: the data plane first, so its process is reaped before its
/// cgroup is removed (a zombie keeps a cgroup populated). Use the fields
/// through the struct (or references to them): moving them out would let
/// them drop in another order.
#[derive(Debug)]
pub struct World {
    /// The data plane.
    pub dp: Dataplane,
    /// Pod A.
    pub a: Netns,
    /// Pod B.
    pub b: Netns,
    /// B's interface (to add addresses).
    pub b_if: String,
    /// Where captured clients run.
    pub workload: Cgroup,
    /// The data plane's own cgroup.
    pub own: Cgroup,
    /// The certificates.
    pub certs: Certs,
}

/// A [`World`] with certificates for `ips`.
pub fn world(t: &str, ips: &[&str], extra: &[&str]) -> World {
    let certs = Certs::new(t, ips);
    let workload = Cgroup::new(t, "w");
    let own = Cgroup::new(t, "d");
    let (a, b, b_if) = two_pods(t);
    let dp = Dataplane::start(&own, &run_args(&workload, "10.77.0.0/16", &certs, &[&a, &b], extra));
    World { dp, a, b, b_if, workload, own, certs }
}
