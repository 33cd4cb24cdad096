//! The control thread of `dataplane run`.
//!
//! Start-up: admin endpoint (answering 503 until ready), eBPF load, executors,
//! attach once every executor listens (so no captured connect ever meets a
//! closed port), ready. Then one loop owns everything that is not the data
//! path: signals (SIGUSR1 dumps, SIGTERM/SIGINT drain), admin queries, and
//! certificate reloads. Executors are only ever sent messages; nothing here
//! waits on them except for their replies to snapshot requests.
//!
//! Drain: readiness false at once, listeners closed (a new instance bound to
//! the same SO_REUSEPORT ports takes new connections), open connections get
//! up to `--drain-timeout`, then the programs are detached and we exit 0;
//! whatever is still open is closed with the process.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};
use crossbeam_channel::{select, Receiver};
use signal_hook::{
    consts::{SIGINT, SIGTERM, SIGUSR1},
    iterator::Signals,
};
use tracing::{error, info, warn};

use crate::{
    cluster::model::{self, Effects, Model},
    cluster::source,
    config::{Config, Source},
    control::enroll::{self, Change},
    control::uninstall::Fate,
    identity::reload,
    identity::Identity,
    node::ebpf::Capture,
    node::netns::NetnsId,
    ops::admin::{self, Phase},
    ops::dump,
    proxy::executor,
    proxy::stats::Snapshot,
};
use dataplane_common::maps::{MeshedDst, NetnsCookie, NetnsEntry, StatIndex, Verdict};

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
mod removal;
mod strict;

/// Runs until SIGTERM or SIGINT, then drains.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    crate::node::socket::set_keepalive(cfg.tcp_keepalive);
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
    let registry = cfg.netns_dir.as_deref().map(enroll::Registry::new);
    // The CNI plugin's socket: sandboxes wait on it (in the plugin) until
    // the main loop below decides them.
    // (Without the socket, a channel that never delivers: a dropped sender
    // would make the main loop's `select!` spin.)
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
    // The model's source. A file is read here (and again when it changes);
    // the API's changes arrive on the channel, the first once every list is
    // in.
    let (model_tx, models) = crossbeam_channel::unbounded();
    let (ca_tx, node_cas) = crossbeam_channel::unbounded();
    let mut workloads_watch = None;
    let mut watch_counters = None;
    let mut loaded = None;
    let minter =
        cfg.minting.clone().map(|m| crate::identity::mint::Minter::new(m, cfg.identity.resumption())).transpose()?;
    match &cfg.source {
        Some(Source::Kube { access, node }) => {
            let node_ca = cfg.minting.as_ref().map(|m| {
                let spec =
                    source::nodeca::Spec { node: node.clone(), lifetime: m.node_ca_lifetime, leaf_key: m.leaf_key };
                (spec, ca_tx)
            });
            watch_counters = Some(source::kube::start(access.clone(), node.clone(), model_tx, node_ca)?);
        }
        Some(Source::File { path, node }) => {
            loaded = Some(source::file::load(path, node.as_deref())?);
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            workloads_watch = Some(reload::Watch::new(dir));
        }
        None => {}
    }
    let return_paths = crate::control::return_path::Installer::start(cfg.capture.bypass_mark)
        .context("starting the return-path thread")?;
    let mut ctl = Control {
        cfg,
        capture: None,
        splice: None,
        executors: Vec::new(),
        health,
        reloads: (0, 0),
        started: SystemTime::now(),
        registry,
        own_netns: None,
        model: None,
        pending: HashMap::new(),
        cni_waiting: Vec::new(),
        cni_figures: admin::CniFigures { answered: BTreeMap::new(), decision: crate::proxy::stats::histogram() },
        enrolment: crate::proxy::stats::histogram(),
        watch_counters,
        minter,
        return_paths,
        policies: Arc::default(),
        strict: HashMap::new(),
        strict_swept: false,
        probe_sources: Vec::new(),
    };
    ctl.probe_sources = match ctl.cfg.probe_sources.is_empty() {
        false => ctl.cfg.probe_sources.clone(),
        true => crate::node::netns::Netns::current()
            .and_then(|n| n.addresses())
            .unwrap_or_default()
            .into_iter()
            .filter(|a| !a.is_loopback())
            .map(ipnet::IpNet::from)
            .collect(),
    };
    ctl.capture = Some(Capture::load(&ctl.cfg.capture)?);
    if ctl.cfg.same_node_fast_path {
        ctl.splice = match crate::node::ebpf::SpliceProgram::load() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "same-node fast path: the kernel cannot splice (sockmap); relaying in user space");
                None
            }
        };
    }
    let home = crate::node::netns::Netns::current().context("opening our own network namespace")?;
    ctl.own_netns = Some((home.id(), home.cookie().context("reading our own namespace's cookie")?, None));

    for ns in &ctl.cfg.namespaces {
        migrate_requests(ns);
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    // Read once: the executors index the pods by them (the same-node fast
    // path) and the return path is made for them.
    let namespaces: Vec<_> =
        ctl.cfg.namespaces.iter().map(|ns| (ns.clone(), ns.addresses().unwrap_or_default())).collect();
    let spec = Arc::new(executor::ExecutorSpec {
        namespaces: namespaces.clone(),
        bypass_mark: ctl.cfg.capture.bypass_mark,
        identity: ctl.cfg.identity.clone(),
        limits: ctl.cfg.limits,
        busy_poll: ctl.cfg.busy_poll,
        orig_pin: ctl.capture.as_ref().and_then(Capture::pinned_orig),
        same_node_fast_path: ctl.cfg.same_node_fast_path,
        // Workload identities come with minted certificates: `--certs`
        // names pods by address only.
        trust_domain: ctl.cfg.minting.as_ref().map(|m| Arc::from(m.trust_domain.as_str())),
        // Loopback mode: what is captured on loopback is tunnelled to this
        // process's own inbound listeners.
        local_tunnels: ctl.cfg.capture.cidrs.iter().any(|c| c.addr.is_loopback()),
        splice: ctl.splice.as_ref().and_then(|s| match s.maps() {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(error = %e, "same-node fast path: cannot share the splice maps; relaying in user space");
                None
            }
        }),
    });
    ctl.executors = executor::spawn(&ctl.cfg.cores, spec, tx)?;
    if let Some(splice) = ctl.splice.as_mut() {
        // Every executor hears of every pause; the one splicing it acts.
        let executors: Vec<_> = ctl.executors.iter().map(|s| s.tx.clone()).collect();
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
    ctl.health.set_executors(ctl.executors.iter().map(|s| s.listening.clone()).collect());
    ctl.health.set_enrolled(ctl.enrolled());
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut ready = 0;
    while ready < ctl.executors.len() {
        select! {
            recv(rx) -> ev => match ev {
                Ok(executor::ExecutorEvent::Ready { .. }) => ready += 1,
                Ok(executor::ExecutorEvent::Failed { cpu, error, .. }) => bail!("executor on CPU {cpu}: {error}"),
                Ok(executor::ExecutorEvent::Listening { .. }) => {}
                Err(_) => bail!("executors stopped during start-up"),
            },
            recv(admin_rx) -> req => if let Ok(req) = req { ctl.answer(req) },
            recv(signals) -> sig => if matches!(sig, Ok(SIGTERM | SIGINT)) { bail!("stopped during start-up") },
            default(deadline.saturating_duration_since(Instant::now())) => {
                bail!("executors did not report listening within {STARTUP_TIMEOUT:?}")
            }
        }
    }
    // The namespaces given on the command line are served from the start.
    for (ns, addresses) in namespaces {
        let cookie = ns.cookie().with_context(|| format!("reading the cookie of {}", ns.name()))?;
        ctl.set_netns(cookie, Some(NetnsEntry::new(Verdict::Served, &[])));
        if ctl.wants_return_path(&addresses) {
            ctl.return_paths.now(&ns, &addresses);
        }
    }
    ctl.sync_own_netns()?;
    // With a model, nothing is captured before it is in: which pods are
    // meshed decides both what we serve and what connect4 refuses.
    if let Some(m) = loaded {
        ctl.reload_model(m);
    }
    if ctl.cfg.source.is_some() && ctl.model.is_none() {
        info!("waiting for the first model of the workloads from the Kubernetes API");
    }
    while ctl.cfg.source.is_some() && ctl.model.is_none() {
        select! {
            recv(models) -> m => { ctl.update(m.context("the Kubernetes watch thread stopped")?); }
            recv(admin_rx) -> req => if let Ok(req) = req { ctl.answer(req) },
            recv(signals) -> sig => if matches!(sig, Ok(SIGTERM | SIGINT)) { bail!("stopped during start-up") },
        }
    }
    // Sandboxes the CNI plugin handed a previous agent: their pods'
    // addresses, before the kubelet reports them.
    ctl.restore_sandboxes();
    // Pods are served once their certificates are minted: after a restart,
    // give the issuer a moment before attaching (then go on regardless; a
    // pod without a certificate is refused, never plaintext).
    if ctl.minter.is_some() {
        info!("waiting for this node's CA from the issuer");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while ctl.minter.as_ref().is_some_and(|m| !m.has_ca()) && Instant::now() < deadline {
            select! {
                recv(node_cas) -> ca => if let Ok(ca) = ca { ctl.set_node_ca(ca) },
                recv(models) -> m => if let Ok(m) = m { ctl.update(m); },
                recv(admin_rx) -> req => if let Ok(req) = req { ctl.answer(req) },
                recv(signals) -> sig => if matches!(sig, Ok(SIGTERM | SIGINT)) { bail!("stopped during start-up") },
                default(deadline.saturating_duration_since(Instant::now())) => {}
            }
        }
    }
    // Then every namespace already there is enrolled before the programs
    // are attached: after a restart, pods are served again before anything
    // is refused for want of a listener.
    ctl.scan_namespaces();
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while !ctl.pending.is_empty() && Instant::now() < deadline {
        select! {
            recv(rx) -> ev => if let Ok(ev) = ev { ctl.executor_event(ev) },
            recv(admin_rx) -> req => if let Ok(req) = req { ctl.answer(req) },
            recv(signals) -> sig => if matches!(sig, Ok(SIGTERM | SIGINT)) { bail!("stopped during start-up") },
            default(deadline.saturating_duration_since(Instant::now())) => {}
        }
    }
    ctl.forget_unknown_namespaces();
    if let Some(c) = ctl.capture.as_mut() {
        c.attach(&ctl.cfg.workload_cgroup, &ctl.cfg.own_cgroup)?;
    }
    ctl.health.set_phase(Phase::Ready);
    info!("data plane ready: capturing connects");

    let mut watch = ctl.cfg.identity.dir().map(reload::Watch::new);
    let tick = crossbeam_channel::tick(RELOAD_POLL);
    let trim = crossbeam_channel::tick(TRIM_EVERY);
    let mut open_before = 0;
    let mut fate = None;
    loop {
        let quick = match &ctl.registry {
            Some(r) if r.waiting() => crossbeam_channel::after(QUICK_LOOK),
            _ => crossbeam_channel::never(),
        };
        select! {
            recv(signals) -> sig => match sig {
                Ok(SIGUSR1) => ctl.dump(),
                Ok(signal) => {
                    info!(signal, "stopping: draining");
                    fate = removal::ask_fate(&ctl.cfg);
                    break;
                }
                Err(_) => break,
            },
            recv(admin_rx) -> req => if let Ok(req) = req { ctl.answer(req) },
            recv(rx) -> ev => if let Ok(ev) = ev { ctl.executor_event(ev) },
            recv(cni_asks) -> ask => if let Ok(ask) = ask { ctl.cni(ask) },
            recv(models) -> m => match m {
                // Enrolment looks again only when one of this node's pods
                // changed: the rest of the cluster's churn never touches it.
                Ok(m) => if ctl.update(m) { ctl.scan_namespaces() },
                Err(_) => bail!("the Kubernetes watch thread stopped"),
            },
            recv(node_cas) -> ca => if let Ok(ca) = ca {
                ctl.set_node_ca(ca);
                ctl.scan_namespaces();
            },
            recv(netns_events) -> _ => ctl.scan_namespaces(),
            recv(quick) -> _ => ctl.scan_namespaces(),
            recv(tick) -> _ => {
                if watch.as_mut().is_some_and(reload::Watch::changed) {
                    ctl.reload();
                }
                if let (Some(w), Some(Source::File { path, node })) = (workloads_watch.as_mut(), &ctl.cfg.source) {
                    if w.changed() {
                        match source::file::load(path, node.as_deref()) {
                            Ok(m) => {
                                info!(workloads = %path.display(), "workloads file reloaded");
                                ctl.reload_model(m);
                            }
                            Err(e) => error!(error = %e, "workloads file refused: the previous model stays in service"),
                        }
                    }
                }
                ctl.refresh_certificates();
                ctl.scan_namespaces();
            },
            recv(trim) -> _ => {
                // Give memory back after connections (proxied or to the
                // admin endpoint) went away.
                let open = ctl.open() + ctl.health.open();
                if open < open_before {
                    crate::node::sys::release_free_memory();
                }
                open_before = open;
            },
        }
    }
    let (pin_dir, netns_dir) = (ctl.cfg.capture.pin_dir.clone(), ctl.cfg.netns_dir.clone());
    ctl.drain(&admin_rx);
    if let Some(fate) = fate {
        removal::take_off(
            fate.join().unwrap_or_else(|_| Fate::Unknown("the check panicked".into())),
            &pin_dir,
            netns_dir,
        );
    }
    Ok(())
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
    reloads: (u64, u64),
    started: SystemTime,
    /// The watched namespace directory, if any.
    registry: Option<enroll::Registry>,
    /// Our own network namespace (on a node, the host network, where
    /// host-network pods live), its cookie, and whether it is passed through
    /// (never captured) now.
    own_netns: Option<(NetnsId, NetnsCookie, Option<bool>)>,
    /// The workloads, once a source has reported them.
    model: Option<Model>,
    /// Namespaces being enrolled: what `connect4` is told once every
    /// executor listens in them.
    pending: HashMap<NetnsId, Pending>,
    /// Sandboxes the CNI plugin handed over, waiting for their decision.
    cni_waiting: Vec<cni::Wait>,
    /// The plugin's sandboxes answered: by verdict, and how long each took.
    cni_figures: admin::CniFigures,
    /// Enrolment latencies (µs).
    enrolment: hdrhistogram::Histogram<u64>,
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

/// A namespace whose listeners are opening.
#[derive(Debug)]
struct Pending {
    cookie: NetnsCookie,
    skip_outbound: Vec<u16>,
    listening: BTreeSet<usize>,
    since: Instant,
    ns: Arc<crate::node::netns::Netns>,
    /// The pod's addresses, when its application should see clients'.
    return_path: Option<Vec<IpAddr>>,
}

impl Control {
    /// Enrols and withdraws namespaces from the watched directory.
    fn scan_namespaces(&mut self) {
        let Some(registry) = self.registry.as_mut() else { return };
        let changes = registry.scan(&self.cfg.identity, self.model.as_ref());
        self.enrolment_changes(changes);
    }

    /// Decides the namespace at `path` alone (a sandbox just handed over by
    /// the CNI plugin): its pod is not kept waiting for a look at every
    /// other namespace of the node.
    fn look_at(&mut self, path: &std::path::Path) {
        let Some(registry) = self.registry.as_mut() else { return };
        let changes = registry.look_at(path, &self.cfg.identity, self.model.as_ref());
        self.enrolment_changes(changes);
    }

    /// Carries out what enrolment decided.
    fn enrolment_changes(&mut self, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Enroll { ns, cookie, skip_outbound, since, addresses, client_address } => {
                    migrate_requests(&ns);
                    for s in &self.executors {
                        let _ = s.tx.send(executor::ToExecutor::Enroll(ns.clone(), addresses.clone()));
                    }
                    let return_path = client_address.then_some(addresses);
                    let pending = Pending {
                        cookie,
                        skip_outbound,
                        listening: BTreeSet::new(),
                        since,
                        ns: ns.clone(),
                        return_path,
                    };
                    self.pending.insert(ns.id(), pending);
                }
                Change::Ports(id, cookie, skip) => match self.pending.get_mut(&id) {
                    Some(p) => p.skip_outbound = skip,
                    None => self.set_netns(cookie, Some(NetnsEntry::new(Verdict::Served, &skip))),
                },
                Change::Withdraw(ns, cookie) => {
                    let id = ns.id();
                    self.pending.remove(&id);
                    // The return path stays: connections still open through
                    // it keep working to their end (without it the
                    // application's replies would leave the pod). No new
                    // transparent socket is made, so it is inert; it goes
                    // with the namespace, or is re-created if the pod is
                    // served again.
                    ns.set_client_address(false);
                    // connect4 first: new connects stop coming our way...
                    if let Some(cookie) = cookie {
                        self.set_netns(cookie, None);
                    }
                    // ...then the listeners close.
                    for s in &self.executors {
                        let _ = s.tx.send(executor::ToExecutor::Withdraw(id));
                    }
                    if let (Some(cookie), Some(capture)) = (cookie, self.capture.as_mut()) {
                        match capture.forget_netns(cookie) {
                            Ok(n) => info!(?id, entries = n, "forgot the namespace's original destinations"),
                            Err(e) => warn!(?id, error = %e, "could not clean the namespace's map entries"),
                        }
                    }
                }
                Change::Pass(cookie, pass) => {
                    self.set_netns(cookie, pass.then(|| NetnsEntry::new(Verdict::Pass, &[])));
                }
            }
        }
        self.health.set_enrolled(self.enrolled());
        self.sync_strict();
        if let Err(e) = self.sync_own_netns() {
            error!(error = %e, "could not update the capture verdict of our own namespace");
        }
        self.answer_cni();
    }

    /// Drops what `connect4` knows of namespaces we do not (adopted from a
    /// strict predecessor: namespaces that went while no agent ran). Those
    /// we know, served or not yet, keep their entries until we decide.
    fn forget_unknown_namespaces(&mut self) {
        let mut known: Vec<NetnsCookie> = self.registry.as_ref().map(|r| r.cookies()).unwrap_or_default();
        known.extend(self.own_netns.as_ref().map(|(_, c, _)| *c));
        known.extend(self.cfg.namespaces.iter().filter_map(|ns| ns.cookie().ok()));
        let Some(capture) = self.capture.as_mut() else { return };
        let stale: Vec<NetnsCookie> =
            capture.netns_cookies().unwrap_or_default().into_iter().filter(|c| !known.contains(c)).collect();
        for c in &stale {
            let _ = capture.set_netns(*c, None);
        }
        if !stale.is_empty() {
            info!(entries = stale.len(), "forgot namespaces that went while no data plane ran");
        }
    }

    /// Whether a pod with `addresses` that asks for it gets the return path
    /// that lets its application see clients' addresses. A namespace with
    /// no address of its own (loopback only) has no client from elsewhere.
    fn wants_return_path(&self, addresses: &[IpAddr]) -> bool {
        self.cfg.client_address && !addresses.is_empty()
    }

    /// An executor's news: once every executor listens in a namespace being
    /// enrolled, `connect4` starts sending its connects to them.
    fn executor_event(&mut self, ev: executor::ExecutorEvent) {
        match ev {
            executor::ExecutorEvent::Listening { cpu, netns } => {
                let Some(p) = self.pending.get_mut(&netns) else { return };
                p.listening.insert(cpu);
                if p.listening.len() < self.executors.len() {
                    return;
                }
                if let Some(p) = self.pending.remove(&netns) {
                    self.set_netns(p.cookie, Some(NetnsEntry::new(Verdict::Served, &p.skip_outbound)));
                    let took = p.since.elapsed();
                    let _ = self.enrolment.record(took.as_micros().max(1) as u64);
                    info!(?netns, ?took, "namespace served: its connects are captured");
                    self.answer_cni();
                    // Then the return path (some milliseconds of nft and ip,
                    // on its own thread): the pod is served meanwhile, from
                    // its own address.
                    if let Some(addresses) = p.return_path.filter(|a| self.wants_return_path(a)) {
                        self.return_paths.request(p.ns, addresses);
                    }
                }
            }
            executor::ExecutorEvent::Failed { cpu, netns, error } => {
                error!(cpu, ?netns, %error, "an executor could not listen in a namespace: its meshed connects stay refused");
            }
            executor::ExecutorEvent::Ready { .. } => {}
        }
    }

    /// Writes what connect4 knows of a namespace; a failure is logged (the
    /// namespace's connects to meshed destinations stay refused).
    fn set_netns(&mut self, cookie: NetnsCookie, entry: Option<NetnsEntry>) {
        if let Some(capture) = self.capture.as_mut() {
            if let Err(e) = capture.set_netns(cookie, entry) {
                error!(netns_cookie = cookie.0, error = %e, "could not update the namespace's capture verdict");
            }
        }
    }

    /// Takes the cluster's changes (the first: the whole model); returns
    /// whether a local workload changed (enrolment must look again).
    fn update(&mut self, changes: Vec<model::Change>) -> bool {
        let first = self.model.is_none();
        let fx = self.model.get_or_insert_with(Model::default).apply(changes);
        self.take_effects(fx, first)
    }

    /// Takes a reloaded workloads file: what differs from the model in
    /// service is applied. Returns whether a local workload changed.
    fn reload_model(&mut self, loaded: Model) -> bool {
        let first = self.model.is_none();
        let (workloads, services) = loaded.into_parts();
        let fx = self.model.get_or_insert_with(Model::default).replace(workloads, services);
        self.take_effects(fx, first)
    }

    /// Carries what a model update changed to `connect4` and the executors,
    /// and lets certificates look again when a local pod changed. Only what
    /// changed is written: the cost of an update does not grow with the
    /// cluster. Returns whether a local workload changed.
    fn take_effects(&mut self, fx: Effects, first: bool) -> bool {
        let Some(model) = self.model.as_ref() else { return false };
        // Executors learn a pod's identity before `connect4` sends them its
        // connections.
        if !fx.identities.is_empty() {
            let changes: Arc<[_]> = fx.identities.iter().map(|(a, id)| (*a, id.clone())).collect();
            for s in &self.executors {
                let _ = s.tx.send(executor::ToExecutor::Workloads(changes.clone()));
            }
        }
        if let (true, Some(capture)) = (first, self.capture.as_mut()) {
            // Adopted maps (strict mode) hold what the previous instance
            // wrote: pods and ClusterIPs deleted while no agent ran go now.
            let want = model.meshed_destinations();
            for addr in capture.meshed_addresses().unwrap_or_default() {
                if !want.contains_key(&addr) {
                    let _ = capture.set_meshed(addr, None);
                }
            }
            let table = model.service_table();
            for vip in capture.service_vips().unwrap_or_default() {
                if table.get(vip).is_none() {
                    let _ = capture.set_service_vip(vip, None);
                }
            }
        }
        if let Some(capture) = self.capture.as_mut() {
            // Added before removed, so a pod moving between addresses is
            // never missed.
            let mut failed = 0;
            for (addr, ports) in &fx.meshed {
                if let Some(ports) = ports {
                    failed += usize::from(capture.set_meshed(*addr, Some(MeshedDst::new(ports))).is_err());
                }
            }
            for addr in fx.meshed.iter().filter(|(_, p)| p.is_none()).map(|(a, _)| a) {
                let _ = capture.set_meshed(*addr, None);
            }
            if failed > 0 {
                error!(failed, "meshed destinations not written (map full?): connects to them go direct");
            }
        }
        if fx.services || first {
            // Executors learn a ClusterIP before `connect4` starts capturing
            // it.
            let table = model.service_table().clone();
            for s in &self.executors {
                let _ = s.tx.send(executor::ToExecutor::Services(table.clone()));
            }
            tracing::debug!(service_ports = table.len(), "services updated");
        }
        if let Some(capture) = self.capture.as_mut() {
            let mut failed = 0;
            for (vip, held) in &fx.vips {
                failed += usize::from(capture.set_service_vip(*vip, *held).is_err() && held.is_some());
            }
            if failed > 0 {
                error!(failed, "Service ClusterIPs not written (map full?): connects to them go around the mesh");
            }
        }
        // Every pod change in the cluster lands here: the first model is
        // worth a line, the rest only at debug.
        if first {
            let (destinations, local) = (model.meshed_destinations().len(), model.local_counts());
            info!(destinations, ?local, "model of the workloads in");
        } else {
            tracing::debug!(destinations = fx.meshed.len(), local = fx.local, "model of the workloads updated");
        }
        if first || fx.policies || fx.local {
            let table = model.policy_table();
            if *self.policies != table {
                self.policies = Arc::new(table);
                for s in &self.executors {
                    let _ = s.tx.send(executor::ToExecutor::Policies(self.policies.clone()));
                }
                tracing::debug!(pods = self.policies.len(), "authorization policies updated");
            }
        }
        if let (true, Some(socket)) = (first || fx.namespaces, &self.cfg.cni_socket) {
            if let Err(e) = crate::control::cni::write_namespaces(socket, model.meshed_namespaces()) {
                error!(socket = %socket.display(), error = %e, "could not write the meshed namespaces for the CNI plugin");
            }
        }
        if first || fx.local {
            self.refresh_certificates();
        }
        fx.local
    }

    /// A node CA from the cluster: every pod is re-minted with it.
    fn set_node_ca(&mut self, ca: Arc<crate::identity::pki::NodeCa>) {
        if let Some(m) = self.minter.as_mut() {
            m.set_ca(ca);
        }
        self.refresh_certificates();
    }

    /// Mints what is missing or due, and hands a changed identity to the
    /// executors (new handshakes use it; those in flight finish with theirs).
    fn refresh_certificates(&mut self) {
        let Some(minter) = self.minter.as_mut() else { return };
        let Some(id) = minter.refresh(self.model.as_ref(), &self.cfg.identity) else { return };
        let id = Arc::new(id);
        tracing::debug!(identities = ?id.addresses().collect::<Vec<_>>(), "pod certificates minted");
        self.cfg.identity = id.clone();
        for s in &self.executors {
            let _ = s.tx.send(executor::ToExecutor::Identity(id.clone()));
        }
    }

    /// Connects from our own namespace are never captured unless we serve it
    /// (a laptop demo serving its own namespace): there is no listener there
    /// for them, and on a node they are the host-network pods'.
    fn sync_own_netns(&mut self) -> anyhow::Result<()> {
        let enrolled = self.enrolled();
        let (Some((id, cookie, passed)), Some(capture)) = (self.own_netns.as_mut(), self.capture.as_mut()) else {
            return Ok(());
        };
        let pass = !enrolled.contains(id);
        if *passed != Some(pass) {
            capture.set_netns(*cookie, pass.then(|| NetnsEntry::new(Verdict::Pass, &[])))?;
            info!(netns_cookie = cookie.0, captured = !pass, "our own network namespace (host-network pods)");
            *passed = Some(pass);
        }
        Ok(())
    }

    /// The namespaces every executor must listen in.
    fn enrolled(&self) -> Vec<NetnsId> {
        let mut v: Vec<NetnsId> = self.cfg.namespaces.iter().map(|n| n.id()).collect();
        if let Some(r) = &self.registry {
            v.extend(r.served());
        }
        v
    }

    /// Connections open on every executor, read without asking them.
    fn open(&self) -> u64 {
        self.executors.iter().map(|s| s.open.get()).sum()
    }

    /// Every executor's measurements, merged (histograms included: for
    /// dumps and scrapes).
    fn collect(&self) -> Snapshot {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut asked = 0;
        for s in &self.executors {
            if s.tx.send(executor::ToExecutor::Snapshot(tx.clone())).is_ok() {
                asked += 1;
            }
        }
        let mut merged = Snapshot::default();
        let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
        for _ in 0..asked {
            match rx.recv_deadline(deadline) {
                Ok(r) => merged.merge(&r.stats),
                Err(_) => {
                    warn!(asked, "an executor did not answer a snapshot request in time");
                    break;
                }
            }
        }
        merged
    }

    fn bpf_stats(&self) -> Vec<(StatIndex, u64)> {
        match self.capture.as_ref().map(Capture::stats) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                warn!(error = %e, "reading the eBPF counters");
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    fn dump(&self) {
        let stats = self.collect();
        if let Err(e) = dump::dump(&stats, &self.bpf_stats(), self.cfg.stats_dir.as_deref(), self.started) {
            error!(error = %e, dir = ?self.cfg.stats_dir, "writing the stats dump");
        }
    }

    fn answer(&self, req: admin::Request) {
        let reply = match req.query {
            admin::Query::Metrics => {
                let stats = self.collect();
                let namespaces = self.registry.as_ref().map(enroll::Registry::counts).unwrap_or_default();
                let extra = admin::Extra {
                    reloads: self.reloads,
                    namespaces,
                    admin: self.health.closed(),
                    pods: self.model.as_ref().map(|m| m.local_counts()).unwrap_or_default(),
                    watch_errors: self.watch_counters.as_ref().map(|(c, _)| {
                        use std::sync::atomic::Ordering::Relaxed;
                        vec![
                            ("pods", c.pods.load(Relaxed)),
                            ("namespaces", c.namespaces.load(Relaxed)),
                            ("services", c.services.load(Relaxed)),
                            ("authorizationpolicies", c.policies.load(Relaxed)),
                        ]
                    }),
                    certificates: self.minter.as_ref().zip(self.watch_counters.as_ref()).map(|(m, (_, ca))| {
                        use std::sync::atomic::Ordering::Relaxed;
                        let (minted, failed) = m.counts();
                        [ca.issued.load(Relaxed), ca.failed.load(Relaxed), minted, failed]
                    }),
                    enrolment: self.registry.as_ref().map(|_| self.enrolment.clone()),
                    return_path_failures: self.return_paths.failures(),
                    cni: self.cfg.cni_socket.as_ref().map(|_| self.cni_figures.clone()),
                };
                (200, admin::render(&stats, &self.bpf_stats(), &extra))
            }
        };
        let _ = req.reply.send(reply);
    }

    fn reload(&mut self) {
        let Some(dir) = self.cfg.identity.dir().map(std::path::Path::to_path_buf) else { return };
        match Identity::load_with(&dir, self.cfg.identity.resumption()) {
            Ok(id) => {
                let id = Arc::new(id);
                self.cfg.identity = id.clone();
                info!(certs = %dir.display(), identities = ?id.addresses().collect::<Vec<_>>(), "certificates reloaded");
                for s in &self.executors {
                    let _ = s.tx.send(executor::ToExecutor::Identity(id.clone()));
                }
                self.reloads.0 += 1;
            }
            Err(e) => {
                self.reloads.1 += 1;
                error!(certs = %dir.display(), error = %e, "certificate reload refused: the previous certificates stay in service");
            }
        }
    }

    fn drain(mut self, admin_rx: &Receiver<admin::Request>) {
        self.health.set_phase(Phase::Draining);
        for s in &self.executors {
            let _ = s.tx.send(executor::ToExecutor::Drain);
        }
        let deadline = Instant::now() + self.cfg.drain_timeout;
        // First every executor closes its listeners (after that nothing new
        // is accepted, and every accepted connection is counted as open)...
        while !self.executors.iter().all(|s| executor::lock(&s.listening).is_empty()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        // ...then the open connections get until the deadline.
        loop {
            let open = self.open();
            if open == 0 {
                info!("drained: no connection left");
                break;
            }
            if Instant::now() >= deadline {
                warn!(open, timeout = ?self.cfg.drain_timeout, "drain timeout: closing the connections still open");
                break;
            }
            while let Ok(req) = admin_rx.try_recv() {
                self.answer(req);
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.capture = None; // detaches the programs
        info!("detached; exiting");
    }
}
