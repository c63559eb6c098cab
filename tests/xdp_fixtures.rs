//! Packet fixtures through the real XDP balancer with BPF_PROG_TEST_RUN.
//!
//! Each fixture is an input frame, the expected verdict, the exact expected output bytes, and the
//! one reason counter it must move (Katran's fixture style). The program is the one `edgelb`
//! embeds, with maps filled by the same `Dataplane::apply` the controller uses.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use common::{FIXTURE_CONFIG, packet::*};
use edgelb::{
    config::{Config, Vip, XdpAttachMode},
    dataplane::{
        Dataplane, InterfaceState, TableShape, conn_hash, flow_hash, route, vip_key, vip_ring,
    },
    testbed::netns::{self, require_privileged},
};
use lb_common::stats::{REASON_COUNT, REASON_NAMES, Reason};

/// Three backends of weight 1, the pool most connection-table tests start from.
const THREE: [(&str, u32); 3] = [("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)];
/// [`THREE`] and a fourth backend joining them.
const FOUR: [(&str, u32); 4] = [THREE[0], THREE[1], THREE[2], ("198.18.0.14", 1)];

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

struct Harness {
    dp: Dataplane,
    cfg: Config,
}

/// Runs one frame through `dp`'s balancer (BPF_PROG_TEST_RUN); returns the verdict and the
/// output frame.
fn run_frame(dp: &mut Dataplane, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let opts =
        TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..Default::default() };
    let r = dp.balancer().test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

impl Harness {
    fn new(test: &str, toml: &str) -> Option<Harness> {
        if !require_privileged(test) {
            return None;
        }
        let cfg = Config::parse(toml, "fixture.toml".as_ref()).expect("fixture config is valid");
        let shape = TableShape::for_flows(cfg.node.conntrack_flows_per_cpu);
        let mut dp = Dataplane::load_with_table(None, shape).expect("balancer loads and verifies");
        dp.apply(&cfg).expect("maps filled");
        Some(Harness { dp, cfg })
    }

    /// [`Harness::new`] on a thread pinned to CPU 0, for tests of per-CPU state (the
    /// connection table, handshake slots, VIP caches): every run then uses the same CPU's.
    fn pinned(test: &str, toml: &str) -> Option<Harness> {
        let h = Harness::new(test, toml)?;
        edgelb::testbed::netns::pin_current_thread(Some(0)).expect("pin to CPU 0");
        Some(h)
    }

    fn apply(&mut self, toml: &str) {
        self.cfg = Config::parse(toml, "fixture.toml".as_ref()).expect("valid config");
        self.dp.apply(&self.cfg).expect("maps updated");
    }

    fn vip(&self, name: &str) -> Vip {
        self.cfg.vips.iter().find(|v| v.name == name).unwrap().clone()
    }

    fn reasons(&self) -> [u64; REASON_COUNT as usize] {
        self.dp.maps().reasons().unwrap()
    }

    /// Runs one frame; returns the verdict and the output frame.
    fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        run_frame(&mut self.dp, input)
    }

    /// Runs a frame and checks verdict, output and that exactly `reason` moved by one.
    fn check(
        &mut self,
        name: &str,
        input: &[u8],
        action: u32,
        expect: Option<&[u8]>,
        reason: Reason,
    ) {
        let before = self.reasons();
        let (got, out) = self.run(input);
        let after = self.reasons();
        assert_eq!(got, action, "{name}: verdict");
        let want = expect.unwrap_or(input);
        assert_eq!(hex(&out), hex(want), "{name}: output bytes");
        for i in 0..REASON_COUNT as usize {
            let want_delta = u64::from(i == reason as usize);
            assert_eq!(after[i] - before[i], want_delta, "{name}: counter {}", REASON_NAMES[i]);
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .chunks(16)
        .map(|c| c.join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn mac_of(vip: &Vip, backend: IpAddr) -> [u8; 6] {
    vip.backends.iter().find(|b| b.address == backend).unwrap().mac.unwrap()
}

/// Expected IPIP (v4 backend) or 4in6/IP6IP6 (v6 backend) frame for `inner` (an IP packet).
fn encapsulated(vip: &Vip, backend: IpAddr, hash: u32, inner: &[u8], vlan: Option<u16>) -> Vec<u8> {
    let mac = mac_of(vip, backend);
    let (ethertype, ip) = match backend {
        IpAddr::V4(b) => {
            let o = u32::from_be_bytes(v4("198.19.0.0").octets()) | (hash & 0xffff);
            let mut h = V4::new(Ipv4Addr::from(o), b, 4);
            h.tos = if inner[0] >> 4 == 4 { inner[1] } else { 0 };
            (ETH_IP, h.packet(inner))
        }
        IpAddr::V6(b) => {
            let mut src = v6("2001:2:0:ff::").octets();
            src[12..16].copy_from_slice(&hash.to_ne_bytes());
            let next = if inner[0] >> 4 == 4 { 4 } else { 41 };
            // The inner TOS or traffic class is copied to the outer traffic class.
            let class = if inner[0] >> 4 == 4 {
                inner[1]
            } else {
                (u16::from_be_bytes([inner[0], inner[1]]) >> 4) as u8
            };
            let flow = (class as u32) << 20 | (hash & 0xfffff);
            (ETH_IPV6, ipv6(Ipv6Addr::from(src), b, next, flow, 64, inner))
        }
    };
    match vlan {
        None => eth(mac, LB_MAC, ethertype, &ip),
        Some(vid) => eth_vlan(mac, LB_MAC, vid, ethertype, &ip),
    }
}

fn tcp4(client: &str, sport: u16, vip: &str, dport: u16, flags: u8) -> Vec<u8> {
    let (c, v) = (v4(client), v4(vip));
    V4::new(c, v, 6).packet(&tcp(c.into(), v.into(), sport, dport, flags, b""))
}

fn udp4(client: &str, sport: u16, vip: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
    let (c, v) = (v4(client), v4(vip));
    V4::new(c, v, 17).packet(&udp(c.into(), v.into(), sport, dport, payload))
}

fn tcp6(client: &str, sport: u16, vip: &str, dport: u16, flags: u8) -> Vec<u8> {
    let (c, v) = (v6(client), v6(vip));
    ipv6(c, v, 6, 0, 64, &tcp(c.into(), v.into(), sport, dport, flags, b""))
}

/// Forwarding fixture: `ip` sent to `vip_name`; expects encapsulation to the routed backend.
fn forwarded(h: &mut Harness, name: &str, vip_name: &str, client: IpAddr, sport: u16, ip: Vec<u8>) {
    let vip = h.vip(vip_name);
    let backend = route(&vip, client, sport).unwrap().address;
    let ethertype = if ip[0] >> 4 == 4 { ETH_IP } else { ETH_IPV6 };
    let input = eth(LB_MAC, CLIENT_MAC, ethertype, &ip);
    // The destination port as sent (an any-port VIP has none of its own).
    let l4 = if ip[0] >> 4 == 4 { (ip[0] & 0xf) as usize * 4 } else { 40 };
    let dport = u16::from_be_bytes([ip[l4 + 2], ip[l4 + 3]]);
    let want = encapsulated(&vip, backend, conn_hash(&vip, client, sport, dport), &ip, None);
    h.check(name, &input, XDP_TX, Some(&want), Reason::TxEncap);
}

#[test]
fn forwarding_fixtures() {
    let Some(mut h) = Harness::new("forwarding_fixtures", FIXTURE_CONFIG) else { return };
    let c4: IpAddr = v4("198.18.4.7").into();
    let c6: IpAddr = v6("2001:2::77").into();

    forwarded(
        &mut h,
        "v4 TCP SYN, IPIP",
        "v4tcp",
        c4,
        40000,
        tcp4("198.18.4.7", 40000, "198.18.1.1", 80, SYN),
    );
    let query = udp4("198.18.4.7", 5353, "198.18.1.1", 53, b"query");
    forwarded(&mut h, "v4 UDP, IPIP", "v4udp", c4, 5353, query);
    forwarded(
        &mut h,
        "v6 TCP SYN, IP6IP6",
        "v6",
        c6,
        40000,
        tcp6("2001:2::77", 40000, "2001:2:0:1::1", 80, SYN),
    );
    let udp6 = ipv6(
        v6("2001:2::77"),
        v6("2001:2:0:1::1"),
        17,
        0,
        64,
        &udp(c6, v6("2001:2:0:1::1").into(), 5353, 53, b"q"),
    );
    forwarded(&mut h, "v6 UDP, IP6IP6", "v6udp", c6, 5353, udp6);
    forwarded(
        &mut h,
        "v4 VIP, v6 backend (4in6)",
        "v4to6",
        c4,
        40001,
        tcp4("198.18.4.7", 40001, "198.18.1.2", 80, SYN),
    );
    forwarded(
        &mut h,
        "any-port VIP",
        "anyport",
        c4,
        40002,
        tcp4("198.18.4.7", 40002, "198.18.1.3", 12345, SYN),
    );
    forwarded(
        &mut h,
        "5-tuple VIP",
        "five",
        c4,
        40003,
        tcp4("198.18.4.7", 40003, "198.18.1.4", 80, SYN),
    );

    // TOS is copied to the outer header.
    let mut hdr = V4::new(v4("198.18.4.7"), v4("198.18.1.1"), 6);
    hdr.tos = 0xb8;
    let ip = hdr.packet(&tcp(c4, v4("198.18.1.1").into(), 40004, 80, SYN, b""));
    forwarded(&mut h, "TOS copied to outer header", "v4tcp", c4, 40004, ip.clone());
    // And to an outer IPv6 header: 4in6, and IP6IP6 from the inner traffic class.
    let mut hdr = V4::new(v4("198.18.4.7"), v4("198.18.1.2"), 6);
    hdr.tos = 0xb9;
    let ip = hdr.packet(&tcp(c4, v4("198.18.1.2").into(), 40004, 80, SYN, b""));
    forwarded(&mut h, "TOS copied to an outer IPv6 header", "v4to6", c4, 40004, ip);
    let (c6, vip6) = (v6("2001:2::77"), v6("2001:2:0:1::1"));
    let ip = ipv6(c6, vip6, 6, 0xb9 << 20, 64, &tcp(c6.into(), vip6.into(), 40004, 80, SYN, b""));
    forwarded(&mut h, "traffic class copied to the outer header", "v6", c6.into(), 40004, ip);

    // VLAN tag kept in front of the outer header.
    let vip = h.vip("v4tcp");
    let ip = tcp4("198.18.4.7", 40005, "198.18.1.1", 80, SYN);
    let input = eth_vlan(LB_MAC, CLIENT_MAC, 42, ETH_IP, &ip);
    let b = route(&vip, c4, 0).unwrap().address;
    let want = encapsulated(&vip, b, conn_hash(&vip, c4, 40005, 80), &ip, Some(42));
    h.check("VLAN-tagged v4", &input, XDP_TX, Some(&want), Reason::TxEncap);

    // L2 DSR: only the MACs change.
    let vip = h.vip("l2");
    let ip = tcp4("198.18.4.7", 40006, "198.18.1.5", 80, SYN);
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IP, &ip);
    let b = route(&vip, c4, 0).unwrap().address;
    let want = eth(mac_of(&vip, b), LB_MAC, ETH_IP, &ip);
    h.check("L2 DSR", &input, XDP_TX, Some(&want), Reason::TxL2);
}

#[test]
fn client_hash_sticks_and_five_tuple_spreads() {
    let Some(mut h) = Harness::new("client_hash_sticks_and_five_tuple_spreads", FIXTURE_CONFIG)
    else {
        return;
    };
    let mut client_backends = std::collections::HashSet::new();
    let mut five_backends = std::collections::HashSet::new();
    for sport in 1000..1064u16 {
        let (_, out) = h.run(&eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &tcp4("198.18.4.9", sport, "198.18.1.1", 80, SYN),
        ));
        client_backends.insert(out[0..6].to_vec());
        let (_, out) = h.run(&eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &tcp4("198.18.4.9", sport, "198.18.1.4", 80, SYN),
        ));
        five_backends.insert(out[0..6].to_vec());
    }
    assert_eq!(client_backends.len(), 1, "client-address hashing keeps one client on one backend");
    assert_eq!(five_backends.len(), 3, "5-tuple hashing spreads one client's flows");
}

#[test]
fn icmp_fixtures() {
    let Some(mut h) = Harness::new("icmp_fixtures", FIXTURE_CONFIG) else { return };
    let client = v4("198.18.4.7");
    let vip4 = v4("198.18.1.1");

    // Echo v4: addresses swapped, TTL reset, type 0, checksums right.
    let mut req = V4::new(client, vip4, 1);
    req.ttl = 57;
    req.id = 0x1234;
    let input =
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &req.packet(&icmp4(8, 0, [0, 7, 0, 1], b"ping-payload")));
    let mut rep = V4::new(vip4, client, 1);
    rep.id = 0x1234;
    let want =
        eth(CLIENT_MAC, LB_MAC, ETH_IP, &rep.packet(&icmp4(0, 0, [0, 7, 0, 1], b"ping-payload")));
    h.check("ICMP echo v4", &input, XDP_TX, Some(&want), Reason::TxIcmpEcho);

    // Echo v6.
    let (c6, vip6) = (v6("2001:2::77"), v6("2001:2:0:1::1"));
    let (input, want) = echo6(c6, vip6, LB_MAC);
    h.check("ICMPv6 echo", &input, XDP_TX, Some(&want), Reason::TxIcmpEcho);

    // Echo to a non-VIP passes untouched.
    let other = V4::new(client, v4("198.18.0.2"), 1).packet(&icmp4(8, 0, [0, 1, 0, 1], b"x"));
    h.check(
        "ICMP echo to non-VIP",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &other),
        XDP_PASS,
        None,
        Reason::PassNotVip,
    );

    // Frag-needed from a router about VIP:80 -> client:40000 goes to that flow's backend.
    let router = v4("198.18.0.254");
    let quoted =
        V4::new(vip4, client, 6).packet(&tcp(vip4.into(), client.into(), 80, 40000, ACK, b""));
    let icmp_pkt = V4::new(router, vip4, 1).packet(&icmp4(3, 4, [0, 0, 0x05, 0x00], &quoted[..28]));
    let vip = h.vip("v4tcp");
    let b = route(&vip, client.into(), 40000).unwrap().address;
    let want = encapsulated(&vip, b, conn_hash(&vip, client.into(), 40000, 80), &icmp_pkt, None);
    h.check(
        "frag-needed to owning backend",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &icmp_pkt),
        XDP_TX,
        Some(&want),
        Reason::TxIcmpToBackend,
    );

    // Packet-too-big v6 likewise.
    let router6 = v6("2001:2::fe");
    let quoted6 = ipv6(vip6, c6, 6, 0, 64, &tcp(vip6.into(), c6.into(), 80, 40000, ACK, b""));
    let ptb = ipv6(
        router6,
        vip6,
        58,
        0,
        64,
        &icmp6(router6, vip6, 2, 0, 1280u32.to_be_bytes(), &quoted6),
    );
    let vip = h.vip("v6");
    let b = route(&vip, c6.into(), 40000).unwrap().address;
    let want = encapsulated(&vip, b, conn_hash(&vip, c6.into(), 40000, 80), &ptb, None);
    h.check(
        "packet-too-big to owning backend",
        &eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &ptb),
        XDP_TX,
        Some(&want),
        Reason::TxIcmpToBackend,
    );

    // Oversize v4 with DF: 1500-byte IP packet + 20 > MTU 1500 -> frag-needed advertising 1480.
    let big = V4::new(client, vip4, 6).packet(&tcp(
        client.into(),
        vip4.into(),
        40000,
        80,
        ACK,
        &[0x5a; 1460],
    ));
    assert_eq!(big.len(), 1500);
    let mut err = V4::new(vip4, client, 1);
    err.df = false;
    let want =
        eth(CLIENT_MAC, LB_MAC, ETH_IP, &err.packet(&icmp4(3, 4, [0, 0, 0x05, 0xc8], &big[..28])));
    h.check(
        "oversize v4 -> frag-needed",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &big),
        XDP_TX,
        Some(&want),
        Reason::TxIcmpTooBig,
    );

    // Oversize v6: 1500 + 40 > 1500 -> packet-too-big advertising 1460.
    let big6 =
        ipv6(c6, vip6, 6, 0, 64, &tcp(c6.into(), vip6.into(), 40000, 80, ACK, &[0x5a; 1440]));
    assert_eq!(big6.len(), 1500);
    let want = eth(
        CLIENT_MAC,
        LB_MAC,
        ETH_IPV6,
        &ipv6(vip6, c6, 58, 0, 64, &icmp6(vip6, c6, 2, 0, 1460u32.to_be_bytes(), &big6[..48])),
    );
    h.check(
        "oversize v6 -> packet-too-big",
        &eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &big6),
        XDP_TX,
        Some(&want),
        Reason::TxIcmpTooBig,
    );
}

/// Destination unreachable about a VIP flow, whatever its code, goes to the backend that owns
/// the flow, as frag-needed does: host unreachable (IPv4 type 3 code 1), port unreachable
/// (code 3, UDP) and ICMPv6 destination unreachable (type 1, address unreachable) quoting what
/// the VIP sent to a client. The backend's stack learns that its client cannot be reached
/// (RFC 6069, IP_RECVERR), as behind Katran. Time exceeded stays with the kernel.
#[test]
fn destination_unreachable_goes_to_the_owning_backend() {
    let Some(mut h) = Harness::new("unreachable_to_backend", FIXTURE_CONFIG) else { return };
    let (client, vip4, router) = (v4("198.18.4.7"), v4("198.18.1.1"), v4("198.18.0.254"));
    let quoted =
        V4::new(vip4, client, 6).packet(&tcp(vip4.into(), client.into(), 80, 40000, ACK, b""));
    let vip = h.vip("v4tcp");
    let b = route(&vip, client.into(), 40000).unwrap().address;
    let hash = conn_hash(&vip, client.into(), 40000, 80);
    for (code, what) in [(1, "host unreachable"), (0, "net unreachable"), (13, "prohibited")] {
        let icmp = V4::new(router, vip4, 1).packet(&icmp4(3, code, [0; 4], &quoted[..28]));
        let want = encapsulated(&vip, b, hash, &icmp, None);
        let input = eth(LB_MAC, CLIENT_MAC, ETH_IP, &icmp);
        h.check(what, &input, XDP_TX, Some(&want), Reason::TxIcmpToBackend);
    }

    // Port unreachable from the client itself about a UDP reply of the VIP's.
    let quoted =
        V4::new(vip4, client, 17).packet(&udp(vip4.into(), client.into(), 53, 40000, b"answer"));
    let icmp = V4::new(client, vip4, 1).packet(&icmp4(3, 3, [0; 4], &quoted));
    let vip = h.vip("v4udp");
    let b = route(&vip, client.into(), 40000).unwrap().address;
    let want = encapsulated(&vip, b, conn_hash(&vip, client.into(), 40000, 53), &icmp, None);
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IP, &icmp);
    h.check("port unreachable", &input, XDP_TX, Some(&want), Reason::TxIcmpToBackend);

    // ICMPv6 destination unreachable (address unreachable) about [VIP]:80 -> [client]:40000.
    let (c6, vip6, router6) = (v6("2001:2::77"), v6("2001:2:0:1::1"), v6("2001:2::fe"));
    let quoted6 = ipv6(vip6, c6, 6, 0, 64, &tcp(vip6.into(), c6.into(), 80, 40000, ACK, b""));
    let unreach = ipv6(router6, vip6, 58, 0, 64, &icmp6(router6, vip6, 1, 3, [0; 4], &quoted6));
    let vip = h.vip("v6");
    let b = route(&vip, c6.into(), 40000).unwrap().address;
    let want = encapsulated(&vip, b, conn_hash(&vip, c6.into(), 40000, 80), &unreach, None);
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &unreach);
    h.check("ICMPv6 unreachable", &input, XDP_TX, Some(&want), Reason::TxIcmpToBackend);

    // Time exceeded (IPv4 11, ICMPv6 3) is not forwarded: passed untouched.
    let quoted =
        V4::new(vip4, client, 6).packet(&tcp(vip4.into(), client.into(), 80, 40000, ACK, b""));
    let exceeded = V4::new(router, vip4, 1).packet(&icmp4(11, 0, [0; 4], &quoted[..28]));
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IP, &exceeded);
    h.check("time exceeded", &input, XDP_PASS, None, Reason::PassNoService);
    let exceeded6 = ipv6(router6, vip6, 58, 0, 64, &icmp6(router6, vip6, 3, 0, [0; 4], &quoted6));
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &exceeded6);
    h.check("ICMPv6 time exceeded", &input, XDP_PASS, None, Reason::PassNoService);
}

/// A packet-too-big about a backend's large IPv6 UDP reply that its source fragmented quotes
/// the IPv6 header, a fragment header (offset 0, next header UDP) and the UDP header: it goes to
/// the backend that owns the flow, or path-MTU discovery fails for such replies. An error
/// quoting a later fragment (no ports behind its header, IPv6 or IPv4) is passed.
#[test]
fn an_error_quoting_a_first_fragment_goes_to_the_owning_backend() {
    let Some(mut h) = Harness::new("fragment_quote_to_backend", FIXTURE_CONFIG) else { return };
    let (c6, vip6, router6) = (v6("2001:2::77"), v6("2001:2:0:1::1"), v6("2001:2::fe"));
    let ptb = |offset: u16, more: bool| {
        let off_m = (offset << 3) | u16::from(more);
        let mut frag = vec![17u8, 0];
        frag.extend(off_m.to_be_bytes());
        frag.extend(0x1234_5678u32.to_be_bytes());
        frag.extend(udp(vip6.into(), c6.into(), 53, 40000, &[0x5a; 64]));
        let quoted = ipv6(vip6, c6, 44, 0, 64, &frag);
        ipv6(router6, vip6, 58, 0, 64, &icmp6(router6, vip6, 2, 0, 1280u32.to_be_bytes(), &quoted))
    };
    let first = ptb(0, true);
    let vip = h.vip("v6udp");
    let b = route(&vip, c6.into(), 40000).unwrap().address;
    let want = encapsulated(&vip, b, conn_hash(&vip, c6.into(), 40000, 53), &first, None);
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &first);
    h.check("PTB quoting a first fragment", &input, XDP_TX, Some(&want), Reason::TxIcmpToBackend);

    // A later fragment: what follows its fragment header is data, not ports.
    let later = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &ptb(181, false));
    h.check("PTB quoting a later fragment", &later, XDP_PASS, None, Reason::PassNoService);

    // IPv4 likewise: unreachable quoting a later fragment of a UDP reply is passed; quoting the
    // first one (MF set, offset 0) it is routed.
    let (client, vip4, router) = (v4("198.18.4.7"), v4("198.18.1.1"), v4("198.18.0.254"));
    let mut f = V4::new(vip4, client, 17);
    (f.df, f.mf) = (false, true);
    let quoted = f.packet(&udp(vip4.into(), client.into(), 53, 40000, &[0x5a; 64]));
    let icmp = V4::new(router, vip4, 1).packet(&icmp4(3, 1, [0; 4], &quoted[..28]));
    let vip = h.vip("v4udp");
    let b = route(&vip, client.into(), 40000).unwrap().address;
    let want = encapsulated(&vip, b, conn_hash(&vip, client.into(), 40000, 53), &icmp, None);
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IP, &icmp);
    h.check(
        "unreachable quoting a first fragment",
        &input,
        XDP_TX,
        Some(&want),
        Reason::TxIcmpToBackend,
    );
    (f.mf, f.frag_offset) = (false, 9);
    let quoted = f.packet(&udp(vip4.into(), client.into(), 53, 40000, &[0x5a; 64]));
    let icmp = V4::new(router, vip4, 1).packet(&icmp4(3, 1, [0; 4], &quoted[..28]));
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IP, &icmp);
    h.check("unreachable quoting a later fragment", &input, XDP_PASS, None, Reason::PassNoService);
}

#[test]
fn pass_and_drop_policy_fixtures() {
    let Some(mut h) = Harness::new("pass_and_drop_policy_fixtures", FIXTURE_CONFIG) else { return };
    let c = v4("198.18.4.7");
    let vip = v4("198.18.1.1");

    // IPv4 options: dropped towards a VIP, passed otherwise.
    let mut o = V4::new(c, vip, 6);
    o.options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let p = o.packet(&tcp(c.into(), vip.into(), 40000, 80, SYN, b""));
    h.check(
        "IPv4 options to VIP",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &p),
        XDP_DROP,
        Some(&eth(LB_MAC, CLIENT_MAC, ETH_IP, &p)),
        Reason::DropIpOptions,
    );
    o.dst = v4("198.18.0.2");
    let p = o.packet(&tcp(c.into(), o.dst.into(), 40000, 80, SYN, b""));
    h.check(
        "IPv4 options to non-VIP",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &p),
        XDP_PASS,
        None,
        Reason::PassNotVip,
    );

    // Fragments towards a VIP: dropped (first and later fragments alike).
    let mut f = V4::new(c, vip, 17);
    f.mf = true;
    let p = f.packet(&udp(c.into(), vip.into(), 5353, 53, &[0; 32]));
    h.check(
        "v4 first fragment to VIP",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &p),
        XDP_DROP,
        Some(&eth(LB_MAC, CLIENT_MAC, ETH_IP, &p)),
        Reason::DropFragment,
    );
    f.mf = false;
    f.frag_offset = 5;
    let p = f.packet(&[0; 16]);
    h.check(
        "v4 last fragment to VIP",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &p),
        XDP_DROP,
        Some(&eth(LB_MAC, CLIENT_MAC, ETH_IP, &p)),
        Reason::DropFragment,
    );
    f.dst = v4("198.18.0.2");
    let p = f.packet(&[0; 16]);
    h.check(
        "v4 fragment to non-VIP",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &p),
        XDP_PASS,
        None,
        Reason::PassNotVip,
    );

    let (c6, vip6) = (v6("2001:2::77"), v6("2001:2:0:1::1"));
    let frag_hdr = [6u8, 0, 0, 1, 0, 0, 0, 42];
    let p = ipv6(
        c6,
        vip6,
        44,
        0,
        64,
        &[&frag_hdr[..], &tcp(c6.into(), vip6.into(), 1, 80, SYN, b"")].concat(),
    );
    h.check(
        "v6 fragment to VIP",
        &eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p),
        XDP_DROP,
        Some(&eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p)),
        Reason::DropFragment,
    );
    let hbh = [6u8, 0, 1, 4, 0, 0, 0, 0];
    let p = ipv6(
        c6,
        vip6,
        0,
        0,
        64,
        &[&hbh[..], &tcp(c6.into(), vip6.into(), 1, 80, SYN, b"")].concat(),
    );
    h.check(
        "v6 extension header to VIP",
        &eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p),
        XDP_DROP,
        Some(&eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p)),
        Reason::DropIpOptions,
    );

    // An atomic fragment (offset 0, M clear) is a whole packet (RFC 6946): balanced as one,
    // its fragment header stepped over (once), and answered with a packet-too-big quoting it
    // with the ports behind it when it would not fit encapsulated.
    let atomic = |next: u8, rest: &[u8]| {
        ipv6(c6, vip6, 44, 0, 64, &[&[next, 0, 0, 0, 0, 0, 0, 42][..], rest].concat())
    };
    let p = atomic(6, &tcp(c6.into(), vip6.into(), 1, 80, SYN, b""));
    let v6vip = h.vip("v6");
    let backend = route(&v6vip, c6.into(), 1).unwrap().address;
    let hash = conn_hash(&v6vip, c6.into(), 1, 80);
    h.check(
        "v6 atomic fragment to VIP",
        &eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p),
        XDP_TX,
        Some(&encapsulated(&v6vip, backend, hash, &p, None)),
        Reason::TxEncap,
    );
    let p = atomic(6, &tcp(c6.into(), vip6.into(), 1, 80, ACK, &[0x5a; 1400]));
    let answer = icmp6(vip6, c6, 2, 0, 1460u32.to_be_bytes(), &p[..56]);
    h.check(
        "v6 atomic fragment too big to forward",
        &eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p),
        XDP_TX,
        Some(&eth(CLIENT_MAC, LB_MAC, ETH_IPV6, &ipv6(vip6, c6, 58, 0, 64, &answer))),
        Reason::TxIcmpTooBig,
    );
    for (name, p, reason) in [
        ("a second fragment header", atomic(44, &frag_hdr), Reason::DropFragment),
        ("a hop-by-hop header", atomic(0, &hbh), Reason::DropIpOptions),
        ("no room for its header", ipv6(c6, vip6, 44, 0, 64, &[6, 0, 0, 0]), Reason::DropFragment),
    ] {
        let f = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p);
        h.check(&format!("v6 atomic fragment, {name}"), &f, XDP_DROP, Some(&f), reason);
    }

    // ESP and AH towards a VIP's address: not served, passed to the kernel, in IPv6 as in IPv4.
    for (name, next) in [("ESP", 50u8), ("AH", 51)] {
        let p = ipv6(c6, vip6, next, 0, 64, &[0; 24]);
        let f = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p);
        h.check(&format!("v6 {name} to VIP"), &f, XDP_PASS, None, Reason::PassNoService);
        let p = V4::new(c, vip, next).packet(&[0; 24]);
        let f = eth(LB_MAC, CLIENT_MAC, ETH_IP, &p);
        h.check(&format!("v4 {name} to VIP"), &f, XDP_PASS, None, Reason::PassNoService);
    }

    // Not for a VIP: untouched.
    let p = tcp4("198.18.4.7", 40000, "198.18.0.2", 22, SYN);
    h.check("non-VIP v4", &eth(LB_MAC, CLIENT_MAC, ETH_IP, &p), XDP_PASS, None, Reason::PassNotVip);
    let p = tcp6("2001:2::77", 40000, "2001:2::2", 22, SYN);
    h.check(
        "non-VIP v6",
        &eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p),
        XDP_PASS,
        None,
        Reason::PassNotVip,
    );
    let p = tcp4("198.18.4.7", 40000, "198.18.1.1", 8080, SYN);
    h.check(
        "VIP address, unserved port",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &p),
        XDP_PASS,
        None,
        Reason::PassNotVip,
    );
    let arp = [
        0u8, 1, 8, 0, 6, 4, 0, 1, 2, 0xed, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18, 0,
        2,
    ];
    h.check("ARP", &eth([0xff; 6], CLIENT_MAC, ETH_ARP, &arp), XDP_PASS, None, Reason::PassNotIp);
    let gre = V4::new(c, vip, 47).packet(&[0; 8]);
    h.check(
        "other protocol to VIP address",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &gre),
        XDP_PASS,
        None,
        Reason::PassNoService,
    );

    // L7 VIP: to the kernel stack.
    let p = tcp4("198.18.4.7", 40000, "198.18.1.6", 80, SYN);
    h.check("L7 VIP", &eth(LB_MAC, CLIENT_MAC, ETH_IP, &p), XDP_PASS, None, Reason::PassL7);
}

/// A UDP datagram larger than `mtu` less the encapsulation (20 bytes to an IPv4 backend, 40 to
/// an IPv6 one) never reaches a VIP: with DF (Linux's default for UDP) it is answered with
/// frag-needed / packet-too-big (`tx_icmp_too_big`), without it dropped (`drop_too_big`), and
/// once the client fragments it, its fragments are dropped (`drop_fragment`). One byte less goes
/// through. What README, ARCHITECTURE and CONFIG tell operators of UDP services.
#[test]
fn udp_datagrams_past_the_mtu_less_the_encapsulation_never_reach_a_vip() {
    let test = "udp_datagrams_past_the_mtu_less_the_encapsulation_never_reach_a_vip";
    let Some(mut h) = Harness::new(test, FIXTURE_CONFIG) else { return };
    assert_eq!(h.cfg.node.mtu, 1500);
    let (c4, vip4) = (v4("198.18.4.7"), v4("198.18.1.1"));
    // IPv4 to IPv4 backends (IPIP, 20 bytes): 1480 goes through, 1481 does not.
    let datagram = |len: usize| udp4("198.18.4.7", 5353, "198.18.1.1", 53, &vec![0x5a; len - 28]);
    forwarded(&mut h, "v4 UDP of mtu - 20", "v4udp", c4.into(), 5353, datagram(1480));
    let big = datagram(1481);
    let mut err = V4::new(vip4, c4, 1);
    err.df = false;
    let answer = err.packet(&icmp4(3, 4, [0, 0, 0x05, 0xc8], &big[..28]));
    h.check(
        "v4 UDP of mtu - 19 with DF",
        &eth(LB_MAC, CLIENT_MAC, ETH_IP, &big),
        XDP_TX,
        Some(&eth(CLIENT_MAC, LB_MAC, ETH_IP, &answer)),
        Reason::TxIcmpTooBig,
    );
    let mut hdr = V4::new(c4, vip4, 17);
    hdr.df = false;
    let whole = udp(c4.into(), vip4.into(), 5353, 53, &[0x5a; 1481 - 28]);
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IP, &hdr.packet(&whole));
    h.check("v4 UDP of mtu - 19 without DF", &input, XDP_DROP, None, Reason::DropTooBig);
    // The client fragments it (at 1480 bytes of payload, a multiple of 8): both pieces dropped.
    hdr.mf = true;
    let first = eth(LB_MAC, CLIENT_MAC, ETH_IP, &hdr.packet(&whole[..1456]));
    h.check("its first fragment", &first, XDP_DROP, None, Reason::DropFragment);
    hdr.mf = false;
    hdr.frag_offset = 1456 / 8;
    let last = eth(LB_MAC, CLIENT_MAC, ETH_IP, &hdr.packet(&whole[1456..]));
    h.check("its last fragment", &last, XDP_DROP, None, Reason::DropFragment);

    // IPv6 to IPv6 backends (IP6IP6, 40 bytes): 1460 goes through, 1461 does not.
    let (c6, vip6) = (v6("2001:2::77"), v6("2001:2:0:1::1"));
    let datagram6 = |len: usize| {
        ipv6(c6, vip6, 17, 0, 64, &udp(c6.into(), vip6.into(), 5353, 53, &vec![0x5a; len - 48]))
    };
    forwarded(&mut h, "v6 UDP of mtu - 40", "v6udp", c6.into(), 5353, datagram6(1460));
    let big6 = datagram6(1461);
    let answer =
        ipv6(vip6, c6, 58, 0, 64, &icmp6(vip6, c6, 2, 0, 1460u32.to_be_bytes(), &big6[..48]));
    h.check(
        "v6 UDP of mtu - 39",
        &eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &big6),
        XDP_TX,
        Some(&eth(CLIENT_MAC, LB_MAC, ETH_IPV6, &answer)),
        Reason::TxIcmpTooBig,
    );
    // The client fragments it after that answer: its first fragment (UDP header inside) dropped.
    let whole6 = udp(c6.into(), vip6.into(), 5353, 53, &[0x5a; 1461 - 48]);
    let frag_hdr = [17u8, 0, 0, 1, 0, 0, 0, 7]; // offset 0, more fragments, id 7
    let first6 = ipv6(c6, vip6, 44, 0, 64, &[&frag_hdr[..], &whole6[..1232]].concat());
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &first6);
    h.check("its first IPv6 fragment", &input, XDP_DROP, None, Reason::DropFragment);
}

#[test]
fn truncated_headers_pass_untouched() {
    let Some(mut h) = Harness::new("truncated_headers_pass_untouched", FIXTURE_CONFIG) else {
        return;
    };
    let v4f = eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4("198.18.4.7", 40000, "198.18.1.1", 80, SYN));
    let v6f =
        eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &tcp6("2001:2::77", 40000, "2001:2:0:1::1", 80, SYN));
    let vlan =
        eth_vlan(LB_MAC, CLIENT_MAC, 7, ETH_IP, &tcp4("198.18.4.7", 40000, "198.18.1.1", 80, SYN));
    // Cut inside the VLAN tag, the IP header, and the ports: every layer. (BPF_PROG_TEST_RUN
    // needs at least an Ethernet header, so the shortest frame is 14 bytes.)
    for (name, frame, cut_to) in
        [("v4", &v4f, 14 + 20 + 4), ("v6", &v6f, 14 + 40 + 4), ("vlan", &vlan, 18 + 20 + 4)]
    {
        for len in 14..cut_to {
            let f = &frame[..len];
            h.check(
                &format!("{name} truncated to {len}"),
                f,
                XDP_PASS,
                None,
                Reason::PassMalformed,
            );
        }
    }
    // An L4 header cut short inside the IP packet, the frame padded to Ethernet's minimum: the
    // ports and flags would be read from the padding.
    // (Or carrying a trailer after it: bytes past the IP packet's length.)
    let padded = |ip: Vec<u8>| {
        let mut f = eth(LB_MAC, CLIENT_MAC, ETH_IP, &ip);
        f.resize(f.len().max(60) + if f.len() >= 60 { 16 } else { 0 }, 0);
        f
    };
    let (c, any) = (v4("198.18.4.7"), v4("198.18.1.3"));
    let no_l4 = padded(V4::new(c, any, 6).packet(&[]));
    h.check("TCP without a header, padded", &no_l4, XDP_PASS, None, Reason::PassMalformed);
    let no_udp = padded(V4::new(c, any, 17).packet(&[0; 7]));
    h.check("UDP header cut short, padded", &no_udp, XDP_PASS, None, Reason::PassMalformed);
    let syn = tcp(c.into(), v4("198.18.1.1").into(), 40000, 80, SYN, b"");
    let cut = padded(V4::new(c, v4("198.18.1.1"), 6).packet(&syn[..13]));
    h.check("TCP header cut before its flags", &cut, XDP_PASS, None, Reason::PassMalformed);
    // ICMP to a VIP address: the ICMP header, and an error's quoted header and ports, within
    // the IP packet too.
    let no_icmp = padded(V4::new(c, v4("198.18.1.1"), 1).packet(&[]));
    h.check("ICMP without a header, padded", &no_icmp, XDP_PASS, None, Reason::PassMalformed);
    let (vip, router) = (v4("198.18.1.1"), v4("198.18.0.254"));
    let quoted = V4::new(vip, c, 6).packet(&tcp(vip.into(), c.into(), 80, 40000, ACK, b""));
    let short = V4::new(router, vip, 1).packet(&icmp4(3, 4, [0, 0, 5, 0], &quoted[..22]));
    let short = padded(short);
    h.check("frag-needed quoting no ports, padded", &short, XDP_PASS, None, Reason::PassMalformed);

    // IP total length larger than the frame.
    let mut lying = v4f.clone();
    lying[16..18].copy_from_slice(&200u16.to_be_bytes());
    h.check("v4 total length beyond frame", &lying, XDP_PASS, None, Reason::PassMalformed);
    let mut lying6 = v6f.clone();
    lying6[18..20].copy_from_slice(&400u16.to_be_bytes());
    h.check("v6 payload length beyond frame", &lying6, XDP_PASS, None, Reason::PassMalformed);
}

/// The backends' decapsulator carries the outer header's congestion marks into the inner
/// packet (RFC 6040): CE marks an ECN-capable packet and drops one that is not; ECT(1) replaces
/// ECT(0); with nothing to carry the inner packet comes out as it went in.
#[test]
fn decapsulation_carries_congestion_marks() {
    if !require_privileged("decapsulation_carries_congestion_marks") {
        return;
    }
    let mut aux = edgelb::dataplane::AuxPrograms::load().expect("aux programs load");
    let mut run = |frame: &[u8]| run_decap(&mut aux, frame);
    let (c, vip) = (v4("198.18.4.7"), v4("198.18.1.1"));
    let inner4 = |tos: u8| {
        let mut h = V4::new(c, vip, 6);
        h.tos = tos;
        h.packet(&tcp(c.into(), vip.into(), 40000, 80, SYN, b""))
    };
    let ipip = |outer_tos: u8, inner: &[u8]| {
        let mut h = V4::new(v4("198.19.0.1"), v4("198.18.0.11"), 4);
        h.tos = outer_tos;
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &h.packet(inner))
    };
    let (o6, b6) = (v6("2001:2:0:ff::1"), v6("2001:2::11"));
    let in6 = |class: u8, next: u8, inner: &[u8]| {
        eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &ipv6(o6, b6, next, (class as u32) << 20, 64, inner))
    };
    let (c6, vip6) = (v6("2001:2::77"), v6("2001:2:0:1::1"));
    let inner6 = |class: u8| {
        ipv6(
            c6,
            vip6,
            6,
            (class as u32) << 20,
            64,
            &tcp(c6.into(), vip6.into(), 40000, 80, SYN, b""),
        )
    };
    // (outer ECN, inner ECN, what comes out: the inner ECN, or None for a drop)
    let cases = [
        (0b11, 0b10, Some(0b11)),
        (0b11, 0b01, Some(0b11)),
        (0b11, 0b11, Some(0b11)),
        (0b11, 0b00, None),
        (0b01, 0b10, Some(0b01)),
        (0b01, 0b00, Some(0b00)),
        (0b10, 0b00, Some(0b00)),
        (0b00, 0b10, Some(0b10)),
    ];
    for (outer, inner, want) in cases {
        // The DSCP bits (EF) ride along untouched.
        let (o, i) = (0xb8 | outer, 0xb8 | inner);
        let name = format!("outer ECN {outer:02b}, inner {inner:02b}");
        for (kind, frame, out) in [
            (
                "IPIP",
                ipip(o, &inner4(i)),
                want.map(|w| eth(LB_MAC, CLIENT_MAC, ETH_IP, &inner4(0xb8 | w))),
            ),
            (
                "4in6",
                in6(o, 4, &inner4(i)),
                want.map(|w| eth(LB_MAC, CLIENT_MAC, ETH_IP, &inner4(0xb8 | w))),
            ),
            (
                "IP6IP6",
                in6(o, 41, &inner6(i)),
                want.map(|w| eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &inner6(0xb8 | w))),
            ),
        ] {
            let (verdict, got) = run(&frame);
            match out {
                Some(out) => {
                    assert_eq!(verdict, XDP_PASS, "{kind} {name}");
                    assert_eq!(hex(&got), hex(&out), "{kind} {name}: the inner packet");
                }
                None => assert_eq!(verdict, XDP_DROP, "{kind} {name}"),
            }
        }
    }
}

/// One test run of the backends' decapsulator on `frame`: its verdict and the frame after it.
fn run_decap(aux: &mut edgelb::dataplane::AuxPrograms, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 64];
    let opts =
        TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
    let prog = aux.program(lb_common::programs::DECAP).unwrap();
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// With `--allow-source`, the decapsulator strips only tunnels from the balancers' source
/// prefixes: one from anywhere else passes untouched (the kernel, without tunnel modules, drops
/// it), so no one else can hand the backend an inner packet from a source of their choosing.
/// Without, it strips every tunnel.
#[test]
fn the_decapsulator_takes_tunnels_only_from_allowed_sources() {
    if !require_privileged("the_decapsulator_takes_tunnels_only_from_allowed_sources") {
        return;
    }
    let (c, vip) = (v4("10.0.0.5"), v4("198.18.1.1"));
    let inner = V4::new(c, vip, 17).packet(&udp(c.into(), vip.into(), 514, 514, b"spoofed"));
    let ipip = |src: &str| {
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &V4::new(v4(src), v4("198.18.0.11"), 4).packet(&inner))
    };
    let (c6, vip6) = (v6("2001:db8::5"), v6("2001:2:0:1::1"));
    let inner6 = ipv6(c6, vip6, 17, 0, 64, &udp(c6.into(), vip6.into(), 514, 514, b"spoofed"));
    let ip6ip6 = |src: &str| {
        eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &ipv6(v6(src), v6("2001:2::11"), 41, 0, 64, &inner6))
    };
    let stripped4 = eth(LB_MAC, CLIENT_MAC, ETH_IP, &inner);
    let stripped6 = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &inner6);
    let mut open = edgelb::dataplane::AuxPrograms::load().expect("aux programs load");
    assert_eq!(run_decap(&mut open, &ipip("203.0.113.9")), (XDP_PASS, stripped4.clone()));
    let mut aux = edgelb::dataplane::AuxPrograms::load().expect("aux programs load");
    aux.allow_decap_sources(&[
        ("198.19.0.0".parse().unwrap(), 16),
        ("2001:2:0:ff::".parse().unwrap(), 96),
    ])
    .unwrap();
    let cases = [
        ("IPIP from the balancer", ipip("198.19.3.4"), stripped4.clone()),
        ("IPIP from elsewhere", ipip("203.0.113.9"), ipip("203.0.113.9")),
        ("IPIP from next to the prefix", ipip("198.20.0.1"), ipip("198.20.0.1")),
        ("IP6IP6 from the balancer", ip6ip6("2001:2:0:ff::7"), stripped6.clone()),
        ("IP6IP6 from elsewhere", ip6ip6("2001:db8:ff::7"), ip6ip6("2001:db8:ff::7")),
    ];
    for (name, frame, want) in cases {
        let (verdict, got) = run_decap(&mut aux, &frame);
        assert_eq!((verdict, hex(&got)), (XDP_PASS, hex(&want)), "{name}");
    }
    assert!(aux.allow_decap_sources(&[("198.19.0.0".parse().unwrap(), 33)]).is_err());
}

/// The decapsulator strips only what the kernel's own tunnel would take: a tunnel in a frame to
/// a group MAC (broadcast, multicast), or whose outer IPv4 header checksum fails, passes
/// untouched, though it comes from an allowed source. The outer source decides what is taken,
/// so a header that would not verify is not trusted for it.
#[test]
fn the_decapsulator_leaves_group_frames_and_bad_checksums_alone() {
    if !require_privileged("the_decapsulator_leaves_group_frames_and_bad_checksums_alone") {
        return;
    }
    let mut aux = edgelb::dataplane::AuxPrograms::load().expect("aux programs load");
    aux.allow_decap_sources(&[
        ("198.19.0.0".parse().unwrap(), 16),
        ("2001:2:0:ff::".parse().unwrap(), 96),
    ])
    .unwrap();
    let (c, vip) = (v4("198.18.4.7"), v4("198.18.1.1"));
    let inner = V4::new(c, vip, 6).packet(&tcp(c.into(), vip.into(), 40000, 80, SYN, b""));
    let outer = V4::new(v4("198.19.0.1"), v4("198.18.0.11"), 4).packet(&inner);
    let (c6, vip6) = (v6("2001:2::77"), v6("2001:2:0:1::1"));
    let inner6 = ipv6(c6, vip6, 6, 0, 64, &tcp(c6.into(), vip6.into(), 40000, 80, SYN, b""));
    let outer6 = ipv6(v6("2001:2:0:ff::1"), v6("2001:2::11"), 41, 0, 64, &inner6);
    // The same tunnels to this host's MAC are stripped: only what the cases change matters.
    let good = eth(LB_MAC, CLIENT_MAC, ETH_IP, &outer);
    assert_eq!(run_decap(&mut aux, &good), (XDP_PASS, eth(LB_MAC, CLIENT_MAC, ETH_IP, &inner)));
    let good6 = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &outer6);
    let stripped6 = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &inner6);
    assert_eq!(run_decap(&mut aux, &good6), (XDP_PASS, stripped6));

    let broadcast = [0xff; 6];
    let multicast = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
    let multicast6 = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];
    // The outer IPv4 header starts after the 14 bytes of Ethernet; its checksum is at 10.
    let mut bad_sum = good.clone();
    bad_sum[14 + 10] ^= 0x40;
    // A source changed (198.19.0.1 to .3, still allowed) with the checksum left as it was.
    let mut bad_src = good.clone();
    bad_src[14 + 15] ^= 2;
    let cases = [
        ("IPIP to the broadcast MAC", eth(broadcast, CLIENT_MAC, ETH_IP, &outer)),
        ("IPIP to a multicast MAC", eth(multicast, CLIENT_MAC, ETH_IP, &outer)),
        ("IP6IP6 to a multicast MAC", eth(multicast6, CLIENT_MAC, ETH_IPV6, &outer6)),
        ("IPIP with a wrong header checksum", bad_sum),
        ("IPIP with a source its checksum does not cover", bad_src),
    ];
    for (name, frame) in cases {
        let (verdict, got) = run_decap(&mut aux, &frame);
        assert_eq!((verdict, hex(&got)), (XDP_PASS, hex(&frame)), "{name}: passed untouched");
    }
}

/// Config with `backends` (address, weight) for VIP v4tcp only.
fn one_vip(backends: &[(&str, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| {
            let last: u8 = a.rsplit('.').next().unwrap().parse().unwrap();
            format!("{{ address = \"{a}\", weight = {w}, mac = \"02:ed:00:00:00:{last:02x}\" }}")
        })
        .collect();
    format!(
        "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\n\n[[vip]]\nname = \"v4tcp\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{}]\n",
        list.join(", ")
    )
}

/// Outer destination of an IPIP frame.
fn outer_dst(frame: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]))
}

/// The first of `clients` whose new flows move when `vip` becomes `next` (other backends), and
/// its backend on `vip`.
fn client_that_moves(
    vip: &Vip,
    next: &Vip,
    mut clients: impl Iterator<Item = IpAddr>,
) -> (IpAddr, IpAddr) {
    clients
        .find_map(|c| {
            let before = route(vip, c, 0).unwrap().address;
            (before != route(next, c, 0).unwrap().address).then_some((c, before))
        })
        .expect("some client moves when a backend is added")
}

/// A client in 198.18.5.0/24 whose backend on `h`'s `v4tcp` VIP changes when its pool grows
/// from [`THREE`] to [`FOUR`], and its backend before.
fn client_moved_by_a_fourth(h: &Harness) -> (IpAddr, IpAddr) {
    let cfg4 = Config::parse(&one_vip(&FOUR), "x".as_ref()).unwrap();
    let clients = (1..=250u8).map(|i| IpAddr::V4(Ipv4Addr::new(198, 18, 5, i)));
    client_that_moves(&h.vip("v4tcp"), &cfg4.vips[0], clients)
}

#[test]
fn connection_table_keeps_flows_across_ring_changes() {
    let three = THREE;
    // Pinned: the SYN's handshake slot and the table are this CPU's.
    let Some(mut h) =
        Harness::pinned("connection_table_keeps_flows_across_ring_changes", &one_vip(&three))
    else {
        return;
    };
    // Find a client whose backend changes when a fourth backend joins.
    let (four, (client, first)) = (FOUR, client_moved_by_a_fourth(&h));
    let frame = |sport: u16, flags: u8| {
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4(&client.to_string(), sport, "198.18.1.1", 80, flags))
    };
    let (_, out) = h.run(&frame(50000, SYN));
    assert_eq!(outer_dst(&out), first);
    let new_flows = h.dp.vip_counters(&h.vip("v4tcp")).unwrap().new_flows;

    // Ring change: the established flow stays, a new flow from the same client moves.
    h.apply(&one_vip(&four));
    let moved_to = route(&h.vip("v4tcp"), client, 0).unwrap().address;
    let (_, out) = h.run(&frame(50000, ACK));
    assert_eq!(outer_dst(&out), first, "established flow keeps its backend after a ring change");
    assert_eq!(
        h.dp.vip_counters(&h.vip("v4tcp")).unwrap().new_flows,
        new_flows,
        "a table hit is not a new flow"
    );
    let (_, out) = h.run(&frame(50001, SYN));
    assert_eq!(outer_dst(&out), moved_to, "new flow follows the new ring");

    // Drain (weight 0): the established flow keeps going; new flows avoid the drained backend.
    let drained: Vec<(&str, u32)> =
        four.iter().map(|&(a, w)| (a, if a == first.to_string() { 0 } else { w })).collect();
    let first_s = first.to_string();
    h.apply(&one_vip(&drained));
    let (_, out) = h.run(&frame(50000, ACK));
    assert_eq!(outer_dst(&out), first, "drained backend keeps its established flow");
    for sport in 50100..50140 {
        let (_, out) = h.run(&frame(sport, SYN));
        assert_ne!(outer_dst(&out).to_string(), first_s, "no new flow to a drained backend");
    }

    // Removal: the flow re-hashes onto the current ring.
    let removed: Vec<(&str, u32)> = four.iter().copied().filter(|(a, _)| *a != first_s).collect();
    h.apply(&one_vip(&removed));
    let now = route(&h.vip("v4tcp"), client, 0).unwrap().address;
    let (_, out) = h.run(&frame(50000, ACK));
    assert_eq!(outer_dst(&out), now, "removed backend's flow is re-hashed");
    assert_ne!(now, first);
}

#[test]
fn a_port_reused_after_a_close_follows_its_new_handshake() {
    let three = THREE;
    let Some(mut h) = Harness::pinned("a_port_reused_after_a_close", &one_vip(&three)) else {
        return;
    };
    let (four, (client, first)) = (FOUR, client_moved_by_a_fourth(&h));
    let to = |h: &mut Harness, sport: u16, flags: u8| {
        let ip = tcp4(&client.to_string(), sport, "198.18.1.1", 80, flags);
        outer_dst(&h.run(&eth(LB_MAC, CLIENT_MAC, ETH_IP, &ip)).1)
    };
    // Three connections, established on the first backend: one the client ends with FIN, one
    // with RST, one it never ends where this node sees it.
    let ends = [(50000, FIN | ACK), (50001, RST), (50002, 0)];
    for &(sport, _) in &ends {
        assert_eq!(to(&mut h, sport, SYN), first);
        assert_eq!(to(&mut h, sport, ACK), first);
    }
    // The pool changes: a new connection from this client goes elsewhere.
    h.apply(&one_vip(&four));
    let moved_to = route(&h.vip("v4tcp"), client, 0).unwrap().address;
    for (sport, end) in ends {
        assert_eq!(to(&mut h, sport, ACK), first, "port {sport}: established flow stays");
        if end != 0 {
            assert_eq!(
                to(&mut h, sport, end),
                first,
                "port {sport}: its close goes to its backend"
            );
            assert_eq!(to(&mut h, sport, ACK), first, "port {sport}: so does its last ACK");
        }
        // The client reuses the port for a new connection.
        assert_eq!(to(&mut h, sport, SYN), moved_to, "port {sport}: a SYN follows the ring");
        let next = if end != 0 { moved_to } else { first };
        for _ in 0..2 {
            assert_eq!(
                to(&mut h, sport, ACK),
                next,
                "port {sport}: the new connection follows its SYN only after a close was seen"
            );
        }
    }
}

/// A segment with SYN and RST (or FIN) is a RST (FIN), not a SYN: Linux drops it at LISTEN, and
/// an in-window RST|SYN resets the backend's established socket. It goes to the flow's backend
/// and marks the flow's entry closing, so a new connection reusing the port follows its own
/// handshake.
#[test]
fn a_syn_with_rst_or_fin_ends_its_flow_rather_than_starting_one() {
    let Some(mut h) = Harness::pinned("a_syn_with_rst_or_fin", &one_vip(&THREE)) else {
        return;
    };
    let (four, (client, first)) = (FOUR, client_moved_by_a_fourth(&h));
    let to = |h: &mut Harness, sport: u16, flags: u8| {
        let ip = tcp4(&client.to_string(), sport, "198.18.1.1", 80, flags);
        outer_dst(&h.run(&eth(LB_MAC, CLIENT_MAC, ETH_IP, &ip)).1)
    };
    let ends = [(50000, SYN | RST), (50001, SYN | FIN), (50002, SYN | FIN | ACK)];
    for &(sport, _) in &ends {
        assert_eq!(to(&mut h, sport, SYN), first);
        assert_eq!(to(&mut h, sport, ACK), first);
    }
    // The pool changes: a new connection from this client goes elsewhere.
    h.apply(&one_vip(&four));
    let moved_to = route(&h.vip("v4tcp"), client, 0).unwrap().address;
    for (sport, end) in ends {
        assert_eq!(
            to(&mut h, sport, end),
            first,
            "port {sport}: {end:#x} goes to the flow's backend"
        );
        assert_eq!(
            to(&mut h, sport, SYN),
            moved_to,
            "port {sport}: a reuse's SYN follows the ring"
        );
        assert_eq!(to(&mut h, sport, ACK), moved_to, "port {sport}: the entry was marked closing");
    }
}

/// A CPU besides CPU 0 that this thread may run on (its affinity mask, which a CPU quota leaves
/// whole): the cross-CPU tests run on CPU 0, then move there. Ask before the thread is pinned.
fn second_cpu() -> Option<usize> {
    netns::runnable_cpus().expect("the thread's affinity mask").into_iter().find(|&c| c != 0)
}

/// [`second_cpu`]'s answer through the skip gate ([`netns::require`]): without a second CPU the
/// test skips with the reason, or fails under `EDGELB_REQUIRE_PRIVILEGED=1`.
fn require_second_cpu(test: &str, cpu: Option<usize>) -> Option<usize> {
    let why = format!(
        "{test}: needs a second CPU to move a flow to, and this thread may run on CPU 0 only \
         (its affinity mask)"
    );
    if !netns::require(cpu.is_some(), &why) {
        return None;
    }
    cpu
}

/// A flow its client ended on one CPU, whose packets then arrive on another, carries its
/// closing mark into that CPU's table: a reuse of its port there follows the new handshake.
#[test]
fn a_closing_mark_moves_with_its_flow_to_another_cpu() {
    // (Asked before the harness pins this thread to CPU 0.)
    let other = second_cpu();
    let Some(mut h) = Harness::pinned("a_closing_mark_moves_with_its_flow", &one_vip(&THREE))
    else {
        return;
    };
    let Some(other) =
        require_second_cpu("a_closing_mark_moves_with_its_flow_to_another_cpu", other)
    else {
        return;
    };
    let (four, (client, first)) = (FOUR, client_moved_by_a_fourth(&h));
    let to = |h: &mut Harness, flags: u8| {
        let ip = tcp4(&client.to_string(), 50000, "198.18.1.1", 80, flags);
        outer_dst(&h.run(&eth(LB_MAC, CLIENT_MAC, ETH_IP, &ip)).1)
    };
    assert_eq!(to(&mut h, SYN), first);
    assert_eq!(to(&mut h, ACK), first);
    assert_eq!(to(&mut h, FIN | ACK), first, "the client ends it, on CPU 0");
    h.apply(&one_vip(&four));
    let moved_to = route(&h.vip("v4tcp"), client, 0).unwrap().address;
    edgelb::testbed::netns::pin_current_thread(Some(other)).expect("pin to the other CPU");
    let found = ct_event(&h, lb_common::ct_stats::FOUND_ON_OTHER_CPU);
    assert_eq!(to(&mut h, ACK), first, "its last ACK, on CPU {other}, is found on CPU 0");
    assert_eq!(ct_event(&h, lb_common::ct_stats::FOUND_ON_OTHER_CPU), found + 1);
    assert_eq!(to(&mut h, SYN), moved_to, "the port reused: the SYN follows the ring");
    assert_eq!(to(&mut h, ACK), moved_to, "and the new connection follows its SYN");
}

#[test]
fn vips_without_a_connection_table_follow_the_ring() {
    let three = THREE;
    let off =
        |b: &[(&str, u32)]| one_vip(b).replacen("port = 80\n", "port = 80\nconntrack = false\n", 1);
    // Pinned: the end of the test finds a flow stored in one CPU's table.
    let Some(mut h) = Harness::pinned("vips_without_a_connection_table", &off(&three)) else {
        return;
    };
    let (four, (client, first)) = (FOUR, client_moved_by_a_fourth(&h));
    let frame = |flags: u8| {
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4(&client.to_string(), 50000, "198.18.1.1", 80, flags))
    };
    let missed = |h: &Harness| {
        h.dp.maps().ct_stats().unwrap()[lb_common::ct_stats::MISSED_ESTABLISHED as usize]
    };
    for flags in [SYN, ACK, ACK] {
        assert_eq!(outer_dst(&h.run(&frame(flags)).1), first);
    }
    assert_eq!(missed(&h), 0, "segments without SYN found no table to miss");
    // An ICMP error about the flow goes to its backend, and starts no flow.
    let new_flows = h.dp.vip_counters(&h.vip("v4tcp")).unwrap().new_flows;
    let (vip4, router) = (v4("198.18.1.1"), v4("198.18.0.254"));
    let IpAddr::V4(client4) = client else { panic!("an IPv4 client") };
    let quoted = V4::new(vip4, client4, 6).packet(&tcp(vip4.into(), client, 80, 50000, ACK, b""));
    let error = V4::new(router, vip4, 1).packet(&icmp4(3, 4, [0, 0, 0x05, 0x00], &quoted[..28]));
    let (verdict, out) = h.run(&eth(LB_MAC, CLIENT_MAC, ETH_IP, &error));
    assert_eq!((verdict, outer_dst(&out)), (XDP_TX, first), "frag-needed to the flow's backend");
    assert_eq!(
        h.dp.vip_counters(&h.vip("v4tcp")).unwrap().new_flows,
        new_flows,
        "an ICMP error is no new flow"
    );
    // A ring change moves the flow: nothing pins it.
    h.apply(&off(&four));
    let moved_to = route(&h.vip("v4tcp"), client, 0).unwrap().address;
    assert_eq!(outer_dst(&h.run(&frame(ACK)).1), moved_to, "the flow follows the ring");
    // With the table on again, the flow is not in it: nothing was stored while it was off.
    h.apply(&one_vip(&three));
    assert_eq!(outer_dst(&h.run(&frame(ACK)).1), first);
    assert_eq!(missed(&h), 1, "the flow was never stored");
    h.apply(&one_vip(&four));
    assert_eq!(outer_dst(&h.run(&frame(ACK)).1), first, "and now it is kept");
}

/// A config with one IPv6 VIP, 2001:2:0:1::1 port `port`, on backends 2001:2::`b` (hex).
fn one_vip6(port: u16, backends: &[u8]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ address = \"2001:2::{b:x}\", mac = \"02:ed:00:00:00:{b:02x}\" }}"))
        .collect();
    format!(
        "[node]\ninterfaces = [\"lo\"]\nencap_source_v6 = \"2001:2:0:ff::/96\"\n\n[[vip]]\nname = \"v6\"\naddress = \"2001:2:0:1::1\"\nport = {port}\nbackends = [{}]\n",
        list.join(", ")
    )
}

/// Outer destination of an IP6IP6 frame.
fn outer_dst6(frame: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap())
}

#[test]
fn ipv6_connection_table_keeps_flows_across_ring_changes() {
    let Some(mut h) =
        Harness::pinned("ipv6_connection_table_keeps_flows", &one_vip6(80, &[0x11, 0x12, 0x13]))
    else {
        return;
    };
    let cfg4 = Config::parse(&one_vip6(80, &[0x11, 0x12, 0x13, 0x14]), "x".as_ref()).unwrap();
    let clients = (1..=250u16).map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, i)));
    let (client, first) = client_that_moves(&h.vip("v6"), &cfg4.vips[0], clients);
    let frame = |sport: u16, flags: u8| {
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV6,
            &tcp6(&client.to_string(), sport, "2001:2:0:1::1", 80, flags),
        )
    };
    assert_eq!(IpAddr::V6(outer_dst6(&h.run(&frame(50000, SYN)).1)), first);
    h.apply(&one_vip6(80, &[0x11, 0x12, 0x13, 0x14]));
    let moved_to = route(&h.vip("v6"), client, 0).unwrap().address;
    assert_ne!(moved_to, first);
    assert_eq!(
        IpAddr::V6(outer_dst6(&h.run(&frame(50000, ACK)).1)),
        first,
        "established IPv6 flow keeps its backend after a ring change"
    );
    assert_eq!(IpAddr::V6(outer_dst6(&h.run(&frame(50001, SYN)).1)), moved_to, "new flow moves");
    // The first connection ends and its port comes back as a new connection, which follows its
    // new SYN (the closing mark in an IPv6 entry).
    let mut to = |flags: u8| IpAddr::V6(outer_dst6(&h.run(&frame(50000, flags)).1));
    assert_eq!(to(FIN | ACK), first, "its close goes to its backend");
    assert_eq!(to(SYN), moved_to);
    assert_eq!(to(ACK), moved_to, "a reused IPv6 port follows its new handshake");
    assert_eq!(to(ACK), moved_to);
}

/// A TCP segment of flow (client, source port) to 198.18.1.1:80 with `flags`.
fn vip_segment((client, sport): (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4(&client.to_string(), sport, "198.18.1.1", 80, flags))
}

/// Connection-table event `event` (`lb_common::ct_stats`), summed over the CPUs.
fn ct_event(h: &Harness, event: u32) -> u64 {
    h.dp.maps().ct_stats().unwrap()[event as usize]
}

/// `clients` each with source ports 1024..1280: flows to try for a bucket.
fn flows_of(clients: impl Iterator<Item = Ipv4Addr>) -> impl Iterator<Item = (Ipv4Addr, u16)> {
    clients.flat_map(|c| (1024..1280u16).map(move |p| (c, p)))
}

/// 65 536 consecutive client addresses from `base`.
fn clients_from(base: &str) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(v4(base));
    (0..1u32 << 16).map(move |n| Ipv4Addr::from(base + n))
}

/// The IPv4 connection-table bucket of a TCP flow to 198.18.1.1:80, as the XDP program computes it
/// in a table of `buckets` buckets per CPU.
fn bucket_of(buckets: u32, client: Ipv4Addr, sport: u16) -> u32 {
    let key = lb_common::FlowKeyV4 {
        src: u32::from_ne_bytes(client.octets()),
        dst: u32::from_ne_bytes([198, 18, 1, 1]),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    lb_common::hash::flow_key_v4_hash(&key, lb_common::HASH_SEED) & (buckets - 1)
}

/// The first `n` of `flows` (client, source port) that fall in one bucket of a table of
/// `buckets` buckets (more than `CONNTRACK_WAYS`: more than a bucket holds).
fn bucket_overflow(
    buckets: u32,
    n: usize,
    flows: impl Iterator<Item = (Ipv4Addr, u16)>,
) -> Vec<(Ipv4Addr, u16)> {
    let mut by_bucket: std::collections::HashMap<u32, Vec<(Ipv4Addr, u16)>> = Default::default();
    for (c, p) in flows {
        let same = by_bucket.entry(bucket_of(buckets, c, p)).or_default();
        same.push((c, p));
        if same.len() == n {
            return same.clone();
        }
    }
    panic!("no {n} flows share a bucket")
}

#[test]
fn connection_table_buckets_are_lru_and_searched_across_cpus() {
    let three = THREE;
    let Some(mut h) = Harness::new("connection_table_buckets_are_lru", &one_vip(&three)) else {
        return;
    };
    // (Asked before this thread is pinned to CPU 0.)
    let other = second_cpu();
    edgelb::testbed::netns::pin_current_thread(Some(0)).expect("pin to CPU 0");
    let buckets = h.dp.table_shape().v4_buckets;

    // Flows whose backend changes when a fourth backend joins: after that change, a flow still
    // on its first backend must have come from the table, one on the new ring's choice did not.
    let four = FOUR;
    let cfg4 = Config::parse(&one_vip(&four), "x".as_ref()).unwrap();
    let (vip3, vip4) = (h.vip("v4tcp"), cfg4.vips[0].clone());
    let (ring3, ring4) = (vip_ring(&vip3).unwrap(), vip_ring(&vip4).unwrap());
    let backend = |vip: &Vip, ring: &[u32], c: Ipv4Addr| {
        let slot = flow_hash(vip, c.into(), 0) % vip.ring_size;
        vip.backends[ring[slot as usize] as usize].address
    };
    // Six such flows in one bucket (CONNTRACK_WAYS + 2).
    let same_bucket = bucket_overflow(
        buckets,
        lb_common::CONNTRACK_WAYS + 2,
        flows_of(
            clients_from("198.18.64.0")
                .filter(|&c| backend(&vip3, &ring3, c) != backend(&vip4, &ring4, c)),
        ),
    );
    let (frame, ct) = (vip_segment, ct_event);
    let first = |f: (Ipv4Addr, u16)| backend(&vip3, &ring3, f.0);
    let moved = |f: (Ipv4Addr, u16)| backend(&vip4, &ring4, f.0);
    use lb_common::ct_stats::{EVICTED, FOUND_ON_OTHER_CPU, MISSED_ESTABLISHED};

    // Segments without SYN of flows no table holds (as after a restart without pins) are
    // counted as missed; the first waits in a handshake slot, the second enters the table, most
    // recent first. Flows 0..4 fill the bucket; touching flow 0 again makes flow 1 the least
    // recently used; flow 4 then pushes flow 1 out.
    for &f in &same_bucket[..4] {
        assert_eq!(outer_dst(&h.run(&frame(f, ACK)).1), first(f));
        assert_eq!(ct(&h, EVICTED), 0, "the first segment of an unknown flow evicts nothing");
        assert_eq!(outer_dst(&h.run(&frame(f, ACK)).1), first(f));
    }
    assert_eq!(ct(&h, MISSED_ESTABLISHED), 4);
    h.run(&frame(same_bucket[0], ACK));
    assert_eq!(ct(&h, EVICTED), 0, "four flows fit a bucket");
    h.run(&frame(same_bucket[4], ACK));
    assert_eq!(ct(&h, EVICTED), 0, "the fifth waits in its handshake slot");
    h.run(&frame(same_bucket[4], ACK));
    assert_eq!(ct(&h, EVICTED), 1, "and at its next segment evicts one");
    // Order now 4, 0, 3, 2. A SYN does not touch the table: its flow (5) waits in its handshake
    // slot, retransmission included, and nothing is pushed out.
    for _ in 0..2 {
        assert_eq!(outer_dst(&h.run(&frame(same_bucket[5], SYN)).1), first(same_bucket[5]));
    }
    assert_eq!((ct(&h, EVICTED), ct(&h, MISSED_ESTABLISHED)), (1, 5));
    // After a ring change, flows 0, 3 and 4 are table hits on their first backends; flow 5's
    // next packet finds its handshake slot (also its first backend, as its SYN had) and only then
    // enters the table, pushing out the least recent flow (2).
    h.apply(&one_vip(&four));
    for i in [0, 3, 4, 5] {
        let f = same_bucket[i];
        assert_eq!(outer_dst(&h.run(&frame(f, ACK)).1), first(f), "flow {i} kept");
    }
    assert_eq!(ct(&h, MISSED_ESTABLISHED), 5, "all four found");
    assert_eq!(ct(&h, EVICTED), 2, "flow 5 entered the table after its handshake");
    for i in [1, 2] {
        let f = same_bucket[i];
        assert_eq!(outer_dst(&h.run(&frame(f, ACK)).1), moved(f), "flow {i} pushed out");
    }
    assert_eq!(ct(&h, MISSED_ESTABLISHED), 7, "both missed");

    // Another CPU: an established TCP flow it has never seen is found in CPU 0's table; a SYN
    // for a new flow is placed by the ring without searching.
    let Some(other) =
        require_second_cpu("connection_table_buckets_are_lru_and_searched_across_cpus", other)
    else {
        return;
    };
    edgelb::testbed::netns::pin_current_thread(Some(other)).expect("pin to the other CPU");
    // (CPU 0's bucket now holds flows 2, 1, 5, 4: placing 1 and 2 pushed 0 and 3 out.)
    let f = same_bucket[4];
    let found = ct(&h, FOUND_ON_OTHER_CPU);
    assert_eq!(outer_dst(&h.run(&frame(f, ACK)).1), first(f), "established flow found on CPU 0");
    assert_eq!(ct(&h, FOUND_ON_OTHER_CPU), found + 1);
    let syn = same_bucket[5];
    assert_eq!(outer_dst(&h.run(&frame(syn, SYN)).1), moved(syn), "a SYN is placed by the ring");
}

#[test]
fn userspace_route_matches_the_kernel() {
    let Some(mut h) = Harness::new("userspace_route_matches_the_kernel", FIXTURE_CONFIG) else {
        return;
    };
    let vip = h.vip("v4tcp");
    let five = h.vip("five");
    let mut seen = std::collections::HashMap::new();
    for i in 0..500u32 {
        let c = Ipv4Addr::from(u32::from(v4("198.18.8.0")) + i);
        let sport = 1024 + (i * 7) as u16;
        let (_, out) = h.run(&eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &tcp4(&c.to_string(), sport, "198.18.1.1", 80, SYN),
        ));
        let got = outer_dst(&out);
        assert_eq!(got, route(&vip, c.into(), sport).unwrap().address, "client {c}");
        *seen.entry(got).or_insert(0) += 1;
        let (_, out) = h.run(&eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &tcp4(&c.to_string(), sport, "198.18.1.4", 80, SYN),
        ));
        assert_eq!(
            outer_dst(&out),
            route(&five, c.into(), sport).unwrap().address,
            "5-tuple {c}:{sport}"
        );
    }
    assert_eq!(seen.len(), 3);

    // The same VIP serving any port: the destination port is part of the 5-tuple, and `route`
    // predicts the kernel given the port (as `edgelb route` takes it from address:port).
    let any = FIXTURE_CONFIG.replace(
        "name = \"five\"\naddress = \"198.18.1.4\"\nport = 80\n",
        "name = \"five\"\naddress = \"198.18.1.4\"\n",
    );
    assert_ne!(any, FIXTURE_CONFIG);
    h.apply(&any);
    for i in 0..200u32 {
        let c = Ipv4Addr::from(u32::from(v4("198.18.8.0")) + i);
        let (sport, dport) = (2000 + i as u16, 1000 + (i * 13) as u16);
        let frame = tcp4(&c.to_string(), sport, "198.18.1.4", dport, SYN);
        let (_, out) = h.run(&eth(LB_MAC, CLIENT_MAC, ETH_IP, &frame));
        let mut v = h.vip("five");
        v.port = dport;
        assert_eq!(
            outer_dst(&out),
            route(&v, c.into(), sport).unwrap().address,
            "{c}:{sport} to :{dport}"
        );
    }
}

#[test]
fn counters_follow_forwarded_traffic() {
    let Some(mut h) = Harness::new("counters_follow_forwarded_traffic", FIXTURE_CONFIG) else {
        return;
    };
    let vip = h.vip("v4udp");
    let c: IpAddr = v4("198.18.4.50").into();
    let b = route(&vip, c, 0).unwrap().address;
    let frame =
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &udp4("198.18.4.50", 999, "198.18.1.1", 53, b"abc"));
    let before = h.dp.backend_counters(&vip, b).unwrap();
    for _ in 0..10 {
        assert_eq!(h.run(&frame).0, XDP_TX);
    }
    let vc = h.dp.vip_counters(&vip).unwrap();
    assert_eq!((vc.packets, vc.bytes, vc.new_flows), (10, 10 * frame.len() as u64, 1));
    let bc = h.dp.backend_counters(&vip, b).unwrap();
    assert_eq!(bc.packets - before.packets, 10);
}

/// A backend whose health check fails is left out of the effective config the controller
/// applies, but it is still configured: it is parked, not retired. Its flows re-hash at once,
/// yet its entry id, and so its counters, are kept, and they go on counting when it comes back
/// (retiring it reset them to zero at every health flap, a counter reset to Prometheus).
#[test]
fn a_down_backend_keeps_its_counters_while_its_flows_rehash() {
    let Some(mut h) =
        Harness::new("a_down_backend_keeps_its_counters_while_its_flows_rehash", FIXTURE_CONFIG)
    else {
        return;
    };
    let configured = h.cfg.clone();
    let vip = h.vip("v4udp");
    let frame = |client: Ipv4Addr| {
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &udp4(&client.to_string(), 999, "198.18.1.1", 53, b"abc"))
    };
    let client = v4("198.18.4.50");
    let b = route(&vip, client.into(), 0).unwrap().address;
    for _ in 0..5 {
        let (verdict, out) = h.run(&frame(client));
        assert_eq!((verdict, outer_dst(&out)), (XDP_TX, b));
    }
    let id = h.dp.backend_id(&vip, b).unwrap();
    let counted = h.dp.backend_counters(&vip, b).unwrap().packets;
    assert!(counted >= 5);

    // Down: the effective config leaves it out.
    let mut eff = configured.clone();
    eff.vips.iter_mut().find(|v| v.name == "v4udp").unwrap().backends.retain(|x| x.address != b);
    let r = h.dp.apply_keeping(&eff, &configured).unwrap();
    assert_eq!((r.backends_parked, r.backends_removed), (1, 0));
    assert_eq!(h.dp.backend_id(&vip, b), Some(id), "a down backend keeps its entry");
    assert_eq!(h.dp.backend_counters(&vip, b).unwrap().packets, counted, "and its counters");
    let entry = h.dp.maps().backends.get(&id, 0).unwrap();
    assert_eq!(entry.flags & lb_common::backend_flags::PRESENT, 0, "absent for the program");
    let (verdict, out) = h.run(&frame(client));
    assert_eq!(verdict, XDP_TX);
    assert_ne!(outer_dst(&out), b, "a down backend's flow re-hashes");

    // Back: the same id under a new generation, and its counters go on from where they were.
    let r = h.dp.apply_keeping(&configured, &configured).unwrap();
    assert_eq!((r.backends_restored, r.backends_added), (1, 0));
    assert_eq!(h.dp.backend_id(&vip, b), Some(id));
    assert_ne!(h.dp.maps().backends.get(&id, 0).unwrap().generation, entry.generation);
    let other = (51..=250)
        .map(|i| Ipv4Addr::new(198, 18, 4, i))
        .find(|&c| route(&vip, c.into(), 0).unwrap().address == b)
        .expect("a client the ring gives to the restored backend");
    let (verdict, out) = h.run(&frame(other));
    assert_eq!((verdict, outer_dst(&out)), (XDP_TX, b));
    assert_eq!(h.dp.backend_counters(&vip, b).unwrap().packets, counted + 1);

    // Removed from the config for good: retired, its id free again.
    let r = h.dp.apply_keeping(&eff, &eff).unwrap();
    assert_eq!(r.backends_removed, 1);
    assert_eq!(h.dp.backend_id(&vip, b), None);
}

/// A pin directory removed when dropped (teardown, whatever it leaves).
struct PinDir(std::path::PathBuf);

impl PinDir {
    fn new(what: &str) -> PinDir {
        PinDir(format!("/sys/fs/bpf/edgelb-fixture-{what}-{}", std::process::id()).into())
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = Dataplane::teardown(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config may remove every VIP (a node put into maintenance) while the connection tables
/// still name their backend ids. A restart then adopts maps without a VIP: it must still learn
/// the ids' generations, or the next config hands an id out under the generation its old
/// entries carry, and they send flows to whatever backend now holds it.
#[test]
fn backend_generations_survive_a_restart_with_no_vip() {
    if !require_privileged("backend_generations_survive_a_restart_with_no_vip") {
        return;
    }
    let dir = PinDir::new("gen");
    let cfg = Config::parse(&one_vip(&[("198.18.0.11", 1)]), "x".as_ref()).unwrap();
    let empty = Config::parse("[node]\ninterfaces = [\"lo\"]\n", "x".as_ref()).unwrap();
    // The backend's id and generation: what a connection-table entry names it by.
    let named = |dp: &Dataplane| {
        let id = dp.backend_id(&cfg.vips[0], v4("198.18.0.11").into()).unwrap();
        (id, dp.maps().backends.get(&id, 0).unwrap().generation)
    };
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    dp.apply(&cfg).unwrap();
    let first = named(&dp);
    dp.apply(&empty).unwrap();
    drop(dp);
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    dp.apply(&cfg).unwrap();
    assert_ne!(named(&dp), first, "an id handed out again under its old generation");
}

/// A restart (or a takeover) adopts the pinned maps: a parked backend is adopted with its id,
/// so its counters carry over to the new process as the serving backends' do.
#[test]
fn a_restart_adopts_parked_backends() {
    if !require_privileged("a_restart_adopts_parked_backends") {
        return;
    }
    let dir = PinDir::new("parked");
    let cfg =
        Config::parse(&one_vip(&[("198.18.0.11", 1), ("198.18.0.12", 1)]), "x".as_ref()).unwrap();
    let down: IpAddr = v4("198.18.0.12").into();
    let mut eff = cfg.clone();
    eff.vips[0].backends.retain(|b| b.address != down);
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    dp.apply(&cfg).unwrap();
    dp.apply_keeping(&eff, &cfg).unwrap();
    let id = dp.backend_id(&cfg.vips[0], down).expect("parked, not retired");
    drop(dp);
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    assert_eq!(dp.backend_id(&cfg.vips[0], down), Some(id), "adopted with its id");
    let r = dp.apply_keeping(&eff, &cfg).unwrap();
    assert!(r.is_empty(), "nothing to change after adopting: {r:?}");

    // An older edgelb, which does not know PARKED, took over meanwhile and gave the backend,
    // back up, a new id, leaving the parked entry behind. Adopting both, one id per backend:
    // the present one; the parked one is free again, not owned by nobody and never retired.
    let present = lb_common::backend_flags::PRESENT;
    let entry = dp.maps().backends.get(&id, 0).unwrap();
    let other = (0..64u32).find(|i| dp.maps().backends.get(i, 0).unwrap().flags == 0).unwrap();
    assert!(other > id, "the older edgelb's id comes after the parked one here");
    dp.maps_mut().backends.set(other, &lb_common::Backend { flags: present, ..entry }, 0).unwrap();
    drop(dp);
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    assert_eq!(dp.backend_id(&cfg.vips[0], down), Some(other), "the present entry is adopted");
    // The parked one's id is free already: not held for nobody.
    assert!(!dp.backend_id_held(id), "id {id} free");
    // Removed from the config for good: its present entry is retired, its id free too.
    dp.apply(&eff).unwrap();
    assert_eq!(dp.maps().backends.get(&other, 0).unwrap().flags & present, 0, "retired");
    assert!(!dp.backend_id_held(other) && !dp.backend_id_held(id));
}

/// What the controller applies, kept the way it keeps it: a configured pool per VIP, the
/// backends found down, and the effective config (configured minus down, or all of a VIP's
/// pool when all of it is down: fail open).
struct PoolModel {
    /// Configured backends (last octet of 198.18.0.x) of VIP `a` (port 80) and `b`.
    pools: [Vec<u8>; 2],
    /// Port of VIP `b` (81 or 82: a change is a VIP removed and another added).
    b_port: u16,
    /// (VIP, last octet) found down.
    down: std::collections::BTreeSet<(usize, u8)>,
}

impl PoolModel {
    fn toml(&self, effective: bool) -> String {
        let mut t =
            "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\n".to_owned();
        for (v, (name, port)) in [("a", 80), ("b", self.b_port)].into_iter().enumerate() {
            let pool = &self.pools[v];
            let all_down = pool.iter().all(|o| self.down.contains(&(v, *o)));
            let list: Vec<String> = pool
                .iter()
                .filter(|o| !effective || all_down || !self.down.contains(&(v, **o)))
                .map(|o| {
                    format!("{{ address = \"198.18.0.{o}\", mac = \"02:ed:00:00:00:{o:02x}\" }}")
                })
                .collect();
            t += &format!(
                "[[vip]]\nname = \"{name}\"\naddress = \"198.18.1.1\"\nport = {port}\nbackends = [{}]\n",
                list.join(", ")
            );
        }
        t
    }
}

/// Random sequences of what the controller applies (backends going down and coming back,
/// added and removed, a VIP's port changed, restarts that adopt the pinned maps) keep the data
/// plane consistent with parked backends: every new flow goes to a live backend of its VIP
/// (never a down or removed one, never dropped); every backend of the effective config has its
/// entry and every configured one that is down keeps its entry id; a removed one has none; and a
/// backend's packet counter never goes back while it stays configured in a VIP that did not
/// change. FUZZ_SEED=<n> runs another sequence.
#[test]
fn parked_backends_stay_consistent_through_random_changes() {
    if !require_privileged("parked_backends_stay_consistent_through_random_changes") {
        return;
    }
    let seed = common::fuzz_seed(0x5851_f42d_4c95_7f2d);
    eprintln!("parked backends: FUZZ_SEED={seed} replays");
    let mut rnd = common::rng(seed);
    let dir = PinDir::new("parkprop");
    let mut model =
        PoolModel { pools: [vec![11, 12, 13], vec![14, 15]], b_port: 81, down: Default::default() };
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    let mut counted: std::collections::HashMap<(usize, u16, u8), u64> = Default::default();
    let cfg_of = |t: &str| Config::parse(t, "model.toml".as_ref()).unwrap();
    for step in 0..150 {
        let what = rnd(6);
        let v = rnd(2);
        let pool = &mut model.pools[v];
        match what {
            0 | 1 => {
                let o = pool[rnd(pool.len())];
                if !model.down.remove(&(v, o)) {
                    model.down.insert((v, o));
                }
            }
            2 => {
                let o = 11 + rnd(8) as u8;
                if !pool.contains(&o) {
                    pool.push(o);
                }
            }
            3 if pool.len() > 1 => {
                let o = pool.remove(rnd(pool.len()));
                model.down.remove(&(v, o));
            }
            4 => model.b_port = if model.b_port == 81 { 82 } else { 81 },
            5 => {
                drop(dp);
                dp = Dataplane::load(Some(&dir.0)).unwrap();
            }
            _ => {}
        }
        let (cfg, eff) = (cfg_of(&model.toml(false)), cfg_of(&model.toml(true)));
        let ctx = format!(
            "step {step} (action {what} on VIP {v}), FUZZ_SEED={seed}: {}",
            model.toml(true)
        );
        dp.apply_keeping(&eff, &cfg).unwrap_or_else(|e| panic!("{ctx}: apply: {e}"));
        for (v, vip) in cfg.vips.iter().enumerate() {
            let live: Vec<IpAddr> = eff.vips[v].backends.iter().map(|b| b.address).collect();
            for b in &vip.backends {
                let id = dp.backend_id(vip, b.address);
                let entry = id.map(|id| dp.maps().backends.get(&id, 0).unwrap());
                let present =
                    entry.is_some_and(|e| e.flags & lb_common::backend_flags::PRESENT != 0);
                if live.contains(&b.address) {
                    assert!(present, "{ctx}: {} of {} has no present entry", b.address, vip.name);
                } else if let Some(e) = entry {
                    assert_eq!(e.flags, lb_common::backend_flags::PARKED, "{ctx}: {}", b.address);
                }
                let key = (
                    v,
                    vip.port,
                    match b.address {
                        IpAddr::V4(a) => a.octets()[3],
                        _ => 0,
                    },
                );
                let now = dp.backend_counters(vip, b.address).unwrap().packets;
                if let Some(&before) = counted.get(&key) {
                    assert!(
                        now >= before,
                        "{ctx}: {}'s counter went back: {before} -> {now}",
                        b.address
                    );
                }
                counted.insert(key, now);
            }
            // Removed backends have no entry.
            for o in 11..=18u8 {
                let a: IpAddr = Ipv4Addr::new(198, 18, 0, o).into();
                if !vip.backends.iter().any(|b| b.address == a) {
                    assert_eq!(dp.backend_id(vip, a), None, "{ctx}: removed {a} kept an entry");
                    counted.remove(&(v, vip.port, o));
                }
            }
            // New flows: to a live backend of the VIP, each counted.
            for c in 0..6u8 {
                let client = Ipv4Addr::new(198, 18, 7, (step % 40) as u8 * 6 + c + 1);
                let frame = eth(
                    LB_MAC,
                    CLIENT_MAC,
                    ETH_IP,
                    &tcp4(&client.to_string(), 40000 + step as u16, "198.18.1.1", vip.port, SYN),
                );
                let (verdict, out) = run_frame(&mut dp, &frame);
                assert_eq!(verdict, XDP_TX, "{ctx}: a new flow to {} was not sent", vip.name);
                let to = outer_dst(&out);
                assert!(live.contains(&to), "{ctx}: a new flow to {} went to {to}", vip.name);
            }
        }
        // A VIP whose port changed starts its counters again (a VIP removed and one added).
        counted.retain(|(v, port, _), _| *v == 0 || *port == model.b_port);
    }
}

/// `node.pin_dir` may name a directory other tools use too: `edgelb stop` removes what edgelb
/// pinned there and nothing else.
#[test]
fn teardown_removes_only_what_edgelb_pinned() {
    if !require_privileged("teardown_removes_only_what_edgelb_pinned") {
        return;
    }
    let dir = PinDir::new("shared");
    let cfg = Config::parse(&one_vip(&[("198.18.0.11", 1)]), "x".as_ref()).unwrap();
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    dp.apply(&cfg).unwrap();
    drop(dp);
    let foreign = dir.0.join("another-tool");
    std::fs::create_dir(&foreign).unwrap();
    // What `edgelb stop` checks is gone afterwards: edgelb's pins, not the other tool's.
    let (mine, others) = Dataplane::pins_in(&dir.0).unwrap();
    assert!(mine.iter().any(|p| p.ends_with(lb_common::maps::VIPS_V4)), "{mine:?}");
    assert_eq!(others, vec![foreign.clone()]);
    let left = Dataplane::teardown(&dir.0).expect("teardown");
    assert_eq!(Dataplane::pins_in(&dir.0).unwrap().0, Vec::<std::path::PathBuf>::new());
    assert_eq!(left, vec![foreign.clone()]);
    assert!(foreign.is_dir(), "another tool's pins stay");
    let mut rest: Vec<_> = std::fs::read_dir(&dir.0).unwrap().flatten().map(|e| e.path()).collect();
    rest.sort();
    assert_eq!(rest, vec![foreign.clone()], "every edgelb pin removed");
    std::fs::remove_dir(&foreign).unwrap();
    assert_eq!(Dataplane::teardown(&dir.0).unwrap(), Vec::<std::path::PathBuf>::new());
    assert!(!dir.0.exists(), "an empty directory goes");
}

/// The id of each map pinned in `dir`, by pin name: a load that adopted a map leaves its id
/// under the pin; one that made it fresh pins another. (Links, and what is no map, left out.)
fn pinned_ids(dir: &std::path::Path) -> std::collections::BTreeMap<String, u32> {
    let (mine, _) = Dataplane::pins_in(dir).unwrap();
    mine.iter()
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("link-"))
        .filter_map(|p| {
            let id = aya::maps::MapInfo::from_pin(p).ok()?.id();
            Some((p.file_name().unwrap().to_string_lossy().into_owned(), id))
        })
        .collect()
}

/// Every map pinned `before` that a load made fresh: its pin names another map now.
fn replaced(
    before: &std::collections::BTreeMap<String, u32>,
    dir: &std::path::Path,
) -> Vec<String> {
    let after = pinned_ids(dir);
    before
        .iter()
        .filter(|(name, id)| after.get(*name) != Some(id))
        .map(|(n, _)| n.clone())
        .collect()
}

/// Upgrades through the production path: each start loads straight over the pins an earlier
/// one left (no pin removed in between), and which maps it adopted is told by the map ids
/// under the pins. Maps of another layout, flags or layout version make every map fresh;
/// connection tables of another size alone are made anew (and filled from the pinned ones),
/// but not beside another layout version, which makes every map fresh and copies nothing; the
/// same build adopts every one.
#[test]
fn pinned_maps_with_another_layout_are_replaced_not_reused() {
    if !require_privileged("pinned_maps_with_another_layout_are_replaced_not_reused") {
        return;
    }
    let dir = PinDir::new("layout");
    let dir = &dir.0;
    let maps = pinned_map_names();
    let cfg = Config::parse(&one_vip(&[("198.18.0.11", 1)]), "x".as_ref()).unwrap();
    let mut dp = Dataplane::load(Some(dir)).expect("first load pins the maps");
    assert_eq!(dp.pins_found(), &Default::default(), "a first start finds nothing");
    dp.apply(&cfg).unwrap();
    drop(dp);
    let before = pinned_ids(dir);
    assert_eq!(before.len(), maps.len(), "{before:?}");
    let mut again = Dataplane::load(Some(dir)).expect("same layout is re-used");
    assert!(again.adopted(), "maps of the same layout are adopted");
    assert_eq!(again.pins_found().adopted, maps);
    assert!(again.pins_found().fresh.is_empty() && again.pins_found().problems.is_empty());
    assert_eq!(replaced(&before, dir), Vec::<String>::new());
    // The rings read back whole: the same config writes no slot.
    let report = again.apply(&cfg).unwrap();
    assert_eq!(report.ring_slots_written, 0, "{report:?}");
    drop(again);

    // What an upgrade that changed maps looks like: a map of another layout under a name this
    // build uses, and a pin under a name it no longer uses.
    let (vips, ct) = (dir.join(lb_common::maps::VIPS_V4), dir.join(lb_common::maps::CONNTRACK_V4));
    let tmp = dir.join("swap");
    std::fs::rename(&vips, &tmp).unwrap();
    std::fs::rename(&ct, &vips).unwrap();
    std::fs::rename(&tmp, &ct).unwrap();
    std::fs::rename(dir.join(lb_common::maps::REASONS), dir.join(lb_common::maps::RETIRED[0]))
        .unwrap();
    let before = pinned_ids(dir);
    let mut dp = Dataplane::load(Some(dir)).expect("loads over incompatible pins");
    assert!(!dp.adopted(), "nothing adopted from incompatible maps");
    let found = dp.pins_found().clone();
    assert!(found.adopted.is_empty(), "{found:?}");
    assert_eq!(found.fresh, maps);
    for name in
        [lb_common::maps::VIPS_V4, lb_common::maps::CONNTRACK_V4, lb_common::maps::RETIRED[0]]
    {
        assert!(found.problems.iter().any(|p| p.starts_with(name)), "{name}: {found:?}");
    }
    assert!(!dir.join(lb_common::maps::RETIRED[0]).exists(), "retired pin removed");
    assert!(dir.join(lb_common::maps::REASONS).exists(), "fresh maps pinned");
    // The retired pin is gone, every other names a fresh map: none adopted beside the others.
    let all: Vec<String> = before.keys().cloned().collect();
    assert_eq!(replaced(&before, dir), all, "every map made fresh");
    dp.apply(&cfg).unwrap();
    let mut h = Harness { dp, cfg: cfg.clone() };
    let (verdict, out) =
        h.run(&eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4("198.18.4.7", 40000, "198.18.1.1", 80, SYN)));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(outer_dst(&out), v4("198.18.0.11"));
    drop(h);
    let dp = Dataplane::load(Some(dir)).unwrap();
    assert!(dp.adopted() && dp.pins_found().problems.is_empty(), "the fresh pins match this build");
    drop(dp);

    // Another connection-table size (node.conntrack_flows_per_cpu changed between runs): the
    // rest is adopted, and the tables alone are made at the new size, filled from the pinned
    // ones (a_restart_at_another_table_size_carries_the_flows_over).
    let small = TableShape::for_flows(Some(4096));
    assert_ne!(small, TableShape::auto());
    let before = pinned_ids(dir);
    let dp = Dataplane::load_with_table(Some(dir), small).expect("loads at another size");
    assert!(dp.adopted(), "the maps but the tables are adopted");
    assert_eq!(dp.table_shape(), small);
    assert!(dp.pins_found().resized.is_some(), "{:?}", dp.pins_found());
    let tables = [lb_common::maps::CONNTRACK_V4, lb_common::maps::CONNTRACK];
    assert_eq!(replaced(&before, dir), tables);
    drop(dp);
    let dp = Dataplane::load_with_table(Some(dir), small).unwrap();
    assert!(dp.pins_found().problems.is_empty(), "{:?}", dp.pins_found());
    drop(dp);

    // A map of the same type and sizes but other flags (the connection table not
    // memory-mappable, as an older build had it): not re-used either. aya refuses to adopt it,
    // so taking it for this build's would fail every start instead of starting afresh.
    let ct = dir.join(lb_common::maps::CONNTRACK_V4);
    std::fs::remove_file(&ct).unwrap();
    let plain = aya::maps::Array::<aya::maps::MapData, lb_common::ConnBucketV4>::create(
        small.cpus * small.v4_buckets,
        0,
    )
    .expect("a plain array");
    plain.pin(&ct).expect("pin it in the table's place");
    let mut dp = Dataplane::load_with_table(Some(dir), small).expect("loads over the other flags");
    assert!(!dp.adopted());
    let problems = &dp.pins_found().problems;
    assert!(
        problems.len() == 1 && problems[0].starts_with(lb_common::maps::CONNTRACK_V4),
        "{problems:?}"
    );
    dp.apply(&cfg).unwrap();
    drop(dp);
    assert!(
        Dataplane::load_with_table(Some(dir), small).unwrap().adopted(),
        "the same build adopts"
    );

    // Maps of the same sizes written under another map layout version (an upgrade that changed
    // what entries mean, a bucket hash say): not adopted, the version named.
    stamp_another_maps_version(dir);
    let before = pinned_ids(dir);
    let mut dp = Dataplane::load_with_table(Some(dir), small).unwrap();
    assert!(!dp.adopted(), "maps of another layout version are not adopted");
    let problems = &dp.pins_found().problems;
    assert!(
        problems.len() == 1
            && problems[0].contains(&format!("version {}", lb_common::MAPS_VERSION + 1)),
        "{problems:?}"
    );
    assert_eq!(replaced(&before, dir).len(), maps.len(), "every map made fresh");
    dp.apply(&cfg).unwrap();
    drop(dp);

    // Another layout version and another table size at once: the version decides, every map is
    // made fresh (the tables at the new size), and nothing is copied from tables whose entries
    // may mean something else.
    stamp_another_maps_version(dir);
    let larger = TableShape::for_flows(Some(8192));
    assert_ne!(larger, small);
    let before = pinned_ids(dir);
    let dp = Dataplane::load_with_table(Some(dir), larger).unwrap();
    assert!(!dp.adopted(), "maps of another layout version are not adopted");
    assert_eq!(dp.table_shape(), larger);
    let found = dp.pins_found();
    assert_eq!(found.resized, None, "no table copied: {found:?}");
    assert!(found.adopted.is_empty(), "{found:?}");
    assert_eq!(found.fresh, maps);
    assert!(
        found.problems.len() == 1
            && found.problems[0].contains(&format!("version {}", lb_common::MAPS_VERSION + 1)),
        "{found:?}"
    );
    assert_eq!(replaced(&before, dir).len(), maps.len(), "every map made fresh");
}

/// The array map pinned as `name` in `dir`, of `V` values.
fn pinned_array<V: aya::Pod>(
    dir: &std::path::Path,
    name: &str,
) -> aya::maps::Array<aya::maps::MapData, V> {
    let data = aya::maps::MapData::from_pin(dir.join(name)).unwrap();
    aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap()
}

/// Stamps the maps pinned in `dir` (written by an `apply`, which stamps this build's version)
/// with another map layout version, as an edgelb of another layout would have written them.
fn stamp_another_maps_version(dir: &std::path::Path) {
    let mut config: aya::maps::Array<_, lb_common::GlobalConfig> =
        pinned_array(dir, lb_common::maps::CONFIG);
    let mut c = config.get(&0, 0).unwrap();
    assert_eq!(c.maps_version, lb_common::MAPS_VERSION, "apply stamps the maps");
    c.maps_version = lb_common::MAPS_VERSION + 1;
    config.set(0, &c, 0).unwrap();
}

/// The names of the maps a data plane pins, in the order `Dataplane::pins_found` lists them.
fn pinned_map_names() -> Vec<&'static str> {
    use lb_common::maps as n;
    vec![
        n::VIPS,
        n::VIPS_V4,
        n::CONNTRACK_V4,
        n::VIP_EPOCH,
        n::CT_STATS,
        n::VIP_ADDRS,
        n::RINGS,
        n::BACKENDS,
        n::CONNTRACK,
        n::CONFIG,
        n::VIP_STATS,
        n::BACKEND_STATS,
        n::REASONS,
    ]
}

/// [`one_vip`] with `pool` beside an IPv6 VIP (as [`one_vip6`] on port 80) with `pool6`, both
/// connection tables sized to `flows` per CPU.
fn two_families(flows: u32, pool: &[(&str, u32)], pool6: &[u8]) -> Config {
    let v6 = one_vip6(80, pool6);
    let vip6 = &v6[v6.find("[[vip]]").expect("a VIP")..];
    let node = format!(
        "[node]\nconntrack_flows_per_cpu = {flows}\nencap_source_v6 = \"2001:2:0:ff::/96\"\n"
    );
    let text = format!("{}\n{vip6}", one_vip(pool).replacen("[node]\n", &node, 1));
    Config::parse(&text, "x".as_ref()).unwrap()
}

/// A flow of the resize tests: client and source port to a VIP's port 80.
type AnyFlow = (IpAddr, u16);

/// The frame of `flow`'s TCP segment with `flags` to its family's VIP of [`two_families`].
fn flow_segment((client, sport): AnyFlow, flags: u8) -> Vec<u8> {
    match client {
        IpAddr::V4(c) => vip_segment((c, sport), flags),
        IpAddr::V6(c) => eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV6,
            &tcp6(&c.to_string(), sport, "2001:2:0:1::1", 80, flags),
        ),
    }
}

/// Where `dp` sends the next segment (`flags`) of `flow`.
fn sent_to(dp: &mut Dataplane, flow: AnyFlow, flags: u8) -> IpAddr {
    let (verdict, out) = run_frame(dp, &flow_segment(flow, flags));
    assert_eq!(verdict, XDP_TX, "{flow:?}");
    match flow.0 {
        IpAddr::V4(_) => outer_dst(&out),
        IpAddr::V6(_) => IpAddr::V6(outer_dst6(&out)),
    }
}

/// A restart at another `node.conntrack_flows_per_cpu` carries the connection tables over
/// into tables of the new size: flows whose backend the restart's pool would change stay on
/// theirs, through a larger table and through a smaller one, where flows that meet in a full
/// bucket are dropped and counted. It used to make every map fresh, and they all moved.
#[test]
fn a_restart_at_another_table_size_carries_the_flows_over() {
    if !require_privileged("a_restart_at_another_table_size_carries_the_flows_over") {
        return;
    }
    // The connection table is per CPU: every run on CPU 0's.
    netns::pin_current_thread(Some(0)).expect("pin to CPU 0");
    restart_resized("grow", 4096, 16384);
    restart_resized("shrink", 16384, 4096);
}

/// [`a_restart_at_another_table_size_carries_the_flows_over`] from `from` to `to` flows per CPU.
fn restart_resized(what: &str, from: u32, to: u32) {
    let dir = PinDir::new(&format!("resize-{what}"));
    let dir = &dir.0;
    let six = [0x11, 0x12, 0x13];
    let before = two_families(from, &THREE, &six);
    let after = two_families(to, &FOUR, &[0x11, 0x12, 0x13, 0x14]);
    let vip = |cfg: &Config, c: IpAddr| {
        let name = if c.is_ipv4() { "v4tcp" } else { "v6" };
        cfg.vips.iter().find(|v| v.name == name).unwrap().clone()
    };
    let backend = |cfg: &Config, c: IpAddr| route(&vip(cfg, c), c, 0).unwrap().address;
    let moves = |c: &IpAddr| backend(&before, *c) != backend(&after, *c);
    let bucket = |flows: u32, (c, sport): AnyFlow| {
        conn_hash(&vip(&before, c), c, sport, 80) & (flows / lb_common::CONNTRACK_WAYS as u32 - 1)
    };
    // Flows of clients whose backend the larger pool changes: some that meet in one bucket of
    // the smaller table (a full old bucket when it grows; one more than a new bucket holds when
    // it shrinks), twenty IPv4 and ten IPv6 spread.
    let v4_clients = |base| clients_from(base).map(IpAddr::V4).filter(moves);
    let small = from.min(to);
    let meet = bucket_overflow(
        small / lb_common::CONNTRACK_WAYS as u32,
        lb_common::CONNTRACK_WAYS + usize::from(to < from),
        flows_of(clients_from("198.18.64.0").filter(|c| moves(&IpAddr::V4(*c)))),
    );
    let mut flows: Vec<AnyFlow> = meet.iter().map(|&(c, p)| (IpAddr::V4(c), p)).collect();
    flows.extend(v4_clients("198.18.96.0").take(20).map(|c| (c, 50000)));
    flows.extend(
        (1..=250u16)
            .map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, i)))
            .filter(moves)
            .take(10)
            .map(|c| (c, 50000)),
    );
    // What the copy must do: every flow fits the old table; a new bucket keeps four.
    let per_bucket = |size: u32, v4: bool| {
        let mut n = std::collections::HashMap::<u32, u64>::new();
        for &f in flows.iter().filter(|f| f.0.is_ipv4() == v4) {
            *n.entry(bucket(size, f)).or_default() += 1;
        }
        n
    };
    let ways = lb_common::CONNTRACK_WAYS as u64;
    for v4 in [true, false] {
        assert!(per_bucket(from, v4).values().all(|&n| n <= ways), "the old table holds all");
    }
    let dropped: u64 = [true, false]
        .iter()
        .flat_map(|&v4| per_bucket(to, v4).into_values())
        .map(|n| n.saturating_sub(ways))
        .sum();
    assert_eq!(dropped, u64::from(to < from), "{what}: only those meeting overflow a new bucket");

    let shape = |flows| TableShape::for_flows(Some(flows));
    let mut dp = Dataplane::load_with_table(Some(dir), shape(from)).unwrap();
    dp.apply(&before).unwrap();
    for &f in &flows {
        // The handshake, then its next segment puts the flow in the table.
        assert_eq!(sent_to(&mut dp, f, SYN), backend(&before, f.0), "{f:?}");
        assert_eq!(sent_to(&mut dp, f, ACK), backend(&before, f.0), "{f:?}");
    }
    assert_eq!(dp.maps().ct_stats().unwrap()[lb_common::ct_stats::EVICTED as usize], 0);
    drop(dp);

    let mut dp = Dataplane::load_with_table(Some(dir), shape(to)).expect("loads at another size");
    assert!(dp.adopted(), "{what}: the data plane is adopted");
    assert_eq!(dp.table_shape(), shape(to));
    let found = dp.pins_found().clone();
    let tables = [lb_common::maps::CONNTRACK_V4, lb_common::maps::CONNTRACK];
    let others: Vec<&str> =
        pinned_map_names().into_iter().filter(|n| !tables.contains(n)).collect();
    assert_eq!(found.adopted, others, "{what}: {found:?}");
    assert!(found.fresh.is_empty() && found.problems.is_empty(), "{what}: {found:?}");
    let resized = found.resized.expect("the tables were resized");
    let carried = flows.len() as u64 - dropped;
    let (f, t) = (u64::from(from), u64::from(to));
    assert_eq!((resized.v4_flows, resized.v6_flows), ((f, t), (f, t)));
    assert_eq!(resized.flows, edgelb::dataplane::ResizeTally { carried, dropped, left: 0 });
    let said = format!(
        "connection tables copied into the new size, from {from} to {to} flows per CPU: {carried} entries carried over, {dropped} dropped (new buckets full)"
    );
    assert!(resized.message().starts_with(&said), "{}", resized.message());
    eprintln!("{what}: {}", resized.message());

    // The larger pool would move every one of these flows: those carried over stay.
    dp.apply(&after).unwrap();
    let mut kept = 0;
    for &f in &flows {
        let to = sent_to(&mut dp, f, ACK);
        if to == backend(&before, f.0) {
            kept += 1;
        } else {
            assert_eq!(to, backend(&after, f.0), "{what}: {f:?} went elsewhere than the ring");
            assert!(meet.iter().any(|&(c, p)| (IpAddr::V4(c), p) == f), "{what}: {f:?} lost");
        }
    }
    assert_eq!(kept, carried, "{what}: each flow carried over keeps its backend");
}

/// Fills `flows` per CPU of the connection table pinned as `name` in `dir` (`buckets` per CPU)
/// with made-up flows, each way in the bucket its hash names: `way(n)` is flow `n`'s entry,
/// `hash` its table hash. Returns how many it placed (a few buckets stay short).
fn fill_pinned<B, W>(
    dir: &std::path::Path,
    name: &str,
    buckets: u32,
    way: impl Fn(u32) -> W,
    hash: impl Fn(&W) -> u32,
    ways: impl Fn(&mut B) -> &mut [W; lb_common::CONNTRACK_WAYS],
) -> u64
where
    B: aya::Pod + Default,
    W: Copy,
{
    let mut table: aya::maps::Array<_, B> = pinned_array(dir, name);
    let cpus = table.len() / buckets;
    let mut region = vec![(B::default(), 0usize); buckets as usize];
    let mut placed = 0;
    for cpu in 0..cpus {
        region.iter_mut().for_each(|r| *r = (B::default(), 0));
        // Twice the flows a region holds: most buckets fill up.
        for n in 0..buckets * 2 * lb_common::CONNTRACK_WAYS as u32 {
            let w = way(cpu << 24 | n);
            let (bucket, used) = &mut region[(hash(&w) & (buckets - 1)) as usize];
            if *used < lb_common::CONNTRACK_WAYS {
                ways(bucket)[*used] = w;
                *used += 1;
                placed += 1;
            }
        }
        for (i, (bucket, _)) in region.iter().enumerate() {
            table.set(cpu * buckets + i as u32, bucket, 0).unwrap();
        }
    }
    placed
}

/// The copy of nearly full connection tables into smaller ones accounts for every flow: both
/// tables of 131 072 flows per CPU (the IPv4 default) on every possible CPU, halved, carry at
/// least 90 % of what the new tables hold and drop the rest, none left uncounted, and each
/// CPU's flows land in that CPU's region of the new table, in their buckets. The copy's
/// time is printed, not asserted: a speed figure, not a behaviour.
#[test]
fn full_tables_are_resized_with_every_flow_accounted_for() {
    if !require_privileged("full_tables_are_resized_with_every_flow_accounted_for") {
        return;
    }
    let (from, to) = (131_072, 65_536);
    let dir = PinDir::new("resize-full");
    let dir = &dir.0;
    let cfg = two_families(from, &THREE, &[0x11, 0x12, 0x13]);
    let shape = TableShape::for_flows(Some(from));
    let mut dp = Dataplane::load_with_table(Some(dir), shape).unwrap();
    dp.apply(&cfg).unwrap();
    let (vip4, vip6) = (cfg.vips[0].clone(), cfg.vips[1].clone());
    let id = dp.backend_id(&vip4, "198.18.0.11".parse().unwrap()).unwrap();
    let tag = lb_common::Conn { backend: id, generation: 0 }.tag(6);
    let vip6_index = dp.vip_index(&vip6).unwrap();
    let vip6_addr = vip_key(&vip6).addr;
    drop(dp);
    let dst = u32::from_ne_bytes([198, 18, 1, 1]);
    let v4 = fill_pinned(
        dir,
        lb_common::maps::CONNTRACK_V4,
        shape.v4_buckets,
        |n| lb_common::ConnEntryV4 { src: n, dst, ports: 80 << 16 | 0x1234, tag },
        v4_hash,
        |b: &mut lb_common::ConnBucketV4| &mut b.ways,
    );
    let v6 = fill_pinned(
        dir,
        lb_common::maps::CONNTRACK,
        shape.v6_buckets,
        |n| lb_common::ConnEntry {
            src: [0x0220_0120, 0, 0, n],
            ports: 80 << 16 | 0x1234,
            tag,
            vip: vip6_index,
            _pad: 0,
        },
        |w| {
            let key = lb_common::FlowKey {
                src: w.src,
                dst: vip6_addr,
                sport: w.ports as u16,
                dport: (w.ports >> 16) as u16,
                proto: 6,
                family: lb_common::AF_INET6,
                _pad: [0; 2],
            };
            lb_common::hash::flow_key_hash(&key, lb_common::HASH_SEED)
        },
        |b: &mut lb_common::ConnBucket| &mut b.ways,
    );
    let dp = Dataplane::load_with_table(Some(dir), TableShape::for_flows(Some(to))).unwrap();
    let resized = dp.pins_found().resized.expect("resized");
    eprintln!("{} + {} flows on {} CPUs: {}", v4, v6, shape.cpus, resized.message());
    let t = resized.flows;
    assert_eq!((t.carried + t.dropped, t.left), (v4 + v6, 0), "{t:?}");
    assert!(t.carried >= u64::from(shape.cpus) * u64::from(to) * 2 * 9 / 10, "{t:?}");

    // Each CPU's flows are in that CPU's region of the new table, each in the bucket its hash
    // names there: flow n of CPU c has c in the top byte of its client address (fill_pinned).
    let new = dp.table_shape().v4_buckets;
    let table: aya::maps::Array<_, lb_common::ConnBucketV4> =
        pinned_array(dir, lb_common::maps::CONNTRACK_V4);
    assert_eq!(table.len(), shape.cpus * new, "the pin names the new table");
    for cpu in 0..shape.cpus {
        let mut held = 0;
        for bucket in 0..new {
            for w in table.get(&(cpu * new + bucket), 0).unwrap().ways.iter().filter(|w| w.tag != 0)
            {
                assert_eq!(w.src >> 24, cpu, "CPU {cpu}'s region holds only its own flows");
                assert_eq!(v4_hash(w) & (new - 1), bucket, "CPU {cpu}: {w:?} in its bucket");
                held += 1;
            }
        }
        assert!(held >= u64::from(new) * 4 * 9 / 10, "CPU {cpu}'s region filled: {held}");
    }
}

/// The table hash of an IPv4 TCP entry [`fill_pinned`] writes.
fn v4_hash(w: &lb_common::ConnEntryV4) -> u32 {
    let key = lb_common::FlowKeyV4 {
        src: w.src,
        dst: w.dst,
        sport: w.ports as u16,
        dport: (w.ports >> 16) as u16,
        proto: 6,
        _pad: [0; 3],
    };
    lb_common::hash::flow_key_v4_hash(&key, lb_common::HASH_SEED)
}

/// The resize copy while the old program writes the table it reads: the old program (still
/// forwarding, as during a restart or a takeover at another `node.conntrack_flows_per_cpu`)
/// runs on a second CPU, on a thread that enters new flows into and promotes established flows
/// of the even buckets of that CPU's region, while a new data plane loads beside it at twice
/// the IPv4 table and copies. Each copy, several in a row: every flow of a bucket the writer
/// never touches (the odd buckets of its region, all of CPU 0's) is carried over, in its new
/// bucket; every entry carried is whole, one of the entries the test or the writer made, and no
/// flow is carried twice; the tally adds up to what the old table holds (every bucket stays
/// full: the program never empties a way); and the writer ran during each copy. Nothing
/// tested the double read (`settle`, in `dataplane::resize`) with a program writing until this.
#[test]
fn a_resize_copy_while_the_old_program_writes_carries_whole_entries() {
    let test = "a_resize_copy_while_the_old_program_writes_carries_whole_entries";
    if !require_privileged(test) {
        return;
    }
    let Some(busy) = require_second_cpu(test, second_cpu()) else { return };
    netns::pin_current_thread(Some(0)).expect("pin to CPU 0");
    let dir = PinDir::new("resize-busy");
    let dir = &dir.0;
    // Only the IPv4 table changes size, so the copy's time is that table's.
    let old_shape = TableShape::for_flows(Some(65_536));
    let new_shape = TableShape { v4_buckets: old_shape.v4_buckets * 2, ..old_shape };
    let buckets = old_shape.v4_buckets;
    let regions = [0, busy as u32];
    assert!(busy < old_shape.cpus as usize, "CPU {busy} has a region");
    let cfg = Config::parse(&one_vip(&THREE[..1]), "x".as_ref()).unwrap();
    let mut dp = Dataplane::load_with_table(Some(dir), old_shape).unwrap();
    dp.apply(&cfg).unwrap();

    // The entry the program writes for a flow (one backend: every flow's tag is the same),
    // learnt from a probe through CPU 0.
    let entry = |(c, sport): (Ipv4Addr, u16), tag| lb_common::ConnEntryV4 {
        src: u32::from_ne_bytes(c.octets()),
        dst: u32::from_ne_bytes([198, 18, 1, 1]),
        ports: u32::from(sport.to_be()) | u32::from(80u16.to_be()) << 16,
        tag,
    };
    let probe = (v4("198.18.200.1"), 40000);
    for flags in [SYN, ACK] {
        assert_eq!(run_frame(&mut dp, &vip_segment(probe, flags)).0, XDP_TX);
    }
    let held = dp.maps().conntrack_v4.get(&bucket_of(buckets, probe.0, probe.1), 0).unwrap();
    let tag = held.ways[0].tag;
    assert_eq!(held.ways[0], entry(probe, tag), "the probe's entry");

    // Flow m of range `range`: 65 536 clients, a source port per range and 65 536 flows.
    let flow = |range: u16, m: u32| {
        (Ipv4Addr::from(u32::from(v4("198.19.0.0")) + (m & 0xffff)), range + (m >> 16) as u16)
    };
    // Every bucket of CPU 0's and the busy CPU's regions filled with four flows of their own.
    let mut table: aya::maps::Array<_, lb_common::ConnBucketV4> =
        pinned_array(dir, lb_common::maps::CONNTRACK_V4);
    let mut setup: Vec<Vec<(Ipv4Addr, u16)>> = Vec::new();
    for (r, &region) in regions.iter().enumerate() {
        let mut filled = vec![(lb_common::ConnBucketV4::default(), 0usize); buckets as usize];
        let (mut full, mut flows) = (0, Vec::new());
        for f in (0..1u32 << 20).map(|m| flow(1024 + 20_000 * r as u16, m)) {
            let (bucket, used) = &mut filled[bucket_of(buckets, f.0, f.1) as usize];
            if *used < lb_common::CONNTRACK_WAYS {
                bucket.ways[*used] = entry(f, tag);
                *used += 1;
                flows.push(f);
                full += usize::from(*used == lb_common::CONNTRACK_WAYS);
                if full == buckets as usize {
                    break;
                }
            }
        }
        assert_eq!(full, buckets as usize, "every bucket of region {region} filled");
        for (i, (bucket, _)) in filled.iter().enumerate() {
            table.set(region * buckets + i as u32, bucket, 0).unwrap();
        }
        setup.push(flows);
    }
    let busy_bucket = |(c, sport): (Ipv4Addr, u16)| bucket_of(buckets, c, sport).is_multiple_of(2);
    // The writer's own flows, all of even buckets.
    let pool: Vec<(Ipv4Addr, u16)> =
        (0..1u32 << 20).map(|m| flow(50_000, m)).filter(|&f| busy_bucket(f)).take(32_768).collect();
    // What may be carried from each region: a setup flow's entry or one of the writer's.
    // Entries as their four words (`ConnEntryV4` has no `Hash`).
    let words = |w: lb_common::ConnEntryV4| (w.src, w.dst, w.ports, w.tag);
    let mut known: Vec<std::collections::HashSet<_>> =
        setup.iter().map(|flows| flows.iter().map(|&f| words(entry(f, tag))).collect()).collect();
    known[1].extend(pool.iter().map(|&f| words(entry(f, tag))));
    // What must be: every setup flow of a bucket the writer never writes.
    let quiet: Vec<Vec<_>> =
        [setup[0].clone(), setup[1].iter().copied().filter(|&f| !busy_bucket(f)).collect()]
            .map(|flows| flows.into_iter().map(|f| words(entry(f, tag))).collect())
            .into();
    // Per step: a new flow's handshake and first ACK (it enters its bucket), and an ACK of a
    // setup flow of an even bucket (promoted, if still there).
    let promoted: Vec<(Ipv4Addr, u16)> =
        setup[1].iter().copied().filter(|&f| busy_bucket(f)).collect();
    let frames: Vec<[Vec<u8>; 3]> = (0..pool.len())
        .map(|k| {
            let old = promoted[k * 7 % promoted.len()];
            [vip_segment(pool[k], SYN), vip_segment(pool[k], ACK), vip_segment(old, ACK)]
        })
        .collect();

    // The writer: on the busy CPU, until told to stop (or two minutes), noting when each run
    // began and ended (nanoseconds from `base`) while a copy may be under way.
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    };
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    let (stop, copying) =
        (Stop(Arc::new(AtomicBool::new(false))), Arc::new(AtomicBool::new(false)));
    let base = std::time::Instant::now();
    let writer = {
        let (stop, copying) = (stop.0.clone(), copying.clone());
        std::thread::spawn(move || {
            netns::pin_current_thread(Some(busy)).expect("pin the writer");
            let mut spans: Vec<(u64, u64)> = Vec::new();
            let mut runs = 0u64;
            let ns = || base.elapsed().as_nanos() as u64;
            'out: for step in frames.iter().cycle() {
                for frame in step {
                    if stop.load(Relaxed) || base.elapsed() > std::time::Duration::from_secs(120) {
                        break 'out;
                    }
                    let began = ns();
                    assert_eq!(run_frame(&mut dp, frame).0, XDP_TX, "the writer's segment");
                    if copying.load(Relaxed) {
                        spans.push((began, ns()));
                    }
                    runs += 1;
                }
            }
            (runs, spans)
        })
    };

    let mut windows = Vec::new();
    let (mut reread, mut left) = (0, 0);
    let started = std::time::Instant::now();
    while windows.len() < 8 && (windows.len() < 3 || started.elapsed().as_secs() < 30) {
        let n = windows.len();
        copying.store(true, Relaxed);
        let new = Dataplane::load_beside(Some(dir), new_shape).expect("loads at another size");
        let returned = base.elapsed();
        copying.store(false, Relaxed);
        let resized = new.pins_found().resized.expect("the IPv4 table was resized");
        // The copy ends just before the load returns: it began `took` before, or later.
        windows.push(((returned - resized.took).as_nanos() as u64, returned.as_nanos() as u64));
        let ways = lb_common::CONNTRACK_WAYS as u64;
        let v6 = u64::from(old_shape.v6_buckets) * ways;
        assert_eq!(resized.v4_flows, (u64::from(buckets) * ways, u64::from(buckets) * 2 * ways));
        assert_eq!(resized.v6_flows, (v6, v6), "copy {n}: the IPv6 table keeps its size");
        // (c) Every way of the two regions was read full: each entry is counted once.
        let t = resized.flows;
        assert_eq!(t.dropped, 0, "copy {n}: a larger table drops nothing: {t:?}");
        assert_eq!(t.carried + t.left, 2 * u64::from(buckets) * ways, "copy {n}: {t:?}");
        reread += resized.buckets_reread;
        left += t.left;

        let new_buckets = new_shape.v4_buckets;
        let mut carried = 0;
        for (r, &region) in regions.iter().enumerate() {
            let (mut seen, mut flows) = (std::collections::HashSet::new(), Vec::new());
            for b in 0..new_buckets {
                let got = new.maps().conntrack_v4.get(&(region * new_buckets + b), 0).unwrap();
                for w in got.ways.iter().filter(|w| w.tag != 0) {
                    // (b) Whole entries the test or the writer made, each once, in its bucket.
                    assert!(
                        known[r].contains(&words(*w)),
                        "copy {n}: region {region}: {w:?} was never written"
                    );
                    seen.insert(words(*w));
                    flows.push((w.src, w.dst, w.ports));
                    assert_eq!(v4_hash(w) & (new_buckets - 1), b, "copy {n}: {w:?} in its bucket");
                }
            }
            let carried_here = flows.len();
            flows.sort_unstable();
            flows.dedup();
            assert_eq!(
                flows.len(),
                carried_here,
                "copy {n}: region {region}: a flow carried twice"
            );
            // (a) Every flow of a bucket nothing wrote is carried.
            let lost: Vec<_> = quiet[r].iter().filter(|w| !seen.contains(w)).collect();
            assert!(
                lost.is_empty(),
                "copy {n}: region {region}: {} quiet flows lost: {:?}",
                lost.len(),
                &lost[..lost.len().min(4)]
            );
            carried += carried_here as u64;
        }
        assert_eq!(carried, t.carried, "copy {n}: the tally counts what the new table holds");
        eprintln!(
            "copy {n}: {t:?}, {} buckets read again, in {:?}",
            resized.buckets_reread, resized.took
        );
    }
    drop(stop);
    let (runs, spans) = writer.join().expect("the writer ran every segment to the VIP");
    // (d) The writer ran during each copy: runs that began after the copy began and ended
    // before the load returned.
    let during: Vec<usize> = windows
        .iter()
        .map(|&(from, to)| spans.iter().filter(|&&(b, e)| b >= from && e <= to).count())
        .collect();
    eprintln!(
        "{} copies of {} + {} quiet flows: writer runs during each {during:?} ({runs} runs in all); {reread} buckets read again, {left} entries left behind",
        windows.len(),
        quiet[0].len(),
        quiet[1].len()
    );
    assert!(during.iter().all(|&d| d > 0), "the writer ran during every copy: {during:?}");
    // The copies met buckets the writer changed between the two reads of their region, so the
    // re-reads (`settle`) ran, and the checks above held with them.
    assert!(reread > 0, "no bucket was read again in {} copies", windows.len());
}

/// A network namespace a test adds, named `prefix` and this process's full PID (at most 7
/// digits, by which `./x test` tells an interrupted run's namespace from a running one's and
/// removes it), and deletes when dropped, even on failure.
struct ScratchNetns(String);

impl ScratchNetns {
    /// Adds the namespace `prefix` + PID.
    fn add(prefix: &str) -> Self {
        let name = format!("{prefix}{}", std::process::id());
        let added = std::process::Command::new("ip").args(["netns", "add", &name]).status();
        assert!(added.unwrap().success(), "ip netns add {name}");
        Self(name)
    }

    /// Runs `ip -n <this namespace> <args>` (words split at spaces), which must succeed.
    fn ip(&self, args: &str) {
        let ns = &self.0;
        let ok = std::process::Command::new("ip")
            .args(["-n", ns])
            .args(args.split(' '))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip -n {ns} {args}");
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// [`one_vip`] as a UDP VIP on port 53: UDP flows enter the connection table at their first
/// datagram.
fn one_udp_vip(backends: &[(&str, u32)]) -> Config {
    let text = one_vip(backends).replace("port = 80\n", "port = 53\nprotocol = \"udp\"\n");
    Config::parse(&text, "x".as_ref()).unwrap()
}

/// A counter array of another size (`REASONS` grown by a verdict reason: ordinary feature work)
/// is made fresh alone: the connection table and the rest are adopted, so a restart keeps the
/// established flows where they are, those on a drained backend included. It used to make every
/// map fresh, and the drained backend's flows moved.
#[test]
fn a_counter_map_of_another_layout_is_made_fresh_alone() {
    if !require_privileged("a_counter_map_of_another_layout_is_made_fresh_alone") {
        return;
    }
    // The connection table is per CPU: every run on CPU 0's.
    netns::pin_current_thread(Some(0)).expect("pin to CPU 0");
    let dir = PinDir::new("counters");
    let dir = &dir.0;
    let cfg = one_udp_vip(&THREE);
    let drained = one_udp_vip(&[THREE[0], ("198.18.0.12", 0), THREE[2]]);
    let flow = |i: u8| {
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &udp4(&format!("198.18.6.{i}"), 40000, "198.18.1.1", 53, b"q"),
        )
    };
    let mut dp = Dataplane::load(Some(dir)).unwrap();
    dp.apply(&cfg).unwrap();
    let placed: Vec<IpAddr> =
        (1..=40).map(|i| outer_dst(&run_frame(&mut dp, &flow(i)).1)).collect();
    let on_drained = placed.iter().filter(|b| **b == v4("198.18.0.12")).count();
    assert!(on_drained > 0, "some flow on the backend drained next: {placed:?}");
    // Drained: its flows stay, as drains promise.
    dp.apply(&drained).unwrap();
    for (i, b) in (1..=40).zip(&placed) {
        assert_eq!(outer_dst(&run_frame(&mut dp, &flow(i)).1), *b, "flow {i}");
    }
    drop(dp);

    // The next build counts one verdict reason more.
    let reasons = dir.join(lb_common::maps::REASONS);
    std::fs::remove_file(&reasons).unwrap();
    let grown =
        aya::maps::PerCpuArray::<aya::maps::MapData, u64>::create(REASON_COUNT + 1, 0).unwrap();
    grown.pin(&reasons).unwrap();
    let before = pinned_ids(dir);
    let mut dp = Dataplane::load(Some(dir)).expect("loads over a counter array of another size");
    assert!(dp.adopted(), "the data plane is adopted");
    let found = dp.pins_found().clone();
    assert_eq!(found.fresh, [lb_common::maps::REASONS], "{found:?}");
    assert!(found.adopted.contains(&lb_common::maps::CONNTRACK_V4), "{found:?}");
    assert!(
        found.problems.len() == 1
            && found.problems[0].starts_with(lb_common::maps::REASONS)
            && found.problems[0].contains("made fresh alone"),
        "{found:?}"
    );
    assert_eq!(replaced(&before, dir), [lb_common::maps::REASONS], "only REASONS made fresh");
    let info = aya::maps::MapInfo::from_pin(&reasons).unwrap();
    assert_eq!(info.max_entries(), REASON_COUNT, "REASONS pinned at this build's size");
    dp.apply(&drained).unwrap();
    for (i, b) in (1..=40).zip(&placed) {
        assert_eq!(
            outer_dst(&run_frame(&mut dp, &flow(i)).1),
            *b,
            "flow {i} kept its backend across the restart"
        );
    }
}

/// Pinned maps without the CONFIG map, which says under which layout version they were
/// written: none is adopted, one warning says why. A lone stale connection table used to be
/// adopted with its entries, beside fresh backend entries its backend ids then named wrongly.
#[test]
fn maps_pinned_without_their_config_are_not_adopted() {
    if !require_privileged("maps_pinned_without_their_config_are_not_adopted") {
        return;
    }
    netns::pin_current_thread(Some(0)).expect("pin to CPU 0");
    let dir = PinDir::new("noconfig");
    let dir = &dir.0;
    let cfg = one_udp_vip(&THREE);
    let mut dp = Dataplane::load(Some(dir)).unwrap();
    dp.apply(&cfg).unwrap();
    let frame = eth(LB_MAC, CLIENT_MAC, ETH_IP, &udp4("198.18.6.1", 40000, "198.18.1.1", 53, b"q"));
    run_frame(&mut dp, &frame);
    drop(dp);
    // Every pin gone but the IPv4 connection table's.
    for name in pinned_map_names() {
        if name != lb_common::maps::CONNTRACK_V4 {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
    }
    let before = pinned_ids(dir);
    let dp = Dataplane::load(Some(dir)).unwrap();
    let found = dp.pins_found();
    assert!(found.adopted.is_empty(), "{found:?}");
    assert_eq!(found.fresh, pinned_map_names());
    assert!(
        found.problems.len() == 1 && found.problems[0].contains("without the CONFIG map"),
        "{found:?}"
    );
    assert_eq!(replaced(&before, dir), [lb_common::maps::CONNTRACK_V4], "the table made fresh");
    let table = &dp.maps().conntrack_v4;
    let empty = (0..table.len()).all(|i| {
        table.get(&i, 0).unwrap().ways.iter().all(|w| *w == lb_common::ConnEntryV4::default())
    });
    assert!(empty, "no stale entry carried over");
}

/// A pin that cannot be read is not taken for a map of another layout (which made every map
/// fresh, the connection table with them, when a transient EMFILE or ENOMEM hit the read): the
/// start is refused, naming the pin, and no pin is changed. Here something that is no map
/// under a map's name (a directory: BPF_OBJ_GET refuses it) stands for any such failure.
#[test]
fn a_pin_that_cannot_be_read_refuses_the_start() {
    if !require_privileged("a_pin_that_cannot_be_read_refuses_the_start") {
        return;
    }
    let dir = PinDir::new("unreadable");
    let dir = &dir.0;
    let mut dp = Dataplane::load(Some(dir)).unwrap();
    dp.apply(&Config::parse(&one_vip(&THREE), "x".as_ref()).unwrap()).unwrap();
    drop(dp);
    let ct = dir.join(lb_common::maps::CONNTRACK_V4);
    std::fs::remove_file(&ct).unwrap();
    std::fs::create_dir(&ct).unwrap();
    let before = pinned_ids(dir);
    for load in [Dataplane::load_beside, Dataplane::load_with_table] {
        let err = load(Some(dir), TableShape::auto()).err().expect("the start is refused");
        let msg = err.to_string();
        assert!(
            matches!(err, edgelb::dataplane::DataplaneError::PinUnreadable { .. })
                && msg.contains(&format!("reading the pinned map {} failed", ct.display()))
                && msg.contains("nothing was adopted or replaced"),
            "{msg}"
        );
        assert_eq!(pinned_ids(dir), before, "no pin changed");
    }
    std::fs::remove_dir(&ct).unwrap();
}

/// A VIP entry that names no ring region of its own VIP (a rollback to a build of another ring
/// layout, an entry written by hand), or is otherwise out of bounds, is not adopted: the start
/// warns naming the map and entry and makes every map fresh. Its ring base used to be
/// subtracted from unchecked, and every start panicked (a restart loop under systemd).
#[test]
fn a_pinned_entry_that_makes_no_sense_is_not_adopted() {
    if !require_privileged("a_pinned_entry_that_makes_no_sense_is_not_adopted") {
        return;
    }
    let dir = PinDir::new("badentry");
    let dir = &dir.0;
    let cfg = Config::parse(FIXTURE_CONFIG, "x".as_ref()).unwrap();
    type Edit = fn(&mut lb_common::VipMeta);
    let edits: [(&str, Edit); 5] = [
        ("ring base 0", |m| m.ring_base = 0),
        ("ring base inside a region", |m| m.ring_base += 1),
        ("ring larger than a region", |m| m.ring_size = lb_common::MAX_RING_SIZE + 1),
        ("index past the maps", |m| m.vip_index = lb_common::MAX_VIPS),
        ("unknown flag", |m| m.flags |= 1 << 30),
    ];
    for (what, edit) in edits {
        let mut dp = Dataplane::load(Some(dir)).unwrap();
        dp.apply(&cfg).unwrap();
        // A VIP of index past 0 with a ring: ring base 0 is then another VIP's region.
        let (key, mut meta) = dp
            .maps()
            .vips_v4
            .iter()
            .map(Result::unwrap)
            .find(|(_, m)| m.vip_index > 0 && m.ring_size > 0)
            .expect("an IPv4 VIP of index past 0 with a ring");
        edit(&mut meta);
        dp.maps_mut().vips_v4.insert(&key, &meta, 0).unwrap();
        drop(dp);
        let before = pinned_ids(dir);
        let mut dp = std::panic::catch_unwind(|| Dataplane::load(Some(dir)))
            .unwrap_or_else(|_| panic!("{what}: the load panicked"))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(!dp.adopted(), "{what}: adopted");
        let found = dp.pins_found().clone();
        assert!(found.adopted.is_empty(), "{what}: {found:?}");
        let port = u16::from_be(key.port);
        assert!(
            found.problems.iter().any(|p| p.starts_with(&format!(
                "pinned map `{}`, entry {} port {port} protocol",
                lb_common::maps::VIPS_V4,
                Ipv4Addr::from(key.addr.to_ne_bytes())
            ))),
            "{what}: {found:?}"
        );
        assert_eq!(replaced(&before, dir).len(), pinned_map_names().len(), "{what}: all fresh");
        // The fresh maps serve.
        dp.apply(&cfg).unwrap();
        let mut h = Harness { dp, cfg: cfg.clone() };
        let (verdict, _) = h.run(&eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &tcp4("198.18.4.7", 40000, "198.18.1.1", 80, SYN),
        ));
        assert_eq!(verdict, XDP_TX, "{what}");
    }
}

/// `--takeover`: the new process loads its program (adopting the pins) while the running one
/// still writes the maps; once that one has handed over, the new one reads them again, so its
/// writes go to the inactive ring region and name only backends the maps hold.
#[test]
fn a_process_loaded_beside_a_running_one_reads_the_maps_again() {
    if !require_privileged("a_process_loaded_beside_a_running_one_reads_the_maps_again") {
        return;
    }
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/edgelb-beside-{}", std::process::id()));
    struct Cleanup<'a>(&'a std::path::Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = Dataplane::teardown(self.0);
        }
    }
    let _cleanup = Cleanup(&dir);
    let cfg = |b: &[(&str, u32)]| Config::parse(&one_vip(b), "x".as_ref()).unwrap();
    let mut running = Dataplane::load(Some(&dir)).expect("the running process");
    running.apply(&cfg(&THREE)).unwrap();
    let mut next = Dataplane::load(Some(&dir)).expect("the process taking over");
    assert!(next.adopted());
    // Before it hands over, the running process takes backend .13 out (a health check).
    running.apply(&cfg(&THREE[..2])).unwrap();
    drop(running);
    next.refresh().unwrap();
    let report = next.apply(&cfg(&THREE[..2])).unwrap();
    assert_eq!(report.ring_slots_written, 0, "its view is what the maps hold: {report:?}");
    // .13 back, .11 out: every new flow reaches a backend the maps hold.
    next.apply(&cfg(&[THREE[1], THREE[2]])).unwrap();
    for i in 0..200u32 {
        let client = Ipv4Addr::from(u32::from(v4("198.18.4.0")) + i).to_string();
        let frame = eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4(&client, 40000, "198.18.1.1", 80, SYN));
        let (verdict, out) = run_frame(&mut next, &frame);
        assert_eq!(verdict, XDP_TX, "client {client}");
        let to = outer_dst(&out).to_string();
        assert!(to == "198.18.0.12" || to == "198.18.0.13", "client {client} sent to {to}");
    }
}

/// Pinned XDP links across restarts: an interface taken out of the config loses the program
/// (no program left running on maps nobody keeps), and an interface deleted and made again,
/// whose pinned link then holds no device, is attached afresh instead of failing every start.
#[test]
fn pinned_links_follow_the_interfaces() {
    if !require_privileged("pinned_links_follow_the_interfaces") {
        return;
    }
    let netns = ScratchNetns::add("elpl");
    let ns = netns.0.clone();
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/edgelb-links-{}", std::process::id()));
    // Dropped before the namespace (declared after it).
    struct Pins(std::path::PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = Dataplane::teardown(&self.0);
        }
    }
    let _pins = Pins(dir.clone());
    let ip = |args: &str| netns.ip(args);
    ip("link add va type veth peer name vb");
    ip("link set va up");
    ip("link set vb up");
    let has_xdp = |dev: &str| {
        let out = std::process::Command::new("ip")
            .args(["-n", &ns, "-d", "link", "show", dev])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    };
    let cfg = Config::parse(&one_vip(&THREE), "x".as_ref()).unwrap();
    let start = |interfaces: &[&str]| {
        netns::in_netns(&ns, || {
            let mut dp = Dataplane::load(Some(&dir)).expect("loads");
            dp.apply(&cfg).unwrap();
            let modes: Vec<&str> = interfaces
                .iter()
                .map(|i| dp.attach(i, XdpAttachMode::Generic).expect("attaches"))
                .collect();
            (modes, dp.remove_unused_links().unwrap())
        })
        .unwrap()
    };
    assert_eq!(start(&["va", "vb"]), (vec!["generic", "generic"], vec![]));
    assert!(has_xdp("va") && has_xdp("vb"));
    // A restart without vb: va's link is taken over (in the mode the kernel reports for it),
    // vb's removed with its program.
    assert_eq!(start(&["va"]), (vec!["generic"], vec!["vb".to_owned()]));
    assert!(has_xdp("va") && !has_xdp("vb"), "the program left vb");
    // va deleted and made again: its pinned link holds no device any more.
    ip("link del va");
    ip("link add va type veth peer name vc");
    ip("link set va up");
    assert_eq!(start(&["va"]), (vec!["generic"], vec![]), "attached afresh");
    assert!(has_xdp("va"));
    // Under a running edgelb: va deleted, then made again (another device by the same name).
    netns::in_netns(&ns, || {
        let mut dp = Dataplane::load(Some(&dir)).expect("loads");
        dp.apply(&cfg).unwrap();
        assert_eq!(dp.attach("va", XdpAttachMode::Generic).expect("attaches"), "generic");
        assert!(dp.lost_interfaces().is_empty());
        // Renamed: XDP stays on the device, under its new name; not lost.
        ip("link set va down");
        ip("link set va name vz");
        assert!(dp.lost_interfaces().is_empty(), "renamed, not lost");
        assert_eq!(dp.renamed_interfaces(), [("va".to_owned(), "vz".to_owned())]);
        ip("link set vz name va");
        ip("link set va up");
        assert!(dp.renamed_interfaces().is_empty() && dp.lost_interfaces().is_empty());
        ip("link del va");
        assert_eq!(dp.lost_interfaces(), ["va"], "deleted");
        assert!(dp.renamed_interfaces().is_empty());
        ip("link add va type veth peer name vd");
        assert_eq!(dp.lost_interfaces(), ["va"], "another device by that name");
    })
    .unwrap();
    // A takeover after a rename that fails once it has attached: the new process moved the pin
    // with the rename (link-va to link-vz). The old one takes its device back through that pin,
    // and keeps it: it had looked for link-va only, then removed link-vz as unused, which
    // detached XDP from the device.
    let xdp_id = |dev: &str| {
        let out = std::process::Command::new("ip")
            .args(["-n", &ns, "-d", "link", "show", dev])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let rest = &text[text.find("prog/xdp id ")? + "prog/xdp id ".len()..];
        rest.split_whitespace().next()?.parse::<u32>().ok()
    };
    ip("link set va up");
    netns::in_netns(&ns, || {
        let mut old = Dataplane::load(Some(&dir)).expect("loads");
        old.apply(&cfg).unwrap();
        old.attach("va", XdpAttachMode::Generic).expect("attaches");
        let old_prog = xdp_id("va").expect("va runs the balancer");
        ip("link set va down");
        ip("link set va name vz");
        ip("link set vz up");
        let mut new = Dataplane::load(Some(&dir)).expect("loads beside");
        new.apply(&cfg).unwrap();
        new.attach("vz", XdpAttachMode::Generic).expect("the new one attaches vz");
        assert!(dir.join("link-vz").exists() && !dir.join("link-va").exists(), "the pin moved");
        assert_ne!(xdp_id("vz"), Some(old_prog));
        drop(new);
        old.reclaim().expect("the old one takes its device back");
        assert_eq!(xdp_id("vz"), Some(old_prog), "vz runs the old program again");
        assert!(dir.join("link-vz").exists(), "its link stays pinned");
    })
    .unwrap();
    // The same, with a new device made under the old name, which the failed process attached
    // under that name: the old process goes by the devices its links hold, not by their names.
    // It put its program on the new device (through `link-vq`, now that device's) and left the
    // renamed one with the failed process's program.
    ip("link add vq type veth peer name vr");
    ip("link set vq up");
    netns::in_netns(&ns, || {
        let mut old = Dataplane::load(Some(&dir)).expect("loads");
        old.apply(&cfg).unwrap();
        old.attach("vq", XdpAttachMode::Generic).expect("attaches");
        let old_prog = xdp_id("vq").expect("vq runs the balancer");
        ip("link set vq down");
        ip("link set vq name vw");
        ip("link set vw up");
        ip("link add vq type veth peer name vs");
        ip("link set vq up");
        let mut new = Dataplane::load(Some(&dir)).expect("loads beside");
        new.apply(&cfg).unwrap();
        new.attach("vw", XdpAttachMode::Generic).expect("the new one attaches vw");
        new.attach("vq", XdpAttachMode::Generic).expect("and the new vq");
        drop(new);
        old.reclaim().expect("the old one takes its device back");
        assert_eq!(xdp_id("vw"), Some(old_prog), "the renamed device runs the old program");
        assert!(dir.join("link-vw").exists(), "its link stays pinned");
        assert_eq!(xdp_id("vq"), None, "the device the old one never had is let go");
        assert!(!dir.join("link-vq").exists());
    })
    .unwrap();
}

/// Out of descriptors, an attached interface is not lost. Looking an interface up by name or
/// index opens a socket: with none to be had, the lookup fails, and that said nothing of the
/// interface. It was taken for "no such interface", and edgelb said XDP was gone from a
/// healthy one (`restart edgelb`, LOST in `status`, `edgelb_xdp_attached` 0), and "back" once
/// descriptors were free again.
#[test]
fn out_of_descriptors_an_interface_is_not_lost() {
    const NAME: &str = "out_of_descriptors_an_interface_is_not_lost";
    if !require_privileged(NAME) {
        return;
    }
    if std::env::var_os("EDGELB_FD_CHILD").is_none() {
        return common::in_child(NAME);
    }
    let netns = ScratchNetns::add("elfd");
    let ns = netns.0.clone();
    let cfg = Config::parse(&one_vip(&THREE), "x".as_ref()).unwrap();
    netns::in_netns(&ns, || {
        let mut dp = Dataplane::load(None).expect("loads");
        dp.apply(&cfg).unwrap();
        assert_eq!(dp.attach("lo", XdpAttachMode::Generic).expect("attaches"), "generic");
        assert!(dp.lost_interfaces().is_empty() && dp.renamed_interfaces().is_empty());
        let room = common::room_for(0);
        let (lost, renamed) = (dp.lost_interfaces(), dp.renamed_interfaces());
        let states = dp.interface_states();
        let exists = edgelb::dataplane::interface_exists("lo");
        drop(room);
        assert!(lost.is_empty(), "lost out of descriptors: {lost:?}");
        assert!(renamed.is_empty(), "renamed out of descriptors: {renamed:?}");
        // Whatever errno the failed lookup left (glibc's tries of several socket families leave
        // ENOENT), it is not "no such device".
        assert!(
            matches!(&states[..], [(i, InterfaceState::Unknown(_))] if i == "lo"),
            "{states:?}"
        );
        // Nor does a start take it for an interface that is not there.
        let e = exists.expect_err("out of descriptors, whether lo is there cannot be told");
        assert!(e.to_string().contains("could not be told"), "{e}");
        let states = dp.interface_states();
        assert!(matches!(&states[..], [(_, InterfaceState::Attached)]), "{states:?}");
        assert!(edgelb::dataplane::interface_exists("lo").unwrap());
    })
    .unwrap();
}

#[test]
fn a_configured_table_size_is_the_one_the_program_indexes() {
    let three = THREE;
    let toml = one_vip(&three).replacen("[node]\n", "[node]\nconntrack_flows_per_cpu = 4096\n", 1);
    let Some(mut h) = Harness::new("a_configured_table_size_is_the_one_the_program_indexes", &toml)
    else {
        return;
    };
    assert_eq!(h.cfg.node.conntrack_flows_per_cpu, Some(4096));
    let shape = h.dp.table_shape();
    assert_eq!((shape.v4_buckets, shape.v6_buckets), (1024, 1024));
    assert_eq!((shape.v4_flows_per_cpu(), shape.v6_flows_per_cpu()), (4096, 4096));
    edgelb::testbed::netns::pin_current_thread(Some(0)).expect("pin to CPU 0");
    // Five flows in one bucket of the 1024-bucket table, which the default table (32 768
    // buckets) would spread: only a program indexing the small table evicts one of them.
    let auto = TableShape::auto().v4_buckets;
    let client = v4("198.18.64.1");
    let five =
        bucket_overflow(1024, lb_common::CONNTRACK_WAYS + 1, (1024..u16::MAX).map(|p| (client, p)));
    let spread: std::collections::HashSet<u32> =
        five.iter().map(|&(c, p)| bucket_of(auto, c, p)).collect();
    assert!(spread.len() > 1, "the default table would spread these flows");
    for (i, &f) in five.iter().enumerate() {
        // Without SYN (a SYN's flow does not enter the table), twice: an unknown flow enters
        // at its second segment.
        assert_eq!(h.run(&vip_segment(f, ACK)).0, XDP_TX);
        assert_eq!(h.run(&vip_segment(f, ACK)).0, XDP_TX);
        let evicted = ct_event(&h, lb_common::ct_stats::EVICTED);
        assert_eq!(evicted, u64::from(i == lb_common::CONNTRACK_WAYS), "after flow {i}");
    }
}

#[test]
fn vip_lookup_cache_follows_vip_changes() {
    let one = one_vip(&[("198.18.0.11", 1)]);
    let Some(mut h) = Harness::pinned("vip_lookup_cache_follows_vip_changes", &one) else {
        return;
    };
    let to = |port: u16| {
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4("198.18.4.7", 40000, "198.18.1.1", port, SYN))
    };
    // Cached answers, positive and negative, on this CPU.
    assert_eq!(h.run(&to(80)).0, XDP_TX);
    assert_eq!(h.run(&to(81)).0, XDP_PASS);
    assert_eq!(h.run(&to(80)).0, XDP_TX);
    assert_eq!(h.run(&to(81)).0, XDP_PASS);
    // The VIP moves from port 80 to 81: both cached answers must go.
    h.apply(&one.replace("port = 80", "port = 81"));
    assert_eq!(h.run(&to(80)).0, XDP_PASS, "removed VIP no longer served from the cache");
    assert_eq!(h.run(&to(81)).0, XDP_TX, "added VIP not hidden by a cached miss");
    // A changed backend set republishes the VIP (new ring): the cached entry is refreshed.
    h.apply(&one_vip(&[("198.18.0.12", 1)]).replace("port = 80", "port = 81"));
    assert_eq!(outer_dst(&h.run(&to(81)).1), v4("198.18.0.12"));

    // The same for IPv6 VIPs, which have a cache of their own.
    let six = |port: u16, backend: u8| one_vip6(port, &[backend]);
    let to6 = |port: u16| {
        eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &tcp6("2001:2::77", 40000, "2001:2:0:1::1", port, SYN))
    };
    h.apply(&six(80, 0x11));
    for _ in 0..2 {
        assert_eq!(h.run(&to6(80)).0, XDP_TX);
        assert_eq!(h.run(&to6(81)).0, XDP_PASS);
    }
    h.apply(&six(81, 0x11));
    assert_eq!(h.run(&to6(80)).0, XDP_PASS, "removed IPv6 VIP no longer served from the cache");
    assert_eq!(h.run(&to6(81)).0, XDP_TX, "added IPv6 VIP not hidden by a cached miss");
    h.apply(&six(81, 0x12));
    assert_eq!(outer_dst6(&h.run(&to6(81)).1), v6("2001:2::12"));
}

/// A config at the capacity limits (32 VIPs, 4096 backend entries) can still move a VIP to
/// another port: the removed VIP's index and entries are free before its replacement needs them.
#[test]
fn a_full_config_can_replace_a_vip() {
    let full = |first_port: u16| {
        let mut t = String::from(
            "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:ed:00:00:00:fe\"\n",
        );
        for v in 0..32u16 {
            let port = if v == 0 { first_port } else { 1000 + v };
            let backends: Vec<String> = (0..128u16)
                .map(|b| format!("{{ address = \"198.18.{}.{}\" }}", 8 + b / 100, 1 + b % 100))
                .collect();
            t += &format!(
                "[[vip]]\nname = \"v{v}\"\naddress = \"198.18.1.1\"\nport = {port}\nbackends = [{}]\n",
                backends.join(", ")
            );
        }
        t
    };
    let Some(mut h) = Harness::pinned("a_full_config_can_replace_a_vip", &full(80)) else {
        return;
    };
    let to = |port: u16| {
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4("198.18.4.7", 40000, "198.18.1.1", port, SYN))
    };
    assert_eq!(h.run(&to(80)).0, XDP_TX);
    assert_eq!(h.run(&to(81)).0, XDP_PASS);
    h.apply(&full(81));
    assert_eq!(h.run(&to(80)).0, XDP_PASS, "the old VIP is gone");
    assert_eq!(h.run(&to(81)).0, XDP_TX, "its replacement forwards");
    assert_eq!(h.run(&to(1031)).0, XDP_TX, "the other VIPs are untouched");

    // No room: one VIP removed (128 entries freed) and two pools swapped whole (256 new ones
    // needed while the old still serve). Refused before anything is written: the VIP the file
    // removes still forwards, and the running config is still whole in the maps.
    let mut tight = full(81);
    let last = tight.rfind("[[vip]]").unwrap();
    tight.truncate(last);
    for v in ["v1", "v2"] {
        let at = tight.find(&format!("name = \"{v}\"")).unwrap();
        let end = at + tight[at..].find("\n[[vip]]").unwrap();
        let moved = tight[at..end]
            .replace("\"198.18.8.", "\"198.18.20.")
            .replace("\"198.18.9.", "\"198.18.21.");
        tight.replace_range(at..end, &moved);
    }
    let refused = Config::parse(&tight, "x".as_ref()).expect("a valid file");
    let e = h.dp.apply(&refused).expect_err("no room");
    assert!(e.to_string().contains("4096 backend entries"), "{e}");
    assert_eq!(h.run(&to(1031)).0, XDP_TX, "the VIP the refused file removes still forwards");
    let report = h.dp.apply(&h.cfg).unwrap();
    assert_eq!(report, Default::default(), "nothing of the refused file was written");
}

/// 32 VIPs (198.18.1.1, ports 1000..) whose pools are `pools` (backend addresses), each with a
/// ring of 1021 slots: [`a_full_config_can_swap_and_move_backends`].
fn full_of(pools: &[Vec<String>]) -> Config {
    let mut t = String::from(
        "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:ed:00:00:00:fe\"\n",
    );
    for (v, pool) in pools.iter().enumerate() {
        let backends: Vec<String> =
            pool.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
        t += &format!(
            "[[vip]]\nname = \"v{v}\"\naddress = \"198.18.1.1\"\nport = {}\nring_size = 1021\nbackends = [{}]\n",
            1000 + v,
            backends.join(", ")
        );
    }
    Config::parse(&t, "x".as_ref()).expect("a valid file")
}

/// Every VIP of the effective config `eff` publishes a ring naming exactly the entries of its
/// live backends: present, of that VIP, at the addresses `eff` lists.
fn rings_name_only_live_entries(dp: &Dataplane, eff: &Config, when: &str) {
    use edgelb::dataplane::{maps::get_slots, words_addr};
    for vip in &eff.vips {
        let meta = dp.maps().vips_v4.get(&vip_key(vip).v4(), 0).expect("the VIP's entry");
        assert!(meta.ring_size > 0, "{when}: {} has no ring", vip.name);
        let ring = get_slots(&dp.maps().rings, meta.ring_base, meta.ring_size).unwrap();
        let named: std::collections::BTreeSet<u32> = ring.into_iter().collect();
        for &id in &named {
            let b = dp.maps().backends.get(&id, 0).unwrap();
            let addr = words_addr(b.addr, b.family);
            assert!(
                b.flags == lb_common::backend_flags::PRESENT
                    && b.vip_index == meta.vip_index
                    && vip.backends.iter().any(|x| x.address == addr),
                "{when}: {}'s ring names id {id}, {b:?}",
                vip.name
            );
        }
        let live: std::collections::BTreeSet<u32> =
            vip.backends.iter().map(|b| dp.backend_id(vip, b.address).expect("an entry")).collect();
        assert_eq!(named, live, "{when}: {}'s ring", vip.name);
    }
}

/// What the maps say of `cfg`'s VIPs: every backend entry, and each VIP's entry and live ring.
fn maps_of(
    dp: &Dataplane,
    cfg: &Config,
) -> (Vec<lb_common::Backend>, Vec<(lb_common::VipMeta, Vec<u32>)>) {
    let backends = (0..lb_common::MAX_BACKENDS).map(|id| dp.maps().backends.get(&id, 0).unwrap());
    let vips = cfg.vips.iter().map(|vip| {
        let meta = dp.maps().vips_v4.get(&vip_key(vip).v4(), 0).expect("the VIP's entry");
        let ring =
            edgelb::dataplane::maps::get_slots(&dp.maps().rings, meta.ring_base, meta.ring_size);
        (meta, ring.unwrap())
    });
    (backends.collect(), vips.collect())
}

/// At the limit (32 VIPs of 128 backends: 4096 entries, every one used), a reload that gives a
/// backend another address, or moves one to another VIP, is applied: an entry leaving a live
/// VIP is freed only once no published ring names it, so the apply first publishes rings
/// without the leavers (and without the newcomers), retires them, then applies the whole file.
/// A backend found down stays parked through both. A start that adopts the maps does the same.
/// A pool swapped whole has no such way (a VIP is never left without its pool): it needs room
/// for its old and new entries at once, and is refused before anything is written.
#[test]
fn a_full_config_can_swap_and_move_backends() {
    if !require_privileged("a_full_config_can_swap_and_move_backends") {
        return;
    }
    let dir = PinDir::new("room");
    let mut pools: Vec<Vec<String>> = (0..32u16)
        .map(|v| (0..128u16).map(|b| format!("198.18.{}.{}", 8 + v, 1 + b)).collect())
        .collect();
    // VIP v0's backend 198.18.8.6 is down: the effective config leaves it out, and it is parked.
    let down: IpAddr = v4("198.18.8.6").into();
    let effective = |cfg: &Config| {
        let mut eff = cfg.clone();
        eff.vips[0].backends.retain(|b| b.address != down);
        eff
    };
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    let cfg = full_of(&pools);
    dp.apply(&cfg).unwrap();
    dp.apply_keeping(&effective(&cfg), &cfg).unwrap();
    assert!(dp.backend_id(&cfg.vips[0], down).is_some(), "the down backend is parked");
    rings_name_only_live_entries(&dp, &effective(&cfg), "full");

    // One backend of v0 gets another address.
    pools[0][0] = "198.18.40.1".into();
    let cfg = full_of(&pools);
    let r = dp.apply_keeping(&effective(&cfg), &cfg).expect("a swapped address at the limit");
    assert_eq!((r.backends_added, r.backends_removed), (1, 1), "{r:?}");
    rings_name_only_live_entries(&dp, &effective(&cfg), "address swapped");
    assert!(dp.backend_id(&cfg.vips[0], down).is_some(), "the down backend is still parked");

    // One backend moves from v0 to v1.
    let moved = pools[0].remove(1);
    pools[1].push(moved.clone());
    let cfg = full_of(&pools);
    dp.apply_keeping(&effective(&cfg), &cfg).expect("a backend moved at the limit");
    rings_name_only_live_entries(&dp, &effective(&cfg), "backend moved");
    let moved: IpAddr = moved.parse().unwrap();
    assert!(
        dp.backend_id(&cfg.vips[0], moved).is_none()
            && dp.backend_id(&cfg.vips[1], moved).is_some()
    );

    // A start adopting these maps (a restart, a takeover) applies the same way.
    drop(dp);
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    assert!(dp.adopted());
    pools[5][3] = "198.18.40.2".into();
    let cfg = full_of(&pools);
    dp.apply_keeping(&effective(&cfg), &cfg).expect("a swapped address on adopted maps");
    rings_name_only_live_entries(&dp, &effective(&cfg), "adopted, address swapped");

    // v2's pool swapped whole: 128 new entries, none free. Refused, nothing written.
    let before = maps_of(&dp, &cfg);
    pools[2] = (0..128u16).map(|b| format!("198.18.41.{}", 1 + b)).collect();
    let whole = full_of(&pools);
    let e = dp.apply_keeping(&effective(&whole), &whole).expect_err("no room").to_string();
    assert!(
        e.contains("4096 backend entries")
            && e.contains("needs 128 new")
            && e.contains("with 0 free"),
        "{e}"
    );
    assert!(e.contains("first a config that removes"), "the error says what to do: {e}");
    assert_eq!(maps_of(&dp, &cfg), before, "the refused file wrote nothing");
    let r = dp.apply_keeping(&effective(&cfg), &cfg).unwrap();
    assert!(r.is_empty(), "the running config is whole in the maps: {r:?}");
}

/// A reload short of backend entries gives reduced rings (the first of its two passes) to as
/// few VIPs as make the room, those with the most leavers first, and never to one whose kept
/// backends carry less than half of its new pool's weight: between the passes that VIP's new
/// flows would all land on what it keeps, and the connection table would keep them there. A
/// VIP's entry names the other ring region each time a new ring is published: a VIP given a
/// reduced ring and then its whole one is back in the region it started in, one left alone in
/// the first pass is in the other. When only such VIPs could make the room, the reload is
/// refused before anything is written.
#[test]
fn a_reload_short_of_entries_reduces_only_the_vips_it_needs() {
    if !require_privileged("a_reload_short_of_entries_reduces_only_the_vips_it_needs") {
        return;
    }
    // 31 VIPs of 128 backends and v31 of 2: 126 entries free.
    let mut pools: Vec<Vec<String>> = (0..32u16)
        .map(|v| (0..128u16).map(|b| format!("198.18.{}.{}", 8 + v, 1 + b)).collect())
        .collect();
    pools[31].truncate(2);
    let mut dp = Dataplane::load(None).unwrap();
    let cfg = full_of(&pools);
    dp.apply(&cfg).unwrap();
    let base = |dp: &Dataplane, cfg: &Config, v: usize| {
        dp.maps().vips_v4.get(&vip_key(&cfg.vips[v]).v4(), 0).expect("the VIP's entry").ring_base
    };
    let before: Vec<u32> = (0..3).map(|v| base(&dp, &cfg, v)).collect();

    // One entry short: 127 new (v0 swaps 1 backend, v2 swaps 2, v1 swaps 124 of 128), 126 free.
    // v2's two leavers make the room; v0 is not needed, and v1 keeps 4/128 of its weight.
    // The first `n` backends of `pool` get addresses in 198.18.`net`.0/24.
    let swap = |pool: &mut Vec<String>, n: usize, net: u8| {
        for (b, a) in pool.iter_mut().take(n).enumerate() {
            *a = format!("198.18.{net}.{}", 1 + b);
        }
    };
    swap(&mut pools[0], 1, 42);
    swap(&mut pools[2], 2, 44);
    swap(&mut pools[1], 124, 43);
    let cfg = full_of(&pools);
    let r = dp.apply(&cfg).expect("one entry short, applied in two passes");
    assert_eq!((r.backends_added, r.backends_removed), (127, 127), "{r:?}");
    // v2's entry, rewritten in both passes, counts once; the words say there were two.
    assert!(r.two_passes && r.vips_updated == 3, "{r:?}");
    assert!(r.to_string().ends_with("(applied in two passes; the counts cover both)"), "{r}");
    rings_name_only_live_entries(&dp, &cfg, "one entry short");
    assert_eq!(base(&dp, &cfg, 2), before[2], "v2 got a reduced ring, then its whole one");
    assert_ne!(base(&dp, &cfg, 0), before[0], "v0 was left alone in the first pass");
    assert_ne!(base(&dp, &cfg, 1), before[1], "v1 (4/128 kept) never got a reduced ring");

    // 190 new (v31 grows by 126, v3 swaps 64 of 128), 126 free: v3 keeps exactly half of its
    // weight, and its 64 leavers make the room.
    pools[31] = (0..128u16).map(|b| format!("198.18.39.{}", 1 + b)).collect();
    swap(&mut pools[3], 64, 45);
    let half = full_of(&pools);
    // Before that, v3 swapping 65 (63/128 kept): only v3 could make the room, and may not.
    swap(&mut pools[3], 65, 45);
    let low = full_of(&pools);
    let untouched = maps_of(&dp, &cfg);
    let e = dp.apply(&low).expect_err("only a VIP keeping under half could free").to_string();
    assert!(
        e.contains("4096 backend entries")
            && e.contains("needs 191 new")
            && e.contains("with 126 free")
            && e.contains("less than half"),
        "{e}"
    );
    assert_eq!(maps_of(&dp, &cfg), untouched, "the refused file wrote nothing");
    let before3 = base(&dp, &cfg, 3);
    let r = dp.apply(&half).expect("v3 keeps half: applied in two passes");
    assert!(r.two_passes && r.vips_updated == 2, "v3 and v31: {r:?}");
    rings_name_only_live_entries(&dp, &half, "v3 keeping half");
    assert_eq!(base(&dp, &half, 3), before3, "v3 got a reduced ring, then its whole one");
}

/// A ring slot naming a present backend of another VIP places no flow: the packet is dropped
/// as having no backend. A packet whose VIP lookup answered just before a reload removed its
/// VIP reads the removed VIP's ring, and the reload retires that VIP's backend ids first and may
/// give them to another VIP's new backends before the packet reads the slot; here the slot is
/// written by hand. Every way the ring places a flow is tried: a SYN, a datagram the table does
/// not hold, and a segment without SYN that no table holds.
#[test]
fn a_ring_slot_naming_another_vips_backend_places_no_flow() {
    let test = "a_ring_slot_naming_another_vips_backend_places_no_flow";
    let Some(mut h) = Harness::new(test, FIXTURE_CONFIG) else { return };
    let client = "198.18.4.7";
    // The VIP whose ring slot is rewritten, the VIP whose backend it is made to name, and the
    // flow's packet from a client port.
    type Packet = fn(u16) -> Vec<u8>;
    let cases: [(&str, &str, Packet); 3] = [
        ("v4tcp", "v4udp", |sport| tcp4("198.18.4.7", sport, "198.18.1.1", 80, SYN)),
        ("v4udp", "v4tcp", |sport| udp4("198.18.4.7", sport, "198.18.1.1", 53, b"query")),
        ("v4tcp", "v4udp", |sport| tcp4("198.18.4.7", sport, "198.18.1.1", 80, ACK)),
    ];
    for (i, (name, other, packet)) in cases.into_iter().enumerate() {
        // A new 5-tuple for every run: each is placed by the ring (client hashing: the same slot).
        let sport = |n: u16| 41000 + 10 * i as u16 + n;
        let frame = |n: u16| eth(LB_MAC, CLIENT_MAC, ETH_IP, &packet(sport(n)));
        let (vip, other) = (h.vip(name), h.vip(other));
        let meta = h.dp.maps().vips_v4.get(&vip_key(&vip).v4(), 0).expect("the VIP's entry");
        let slot = meta.ring_base + flow_hash(&vip, v4(client).into(), 0) % meta.ring_size;
        let own = h.dp.maps().rings.get(&slot, 0).unwrap();
        let stranger = h.dp.backend_id(&other, route(&vip, v4(client).into(), 0).unwrap().address);
        let stranger = stranger.expect("the other VIP has a backend at that address");
        assert_ne!(own, stranger);
        assert_eq!(h.run(&frame(0)).0, XDP_TX, "{name}: the flow's slot serves");
        h.dp.maps_mut().rings.set(slot, &stranger, 0).unwrap();
        let input = frame(1);
        let case = format!("{name}: slot naming a backend of {}", other.name);
        h.check(&case, &input, XDP_DROP, None, Reason::DropNoBackend);
        h.dp.maps_mut().rings.set(slot, &own, 0).unwrap();
        assert_eq!(h.run(&frame(2)).0, XDP_TX, "{name}: the slot serves again once restored");
    }
}

/// A reload that replaces a VIP gives the new one a VIP index of its own, not the one it has
/// just freed, while another is free: a packet whose VIP lookup answered just before the reload
/// reads the removed VIP's entry and ring, and the program refuses that ring's backends only by
/// their VIP index. Here the stale entry is put back by hand, as such a packet would have read
/// it: its SYN is dropped as having no backend, not sent to the new VIP's backends.
#[test]
fn a_replaced_vips_index_is_not_given_to_its_replacement() {
    let test = "a_replaced_vips_index_is_not_given_to_its_replacement";
    let Some(mut h) = Harness::new(test, FIXTURE_CONFIG) else { return };
    let old = h.vip("v4tcp");
    let stale = h.dp.maps().vips_v4.get(&vip_key(&old).v4(), 0).expect("the VIP's entry");
    let moved = FIXTURE_CONFIG.replacen("port = 80\n", "port = 81\n", 1);
    assert_ne!(moved, FIXTURE_CONFIG);
    h.apply(&moved);
    let new = h.vip("v4tcp");
    assert_eq!(new.port, 81);
    let index = h.dp.vip_index(&new).expect("the new VIP has an index");
    assert_ne!(index, stale.vip_index, "the replacement took the index its VIP freed");
    let syn = |port: u16| {
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4("198.18.4.7", 40000, "198.18.1.1", port, SYN))
    };
    assert_eq!(h.run(&syn(81)).0, XDP_TX, "the replacement forwards");
    h.dp.maps_mut().vips_v4.insert(&vip_key(&old).v4(), &stale, 0).expect("stale entry written");
    h.check("a SYN read the removed VIP's entry", &syn(80), XDP_DROP, None, Reason::DropNoBackend);
}

/// Where a frame's IP packet starts and its ethertype (one VLAN tag is skipped).
fn l3_of(frame: &[u8]) -> (usize, u16) {
    let at = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    if at(12) == 0x8100 && frame.len() >= 18 { (18, at(16)) } else { (14, at(12)) }
}

/// Length an IP packet's header declares for it (IPv4 total length, IPv6 40 + payload length).
fn declared_len(ip: &[u8]) -> usize {
    let be = |o: usize| u16::from_be_bytes([ip[o], ip[o + 1]]) as usize;
    if ip[0] >> 4 == 4 { be(2) } else { 40 + be(4) }
}

/// What a sent frame must be, given the reason it was counted under: an encapsulation carrying
/// the input's IP packet unchanged, the input with new MACs only, or an ICMP answer to it.
fn check_sent(case: &str, input: &[u8], out: &[u8], reason: usize) {
    let (in_l3, _) = l3_of(input);
    let (l3, ethertype) = l3_of(out);
    let inner_in = &input[in_l3..];
    let ip = &out[l3..];
    // L2 DSR (data, or an ICMP error about an L2 VIP's flow) changes nothing past the MACs.
    if reason == Reason::TxL2 as usize
        || (reason == Reason::TxIcmpToBackend as usize && ip == inner_in)
    {
        assert_eq!(hex(ip), hex(inner_in), "{case}: L2 DSR changes nothing past the MACs");
        return;
    }
    let v4_header_ok = |h: &[u8]| h[0] == 0x45 && csum(&h[..20]) == 0;
    if reason == Reason::TxEncap as usize || reason == Reason::TxIcmpToBackend as usize {
        let inner_len = declared_len(inner_in);
        let (outer_len, carried) = match ethertype {
            ETH_IP => {
                assert!(v4_header_ok(ip), "{case}: outer IPv4 header {}", hex(&ip[..20]));
                assert_eq!(ip[9], 4, "{case}: IPIP");
                (u16::from_be_bytes([ip[2], ip[3]]) as usize, &ip[20..])
            }
            ETH_IPV6 => {
                assert!(ip[6] == 4 || ip[6] == 41, "{case}: next header {}", ip[6]);
                (40 + u16::from_be_bytes([ip[4], ip[5]]) as usize, &ip[40..])
            }
            other => panic!("{case}: sent a frame of ethertype {other:#x}"),
        };
        assert_eq!(outer_len, out.len() - l3 - (carried.len() - inner_len), "{case}: outer length");
        assert_eq!(hex(&carried[..inner_len]), hex(&inner_in[..inner_len]), "{case}: inner packet");
        return;
    }
    // ICMP answers go back to the client: addresses swapped.
    let (got, want) = match ethertype {
        ETH_IP => ((&ip[12..16], &ip[16..20]), (&inner_in[16..20], &inner_in[12..16])),
        ETH_IPV6 => ((&ip[8..24], &ip[24..40]), (&inner_in[24..40], &inner_in[8..24])),
        other => panic!("{case}: sent a frame of ethertype {other:#x}"),
    };
    assert_eq!(got, want, "{case}: answer goes back to the sender");
    // Too-big messages are built afresh: checksums right whatever the input held.
    if reason == Reason::TxIcmpTooBig as usize && ethertype == ETH_IP {
        assert!(v4_header_ok(ip), "{case}: frag-needed IPv4 header {}", hex(&ip[..20]));
        let len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        assert_eq!(csum(&ip[20..len]), 0, "{case}: frag-needed ICMP checksum");
    }
    if reason == Reason::TxIcmpTooBig as usize && ethertype == ETH_IPV6 {
        assert_eq!(ip[6], 58, "{case}: ICMPv6");
        let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let mut pseudo = ip[8..40].to_vec();
        pseudo.extend((len as u32).to_be_bytes());
        pseudo.extend([0, 0, 0, 58]);
        pseudo.extend(&ip[40..40 + len]);
        assert_eq!(csum(&pseudo), 0, "{case}: packet-too-big ICMPv6 checksum");
    }
}

/// Random damage to valid frames of every kind the program handles: it never aborts, counts
/// each frame under exactly one reason, passes what it passes untouched, and whatever it sends
/// is well formed (see `check_sent`).
#[test]
fn damaged_frames_are_passed_dropped_or_sent_well_formed() {
    let Some(mut h) = Harness::new("damaged_frames", FIXTURE_CONFIG) else { return };
    let (c4, vip4) = (v4("198.18.4.7"), v4("198.18.1.1"));
    let (c6, vip6) = (v6("2001:2::77"), v6("2001:2:0:1::1"));
    let quoted = V4::new(vip4, c4, 6).packet(&tcp(vip4.into(), c4.into(), 80, 40000, ACK, b""));
    let mut df = V4::new(c4, vip4, 6);
    df.df = true;
    let v4p = |dst: &str, l4: Vec<u8>, proto: u8| V4::new(c4, v4(dst), proto).packet(&l4);
    let t4 = |dst: &str, flags| tcp(c4.into(), v4(dst).into(), 40000, 80, flags, b"hello");
    let bases: Vec<Vec<u8>> = vec![
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &v4p("198.18.1.1", t4("198.18.1.1", SYN), 6)),
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &v4p("198.18.1.1", t4("198.18.1.1", ACK), 6)),
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &v4p("198.18.1.2", t4("198.18.1.2", SYN), 6)),
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &v4p("198.18.1.4", t4("198.18.1.4", SYN), 6)),
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &v4p("198.18.1.5", t4("198.18.1.5", ACK), 6)),
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &v4p("198.18.1.6", t4("198.18.1.6", SYN), 6)),
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &v4p("198.18.0.2", t4("198.18.0.2", SYN), 6)),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &v4p("198.18.1.1", udp(c4.into(), vip4.into(), 5353, 53, b"query"), 17),
        ),
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &v4p("198.18.1.1", icmp4(8, 0, [0, 7, 0, 1], b"ping"), 1)),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &V4::new(v4("198.18.0.254"), vip4, 1).packet(&icmp4(3, 4, [0, 0, 5, 0], &quoted)),
        ),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IP,
            &df.packet(&tcp(c4.into(), vip4.into(), 40000, 80, ACK, &[0x5a; 1460])),
        ),
        eth_vlan(LB_MAC, CLIENT_MAC, 7, ETH_IP, &v4p("198.18.1.1", t4("198.18.1.1", SYN), 6)),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV6,
            &ipv6(c6, vip6, 6, 0, 64, &tcp(c6.into(), vip6.into(), 40000, 80, SYN, b"hi")),
        ),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV6,
            &ipv6(c6, vip6, 17, 0, 64, &udp(c6.into(), vip6.into(), 5353, 53, b"q")),
        ),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV6,
            &ipv6(c6, vip6, 58, 0, 64, &icmp6(c6, vip6, 128, 0, [0, 9, 0, 1], b"ping6")),
        ),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV6,
            &ipv6(c6, vip6, 6, 0, 64, &tcp(c6.into(), vip6.into(), 40000, 80, ACK, &[7; 1440])),
        ),
        eth(LB_MAC, CLIENT_MAC, ETH_ARP, &[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1]),
        // ICMP errors about VIP flows: IPv6 packet-too-big (TCP), IPv4 port unreachable (UDP).
        {
            let quoted6 =
                ipv6(vip6, c6, 6, 0, 64, &tcp(vip6.into(), c6.into(), 80, 40000, ACK, b""));
            let router6 = v6("2001:2::fe");
            let ptb = icmp6(router6, vip6, 2, 0, 1280u32.to_be_bytes(), &quoted6);
            eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &ipv6(router6, vip6, 58, 0, 64, &ptb))
        },
        {
            let quoted = V4::new(vip4, c4, 17).packet(&udp(vip4.into(), c4.into(), 53, 5353, b"a"));
            eth(
                LB_MAC,
                CLIENT_MAC,
                ETH_IP,
                &V4::new(v4("198.18.0.254"), vip4, 1).packet(&icmp4(3, 3, [0; 4], &quoted)),
            )
        },
        // An IPv6 extension header (hop-by-hop) in front of TCP to a VIP.
        {
            let mut ext = vec![6u8, 0, 1, 4, 0, 0, 0, 0];
            ext.extend(tcp(c6.into(), vip6.into(), 40000, 80, SYN, b""));
            eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &ipv6(c6, vip6, 0, 0, 64, &ext))
        },
    ];
    // A fixed seed, so a failure reproduces; FUZZ_SEED=<n> explores others.
    let mut rnd = common::rng(common::fuzz_seed(0x2545_f491_4f6c_dd1d));
    let mut seen = [0u64; REASON_COUNT as usize];
    for i in 0..20_000 {
        let mut f = bases[rnd(bases.len())].clone();
        let mut what = Vec::new();
        for _ in 0..1 + rnd(3) {
            let header = f.len().min(96);
            match rnd(6) {
                0 => {
                    let at = rnd(header);
                    f[at] ^= 1 << rnd(8);
                    what.push(format!("bit flip at {at}"));
                }
                1 => {
                    let at = rnd(header);
                    f[at] = [0, 0xff, rnd(256) as u8][rnd(3)];
                    what.push(format!("byte {at} = {:#x}", f[at]));
                }
                2 => {
                    let len = 14 + rnd(f.len() - 13);
                    f.truncate(len);
                    what.push(format!("cut to {len}"));
                }
                3 => {
                    let n = 1 + rnd(40);
                    f.extend((0..n).map(|_| rnd(256) as u8));
                    what.push(format!("{n} bytes appended"));
                }
                4 => {
                    // An IP length field (IPv4 total length or IPv6 payload length) rewritten.
                    let (l3, _) = l3_of(&f);
                    let at = l3 + if f.get(l3).is_some_and(|b| b >> 4 == 6) { 4 } else { 2 };
                    if at + 2 <= f.len() {
                        let v = rnd(1600) as u16;
                        f[at..at + 2].copy_from_slice(&v.to_be_bytes());
                        what.push(format!("length field at {at} = {v}"));
                    }
                }
                _ => {
                    // IPv4 flags/fragment offset, IHL or protocol; TCP flags.
                    let (l3, _) = l3_of(&f);
                    let at = l3 + [0, 6, 7, 9, 33][rnd(5)];
                    if at < f.len() {
                        f[at] = rnd(256) as u8;
                        what.push(format!("byte {at} = {:#x}", f[at]));
                    }
                }
            }
        }
        let case = format!("case {i} ({}), frame {}", what.join(", "), hex(&f));
        let before = h.reasons();
        let (verdict, out) = h.run(&f);
        let after = h.reasons();
        let moved: Vec<usize> =
            (0..REASON_COUNT as usize).filter(|&r| after[r] != before[r]).collect();
        assert_eq!(moved.len(), 1, "{case}: counted under {moved:?}");
        let reason = moved[0];
        assert_eq!(after[reason] - before[reason], 1, "{case}");
        seen[reason] += 1;
        let name = REASON_NAMES[reason];
        match verdict {
            XDP_PASS => {
                assert!(name.starts_with("pass_"), "{case}: passed, counted as {name}");
                assert_eq!(hex(&out), hex(&f), "{case}: passed frames are untouched");
            }
            XDP_DROP => assert!(name.starts_with("drop_"), "{case}: dropped, counted as {name}"),
            XDP_TX => {
                assert!(name.starts_with("tx_"), "{case}: sent, counted as {name}");
                check_sent(&case, &f, &out, reason);
            }
            other => panic!("{case}: verdict {other}"),
        }
    }
    let summary: Vec<String> =
        REASON_NAMES.iter().zip(seen).map(|(n, c)| format!("{n}={c}")).collect();
    eprintln!("damaged frames by reason: {}", summary.join(" "));
    // The damage must leave enough frames whole that every sending path was checked.
    for r in [
        Reason::TxEncap,
        Reason::TxL2,
        Reason::TxIcmpEcho,
        Reason::TxIcmpTooBig,
        Reason::TxIcmpToBackend,
        Reason::PassMalformed,
        Reason::PassNotVip,
        Reason::PassL7,
        Reason::DropFragment,
        Reason::DropIpOptions,
    ] {
        assert!(
            seen[r as usize] > 0,
            "no damaged frame was counted as {}",
            REASON_NAMES[r as usize]
        );
    }
}

/// A client address and port of a flow to the fixture's IPv4 VIP.
type Flow = (Ipv4Addr, u16);

/// Fills one bucket of `h`'s table with established flows (each sent twice: an unknown flow
/// enters at its second segment), checks that nothing was evicted, and returns them with
/// `flood` flows of other clients that hash to the same bucket.
fn full_bucket_and_its_flood(h: &mut Harness, flood: usize) -> (Vec<Flow>, Vec<Flow>) {
    let buckets = h.dp.table_shape().v4_buckets;
    let flows = |base| flows_of(clients_from(base));
    let established = bucket_overflow(buckets, lb_common::CONNTRACK_WAYS, flows("198.18.64.0"));
    let bucket = bucket_of(buckets, established[0].0, established[0].1);
    for &f in established.iter().chain(&established) {
        h.run(&vip_segment(f, ACK));
    }
    assert_eq!(ct_event(h, lb_common::ct_stats::EVICTED), 0);
    let others = flows("198.18.128.0")
        .filter(|&(c, p)| bucket_of(buckets, c, p) == bucket)
        .take(flood)
        .collect();
    (established, others)
}

#[test]
fn a_syn_flood_cannot_push_established_flows_out() {
    let three = THREE;
    let Some(mut h) = Harness::pinned("a_syn_flood_cannot_push", &one_vip(&three)) else {
        return;
    };
    let (frame, ct) = (vip_segment, ct_event);
    use lb_common::ct_stats::{EVICTED, MISSED_ESTABLISHED};
    // 64 spoofed SYNs (each sent twice below) of other flows in the same bucket.
    let (established, flood) = full_bucket_and_its_flood(&mut h, 64);
    let missed = ct(&h, MISSED_ESTABLISHED);
    for &f in flood.iter().chain(&flood) {
        assert_eq!(h.run(&frame(f, SYN)).0, 3, "a SYN is forwarded");
    }
    assert_eq!(ct(&h, EVICTED), 0, "no SYN pushed a flow out");
    // Every established flow is still a table hit.
    for &f in &established {
        h.run(&frame(f, ACK));
    }
    assert_eq!(ct(&h, MISSED_ESTABLISHED), missed, "no established flow was lost");
    // A handshake that completes moves its flow into the table then, over the least recent.
    let done = flood[flood.len() - 1];
    h.run(&frame(done, ACK));
    assert_eq!((ct(&h, EVICTED), ct(&h, MISSED_ESTABLISHED)), (1, missed));
    h.run(&frame(done, ACK));
    assert_eq!((ct(&h, EVICTED), ct(&h, MISSED_ESTABLISHED)), (1, missed), "now a table hit");
}

/// Spoofed ACKs and RSTs, one per made-up flow (the usual shape of a flood of segments without
/// SYN), wait in handshake slots like SYNs: they cannot push established flows out of the table.
#[test]
fn an_ack_or_rst_flood_cannot_push_established_flows_out() {
    let Some(mut h) = Harness::pinned("an_ack_or_rst_flood_cannot_push", &one_vip(&THREE)) else {
        return;
    };
    let (frame, ct) = (vip_segment, ct_event);
    use lb_common::ct_stats::{EVICTED, MISSED_ESTABLISHED};
    let (established, flood) = full_bucket_and_its_flood(&mut h, 128);
    for (i, &f) in flood.iter().enumerate() {
        let flags = if i % 2 == 0 { ACK } else { RST };
        assert_eq!(h.run(&frame(f, flags)).0, XDP_TX, "forwarded all the same");
    }
    assert_eq!(ct(&h, EVICTED), 0, "no spoofed segment pushed a flow out");
    let missed = ct(&h, MISSED_ESTABLISHED);
    for &f in &established {
        h.run(&frame(f, ACK));
    }
    assert_eq!(ct(&h, MISSED_ESTABLISHED), missed, "every established flow is still a hit");
}

/// A SYN, then a RST or FIN of the same flow, one pair per made-up flow: a port scan does this
/// by itself (the scanner's SYN, the backend's SYN-ACK, the scanner's kernel's RST), and so can
/// a spoofed flood. The RST or FIN goes to the handshake's backend and empties its slot, but the
/// flow never enters the table: such pairs cannot push established flows out.
#[test]
fn syn_then_rst_or_fin_pairs_cannot_push_established_flows_out() {
    let Some(mut h) = Harness::pinned("syn_then_rst_or_fin_pairs", &one_vip(&THREE)) else {
        return;
    };
    let (frame, ct) = (vip_segment, ct_event);
    use lb_common::ct_stats::{EVICTED, MISSED_ESTABLISHED};
    let (established, flood) = full_bucket_and_its_flood(&mut h, 128);
    let missed = ct(&h, MISSED_ESTABLISHED);
    for (i, &f) in flood.iter().enumerate() {
        let end = if i % 2 == 0 { RST } else { FIN | ACK };
        assert_eq!(h.run(&frame(f, SYN)).0, XDP_TX, "a SYN is forwarded");
        assert_eq!(h.run(&frame(f, end)).0, XDP_TX, "and so is its RST or FIN");
    }
    assert_eq!(ct(&h, MISSED_ESTABLISHED), missed, "each RST or FIN found its handshake");
    assert_eq!(ct(&h, EVICTED), 0, "no SYN+RST or SYN+FIN pair pushed a flow out");
    for &f in &established {
        h.run(&frame(f, ACK));
    }
    assert_eq!(ct(&h, MISSED_ESTABLISHED), missed, "every established flow is still a hit");
}

/// A flow entering a full bucket takes the place of a flow its client has ended (FIN or RST
/// seen) in the older half of the bucket before that of the least recently used live flow; an
/// ended flow among the two most recent (a half-closed download, whose ACKs still come) is kept.
#[test]
fn an_entering_flow_pushes_out_an_ended_flow_first() {
    let Some(mut h) = Harness::pinned("an_entering_flow_pushes_out", &one_vip(&THREE)) else {
        return;
    };
    let (frame, ct) = (vip_segment, ct_event);
    use lb_common::ct_stats::{EVICTED, MISSED_ESTABLISHED};
    let (established, others) = full_bucket_and_its_flood(&mut h, 2);
    let enter = |h: &mut Harness, f: Flow| {
        // An unknown flow enters the bucket at its second segment.
        for _ in 0..2 {
            h.run(&frame(f, ACK));
        }
    };
    // Most recent first: 3, 2, 1, 0. The client of flow 2 ends it: 2 (ended), 3, 1, 0.
    h.run(&frame(established[2], FIN | ACK));
    // Ended but the most recent (a half-closed download's ACKs still come): a flow entering
    // pushes out the least recent live flow, 0, not it.
    enter(&mut h, others[0]);
    assert_eq!(ct(&h, EVICTED), 1, "a flow entered the full bucket");
    let missed = ct(&h, MISSED_ESTABLISHED);
    h.run(&frame(established[2], ACK));
    assert_eq!(ct(&h, MISSED_ESTABLISHED), missed, "the recent ended flow was kept");
    // 2 (ended), o0, 3, 1. Once it is in the older half (o0, 3, 2, 1), an entering flow pushes
    // it out before the least recent live flow, 1.
    for f in [established[3], others[0]] {
        h.run(&frame(f, ACK));
    }
    assert_eq!(ct(&h, MISSED_ESTABLISHED), missed, "3 and o0 were in the table");
    enter(&mut h, others[1]);
    assert_eq!(ct(&h, EVICTED), 2, "another flow entered the full bucket");
    let missed = ct(&h, MISSED_ESTABLISHED);
    for f in [established[1], established[3], others[0]] {
        h.run(&frame(f, ACK));
    }
    assert_eq!(ct(&h, MISSED_ESTABLISHED), missed, "live flows kept, the least recent (1) too");
    h.run(&frame(established[2], ACK));
    assert_eq!(ct(&h, MISSED_ESTABLISHED), missed + 1, "the older ended flow was pushed out");
}

/// Packets too big to forward are answered with frag-needed within a per-CPU budget (1000 at
/// once, then 10 000 a second): a flood of them must not make the node an ICMP source at line
/// rate. Past the budget they are dropped unanswered; after a pause, answered again.
#[test]
fn frag_needed_answers_keep_to_a_budget() {
    let Some(mut h) = Harness::pinned("too_big_budget", common::FIXTURE_CONFIG) else { return };
    let (c, vip) = (v4("198.18.4.7"), v4("198.18.1.1"));
    let big = V4::new(c, vip, 6).packet(&tcp(c.into(), vip.into(), 40000, 80, SYN, &[0; 1460]));
    let big = eth(LB_MAC, CLIENT_MAC, ETH_IP, &big);
    let mut answered = 0u64;
    const SENT: u64 = 4000;
    let started = std::time::Instant::now();
    for _ in 0..SENT {
        let (verdict, _) = h.run(&big);
        answered += u64::from(verdict == XDP_TX);
    }
    let took = started.elapsed();
    let allowed = 1000 + took.as_micros() as u64 / 100 + 1;
    assert!(answered >= 1000, "{answered} of {SENT} answered: the burst is 1000");
    assert!(answered <= allowed, "{answered} answered in {took:?}, at most {allowed} allowed");
    assert!(answered < SENT, "all {SENT} answered in {took:?}");
    std::thread::sleep(std::time::Duration::from_millis(150));
    for i in 0..100 {
        assert_eq!(h.run(&big).0, XDP_TX, "answer {i} after the pause");
    }
}

/// Looking for an unknown flow in the other CPUs' tables costs a cache miss per CPU: a flood of
/// segments (or ICMP errors) about flows no table holds may spend only this CPU's budget of such
/// reads, then is placed by the ring without searching, and counted.
#[test]
fn searches_of_the_other_cpus_keep_to_a_budget() {
    let Some(mut h) = Harness::pinned("searches_keep_to_a_budget", common::FIXTURE_CONFIG) else {
        return;
    };
    // A search reads the bucket of every other CPU the table has a region for (every possible
    // CPU, online or not, runnable here or not).
    let cpus = h.dp.table_shape().cpus;
    if !netns::require(
        cpus >= 2,
        "searches_of_the_other_cpus_keep_to_a_budget: the connection table has one CPU's \
         region (one possible CPU), so there is no other CPU's table to search",
    ) {
        return;
    }
    use lb_common::ct_stats::SEARCH_SKIPPED;
    // A frag-needed about a flow of the L2 DSR VIP that no table holds: it is looked for on the
    // other CPUs every time, and not stored; its MAC rewrite leaves the frame on the same path,
    // so the kernel's repeat loop can send it again and again.
    let (vip, client, router) = (v4("198.18.1.5"), v4("198.18.9.9"), v4("198.18.0.254"));
    let quoted =
        V4::new(vip, client, 6).packet(&tcp(vip.into(), client.into(), 80, 40000, ACK, b""));
    let err = V4::new(router, vip, 1).packet(&icmp4(3, 4, [0, 0, 0x05, 0x00], &quoted[..28]));
    let frame = eth(LB_MAC, CLIENT_MAC, ETH_IP, &err);
    let mut out = vec![0u8; frame.len() + 256];
    const RUNS: u32 = 400_000;
    let started = std::time::Instant::now();
    let r =
        h.dp.balancer()
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                repeat: RUNS,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
    let took = started.elapsed();
    assert_eq!(r.return_value, XDP_TX, "forwarded to a backend all the same");
    let skipped = ct_event(&h, SEARCH_SKIPPED);
    // The budget: 65 536 reads at once, then one a microsecond; a search reads one bucket per
    // other CPU.
    let allowed = (65_536 + took.as_micros() as u64) / u64::from(cpus - 1) + 1;
    assert!(skipped > 0, "{RUNS} searches in {took:?}: none skipped");
    assert!(
        u64::from(RUNS) - skipped <= allowed,
        "{} searches in {took:?}, at most {allowed} allowed",
        u64::from(RUNS) - skipped
    );
}

/// A frame whose destination MAC has the group bit set (broadcast, IPv4 or IPv6 multicast) is
/// passed untouched even when it carries traffic for a VIP: it was not sent to this node alone,
/// and whatever the balancer sent for it would carry that group address as its source MAC
/// (bridges drop such frames; no answer may have one).
#[test]
fn frames_not_sent_to_a_unicast_mac_pass_untouched() {
    let Some(mut h) = Harness::new("frames_not_sent_to_a_unicast_mac", FIXTURE_CONFIG) else {
        return;
    };
    const BROADCAST: [u8; 6] = [0xff; 6];
    const V4_MULTICAST: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
    const V6_MULTICAST: [u8; 6] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];
    let (c4, vip4) = (v4("198.18.4.7"), v4("198.18.1.1"));
    let (c6, vip6) = (v6("2001:2::77"), v6("2001:2:0:1::1"));
    let syn4 = tcp4("198.18.4.7", 40000, "198.18.1.1", 80, SYN);
    let syn6 = tcp6("2001:2::77", 40000, "2001:2:0:1::1", 80, SYN);
    let udp4 = V4::new(c4, vip4, 17).packet(&udp(c4.into(), vip4.into(), 5353, 53, b"query"));
    let echo4 = V4::new(c4, vip4, 1).packet(&icmp4(8, 0, [0, 7, 0, 1], b"ping"));
    let echo6 = ipv6(c6, vip6, 58, 0, 64, &icmp6(c6, vip6, 128, 0, [0, 9, 0, 1], b"ping6"));
    let big =
        V4::new(c4, vip4, 6).packet(&tcp(c4.into(), vip4.into(), 40001, 80, ACK, &[0x5a; 1460]));
    let l2 = tcp4("198.18.4.7", 40002, "198.18.1.5", 80, SYN);
    let frames = [
        ("broadcast TCP SYN to a VIP", eth(BROADCAST, CLIENT_MAC, ETH_IP, &syn4)),
        ("IPv4 multicast UDP to a VIP", eth(V4_MULTICAST, CLIENT_MAC, ETH_IP, &udp4)),
        ("IPv6 multicast TCP SYN to a VIP", eth(V6_MULTICAST, CLIENT_MAC, ETH_IPV6, &syn6)),
        ("VLAN-tagged broadcast to a VIP", eth_vlan(BROADCAST, CLIENT_MAC, 42, ETH_IP, &syn4)),
        ("broadcast to an L2 DSR VIP", eth(BROADCAST, CLIENT_MAC, ETH_IP, &l2)),
        ("broadcast ICMP echo to a VIP", eth(BROADCAST, CLIENT_MAC, ETH_IP, &echo4)),
        ("multicast ICMPv6 echo to a VIP", eth(V6_MULTICAST, CLIENT_MAC, ETH_IPV6, &echo6)),
        ("broadcast, too big for the MTU", eth(BROADCAST, CLIENT_MAC, ETH_IP, &big)),
    ];
    for (name, frame) in frames {
        h.check(name, &frame, XDP_PASS, None, Reason::PassNotUnicast);
    }
    // Frames to our unicast MAC are served as before, and ARP (broadcast) is still not IP.
    let vip = h.vip("v4tcp");
    let b = route(&vip, c4.into(), 40000).unwrap().address;
    let want = encapsulated(&vip, b, conn_hash(&vip, c4.into(), 40000, 80), &syn4, None);
    let unicast = eth(LB_MAC, CLIENT_MAC, ETH_IP, &syn4);
    h.check("the same SYN to our MAC", &unicast, XDP_TX, Some(&want), Reason::TxEncap);
    let arp = [0u8, 1, 8, 0, 6, 4, 0, 1, 2, 0xed, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0];
    h.check("ARP", &eth(BROADCAST, CLIENT_MAC, ETH_ARP, &arp), XDP_PASS, None, Reason::PassNotIp);
}

/// With `node.src_mac` set, every frame edgelb sends comes from it: ICMP echo replies too,
/// not only encapsulated packets and too-big answers.
#[test]
fn echo_replies_come_from_the_configured_src_mac() {
    const SRC_MAC: [u8; 6] = [0x02, 0xed, 0, 0, 0, 0xaa];
    let toml =
        FIXTURE_CONFIG.replacen("mtu = 1500\n", "mtu = 1500\nsrc_mac = \"02:ed:00:00:00:aa\"\n", 1);
    assert_ne!(toml, FIXTURE_CONFIG);
    let Some(mut h) = Harness::new("echo_replies_come_from_the_configured_src_mac", &toml) else {
        return;
    };
    let (client, vip4) = (v4("198.18.4.7"), v4("198.18.1.1"));
    let input = eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IP,
        &V4::new(client, vip4, 1).packet(&icmp4(8, 0, [0, 7, 0, 1], b"ping")),
    );
    let want = eth(
        CLIENT_MAC,
        SRC_MAC,
        ETH_IP,
        &V4::new(vip4, client, 1).packet(&icmp4(0, 0, [0, 7, 0, 1], b"ping")),
    );
    h.check("ICMP echo v4 from src_mac", &input, XDP_TX, Some(&want), Reason::TxIcmpEcho);
    let (input, want) = echo6(v6("2001:2::77"), v6("2001:2:0:1::1"), SRC_MAC);
    h.check("ICMPv6 echo from src_mac", &input, XDP_TX, Some(&want), Reason::TxIcmpEcho);
    // VLAN-tagged: the tag stays, the MACs are the same.
    let ip = V4::new(client, vip4, 1).packet(&icmp4(8, 0, [0, 7, 0, 2], b"ping"));
    let input = eth_vlan(LB_MAC, CLIENT_MAC, 42, ETH_IP, &ip);
    let reply = V4::new(vip4, client, 1).packet(&icmp4(0, 0, [0, 7, 0, 2], b"ping"));
    let want = eth_vlan(CLIENT_MAC, SRC_MAC, 42, ETH_IP, &reply);
    h.check("VLAN-tagged echo from src_mac", &input, XDP_TX, Some(&want), Reason::TxIcmpEcho);
}

/// An echo request of zeros past its type (identifier 0, sequence 0, no data): its reply is all
/// zeros but the checksum, which must then be 0xffff to verify; the bare RFC 1624 update of the
/// request's checksum gives 0x0000 there.
#[test]
fn an_echo_of_zeros_gets_a_reply_whose_checksum_verifies() {
    let Some(mut h) = Harness::new("an_echo_of_zeros", FIXTURE_CONFIG) else { return };
    let (client, vip4) = (v4("198.18.4.7"), v4("198.18.1.1"));
    let request = V4::new(client, vip4, 1).packet(&icmp4(8, 0, [0; 4], b""));
    let reply = V4::new(vip4, client, 1).packet(&icmp4(0, 0, [0; 4], b""));
    assert_eq!(reply[22..24], [0xff, 0xff], "the reply's checksum, computed whole");
    let (input, want) =
        (eth(LB_MAC, CLIENT_MAC, ETH_IP, &request), eth(CLIENT_MAC, LB_MAC, ETH_IP, &reply));
    h.check("echo of zeros", &input, XDP_TX, Some(&want), Reason::TxIcmpEcho);
}

/// An ICMPv6 echo request from `client` to `vip`, and the reply the balancer sends from MAC
/// `from`.
fn echo6(client: Ipv6Addr, vip: Ipv6Addr, from: [u8; 6]) -> (Vec<u8>, Vec<u8>) {
    let echo = |ty, src, dst, hop| {
        ipv6(src, dst, 58, 0, hop, &icmp6(src, dst, ty, 0, [0, 9, 0, 1], b"ping6"))
    };
    let input = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &echo(128, client, vip, 50));
    (input, eth(CLIENT_MAC, from, ETH_IPV6, &echo(129, vip, client, 64)))
}

/// [`FIXTURE_CONFIG`] with an IPv6 L7 VIP and an L7 VIP on the address of an L4 one.
fn with_l7_vips() -> String {
    format!(
        "{FIXTURE_CONFIG}
[[vip]]
name = \"l7v6\"
address = \"2001:2:0:1::6\"
port = 443
forwarding = \"l7\"
backends = [{{ address = \"2001:2::11\" }}]

[[vip]]
name = \"l7shared\"
address = \"198.18.1.1\"
port = 8443
forwarding = \"l7\"
backends = [{{ address = \"198.18.0.11\" }}]
"
    )
}

/// The kernel terminates an L7 VIP's traffic, so it gets the fragments, IPv4 options and IPv6
/// extension headers sent to an address only L7 VIPs have: it reassembles and serves them. XDP
/// drops them only towards the address of a VIP it balances, L7 VIPs on it or not.
#[test]
fn fragments_to_an_l7_only_address_pass_to_the_kernel() {
    let Some(mut h) = Harness::new("fragments_to_an_l7_only_address", &with_l7_vips()) else {
        return;
    };
    let c = v4("198.18.4.7");
    let frame = |f: &V4, payload: &[u8]| eth(LB_MAC, CLIENT_MAC, ETH_IP, &f.packet(payload));
    for (dst, verdict, reason) in
        [("198.18.1.6", XDP_PASS, Reason::PassL7), ("198.18.1.1", XDP_DROP, Reason::DropFragment)]
    {
        let d = v4(dst);
        // A TCP segment without DF, fragmented on the path: its first and last fragments.
        let mut f = V4::new(c, d, 6);
        (f.df, f.mf, f.id) = (false, true, 0x4242);
        let seg = tcp(c.into(), d.into(), 40000, 80, ACK, &[0x5a; 64]);
        h.check(&format!("first fragment to {dst}"), &frame(&f, &seg[..48]), verdict, None, reason);
        (f.mf, f.frag_offset) = (false, 6);
        h.check(&format!("last fragment to {dst}"), &frame(&f, &seg[48..]), verdict, None, reason);
    }
    let mut o = V4::new(c, v4("198.18.1.6"), 6);
    o.options = vec![1, 1, 1, 0];
    let p = frame(&o, &tcp(c.into(), o.dst.into(), 40000, 80, SYN, b""));
    h.check("IPv4 options to an L7-only address", &p, XDP_PASS, None, Reason::PassL7);

    let (c6, l7v6, l4v6) = (v6("2001:2::77"), v6("2001:2:0:1::6"), v6("2001:2:0:1::1"));
    let frag_hdr = [6u8, 0, 0, 1, 0, 0, 0, 42];
    let hbh = [6u8, 0, 1, 4, 0, 0, 0, 0];
    for (dst, verdict, frag, opts) in [
        (l7v6, XDP_PASS, Reason::PassL7, Reason::PassL7),
        (l4v6, XDP_DROP, Reason::DropFragment, Reason::DropIpOptions),
    ] {
        let syn = tcp(c6.into(), dst.into(), 1, 443, SYN, b"");
        let p = ipv6(c6, dst, 44, 0, 64, &[&frag_hdr[..], &syn].concat());
        let p = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p);
        h.check(&format!("v6 fragment to {dst}"), &p, verdict, None, frag);
        let p = ipv6(c6, dst, 0, 0, 64, &[&hbh[..], &syn].concat());
        let p = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &p);
        h.check(&format!("v6 extension header to {dst}"), &p, verdict, None, opts);
    }

    // ICMP to an L7-only address works as before: echo answered here, an error about an L7
    // flow passed to the kernel, which owns the flow.
    let vip = v4("198.18.1.6");
    let req = V4::new(c, vip, 1).packet(&icmp4(8, 0, [0, 7, 0, 1], b"ping"));
    let rep = V4::new(vip, c, 1).packet(&icmp4(0, 0, [0, 7, 0, 1], b"ping"));
    let (input, want) =
        (eth(LB_MAC, CLIENT_MAC, ETH_IP, &req), eth(CLIENT_MAC, LB_MAC, ETH_IP, &rep));
    h.check("echo to an L7-only address", &input, XDP_TX, Some(&want), Reason::TxIcmpEcho);
    let router = v4("198.18.0.254");
    let quoted = V4::new(vip, c, 6).packet(&tcp(vip.into(), c.into(), 80, 40000, ACK, b""));
    let err = V4::new(router, vip, 1).packet(&icmp4(3, 4, [0, 0, 5, 0], &quoted[..28]));
    let err = eth(LB_MAC, CLIENT_MAC, ETH_IP, &err);
    h.check("frag-needed about an L7 flow", &err, XDP_PASS, None, Reason::PassL7);

    // Taking the L7 VIP off the shared address leaves an L4 VIP there: still dropped. Taking
    // the L4 VIPs off it leaves an L7 one: passed.
    let mut f = V4::new(c, v4("198.18.1.1"), 17);
    (f.df, f.mf) = (false, true);
    let p = frame(&f, &udp(c.into(), f.dst.into(), 5353, 53, &[0; 32]));
    let no_shared =
        with_l7_vips().split("\n[[vip]]\nname = \"l7shared\"").next().unwrap().to_owned();
    h.apply(&no_shared);
    h.check("fragment to an L4-only address", &p, XDP_DROP, None, Reason::DropFragment);
    let only_l7 = "[node]\ninterfaces = [\"lo\"]\n\n[[vip]]\nname = \"l7shared\"\naddress = \"198.18.1.1\"\nport = 8443\nforwarding = \"l7\"\nbackends = [{ address = \"198.18.0.11\" }]\n";
    h.apply(only_l7);
    h.check("fragment once only L7 is left", &p, XDP_PASS, None, Reason::PassL7);
    h.apply(&with_l7_vips());
    h.check("fragment once L4 is back", &p, XDP_DROP, None, Reason::DropFragment);
}

/// An older edgelb wrote 1 for every VIP address; this one writes which kinds of VIP an address
/// has. Adopting an older edgelb's pinned maps (same layout, so they are re-used), the
/// controller must rewrite the values its config disagrees with, not only add and remove
/// addresses: an L7-only address it left at 1 would keep dropping fragments.
#[test]
fn address_flags_an_older_edgelb_pinned_are_rewritten() {
    if !require_privileged("address_flags_an_older_edgelb_pinned_are_rewritten") {
        return;
    }
    let dir = PinDir::new("addrflags");
    let cfg = Config::parse(&with_l7_vips(), "x".as_ref()).unwrap();
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    dp.apply(&cfg).unwrap();
    // What an older edgelb left: 1 on every address.
    let keys: Vec<lb_common::AddrKey> =
        dp.maps().vip_addrs.keys().collect::<Result<_, _>>().unwrap();
    assert!(keys.len() >= 5, "{keys:?}");
    for k in &keys {
        dp.maps_mut().vip_addrs.insert(k, &1, 0).unwrap();
    }
    drop(dp);
    let mut dp = Dataplane::load(Some(&dir.0)).unwrap();
    assert!(dp.adopted());
    dp.apply(&cfg).unwrap();
    let mut h = Harness { dp, cfg };
    let c = v4("198.18.4.7");
    for (dst, verdict, reason) in
        [("198.18.1.6", XDP_PASS, Reason::PassL7), ("198.18.1.1", XDP_DROP, Reason::DropFragment)]
    {
        let mut f = V4::new(c, v4(dst), 17);
        (f.df, f.mf) = (false, true);
        let p = eth(LB_MAC, CLIENT_MAC, ETH_IP, &f.packet(&[0; 32]));
        h.check(&format!("fragment to {dst} after adoption"), &p, verdict, None, reason);
    }
}

// ------------------------------------------------------------------------------------------------
// What an operator relies on, under mutated frames: the real balancer fed valid frames of every
// kind cut at every length, with every IP length value, and with random damage on top.

use edgelb::config::Forwarding;

/// `node.mtu` of [`FIXTURE_CONFIG`].
const FIXTURE_MTU: usize = 1500;

/// A property a run broke, and how.
#[derive(Debug)]
enum Fault {
    Broken(String),
}

/// Returns `Fault::Broken` with the message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Fault::Broken(format!($($msg)+)));
        }
    };
}

/// What a frame's headers say about its IP packet, read without trusting any field.
struct IpView<'a> {
    /// Offset of the IP header in the frame.
    l3: usize,
    /// The 802.1Q tag's TCI, when the frame has one.
    vlan: Option<u16>,
    v6: bool,
    /// The frame from the IP header on: the IP packet, then whatever trails it.
    pkt: &'a [u8],
    /// The IP packet's length by its header.
    len: usize,
    /// Its headers' length: IHL × 4, or 40 in IPv6, 48 with an atomic fragment's header (RFC
    /// 6946: a whole packet, processed as unfragmented; other extension headers are not walked).
    hlen: usize,
    src: IpAddr,
    dst: IpAddr,
    /// IPv4 protocol or IPv6 next header (behind an atomic fragment's header).
    proto: u8,
    /// IPv4 MF or fragment offset, or an IPv6 fragment header but an atomic fragment's.
    fragment: bool,
    /// IPv4 options or an IPv6 extension header.
    options: bool,
    /// IPv4 DF; always for IPv6.
    df: bool,
}

impl IpView<'_> {
    /// Neither a fragment nor with options: a packet the balancer may act on.
    fn plain(&self) -> bool {
        !self.fragment && !self.options
    }

    /// Source and destination port, when the whole TCP or UDP header lies within the packet.
    fn ports(&self) -> Option<(u16, u16)> {
        let need = match self.proto {
            6 => 20,
            17 => 8,
            _ => return None,
        };
        let l4 = &self.pkt[self.hlen..self.len];
        (l4.len() >= need)
            .then(|| (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]])))
    }

    /// The ICMP (ICMPv6 in IPv6) message, when its 8-byte header lies within the packet.
    fn icmp(&self) -> Option<&[u8]> {
        let icmp = if self.v6 { 58 } else { 1 };
        (self.proto == icmp && self.len >= self.hlen + 8).then(|| &self.pkt[self.hlen..self.len])
    }
}

/// The IP packet of `frame`, when its header is whole, has the version its EtherType names and
/// a length between its header's and what the frame holds; `None` otherwise.
fn ip_view(frame: &[u8]) -> Option<IpView<'_>> {
    let (l3, ethertype) = l3_of(frame);
    let vlan = (l3 == 18).then(|| u16::from_be_bytes([frame[14], frame[15]]));
    let pkt = &frame[l3..];
    let be = |o: usize| u16::from_be_bytes([pkt[o], pkt[o + 1]]) as usize;
    let addr4 = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&pkt[o..o + 4]).unwrap());
    let addr6 = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&pkt[o..o + 16]).unwrap());
    match ethertype {
        ETH_IP if pkt.len() >= 20 && pkt[0] >> 4 == 4 => {
            let (hlen, len, frag) = ((pkt[0] & 0xf) as usize * 4, be(2), be(6));
            (hlen >= 20 && len >= hlen && len <= pkt.len()).then(|| IpView {
                l3,
                vlan,
                v6: false,
                pkt,
                len,
                hlen,
                src: addr4(12),
                dst: addr4(16),
                proto: pkt[9],
                fragment: frag & 0x3fff != 0,
                options: hlen != 20,
                df: frag & 0x4000 != 0,
            })
        }
        ETH_IPV6 if pkt.len() >= 40 && pkt[0] >> 4 == 6 => {
            let len = 40 + be(4);
            if len > pkt.len() {
                return None;
            }
            // An atomic fragment: offset 0 and M clear.
            let atomic = pkt[6] == 44 && len >= 48 && be(42) & 0xfff9 == 0;
            let (hlen, proto) = if atomic { (48, pkt[40]) } else { (40, pkt[6]) };
            Some(IpView {
                l3,
                vlan,
                v6: true,
                pkt,
                len,
                hlen,
                src: addr6(8),
                dst: addr6(24),
                proto,
                fragment: proto == 44,
                // ESP and AH are upper layers, as in IPv4.
                options: [0, 43, 60].contains(&proto),
                df: true,
            })
        }
        _ => None,
    }
}

/// The fixture config and its VIPs' rings (built once: a Maglev ring takes a while).
struct Model {
    cfg: Config,
    rings: std::collections::HashMap<String, Vec<u32>>,
}

impl Model {
    fn new(cfg: &Config) -> Model {
        let rings = cfg.vips.iter().filter_map(|v| Some((v.name.clone(), vip_ring(v)?))).collect();
        Model { cfg: cfg.clone(), rings }
    }

    /// The backend the ring names for a flow from `client:sport` (as `route` does).
    fn route<'v>(&self, vip: &'v Vip, client: IpAddr, sport: u16) -> &'v edgelb::config::Backend {
        let ring = &self.rings[&vip.name];
        &vip.backends[ring[(flow_hash(vip, client, sport) % vip.ring_size) as usize] as usize]
    }
}

/// The VIP the balancer must find for (address, port, protocol): the exact port, else "any".
fn vip_serving(cfg: &Config, addr: IpAddr, port: u16, proto: u8) -> Option<&Vip> {
    let at = |p: u16| {
        cfg.vips.iter().find(|v| v.address == addr && v.port == p && v.protocol.number() == proto)
    };
    at(port).or_else(|| at(0))
}

/// Is `addr` the address of some VIP (`l4`: of one XDP balances)?
fn vip_address(cfg: &Config, addr: IpAddr, l4: bool) -> bool {
    cfg.vips.iter().any(|v| v.address == addr && !(l4 && v.forwarding == Forwarding::L7))
}

/// Encapsulation overhead towards `vip`'s backends.
fn overhead(vip: &Vip) -> usize {
    if vip.backends[0].address.is_ipv4() { 20 } else { 40 }
}

/// Can an answer go to `addr`: one host's address, not a group, unspecified or loopback one?
fn unicast(addr: IpAddr) -> bool {
    match addr {
        // 0/8 whole, as the kernel's martian-source check has it.
        IpAddr::V4(a) => {
            !(a.octets()[0] == 0 || a.is_broadcast() || a.is_multicast() || a.is_loopback())
        }
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast() || a.is_loopback()),
    }
}

/// Does the ICMP or ICMPv6 message (from `hlen` on) of the first `len` bytes of the IP packet
/// `pkt` verify?
fn icmp_verifies(pkt: &[u8], v6: bool, hlen: usize, len: usize) -> bool {
    if !v6 {
        return csum(&pkt[hlen..len]) == 0;
    }
    let mut pseudo = pkt[8..40].to_vec();
    pseudo.extend(((len - hlen) as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, 58]);
    pseudo.extend(&pkt[hlen..len]);
    csum(&pseudo) == 0
}

/// A frame the balancer must serve, not pass: sent to our unicast MAC, a plain IP packet and
/// either TCP or UDP for an L4 VIP, or an echo request to a VIP address.
fn must_serve(cfg: &Config, frame: &[u8]) -> bool {
    let Some(ip) = ip_view(frame).filter(|ip| ip.plain() && frame[0] & 1 == 0) else {
        return false;
    };
    if let Some((_, dport)) = ip.ports() {
        return vip_serving(cfg, ip.dst, dport, ip.proto)
            .is_some_and(|v| v.forwarding != Forwarding::L7);
    }
    let echo = if ip.v6 { 128 } else { 8 };
    ip.icmp().is_some_and(|m| m[0] == echo)
        && vip_address(cfg, ip.dst, false)
        && answerable(frame, &ip)
}

/// May the balancer answer the sender of `frame` (echo reply, frag-needed / packet-too-big)?
/// Only one with a unicast source MAC and source address, and an IPv4 header whose checksum
/// verifies: an answer would otherwise go to many hosts, or none, or to an address the damage
/// made up.
fn answerable(frame: &[u8], ip: &IpView) -> bool {
    frame[6] & 1 == 0 && unicast(ip.src) && (ip.v6 || csum(&ip.pkt[..20]) == 0)
}

/// Checks one run of the balancer (`verdict`, output `out`, the one reason counter it moved)
/// on `input` against what an operator relies on:
/// - the verdict is XDP_PASS, XDP_DROP or XDP_TX, counted under a reason of its kind;
/// - a passed frame is untouched, and is none the balancer must serve;
/// - a dropped frame has an IP header that names the address of an L4 VIP, and is a fragment,
///   has options or extension headers, or is too big without DF;
/// - a sent frame had a plain, length-consistent IP header naming a VIP's address, and is
///   exactly what the design makes of it (see `sent_to_backend`, `echo_reply`, `too_big`).
fn judge(m: &Model, input: &[u8], verdict: u32, reason: usize, out: &[u8]) -> Result<(), Fault> {
    let name = REASON_NAMES[reason];
    let kind = match verdict {
        XDP_PASS => "pass_",
        XDP_DROP => "drop_",
        XDP_TX => "tx_",
        other => return Err(Fault::Broken(format!("verdict {other}: not PASS, DROP or TX"))),
    };
    ensure!(name.starts_with(kind), "verdict {verdict} counted as {name}");
    let cfg = &m.cfg;
    let is = |r: Reason| reason == r as usize;
    let view = ip_view(input);
    if verdict == XDP_PASS {
        ensure!(out == input, "a passed frame changed");
        ensure!(!must_serve(cfg, input), "a frame the balancer must serve was passed ({name})");
        return Ok(());
    }
    ensure!(input[0] & 1 == 0, "{name} for a frame to a group MAC");
    if verdict == XDP_DROP {
        let Some(ip) = view else {
            return Err(Fault::Broken(format!("{name} for a frame without a whole IP header")));
        };
        ensure!(vip_address(cfg, ip.dst, true), "{name} for {}, no L4 VIP's address", ip.dst);
        if is(Reason::DropIpOptions) {
            ensure!(ip.options, "{name} without options or extension headers");
        } else if is(Reason::DropFragment) {
            ensure!(ip.fragment && !ip.options, "{name} for no fragment");
        } else if is(Reason::DropTooBig) {
            // Data (TCP/UDP) without DF, or an ICMP error to forward, too big encapsulated.
            let over = match ip.ports() {
                Some((_, dport)) => {
                    let vip = vip_serving(cfg, ip.dst, dport, ip.proto);
                    let ipip = vip.filter(|v| v.forwarding == Forwarding::Ipip);
                    // With DF, only a sender that may not be answered gets no frag-needed.
                    ensure!(
                        !ip.df || !answerable(input, &ip),
                        "{name} for a TCP/UDP packet with DF from an answerable sender"
                    );
                    ipip.map_or(0, overhead)
                }
                None => 40,
            };
            ensure!(ip.plain() && ip.len + over > FIXTURE_MTU, "{name} for {} bytes", ip.len);
        } else {
            return Err(Fault::Broken(format!("{name}: never expected with this config")));
        }
        return Ok(());
    }
    let Some(ip) = view.filter(IpView::plain) else {
        return Err(Fault::Broken(format!("{name} for a frame without a plain, whole IP header")));
    };
    ensure!(vip_address(cfg, ip.dst, false), "{name} for {}, no VIP's address", ip.dst);
    if is(Reason::TxIcmpEcho) {
        return echo_reply(input, &ip, out);
    }
    if is(Reason::TxIcmpToBackend) {
        return error_to_backend(m, input, &ip, out);
    }
    let Some((sport, dport)) = ip.ports() else {
        return Err(Fault::Broken(format!("{name} without a TCP/UDP header in the packet")));
    };
    let Some(vip) = vip_serving(cfg, ip.dst, dport, ip.proto) else {
        return Err(Fault::Broken(format!("{name} for {}:{dport}, which no VIP serves", ip.dst)));
    };
    ensure!(vip.forwarding != Forwarding::L7, "{name} for the L7 VIP {}", vip.name);
    let fits = vip.forwarding == Forwarding::L2 || ip.len + overhead(vip) <= FIXTURE_MTU;
    if is(Reason::TxIcmpTooBig) {
        ensure!(!fits && ip.df, "{name} for {} bytes to {} (DF {})", ip.len, vip.name, ip.df);
        return too_big(vip, input, &ip, out);
    }
    ensure!(fits, "{name}: {} bytes to {} do not fit the MTU", ip.len, vip.name);
    let l2 = vip.forwarding == Forwarding::L2;
    ensure!(l2 == is(Reason::TxL2), "{name} for {} (forwarding {:?})", vip.name, vip.forwarding);
    sent_to_backend(m, vip, (ip.src, sport, dport), input, &ip, out)
}

/// A packet of `flow` (client, client port, VIP port) on `vip` sent on to the flow's backend:
/// L2 DSR changes the MACs and nothing else; encapsulation puts an outer header (checksum
/// right, IPIP / IPv6 as the families need, length of the inner packet, to a backend of the VIP,
/// the one the ring names for the flow) in front of the input's IP packet, unchanged (its
/// checksums unchecked: the backend's kernel checks them), then nothing or the bytes that
/// trailed it in the frame (Ethernet padding, as the design calls them); the VLAN tag kept,
/// from the MAC the frame was sent to, to the backend's. Never over the MTU: bytes trailing the
/// packet are cut when they would take the frame over it.
fn sent_to_backend(
    m: &Model,
    vip: &Vip,
    (client, cport, vport): (IpAddr, u16, u16),
    input: &[u8],
    ip: &IpView,
    out: &[u8],
) -> Result<(), Fault> {
    let flows = m.route(vip, client, cport);
    ensure!(out.len() >= 14 && out[6..12] == input[..6], "not from the MAC the frame was sent to");
    if vip.forwarding == Forwarding::L2 {
        ensure!(out.len() == input.len() && out[12..] == input[12..], "L2 DSR changed past MACs");
        ensure!(out[..6] == flows.mac.unwrap(), "L2 DSR to another MAC than {}'s", flows.address);
        return Ok(());
    }
    let (l3, ethertype) = l3_of(out);
    ensure!(l3 == ip.l3 && out[12..l3 - 2] == input[12..l3 - 2], "VLAN tag not kept");
    let outer = &out[l3..];
    let be = |o: usize| u16::from_be_bytes([outer[o], outer[o + 1]]) as usize;
    let (hlen, len, dst) = match ethertype {
        ETH_IP => {
            ensure!(outer.len() >= 20 && outer[0] == 0x45, "outer IPv4 header {}", hex(outer));
            ensure!(csum(&outer[..20]) == 0, "outer checksum wrong: {}", hex(&outer[..20]));
            ensure!(outer[9] == 4, "outer protocol {}, not IPIP", outer[9]);
            (20, be(2), IpAddr::from(<[u8; 4]>::try_from(&outer[16..20]).unwrap()))
        }
        ETH_IPV6 => {
            ensure!(outer.len() >= 40 && outer[0] >> 4 == 6, "outer IPv6 header {}", hex(outer));
            let next = if ip.v6 { 41 } else { 4 };
            ensure!(outer[6] == next, "outer next header {}, not {next}", outer[6]);
            (40, 40 + be(4), IpAddr::from(<[u8; 16]>::try_from(&outer[24..40]).unwrap()))
        }
        other => return Err(Fault::Broken(format!("sent a frame of EtherType {other:#x}"))),
    };
    let Some(backend) = vip.backends.iter().find(|b| b.address == dst) else {
        return Err(Fault::Broken(format!("outer destination {dst}: no backend of {}", vip.name)));
    };
    ensure!(dst == flows.address, "sent to {dst}, the flow's backend is {}", flows.address);
    ensure!(out[..6] == backend.mac.unwrap(), "to another MAC than {dst}'s");
    ensure!(len == hlen + ip.len, "outer length {len} around {} bytes of packet", ip.len);
    let carried = &outer[hlen..];
    ensure!(carried.get(..ip.len) == Some(&ip.pkt[..ip.len]), "the inner packet changed");
    // Bytes past the inner packet: none, or those that trailed it in the frame (padding).
    let trailer = &carried[ip.len..];
    ensure!(trailer.is_empty() || *trailer == ip.pkt[ip.len..], "bytes of no input past it");
    let hash = conn_hash(vip, client, cport, vport);
    let mut want = encapsulated(vip, dst, hash, &ip.pkt[..ip.len], ip.vlan);
    want[6..12].copy_from_slice(&input[..6]);
    want.extend_from_slice(trailer);
    ensure!(out == want, "encapsulation differs from\n{}", hex(&want));
    ensure!(
        out.len() - l3 <= FIXTURE_MTU,
        "{} bytes sent past the L2 header, {} of them trailing a {}-byte packet",
        out.len() - l3,
        ip.pkt.len() - ip.len,
        ip.len
    );
    Ok(())
}

/// An ICMP destination unreachable (any code, frag-needed included) or ICMPv6 packet-too-big or
/// destination unreachable about a VIP flow goes to the flow's backend, as data of that flow
/// would (`sent_to_backend`), when it quotes a whole IPv4 (version 4, IHL 5, no fragment but a
/// first one) or IPv6 header (then at most one fragment header, of a first fragment) with the
/// ports of a TCP or UDP flow whose source is a VIP's (address, port): what the VIP sent.
/// Whichever VIP address the error was sent to: the design routes on the quote.
fn error_to_backend(md: &Model, input: &[u8], ip: &IpView, out: &[u8]) -> Result<(), Fault> {
    let Some(m) = ip.icmp() else {
        return Err(Fault::Broken("an ICMP error forwarded without an ICMP header".into()));
    };
    let error = if ip.v6 { m[0] == 1 || m[0] == 2 } else { m[0] == 3 };
    ensure!(error, "ICMP type {} code {} forwarded as an error about a flow", m[0], m[1]);
    let q = &m[8..];
    let (mut hlen, version) = if ip.v6 { (40, 6) } else { (20, 4) };
    ensure!(q.len() >= hlen + 4, "forwarded an error quoting {} bytes", q.len());
    ensure!(q[0] >> 4 == version, "forwarded an error quoting version {}", q[0] >> 4);
    ensure!(ip.v6 || q[0] == 0x45, "forwarded an error quoting IHL {}", q[0] & 0xf);
    let (src, dst, mut proto): (IpAddr, IpAddr, u8) = if ip.v6 {
        let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&q[o..o + 16]).unwrap());
        (a(8), a(24), q[6])
    } else {
        let a = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&q[o..o + 4]).unwrap());
        (a(12), a(16), q[9])
    };
    let offset = |o: usize, mask: u16| u16::from_be_bytes([q[o], q[o + 1]]) & mask;
    ensure!(ip.v6 || offset(6, 0x1fff) == 0, "forwarded an error quoting a later fragment");
    if ip.v6 && proto == 44 {
        ensure!(q.len() >= hlen + 12, "forwarded an error quoting {} bytes", q.len());
        ensure!(offset(42, 0xfff8) == 0, "forwarded an error quoting a later fragment");
        (proto, hlen) = (q[40], hlen + 8);
    }
    ensure!(proto == 6 || proto == 17, "forwarded an error quoting protocol {proto}");
    let (sport, dport) = (
        u16::from_be_bytes([q[hlen], q[hlen + 1]]),
        u16::from_be_bytes([q[hlen + 2], q[hlen + 3]]),
    );
    let Some(vip) = vip_serving(&md.cfg, src, sport, proto) else {
        return Err(Fault::Broken(format!("forwarded an error about {src}:{sport}: no VIP")));
    };
    ensure!(vip.forwarding != Forwarding::L7, "forwarded an error about L7 VIP {}", vip.name);
    let fits = vip.forwarding == Forwarding::L2 || ip.len + overhead(vip) <= FIXTURE_MTU;
    ensure!(fits, "forwarded an error of {} bytes past the MTU", ip.len);
    sent_to_backend(md, vip, (dst, dport, sport), input, ip, out)
}

/// RFC 1624 update of checksum `check` when the 16-bit word `old` becomes `new`, 0xffff rather
/// than 0x0000 (the zero that verifies whatever the other words, all zero included).
fn csum_update(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        c => c,
    }
}

/// An echo request answered: the same frame back to its sender's MAC from the one it was sent
/// to, addresses swapped, TTL / hop limit 64, type echo reply, the ICMP checksum updated (it
/// verifies whenever the request's did), an IPv4 header checksum that verifies. Never to a
/// group MAC or a source that cannot be one host's, nor for an IPv4 header whose checksum fails.
fn echo_reply(input: &[u8], ip: &IpView, out: &[u8]) -> Result<(), Fault> {
    let (request, reply) = if ip.v6 { (128, 129) } else { (8, 0) };
    let Some(m) = ip.icmp().filter(|m| m[0] == request) else {
        return Err(Fault::Broken("an echo reply to no echo request".into()));
    };
    ensure!(out.len() == input.len(), "echo reply of {} bytes", out.len());
    ensure!(out[..6] == input[6..12] && out[6..12] == input[..6], "echo reply MACs not swapped");
    let (l3, h) = (ip.l3, ip.hlen);
    let rep = &out[l3..];
    ensure!(ip.v6 || csum(&rep[..20]) == 0, "echo reply IPv4 header checksum wrong");
    let verifies = |pkt| icmp_verifies(pkt, ip.v6, h, ip.len);
    let (in_ok, out_ok) = (verifies(ip.pkt), verifies(rep));
    ensure!(in_ok == out_ok, "echo reply checksum verifies: {out_ok}; the request's: {in_ok}");
    let mut want = input.to_vec();
    want[..6].copy_from_slice(&input[6..12]);
    want[6..12].copy_from_slice(&input[..6]);
    let (addr, ttl, alen) = if ip.v6 { (8, 7, 16) } else { (12, 8, 4) };
    want[l3 + ttl] = 64;
    want[l3 + addr..l3 + addr + alen].copy_from_slice(&ip.pkt[addr + alen..addr + 2 * alen]);
    want[l3 + addr + alen..l3 + addr + 2 * alen].copy_from_slice(&ip.pkt[addr..addr + alen]);
    if !ip.v6 {
        want[l3 + 10..l3 + 12].fill(0);
        let c = csum(&want[l3..l3 + 20]);
        want[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    let word = |ty: u8| u16::from_be_bytes([ty, m[1]]);
    let check = csum_update(u16::from_be_bytes([m[2], m[3]]), word(request), word(reply));
    want[l3 + h] = reply;
    want[l3 + h + 2..l3 + h + 4].copy_from_slice(&check.to_be_bytes());
    ensure!(out == want, "echo reply differs from\n{}", hex(&want));
    answer_checks(input, ip)
}

/// What an answer the balancer builds (echo reply, frag-needed / packet-too-big) must not be
/// sent for: a frame from a group MAC, from an IP source no single host has, or whose IPv4
/// header checksum fails (the answer would go to an address the damage may have made up).
fn answer_checks(input: &[u8], ip: &IpView) -> Result<(), Fault> {
    ensure!(input[6] & 1 == 0, "answered a frame from a group MAC");
    ensure!(unicast(ip.src), "answered a packet from {}", ip.src);
    let header_ok = ip.v6 || csum(&ip.pkt[..20]) == 0;
    ensure!(header_ok, "answered an IPv4 header whose checksum fails");
    Ok(())
}

/// A TCP/UDP packet with DF that would not fit the MTU encapsulated: answered with frag-needed
/// (IPv4) or packet-too-big (IPv6) from the VIP to the sender, advertising the MTU less the
/// overhead and quoting the IP header (with an atomic fragment's header) and 8 bytes, with
/// checksums that verify.
fn too_big(vip: &Vip, input: &[u8], ip: &IpView, out: &[u8]) -> Result<(), Fault> {
    let mtu = (FIXTURE_MTU - overhead(vip)) as u32;
    let (ethertype, answer) = match (ip.dst, ip.src) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let mut h = V4::new(from, to, 1);
            h.df = false;
            let mtu = (mtu as u16).to_be_bytes();
            (ETH_IP, h.packet(&icmp4(3, 4, [0, 0, mtu[0], mtu[1]], &ip.pkt[..28])))
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            let m = icmp6(from, to, 2, 0, mtu.to_be_bytes(), &ip.pkt[..ip.hlen + 8]);
            (ETH_IPV6, ipv6(from, to, 58, 0, 64, &m))
        }
        _ => unreachable!("one family"),
    };
    let (to, from) = (input[6..12].try_into().unwrap(), input[..6].try_into().unwrap());
    let want = match ip.vlan {
        None => eth(to, from, ethertype, &answer),
        Some(tci) => eth_vlan(to, from, tci, ethertype, &answer),
    };
    let rep = &out[ip.l3.min(out.len())..];
    ensure!(rep.len() == answer.len(), "too-big answer of {} bytes", rep.len());
    ensure!(ip.v6 || csum(&rep[..20]) == 0, "frag-needed IPv4 header checksum wrong");
    let hlen = if ip.v6 { 40 } else { 20 };
    ensure!(icmp_verifies(rep, ip.v6, hlen, rep.len()), "too-big ICMP checksum wrong");
    ensure!(out == want, "too-big answer differs from\n{}", hex(&want));
    answer_checks(input, ip)
}

/// Valid frames of every kind the balancer handles, each with a name for failure messages.
fn operator_bases() -> Vec<(String, Vec<u8>)> {
    let (c4, c6) = (v4("198.18.4.7"), v6("2001:2::77"));
    let (router4, router6) = (v4("198.18.0.254"), v6("2001:2::fe"));
    let (vip6, other6) = (v6("2001:2:0:1::1"), v6("2001:2::2"));
    let e4 = |ip: Vec<u8>| eth(LB_MAC, CLIENT_MAC, ETH_IP, &ip);
    let e6 = |ip: Vec<u8>| eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &ip);
    let ip4 = |h: &V4, dport: u16, flags: u8, data: &[u8]| match h.proto {
        6 => h.packet(&tcp(h.src.into(), h.dst.into(), 40000, dport, flags, data)),
        _ => h.packet(&udp(h.src.into(), h.dst.into(), 40000, dport, data)),
    };
    let seg4 =
        |dst: &str, dport, flags, data: &[u8]| ip4(&V4::new(c4, v4(dst), 6), dport, flags, data);
    let dgram4 = |dst: &str, dport| ip4(&V4::new(c4, v4(dst), 17), dport, 0, b"query");
    let seg6 = |dst: Ipv6Addr, dport, flags, data: &[u8]| {
        ipv6(c6, dst, 6, 0, 64, &tcp(c6.into(), dst.into(), 40000, dport, flags, data))
    };
    let dgram6 = |dst: Ipv6Addr, dport| {
        ipv6(c6, dst, 17, 0, 64, &udp(c6.into(), dst.into(), 40000, dport, b"q"))
    };
    let echo4 = |dst: &str| V4::new(c4, v4(dst), 1).packet(&icmp4(8, 0, [0, 7, 0, 1], b"ping"));
    let echo6 = |dst| ipv6(c6, dst, 58, 0, 64, &icmp6(c6, dst, 128, 0, [0, 9, 0, 1], b"ping6"));
    // An error from a router about what `vip` sent to the client (its whole quoted packet).
    let error4 = |to: &str, vip: &str, proto: u8, vport: u16, ty: u8, code: u8| {
        let (to, vip) = (v4(to), v4(vip));
        let quoted = match proto {
            6 => V4::new(vip, c4, 6).packet(&tcp(vip.into(), c4.into(), vport, 40000, ACK, b"")),
            _ => V4::new(vip, c4, 17).packet(&udp(vip.into(), c4.into(), vport, 40000, b"a")),
        };
        V4::new(router4, to, 1).packet(&icmp4(ty, code, [0, 0, 5, 0], &quoted))
    };
    let error6 = |proto: u8, vport: u16, ty: u8| {
        let quoted = match proto {
            6 => ipv6(vip6, c6, 6, 0, 64, &tcp(vip6.into(), c6.into(), vport, 40000, ACK, b"")),
            _ => ipv6(vip6, c6, 17, 0, 64, &udp(vip6.into(), c6.into(), vport, 40000, b"a")),
        };
        let m = icmp6(router6, vip6, ty, 0, 1280u32.to_be_bytes(), &quoted);
        ipv6(router6, vip6, 58, 0, 64, &m)
    };
    let mut bases: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, frame: Vec<u8>| bases.push((name.to_owned(), frame));
    // TCP to every kind of VIP (ipip, 4in6, any port, 5-tuple, L2, L7) and to no VIP; UDP.
    for (dst, dport) in [
        ("198.18.1.1", 80),
        ("198.18.1.2", 80),
        ("198.18.1.3", 443),
        ("198.18.1.4", 80),
        ("198.18.1.5", 80),
        ("198.18.1.6", 80),
        ("198.18.0.2", 22),
        ("198.18.1.1", 8080),
    ] {
        add(&format!("SYN to {dst}:{dport}"), e4(seg4(dst, dport, SYN, b"")));
        add(&format!("ACK to {dst}:{dport}"), e4(seg4(dst, dport, ACK, b"")));
        add(
            &format!("data to {dst}:{dport}"),
            e4(seg4(dst, dport, ACK | 8, b"GET / HTTP/1.1\r\n")),
        );
    }
    add("FIN to 198.18.1.1:80", e4(seg4("198.18.1.1", 80, FIN | ACK, b"")));
    add("RST to 198.18.1.1:80", e4(seg4("198.18.1.1", 80, RST, b"")));
    for (dst, dport) in [("198.18.1.1", 53), ("198.18.1.3", 53), ("198.18.0.2", 53)] {
        add(&format!("UDP to {dst}:{dport}"), e4(dgram4(dst, dport)));
    }
    for (dst, dport) in [(vip6, 80), (vip6, 8080), (other6, 80)] {
        add(&format!("SYN to [{dst}]:{dport}"), e6(seg6(dst, dport, SYN, b"")));
        add(&format!("ACK to [{dst}]:{dport}"), e6(seg6(dst, dport, ACK, b"hi")));
    }
    add("UDP to [vip6]:53", e6(dgram6(vip6, 53)));
    add("UDP to [other6]:53", e6(dgram6(other6, 53)));
    // ICMP: echo to VIP addresses of every kind and to no VIP; errors about every kind of flow.
    for dst in ["198.18.1.1", "198.18.1.5", "198.18.1.6", "198.18.0.2"] {
        add(&format!("echo to {dst}"), e4(echo4(dst)));
    }
    add("echo to vip6", e6(echo6(vip6)));
    add("echo to other6", e6(echo6(other6)));
    for (to, vip, proto, vport) in [
        ("198.18.1.1", "198.18.1.1", 6, 80),
        ("198.18.1.1", "198.18.1.1", 17, 53),
        ("198.18.1.2", "198.18.1.2", 6, 80),
        ("198.18.1.3", "198.18.1.3", 6, 443),
        ("198.18.1.5", "198.18.1.5", 6, 80),
        ("198.18.1.6", "198.18.1.6", 6, 80),
        ("198.18.1.1", "198.18.1.5", 6, 80),
    ] {
        let name = format!("frag-needed to {to} about {vip}:{vport}/{proto}");
        add(&name, e4(error4(to, vip, proto, vport, 3, 4)));
    }
    add("port unreachable to 198.18.1.1", e4(error4("198.18.1.1", "198.18.1.1", 17, 53, 3, 3)));
    add("time exceeded to 198.18.1.1", e4(error4("198.18.1.1", "198.18.1.1", 6, 80, 11, 0)));
    add("packet-too-big about [vip6]:80", e6(error6(6, 80, 2)));
    add("packet-too-big about [vip6]:53", e6(error6(17, 53, 2)));
    add("unreachable about [vip6]:80", e6(error6(6, 80, 1)));
    add("host unreachable to 198.18.1.1", e4(error4("198.18.1.1", "198.18.1.1", 6, 80, 3, 1)));
    {
        // About the first fragment of a UDP reply of [vip6]:53 (a fragment header, then UDP).
        let mut q = vec![17u8, 0, 0, 1, 0, 0, 0, 7];
        q.extend(udp(vip6.into(), c6.into(), 53, 40000, b"a"));
        let m = icmp6(router6, vip6, 2, 0, 1280u32.to_be_bytes(), &ipv6(vip6, c6, 44, 0, 64, &q));
        add("packet-too-big about a fragment of [vip6]:53", e6(ipv6(router6, vip6, 58, 0, 64, &m)));
    }
    // Fragments, options, extension headers.
    let mut frag = V4::new(c4, v4("198.18.1.1"), 17);
    frag.mf = true;
    add("first fragment to 198.18.1.1", e4(ip4(&frag, 53, 0, &[7; 32])));
    (frag.mf, frag.frag_offset) = (false, 5);
    add("last fragment to 198.18.1.1", e4(frag.packet(&[7; 16])));
    frag.dst = v4("198.18.1.6");
    add("fragment to 198.18.1.6", e4(frag.packet(&[7; 16])));
    let mut opts = V4::new(c4, v4("198.18.1.1"), 6);
    opts.options = vec![1, 1, 1, 0];
    add("options to 198.18.1.1", e4(ip4(&opts, 80, SYN, b"")));
    let syn6 = tcp(c6.into(), vip6.into(), 40000, 80, SYN, b"");
    let fh = [6u8, 0, 0, 1, 0, 0, 0, 42];
    add("fragment to vip6", e6(ipv6(c6, vip6, 44, 0, 64, &[&fh[..], &syn6].concat())));
    let hbh = [6u8, 0, 1, 4, 0, 0, 0, 0];
    add("hop-by-hop to vip6", e6(ipv6(c6, vip6, 0, 0, 64, &[&hbh[..], &syn6].concat())));
    // Atomic fragments (offset 0, M clear): whole packets behind a fragment header.
    let atomic = |next: u8, l4: &[u8]| {
        ipv6(c6, vip6, 44, 0, 64, &[&[next, 0, 0, 0, 0, 0, 0, 9], l4].concat())
    };
    add("atomic fragment to vip6", e6(atomic(6, &syn6)));
    let ping = icmp6(c6, vip6, 128, 0, [0, 9, 0, 1], b"ping6");
    add("echo in an atomic fragment to vip6", e6(atomic(58, &ping)));
    let big = tcp(c6.into(), vip6.into(), 40000, 80, ACK, &[0x5a; 1432]);
    add("1500 bytes in an atomic fragment to vip6", e6(atomic(6, &big)));
    add("ESP to vip6", e6(ipv6(c6, vip6, 50, 0, 64, &[0; 24])));
    add(
        "AH to vip6",
        e6(ipv6(c6, vip6, 51, 0, 64, &[&[6u8, 4, 0, 0][..], &[0; 20], &syn6].concat())),
    );
    // Too big for the MTU encapsulated (with and without DF), and just fitting.
    add("1500 bytes DF to 198.18.1.1", e4(seg4("198.18.1.1", 80, ACK, &[0x5a; 1460])));
    let mut no_df = V4::new(c4, v4("198.18.1.1"), 6);
    no_df.df = false;
    add("1500 bytes without DF to 198.18.1.1", e4(ip4(&no_df, 80, ACK, &[0x5a; 1460])));
    add("1480 bytes to 198.18.1.1", e4(seg4("198.18.1.1", 80, ACK, &[0x5a; 1440])));
    add("1470 bytes to 198.18.1.2 (4in6)", e4(seg4("198.18.1.2", 80, ACK, &[0x5a; 1430])));
    add("1500 bytes to 198.18.1.5 (L2)", e4(seg4("198.18.1.5", 80, ACK, &[0x5a; 1460])));
    add("1500 bytes to vip6", e6(seg6(vip6, 80, ACK, &[0x5a; 1440])));
    // TTL / hop limit 0 and 1: not the balancer's to judge (it is not a router hop).
    for ttl in [0, 1] {
        let mut h = V4::new(c4, v4("198.18.1.1"), 6);
        h.ttl = ttl;
        add(&format!("SYN with TTL {ttl}"), e4(ip4(&h, 80, SYN, b"")));
        let syn = tcp(c6.into(), vip6.into(), 40000, 80, SYN, b"");
        add(&format!("SYN with hop limit {ttl}"), e6(ipv6(c6, vip6, 6, 0, ttl, &syn)));
    }
    // VLAN-tagged.
    let tagged = |ethertype, ip: Vec<u8>| eth_vlan(LB_MAC, CLIENT_MAC, 7, ethertype, &ip);
    add("tagged SYN to 198.18.1.1", tagged(ETH_IP, seg4("198.18.1.1", 80, SYN, b"")));
    add("tagged SYN to 198.18.1.2", tagged(ETH_IP, seg4("198.18.1.2", 80, SYN, b"")));
    add("tagged SYN to 198.18.1.5", tagged(ETH_IP, seg4("198.18.1.5", 80, SYN, b"")));
    add("tagged SYN to vip6", tagged(ETH_IPV6, seg6(vip6, 80, SYN, b"")));
    add("tagged echo to 198.18.1.1", tagged(ETH_IP, echo4("198.18.1.1")));
    add("tagged echo to vip6", tagged(ETH_IPV6, echo6(vip6)));
    add("tagged frag-needed", tagged(ETH_IP, error4("198.18.1.1", "198.18.1.1", 6, 80, 3, 4)));
    let big = seg4("198.18.1.1", 80, ACK, &[0x5a; 1460]);
    add("tagged 1500 bytes DF to 198.18.1.1", tagged(ETH_IP, big));
    // Padded to Ethernet's minimum; other protocols; not IP.
    let mut padded = e4(seg4("198.18.1.1", 80, ACK, b""));
    padded.resize(60, 0);
    add("ACK padded to 60 bytes", padded);
    add("GRE to 198.18.1.1", e4(V4::new(c4, v4("198.18.1.1"), 47).packet(&[0; 8])));
    add("SCTP to 198.18.1.1", e4(V4::new(c4, v4("198.18.1.1"), 132).packet(&[0; 16])));
    add("no next header to vip6", e6(ipv6(c6, vip6, 59, 0, 64, &[])));
    let arp = [0u8, 1, 8, 0, 6, 4, 0, 1, 2, 0xed, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0];
    add("ARP", eth([0xff; 6], CLIENT_MAC, ETH_ARP, &arp));
    bases
}

/// Offset of the IP header, whether it is IPv6, and the header's length by its first byte.
fn ip_shape(f: &[u8]) -> (usize, bool, usize) {
    let (l3, _) = l3_of(f);
    let first = f.get(l3).copied().unwrap_or(0x45);
    let v6 = first >> 4 == 6;
    (l3, v6, if v6 { 40 } else { (first & 0xf) as usize * 4 })
}

/// Writes `bytes` at `at` when they fit in the frame.
fn put(f: &mut [u8], at: usize, bytes: &[u8]) {
    if at + bytes.len() <= f.len() {
        f[at..at + bytes.len()].copy_from_slice(bytes);
    }
}

/// Sets the IP length field (IPv4 total length, IPv6 payload length) to say `len` bytes.
fn set_ip_len(f: &mut [u8], len: usize) {
    let (l3, v6, _) = ip_shape(f);
    if v6 {
        put(f, l3 + 4, &(len.saturating_sub(40) as u16).to_be_bytes());
    } else {
        put(f, l3 + 2, &(len as u16).to_be_bytes());
    }
}

/// Rewrites the IPv4 header checksum to verify (when there is a whole IPv4 header).
fn fix_header_checksum(f: &mut [u8]) {
    let (l3, v6, hlen) = ip_shape(f);
    if !v6 && hlen >= 20 && l3 + hlen <= f.len() && l3_of(f).1 == ETH_IP {
        put(f, l3 + 10, &[0, 0]);
        let c = csum(&f[l3..l3 + hlen]);
        put(f, l3 + 10, &c.to_be_bytes());
    }
}

/// Rewrites the ICMP / ICMPv6 checksum to verify (when the packet has a whole ICMP header).
fn fix_icmp_checksum(f: &mut [u8]) {
    let Some(ip) = ip_view(f) else { return };
    let Some(m) = ip.icmp() else { return };
    let mut m = m.to_vec();
    m[2..4].fill(0);
    let mut sum = 0u32;
    if ip.v6 {
        let mut pseudo = ip.pkt[8..40].to_vec();
        pseudo.extend((m.len() as u32).to_be_bytes());
        pseudo.extend([0, 0, 0, 58]);
        sum = pseudo.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum();
    }
    let c = csum_with(sum, &m);
    let at = ip.l3 + ip.hlen + 2;
    put(f, at, &c.to_be_bytes());
}

/// Damages `f` once, in a way frames go wrong (or are made to): returns what it did.
fn damage(f: &mut Vec<u8>, rnd: &mut dyn FnMut(usize) -> usize) -> String {
    const VIPS4: [[u8; 4]; 6] = [
        [198, 18, 1, 1],
        [198, 18, 1, 2],
        [198, 18, 1, 3],
        [198, 18, 1, 5],
        [198, 18, 1, 6],
        [198, 18, 0, 2],
    ];
    const ODD4: [[u8; 4]; 5] = [[0; 4], [255; 4], [224, 0, 0, 1], [127, 0, 0, 1], [198, 18, 1, 1]];
    const ODD6: [u128; 4] = [0, 0xff02 << 112 | 1, 1, 0x2001_0002_0000_0001 << 64 | 1];
    const PROTOS: [u8; 12] = [0, 1, 4, 6, 17, 41, 43, 44, 50, 58, 60, 255];
    let (l3, v6, hlen) = ip_shape(f);
    let l4 = l3 + hlen;
    let any = |rnd: &mut dyn FnMut(usize) -> usize| rnd(256) as u8;
    match rnd(20) {
        0 => {
            let at = rnd(f.len().min(l4 + 64));
            f[at] ^= 1 << rnd(8);
            format!("bit flip at {at}")
        }
        1 => {
            let at = rnd(f.len().min(l4 + 64));
            f[at] = [0, 0xff, any(rnd)][rnd(3)];
            format!("byte {at} = {:#x}", f[at])
        }
        2 => {
            let len = 14 + rnd(f.len() - 13);
            f.truncate(len);
            format!("cut to {len}")
        }
        3 => {
            let n = if rnd(8) == 0 {
                1 + rnd(1514usize.saturating_sub(f.len()) + 1)
            } else {
                1 + rnd(48)
            };
            f.extend((0..n).map(|_| rnd(256) as u8));
            format!("{n} bytes appended")
        }
        4 | 5 => {
            let avail = f.len().saturating_sub(l3);
            let declared = ip_view(f).map_or(avail, |ip| ip.len);
            let choices = [0, 1, 19, 20, 21, 27, 28, 40, 47, 48, 0xffff, 0x8000];
            let len = match rnd(4) {
                0 => choices[rnd(choices.len())],
                1 => (avail + rnd(9)).saturating_sub(4),
                2 => (declared + rnd(9)).saturating_sub(4),
                _ => rnd(1600),
            };
            set_ip_len(f, len);
            format!("IP length set to say {len}")
        }
        6 if !v6 => {
            let ihl = rnd(16) as u8;
            put(f, l3, &[0x40 | ihl]);
            format!("IHL {ihl}")
        }
        7 => {
            let version = rnd(16) as u8;
            if let Some(b) = f.get_mut(l3) {
                *b = *b & 0xf | version << 4;
            }
            format!("IP version {version}")
        }
        8 if !v6 => {
            let flags = [0x2000u16, 0x0001, 0x1fff, 0x4000, 0, 0x8000, any(rnd) as u16 * 97];
            let v = flags[rnd(flags.len())];
            put(f, l3 + 6, &v.to_be_bytes());
            format!("IPv4 flags/fragment offset {v:#06x}")
        }
        9 => {
            let ttl = [0, 1, 255][rnd(3)];
            put(f, l3 + if v6 { 7 } else { 8 }, &[ttl]);
            format!("TTL / hop limit {ttl}")
        }
        10 => {
            let p = if rnd(3) == 0 { any(rnd) } else { PROTOS[rnd(PROTOS.len())] };
            put(f, l3 + if v6 { 6 } else { 9 }, &[p]);
            format!("protocol / next header {p}")
        }
        11 if !v6 && hlen == 20 && f.len() >= l4 => {
            // Real options (NOP ... EOL), lengths and IHL made consistent.
            let words = 1 + rnd(10);
            let mut opts = vec![1u8; words * 4];
            opts[words * 4 - 1] = 0;
            f.splice(l4..l4, opts);
            f[l3] = 0x40 | (5 + words) as u8;
            let len = ip_view(f).map_or(f.len() - l3, |ip| ip.len);
            set_ip_len(f, len + words * 4);
            format!("{words} words of IPv4 options")
        }
        12 => {
            if v6 {
                let a = ODD6[rnd(ODD6.len())];
                put(f, l3 + 8, &a.to_be_bytes());
                format!("IPv6 source {}", Ipv6Addr::from(a))
            } else {
                let a = ODD4[rnd(ODD4.len())];
                put(f, l3 + 12, &a);
                format!("IPv4 source {}", Ipv4Addr::from(a))
            }
        }
        13 if !v6 => {
            let a = VIPS4[rnd(VIPS4.len())];
            put(f, l3 + 16, &a);
            format!("IPv4 destination {}", Ipv4Addr::from(a))
        }
        14 => {
            let port = [0u16, 53, 80, 443, 8080, any(rnd) as u16 * 257][rnd(6)];
            let at = l4 + 2 * rnd(2);
            put(f, at, &port.to_be_bytes());
            format!("port at {at} = {port}")
        }
        15 => {
            // The quote of an ICMP error: its source another VIP's, its protocol, version,
            // ports, or the quote cut short (the lengths made to agree).
            let q = l4 + 8;
            let (qhlen, qsrc) = if v6 { (40, 8) } else { (20, 12) };
            match rnd(5) {
                0 if !v6 => {
                    let a = VIPS4[rnd(VIPS4.len())];
                    put(f, q + qsrc, &a);
                    format!("quoted source {}", Ipv4Addr::from(a))
                }
                1 => {
                    let p = PROTOS[rnd(PROTOS.len())];
                    put(f, q + if v6 { 6 } else { 9 }, &[p]);
                    format!("quoted protocol {p}")
                }
                2 => {
                    let b = any(rnd);
                    put(f, q, &[b]);
                    format!("quoted first byte {b:#x}")
                }
                3 => {
                    let port = [0u16, 53, 80, 443, 9999][rnd(5)];
                    put(f, q + qhlen, &port.to_be_bytes());
                    format!("quoted source port {port}")
                }
                _ => {
                    let len = (q + rnd(qhlen + 9)).min(f.len());
                    f.truncate(len);
                    set_ip_len(f, len - l3);
                    format!("quote cut to {} bytes", len.saturating_sub(q))
                }
            }
        }
        16 => match rnd(4) {
            0 if l3 == 14 => {
                let tci = (rnd(0x10000) as u16).to_be_bytes();
                f.splice(12..12, [0x81, 0, tci[0], tci[1]]);
                "VLAN tag added".into()
            }
            1 if l3 == 18 => {
                f.drain(12..16);
                "VLAN tag removed".into()
            }
            2 => {
                f.splice(12..12, [0x81, 0, 0, 9]);
                "outer VLAN tag added".into()
            }
            _ => {
                put(f, 12, &[[0x88, 0xa8], [0x81, 0], [0x08, 0], [0x86, 0xdd]][rnd(4)]);
                format!("EtherType {:02x}{:02x}", f[12], f[13])
            }
        },
        17 => {
            let at = [0, 6][rnd(2)];
            f[at] ^= [1, 2, 0xfe][rnd(3)];
            format!("MAC byte {at} = {:#x}", f[at])
        }
        18 => {
            let (ty, code) =
                [(0, 0), (3, 4), (3, 3), (8, 0), (11, 0), (128, 0), (129, 0), (2, 0)][rnd(8)];
            put(f, l4, &[ty, code]);
            format!("ICMP type {ty} code {code}")
        }
        _ => {
            let at = rnd(f.len());
            f[at] = any(rnd);
            format!("byte {at} = {:#x}", f[at])
        }
    }
}

/// Counts of one randomized run: frames by reason, one sent frame of every sending reason (for
/// the check of the checks).
struct Tally {
    seed: u64,
    runs: u64,
    seen: [u64; REASON_COUNT as usize],
    samples: Vec<(Vec<u8>, u32, usize, Vec<u8>)>,
}

/// Runs `f` and judges the run; panics (with the seed, the case, input and output) on a
/// property broken.
fn judged_run(
    h: &mut Harness,
    model: &Model,
    f: &[u8],
    tally: &mut Tally,
    case: impl Fn() -> String,
) {
    let before = h.reasons();
    let (verdict, out) = h.run(f);
    let after = h.reasons();
    tally.runs += 1;
    let fail = |what: String| -> String {
        format!(
            "{what}\n  case: {} (seed {}; FUZZ_SEED={} replays)\n  input:\n{}\n  verdict {verdict}, output:\n{}",
            case(),
            tally.seed,
            tally.seed,
            hex(f),
            hex(&out)
        )
    };
    let moved: Vec<usize> = (0..REASON_COUNT as usize).filter(|&r| after[r] != before[r]).collect();
    if moved.len() != 1 || after[moved[0]] - before[moved[0]] != 1 {
        let names: Vec<_> = moved.iter().map(|&r| REASON_NAMES[r]).collect();
        panic!("{}", fail(format!("counted under {names:?}, not one reason once")));
    }
    let reason = moved[0];
    match judge(model, f, verdict, reason, &out) {
        Ok(()) if verdict == XDP_TX && !tally.samples.iter().any(|s| s.2 == reason) => {
            tally.samples.push((f.to_vec(), verdict, reason, out.clone()));
        }
        Ok(()) => {}
        Err(Fault::Broken(what)) => panic!("{}", fail(what)),
    }
    tally.seen[reason] += 1;
}

/// The randomized property test: the real balancer (FIXTURE_CONFIG: IPv4 ipip, 4in6, any-port,
/// 5-tuple, L2 DSR and L7 VIPs, IPv6 VIPs, echo) fed valid frames of every kind (TCP, UDP, echo,
/// ICMP errors quoting every kind of flow, fragments, options, extension headers, too big,
/// TTL 0/1, VLAN-tagged, padded, not IP), each cut at every length and given every IP length
/// value, then random damage (bits, bytes, lengths, IHL, version, flags, TTL, protocols, real
/// options, odd sources, other VIPs, ports, ICMP quotes, VLAN tags, MACs, ICMP types, trailing
/// bytes; checksums made right again half of the time). Every run is judged by `judge`.
/// FUZZ_SEED=<n> runs another seed; the seed is printed. As the design has it: TTL 0 / 1 is
/// not judged (no router hop), nor are checksums of packets carried to a backend; an ICMP error
/// goes by its quote, whatever VIP address it was sent to; bytes past the IP length are padding.
#[test]
fn mutated_frames_keep_the_operator_properties() {
    let Some(mut h) =
        Harness::pinned("mutated_frames_keep_the_operator_properties", FIXTURE_CONFIG)
    else {
        return;
    };
    let started = std::time::Instant::now();
    let seed = common::fuzz_seed(0x9e37_79b9_7f4a_7c15);
    eprintln!("mutated frames: seed {seed} (FUZZ_SEED={seed} replays)");
    let mut tally = Tally { seed, runs: 0, seen: [0; REASON_COUNT as usize], samples: Vec::new() };
    let model = Model::new(&h.cfg);
    let bases = operator_bases();
    // Every base as it is, cut at every length, and with every IP length value up to a few
    // bytes past the frame (the IPv4 header checksum made right, so only the length is wrong).
    for (name, base) in &bases {
        judged_run(&mut h, &model, base, &mut tally, || name.clone());
        for len in 14..base.len() {
            judged_run(&mut h, &model, &base[..len], &mut tally, || {
                format!("{name}, cut to {len}")
            });
        }
        if ip_view(base).is_none() {
            continue;
        }
        let (l3, _, _) = ip_shape(base);
        for len in 0..=base.len() - l3 + 4 {
            let mut f = base.clone();
            set_ip_len(&mut f, len);
            fix_header_checksum(&mut f);
            judged_run(&mut h, &model, &f, &mut tally, || format!("{name}, IP length says {len}"));
        }
    }
    let swept = tally.runs;
    // Random damage, one to four kinds at once.
    let mut rnd = common::rng(seed);
    for i in 0..40_000 {
        let (name, base) = &bases[rnd(bases.len())];
        let mut f = base.clone();
        let mut what: Vec<String> = (0..1 + rnd(4)).map(|_| damage(&mut f, &mut rnd)).collect();
        if rnd(2) == 0 {
            fix_header_checksum(&mut f);
            what.push("IPv4 checksum fixed".into());
        }
        if rnd(2) == 0 {
            fix_icmp_checksum(&mut f);
            what.push("ICMP checksum fixed".into());
        }
        judged_run(&mut h, &model, &f, &mut tally, || format!("{i}: {name}, {}", what.join(", ")));
    }
    let summary: Vec<String> =
        REASON_NAMES.iter().zip(tally.seen).map(|(n, c)| format!("{n}={c}")).collect();
    eprintln!(
        "mutated frames: {} runs ({swept} sweeps of lengths, the rest random) in {:.1?}: {}",
        tally.runs,
        started.elapsed(),
        summary.join(" ")
    );
    // Every path must have been taken often enough to mean something.
    for r in [
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassL7,
        Reason::PassMalformed,
        Reason::PassNoService,
        Reason::PassNotUnicast,
        Reason::DropFragment,
        Reason::DropIpOptions,
        Reason::DropTooBig,
        Reason::TxEncap,
        Reason::TxL2,
        Reason::TxIcmpEcho,
        Reason::TxIcmpTooBig,
        Reason::TxIcmpToBackend,
    ] {
        let n = tally.seen[r as usize];
        assert!(n >= 50, "only {n} frames counted as {}", REASON_NAMES[r as usize]);
    }
    checks_catch_damage(&model, &tally.samples);
}

/// The checks can fail: every sent frame kept as a sample is rejected with any one bit flipped,
/// a byte more or less; a passed frame that changed, a verdict of XDP_ABORTED, a verdict counted
/// under a reason of another kind and a drop of a frame to no VIP are rejected too.
fn checks_catch_damage(cfg: &Model, samples: &[(Vec<u8>, u32, usize, Vec<u8>)]) {
    assert_eq!(samples.len(), 5, "one sample of every sending reason");
    let broken = |r: Result<(), Fault>| matches!(r, Err(Fault::Broken(_)));
    for (input, verdict, reason, out) in samples {
        let name = REASON_NAMES[*reason];
        assert!(judge(cfg, input, *verdict, *reason, out).is_ok(), "{name}: sample judged ok");
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 1 << (i % 8);
            let verdict = judge(cfg, input, *verdict, *reason, &bad);
            let caught = matches!(verdict, Err(Fault::Broken(_)));
            assert!(caught, "{name}: bit {} of byte {i} flipped went unnoticed", i % 8);
        }
        let shorter = &out[..out.len() - 1];
        assert!(broken(judge(cfg, input, *verdict, *reason, shorter)), "{name}: a byte less");
        let longer = [&out[..], &[0]].concat();
        assert!(broken(judge(cfg, input, *verdict, *reason, &longer)), "{name}: a byte more");
        assert!(judge(cfg, input, 0, *reason, out).is_err(), "{name}: XDP_ABORTED");
        let pass = Reason::PassNotVip as usize;
        assert!(judge(cfg, input, *verdict, pass, out).is_err(), "{name}: counted as passed");
        let mut changed = input.clone();
        changed[20] ^= 1;
        assert!(judge(cfg, input, XDP_PASS, pass, &changed).is_err(), "{name}: passed, changed");
    }
    let not_vip = eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4("198.18.4.7", 1, "198.18.0.2", 22, SYN));
    let frag = Reason::DropFragment as usize;
    assert!(judge(cfg, &not_vip, XDP_DROP, frag, &not_vip).is_err(), "drop of a non-VIP frame");
    let pass = Reason::PassNotVip as usize;
    assert!(judge(cfg, &not_vip, XDP_PASS, pass, &not_vip).is_ok(), "a non-VIP frame passed");
    let syn = eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4("198.18.4.7", 1, "198.18.1.1", 80, SYN));
    assert!(judge(cfg, &syn, XDP_PASS, pass, &syn).is_err(), "a SYN to a VIP passed");
}

/// Runs one frame on the fixture config; returns the verdict and the output, and prints both.
fn run_one(test: &str, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
    let mut h = Harness::new(test, FIXTURE_CONFIG)?;
    let (verdict, out) = h.run(frame);
    let show = |b: &[u8]| format!("{} bytes:\n{}", b.len(), hex(&b[..b.len().min(96)]));
    eprintln!("{test}\ninput {}\nverdict {verdict}, output {}", show(frame), show(&out));
    Some((verdict, out))
}

/// An echo request from 198.18.4.7 to the VIP 198.18.1.1 (no payload), sent from `mac`.
fn echo_request(src: Ipv4Addr, mac: [u8; 6]) -> Vec<u8> {
    let vip = v4("198.18.1.1");
    eth(LB_MAC, mac, ETH_IP, &V4::new(src, vip, 1).packet(&icmp4(8, 0, [0, 7, 0, 1], b"")))
}

/// A SYN to the IPIP VIP with 40 bytes of IP packet (total length 40) and 1441 bytes after it
/// in the frame (1495 bytes, which a 1500-byte MTU lets in): carried along, the trailer would
/// take the encapsulated frame to 20 + 40 + 1441 = 1501 bytes past the Ethernet header, over
/// `node.mtu`. It is cut: the packet goes to its backend in 60 bytes.
#[test]
fn a_trailer_past_the_ip_length_is_cut_rather_than_sent_over_the_mtu() {
    let mut frame =
        eth(LB_MAC, CLIENT_MAC, ETH_IP, &tcp4("198.18.4.7", 40000, "198.18.1.1", 80, SYN));
    frame.resize(frame.len() + 1441, 0);
    let Some((verdict, out)) = run_one("trailer_cut", &frame) else { return };
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len() - 14, 20 + 40, "the outer header and the packet, no trailer");
}

/// An echo request whose source MAC has the group bit (03:ed:00:00:00:01) is not answered, as
/// frames to a group MAC are not: the reply would go to every host of the segment.
#[test]
fn an_echo_from_a_group_mac_is_not_answered() {
    let frame = echo_request(v4("198.18.4.7"), [0x03, 0xed, 0, 0, 0, 1]);
    let Some((verdict, out)) = run_one("echo_group_mac", &frame) else { return };
    assert_eq!(verdict, XDP_PASS, "answered to group MAC {:02x?}", &out[..6]);
    assert_eq!(hex(&out), hex(&frame));
}

/// No ICMP answer goes to a source no single host has (RFC 1122 3.2.2 and 3.2.1.3, RFC 4443
/// 2.4 (e)): an echo request from 255.255.255.255 is passed, and a 1500-byte SYN with DF from
/// 224.0.0.1 (too big to forward) is dropped without a frag-needed.
#[test]
fn icmp_answers_never_go_to_non_unicast_sources() {
    let echo = echo_request(v4("255.255.255.255"), CLIENT_MAC);
    let Some((verdict, _)) = run_one("echo_non_unicast", &echo) else { return };
    let (c, vip) = (v4("224.0.0.1"), v4("198.18.1.1"));
    let big = V4::new(c, vip, 6).packet(&tcp(c.into(), vip.into(), 40000, 80, SYN, &[0; 1460]));
    let big = eth(LB_MAC, CLIENT_MAC, ETH_IP, &big);
    let Some((big_verdict, _)) = run_one("too_big_non_unicast", &big) else { return };
    assert_eq!(verdict, XDP_PASS, "echo reply to 255.255.255.255");
    assert_eq!(big_verdict, XDP_DROP, "frag-needed to 224.0.0.1");
}

/// An echo request whose IPv4 header checksum fails (set to 0) is passed untouched (the kernel
/// drops it): answered with a checksum of the balancer's making, damage to its source address
/// would become a valid reply to another host.
#[test]
fn an_ipv4_header_with_a_bad_checksum_is_not_answered() {
    let mut frame = echo_request(v4("198.18.4.7"), CLIENT_MAC);
    frame[24..26].fill(0);
    let Some((verdict, out)) = run_one("echo_bad_checksum", &frame) else { return };
    assert_eq!(verdict, XDP_PASS, "answered");
    assert_eq!(hex(&out), hex(&frame));
}

/// An ICMPv6 packet-too-big to the IPv6 VIP quoting a "packet" whose first byte is 0 (version
/// 0, not 6), otherwise the quote of a TCP flow from [2001:2:0:1::1]:80, is passed
/// (`pass_no_service`), as an IPv4 error must quote version 4 / IHL 5 (`ver_ihl == 0x45`).
#[test]
fn a_packet_too_big_quoting_no_ipv6_header_is_passed() {
    let (vip6, router6) = (v6("2001:2:0:1::1"), v6("2001:2::fe"));
    let mut quoted = tcp6("2001:2:0:1::1", 80, "2001:2::77", 40000, ACK);
    quoted[0] = 0;
    quoted.truncate(44);
    let ptb = icmp6(router6, vip6, 2, 0, 1280u32.to_be_bytes(), &quoted);
    let frame = eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &ipv6(router6, vip6, 58, 0, 64, &ptb));
    let Some((verdict, _)) = run_one("quote_not_ipv6", &frame) else { return };
    assert_eq!(verdict, XDP_PASS, "forwarded");
}

/// Whether an interface merges received segments (GRO) is read from the kernel as `ethtool -K`
/// set it: a balancer attached in generic mode warns when it is on, since generic XDP runs after
/// GRO and merged packets no longer fit the MTU once encapsulated.
#[test]
fn gro_is_read_from_the_kernel() {
    if !require_privileged("gro_is_read_from_the_kernel") {
        return;
    }
    let ns = format!("elgro{}", std::process::id());
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(ns.clone());
    let run = |cmd: &[&str]| {
        let ok = std::process::Command::new(cmd[0]).args(&cmd[1..]).status().unwrap().success();
        assert!(ok, "{cmd:?}");
    };
    run(&["ip", "netns", "add", &ns]);
    run(&["ip", "-n", &ns, "link", "add", "va", "type", "veth", "peer", "name", "vb"]);
    let gro =
        || netns::in_netns(&ns, || edgelb::dataplane::netlink::gro_on("va")).unwrap().unwrap();
    run(&["ip", "netns", "exec", &ns, "ethtool", "-K", "va", "gro", "on"]);
    assert!(gro(), "gro on");
    run(&["ip", "netns", "exec", &ns, "ethtool", "-K", "va", "gro", "off"]);
    assert!(!gro(), "gro off");
    run(&["ip", "netns", "exec", &ns, "ethtool", "-K", "va", "gro", "on"]);
    assert!(gro(), "gro on again");
    let missing = netns::in_netns(&ns, || edgelb::dataplane::netlink::gro_on("nosuch")).unwrap();
    assert!(missing.is_err(), "no such interface: {missing:?}");
}

/// An IPv4 VIP with an IPv4 backend and one with an IPv6 backend, under `mtu = 0` (no check).
const NO_MTU_CONFIG: &str = r#"
[node]
interfaces = ["lo"]
encap_source_v4 = "198.19.0.0/16"
encap_source_v6 = "2001:2:0:ff::/96"
mtu = 0

[[vip]]
name = "v4tcp"
address = "198.18.1.1"
port = 80
backends = [{ address = "198.18.0.11", mac = "02:ed:00:00:00:11" }]

[[vip]]
name = "v4to6"
address = "198.18.1.2"
port = 80
backends = [{ address = "2001:2::11", mac = "02:ed:00:00:00:11" }]
"#;

/// What became of a packet sent through the balancer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    /// Encapsulated, its outer header saying this length (the whole outer IP packet).
    Forwarded(usize),
    /// Answered with frag-needed advertising this MTU.
    Answered(u16),
    /// Dropped as too big.
    Dropped,
}

/// With `mtu = 0` (no MTU check), a packet that would be over 65 535 bytes once encapsulated
/// is refused all the same, as a packet over any `mtu` is: it was sent with an outer IPv4
/// length that had wrapped (a 65 520-byte packet went out saying 4 bytes) and counted as
/// forwarded. BPF_PROG_TEST_RUN carries no 64 KiB frame to the program (it has no `xdp.frags`),
/// so this runs it in generic mode on the `lo` of a namespace (MTU 65 536, as after GRO on a
/// real interface), sends it raw IPv4 packets and watches what leaves with AF_PACKET.
#[test]
fn with_no_mtu_a_packet_too_big_to_encapsulate_is_refused() {
    if !require_privileged("with_no_mtu_a_packet_too_big_to_encapsulate_is_refused") {
        return;
    }
    let netns = ScratchNetns::add("elbig");
    let ns = netns.0.clone();
    for args in ["link set lo up", "addr add 198.18.1.1/32 dev lo", "addr add 198.18.1.2/32 dev lo"]
    {
        netns.ip(args);
    }
    let cfg = Config::parse(NO_MTU_CONFIG, "x".as_ref()).unwrap();
    assert_eq!(cfg.node.mtu, 0);
    netns::in_netns(&ns, || {
        let mut dp = Dataplane::load(None).expect("loads");
        dp.apply(&cfg).unwrap();
        assert_eq!(dp.attach("lo", XdpAttachMode::Generic).expect("attaches"), "generic");
        let capture = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()))),
        )
        .expect("AF_PACKET socket");
        // Room for the few 64 KiB frames each packet makes (the default holds about one).
        let room: libc::c_int = 16 << 20;
        // SAFETY: setsockopt reads the int it is given, alive for the call.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&capture),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&room as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
        capture.set_read_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
        let sender = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .expect("raw IPv4 socket");
        let client = v4("198.18.4.1");
        // (VIP, length of the IP packet sent, DF, what becomes of it). 65 515 bytes and 20 of
        // outer IPv4 header are the largest IPv4 packet; 65 495 and 40 of IPv6, the 65 535 that
        // `mtu = 0` stands for (a DF packet over it is answered, advertising what fits).
        let cases = [
            ("198.18.1.1", 1500, true, Fate::Forwarded(1520)),
            ("198.18.1.1", 65515, true, Fate::Forwarded(65535)),
            ("198.18.1.1", 65516, true, Fate::Answered(65515)),
            ("198.18.1.1", 65520, true, Fate::Answered(65515)),
            ("198.18.1.1", 65535, true, Fate::Answered(65515)),
            ("198.18.1.1", 65516, false, Fate::Dropped),
            ("198.18.1.1", 65535, false, Fate::Dropped),
            ("198.18.1.2", 65495, true, Fate::Forwarded(65535)),
            ("198.18.1.2", 65496, true, Fate::Answered(65495)),
            ("198.18.1.2", 65535, false, Fate::Dropped),
        ];
        for (i, (vip, len, df, want)) in cases.into_iter().enumerate() {
            let name = format!("{len} bytes to {vip}, DF {df}");
            let vip = v4(vip);
            let mut h = V4::new(client, vip, 6);
            h.df = df;
            let sport = 40000 + i as u16;
            let packet =
                h.packet(&tcp(client.into(), vip.into(), sport, 80, SYN, &vec![b'x'; len - 40]));
            assert_eq!(packet.len(), len);
            let before = dp.maps().reasons().unwrap();
            let to = std::net::SocketAddr::from((vip, 0));
            assert_eq!(sender.send_to(&packet, &to.into()).expect(&name), len, "{name}");
            let slot = match want {
                Fate::Forwarded(_) => Reason::TxEncap,
                Fate::Answered(_) => Reason::TxIcmpTooBig,
                Fate::Dropped => Reason::DropTooBig,
            };
            let start = std::time::Instant::now();
            let after = loop {
                let after = dp.maps().reasons().unwrap();
                if after[slot as usize] > before[slot as usize]
                    || start.elapsed() > std::time::Duration::from_secs(2)
                {
                    break after;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            };
            // What left the balancer for this packet: the encapsulated frame (IPIP, or 4in6 to
            // the IPv6 backend) or the frag-needed answer. The kernel's own copies of the packet
            // sent (IPv4 carrying TCP) are not among them.
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 70_000];
            while let Ok(n) = std::io::Read::read(&mut &capture, &mut buf) {
                let f = &buf[..n];
                let ip = &f[14..];
                match u16::from_be_bytes([f[12], f[13]]) {
                    ETH_IP if ip[9] == 4 => {
                        let said = u16::from_be_bytes([ip[2], ip[3]]) as usize;
                        assert_eq!(said, ip.len(), "{name}: outer IPv4 length as sent");
                        seen.push(Fate::Forwarded(said));
                    }
                    ETH_IP if ip[9] == 1 && ip[20] == 3 && ip[21] == 4 => {
                        seen.push(Fate::Answered(u16::from_be_bytes([ip[26], ip[27]])));
                    }
                    ETH_IPV6 if ip[6] == 4 => {
                        let said = u16::from_be_bytes([ip[4], ip[5]]) as usize + 40;
                        assert_eq!(said, ip.len(), "{name}: outer IPv6 length as sent");
                        seen.push(Fate::Forwarded(said));
                    }
                    _ => {}
                }
            }
            let want_seen = if want == Fate::Dropped { vec![] } else { vec![want] };
            assert_eq!(seen, want_seen, "{name}: what left the balancer");
            for r in [Reason::TxEncap, Reason::TxIcmpTooBig, Reason::DropTooBig] {
                let moved = after[r as usize] - before[r as usize];
                let name_r = REASON_NAMES[r as usize];
                assert_eq!(moved, u64::from(r as usize == slot as usize), "{name}: {name_r}");
            }
        }
    })
    .unwrap();
}
