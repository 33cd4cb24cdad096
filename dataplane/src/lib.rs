//! The node data plane: captures pods' outbound TCP connects with eBPF and
//! serves them on one pinned glommio executor per CPU.
//!
//! - [`config`]: the command line, validated as a whole;
//! - [`run`]: the control thread (`dataplane-demo`, the one-command demo, is
//!   a binary of its own over the `testworld` crate);
//! - [`ebpf`]: the typed door to the capture programs;
//! - [`shard`]: the per-core executors and their listeners;
//! - [`outbound`], [`inbound`]: the two sides of the data path, over
//!   [`conn`] (per-executor state, one record per connection, TLS configs),
//!   [`relay`], [`reason`] and [`addrs`];
//! - [`identity`], [`ca`]: certificates and TLS configurations;
//! - [`stats`], [`dump`], [`admin`], [`reload`]: measurements and operations;
//! - [`model`], [`source`]: the workloads, from the Kubernetes API or a file;
//! - [`netns`], [`enroll`], [`socket`], [`cgroup`], [`cores`], [`rlimit`]: the node plumbing; `sys`
//!   holds every `unsafe` block.
pub mod addrs;
pub mod admin;
pub mod ca;
pub mod cgroup;
pub mod cni;
pub mod config;
pub mod conn;
pub mod cores;
pub mod dump;
pub mod ebpf;
pub mod enroll;
pub mod identity;
pub mod inbound;
pub mod issuer;
pub mod mint;
pub mod model;
pub mod netns;
pub mod outbound;
pub mod pki;
pub mod policy;
pub mod reason;
pub mod relay;
pub mod reload;
pub mod return_path;
pub mod rlimit;
pub mod run;
pub mod services;
pub mod shard;
pub mod socket;
pub mod source;
pub mod splice;
pub mod stats;
mod sys;
pub mod uninstall;

pub use rlimit::raise_open_file_limit;
