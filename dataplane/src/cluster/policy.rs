//! Who may talk to whom: the L4 subset of Istio's `security.istio.io/v1`
//! `AuthorizationPolicy`, enforced by the destination's data plane before it
//! connects to the application, so a team coming from Istio's ambient mode
//! brings its policies unchanged.
//!
//! What is read: `selector.matchLabels` (none: every pod of the policy's
//! namespace), `action` `ALLOW` (the default) or `DENY`, and rules whose
//! `from[].source` names `principals`, `namespaces`, `ipBlocks` and their
//! `not` forms, and whose `to[].operation` names `ports` and `notPorts`.
//! Evaluated as ztunnel does: a DENY policy that matches refuses; else, if
//! any ALLOW policy selects the pod, one of them must match; else allowed.
//! A rule matches when one of its `from` (or none given) and one of its `to`
//! (or none given) match; a source matches when every field it names does.
//!
//! What needs L7 (HTTP methods, paths, hosts, request principals, `when`
//! conditions, remote IP blocks) cannot be decided here and is never
//! half-applied: an ALLOW rule that names any of it matches nothing (allows
//! less), a DENY rule is applied by its L4 fields alone (denies more), as
//! Istio's own L4 enforcement does. Such policies are named in the log and
//! counted. `AUDIT`, `CUSTOM` and `targetRefs` policies are not applied.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;
use serde_json::Value;

/// A policy as this data plane applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `namespace/name`, for logs and metrics.
    pub name: String,
    /// Its namespace: it applies to pods there.
    pub namespace: String,
    /// `selector.matchLabels` (`None`: every pod of the namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// ALLOW or DENY.
    pub action: Action,
    /// Its rules, L7 parts taken out (see the module comment).
    pub rules: Vec<Rule>,
    /// What it names that cannot be enforced here (empty: all of it is).
    pub unsupported: Vec<String>,
}

/// A policy's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Only what a rule matches is allowed.
    Allow,
    /// What a rule matches is refused.
    Deny,
}

/// One rule: sources and operations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// `from[].source` (empty: any source).
    pub from: Vec<Source>,
    /// `to[].operation` (empty: any operation).
    pub to: Vec<Operation>,
    /// An ALLOW rule that named L7 attributes: it matches nothing.
    pub never: bool,
}

/// Who a connection comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    /// `principals` / `notPrincipals` (`cluster.local/ns/NS/sa/SA`, with `*`
    /// as a whole, a prefix or a suffix).
    pub principals: Vec<String>,
    /// See `principals`.
    pub not_principals: Vec<String>,
    /// `namespaces` / `notNamespaces` (the same patterns).
    pub namespaces: Vec<String>,
    /// See `namespaces`.
    pub not_namespaces: Vec<String>,
    /// `ipBlocks` / `notIpBlocks` (an address alone is a /32 or /128).
    pub ip_blocks: Vec<IpNet>,
    /// See `ip_blocks`.
    pub not_ip_blocks: Vec<IpNet>,
}

/// What a connection goes to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Operation {
    /// `ports` / `notPorts`.
    pub ports: Vec<u16>,
    /// See `ports`.
    pub not_ports: Vec<u16>,
}

/// One connection as the destination sees it.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    /// The client's principal (`TRUST_DOMAIN/ns/NS/sa/SA`: its SPIFFE ID
    /// without `spiffe://`), proved by its certificate.
    pub principal: &'a str,
    /// The client's address.
    pub source: IpAddr,
    /// The destination (the pod's address and the application's port).
    pub dst: SocketAddr,
}

impl Conn<'_> {
    /// The client's namespace, from its principal.
    fn namespace(&self) -> Option<&str> {
        let mut parts = self.principal.split('/');
        parts.by_ref().skip_while(|p| *p != "ns").nth(1)
    }
}

/// `*`, `prefix*`, `*suffix`, or exact.
fn matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

fn any(patterns: &[String], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| matches(p, v)))
}

impl Source {
    fn matches(&self, c: &Conn<'_>) -> bool {
        let ip = |blocks: &[IpNet]| blocks.iter().any(|b| b.contains(&c.source));
        (self.principals.is_empty() || any(&self.principals, Some(c.principal)))
            && !any(&self.not_principals, Some(c.principal))
            && (self.namespaces.is_empty() || any(&self.namespaces, c.namespace()))
            && (self.not_namespaces.is_empty() || !any(&self.not_namespaces, c.namespace()))
            && (self.ip_blocks.is_empty() || ip(&self.ip_blocks))
            && !ip(&self.not_ip_blocks)
    }
}

impl Operation {
    fn matches(&self, c: &Conn<'_>) -> bool {
        (self.ports.is_empty() || self.ports.contains(&c.dst.port())) && !self.not_ports.contains(&c.dst.port())
    }
}

impl Rule {
    fn matches(&self, c: &Conn<'_>) -> bool {
        !self.never
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(c)))
    }
}

impl Policy {
    /// Whether it applies to a pod of `namespace` with `labels`.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace == namespace
            && self.selector.as_ref().is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    fn matches(&self, c: &Conn<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(c))
    }
}

/// Why a connection is refused: the DENY policy that matched, or that no
/// ALLOW policy did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// A DENY policy matched.
    #[error("denied by policy {0}")]
    ByPolicy(String),
    /// ALLOW policies select the pod and none matched.
    #[error("no ALLOW policy matches (of {0})")]
    NotAllowed(String),
}

/// Decides a connection to a pod that `policies` select (DENY first, then
/// ALLOW if any, else allowed).
pub fn decide(policies: &[Arc<Policy>], c: &Conn<'_>) -> Result<(), Denied> {
    if let Some(p) = policies.iter().find(|p| p.action == Action::Deny && p.matches(c)) {
        return Err(Denied::ByPolicy(p.name.clone()));
    }
    let mut allows = policies.iter().filter(|p| p.action == Action::Allow).peekable();
    if allows.peek().is_none() || allows.any(|p| p.matches(c)) {
        return Ok(());
    }
    let names: Vec<&str> = policies.iter().filter(|p| p.action == Action::Allow).map(|p| p.name.as_str()).collect();
    Err(Denied::NotAllowed(names.join(", ")))
}

/// The policies that apply to each of this node's meshed pods, by address.
/// Immutable: the control thread sends a new one when a policy or a local
/// pod changes.
pub type Table = std::collections::HashMap<IpAddr, Arc<[Arc<Policy>]>>;

/// An `AuthorizationPolicy` as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Applied (a malformed one as a DENY of everything to the pods it
    /// selects: see [`parse`]).
    Policy(Policy),
    /// Not for this data plane (`AUDIT`, `CUSTOM`, `targetRefs`), and why.
    Ignored(String),
}

/// Reads an `AuthorizationPolicy`'s `spec`. One that does not parse (an API
/// server without Istio's validation takes anything) fails closed: it
/// refuses every connection to the pods it selects (to its whole namespace
/// if its selector does not parse), with the reason in `unsupported`,
/// rather than be skipped, which could allow what it was written to stop.
pub fn parse(namespace: &str, name: &str, spec: &Value) -> Parsed {
    let full = format!("{namespace}/{name}");
    let action = match spec.get("action").and_then(Value::as_str).unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        other => return Parsed::Ignored(format!("action {other} is not applied here")),
    };
    if spec.get("targetRefs").or_else(|| spec.get("targetRef")).is_some() {
        return Parsed::Ignored("targetRefs (waypoints) are not applied here".into());
    }
    let selector = match spec.get("selector") {
        None | Some(Value::Null) => Ok(None),
        Some(s) => string_map(s.get("matchLabels")).map(Some).map_err(|e| format!("selector.matchLabels: {e}")),
    };
    let parsed = selector.clone().and_then(|selector| parse_rules(action, spec).map(|r| (selector, r)));
    Parsed::Policy(match parsed {
        Ok((selector, (rules, unsupported))) => {
            Policy { name: full, namespace: namespace.into(), selector, action, rules, unsupported }
        }
        Err(why) => Policy {
            name: full,
            namespace: namespace.into(),
            selector: selector.unwrap_or(None),
            action: Action::Deny,
            rules: vec![Rule::default()],
            unsupported: vec![format!("malformed, so it refuses everything to the pods it selects: {why}")],
        },
    })
}

/// A spec's rules, and what of them cannot be enforced here.
fn parse_rules(action: Action, spec: &Value) -> Result<(Vec<Rule>, Vec<String>), String> {
    let mut unsupported = Vec::new();
    let mut rules = Vec::new();
    for (i, r) in list(spec.get("rules"), "rules")?.iter().enumerate() {
        let mut rule = Rule::default();
        let mut l7 = Vec::new();
        for f in list(r.get("from"), "from")? {
            let s = f.get("source").unwrap_or(&Value::Null);
            for key in ["requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"] {
                if s.get(key).is_some() {
                    l7.push(format!("rules[{i}].from.source.{key}"));
                }
            }
            rule.from.push(Source {
                principals: strings(s.get("principals"))?,
                not_principals: strings(s.get("notPrincipals"))?,
                namespaces: strings(s.get("namespaces"))?,
                not_namespaces: strings(s.get("notNamespaces"))?,
                ip_blocks: blocks(s.get("ipBlocks"))?,
                not_ip_blocks: blocks(s.get("notIpBlocks"))?,
            });
        }
        for t in list(r.get("to"), "to")? {
            let o = t.get("operation").unwrap_or(&Value::Null);
            for key in ["hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"] {
                if o.get(key).is_some() {
                    l7.push(format!("rules[{i}].to.operation.{key}"));
                }
            }
            rule.to.push(Operation { ports: ports(o.get("ports"))?, not_ports: ports(o.get("notPorts"))? });
        }
        if r.get("when").and_then(Value::as_array).is_some_and(|w| !w.is_empty()) {
            l7.push(format!("rules[{i}].when"));
        }
        // Never half-applied: an ALLOW rule naming L7 allows nothing; a
        // DENY rule denies by its L4 fields alone.
        rule.never = action == Action::Allow && !l7.is_empty();
        unsupported.extend(l7);
        rules.push(rule);
    }
    Ok((rules, unsupported))
}

/// A list field (absent: empty).
fn list<'a>(v: Option<&'a Value>, what: &str) -> Result<&'a [Value], String> {
    match v {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(format!("{what}: {other} is not a list")),
    }
}

fn strings(v: Option<&Value>) -> Result<Vec<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(|| format!("{x} is not a string"))).collect()
        }
        Some(other) => Err(format!("{other} is not a list")),
    }
}

fn string_map(v: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    match v {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| x.as_str().map(|s| (k.clone(), s.to_string())).ok_or_else(|| format!("{k}: not a string")))
            .collect(),
        Some(other) => Err(format!("{other} is not a map")),
    }
}

fn blocks(v: Option<&Value>) -> Result<Vec<IpNet>, String> {
    strings(v)?.iter().map(|s| crate::config::parse_net(s)).collect()
}

fn ports(v: Option<&Value>) -> Result<Vec<u16>, String> {
    strings(v)?.iter().map(|p| p.parse::<u16>().map_err(|_| format!("port {p:?}"))).collect()
}

#[cfg(test)]
mod tests;
