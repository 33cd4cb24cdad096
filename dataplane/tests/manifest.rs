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
