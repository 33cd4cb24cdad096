//! The connection layer: what the outbound and inbound sides share, below
//! the executors and above the relay and the sockets.
//!
//! Imports go one way: `shard` → `outbound`/`inbound` → `conn` → `relay`,
//! `socket`, `stats`, `reason`, `identity`, `netns`, `sys`. This module holds
//!
//! - [`ShardCtx`]: one executor's own state, shared by its tasks (never
//!   across threads), and the [`Timeouts`];
//! - [`Record`]: a connection's outcome, recorded exactly once;
//! - [`TlsConfigs`]: this executor's own TLS configurations and session
//!   stores, built from the shared, immutable [`Identity`].
mod record;
mod tls;

use std::{
    cell::RefCell,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

pub use record::Record;
pub use tls::TlsConfigs;

use crate::{identity::Identity, stats::Snapshot};

/// Handshake and idle limits.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For the TLS handshake and the preamble, together.
    pub handshake: Duration,
    /// For a connection on which no byte moves either way.
    pub idle: Duration,
}

/// Connections open on one executor: raised and lowered by [`Record`] on its
/// executor, read by the control thread without asking the executor (for
/// drain and memory trimming). One writer, so `Relaxed` is enough.
#[derive(Debug, Default)]
pub struct Open(AtomicU64);

impl Open {
    fn up(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn down(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// How many are open now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One executor's own state, shared by its tasks (never across threads).
#[derive(Debug)]
pub struct ShardCtx {
    /// The CPU it is pinned to.
    pub cpu: usize,
    /// SO_MARK of our own sockets.
    pub bypass_mark: u32,
    /// Limits.
    pub timeouts: Timeouts,
    tls: RefCell<TlsConfigs>,
    stats: RefCell<Snapshot>,
    open: Arc<Open>,
}

impl ShardCtx {
    /// The state of a new executor.
    pub fn new(cpu: usize, bypass_mark: u32, timeouts: Timeouts, identity: Arc<Identity>, open: Arc<Open>) -> Self {
        Self {
            cpu,
            bypass_mark,
            timeouts,
            tls: RefCell::new(TlsConfigs::new(identity)),
            stats: RefCell::new(Snapshot::default()),
            open,
        }
    }

    /// Records into this executor's measurements.
    pub fn with_stats<T>(&self, f: impl FnOnce(&mut Snapshot) -> T) -> T {
        f(&mut self.stats.borrow_mut())
    }

    /// A copy of this executor's measurements.
    pub fn snapshot(&self) -> Snapshot {
        self.stats.borrow().clone()
    }

    /// New certificates, for new handshakes.
    pub fn set_identity(&self, identity: Arc<Identity>) {
        self.tls.borrow_mut().replace(identity);
    }

    /// This executor's client configuration for a tunnel leaving from `src`.
    pub fn client_config(&self, src: IpAddr) -> Result<Arc<rustls::ClientConfig>, crate::identity::Error> {
        self.tls.borrow_mut().client(src)
    }

    /// This executor's server configuration for a tunnel that arrived at
    /// `local`.
    pub fn server_config(&self, local: IpAddr) -> Result<Arc<rustls::ServerConfig>, crate::identity::Error> {
        self.tls.borrow_mut().server(local)
    }
}
