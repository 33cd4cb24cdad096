//! The host the data plane runs on: the eBPF programs and maps ([`ebpf`]),
//! network namespaces ([`netns`]), the one socket factory ([`socket`]),
//! cgroups, CPUs and process limits. `sys` holds every `unsafe` block.
pub mod cgroup;
pub mod cores;
pub mod ebpf;
pub mod netns;
pub mod rlimit;
pub mod socket;
pub(crate) mod sys;
