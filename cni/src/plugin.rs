//! The plugin's decisions, apart from its I/O: from the `CNI_*` variables,
//! the network configuration and the agent (a trait, so that the rules are
//! tested without a socket), the result to print or the error to return.
//! Spec: github.com/containernetworking/cni, `SPEC.md` (1.0.0): a chained
//! plugin passes `prevResult` through; `DEL` and `CHECK` never fail for
//! state that is already gone.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use dataplane_common::cni::{Command, Request, Response};
use serde_json::{json, Value};

use crate::agent::Agent;

/// The largest network configuration read from standard input.
pub(crate) const MAX_CONFIG: usize = 1 << 20;
/// The spec versions whose configurations and results we read and write
/// (the results we pass through are the primary plugin's).
const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The `CNI_*` variables.
#[derive(Debug, Default)]
pub(crate) struct Env {
    command: String,
    container_id: String,
    netns: String,
    args: String,
}

impl Env {
    /// From the process's environment.
    pub(crate) fn from_vars(vars: impl Iterator<Item = (String, String)>) -> Self {
        let mut env = Self::default();
        for (k, v) in vars {
            match k.as_str() {
                "CNI_COMMAND" => env.command = v,
                "CNI_CONTAINERID" => env.container_id = v,
                "CNI_NETNS" => env.netns = v,
                "CNI_ARGS" => env.args = v,
                _ => {}
            }
        }
        env
    }

    /// The request for the agent, if the sandbox is a Kubernetes pod's: its
    /// namespace, name and UID from `CNI_ARGS`
    /// (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_UID=..`).
    fn request(&self, command: Command, addresses: Vec<IpAddr>) -> Option<Request> {
        let args: BTreeMap<&str, &str> = self.args.split(';').filter_map(|kv| kv.split_once('=')).collect();
        let namespace = args.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty())?.to_string();
        let name = args.get("K8S_POD_NAME").filter(|v| !v.is_empty())?.to_string();
        Some(Request {
            command,
            container_id: self.container_id.clone(),
            netns: PathBuf::from(&self.netns),
            namespace,
            name,
            uid: args.get("K8S_POD_UID").copied().unwrap_or_default().to_string(),
            addresses,
        })
    }
}

/// A CNI error: its code (the spec's well-known ones), message and details.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Error {
    code: u32,
    msg: String,
    details: String,
}

impl Error {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }

    /// Code 5: an I/O failure.
    pub(crate) fn io(msg: impl Into<String>) -> Self {
        Self::new(5, msg, "")
    }

    /// The error as the spec prints it.
    pub(crate) fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The configuration's `cniVersion`, or the newest we speak.
pub(crate) fn version_of(config: &[u8]) -> String {
    serde_json::from_slice::<Value>(config)
        .ok()
        .and_then(|c| c.get("cniVersion")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".into())
}

/// Carries out the runtime's command; `Ok(None)` prints nothing.
pub(crate) fn handle(env: &Env, config: &[u8], agent: &mut dyn Agent) -> Result<Option<Value>, Error> {
    if env.command == "VERSION" {
        return Ok(Some(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED})));
    }
    if config.len() > MAX_CONFIG {
        return Err(Error::new(7, "network configuration too large", format!("over {MAX_CONFIG} bytes")));
    }
    let config: Value = serde_json::from_slice(config)
        .map_err(|e| Error::new(6, "network configuration is not JSON", e.to_string()))?;
    let version = config.get("cniVersion").and_then(Value::as_str).unwrap_or("");
    if !SUPPORTED.contains(&version) {
        return Err(Error::new(1, format!("cniVersion {version:?} is not supported"), SUPPORTED.join(", ")));
    }
    let socket = match config.get("agentSocket").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => PathBuf::from(s),
        _ => return Err(Error::new(7, "agentSocket missing from the network configuration", "")),
    };
    let prev = config.get("prevResult").filter(|p| p.is_object());
    match env.command.as_str() {
        "ADD" => {
            let Some(prev) = prev else {
                return Err(Error::new(
                    7,
                    "dataplane-cni is a chained plugin: no prevResult",
                    "put it after the plugin that gives pods their addresses",
                ));
            };
            let mut out = prev.clone();
            out["cniVersion"] = json!(version);
            // Not a Kubernetes pod: nothing of ours.
            let Some(req) = env.request(Command::Add, addresses(prev)) else { return Ok(Some(out)) };
            if env.netns.is_empty() {
                return Err(Error::new(4, "CNI_NETNS is not set", ""));
            }
            match agent.ask(&socket, &req) {
                Ok(Response::Served | Response::Passed { .. }) => Ok(Some(out)),
                Ok(Response::Refused { why }) => {
                    Err(Error::new(11, format!("the node agent did not admit pod {}/{}", req.namespace, req.name), why))
                }
                Err(e) => unreachable_agent(agent, &socket, &req, &e).map(|()| Some(out)),
            }
        }
        "DEL" => {
            if let Some(req) = env.request(Command::Del, prev.map(addresses).unwrap_or_default()) {
                // Best effort: the agent also sees the namespace go.
                let _ = agent.ask(&socket, &req);
            }
            Ok(None)
        }
        "CHECK" => match prev {
            Some(_) => Ok(None),
            None => Err(Error::new(7, "CHECK without a prevResult", "")),
        },
        other => Err(Error::new(4, format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"), "")),
    }
}

/// With the agent down: a pod of a namespace in the mesh must not start
/// unprotected; any other starts at once.
fn unreachable_agent(
    agent: &mut dyn Agent,
    socket: &std::path::Path,
    req: &Request,
    e: &std::io::Error,
) -> Result<(), Error> {
    let meshed = match agent.meshed_namespaces(socket) {
        Ok(list) => list.unwrap_or_default(),
        Err(file) => {
            // Unreadable: we cannot tell, and failing every pod of the node
            // (kube-system's too) would take the node down with us.
            eprintln!("dataplane-cni: the node agent is unreachable ({e}) and its namespace list unreadable ({file}): passing");
            return Ok(());
        }
    };
    if meshed.contains(&req.namespace) {
        return Err(Error::new(
            11,
            format!(
                "the node agent is unreachable and namespace {} is in the mesh: not starting the pod unprotected",
                req.namespace
            ),
            format!("{}: {e}", socket.display()),
        ));
    }
    Ok(())
}

/// The addresses a result gives (`ips[].address`, CIDR form).
fn addresses(result: &Value) -> Vec<IpAddr> {
    let ips = result.get("ips").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    ips.iter().filter_map(|ip| ip.get("address")?.as_str()?.split('/').next()?.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use std::{io, path::Path};

    use super::*;

    /// An agent that answers as told, and remembers what it was asked.
    #[derive(Default)]
    struct Fake {
        answer: Option<Response>,
        namespaces: Option<Vec<String>>,
        asked: Vec<Request>,
    }

    impl Agent for Fake {
        fn ask(&mut self, _: &Path, req: &Request) -> io::Result<Response> {
            self.asked.push(req.clone());
            self.answer.clone().ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))
        }
        fn meshed_namespaces(&mut self, _: &Path) -> io::Result<Option<Vec<String>>> {
            Ok(self.namespaces.clone())
        }
    }

    fn env(command: &str, ns: &str) -> Env {
        Env {
            command: command.into(),
            container_id: "c1".into(),
            netns: "/var/run/netns/cni-1".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web-1;K8S_POD_UID=u1"),
        }
    }

    fn config() -> Vec<u8> {
        json!({
            "cniVersion": "1.0.0", "name": "pods", "type": "dataplane-cni", "agentSocket": "/run/dp.sock",
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
                           "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
                                   {"address": "fd00::5/64", "interface": 0}]}
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn add_asks_the_agent_and_passes_the_previous_result_through_unchanged() {
        let mut agent = Fake { answer: Some(Response::Served), ..Fake::default() };
        let out = handle(&env("ADD", "shop"), &config(), &mut agent).expect("added").expect("a result");
        let prev: Value = serde_json::from_slice::<Value>(&config()).expect("json")["prevResult"].clone();
        assert_eq!(out, prev);
        let req = &agent.asked[0];
        assert_eq!(
            (req.command, req.namespace.as_str(), req.name.as_str(), req.uid.as_str()),
            (Command::Add, "shop", "web-1", "u1")
        );
        assert_eq!(req.addresses, ["10.1.0.5".parse::<IpAddr>().expect("ip"), "fd00::5".parse().expect("ip")]);
        assert_eq!(req.netns, Path::new("/var/run/netns/cni-1"));
        let mut refusing = Fake { answer: Some(Response::Refused { why: "no certificate".into() }), ..Fake::default() };
        let e = handle(&env("ADD", "shop"), &config(), &mut refusing).expect_err("refused");
        assert_eq!((e.code, e.details.as_str()), (11, "no certificate"));
    }

    #[test]
    fn with_the_agent_down_a_meshed_namespace_fails_closed_and_others_pass() {
        let mut agent = Fake { namespaces: Some(vec!["shop".into()]), ..Fake::default() };
        let e = handle(&env("ADD", "shop"), &config(), &mut agent).expect_err("fails closed");
        assert_eq!(e.code, 11, "try again later");
        assert!(e.msg.contains("namespace shop is in the mesh"), "{}", e.msg);
        assert!(handle(&env("ADD", "kube-system"), &config(), &mut agent).expect("passes").is_some());
        let mut never_ran = Fake::default();
        assert!(handle(&env("ADD", "shop"), &config(), &mut never_ran).expect("no agent ever: passes").is_some());
    }

    #[test]
    fn del_and_check_never_fail_for_what_is_gone_and_other_sandboxes_are_not_ours() {
        let mut agent = Fake::default();
        assert_eq!(handle(&env("DEL", "shop"), &config(), &mut agent), Ok(None), "agent down: DEL still succeeds");
        assert_eq!(agent.asked[0].command, Command::Del);
        assert_eq!(handle(&env("CHECK", "shop"), &config(), &mut agent), Ok(None));
        let plain = Env { args: String::new(), ..env("ADD", "") };
        let mut agent = Fake::default();
        assert!(handle(&plain, &config(), &mut agent).expect("passes").is_some());
        assert!(agent.asked.is_empty(), "not a Kubernetes pod: the agent is not asked");
    }

    #[test]
    fn bad_input_gets_the_specs_error_codes() {
        let mut agent = Fake::default();
        let version = handle(&env("VERSION", ""), b"", &mut agent).expect("version").expect("output");
        assert_eq!(version["supportedVersions"].as_array().map(Vec::len), Some(SUPPORTED.len()));
        let code =
            |cmd: &str, cfg: &[u8]| handle(&env(cmd, "shop"), cfg, &mut Fake::default()).expect_err("error").code;
        assert_eq!(code("ADD", b"{not json"), 6);
        assert_eq!(code("ADD", br#"{"cniVersion":"9.9.9","agentSocket":"/s"}"#), 1);
        assert_eq!(code("ADD", br#"{"cniVersion":"1.0.0"}"#), 7, "no agentSocket");
        assert_eq!(code("ADD", br#"{"cniVersion":"1.0.0","agentSocket":"/s"}"#), 7, "no prevResult");
        assert_eq!(code("BOGUS", &config()), 4);
        let e = Error::new(11, "m", "d").to_json("0.4.0");
        assert_eq!(e, json!({"cniVersion": "0.4.0", "code": 11, "msg": "m", "details": "d"}));
    }
}
