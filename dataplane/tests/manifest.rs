//! The Kubernetes manifest, checked offline: schema-valid under
//! `kubernetes-validate --strict`, and the container's arguments and
//! environment accepted by the binary's own configuration check, so the
//! manifest can never name a flag or a value that does not exist.
use std::process::Command;

fn manifest() -> String {
    format!("{}/../deployment.yaml", env!("CARGO_MANIFEST_DIR"))
}

/// Whether `python3 -m kubernetes_validate` is here; under CI its absence is
/// a failure.
fn tools() -> bool {
    let ok =
        Command::new("python3").args(["-c", "import kubernetes_validate, yaml"]).status().is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").unwrap_or_default().is_empty(),
            "python3 with kubernetes-validate is needed (scripts/deps installs it)"
        );
        eprintln!("SKIPPED: no kubernetes-validate");
    }
    ok
}

#[test]
fn the_manifest_is_schema_valid() {
    if !tools() {
        return;
    }
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(manifest())
        .output()
        .expect("kubernetes-validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for kind in ["namespace/", "serviceaccount/", "configmap/", "daemonset/"] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} validated: {text}");
    }
    // The AuthorizationPolicy CRD shipped for clusters without Istio.
    let crd = format!("{}/../deploy/authorizationpolicy-crd.yaml", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3").args(["-m", "kubernetes_validate", "--strict"]).arg(&crd).output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("customresourcedefinition/"), "{text}");
}

/// Runs `dataplane ARGS --check-config` with exactly the manifest's
/// environment (plus `extra_env`).
fn check(
    args: &[String],
    env: &serde_json::Map<String, serde_json::Value>,
    extra_env: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dataplane"));
    cmd.args(args).arg("--check-config");
    for (k, _) in std::env::vars() {
        if k.starts_with("DATAPLANE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v.as_str().expect("string env value"));
    }
    cmd.envs(extra_env.iter().copied());
    cmd.output().expect("running dataplane --check-config")
}

#[test]
fn the_binary_accepts_the_manifests_configuration() {
    if !tools() {
        return;
    }
    let script = format!("{}/../deploy/manifest_config.py", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3").arg(script).arg(manifest()).output().expect("manifest_config.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let args: Vec<String> =
        cfg["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg").to_string()).collect();
    let env = cfg["env"].as_object().expect("env");
    assert_eq!(args.first().map(String::as_str), Some("run"));

    let ok = check(&args, env, &[]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{}{}", stdout, String::from_utf8_lossy(&ok.stderr));
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(stdout.contains("from-spec.nodeName"), "the downward API's node name reached the binary: {stdout}");
    assert!(stdout.contains("kube: true"), "the API is the model's source: {stdout}");

    // The check is not vacuous: a misspelt setting, a bad value, an unknown flag.
    let typo = check(&args, env, &[("DATAPLANE_CAPTURE_CIDR", "10.0.0.0/8")]);
    assert_eq!(typo.status.code(), Some(2), "{}", String::from_utf8_lossy(&typo.stderr));
    assert!(String::from_utf8_lossy(&typo.stderr).contains("DATAPLANE_CAPTURE_CIDR: no such setting"));
    let bad = check(&args, env, &[("DATAPLANE_DRAIN_TIMEOUT", "soon")]);
    assert_eq!(bad.status.code(), Some(2));
    let mut unknown = args.clone();
    unknown.push("--no-such-flag".into());
    assert_eq!(check(&unknown, env, &[]).status.code(), Some(2));
}

#[test]
fn the_binary_accepts_the_issuers_configuration() {
    if !tools() {
        return;
    }
    let script = format!("{}/../deploy/manifest_config.py", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3").arg(script).arg(manifest()).arg("issuer").output().expect("manifest_config.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let args: Vec<String> =
        cfg["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg").to_string()).collect();
    assert_eq!(args.first().map(String::as_str), Some("issuer"));
    let ok = check(&args, cfg["env"].as_object().expect("env"), &[]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{}{}", stdout, String::from_utf8_lossy(&ok.stderr));
    assert!(
        stdout.contains("dataplane-system/dataplane")
            || stdout.contains("system:serviceaccount:dataplane-system:dataplane"),
        "{stdout}"
    );
    assert!(stdout.contains("dataplane-ca"), "the root is kept in its Secret: {stdout}");
}

/// The arguments and environment the manifest gives one container.
fn container(name: &str) -> (Vec<String>, serde_json::Map<String, serde_json::Value>) {
    let script = format!("{}/../deploy/manifest_config.py", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3").arg(script).arg(manifest()).arg(name).output().expect("manifest_config.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let args = cfg["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg").to_string()).collect();
    (args, cfg["env"].as_object().expect("env").clone())
}

#[test]
fn the_cni_install_container_chains_the_plugin_to_the_agents_socket() {
    if !tools() {
        return;
    }
    let (args, env) = container("cni-install");
    assert_eq!(args, ["cni", "install", "--watch"]);
    let (_, agent) = container("dataplane");
    let socket = agent.get("DATAPLANE_CNI_SOCKET").and_then(|v| v.as_str()).expect("the agent serves the plugin");
    assert_eq!(env.get("DATAPLANE_CNI_SOCKET").and_then(|v| v.as_str()), Some(socket), "one socket for both");
    // The meshed namespaces are kept beside it: on a disk, not a tmpfs, so
    // that after a reboot meshed pods wait for the agent too.
    assert!(!socket.starts_with("/var/run/") && !socket.starts_with("/run/"), "{socket} outlives a reboot");
    let shipped: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/dataplane-cni.json")).expect("deploy/dataplane-cni.json");
    assert_eq!(shipped["agentSocket"], socket, "the shipped entry names the same socket");
    // Both ask about the DaemonSet they are part of when they stop, and may.
    for e in [&env, &agent] {
        assert_eq!(e.get("DATAPLANE_DAEMONSET").and_then(|v| v.as_str()), Some("dataplane-system/dataplane"));
        assert_eq!(e.get("DATAPLANE_KUBE").and_then(|v| v.as_str()), Some("true"), "with the pod's token");
    }
    let rbac = Command::new("python3")
        .arg(format!("{}/../deploy/manifest_config.py", env!("CARGO_MANIFEST_DIR")))
        .arg(manifest())
        .arg("rbac")
        .output()
        .expect("manifest_config.py");
    let roles: Vec<serde_json::Value> = serde_json::from_slice(&rbac.stdout).expect("json");
    let may_read_it = roles.iter().any(|r| {
        r["subjects"] == serde_json::json!(["dataplane"])
            && r["rules"].as_array().into_iter().flatten().any(|rule| {
                rule["resources"] == serde_json::json!(["daemonsets"])
                    && rule["resourceNames"] == serde_json::json!(["dataplane"])
                    && rule["verbs"] == serde_json::json!(["get"])
            })
    });
    assert!(may_read_it, "the agents' account may read their own DaemonSet: {roles:?}");
    // The container's own settings, run once against a node of our own
    // making (its /host directories replaced): the entry names the socket.
    let node = std::env::temp_dir().join(format!("dp-manifest-cni-{}", std::process::id()));
    let (bin, conf) = (node.join("bin"), node.join("net.d"));
    std::fs::create_dir_all(&conf).expect("conf dir");
    let list = r#"{"cniVersion":"1.0.0","name":"k","plugins":[{"type":"bridge"}]}"#;
    std::fs::write(conf.join("10-k.conflist"), list).expect("primary");
    let plugin = node.join("plugin");
    std::fs::write(&plugin, b"binary").expect("plugin");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dataplane"));
    cmd.args(["cni", "install", "--plugin"]).arg(&plugin);
    for (k, v) in &env {
        cmd.env(k, v.as_str().expect("string env value"));
    }
    let out = cmd.env("DATAPLANE_CNI_BIN_DIR", &bin).env("DATAPLANE_CNI_CONF_DIR", &conf).output().expect("install");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let chained = std::fs::read_to_string(conf.join("10-k.conflist")).expect("list");
    let _ = std::fs::remove_dir_all(&node);
    assert!(chained.contains("dataplane-cni") && chained.contains(socket), "{chained}");
}

#[test]
fn only_the_issuer_may_read_the_root() {
    if !tools() {
        return;
    }
    let script = format!("{}/../deploy/manifest_config.py", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3").arg(script).arg(manifest()).arg("rbac").output().expect("manifest_config.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let roles: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    let grants = |role: &serde_json::Value, resource: &str, verb: &str| {
        role["rules"].as_array().into_iter().flatten().any(|r| {
            let has = |k: &str, v: &str| r[k].as_array().is_some_and(|a| a.iter().any(|x| x == v || x == "*"));
            has("resources", resource) && has("verbs", verb)
        })
    };
    let readers: Vec<String> = roles
        .iter()
        .filter(|r| ["get", "list", "watch"].iter().any(|v| grants(r, "secrets", v)))
        .map(|r| {
            format!("{}/{} -> {}", r["kind"].as_str().unwrap_or(""), r["name"].as_str().unwrap_or(""), r["subjects"])
        })
        .collect();
    assert_eq!(readers, [r#"Role/dataplane-issuer -> ["dataplane-issuer"]"#], "who may read Secrets");
    let issuer = roles.iter().find(|r| r["name"] == "dataplane-issuer" && r["kind"] == "Role").expect("issuer role");
    let named = issuer["rules"].as_array().expect("rules").iter().any(|r| {
        r["resources"].as_array().is_some_and(|a| a.iter().any(|x| x == "secrets"))
            && r["verbs"].as_array().is_some_and(|a| a.iter().any(|x| x == "get"))
            && r["resourceNames"] == serde_json::json!(["dataplane-ca"])
    });
    assert!(named, "the issuer may read its own Secret only: {issuer}");
    let agent = roles.iter().find(|r| r["name"] == "dataplane-node").expect("agent role");
    assert!(!grants(agent, "secrets", "get") && !grants(agent, "secrets", "list"), "{agent}");
    assert!(grants(agent, "certificatesigningrequests", "create"), "{agent}");
    assert!(!grants(agent, "signers", "approve"), "agents approve nothing: {agent}");
}
