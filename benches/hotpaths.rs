#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Criterion benches for the user-space hot spots: the flow hashes (also run per packet in XDP),
//! the Maglev table build, the L7 balancer's pick and the proxy's HTTP request-head parse (with
//! httparse's alone beside it).
//! `cargo bench -p lb-userspace --bench hotpaths`.
use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
};

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
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
    // The connection-table bucket hashes, run for every packet.
    let v4 = key.v4();
    c.bench_function("flow_key_v4_hash", |b| {
        b.iter(|| hash::flow_key_v4_hash(black_box(&v4), HASH_SEED))
    });
    c.bench_function("flow_key_hash", |b| {
        b.iter(|| hash::flow_key_hash(black_box(&key), HASH_SEED))
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

fn l7_pick(c: &mut Criterion) {
    use edgelb::{
        config::Algorithm,
        proxy::balance::{BackendState, Member, Pool},
    };
    use std::sync::Arc;
    let members = |n: usize| -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                state: Arc::new(BackendState::new(
                    format!("198.18.0.{}:80", i + 1).parse().unwrap(),
                )),
                weight: 1 + (i % 3) as u32,
                up: true,
            })
            .collect()
    };
    let client: IpAddr = "198.18.4.7".parse().unwrap();
    for algo in [
        Algorithm::RoundRobin,
        Algorithm::Weighted,
        Algorithm::P2c,
        Algorithm::LeastConn,
        Algorithm::Hash,
    ] {
        let pool = Pool::new(members(16), algo);
        c.bench_function(&format!("l7_pick_{algo:?}_16"), |b| {
            b.iter(|| pool.pick(black_box(client), &[], None))
        });
    }
}

/// The proxy's own request-head parse (`proxy/http/head.rs`'s `parse_request`, as every request
/// takes it: the head split off a buffer holding it, with the config's default `max_headers`,
/// 100), and beside it httparse's parse alone, the floor it builds on.
fn http_parse(c: &mut Criterion) {
    let req = b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nCookie: session=abcdef0123456789\r\n\r\n";
    let parse = |buf: &mut BytesMut| edgelb::proxy::parse_request_for_bench(buf, 100);
    // What is timed must be a whole head parsed, not a refusal.
    assert_eq!(parse(&mut BytesMut::from(&req[..])), Some(req.len()), "the request parses");
    c.bench_function("proxy_request_head_parse", |b| {
        // A fresh buffer per run (made outside the timing): the parse splits the head off it.
        b.iter_batched_ref(
            || BytesMut::from(&req[..]),
            |buf| parse(black_box(buf)),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("httparse_request_head_parse", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Request::new(&mut headers);
            r.parse(black_box(req)).unwrap()
        })
    });
}

/// One observation of the L7 request latency, as every answered request makes (one thread, so
/// no contention: what it costs alone), and beside it prometheus-client's `Histogram`, whose
/// mutex it replaced.
fn latency_observe(c: &mut Criterion) {
    use std::time::Duration;
    // The proxy's buckets.
    let bounds = edgelb::proxy::LATENCY_BOUNDS;
    let ours = edgelb::metrics::LatencyHistogram::new(bounds);
    let theirs = prometheus_client::metrics::histogram::Histogram::new(bounds);
    let d = Duration::from_micros(3_700);
    c.bench_function("latency_histogram_observe", |b| b.iter(|| ours.observe(black_box(d))));
    c.bench_function("prometheus_histogram_observe", |b| {
        b.iter(|| theirs.observe(black_box(d).as_secs_f64()))
    });
}

criterion_group!(benches, flow_hash, maglev_build, l7_pick, http_parse, latency_observe);
criterion_main!(benches);
