//! Certificates issued inside the cluster, against the real kernel and the
//! test API server: `dataplane issuer` signs node CAs through
//! CertificateSigningRequests, two node agents mint their pods' certificates
//! in memory, and pods on the two nodes talk over mutual TLS.
use std::{
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use testworld::{
    apiserver::{namespace, node, pod, User},
    client, dataplane_binary, eventually, http_get, metric, server, two_pods, ApiServer, Certs, Cgroup, Dataplane,
    Netns, NetnsDir, Proc,
};

const MESH: &str = "dataplane.dev/mesh";
const AGENT_NS: &str = "dataplane-system";
const AGENT: &str = "dataplane";

fn metrics(dp: &Dataplane) -> String {
    http_get(&dp.admin(), "/metrics").map(|(_, t)| t).unwrap_or_default()
}

fn counter(dp: &Dataplane, name: &str) -> f64 {
    metric(&metrics(dp), name).unwrap_or(-1.0)
}

/// `dataplane issuer` as the issuer Deployment runs it: the root from
/// `root`'s directory, or (`None`) kept in a Secret it makes itself.
fn issuer(api: &ApiServer, root: Option<&Certs>, max_lifetime: &str) -> Proc {
    let kc = api.kubeconfig_as("issuer", User::service_account_on(AGENT_NS, "dataplane-issuer", "node-c"));
    let mut cmd = Command::new(dataplane_binary());
    cmd.args(["issuer", "--kubeconfig", &kc, "--max-lifetime", max_lifetime]);
    if let Some(root) = root {
        cmd.args(["--ca-dir", &root.path()]);
    }
    cmd.env("RUST_LOG", "info");
    let mut p = Proc::spawn(cmd, "issuer");
    p.wait_for("issuer watching", Duration::from_secs(20));
    p
}

/// One node: its agent's own kubeconfig (a pod-bound token for that node),
/// its namespace directory and workload cgroup.
struct NodeAgent {
    dp: Dataplane,
    workload: Cgroup,
    _own: Cgroup,
    _dir: NetnsDir,
}

fn agent(t: &str, api: &ApiServer, bundle: &str, name: &str, pods: &[&Netns], extra: &[&str]) -> NodeAgent {
    let (workload, own, dir) = (
        Cgroup::new(t, &format!("w{name}")),
        Cgroup::new(t, &format!("d{name}")),
        NetnsDir::new(&format!("{t}-{name}")),
    );
    for p in pods {
        dir.add(p);
    }
    let kc = api.kubeconfig_as(&format!("agent-{name}"), User::service_account_on(AGENT_NS, AGENT, name));
    let mut more = vec!["--node-ca", "--trust-bundle", bundle];
    more.extend_from_slice(extra);
    let args = testworld::node_args(&kc, name, &dir, &workload, &more);
    NodeAgent { dp: Dataplane::start(&own, &args), workload, _own: own, _dir: dir }
}

/// The cluster: node-a hosts 10.77.0.0/31 (pod a, 10.77.0.1), node-b
/// 10.77.0.2/31 (pod b, 10.77.0.2), both in an opted-in namespace.
fn cluster(api: &ApiServer) {
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    api.put("nodes", node("node-a", &["10.77.0.0/31"]));
    api.put("nodes", node("node-b", &["10.77.0.2/31"]));
    api.put("pods", pod("shop", "a", "node-a", Some("10.77.0.1"), json!({}), json!({})));
    api.put("pods", pod("shop", "b", "node-b", Some("10.77.0.2"), json!({}), json!({})));
}

/// The cluster with a root of the test's own (so the test can mint what a
/// node could) and its issuer (node CAs living `max_lifetime`), and the two
/// pods, not served yet.
struct Rooted {
    api: ApiServer,
    root: Certs,
    issuer: Proc,
    a: Netns,
    b: Netns,
    /// The trust bundle, as the agents mount it.
    bundle: String,
}

fn rooted(t: &str, max_lifetime: &str) -> Rooted {
    let api = ApiServer::start(t);
    cluster(&api);
    let root = Certs::new(t, &[]);
    let issuer = issuer(&api, Some(&root), max_lifetime);
    let (a, b, _) = two_pods(t);
    let bundle = root.dir.join("ca.crt").display().to_string();
    Rooted { api, root, issuer, a, b, bundle }
}

fn condition(csr: &Value) -> (String, String) {
    let c = &csr["status"]["conditions"][0];
    (c["type"].as_str().unwrap_or_default().to_string(), c["message"].as_str().unwrap_or_default().to_string())
}

#[test]
fn pods_on_two_nodes_talk_with_certificates_minted_on_their_nodes() {
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    cluster(&api);
    // No root anywhere yet: the issuer makes one, keeps it in its Secret
    // and publishes the trust bundle, which the kubelet would mount into
    // every agent (here: written to a file, as the mount shows it).
    let issuer_proc = issuer(&api, None, "1h");
    let secret = api.get("secrets", AGENT_NS, "dataplane-ca").expect("the root's Secret");
    assert!(secret["data"]["ca.key"].as_str().is_some_and(|k| !k.is_empty()));
    let bundle_map = api.get("configmaps", AGENT_NS, "dataplane-trust-bundle").expect("the trust bundle");
    let files = testworld::TempDir::new(&format!("dptest-bundle-{}", testworld::unique(t, "b"))).expect("dir");
    let bundle = files.0.join("ca.crt");
    fs::write(&bundle, bundle_map["data"]["ca.crt"].as_str().expect("ca.crt")).expect("bundle");
    let bundle = bundle.display().to_string();
    let (a, b, _) = two_pods(t);
    let _sa = server(&a, "0.0.0.0", 8080, "a");
    let _sb = server(&b, "0.0.0.0", 8080, "b");
    let node_a = agent(t, &api, &bundle, "node-a", &[&a], &[]);
    let node_b = agent(t, &api, &bundle, "node-b", &[&b], &[]);
    for n in [&node_a, &node_b] {
        assert!(eventually(Duration::from_secs(5), || metric(
            &metrics(&n.dp),
            "dataplane_namespaces{state=\"served\"}"
        ) == Some(1.0)));
    }
    let ab = client(&a, Some(&node_a.workload), "10.77.0.2", 8080, &[]);
    assert_eq!((ab[0].peer.as_str(), ab[0].server.as_str()), ("127.0.0.1:18000", "b"), "node-a to node-b");
    let ba = client(&b, Some(&node_b.workload), "10.77.0.1", 8080, &[]);
    assert_eq!((ba[0].peer.as_str(), ba[0].server.as_str()), ("127.0.0.1:18000", "a"), "node-b to node-a");
    // Each side counts the connection by the workload at the other end.
    let by_peer = |n: &NodeAgent, direction: &str| {
        let series = format!(
            "dataplane_workload_connections_total{{direction=\"{direction}\",peer_namespace=\"shop\",\
             peer_service_account=\"default\",outcome=\"completed\"}}"
        );
        metric(&metrics(&n.dp), &series).unwrap_or(0.0)
    };
    assert!(eventually(Duration::from_secs(3), || by_peer(&node_b, "inbound") >= 1.0), "{}", metrics(&node_b.dp));
    assert!(eventually(Duration::from_secs(3), || by_peer(&node_a, "outbound") >= 1.0), "{}", metrics(&node_a.dp));

    // One node CA per node, approved and signed once: the issuer does not
    // sign again on the event of its own approval (the API server refuses
    // to replace a certificate, and the issuer would log an error).
    let said = issuer_proc.output();
    assert!(!said.iter().any(|l| l.contains("ERROR") || l.contains("422")), "{said:#?}");
    let csrs = api.all("certificatesigningrequests");
    assert_eq!(csrs.len(), 2, "{csrs:#?}");
    for csr in &csrs {
        assert_eq!(condition(csr).0, "Approved", "{csr:#}");
        assert!(csr["status"]["certificate"].as_str().is_some_and(|c| !c.is_empty()));
        assert_eq!(csr["spec"]["signerName"], "dataplane.dev/node-ca");
    }
    for n in [&node_a, &node_b] {
        assert_eq!(counter(&n.dp, "dataplane_node_ca_issued_total"), 1.0);
        assert!(counter(&n.dp, "dataplane_pod_certificates_minted_total") >= 1.0);
    }
    // No key anywhere on disk: the agents were given no certificate
    // directory, the only file we wrote is the public bundle, and the
    // issuer restarted keeps the root it made.
    let listed: Vec<String> =
        fs::read_dir(&files.0).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(listed, ["ca.crt"]);
    let dp_out = node_a.dp.proc.output().join("\n");
    assert!(!dp_out.contains("PRIVATE KEY"), "no key in the logs either");
    drop(issuer_proc);
    let _again = issuer(&api, None, "1h");
    assert_eq!(api.get("secrets", AGENT_NS, "dataplane-ca").expect("Secret")["data"], secret["data"], "same root");
    let again = api.get("configmaps", AGENT_NS, "dataplane-trust-bundle").expect("bundle");
    assert_eq!(again["data"], bundle_map["data"], "the bundle unchanged");
}

/// The trust bundle the issuer published, written to a file as the
/// kubelet would mount it.
fn bundle_file(t: &str, api: &ApiServer) -> (testworld::TempDir, String) {
    let bundle_map = api.get("configmaps", AGENT_NS, "dataplane-trust-bundle").expect("the trust bundle");
    let files = testworld::TempDir::new(&format!("dptest-bundle-{}", testworld::unique(t, "b"))).expect("dir");
    let bundle = files.0.join("ca.crt");
    fs::write(&bundle, bundle_map["data"]["ca.crt"].as_str().expect("ca.crt")).expect("bundle");
    let bundle = bundle.display().to_string();
    (files, bundle)
}

#[test]
fn dual_stack_pods_get_one_certificate_for_both_addresses_and_talk_over_both_families() {
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    api.put("namespaces", namespace("shop", json!({MESH: "enabled"})));
    // Each node holds an IPv4 and an IPv6 pod CIDR: its node CA is
    // constrained to both.
    api.put("nodes", node("node-a", &["10.77.0.0/31", "fd00:77::/127"]));
    api.put("nodes", node("node-b", &["10.77.0.2/31", "fd00:77::2/127"]));
    for (name, on, v4, v6) in [("a", "node-a", "10.77.0.1", "fd00:77::1"), ("b", "node-b", "10.77.0.2", "fd00:77::2")] {
        let mut p = pod("shop", name, on, Some(v4), json!({}), json!({}));
        p["status"]["podIPs"] = json!([{"ip": v4}, {"ip": v6}]);
        api.put("pods", p);
    }
    let _issuer = issuer(&api, None, "1h");
    let (_files, bundle) = bundle_file(t, &api);
    let (a, b, b_if) = two_pods(t);
    let a_if = format!("v{}", &b.name[..b.name.len().min(14)]);
    a.ip(&["-6", "addr", "add", "fd00:77::1/64", "dev", &a_if, "nodad"]);
    let _sa = server(&a, "::", 8080, "a");
    let _sb = server(&b, "::", 8080, "b");
    let node_a = agent(t, &api, &bundle, "node-a", &[&a], &[]);
    let node_b = agent(t, &api, &bundle, "node-b", &[&b], &[]);
    let in_state = |n: &NodeAgent, state: &str| {
        metric(&metrics(&n.dp), &format!("dataplane_namespaces{{state=\"{state}\"}}")) == Some(1.0)
    };
    assert!(eventually(Duration::from_secs(5), || in_state(&node_a, "served")), "{}", metrics(&node_a.dp));
    // The CNI has given b its IPv4 address only: b is not served until its
    // IPv6 one, which the API already shows, is there too (served now, it
    // would have no IPv6 listeners).
    assert!(eventually(Duration::from_secs(5), || in_state(&node_b, "waiting_for_address")), "{}", metrics(&node_b.dp));
    b.ip(&["-6", "addr", "add", "fd00:77::2/64", "dev", &b_if, "nodad"]);
    assert!(eventually(Duration::from_secs(5), || in_state(&node_b, "served")), "{}", metrics(&node_b.dp));

    for (host, family) in [("fd00:77::2", "IPv6"), ("10.77.0.2", "IPv4")] {
        let s = client(&a, Some(&node_a.workload), host, 8080, &[]);
        assert_eq!(s[0].server, "b", "node-a to node-b over {family}: {s:?}");
    }
    let s = client(&b, Some(&node_b.workload), "fd00:77::1", 8080, &[]);
    assert_eq!((s[0].peer.as_str(), s[0].server.as_str()), ("[::1]:18000", "a"), "node-b to node-a over IPv6");
    assert!(s[0].server_saw.starts_with("[fd00:77::2]:"), "a sees b's IPv6 address: {s:?}");
    // One minted certificate per pod, for both its addresses.
    for n in [&node_a, &node_b] {
        assert_eq!(counter(&n.dp, "dataplane_pod_certificates_minted_total"), 1.0, "{}", metrics(&n.dp));
    }
}

#[test]
fn the_issuer_denies_every_request_it_cannot_prove() {
    let t = testworld::kernel_test!();
    let api = ApiServer::start(t);
    cluster(&api);
    api.put("nodes", node("node-bare", &[]));
    let root = Certs::new(t, &[]);
    let _issuer = issuer(&api, Some(&root), "1h");
    let request = |cn_node: &str, annotations: Value| {
        let (_, pem) = dataplane::identity::pki::node_request(cn_node).expect("request");
        json!({
            "metadata": {"annotations": annotations},
            "spec": {
                "request": base64_encode(pem.as_bytes()),
                "signerName": "dataplane.dev/node-ca",
                "usages": ["cert sign", "digital signature"],
            }
        })
    };
    let agent_on = |n: &str| User::service_account_on(AGENT_NS, AGENT, n);
    let cases: Vec<(&str, User, Value, &str)> = vec![
        (
            "another service account",
            User::service_account_on("shop", "web", "node-a"),
            request("node-a", json!({})),
            "not by the node agent",
        ),
        ("another node", agent_on("node-b"), request("node-a", json!({})), "runs on node node-b"),
        (
            "wider constraints",
            agent_on("node-b"),
            request("node-b", json!({"dataplane.dev/pod-cidrs": "10.77.0.0/16"})),
            "wider than",
        ),
        ("CA:true without constraints", agent_on("node-bare"), request("node-bare", json!({})), "no spec.podCIDRs"),
        (
            "a token bound to no node",
            User { username: format!("system:serviceaccount:{AGENT_NS}:{AGENT}"), ..User::default() },
            request("node-a", json!({"x": "1"})),
            "pod-bound token",
        ),
    ];
    let mut names = Vec::new();
    for (i, (what, user, csr, _)) in cases.iter().enumerate() {
        let mut csr = csr.clone();
        csr["metadata"]["name"] = json!(format!("test-{i}"));
        let created = api.create_as(user, "certificatesigningrequests", csr).unwrap_or_else(|e| panic!("{what}: {e}"));
        names.push(created["metadata"]["name"].as_str().expect("name").to_string());
    }
    for ((what, _, _, why), name) in cases.iter().zip(&names) {
        let mut last = json!(null);
        let denied = eventually(Duration::from_secs(10), || {
            last = api.get("certificatesigningrequests", "", name).unwrap_or_default();
            condition(&last).0 == "Denied"
        });
        assert!(denied, "{what}: {last:#}");
        let (_, message) = condition(&last);
        assert!(message.contains(why), "{what}: the reason is written: {message}");
        assert!(last["status"]["certificate"].is_null(), "{what}: nothing signed");
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A leaf for `ip` carrying `spiffe`, minted by a node CA for `node`'s
/// `cidr` signed by the cluster `root` (what a node holding that node CA,
/// compromised, could make): the chain and key as PEM files.
fn node_made(
    t: &str,
    root: &Certs,
    (node, cidr): (&str, &str),
    ip: &str,
    spiffe: &str,
) -> (testworld::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let key_pem = fs::read_to_string(root.dir.join("ca.key")).expect("root key");
    let root_key = rcgen::KeyPair::from_pem(&key_pem).expect("key");
    let root_issuer =
        rcgen::Issuer::from_ca_cert_pem(&fs::read_to_string(root.dir.join("ca.crt")).expect("root"), root_key)
            .expect("issuer");
    let (node_key, request) = dataplane::identity::pki::node_request(node).expect("request");
    let grant = dataplane::identity::pki::Grant {
        node: node.into(),
        cidrs: vec![cidr.parse().expect("net")],
        lifetime: Duration::from_secs(3600),
    };
    let node_ca = dataplane::identity::pki::sign_node_ca(&request, &grant, &root_issuer).expect("node CA");
    let ca = dataplane::identity::pki::NodeCa::new(node_key, &node_ca, dataplane::identity::pki::KeyType::P256)
        .expect("node CA");
    let (chain, key, _) = ca.mint(&[ip.parse().expect("ip")], spiffe, Duration::from_secs(600)).expect("mint");
    let files = testworld::TempDir::new(&format!("dptest-minted-{}", testworld::unique(t, "f"))).expect("dir");
    let pem = |der: &[u8], label: &str| {
        let b = base64_encode(der);
        let body: Vec<String> = b.as_bytes().chunks(64).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", body.join("\n"))
    };
    let chain_pem: String = chain.iter().map(|c| pem(c.as_ref(), "CERTIFICATE")).collect();
    let (crt, keyf) = (files.0.join("leaf.crt"), files.0.join("leaf.key"));
    fs::write(&crt, chain_pem).expect("chain");
    fs::write(&keyf, pem(key.secret_der(), "PRIVATE KEY")).expect("key");
    (files, crt, keyf)
}

#[test]
fn a_node_speaks_only_for_the_identities_the_api_gives_its_pods() {
    let t = testworld::kernel_test!();
    let Rooted { api, root, issuer: _issuer, a, b, bundle } = rooted(t, "1h");
    let _sa = server(&a, "0.0.0.0", 8080, "a");
    let node_a = agent(t, &api, &bundle, "node-a", &[&a], &[]);
    assert!(eventually(Duration::from_secs(5), || metric(
        &metrics(&node_a.dp),
        "dataplane_namespaces{state=\"served\"}"
    ) == Some(1.0)));
    // A compromised node-b: its genuine node CA (for 10.77.0.2/31, signed
    // by the root), its own pod's address, and the identity of a service
    // account the API does not give that pod.
    let tunnel = |spiffe: &str| {
        let (_files, crt, key) = node_made(t, &root, ("node-b", "10.77.0.2/31"), "10.77.0.2", spiffe);
        let args = ["tls", "10.77.0.1", "18001", &bundle, &crt.display().to_string(), &key.display().to_string()];
        testworld::peer(&b, None, &[&args[..], &["10.77.0.1:8080"]].concat())[0].clone()
    };
    let admin = tunnel(&dataplane::identity::pki::spiffe_id("cluster.local", "kube-system", "admin"));
    assert!(admin["reply"].as_str().is_none_or(|r| !r.contains("\"a\"")), "nothing reached pod a: {admin}");
    let mismatches = || {
        metric(
            &metrics(&node_a.dp),
            "dataplane_connections_failed_total{direction=\"inbound\",side=\"downstream\",reason=\"identity_mismatch\"}",
        )
    };
    assert!(eventually(Duration::from_secs(3), || mismatches() == Some(1.0)), "{}", metrics(&node_a.dp));
    // The identity the API shows for pod b (shop's default account): in.
    let own = tunnel(&dataplane::identity::pki::spiffe_id("cluster.local", "shop", "default"));
    assert!(own["reply"].as_str().is_some_and(|r| r.contains("\"a\"")), "pod a answers: {own}");

    // And the other way: a server at pod b's address presenting another
    // identity (node-b's CA again) is refused by node-a before any byte
    // of a's reaches an application.
    let (_files, crt, key) = node_made(
        t,
        &root,
        ("node-b", "10.77.0.2/31"),
        "10.77.0.2",
        &dataplane::identity::pki::spiffe_id("cluster.local", "kube-system", "admin"),
    );
    let (crt, key) = (crt.display().to_string(), key.display().to_string());
    let fake =
        testworld::server_with(&b, &["tls-serve", "10.77.0.2", "18001", &bundle, &crt, &key], "a server posing as b");
    let out = testworld::peer(&a, Some(&node_a.workload), &["expect-reset", "10.77.0.2", "8080"]);
    assert!(out[0]["result"] == "reset" || out[0]["result"] == "eof", "refused: {out:?}");
    let upstream = metric(
        &metrics(&node_a.dp),
        "dataplane_connections_failed_total{direction=\"outbound\",side=\"upstream\",reason=\"identity_mismatch\"}",
    );
    assert_eq!(upstream, Some(1.0), "{}", metrics(&node_a.dp));
    drop(fake);
}

#[test]
fn authorization_policies_decide_who_may_talk_to_whom() {
    let t = testworld::kernel_test!();
    let Rooted { api, root: _root, issuer: _issuer, a, b, bundle } = rooted(t, "1h");
    api.put("pods", pod("shop", "b", "node-b", Some("10.77.0.2"), json!({"app": "db"}), json!({})));
    let _db = [server(&b, "0.0.0.0", 8080, "b"), server(&b, "0.0.0.0", 9090, "b-admin")];
    let node_a = agent(t, &api, &bundle, "node-a", &[&a], &[]);
    let node_b = agent(t, &api, &bundle, "node-b", &[&b], &[]);
    for n in [&node_a, &node_b] {
        let served = || metric(&metrics(&n.dp), "dataplane_namespaces{state=\"served\"}") == Some(1.0);
        assert!(eventually(Duration::from_secs(5), served));
    }
    // Pod a is shop's default service account; pod b is app=db.
    let reaches = |port: u16| {
        let out = testworld::peer(&a, Some(&node_a.workload), &["expect-reset", "10.77.0.2", &port.to_string()]);
        out[0]["result"] == "data"
    };
    assert!(reaches(8080) && reaches(9090), "no policy: all allowed");
    let denied = || {
        metric(
            &metrics(&node_b.dp),
            "dataplane_connections_failed_total{direction=\"inbound\",side=\"downstream\",reason=\"policy_denied\"}",
        )
        .unwrap_or(0.0)
    };
    let policy = |name: &str, spec: Value| {
        api.put("authorizationpolicies", testworld::apiserver::authorization_policy("shop", name, spec))
    };

    // Only the frontend's account may reach db: a may not.
    policy(
        "db",
        json!({"selector": {"matchLabels": {"app": "db"}},
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]}]}),
    );
    assert!(eventually(Duration::from_secs(5), || !reaches(8080)), "refused once the policy is in");
    assert!(denied() >= 1.0, "counted on the destination's node: {}", metrics(&node_b.dp));
    // a's account, on the application's port only.
    policy(
        "db",
        json!({"selector": {"matchLabels": {"app": "db"}},
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/default"]}}],
                          "to": [{"operation": {"ports": ["8080"]}}]}]}),
    );
    assert!(eventually(Duration::from_secs(5), || reaches(8080)), "allowed by principal and port");
    assert!(!reaches(9090), "not the admin port");
    // A DENY by address comes first, whatever ALLOW says.
    policy("no-a", json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.77.0.1/32"]}}]}]}));
    assert!(eventually(Duration::from_secs(5), || !reaches(8080)), "denied by address");
    // A policy that needs HTTP is applied the safe way, and said so.
    api.delete("authorizationpolicies", "shop", "no-a");
    policy(
        "db",
        json!({"selector": {"matchLabels": {"app": "db"}},
               "rules": [{"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}]}),
    );
    assert!(eventually(Duration::from_secs(5), || node_b.dp.proc.output().iter().any(|l| l.contains("methods"))));
    assert!(!reaches(8080), "an ALLOW rule naming HTTP methods allows nothing");
    // Gone: all allowed again.
    api.delete("authorizationpolicies", "shop", "db");
    assert!(eventually(Duration::from_secs(5), || reaches(8080) && reaches(9090)));

    // A connection already open that a new policy refuses is closed, as
    // ztunnel closes it.
    let before = denied();
    let open = testworld::open_quiet(&a, Some(&node_a.workload), "10.77.0.2", 8080, 30);
    policy("no-a", json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.77.0.1/32"]}}]}]}));
    let ended = testworld::how_it_ended(open, Duration::from_secs(40));
    assert!(ended["result"] == "eof" || ended["result"] == "reset", "closed: {ended}");
    assert!(denied() > before, "counted: {}", metrics(&node_b.dp));
}

#[test]
fn a_node_ca_minting_for_another_nodes_address_is_refused() {
    let t = testworld::kernel_test!();
    let Rooted { api, root, issuer: _issuer, a, b, bundle } = rooted(t, "1h");
    let _sa = server(&a, "0.0.0.0", 8080, "a");
    let node_a = agent(t, &api, &bundle, "node-a", &[&a], &[]);

    // A compromised node-a: a genuine node CA for its own 10.77.0.0/31,
    // signed by the cluster root, minting a certificate for node-b's pod
    // address 10.77.0.2. Presented from that very address to pod a.
    let spiffe = dataplane::identity::pki::spiffe_id("cluster.local", "shop", "default");
    let (_files, crt, keyf) = node_made(t, &root, ("node-a", "10.77.0.0/31"), "10.77.0.2", &spiffe);
    let bundle = root.dir.join("ca.crt");
    let failed_before = metrics(&node_a.dp);
    let out = testworld::peer(
        &b,
        None,
        &[
            "tls",
            "10.77.0.1",
            "18001",
            &bundle.display().to_string(),
            &crt.display().to_string(),
            &keyf.display().to_string(),
            "10.77.0.1:8080",
        ],
    );
    let seen = &out[0];
    let refused = seen["handshake"] != "ok" || seen["reply"].is_null() || seen["error"].is_string();
    assert!(refused, "the forged certificate gets nowhere: {seen}");
    assert!(seen["reply"].as_str().is_none_or(|r| !r.contains("a")), "nothing reached pod a: {seen}");
    let failures = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("dataplane_connections_failed_total{") && l.contains("direction=\"inbound\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        eventually(Duration::from_secs(3), || failures(&metrics(&node_a.dp)) > failures(&failed_before)),
        "counted: {}",
        metrics(&node_a.dp)
    );
    // Refused for the constraint, not for anything else.
    assert!(
        node_a.dp.proc.output().iter().any(|l| l.contains("NameConstraintViolation") && l.contains("bad_certificate")),
        "{:#?}",
        node_a.dp.proc.output()
    );
    drop(b);
}

#[test]
fn certificates_rotate_every_few_seconds_without_a_failed_handshake() {
    let t = testworld::kernel_test!();
    // Node CAs live 6 s (renewed at 4 s), pod certificates 2 s.
    let Rooted { api, root, issuer: mut iss, a, b, bundle } = rooted(t, "6s");
    let _sb = server(&b, "0.0.0.0", 8080, "b");
    let node_a = agent(t, &api, &bundle, "node-a", &[&a], &["--pod-cert-lifetime", "2s", "--no-tls-resumption"]);
    let node_b = agent(t, &api, &bundle, "node-b", &[&b], &["--pod-cert-lifetime", "2s", "--no-tls-resumption"]);
    let start = Instant::now();
    let mut done = 0;
    let mut restarted = false;
    // For 16 s and more than 50 connections (a busy machine's clients take
    // longer: the run goes on until both hold, for at most 90 s), at most
    // 400: every one a full mutual handshake across renewals; the issuer
    // restarts half-way.
    let enough = |done: usize, restarted: bool| restarted && done > 50 && start.elapsed() >= Duration::from_secs(16);
    while done < 400 && !enough(done, restarted) && start.elapsed() < Duration::from_secs(90) {
        let seen = client(&a, Some(&node_a.workload), "10.77.0.2", 8080, &[]);
        assert_eq!((seen[0].peer.as_str(), seen[0].server.as_str()), ("127.0.0.1:18000", "b"), "connection {done}");
        done += 1;
        if !restarted && start.elapsed() > Duration::from_secs(7) {
            iss.signal("KILL");
            iss.wait(Duration::from_secs(5));
            iss = issuer(&api, Some(&root), "6s");
            restarted = true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(restarted && done > 50, "{done} connections");
    for n in [&node_a, &node_b] {
        let text = metrics(&n.dp);
        let issued = metric(&text, "dataplane_node_ca_issued_total").unwrap_or(0.0);
        assert!(issued >= 3.0, "node CA renewed several times: {text}");
        assert!(metric(&text, "dataplane_pod_certificates_minted_total").unwrap_or(0.0) >= 6.0, "{text}");
        let failed: f64 = text
            .lines()
            .filter(|l| l.starts_with("dataplane_connections_failed_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(failed, 0.0, "no failed connection: {text}");
    }
    println!("{done} connections across renewals in {:?}", start.elapsed());
}
