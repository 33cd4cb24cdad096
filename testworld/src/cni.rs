//! Pods made the way a container runtime makes them: a network
//! configuration list (the reference `bridge` plugin with `host-local`
//! addresses, then `dataplane-cni`, as `deploy/dataplane-cni.json` ships
//! it) executed per the CNI spec, as containerd's libcni does: each plugin
//! with the `CNI_*` variables and its configuration (with the previous
//! plugin's result as `prevResult`) on standard input. The bridge lives in a
//! "node" namespace of its own, so nothing is added to the host's network.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
};

use serde_json::{json, Value};

use crate::{unique, Netns, TempDir};

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const PLUGIN_DIR: &str = "/usr/lib/cni";

/// A node's pod network: a bridge and an address range, and the chain.
#[derive(Debug)]
pub struct Network {
    /// The node's namespace, where the bridge is.
    pub node: Netns,
    chain: Chain,
    cni: PathBuf,
    _ipam: TempDir,
}

/// Where the chain comes from.
#[derive(Debug)]
enum Chain {
    /// Given once: the primary plugin, then ours (or not).
    Fixed(Vec<Value>),
    /// The node's configuration directory, read again for every sandbox as
    /// a runtime reads it (the first `.conflist` by name), plugins looked up
    /// in the node's binary directory, then the reference plugins'.
    Node { conf_dir: PathBuf, bin_dir: PathBuf },
}

/// The primary plugin of a bridge network over `subnet`, addresses kept
/// in `ipam`.
fn bridge(subnet: &str, ipam: &Path) -> Value {
    json!({
        "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": ipam},
    })
}

/// The `dataplane-cni` binary: `DP_CNI_BINARY`, or the one beside
/// `DP_BINARY`, or the one built beside the running executable (as
/// [`crate::dataplane_binary`] finds `dataplane`).
pub fn cni_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("DP_CNI_BINARY") {
        return PathBuf::from(p);
    }
    let beside_dp = std::env::var_os("DP_BINARY").map(|p| PathBuf::from(p).with_file_name("dataplane-cni"));
    beside_dp
        .filter(|p| p.is_file())
        .or_else(|| crate::dataplane::built_beside("dataplane-cni"))
        .unwrap_or_else(|| panic!("dataplane-cni is not built beside this test: cargo build -p dataplane-cni"))
}

impl Network {
    /// A bridge network over `subnet` (`10.x.y.0/24`), chained to the agent
    /// at `socket` (`None`: the primary plugin alone, a node without us).
    pub fn new(test: &str, subnet: &str, socket: Option<&Path>) -> Self {
        let node = Netns::new(test, "node");
        let ipam = TempDir::new(&format!("dptest-ipam-{}", unique(test, "i"))).expect("IPAM directory");
        let mut plugins = vec![bridge(subnet, &ipam.0)];
        if let Some(socket) = socket {
            let shipped = include_str!("../../deploy/dataplane-cni.json");
            let mut ours: Value = serde_json::from_str(shipped).expect("deploy/dataplane-cni.json");
            ours["agentSocket"] = json!(socket);
            plugins.push(ours);
        }
        Self { node, chain: Chain::Fixed(plugins), cni: cni_binary(), _ipam: ipam }
    }

    /// A bridge network over `subnet` whose chain is the node's own: the
    /// primary configuration list is written to `conf_dir` (as the primary
    /// CNI writes it; `dataplane cni install` chains ours into it) and read
    /// again for every sandbox.
    pub fn on_node(test: &str, subnet: &str, conf_dir: &Path, bin_dir: &Path) -> Self {
        let node = Netns::new(test, "node");
        let ipam = TempDir::new(&format!("dptest-ipam-{}", unique(test, "i"))).expect("IPAM directory");
        let list = json!({"cniVersion": "1.0.0", "name": "dptest", "plugins": [bridge(subnet, &ipam.0)]});
        std::fs::write(conf_dir.join("10-bridge.conflist"), serde_json::to_vec_pretty(&list).expect("JSON"))
            .expect("the primary configuration list");
        let chain = Chain::Node { conf_dir: conf_dir.to_path_buf(), bin_dir: bin_dir.to_path_buf() };
        Self { node, chain, cni: cni_binary(), _ipam: ipam }
    }

    /// The chain a sandbox made now gets.
    fn plugins(&self) -> Vec<Value> {
        match &self.chain {
            Chain::Fixed(plugins) => plugins.clone(),
            Chain::Node { conf_dir, .. } => {
                let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)
                    .expect("the node's CNI configuration directory")
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
                    .collect();
                lists.sort();
                let first = lists.first().expect("a configuration list");
                let list: Value = serde_json::from_slice(&std::fs::read(first).expect("read")).expect("JSON");
                list["plugins"].as_array().cloned().expect("plugins")
            }
        }
    }

    /// ADD for `pod` (namespace/name, sandbox `container`): the chain's
    /// result, or the first plugin's error (its JSON).
    pub fn add(&self, pod: &Netns, namespace: &str, name: &str, container: &str) -> Result<Value, Value> {
        self.add_timed(pod, namespace, name, container).map(|(result, _)| result)
    }

    /// [`Network::add`], and how long `dataplane-cni` took of it: what the
    /// mesh adds to a pod's start.
    pub fn add_timed(
        &self,
        pod: &Netns,
        namespace: &str,
        name: &str,
        container: &str,
    ) -> Result<(Value, std::time::Duration), Value> {
        let mut prev: Option<Value> = None;
        let mut ours = std::time::Duration::ZERO;
        for plugin in &self.plugins() {
            let started = std::time::Instant::now();
            prev = Some(self.exec("ADD", plugin, prev.as_ref(), pod, namespace, name, container)?);
            if plugin["type"] == "dataplane-cni" {
                ours += started.elapsed();
            }
        }
        Ok((prev.unwrap_or_default(), ours))
    }

    /// DEL for `pod`, the chain in reverse (as libcni does).
    pub fn del(&self, pod: &Netns, namespace: &str, name: &str, container: &str) -> Result<(), Value> {
        for plugin in self.plugins().iter().rev() {
            self.exec("DEL", plugin, None, pod, namespace, name, container)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        command: &str,
        plugin: &Value,
        prev: Option<&Value>,
        pod: &Netns,
        namespace: &str,
        name: &str,
        container: &str,
    ) -> Result<Value, Value> {
        let mut config = plugin.clone();
        config["cniVersion"] = json!("1.0.0");
        config["name"] = json!("dptest");
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        let kind = plugin["type"].as_str().expect("type");
        let binary = match (&self.chain, kind) {
            (Chain::Node { bin_dir, .. }, kind) if bin_dir.join(kind).exists() => bin_dir.join(kind),
            (Chain::Node { .. }, "dataplane-cni") => return Err(json!({"plugin": kind, "error": "not installed"})),
            (Chain::Fixed(_), "dataplane-cni") => self.cni.clone(),
            (_, other) => Path::new(PLUGIN_DIR).join(other),
        };
        // The reference plugins set up the node's side of a pod (the
        // bridge): they run in the node's namespace. Ours needs only the
        // agent's socket, and runs as a runtime runs it, directly (its
        // timing is then what it adds to a pod's start).
        let mut cmd = if kind == "dataplane-cni" {
            std::process::Command::new(&binary)
        } else {
            self.node.command(None, &binary.display().to_string(), &[])
        };
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", PLUGIN_DIR)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{kind}: {e}"));
        child.stdin.take().expect("stdin").write_all(config.to_string().as_bytes()).expect("configuration written");
        let out = child.wait_with_output().expect("plugin output");
        let stdout: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(json!({"plugin": kind, "error": stdout, "stderr": String::from_utf8_lossy(&out.stderr)}))
        }
    }
}

/// The agent's own measure of each ADD it answered, from its log lines
/// (`CNI ADD answered verdict="served" took=4.2ms`): (verdict, time).
pub fn decisions(log: &[String]) -> Vec<(String, std::time::Duration)> {
    log.iter()
        .filter(|l| l.contains("CNI ADD answered"))
        .filter_map(|l| {
            let verdict = l.split("verdict=").nth(1)?.split(|c: char| c.is_whitespace() || c == ',').next()?;
            let took = duration(l.rsplit("took=").next()?)?;
            Some((verdict.trim_matches('"').to_string(), took))
        })
        .collect()
}

/// A `Debug` duration (`1.234ms`, `56.7µs`, `1.2s`, `800ns`).
fn duration(d: &str) -> Option<std::time::Duration> {
    let d = d.split_whitespace().next()?.trim_matches('"');
    let split = d.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (n, unit) = d.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "µs" => n / 1e6,
        "ns" => n / 1e9,
        _ => return None,
    };
    Some(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_agents_log_lines_give_its_decisions() {
        let log = [
            r#"2026-12-07T21:00:00Z  INFO dataplane::control::run::cni: CNI ADD answered pod=shop/a verdict="served" took=4.25ms"#,
            r#"2026-12-07T21:00:00Z  INFO dataplane::control::run::cni: CNI ADD answered pod=plain/b verdict="passed" took=120.5µs"#,
            "something else took=1s",
        ]
        .map(String::from);
        let d = super::decisions(&log);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].0.as_str(), d[0].1.as_micros()), ("served", 4250));
        assert_eq!((d[1].0.as_str(), d[1].1.as_nanos()), ("passed", 120_500));
    }
}
