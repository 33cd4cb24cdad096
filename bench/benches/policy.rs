//! What an authorization policy decision costs a connection, with 1, 100
//! and 10,000 policies selecting its destination pod (the worst case: all in
//! its namespace, none with a selector, the one that allows it last; a
//! pod's policies are compiled per pod, so those of other namespaces and
//! selectors cost nothing here). Beside it, compiling the node's table
//! (every local pod's policies) after a change, with 50 local pods in 50
//! namespaces and the policies spread over 200 namespaces.
//!
//! `cargo bench -p bench --bench policy` (no root).
use std::{
    collections::BTreeMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dataplane::{
    cluster::model::{Change, Mode, Model, ObjectRef, Workload},
    cluster::policy::{self, Parsed, Policy},
};
use serde_json::json;

fn allow(ns: &str, i: usize, principal: &str) -> Arc<Policy> {
    let spec = json!({"rules": [{"from": [{"source": {"principals": [principal], "ipBlocks": ["10.0.0.0/8"]}}],
                                 "to": [{"operation": {"ports": ["8080"]}}]}]});
    match policy::parse(ns, &format!("p{i}"), &spec) {
        Parsed::Policy(p) => Arc::new(p),
        Parsed::Ignored(why) => panic!("{why}"),
    }
}

fn decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy: one connection decided");
    g.sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    let conn = policy::Conn {
        principal: "cluster.local/ns/shop/sa/frontend",
        source: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 9)), 8080),
    };
    for n in [1usize, 100, 10_000] {
        let mut policies: Vec<Arc<Policy>> =
            (0..n - 1).map(|i| allow("shop", i, &format!("cluster.local/ns/shop/sa/other-{i}"))).collect();
        policies.push(allow("shop", n, "cluster.local/ns/shop/sa/frontend"));
        assert!(policy::decide(&policies, &conn).is_ok());
        g.bench_function(BenchmarkId::new("decide", n), |b| b.iter(|| black_box(policy::decide(&policies, &conn))));
    }
    g.finish();
}

fn compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy: the node's table compiled");
    g.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    for n in [1usize, 100, 10_000] {
        let pods = (0..50).map(|i| Workload {
            namespace: format!("ns-{i}").into(),
            name: format!("pod-{i}").into(),
            service_account: "default".into(),
            addresses: vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + i))],
            local: true,
            netns: None,
            client_address: true,
            mode: Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![] },
            labels: BTreeMap::new(),
            strict: false,
        });
        let mut model = Model::new(pods.collect());
        model.apply((0..n).map(|i| {
            let ns = format!("ns-{}", i % 200);
            Change::Policy(ObjectRef::new(&ns, &format!("p{i}")), Some(allow(&ns, i, "cluster.local/ns/x/sa/y")))
        }));
        g.bench_function(BenchmarkId::new("policy_table", n), |b| b.iter(|| black_box(model.policy_table())));
    }
    g.finish();
}

criterion_group!(benches, decide, compile);
criterion_main!(benches);
