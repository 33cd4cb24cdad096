//! What the CNI plugin adds to a pod's start: the time `dataplane-cni` takes
//! in a sandbox's ADD (the agent deciding the pod: served, with listeners
//! open and `connect4` told; or passed), as the runtime sees it. Pods are
//! made as a runtime makes them (`testworld::cni`: `bridge` and
//! `host-local`, then ours), the agent runs as the DaemonSet does against
//! the test API server, which shows each pod (without its address: the
//! kubelet has not written it yet) before its sandbox is made. Half the
//! pods are in a meshed namespace, half in one outside the mesh; one
//! sandbox after another, or all at once (a node booting), where a pod's
//! figure includes waiting for the others'.
use std::{path::Path, time::Duration};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;
use testworld::{
    apiserver::{namespace, pod},
    cni::Network,
    ApiServer, Cgroup, Dataplane, Netns, NetnsDir,
};

/// The figures of a run, in µs: ADD's time in `dataplane-cni`, for pods
/// served and pods passed, and the baseline: the same binary asked only
/// for its version (what running any plugin costs the runtime), from the
/// same thread just before and just after each pod's ADD.
#[derive(Debug)]
pub struct Adds {
    /// Pods of the meshed namespace.
    pub served: Histogram<u64>,
    /// Pods of the namespace outside the mesh.
    pub passed: Histogram<u64>,
    /// `dataplane-cni` with `CNI_COMMAND=VERSION`.
    pub exec: Histogram<u64>,
    /// The agent's own part (request in to answer out), served and
    /// passed, from its log.
    pub agent_served: Histogram<u64>,
    /// See `agent_served`.
    pub agent_passed: Histogram<u64>,
}

/// Runs the plugin for its version: how long it took.
fn version(plugin: &Path) -> anyhow::Result<Duration> {
    use std::io::Write;
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new(plugin)
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(br#"{"cniVersion":"1.0.0"}"#)?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "{} VERSION failed", plugin.display());
    Ok(started.elapsed())
}

/// Makes `n` pods' sandboxes under the data plane `binary`, one after
/// another, or all at once if `together`.
pub fn measure(binary: &Path, n: usize, together: bool) -> anyhow::Result<Adds> {
    let tag = format!("dpbench-cni-{}", if together { "t" } else { "s" });
    let api = ApiServer::start(&tag);
    api.put("namespaces", namespace("shop", json!({"dataplane.dev/mesh": "enabled"})));
    api.put("namespaces", namespace("plain", json!({})));
    // host-local hands out 10.86.0.2 upwards, in the order of the ADDs.
    let ips: Vec<String> = (0..n as u32 + 1).map(|i| std::net::Ipv4Addr::from(0x0a56_0002 + i).to_string()).collect();
    let tmp = testworld::TempDir::new(&format!("{tag}-{}", std::process::id()))?;
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let certs = testworld::Certs::create(binary, tmp.0.join("certs"), &refs)?;
    let socket = tmp.0.join("cni.sock");
    let net = Network::new(&tag, "10.86.0.0/22", Some(&socket));
    let id = std::process::id();
    let workload = Cgroup::named(&format!("{tag}-w-{id}"))?;
    let own = Cgroup::named(&format!("{tag}-d-{id}"))?;
    let dir = NetnsDir::new(&tag);
    let (certs_dir, socket_s) = (certs.path(), socket.display().to_string());
    let extra = ["--certs", certs_dir.as_str(), "--cni-socket", socket_s.as_str()];
    let args = testworld::node_args(&api.kubeconfig(), "node-a", &dir, &workload, &extra);
    // At info: each answer's line carries the agent's own time.
    let dp = Dataplane::launch(binary, &own, &args, "info")?;
    let pods: Vec<(&str, String)> =
        (0..n).map(|i| (if i % 2 == 0 { "shop" } else { "plain" }, format!("p{i}"))).collect();
    for (ns, name) in &pods {
        api.put("pods", pod(ns, name, "node-a", None, json!({}), json!({})));
    }
    // Let the agent see them all before the first sandbox.
    std::thread::sleep(Duration::from_millis(500));
    let plugin = testworld::cni::cni_binary();
    let add = |ns: &str, name: &str| -> anyhow::Result<(String, Netns, Duration, [Duration; 2])> {
        // The baseline around the ADD, under the same load: one run just
        // before it, one just after.
        let before = version(&plugin)?;
        let netns = Netns::new(&tag, name);
        dir.add(&netns);
        let (_, took) =
            net.add_timed(&netns, ns, name, &format!("c-{name}")).map_err(|e| anyhow::anyhow!("{ns}/{name}: {e}"))?;
        Ok((ns.to_string(), netns, took, [before, version(&plugin)?]))
    };
    let made: Vec<(String, Netns, Duration, [Duration; 2])> = if together {
        std::thread::scope(|s| {
            let adding: Vec<_> = pods.iter().map(|(ns, name)| s.spawn(|| add(ns, name))).collect();
            adding
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a thread panicked"))))
                .collect::<anyhow::Result<Vec<_>>>()
        })?
    } else {
        pods.iter().map(|(ns, name)| add(ns, name)).collect::<anyhow::Result<_>>()?
    };
    let mut served = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    let mut passed = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    let mut exec = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    for (ns, _, took, baseline) in &made {
        let h = if ns == "shop" { &mut served } else { &mut passed };
        h.record((took.as_micros() as u64).max(1))?;
        for b in baseline {
            exec.record((b.as_micros() as u64).max(1))?;
        }
    }
    let mut agent_served = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    let mut agent_passed = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    for (verdict, took) in testworld::cni::decisions(&dp.proc.output()) {
        let h = if verdict == "served" { &mut agent_served } else { &mut agent_passed };
        h.record((took.as_micros() as u64).max(1))?;
    }
    drop(dp);
    drop(made);
    Ok(Adds { served, passed, exec, agent_served, agent_passed })
}
