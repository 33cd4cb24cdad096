//! How fast a new pod is served: from its address appearing (as a CNI adds
//! it) to its first connect to a meshed destination being captured. The
//! data plane runs as on a node without a cluster: `--workloads` names the
//! pods ahead, `--netns-dir` finds their namespaces (inotify), and each pod
//! appears empty, then gets its address from a probe inside it that then
//! connects until the connect is captured (until then it is refused: the
//! pod is not served yet). Pods come one after another, so the figure is
//! the latency, not the throughput, of enrolment; or all at once (a node
//! booting), where each pod's figure includes waiting for the others'.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use testworld::{Cgroup, Dataplane, Netns};

/// A meshed destination no pod holds: a connect to it is captured (then
/// answered by our own listener) once the pod is served.
pub const PROBE_DST: &str = "10.97.255.254:9";

/// The address of the `i`th pod enrolled.
pub fn pod_address(i: usize) -> String {
    format!("10.97.{}.{}", i / 200, i % 200 + 1)
}

/// A pod namespace as the runtime makes it, without an address yet (an
/// interface up, no address), named `name` and listed in `netns_dir`.
pub fn empty_pod(name: &str, netns_dir: &Path) -> anyhow::Result<Netns> {
    let pod = Netns::named(name)?;
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    std::os::unix::fs::symlink(pod.path(), netns_dir.join(&pod.name))?;
    Ok(pod)
}

/// What a probe run as `pod` measured (µs from its address to its first
/// captured connect), or why it failed.
pub fn served_after(pod: &str, out: &std::process::Output) -> anyhow::Result<u64> {
    if !out.status.success() {
        bail!("probe in {pod}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("probe output")?;
    Ok(v["served_after_us"].as_u64().context("probe figure")?.max(1))
}

/// What a run measured: end to end as the probe saw it, and the data
/// plane's own histogram (address seen to served), both in µs.
#[derive(Debug)]
pub struct Enrolment {
    /// The probes' figures.
    pub end_to_end: Histogram<u64>,
    /// The data plane's `dataplane_enrolment_latency_seconds`, as (p50, p99)
    /// bucket bounds in µs.
    pub dataplane_buckets: String,
}

/// Runs `n` pods through enrolment under the data plane `binary`, one after
/// another, or all at once if `together`.
pub fn measure(binary: &Path, n: usize, me: &Path, together: bool) -> anyhow::Result<Enrolment> {
    let id = std::process::id();
    let workload = Cgroup::named(&format!("dpbench-enrol-w-{id}"))?;
    let own = Cgroup::named(&format!("dpbench-enrol-d-{id}"))?;
    let tmp = testworld::TempDir::new(&format!("dpbench-enrol-{id}"))?;
    let dir = tmp.0.clone();
    let netns_dir = dir.join("netns");
    fs::create_dir_all(&netns_dir)?;
    let certs = dir.join("certs");
    let addrs: Vec<String> = (0..n).map(pod_address).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let certs = testworld::Certs::create(binary, certs, &refs)?;
    let mut workloads: Vec<serde_json::Value> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| serde_json::json!({"namespace": "bench", "name": format!("p{i}"), "addresses": [a], "mode": "meshed"}))
        .collect();
    workloads.push(serde_json::json!({"namespace": "bench", "name": "elsewhere", "node": "another",
        "addresses": [PROBE_DST.split(':').next()], "mode": "meshed"}));
    let file = dir.join("workloads.json");
    fs::write(&file, serde_json::json!({ "workloads": workloads }).to_string())?;
    let args: Vec<String> = testworld::strings(&[
        "--workloads",
        &file.display().to_string(),
        "--netns-dir",
        &netns_dir.display().to_string(),
        "--workload-cgroup",
        &workload.path.display().to_string(),
        "--certs",
        &certs.path(),
    ]);
    let dp = Dataplane::launch(binary, &own, &args, "warn")?;
    let mut end_to_end = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    let me_s = me.to_str().context("bench path")?;
    let make = |i: usize| empty_pod(&format!("dpbench-enrol-{id}-{i}"), &netns_dir);
    let probe = |pod: &Netns, addr: &str| {
        pod.command(Some(&workload), me_s, &["--worker", "enrol-probe", PROBE_DST, &format!("{addr}/32"), "eth0"])
    };
    let mut pods = Vec::new();
    let mut outputs = Vec::new();
    if together {
        // Every namespace first, seen empty; then every address at once.
        for i in 0..n {
            pods.push(make(i)?);
        }
        std::thread::sleep(Duration::from_millis(200));
        let children: Vec<_> = pods
            .iter()
            .zip(&addrs)
            .map(|(pod, addr)| {
                // Both piped, as `output()` does for the pods one after
                // another: a failed probe's reason is in the error.
                probe(pod, addr).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()
            })
            .collect::<Result<_, _>>()?;
        for child in children {
            outputs.push(child.wait_with_output()?);
        }
    } else {
        for (i, addr) in addrs.iter().enumerate() {
            pods.push(make(i)?);
            // Let the data plane see the empty namespace first, as it sees
            // one the runtime has just made.
            std::thread::sleep(Duration::from_millis(20));
            outputs.push(probe(&pods[i], addr).output()?);
        }
    }
    for (i, out) in outputs.iter().enumerate() {
        end_to_end.record(served_after(&format!("pod {i}"), out)?)?;
    }
    let (_, text) = testworld::http_get(&dp.admin(), "/metrics")?;
    let buckets = text
        .lines()
        .filter(|l| l.starts_with("dataplane_enrolment_latency_seconds_bucket"))
        .map(|l| l.replace("dataplane_enrolment_latency_seconds_bucket", ""))
        .collect::<Vec<_>>()
        .join(" ");
    drop(dp);
    drop(pods);
    drop(tmp);
    Ok(Enrolment { end_to_end, dataplane_buckets: buckets })
}

/// The probe, inside a new pod: adds the address, then connects to `dst`
/// every 200 µs until a connect is captured (succeeds), for at most
/// `within`.
pub fn probe(dst: std::net::SocketAddr, cidr: &str, dev: &str, within: Duration) -> anyhow::Result<serde_json::Value> {
    let start = std::time::Instant::now();
    let ok = Command::new("ip").args(["addr", "add", cidr, "dev", dev]).status()?;
    if !ok.success() {
        bail!("ip addr add {cidr} dev {dev} failed");
    }
    let deadline = start + within;
    let mut refused = 0u64;
    loop {
        match std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1)) {
            // Captured: our listener answered. It resets the connection at
            // once (the destination is unreachable from this pod), which
            // can land before the connect's result is read.
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => refused += 1,
            Err(e) => bail!("connect to {dst}: {e} (neither refused by the mesh nor captured)"),
        }
        if std::time::Instant::now() >= deadline {
            bail!("not served within {within:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(serde_json::json!({ "served_after_us": start.elapsed().as_micros() as u64, "refused_meanwhile": refused }))
}

/// Where the bench binary is (the probe runs it again).
pub fn me() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?)
}
