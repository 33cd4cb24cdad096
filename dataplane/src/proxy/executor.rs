//! The executors: one glommio `LocalExecutor` per chosen CPU, pinned. Each
//! builds its own state inside its own thread (listeners in every enrolled
//! namespace: `127.0.0.1:18000` and `0.0.0.0:18001`, and `[::1]:18000` and
//! `[::]:18001` where the pod has an IPv6 address; TLS configurations;
//! per-connection tasks) and handles every connection it accepts start to
//! finish: no locks and no cross-core hand-off on the data path.
//!
//! Executors report to the control thread over a crossbeam channel and never
//! wait on it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    rc::Rc,
    sync::{Arc, Mutex},
    time::Duration,
};

use crossbeam_channel::Sender;
use glommio::{Latency, LocalExecutorBuilder, Placement, Shares};
use tracing::{error, info, warn};

use crate::{
    identity::Identity,
    node::ebpf::OrigLookup,
    node::netns::{Netns, NetnsId},
    proxy::conn::{ExecutorCtx, Limits, Open},
    proxy::stats::{Count, Snapshot},
};

/// What every executor is started with.
#[derive(Debug)]
pub struct ExecutorSpec {
    /// Namespaces to open listeners in, with their pods' addresses.
    pub namespaces: Vec<(Arc<Netns>, Vec<IpAddr>)>,
    /// SO_MARK of our own sockets.
    pub bypass_mark: u32,
    /// Certificates and TLS configurations.
    pub identity: Arc<Identity>,
    /// Limits.
    pub limits: Limits,
    /// How long an executor polls for I/O before it sleeps (none: at once).
    pub busy_poll: Option<std::time::Duration>,
    /// The pinned original-destination map, if any (strict mode): for the
    /// sockets `SO_ORIGINAL_DST` cannot answer for.
    pub orig_pin: Option<std::path::PathBuf>,
    /// Connections between two pods served here skip the tunnel.
    pub same_node_fast_path: bool,
    /// With workload identities (`--node-ca`): their trust domain; every
    /// peer must then prove the identity of the pod at its address.
    pub trust_domain: Option<Arc<str>>,
    /// The splice maps, when those connections are spliced in the kernel.
    pub splice: Option<crate::node::ebpf::SpliceMaps>,
    /// Both ends of every tunnel are in this process (loopback mode): each
    /// executor's inbound listeners take the tunnels the previous executor
    /// opens (`inbound_cpu`).
    pub local_tunnels: bool,
    /// `sessionAffinity: ClientIP`: the endpoint each client last used,
    /// one table for every executor.
    pub affinity: Arc<crate::cluster::services::Affinity>,
}

/// The namespaces an executor has listeners in, written by the executor
/// when it enrols or withdraws one, read by the control thread for
/// readiness. Never touched on the data path.
pub type Listening = Mutex<BTreeSet<NetnsId>>;

/// What the control thread tells an executor.
#[derive(Debug)]
pub enum ToExecutor {
    /// Send a copy of your measurements (histograms included) on this
    /// channel: for dumps and scrapes only.
    Snapshot(Sender<ExecutorReport>),
    /// New certificates: use them for new handshakes.
    Identity(Arc<Identity>),
    /// Serve this namespace too, whose pod has these addresses: open its
    /// listeners in it.
    Enroll(Arc<Netns>, Vec<IpAddr>),
    /// Stop serving this namespace: close its listeners (open connections
    /// finish on their own).
    Withdraw(NetnsId),
    /// Close your listeners; keep serving open connections.
    Drain,
    /// New Services: route new connections to ClusterIPs with these.
    Services(Arc<crate::cluster::services::Table>),
    /// Meshed pods' identities that changed, by address (`None`: gone).
    Workloads(Arc<[(IpAddr, Option<Arc<str>>)]>),
    /// The authorization policies of this node's pods.
    Policies(Arc<crate::cluster::policy::Table>),
    /// The kernel paused the spliced direction whose source socket has this
    /// cookie, if it is one of yours (every executor hears it).
    SplicePaused(u64),
}

/// An executor's answer to [`ToExecutor::Snapshot`].
#[derive(Debug)]
pub struct ExecutorReport {
    /// The CPU it is pinned to.
    pub cpu: usize,
    /// Its measurements.
    pub stats: Snapshot,
}

/// What an executor tells the control thread.
#[derive(Debug)]
pub enum ExecutorEvent {
    /// Listening on both ports in every namespace.
    Ready {
        /// The CPU it is pinned to.
        cpu: usize,
    },
    /// Listening on both ports in a namespace enrolled after start-up.
    Listening {
        /// The CPU it is pinned to.
        cpu: usize,
        /// The namespace.
        netns: NetnsId,
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
pub type ExecutorHandle = glommio::ExecutorJoinHandle<()>;

/// A running executor, as the control thread sees it.
#[derive(Debug)]
pub struct Executor {
    /// The CPU it is pinned to.
    pub cpu: usize,
    /// Its control channel (a message wakes it: it never polls).
    pub tx: flume::Sender<ToExecutor>,
    /// Connections open on it now.
    pub open: Arc<Open>,
    /// The namespaces it listens in now.
    pub listening: Arc<Listening>,
    /// Its thread.
    pub handle: ExecutorHandle,
}

/// Starts one pinned executor per CPU in `cpus`.
pub fn spawn(cpus: &[usize], spec: Arc<ExecutorSpec>, events: Sender<ExecutorEvent>) -> std::io::Result<Vec<Executor>> {
    cpus.iter()
        .enumerate()
        .map(|(i, &cpu)| {
            let inbound_cpu = inbound_cpu(cpus, i, spec.local_tunnels);
            let spec = spec.clone();
            let events = events.clone();
            let (tx, rx) = flume::unbounded();
            let (open, listening) = (Arc::new(Open::default()), Arc::new(Listening::default()));
            let ctx = (open.clone(), listening.clone());
            // glommio preallocates memory for storage I/O and registers it
            // with io_uring, which pins it: 10 MiB of every executor's RSS
            // by default. Sockets never use it (their reads have buffers of
            // their own), so the least it takes.
            let mut builder =
                LocalExecutorBuilder::new(Placement::Fixed(cpu)).name(&format!("executor-{cpu}")).io_memory(IO_MEMORY);
            if let Some(spin) = spec.busy_poll {
                // The vendored glommio yields the CPU on each turn of the
                // spin (vendor/README.md): a thread that shares the CPU
                // runs at once instead of after the spin.
                builder = builder.spin_before_park(spin);
            }
            let handle = builder
                .spawn(move || async move {
                    let _fatal = DieTogether(cpu);
                    run((cpu, inbound_cpu), spec, events, rx, ctx).await
                })
                .map_err(|e| std::io::Error::other(format!("starting the executor on CPU {cpu}: {e}")))?;
            Ok(Executor { cpu, tx, open, listening, handle })
        })
        .collect()
}

/// The CPU whose new connections the inbound listeners of executor `i`
/// (of those on `cpus`) ask the kernel for, if any. In loopback mode a
/// tunnel's connection is set up on the CPU of the executor that opens it
/// (the outbound half): the next executor's inbound listener takes it, so
/// the tunnel's two halves, each with its own TLS work, always run on two
/// executors. Left to the kernel's hash they shared one whenever it chose
/// the opener's (half the tunnels, with two executors), and such a stream
/// used at most one core. Otherwise the hash decides: a tunnel from another
/// node is set up on whatever CPU received it.
fn inbound_cpu(cpus: &[usize], i: usize, local_tunnels: bool) -> Option<usize> {
    (local_tunnels && cpus.len() > 1).then(|| cpus[(i + cpus.len() - 1) % cpus.len()])
}

/// Takes the process down when an executor thread unwinds: half a node
/// that answers `/live` with 200 while a core serves nothing is worse than
/// a restart by the kubelet.
struct DieTogether(usize);

impl Drop for DieTogether {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!(cpu = self.0, "an executor died; stopping the data plane so that it is restarted whole");
            std::process::abort();
        }
    }
}

/// Priority of the control task: a message (drain, new certificates, a
/// new pod) is handled within this even while connections keep the
/// executor busy.
const CONTROL_LATENCY: Duration = Duration::from_millis(1);
/// How often an executor looks at its control channel without being woken.
const CONTROL_LOOK: Duration = Duration::from_millis(250);

/// glommio's storage I/O memory per executor: its minimum (no file is read
/// through it).
const IO_MEMORY: usize = 64 * 1024;

type Listeners = BTreeMap<NetnsId, Vec<listeners::AcceptLoop>>;

mod listeners;

async fn run(
    (cpu, inbound_cpu): (usize, Option<usize>),
    spec: Arc<ExecutorSpec>,
    events: Sender<ExecutorEvent>,
    control: flume::Receiver<ToExecutor>,
    (open, listening): (Arc<Open>, Arc<Listening>),
) {
    let executor = Rc::new(context(cpu, &spec, open));
    let mut commands =
        Commands { cpu, inbound_cpu, executor, listeners: Listeners::new(), listening, events, draining: false };
    if let Err(e) = Netns::pin_home() {
        let error = e.to_string();
        let _ = commands.events.send(ExecutorEvent::Failed { cpu, netns: NetnsId(0), error });
        return;
    }
    for (ns, addresses) in &spec.namespaces {
        if let Err(e) = commands.enroll(ns, addresses) {
            let _ = commands.events.send(ExecutorEvent::Failed { cpu, netns: ns.id(), error: e.to_string() });
            return;
        }
    }
    info!(cpu, namespaces = spec.namespaces.len(), "executor listening");
    let _ = commands.events.send(ExecutorEvent::Ready { cpu });
    let queue = glommio::executor().create_task_queue(Shares::default(), Latency::Matters(CONTROL_LATENCY), "control");
    // Woken by each message; ends when the control thread is gone. A wake
    // from another thread has been seen lost (issue 32: an executor that
    // never opened a namespace's listeners, its Enroll waiting in the
    // channel): the channel is also looked at every `CONTROL_LOOK` (the
    // timer polled first, so a look is a look), and a message that look
    // finds is counted: its wake-up was lost, or this task went unpolled
    // for a whole look. Either way it is taken then, 250 ms late at most.
    let task = glommio::spawn_local_into(
        async move {
            loop {
                let look = async {
                    glommio::timer::sleep(CONTROL_LOOK).await;
                    None
                };
                let msg = match futures_lite::future::or(look, async { Some(control.recv_async().await) }).await {
                    Some(Ok(msg)) => msg,
                    Some(Err(flume::RecvError::Disconnected)) => break,
                    None => match control.try_recv() {
                        Ok(msg) => {
                            commands.executor.with_stats(|s| s.counts[Count::MissedWakeups] += 1);
                            if let Some(left_out) = commands.executor.may_log("missed_wakeup") {
                                warn!(
                                    cpu,
                                    left_out, "a control message was found by the timed look, not by its wake-up"
                                );
                            }
                            msg
                        }
                        Err(flume::TryRecvError::Empty) => continue,
                        Err(flume::TryRecvError::Disconnected) => break,
                    },
                };
                commands.handle(msg).await;
            }
        },
        queue,
    );
    match task {
        Ok(task) => task.await,
        Err(e) => panic!("executor on CPU {cpu}: spawning its control task: {e}"),
    }
}

/// This executor's state, built inside its own thread.
fn context(cpu: usize, spec: &ExecutorSpec, open: Arc<Open>) -> ExecutorCtx {
    let orig = spec.orig_pin.as_deref().and_then(|p| match OrigLookup::open(p) {
        Ok(o) => Some(o),
        Err(e) => {
            warn!(cpu, error = %e, "cannot open the pinned original-destination map: no fallback lookup");
            None
        }
    });
    let mut executor = ExecutorCtx::new(cpu, spec.bypass_mark, spec.limits, spec.identity.clone(), open, orig);
    executor.same_node_fast_path = spec.same_node_fast_path;
    executor.trust_domain = spec.trust_domain.clone();
    executor.affinity = spec.affinity.clone();
    executor.splicer =
        spec.splice.as_ref().and_then(|m| match m.try_clone().and_then(crate::node::ebpf::Splicer::open) {
            Ok(s) => Some(std::cell::RefCell::new(s)),
            Err(e) => {
                warn!(cpu, error = %e, "cannot open the splice maps: same-node connections relayed in user space");
                None
            }
        });
    executor
}

/// What an executor does with the control thread's messages.
struct Commands {
    cpu: usize,
    /// The CPU its inbound listeners prefer (see [`inbound_cpu`]).
    inbound_cpu: Option<usize>,
    executor: Rc<ExecutorCtx>,
    listeners: Listeners,
    /// The namespaces it listens in, as the control thread reads them.
    listening: Arc<Listening>,
    events: Sender<ExecutorEvent>,
    /// Told to drain: no namespace is enrolled any more.
    draining: bool,
}

impl Commands {
    async fn handle(&mut self, msg: ToExecutor) {
        let (cpu, executor) = (self.cpu, &self.executor);
        match msg {
            ToExecutor::Snapshot(reply) => {
                let _ = reply.send(ExecutorReport { cpu, stats: executor.snapshot() });
            }
            ToExecutor::Identity(id) => executor.set_identity(id),
            ToExecutor::Services(table) => executor.set_services(table),
            ToExecutor::Workloads(changes) => executor.set_workloads(&changes),
            ToExecutor::Policies(table) => executor.set_policies(table),
            ToExecutor::SplicePaused(cookie) => crate::proxy::splice::paused(executor, cookie),
            ToExecutor::Enroll(ns, addresses) if !self.draining => {
                let event = match self.enroll(&ns, &addresses) {
                    Ok(()) => ExecutorEvent::Listening { cpu, netns: ns.id() },
                    Err(e) => ExecutorEvent::Failed { cpu, netns: ns.id(), error: e.to_string() },
                };
                let _ = self.events.send(event);
            }
            ToExecutor::Enroll(..) => {}
            ToExecutor::Withdraw(id) => {
                executor.forget(id);
                if let Some(loops) = self.listeners.remove(&id) {
                    lock(&self.listening).remove(&id);
                    for l in loops {
                        l.stop(cpu).await;
                    }
                }
            }
            ToExecutor::Drain => {
                // Once our listeners stop listening, the kernel sends new
                // connections to the other sockets of the SO_REUSEPORT group
                // (a new instance), or refuses them. The listening set
                // empties only once no accept loop is left: the control
                // thread waits for that before it counts open connections.
                self.draining = true;
                executor.forget_all();
                for (_, loops) in std::mem::take(&mut self.listeners) {
                    for l in loops {
                        l.stop(cpu).await;
                    }
                }
                lock(&self.listening).clear();
                info!(cpu, "listeners closed; draining");
            }
        }
    }

    /// Opens the listeners of `ns` (see [`listeners::open`]) and records the
    /// pod's `addresses`.
    fn enroll(&mut self, ns: &Arc<Netns>, addresses: &[IpAddr]) -> Result<(), listeners::ListenError> {
        if self.listeners.contains_key(&ns.id()) {
            return Ok(());
        }
        let loops = listeners::open(&self.executor, ns, addresses, self.inbound_cpu)?;
        self.listeners.insert(ns.id(), loops);
        lock(&self.listening).insert(ns.id());
        self.executor.serve(ns, addresses);
        Ok(())
    }
}

/// Locks a listening set. A holder that panicked took the process down
/// first (executors abort on unwinding), so poisoning is ignored.
pub fn lock(listening: &Listening) -> std::sync::MutexGuard<'_, BTreeSet<NetnsId>> {
    listening.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
