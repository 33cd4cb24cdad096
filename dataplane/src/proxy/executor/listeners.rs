//! An executor's listeners in one pod's namespace, and their accept loops.
use std::{
    cell::Cell,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use dataplane_common::{INBOUND_PORT, OUTBOUND_PORT};
use glommio::net::TcpListener;
use tracing::warn;

use crate::{
    node::{netns::Netns, socket, sys},
    proxy::{
        conn::{ExecutorCtx, Record},
        inbound, outbound,
        stats::{Direction, FlowCount},
    },
};

const OUTBOUND_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), OUTBOUND_PORT);
const INBOUND_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), INBOUND_PORT);
const OUTBOUND_ADDR6: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), OUTBOUND_PORT);
const INBOUND_ADDR6: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), INBOUND_PORT);

/// A listener that could not be opened in a pod's namespace.
#[derive(Debug, thiserror::Error)]
#[error("listening on {addr} in {netns}: {source}")]
pub(super) struct ListenError {
    addr: SocketAddr,
    netns: String,
    #[source]
    source: std::io::Error,
}

/// A listener on `addr` inside `ns`, and its fd (glommio does not expose it).
fn bind_in(
    ns: &Netns,
    addr: SocketAddr,
    incoming_cpu: Option<usize>,
) -> Result<(TcpListener, std::os::fd::RawFd), ListenError> {
    match ns.run(|| socket::listener(addr, incoming_cpu)) {
        Ok(Ok(fd)) => {
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            Ok((sys::glommio_listener(fd), raw))
        }
        Ok(Err(source)) | Err(source) => Err(ListenError { addr, netns: ns.name(), source }),
    }
}

/// Opens the listeners of `ns` (both families' where the pod has an IPv6
/// address) and starts their accept loops. The inbound listeners prefer
/// connections set up on `inbound_cpu`. All or none.
pub(super) fn open(
    executor: &Rc<ExecutorCtx>,
    ns: &Arc<Netns>,
    addresses: &[IpAddr],
    inbound_cpu: Option<usize>,
) -> Result<Vec<AcceptLoop>, ListenError> {
    let mut addrs = vec![(OUTBOUND_ADDR, Direction::Outbound), (INBOUND_ADDR, Direction::Inbound)];
    if addresses.iter().any(IpAddr::is_ipv6) {
        addrs.extend([(OUTBOUND_ADDR6, Direction::Outbound), (INBOUND_ADDR6, Direction::Inbound)]);
    }
    // All or none: the sockets bound so far close if one fails.
    let bound = addrs
        .iter()
        .map(|&(a, d)| {
            let cpu = if d == Direction::Inbound { inbound_cpu } else { None };
            Ok((bind_in(ns, a, cpu)?, d))
        })
        .collect::<Result<Vec<_>, ListenError>>()?;
    Ok(bound.into_iter().map(|(l, d)| AcceptLoop::start(l, executor, ns, d)).collect())
}

/// A listener's accept loop, and the way to stop it without losing a
/// connection. glommio accepts through io_uring: cancelling the loop could
/// drop an accept the kernel had already completed, and that connection would
/// never be served. Instead the listening socket is shut down for reading: it
/// stops listening at once (its queue moves to another listener of the
/// SO_REUSEPORT group, `tcp_migrate_req`), the accept in flight returns an
/// error, and the loop serves every connection it was handed, then ends.
pub(super) struct AcceptLoop {
    task: glommio::Task<()>,
    fd: std::os::fd::RawFd,
    stop: Rc<Cell<bool>>,
}

/// How long a stopped accept loop gets to end by itself.
const ACCEPT_STOP: Duration = Duration::from_secs(1);

impl AcceptLoop {
    fn start(
        (listener, fd): (TcpListener, std::os::fd::RawFd),
        executor: &Rc<ExecutorCtx>,
        ns: &Arc<Netns>,
        direction: Direction,
    ) -> Self {
        let stop = Rc::new(Cell::new(false));
        let task = glommio::spawn_local(accept_loop(listener, executor.clone(), ns.clone(), direction, stop.clone()));
        Self { task, fd, stop }
    }

    /// Stops accepting; returns once every accepted connection is handed on.
    pub(super) async fn stop(mut self, cpu: usize) {
        self.stop.set(true);
        // The fd is open: the loop owns the listener until it ends, and it
        // ends only once `stop` is set.
        let shut = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Read);
        if shut.is_ok() && crate::proxy::relay::within(ACCEPT_STOP, &mut self.task).await.is_some() {
            return;
        }
        warn!(cpu, shutdown = ?shut, "an accept loop did not end by itself; cancelling it");
        self.task.cancel().await;
    }
}

/// Pause after an accept error (EMFILE and the like), doubled on each error
/// in a row up to [`ACCEPT_BACKOFF_MAX`], so a full fd table does not turn
/// into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often a waiting accept is re-polled (see `relay::repolled`).
const ACCEPT_REPOLL: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: TcpListener,
    executor: Rc<ExecutorCtx>,
    ns: Arc<Netns>,
    direction: Direction,
    stop: Rc<Cell<bool>>,
) {
    let mut backoff = ACCEPT_BACKOFF;
    loop {
        // Re-polled every second: an accept whose wake-up went missing
        // would otherwise wait for the next connection (a tunnel handshake
        // was seen to wait out its 10 s with no trace on the accepting side).
        match crate::proxy::relay::repolled(ACCEPT_REPOLL, listener.accept()).await {
            Ok(conn) => {
                backoff = ACCEPT_BACKOFF;
                // Counted as open from the moment it is accepted, before its
                // task first runs: a drain that waits for open connections
                // must never miss one that is only queued.
                let rec = Record::accepted(&executor, direction, &ns);
                let (executor, ns) = (executor.clone(), ns.clone());
                match direction {
                    Direction::Outbound => glommio::spawn_local(outbound::serve(executor, ns, conn, rec)).detach(),
                    Direction::Inbound => glommio::spawn_local(inbound::serve(executor, ns, conn, rec)).detach(),
                };
            }
            Err(_) if stop.get() => return,
            Err(e) => {
                executor.with_stats(|s| s.flow_mut(direction)[FlowCount::AcceptErrors] += 1);
                if let Some(left_out) = executor.may_log("accept_failed") {
                    warn!(netns = %ns.name(), %direction, error = %e, ?backoff, left_out, "accept failed; backing off");
                }
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}
