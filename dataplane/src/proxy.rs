//! The data path: one pinned executor per CPU ([`executor`]), each serving
//! the outbound ([`outbound`]) and inbound ([`inbound`]) sides of the
//! connections it accepts, over the connection layer ([`conn`]: per-executor
//! state, admission, one record per connection), the [`relay`] and the
//! same-node [`splice`]; [`reason`] names why a connection failed, [`addrs`]
//! tells addresses apart by role, [`stats`] counts and times it all.
pub mod addrs;
pub mod conn;
pub mod executor;
pub mod inbound;
pub mod outbound;
pub mod reason;
pub mod relay;
pub mod route;
pub mod splice;
pub mod stats;
