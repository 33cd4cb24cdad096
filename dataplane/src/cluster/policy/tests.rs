//! Unit tests of [`super`].
use super::*;
use serde_json::json;

fn policy(spec: Value) -> Arc<Policy> {
    match parse("shop", "p", &spec) {
        Parsed::Policy(p) => Arc::new(p),
        Parsed::Ignored(why) => panic!("ignored: {why}"),
    }
}

fn conn<'a>(principal: &'a str, source: &str, port: u16) -> Conn<'a> {
    Conn { principal, source: source.parse().expect("ip"), dst: SocketAddr::new([10, 0, 0, 9].into(), port) }
}

const WEB: &str = "cluster.local/ns/shop/sa/web";
const OPS: &str = "cluster.local/ns/ops/sa/agent";

#[test]
fn no_policy_allows_and_deny_comes_before_allow() {
    assert_eq!(decide(&[], &conn(WEB, "10.1.0.1", 80)), Ok(()));
    let allow_web = policy(json!({"rules": [{"from": [{"source": {"principals": [WEB]}}]}]}));
    let deny_port = policy(json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}));
    let both = [allow_web.clone(), deny_port];
    assert_eq!(decide(&both, &conn(WEB, "10.1.0.1", 80)), Ok(()));
    assert!(matches!(decide(&both, &conn(WEB, "10.1.0.1", 9090)), Err(Denied::ByPolicy(_))), "DENY first");
    assert!(matches!(decide(&both, &conn(OPS, "10.1.0.1", 80)), Err(Denied::NotAllowed(_))), "not allowed");
}

#[test]
fn sources_match_on_every_field_they_name_with_the_not_forms() {
    let p = policy(json!({"rules": [{"from": [{"source": {
        "namespaces": ["shop", "ops"], "notPrincipals": ["*/sa/agent"], "ipBlocks": ["10.1.0.0/16"],
        "notIpBlocks": ["10.1.9.9"]}}]}]}));
    let ok = |principal, src| decide(std::slice::from_ref(&p), &conn(principal, src, 80)).is_ok();
    assert!(ok(WEB, "10.1.0.1"));
    assert!(!ok(OPS, "10.1.0.1"), "notPrincipals (suffix pattern)");
    assert!(!ok(WEB, "10.2.0.1"), "outside ipBlocks");
    assert!(!ok(WEB, "10.1.9.9"), "notIpBlocks (an address alone)");
    assert!(!ok("cluster.local/ns/other/sa/web", "10.1.0.1"), "another namespace");
    // An ALLOW policy with no rules allows nothing; a rule with
    // nothing in it allows everything.
    assert!(decide(&[policy(json!({}))], &conn(WEB, "10.1.0.1", 80)).is_err());
    assert!(decide(&[policy(json!({"rules": [{}]}))], &conn(WEB, "10.1.0.1", 80)).is_ok());
    // Ports, and their not form.
    let p = policy(json!({"rules": [{"to": [{"operation": {"ports": ["80", "8080"], "notPorts": ["8080"]}}]}]}));
    let port = |n| decide(std::slice::from_ref(&p), &conn(WEB, "10.1.0.1", n)).is_ok();
    assert!(port(80) && !port(8080) && !port(9090));
}

#[test]
fn l7_is_never_half_applied() {
    // An ALLOW rule that needs HTTP allows nothing (it would allow
    // more if its L7 part were dropped).
    let allow = policy(
        json!({"rules": [{"from": [{"source": {"principals": [WEB]}}], "to": [{"operation": {"methods": ["GET"]}}]}]}),
    );
    assert_eq!(allow.unsupported, ["rules[0].to.operation.methods"]);
    assert!(decide(&[allow], &conn(WEB, "10.1.0.1", 80)).is_err());
    // A DENY rule that needs HTTP denies by its L4 fields (it would deny
    // less if it were dropped).
    let deny = policy(json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["ops"]}}],
        "to": [{"operation": {"paths": ["/admin"]}}], "when": [{"key": "request.headers[x]", "values": ["y"]}]}]}));
    assert_eq!(deny.unsupported.len(), 2);
    assert!(decide(std::slice::from_ref(&deny), &conn(OPS, "10.1.0.1", 80)).is_err());
    assert!(decide(&[deny], &conn(WEB, "10.1.0.1", 80)).is_ok());
    // Not applied at all, with the reason.
    for spec in [json!({"action": "AUDIT"}), json!({"action": "CUSTOM"}), json!({"targetRefs": [{"name": "w"}]})] {
        assert!(matches!(parse("shop", "p", &spec), Parsed::Ignored(_)), "{spec}");
    }
}

#[test]
fn selectors_and_bad_input() {
    let p = policy(json!({"selector": {"matchLabels": {"app": "db"}}}));
    let labels = |app: &str| [("app".to_string(), app.to_string())].into();
    assert!(p.selects("shop", &labels("db")) && !p.selects("shop", &labels("web")) && !p.selects("ops", &labels("db")));
    assert!(policy(json!({})).selects("shop", &BTreeMap::new()), "no selector: the whole namespace");
    // What does not parse refuses everything to the pods it selects
    // (its namespace, when the selector itself is bad): never skipped.
    for bad in [
        json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
        json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
        json!({"rules": [{"from": [{"source": {"principals": "x"}}]}]}),
        json!({"selector": {"matchLabels": {"app": 3}}}),
    ] {
        let p = policy(bad.clone());
        assert_eq!(p.action, Action::Deny, "{bad}");
        assert!(p.unsupported[0].starts_with("malformed"), "{bad}: {:?}", p.unsupported);
        assert!(decide(&[p], &conn(WEB, "10.1.0.1", 80)).is_err(), "{bad}");
    }
    assert_eq!(policy(json!({"selector": {"matchLabels": {"app": "db"}}, "rules": 3})).selector, Some(labels("db")));
}
