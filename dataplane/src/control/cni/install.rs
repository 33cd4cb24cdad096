//! Putting the plugin on a node and taking it off again, as istio-cni and
//! linkerd-cni do: the binary copied into the node's CNI binary directory,
//! our entry appended to the node's primary network configuration list (the
//! first `.conflist` by name, the one the runtime uses), and both removed on
//! uninstall with the namespace list the agent kept. Every step is
//! idempotent and writes files whole (a temporary file renamed over), so a
//! runtime never reads half a configuration; `watch` puts the entry back
//! when the primary CNI rewrites its file.
use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use dataplane_common::cni::{namespaces_file, sandboxes_file};
use serde_json::{json, Value};
use tracing::info;

/// The plugin's `type` in a configuration list, and its binary's name.
pub const PLUGIN: &str = "dataplane-cni";

/// What install and uninstall work on.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node's CNI binary directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The agent's socket (`--cni-socket`).
    pub socket: PathBuf,
}

/// Why the plugin could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// Which.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// No primary configuration list yet (the primary CNI writes it when it
    /// starts): `watch` waits for one.
    #[error("no .conflist in {}: the primary CNI has not written its configuration yet", .0.display())]
    NoConflist(PathBuf),
    /// The primary configuration does not parse, or is not a list.
    #[error("{}: {why}", path.display())]
    BadConflist {
        /// Which.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` whole (see [`super::write_whole`]).
fn write_whole(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    super::write_whole(path, bytes, mode).map_err(io_err(path))
}

/// Writes a configuration list whole, as the primary CNI writes it.
fn write_list(path: &Path, list: &Value) -> Result<(), InstallError> {
    let mut text = serde_json::to_vec_pretty(list).unwrap_or_default();
    text.push(b'\n');
    write_whole(path, &text, 0o644)
}

/// The primary configuration list: the first `.conflist` by name.
fn primary(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut lists: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io_err(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    lists.sort();
    lists.into_iter().next().ok_or_else(|| InstallError::NoConflist(conf_dir.to_path_buf()))
}

fn read_list(path: &Path) -> Result<Value, InstallError> {
    let bad = |why: String| InstallError::BadConflist { path: path.to_path_buf(), why };
    let text = fs::read(path).map_err(io_err(path))?;
    let list: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if !list.get("plugins").is_some_and(Value::is_array) {
        return Err(bad("no \"plugins\" list".into()));
    }
    Ok(list)
}

/// `list` with our entry last (ours from before replaced, whatever it said).
fn with_entry(list: Value, socket: &Path) -> Value {
    let mut list = without_entry(list);
    if let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.push(json!({"type": PLUGIN, "agentSocket": socket}));
    }
    list
}

/// `list` without our entry.
fn without_entry(mut list: Value) -> Value {
    if let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN));
    }
    list
}

/// Copies `plugin` (the binary) to the node and puts our entry in the
/// primary configuration list; returns the list's path.
pub fn install(node: &Node, plugin: &Path) -> Result<PathBuf, InstallError> {
    let binary = fs::read(plugin).map_err(io_err(plugin))?;
    let target = node.bin_dir.join(PLUGIN);
    if fs::read(&target).ok().as_deref() != Some(binary.as_slice()) {
        fs::create_dir_all(&node.bin_dir).map_err(io_err(&node.bin_dir))?;
        write_whole(&target, &binary, 0o755)?;
        info!(binary = %target.display(), "CNI plugin installed");
    }
    ensure_entry(node)
}

/// Puts our entry in the primary configuration list if it is not there
/// as it should be; returns the list's path.
fn ensure_entry(node: &Node) -> Result<PathBuf, InstallError> {
    let path = primary(&node.conf_dir)?;
    let list = read_list(&path)?;
    let want = with_entry(list.clone(), &node.socket);
    if want != list {
        write_list(&path, &want)?;
        info!(conflist = %path.display(), "CNI plugin chained after the primary CNI");
    }
    Ok(path)
}

/// Removes our entry from every configuration list, the binary, the
/// agent's socket and the files it keeps beside it (so that no pod waits for
/// an agent that is not coming back); returns what was removed.
pub fn uninstall(node: &Node) -> Result<Vec<PathBuf>, InstallError> {
    let mut removed = Vec::new();
    let entries = fs::read_dir(&node.conf_dir).map_err(io_err(&node.conf_dir))?;
    for path in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "conflist")) {
        let Ok(list) = read_list(&path) else { continue };
        let without = without_entry(list.clone());
        if without != list {
            write_list(&path, &without)?;
            removed.push(path);
        }
    }
    let files =
        [node.bin_dir.join(PLUGIN), namespaces_file(&node.socket), sandboxes_file(&node.socket), node.socket.clone()];
    for path in files {
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(InstallError::Io { path, source: e }),
        }
    }
    Ok(removed)
}

/// Installs, then keeps the entry in place every `every` (the primary CNI
/// may rewrite its list, on upgrade or restart) until `stop` says so.
pub fn watch(node: &Node, plugin: &Path, every: Duration, stop: impl Fn() -> bool) -> Result<(), InstallError> {
    loop {
        match install(node, plugin) {
            Ok(_) | Err(InstallError::NoConflist(_)) => {}
            Err(e) => return Err(e),
        }
        let until = std::time::Instant::now() + every;
        while std::time::Instant::now() < until {
            if stop() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100).min(every));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs(PathBuf);

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn node(tag: &str) -> (Dirs, Node, PathBuf) {
        let root = std::env::temp_dir().join(format!("dp-cni-install-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let node = Node { bin_dir: root.join("bin"), conf_dir: root.join("net.d"), socket: root.join("run/cni.sock") };
        fs::create_dir_all(&node.conf_dir).expect("conf dir");
        let plugin = root.join("dataplane-cni-build");
        fs::write(&plugin, b"#!/bin/sh\n").expect("plugin");
        (Dirs(root), node, plugin)
    }

    fn kindnet() -> Value {
        json!({"cniVersion": "0.4.0", "name": "kindnet", "plugins": [
            {"type": "ptp", "ipam": {"type": "host-local"}}, {"type": "portmap", "capabilities": {"portMappings": true}}]})
    }

    #[test]
    fn install_chains_after_the_primary_once_and_uninstall_leaves_it_as_it_was() {
        let (_d, node, plugin) = node("chain");
        let primary = node.conf_dir.join("10-kindnet.conflist");
        let original = serde_json::to_vec_pretty(&kindnet()).expect("json");
        fs::write(&primary, &original).expect("primary");
        // A later file is not the one the runtime uses.
        fs::write(node.conf_dir.join("99-other.conflist"), serde_json::to_vec(&kindnet()).expect("json"))
            .expect("other");
        assert_eq!(install(&node, &plugin).expect("installed"), primary);
        let list = read_list(&primary).expect("list");
        let types: Vec<&str> =
            list["plugins"].as_array().expect("plugins").iter().filter_map(|p| p["type"].as_str()).collect();
        assert_eq!(types, ["ptp", "portmap", PLUGIN], "ours last, the rest untouched");
        assert_eq!(list["plugins"][2]["agentSocket"], json!(node.socket));
        assert_eq!(fs::read(node.bin_dir.join(PLUGIN)).expect("binary"), b"#!/bin/sh\n");
        // Twice is once.
        install(&node, &plugin).expect("again");
        assert_eq!(read_list(&primary).expect("list")["plugins"].as_array().map(Vec::len), Some(3));
        // The primary CNI rewrites its list: the watch puts us back.
        fs::write(&primary, &original).expect("rewritten");
        watch(&node, &plugin, Duration::from_millis(10), || true).expect("watch");
        assert_eq!(read_list(&primary).expect("list")["plugins"].as_array().map(Vec::len), Some(3));
        fs::create_dir_all(node.socket.parent().expect("dir")).expect("run dir");
        fs::write(namespaces_file(&node.socket), b"[\"shop\"]").expect("namespaces");
        let removed = uninstall(&node).expect("uninstalled");
        assert_eq!(read_list(&primary).expect("list"), kindnet(), "as before");
        assert!(!node.bin_dir.join(PLUGIN).exists() && !namespaces_file(&node.socket).exists(), "{removed:?}");
        assert!(uninstall(&node).expect("twice").is_empty(), "nothing left to remove");
    }

    #[test]
    fn a_node_without_a_list_or_with_a_broken_one_is_named() {
        let (_d, node, plugin) = node("missing");
        assert!(matches!(install(&node, &plugin), Err(InstallError::NoConflist(_))));
        fs::write(node.conf_dir.join("10-x.conflist"), b"{\"plugins\": 3}").expect("broken");
        let e = install(&node, &plugin).expect_err("not a list").to_string();
        assert!(e.contains("10-x.conflist") && e.contains("plugins"), "{e}");
    }
}
