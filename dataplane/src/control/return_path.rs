//! The application sees the real client address.
//!
//! The inbound side connects to the application from the client pod's own
//! address and port (`IP_TRANSPARENT`, bound to the address the certificate
//! proved). The application's replies go to that address, which the pod does
//! not own: without help they would leave the pod. So each served pod's
//! namespace gets, while the data plane serves it:
//!
//! - an nftables table `ip dataplane` (and `ip6 dataplane` where the pod has
//!   an IPv6 address) with one route-type output chain:
//!   packets of our sockets (the bypass mark) whose source is not one of the
//!   pod's addresses, i.e. our transparent connections, get a conntrack mark;
//!   every packet of a connection with that conntrack mark (the
//!   application's replies among them) gets the packet mark [`MARK`];
//! - a policy routing rule per family: packets marked [`MARK`] use table [`TABLE`],
//!   whose one route says every address is local, so the replies loop back to
//!   our socket and never leave the pod.
//!
//! Nothing else is touched: the pod's own traffic carries neither mark, so if
//! the data plane dies the rules are inert, and the next instance replaces
//! them (the table is re-created in one nft transaction; the rule is added if
//! missing, and duplicates are deleted). Withdrawal leaves both, inert, so that
//! connections open through them keep working; they go with the namespace.
//!
//! The rules are written with the `nft` and `ip` commands run inside the
//! namespace (the data plane's image carries nftables and iproute2): both are
//! what an operator would use to inspect them, and both speak netlink with
//! the kernel's own validation. If either is missing or refused, the pod is
//! served as before (connections from the pod's own address), and the
//! reason is logged and counted.
use std::{
    io::Write,
    net::IpAddr,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use crossbeam_channel::Sender;
use tracing::warn;

use crate::node::netns::Netns;

/// The packet and conntrack mark of transparent connections.
pub const MARK: u32 = 0x0064_7001;
/// The routing table that makes every address local for them.
pub const TABLE: u32 = 18001;
/// The rule's preference: before `main` (32766), after `local` (0).
const PREF: u32 = 1000;

/// Why a pod's return path or strict table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace could not be entered.
    #[error("entering the namespace: {0}")]
    Enter(#[source] std::io::Error),
    /// A program could not be run (not installed, a broken pipe).
    #[error("running {program}: {source}")]
    Spawn {
        /// `nft` or `ip`.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A program ran and refused.
    #[error("{command}: {stderr}")]
    Refused {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// A kernel setting could not be written.
    #[error("{setting}: {source}")]
    Setting {
        /// The sysctl.
        setting: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A pod with no address has no client from elsewhere.
    #[error("the namespace has no address")]
    NoAddress,
}

fn run(ns: &Netns, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let out = ns
        .run(|| {
            let mut cmd = Command::new(program);
            cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
            // Spawned while this thread is in the pod's namespace: the
            // child starts there.
            let mut child = cmd.spawn()?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(text.as_bytes())?;
            }
            child.wait_with_output()
        })
        .map_err(Error::Enter)?
        .map_err(|source| Error::Spawn { program: program.into(), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let command = format!("{program} {}", args.join(" "));
        Err(Error::Refused { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// The nftables ruleset for a pod with `addresses`, our sockets carrying
/// `bypass_mark`: one table per family the pod has an address of.
pub fn ruleset(addresses: &[IpAddr], bypass_mark: u32) -> String {
    let mut out = String::new();
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let own: Vec<String> = addresses.iter().filter(|a| a.is_ipv6() == v6).map(ToString::to_string).collect();
        if own.is_empty() {
            continue;
        }
        out += &format!(
            "table {family} dataplane\n\
             delete table {family} dataplane\n\
             table {family} dataplane {{\n\
             \tchain output {{\n\
             \t\ttype route hook output priority mangle; policy accept;\n\
             \t\tmeta mark {bypass_mark:#x} {family} saddr != {{ {own} }} ct mark set {MARK:#x}\n\
             \t\tct mark {MARK:#x} meta mark set {MARK:#x}\n\
             \t}}\n\
             }}\n",
            own = own.join(", ")
        );
    }
    out
}

/// Installs (or replaces) the return path in `ns`.
pub fn install(ns: &Netns, addresses: &[IpAddr], bypass_mark: u32) -> Result<(), Error> {
    if addresses.is_empty() {
        return Err(Error::NoAddress);
    }
    run(ns, "nft", &["-f", "-"], Some(&ruleset(addresses, bypass_mark)))?;
    // The replies are recognised by their conntrack mark: a reply that
    // conntrack judged out of window (INVALID, no entry) would lose it and
    // leave the pod. Liberal window tracking never judges so; it only
    // relaxes what this namespace's conntrack drops, which was nothing.
    ns.run(|| std::fs::write("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal", "1"))
        .map_err(Error::Enter)?
        .map_err(|source| Error::Setting { setting: "net.netfilter.nf_conntrack_tcp_be_liberal", source })?;
    // The route first, then the rule, and the rule never removed and
    // re-added: a previous instance (a rolling update) may be relaying
    // transparent connections right now, whose replies need both.
    let (mark, table, pref) = (format!("{MARK:#x}"), TABLE.to_string(), PREF.to_string());
    let ours = format!("fwmark {mark} lookup {table}");
    for (family, any, v6) in [("-4", "0.0.0.0/0", false), ("-6", "::/0", true)] {
        if !addresses.iter().any(|a| a.is_ipv6() == v6) {
            continue;
        }
        run(ns, "ip", &[family, "route", "replace", "local", any, "dev", "lo", "table", &table], None)?;
        let present = run(ns, "ip", &[family, "rule", "show"], None)?.lines().filter(|l| l.contains(&ours)).count();
        if present == 0 {
            run(ns, "ip", &[family, "rule", "add", "fwmark", &mark, "lookup", &table, "pref", &pref], None)?;
        }
        // Duplicates left by instances that crashed mid-way: one is enough.
        for _ in 1..present {
            let _ = run(ns, "ip", &[family, "rule", "del", "fwmark", &mark, "lookup", &table], None);
        }
    }
    Ok(())
}

/// The table that keeps plaintext out of a pod of a strict namespace
/// (`dataplane.dev/mtls=strict`): in the pod's namespace, a new TCP
/// connection is let in only over loopback (the data plane's deliveries,
/// the pod's own connections), to the tunnel port, to the ports the pod
/// leaves alone, and from `probe_sources` (the node, whose kubelet probes
/// the pod); any other is reset before the application sees it. Packets of
/// connections already open, and everything not TCP, pass.
pub fn strict_ruleset(probe_sources: &[ipnet::IpNet], skip_inbound: &[u16]) -> String {
    let set = |items: Vec<String>| format!("{{ {} }}", items.join(", "));
    let mut rules = vec![
        "iif lo accept".to_string(),
        "tcp flags & (syn | ack) != syn accept".to_string(),
        format!("tcp dport {} accept", dataplane_common::INBOUND_PORT),
    ];
    if !skip_inbound.is_empty() {
        rules.push(format!("tcp dport {} accept", set(skip_inbound.iter().map(u16::to_string).collect())));
    }
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let nets: Vec<String> =
            probe_sources.iter().filter(|n| n.addr().is_ipv6() == v6).map(ToString::to_string).collect();
        if !nets.is_empty() {
            rules.push(format!("{family} saddr {} accept", set(nets)));
        }
    }
    rules.push("meta l4proto tcp reject with tcp reset".into());
    format!(
        "table inet {STRICT}\ndelete table inet {STRICT}\ntable inet {STRICT} {{\n\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n{}\t}}\n}}\n",
        rules.iter().map(|r| format!("\t\t{r}\n")).collect::<String>()
    )
}

/// The strict table's name.
const STRICT: &str = "dataplane_strict";

/// Installs (`Some`: a ruleset from [`strict_ruleset`]) or removes the
/// strict table in `ns`.
pub fn set_strict(ns: &Netns, ruleset: Option<&str>) -> Result<(), Error> {
    match ruleset {
        Some(r) => run(ns, "nft", &["-f", "-"], Some(r)).map(|_| ()),
        None => {
            let tables = run(ns, "nft", &["list", "tables"], None)?;
            if tables.lines().any(|l| l.trim() == format!("table inet {STRICT}")) {
                run(ns, "nft", &["delete", "table", "inet", STRICT], None)?;
            }
            Ok(())
        }
    }
}

/// Takes the return path out of `ns` (uninstall): our nftables tables,
/// our rules and our routing table's routes, of both families; what is not
/// there is not an error. Returns whether anything was there.
pub fn remove(ns: &Netns) -> Result<bool, Error> {
    let mut found = false;
    let tables = run(ns, "nft", &["list", "tables"], None)?;
    let ours = [("ip", "dataplane"), ("ip6", "dataplane"), ("inet", STRICT)];
    let script: String = ours
        .iter()
        .filter(|(f, t)| tables.lines().any(|l| l.trim() == format!("table {f} {t}")))
        .map(|(f, t)| format!("delete table {f} {t}\n"))
        .collect();
    if !script.is_empty() {
        run(ns, "nft", &["-f", "-"], Some(&script))?;
        found = true;
    }
    let (mark, table) = (format!("{MARK:#x}"), TABLE.to_string());
    let ours = format!("fwmark {mark} lookup {table}");
    for family in ["-4", "-6"] {
        // A family the namespace does not have lists nothing, or fails.
        let rules = run(ns, "ip", &[family, "rule", "show"], None).unwrap_or_default();
        let present = rules.lines().filter(|l| l.contains(&ours)).count();
        for _ in 0..present {
            run(ns, "ip", &[family, "rule", "del", "fwmark", &mark, "lookup", &table], None)?;
        }
        let routes = run(ns, "ip", &[family, "route", "show", "table", &table], None).unwrap_or_default();
        if !routes.trim().is_empty() {
            run(ns, "ip", &[family, "route", "flush", "table", &table], None)?;
        }
        found |= present > 0 || !routes.trim().is_empty();
    }
    Ok(found)
}

/// Sets up return paths one after another on a thread of their own: each
/// takes some milliseconds of `nft` and `ip` (fork, exec, netlink), and on
/// the control thread pods enrolled together waited for each other's (a node
/// booting with a hundred pods: a second or more for the last). A pod is
/// served meanwhile, from its own address, and gets clients' addresses once
/// its return path is in.
#[derive(Debug)]
pub struct Installer {
    jobs: Sender<Job>,
    failures: Arc<AtomicU64>,
    bypass_mark: u32,
}

impl Installer {
    /// Starts the thread; our sockets carry `bypass_mark`. Returns once the
    /// thread holds its own namespace open (it comes back to it after each
    /// pod's), so that it opens nothing later.
    pub fn start(bypass_mark: u32) -> std::io::Result<Self> {
        let (jobs, rx) = crossbeam_channel::unbounded::<Job>();
        let failures = Arc::new(AtomicU64::new(0));
        let counted = failures.clone();
        let (ready_tx, ready) = crossbeam_channel::bounded(1);
        std::thread::Builder::new().name("return-path".into()).spawn(move || {
            let home = Netns::pin_home();
            let ok = home.is_ok();
            let _ = ready_tx.send(home);
            if ok {
                for job in rx {
                    match job {
                        Job::ReturnPath(ns, addresses) => set_up(&ns, &addresses, bypass_mark, &counted),
                        Job::Flush(done) => {
                            let _ = done.send(());
                        }
                        Job::Strict(ns, ruleset) => {
                            let on = ruleset.is_some();
                            match set_strict(&ns, ruleset.as_deref()) {
                                Ok(()) => tracing::info!(netns = %ns.name(), on, "strict mTLS: plaintext from outside the mesh refused"),
                                Err(e) => warn!(netns = %ns.name(), on, error = %e, "strict mTLS: could not change the rules"),
                            }
                        }
                    }
                }
            }
        })?;
        ready.recv().map_err(|_| std::io::Error::other("the return-path thread ended at once"))??;
        Ok(Self { jobs, failures, bypass_mark })
    }

    /// Sets up the return path in `ns` soon.
    pub fn request(&self, ns: Arc<Netns>, addresses: Vec<IpAddr>) {
        // The thread ends only with the process (it holds the receiver
        // until every sender is gone).
        let _ = self.jobs.send(Job::ReturnPath(ns, addresses));
    }

    /// Installs (`Some`) or removes the strict table in `ns` soon, after
    /// what was asked before.
    pub fn strict(&self, ns: Arc<Netns>, ruleset: Option<String>) {
        let _ = self.jobs.send(Job::Strict(ns, ruleset));
    }

    /// Sets up the return path in `ns` before returning (start-up: the
    /// namespaces given on the command line have theirs before the data
    /// plane says it is ready).
    pub fn now(&self, ns: &Netns, addresses: &[IpAddr]) {
        set_up(ns, addresses, self.bypass_mark, &self.failures);
    }

    /// Returns `true` once every job asked before is done, `false` if they
    /// take longer than `within`: what is swept after this finds nothing set
    /// up behind its back.
    pub fn flush(&self, within: std::time::Duration) -> bool {
        let (done, finished) = crossbeam_channel::bounded(1);
        if self.jobs.send(Job::Flush(done)).is_err() {
            return true; // no thread: nothing pending
        }
        finished.recv_timeout(within).is_ok()
    }

    /// Namespaces whose return path could not be set up, so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// What the thread does, in order.
#[derive(Debug)]
enum Job {
    /// The return path for a pod with these addresses.
    ReturnPath(Arc<Netns>, Vec<IpAddr>),
    /// The strict table: installed, or removed.
    Strict(Arc<Netns>, Option<String>),
    /// Every job before this one is done: say so.
    Flush(Sender<()>),
}

/// Installs, and turns clients' addresses on for `ns`; or counts and logs
/// why not, and the pod is served from its own address.
fn set_up(ns: &Netns, addresses: &[IpAddr], bypass_mark: u32, failures: &AtomicU64) {
    match install(ns, addresses, bypass_mark) {
        Ok(()) => ns.set_client_address(true),
        Err(e) => {
            failures.fetch_add(1, Ordering::Relaxed);
            warn!(netns = %ns.name(), error = %e, "cannot give the application the clients' addresses: it sees the pod's own");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strict_ruleset_lets_in_tunnels_loopback_skipped_ports_and_probes() {
        let r = strict_ruleset(&["10.0.0.1/32".parse().expect("net"), "fd00::1/128".parse().expect("net")], &[9090]);
        for want in [
            "table inet dataplane_strict {",
            "type filter hook input priority filter; policy accept;",
            "iif lo accept",
            "tcp flags & (syn | ack) != syn accept",
            "tcp dport 18001 accept",
            "tcp dport { 9090 } accept",
            "ip saddr { 10.0.0.1/32 } accept",
            "ip6 saddr { fd00::1/128 } accept",
            "meta l4proto tcp reject with tcp reset",
        ] {
            assert!(r.contains(want), "{want} in\n{r}");
        }
        assert!(!strict_ruleset(&[], &[]).contains("saddr"), "no probe source named: none let in by address");
    }

    #[test]
    fn the_ruleset_marks_only_our_sockets_that_speak_for_another_address() {
        let r = ruleset(&["10.1.0.5".parse().expect("ip"), "10.1.0.6".parse().expect("ip")], 0x647000);
        assert!(r.starts_with("table ip dataplane\ndelete table ip dataplane\n"), "re-created in one transaction");
        assert!(r.contains("meta mark 0x647000 ip saddr != { 10.1.0.5, 10.1.0.6 } ct mark set 0x647001"), "{r}");
        assert!(r.contains("ct mark 0x647001 meta mark set 0x647001"), "{r}");
        assert_ne!(MARK, crate::config::DEFAULT_BYPASS_MARK, "our other sockets never match the rule");
        assert!(!r.contains("ip6"), "no IPv6 table for an IPv4-only pod: {r}");
        let dual = ruleset(&["10.1.0.5".parse().expect("ip"), "fd00::5".parse().expect("ip")], 0x647000);
        assert!(dual.contains("meta mark 0x647000 ip saddr != { 10.1.0.5 } ct mark"), "{dual}");
        assert!(dual.contains("table ip6 dataplane\ndelete table ip6 dataplane\n"), "{dual}");
        assert!(dual.contains("meta mark 0x647000 ip6 saddr != { fd00::5 } ct mark set 0x647001"), "{dual}");
    }
}
