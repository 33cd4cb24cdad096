//! What the CNI plugin (`dataplane-cni`) and the node agent say to each
//! other over the agent's unix socket: one request per connection, one JSON
//! line each way. The plugin is a one-shot process the runtime runs per
//! sandbox, so a connection per request costs nothing worth saving, and a
//! line of JSON can be read by an operator with `socat` at 3 a.m.
//!
//! The agent answers an `ADD` only when it has decided: a meshed pod is
//! served (listeners open in its namespace, its verdict written, its
//! certificate in place), any other pod is marked pass. When the agent
//! cannot be reached, the plugin decides alone from the file the agent keeps
//! beside its socket ([`namespaces_file`]): a pod of a namespace listed
//! there fails (the runtime retries the sandbox: fail closed), any other
//! passes at once.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The longest request or answer line either side reads.
pub const MAX_LINE: usize = 64 * 1024;

/// What the runtime asked the plugin to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// A sandbox was created: decide before its containers start.
    Add,
    /// A sandbox goes (may come for one the agent never saw, or twice).
    Del,
}

/// A pod's sandbox, as the runtime described it to the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    /// ADD or DEL.
    pub command: Command,
    /// `CNI_CONTAINERID`: the sandbox.
    pub container_id: String,
    /// `CNI_NETNS`: the sandbox's network namespace file (may be empty on
    /// DEL).
    pub netns: PathBuf,
    /// The pod's Kubernetes namespace (`K8S_POD_NAMESPACE`).
    pub namespace: String,
    /// The pod's name (`K8S_POD_NAME`).
    pub name: String,
    /// The pod's UID (`K8S_POD_UID`; empty if the runtime gives none).
    #[serde(default)]
    pub uid: String,
    /// Its addresses, as the primary plugin's result gives them.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "verdict")]
pub enum Response {
    /// In the mesh: served from the containers' first instruction.
    Served,
    /// Outside the mesh: never captured.
    Passed {
        /// Why (a membership label: `namespace_not_opted_in`, ...).
        why: String,
    },
    /// Not decided: the sandbox must not start (the runtime retries).
    Refused {
        /// What is missing or wrong, for the kubelet's event.
        why: String,
    },
}

/// The file beside the agent's socket that lists the namespaces opted into
/// the mesh (a JSON array of names), for the plugin to fail closed by when
/// the agent is down.
pub fn namespaces_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".namespaces");
    PathBuf::from(name)
}

/// The file beside the agent's socket where it keeps the sandboxes it was
/// handed, for the agent that follows it.
pub fn sandboxes_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".sandboxes");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_the_answers_read_back_as_written() {
        let req = Request {
            command: Command::Add,
            container_id: "abc".into(),
            netns: "/var/run/netns/cni-1".into(),
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: "u-1".into(),
            addresses: vec!["10.1.0.5".parse().expect("ip"), "fd00::5".parse().expect("ip")],
        };
        let line = serde_json::to_string(&req).expect("encodes");
        assert!(line.contains(r#""command":"ADD""#) && line.contains(r#""containerId":"abc""#), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).expect("decodes"), req);
        for r in [Response::Served, Response::Passed { why: "x".into() }, Response::Refused { why: "y".into() }] {
            let line = serde_json::to_string(&r).expect("encodes");
            assert_eq!(serde_json::from_str::<Response>(&line).expect("decodes"), r);
        }
        assert!(serde_json::from_str::<Request>(r#"{"command":"ADD","bogus":1}"#).is_err(), "unknown fields");
        assert_eq!(
            namespaces_file(Path::new("/run/dataplane/cni.sock")),
            Path::new("/run/dataplane/cni.sock.namespaces")
        );
    }
}
