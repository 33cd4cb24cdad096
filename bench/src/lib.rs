//! Load tests through the real data path (`cargo bench -p bench`, as root).
//!
//! Every workload runs twice in the same run, with the same client and the
//! same server in a network namespace the bench makes: once direct, once
//! captured by the data plane (loopback mode: client in the workload cgroup →
//! 127.0.0.1:18000 → mutual TLS → 127.0.0.1:18001 → server), and is reported
//! as a ratio, and through a haproxy pair (mutual TLS 1.3, the same
//! certificates) as the yardstick. See `bench/README.md`.
//!
//! - [`setup`]: the namespace, cgroups, certificates and the data plane;
//! - [`server`]: echo and discard servers (mio) inside the namespace;
//! - [`worker`]: the load generators, run as child processes so they can be
//!   placed in the workload cgroup;
//! - [`haproxy`]: the yardstick, a haproxy pair doing the same job, and the
//!   proxies' CPU time;
//! - [`report`]: histograms, the table, JSON and `.hgrm` files;
//! - [`enrol`]: how fast a new pod is served;
//! - [`cni`]: what the CNI plugin adds to a pod's start;
//! - [`cluster`]: what a cluster's size and churn cost one agent.
pub mod cluster;
pub mod cni;
pub mod enrol;
pub mod haproxy;
pub mod report;
pub mod server;
pub mod setup;
pub mod worker;
