//! The command line and its validation into one [`Config`].
//!
//! clap parses (with environment-variable fallbacks, so a ConfigMap can set
//! them); [`RunArgs::validate`] then checks the whole as a unit and every error
//! names the flag, the value and the reason. Both kinds of error exit with 2.
use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::{identity::Identity, node::cgroup, node::cores, node::ebpf, node::netns::Netns, proxy::conn::Limits};
use dataplane_common::{INBOUND_PORT, OUTBOUND_PORT};

/// Default SO_MARK of the data plane's own sockets ("dp" in ASCII, high bit
/// clear so it does not collide with kube-proxy's 0x4000/0x8000 marks).
pub const DEFAULT_BYPASS_MARK: u32 = 0x0064_7000;

/// The transparent mutual-TLS data plane.
#[derive(Debug, Parser)]
#[command(name = "dataplane", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture the workloads' connects and serve them (runs until SIGTERM/SIGINT).
    Run(Box<RunArgs>),
    /// Mint a cluster CA and pod certificates (for demos and tests).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Sign the node agents' node CAs (CertificateSigningRequests for
    /// dataplane.dev/node-ca); runs until killed.
    Issuer(dataplane_issuer::IssuerArgs),
    /// Put the CNI plugin on this node, or take it off.
    #[command(subcommand)]
    Cni(CniCommand),
    /// Take the data plane off this node, leaving nothing behind: the CNI
    /// plugin's entry and files, strict mode's pins (the capture programs
    /// go with them), the return path in every pod namespace.
    Uninstall(UninstallArgs),
}

/// `dataplane uninstall`.
#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    /// Where the node keeps its CNI files.
    #[command(flatten)]
    pub node: CniNode,
    /// Where strict mode pinned the capture (the agents' --pin-dir).
    #[arg(long, env = "DATAPLANE_PIN_DIR", value_name = "DIR", default_value = "/sys/fs/bpf/dataplane")]
    pub pin_dir: PathBuf,
    /// The pods' namespace files (the agents' --netns-dir).
    #[arg(long, env = "DATAPLANE_NETNS_DIR", value_name = "DIR", default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,
}

/// The DaemonSet whose deletion takes a container's part off the node, and
/// how to ask the API about it.
#[derive(Debug, Clone, Args)]
pub struct Removal {
    /// When told to stop, ask the API whether this DaemonSet
    /// (NAMESPACE/NAME) is gone or being deleted; if so, take this part of
    /// the data plane off the node (see `dataplane uninstall`).
    #[arg(long, env = "DATAPLANE_DAEMONSET", value_name = "NS/NAME", value_parser = parse_ns_name)]
    pub daemonset: Option<(String, String)>,
}

/// `dataplane cni ...`.
#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Copy dataplane-cni into the CNI binary directory and chain it after
    /// the primary CNI (the first .conflist by name); with --watch, keep it
    /// chained until SIGTERM.
    Install {
        /// Where the node keeps its CNI files.
        #[command(flatten)]
        node: CniNode,
        /// The plugin binary to copy (default: dataplane-cni beside this
        /// executable).
        #[arg(long, env = "DATAPLANE_CNI_PLUGIN", value_name = "FILE")]
        plugin: Option<PathBuf>,
        /// Keep the entry in place (the primary CNI may rewrite its list).
        #[arg(long)]
        watch: bool,
        /// With --watch: the DaemonSet whose deletion takes the plugin off.
        #[command(flatten)]
        removal: Removal,
        /// Ask the API with the pod's in-cluster configuration.
        #[arg(long, env = "DATAPLANE_KUBE")]
        kube: bool,
        /// Ask the API through this kubeconfig file instead.
        #[arg(long, env = "DATAPLANE_KUBECONFIG", value_name = "FILE", conflicts_with = "kube")]
        kubeconfig: Option<PathBuf>,
    },
    /// Remove our entry from every .conflist, the binary and the agent's
    /// namespace list.
    Uninstall {
        /// Where the node keeps its CNI files.
        #[command(flatten)]
        node: CniNode,
    },
}

/// A node's CNI directories and the agent's socket.
#[derive(Debug, Clone, Args)]
pub struct CniNode {
    /// The node's CNI binary directory.
    #[arg(long, env = "DATAPLANE_CNI_BIN_DIR", value_name = "DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory.
    #[arg(long, env = "DATAPLANE_CNI_CONF_DIR", value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The agent's socket (its --cni-socket), as the plugin on the node
    /// reaches it.
    #[arg(long, env = "DATAPLANE_CNI_SOCKET", value_name = "PATH", default_value = "/var/lib/dataplane/cni.sock")]
    pub socket: PathBuf,
}

/// `dataplane ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a new CA to DIR/ca.crt and DIR/ca.key.
    Init {
        /// Certificate directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write DIR/IP.crt and DIR/IP.key, signed by DIR's CA, for a pod IP.
    Issue {
        /// Certificate directory holding the CA.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The pod's IP (the certificate's IP SAN).
        #[arg(long, value_name = "A.B.C.D")]
        ip: IpAddr,
        /// Days of validity.
        #[arg(long, default_value_t = 365, value_name = "N")]
        days: i64,
        /// Start of validity, in days before now (negative: in the future).
        #[arg(long, default_value_t = 1, value_name = "N", allow_negative_numbers = true)]
        not_before_days: i64,
    },
}

/// `dataplane run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// cgroup v2 directory of the workloads whose connects are captured
    /// (default: the kubelet's kubepods.slice or kubepods under the cgroup v2
    /// mount found in /proc/mounts).
    #[arg(long, env = "DATAPLANE_WORKLOAD_CGROUP", value_name = "CGROUP_DIR")]
    pub workload_cgroup: Option<PathBuf>,
    /// Destinations to capture besides the model's meshed pods (repeatable,
    /// or comma-separated in the env var); required without a model.
    #[arg(long = "capture-cidr", env = "DATAPLANE_CAPTURE_CIDRS", value_name = "CIDR",
          value_delimiter = ',', value_parser = parse_cidr)]
    pub capture_cidrs: Vec<IpNet>,
    /// Learn the pods from the Kubernetes API with the pod's in-cluster
    /// configuration (the DaemonSet); needs --node-name and --netns-dir.
    #[arg(long, env = "DATAPLANE_KUBE")]
    pub kube: bool,
    /// Learn the pods from the Kubernetes API through this kubeconfig file;
    /// needs --node-name and --netns-dir.
    #[arg(long, env = "DATAPLANE_KUBECONFIG", value_name = "FILE", conflicts_with = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name as the API knows it (the DaemonSet sets it from
    /// spec.nodeName).
    #[arg(long, env = "DATAPLANE_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Learn the workloads from this file (JSON; re-read when it changes)
    /// instead of the API: hosts without a cluster.
    #[arg(long, env = "DATAPLANE_WORKLOADS", value_name = "FILE", conflicts_with_all = ["kube", "kubeconfig"])]
    pub workloads: Option<PathBuf>,
    /// Destination ports never captured (18000 and 18001 always are excluded).
    #[arg(long = "exclude-port", env = "DATAPLANE_EXCLUDE_PORTS", value_name = "PORT", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
    /// Certificate directory: ca.crt, and IP.crt + IP.key per pod address
    /// (required unless --node-ca).
    #[arg(long, env = "DATAPLANE_CERTS", value_name = "DIR", conflicts_with = "node_ca")]
    pub certs: Option<PathBuf>,
    /// Get this node's CA from the cluster (a CertificateSigningRequest the
    /// issuer signs) and mint each meshed pod's certificate in memory;
    /// needs --kube or --kubeconfig, and --trust-bundle.
    #[arg(long, env = "DATAPLANE_NODE_CA")]
    pub node_ca: bool,
    /// The cluster root(s) peers must chain to (PEM; two during a root
    /// rotation), e.g. a mounted ConfigMap; re-read when it changes.
    #[arg(long, env = "DATAPLANE_TRUST_BUNDLE", value_name = "FILE")]
    pub trust_bundle: Option<PathBuf>,
    /// Node CA lifetime asked for (the issuer may grant less); renewed at
    /// two thirds.
    #[arg(long, env = "DATAPLANE_NODE_CA_LIFETIME", value_name = "DURATION", default_value = "24h",
          value_parser = humantime::parse_duration)]
    pub node_ca_lifetime: Duration,
    /// Pod certificate lifetime (never past the node CA's); renewed at two
    /// thirds.
    #[arg(long, env = "DATAPLANE_POD_CERT_LIFETIME", value_name = "DURATION", default_value = "1h",
          value_parser = humantime::parse_duration)]
    pub pod_cert_lifetime: Duration,
    /// Trust domain of the pods' SPIFFE IDs.
    #[arg(long, env = "DATAPLANE_TRUST_DOMAIN", value_name = "DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Pod key type: Ed25519 mints and handshakes about 1.2x faster than
    /// P-256 here (`cargo bench -p bench --bench pki`).
    #[arg(long, env = "DATAPLANE_LEAF_KEY", value_enum, default_value_t = crate::identity::pki::KeyType::Ed25519)]
    pub leaf_key: crate::identity::pki::KeyType,
    /// Network namespace files to serve (default, without --netns-dir: the
    /// current namespace).
    #[arg(long = "netns", value_name = "NETNS_FILE")]
    pub netns: Vec<PathBuf>,
    /// Serve every namespace file that appears in this directory (e.g.
    /// /var/run/netns), and stop serving those that disappear.
    #[arg(long, env = "DATAPLANE_NETNS_DIR", value_name = "DIR")]
    pub netns_dir: Option<PathBuf>,
    /// Serve the CNI plugin (`dataplane-cni`) on this unix socket: each new
    /// pod sandbox is decided before its containers start.
    #[arg(long, env = "DATAPLANE_CNI_SOCKET", value_name = "PATH")]
    pub cni_socket: Option<PathBuf>,
    /// The DaemonSet whose deletion takes the agent's pins and return paths
    /// off the node as it stops (needs --kube or --kubeconfig).
    #[command(flatten)]
    pub removal: Removal,
    /// Where the kubelet's probes come from, let into pods of strict
    /// namespaces (`dataplane.dev/mtls=strict`) without a tunnel
    /// (repeatable, or comma-separated in the env var; default: this node's
    /// own addresses, as the agent sees them).
    #[arg(long = "probe-source", env = "DATAPLANE_PROBE_SOURCES", value_name = "CIDR",
          value_delimiter = ',', value_parser = parse_net)]
    pub probe_sources: Vec<IpNet>,
    /// `/metrics` on the admin endpoint answers only requests carrying this
    /// file's token (`Authorization: Bearer TOKEN`; the file is read at each
    /// scrape); `/ready` and `/live` answer anyone.
    #[arg(long, env = "DATAPLANE_METRICS_TOKEN_FILE", value_name = "FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// Check the flags and values, print the effective configuration, and
    /// exit (0 if valid); nothing on the host is touched or required.
    #[arg(long)]
    pub check_config: bool,
    /// Executors to run, one pinned per CPU (default: every CPU we may use).
    #[arg(long, env = "DATAPLANE_CORES", value_name = "N")]
    pub cores: Option<usize>,
    /// After each burst of work, an executor keeps polling for I/O this long
    /// (e.g. 50us, at most 10ms) before it sleeps, yielding its CPU to any
    /// other runnable thread meanwhile: a reply that arrives within it costs
    /// no wake-up, which lowers request/response latency, but the executor
    /// shows as busy and a CPU limit is spent on it. For nodes with CPUs to
    /// spare; off by default.
    #[arg(long, env = "DATAPLANE_BUSY_POLL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub busy_poll: Option<Duration>,
    /// SO_MARK carried by the data plane's own sockets, which are never captured.
    #[arg(long, env = "DATAPLANE_BYPASS_MARK", value_name = "MARK", default_value_t = DEFAULT_BYPASS_MARK,
          value_parser = parse_mark)]
    pub bypass_mark: u32,
    /// Log every capture decision to the kernel trace pipe
    /// (/sys/kernel/debug/tracing/trace_pipe).
    #[arg(long, env = "DATAPLANE_BPF_TRACE")]
    pub bpf_trace: bool,
    /// Limit for a tunnel's TLS handshake and preamble.
    #[arg(long, env = "DATAPLANE_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Handshakes in flight from one source address, per executor; the rest
    /// wait for a slot within the handshake timeout, then are shed.
    #[arg(long, env = "DATAPLANE_MAX_HANDSHAKES_PER_SOURCE", value_name = "N",
          default_value_t = crate::proxy::conn::MAX_IN_FLIGHT_PER_SOURCE)]
    pub max_handshakes_per_source: u64,
    /// Close connections on which no byte moved either way for this long
    /// ("off", the default: connections whose peers are alive stay open as
    /// long as their applications keep them; --tcp-keepalive finds dead
    /// peers).
    #[arg(long, env = "DATAPLANE_IDLE_TIMEOUT", value_name = "DURATION|off", default_value = "off",
          value_parser = duration_or_off)]
    pub idle_timeout: OrOff,
    /// TCP keepalive on every socket of a connection (the application's,
    /// both ends of the tunnel, the connection to the application): the
    /// first probe after this long without traffic, then one every 10 s (or
    /// this, if shorter), and a peer that answers none of six is dead: its
    /// connection is closed ("off": none).
    #[arg(long, env = "DATAPLANE_TCP_KEEPALIVE", value_name = "DURATION|off", default_value = "60s",
          value_parser = duration_or_off)]
    pub tcp_keepalive: OrOff,
    /// Fail closed: keep the capture programs attached (pinned under
    /// --pin-dir) after the data plane exits, so captured connects are
    /// refused until a data plane returns and adopts them.
    #[arg(long, env = "DATAPLANE_STRICT")]
    pub strict: bool,
    /// BPF file system directory for strict mode's pinned maps and links; any
    /// instance adopts what a strict one left there.
    #[arg(long, env = "DATAPLANE_PIN_DIR", value_name = "DIR", default_value = "/sys/fs/bpf/dataplane")]
    pub pin_dir: PathBuf,
    /// Deliver inbound connections to the application from the pod's own
    /// address instead of the client's (a pod can also opt out with the
    /// annotation dataplane.dev/client-address: "off").
    #[arg(long, env = "DATAPLANE_NO_CLIENT_ADDRESS")]
    pub no_client_address: bool,
    /// Between two pods this data plane serves, skip the tunnel: relay the
    /// client's bytes straight into a socket made in the destination pod,
    /// without TLS (they never leave the two pods and this process). Off by
    /// default: every connection is a mutual-TLS tunnel.
    #[arg(long, env = "DATAPLANE_SAME_NODE_FAST_PATH")]
    pub same_node_fast_path: bool,
    /// Make every tunnel handshake a full one: no TLS session cache, no
    /// tickets (resumption is on by default).
    #[arg(long, env = "DATAPLANE_NO_TLS_RESUMPTION")]
    pub no_tls_resumption: bool,
    /// Serve /metrics, /ready and /live here (e.g. 127.0.0.1:15021).
    #[arg(long, env = "DATAPLANE_ADMIN", value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Write SIGUSR1 dumps (JSON and HdrHistogram logs) into this directory.
    #[arg(long, env = "DATAPLANE_STATS_DIR", value_name = "DIR")]
    pub stats_dir: Option<PathBuf>,
    /// On SIGTERM/SIGINT, how long open connections get to finish.
    #[arg(long, env = "DATAPLANE_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Log format (level by RUST_LOG).
    #[arg(long, env = "DATAPLANE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Entries of each original-destination map (LRU: the oldest are evicted).
    #[arg(long, env = "DATAPLANE_MAP_ENTRIES", value_name = "N", default_value_t = 65536)]
    pub map_entries: u32,
}

/// The longest `--busy-poll`: beyond it an executor between two bursts
/// would hardly ever sleep.
const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

pub use dataplane_pki::api::parse_ns_name;

/// A duration, or "off" (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrOff(pub Option<Duration>);

fn duration_or_off(s: &str) -> Result<OrOff, humantime::DurationError> {
    if s == "off" {
        return Ok(OrOff(None));
    }
    humantime::parse_duration(s).map(|d| OrOff(Some(d)))
}

/// A CIDR, or an address alone (a /32 or /128).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or a CIDR"))
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s.parse().map_err(|_| format!("not a CIDR such as 10.0.0.0/8 or fd00::/8: {s:?}"))?;
    if net.trunc() != net {
        return Err(format!("host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("not a 32-bit mark (decimal or 0x hex): {s:?}"))
}

/// A configuration the data plane cannot run with, naming the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No `--workload-cgroup`, and no kubelet cgroup to default to.
    #[error("--workload-cgroup not given and no kubepods.slice or kubepods under {}: give it", .0.display())]
    NoWorkloadCgroup(PathBuf),
    /// No cgroup v2 mount.
    #[error("--workload-cgroup: {0} (cgroup v2 is required)")]
    NoCgroup2(#[source] std::io::Error),
    /// No model and no capture CIDR: nothing would ever be captured.
    #[error("--capture-cidr is required without a model (--kube, --kubeconfig or --workloads)")]
    NoDestinations,
    /// A model needs a flag it was not given.
    #[error("{0} needs {1}")]
    Needs(&'static str, &'static str),
    /// `--workloads` does not load.
    #[error(transparent)]
    Workloads(#[from] crate::cluster::source::file::Error),
    /// `--netns-dir` is not a directory.
    #[error("--netns-dir {}: not a directory", .0.display())]
    NetnsDir(PathBuf),
    /// `--workload-cgroup` is not a cgroup v2 directory.
    #[error("--workload-cgroup {}: not a cgroup v2 directory (no cgroup.procs / cgroup.controllers)", .0.display())]
    WorkloadCgroup(PathBuf),
    /// A `--netns` file could not be opened.
    #[error("--netns {}: {source}", path.display())]
    Netns {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `--cores` cannot be satisfied.
    #[error(transparent)]
    Cores(#[from] cores::CoresError),
    /// The CPUs could not be read.
    #[error("--cores: reading the CPUs available to this process: {0}")]
    CpuProbe(#[source] std::io::Error),
    /// `--map-entries 0`.
    #[error("--map-entries 0: the original-destination maps need at least one entry")]
    MapEntries,
    /// The certificate directory does not load.
    #[error("--certs: {0}")]
    Certs(#[from] crate::identity::Error),
    /// A zero timeout.
    #[error("--{0} 0s: must be longer than zero")]
    ZeroTimeout(&'static str),
    /// `--metrics-token-file` unreadable or empty.
    #[error("--metrics-token-file {file}: {why}")]
    MetricsToken {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// `--tcp-keepalive` under a second.
    #[error("--tcp-keepalive {0:?}: at least 1s (the kernel counts it in whole seconds)")]
    KeepaliveTooShort(Duration),
    /// `--max-handshakes-per-source` outside 1 to the executor's bound.
    #[error("--max-handshakes-per-source {0}: must be 1 to {max} (the handshakes one executor holds)", max = crate::proxy::conn::MAX_IN_FLIGHT)]
    HandshakesPerSource(u64),
    /// `--busy-poll` zero or too long.
    #[error("--busy-poll {0:?}: must be longer than zero and at most 10ms (leave it out to sleep at once)")]
    BusyPoll(Duration),
    /// Our own cgroup could not be found.
    #[error("finding the data plane's own cgroup v2 directory: {0}")]
    OwnCgroup(#[source] std::io::Error),
}

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
        let workload_cgroup = match self.workload_cgroup {
            Some(dir) if cgroup::is_cgroup2_dir(&dir) => dir,
            Some(dir) => return Err(ConfigError::WorkloadCgroup(dir)),
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
        let identity = Arc::new(identity);
        let node = self.node_name.clone();
        let access = dataplane_pki::api::Access::from_flags(self.kube, self.kubeconfig.as_deref());
        let source = match (access, &self.workloads) {
            (Some(access), _) => Some(Source::Kube { access, node: node.unwrap_or_default() }),
            (None, Some(path)) => {
                // Read once now: a broken file fails start-up with its reason.
                crate::cluster::source::file::load(path, node.as_deref())?;
                Some(Source::File { path: path.clone(), node })
            }
            _ => None,
        };
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
        let allowed = cores::affinity().map_err(ConfigError::CpuProbe)?;
        let online = cores::online().map_err(ConfigError::CpuProbe)?;
        let cores = cores::choose(&allowed, &online, self.cores)?;
        let own_cgroup = cgroup::own_cgroup().map_err(ConfigError::OwnCgroup)?;

        let mut excluded_ports = self.exclude_ports;
        excluded_ports.extend([OUTBOUND_PORT, INBOUND_PORT]);
        excluded_ports.sort_unstable();
        excluded_ports.dedup();
        let cidrs =
            self.capture_cidrs.iter().map(|n| ebpf::Cidr { addr: n.network(), prefix: n.prefix_len() }).collect();
        Ok(Config {
            workload_cgroup,
            own_cgroup,
            namespaces,
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
            capture: ebpf::Settings {
                proxy: SocketAddrV4::new([127, 0, 0, 1].into(), OUTBOUND_PORT),
                proxy6: std::net::Ipv6Addr::LOCALHOST,
                cidrs,
                excluded_ports,
                bypass_mark: self.bypass_mark,
                trace: self.bpf_trace,
                map_entries: self.map_entries,
                pin_dir: self.pin_dir,
                strict: self.strict,
            },
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
}

#[cfg(test)]
mod tests;
