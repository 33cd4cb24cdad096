//! Bad command lines and configurations: one line on stderr naming the flag
//! and the reason, exit code 2, never a panic. No privileges needed: every
//! case fails before anything touches the host.
use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane"))
        .args(args)
        .env_remove("RUST_LOG")
        .envs(std::env::vars().filter(|(k, _)| k.starts_with("DATAPLANE_")).map(|(k, _)| (k, String::new())))
        .output()
        .expect("running dataplane");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_command_lines_get_one_line_naming_the_flag() {
    let certs = std::env::temp_dir().join(format!("dp-cli-certs-{}", std::process::id()));
    let certs_s = certs.display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--capture-cidr", "banana", "--certs", "/x"], "--capture-cidr"),
        (&["run", "--capture-cidr", "10.0.0.1/8", "--certs", "/x"], "10.0.0.0/8"),
        (&["run", "--capture-cidr", "10.0.0.0/8"], "--certs"),
        (&["run", "--certs", "/x"], "--capture-cidr"),
        (&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--exclude-port", "70000"], "--exclude-port"),
        (&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--cores", "zero"], "--cores"),
        (&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--idle-timeout", "soon"], "--idle-timeout"),
        (&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--tcp-keepalive", "never"], "--tcp-keepalive"),
        (
            &["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--metrics-token-file", "/nonexistent/token"],
            "--metrics-token-file",
        ),
        (
            &["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--tcp-keepalive", "10ms", "--check-config"],
            "--tcp-keepalive",
        ),
        (&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--bypass-mark", "banana"], "--bypass-mark"),
        (&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--no-such-flag"], "--no-such-flag"),
        (&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--admin", "localhost"], "--admin"),
        (
            &["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--handshake-timeout", "0s", "--check-config"],
            "--handshake-timeout",
        ),
        (&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--cores", "0", "--check-config"], "--cores"),
        (
            &["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--map-entries", "0", "--check-config"],
            "--map-entries",
        ),
        (&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/x", "--workload-cgroup", "/proc"], "--workload-cgroup"),
        (
            &["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/nonexistent", "--workload-cgroup", "/proc"],
            "--workload-cgroup",
        ),
        (&["ca", "issue", "--dir", &certs_s, "--ip", "not-an-ip"], "--ip"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, flag) in cases {
        let (code, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}: exit code, stderr: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: one line, got:\n{stderr}");
        assert!(stderr.contains(flag), "{args:?}: names {flag}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_and_version_still_work() {
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane")).args(["run", "--help"]).output().expect("help");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--capture-cidr"));
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane")).arg("--version").output().expect("version");
    assert!(out.status.success());
}

#[test]
fn a_missing_certificate_directory_is_named() {
    // A real cgroup v2 directory is needed to get past that check: use the
    // mount itself when there is one; otherwise this case cannot be reached.
    let Some(root) = std::fs::read_to_string("/proc/mounts").ok().and_then(|m| {
        m.lines()
            .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
    }) else {
        assert!(std::env::var("CI").unwrap_or_default().is_empty(), "cgroup v2 is needed under CI");
        return;
    };
    let (code, stderr) =
        run(&["run", "--capture-cidr", "10.0.0.0/8", "--certs", "/nonexistent-certs", "--workload-cgroup", &root]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.starts_with("error: --certs: /nonexistent-certs/ca.crt"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}
