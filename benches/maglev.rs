#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Criterion benches for the controller's hot spots: the flow hash (also run per packet in XDP)
//! and the Maglev table build. `cargo bench -p lb-userspace --bench maglev`.
use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
};

use criterion::{Criterion, criterion_group, criterion_main};
use edgelb::maglev::{ConsistentHash, Maglev, RingMember};
use lb_common::{FlowKey, HASH_SEED, hash};

fn flow_hash(c: &mut Criterion) {
    let addr = [0x0104_12c6u32, 0, 0, 0];
    c.bench_function("client_hash", |b| b.iter(|| hash::client_hash(black_box(&addr), HASH_SEED)));
    let key = FlowKey {
        src: addr,
        dst: [0x0101_12c6, 0, 0, 0],
        sport: 1234,
        dport: 80,
        proto: 6,
        family: 2,
        _pad: [0; 2],
    };
    c.bench_function("five_tuple_hash", |b| {
        b.iter(|| hash::five_tuple_hash(black_box(&key), HASH_SEED))
    });
}

fn maglev_build(c: &mut Criterion) {
    for n in [10usize, 100, 1000] {
        let members: Vec<RingMember> = (0..n)
            .map(|i| {
                RingMember::from_addr(
                    IpAddr::V4(Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1)),
                    1,
                )
            })
            .collect();
        c.bench_function(&format!("maglev_build_n{n}_m65537"), |b| {
            b.iter(|| Maglev.build(black_box(&members), 65_537))
        });
    }
}

criterion_group!(benches, flow_hash, maglev_build);
criterion_main!(benches);
