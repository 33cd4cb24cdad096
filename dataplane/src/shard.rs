//! The executors: one glommio `LocalExecutor` per chosen CPU, pinned. Each
//! builds its own state inside its own thread (listeners in every enrolled
//! namespace, TLS configurations, per-connection tasks) and handles every
//! connection it accepts start to finish: no locks and no cross-core hand-off
//! on the data path.
//!
//! Executors report to the control thread over a crossbeam channel and never
//! wait on it.
use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender};
use glommio::{net::TcpListener, LocalExecutorBuilder, Placement};
use tracing::{info, warn};

use crate::{
    identity::Identity,
    inbound,
    netns::{Netns, NetnsId},
    outbound, socket,
    stats::Snapshot,
    sys,
};
use dataplane_common::{INBOUND_PORT, OUTBOUND_PORT};

/// Handshake and idle limits.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For the TLS handshake and the preamble.
    pub handshake: Duration,
    /// For a connection on which no byte moves either way.
    pub idle: Duration,
}

/// What every executor is started with.
#[derive(Debug)]
pub struct ShardSpec {
    /// Namespaces to open listeners in.
    pub namespaces: Vec<Arc<Netns>>,
    /// SO_MARK of our own sockets.
    pub bypass_mark: u32,
    /// Certificates and TLS configurations.
    pub identity: Arc<Identity>,
    /// Limits.
    pub timeouts: Timeouts,
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
    identity: RefCell<Arc<Identity>>,
    /// This executor's measurements.
    pub stats: RefCell<Snapshot>,
}

impl ShardCtx {
    /// The identities in force now.
    pub fn identity(&self) -> Arc<Identity> {
        self.identity.borrow().clone()
    }

    /// Records into this executor's measurements.
    pub fn with_stats<T>(&self, f: impl FnOnce(&mut Snapshot) -> T) -> T {
        f(&mut self.stats.borrow_mut())
    }
}

/// What the control thread tells an executor.
#[derive(Debug)]
pub enum ToShard {
    /// Send a copy of your measurements on this channel.
    Snapshot(Sender<ShardReport>),
    /// New certificates: use them for new handshakes.
    Identity(Arc<Identity>),
    /// Serve this namespace too: open both listeners in it.
    Enroll(Arc<Netns>),
    /// Stop serving this namespace: close its listeners (open connections
    /// finish on their own).
    Withdraw(NetnsId),
    /// Close your listeners; keep serving open connections.
    Drain,
}

/// An executor's answer to [`ToShard::Snapshot`].
#[derive(Debug)]
pub struct ShardReport {
    /// The CPU it is pinned to.
    pub cpu: usize,
    /// Its measurements.
    pub stats: Snapshot,
    /// The namespaces it has listeners in.
    pub listening: Vec<NetnsId>,
}

/// What an executor tells the control thread.
#[derive(Debug)]
pub enum ShardEvent {
    /// Listening on both ports in every namespace.
    Ready {
        /// The CPU it is pinned to.
        cpu: usize,
    },
    /// Could not listen in a namespace; the message names it and the port.
    Failed {
        /// The CPU it is pinned to.
        cpu: usize,
        /// The namespace.
        netns: NetnsId,
        /// What failed.
        error: String,
    },
}

/// An executor thread.
pub type ShardHandle = glommio::ExecutorJoinHandle<()>;

/// A running executor, as the control thread sees it.
#[derive(Debug)]
pub struct Shard {
    /// The CPU it is pinned to.
    pub cpu: usize,
    /// Its control channel.
    pub tx: Sender<ToShard>,
    /// Its thread.
    pub handle: ShardHandle,
}

/// Starts one pinned executor per CPU in `cpus`.
pub fn spawn(cpus: &[usize], spec: Arc<ShardSpec>, events: Sender<ShardEvent>) -> std::io::Result<Vec<Shard>> {
    cpus.iter()
        .map(|&cpu| {
            let spec = spec.clone();
            let events = events.clone();
            let (tx, rx) = crossbeam_channel::unbounded();
            let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("shard-{cpu}"))
                .spawn(move || async move { run(cpu, spec, events, rx).await })
                .map_err(|e| std::io::Error::other(format!("starting the executor on CPU {cpu}: {e}")))?;
            Ok(Shard { cpu, tx, handle })
        })
        .collect()
}

const OUTBOUND_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), OUTBOUND_PORT);
const INBOUND_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), INBOUND_PORT);

fn bind_in(ns: &Netns, addr: SocketAddr) -> Result<TcpListener, String> {
    match ns.run(|| socket::listener(addr)) {
        Ok(Ok(fd)) => Ok(sys::glommio_listener(fd)),
        Ok(Err(e)) | Err(e) => Err(format!("listening on {addr} in {}: {e}", ns.name())),
    }
}

/// How often an executor looks at its control channel. Executors never block
/// on the control thread: they poll from a timer.
const CONTROL_POLL: Duration = Duration::from_millis(20);

async fn run(cpu: usize, spec: Arc<ShardSpec>, events: Sender<ShardEvent>, control: Receiver<ToShard>) {
    let shard = Rc::new(ShardCtx {
        cpu,
        bypass_mark: spec.bypass_mark,
        timeouts: spec.timeouts,
        identity: RefCell::new(spec.identity.clone()),
        stats: RefCell::new(Snapshot::default()),
    });
    let mut listeners: BTreeMap<NetnsId, [glommio::Task<()>; 2]> = BTreeMap::new();
    let mut draining = false;
    for ns in &spec.namespaces {
        if let Err(error) = enroll(&shard, ns, &mut listeners) {
            let _ = events.send(ShardEvent::Failed { cpu, netns: ns.id(), error });
            return;
        }
    }
    info!(cpu, namespaces = spec.namespaces.len(), "executor listening");
    let _ = events.send(ShardEvent::Ready { cpu });
    loop {
        while let Ok(msg) = control.try_recv() {
            match msg {
                ToShard::Snapshot(reply) => {
                    let stats = shard.stats.borrow().clone();
                    let _ = reply.send(ShardReport { cpu, stats, listening: listeners.keys().copied().collect() });
                }
                ToShard::Identity(id) => *shard.identity.borrow_mut() = id,
                ToShard::Enroll(ns) if !draining => {
                    if let Err(error) = enroll(&shard, &ns, &mut listeners) {
                        let _ = events.send(ShardEvent::Failed { cpu, netns: ns.id(), error });
                    }
                }
                ToShard::Enroll(_) => {}
                ToShard::Withdraw(id) => {
                    if let Some(tasks) = listeners.remove(&id) {
                        for t in tasks {
                            t.cancel().await;
                        }
                    }
                }
                ToShard::Drain => {
                    // Dropping the accept loops drops the listeners: the
                    // kernel then sends new connections to other sockets in
                    // the SO_REUSEPORT group (a new instance), or refuses them.
                    draining = true;
                    for (_, tasks) in std::mem::take(&mut listeners) {
                        for t in tasks {
                            t.cancel().await;
                        }
                    }
                    info!(cpu, "listeners closed; draining");
                }
            }
        }
        glommio::timer::sleep(CONTROL_POLL).await;
    }
}

/// Opens both listeners in `ns` and starts their accept loops.
fn enroll(
    shard: &Rc<ShardCtx>,
    ns: &Arc<Netns>,
    listeners: &mut BTreeMap<NetnsId, [glommio::Task<()>; 2]>,
) -> Result<(), String> {
    if listeners.contains_key(&ns.id()) {
        return Ok(());
    }
    let out_listener = bind_in(ns, OUTBOUND_ADDR)?;
    let in_listener = bind_in(ns, INBOUND_ADDR)?;
    let tasks = [
        glommio::spawn_local(accept_loop(out_listener, shard.clone(), ns.clone(), Role::Outbound)),
        glommio::spawn_local(accept_loop(in_listener, shard.clone(), ns.clone(), Role::Inbound)),
    ];
    listeners.insert(ns.id(), tasks);
    Ok(())
}

/// Pause after an accept error (EMFILE and the like) so a full fd table does
/// not turn into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug)]
enum Role {
    Outbound,
    Inbound,
}

async fn accept_loop(listener: TcpListener, shard: Rc<ShardCtx>, ns: Arc<Netns>, role: Role) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                let (shard, ns) = (shard.clone(), ns.clone());
                match role {
                    Role::Outbound => glommio::spawn_local(outbound::serve(shard, ns, conn)).detach(),
                    Role::Inbound => glommio::spawn_local(inbound::serve(shard, ns, conn)).detach(),
                };
            }
            Err(e) => {
                warn!(netns = %ns.name(), ?role, error = %e, "accept failed");
                glommio::timer::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}
