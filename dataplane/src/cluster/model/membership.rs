//! Mesh membership of one pod: from its labels and annotations and its
//! namespace's label (see [`super`] for the rules).
use std::collections::BTreeMap;

use dataplane_common::{maps::POD_PORTS, INBOUND_PORT, OUTBOUND_PORT};

use super::{Mode, Outside, MESH_LABEL, SKIP_INBOUND, SKIP_OUTBOUND};

/// Mesh membership from the labels and annotations of a pod and of its
/// namespace (`None`: the namespace is not known yet, so not opted in).
pub fn membership(
    host_network: bool,
    namespace_labels: Option<&BTreeMap<String, String>>,
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
) -> Mode {
    if host_network {
        return Mode::Outside(Outside::HostNetwork);
    }
    if !opted_in(namespace_labels) {
        return Mode::Outside(Outside::NotOptedIn);
    }
    if pod_labels.get(MESH_LABEL).map(String::as_str) == Some("disabled") {
        return Mode::Outside(Outside::OptedOut);
    }
    let ports = |key: &str| match pod_annotations.get(key) {
        None => Ok(Vec::new()),
        Some(v) => parse_ports(v).map_err(|e| format!("annotation {key}={v:?}: {e}")),
    };
    match (ports(SKIP_OUTBOUND), ports(SKIP_INBOUND)) {
        (Ok(skip_outbound), Ok(skip_inbound)) => Mode::Meshed { skip_outbound, skip_inbound },
        (Err(e), _) | (_, Err(e)) => Mode::Outside(Outside::BadAnnotation(e)),
    }
}

/// Whether a namespace with these labels is opted into the mesh (`None`:
/// not known yet, so not).
pub fn opted_in(namespace_labels: Option<&BTreeMap<String, String>>) -> bool {
    namespace_labels.and_then(|l| l.get(MESH_LABEL)).map(String::as_str) == Some("enabled")
}

/// A comma-separated list of at most [`POD_PORTS`] ports, none of them the
/// data plane's own.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: u16 = part.parse().map_err(|_| format!("{part:?} is not a port (1-65535)"))?;
        if p == 0 {
            return Err("port 0".into());
        }
        if p == OUTBOUND_PORT || p == INBOUND_PORT {
            return Err(format!("port {p} is the data plane's own"));
        }
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    if ports.len() > POD_PORTS {
        return Err(format!("{} ports; at most {POD_PORTS} per pod", ports.len()));
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_pod_is_meshed_only_when_its_namespace_opts_in_and_it_does_not_opt_out() {
        let on = labels(&[(MESH_LABEL, "enabled")]);
        let off = labels(&[(MESH_LABEL, "disabled")]);
        let none = labels(&[]);
        let meshed = Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![] };
        assert_eq!(membership(false, Some(&on), &none, &none), meshed);
        assert_eq!(membership(false, Some(&none), &none, &none), Mode::Outside(Outside::NotOptedIn));
        assert_eq!(membership(false, None, &none, &none), Mode::Outside(Outside::NotOptedIn));
        // Any other value of the namespace label is not an opt-in.
        let typo = labels(&[(MESH_LABEL, "true")]);
        assert_eq!(membership(false, Some(&typo), &none, &none), Mode::Outside(Outside::NotOptedIn));
        assert_eq!(membership(false, Some(&on), &off, &none), Mode::Outside(Outside::OptedOut));
        // Host-network pods never, whatever their labels.
        assert_eq!(membership(true, Some(&on), &none, &none), Mode::Outside(Outside::HostNetwork));
    }

    #[test]
    fn annotations_name_the_ports_left_alone() {
        let on = labels(&[(MESH_LABEL, "enabled")]);
        let ann = labels(&[(SKIP_OUTBOUND, "5432, 6379"), (SKIP_INBOUND, "9090")]);
        assert_eq!(
            membership(false, Some(&on), &labels(&[]), &ann),
            Mode::Meshed { skip_outbound: vec![5432, 6379], skip_inbound: vec![9090] }
        );
        let bad = labels(&[(SKIP_INBOUND, "http")]);
        let Mode::Outside(Outside::BadAnnotation(why)) = membership(false, Some(&on), &labels(&[]), &bad) else {
            panic!("a bad annotation leaves the pod alone")
        };
        assert!(why.contains(SKIP_INBOUND) && why.contains("http"), "{why}");
    }

    #[test]
    fn port_lists_are_checked() {
        assert_eq!(parse_ports(""), Ok(vec![]));
        assert_eq!(parse_ports("80,80,443"), Ok(vec![80, 443]));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("65536").is_err());
        assert!(parse_ports("18001").expect_err("own port").contains("own"));
        assert!(parse_ports("1,2,3,4,5,6,7,8,9").expect_err("too many").contains("at most 8"));
    }
}
