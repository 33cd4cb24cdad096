//! `sessionAffinity: ClientIP` as kube-proxy keeps it: a client goes back to
//! the endpoint it last used on a service port for as long as it comes back
//! within the Service's `timeoutSeconds` (each connection starts the time
//! again) and the endpoint is still one of the Service's; otherwise a new
//! choice ([`super::choose`]: the rendezvous hash) is made and remembered.
//!
//! One table per node, shared by the executors (kube-proxy's is per node
//! too), so a client's connections agree whichever executor takes them. It
//! is touched only for Services that ask for affinity, for a moment under a
//! lock. Its size is bounded by what it serves: the clients are this node's
//! pods, so it holds at most one entry per local pod and affinity service
//! port; entries past their timeout are swept whenever the table has doubled
//! since the last sweep.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{Backend, Frontend};

/// The endpoint each client last used, per service port.
#[derive(Debug, Default)]
pub struct Affinity {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    stuck: HashMap<(SocketAddr, IpAddr), Stuck>,
    /// The table's size after the last sweep.
    swept: usize,
}

#[derive(Debug, Clone, Copy)]
struct Stuck {
    endpoint: SocketAddr,
    last: Instant,
    timeout: Duration,
}

impl Stuck {
    fn live(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last) <= self.timeout
    }
}

impl Affinity {
    /// The endpoint of `fe` (reached at `vip`) for `client` at `now`: the one
    /// it used last if that is recent enough and still an endpoint, else
    /// `choose`'s pick, remembered. Services without affinity are not
    /// looked up.
    pub fn choose(
        &self,
        vip: SocketAddr,
        fe: &Frontend,
        client: IpAddr,
        now: Instant,
        choose: impl FnOnce() -> Option<Backend>,
    ) -> Option<Backend> {
        let Some(timeout) = fe.client_ip_affinity else { return choose() };
        // A poisoned lock only means another executor panicked mid-update
        // of plain data: the table is still sound.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (vip, client);
        let kept = inner
            .stuck
            .get(&key)
            .filter(|s| s.live(now))
            .and_then(|s| fe.backends.iter().find(|b| b.addr == s.endpoint))
            .copied();
        let picked = match kept {
            Some(b) => b,
            None => choose()?,
        };
        inner.stuck.insert(key, Stuck { endpoint: picked.addr, last: now, timeout });
        if inner.stuck.len() > 2 * inner.swept.max(512) {
            inner.stuck.retain(|_, s| s.live(now));
            inner.swept = inner.stuck.len();
        }
        Some(picked)
    }
}

#[cfg(test)]
mod tests;
