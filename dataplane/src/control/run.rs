//! The control thread of `dataplane run`.
//!
//! Set-up: admin endpoint (answering 503 until ready), the model's source,
//! eBPF load, executors. Then one loop (`startup`) owns everything that is
//! not the data path: signals (SIGUSR1 dumps, SIGTERM/SIGINT drain), admin
//! queries, the model's changes, the CNI plugin's sandboxes, namespaces,
//! certificates. Start-up is a sequence of gates the loop passes (every
//! executor listening, the first model, the node CA, the namespaces already
//! there enrolled), and capture is attached only after the last, so no
//! captured connect ever meets a closed port. Executors are only ever sent
//! messages; nothing here waits on them except for their replies to
//! snapshot requests.
//!
//! The parts: `enrolment` (namespaces served and withdrawn), `effects`
//! (the model's changes written out), `cni` (the plugin's sandboxes),
//! `strict` (strict mTLS tables), `ops` (measurements, reloads, drain),
//! `removal` (taking it all off the node).
//!
//! Drain: readiness false at once, listeners closed (a new instance bound to
//! the same SO_REUSEPORT ports takes new connections), open connections get
//! up to `--drain-timeout`, then the programs are detached and we exit 0;
//! whatever is still open is closed with the process.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    thread,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use crossbeam_channel::Receiver;
use signal_hook::{
    consts::{SIGINT, SIGTERM, SIGUSR1},
    iterator::Signals,
};
use tracing::{info, warn};

use crate::{
    cluster::model::Model,
    cluster::source,
    config::{Config, Source},
    control::enroll,
    control::uninstall::Fate,
    identity::reload,
    node::ebpf::Capture,
    node::netns::NetnsId,
    ops::admin,
    proxy::executor,
};
use dataplane_common::maps::NetnsCookie;

/// How long executors get to open their listeners.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate directory is looked at.
const RELOAD_POLL: Duration = Duration::from_millis(250);
/// How often the open connections are counted, to return freed memory to
/// the kernel when they drop.
const TRIM_EVERY: Duration = Duration::from_secs(2);
/// How long an executor gets to answer a snapshot request (dumps and
/// scrapes only).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1);
/// How soon the namespace directory is looked at again while a namespace
/// waits for its address.
const QUICK_LOOK: Duration = Duration::from_millis(5);

mod cni;
mod effects;
mod enrolment;
mod ops;
mod removal;
mod startup;
mod strict;

/// Runs until SIGTERM or SIGINT, then drains.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    crate::node::socket::set_keepalive(cfg.tcp_keepalive);
    log_start(&cfg);
    match crate::node::rlimit::raise_open_file_limit() {
        Ok(n) => info!(open_files = n, "open-file limit"),
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
    crate::node::netns::Netns::pin_home()?;
    // Signals first: a SIGTERM during start-up must still detach cleanly.
    let signals = forward_signals()?;
    let (admin_tx, admin_rx) = crossbeam_channel::unbounded();
    let health = Arc::new(admin::Health::default());
    if let Some(addr) = cfg.admin {
        let bound = admin::serve(addr, health.clone(), admin_tx, cfg.metrics_token.clone())
            .with_context(|| format!("--admin {addr}: binding"))?;
        info!(%bound, "admin endpoint listening");
    }
    let mut inputs = Inputs::open(&cfg, signals, admin_rx)?;
    let mut ctl = Control::new(cfg, health, inputs.watch_counters.take())?;
    let executor_events = ctl.start_executors()?;
    let fate = ctl.serve(&mut inputs, &executor_events)?;
    let (pin_dir, netns_dir) = (ctl.cfg.capture.pin_dir.clone(), ctl.cfg.netns_dir.clone());
    let return_paths = ctl.drain(&inputs.admin);
    if let Some(fate) = fate {
        removal::take_off(
            fate.join().unwrap_or_else(|_| Fate::Unknown("the check panicked".into())),
            &pin_dir,
            netns_dir,
            &return_paths,
        );
    }
    Ok(())
}

/// The start-up line: every setting that decides behaviour.
fn log_start(cfg: &Config) {
    info!(
        workload_cgroup = %cfg.workload_cgroup.display(),
        own_cgroup = %cfg.own_cgroup.display(),
        namespaces = ?cfg.namespaces.iter().map(|n| n.name()).collect::<Vec<_>>(),
        netns_dir = ?cfg.netns_dir,
        cores = ?cfg.cores,
        busy_poll = ?cfg.busy_poll,
        capture = ?cfg.capture.cidrs,
        excluded_ports = ?cfg.capture.excluded_ports,
        bypass_mark = format_args!("{:#x}", cfg.capture.bypass_mark),
        map_entries = cfg.capture.map_entries,
        strict = cfg.capture.strict,
        pin_dir = %cfg.capture.pin_dir.display(),
        bpf_trace = cfg.capture.trace,
        certs = ?cfg.identity.dir(),
        identities = ?cfg.identity.addresses().collect::<Vec<_>>(),
        tls_resumption = cfg.identity.resumption(),
        handshake_timeout = ?cfg.limits.handshake,
        idle_timeout = %if cfg.limits.idle == crate::proxy::conn::NO_IDLE_TIMEOUT {
            "off".to_string()
        } else {
            format!("{:?}", cfg.limits.idle)
        },
        tcp_keepalive = %cfg.tcp_keepalive.map_or("off".to_string(), |d| format!("{d:?}")),
        max_handshakes_per_source = cfg.limits.handshakes_per_source,
        admin = ?cfg.admin,
        stats_dir = ?cfg.stats_dir,
        drain_timeout = ?cfg.drain_timeout,
        "starting"
    );
}

/// Where the control thread's events come from, besides the executors.
struct Inputs {
    signals: Receiver<i32>,
    admin: Receiver<admin::Request>,
    /// The CNI plugin's sandboxes, waiting (in the plugin) until decided.
    /// (Without the socket, a channel that never delivers: a dropped sender
    /// would make the loop's `select!` spin.)
    cni_asks: Receiver<crate::control::cni::Ask>,
    /// The namespace directory changed.
    netns_events: Receiver<()>,
    /// The cluster's changes, the first once every list is in.
    models: Receiver<source::kube::Batch>,
    /// This node's CA, each time the issuer signs one.
    node_cas: Receiver<Arc<crate::identity::pki::NodeCa>>,
    /// The workloads file, read once here, taken at start-up.
    loaded: Option<Model>,
    /// The workloads file's directory, looked at for changes.
    workloads_watch: Option<reload::Watch>,
    /// The Kubernetes watches' and the node CA's counters, for `Control`.
    watch_counters: Option<(Arc<source::kube::Counters>, Arc<source::nodeca::Counters>)>,
}

impl Inputs {
    /// Starts what feeds the loop: the CNI socket, the namespace
    /// directory's watch, and the model's source (a file is read here and
    /// again when it changes; the API's changes arrive on a channel).
    fn open(cfg: &Config, signals: Receiver<i32>, admin: Receiver<admin::Request>) -> anyhow::Result<Self> {
        let cni_asks = match &cfg.cni_socket {
            Some(path) => {
                let (tx, rx) = crossbeam_channel::unbounded();
                crate::control::cni::serve(path, tx).with_context(|| format!("--cni-socket {}", path.display()))?;
                info!(socket = %path.display(), "serving the CNI plugin");
                rx
            }
            None => crossbeam_channel::never(),
        };
        let (netns_tx, netns_events) = crossbeam_channel::bounded(1);
        if let Some(dir) = &cfg.netns_dir {
            if let Err(e) = enroll::watch_dir(dir, netns_tx) {
                warn!(dir = %dir.display(), error = %e, "cannot watch the namespace directory with inotify: looking every 250 ms");
            }
        }
        // Channels nothing sends on never deliver (a dropped sender would
        // make the loop's `select!` spin).
        let mut inputs = Inputs {
            signals,
            admin,
            cni_asks,
            netns_events,
            models: crossbeam_channel::never(),
            node_cas: crossbeam_channel::never(),
            loaded: None,
            workloads_watch: None,
            watch_counters: None,
        };
        match &cfg.source {
            Some(Source::Kube { access, node }) => {
                let (model_tx, models) = crossbeam_channel::unbounded();
                inputs.models = models;
                let node_ca = cfg.minting.as_ref().map(|m| {
                    let spec =
                        source::nodeca::Spec { node: node.clone(), lifetime: m.node_ca_lifetime, leaf_key: m.leaf_key };
                    let (ca_tx, node_cas) = crossbeam_channel::unbounded();
                    inputs.node_cas = node_cas;
                    (spec, ca_tx)
                });
                inputs.watch_counters = Some(source::kube::start(access.clone(), node.clone(), model_tx, node_ca)?);
            }
            Some(Source::File { path, node }) => {
                inputs.loaded = Some(source::file::load(path, node.as_deref())?);
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
                inputs.workloads_watch = Some(reload::Watch::new(dir));
            }
            None => {}
        }
        Ok(inputs)
    }
}

/// Lets a closing listener hand its queued connections to the next instance
/// (see [`Netns::migrate_requests`](crate::node::netns::Netns::migrate_requests));
/// without it (an older kernel) a rolling update may reset a few.
fn migrate_requests(ns: &crate::node::netns::Netns) {
    if let Err(e) = ns.migrate_requests() {
        warn!(netns = %ns.name(), error = %e, "could not set net.ipv4.tcp_migrate_req: a rolling update may reset queued connections");
    }
}

/// Forwards SIGTERM, SIGINT and SIGUSR1 into a channel. signal-hook's
/// handler only writes to a pipe; a storm of signals is coalesced there.
fn forward_signals() -> anyhow::Result<Receiver<i32>> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1]).context("installing signal handlers")?;
    let (tx, rx) = crossbeam_channel::bounded(16);
    thread::Builder::new().name("signals".into()).spawn(move || {
        for s in signals.forever() {
            if tx.send(s).is_err() {
                break;
            }
        }
    })?;
    Ok(rx)
}

struct Control {
    cfg: Config,
    capture: Option<Capture>,
    /// The same-node splice's verdict, attached while it lives.
    splice: Option<crate::node::ebpf::SpliceProgram>,
    executors: Vec<executor::Executor>,
    /// What `/ready` is computed from, on the admin thread.
    health: Arc<admin::Health>,
    /// Certificate reloads that took effect, and that were refused.
    reloads: admin::Reloads,
    started: SystemTime,
    /// The watched namespace directory, if any.
    registry: Option<enroll::Registry>,
    /// Our own network namespace (on a node, the host network, where
    /// host-network pods live), its cookie, and whether it is passed through
    /// (never captured) now.
    own_netns: Option<(NetnsId, NetnsCookie, Option<bool>)>,
    /// The workloads, once a source has reported them.
    model: Option<Model>,
    /// Sandboxes the CNI plugin handed over, waiting for their decision.
    cni_waiting: Vec<cni::Wait>,
    /// The plugin's sandboxes answered: by verdict, and how long each took.
    cni_figures: admin::CniFigures,
    /// Enrolment latencies (µs).
    enrolment: hdrhistogram::Histogram<u64>,
    /// From a batch of watch events arriving to its changes in the maps and
    /// with the executors (µs); the first, whole model not counted.
    model_updates: hdrhistogram::Histogram<u64>,
    /// Kubernetes watch interruptions, and node CA requests, when watching.
    watch_counters: Option<(Arc<source::kube::Counters>, Arc<source::nodeca::Counters>)>,
    /// The pods' certificates, when minted on the node.
    minter: Option<crate::identity::mint::Minter>,
    /// Sets up the return paths that let applications see clients'
    /// addresses, off this thread.
    return_paths: crate::control::return_path::Installer,
    /// The authorization policies the executors hold.
    policies: Arc<crate::cluster::policy::Table>,
    /// The strict tables installed, by namespace (with their ruleset).
    strict: HashMap<NetnsId, (Arc<crate::node::netns::Netns>, String)>,
    /// Whether the pods served were looked at once for strict tables left
    /// by a previous agent.
    strict_swept: bool,
    /// Where the kubelet's probes come from (`--probe-source`, or this
    /// node's addresses).
    probe_sources: Vec<ipnet::IpNet>,
}

impl Control {
    /// The control thread's state before the executors start: capture
    /// loaded (not attached), the splice program if asked for.
    fn new(
        cfg: Config,
        health: Arc<admin::Health>,
        watch_counters: Option<(Arc<source::kube::Counters>, Arc<source::nodeca::Counters>)>,
    ) -> anyhow::Result<Self> {
        let minter = cfg
            .minting
            .clone()
            .map(|m| crate::identity::mint::Minter::new(m, cfg.identity.resumption()))
            .transpose()?;
        let return_paths = crate::control::return_path::Installer::start(cfg.capture.bypass_mark)
            .context("starting the return-path thread")?;
        let probe_sources = match cfg.probe_sources.is_empty() {
            false => cfg.probe_sources.clone(),
            true => crate::node::netns::Netns::current()
                .and_then(|n| n.addresses())
                .unwrap_or_default()
                .into_iter()
                .filter(|a| !a.is_loopback())
                .map(ipnet::IpNet::from)
                .collect(),
        };
        let capture = Some(Capture::load(&cfg.capture)?);
        let splice = match cfg.same_node_fast_path {
            false => None,
            true => crate::node::ebpf::SpliceProgram::load()
                .inspect_err(|e| warn!(error = %e, "same-node fast path: the kernel cannot splice (sockmap); relaying in user space"))
                .ok(),
        };
        let home = crate::node::netns::Netns::current().context("opening our own network namespace")?;
        let own_netns = Some((home.id(), home.cookie().context("reading our own namespace's cookie")?, None));
        Ok(Control {
            registry: cfg.netns_dir.as_deref().map(enroll::Registry::new),
            cfg,
            capture,
            splice,
            executors: Vec::new(),
            health,
            reloads: admin::Reloads::default(),
            started: SystemTime::now(),
            own_netns,
            model: None,
            cni_waiting: Vec::new(),
            cni_figures: admin::CniFigures { answered: BTreeMap::new(), decision: crate::proxy::stats::histogram() },
            enrolment: crate::proxy::stats::histogram(),
            model_updates: crate::proxy::stats::histogram(),
            watch_counters,
            minter,
            return_paths,
            policies: Arc::default(),
            strict: HashMap::new(),
            strict_swept: false,
            probe_sources,
        })
    }

    /// Spawns one executor per chosen CPU, each listening in the command
    /// line's namespaces; their news arrives on the returned channel.
    fn start_executors(&mut self) -> anyhow::Result<Receiver<executor::ExecutorEvent>> {
        for ns in &self.cfg.namespaces {
            migrate_requests(ns);
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        // Read once: the executors index the pods by them (the same-node
        // fast path) and the return path is made for them.
        let namespaces: Vec<_> =
            self.cfg.namespaces.iter().map(|ns| (ns.clone(), ns.addresses().unwrap_or_default())).collect();
        let spec = Arc::new(executor::ExecutorSpec {
            namespaces,
            bypass_mark: self.cfg.capture.bypass_mark,
            identity: self.cfg.identity.clone(),
            limits: self.cfg.limits,
            busy_poll: self.cfg.busy_poll,
            orig_pin: self.capture.as_ref().and_then(Capture::pinned_orig),
            same_node_fast_path: self.cfg.same_node_fast_path,
            // Workload identities come with minted certificates: `--certs`
            // names pods by address only.
            trust_domain: self.cfg.minting.as_ref().map(|m| Arc::from(m.trust_domain.as_str())),
            // Loopback mode: what is captured on loopback is tunnelled to
            // this process's own inbound listeners.
            local_tunnels: self.cfg.capture.cidrs.iter().any(|c| c.addr.is_loopback()),
            affinity: Arc::default(),
            splice: self.splice.as_ref().and_then(|s| {
                s.maps()
                    .inspect_err(|e| warn!(error = %e, "same-node fast path: cannot share the splice maps; relaying in user space"))
                    .ok()
            }),
        });
        self.executors = executor::spawn(&self.cfg.cores, spec, tx)?;
        if let Some(splice) = self.splice.as_mut() {
            // Every executor hears of every pause; the one splicing it acts.
            let executors: Vec<_> = self.executors.iter().map(|s| s.tx.clone()).collect();
            let told = splice.on_pause(move |cookie| {
                // Every one, not the first that takes it.
                let told =
                    executors.iter().filter(|tx| tx.send(executor::ToExecutor::SplicePaused(cookie)).is_ok()).count();
                told > 0
            });
            if let Err(e) = told {
                warn!(error = %e, "same-node fast path: paused directions are found by the idle watch only");
            }
        }
        self.health.set_executors(self.executors.iter().map(|s| s.listening.clone()).collect());
        self.health.set_enrolled(self.enrolled());
        Ok(rx)
    }
}
