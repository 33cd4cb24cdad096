//! The Python peers (`peers.py` in this crate): unmodified-socket servers and
//! clients, plus the hostile ones the hardening tests need.
use std::time::Duration;

use crate::{Cgroup, Netns, Proc};

/// Path of `peers.py`.
pub fn peers_py() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/peers.py").to_string()
}

/// A Python server in `ns` on `host:port` that names itself `name`.
pub fn server(ns: &Netns, host: &str, port: u16, name: &str) -> Proc {
    server_with(ns, &["serve", host, &port.to_string(), name], &format!("server {name}"))
}

/// A `peers.py` server (`serve`, `sink`, `reset`...) in `ns`, ready.
pub fn server_with(ns: &Netns, args: &[&str], what: &str) -> Proc {
    let py = peers_py();
    let mut all = vec![py.as_str()];
    all.extend_from_slice(args);
    let mut p = Proc::spawn(ns.command(None, "python3", &all), what);
    p.wait_for("listening", Duration::from_secs(10));
    p
}

/// What a client saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The client's own address.
    pub local: String,
    /// The address it was connected to (127.0.0.1:18000 when captured).
    pub peer: String,
    /// The server's name.
    pub server: String,
    /// The client's address as the server saw it.
    pub server_saw: String,
    /// What came back.
    pub echo: String,
}

fn field(line: &str, key: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("peer printed {line:?}: {e}"));
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {line}")).to_string()
}

/// Runs `peers.py ARGS` to completion in `ns` (and `cgroup`); returns each
/// JSON line it printed.
pub fn peer(ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Vec<serde_json::Value> {
    let py = peers_py();
    let mut all = vec![py.as_str()];
    all.extend_from_slice(args);
    let out = ns.command(cgroup, "python3", &all).output().unwrap_or_else(|e| panic!("running a peer: {e}"));
    assert!(out.status.success(), "peers.py {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("peers.py {args:?} printed {l:?}: {e}")))
        .collect()
}

/// Sends `n` bytes to the `sink` server at `host:port` from `ns` (and
/// `cgroup`), half-closes, and reads `n` bytes back; fails the test unless
/// every byte arrived intact both ways (counts and checksums).
pub fn transfer_exact(ns: &Netns, cgroup: Option<&Cgroup>, host: &str, port: u16, n: u64) {
    let (n, port) = (n.to_string(), port.to_string());
    let r = &peer(ns, cgroup, &["transfer", host, &port, &n, &n])[0];
    assert_eq!(r["server_got"].as_u64(), r["sent"].as_u64(), "{n} bytes to the server: {r}");
    assert_eq!(r["sent_ok"], true, "server's checksum of {n} bytes: {r}");
    assert_eq!(r["received"].to_string(), n, "{n} bytes back: {r}");
    assert_eq!(r["received_ok"], true, "client's checksum of {n} bytes: {r}");
}

/// Runs the Python client to completion in `ns` (and `cgroup`) and returns
/// one `Seen` per connection.
pub fn client(ns: &Netns, cgroup: Option<&Cgroup>, host: &str, port: u16, extra: &[&str]) -> Vec<Seen> {
    let port = port.to_string();
    let mut args = vec!["connect", host, port.as_str()];
    args.extend_from_slice(extra);
    peer(ns, cgroup, &args)
        .iter()
        .map(|v| {
            let l = v.to_string();
            Seen {
                local: field(&l, "local"),
                peer: field(&l, "peer"),
                server: field(&l, "server"),
                server_saw: field(&l, "server_saw"),
                echo: field(&l, "echo"),
            }
        })
        .collect()
}

/// A connection from `ns` (in `cgroup`) to `host:port`, open and quiet
/// (`peers.py wait-close`): returned once the server has greeted it, so the
/// caller can change the world under an established connection.
pub fn open_quiet(ns: &Netns, cgroup: Option<&Cgroup>, host: &str, port: u16, limit_secs: u32) -> Proc {
    let py = peers_py();
    let (port, limit) = (port.to_string(), limit_secs.to_string());
    let mut p = Proc::spawn(ns.command(cgroup, "python3", &[&py, "wait-close", host, &port, &limit]), "wait-close");
    p.wait_for("\"open\"", Duration::from_secs(30));
    p
}

/// How an [`open_quiet`] connection ended (`{"result": "eof" | "reset" |
/// "open", "seconds": ...}`), once it has.
pub fn how_it_ended(mut p: Proc, within: Duration) -> serde_json::Value {
    p.wait(within);
    let last = p.output().into_iter().rev().find(|l| l.contains("result")).unwrap_or_default();
    serde_json::from_str(&last).unwrap_or_else(|e| panic!("wait-close printed {last:?}: {e}"))
}
