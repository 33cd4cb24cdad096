//! The node data plane: captures pods' outbound TCP connects with eBPF and
//! serves them on one pinned glommio executor per CPU.
//!
//! - [`config`]: the command line, validated as a whole;
//! - [`run`]: the control thread; [`demo`]: the one-command demo;
//! - [`ebpf`]: the typed door to the capture programs;
//! - [`shard`]: the per-core executors and their listeners;
//! - [`outbound`], [`inbound`], [`relay`]: the data path;
//! - [`identity`], [`ca`]: certificates and TLS configurations;
//! - [`stats`], [`dump`], [`admin`], [`reload`]: measurements and operations;
//! - [`netns`], [`enroll`], [`socket`], [`cgroup`], [`cores`]: the node plumbing; `sys`
//!   holds every `unsafe` block.
pub mod admin;
pub mod ca;
pub mod cgroup;
pub mod config;
pub mod cores;
pub mod demo;
pub mod dump;
pub mod ebpf;
pub mod enroll;
pub mod identity;
pub mod inbound;
pub mod netns;
pub mod outbound;
pub mod relay;
pub mod reload;
pub mod run;
pub mod shard;
pub mod socket;
pub mod stats;
mod sys;

pub use sys::raise_open_file_limit;
