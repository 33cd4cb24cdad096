//! One executor's TLS configurations. rustls's session stores sit behind a
//! `Mutex`; configurations shared by every executor would make that a lock
//! on the handshake path shared by every core. Each executor instead builds
//! its own configurations (and so its own session stores) the first time it
//! needs an address, from the shared, immutable [`Identity`], and drops them
//! all when new certificates arrive.
//!
//! The cost: a resumption ticket is only honoured by the executor that
//! issued it, so with N executors about 1/N of reconnects resume (the bench
//! reports the connection rate either way).
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use rustls::{ClientConfig, ServerConfig};

use crate::identity::{Error, Identity};

/// This executor's configurations, by address.
#[derive(Debug)]
pub struct TlsConfigs {
    identity: Arc<Identity>,
    client: HashMap<IpAddr, Arc<ClientConfig>>,
    server: HashMap<IpAddr, Arc<ServerConfig>>,
}

impl TlsConfigs {
    /// None built yet.
    pub fn new(identity: Arc<Identity>) -> Self {
        Self { identity, client: HashMap::new(), server: HashMap::new() }
    }

    /// New certificates: forget every configuration built from the old ones.
    pub fn replace(&mut self, identity: Arc<Identity>) {
        *self = Self::new(identity);
    }

    /// The client configuration for a tunnel leaving from `src`.
    pub fn client(&mut self, src: IpAddr) -> Result<Arc<ClientConfig>, Error> {
        cached(&mut self.client, src, |ip| self.identity.client_config(ip))
    }

    /// The server configuration for a tunnel that arrived at `local`.
    pub fn server(&mut self, local: IpAddr) -> Result<Arc<ServerConfig>, Error> {
        cached(&mut self.server, local, |ip| self.identity.server_config(ip))
    }
}

/// The configuration for `ip` from `built`, building it on first use.
fn cached<C>(
    built: &mut HashMap<IpAddr, Arc<C>>,
    ip: IpAddr,
    build: impl FnOnce(IpAddr) -> Result<C, Error>,
) -> Result<Arc<C>, Error> {
    if let Some(c) = built.get(&ip) {
        return Ok(c.clone());
    }
    let c = Arc::new(build(ip)?);
    built.insert(ip, c.clone());
    Ok(c)
}
