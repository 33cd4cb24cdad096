//! Pod certificates minted on the node: P-256 against Ed25519 leaf keys,
//! for the mint itself and for a full mutual TLS 1.3 handshake between two
//! pods (both ends in memory, no sockets: the CPU a handshake costs).
//! `cargo bench -p bench --bench pki` (no root).
use std::{hint::black_box, net::IpAddr, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion};
use dataplane::{
    identity::pki::{self, KeyType, NodeCa},
    identity::Identity,
};
use rustls::{ClientConnection, ServerConnection};
use rustls_pki_types::ServerName;

fn node_ca(root: &rcgen::Issuer<'static, rcgen::KeyPair>, leaf: KeyType) -> NodeCa {
    let (key, pem) = pki::node_request("node-a").expect("request");
    let grant = pki::Grant {
        node: "node-a".into(),
        cidrs: vec!["10.1.0.0/24".parse().expect("net")],
        lifetime: Duration::from_secs(86400),
    };
    NodeCa::new(key, &pki::sign_node_ca(&pem, &grant, root).expect("signed"), leaf).expect("node CA")
}

fn root() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let (cert, key) = dataplane::identity::ca::root().expect("root");
    let key = rcgen::KeyPair::from_pem(&key).expect("key");
    (rcgen::Issuer::from_ca_cert_pem(&cert, key).expect("issuer"), cert)
}

/// One full handshake between `client` (from `a`) and `server` (at `b`).
fn handshake(client: &Identity, server: &Identity, a: IpAddr, b: IpAddr) {
    let mut c = ClientConnection::new(client.client_config(a).expect("client"), ServerName::IpAddress(b.into()))
        .expect("client conn");
    let mut s = ServerConnection::new(server.server_config(b).expect("server")).expect("server conn");
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        c.write_tls(&mut buf).expect("client writes");
        s.read_tls(&mut buf.as_slice()).expect("server reads");
        s.process_new_packets().expect("server processes");
        buf.clear();
        s.write_tls(&mut buf).expect("server writes");
        c.read_tls(&mut buf.as_slice()).expect("client reads");
        c.process_new_packets().expect("client processes");
    }
}

fn keys(c: &mut Criterion) {
    let (root, root_pem) = root();
    let dir = std::env::temp_dir().join(format!("dpbench-pki-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bundle = dir.join("ca.crt");
    std::fs::write(&bundle, &root_pem).expect("bundle");
    let roots = dataplane::identity::read_bundle(&bundle).expect("roots");
    let (a, b): (IpAddr, IpAddr) = ("10.1.0.1".parse().expect("ip"), "10.1.0.2".parse().expect("ip"));
    let spiffe = pki::spiffe_id("cluster.local", "shop", "web");
    for (name, kind) in [("P-256", KeyType::P256), ("Ed25519", KeyType::Ed25519)] {
        let ca = node_ca(&root, kind);
        c.bench_function(&format!("mint a pod certificate, {name}"), |bch| {
            bch.iter(|| black_box(ca.mint(&[a], &spiffe, Duration::from_secs(3600)).expect("mint")))
        });
        let pod = |ip: IpAddr| {
            let (chain, key, _) = ca.mint(&[ip], &spiffe, Duration::from_secs(3600)).expect("mint");
            Identity::minted(roots.clone(), &bundle, &[(vec![ip], chain, key)], false, None).expect("identity")
        };
        let (client, server) = (pod(a), pod(b));
        c.bench_function(&format!("full mutual TLS 1.3 handshake, {name} leaves"), |bch| {
            bch.iter(|| handshake(&client, &server, a, b))
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, keys);
criterion_main!(benches);
