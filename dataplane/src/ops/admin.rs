//! The admin endpoint, off the data path: `GET /live`, `GET /ready` and
//! `GET /metrics` over HTTP/1.1, served by hyper on a single-threaded tokio
//! runtime on a thread of its own, never by an executor.
//!
//! What it guarantees, whoever else is connected:
//! - `/live` and `/ready` are answered on the admin thread from shared state
//!   ([`Health`]): no round trip to the control thread, no lock held by
//!   anything slow, so a probe answers in microseconds while a scrape or a
//!   crowd of idle clients is being served;
//! - every connection is bounded in time (the request head must arrive
//!   within [`HEAD_TIMEOUT`], the whole exchange within
//!   [`CONNECTION_TIMEOUT`]) and in count ([`MAX_CONNECTIONS`]; beyond it a
//!   new connection is closed at once), and both are counted;
//! - `/metrics` goes to the control thread (which owns the eBPF handle and
//!   asks the executors), at most [`MAX_SCRAPES`] at a time.
mod http;
mod metrics;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

pub use metrics::{render, AdminClosed, Certificates, CniFigures, Extra, Reloads};

use crate::{node::netns::NetnsId, proxy::executor::Listening};

/// Open admin connections at most; more are closed at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Time for a client to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for a whole connection (the request and its answer).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// `/metrics` requests served at once.
pub const MAX_SCRAPES: usize = 2;
/// How long a scrape waits for the control thread.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// What the admin thread asks the control thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// `/metrics`.
    Metrics,
}

/// A request forwarded to the control thread, with where to answer.
#[derive(Debug)]
pub struct Request {
    /// What is asked.
    pub query: Query,
    /// Status code and body go here.
    pub reply: tokio::sync::oneshot::Sender<(u16, String)>,
}

/// Where the process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Listeners or eBPF programs not in place yet.
    Starting = 0,
    /// Capturing.
    Ready = 1,
    /// Listeners closed; open connections finishing.
    Draining = 2,
}

/// What readiness is computed from: written by the control thread (phase,
/// enrolled namespaces) and the executors (where they listen), read by the
/// admin thread on every probe.
#[derive(Debug, Default)]
pub struct Health {
    phase: AtomicU8,
    enrolled: Mutex<Vec<NetnsId>>,
    executors: Mutex<Vec<Arc<Listening>>>,
    /// Connections closed for being too many, and for being too slow.
    closed: (AtomicU64, AtomicU64),
    /// Admin connections open now.
    open: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A holder that panicked aborted the process first.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Health {
    /// Moves to `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// The executors' listening sets.
    pub fn set_executors(&self, executors: Vec<Arc<Listening>>) {
        *lock(&self.executors) = executors;
    }

    /// The namespaces every executor must listen in.
    pub fn set_enrolled(&self, enrolled: Vec<NetnsId>) {
        *lock(&self.enrolled) = enrolled;
    }

    /// Admin connections closed by us: (too many, too slow).
    pub fn closed(&self) -> AdminClosed {
        AdminClosed { too_many: self.closed.0.load(Ordering::Relaxed), too_slow: self.closed.1.load(Ordering::Relaxed) }
    }

    /// Admin connections open now (the control thread gives freed memory
    /// back once a crowd has gone).
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// The answer to `/ready`.
    pub fn ready(&self) -> (u16, &'static str) {
        match self.phase.load(Ordering::Acquire) {
            0 => (503, "starting: listeners or eBPF programs not in place yet\n"),
            2 => (503, "draining\n"),
            _ => {
                let enrolled = lock(&self.enrolled).clone();
                let all = lock(&self.executors).iter().all(|s| {
                    let listening = crate::proxy::executor::lock(s);
                    enrolled.iter().all(|id| listening.contains(id))
                });
                if all {
                    (200, "ready\n")
                } else {
                    (503, "an executor is not listening in every namespace\n")
                }
            }
        }
    }
}

/// Binds `addr` and serves it from a new thread. SO_REUSEPORT, like the
/// data path's listeners: during a rolling update the new instance starts
/// beside the old one on the same node.
/// With `metrics_token`, `/metrics` answers only a request that carries
/// the file's token (`Authorization: Bearer`); the probes answer anyone.
pub fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    control: crossbeam_channel::Sender<Request>,
    metrics_token: Option<std::path::PathBuf>,
) -> std::io::Result<SocketAddr> {
    let listener: std::net::TcpListener = crate::node::socket::listener(addr, None)?.into();
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        if let Err(e) = http::run(listener, health, control, metrics_token) {
            tracing::error!(error = %e, "the admin endpoint stopped");
        }
    })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_phase_and_listeners() {
        let h = Health::default();
        assert_eq!(h.ready().0, 503, "starting");
        let executor = Arc::new(Listening::default());
        h.set_executors(vec![executor.clone()]);
        h.set_enrolled(vec![NetnsId(7)]);
        h.set_phase(Phase::Ready);
        assert_eq!(h.ready().0, 503, "not listening in 7 yet");
        crate::proxy::executor::lock(&executor).insert(NetnsId(7));
        assert_eq!(h.ready(), (200, "ready\n"));
        h.set_phase(Phase::Draining);
        assert_eq!(h.ready().0, 503);
    }
}
