//! The record of one connection: counted when accepted, its outcome recorded
//! exactly once (ztunnel's `ConnectionResult`), so outbound and inbound
//! accounting cannot drift apart.
//!
//! [`Record::refuse`] and [`Record::relayed`] consume the record; a record
//! dropped without either (its task was cancelled) counts as
//! [`Reason::Closed`]. Every outcome is counted once in the executor's
//! [`Snapshot`], logged once, and lowers the open-connection gauge the
//! control thread reads.
use std::{
    fmt,
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use super::ExecutorCtx;
use crate::{
    node::netns::Netns,
    node::socket,
    proxy::addrs::ClientAddr,
    proxy::reason::Reason,
    proxy::relay::{Bytes, End, RelayError, Side},
    proxy::stats::{Blame, Direction, FlowCount, Hist},
};

/// One accepted connection, until its outcome is recorded.
#[derive(Debug)]
pub struct Record {
    executor: Rc<ExecutorCtx>,
    direction: Direction,
    netns: Arc<Netns>,
    started: Instant,
    /// The far end of the accepted connection.
    client: Option<SocketAddr>,
    /// Where it is delivered: the original destination (outbound) or the
    /// application (inbound).
    dst: Option<SocketAddr>,
    handshake: Option<Duration>,
    /// The far data plane's pod, by its SPIFFE ID, once authenticated.
    peer: Option<String>,
    /// The Service connected to, if the destination was a ClusterIP.
    service: Option<String>,
    done: bool,
}

/// The per-direction histograms.
fn hists(d: Direction) -> (Hist, Hist, Hist) {
    match d {
        Direction::Outbound => (Hist::TlsHandshake, Hist::FirstByte, Hist::Lifetime),
        Direction::Inbound => (Hist::InboundTlsHandshake, Hist::InboundFirstByte, Hist::InboundLifetime),
    }
}

impl Record {
    /// Counts a connection just accepted.
    pub fn accepted(executor: &Rc<ExecutorCtx>, direction: Direction, netns: &Arc<Netns>) -> Self {
        executor.with_stats(|s| s.flow_mut(direction)[FlowCount::Accepted] += 1);
        executor.open.up();
        Self {
            executor: executor.clone(),
            direction,
            netns: netns.clone(),
            started: Instant::now(),
            client: None,
            dst: None,
            handshake: None,
            peer: None,
            service: None,
            done: false,
        }
    }

    /// Names the far end, for the log line.
    pub fn client(&mut self, addr: ClientAddr) {
        self.client = Some(addr.0);
    }

    /// Names where it goes, for the log line.
    pub fn dst(&mut self, addr: SocketAddr) {
        self.dst = Some(addr);
    }

    /// The peer is authenticated as `id` (its SPIFFE ID): logged now, and
    /// with the connection's outcome.
    pub fn peer(&mut self, id: String) {
        debug!(direction = %self.direction, client = ?self.client, peer = %id, "peer authenticated");
        self.peer = Some(id);
    }

    /// The destination was a ClusterIP of `service`; `endpoint` was chosen.
    pub fn service(&mut self, service: &str, endpoint: std::net::SocketAddr) {
        debug!(client = ?self.client, vip = ?self.dst, service, %endpoint, "service endpoint chosen");
        self.service = Some(service.to_string());
        self.dst = Some(endpoint);
    }

    /// The TLS handshake finished after `took`, resuming an earlier
    /// session or not.
    pub fn handshake(&mut self, took: Duration, resumed: bool) {
        self.handshake = Some(took);
        let (h, _, _) = hists(self.direction);
        self.executor.with_stats(|s| {
            s.record(h, took);
            s.flow_mut(self.direction)[FlowCount::Resumed] += u64::from(resumed);
        });
    }

    /// Outbound: the tunnel is ready (accept to preamble sent).
    pub fn tunnel_ready(&self) {
        let took = self.started.elapsed();
        self.executor.with_stats(|s| s.record(Hist::TunnelConnect, took));
    }

    /// Refused before anything was relayed, with `sock` reset (the client
    /// sees the refusal as an error, never as an empty answer): counted,
    /// logged as a warning.
    pub fn reset(self, sock: &impl std::os::fd::AsRawFd, refused: crate::proxy::route::Refused) {
        socket::reset_on_close(sock);
        self.refuse(refused.blame, refused.reason, &refused.why);
    }

    /// Refused before anything was relayed: counted, logged as a warning.
    /// The caller closes the sockets (or calls [`Record::reset`] instead). The warning is limited per
    /// reason ([`Quiet`](super::Quiet)); the counters are not.
    pub fn refuse(mut self, blame: Blame, reason: Reason, error: &dyn fmt::Display) {
        self.end(blame, reason);
        if let Some(left_out) = self.executor.may_log(reason.label()) {
            warn!(direction = %self.direction, client = ?self.client, dst = ?self.dst, service = ?self.service, peer = ?self.peer,
                  netns = %self.netns.name(), side = %blame, %reason, %error, left_out, "{} refused", self.direction);
        }
    }

    /// The relay ended: bytes, first byte, lifetime and outcome recorded;
    /// on failure the side that did not fail is reset, so the failure
    /// reaches it as an error rather than an EOF. `early` counts client
    /// bytes forwarded before the relay started.
    pub fn relayed<D, U>(mut self, early: u64, result: Result<Bytes, RelayError>, down: &D, up: &U)
    where
        D: std::os::fd::AsRawFd,
        U: std::os::fd::AsRawFd,
    {
        let lifetime = self.started.elapsed();
        let (bytes, end) = match result {
            Ok(bytes) => (bytes, None),
            Err(e) => (e.bytes, Some(e.end)),
        };
        let (sent, received) = (bytes.sent + early, bytes.received);
        let (_, first_byte, life) = hists(self.direction);
        let started = self.started;
        self.executor.with_stats(|s| {
            let flow = s.flow_mut(self.direction);
            flow[FlowCount::BytesUp] += sent;
            flow[FlowCount::BytesDown] += received;
            s.record(life, lifetime);
            if let Some(first) = bytes.first_received {
                s.record(first_byte, first - started);
            }
        });
        let (duration_us, handshake_us) = (lifetime.as_micros() as u64, self.handshake.map(|h| h.as_micros() as u64));
        let Some(end) = end else {
            self.done = true;
            self.count_peer(false);
            self.executor.with_stats(|s| s.flow_mut(self.direction)[FlowCount::Completed] += 1);
            self.executor.open.down();
            debug!(client = ?self.client, dst = ?self.dst, service = ?self.service, peer = ?self.peer, sent, received, duration_us,
                   handshake_us, cpu = self.executor.cpu, "{} closed", self.direction);
            return;
        };
        let (blame, reason) = match &end {
            End::Io { side, source } => (Blame::from(*side), Reason::of(source)),
            End::Idle(_) => (Blame::Ours, Reason::IdleTimeout),
            End::Denied(_) => (Blame::Downstream, Reason::PolicyDenied),
        };
        self.end(blame, reason);
        debug!(client = ?self.client, dst = ?self.dst, service = ?self.service, peer = ?self.peer, side = %blame, %reason, error = %end,
               sent, received, duration_us, handshake_us, cpu = self.executor.cpu, "{} ended early", self.direction);
        match end {
            End::Io { side: Side::Upstream, .. } => socket::reset_on_close(down),
            End::Io { side: Side::Downstream, .. } => socket::reset_on_close(up),
            End::Idle(_) | End::Denied(_) => {
                socket::reset_on_close(down);
                socket::reset_on_close(up);
            }
        }
    }

    /// Counts the connection by its peer's workload, if it was proved.
    fn count_peer(&self, failed: bool) {
        if let Some(peer) = &self.peer {
            self.executor.with_stats(|s| s.count_peer(self.direction, peer, failed));
        }
    }

    fn end(&mut self, blame: Blame, reason: Reason) {
        self.count_peer(true);
        self.done = true;
        self.executor.with_stats(|s| s.fail(self.direction, blame, reason));
        self.executor.open.down();
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.done {
            self.end(Blame::Ours, Reason::Closed);
            debug!(client = ?self.client, dst = ?self.dst, "{} closed before its outcome was recorded", self.direction);
        }
    }
}
