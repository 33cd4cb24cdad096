//! What both sides of a boundary must agree on.
//!
//! - [`maps`]: the `#[repr(C)]` keys and values of the eBPF maps, mirroring
//!   `bpf/src/capture.h` byte for byte;
//! - [`preamble`]: the tunnel preamble codec (sans-IO).
//!
//! Nothing here does I/O.
#![deny(unsafe_code)]

pub mod cni;
pub mod maps;
pub mod preamble;

/// Port of the outbound capture listener (127.0.0.1 in every enrolled namespace).
pub const OUTBOUND_PORT: u16 = 18000;
/// Port of the inbound mutual-TLS tunnel listener (0.0.0.0 in every enrolled namespace).
pub const INBOUND_PORT: u16 = 18001;
