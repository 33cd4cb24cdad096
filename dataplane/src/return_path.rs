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
};

use crate::netns::Netns;

/// The packet and conntrack mark of transparent connections.
pub const MARK: u32 = 0x0064_7001;
/// The routing table that makes every address local for them.
pub const TABLE: u32 = 18001;
/// The rule's preference: before `main` (32766), after `local` (0).
const PREF: u32 = 1000;

fn run(ns: &Netns, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
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
        .map_err(|e| format!("entering the namespace: {e}"))?
        .map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
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
pub fn install(ns: &Netns, addresses: &[IpAddr], bypass_mark: u32) -> Result<(), String> {
    if addresses.is_empty() {
        return Err("the namespace has no address".into());
    }
    run(ns, "nft", &["-f", "-"], Some(&ruleset(addresses, bypass_mark)))?;
    // The replies are recognised by their conntrack mark: a reply that
    // conntrack judged out of window (INVALID, no entry) would lose it and
    // leave the pod. Liberal window tracking never judges so; it only
    // relaxes what this namespace's conntrack drops, which was nothing.
    ns.run(|| std::fs::write("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal", "1"))
        .map_err(|e| format!("entering the namespace: {e}"))?
        .map_err(|e| format!("net.netfilter.nf_conntrack_tcp_be_liberal: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
