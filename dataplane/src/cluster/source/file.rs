//! The model from a local file (`--workloads FILE`), for hosts without a
//! cluster: the demo, tests, the bench, plain Linux machines.
//!
//! ```json
//! { "workloads": [
//!   { "namespace": "shop", "name": "web", "serviceAccount": "web",
//!     "addresses": ["10.0.0.2"], "mode": "meshed",
//!     "skipOutboundPorts": [5432], "skipInboundPorts": [9090] },
//!   { "namespace": "shop", "name": "db", "addresses": ["10.0.1.7"],
//!     "node": "node-b", "mode": "meshed" },
//!   { "namespace": "ops", "name": "agent", "addresses": ["10.0.0.9"],
//!     "mode": "outside", "netns": "/var/run/netns/agent" } ],
//!   "services": [
//!   { "namespace": "shop", "name": "db", "clusterIPs": ["10.96.0.20"],
//!     "ports": [{ "name": "pg", "port": 5432 }], "sessionAffinity": "ClientIP",
//!     "endpoints": [{ "addresses": ["10.0.1.7"], "ready": true,
//!                     "ports": [{ "name": "pg", "port": 5432 }] }] } ] }
//! ```
//!
//! `services` is optional: each endpoint entry stands for an EndpointSlice
//! (its `ports` resolve the service's port names for its addresses), with
//! the conditions `ready` (default true), `serving` (default: `ready`) and
//! `terminating` (default false), and the endpoints' `node` (default: ours);
//! a service may say `"internalTrafficPolicy": "Local"`, and with
//! `"sessionAffinity": "ClientIP"` its `"sessionAffinityTimeoutSeconds"` (1 to
//! 86400; default 10800, as the API's).
//!
//! A workload is local (ours to enrol) when it names no `node`, or our own
//! (`--node-name`); its namespace is `netns` if given, otherwise the one under
//! `--netns-dir` holding its address. Unknown fields are errors: a typo must
//! not silently leave a pod out of the mesh. The file is re-read when it
//! changes; a file that does not parse is refused and the previous model
//! stays in service.
use std::{collections::BTreeMap, net::IpAddr, path::Path, path::PathBuf};

use serde::Deserialize;

use crate::{
    cluster::model::{parse_ports, Mode, Model, Outside, Workload},
    cluster::services::{Endpoint, Hint, Readiness, Service, ServicePort, Slice, DEFAULT_AFFINITY_TIMEOUT},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    workloads: Vec<Entry>,
    #[serde(default)]
    services: Vec<ServiceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceEntry {
    namespace: String,
    name: String,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Vec<IpAddr>,
    ports: Vec<PortEntry>,
    #[serde(default)]
    session_affinity: Option<String>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`, flattened.
    #[serde(default)]
    session_affinity_timeout_seconds: Option<u32>,
    #[serde(default)]
    internal_traffic_policy: Option<String>,
    #[serde(default)]
    endpoints: Vec<EndpointEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortEntry {
    #[serde(default)]
    name: String,
    port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointEntry {
    addresses: Vec<IpAddr>,
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
    #[serde(default)]
    node: Option<String>,
    ports: Vec<PortEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    namespace: String,
    name: String,
    #[serde(default = "default_sa")]
    service_account: String,
    #[serde(default)]
    addresses: Vec<IpAddr>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    netns: Option<PathBuf>,
    mode: FileMode,
    #[serde(default)]
    skip_outbound_ports: Vec<u16>,
    #[serde(default)]
    skip_inbound_ports: Vec<u16>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    strict: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum FileMode {
    Meshed,
    Outside,
}

fn default_sa() -> String {
    "default".into()
}

/// Errors reading a workloads file, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unreadable.
    #[error("--workloads {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not the format above.
    #[error("--workloads {}: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
}

/// Reads the model from `path`; `node` is our own node's name, if we know it.
pub fn load(path: &Path, node: Option<&str>) -> Result<Model, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
    parse(&text, node).map_err(|reason| Error::Parse { path: path.into(), reason })
}

/// Parses a workloads file's text.
pub fn parse(text: &str, node: Option<&str>) -> Result<Model, String> {
    let file: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(file.workloads.len());
    for e in file.workloads {
        let key = format!("{}/{}", e.namespace, e.name);
        let list = |ports: &[u16]| {
            parse_ports(&ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
                .map_err(|why| format!("workload {key}: {why}"))
        };
        let mode = match e.mode {
            FileMode::Meshed => Mode::Meshed {
                skip_outbound: list(&e.skip_outbound_ports)?,
                skip_inbound: list(&e.skip_inbound_ports)?,
            },
            FileMode::Outside => Mode::Outside(Outside::Declared),
        };
        let local = e.node.as_deref().is_none_or(|n| Some(n) == node);
        out.push(Workload {
            namespace: e.namespace.into(),
            name: e.name.into(),
            service_account: e.service_account.into(),
            addresses: e.addresses,
            local,
            netns: e.netns,
            client_address: true,
            mode,
            labels: if local { e.labels } else { BTreeMap::new() },
            strict: e.strict,
        });
    }
    let services = file
        .services
        .into_iter()
        .map(|s| {
            let affinity = match s.session_affinity.as_deref() {
                None | Some("None") => None,
                Some("ClientIP") => Some(match s.session_affinity_timeout_seconds {
                    None => DEFAULT_AFFINITY_TIMEOUT,
                    Some(t @ 1..=86_400) => std::time::Duration::from_secs(t.into()),
                    Some(t) => {
                        return Err(format!(
                            "service {}/{}: sessionAffinityTimeoutSeconds {t} (1 to 86400)",
                            s.namespace, s.name
                        ))
                    }
                }),
                Some(other) => return Err(format!("service {}/{}: sessionAffinity {other:?}", s.namespace, s.name)),
            };
            let node_local = match s.internal_traffic_policy.as_deref() {
                None | Some("Cluster") => false,
                Some("Local") => true,
                Some(other) => {
                    return Err(format!("service {}/{}: internalTrafficPolicy {other:?}", s.namespace, s.name))
                }
            };
            Ok(Service {
                namespace: s.namespace,
                name: s.name,
                cluster_ips: s.cluster_ips,
                ports: s.ports.into_iter().map(|p| ServicePort { name: p.name, port: p.port }).collect(),
                client_ip_affinity: affinity,
                node_local,
                // No zones here: a file names no node's zone.
                zone_hints: false,
                slices: s
                    .endpoints
                    .into_iter()
                    .map(|e| {
                        let state = Readiness::of(e.ready, e.serving, e.terminating);
                        let local = e.node.as_deref().is_none_or(|n| Some(n) == node);
                        Slice {
                            ports: e.ports.into_iter().map(|p| (p.name, p.port)).collect(),
                            endpoints: e
                                .addresses
                                .into_iter()
                                .map(|addr| Endpoint { addr, state, local, hint: Hint::None })
                                .collect(),
                        }
                    })
                    .collect(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Model::with_services(out, services))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("file.rs");
        let start = doc.find("//! ```json").expect("example") + "//! ```json".len();
        let end = start + doc[start..].find("//! ```").expect("end");
        let text: String = doc[start..end].lines().map(|l| l.trim_start_matches("//!")).collect::<Vec<_>>().join("\n");
        let m = parse(&text, Some("node-a")).expect("example parses");
        let w: Vec<_> = m.workloads().collect();
        assert_eq!(w.len(), 3);
        let db = w.iter().find(|w| &*w.name == "db").expect("db");
        assert!(!db.local, "on node-b");
        let web = w.iter().find(|w| &*w.name == "web").expect("web");
        assert_eq!(web.mode, Mode::Meshed { skip_outbound: vec![5432], skip_inbound: vec![9090] });
        assert!(web.local && &*web.service_account == "web");
        assert_eq!(m.meshed_destinations().len(), 2, "web and db");
        let table = m.service_table();
        let db = table.get("10.96.0.20:5432".parse().expect("vip")).expect("the db service");
        assert!(
            db.client_ip_affinity == Some(DEFAULT_AFFINITY_TIMEOUT) && db.backends.len() == 1 && db.backends[0].meshed
        );
    }

    #[test]
    fn mistakes_are_named() {
        let typo = r#"{"workloads":[{"namespace":"a","name":"b","mode":"meshed","adresses":[]}]}"#;
        assert!(parse(typo, None).expect_err("typo").contains("adresses"));
        let mode = r#"{"workloads":[{"namespace":"a","name":"b","mode":"on"}]}"#;
        assert!(parse(mode, None).expect_err("mode").contains("on"));
        let port = r#"{"workloads":[{"namespace":"a","name":"b","mode":"meshed","skipInboundPorts":[18001]}]}"#;
        assert!(parse(port, None).expect_err("own port").contains("a/b"));
    }
}
