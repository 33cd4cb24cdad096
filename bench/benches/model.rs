//! The control side's cost per watch event, at cluster sizes: one remote
//! pod changing (a new address, then back) in a model of N pods over 500
//! nodes, half of them meshed, with N/10 Services of 10 endpoints each.
//!
//! - `apply`: the model updated in place ([`Model::apply`]): what an event
//!   costs the control thread now. The pod is a Service's endpoint, and the
//!   executors hold the Service table in service, so the table is copied
//!   (its entries, not its frontends) as on a node;
//! - `rebuild`: the whole model built again from every pod and Service
//!   ([`Model::with_services`]: the meshed destinations and the Service
//!   table, as before, and the indexes, which before did not exist). Every
//!   batch of events cost this before the model became incremental, plus a
//!   comparison of the old and new models and a copy of every pod's labels
//!   and annotations on the watch thread, not counted here.
//!
//! `cargo bench -p bench --bench model` (no root).
use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dataplane::{
    cluster::model::{Change, Mode, Model, Outside, Workload},
    cluster::services::{Endpoint, Hint, Readiness, Service, ServicePort, Slice},
};

fn addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32 + 1))
}

fn pod(i: usize) -> Workload {
    Workload {
        namespace: format!("ns-{}", i % 200).into(),
        name: format!("pod-{i}").into(),
        service_account: "default".into(),
        addresses: vec![addr(i)],
        local: i.is_multiple_of(500),
        netns: None,
        client_address: true,
        mode: if (i % 200) < 100 {
            Mode::Meshed { skip_outbound: vec![], skip_inbound: vec![] }
        } else {
            Mode::Outside(Outside::NotOptedIn)
        },
        labels: Default::default(),
        strict: false,
    }
}

fn cluster(n: usize) -> (Vec<Workload>, Vec<Service>) {
    let pods: Vec<Workload> = (0..n).map(pod).collect();
    let services = (0..n / 10)
        .map(|s| Service {
            namespace: format!("ns-{}", s % 200),
            name: format!("svc-{s}"),
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + s as u32))],
            ports: vec![ServicePort { name: "http".into(), port: 80 }],
            client_ip_affinity: None,
            node_local: false,
            zone_hints: false,
            slices: vec![Slice {
                ports: vec![("http".into(), 8080)],
                endpoints: (0..10)
                    .map(|e| Endpoint {
                        addr: addr(s * 10 + e),
                        state: Readiness::Ready,
                        local: false,
                        hint: Hint::None,
                    })
                    .collect(),
            }],
        })
        .collect();
    (pods, services)
}

fn per_event(c: &mut Criterion) {
    let mut g = c.benchmark_group("model: one remote pod changes");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for n in [2_000, 20_000, 100_000] {
        let (pods, services) = cluster(n);
        let mut model = Model::with_services(pods.clone(), services.clone());
        // A pod that is a Service's endpoint, so its Service is touched too.
        let mut moved = pod(1);
        let home = moved.clone();
        moved.addresses = vec![addr(n + 1)];
        let mut flip = false;
        g.bench_function(BenchmarkId::new("apply", n), |b| {
            b.iter(|| {
                flip = !flip;
                let w = if flip { moved.clone() } else { home.clone() };
                // The executors hold the table in service: patching it copies
                // its entries once, as on a node.
                let held = model.service_table().clone();
                black_box((model.apply([Change::Workload(w.object(), Some(std::sync::Arc::new(w)))]), held))
            })
        });
        g.bench_function(BenchmarkId::new("rebuild", n), |b| {
            b.iter(|| black_box(Model::with_services(pods.clone(), services.clone())))
        });
    }
    g.finish();
}

criterion_group!(benches, per_event);
criterion_main!(benches);
