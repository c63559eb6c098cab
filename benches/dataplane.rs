//! Data-path benchmarks: `cargo xtask bench [xdp|veth|maglev]` (or `cargo bench -p lb-userspace
//! --bench dataplane -- <part>`). Each part prints a markdown table and merges its figures into
//! `target/bench/results.json`. Every figure stands beside a baseline measured in the same run.
//!
//! - `xdp`: ns/packet of the real balancer through BPF_PROG_TEST_RUN, next to a trivial XDP_PASS
//!   and a trivial MAC-swap XDP_TX program. Paths that rewrite the packet (encapsulation, ICMP)
//!   cannot use the kernel's repeat loop, which would re-run on the already rewritten buffer, so
//!   *every* path, baselines included, is timed the same way: one run per syscall on a fresh copy
//!   of the frame, taking the kernel-measured duration of that run; the figure is the median.
//! - `veth`: packets/s through a veth pair, generated in the kernel by BPF_PROG_TEST_RUN in
//!   live-frames mode (the generator rewrites the source address of every frame), balanced by
//!   edgelb's XDP program on the far side and sent back with XDP_TX to a counting sink; then the
//!   same with the trivial XDP_TX program in edgelb's place.
//! - `maglev`: table build time, load imbalance and disruption.
//! - `l7`: wrk through edgelb's proxy, HAProxy and nginx (Debian packages) in the same run, same
//!   nginx backend, same concurrency, each proxy with one worker pinned to CPU 0 (wrk and the
//!   backend share CPU 1), plus the direct-to-backend ceiling; requests/s, p50/p99 latency and
//!   the proxy's own CPU seconds from /proc.
#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp};
use common::packet::*;
use edgelb::{
    config::{Config, XdpAttachMode},
    dataplane::{AuxPrograms, Dataplane, TableShape},
    maglev::{ConsistentHash, Maglev, RingMember},
    testbed::{netns, sh},
};
use lb_common::programs;
use serde_json::{Value, json};

/// The packet-fixture config (tests/common): IPIP, IP6IP6 and L2 VIPs with three backends.
const CONFIG: &str = common::FIXTURE_CONFIG;

fn results_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/results.json")
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn main() {
    // Re-executed by the l7 part as the edgelb proxy under test (pinned with taskset).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("l7-serve") {
        l7_serve(&args[2]);
        return;
    }
    let parts: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let parts = if parts.is_empty() {
        vec!["xdp".into(), "veth".into(), "maglev".into(), "l7".into()]
    } else {
        parts
    };
    let path = results_path();
    let mut results: Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    results["machine"] = json!(machine());
    println!("machine: {}\n", machine());
    for part in parts {
        match part.as_str() {
            "xdp" => xdp(&mut results),
            "veth" => veth(&mut results),
            "maglev" => maglev(&mut results),
            "l7" => l7(&mut results),
            other => {
                eprintln!("unknown part `{other}`: xdp, veth, maglev or l7");
                std::process::exit(2);
            }
        }
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap() + "\n").unwrap();
    println!("\nresults: {}", path.display());
}

fn require_root(what: &str) -> bool {
    if netns::euid() != 0 {
        println!("{what}: skipped, needs root (loads XDP programs)");
        return false;
    }
    true
}

/// One path to time: its program, a frame maker (called with a running index, so new-flow paths
/// can make every frame a new 5-tuple) and the verdict every run must return.
struct Path<'a> {
    prog: &'a Xdp,
    frame: Box<dyn FnMut(usize) -> Vec<u8> + 'a>,
    want: u32,
}

/// Median kernel-measured duration (ns) of single runs of each path, measured interleaved: in
/// each of `rounds` rounds every path runs `per_round` times in turn, so that the VM's noise
/// (which moves a whole run by up to 30 %) falls on the baselines and the subjects alike. Returns
/// per path the median over rounds of the per-round medians, and the median over rounds of its
/// per-round ratio to path `base`.
fn time_interleaved(
    paths: &mut [Path],
    rounds: usize,
    per_round: usize,
    base: usize,
) -> Vec<(f64, f64)> {
    let mut out = vec![0u8; 512];
    let mut index = vec![0usize; paths.len()];
    let mut medians: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); paths.len()];
    for _ in 0..rounds {
        for (p, path) in paths.iter_mut().enumerate() {
            let mut ns = Vec::with_capacity(per_round);
            for _ in 0..per_round {
                let input = (path.frame)(index[p]);
                index[p] += 1;
                let opts = TestRunOptions {
                    data_in: Some(&input),
                    data_out: Some(&mut out),
                    ..Default::default()
                };
                let r = path.prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
                assert_eq!(r.return_value, path.want, "unexpected verdict");
                ns.push(r.duration.as_nanos() as u64);
            }
            ns.sort_unstable();
            medians[p].push(ns[per_round / 2] as f64);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    (0..paths.len())
        .map(|p| {
            let ratios = (0..rounds).map(|r| medians[p][r] / medians[base][r]).collect();
            (median(medians[p].clone()), median(ratios))
        })
        .collect()
}

/// Average ns per run with the kernel's repeat loop (only for programs that leave the frame as
/// they found it, or whose rewrite does not change the path).
fn time_repeat(prog: &Xdp, frame: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; 512];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").duration.as_nanos() as f64
}

fn syn4(client: Ipv4Addr, sport: u16, vip: Ipv4Addr, flags: u8) -> Vec<u8> {
    let ip = V4::new(client, vip, 6).packet(&tcp(client.into(), vip.into(), sport, 80, flags, b""));
    eth(LB_MAC, CLIENT_MAC, ETH_IP, &ip)
}

fn xdp(results: &mut Value) {
    if !require_root("xdp") {
        return;
    }
    const ITERS: usize = 20_000;
    const ROUNDS: usize = 20;
    // The connection table is per CPU: stay on one, so the hit path hits this CPU's table.
    netns::pin_current_thread(Some(0)).expect("pin to CPU 0");
    let cfg = Config::parse(CONFIG, "bench.toml".as_ref()).unwrap();
    let mut dp = Dataplane::load(None).expect("balancer");
    dp.apply(&cfg).unwrap();
    let mut aux = AuxPrograms::load().expect("aux programs");
    let vip = Ipv4Addr::new(198, 18, 1, 1);
    let client =
        |i: usize| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 8, 0)) + (i / 50_000) as u32);
    let udp_frame = {
        let c = Ipv4Addr::new(198, 18, 4, 7);
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &V4::new(c, vip, 17).packet(&udp(c.into(), vip.into(), 5353, 53, &[0; 18])),
        )
    };
    let pass_loop = time_repeat(aux.program(programs::PASS).unwrap(), &udp_frame, 1_000_000);
    let tx_loop = time_repeat(aux.program(programs::TX_SWAP).unwrap(), &udp_frame, 1_000_000);
    let lb: &Xdp = dp.balancer();
    let non_vip = syn4(Ipv4Addr::new(198, 18, 4, 7), 1000, Ipv4Addr::new(198, 18, 0, 2), SYN);
    let non_vip_loop = time_repeat(lb, &non_vip, 1_000_000);
    let hit = syn4(Ipv4Addr::new(198, 18, 4, 9), 40000, vip, ACK);
    // L2 DSR only rewrites MACs, so its frame stays on the same path run after run: the repeat
    // loop times the connection-table hit without the per-run overhead (the first run inserts).
    let l2vip = Ipv4Addr::new(198, 18, 1, 5);
    let l2_hit_loop =
        time_repeat(lb, &syn4(Ipv4Addr::new(198, 18, 4, 9), 40001, l2vip, ACK), 1_000_000);
    let (c6, vip6) =
        ("2001:2::77".parse::<Ipv6Addr>().unwrap(), "2001:2:0:1::1".parse::<Ipv6Addr>().unwrap());
    let echo = {
        let c = Ipv4Addr::new(198, 18, 4, 7);
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &V4::new(c, vip, 1).packet(&icmp4(8, 0, [0, 1, 0, 1], &[0; 32])),
        )
    };
    // A second copy of the aux object, so both baselines can be borrowed at once.
    let mut aux2 = AuxPrograms::load().expect("aux programs");
    let (pass_prog, tx_prog) =
        (aux.program(programs::PASS).unwrap(), aux2.program(programs::TX_SWAP).unwrap());
    let same = |f: &Vec<u8>| {
        let f = f.clone();
        Box::new(move |_| f.clone()) as Box<dyn FnMut(usize) -> Vec<u8>>
    };
    let mut paths = vec![
        Path { prog: pass_prog, frame: same(&udp_frame), want: 2 },
        Path { prog: tx_prog, frame: same(&udp_frame), want: 3 },
        Path { prog: lb, frame: same(&non_vip), want: 2 },
        Path {
            prog: lb,
            frame: Box::new(|i| syn4(client(i), 1024 + (i % 50_000) as u16, vip, SYN)),
            want: 3,
        },
        Path { prog: lb, frame: same(&hit), want: 3 },
        Path {
            prog: lb,
            frame: Box::new(move |i| {
                let sport = 1024 + (i % 50_000) as u16;
                let c = Ipv6Addr::from(u128::from(c6) + (i / 50_000) as u128);
                eth(
                    LB_MAC,
                    CLIENT_MAC,
                    ETH_IPV6,
                    &ipv6(c, vip6, 6, 0, 64, &tcp(c.into(), vip6.into(), sport, 80, SYN, b"")),
                )
            }),
            want: 3,
        },
        Path {
            prog: lb,
            frame: Box::new(|i| {
                syn4(client(i + 1_000_000), 1024 + (i % 50_000) as u16, l2vip, SYN)
            }),
            want: 3,
        },
        Path { prog: lb, frame: same(&echo), want: 3 },
        // A handshake's next packet: its SYN (run untimed just before) left the flow in its
        // handshake slot, and this packet moves it into the table.
        Path {
            prog: lb,
            frame: Box::new(move |i| {
                let (c, sport) = (client(i + 2_000_000), 1024 + (i % 50_000) as u16);
                let mut out = vec![0u8; 512];
                let syn = syn4(c, sport, vip, SYN);
                let opts = TestRunOptions {
                    data_in: Some(&syn),
                    data_out: Some(&mut out),
                    ..Default::default()
                };
                assert_eq!(lb.test_run(opts).expect("SYN").return_value, 3);
                syn4(c, sport, vip, ACK)
            }),
            want: 3,
        },
    ];
    let t = time_interleaved(&mut paths, ROUNDS, ITERS / ROUNDS, 1);
    netns::pin_current_thread(None).expect("unpin");
    let [pass, tx, non_vip_ns, new_v4, hit_v4, new_v6, l2, icmp, ack_v4] =
        [0, 1, 2, 3, 4, 5, 6, 7, 8].map(|i| t[i].0);
    let ratio = |i: usize| t[i].1;
    results["xdp_ns"] = json!({
        "method": format!("single runs (repeat=1, fresh frame each run), kernel-measured; {ROUNDS} interleaved rounds of {} per path; median of per-round medians", ITERS / ROUNDS),
        "x_trivial_tx": {"non_vip_pass": ratio(2), "new_flow_v4": ratio(3), "conntrack_hit_v4": ratio(4),
            "new_flow_v6": ratio(5), "l2_dsr": ratio(6), "icmp_echo": ratio(7),
            "handshake_ack_v4": ratio(8)},
        "trivial_pass": pass, "trivial_tx": tx, "non_vip_pass": non_vip_ns,
        "new_flow_v4": new_v4, "conntrack_hit_v4": hit_v4, "new_flow_v6": new_v6,
        "l2_dsr": l2, "icmp_echo": icmp, "handshake_ack_v4": ack_v4,
        "repeat_loop": {"trivial_pass": pass_loop, "trivial_tx": tx_loop, "non_vip_pass": non_vip_loop,
            "conntrack_hit_l2_dsr": l2_hit_loop},
    });
    println!(
        "## XDP ns/packet (BPF_PROG_TEST_RUN single runs, {ROUNDS} interleaved rounds of {} per path)\n",
        ITERS / ROUNDS
    );
    println!("| path | ns/packet | × trivial XDP_TX (median of per-round ratios) | target |");
    println!("|---|---:|---:|---|");
    let row = |name: &str, v: f64, r: f64, target: &str| {
        println!("| {name} | {v:.0} | {r:.2} | {target} |")
    };
    row("trivial XDP_PASS (baseline)", pass, ratio(0), "");
    row("trivial MAC-swap XDP_TX (baseline)", tx, 1.0, "");
    row("non-VIP pass", non_vip_ns, ratio(2), "");
    row("new TCP flow, v4 VIP, IPIP", new_v4, ratio(3), "≤ 2.5×");
    row("connection-table hit, v4, IPIP", hit_v4, ratio(4), "≤ 2×");
    row("new TCP flow, v6 VIP, IP6IP6", new_v6, ratio(5), "");
    row("L2 DSR (new flow)", l2, ratio(6), "");
    row("ICMP echo to VIP", icmp, ratio(7), "");
    row("TCP handshake's next packet, v4 (enters the table)", ack_v4, ratio(8), "");
    println!(
        "\nKernel repeat loop (1e6 runs, frame unchanged): trivial pass {pass_loop:.1} ns, trivial tx {tx_loop:.1} ns, non-VIP pass {non_vip_loop:.1} ns, connection-table hit (L2 DSR) {l2_hit_loop:.1} ns\n"
    );
}

/// Namespaces of the packet-rate run, removed on drop.
struct Pair {
    gen_ns: String,
    lb_ns: String,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.gen_ns]);
        let _ = sh(&["ip", "netns", "del", &self.lb_ns]);
    }
}

fn veth(results: &mut Value) {
    if !require_root("veth") {
        return;
    }
    const FRAMES: u32 = 4_000_000;
    let pid = std::process::id();
    let pair = Pair { gen_ns: format!("elbbench{pid}-gen"), lb_ns: format!("elbbench{pid}-lb") };
    for ns in [&pair.gen_ns, &pair.lb_ns] {
        sh(&["ip", "netns", "add", ns]).unwrap();
    }
    sh(&[
        "ip",
        "-n",
        &pair.gen_ns,
        "link",
        "add",
        "gen0",
        "type",
        "veth",
        "peer",
        "name",
        "lb0",
        "netns",
        &pair.lb_ns,
    ])
    .unwrap();
    sh(&["ip", "-n", &pair.gen_ns, "link", "set", "gen0", "address", "02:ed:00:00:00:01", "up"])
        .unwrap();
    sh(&["ip", "-n", &pair.lb_ns, "link", "set", "lb0", "address", "02:ed:00:00:00:02", "up"])
        .unwrap();

    let cfg = Config::parse(CONFIG, "bench.toml".as_ref()).unwrap();
    let mut aux = AuxPrograms::load().expect("aux programs");
    netns::in_netns(&pair.gen_ns, || {
        aux.attach(programs::SINK, "gen0", XdpAttachMode::Native, None)
    })
    .unwrap()
    .expect("sink");
    let ifindex: u32 = netns::in_netns(&pair.gen_ns, || {
        std::fs::read_to_string("/sys/class/net/gen0/ifindex")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .unwrap()
    .or_else(|| {
        let out = std::process::Command::new("ip")
            .args(["-n", &pair.gen_ns, "-o", "link", "show", "gen0"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).split(':').next()?.trim().parse().ok()
    })
    .expect("gen0 ifindex");

    // 64-byte UDP frames to the VIP from 198.18.x.y: the generator varies the low bits of the
    // source, cycling through `sources` clients (the IP ID of its template holds sources - 1).
    let vip = Ipv4Addr::new(198, 18, 1, 1);
    let src = Ipv4Addr::new(198, 18, 0, 0);
    let frame_for = |sources: u32| {
        let mut f = eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &V4::new(src, vip, 17).packet(&udp(src.into(), vip.into(), 5353, 53, &[0; 18])),
        );
        f[18..20].copy_from_slice(&((sources - 1) as u16).to_be_bytes());
        f
    };
    let frame = frame_for(65_536);
    assert_eq!(frame.len(), 60);

    let run = |aux: &mut AuxPrograms| -> (f64, u64) {
        let before = aux.counter("SINK_COUNT").unwrap();
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes()); // data_end
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
        let gen_prog = aux.program(programs::GEN).unwrap();
        let start = Instant::now();
        netns::in_netns(&pair.gen_ns, || {
            // One CPU generates, and so runs both sides' NAPI and edgelb's per-CPU table, as one
            // RSS queue would: a generator thread moving between CPUs would make flows new on
            // each CPU it visits.
            netns::pin_current_thread(Some(0)).expect("pin the generator");
            let opts = TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: FRAMES,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..Default::default()
            };
            gen_prog.test_run(opts).expect("live-frames run")
        })
        .unwrap();
        // Let the last frames drain through the pair.
        std::thread::sleep(Duration::from_millis(100));
        let elapsed = start.elapsed().as_secs_f64() - 0.1;
        let got = aux.counter("SINK_COUNT").unwrap() - before;
        (got as f64 / elapsed / 1e6, got)
    };

    let mut dp = Dataplane::load(None).expect("balancer");
    dp.apply(&cfg).unwrap();
    netns::in_netns(&pair.lb_ns, || dp.attach("lb0", XdpAttachMode::Native))
        .unwrap()
        .expect("attach balancer");
    // Every client once per 65 536 frames: each packet's connection-table bucket is cold (the
    // worst case, which the target is measured on) ...
    aux.set_gen_template(&frame).expect("generator template");
    let (edgelb_mpps, edgelb_n) = run(&mut aux);
    // ... and 4096 clients, whose table entries stay in the CPU's caches.
    aux.set_gen_template(&frame_for(4096)).expect("generator template");
    let (warm_mpps, _) = run(&mut aux);
    aux.set_gen_template(&frame).expect("generator template");
    // For information (not the target's configuration): the same 65 536 clients to the UDP VIP
    // with its connection table off (`conntrack = false`), as a stateless service would be set
    // up: every packet placed by the ring, no table memory touched.
    let stateless =
        CONFIG.replacen("protocol = \"udp\"\n", "protocol = \"udp\"\nconntrack = false\n", 1);
    assert_ne!(stateless, CONFIG, "the fixture has a UDP VIP");
    dp.apply(&Config::parse(&stateless, "bench.toml".as_ref()).unwrap()).unwrap();
    let (stateless_mpps, _) = run(&mut aux);
    dp.apply(&cfg).unwrap();
    let reasons = dp.maps().reasons().unwrap();
    let seen: Vec<String> = lb_common::stats::REASON_NAMES
        .iter()
        .zip(reasons)
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r}={n}"))
        .collect();
    println!("edgelb verdicts during the run: {}", seen.join(" "));
    drop(dp); // detaches
    // The same 65 536 clients through a table of 16 384 flows per CPU (256 KiB, which stays in
    // the CPU's cache): 16 flows per 4-way bucket, so every packet misses the table and takes
    // the whole new-flow path (ring hash, Maglev lookup, insert over the least recent flow).
    // What is left between this and the default table is the cost of the cold bucket.
    let small = TableShape::for_flows(Some(16_384));
    let mut dp = Dataplane::load_with_table(None, small).expect("balancer, small table");
    dp.apply(&cfg).unwrap();
    netns::in_netns(&pair.lb_ns, || dp.attach("lb0", XdpAttachMode::Native))
        .unwrap()
        .expect("attach balancer");
    let (small_mpps, _) = run(&mut aux);
    let evicted = dp.maps().ct_stats().unwrap()[lb_common::ct_stats::EVICTED as usize];
    drop(dp);
    let mut tx_aux = AuxPrograms::load().expect("aux programs");
    netns::in_netns(&pair.lb_ns, || {
        tx_aux.attach(programs::TX_SWAP, "lb0", XdpAttachMode::Native, None)
    })
    .unwrap()
    .expect("attach tx_swap");
    let (tx_mpps, tx_n) = run(&mut aux);
    drop(tx_aux);
    drop(pair);

    results["veth_mpps"] = json!({
        "trivial_tx": tx_mpps, "edgelb": edgelb_mpps, "ratio": edgelb_mpps / tx_mpps,
        "edgelb_4096_clients": warm_mpps, "ratio_4096_clients": warm_mpps / tx_mpps,
        "edgelb_small_table_all_misses": small_mpps, "ratio_small_table_all_misses": small_mpps / tx_mpps,
        "small_table_evictions": evicted,
        "edgelb_no_conntrack": stateless_mpps, "ratio_no_conntrack": stateless_mpps / tx_mpps,
        "frames_sent": FRAMES, "frames_back": {"edgelb": edgelb_n, "trivial_tx": tx_n},
        "method": "BPF_PROG_TEST_RUN live frames (batch 64) into a veth pair, XDP_TX back to a counting sink",
    });
    println!("## Packet rate through veth (64-byte UDP, {FRAMES} frames, in-kernel generator)\n");
    println!("| program on the balancer side | Mpps back at the sink | frames back |");
    println!("|---|---:|---:|");
    println!("| trivial MAC-swap XDP_TX (baseline) | {tx_mpps:.2} | {tx_n} |");
    println!("| edgelb (IPIP encapsulation), 65 536 clients | {edgelb_mpps:.2} | {edgelb_n} |");
    println!("| edgelb (IPIP encapsulation), 4096 clients | {warm_mpps:.2} | |");
    println!(
        "| edgelb, 65 536 clients, table of 16 384 flows per CPU (every packet a miss: {evicted} evictions) | {small_mpps:.2} | |"
    );
    println!(
        "| edgelb, 65 536 clients, UDP VIP with `conntrack = false` (no connection table; for information) | {stateless_mpps:.2} | |"
    );
    println!(
        "\nratio edgelb / trivial: {:.2} with 65 536 clients (target ≥ 0.85), {:.2} with 4096, {:.2} with 65 536 through the cached small table, {:.2} without a connection table\n",
        edgelb_mpps / tx_mpps,
        warm_mpps / tx_mpps,
        small_mpps / tx_mpps,
        stateless_mpps / tx_mpps
    );
}

fn members(n: usize) -> Vec<RingMember> {
    (0..n)
        .map(|i| {
            RingMember::from_addr(
                IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i as u32)),
                1,
            )
        })
        .collect()
}

fn moved(a: &[u32], am: &[RingMember], b: &[u32], bm: &[RingMember]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| am[**x as usize].id != bm[**y as usize].id).count() as f64
        / a.len() as f64
}

fn maglev(results: &mut Value) {
    println!("## Maglev\n");
    println!(
        "| N | M | build ms (median of 5) | imbalance max/mean | moved on remove / ideal | moved on add / ideal |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut out = json!({});
    for m in [65_537u32, 655_373] {
        for n in [10usize, 100, 1000] {
            let ms = members(n);
            let mut times: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    let r = Maglev.build(&ms, m).unwrap();
                    std::hint::black_box(r);
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let ring = Maglev.build(&ms, m).unwrap();
            let mut counts = vec![0u32; n];
            ring.iter().for_each(|&b| counts[b as usize] += 1);
            let imbalance = *counts.iter().max().unwrap() as f64 / (m as f64 / n as f64);
            let fewer = ms[1..].to_vec();
            let removed = moved(&ring, &ms, &Maglev.build(&fewer, m).unwrap(), &fewer) * n as f64;
            let more = members(n + 1);
            let added = moved(&ring, &ms, &Maglev.build(&more, m).unwrap(), &more) * (n + 1) as f64;
            println!(
                "| {n} | {m} | {:.2} | {imbalance:.4} | {removed:.2} | {added:.2} |",
                times[2]
            );
            out[format!("n{n}_m{m}")] = json!({"build_ms": times[2], "imbalance": imbalance, "moved_remove_over_ideal": removed, "moved_add_over_ideal": added});
            if m == 65_537 && n == 100 {
                out["imbalance_n100"] = json!(imbalance);
                out["moved_over_ideal_n100"] = json!(removed.max(added));
            }
            if m == 65_537 && n == 1000 {
                out["build_ms_n1000_m65537"] = json!(times[2]);
            }
        }
    }
    println!(
        "\ntargets: imbalance ≤ 1.01 at N=100, M=65537; moved ≤ 1.5× ideal; build < 10 ms at N=1000, M=65537\n"
    );
    results["maglev"] = out;
}

const BACKEND_PORT: u16 = 18080;

fn l7_serve(config: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    let cfg = Config::parse(&text, config.as_ref()).expect("valid config");
    let metrics = edgelb::metrics::Metrics::new();
    let _proxy = edgelb::proxy::Proxy::start(&cfg, 1, metrics.l7.clone()).expect("proxy");
    // Serve until killed.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A child process killed (by PID) on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &[&str]) -> Child {
    Child(
        std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", cmd[0])),
    )
}

fn wait_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// utime + stime of `pid` and its threads, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// (requests/s, p50 ms, p99 ms) from wrk's --latency output.
fn wrk(port: u16, conns: u32, secs: u32) -> (f64, f64, f64) {
    let out = std::process::Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |v: &str| -> f64 {
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = num.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => f64::NAN,
        }
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| ms(v.trim())))
            .unwrap_or(f64::NAN)
    };
    let errors = text.lines().find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        println!("  (wrk on port {port}, c{conns}: {})", e.trim());
    }
    (rps, pct("50%"), pct("99%"))
}

fn l7(results: &mut Value) {
    for tool in ["wrk", "haproxy", "nginx", "taskset"] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            println!("l7: skipped, `{tool}` missing (apt-get install wrk haproxy nginx-light)");
            return;
        }
    }
    let dir = std::env::temp_dir().join(format!("edgelb-l7-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let nginx_conf = |name: &str, body: &str| {
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(
            &path,
            format!("worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err;\nevents {{ worker_connections 8192; }}\nhttp {{\n access_log off;\n client_body_temp_path {d};\n proxy_temp_path {d};\n {body}\n}}\n"),
        )
        .unwrap();
        path
    };
    let backend = nginx_conf(
        "backend",
        &format!(
            "server {{ listen 127.0.0.1:{BACKEND_PORT} reuseport; keepalive_requests 1000000; location / {{ return 200 \"ok\\n\"; }} }}"
        ),
    );
    let nginx_proxy = nginx_conf(
        "proxy",
        &format!(
            "upstream b {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 256; }}\n server {{ listen 127.0.0.1:18083; keepalive_requests 1000000; location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
    );
    let haproxy_cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!("global\n  nbthread 1\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  http-reuse safe\nfrontend f\n  bind 127.0.0.1:18082\n  default_backend b\nbackend b\n  server s1 127.0.0.1:{BACKEND_PORT}\n"),
    )
    .unwrap();
    let edgelb_cfg = dir.join("edgelb.toml");
    std::fs::write(
        &edgelb_cfg,
        format!("[node]\ninterfaces = [\"lo\"]\n[metrics]\nenabled = false\n[[vip]]\nname = \"bench\"\naddress = \"127.0.0.1\"\nport = 18081\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {BACKEND_PORT} }}]\n[vip.l7]\nmax_connections = 100000\n"),
    )
    .unwrap();

    let _backend = spawn(&["taskset", "-c", "1", "nginx", "-c", backend.to_str().unwrap()]);
    wait_port(BACKEND_PORT);
    let me = std::env::current_exe().unwrap();
    let proxies: Vec<(&str, u16, Option<Child>)> = vec![
        ("direct", BACKEND_PORT, None),
        (
            "edgelb",
            18081,
            Some(spawn(&[
                "taskset",
                "-c",
                "0",
                me.to_str().unwrap(),
                "l7-serve",
                edgelb_cfg.to_str().unwrap(),
            ])),
        ),
        (
            "haproxy",
            18082,
            Some(spawn(&["taskset", "-c", "0", "haproxy", "-f", haproxy_cfg.to_str().unwrap()])),
        ),
        (
            "nginx",
            18083,
            Some(spawn(&["taskset", "-c", "0", "nginx", "-c", nginx_proxy.to_str().unwrap()])),
        ),
    ];
    for (_, port, _) in &proxies {
        wait_port(*port);
    }
    const SECS: u32 = 5;
    let mut out = json!({});
    println!(
        "## L7: wrk -t1 -d{SECS}s through each proxy (one worker pinned to CPU 0; wrk and an nginx backend on CPU 1)\n"
    );
    println!(
        "| conns | proxy | requests/s | p50 ms | p99 ms | proxy CPU s | requests per proxy CPU-second |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for conns in [64u32, 256] {
        let key = format!("c{conns}");
        out[&key] = json!({});
        for (name, port, child) in &proxies {
            wrk(*port, conns, 1); // warm-up
            let pid = child.as_ref().map(|c| c.0.id());
            let before = pid.map_or(0.0, cpu_seconds);
            let (rps, p50, p99) = wrk(*port, conns, SECS);
            let cpu = pid.map_or(0.0, cpu_seconds) - before;
            let per_cpu = if cpu > 0.0 { rps * SECS as f64 / cpu } else { f64::NAN };
            println!(
                "| {conns} | {name} | {rps:.0} | {p50:.2} | {p99:.2} | {cpu:.2} | {per_cpu:.0} |"
            );
            if *name == "direct" {
                out[&key]["direct_rps"] = json!(rps);
            } else {
                out[&key][format!("{name}_rps")] = json!(rps);
                out[&key][format!("{name}_p50_ms")] = json!(p50);
                out[&key][format!("{name}_p99_ms")] = json!(p99);
                out[&key][format!("{name}_req_per_cpu_s")] = json!(per_cpu);
            }
        }
    }
    // Closed-loop wrk understates tails: p99 at a fixed rate below saturation, with oha's
    // coordinated-omission correction (`cargo install oha`), when oha is installed.
    let oha = ["oha", &format!("{}/.cargo/bin/oha", std::env::var("HOME").unwrap_or_default())]
        .into_iter()
        .find(|o| {
            std::process::Command::new(o)
                .arg("--version")
                .output()
                .is_ok_and(|x| x.status.success())
        })
        .map(str::to_owned);
    const RATE: u32 = 20_000;
    match oha {
        None => println!("\n(oha not installed: no fixed-rate p99; `cargo install oha`)"),
        Some(oha) => {
            println!(
                "\n| fixed rate {RATE} req/s, 64 conns, oha --latency-correction | p50 ms | p99 ms |"
            );
            println!("|---|---:|---:|");
            for (name, port, _) in &proxies {
                let o = std::process::Command::new("taskset")
                    .args([
                        "-c",
                        "1",
                        &oha,
                        "-z",
                        "5s",
                        "-q",
                        &RATE.to_string(),
                        "-c",
                        "64",
                        "--latency-correction",
                        "--no-tui",
                        "--output-format",
                        "json",
                    ])
                    .arg(format!("http://127.0.0.1:{port}/"))
                    .output()
                    .expect("oha");
                let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(json!({}));
                let p = |q: &str| v["latencyPercentiles"][q].as_f64().unwrap_or(f64::NAN) * 1000.0;
                println!("| {name} | {:.2} | {:.2} |", p("p50"), p("p99"));
                out["fixed_rate"][*name] =
                    json!({"rate": RATE, "p50_ms": p("p50"), "p99_ms": p("p99")});
            }
        }
    }
    let c = &out["c64"];
    let ratio = c["edgelb_req_per_cpu_s"].as_f64().unwrap_or(0.0)
        / c["haproxy_req_per_cpu_s"].as_f64().unwrap_or(1.0);
    println!("\nc64: edgelb requests per CPU-second / HAProxy's = {ratio:.2} (target ≥ 1.3)\n");
    out["method"] = json!(
        "wrk -t1, keep-alive, 5 s after a 1 s warm-up; CPU seconds from /proc/<pid>/stat; oha fixed-rate p99 not measured"
    );
    results["l7"] = out;
    drop(proxies);
    let _ = std::fs::remove_dir_all(&dir);
}
