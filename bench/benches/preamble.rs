//! Micro-benchmark of the tunnel preamble codec (pure code: criterion).
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use dataplane_common::preamble::{decode, encode, Preamble};

fn codec(c: &mut Criterion) {
    let p = Preamble { dst: "10.244.3.17:8080".parse().expect("addr") };
    let mut buf = Vec::with_capacity(64);
    c.bench_function("preamble encode v4", |b| {
        b.iter(|| {
            buf.clear();
            encode(black_box(&p), &mut buf);
        })
    });
    encode(&p, &mut buf);
    buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
    c.bench_function("preamble decode v4 with trailing data", |b| b.iter(|| decode(black_box(&buf))));
}

criterion_group!(benches, codec);
criterion_main!(benches);
