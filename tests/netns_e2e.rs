//! End to end through real namespaces: client -> XDP balancer -> three backends (decap program on
//! their veth, VIP on their lo) -> straight back to the client (DSR).

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use edgelb::{
    config::{self, Config, XdpAttachMode},
    dataplane::{Dataplane, route},
    testbed::{self, Testbed, netns, servers},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn e2e_config() -> Config {
    let text = format!(
        "{}\n[[vip]]\nname = \"web6\"\naddress = \"{}\"\nport = 80\nbackends = [\n{}\n]\n",
        config::EXAMPLE,
        testbed::VIP6,
        testbed::BACKENDS6
            .iter()
            .zip(testbed::BACKEND_MACS)
            .map(|(a, m)| format!(
                "  {{ address = \"{a}\", mac = \"{}\" }},",
                m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Config::parse(&text, "e2e.toml".as_ref()).expect("e2e config is valid")
}

#[test]
fn client_to_backends_through_xdp() {
    if !netns::require_privileged("client_to_backends_through_xdp") {
        return;
    }
    let prefix = format!("elbt{}", std::process::id());
    let tb = Testbed::up(&prefix, false).expect("testbed up");
    let _servers = tb.start_servers().expect("backend servers");
    let cfg = e2e_config();
    let mut dp = Dataplane::load(None).expect("balancer loads");
    dp.apply(&cfg).expect("maps filled");
    let mode =
        netns::in_netns(&tb.names.lb, || dp.attach(testbed::LB_IFACE, XdpAttachMode::Native))
            .unwrap()
            .expect("attach");
    assert_eq!(mode, "native", "veth supports native XDP on this kernel");

    // The node's own (non-VIP) traffic must still work: a listener on the balancer node.
    let lb_listener =
        netns::in_netns(&tb.names.lb, || TcpListener::bind((testbed::LB, 9000))).unwrap().unwrap();

    let web = cfg.find_vip("web", None).unwrap().clone();
    let dns = cfg.find_vip("dns", None).unwrap().clone();
    let web6 = cfg.find_vip("web6", None).unwrap().clone();
    let vip = SocketAddr::new(IpAddr::V4(testbed::VIP), 80);
    let names: HashMap<IpAddr, String> = testbed::BACKENDS
        .iter()
        .enumerate()
        .map(|(i, a)| (IpAddr::V4(*a), format!("backend-{}", i + 1)))
        .chain(
            testbed::BACKENDS6
                .iter()
                .enumerate()
                .map(|(i, a)| (IpAddr::V6(*a), format!("backend-{}", i + 1))),
        )
        .collect();

    netns::in_netns(&tb.names.client, || {
        // First contact: neighbours resolve; retry briefly.
        let start = Instant::now();
        while servers::http_get(None, vip, TIMEOUT).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "VIP never answered");
            std::thread::sleep(Duration::from_millis(100));
        }

        // 1000 client addresses over 3 equal backends: each within 15% of even, and each one
        // on the backend `edgelb route` names.
        let mut per_backend: HashMap<String, u32> = HashMap::new();
        for n in 0..1000 {
            let src = SocketAddr::new(IpAddr::V4(testbed::pool_addr(n)), 0);
            let got =
                servers::http_get(Some(src), vip, TIMEOUT).expect("HTTP through the balancer");
            let want = &names[&route(&web, src.ip(), 0).unwrap().address];
            assert_eq!(&got, want, "client {} answered by the backend route() names", src.ip());
            *per_backend.entry(got).or_default() += 1;
        }
        eprintln!("1000 clients over 3 backends: {per_backend:?}");
        assert_eq!(per_backend.len(), 3);
        for (b, n) in &per_backend {
            assert!((*n as f64 - 1000.0 / 3.0).abs() <= 0.15 * 1000.0 / 3.0, "{b} got {n} of 1000");
        }

        // Stickiness: repeated connections from one client land on one backend.
        for n in [3u32, 500, 999] {
            let src = SocketAddr::new(IpAddr::V4(testbed::pool_addr(n)), 0);
            let first = servers::http_get(Some(src), vip, TIMEOUT).unwrap();
            for _ in 0..10 {
                assert_eq!(servers::http_get(Some(src), vip, TIMEOUT).unwrap(), first);
            }
        }

        // UDP, answered directly by the backend.
        for n in 0..30 {
            let src = SocketAddr::new(IpAddr::V4(testbed::pool_addr(n)), 0);
            let got = servers::udp_ask(src, SocketAddr::new(IpAddr::V4(testbed::VIP), 53), TIMEOUT)
                .expect("UDP reply");
            assert_eq!(got, names[&route(&dns, src.ip(), 0).unwrap().address]);
        }

        // IPv6 VIP (IP6IP6).
        let src6 = SocketAddr::new(IpAddr::V6(testbed::CLIENT6), 0);
        let got =
            servers::http_get(Some(src6), SocketAddr::new(IpAddr::V6(testbed::VIP6), 80), TIMEOUT)
                .expect("HTTP over IPv6");
        assert_eq!(got, names[&route(&web6, src6.ip(), 0).unwrap().address]);

        // Traffic to the balancer node itself passes through XDP untouched.
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(testbed::LB), 9000), TIMEOUT)
                .expect("connect to node");
        s.write_all(b"hi").unwrap();
    })
    .unwrap();
    let (mut conn, _) = lb_listener.accept().unwrap();
    let mut buf = [0u8; 2];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");

    let c = dp.vip_counters(&web).unwrap();
    assert!(c.packets >= 1000 * 3, "VIP counters saw the traffic: {c:?}");
    drop(dp);
    drop(tb);
    assert!(!netns::netns_path(&format!("{prefix}-lb")).exists(), "testbed torn down");
}
