//! Unit tests of [`super`].
use super::*;
use clap::Parser;
use cli::{parse_cidr, parse_mark};

#[test]
fn a_namespaced_object_is_named_namespace_slash_name() {
    assert_eq!(parse_ns_name("dataplane-system/dataplane"), Ok(("dataplane-system".into(), "dataplane".into())));
    for bad in ["dataplane", "/x", "x/", "a/b/c", ""] {
        assert!(parse_ns_name(bad).is_err(), "{bad}");
    }
}
use clap::CommandFactory;

#[test]
fn cli_is_well_formed() {
    Cli::command().debug_assert();
}

#[test]
fn cidrs_are_checked() {
    assert_eq!(parse_cidr("10.0.0.0/8"), Ok("10.0.0.0/8".parse().expect("net")));
    assert!(parse_cidr("10.0.0.1/8").expect_err("host bits").contains("10.0.0.0/8"));
    assert!(parse_cidr("banana").is_err());
    assert!(parse_cidr("10.0.0.0/33").is_err());
}

#[test]
fn marks_take_hex_and_decimal() {
    assert_eq!(parse_mark("0x10"), Ok(16));
    assert_eq!(parse_mark("16"), Ok(16));
    assert!(parse_mark("-1").is_err());
}

#[test]
fn repeated_and_comma_separated_flags() {
    let cli = Cli::try_parse_from([
        "dataplane",
        "run",
        "--workload-cgroup",
        "/x",
        "--capture-cidr",
        "10.0.0.0/8,192.168.0.0/16",
        "--capture-cidr",
        "127.0.0.0/8",
        "--exclude-port",
        "22",
        "--cores",
        "1",
        "--certs",
        "/c",
    ])
    .expect("parses");
    let Command::Run(args) = cli.command else { panic!("run") };
    assert_eq!(args.capture_cidrs.len(), 3);
    assert_eq!(args.exclude_ports, vec![22]);
    assert_eq!(args.bypass_mark, DEFAULT_BYPASS_MARK);
}

#[test]
fn a_model_needs_its_companions_and_no_model_needs_a_cidr() {
    let check = |extra: &[&str]| {
        let mut argv = vec!["dataplane", "run", "--certs", "/c"];
        argv.extend_from_slice(extra);
        let Command::Run(args) = Cli::try_parse_from(argv).expect("parses").command else { panic!("run") };
        args.check_values().map_err(|e| e.to_string())
    };
    assert!(check(&[]).expect_err("nothing to capture").contains("--capture-cidr is required"));
    assert_eq!(check(&["--capture-cidr", "10.0.0.0/8"]), Ok(()));
    let kube = check(&["--kube", "--netns-dir", "/d"]).expect_err("no node");
    assert_eq!(kube, "--kube needs --node-name");
    assert_eq!(check(&["--kube", "--netns-dir", "/d", "--node-name", "n"]), Ok(()));
    assert_eq!(
        check(&["--kubeconfig", "/k", "--node-name", "n"]).expect_err("no dir"),
        "--kubeconfig needs --netns-dir"
    );
    assert_eq!(check(&["--workloads", "/w", "--netns-dir", "/d"]), Ok(()), "a file needs no node name");
    let cni = ["--cni-socket", "/run/dp/cni.sock"];
    let file = check(&[&["--workloads", "/w", "--netns-dir", "/d"][..], &cni].concat());
    assert_eq!(file.expect_err("a file cannot say a namespace's label"), "--cni-socket needs --kube or --kubeconfig");
    assert_eq!(check(&[&["--kube", "--netns-dir", "/d", "--node-name", "n"][..], &cni].concat()), Ok(()));
    let both = ["dataplane", "run", "--certs", "/c", "--kube", "--workloads", "/w"];
    assert!(Cli::try_parse_from(both).is_err(), "one source of the model");
}

#[test]
fn busy_poll_is_bounded() {
    let check = |value: &str| {
        let argv = ["dataplane", "run", "--certs", "/c", "--capture-cidr", "10.0.0.0/8", "--busy-poll", value];
        let Command::Run(args) = Cli::try_parse_from(argv).expect("parses").command else { panic!("run") };
        (args.busy_poll, args.check_values().map_err(|e| e.to_string()))
    };
    assert_eq!(check("50us"), (Some(Duration::from_micros(50)), Ok(())));
    assert_eq!(check("10ms"), (Some(Duration::from_millis(10)), Ok(())));
    for (value, err) in [("0s", "--busy-poll 0ns: "), ("11ms", "--busy-poll 11ms: ")] {
        let (_, got) = check(value);
        assert!(got.as_ref().is_err_and(|e| e.starts_with(err) && e.contains("at most 10ms")), "{value}: {got:?}");
    }
    let bad = ["dataplane", "run", "--certs", "/c", "--busy-poll", "fast"];
    assert!(Cli::try_parse_from(bad).is_err(), "not a duration");
}

#[test]
fn handshakes_per_source_are_bounded_by_the_executors_bound() {
    let check = |value: &str| {
        let argv = ["dataplane", "run", "--certs", "/c", "--capture-cidr", "10.0.0.0/8"];
        let argv = argv.into_iter().chain(["--max-handshakes-per-source", value]);
        let Command::Run(args) = Cli::try_parse_from(argv).expect("parses").command else { panic!("run") };
        (args.max_handshakes_per_source, args.check_values().map_err(|e| e.to_string()))
    };
    assert_eq!(check("1"), (1, Ok(())));
    assert_eq!(check("1024"), (1024, Ok(())));
    for value in ["0", "1025"] {
        let (_, got) = check(value);
        let want = format!("--max-handshakes-per-source {value}: must be 1 to 1024");
        assert!(got.as_ref().is_err_and(|e| e.starts_with(&want)), "{value}: {got:?}");
    }
    let argv = ["dataplane", "run", "--certs", "/c", "--capture-cidr", "10.0.0.0/8"];
    let Command::Run(args) = Cli::try_parse_from(argv).expect("parses").command else { panic!("run") };
    assert_eq!(args.max_handshakes_per_source, crate::proxy::conn::MAX_IN_FLIGHT_PER_SOURCE, "the default");
}

#[test]
fn a_missing_cgroup_is_named() {
    let cli = Cli::try_parse_from([
        "dataplane",
        "run",
        "--workload-cgroup",
        "/nonexistent",
        "--capture-cidr",
        "10.0.0.0/8",
        "--certs",
        "/c",
    ])
    .expect("parses");
    let Command::Run(args) = cli.command else { panic!("run") };
    let err = args.validate().expect_err("not a cgroup").to_string();
    assert!(err.starts_with("--workload-cgroup /nonexistent: "), "{err}");
}
