//! The node data plane: captures pods' outbound TCP connects with eBPF and
//! serves them on one pinned glommio executor per CPU.
//!
//! The folders are the architecture:
//!
//! - [`proxy`]: the data path. The executors, the outbound and inbound sides
//!   of a connection, the relay and the same-node splice, the one record of
//!   each connection, its failure reasons and its measurements;
//! - [`control`]: the control thread. Start-up, the run loop, pods' enrolment
//!   (from a namespace directory or the CNI plugin), the return path, and
//!   taking everything off the node;
//! - [`cluster`]: what we know of the cluster. The model (workloads and
//!   Services, updated in place), the Services' endpoint choice, the
//!   authorization policies, and where changes come from (the Kubernetes
//!   API or a file);
//! - [`identity`]: certificates. The TLS configurations of every address, the
//!   node CA's minting of pod certificates, their formats, reload;
//! - [`node`]: the host. eBPF programs and maps, network namespaces,
//!   sockets, cgroups, cores, limits; `sys` holds every `unsafe` block;
//! - [`ops`]: what operators read. The admin endpoint and the SIGUSR1 dump;
//! - [`config`]: the command line, validated as a whole (`dataplane issuer`,
//!   the cluster's node-CA signer and a Deployment of its own, is the
//!   `dataplane-issuer` crate, which does not link this one).
//!
//! Imports go one way: `control` drives `proxy`, `cluster` and `identity`;
//! `proxy` reads `cluster` (Services, policies) and `identity`; all use
//! `node`; nothing below imports `control`.
pub mod cluster;
pub mod config;
pub mod control;
pub mod identity;
pub mod node;
pub mod ops;
pub mod proxy;

pub use node::rlimit::raise_open_file_limit;
