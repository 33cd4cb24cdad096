//! The command line and its validation into one [`Config`].
//!
//! clap parses (with environment-variable fallbacks, so a ConfigMap can set
//! them); [`RunArgs::validate`] then checks the whole as a unit and every error
//! names the flag, the value and the reason. Both kinds of error exit with 2.
use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;

use crate::{identity::Identity, node::cgroup, node::cores, node::ebpf, node::netns::Netns, proxy::conn::Limits};
use dataplane_common::{INBOUND_PORT, OUTBOUND_PORT};

/// Default SO_MARK of the data plane's own sockets ("dp" in ASCII, high bit
/// clear so it does not collide with kube-proxy's 0x4000/0x8000 marks).
pub const DEFAULT_BYPASS_MARK: u32 = 0x0064_7000;

mod cli;
mod error;

pub use cli::*;
pub use error::ConfigError;

/// The validated configuration of `dataplane run`.
#[derive(Debug)]
pub struct Config {
    /// Where connects are captured.
    pub workload_cgroup: PathBuf,
    /// Where `SO_ORIGINAL_DST` is answered: our own cgroup.
    pub own_cgroup: PathBuf,
    /// Namespaces served from the start, each by every executor.
    pub namespaces: Vec<Arc<Netns>>,
    /// Directory of namespace files to enrol and withdraw as they come and go.
    pub netns_dir: Option<PathBuf>,
    /// The CNI plugin's socket, if served.
    pub cni_socket: Option<PathBuf>,
    /// TCP keepalive idle time of every connection socket (`None`: off).
    pub tcp_keepalive: Option<Duration>,
    /// Where the kubelet's probes come from (empty: this node's addresses,
    /// read at start).
    pub probe_sources: Vec<IpNet>,
    /// The token `/metrics` asks for, by file.
    pub metrics_token: Option<PathBuf>,
    /// The DaemonSet (namespace, name) whose deletion takes the agent's
    /// pins and return paths off the node as it stops.
    pub daemonset: Option<(String, String)>,
    /// Where the model of the workloads comes from, if anywhere.
    pub source: Option<Source>,
    /// Pod certificates minted on the node (`--node-ca`), if so.
    pub minting: Option<Minting>,
    /// Whether applications see clients' addresses.
    pub client_address: bool,
    /// Whether connections between two pods served here skip the tunnel.
    pub same_node_fast_path: bool,
    /// CPUs, one executor each.
    pub cores: Vec<usize>,
    /// How long an executor polls before it sleeps, if at all.
    pub busy_poll: Option<Duration>,
    /// What the eBPF programs are told.
    pub capture: ebpf::Settings,
    /// Certificates and TLS configurations (replaced on reload).
    pub identity: Arc<Identity>,
    /// Handshake and idle limits.
    pub limits: Limits,
    /// The admin endpoint's address.
    pub admin: Option<SocketAddr>,
    /// Where SIGUSR1 dumps go.
    pub stats_dir: Option<PathBuf>,
    /// How long a drain may take.
    pub drain_timeout: Duration,
}

/// How pod certificates are minted on the node (`--node-ca`).
#[derive(Debug, Clone)]
pub struct Minting {
    /// The trust bundle file.
    pub bundle: PathBuf,
    /// Node CA lifetime asked for.
    pub node_ca_lifetime: Duration,
    /// Pod certificate lifetime.
    pub pod_lifetime: Duration,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Pod key type.
    pub leaf_key: crate::identity::pki::KeyType,
}

/// Where the model of the workloads comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The Kubernetes API, as this node.
    Kube {
        /// How to reach it.
        access: dataplane_pki::api::Access,
        /// This node's name.
        node: String,
    },
    /// A workloads file.
    File {
        /// The file.
        path: PathBuf,
        /// This node's name, if given.
        node: Option<String>,
    },
}

/// `DATAPLANE_*` variables in the environment that no flag of `dataplane
/// run` reads: a typo in a ConfigMap would otherwise be silently ignored.
pub fn unknown_env_settings() -> Vec<String> {
    use clap::CommandFactory;
    let cli = Cli::command();
    let known: Vec<String> = cli
        .find_subcommand("run")
        .map(|run| run.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let mut unknown: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("DATAPLANE_") && !known.contains(k))
        .collect();
    unknown.sort();
    unknown
}

/// The kubelet's pods cgroup under the cgroup v2 mount, if there is one.
pub fn kubepods_cgroup(root: &std::path::Path) -> Option<PathBuf> {
    ["kubepods.slice", "kubepods"].iter().map(|n| root.join(n)).find(|p| cgroup::is_cgroup2_dir(p))
}

impl RunArgs {
    /// The checks that need nothing from the host (what `--check-config`
    /// runs).
    pub fn check_values(&self) -> Result<(), ConfigError> {
        if self.map_entries == 0 {
            return Err(ConfigError::MapEntries);
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout("handshake-timeout"));
        }
        if self.idle_timeout.0.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroTimeout("idle-timeout"));
        }
        if let Some(d) = self.tcp_keepalive.0.filter(|d| *d < Duration::from_secs(1)) {
            return Err(ConfigError::KeepaliveTooShort(d));
        }
        if !(1..=crate::proxy::conn::MAX_IN_FLIGHT).contains(&self.max_handshakes_per_source) {
            return Err(ConfigError::HandshakesPerSource(self.max_handshakes_per_source));
        }
        if self.cores == Some(0) {
            return Err(ConfigError::Cores(cores::CoresError::Zero));
        }
        if let Some(d) = self.busy_poll.filter(|d| d.is_zero() || *d > MAX_BUSY_POLL) {
            return Err(ConfigError::BusyPoll(d));
        }
        let model = if self.kube {
            Some("--kube")
        } else if self.kubeconfig.is_some() {
            Some("--kubeconfig")
        } else if self.workloads.is_some() {
            Some("--workloads")
        } else {
            None
        };
        match model {
            None if self.capture_cidrs.is_empty() => return Err(ConfigError::NoDestinations),
            Some(flag) if self.netns_dir.is_none() => return Err(ConfigError::Needs(flag, "--netns-dir")),
            Some(flag @ ("--kube" | "--kubeconfig")) if self.node_name.is_none() => {
                return Err(ConfigError::Needs(flag, "--node-name"))
            }
            _ => {}
        }
        // The plugin's pods are decided by their namespace's label and their
        // own, which only the API gives.
        if self.cni_socket.is_some() && !matches!(model, Some("--kube" | "--kubeconfig")) {
            return Err(ConfigError::Needs("--cni-socket", "--kube or --kubeconfig"));
        }
        if self.removal.daemonset.is_some() && !matches!(model, Some("--kube" | "--kubeconfig")) {
            return Err(ConfigError::Needs("--daemonset", "--kube or --kubeconfig"));
        }
        if self.node_ca {
            if !matches!(model, Some("--kube" | "--kubeconfig")) {
                return Err(ConfigError::Needs("--node-ca", "--kube or --kubeconfig"));
            }
            if self.trust_bundle.is_none() {
                return Err(ConfigError::Needs("--node-ca", "--trust-bundle"));
            }
            if self.pod_cert_lifetime < Duration::from_secs(1) || self.node_ca_lifetime < Duration::from_secs(1) {
                return Err(ConfigError::ZeroTimeout("pod-cert-lifetime/--node-ca-lifetime"));
            }
        } else if self.certs.is_none() {
            return Err(ConfigError::Needs("dataplane run", "--certs DIR (or --node-ca)"));
        }
        Ok(())
    }

    /// Checks the arguments as a whole, against this host.
    pub fn validate(self) -> Result<Config, ConfigError> {
        self.check_values()?;
        if let Some(f) = &self.metrics_token_file {
            match std::fs::read_to_string(f) {
                Ok(t) if !t.trim().is_empty() => {}
                Ok(_) => return Err(ConfigError::MetricsToken { file: f.display().to_string(), why: "empty".into() }),
                Err(e) => return Err(ConfigError::MetricsToken { file: f.display().to_string(), why: e.to_string() }),
            }
        }
        let workload_cgroup = match &self.workload_cgroup {
            Some(dir) if cgroup::is_cgroup2_dir(dir) => dir.clone(),
            Some(dir) => return Err(ConfigError::WorkloadCgroup(dir.clone())),
            None => {
                let root = cgroup::cgroup2_mount().map_err(ConfigError::NoCgroup2)?;
                kubepods_cgroup(&root).ok_or(ConfigError::NoWorkloadCgroup(root))?
            }
        };
        if let Some(dir) = &self.netns_dir {
            if !dir.is_dir() {
                return Err(ConfigError::NetnsDir(dir.clone()));
            }
        }
        let (identity, minting) = self.identity()?;
        let source = self.source()?;
        let namespaces = self.namespaces()?;
        let allowed = cores::affinity().map_err(ConfigError::CpuProbe)?;
        let online = cores::online().map_err(ConfigError::CpuProbe)?;
        let cores = cores::choose(&allowed, &online, self.cores)?;
        let own_cgroup = cgroup::own_cgroup().map_err(ConfigError::OwnCgroup)?;
        Ok(Config {
            workload_cgroup,
            own_cgroup,
            namespaces,
            capture: self.capture(),
            netns_dir: self.netns_dir,
            cni_socket: self.cni_socket,
            daemonset: self.removal.daemonset,
            tcp_keepalive: self.tcp_keepalive.0,
            probe_sources: self.probe_sources,
            metrics_token: self.metrics_token_file,
            source,
            minting,
            client_address: !self.no_client_address,
            same_node_fast_path: self.same_node_fast_path,
            cores,
            busy_poll: self.busy_poll,
            identity,
            limits: Limits {
                handshake: self.handshake_timeout,
                idle: self.idle_timeout.0.unwrap_or(crate::proxy::conn::NO_IDLE_TIMEOUT),
                handshakes_per_source: self.max_handshakes_per_source,
            },
            admin: self.admin,
            stats_dir: self.stats_dir,
            drain_timeout: self.drain_timeout,
        })
    }

    /// The certificates: a directory (`--certs`), or minted on the node
    /// from the trust bundle (`--node-ca`).
    fn identity(&self) -> Result<(Arc<Identity>, Option<Minting>), ConfigError> {
        let (identity, minting) = match (&self.certs, &self.trust_bundle) {
            (Some(dir), _) => (Identity::load_with(dir, !self.no_tls_resumption)?, None),
            (None, Some(bundle)) => {
                let roots = crate::identity::read_bundle(bundle)?;
                let minting = Minting {
                    bundle: bundle.clone(),
                    node_ca_lifetime: self.node_ca_lifetime,
                    pod_lifetime: self.pod_cert_lifetime,
                    trust_domain: self.trust_domain.clone(),
                    leaf_key: self.leaf_key,
                };
                (Identity::minted(roots, bundle, &[], !self.no_tls_resumption, None)?, Some(minting))
            }
            (None, None) => return Err(ConfigError::Needs("dataplane run", "--certs DIR (or --node-ca)")),
        };
        Ok((Arc::new(identity), minting))
    }

    /// Where the model comes from: the API, a file (read once now: a broken
    /// file fails start-up with its reason), or nowhere.
    fn source(&self) -> Result<Option<Source>, ConfigError> {
        let node = self.node_name.clone();
        let access = dataplane_pki::api::Access::from_flags(self.kube, self.kubeconfig.as_deref());
        let source = match (access, &self.workloads) {
            (Some(access), _) => Some(Source::Kube { access, node: node.unwrap_or_default() }),
            (None, Some(path)) => {
                crate::cluster::source::file::load(path, node.as_deref())?;
                Some(Source::File { path: path.clone(), node })
            }
            _ => None,
        };
        Ok(source)
    }

    /// The namespaces served from the start: those named, or without a
    /// directory to watch, our own.
    fn namespaces(&self) -> Result<Vec<Arc<Netns>>, ConfigError> {
        let namespaces = if self.netns.is_empty() && self.netns_dir.is_none() {
            vec![Arc::new(
                Netns::current()
                    .map_err(|source| ConfigError::Netns { path: "/proc/thread-self/ns/net".into(), source })?,
            )]
        } else {
            self.netns
                .iter()
                .map(|p| Netns::open(p).map(Arc::new).map_err(|source| ConfigError::Netns { path: p.clone(), source }))
                .collect::<Result<_, _>>()?
        };
        Ok(namespaces)
    }

    /// What the eBPF programs are told.
    fn capture(&self) -> ebpf::Settings {
        let mut excluded_ports = self.exclude_ports.clone();
        excluded_ports.extend([OUTBOUND_PORT, INBOUND_PORT]);
        excluded_ports.sort_unstable();
        excluded_ports.dedup();
        ebpf::Settings {
            proxy: SocketAddrV4::new([127, 0, 0, 1].into(), OUTBOUND_PORT),
            proxy6: std::net::Ipv6Addr::LOCALHOST,
            cidrs: self
                .capture_cidrs
                .iter()
                .map(|n| ebpf::Cidr { addr: n.network(), prefix: n.prefix_len() })
                .collect(),
            excluded_ports,
            bypass_mark: self.bypass_mark,
            trace: self.bpf_trace,
            map_entries: self.map_entries,
            pin_dir: self.pin_dir.clone(),
            strict: self.strict,
        }
    }
}

#[cfg(test)]
mod tests;
