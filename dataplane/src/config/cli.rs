//! The command line as clap parses it: subcommands, flags with their
//! environment-variable fallbacks, and the parsers of their values.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use super::DEFAULT_BYPASS_MARK;

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
pub(super) const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

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

pub(super) fn duration_or_off(s: &str) -> Result<OrOff, humantime::DurationError> {
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

pub(super) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s.parse().map_err(|_| format!("not a CIDR such as 10.0.0.0/8 or fd00::/8: {s:?}"))?;
    if net.trunc() != net {
        return Err(format!("host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

pub(super) fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("not a 32-bit mark (decimal or 0x hex): {s:?}"))
}
