//! The plugin binary as a container runtime runs it: `CNI_*` variables, the
//! configuration on standard input, the result or the error on standard
//! output, the exit code. (Also what makes `cargo test --workspace` build
//! the binary the kernel tests chain after the reference plugins.)
use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use serde_json::{json, Value};

fn run(command: &str, args: &str, stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dataplane-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_NETNS", "/var/run/netns/nope")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dataplane-cni runs");
    child.stdin.take().expect("stdin").write_all(stdin).expect("configuration written");
    child.wait_with_output().expect("output")
}

fn stdout(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn version_add_and_errors_speak_the_spec() {
    let out = run("VERSION", "", b"");
    assert!(out.status.success());
    assert!(stdout(&out)["supportedVersions"].as_array().is_some_and(|v| v.iter().any(|s| s == "1.0.0")));

    // No agent ever ran here (no socket, no namespace list): a pod passes,
    // its previous result unchanged.
    let dir = std::env::temp_dir().join(format!("dp-cni-binary-{}", std::process::id()));
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]});
    let config = json!({"cniVersion": "1.0.0", "name": "n", "type": "dataplane-cni",
                        "agentSocket": dir.join("cni.sock"), "prevResult": prev});
    let out = run("ADD", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web", config.to_string().as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out), prev);

    // The agent's list names the namespace: fail closed, CNI error 11.
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("cni.sock.namespaces"), b"[\"shop\"]").expect("list");
    let out = run("ADD", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web", config.to_string().as_bytes());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    assert_eq!(stdout(&out)["code"], json!(11));

    let out = run("ADD", "", b"{not json");
    assert!(!out.status.success());
    assert_eq!(stdout(&out)["code"], json!(6), "the configuration does not decode");
}
