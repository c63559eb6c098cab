use super::limits::{RANGES, form};
use super::message::{QUOTED_CHARS, WRITE_BYTES, toml_string};
use super::routes::EarlierRoutes;
use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("t.toml"))
}

/// The error's `file:line:column: message` text.
fn err(text: &str) -> String {
    parse(text).expect_err("config should be rejected").to_string()
}

const NODE: &str = "[node]\ninterfaces = [\"eth0\"]\nencap_source_v4 = \"198.19.0.0/16\"\n";

#[test]
fn example_config_is_valid() {
    let cfg = parse(EXAMPLE).unwrap();
    assert_eq!(cfg.vips.len(), 3);
    assert!(cfg.vips[2].l7.is_some());
    assert_eq!(cfg.vips[0].ring_size, DEFAULT_RING_SIZE);
    assert_eq!(cfg.vips[0].hash, HashMode::Client);
    assert_eq!(cfg.node.xdp_mode, XdpAttachMode::Auto);
}

#[test]
fn defaults_are_applied() {
    let cfg = parse(&format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nbackends = [{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}]\n"
    ))
    .unwrap();
    let v = &cfg.vips[0];
    assert_eq!((v.port, v.protocol, v.forwarding), (0, Protocol::Tcp, Forwarding::Ipip));
    assert_eq!(v.backends[0].weight, 1);
    assert_eq!(cfg.node.mtu, 1500);
}

#[test]
fn conntrack_can_be_turned_off_for_vips_xdp_forwards() {
    let vip = |extra: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 53\nprotocol = \"udp\"\n{extra}\nbackends = [{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}]\n"
        )
    };
    assert!(parse(&vip("")).unwrap().vips[0].conntrack);
    assert!(!parse(&vip("conntrack = false")).unwrap().vips[0].conntrack);
    let e = err(&vip("conntrack = \"no\""));
    assert!(e.starts_with("t.toml:9:13:"), "{e}");
    let l7 = format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\nforwarding = \"l7\"\nconntrack = false\nbackends = [{{ address = \"198.18.0.11\", port = 80 }}]\n"
    );
    let e = err(&l7);
    assert!(e.starts_with("t.toml:9:13:") && e.contains("not to l7"), "{e}");
}

#[test]
fn toml_syntax_error_has_line_and_column() {
    let e = err("[node]\ninterfaces = [\"eth0\"\n");
    assert!(e.starts_with("t.toml:2:"), "{e}");
}

#[test]
fn unknown_field_is_rejected_with_its_location() {
    let e = err(&format!("{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nprot = 80\n"));
    assert!(e.starts_with("t.toml:7:1:"), "{e}");
    assert!(e.contains("prot"), "{e}");
}

#[test]
fn semantic_errors_point_at_the_field() {
    let e = err(&format!("{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.999\"\n"));
    assert!(e.starts_with("t.toml:6:11:"), "{e}");
    assert!(e.contains("not an IP address"), "{e}");

    let e =
        err(&format!("{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nring_size = 65536\n"));
    assert!(e.starts_with("t.toml:7:13:") && e.contains("prime"), "{e}");

    let e = err(&format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nprotocol = \"sctp\"\n"
    ));
    assert!(e.starts_with("t.toml:7:12:") && e.contains("tcp or udp"), "{e}");
}

#[test]
fn path_prefixes_must_be_paths_in_normal_form() {
    let vip = |l7: &str, prefix: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{{ address = \"198.18.0.11\" }}]\n[vip.l7]\n{l7}\n[[vip.route]]\npath_prefix = \"{prefix}\"\nbackends = [{{ address = \"198.18.0.12\" }}]\n"
        )
    };
    for good in ["/", "/api/", "/a%2Fb", "/~x"] {
        parse(&vip("", good)).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let e = err(&vip("", "api/"));
    assert!(e.starts_with("t.toml:13:15:") && e.contains("start with `/`"), "{e}");
    assert!(err(&vip("", "/a?b")).contains("without query"));
    let e = err(&vip("", "/static/../api//"));
    assert!(e.contains("not in normal form") && e.contains("write path_prefix = \"/api/\""), "{e}");
    assert!(err(&vip("", "/%61pi")).contains("write path_prefix = \"/api\""));
    assert!(err(&vip("", "/a%2f")).contains("write path_prefix = \"/a%2F\""));
    assert!(err(&vip("", "/a%g0")).contains("malformed escape"));
    // Spelled as the reading with every escape decoded spells it, which backends read
    // `/v1%3Aadmin/` as: one route for both spellings, not two.
    for good in ["/v1:admin/", "/x@y/", "/a|b/", "/%C3%BC/", "/a%3Bb/", "/a%20b/", "/a%7Bb%7D/"] {
        parse(&vip("", good)).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for (bad, write) in [
        ("/v1%3Aadmin/", "/v1:admin/"),
        ("/x%40y/", "/x@y/"),
        ("/a%7cb/", "/a|b/"),
        ("/a{b}/", "/a%7Bb%7D/"),
        ("/%2e/v1%3a/", "/v1:/"),
    ] {
        let e = err(&vip("", bad));
        assert!(e.contains(&format!("write path_prefix = \"{write}\"")), "{bad}: {e}");
    }
    // Requests matched as sent: any path will do.
    let cfg = parse(&vip("normalize_path = false", "/static/../api//")).unwrap();
    assert!(!cfg.vips[0].l7.as_ref().unwrap().normalize_path);
    assert!(parse(&vip("", "/api/")).unwrap().vips[0].l7.as_ref().unwrap().normalize_path);
}

#[test]
fn l2_needs_macs_and_ipip_needs_a_next_hop() {
    let e = err(&format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nforwarding = \"l2\"\nbackends = [{{ address = \"198.18.0.11\" }}]\n"
    ));
    assert!(e.contains("needs a `mac`"), "{e}");
    let e = err(&format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nbackends = [{{ address = \"198.18.0.11\" }}]\n"
    ));
    assert!(e.contains("gateway_mac"), "{e}");
}

#[test]
fn v6_vip_with_v4_backend_is_rejected() {
    let e = err(&format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"2001:2::1\"\nbackends = [{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}]\n"
    ));
    assert!(e.contains("IPv6 VIP needs IPv6 backends"), "{e}");
}

#[test]
fn ipv6_backends_need_an_encap_source() {
    let e = err(&format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"2001:2::1\"\nbackends = [{{ address = \"2001:2::11\", mac = \"02:00:00:00:00:01\" }}]\n"
    ));
    assert!(e.contains("encap_source_v6"), "{e}");
}

#[test]
fn duplicates_are_rejected() {
    let vip = "[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\n";
    let e = err(&format!("{NODE}{vip}{vip}"));
    assert!(e.contains("duplicate VIP name"), "{e}");
    let e = err(&format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nbackends = [{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}, {{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}]\n"
    ));
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn bad_mac_and_mtu() {
    let e = err("[node]\ninterfaces = [\"eth0\"]\ngateway_mac = \"02:00:00:00:00\"\n");
    assert!(e.starts_with("t.toml:3:15:") && e.contains("MAC"), "{e}");
    let e = err("[node]\ninterfaces = [\"eth0\"]\nmtu = 100\n");
    assert!(e.starts_with("t.toml:3:7:"), "{e}");
}

/// IPv6 hosts never take a packet-too-big below 1280 (RFC 8201), and the balancer advertises
/// mtu - 40: an IPv6 VIP it encapsulates needs mtu >= 1320, or its large packets are lost.
/// Other IPv6 on the link (an IPv6 VIP forwarded by MAC or L7, IPv6 backends of an IPv4 VIP)
/// needs the 1280 every IPv6 link carries. IPv4 alone keeps IPv4's 576.
#[test]
fn mtu_leaves_ipv6_room() {
    const NODE6: &str = "[node]\ninterfaces = [\"eth0\"]\nencap_source_v4 = \"198.19.0.0/16\"\nencap_source_v6 = \"2001:2:0:ff::/96\"\n";
    let cfg = |mtu: u32, vip: &str, forwarding: &str, backend: &str| {
        let backend = if forwarding == "l7" {
            format!("{{ address = \"{backend}\" }}")
        } else {
            format!("{{ address = \"{backend}\", mac = \"02:00:00:00:00:01\" }}")
        };
        format!(
            "{NODE6}mtu = {mtu}\n[[vip]]\nname = \"a\"\naddress = \"{vip}\"\nport = 80\nforwarding = \"{forwarding}\"\nbackends = [{backend}]\n"
        )
    };
    // An encapsulated IPv6 VIP: 1320 at least, the error at the mtu, naming the VIP, the
    // advertised size and what to write.
    for mtu in [576, 1280, 1300, 1319] {
        let e = err(&cfg(mtu, "2001:2:0:1::1", "ipip", "2001:2::11"));
        assert!(e.starts_with("t.toml:5:7:"), "{e}");
        assert!(e.contains("IPv6 VIP `a`") && e.contains("RFC 8201"), "{e}");
        assert!(e.contains(&format!("= {}", mtu - 40)) && e.contains("at least 1320"), "{e}");
    }
    for mtu in [0, 1320, 1500, 9000] {
        parse(&cfg(mtu, "2001:2:0:1::1", "ipip", "2001:2::11")).unwrap();
    }
    // Other IPv6: 1280 at least.
    for (vip, forwarding, backend) in [
        ("2001:2:0:1::1", "l2", "2001:2::11"),
        ("2001:2:0:1::1", "l7", "2001:2::11"),
        ("198.18.1.1", "ipip", "2001:2::11"),
    ] {
        for mtu in [576, 1000, 1279] {
            let e = err(&cfg(mtu, vip, forwarding, backend));
            assert!(e.starts_with("t.toml:5:7:"), "{e}");
            assert!(e.contains("below 1280") && e.contains("VIP `a`"), "{e}");
        }
        for mtu in [0, 1280, 1300] {
            parse(&cfg(mtu, vip, forwarding, backend))
                .unwrap_or_else(|e| panic!("{vip} {forwarding} {backend} mtu {mtu}: {e}"));
        }
    }
    let e = err(&cfg(1000, "198.18.1.1", "ipip", "2001:2::11"));
    assert!(e.contains("IPv6 backend 2001:2::11"), "{e}");
    // IPv4 only, and an L7 VIP's IPv6 backends (the kernel reaches those): IPv4's 576 will do.
    parse(&cfg(576, "198.18.1.1", "ipip", "198.18.0.11")).unwrap();
    parse(&cfg(576, "198.18.1.1", "l7", "2001:2::11")).unwrap();
}

/// An explicit `conntrack_flows_per_cpu` is taken for every possible CPU, past the 128 MiB
/// a table the default shape keeps to: 1048576 flows on 64 possible CPUs are 1 GiB (IPv4) and
/// 2 GiB (IPv6) of kernel memory, said in a caution that names the total and the CPU count;
/// a table of exactly the budget, or a count that small machines take, is no cause.
#[test]
fn conntrack_tables_past_the_default_budget_are_cautioned() {
    let said = conntrack_memory_caution(1 << 20, 64).expect("a caution");
    assert!(
        said.starts_with("conntrack_flows_per_cpu = 1048576 makes connection tables of 3072 MiB of kernel memory (1024 MiB IPv4, 2048 MiB IPv6)"),
        "{said}"
    );
    assert!(said.contains("this machine has 64 possible CPUs"), "{said}");
    assert!(said.contains("within 128 MiB"), "{said}");
    // The IPv6 table at 128 MiB exactly: within the budget; one CPU more passes it.
    assert_eq!(conntrack_memory_caution(65_536, 64), None);
    assert!(conntrack_memory_caution(65_536, 65).is_some());
    assert_eq!(conntrack_memory_caution(1 << 20, 2), None);
    // Said at the key, when this machine's CPUs take it past the budget.
    let cpus = crate::dataplane::possible_cpus();
    let c = parse(&format!("{NODE}conntrack_flows_per_cpu = {}\n", 1 << 20)).unwrap();
    match conntrack_memory_caution(1 << 20, cpus) {
        Some(said) => assert_eq!(c.cautions, [format!("t.toml:4:27: {said}")]),
        None => assert!(c.cautions.is_empty(), "{:?}", c.cautions),
    }
}

#[test]
fn conntrack_size_is_a_power_of_two_within_limits() {
    assert_eq!(parse(NODE).unwrap().node.conntrack_flows_per_cpu, None);
    for ok in [MIN_CONNTRACK_FLOWS, 65_536, MAX_CONNTRACK_FLOWS] {
        let cfg = parse(&format!("{NODE}conntrack_flows_per_cpu = {ok}\n")).unwrap();
        assert_eq!(cfg.node.conntrack_flows_per_cpu, Some(ok));
    }
    for bad in [0, 2048, 100_000, 2 * MAX_CONNTRACK_FLOWS] {
        let e = err(&format!("{NODE}conntrack_flows_per_cpu = {bad}\n"));
        assert!(e.starts_with("t.toml:4:27:") && e.contains("power of two"), "{e}");
    }
}

#[test]
fn find_vip_by_name_address_and_socket() {
    let cfg = parse(EXAMPLE).unwrap();
    assert_eq!(cfg.find_vip("dns", None).unwrap().port, 53);
    assert_eq!(cfg.find_vip("198.18.1.1:53", None).unwrap().name, "dns");
    assert_eq!(cfg.find_vip("198.18.1.1:80", None).unwrap().name, "web");
    assert!(cfg.find_vip("198.18.9.9", None).is_err());
    assert!(cfg.find_vip("nope", None).unwrap_err().contains("no VIP named `nope`"));
}

/// An IPv6 VIP is found by its address bare, in brackets without a port (as `drain` takes a
/// backend, and as `[v6]:port` is written), or with a port; brackets around anything but an
/// IPv6 address are not an address.
#[test]
fn find_vip_takes_a_bracketed_ipv6_address() {
    let text = format!(
        "{NODE}encap_source_v6 = \"2001:db8:ff::/96\"\n[[vip]]\nname = \"v6\"\naddress = \"2001:db8::10\"\nport = 80\nbackends = [{{ address = \"2001:db8::11\", mac = \"02:00:00:00:00:01\" }}]\n"
    );
    let cfg = parse(&text).unwrap();
    for spec in ["2001:db8::10", "2001:DB8::10", "[2001:db8::10]", "[2001:db8::10]:80"] {
        assert_eq!(cfg.find_vip(spec, None).map(|v| v.name.as_str()), Ok("v6"), "{spec}");
    }
    for spec in ["[2001:db8::10", "[[2001:db8::10]]", "[198.18.1.1]", "[2001:db8::10]:80]"] {
        let e = cfg.find_vip(spec, None).unwrap_err();
        assert_eq!(e, format!("no VIP named `{spec}`"), "{spec}");
    }
    assert_eq!(
        cfg.find_vip("[2001:db8::12]", None).unwrap_err(),
        "no VIP answers to [2001:db8::12]"
    );
}

/// `route` finds the VIP the XDP program would: the exact port before an any-port VIP listed
/// earlier, the protocol asked for, and never silently the first of several.
#[test]
fn find_vip_matches_as_the_data_plane_does() {
    let backends = "backends = [{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }]\n";
    let vip = |name: &str, port: u16, proto: &str| {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"198.18.1.1\"\nport = {port}\nprotocol = \"{proto}\"\n{backends}"
        )
    };
    let text = format!(
        "{NODE}{}{}{}{}",
        vip("any", 0, "tcp"),
        vip("web", 80, "tcp"),
        vip("dns", 53, "udp"),
        vip("dnstcp", 53, "tcp")
    );
    let cfg = parse(&text).unwrap();
    assert_eq!(cfg.find_vip("198.18.1.1:80", None).unwrap().name, "web", "exact port first");
    assert_eq!(cfg.find_vip("198.18.1.1:81", None).unwrap().name, "any");
    assert_eq!(cfg.find_vip("198.18.1.1:53", Some(Protocol::Udp)).unwrap().name, "dns");
    assert_eq!(cfg.find_vip("198.18.1.1:53", Some(Protocol::Tcp)).unwrap().name, "dnstcp");
    let e = cfg.find_vip("198.18.1.1:53", None).unwrap_err();
    assert!(e.contains("dns ") && e.contains("dnstcp") && e.contains("--proto"), "{e}");
    let e = cfg.find_vip("198.18.1.1", None).unwrap_err();
    assert!(e.contains("address:port"), "{e}");
    assert_eq!(
        cfg.find_vip("198.18.1.1:81", Some(Protocol::Udp)).unwrap_err(),
        "no VIP answers to 198.18.1.1:81"
    );
    // By name too: a VIP of the other protocol never sees such a flow.
    assert_eq!(cfg.find_vip("dns", Some(Protocol::Udp)).unwrap().name, "dns");
    assert_eq!(cfg.find_vip("web", Some(Protocol::Udp)).unwrap_err(), "VIP `web` is tcp, not udp");
}

#[test]
fn metrics_default_to_loopback_and_refuse_remote_unless_allowed() {
    let cfg = parse(NODE).unwrap();
    assert_eq!(cfg.metrics.unwrap().to_string(), DEFAULT_METRICS_LISTEN);
    let e = err(&format!("{NODE}[metrics]\nlisten = \"0.0.0.0:9110\"\n"));
    assert!(e.starts_with("t.toml:5:10:") && e.contains("allow_remote"), "{e}");
    let cfg = parse(&format!("{NODE}[metrics]\nlisten = \"0.0.0.0:9110\"\nallow_remote = true\n"))
        .unwrap();
    assert_eq!(cfg.metrics.unwrap().port(), 9110);
    let cfg = parse(&format!("{NODE}[metrics]\nenabled = false\n")).unwrap();
    assert!(cfg.metrics.is_none());
    // Port 0 would be a random port, which nobody can scrape.
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        let t = format!("{NODE}[metrics]\nlisten = \"{listen}\"\n");
        refused_at(&t, &format!("\"{listen}\""), "has port 0");
    }
}

#[test]
fn health_defaults_and_limits() {
    let base =
        format!("{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\n[vip.health]\n");
    let h = parse(&base).unwrap().vips[0].health.clone().unwrap();
    assert_eq!((h.kind, h.port, h.rise, h.fall), (CheckKind::Tcp, 80, 2, 3));
    assert_eq!((h.interval, h.timeout), (Duration::from_secs(2), Duration::from_secs(1)));
    let e = err(&format!("{base}interval_ms = 100\ntimeout_ms = 200\n"));
    assert!(e.contains("must not exceed interval_ms"), "{e}");
    let e = err(&format!("{base}kind = \"udp\"\n"));
    assert!(e.contains("needs `send`"), "{e}");
    let e = err(&format!("{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\n[vip.health]\n"));
    assert!(e.contains("health.port is required"), "{e}");
}

/// Values a check could never pass with are refused, not left to fail every probe.
#[test]
fn health_checks_that_could_never_pass_are_refused() {
    let base =
        format!("{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\n[vip.health]\n");
    let e = err(&format!("{base}port = 0\n"));
    assert!(e.starts_with("t.toml:9:8:") && e.contains("health.port must be 1..=65535"), "{e}");
    let e = err(&format!("{base}kind = \"http\"\nexpect_status = 999\n"));
    assert!(e.starts_with("t.toml:10:17:") && e.contains("100..=599"), "{e}");
    let h = parse(&format!("{base}kind = \"http\"\nexpect_status = 204\n")).unwrap().vips[0]
        .health
        .clone()
        .unwrap();
    assert!(matches!(h.kind, CheckKind::Http { expect_status: 204, .. }), "{h:?}");
    // A request the backend could not read as one: a path without its slash, text that would
    // break the request line or add a header.
    for (line, col, text) in [
        ("path = \"healthz\"", 8, "health.path must be a path"),
        ("path = \"/a b\"", 8, "health.path must be a path"),
        ("host = \"x\\r\\nX-Evil: 1\"", 8, "health.host must be a host name"),
    ] {
        let e = err(&format!("{base}kind = \"http\"\n{line}\n"));
        assert!(e.starts_with(&format!("t.toml:10:{col}:")) && e.contains(text), "{e}");
    }
}

/// Backend fields that would be dropped or never work are refused where they are written.
#[test]
fn backend_fields_are_checked_where_they_apply() {
    let l7 = |backends: &str, route: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{backends}]\n[[vip.route]]\npath_prefix = \"/api/\"\nbackends = [{route}]\n"
        )
    };
    let ok = r#"{ address = "198.18.0.11" }"#;
    assert!(parse(&l7(ok, ok)).is_ok());
    let e = err(&l7(r#"{ address = "198.18.0.11", port = 0 }"#, ok));
    assert!(e.starts_with("t.toml:9:47:") && e.contains("port must be 1..=65535"), "{e}");
    let e = err(&l7(ok, r#"{ address = "198.18.0.12", port = 0 }"#));
    assert!(e.starts_with("t.toml:12:47:") && e.contains("port must be 1..=65535"), "{e}");
    let e = err(&l7(r#"{ address = "198.18.0.11", mac = "02:00:00:00:00:01" }"#, ok));
    assert!(e.starts_with("t.toml:9:46:") && e.contains("not to l7"), "{e}");
    let e = err(&l7(ok, r#"{ address = "198.18.0.12", mac = "02:00:00:00:00:01" }"#));
    assert!(e.starts_with("t.toml:12:46:") && e.contains("not to l7"), "{e}");
    let e = err(&l7(ok, r#"{ address = "198.18.0.12", weight = 20000 }"#));
    assert!(e.starts_with("t.toml:12:49:") && e.contains("0..=10000"), "{e}");
    let twice = r#"{ address = "198.18.0.12" }, { address = "198.18.0.12", port = 80 }"#;
    let e = err(&l7(ok, twice));
    assert!(e.contains("198.18.0.12:80 is listed twice in this route"), "{e}");
    // The same address on two ports is two backends.
    assert!(
        parse(&l7(ok, r#"{ address = "198.18.0.12" }, { address = "198.18.0.12", port = 81 }"#))
            .is_ok()
    );
    let e = err(&format!(
        "{NODE}gateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{{ address = \"198.18.0.11\", port = 8080 }}]\n"
    ));
    assert!(e.contains("keeps the client's destination port"), "{e}");
}

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("ab\ncd", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
}

/// Backends are entries per VIP: one address may have another next-hop MAC in another VIP, and
/// the limit counts entries, not addresses.
#[test]
fn backend_entries_are_per_vip() {
    let b = |mac: &str| format!("backends = [{{ address = \"198.18.0.11\", mac = \"{mac}\" }}]\n");
    let c = parse(&format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\n{}[[vip]]\nname = \"b\"\naddress = \"198.18.1.2\"\n{}",
        b("02:00:00:00:00:01"),
        b("02:00:00:00:00:02")
    ))
    .expect("valid");
    assert_eq!(c.vips[1].backends[0].mac, Some([2, 0, 0, 0, 0, 2]));
    // 2 × 2100 entries of the same 2100 addresses: over the limit of 4096.
    let pool: String = (0..2100)
        .map(|i| format!("{{ address = \"198.18.{}.{}\" }},", 2 + i / 250, 1 + i % 250))
        .collect();
    let vip = |name: &str, port: u16| {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"198.18.1.1\"\nport = {port}\nbackends = [{pool}]\n"
        )
    };
    let node = format!("{NODE}gateway_mac = \"02:00:00:00:00:fe\"\n");
    let text = format!("{node}{}{}", vip("http", 80), vip("https", 443));
    let e = err(&text);
    assert!(e.contains("4200 backend entries"), "{e}");
    // At entry 4097: the second VIP's backend 1997 (index 1996), 198.18.9.247.
    assert!(e.starts_with(&at_last(&text, "\"198.18.9.247\"")) && e.contains("entry 4097"), "{e}");
}

/// Damaged config files (bytes replaced, inserted, cut; lines repeated or dropped) never panic
/// the parser: each is accepted or refused with a `file:line:column: message` error whose line
/// and column lie inside the file.
#[test]
fn damaged_files_are_refused_with_a_location_never_a_panic() {
    // A fixed seed, so a failure reproduces; FUZZ_SEED=<n> explores others.
    let mut seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0ff_ee00_0001u64)
        .max(1);
    let mut rnd = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let alphabet = b"\"'[]{}=,.:/-_ \n\t#0123456789abcdefxyz\\";
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..3000 {
        let mut text: Vec<u8> = EXAMPLE.as_bytes().to_vec();
        for _ in 0..1 + rnd(4) {
            let at = rnd(text.len() + 1);
            match rnd(6) {
                0 if at < text.len() => text[at] = alphabet[rnd(alphabet.len())],
                1 => text.insert(at, alphabet[rnd(alphabet.len())]),
                2 if at < text.len() => {
                    let n = (1 + rnd(8)).min(text.len() - at);
                    text.drain(at..at + n);
                }
                3 | 4 => {
                    // A whole line repeated or dropped (duplicate keys, missing ones).
                    let start = text[..at].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                    let end = text[at..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(text.len(), |i| at + i + 1);
                    let line = text[start..end].to_vec();
                    if rnd(2) == 0 {
                        text.splice(start..start, line);
                    } else {
                        text.drain(start..end);
                    }
                }
                _ => text.truncate(at),
            }
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        let lines = text.lines().count().max(1);
        match std::panic::catch_unwind(|| parse(&text)) {
            Err(_) => panic!("case {case}: the parser panicked on:\n{text}"),
            Ok(Ok(_)) => accepted += 1,
            Ok(Err(e)) => {
                refused += 1;
                let e = e.to_string();
                let mut parts = e.splitn(4, ':');
                let (file, line, col) = (parts.next(), parts.next(), parts.next());
                let line: usize = line.and_then(|l| l.parse().ok()).unwrap_or(0);
                let col: usize = col.and_then(|c| c.parse().ok()).unwrap_or(0);
                assert!(
                    file == Some("t.toml") && (1..=lines + 1).contains(&line) && col >= 1,
                    "case {case}: {e}\n{text}"
                );
            }
        }
    }
    assert!(accepted > 100 && refused > 1000, "accepted {accepted}, refused {refused}");
}

/// `t.toml:line:column:` of the first `needle` in `text`: where an error about it points.
fn at(text: &str, needle: &str) -> String {
    let offset = text.find(needle).unwrap_or_else(|| panic!("`{needle}` not in:\n{text}"));
    let (line, column) = line_col(text, offset);
    format!("t.toml:{line}:{column}:")
}

/// `t.toml:line:column:` of the last `needle` in `text`.
fn at_last(text: &str, needle: &str) -> String {
    let offset = text.rfind(needle).unwrap_or_else(|| panic!("`{needle}` not in:\n{text}"));
    let (line, column) = line_col(text, offset);
    format!("t.toml:{line}:{column}:")
}

/// Refused at (the first) `needle`, with a message containing `says`.
#[track_caller]
fn refused_at(text: &str, needle: &str, says: &str) {
    let e = err(text);
    assert!(
        e.starts_with(&at(text, needle)) && e.contains(says),
        "want {needle:?} / {says:?}: {e}"
    );
}

/// Refused at the last `needle`, with a message containing `says`.
#[track_caller]
fn refused_at_last(text: &str, needle: &str, says: &str) {
    let e = err(text);
    assert!(
        e.starts_with(&at_last(text, needle)) && e.contains(says),
        "want {needle:?} / {says:?}: {e}"
    );
}

/// An XDP VIP (IPv4 backends, a gateway MAC) with the given extra VIP lines and backends.
fn xdp_vip(address: &str, extra: &str, backends: &str) -> String {
    format!(
        "{NODE}encap_source_v6 = \"2001:2:0:ff::/96\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"a\"\naddress = \"{address}\"\nport = 80\n{extra}\nbackends = [{backends}]\n"
    )
}

/// An L7 VIP on `address`:8080 with the given backends, `[vip.l7]` lines and routes.
fn l7_vip(address: &str, backends: &str, l7: &str, routes: &str) -> String {
    format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"{address}\"\nport = 8080\nforwarding = \"l7\"\nbackends = [{backends}]\n[vip.l7]\n{l7}\n{routes}"
    )
}

/// IPv6 forms that parse but cannot be used are refused where they are written: IPv4-mapped
/// addresses (an IPv6 VIP IPv4 packets never match, encapsulation to an address nothing routes)
/// and link-local ones (no interface to reach them through), for VIPs, backends, route backends
/// and the encapsulation source.
#[test]
fn unusable_ipv6_forms_are_refused() {
    let t = xdp_vip("::ffff:198.18.1.1", "", r#"{ address = "198.18.0.11" }"#);
    refused_at(&t, "\"::ffff:198.18.1.1\"", "write the IPv4 address 198.18.1.1");
    let t = xdp_vip("198.18.1.1", "", r#"{ address = "::ffff:198.18.2.1" }"#);
    refused_at(&t, "\"::ffff:198.18.2.1\"", "write the IPv4 address 198.18.2.1");
    let t = xdp_vip("198.18.1.1", "", r#"{ address = "fe80::2" }"#);
    refused_at(&t, "\"fe80::2\"", "link-local");
    let t = l7_vip("fe80::1", r#"{ address = "127.0.0.1" }"#, "", "");
    refused_at(&t, "\"fe80::1\"", "link-local");
    let route =
        "[[vip.route]]\npath_prefix = \"/a/\"\nbackends = [{ address = \"::ffff:127.0.0.2\" }]\n";
    let t = l7_vip("127.0.0.1", r#"{ address = "127.0.0.2" }"#, "", route);
    refused_at(&t, "\"::ffff:127.0.0.2\"", "write the IPv4 address 127.0.0.2");
    // IPv4-compatible addresses (::/96 but :: and ::1), deprecated, as the mapped ones.
    let t = xdp_vip("::198.18.1.1", "", r#"{ address = "2001:2::11" }"#);
    refused_at(&t, "\"::198.18.1.1\"", "IPv4-compatible IPv6 address");
    assert!(err(&t).contains("write the IPv4 address 198.18.1.1"), "{}", err(&t));
    let t = xdp_vip("198.18.1.1", "", r#"{ address = "::198.18.2.1" }"#);
    refused_at(&t, "\"::198.18.2.1\"", "write the IPv4 address 198.18.2.1");
    let route =
        "[[vip.route]]\npath_prefix = \"/a/\"\nbackends = [{ address = \"::127.0.0.2\" }]\n";
    let t = l7_vip("::1", r#"{ address = "127.0.0.2" }"#, "", route);
    refused_at(&t, "\"::127.0.0.2\"", "IPv4-compatible");
    // :: and ::1 keep their own rules: the unspecified address, loopback for the proxy.
    refused_at(&xdp_vip("::", "", r#"{ address = "2001:2::11" }"#), "\"::\"", "unspecified");
    parse(&l7_vip("::1", r#"{ address = "::1", port = 9000 }"#, "", "")).unwrap();
    for prefix in ["::ffff:0:0/96", "fe80::/96", "::1/96", "ff02::/96", "::/96", "::198.19.0.0/96"]
    {
        let t = xdp_vip("198.18.1.1", "", r#"{ address = "198.18.0.11" }"#)
            .replace("2001:2:0:ff::/96", prefix);
        refused_at(&t, &format!("\"{prefix}\""), "not a source backends take packets from");
    }
    // Global and unique-local IPv6 addresses are fine.
    parse(&xdp_vip("2001:2::1", "", r#"{ address = "2001:2::11" }, { address = "fd00::11" }"#))
        .unwrap();
}

/// An address written another common way (in brackets, with a zone id, with a port) is refused
/// saying what to write instead, where its port goes depending on whose address it is.
#[test]
fn misspelt_addresses_say_what_to_write() {
    let v4 = r#"{ address = "198.18.0.11" }"#;
    let t = xdp_vip("[2001:2::1]", "", r#"{ address = "2001:2::11" }"#);
    refused_at(
        &t,
        "\"[2001:2::1]\"",
        "(VIP address): write the IPv6 address without brackets: \"2001:2::1\"",
    );
    let t = xdp_vip("fe80::1%lo", "", v4);
    refused_at(
        &t,
        "\"fe80::1%lo\"",
        "zone ids (`%lo`) are not taken, and fe80::1 is a link-local address",
    );
    assert!(err(&t).ends_with("write a global or unique-local (fd00::/8) address"), "{}", err(&t));
    let t = xdp_vip("2001:2::1%eth0", "", r#"{ address = "2001:2::11" }"#);
    refused_at(
        &t,
        "\"2001:2::1%eth0\"",
        "zone ids (`%eth0`) are not taken, and 2001:2::1 is reached without one: write \"2001:2::1\"",
    );
    let t = xdp_vip("198.18.1.1:8080", "", v4);
    refused_at(
        &t,
        "\"198.18.1.1:8080\"",
        "the port is the VIP's own key: write address = \"198.18.1.1\" and port = 8080",
    );
    let t = xdp_vip("[2001:2::1]:8080", "", r#"{ address = "2001:2::11" }"#);
    refused_at(&t, "\"[2001:2::1]:8080\"", "write address = \"2001:2::1\" and port = 8080");
    // A zone id inside the brackets, with a port: both said.
    let t = xdp_vip("[2001:2::1%eth0]:8080", "", r#"{ address = "2001:2::11" }"#);
    refused_at(
        &t,
        "\"[2001:2::1%eth0]:8080\"",
        "zone ids (`%eth0`) are not taken, and 2001:2::1 is reached without one: write \"2001:2::1\"; the port is the VIP's own key: write address = \"2001:2::1\" and port = 8080",
    );
    let t = xdp_vip("198.18.1.1", "", r#"{ address = "[fe80::2%eth0]:80" }"#);
    refused_at(
        &t,
        "\"[fe80::2%eth0]:80\"",
        "zone ids (`%eth0`) are not taken, and fe80::2 is a link-local address",
    );
    // A backend XDP forwards to takes no port at all.
    let t = xdp_vip("198.18.1.1", "", r#"{ address = "198.18.0.11:8080" }"#);
    refused_at(
        &t,
        "\"198.18.0.11:8080\"",
        "(backend address): XDP forwarding keeps the client's destination port, so its backends take none: write address = \"198.18.0.11\"",
    );
    let t = xdp_vip("198.18.1.1", "", r#"{ address = "[fe80::2]:80" }"#);
    refused_at(&t, "\"[fe80::2]:80\"", "(backend address): fe80::2 is a link-local address");
    let t = xdp_vip("2001:2::1", "", r#"{ address = "[2001:2::11]" }"#);
    refused_at(&t, "\"[2001:2::11]\"", "write the IPv6 address without brackets: \"2001:2::11\"");
    // An l7 backend's, a route's included, goes in the backend's `port`.
    let t = l7_vip("198.18.1.1", r#"{ address = "198.18.0.11:8080" }"#, "", "");
    refused_at(&t, "\"198.18.0.11:8080\"", "write { address = \"198.18.0.11\", port = 8080 }");
    let route = "[[vip.route]]\npath_prefix = \"/a/\"\nbackends = [{ address = \"[2001:db8::11]:8080\" }]\n";
    let t = l7_vip("198.18.1.1", v4, "", route);
    refused_at(&t, "\"[2001:db8::11]:8080\"", "write { address = \"2001:db8::11\", port = 8080 }");
    // A port written with an IPv4-mapped address is said where it goes too: without it a VIP
    // takes every port, an l7 backend its VIP's.
    let t = xdp_vip("[::ffff:198.18.0.10]:80", "", v4);
    refused_at(
        &t,
        "\"[::ffff:198.18.0.10]:80\"",
        "write the IPv4 address 198.18.0.10; the port is the VIP's own key: write address = \"198.18.0.10\" and port = 80",
    );
    let t = l7_vip("198.18.1.1", r#"{ address = "[::ffff:198.18.0.10]:80" }"#, "", "");
    refused_at(
        &t,
        "\"[::ffff:198.18.0.10]:80\"",
        "write the IPv4 address 198.18.0.10; the port is the backend's own key: write { address = \"198.18.0.10\", port = 80 }",
    );
    // The address advised is one the checks after take: one they refuse says that instead.
    for (vip, says) in [
        ("0.0.0.0:80", "0.0.0.0 is the unspecified address: a VIP is one unicast address"),
        ("[::]:80", ":: is the unspecified address"),
        ("[::1]:80", "::1 is a loopback address, which no packet on the wire is sent to"),
        ("[ff02::1]", "ff02::1 is a multicast address"),
        (
            "[::ffff:127.0.0.1]:80",
            "::ffff:127.0.0.1 is an IPv4-mapped IPv6 address, which never appears on the wire, and the IPv4 address it stands for is refused too: 127.0.0.1 is a loopback address",
        ),
        (
            "::ffff:127.0.0.1",
            "::ffff:127.0.0.1 is an IPv4-mapped IPv6 address, which never appears on the wire, and the IPv4 address it stands for is refused too: 127.0.0.1 is a loopback address",
        ),
    ] {
        let t = xdp_vip(vip, "", v4);
        refused_at(&t, &format!("\"{vip}\""), says);
        assert!(!err(&t).contains("write address ="), "{}", err(&t));
    }
    let t = xdp_vip("198.18.1.1", "", r#"{ address = "127.0.0.1:80" }"#);
    refused_at(&t, "\"127.0.0.1:80\"", "(backend address): 127.0.0.1 is a loopback address");
    let t = l7_vip("198.18.1.1", r#"{ address = "0.0.0.0:80" }"#, "", "");
    refused_at(&t, "\"0.0.0.0:80\"", "0.0.0.0 is the unspecified address");
    // Loopback suits an l7 VIP and its backends: the port advice stands.
    let t = l7_vip("[::1]:8080", r#"{ address = "[::1]:9000" }"#, "", "");
    refused_at(&t, "\"[::1]:8080\"", "write address = \"::1\" and port = 8080");
    let t = l7_vip("::1", r#"{ address = "[::1]:9000" }"#, "", "");
    refused_at(&t, "\"[::1]:9000\"", "write { address = \"::1\", port = 9000 }");
    // Anything else is only not an address.
    for other in ["web.example", "[198.18.0.11]", "198.18.0.11%eth0", "[198.18.0.11%eth0]:80"] {
        let t = xdp_vip("198.18.1.1", "", &format!("{{ address = \"{other}\" }}"));
        let e = err(&t);
        assert!(e.ends_with(&format!("`{other}` is not an IP address (backend address)")), "{e}");
    }
}

/// A backend at the VIP's own address: XDP would send the VIP's flows back to the VIP, an L7
/// proxy at its own listen address and port would connect to itself.
#[test]
fn a_backend_that_is_the_vip_itself_is_refused() {
    let t = xdp_vip("198.18.1.1", "", r#"{ address = "198.18.0.11" }, { address = "198.18.1.1" }"#);
    refused_at(&t, "\"198.18.1.1\" }", "the VIP's own address");
    let t = xdp_vip("2001:2::1", "", r#"{ address = "2001:2::1" }"#);
    refused_at(&t, "\"2001:2::1\" }", "the VIP's own address");
    parse(&xdp_vip("198.18.1.1", "", r#"{ address = "198.18.1.2" }"#)).unwrap();

    // L7: the same address and port (given, or the VIP's by default).
    for own in [r#"{ address = "127.0.0.1", port = 8080 }"#, r#"{ address = "127.0.0.1" }"#] {
        let t = l7_vip("127.0.0.1", own, "", "");
        refused_at_last(&t, "\"127.0.0.1\"", "127.0.0.1:8080 is the VIP's own listen address");
    }
    let route = "[[vip.route]]\npath_prefix = \"/a/\"\nbackends = [{ address = \"127.0.0.1\" }]\n";
    let t = l7_vip("127.0.0.1", r#"{ address = "127.0.0.1", port = 8081 }"#, "", route);
    refused_at_last(&t, "\"127.0.0.1\"", "connect to itself in a loop");
    // Another port of the same address is another server.
    let cfg =
        parse(&l7_vip("127.0.0.1", r#"{ address = "127.0.0.1", port = 8081 }"#, "", "")).unwrap();
    assert_eq!(cfg.vips[0].backends[0].port, 8081);
}

/// An L7 VIP whose backend is another L7 VIP's listen address chains the two (front → inner →
/// real backend), which is fine; VIPs that come back round loop, each connection opening
/// another. A loop is refused at the backend of the VIP of the loop first in the file, naming
/// the VIPs in order, whichever way round the file writes them; in routes too.
#[test]
fn l7_vips_that_proxy_to_each_other_in_a_loop_are_refused() {
    let vip = |name: &str, address: &str, port: u16, backend: &str, routes: &str| {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\nforwarding = \"l7\"\nbackends = [{backend}]\n[vip.l7]\n{routes}"
        )
    };
    let to = |port: u16| format!("{{ address = \"127.0.0.1\", port = {port} }}");
    let real = r#"{ address = "127.0.0.2", port = 80 }"#;
    // A chain: front → inner → a real backend, whichever is written first.
    let front = vip("front", "127.0.0.1", 28080, &to(28081), "");
    let inner = vip("inner", "127.0.0.1", 28081, real, "");
    for t in [format!("{NODE}{front}{inner}"), format!("{NODE}{inner}{front}")] {
        let c = parse(&t).unwrap();
        assert_eq!(c.vips.iter().find(|v| v.name == "front").unwrap().backends[0].port, 28081);
    }
    // Two VIPs that proxy to each other.
    let a = vip("a", "127.0.0.1", 20080, &to(20090), "");
    let b = vip("b", "127.0.0.1", 20090, &to(20080), "");
    for t in [format!("{NODE}{a}{b}"), format!("{NODE}{b}{a}")] {
        let first = if t.find("name = \"a\"") < t.find("name = \"b\"") { "a" } else { "b" };
        let (from, next, port) = if first == "a" { ("a", "b", 20090) } else { ("b", "a", 20080) };
        refused_at(
            &t,
            &format!("\"127.0.0.1\", port = {port}"),
            &format!(
                "{from} → {next} → {from}: backend 127.0.0.1:{port} of VIP `{from}` is the listen address of L7 VIP `{next}`"
            ),
        );
    }
    // Three, the loop closed by the last; and a VIP outside the loop leading into it.
    let x = vip("x", "127.0.0.1", 20100, &to(20110), "");
    let y = vip("y", "127.0.0.1", 20110, &to(20120), "");
    let z = vip("z", "127.0.0.1", 20120, &to(20100), "");
    let w = vip("w", "127.0.0.1", 20130, &to(20110), "");
    refused_at(&format!("{NODE}{x}{w}{y}{z}"), "\"127.0.0.1\", port = 20110", "x → y → z → x");
    // Met from `w` at `y`, named from `z`, the first of the loop in the file.
    refused_at(&format!("{NODE}{w}{z}{x}{y}"), "\"127.0.0.1\", port = 20100", "z → x → y → z");
    // A route's pool, and IPv6.
    let route = |port: u16| {
        format!(
            "[[vip.route]]\npath_prefix = \"/a/\"\nbackends = [{{ address = \"::1\", port = {port} }}]\n"
        )
    };
    let a6 = vip("a", "::1", 20080, real, &route(20090));
    let b6 = vip("b", "::1", 20090, r#"{ address = "::1", port = 20080 }"#, "");
    refused_at(&format!("{NODE}{a6}{b6}"), "\"::1\", port = 20090", "a → b → a");
    // The route leading into a VIP that leads on to a real backend: a chain.
    let b6 = vip("b", "::1", 20090, real, "");
    parse(&format!("{NODE}{a6}{b6}")).unwrap();
    // Its own listen address is refused as before.
    let own = vip("a", "127.0.0.1", 20080, &to(20080), "");
    refused_at(
        &format!("{NODE}{own}"),
        "\"127.0.0.1\", port = 20080 }",
        "the VIP's own listen address",
    );
    // Another address or port of this node is another server.
    let b2 = vip("b", "127.0.0.2", 20090, &to(20080), "");
    parse(&format!("{NODE}{a}{b2}")).unwrap();
    // An XDP VIP's address is no proxy's listener.
    let xdp = "[[vip]]\nname = \"x\"\naddress = \"198.18.1.1\"\nport = 20090\nbackends = [{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }]\n";
    let a_x = vip("a", "127.0.0.1", 20080, r#"{ address = "198.18.1.1", port = 20090 }"#, "");
    parse(&format!("{NODE}{a_x}{xdp}")).unwrap();
}

/// Addresses no traffic can be sent to are refused as VIPs and backends; loopback backends only
/// where XDP would encapsulate to them.
#[test]
fn addresses_that_can_never_work_are_refused() {
    let ok = r#"{ address = "198.18.0.11" }"#;
    for vip in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
        let t = xdp_vip(vip, "", ok);
        let e = err(&t);
        assert!(
            e.starts_with(&at(&t, &format!("\"{vip}\""))) && e.contains("a VIP is one unicast"),
            "{e}"
        );
        let t = l7_vip(vip, r#"{ address = "127.0.0.1", port = 8081 }"#, "", "");
        assert!(err(&t).contains(&format!("VIP address {vip} is")), "{vip}");
    }
    for (backend, says) in [
        ("0.0.0.0", "the unspecified address"),
        ("239.1.2.3", "a multicast address"),
        ("255.255.255.255", "the broadcast address"),
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.2", "an IPv4-mapped IPv6 address"),
    ] {
        let t = xdp_vip("198.18.1.1", "", &format!("{{ address = \"{backend}\" }}"));
        refused_at(&t, &format!("\"{backend}\" }}"), says);
    }
    // The proxy connects to loopback backends (tests do), not to the unspecified address.
    let t = l7_vip("198.18.1.6", r#"{ address = "0.0.0.0" }"#, "", "");
    refused_at(&t, "\"0.0.0.0\"", "the unspecified address");
    let route = "[[vip.route]]\nhost = \"a.example\"\nbackends = [{ address = \"ff02::1\" }]\n";
    refused_at(&l7_vip("198.18.1.6", ok, "", route), "\"ff02::1\"", "a multicast address");
    parse(&l7_vip("198.18.1.6", r#"{ address = "127.0.0.1" }, { address = "::1" }"#, "", ""))
        .unwrap();
    // Benchmarking and documentation ranges stay ordinary addresses.
    let cfg = parse(&xdp_vip(
        "198.18.0.1",
        "",
        r#"{ address = "198.19.255.254" }, { address = "2001:db8::11" }"#,
    ))
    .unwrap();
    assert_eq!(cfg.vips[0].backends.len(), 2);
}

/// A ring with fewer slots than backends leaves some with none.
#[test]
fn ring_size_must_cover_the_backends() {
    let five: Vec<String> = (11..16).map(|i| format!("{{ address = \"198.18.0.{i}\" }}")).collect();
    let five = five.join(", ");
    let t = xdp_vip("198.18.1.1", "ring_size = 3", &five);
    refused_at(&t, "3\n", "smaller than this VIP's 5 backends");
    assert!(err(&t).contains("e.g. ring_size = 503"), "{}", err(&t));
    for ok in [5, 7, 503] {
        let cfg = parse(&xdp_vip("198.18.1.1", &format!("ring_size = {ok}"), &five)).unwrap();
        assert_eq!(cfg.vips[0].ring_size, ok);
    }
    // Still a prime.
    refused_at(&xdp_vip("198.18.1.1", "ring_size = 9", &five), "9\n", "must be a prime");
    assert_eq!(ring_size_for(1), 101);
    assert_eq!(ring_size_for(4096), MAX_RING_SIZE);
}

/// Keys of another kind of probe would be ignored: refused where they are written.
#[test]
fn health_keys_of_another_kind_are_refused() {
    let base = |kind: &str, key: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\n[vip.health]\n{kind}\n{key}\n"
        )
    };
    for (kind, key, says) in [
        ("kind = \"tcp\"", "path = \"/healthz\"", "`path` applies only to kind = \"http\""),
        ("kind = \"tcp\"", "host = \"a.example\"", "`host` applies only to kind = \"http\""),
        ("kind = \"tcp\"", "expect_status = 204", "`expect_status` applies only"),
        ("", "expect_body = \"ok\"", "this check is kind = \"tcp\" (the default for a TCP VIP)"),
        ("kind = \"tcp\"", "send = \"ping\"", "`send` applies only to kind = \"udp\""),
        ("kind = \"http\"", "expect = \"pong\"", "`expect` applies only to kind = \"udp\""),
        ("kind = \"udp\"\nsend = \"x\"", "path = \"/\"", "`path` applies only to kind = \"http\""),
    ] {
        let t = base(kind, key);
        let value = key.split(" = ").nth(1).unwrap();
        let e = err(&t);
        assert!(e.contains(says) && e.contains("remove it"), "{key}: {e}");
        let (line, col) = line_col(&t, t.rfind(value).unwrap());
        assert!(e.starts_with(&format!("t.toml:{line}:{col}:")), "{key}: {e}");
    }
    // Each kind's own keys.
    parse(&base(
        "kind = \"http\"",
        "path = \"/healthz\"\nhost = \"a.example\"\nexpect_status = 204\nexpect_body = \"ok\"",
    ))
    .unwrap();
    parse(&base("kind = \"udp\"", "send = \"ping\"\nexpect = \"pong\"\nport = 5353")).unwrap();
}

/// A TCP relay reads no HTTP: settings of the HTTP proxy are refused in mode = "tcp".
#[test]
fn http_only_l7_keys_are_refused_in_tcp_mode() {
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    for line in [
        "header_timeout_ms = 5000",
        "response_timeout_ms = 5000",
        "request_timeout_ms = 5000",
        "max_header_bytes = 4096",
        "max_headers = 10",
        "upstream_keepalive = 0",
        "forwarded_for = false",
        "normalize_path = false",
        "access_log = true",
        "cookie_name = \"s\"",
        "cookie_secret = \"0123456789abcdef\"",
        "cookie_attributes = \"Secure\"",
    ] {
        let t = l7_vip("198.18.1.6", b, &format!("mode = \"tcp\"\n{line}"), "");
        let (key, value) = line.split_once(" = ").unwrap();
        refused_at_last(
            &t,
            &format!("{value}\n"),
            &format!("`{key}` applies only to mode = \"http\""),
        );
        // The same key in HTTP mode is fine.
        parse(&l7_vip("198.18.1.6", b, line, "")).unwrap();
    }
    // The previous secret, which needs the current one.
    let both =
        "cookie_secret = \"0123456789abcdef\"\ncookie_secret_previous = \"fedcba9876543210\"";
    let t = l7_vip("198.18.1.6", b, &format!("mode = \"tcp\"\n{both}"), "");
    refused_at(&t, "\"0123", "`cookie_secret` applies only to mode = \"http\"");
    let t = l7_vip(
        "198.18.1.6",
        b,
        "mode = \"tcp\"\ncookie_secret_previous = \"fedcba9876543210\"",
        "",
    );
    refused_at(&t, "\"fedc", "`cookie_secret_previous` applies only to mode = \"http\"");
    parse(&l7_vip("198.18.1.6", b, both, "")).unwrap();
    let route = "[[vip.route]]\nhost = \"a.example\"\nbackends = [{ address = \"198.18.0.12\" }]\n";
    let t = l7_vip("198.18.1.6", b, "mode = \"tcp\"", route);
    refused_at(&t, "[[vip.route]]", "[[vip.route]] applies only to mode = \"http\"");
    // What the relay does use.
    let cfg = parse(&l7_vip(
        "198.18.1.6",
        b,
        "mode = \"tcp\"\nalgorithm = \"least_conn\"\nretries = 1\nconnect_timeout_ms = 500\nidle_timeout_ms = 1000\ntunnel_timeout_ms = 7200000\nmax_connections = 10\nproxy_protocol = 2\nmax_fails = 2\nfail_timeout_ms = 500",
        "",
    ))
    .unwrap();
    let l7 = cfg.vips[0].l7.as_ref().unwrap();
    assert_eq!(l7.mode, L7Mode::Tcp);
    assert_eq!(l7.tunnel_timeout, Duration::from_secs(7200));
}

/// `tunnel_timeout_ms`, the silence a TCP-mode or upgraded connection may keep: ten minutes
/// unless the idle timeout is longer (a file that raised `idle_timeout_ms` for its WebSockets,
/// when that was the tunnels' timeout too, keeps what it had), any value of its range in either
/// mode when written, and out of its range refused at the value, naming the key and its bounds.
#[test]
fn tunnel_timeout_defaults_to_ten_minutes_or_the_idle_timeout_and_is_bounded() {
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    let tunnel = |l7: &str| {
        let cfg = parse(&l7_vip("198.18.1.6", b, l7, "")).unwrap_or_else(|e| panic!("{l7}: {e}"));
        cfg.vips[0].l7.as_ref().unwrap().tunnel_timeout
    };
    let minutes = |m: u64| Duration::from_secs(m * 60);
    for mode in ["mode = \"http\"\n", "mode = \"tcp\"\n"] {
        assert_eq!(tunnel(mode), minutes(10), "{mode}unset");
        // Written in TCP mode, which has no other use for it, the idle timeout is the tunnels'
        // (as it was before `tunnel_timeout_ms`); in HTTP mode, shorter than ten minutes, it is
        // no floor.
        let short = if mode.contains("tcp") { Duration::from_millis(1000) } else { minutes(10) };
        assert_eq!(tunnel(&format!("{mode}idle_timeout_ms = 1000")), short, "{mode}");
        assert_eq!(tunnel(&format!("{mode}idle_timeout_ms = 600000")), minutes(10));
        assert_eq!(tunnel(&format!("{mode}idle_timeout_ms = 900000")), minutes(15));
        assert_eq!(tunnel(&format!("{mode}idle_timeout_ms = 3600000")), minutes(60));
        // Written, it holds whatever the idle timeout, shorter or longer.
        let both =
            |idle: u64, t: u64| format!("{mode}idle_timeout_ms = {idle}\ntunnel_timeout_ms = {t}");
        assert_eq!(tunnel(&both(3_600_000, 300)), Duration::from_millis(300));
        assert_eq!(tunnel(&both(300, 86_400_000)), Duration::from_secs(86_400));
        assert_eq!(tunnel(&both(300, 1)), Duration::from_millis(1));
        // The idle timeout keeps its own value.
        let cfg = parse(&l7_vip("198.18.1.6", b, &both(300, 5000), "")).unwrap();
        assert_eq!(cfg.vips[0].l7.as_ref().unwrap().idle_timeout, Duration::from_millis(300));
        for past in ["0", "86400001"] {
            let t = l7_vip("198.18.1.6", b, &format!("{mode}tunnel_timeout_ms = {past}"), "");
            // At the value, the last line of the file.
            refused_at_last(&t, &format!("{past}\n"), "tunnel_timeout_ms must be 1..=86400000");
        }
    }
}

/// The cookie name goes into `Set-Cookie` as it is.
#[test]
fn cookie_name_must_be_a_token() {
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    let l7 = |name: &str| {
        format!(
            "algorithm = \"cookie\"\ncookie_secret = \"0123456789abcdef\"\ncookie_name = \"{name}\""
        )
    };
    for bad in
        ["", "a b", "a;b", "a=b", "a,b", "a\\\"b", "a\\r\\nSet-Cookie: x", "é", "a(b)", "a/b"]
    {
        let t = l7_vip("198.18.1.6", b, &l7(bad), "");
        refused_at(&t, &format!("\"{bad}\"\n"), "must be a cookie name token");
    }
    for good in ["edgelb_sticky", "SID", "a-b.c~!#$%&'*+^`|"] {
        let cfg = parse(&l7_vip("198.18.1.6", b, &l7(good), "")).unwrap();
        assert_eq!(cfg.vips[0].l7.as_ref().unwrap().cookie_name, good);
    }
}

/// `cookie_attributes` goes into every `Set-Cookie` after `Path` and `HttpOnly`: only the
/// attributes a sticky cookie may carry, each once and well formed, are taken, written in their
/// usual spelling; what the proxy sets itself, what browsers would ignore or drop the cookie
/// for, and anything else is refused at the value, saying what to write.
#[test]
fn cookie_attributes_are_checked_and_written_out() {
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    let l7 = |attributes: &str| {
        format!(
            "algorithm = \"cookie\"\ncookie_secret = \"0123456789abcdef\"\ncookie_attributes = \"{attributes}\""
        )
    };
    for (bad, says) in [
        ("Path=/", "`Path` is set by the proxy"),
        ("Secure; path=/x", "`Path` is set by the proxy"),
        ("Expires=Wed, 21 Oct 2037 07:28:00 GMT", "write Max-Age=<seconds> instead"),
        ("HttpOnly", "`HttpOnly` is always set"),
        ("Secure; Secure", "`Secure` is given twice"),
        ("Max-Age=60; max-age=70", "`Max-Age` is given twice"),
        ("SameSite=Lax; SameSite=Strict", "`SameSite` is given twice"),
        ("Priority=High", "unknown attribute `Priority`"),
        ("Same Site=Lax", "unknown attribute `Same Site`"),
        ("SameSite=None", "write `Secure; SameSite=None`"),
        ("SameSite=none; Max-Age=60", "write `Secure; SameSite=None`"),
        ("Partitioned", "write `Secure; Partitioned`"),
        ("SameSite=Loose", "SameSite takes Strict, Lax or None"),
        ("SameSite", "SameSite takes Strict, Lax or None"),
        ("Max-Age=-1", "Max-Age takes a whole number of seconds"),
        ("Max-Age=1d", "Max-Age takes a whole number of seconds"),
        ("Max-Age", "Max-Age takes a whole number of seconds"),
        ("Max-Age=0", "Max-Age=0 has browsers drop the cookie at once"),
        ("Max-Age=99999999999999999999", "is too large"),
        ("Domain=", "Domain takes a host name"),
        ("Domain=https://example.com", "Domain takes a host name"),
        ("Domain=example.com:443", "Domain takes a host name"),
        ("Domain=a..example", "Domain takes a host name"),
        ("Secure=1", "`Secure` takes no value"),
        ("Partitioned=yes; Secure", "`Partitioned` takes no value"),
        ("Secure;", "an empty attribute"),
        ("Secure;; HttpOnly", "an empty attribute"),
        ("Secure\\r\\nX-Injected: 1", "unknown attribute"),
    ] {
        let t = l7_vip("198.18.1.6", b, &l7(bad), "");
        refused_at(&t, &format!("\"{bad}\"\n"), says);
    }
    for (good, written) in [
        ("", ""),
        ("Secure", "; Secure"),
        ("Secure; SameSite=None; Max-Age=86400", "; Secure; SameSite=None; Max-Age=86400"),
        ("samesite=none;secure", "; SameSite=None; Secure"),
        ("SameSite=Strict", "; SameSite=Strict"),
        ("SameSite = lax ; Max-Age=007", "; SameSite=Lax; Max-Age=7"),
        ("Domain=Example.com; Secure; Partitioned", "; Domain=Example.com; Secure; Partitioned"),
        ("Domain=.example.com", "; Domain=example.com"),
    ] {
        let cfg = parse(&l7_vip("198.18.1.6", b, &l7(good), "")).unwrap();
        assert_eq!(cfg.vips[0].l7.as_ref().unwrap().cookie_attributes, written, "{good}");
    }
    // Unset: none.
    let cfg = parse(&l7_vip(
        "198.18.1.6",
        b,
        "algorithm = \"cookie\"\ncookie_secret = \"0123456789abcdef\"",
        "",
    ))
    .unwrap();
    assert_eq!(cfg.vips[0].l7.as_ref().unwrap().cookie_attributes, "");
}

/// A cookie name with a `__Secure-` or `__Host-` prefix is kept by browsers only under that
/// prefix's rules; attributes, or a route's cookie path, that break them are refused.
#[test]
fn prefixed_cookie_names_get_the_attributes_their_prefix_needs() {
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    let l7 = |name: &str, attributes: Option<&str>| {
        let attributes =
            attributes.map_or(String::new(), |a| format!("\ncookie_attributes = \"{a}\""));
        format!(
            "algorithm = \"cookie\"\ncookie_secret = \"0123456789abcdef\"\ncookie_name = \"{name}\"{attributes}"
        )
    };
    let t = l7_vip("198.18.1.6", b, &l7("__Secure-lb", None), "");
    refused_at(&t, "\"__Secure-lb\"", "only if it is Secure; add Secure to cookie_attributes");
    let t = l7_vip("198.18.1.6", b, &l7("__host-lb", Some("SameSite=Lax")), "");
    refused_at(&t, "\"SameSite=Lax\"", "only if it is Secure");
    let t = l7_vip("198.18.1.6", b, &l7("__Host-lb", Some("Secure; Domain=example.com")), "");
    refused_at(&t, "\"Secure; Domain", "only without Domain");
    let route = |prefix: &str, algorithm: &str| {
        format!(
            "[[vip.route]]\npath_prefix = \"{prefix}\"\n{algorithm}backends = [{{ address = \"198.18.0.12\" }}]\n"
        )
    };
    let t = l7_vip("198.18.1.6", b, &l7("__Host-lb", Some("Secure")), &route("/api/", ""));
    refused_at(&t, "\"/api/\"", "only with Path=/, and this route's cookie has Path=/api/");
    // Fine: a route whose cookie has Path=/, a route that sets no cookie, `__Secure-` anywhere.
    for (name, attributes, routes) in [
        ("__Host-lb", "Secure", route("/api", "")),
        ("__Host-lb", "Secure; SameSite=None", route("/api/", "algorithm = \"round_robin\"\n")),
        ("__Secure-lb", "Secure; Domain=example.com", route("/api/", "")),
        ("lb", "SameSite=Lax", route("/api/", "")),
    ] {
        parse(&l7_vip("198.18.1.6", b, &l7(name, Some(attributes)), &routes)).unwrap();
    }
}

/// During a secret rotation `cookie_secret_previous` is the other secret of the rotation:
/// as long as one, different from it, and only beside it.
#[test]
fn a_previous_cookie_secret_is_a_second_valid_secret() {
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    let l7 = |secret: Option<&str>, previous: &str| {
        let secret = secret.map_or(String::new(), |s| format!("cookie_secret = \"{s}\"\n"));
        format!("algorithm = \"round_robin\"\n{secret}cookie_secret_previous = \"{previous}\"")
    };
    let t = l7_vip("198.18.1.6", b, &l7(Some("0123456789abcdef"), "fedcba987654321"), "");
    refused_at(&t, "\"fedc", "cookie_secret_previous must be at least 16 bytes (this one has 15)");
    let t = l7_vip("198.18.1.6", b, &l7(Some("0123456789abcdef"), "0123456789abcdef"), "");
    refused_at_last(&t, "\"0123", "cookie_secret_previous is cookie_secret itself");
    let t = l7_vip("198.18.1.6", b, &l7(None, "fedcba9876543210"), "");
    refused_at(&t, "\"fedc", "cookie_secret_previous needs cookie_secret");
    let cfg =
        parse(&l7_vip("198.18.1.6", b, &l7(Some("0123456789abcdef"), "fedcba9876543210"), ""))
            .unwrap();
    let l = cfg.vips[0].l7.as_ref().unwrap();
    assert_eq!(l.cookie_secret_previous.as_deref(), Some("fedcba9876543210"));
    let cfg = parse(&l7_vip("198.18.1.6", b, "cookie_secret = \"0123456789abcdef\"", "")).unwrap();
    assert_eq!(cfg.vips[0].l7.as_ref().unwrap().cookie_secret_previous, None);
}

/// A route host is compared with the request's host without its port; a route that matches
/// everything hides the routes after it.
#[test]
fn route_hosts_are_plain_names_and_every_route_matches_something() {
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    let route = |lines: &str| {
        format!("[[vip.route]]\n{lines}\nbackends = [{{ address = \"198.18.0.12\" }}]\n")
    };
    for (host, write) in [
        ("a.example:8080", Some("write host = \"a.example\"")),
        ("http://a.example/", Some("write host = \"a.example\"")),
        ("https://a.example:443/x", Some("write host = \"a.example\"")),
        ("[2001:db8::1]:80", Some("write host = \"[2001:db8::1]\"")),
        ("2001:db8::1", Some("write host = \"[2001:db8::1]\"")),
        ("a.example/api", Some("write host = \"a.example\"")),
        ("a example", None),
        ("", None),
    ] {
        let t = l7_vip("198.18.1.6", b, "", &route(&format!("host = \"{host}\"")));
        let e = err(&t);
        assert!(
            e.starts_with(&at(&t, &format!("\"{host}\"\n"))) && e.contains("plain host name"),
            "{e}"
        );
        if let Some(w) = write {
            assert!(e.contains(w), "{host}: {e}");
        }
    }
    for good in ["a.example", "API.Example", "198.18.1.6", "[2001:db8::1]", "localhost"] {
        let cfg =
            parse(&l7_vip("198.18.1.6", b, "", &route(&format!("host = \"{good}\"")))).unwrap();
        let r = &cfg.vips[0].l7.as_ref().unwrap().routes[0];
        assert_eq!(r.host.as_deref(), Some(good.to_ascii_lowercase().as_str()));
    }
    let t = l7_vip(
        "198.18.1.6",
        b,
        "",
        &(route("algorithm = \"random\"") + &route("host = \"b.example\"")),
    );
    refused_at(&t, "[[vip.route]]", "put its backends in the VIP's own `backends`");
    parse(&l7_vip("198.18.1.6", b, "", &route("path_prefix = \"/\""))).unwrap();
}

/// The admin commands take a VIP's name or address, names first.
#[test]
fn vip_names_are_not_empty_and_not_addresses() {
    let named = |name: &str| {
        format!("{NODE}[[vip]]\nname = \"{name}\"\naddress = \"198.18.1.1\"\nport = 80\n")
    };
    refused_at(&named(""), "\"\"", "a VIP needs a name");
    for addr in ["198.18.1.2", "198.18.1.2:80", "::1", "[2001:db8::1]:80"] {
        refused_at(&named(addr), &format!("\"{addr}\""), "reads as an address");
    }
    for ok in ["web", "web-198.18.1.2", "1", "v6:web"] {
        assert_eq!(parse(&named(ok)).unwrap().vips[0].name, ok);
    }
}

/// A VIP's name goes as it is into log fields, metric labels and `edgelb status`: one with a
/// control character, a line separator or anything but `[A-Za-z0-9._-]`, or longer than 64
/// bytes, is a caution at the name (shown escaped), not an error, so that a file that ran
/// still starts.
#[test]
fn vip_names_outside_a_safe_set_are_a_caution() {
    let named = |name: &str| {
        format!("{NODE}[[vip]]\nname = \"{name}\"\naddress = \"198.18.1.1\"\nport = 80\n")
    };
    for ok in ["web", "web-1.example_2", &"a".repeat(64)] {
        let c = parse(&named(ok)).unwrap();
        assert!(c.cautions.is_empty(), "{ok}: {:?}", c.cautions);
    }
    for (toml, shown) in [
        ("a\\nb", "a\\nb"),
        ("a\\u001b[31mb", "a\\u{1b}[31mb"),
        ("a\\u2028b", "a\\u{2028}b"),
        ("web 1", "web 1"),
        ("v6:web", "v6:web"),
        ("caf\u{e9}", "caf\u{e9}"),
    ] {
        let text = named(toml);
        let c = parse(&text).unwrap_or_else(|e| panic!("{toml}: {e}"));
        let [caution] = c.cautions.as_slice() else { panic!("{toml}: {:?}", c.cautions) };
        let at = text.find("name = ").unwrap() + "name = ".len();
        let col = at - text[..at].rfind('\n').unwrap();
        let line = text[..at].matches('\n').count() + 1;
        assert!(
            caution.starts_with(&format!("t.toml:{line}:{col}: VIP `{shown}`: its name ")),
            "{caution}"
        );
        assert!(caution.contains("[A-Za-z0-9._-]"), "{caution}");
        assert!(!caution.contains(['\n', '\u{1b}', '\u{2028}']), "{caution:?}");
    }
    let long = "a".repeat(65);
    let c = parse(&named(&long)).unwrap();
    assert!(c.cautions.iter().any(|c| c.contains("65 bytes")), "{:?}", c.cautions);
}

/// A name that reads as an IPv6 address in brackets, `[2001:db8::10]`, is found by that name
/// first by `edgelb route`, which takes the bracketed address of a VIP too: a caution that says
/// so, not an error (such names were accepted before route took brackets, and a file that ran
/// must still start).
#[test]
fn a_vip_name_that_reads_as_a_bracketed_address_is_a_caution() {
    let vip = |name: &str, address: &str| {
        format!("[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = 80\n")
    };
    let text =
        format!("{NODE}{}{}", vip("[2001:db8::10]", "198.18.1.1"), vip("v6", "2001:db8::10"));
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let [caution] = c.cautions.as_slice() else { panic!("{:?}", c.cautions) };
    assert!(
        caution.contains(
            "VIP `[2001:db8::10]`: its name reads as the IPv6 address 2001:db8::10 in brackets: `edgelb route [2001:db8::10]` finds this VIP by its name first"
        ),
        "{caution}"
    );
    assert_eq!(c.find_vip("[2001:db8::10]", None).unwrap().name, "[2001:db8::10]");
    assert_eq!(c.find_vip("2001:db8::10", None).unwrap().name, "v6");
    // Brackets around what is no address are only characters outside the safe set.
    let c = parse(&format!("{NODE}{}", vip("[web]", "198.18.1.1"))).unwrap();
    let [caution] = c.cautions.as_slice() else { panic!("{:?}", c.cautions) };
    assert!(caution.contains("[A-Za-z0-9._-]"), "{caution}");
}

/// The L7 proxy places requests by its own algorithm; its hash pools have a ring of their own.
#[test]
fn ring_size_and_hash_are_refused_on_l7_vips() {
    let t = |extra: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.6\"\nport = 80\nforwarding = \"l7\"\n{extra}\nbackends = [{{ address = \"198.18.0.11\" }}]\n[vip.l7]\nalgorithm = \"hash\"\n"
        )
    };
    refused_at(&t("ring_size = 65537"), "65537", "`ring_size` applies only to VIPs XDP forwards");
    refused_at(&t("hash = \"client\""), "\"client\"", "`hash` applies only to VIPs XDP forwards");
    let cfg = parse(&t("")).unwrap();
    assert_eq!(cfg.vips[0].l7.as_ref().unwrap().algorithm, Algorithm::Hash);
    // Both still apply to XDP VIPs.
    let cfg = parse(&xdp_vip(
        "198.18.1.1",
        "hash = \"5tuple\"\nring_size = 101",
        r#"{ address = "198.18.0.11" }"#,
    ))
    .unwrap();
    assert_eq!((cfg.vips[0].hash, cfg.vips[0].ring_size), (HashMode::FiveTuple, 101));
}

/// Errors about a whole (a missing secret, a limit over all VIPs, a VIP that repeats another's
/// address, port and protocol) point at the value that causes them, not at the top of the file
/// or the `[[vip]]` header.
/// An error at a secret's value does not repeat the value: the controller logs a refused reload's
/// error, and logs go further than the file. The key is named, the value masked.
#[test]
fn hints_do_not_repeat_a_secret() {
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    for (l7, want) in [
        ("cookie_secret = SUPERSECRET", "write cookie_secret = \"<your secret>\""),
        ("cookie_secret = SUPER SECRET", "`cookie_secret = <your secret>` has more than one value"),
        ("cookie_secret_previous = SUPERSECRET", "cookie_secret_previous = \"<your secret>\""),
        (
            "cookie_secret = 12345678901234567",
            "`cookie_secret` = <your secret>: strings need quotes",
        ),
    ] {
        let e = err(&l7_vip("198.18.1.6", b, l7, ""));
        assert!(e.contains(want), "{l7}: {e}");
        assert!(!e.contains("SUPER") && !e.contains("12345678"), "{l7}: {e}");
    }
    // Other keys' values are still said.
    let e = err(&l7_vip("198.18.1.6", b, "cookie_name = SUPER", ""));
    assert!(e.contains("write cookie_name = \"SUPER\""), "{e}");
}

/// A file holding a `cookie_secret` that others may read gets a caution saying so (at the
/// secret, with the mode and the `chmod` to write); one only its owner reads, or one without a
/// secret, none.
#[test]
fn a_secret_in_a_file_others_can_read_is_a_caution() {
    use std::os::unix::fs::PermissionsExt;
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    let with = l7_vip("198.18.1.6", b, "cookie_secret = \"0123456789abcdef\"", "");
    let without = l7_vip("198.18.1.6", b, "", "");
    let dir = std::env::temp_dir().join(format!("edgelb-secret-mode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("edgelb.toml");
    let load = |text: &str, mode: u32| {
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        Config::load(&path).unwrap().cautions
    };
    let line = with.lines().position(|l| l.starts_with("cookie_secret")).unwrap() + 1;
    let shown = load(&with, 0o644);
    let want = format!(
        "{}:{line}:1: VIP `a`: cookie_secret is in a file others may read (mode 0644)",
        path.display()
    );
    assert!(shown.iter().any(|c| c.starts_with(&want) && c.contains("chmod 600")), "{shown:?}");
    assert!(load(&with, 0o640).iter().any(|c| c.contains("(mode 0640)")));
    assert_eq!(load(&with, 0o600), Vec::<String>::new());
    assert_eq!(load(&without, 0o644), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_point_at_their_cause_not_at_the_top() {
    let b = r#"{ address = "198.18.0.11", port = 80 }"#;
    let t = l7_vip("198.18.1.6", b, "algorithm = \"cookie\"", "");
    refused_at(&t, "\"cookie\"", "cookie stickiness needs [vip.l7] cookie_secret");
    // Asked for by a route, of a VIP without [vip.l7].
    let t = format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.6\"\nport = 80\nforwarding = \"l7\"\nbackends = [{b}]\n[[vip.route]]\nhost = \"a.example\"\nalgorithm = \"cookie\"\nbackends = [{b}]\n"
    );
    refused_at(&t, "\"cookie\"", "cookie stickiness needs [vip.l7] cookie_secret");
    let ok =
        l7_vip("198.18.1.6", b, "algorithm = \"cookie\"\ncookie_secret = \"0123456789abcdef\"", "");
    parse(&ok).unwrap();
    // Bytes, not characters.
    let secret = |s: &str| format!("algorithm = \"cookie\"\ncookie_secret = \"{s}\"");
    parse(&l7_vip("198.18.1.6", b, &secret("0123456789abcdé"), "")).unwrap();
    let t = l7_vip("198.18.1.6", b, &secret("0123456789abcde"), "");
    refused_at(&t, "\"0123", "at least 16 bytes (this one has 15)");
    // Two VIPs of one address, port and protocol: at the second one's address, naming both.
    let b = r#"{ address = "198.18.0.11", mac = "02:00:00:00:00:01" }"#;
    let two = |second: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{b}]\n[[vip]]\nname = \"b\"\naddress = \"198.18.1.1\"\n{second}backends = [{b}]\n"
        )
    };
    refused_at_last(
        &two("port = 80\n"),
        "\"198.18.1.1\"",
        "VIP `b` has the address, port and protocol of VIP `web` (198.18.1.1 port 80 tcp): a packet can go to only one; change its port or protocol, or merge their backends",
    );
    parse(&two("port = 80\nprotocol = \"udp\"\n")).unwrap();
    parse(&two("port = 81\n")).unwrap();
}

/// A file that cannot be read says why once, and has no source that would repeat it.
#[test]
fn an_unreadable_file_says_why_once() {
    let e = Config::load(Path::new("/nonexistent/edgelb.toml")).expect_err("no such file");
    let text = e.to_string();
    assert!(text.starts_with("/nonexistent/edgelb.toml: cannot read config: "), "{text}");
    assert_eq!(text.matches("os error 2").count(), 1, "{text}");
    assert!(std::error::Error::source(&e).is_none());
}

/// A file that is not UTF-8 (a comment saved as Latin-1) is refused at its first byte that is
/// not, by line and column as every error is, rather than as a file that cannot be read; the
/// admin commands still find the socket it names.
#[test]
fn a_byte_that_is_not_utf8_is_told_by_line_and_column() {
    let dir = std::env::temp_dir().join(format!("edgelb-latin1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("latin1.toml");
    let mut bytes = b"# caf\xe9\n".to_vec();
    bytes.extend_from_slice(EXAMPLE.as_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = Config::load(&p).expect_err("not UTF-8").to_string();
    assert_eq!(
        e,
        format!("{}:1:6: byte 0xE9 is not UTF-8 (save the file as UTF-8)", p.display()),
        "{e}"
    );
    // Further in: the line and column (in characters) of the byte.
    std::fs::write(&p, b"[node]\n# d\xc3\xa9j\xe0 vu\n").unwrap();
    let e = Config::load(&p).expect_err("not UTF-8").to_string();
    assert!(e.ends_with(":2:6: byte 0xE0 is not UTF-8 (save the file as UTF-8)"), "{e}");
    // The admin commands read the socket past it.
    std::fs::write(&p, b"# caf\xe9\n[node]\nadmin_socket = \"/run/edgelb/b.sock\"\n").unwrap();
    assert_eq!(admin_socket_of(&p), Ok(PathBuf::from("/run/edgelb/b.sock")));
    // Unless the byte is in the socket's own path, which names no socket then.
    std::fs::write(&p, b"[node]\nadmin_socket = \"/run/edgelb/\xe9.sock\"\n").unwrap();
    let e = admin_socket_of(&p).unwrap_err();
    assert!(e.contains("not UTF-8") && e.contains("--socket"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A value a message quotes is shown escaped and cut after 80 characters, saying how long it
/// was; a short one whole.
#[test]
fn quoted_values_are_escaped_and_cut() {
    assert_eq!(quoted("web"), "web");
    assert_eq!(quoted("a\nb\u{1b}"), "a\\nb\\u{1b}");
    let long = "é".repeat(100);
    assert_eq!(quoted(&long), format!("{}… (200 bytes)", "é".repeat(QUOTED_CHARS)));
    assert_eq!(quoted(&"x".repeat(QUOTED_CHARS)), "x".repeat(QUOTED_CHARS));
    // The parser's messages: each long quoted part cut, the rest as it was.
    let key = "k".repeat(70_000);
    let said = parser_message(&format!("unknown field `{key}`, expected one of `a`, `b`"));
    assert_eq!(
        said,
        format!("unknown field `{}… (70000 bytes)`, expected one of `a`, `b`", "k".repeat(80))
    );
    let said = parser_message(&format!("invalid type: string \"a\\\"{key}\", expected u16"));
    assert!(said.ends_with("… (70003 bytes)\", expected u16"), "{said}");
    assert!(said.len() < 200, "{said}");
    // Escaped, a raw control character anywhere in them; the parser's own `\` as it is.
    let said = parser_message("unknown field `a\u{1b}b`\n, expected one of `a`");
    assert_eq!(said, "unknown field `a\\u{1b}b`\\n, expected one of `a`");
    let said = "invalid basic string, expected non-double-quote visible characters, `\\`";
    assert_eq!(parser_message(said), said);
}

/// The characters of `said` that a message must not carry raw: what `escape_debug` escapes
/// (control characters, line and paragraph separators, bidi overrides...) but for the quotes and
/// backslash it escapes too, which a message may hold as they are.
fn raw_in_message(said: &str) -> Vec<char> {
    said.chars()
        .filter(|&c| !matches!(c, '\\' | '"' | '\'') && c.escape_debug().next() == Some('\\'))
        .collect()
}

/// A key or value of the file that the parser's or serde's message quotes (``unknown field
/// `...` ``, which serde writes raw), or a hint quotes as written, reaches the message escaped:
/// a control character or line separator in the file can neither color the terminal nor forge a
/// line of the error, on `check` or in the controller's log on a reload.
#[test]
fn messages_carry_no_raw_control_character() {
    let udp_health = |health: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 53\nprotocol = \"udp\"\nbackends = [{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}]\n[vip.health]\n{health}"
        )
    };
    let with_node = |line: &str| EXAMPLE.replacen("[node]\n", &format!("[node]\n{line}\n"), 1);
    let texts = [
        // Unknown keys, as TOML escapes spell them and raw in a quoted key.
        with_node(r#""x\u001b[31mRED\nfake.toml:1:1: ok" = 1"#),
        with_node("'x\u{2028}y\u{202e}z' = 1"),
        // A backtick in the key: the message's quotes no longer pair.
        with_node(r#""a`\u001b`b\n`c" = 1"#),
        EXAMPLE.replacen(
            "{ address = \"198.18.0.11\", mac",
            "{ \"q\\r\\u0007\" = 1, address = \"198.18.0.11\", mac",
            1,
        ),
        // A value quoted as written: a tab in a literal string, raw characters on a line that
        // does not parse.
        EXAMPLE.replacen("mtu = 1500", "mtu = '15\t00'", 1),
        EXAMPLE.replacen("mtu = 1500", "mtu = a\u{1b}[2K b", 1),
        EXAMPLE.replacen("xdp_mode = \"auto\"", "xdp_mode = na\u{2028}tive", 1),
        // A zone id, and a character that is no hex digit, each said back.
        EXAMPLE.replacen(
            "{ address = \"198.18.0.11\"",
            r#"{ address = "fe80::1%eth0\u001b[31m\nfake.toml:1:1: ok""#,
            1,
        ),
        udp_health(r#"send_hex = "ab\u001b[31m""#),
        udp_health(r#"send_hex = "ab\u2028""#),
    ];
    for text in &texts {
        let said = match parse(text) {
            Ok(cfg) => panic!("taken, with cautions {:?}", cfg.cautions),
            Err(e) => e.to_string(),
        };
        assert_eq!(raw_in_message(&said), [], "{said:?}");
    }
    let said = err(&texts[0]);
    assert!(said.contains("unknown field `x\\u{1b}[31mRED\\nfake.toml:1:1: ok`"), "{said}");
}

/// A prefix with raw characters whose percent-encoded form would still be refused (a malformed
/// escape, a `;`) gets no "write" that leads straight to the next error: the form, and what it
/// would meet.
#[test]
fn a_percent_encoding_that_would_be_refused_is_not_advised() {
    for (prefix, next) in [("/é%zz", "%"), ("/é;x/", ";")] {
        let text = format!(
            "{EXAMPLE}[[vip.route]]\npath_prefix = \"{prefix}\"\nbackends = [{{ address = \"198.18.0.12\" }}]\n"
        );
        let said = err(&text);
        assert!(!said.contains("write path_prefix"), "{said}");
        assert!(
            said.contains("percent-encoded (as \"/%C3%A9") && said.contains("and then:"),
            "{said}"
        );
        assert!(said.rsplit("and then:").next().unwrap().contains(next), "{said}");
    }
}

/// What a message says to write is a TOML string that reads back as the value: TOML's escapes
/// for `"`, `\\` and what `escape_debug` escapes, `'` as it is, nothing cut up to 1 KiB.
#[test]
fn values_to_write_are_toml_strings() {
    for value in ["web", "it's", "a\"b\\c", "x\u{1b}[31m\ny\t\r", "\u{2028}\u{202e}\u{e0001}é", ""]
    {
        let written = toml_string(value);
        assert_eq!(raw_in_message(&written), [], "{written}");
        let read: toml::Table = toml::from_str(&format!("v = {written}")).expect(&written);
        assert_eq!(read["v"].as_str(), Some(value), "{written}");
    }
    assert_eq!(toml_string("it's \"q\""), "\"it's \\\"q\\\"\"");
    assert_eq!(toml_string("\u{1b}\u{e0001}"), "\"\\u001B\\U000E0001\"");
    let long = "a".repeat(WRITE_BYTES - 2);
    assert_eq!(toml_string(&long), format!("\"{long}\""));
    let said = toml_string(&format!("{long}a"));
    assert_eq!(said, format!("\"{}… (1023 bytes; too long to show whole)", "a".repeat(79)));
    // Escapes count: a value of 300 escape characters is 1800 bytes written.
    assert!(toml_string(&"\u{1}".repeat(300)).ends_with("… (300 bytes; too long to show whole)"));
}

/// What an error tells the operator to write pastes back: the suggestion, put where the row
/// says, makes a file that is taken. Each error that derives what to write from the file's own
/// value (a path in normal form, percent-encoded; a route host; a quoted string; an address
/// without its port, brackets or zone; a list or table around a value), written with what TOML
/// escapes (`'`, `"`) and past the 80 characters a quoted value is cut at; and the fixed forms
/// some errors name. (Errors that say what to write in words, "a whole number 0..=65535", are
/// not pasted.)
#[test]
fn what_an_error_says_to_write_pastes_back() {
    /// A file with one mistake, what in it the suggestion replaces (`wrong`), the words the
    /// suggestion follows (the last time they are in the error) and those it comes before, if
    /// it does not end the error, and how it is pasted (`{}`: as it is).
    struct Row {
        text: String,
        wrong: String,
        after: &'static str,
        until: Option<&'static str>,
        paste: &'static str,
    }
    impl Row {
        fn new(text: String, wrong: &str) -> Row {
            Row { text, wrong: wrong.into(), after: "write ", until: None, paste: "{}" }
        }
        fn at(self, wrong: &str) -> Row {
            Row { wrong: wrong.into(), ..self }
        }
        fn after(self, after: &'static str) -> Row {
            Row { after, ..self }
        }
        fn until(self, until: &'static str) -> Row {
            Row { until: Some(until), ..self }
        }
    }
    // `to` for `from` in the example, or a route of the L7 VIP with `line`.
    let e = |from: &str, to: &str| {
        assert!(EXAMPLE.contains(from), "{from}");
        Row::new(EXAMPLE.replacen(from, to, 1), to)
    };
    let r = |line: &str| {
        let routes = "[[vip.route]]\n{line}\nbackends = [{ address = \"198.18.0.12\" }]\n";
        Row::new(format!("{EXAMPLE}{}", routes.replace("{line}", line)), line)
    };
    // cookie_attributes of the L7 VIP: the attributes to write go in its string.
    let c = |attributes: &str, after: &'static str| {
        let line = format!("cookie_attributes = \"{attributes}\"");
        let row = e("algorithm = \"least_conn\"", &line).after(after).until("`");
        Row { paste: "cookie_attributes = \"{}\"", ..row }
    };
    let long = format!("path_prefix = \"/{}é\"", "a".repeat(94));
    let rows = [
        // path_prefix in normal form, percent-encoded, both; with TOML's escapes.
        r("path_prefix = \"/a/./it's/\""),
        r(&long),
        r("path_prefix = \"/é/./%61\""),
        r("path_prefix = '/a/./\"q\"/'"),
        r("path_prefix = \"/%7e/\""),
        // A route host: its host name or bracketed address.
        r("host = \"it's.example:8080\""),
        r("host = \"https://[2001:db8::1]:443/x\""),
        r("host = \"2001:db8::1\""),
        // A string without quotes, alone and in a backend's table; a number for a string.
        e("xdp_mode = \"auto\"", "xdp_mode = native"),
        e("{ address = \"198.18.0.12\", mac", "{ address = 198.18.0.12, mac")
            .at("address = 198.18.0.12"),
        e("name = \"dns\"", "name = 53.5"),
        // A number or boolean in quotes, a number as a float, a time with a unit.
        e("port = 80", "port = \"80\"").after("without quotes, "),
        e("port = 80", "port = 80.0").after("whole number, "),
        e("interval_ms = 1000", "interval_ms = \"2s\""),
        e("protocol = \"udp\"", "protocol = \"udp\"\nconntrack = \"false\"")
            .at("conntrack = \"false\"")
            .until(", without"),
        // A list or table around a value, a table header of one table.
        e("interfaces = [\"lb0\"]", "interfaces = \"it's\\\"\""),
        e("{ address = \"198.18.0.13\", port = 80 }", "'198.18.0.13'"),
        e("[node]", "[[node]]").until(", not"),
        e("[vip.health]\nkind = \"udp\"", "[[vip.health]]\nkind = \"udp\"")
            .at("[[vip.health]]")
            .until(", not"),
        // An address with a port, in brackets, with a zone; IPv4-mapped.
        e("address = \"198.18.1.6\"", "address = \"198.18.1.6:8080\"").until(" and port"),
        e("{ address = \"198.18.0.13\", port = 80 }", "{ address = \"198.18.0.13:8080\" }"),
        e("address = \"198.18.0.12\", mac", "address = \"198.18.0.12:80\", mac")
            .at("address = \"198.18.0.12:80\"")
            .until(" (a backend"),
        e("\"198.18.1.6\"", "\"[2001:db8::6]\"").after("without brackets: "),
        e("\"198.18.1.6\"", "\"2001:db8::6%eth0\""),
        e("\"198.18.1.6\"", "\"::ffff:198.18.1.6\"").at("::ffff:198.18.1.6").after("address "),
        // Cookie attributes: what to write, and examples.
        c("SameSite=None", "write `"),
        c("Partitioned", "write `"),
        c("Secure=1", "write `"),
        c("SameSite=x", "write e.g. `"),
        c("Max-Age=1d", "write e.g. `"),
        c("Domain=a/b", "write e.g. `"),
    ];
    for Row { text, wrong, after, until, paste } in &rows {
        let said = err(text);
        let at = said.rfind(after).unwrap_or_else(|| panic!("no {after:?}: {said}")) + after.len();
        let end = until.map_or(said.len(), |u| at + said[at..].find(u).expect(u));
        let write = paste.replace("{}", &said[at..end]);
        assert!(text.contains(wrong.as_str()), "{wrong}");
        let fixed = text.replacen(wrong.as_str(), &write, 1);
        if let Err(e) = parse(&fixed) {
            panic!("{said}\nwith {write} pasted for {wrong}: {e}");
        }
    }
    // A suggestion is shown whole up to 1 KiB, however long the value it is derived from; past
    // that, cut with its length.
    let e = err(&r(&format!("path_prefix = \"/./{}\"", "a".repeat(1000))).text);
    assert!(e.ends_with(&format!("write path_prefix = \"/{}\"", "a".repeat(1000))), "{e}");
    let e = err(&r(&format!("path_prefix = \"/./{}\"", "a".repeat(1100))).text);
    assert!(e.contains("… (1101 bytes; too long to show whole)"), "{e}");
}

/// A value of 70 000 bytes anywhere in the file gives an error or warning of a line, not of
/// 70 KB: each string value of the example and each number, in turn, as such a string (and a
/// number as such a bare word), and a long key, VIP name and route.
#[test]
fn a_long_value_makes_no_long_message() {
    let big = "x".repeat(70_000);
    let mut texts = Vec::new();
    let lines: Vec<&str> = EXAMPLE.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let with = |new: String| {
            let mut l = lines.clone();
            l[i] = &new;
            l.join("\n")
        };
        // Each quoted value, as a long string of its own and with a prefix that reads on
        // further (a path, an address).
        let quotes: Vec<usize> = line.match_indices('"').map(|(at, _)| at).collect();
        for pair in quotes.chunks(2) {
            if let [open, close] = *pair {
                for value in [big.clone(), format!("/{big} x"), format!("1.2.{big}")] {
                    texts.push(with(format!("{}{value}{}", &line[..=open], &line[close..])));
                }
            }
        }
        if let Some((key, n)) = line.split_once(" = ")
            && n.split_whitespace().next().is_some_and(|n| n.parse::<u64>().is_ok())
        {
            texts.push(with(format!("{key} = \"{big}\"")));
            texts.push(with(format!("{key} = {big}")));
        }
    }
    let route = |r: &str| {
        format!(
            "{EXAMPLE}\n[[vip.route]]\n{r}\nbackends = [{{ address = \"198.18.0.11\", port = 80 }}]\n"
        )
    };
    texts.push(route(&format!("path_prefix = \"/a/../{big}\"")));
    texts.push(route(&format!("host = \"*.{big}\"")));
    texts.push(EXAMPLE.replace("mtu = 1500", &format!("mtu = 1500\nk{big} = 1")));
    texts.push(EXAMPLE.replace("name = \"web7\"", &format!("name = \"{big}\"")));
    assert!(texts.len() > 100, "{}", texts.len());
    for text in &texts {
        let said = match parse(text) {
            Ok(cfg) => cfg.cautions.join("\n"),
            Err(e) => e.to_string(),
        };
        assert!(said.len() < 1024, "{} bytes: {}", said.len(), &said[..said.len().min(300)]);
    }
}

/// Common TOML mistakes get a message that says what to write, at the mistake: the key, the
/// value as written and the form to write, where the parser and serde name a type ("expected
/// u16") or nothing ("duplicate key", "invalid float"). Each rewritten message form is pinned
/// here, so a `toml` upgrade that changes one fails this test rather than losing the hint.
#[test]
fn common_toml_mistakes_say_what_to_write() {
    let head = "[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\n";
    let vip = format!("{head}port = 80\n");
    let backend = "backends = [{ address = \"198.18.0.11\" }]\n";
    for (text, needle, says) in [
        (format!("{NODE}xdp_mode = native\n"), "native", "write xdp_mode = \"native\""),
        (
            format!("{NODE}xdp_mode = native # the driver's\n"),
            "native",
            "write xdp_mode = \"native\"",
        ),
        (
            format!("{NODE}[[vip]]\nname = \"a\"\naddress = 198.18.1.1\n"),
            "198.18.1.1",
            "write address = \"198.18.1.1\"",
        ),
        (
            format!("{NODE}[vip]\nname = \"a\"\naddress = \"198.18.1.1\"\n"),
            "[vip]",
            "write [[vip]], not [vip]: each VIP is an array entry",
        ),
        (
            "[[node]]\ninterfaces = [\"eth0\"]\n".to_owned(),
            "[[node]]",
            "write [node], not [[node]]",
        ),
        ("[node]\ninterfaces = \"eth0\"\n".to_owned(), "\"eth0\"", "write interfaces = [\"eth0\"]"),
        (
            format!("{NODE}{vip}backends = [\"198.18.0.11\"]\n"),
            "\"198.18.0.11\"",
            "write { address = \"198.18.0.11\" }",
        ),
        (
            format!("{NODE}{vip}[vip.backends]\naddress = \"198.18.0.11\"\n"),
            "[vip.backends]",
            "`backends` is a list",
        ),
        (
            format!("{NODE}{vip}[[vip.health]]\nkind = \"tcp\"\n"),
            "[[vip.health]]",
            "write [vip.health], not [[vip.health]]",
        ),
        (
            format!("{NODE}{vip}forwarding = \"l7\"\n[vip.route]\nhost = \"a\"\nbackends = []\n"),
            "[vip.route]",
            "write [[vip.route]], not [vip.route]",
        ),
        (
            format!(
                "{NODE}{vip}forwarding = \"l7\"\n[[vip.route]]\nhost = \"a\"\nbackends = [\"198.18.0.12\"]\n"
            ),
            "\"198.18.0.12\"",
            "write { address = \"198.18.0.12\" }",
        ),
        // An unquoted word as a value in an inline table, bounded by `{`, `,` and `}`.
        (
            format!("{NODE}{vip}backends = [{{ address = 198.18.0.11, weight = 2 }}]\n"),
            "198.18.0.11",
            "`198.18.0.11` is not a TOML value: strings need quotes, write address = \"198.18.0.11\"",
        ),
        (
            format!(
                "{NODE}{vip}backends = [{{ address = \"198.18.0.11\", mac = 02:00:00:00:00:01 }}]\n"
            ),
            "02:00",
            "`02:00:00:00:00:01` is not a TOML value: strings need quotes, write mac = \"02:00:00:00:00:01\"",
        ),
        // No value, or two, where the parser speaks of quotes.
        (
            format!("{NODE}{head}port = 80 80\n"),
            "80 80",
            "`port = 80 80` has more than one value: a key takes one (a list is written in brackets, [a, b]; a comment starts with #)",
        ),
        (
            format!("{NODE}mtu =\n"),
            "mtu =",
            "`mtu =` has no value: write one after `=` (a string in quotes, a number, true or false, a list in brackets)",
        ),
        (
            format!("{NODE}mtu =   # none\n"),
            "mtu =",
            "`mtu =` has no value: write one after `=` (a string in quotes, a number, true or false, a list in brackets)",
        ),
        // A value of the wrong type or out of range: the key, what was written, what to write.
        (
            format!("{NODE}{head}port = 70000\n"),
            "70000",
            "`port` = 70000 is out of range: a whole number 0..=65535",
        ),
        (
            format!("{NODE}{head}port = \"80\"\n"),
            "\"80\"",
            "`port` = \"80\": write a number without quotes, port = 80",
        ),
        (
            format!("{NODE}{head}port = \"http\"\n"),
            "\"http\"",
            "`port` = \"http\": write a whole number 0..=65535, without quotes",
        ),
        (
            format!("{NODE}{vip}backends = [{{ address = \"198.18.0.11\", weight = -1 }}]\n"),
            "-1",
            "`weight` = -1: write a whole number, not negative",
        ),
        (
            format!("{NODE}{head}port = 80.5\n"),
            "80.5",
            "`port` = 80.5 is not a whole number: write a whole number 0..=65535",
        ),
        (
            format!("{NODE}{head}port = 80.0\n"),
            "80.0",
            "`port` = 80.0: write a whole number, port = 80",
        ),
        (
            format!("{NODE}{vip}{backend}[vip.health]\ninterval_ms = \"1s\"\n"),
            "\"1s\"",
            "`interval_ms` = \"1s\": a whole number of milliseconds 10..=600000, write interval_ms = 1000",
        ),
        (
            format!("{NODE}{vip}{backend}[vip.health]\ninterval_ms = \"soon\"\n"),
            "\"soon\"",
            "`interval_ms` = \"soon\": a whole number of milliseconds 10..=600000, e.g. interval_ms = 1000",
        ),
        (
            format!("{NODE}{vip}{backend}[vip.health]\ninterval_ms = -5\n"),
            "-5",
            "`interval_ms` = -5: write a whole number of milliseconds, not negative",
        ),
        (
            format!("{NODE}{vip}conntrack = \"no\"\n"),
            "\"no\"",
            "`conntrack` = \"no\": write true or false, without quotes",
        ),
        (
            format!("{NODE}{vip}conntrack = \"false\"\n"),
            "\"false\"",
            "`conntrack` = \"false\": write conntrack = false, without quotes",
        ),
        (
            format!("{NODE}[[vip]]\nname = 7\n"),
            "7\n",
            "`name` = 7: strings need quotes, write name = \"7\"",
        ),
        (
            format!("{NODE}{vip}backends = 5\n"),
            "5\n",
            "`backends` = 5: write a list, backends = [...]",
        ),
        // A key set twice, at the second: in a table, in an inline table, in [node].
        (
            format!("{NODE}{head}port = 80\nport = 81\n"),
            "port = 81",
            "`port` is set twice in this table: keep one",
        ),
        (
            format!(
                "{NODE}{vip}backends = [{{ address = \"198.18.0.11\", weight = 1, weight = 2 }}]\n"
            ),
            "weight = 2",
            "`weight` is set twice in this table: keep one",
        ),
        (
            format!("{NODE}mtu = 1500\nmtu = 1400\n"),
            "mtu = 1400",
            "`mtu` is set twice in this table: keep one",
        ),
    ] {
        refused_at(&text, needle, says);
    }
    // A table given twice, at the second header.
    refused_at_last(
        &format!("{NODE}{vip}{backend}[vip.health]\nkind = \"tcp\"\n[vip.health]\nrise = 2\n"),
        "health]",
        "[vip.health] is given twice: keep one [vip.health] and put all its keys there",
    );
    refused_at_last(
        &format!("{NODE}mtu = 1500\n[node]\nmtu = 1400\n"),
        "node]",
        "[node] is given twice: keep one [node] and put all its keys there",
    );
    // Other errors keep the parser's message and place: an unterminated string, an entry of a
    // list (not the value of a key), a bare word in a list (`interfaces = "eth0"` would be wrong).
    let e = err(&format!("{NODE}xdp_mode = \"native\n"));
    assert!(e.starts_with("t.toml:4:") && !e.contains("strings need quotes"), "{e}");
    let e = err("[node]\ninterfaces = [\"eth0\", 5]\n");
    assert!(e.starts_with("t.toml:2:23: invalid type: integer `5`, expected a string"), "{e}");
    for (text, needle) in [
        ("[node]\ninterfaces = [eth0]\n", "eth0"),
        ("[node]\ninterfaces = [\"eth0\", eth1]\n", "eth1"),
        ("[node]\ninterfaces = [eth0, eth1]\n", "eth0"),
    ] {
        let e = err(text);
        assert!(e.starts_with(&at(text, needle)) && !e.contains("write"), "{e}");
    }
    // The right forms are accepted.
    parse(&format!("{NODE}xdp_mode = \"native\"\n{vip}[[vip.backends]]\naddress = \"198.18.0.11\"\nmac = \"02:00:00:00:00:01\"\n")).unwrap();
}

/// `edgelb stop` removes what edgelb pinned in `pin_dir`: the directory must lie below the
/// bpffs mount by plain names, so that no `..` leads it elsewhere.
#[test]
fn pin_dir_is_a_plain_directory_below_bpffs() {
    let with = |dir: &str| format!("{NODE}pin_dir = \"{dir}\"\n");
    for bad in [
        "/sys/fs/bpf/",
        "/sys/fs/bpf",
        "/sys/fs/bpf/../../../etc/edgelb",
        "/sys/fs/bpf/a/./b",
        "/sys/fs/bpf//a",
        "/tmp/edgelb",
    ] {
        refused_at(
            &with(bad),
            &format!("\"{bad}\""),
            "pin_dir must be a directory under /sys/fs/bpf/",
        );
    }
    for good in ["/sys/fs/bpf/edgelb", "/sys/fs/bpf/edgelb/", "/sys/fs/bpf/tc/globals"] {
        assert_eq!(parse(&with(good)).unwrap().node.pin_dir, std::path::PathBuf::from(good));
    }
}

/// How long L7 requests in flight may take to finish at a stop or takeover: 30 s unless set.
#[test]
fn l7_drain_timeout_defaults_and_limits() {
    assert_eq!(parse(NODE).unwrap().node.l7_drain_timeout, Duration::from_secs(30));
    let with = |ms: &str| format!("{NODE}l7_drain_timeout_ms = {ms}\n");
    assert_eq!(parse(&with("0")).unwrap().node.l7_drain_timeout, Duration::ZERO);
    assert_eq!(parse(&with("120000")).unwrap().node.l7_drain_timeout, Duration::from_secs(120));
    refused_at(&with("3600001"), "3600001", "l7_drain_timeout_ms must be 0..=3600000");
}

/// `l7_threads` keeps what the file says; unset, the proxy gets one thread per CPU, within the
/// key's range however many CPUs the machine has.
#[test]
fn l7_threads_default_to_one_per_cpu_within_their_range() {
    assert_eq!(default_l7_threads(1), 1);
    assert_eq!(default_l7_threads(48), 48);
    assert_eq!(default_l7_threads(256), 256);
    assert_eq!(default_l7_threads(257), 256);
    assert_eq!(default_l7_threads(1024), 256);
    assert_eq!(default_l7_threads(0), 1);
    assert_eq!(parse(NODE).unwrap().node.l7_threads, None);
    let with = |t: &str| format!("{NODE}l7_threads = {t}\n");
    assert_eq!(parse(&with("4")).unwrap().node.l7_threads, Some(4));
    assert_eq!(parse(&with("4")).unwrap().node.l7_thread_count(), 4);
    refused_at(&with("257"), "257", "l7_threads must be 1..=256");
}

/// An L7 VIP whose backends take the PROXY protocol gives its check the header's version (the
/// checker sends it only to a backend's own port: `health::tests`).
#[test]
fn probes_of_proxy_protocol_backends_send_the_header() {
    let vip = |health: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"w\"\naddress = \"198.18.1.6\"\nport = 80\nforwarding = \"l7\"\nbackends = [{{ address = \"198.18.0.11\", port = 8080 }}]\n[vip.l7]\nproxy_protocol = 2\n[vip.health]\nkind = \"http\"\n{health}"
        )
    };
    let check = |text: &str| parse(text).unwrap().vips[0].health.clone().unwrap();
    assert_eq!(check(&vip("")).proxy_protocol, Some(2));
    assert_eq!(check(&vip("port = 9000\n")).proxy_protocol, Some(2));
}

/// The admin commands find the running edgelb through a config that no longer parses, but
/// never guess the default socket when the file's own line for it is what is broken.
#[test]
fn admin_socket_of_a_broken_file() {
    let dir = std::env::temp_dir().join(format!("edgelb-admin-of-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let at = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        admin_socket_of(&p)
    };
    let set = "[node]\ninterfaces = [\"lo\"]\nadmin_socket = \"/run/edgelb/b.sock\"\n";
    let b = PathBuf::from("/run/edgelb/b.sock");
    let default = PathBuf::from(DEFAULT_ADMIN_SOCKET);
    assert_eq!(at("ok.toml", set), Ok(b.clone()));
    assert_eq!(at("unset.toml", "[node]\ninterfaces = [\"lo\"]\n"), Ok(default.clone()));
    // Not TOML any more (an unclosed quote elsewhere), its admin_socket line intact.
    assert_eq!(at("broken.toml", &format!("{set}mtu = \"1500\n")), Ok(b));
    assert_eq!(at("broken-unset.toml", "[node]\nmtu = \"1500\n"), Ok(default.clone()));
    // The admin_socket line itself broken: no guess.
    let e = at("broken-line.toml", "[node]\nadmin_socket = \"/run/edgelb/b.sock\n").unwrap_err();
    assert!(e.contains("broken-line.toml:") && e.contains("--socket"), "{e}");
    // TOML, but admin_socket set to no path: no guess either, and where it is said.
    for (value, says) in [("5", "is integer 5"), ("[\"/run/x.sock\"]", "is array")] {
        let e = at(
            "not-a-string.toml",
            &format!("[node]\ninterfaces = [\"lo\"]\nadmin_socket = {value}\n"),
        )
        .unwrap_err();
        assert!(
            e.contains("not-a-string.toml:3:16: node.admin_socket")
                && e.contains(says)
                && e.contains("--socket"),
            "{e}"
        );
    }
    let e = at("dotted.toml", "node.admin_socket = true\n").unwrap_err();
    assert!(e.contains("dotted.toml:1:21: node.admin_socket is boolean true"), "{e}");
    // No admin_socket, but a key meant as one (misspelled, or in another table): no guess,
    // since the default may be another edgelb's, and where that key is said.
    for (text, says) in [
        (
            "[node]\ninterfaces = [\"lo\"]\nadmin_sockt = \"/run/b.sock\"\n",
            ":3:1: `node.admin_sockt`",
        ),
        ("[node]\nadmin-socket = \"/run/b.sock\"\n", ":2:1: `node.admin-socket`"),
        ("node.adminSocket = \"/run/b.sock\"\n", ":1:6: `node.adminSocket`"),
        ("[node]\n[metrics]\nadmin_socket = \"/run/b.sock\"\n", ":3:1: `metrics.admin_socket`"),
        ("admin_socket = \"/run/b.sock\"\n", ":1:1: `admin_socket`"),
    ] {
        let e = at("lookalike.toml", text).unwrap_err();
        assert!(e.contains(&format!("lookalike.toml{says} is not node.admin_socket")), "{e}");
        assert!(e.contains("--socket"), "{e}");
    }
    // The same in a file that is not TOML any more.
    let e = at("broken-lookalike.toml", "[node]\nadmin_sockt = \"/run/b.sock\"\nmtu = \"1\n")
        .unwrap_err();
    assert!(e.contains("--socket"), "{e}");
    // Other keys stay far from it: the example config names the default.
    let example = include_str!("../../../docs/edgelb.example.toml");
    assert_eq!(at("example.toml", example).map(|p| p == default), Ok(true));
    // A file that cannot be read (a mistyped -c): no guess either.
    let e = admin_socket_of(&dir.join("missing.toml")).unwrap_err();
    assert!(e.contains("missing.toml") && e.contains("--socket"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

// Randomized property tests: valid configs, damaged in the ways files get damaged, must never
// panic the parser; a refused one is refused with a location inside the file, an accepted one
// keeps the documented rules (docs/CONFIG.md) and parses the same every time. Deterministic: a
// fixed seed unless FUZZ_SEED=<n> is set; the seed is printed, and a failure names its case.

use crate::fuzz::{PropRng, prop_seed};

/// Valid configs to damage: the example, and the shapes the helpers above build, between them
/// using every key of the schema.
fn prop_valid_configs() -> Vec<String> {
    let node_all = "[node]\ninterfaces = [\"eth0\", \"eth1\"]\nxdp_mode = \"native\"\nencap_source_v4 = \"198.19.0.0/16\"\nencap_source_v6 = \"2001:2:0:ff::/96\"\ngateway_mac = \"02:00:00:00:00:fe\"\nsrc_mac = \"02:00:00:00:00:fd\"\nmtu = 9000\npin_dir = \"/sys/fs/bpf/edgelb-t\"\nadmin_socket = \"/run/edgelb/t.sock\"\nl7_threads = 2\nl7_drain_timeout_ms = 1000\nconntrack_flows_per_cpu = 65536\n[metrics]\nlisten = \"0.0.0.0:9110\"\nallow_remote = true\n";
    let l2 = "[[vip]]\nname = \"l2\"\naddress = \"198.18.1.2\"\nport = 53\nprotocol = \"udp\"\nforwarding = \"l2\"\nconntrack = false\nring_size = 1009\nbackends = [{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\", weight = 0 }, { address = \"198.18.0.12\", mac = \"02:00:00:00:00:02\", weight = 10000 }]\n[vip.health]\nsend = \"ping\"\nexpect = \"pong\"\nport = 5353\nrise = 1\nfall = 100\n";
    let v6 = "[[vip]]\nname = \"v6\"\naddress = \"2001:2::1\"\nport = 443\nhash = \"5tuple\"\n[[vip.backends]]\naddress = \"2001:2::11\"\n[[vip.backends]]\naddress = \"fd00::12\"\nmac = \"02:00:00:00:00:03\"\n[vip.health]\nkind = \"http\"\npath = \"/healthz\"\nhost = \"a.example\"\nexpect_status = 204\nexpect_body = \"ok\"\ninterval_ms = 10\ntimeout_ms = 10\n";
    let two = r#"{ address = "198.18.0.11" }, { address = "198.18.0.12", weight = 5 }"#;
    let l7_http = "algorithm = \"cookie\"\ncookie_secret = \"0123456789abcdef\"\ncookie_secret_previous = \"fedcba9876543210\"\ncookie_attributes = \"Secure; SameSite=None; Max-Age=60\"\ncookie_name = \"sid\"\nretries = 0\nproxy_protocol = 1\nmax_header_bytes = 4096\nmax_headers = 10\nupstream_keepalive = 0\nforwarded_for = false\nnormalize_path = false\naccess_log = true\nheader_timeout_ms = 5\nresponse_timeout_ms = 5\nrequest_timeout_ms = 3600000";
    let routes = "[[vip.route]]\nhost = \"a.example\"\npath_prefix = \"/api/\"\nalgorithm = \"p2c\"\nbackends = [{ address = \"198.18.0.12\", port = 9000 }]\n[[vip.route]]\npath_prefix = \"/\"\nbackends = [{ address = \"::1\", weight = 0 }]\n[vip.health]\nkind = \"tcp\"\n";
    let l7_tcp = "mode = \"tcp\"\nalgorithm = \"least_conn\"\nretries = 10\nconnect_timeout_ms = 1\nidle_timeout_ms = 1000\ntunnel_timeout_ms = 86400000\nmax_connections = 10\nmax_fails = 2\nfail_timeout_ms = 500";
    vec![
        EXAMPLE.to_owned(),
        NODE.to_owned(),
        format!("{node_all}{l2}{v6}"),
        xdp_vip("198.18.1.1", "hash = \"5tuple\"\nring_size = 101", two),
        l7_vip(
            "198.18.1.6",
            r#"{ address = "127.0.0.1", port = 8081, weight = 3 }"#,
            l7_http,
            routes,
        ),
        l7_vip("198.18.1.6", two, l7_tcp, ""),
        format!("{NODE}[metrics]\nenabled = false\n"),
    ]
}

/// Damages `text` once, in one of the ways config files get damaged.
fn prop_mutate(text: &str, r: &mut PropRng) -> String {
    let mut t = text.to_owned();
    // The line around a char boundary: its start and its end (past its newline).
    let line_at = |t: &str, at: usize| {
        let start = t[..at].rfind('\n').map_or(0, |i| i + 1);
        let end = t[at..].find('\n').map_or(t.len(), |i| at + i + 1);
        start..end
    };
    // The value of a random `key = value` line, if the text has one.
    let value_at = |t: &str, r: &mut PropRng| {
        let lines: Vec<_> = t.match_indices(" = ").map(|(i, _)| i + 3).collect();
        let at = *lines.get(r.below(lines.len()))?;
        let end = t[at..].find('\n').map_or(t.len(), |i| at + i);
        Some(at..end)
    };
    let weird_chars = [
        "\0",
        "\u{1}",
        "\t",
        "\r",
        "\n",
        "\u{7f}",
        "\u{85}",
        "\u{a0}",
        "\u{200b}",
        "\u{feff}",
        "\u{2028}",
        "\u{202e}",
        "\u{301}",
        "é",
        "日",
        "😀",
        "\u{10ffff}",
        "\u{fffd}",
        "\\",
        "\\u",
        "\\U0010FFFF",
        "\\x41",
        "#",
        "=",
        ".",
        ",",
        "\u{1b}[0m",
    ];
    let numbers = [
        "0",
        "-0",
        "+1",
        "-1",
        "1.5",
        "-1.5",
        "1e309",
        "1e-9",
        "nan",
        "inf",
        "-inf",
        "0x10",
        "0o7",
        "0b1",
        "1_000",
        "1__0",
        "_1",
        "007",
        "65535",
        "65536",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551616",
        "99999999999999999999999999999999",
        "\"80\"",
        "true",
        "[]",
        "{}",
        "1979-05-27",
        "07:32:00",
        "1979-05-27T07:32:00Z",
    ];
    let values = [
        "\"\"",
        "\" \"",
        "\"0.0.0.0\"",
        "\"::\"",
        "\"::ffff:198.18.0.1\"",
        "\"fe80::1\"",
        "\"127.0.0.1\"",
        "\"198.18.1.1\"",
        "\"198.18.0.11\"",
        "\"1.2.3.4:80\"",
        "\"[::1]:80\"",
        "\"l7\"",
        "\"l2\"",
        "\"ipip\"",
        "\"udp\"",
        "\"tcp\"",
        "\"http\"",
        "\"cookie\"",
        "\"hash\"",
        "\"5tuple\"",
        "\"/\"",
        "\"a b\"",
        "\"/sys/fs/bpf/x\"",
        "\"relative\"",
        "\"02:00:00:00:00:zz\"",
        "\"02:00:00:00:00:01\"",
        "\"é\"",
        "'literal'",
        "'''multi\nline'''",
        "\"\"\"multi\nline\"\"\"",
        "true",
        "false",
        "0",
        "1",
        "-1",
        "1.0",
        "[]",
        "[\"eth0\"]",
        "[1, \"a\"]",
        "{}",
        "{ address = \"198.18.0.13\" }",
        "[{ address = \"198.18.0.13\" }]",
        "1979-05-27T07:32:00Z",
        "",
        "=",
        "\"unterminated",
        "[\"unterminated\"",
    ];
    let keys = [
        "interfaces",
        "xdp_mode",
        "encap_source_v4",
        "encap_source_v6",
        "gateway_mac",
        "src_mac",
        "mtu",
        "l7_threads",
        "l7_drain_timeout_ms",
        "conntrack_flows_per_cpu",
        "pin_dir",
        "admin_socket",
        "listen",
        "allow_remote",
        "enabled",
        "name",
        "address",
        "port",
        "protocol",
        "hash",
        "forwarding",
        "ring_size",
        "conntrack",
        "backends",
        "mode",
        "algorithm",
        "retries",
        "connect_timeout_ms",
        "header_timeout_ms",
        "max_header_bytes",
        "max_connections",
        "proxy_protocol",
        "cookie_name",
        "cookie_secret",
        "cookie_secret_previous",
        "cookie_attributes",
        "max_fails",
        "kind",
        "interval_ms",
        "timeout_ms",
        "rise",
        "fall",
        "path",
        "expect_status",
        "send",
        "expect",
        "weight",
        "mac",
        "host",
        "path_prefix",
        "nope",
        "node",
        "vip",
        "a.b.c",
        "\"quoted\"",
    ];
    let headers = [
        "[node]",
        "[[node]]",
        "[metrics]",
        "[[vip]]",
        "[vip]",
        "[vip.l7]",
        "[[vip.l7]]",
        "[vip.health]",
        "[[vip.route]]",
        "[vip.route]",
        "[[vip.backends]]",
        "[vip.backends]",
        "[[vip.route.backends]]",
        "[node.x]",
        "[]",
        "[[]]",
        "[a",
        "[[vip]",
    ];
    let brackets = ["\"", "'", "[", "]", "{", "}", "\"\"\"", "'''", "[[", "]]", "{ ", " }"];
    match r.below(17) {
        // A VIP repeated up to 40 times (past the most VIPs and backend entries), renamed and
        // readdressed or not.
        16 => {
            if let Some(start) = t.find("[[vip]]") {
                let end = t[start + 1..].find("[[vip]]").map_or(t.len(), |i| start + 1 + i);
                let block = t[start..end].to_owned();
                let fresh = r.below(4) != 0;
                for i in 0..1 + r.below(40) {
                    let copy = if fresh {
                        block.replace("name = \"", &format!("name = \"c{i}-")).replace(
                            "address = \"198.18.1.",
                            &format!("address = \"198.18.{}.", 100 + i),
                        )
                    } else {
                        block.clone()
                    };
                    t.push_str(&copy);
                }
            }
        }
        // A line dropped, repeated, or moved.
        0..=2 => {
            let at = r.boundary(&t);
            let line = line_at(&t, at);
            let copy = t[line.clone()].to_owned();
            match r.below(3) {
                0 => drop(t.drain(line)),
                1 => t.insert_str(line.start, &copy),
                _ => {
                    t.drain(line);
                    let to = r.boundary(&t);
                    let to = line_at(&t, to).start;
                    t.insert_str(to, &copy);
                }
            }
        }
        // Cut short.
        3 => t.truncate(r.boundary(&t)),
        // A bit flipped.
        4 => {
            let mut bytes = t.into_bytes();
            if !bytes.is_empty() {
                let at = r.below(bytes.len());
                bytes[at] ^= 1 << r.below(8);
            }
            t = String::from_utf8_lossy(&bytes).into_owned();
        }
        // A control, invisible, combining or wide character; or an escape.
        5 => {
            let at = r.boundary(&t);
            t.insert_str(at, r.pick(&weird_chars));
        }
        // A number made huge, negative, a float, a string...
        6 => {
            let digits: Vec<_> = t
                .char_indices()
                .filter(|&(i, c)| {
                    c.is_ascii_digit() && !t[..i].ends_with(|p: char| p.is_ascii_digit())
                })
                .map(|(i, _)| i)
                .collect();
            if let Some(&at) = digits.get(r.below(digits.len())) {
                let end = t[at..].find(|c: char| !c.is_ascii_digit()).map_or(t.len(), |i| at + i);
                t.replace_range(at..end, r.pick(&numbers));
            }
        }
        // A value of another type, or another value of its type.
        7 => {
            if let Some(v) = value_at(&t, r) {
                t.replace_range(v, r.pick(&values));
            }
        }
        // A key set (again, or where it does not belong).
        8 => {
            let at = r.boundary(&t);
            let at = line_at(&t, at).start;
            let value = if r.below(2) == 0 { r.pick(&values) } else { r.pick(&numbers) };
            t.insert_str(at, &format!("{} = {value}\n", r.pick(&keys)));
        }
        // A table (again, or of the wrong kind).
        9 => {
            let at = r.boundary(&t);
            let at = line_at(&t, at).start;
            t.insert_str(at, &format!("{}\n", r.pick(&headers)));
        }
        // Unbalanced quotes and brackets.
        10 => {
            let at = r.boundary(&t);
            t.insert_str(at, r.pick(&brackets));
        }
        // A very long string, key, or line.
        11 => {
            let n = 1 << (8 + r.below(9));
            let fill = r.pick(&["x", "é", " ", "\\\\", "0", "😀"]).repeat(n);
            match r.below(3) {
                0 => match t.find('"') {
                    Some(q) => t.insert_str(q + 1, &fill),
                    None => t.push_str(&fill),
                },
                1 => {
                    let at = r.boundary(&t);
                    let at = line_at(&t, at).start;
                    t.insert_str(at, &format!("{} = 1\n", "k".repeat(n)));
                }
                _ => {
                    let at = r.boundary(&t);
                    t.insert_str(at, &fill);
                }
            }
        }
        // Deeply nested arrays, inline tables, dotted keys.
        12 => {
            let most = if r.below(4) == 0 { 5_000 } else { 200 };
            let depth = 1 + r.below(most);
            let nested = match r.below(3) {
                0 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
                1 => format!("{}1{}", "{ a = ".repeat(depth), " }".repeat(depth)),
                _ => format!("{}[\"eth0\"]{}", "[".repeat(depth), "]".repeat(depth)),
            };
            match value_at(&t, r) {
                Some(v) if r.below(2) == 0 => t.replace_range(v, &nested),
                _ => {
                    let key = vec!["a"; depth].join(".");
                    t.push_str(&format!("\n{key} = {nested}\n"));
                }
            }
        }
        // Line endings changed.
        13 => {
            t = match r.below(3) {
                0 => t.replace('\n', "\r\n"),
                1 => t.replace('\n', "\r"),
                _ => t.replace('\n', " "),
            }
        }
        // Two lines swapped.
        14 => {
            let a = r.boundary(&t);
            let a = line_at(&t, a);
            let copy = t[a.clone()].to_owned();
            t.drain(a.clone());
            let b = r.boundary(&t);
            let b = line_at(&t, b);
            let other = t[b.clone()].to_owned();
            t.replace_range(b.clone(), &copy);
            let mut a = a.start.min(t.len());
            while !t.is_char_boundary(a) {
                a -= 1;
            }
            let a = line_at(&t, a).start;
            t.insert_str(a, &other);
        }
        // A random run of printable ASCII and TOML punctuation.
        _ => {
            let alphabet = b"\"'[]{}=,.:/-_ \n\t#0123456789abcdefxyz\\";
            let at = r.boundary(&t);
            let run: String =
                (0..1 + r.below(12)).map(|_| alphabet[r.below(alphabet.len())] as char).collect();
            t.insert_str(at, &run);
        }
    }
    t
}

/// What docs/CONFIG.md promises of an accepted config, where it can be read off the result.
fn prop_documented_rules(c: &Config) -> Result<(), String> {
    macro_rules! ensure {
        ($cond:expr, $($msg:tt)+) => {
            if !$cond {
                return Err(format!($($msg)+));
            }
        };
    }
    let prime = |n: u32| {
        let n = u64::from(n);
        n >= 2 && (2..n).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
    };
    let ms = |d: Duration, range: std::ops::RangeInclusive<u64>| {
        d.subsec_nanos().is_multiple_of(1_000_000) && range.contains(&(d.as_millis() as u64))
    };
    let n = &c.node;
    ensure!(!n.interfaces.is_empty(), "no interfaces");
    if let Some((_, len)) = n.encap_source_v4 {
        ensure!((16..=32).contains(&len), "encap_source_v4 length {len}");
    }
    if let Some(a) = n.encap_source_v6 {
        ensure!(
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some()
                || a.segments()[..6] == [0; 6]),
            "encap_source_v6 {a}"
        );
    }
    ensure!(n.mtu == 0 || (576..=65535).contains(&n.mtu), "mtu {}", n.mtu);
    ensure!(n.pin_dir.to_str().is_some_and(below_bpffs), "pin_dir {:?}", n.pin_dir);
    ensure!(n.admin_socket.is_absolute(), "admin_socket {:?}", n.admin_socket);
    ensure!(n.l7_threads.is_none_or(|t| (1..=256).contains(&t)), "l7_threads {:?}", n.l7_threads);
    ensure!((1..=256).contains(&n.l7_thread_count()), "l7_thread_count {}", n.l7_thread_count());
    ensure!(ms(n.l7_drain_timeout, 0..=3_600_000), "l7_drain_timeout {:?}", n.l7_drain_timeout);
    if let Some(f) = n.conntrack_flows_per_cpu {
        ensure!(
            f.is_power_of_two() && (4096..=1 << 20).contains(&f),
            "conntrack_flows_per_cpu {f}"
        );
    }
    ensure!(c.metrics.is_none_or(|m| m.port() != 0), "metrics.listen {:?}", c.metrics);
    ensure!(c.vips.len() <= MAX_VIPS as usize, "{} VIPs", c.vips.len());
    let unicast = |a: IpAddr| {
        let a = a.to_canonical();
        !a.is_unspecified() && !a.is_multicast() && a != IpAddr::V4(Ipv4Addr::BROADCAST)
    };
    let usable = |a: IpAddr| match a {
        IpAddr::V6(a) => {
            let compatible = a.segments()[..6] == [0; 6] && !a.is_unspecified() && !a.is_loopback();
            a.to_ipv4_mapped().is_none() && !a.is_unicast_link_local() && !compatible
        }
        IpAddr::V4(_) => true,
    };
    let mut names = HashSet::new();
    let mut listens = HashSet::new();
    let mut entries = 0;
    // L7 VIPs may proxy to one another in chains, never in a loop: peeling off the VIPs that
    // lead to no other L7 VIP still in play must leave none.
    let sa = |a: IpAddr, p: u16| std::net::SocketAddr::new(a.to_canonical(), p);
    let mut l7_left: Vec<&Vip> = c.vips.iter().filter(|v| v.forwarding == Forwarding::L7).collect();
    let pools = |v: &Vip| -> Vec<std::net::SocketAddr> {
        let routes = v.l7.iter().flat_map(|l| l.routes.iter().flat_map(|r| &r.backends));
        v.backends.iter().chain(routes).map(|b| sa(b.address, b.port)).collect()
    };
    loop {
        let listening: HashSet<_> = l7_left.iter().map(|v| sa(v.address, v.port)).collect();
        let before = l7_left.len();
        l7_left.retain(|v| pools(v).iter().any(|b| listening.contains(b)));
        if l7_left.len() == before {
            break;
        }
    }
    let in_loop: Vec<&str> = l7_left.iter().map(|v| v.name.as_str()).collect();
    ensure!(in_loop.is_empty(), "L7 VIPs {in_loop:?} proxy to each other in a loop");
    for v in &c.vips {
        let name = &v.name;
        ensure!(!name.is_empty(), "a VIP without a name");
        ensure!(
            name.parse::<IpAddr>().is_err() && name.parse::<std::net::SocketAddr>().is_err(),
            "VIP name {name} is an address"
        );
        ensure!(names.insert(name.clone()), "VIP name {name} twice");
        ensure!(listens.insert((v.address, v.port, v.protocol)), "VIP {name}: listen twice");
        ensure!(unicast(v.address) && usable(v.address), "VIP {name}: address {}", v.address);
        let mut seen = HashSet::new();
        for b in &v.backends {
            ensure!(b.weight <= 10_000, "VIP {name}: weight {}", b.weight);
            ensure!(unicast(b.address) && usable(b.address), "VIP {name}: backend {}", b.address);
            ensure!(seen.insert((b.address, b.port)), "VIP {name}: backend {} twice", b.address);
        }
        if let Some(h) = &v.health {
            ensure!(ms(h.interval, 10..=600_000), "VIP {name}: interval {:?}", h.interval);
            ensure!(ms(h.timeout, 10..=600_000), "VIP {name}: timeout {:?}", h.timeout);
            ensure!(h.timeout <= h.interval, "VIP {name}: timeout above interval");
            ensure!(
                (1..=100).contains(&h.rise) && (1..=100).contains(&h.fall),
                "VIP {name}: rise/fall"
            );
            if let CheckKind::Http { path, host, expect_status, .. } = &h.kind {
                ensure!(
                    path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic()),
                    "VIP {name}: health path {path:?}"
                );
                ensure!(
                    host.as_ref()
                        .is_none_or(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic())),
                    "VIP {name}: health host {host:?}"
                );
                ensure!((100..=599).contains(expect_status), "VIP {name}: status {expect_status}");
            }
            ensure!(
                h.proxy_protocol == v.l7.as_ref().and_then(|l| l.proxy_protocol),
                "VIP {name}: health proxy_protocol {:?}",
                h.proxy_protocol
            );
        }
        if v.forwarding == Forwarding::L7 {
            ensure!(v.port != 0 && v.protocol == Protocol::Tcp, "l7 VIP {name}: port or protocol");
            ensure!(v.conntrack && v.hash == HashMode::Client, "l7 VIP {name}: conntrack/hash");
            ensure!(v.ring_size == DEFAULT_RING_SIZE, "l7 VIP {name}: ring_size {}", v.ring_size);
            let Some(l) = &v.l7 else { return Err(format!("l7 VIP {name} without [vip.l7]")) };
            let own = |b: &Backend| {
                b.port != 0 && b.mac.is_none() && sa(b.address, b.port) != sa(v.address, v.port)
            };
            ensure!(v.backends.iter().all(own), "l7 VIP {name}: a backend port, mac or loop");
            ensure!(l.retries <= 10, "l7 VIP {name}: retries {}", l.retries);
            for (d, what) in [
                (l.connect_timeout, "connect"),
                (l.header_timeout, "header"),
                (l.response_timeout, "response"),
                (l.idle_timeout, "idle"),
                (l.request_timeout, "request"),
                (l.fail_timeout, "fail"),
            ] {
                ensure!(ms(d, 1..=3_600_000), "l7 VIP {name}: {what} timeout {d:?}");
            }
            ensure!(
                ms(l.tunnel_timeout, 1..=86_400_000),
                "l7 VIP {name}: tunnel timeout {:?}",
                l.tunnel_timeout
            );
            ensure!(
                (1_024..=1 << 20).contains(&l.max_header_bytes),
                "l7 VIP {name}: max_header_bytes"
            );
            ensure!((1..=1_000).contains(&l.max_headers), "l7 VIP {name}: max_headers");
            ensure!((1..=1_000_000).contains(&l.max_connections), "l7 VIP {name}: max_connections");
            ensure!(l.upstream_keepalive <= 100_000, "l7 VIP {name}: upstream_keepalive");
            ensure!((1..=100).contains(&l.max_fails), "l7 VIP {name}: max_fails");
            ensure!(
                matches!(l.proxy_protocol, None | Some(1 | 2)),
                "l7 VIP {name}: proxy_protocol"
            );
            ensure!(
                !l.cookie_name.is_empty()
                    && l.cookie_name
                        .bytes()
                        .all(|b| { b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b) }),
                "l7 VIP {name}: cookie_name {:?}",
                l.cookie_name
            );
            let cookie = l.algorithm == Algorithm::Cookie
                || l.routes.iter().any(|r| r.algorithm == Algorithm::Cookie);
            ensure!(!cookie || l.cookie_secret.len() >= 16, "l7 VIP {name}: cookie_secret");
            ensure!(
                l.cookie_secret_previous
                    .as_ref()
                    .is_none_or(|p| p.len() >= 16 && *p != l.cookie_secret),
                "l7 VIP {name}: cookie_secret_previous"
            );
            ensure!(
                l.cookie_attributes.is_empty()
                    || (l.cookie_attributes.starts_with("; ")
                        && l.cookie_attributes.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                        && !l.cookie_attributes.contains(',')),
                "l7 VIP {name}: cookie_attributes {:?}",
                l.cookie_attributes
            );
            ensure!(l.mode == L7Mode::Http || l.routes.is_empty(), "l7 VIP {name}: tcp routes");
            for r in &l.routes {
                ensure!(!r.backends.is_empty(), "l7 VIP {name}: a route without backends");
                ensure!(
                    r.host.is_some() || r.path_prefix.is_some(),
                    "l7 VIP {name}: catch-all route"
                );
                ensure!(
                    r.path_prefix.as_ref().is_none_or(|p| p.starts_with('/')),
                    "l7 VIP {name}: path_prefix {:?}",
                    r.path_prefix
                );
                let mut seen = HashSet::new();
                for b in &r.backends {
                    ensure!(own(b) && b.weight <= 10_000, "l7 VIP {name}: route backend {b:?}");
                    ensure!(unicast(b.address) && usable(b.address), "l7 VIP {name}: {b:?}");
                    ensure!(seen.insert((b.address, b.port)), "l7 VIP {name}: route backend twice");
                }
            }
        } else {
            ensure!(v.l7.is_none(), "VIP {name}: [vip.l7] without l7 forwarding");
            ensure!(
                prime(v.ring_size)
                    && (3..=MAX_RING_SIZE).contains(&v.ring_size)
                    && v.ring_size as usize >= v.backends.len(),
                "VIP {name}: ring_size {} for {} backends",
                v.ring_size,
                v.backends.len()
            );
            ensure!(v.health.as_ref().is_none_or(|h| h.port != 0), "VIP {name}: health port 0");
            for b in &v.backends {
                entries += 1;
                ensure!(b.port == v.port, "VIP {name}: backend {} has a port", b.address);
                ensure!(
                    !b.address.to_canonical().is_loopback()
                        && b.address.to_canonical() != v.address.to_canonical(),
                    "VIP {name}: backend {} loops",
                    b.address
                );
                if v.forwarding == Forwarding::L2 {
                    ensure!(b.mac.is_some(), "l2 VIP {name}: backend {} without mac", b.address);
                } else {
                    ensure!(b.mac.is_some() || n.gateway_mac.is_some(), "VIP {name}: no next hop");
                    ensure!(b.address.is_ipv6() || v.address.is_ipv4(), "VIP {name}: 6in4");
                    ensure!(
                        if b.address.is_ipv4() {
                            n.encap_source_v4.is_some()
                        } else {
                            n.encap_source_v6.is_some()
                        },
                        "VIP {name}: backend {} without an encap source",
                        b.address
                    );
                }
            }
        }
        if n.mtu != 0 {
            let v6 = v.address.is_ipv6()
                || (v.forwarding == Forwarding::Ipip
                    && v.backends.iter().any(|b| b.address.is_ipv6()));
            let encapsulated_v6 = v.address.is_ipv6() && v.forwarding == Forwarding::Ipip;
            ensure!(!v6 || n.mtu >= 1280, "VIP {name}: IPv6 with mtu {}", n.mtu);
            ensure!(
                !encapsulated_v6 || n.mtu >= 1320,
                "VIP {name}: encapsulated IPv6, mtu {}",
                n.mtu
            );
        }
    }
    ensure!(entries <= MAX_BACKENDS as usize, "{entries} backend entries");
    Ok(())
}

/// Checks one input: no panic, and either an error located inside `text` or a config that
/// keeps the documented rules; both the same when parsed again (under another file name, which
/// only appears in messages). The outcome (true: accepted), or what went wrong.
fn prop_check_config(text: &str) -> Result<bool, String> {
    let run = |path: &str| {
        std::panic::catch_unwind(|| Config::parse(text, Path::new(path))).map_err(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("the parser panicked: {what}")
        })
    };
    match (run("t.toml")?, run("other.toml")?) {
        (Ok(a), Ok(mut b)) => {
            prop_documented_rules(&a).map_err(|e| format!("accepted, but {e}"))?;
            // Cautions name their file.
            for c in &mut b.cautions {
                if let Some(rest) = c.strip_prefix("other.toml:") {
                    *c = format!("t.toml:{rest}");
                }
            }
            if a != b {
                return Err(format!("parsed twice, two configs:\n{a:?}\n{b:?}"));
            }
            Ok(true)
        }
        (Err(e), Err(again)) => {
            let shown = e.to_string();
            let ConfigError::Invalid { path, line, column, message } = e else {
                return Err(format!("not an Invalid error: {shown}"));
            };
            if !shown.starts_with(&format!("t.toml:{line}:{column}: "))
                || path != Path::new("t.toml")
            {
                return Err(format!("not `t.toml:{line}:{column}: ...`: {shown}"));
            }
            let lines: Vec<&str> = text.split('\n').collect();
            let Some(at) = lines.get(line.wrapping_sub(1)) else {
                return Err(format!("line {line} of {} lines: {shown}", lines.len()));
            };
            if column == 0 || column > at.chars().count() + 1 {
                return Err(format!(
                    "column {column} of a {}-char line: {shown}",
                    at.chars().count()
                ));
            }
            if message.trim().is_empty() {
                return Err(format!("no message: {shown}"));
            }
            match again {
                ConfigError::Invalid { line: l, column: c, message: m, .. }
                    if (l, c, &m) == (line, column, &message) => {}
                again => return Err(format!("refused twice, differently: {shown} / {again}")),
            }
            Ok(false)
        }
        (a, b) => Err(format!("accepted once, refused once: {:?} / {:?}", a.err(), b.err())),
    }
}

/// An input as a failure shows it: escaped, long ones cut.
fn prop_show(text: &str) -> String {
    let mut shown: String = text.chars().take(1500).collect::<String>().escape_debug().to_string();
    if text.chars().count() > 1500 {
        shown.push_str(&format!("... ({} bytes)", text.len()));
    }
    shown
}

/// Valid configs damaged at random (1 to 3 times each), a few thousand cases: see
/// [`prop_check_config`]. The valid ones themselves must pass, and both outcomes must occur.
#[test]
fn damaged_configs_never_panic_and_are_refused_in_place_or_valid() {
    let seed = prop_seed(0x0ed9_e1b0_c0f1_9001);
    let mut r = PropRng::new(seed);
    let bases = prop_valid_configs();
    for (i, base) in bases.iter().enumerate() {
        assert_eq!(prop_check_config(base), Ok(true), "base config {i} must be valid:\n{base}");
    }
    let start = std::time::Instant::now();
    let (mut accepted, mut refused, mut failures) = (0, 0, Vec::new());
    let cases = 3_000;
    for case in 0..cases {
        let mut text = bases[r.below(bases.len())].clone();
        for _ in 0..1 + r.below(3) {
            text = prop_mutate(&text, &mut r);
        }
        match prop_check_config(&text) {
            Ok(true) => accepted += 1,
            Ok(false) => refused += 1,
            Err(e) if failures.len() < 5 => {
                failures.push(format!("case {case}: {e}\n  input: \"{}\"", prop_show(&text)))
            }
            Err(_) => failures.push(String::new()),
        }
    }
    eprintln!(
        "{cases} cases in {:?}: {accepted} accepted, {refused} refused, {} failed",
        start.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "FUZZ_SEED={seed}: {} of {cases} cases failed; the first:\n{}",
        failures.len(),
        failures.iter().filter(|f| !f.is_empty()).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        accepted >= cases / 20 && refused >= cases / 2,
        "{accepted} accepted, {refused} refused"
    );
}

/// A route that an earlier route takes every request of (routes are tried in order) is refused,
/// naming both; a route that only overlaps an earlier one, or comes before a wider one, is not.
#[test]
fn a_route_hidden_by_an_earlier_one_is_refused() {
    let route = |host: Option<&str>, path: Option<&str>, to: &str| {
        let mut r = String::from("[[vip.route]]\n");
        if let Some(h) = host {
            r += &format!("host = \"{h}\"\n");
        }
        if let Some(p) = path {
            r += &format!("path_prefix = \"{p}\"\n");
        }
        r + &format!("backends = [{{ address = \"{to}\" }}]\n")
    };
    let vip = |routes: &[String]| {
        l7_vip("198.18.1.1", "{ address = \"198.18.0.11\" }", "", &routes.concat())
    };
    let hidden = [
        // A shorter prefix first.
        (route(None, Some("/api/"), "198.18.0.12"), route(None, Some("/api/v2/"), "198.18.0.13")),
        // Any host before one host, same prefix.
        (
            route(None, Some("/api/"), "198.18.0.12"),
            route(Some("a.example"), Some("/api/x"), "198.18.0.13"),
        ),
        // The host alone before the host with a prefix, spelled with a capital and a root dot.
        (
            route(Some("a.example"), None, "198.18.0.12"),
            route(Some("A.example."), Some("/x"), "198.18.0.13"),
        ),
        // The same matcher twice.
        (
            route(Some("a.example"), Some("/x"), "198.18.0.12"),
            route(Some("a.example"), Some("/x"), "198.18.0.13"),
        ),
    ];
    for (first, second) in &hidden {
        let e = err(&vip(&[first.clone(), second.clone()]));
        assert!(e.contains("this route never gets a request"), "{e}");
        assert!(e.contains("put the more specific route first"), "{e}");
        // Points at the second route's header.
        let line = vip(&[first.clone(), String::new()]).lines().count() + 1;
        assert!(e.contains(&format!(":{line}:")), "line {line}: {e}");
    }
    let fine = [
        (route(None, Some("/api/v2/"), "198.18.0.12"), route(None, Some("/api/"), "198.18.0.13")),
        (
            route(Some("a.example"), Some("/api/"), "198.18.0.12"),
            route(None, Some("/api/"), "198.18.0.13"),
        ),
        (route(None, Some("/api/"), "198.18.0.12"), route(Some("a.example"), None, "198.18.0.13")),
        (
            route(Some("a.example"), None, "198.18.0.12"),
            route(Some("b.example"), None, "198.18.0.13"),
        ),
        (route(None, Some("/api"), "198.18.0.12"), route(None, Some("/ap"), "198.18.0.13")),
    ];
    for (first, second) in &fine {
        parse(&vip(&[first.clone(), second.clone()])).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// An XDP VIP with `backends` (inline TOML tables) after NODE (which has interface eth0).
fn xdp_vip_with(extra: &str, backends: &str) -> String {
    format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\n{extra}\nbackends = [{backends}]\n"
    )
}

/// An l7 VIP with `extra` keys in [vip], then `tail` (routes, [vip.l7]).
fn l7_vip_with(backends: &str, tail: &str) -> String {
    format!(
        "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{backends}]\n{tail}"
    )
}

#[test]
fn encap_sources_backends_drop_are_refused() {
    let with = |src: &str| {
        format!(
            "[node]\ninterfaces = [\"eth0\"]\nencap_source_v4 = \"{src}\"\n[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nbackends = [{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}]\n"
        )
    };
    for (src, what) in [
        ("0.0.0.0/16", "0.0.0.0/8"),
        ("127.0.0.0/16", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/16", "multicast"),
        ("255.255.255.255", "reserved"),
        ("240.1.0.0/16", "reserved"),
    ] {
        let e = err(&with(src));
        assert!(e.starts_with("t.toml:3:19:") && e.contains(what), "{src}: {e}");
    }
    assert!(parse(&with("198.19.0.0/16")).is_ok());
    assert!(parse(&with("10.200.0.0/16")).is_ok());
}

/// The encap sources' lengths are digits, read by the parser `edgelb decap --allow-source` uses
/// too. A `+` before an IPv4 length was taken before (Rust's integer parser takes it): still
/// taken, so that a file that ran runs after an upgrade, with a caution that says how to write
/// it. The IPv6 length is `96` as written, as before: `+96` and `096` stay refused.
#[test]
fn encap_source_lengths_are_digits_and_a_plus_gets_a_caution() {
    for (key, src, want) in [
        ("encap_source_v4", "198.19.0.0/16", Ok(("198.19.0.0", 16))),
        ("encap_source_v4", "198.19.0.0", Ok(("198.19.0.0", 32))),
        ("encap_source_v4", "198.19.0.0/016", Ok(("198.19.0.0", 16))),
        ("encap_source_v4", "198.19.0.0/+16", Ok(("198.19.0.0", 16))),
        ("encap_source_v4", "198.19.0.0/", Err("16..=32")),
        ("encap_source_v4", "198.19.0.0/+", Err("16..=32")),
        ("encap_source_v4", "198.19.0.0/-16", Err("16..=32")),
        ("encap_source_v4", "198.19.0.0/ 16", Err("16..=32")),
        ("encap_source_v4", "198.19.0.0/15", Err("16..=32")),
        ("encap_source_v4", "198.19.0.0/33", Err("16..=32")),
        ("encap_source_v4", "198.19.0.0/272", Err("16..=32")),
        ("encap_source_v4", "2001:db8::/16", Err("not an IPv4 prefix")),
        ("encap_source_v6", "2001:db8:ff::/96", Ok(("2001:db8:ff::", 96))),
        ("encap_source_v6", "2001:db8:ff::", Ok(("2001:db8:ff::", 96))),
        ("encap_source_v6", "2001:db8:ff::/+96", Err("must be a /96")),
        ("encap_source_v6", "2001:db8:ff::/096", Err("must be a /96")),
        ("encap_source_v6", "2001:db8:ff::/", Err("must be a /96")),
        ("encap_source_v6", "198.19.0.0/96", Err("not an IPv6 prefix")),
    ] {
        // Line 3, or line 4 after NODE's encap_source_v4.
        let (text, line) = match key {
            "encap_source_v4" => {
                (format!("[node]\ninterfaces = [\"eth0\"]\n{key} = \"{src}\"\n"), 3)
            }
            _ => (format!("{NODE}{key} = \"{src}\"\n"), 4),
        };
        match want {
            Ok((addr, len)) => {
                let c = parse(&text).unwrap_or_else(|e| panic!("{src}: {e}"));
                let got = if key == "encap_source_v4" {
                    c.node.encap_source_v4.map(|(a, l)| (IpAddr::V4(a), l))
                } else {
                    c.node.encap_source_v6.map(|a| (IpAddr::V6(a), 96))
                };
                assert_eq!(got, Some((addr.parse().unwrap(), len)), "{src}");
                if src.contains('+') {
                    let [caution] = c.cautions.as_slice() else {
                        panic!("{src}: {:?}", c.cautions)
                    };
                    assert_eq!(
                        caution,
                        &format!(
                            "t.toml:{line}:19: {key} `{src}`: a prefix length is digits alone, without a `+`: read as {addr}/{len}, which is how to write it"
                        )
                    );
                } else {
                    assert!(c.cautions.is_empty(), "{src}: {:?}", c.cautions);
                }
            }
            Err(says) => {
                let e = err(&text);
                assert!(
                    e.starts_with(&format!("t.toml:{line}:19:")) && e.contains(says),
                    "{src}: {e}"
                );
            }
        }
    }
}

#[test]
fn macs_must_be_one_stations_address() {
    let be =
        |mac: &str| xdp_vip_with("", &format!("{{ address = \"198.18.0.11\", mac = \"{mac}\" }}"));
    for (mac, what) in [
        ("ff:ff:ff:ff:ff:ff", "group"),
        ("01:00:5e:00:00:01", "group"),
        ("00:00:00:00:00:00", "no station"),
        ("+2:0:0:0:0:1", "not a MAC"),
        ("2:00:00:00:00:01", "not a MAC"),
        ("002:00:00:00:00:01", "not a MAC"),
    ] {
        let e = err(&be(mac));
        assert!(e.starts_with("t.toml:9:") && e.contains(what), "{mac}: {e}");
    }
    assert_eq!(
        parse(&be("02:AB:cd:00:00:01")).unwrap().vips[0].backends[0].mac,
        Some([2, 0xab, 0xcd, 0, 0, 1])
    );
    let node = |key: &str| {
        format!(
            "[node]\ninterfaces = [\"eth0\"]\nencap_source_v4 = \"198.19.0.0/16\"\n{key} = \"01:00:00:00:00:01\"\n"
        )
    };
    for key in ["gateway_mac", "src_mac"] {
        let e = err(&node(key));
        assert!(e.starts_with("t.toml:4:") && e.contains("group"), "{key}: {e}");
    }
}

#[test]
fn interface_names_the_kernel_cannot_have_are_refused() {
    let with =
        |list: &str| format!("[node]\ninterfaces = {list}\nencap_source_v4 = \"198.19.0.0/16\"\n");
    for (list, what) in [
        ("[\"\"]", "empty"),
        ("[\"averyveryverylongname\"]", "at most 15 bytes"),
        ("[\"../etc\"]", "cannot be an interface"),
        ("[\"eth0:1\"]", "cannot be an interface"),
        ("[\"eth 0\"]", "cannot be an interface"),
        ("[\"eth0\", \"eth1\", \"eth0\"]", "twice"),
    ] {
        let e = err(&with(list));
        assert!(e.starts_with("t.toml:2:14:") && e.contains(what), "{list}: {e}");
    }
    assert!(parse(&with("[\"eth0\", \"enp1s0f1np1\", \"bond0.100\"]")).is_ok());
}

#[test]
fn loopback_vips_are_for_the_proxy_only() {
    for addr in ["127.0.0.1", "::1"] {
        let text = xdp_vip_with("", "{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }")
            .replace("198.18.1.1", addr)
            .replace(
                "encap_source_v4 = \"198.19.0.0/16\"",
                "encap_source_v4 = \"198.19.0.0/16\"\nencap_source_v6 = \"2001:db8:ff::/96\"",
            );
        let e = err(&text);
        assert!(e.contains("loopback address") && e.contains("l7"), "{addr}: {e}");
    }
    let l7 = l7_vip_with("{ address = \"127.0.0.1\", port = 8080 }", "")
        .replace("198.18.1.1", "127.0.0.1");
    assert!(parse(&l7).is_ok());
}

#[test]
fn route_hosts_with_wildcards_are_refused() {
    for host in ["*.example.com", "*"] {
        let text = l7_vip_with(
            "{ address = \"198.18.0.11\", port = 8080 }",
            &format!(
                "[[vip.route]]\nhost = \"{host}\"\nbackends = [{{ address = \"198.18.0.12\", port = 8080 }}]\n"
            ),
        );
        let e = err(&text);
        assert!(e.starts_with("t.toml:11:8:") && e.contains("wildcards are not supported"), "{e}");
    }
}

#[test]
fn path_prefixes_clients_send_encoded_are_refused_with_their_encoding() {
    let route = |prefix: &str| {
        l7_vip_with(
            "{ address = \"198.18.0.11\", port = 8080 }",
            &format!(
                "[[vip.route]]\npath_prefix = \"{prefix}\"\nbackends = [{{ address = \"198.18.0.12\", port = 8080 }}]\n"
            ),
        )
    };
    let e = err(&route("/ü"));
    assert!(e.starts_with("t.toml:11:15:") && e.contains("write path_prefix = \"/%C3%BC\""), "{e}");
    let e = err(&route("/a\\u007f"));
    assert!(e.contains("write path_prefix = \"/a%7F\""), "{e}");
    // A `;` parameter in a prefix: every request for it reads as another path without it.
    let e = err(&route("/admin;v=1/"));
    assert!(e.contains("holds a `;` parameter") && e.contains("%3B"), "{e}");
    // What the error suggests is taken.
    assert!(parse(&route("/%C3%BC")).is_ok());
}

#[test]
fn udp_probes_must_fit_one_datagram() {
    let check = |send: usize, expect: usize| {
        format!(
            "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 53\nprotocol = \"udp\"\nbackends = [{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}]\n[vip.health]\nsend = \"{}\"\nexpect = \"{}\"\n",
            "s".repeat(send),
            "e".repeat(expect)
        )
    };
    assert!(parse(&check(MAX_UDP_PROBE, MAX_UDP_PROBE)).is_ok());
    let e = err(&check(MAX_UDP_PROBE + 1, 1));
    assert!(e.starts_with("t.toml:11:8:") && e.contains("65507"), "{e}");
    let e = err(&check(1, MAX_UDP_PROBE + 1));
    assert!(e.starts_with("t.toml:12:10:") && e.contains("65507"), "{e}");
}

/// A binary probe (DNS) is written in hex: bytes a TOML string cannot hold as such.
#[test]
fn udp_probes_take_bytes_in_hex() {
    let check = |health: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"a\"\naddress = \"198.18.1.1\"\nport = 53\nprotocol = \"udp\"\nbackends = [{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}]\n[vip.health]\n{health}\n"
        )
    };
    let kind = |health: &str| parse(&check(health)).unwrap().vips[0].health.clone().unwrap().kind;
    assert_eq!(
        kind("send_hex = \"AB12 0100\"\nexpect_hex = \"8180\""),
        CheckKind::Udp { send: vec![0xab, 0x12, 0x01, 0x00], expect: Some(vec![0x81, 0x80]) }
    );
    // Text and hex mix: each payload one way or the other.
    assert_eq!(
        kind("send = \"ping\"\nexpect_hex = \"00ff\""),
        CheckKind::Udp { send: b"ping".to_vec(), expect: Some(vec![0x00, 0xff]) }
    );
    let e = err(&check("send_hex = \"ab1\""));
    assert!(e.starts_with("t.toml:11:12:") && e.contains("`1` at 2 has no second digit"), "{e}");
    // Spaces go between bytes, not within one.
    let e = err(&check("send_hex = \"a b\""));
    assert!(e.contains("`a` at 0 has no second digit"), "{e}");
    let e = err(&check("send_hex = \"zz\""));
    assert!(e.contains("`z` is not a hex digit"), "{e}");
    let e = err(&check("send_hex = \"  \""));
    assert!(e.contains("no bytes"), "{e}");
    let e = err(&check("send = \"a\"\nsend_hex = \"61\""));
    assert!(e.contains("both given"), "{e}");
    let e = err(&check("expect_hex = \"61\""));
    assert!(e.contains("needs `send` or `send_hex`"), "{e}");
    // One datagram at most, counted in bytes.
    let e = err(&check(&format!("send_hex = \"{}\"", "ab".repeat(MAX_UDP_PROBE + 1))));
    assert!(e.contains("65508 bytes"), "{e}");
    // Not on another kind of check.
    let e = err(&check("kind = \"tcp\"\nexpect_hex = \"61\""));
    assert!(e.contains("`expect_hex` applies only to kind = \"udp\""), "{e}");
}

#[test]
fn every_positive_weight_gets_a_slot_of_the_ring() {
    let two = |ring: &str, w: u32| {
        xdp_vip_with(
            ring,
            &format!(
                "{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\", weight = 10000 }}, {{ address = \"198.18.0.12\", mac = \"02:00:00:00:00:01\", weight = {w} }}"
            ),
        )
    };
    // 1 × 101 slots < 10001: a share of 0.01 slots, which rounds to none.
    let e = err(&two("ring_size = 101", 1));
    assert!(
        e.contains("198.18.0.12") && e.contains("at least 100") && e.contains("raise ring_size"),
        "{e}"
    );
    // The weight it names is enough, and a drained backend (weight 0) is no one's mistake.
    assert!(parse(&two("ring_size = 101", 100)).is_ok());
    assert!(parse(&two("ring_size = 101", 0)).is_ok());
    // And the ring then really gives it slots.
    let cfg = parse(&two("ring_size = 101", 100)).unwrap();
    let members: Vec<_> = cfg.vips[0]
        .backends
        .iter()
        .map(|b| crate::maglev::RingMember::from_socket_addr((b.address, 0).into(), b.weight))
        .collect();
    use crate::maglev::ConsistentHash;
    let ring = crate::maglev::Maglev.build(&members, 101).unwrap();
    assert!(ring.contains(&1), "the weight-100 backend has no slot");
    // l7 `hash` pools have a ring of their own (4093 slots).
    let l7 = l7_vip_with(
        "{ address = \"198.18.0.11\", port = 8080, weight = 10000 }, { address = \"198.18.0.12\", port = 8080, weight = 1 }",
        "[vip.l7]\nalgorithm = \"hash\"\n",
    );
    let e = err(&l7);
    assert!(e.contains("198.18.0.12") && e.contains("fixed: 4093 slots"), "{e}");
    assert!(parse(&l7.replace("algorithm = \"hash\"", "algorithm = \"weighted\"")).is_ok());
}

#[test]
fn hints_quote_the_fields_own_range() {
    let weight = |w: &str| {
        xdp_vip_with(
            "",
            &format!("{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\", weight = {w} }}"),
        )
    };
    let e = err(&weight("1.5"));
    assert!(e.contains("0..=10000") && !e.contains("4294967295"), "{e}");
    let e = err(&weight("4294967296"));
    assert!(e.contains("0..=10000") && !e.contains("4294967295"), "{e}");
    // A number beyond TOML's i64 is named with its key, not left as serde's words.
    let e = err(&xdp_vip_with("", "{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }")
        .replace("port = 80", "port = 18446744073709551615"));
    assert!(
        e.contains("`port` = 18446744073709551615 is out of range") && e.contains("0..=65535"),
        "{e}"
    );
    // Every range the hints quote is the one validation enforces: the bounds pass, one past
    // them fails, with the same words.
    for &(key, lo, hi) in RANGES {
        let text = |v: u64| {
            let be = "{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }";
            match key {
                "weight" => xdp_vip_with(
                    "",
                    &format!(
                        "{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\", weight = {v} }}"
                    ),
                ),
                "ring_size" => xdp_vip_with(&format!("ring_size = {v}"), be),
                "l7_threads" | "l7_drain_timeout_ms" => {
                    xdp_vip_with("", be).replace("[[vip]]", &format!("{key} = {v}\n[[vip]]"))
                }
                "interval_ms" | "timeout_ms" | "rise" | "fall" | "expect_status" => {
                    let interval = if key == "interval_ms" { "" } else { "interval_ms = 600000\n" };
                    xdp_vip_with("", be)
                        + &format!("[vip.health]\nkind = \"http\"\n{interval}{key} = {v}\n")
                }
                _ => l7_vip_with(
                    "{ address = \"198.18.0.11\", port = 8080 }",
                    &format!("[vip.l7]\n{key} = {v}\n"),
                ),
            }
        };
        // ring_size must also be prime: its bounds are.
        assert!(parse(&text(hi)).is_ok(), "{key} = {hi}: {}", err(&text(hi)));
        assert!(parse(&text(lo)).is_ok(), "{key} = {lo}: {}", err(&text(lo)));
        let e = err(&text(hi + 1));
        assert!(e.contains(key) && e.contains(&hi.to_string()), "{key} = {}: {e}", hi + 1);
        if lo > 0 {
            let e = err(&text(lo - 1));
            assert!(e.contains(&lo.to_string()), "{key} = {}: {e}", lo - 1);
        }
    }
}

/// Fields whose values are not one range (`mtu`: 0 or 576..=65535) are said in their own words
/// by the hints too, not with their type's range; and those words are validation's.
#[test]
fn hints_quote_the_fields_own_values() {
    // A valid value of each, and the type's range the hint must not quote.
    let cases = [("mtu", 1500, "4294967295"), ("conntrack_flows_per_cpu", 65536, "4294967295")];
    let cases = cases.into_iter().chain([("proxy_protocol", 2, "255")]);
    for (key, good, type_max) in cases {
        let (words, ok) = form(key);
        let text = |v: &str| match key {
            "proxy_protocol" => l7_vip_with(
                "{ address = \"198.18.0.11\", port = 8080 }",
                &format!("[vip.l7]\n{key} = {v}\n"),
            ),
            _ => format!("{NODE}{key} = {v}\n"),
        };
        assert!(ok(good) && parse(&text(&good.to_string())).is_ok(), "{key} = {good}");
        let past_type = (type_max.parse::<u64>().unwrap() + 1).to_string();
        for (v, says) in [
            (past_type.as_str(), format!("`{key}` = {past_type} is out of range: {words}")),
            ("18446744073709551616", format!("is out of range: {words}")),
            ("-1", format!("`{key}` = -1: write {words}, not negative")),
            ("2.5", format!("is not a whole number: write {words}")),
            ("\"x\"", format!("write {words}, without quotes")),
        ] {
            let e = err(&text(v));
            assert!(e.contains(&says) && !e.contains(type_max), "{key} = {v}: {e}");
        }
        // A valid value in quotes is told to lose them; one out of the field's values is not
        // offered, however it fits the type.
        let e = err(&text(&format!("\"{good}\"")));
        assert!(e.contains(&format!("write a number without quotes, {key} = {good}")), "{e}");
        let e = err(&text("\"3\""));
        assert!(e.contains(&format!("write {words}, without quotes")), "{key}: {e}");
        // Validation's words for a value of the type but not of the field.
        let e = err(&text("3"));
        assert!(e.contains(&format!("{key} must be {words} (got 3)")), "{e}");
    }
    assert!(form("conntrack_flows_per_cpu").0.contains(&MIN_CONNTRACK_FLOWS.to_string()));
    assert!(form("conntrack_flows_per_cpu").0.contains(&MAX_CONNTRACK_FLOWS.to_string()));
}

#[test]
fn udp_probes_of_a_tcp_vips_own_port_are_refused() {
    let check = |health: &str| {
        xdp_vip_with("", "{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }")
            + &format!("[vip.health]\n{health}\n")
    };
    let e = err(&check("kind = \"udp\"\nsend = \"ping\""));
    assert!(e.starts_with("t.toml:11:8:") && e.contains("nothing answers"), "{e}");
    // Beside the service, on a port of its own, a UDP responder may answer.
    assert!(parse(&check("kind = \"udp\"\nsend = \"ping\"\nport = 9999")).is_ok());
    // An l7 VIP is tcp too.
    let l7 = l7_vip_with(
        "{ address = \"198.18.0.11\", port = 8080 }",
        "[vip.health]\nkind = \"udp\"\nsend = \"x\"\n",
    );
    assert!(err(&l7).contains("nothing answers"));
    // A port written is the operator's word that a UDP responder answers there, even the one
    // the backends serve TCP on: DNS answers UDP and TCP on 53, QUIC UDP 443 beside HTTPS.
    let h = parse(&check("kind = \"udp\"\nsend = \"ping\"\nport = 80")).unwrap().vips[0]
        .health
        .clone()
        .unwrap();
    assert_eq!(h.port, 80);
    let c = parse(&format!("{l7}port = 8080\n")).unwrap();
    assert_eq!(c.vips[0].health.as_ref().map(|h| h.port), Some(8080));
    assert!(c.cautions.is_empty(), "{:?}", c.cautions);
    assert!(parse(&format!("{l7}port = 8081\n")).is_ok());
}

/// A TCP or HTTP probe of a UDP VIP without a `port` goes to its UDP port, where a UDP-only
/// service never answers (every backend down, the VIP failing open); where a TCP service answers
/// too (DNS) it works, and such files worked before: accepted, with a caution naming the VIP
/// and where the check's kind is written.
#[test]
fn tcp_probes_of_a_udp_vip_without_a_port_are_cautioned() {
    let check = |health: &str| {
        format!(
            "{NODE}[[vip]]\nname = \"q\"\naddress = \"198.18.1.1\"\nport = 443\nprotocol = \"udp\"\nbackends = [{{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:01\" }}]\n[vip.health]\n{health}\n"
        )
    };
    for kind in ["tcp", "http"] {
        let t = check(&format!("kind = \"{kind}\""));
        let c = parse(&t).unwrap();
        assert_eq!(c.vips[0].health.as_ref().map(|h| h.port), Some(443));
        let [caution] = c.cautions.as_slice() else { panic!("one caution: {:?}", c.cautions) };
        let want = format!("kind = \"{kind}\" on a udp VIP has no `port`");
        assert!(
            caution.starts_with(&at(&t, &format!("\"{kind}\"")))
                && caution.contains("VIP `q`")
                && caution.contains(&want),
            "{caution}"
        );
        // Written out, even the VIP's own port: the operator says a TCP service answers there
        // (DNS over TCP on 53). No caution.
        let c = parse(&check(&format!("kind = \"{kind}\"\nport = 443"))).unwrap();
        assert_eq!(c.vips[0].health.as_ref().map(|h| h.port), Some(443));
        assert!(c.cautions.is_empty(), "{:?}", c.cautions);
        assert!(parse(&check(&format!("kind = \"{kind}\"\nport = 8080"))).is_ok());
    }
    // The default kind of a UDP VIP is udp, which needs no port.
    assert!(parse(&check("send = \"ping\"")).unwrap().cautions.is_empty());
}

/// Browsers keep cookies by host whatever the port, and one with `Domain` for every host under
/// it: two cookie-sticky VIPs on one address (neither with a `Domain`), or with one `Domain`
/// whatever their addresses, share the cookies of their pools with one name and path. With
/// secrets one does not take from the other, or backends that differ in such a pair of pools,
/// each would set its own over the other's (a client of both going from backend to backend):
/// accepted, with a caution at the later VIP's address naming both. With the same secret and
/// backends, one rotation's two secrets swapped, another cookie name, another address without
/// `Domain`, one VIP with a `Domain` and the other without, routes of different hosts without
/// `Domain`, or one not cookie-sticky, none.
#[test]
fn cookie_vips_sharing_their_cookies_with_other_secrets_or_backends_are_cautioned() {
    let backends = |ports: &[u16]| {
        let list: Vec<String> =
            ports.iter().map(|p| format!("{{ address = \"198.18.0.11\", port = {p} }}")).collect();
        list.join(", ")
    };
    let vip = |name: &str, address: &str, port: u16, ports: &[u16], l7: &str| {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\nforwarding = \"l7\"\nbackends = [{}]\n[vip.l7]\n{l7}\n",
            backends(ports)
        )
    };
    let route = |prefix: &str, ports: &[u16]| {
        format!("[[vip.route]]\npath_prefix = \"{prefix}\"\nbackends = [{}]\n", backends(ports))
    };
    let host_route = |host: &str, ports: &[u16]| {
        format!(
            "[[vip.route]]\nhost = \"{host}\"\nalgorithm = \"cookie\"\nbackends = [{}]\n",
            backends(ports)
        )
    };
    let sticky = |secret: &str| format!("algorithm = \"cookie\"\ncookie_secret = \"{secret}\"");
    let (s1, s2) = (sticky("0123456789abcdef"), sticky("fedcba9876543210"));
    // Cookie routes, the VIP's own backends round-robin.
    let plain = "algorithm = \"round_robin\"\ncookie_secret = \"0123456789abcdef\"".to_owned();
    let domain = |l7: &str, d: &str| format!("{l7}\ncookie_attributes = \"Domain={d}\"");
    let rotation = |current: &str, previous: &str| {
        format!("{}\ncookie_secret_previous = \"{previous}\"", sticky(current))
    };
    let file = |first: String, second: String| format!("{NODE}{first}{second}");
    let a = vip("a", "198.18.1.6", 80, &[8000], &s1);
    let cautions = |t: &str| parse(t).unwrap_or_else(|e| panic!("{e}\n{t}")).cautions;
    let on_one_address = "VIP `b`: its sticky cookie `edgelb` and VIP `a`'s are one to browsers if clients reach both by one host name (198.18.1.6, ports 80 and 8080";
    let under_a_domain = "VIP `b`: its sticky cookie `edgelb` and VIP `a`'s are one to browsers if clients reach both by host names under example.com (both set Domain=example.com)";
    for (first, second, at, says) in [
        (
            a.clone(),
            vip("b", "198.18.1.6", 8080, &[8000], &s2),
            "\"198.18.1.6\"",
            [on_one_address, "but are signed with secrets the other does not take:"],
        ),
        (
            a.clone(),
            vip("b", "198.18.1.6", 8080, &[8001], &s1),
            "\"198.18.1.6\"",
            [on_one_address, "but name different backends:"],
        ),
        (
            a.clone(),
            vip("b", "198.18.1.6", 8080, &[8001], &s2),
            "\"198.18.1.6\"",
            [
                on_one_address,
                "but are signed with secrets the other does not take and name different backends:",
            ],
        ),
        // One Domain, two addresses: the cookies are one under it.
        (
            vip("a", "198.18.1.6", 80, &[8000], &domain(&s1, "example.com")),
            vip("b", "198.18.1.7", 8080, &[8000], &domain(&s2, "Example.com")),
            "\"198.18.1.7\"",
            [under_a_domain, "but are signed with secrets the other does not take:"],
        ),
        // The VIPs' backends are one set, but not those of their pools of one cookie.
        (
            vip("a", "198.18.1.6", 80, &[8000, 8001], &s1),
            format!("{}{}", vip("b", "198.18.1.6", 8080, &[8000], &s1), route("/api/", &[8001])),
            "\"198.18.1.6\"",
            [on_one_address, "but name different backends:"],
        ),
        // Routes of one host without a Domain (the VIPs' own backends not sticky): one cookie
        // to the browsers of that host.
        (
            format!(
                "{}{}",
                vip("a", "198.18.1.6", 80, &[8000], &plain),
                host_route("www.example.com", &[8001])
            ),
            format!(
                "{}{}",
                vip("b", "198.18.1.6", 8080, &[8000], &plain),
                host_route("www.example.com", &[8002])
            ),
            "\"198.18.1.6\"",
            [on_one_address, "but name different backends:"],
        ),
    ] {
        let t = file(first, second);
        let [caution] = cautions(&t).try_into().unwrap_or_else(|c| panic!("one caution: {c:?}"));
        assert!(
            caution.starts_with(&at_last(&t, at)) && says.iter().all(|s| caution.contains(s)),
            "{caution}"
        );
    }
    for (first, second) in [
        (a.clone(), vip("b", "198.18.1.6", 8080, &[8000], &s1)),
        (
            a.clone(),
            vip("b", "198.18.1.6", 8080, &[8000], &format!("{s2}\ncookie_name = \"other\"")),
        ),
        (a.clone(), vip("b", "198.18.1.7", 8080, &[8001], &s2)),
        (a.clone(), vip("b", "198.18.1.6", 8080, &[8001], "algorithm = \"round_robin\"")),
        // A rotation under way: each takes the other's cookies, and no client moves.
        (
            vip("a", "198.18.1.6", 80, &[8000], &rotation("0123456789abcdef", "fedcba9876543210")),
            vip(
                "b",
                "198.18.1.6",
                8080,
                &[8000],
                &rotation("fedcba9876543210", "0123456789abcdef"),
            ),
        ),
        // With a Domain and without, or with two Domains, the cookies are not one.
        (a.clone(), vip("b", "198.18.1.6", 8080, &[8001], &domain(&s2, "example.com"))),
        (
            vip("a", "198.18.1.6", 80, &[8000], &domain(&s1, "example.org")),
            vip("b", "198.18.1.6", 8080, &[8001], &domain(&s2, "example.com")),
        ),
        // Routes of different hosts without a Domain: a browser keeps each host's cookie apart.
        (
            format!(
                "{}{}",
                vip("a", "198.18.1.6", 80, &[8000], &plain),
                host_route("www.example.com", &[8001])
            ),
            format!(
                "{}{}",
                vip("b", "198.18.1.6", 8080, &[8000], &plain),
                host_route("api.example.com", &[8002])
            ),
        ),
        // Pools with one name but other paths keep their own cookies.
        (
            a.clone(),
            format!("{}{}", vip("b", "198.18.1.6", 8080, &[8000], &s1), route("/api/", &[8001])),
        ),
    ] {
        let t = file(first, second);
        assert!(cautions(&t).is_empty(), "{:?}\n{t}", cautions(&t));
    }
}

/// `n` routes of an L7 VIP, none hidden by another: a host for each group of eight, with a
/// path each, and every eighth route without a host (a path of its own).
fn many_routes(n: usize) -> String {
    (0..n)
        .map(|i| {
            let matcher = if i % 8 == 0 {
                format!("path_prefix = \"/p{i}/\"\n")
            } else {
                format!("host = \"h{}.example\"\npath_prefix = \"/x{}/\"\n", i / 8, i % 8)
            };
            format!("[[vip.route]]\n{matcher}backends = [{{ address = \"198.18.0.12\" }}]\n")
        })
        .collect()
}

/// The hidden-route check compares a route only with the earlier routes of its own host and of
/// any host: a VIP with a route per host makes no comparison, where comparing every pair made
/// half a million at 1024 routes (and the answers are those of comparing every pair).
#[test]
fn the_hidden_route_check_compares_only_routes_a_host_can_reach() {
    let mut earlier = EarlierRoutes::default();
    let hosts: Vec<String> = (0..1024).map(|i| format!("h{i}.example")).collect();
    for h in &hosts {
        assert_eq!(earlier.hiding(Some(h), Some("/")), None);
        earlier.push(Some(h.clone()), Some("/"));
    }
    assert_eq!(earlier.compared, 0, "routes of other hosts are not compared");
    // The answers: the earliest route of the same host or of any host that covers the path.
    let (h, path) = ("h7.example", Some("/api/v2/x"));
    assert_eq!(earlier.hiding(Some(h), path), Some(7));
    assert_eq!(earlier.hiding(Some("other.example"), path), None);
    assert_eq!(earlier.hiding(None, Some("/")), None, "a host route hides no host-less one");
    earlier.push(None, Some("/api/"));
    assert_eq!(earlier.hiding(None, Some("/api/v2/")), Some(1024));
    assert_eq!(earlier.hiding(Some("new.example"), Some("/api/v2/")), Some(1024));
    assert_eq!(earlier.hiding(Some(h), path), Some(7), "the earlier of the two");
    assert_eq!(earlier.hiding(Some("new.example"), Some("/ap")), None);
    assert_eq!(earlier.hiding(Some("new.example"), None), None, "any path is not /api/'s");
    earlier.push(None, None);
    assert_eq!(earlier.hiding(Some("new.example"), None), Some(1025));
}

/// Routes without a host are compared only with the earlier paths that are prefixes of theirs,
/// not with every earlier route: 20 000 of them made
/// 200 million comparisons, 3.7 s on the controller's thread at every reload. The answers are
/// those of comparing every pair, on paths that hide one another in every way (nested, equal,
/// cut mid-segment, none), with hosts and without.
#[test]
fn the_hidden_route_check_compares_a_path_only_with_its_prefixes() {
    let n = 20_000;
    let mut earlier = EarlierRoutes::default();
    let paths: Vec<String> = (0..n).map(|i| format!("/s{}/r{i}/", i % 100)).collect();
    for p in &paths {
        assert_eq!(earlier.hiding(None, Some(p)), None, "{p}");
        earlier.push(None, Some(p));
    }
    assert!(earlier.compared <= 8 * n, "{} comparisons for {n} routes", earlier.compared);
    // Deeper paths, as many routes again: each compared with about its depth.
    let deep: Vec<String> = (0..n).map(|i| format!("/a/b{}/c{}/d{i}/", i % 10, i % 100)).collect();
    let before = earlier.compared;
    for p in &deep {
        assert_eq!(earlier.hiding(None, Some(p)), None, "{p}");
        earlier.push(None, Some(p));
    }
    assert!(earlier.compared - before <= 8 * n, "{}", earlier.compared - before);
    assert_eq!(earlier.hiding(None, Some("/s7/r7/x")), Some(7));
    assert_eq!(earlier.hiding(Some("h.example"), Some("/a/b3/c13/d113/z")), Some(n + 113));
    assert_eq!(earlier.hiding(None, Some("/s7/r")), None, "cut short, no route's prefix");

    // Against every pair, on a small alphabet, pushing hidden routes too.
    let seed = prop_seed(0x51de_0f7a_7e00);
    let mut r = PropRng::new(seed);
    for round in 0..200 {
        let routes: Vec<(Option<String>, Option<String>)> = (0..40)
            .map(|_| {
                let host = [None, Some("a"), Some("b")][r.below(3)].map(str::to_owned);
                let path = (r.below(8) != 0).then(|| {
                    let len = r.below(6);
                    (0..len).map(|_| ["/", "x", "y", "é"][r.below(4)]).collect::<String>()
                });
                (host, path)
            })
            .collect();
        let mut earlier = EarlierRoutes::default();
        for (j, (host, path)) in routes.iter().enumerate() {
            let naive = routes[..j].iter().position(|(h, p)| {
                (h.is_none() || h == host)
                    && p.as_deref()
                        .is_none_or(|p| path.as_deref().is_some_and(|q| q.starts_with(p)))
            });
            assert_eq!(
                earlier.hiding(host.as_deref(), path.as_deref()),
                naive,
                "seed {seed:#x}, round {round}: route {j} of {routes:?}"
            );
            earlier.push(host.clone(), path.as_deref());
        }
    }
}

/// Paths that share ever longer starts with one another, `/y`, `/zy`, `/zzy` and so on (a
/// valid file: none is a prefix of another), are each compared with none of the others: the
/// paths were kept sorted, and a route stepped back through them a byte at a time, each step a
/// search and a scan of the path, so 3000 such routes took 277 s to check (debug build) and
/// the steps counted here were about n²/2. The walk through the trie reads each path once.
#[test]
fn the_hidden_route_check_does_not_step_through_paths_sharing_a_start() {
    let n = 2000;
    let mut earlier = EarlierRoutes::default();
    let paths: Vec<String> = (0..n).map(|i| format!("/{}y", "z".repeat(i))).collect();
    for p in &paths {
        assert_eq!(earlier.hiding(None, Some(p)), None, "{p}");
        earlier.push(None, Some(p));
    }
    assert!(earlier.compared <= 8 * n, "{} comparisons for {n} routes", earlier.compared);
    let hidden = format!("/{}y/x", "z".repeat(700));
    assert_eq!(earlier.hiding(Some("h.example"), Some(&hidden)), Some(700));
    assert_eq!(earlier.hiding(None, Some(&format!("/{}", "z".repeat(n)))), None);
    earlier.push(None, Some("/"));
    assert_eq!(earlier.hiding(None, Some(&hidden)), Some(700), "the earlier of the two");
    assert_eq!(earlier.hiding(None, Some("/zz")), Some(n));
}

/// A VIP may have any number of routes. A request is matched against the routes of its host
/// and those for every host: where one request may be matched against more than 1024, the
/// file is accepted with a caution at that route (files with more ran before it was said),
/// while routes of other hosts count for nothing, so 5000 virtual hosts of a route each draw
/// none, and 5000 routes still validate (the hidden-route check compares a route only with
/// routes of its host or of any host; how fast is in the commit that made it so: no timed
/// assertion here).
#[test]
fn routes_past_1024_per_request_are_cautioned() {
    let backend = "{ address = \"198.18.0.11\" }";
    let route = |host: Option<String>, i: usize| {
        let host = host.map(|h| format!("host = \"{h}\"\n")).unwrap_or_default();
        format!("[[vip.route]]\n{host}path_prefix = \"/p{i}/\"\nbackends = [{backend}]\n")
    };
    // 1024 routes for any host, and one for a host: a request for that host goes past 1025.
    let any: String = (0..1024).map(|i| route(None, i)).collect();
    let at_cap = l7_vip("198.18.1.1", backend, "", &any);
    let c = parse(&at_cap).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.vips[0].l7.as_ref().unwrap().routes.len(), 1024);
    assert!(c.cautions.is_empty(), "{:?}", c.cautions);
    let over = l7_vip("198.18.1.1", backend, "", &(any + &route(Some("A.example".into()), 2000)));
    let c = parse(&over).unwrap_or_else(|e| panic!("{e}"));
    let [caution] = c.cautions.as_slice() else { panic!("one caution: {:?}", c.cautions) };
    assert!(caution.starts_with(&at_last(&over, "[[vip.route]]")), "{caution}");
    assert!(
        caution.contains(
            "VIP `a`: a request for host `a.example` is matched against 1025 routes here"
        ) && caution.contains("(this is route 1025)"),
        "{caution}"
    );
    // One host's 600 routes, then 600 for any host: the caution comes at the 425th of those.
    let one_host: String = (0..600).map(|i| route(Some("b.example".into()), i)).collect();
    let any: String = (600..1200).map(|i| route(None, i)).collect();
    let c = parse(&l7_vip("198.18.1.1", backend, "", &(one_host + &any)))
        .unwrap_or_else(|e| panic!("{e}"));
    let [caution] = c.cautions.as_slice() else { panic!("one caution: {:?}", c.cautions) };
    assert!(
        caution.contains("a request for host `b.example` is matched against 1025 routes here")
            && caution.contains("(this is route 1025)"),
        "{caution}"
    );
    // 5000 routes: 625 hosts of seven routes each, and 625 routes for any host (632 a request
    // at most): no caution of this kind.
    let many = l7_vip("198.18.1.1", backend, "", &many_routes(5000));
    let c = parse(&many).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.vips[0].l7.as_ref().unwrap().routes.len(), 5000);
    assert!(!c.cautions.iter().any(|c| c.contains("routes here")), "{:?}", c.cautions);
    // 5000 virtual hosts, a route each: none either.
    let hosts: String = (0..5000)
        .map(|i| {
            format!("[[vip.route]]\nhost = \"h{i}.example\"\nbackends = [{{ address = \"198.18.0.12\" }}]\n")
        })
        .collect();
    let c = parse(&l7_vip("198.18.1.1", backend, "", &hosts)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.vips[0].l7.as_ref().unwrap().routes.len(), 5000);
    assert!(!c.cautions.iter().any(|c| c.contains("routes here")), "{:?}", c.cautions);
}

/// More than 4096 L7 backend entries in all (one per backend of each L7 VIP's own pool and of
/// each route pool; as many as XDP VIPs may have) are accepted with a caution at the first
/// entry past 4096: nothing bounded L7 pools before (they use none of the data plane's maps),
/// and files with more ran.
#[test]
fn l7_backend_entries_past_4096_are_cautioned() {
    let pool = |n: usize| -> String {
        (0..n)
            .map(|i| format!("{{ address = \"198.18.{}.{}\" }},", 2 + i / 250, 1 + i % 250))
            .collect()
    };
    let vip = |name: &str, port: u16, own: usize, route: usize| {
        let route = if route == 0 {
            String::new()
        } else {
            format!("[[vip.route]]\npath_prefix = \"/r/\"\nbackends = [{}]\n", pool(route))
        };
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"198.18.1.1\"\nport = {port}\nforwarding = \"l7\"\nbackends = [{}]\n{route}",
            pool(own)
        )
    };
    let one_caution = |text: &str| -> String {
        let c = parse(text).unwrap_or_else(|e| panic!("{e}"));
        let [caution]: [String; 1] =
            c.cautions.try_into().unwrap_or_else(|c| panic!("one caution: {c:?}"));
        caution
    };
    // Two VIPs of 2100: 4200 entries, the 4097th the second VIP's backend 1997 (198.18.9.247).
    let text = format!("{NODE}{}{}", vip("http", 80, 2100, 0), vip("https", 443, 2100, 0));
    let c = one_caution(&text);
    assert!(c.starts_with(&at_last(&text, "\"198.18.9.247\"")), "{c}");
    assert!(
        c.contains("the file has 4200 L7 backend entries")
            && c.contains("more than 4096, the first past them in VIP `https`"),
        "{c}"
    );
    // A route pool's backends count too: 4000 of the VIP's own and 97 in a route.
    let text = format!("{NODE}{}", vip("http", 80, 4000, 97));
    let c = one_caution(&text);
    assert!(c.contains("has 4097 L7 backend entries") && c.contains("in VIP `http`"), "{c}");
    assert!(c.starts_with(&at_last(&text, "\"198.18.2.97\"")), "{c}");
    // 4096 in all, no caution.
    let c = parse(&format!("{NODE}{}{}", vip("http", 80, 2048, 1024), vip("https", 443, 1024, 0)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(c.cautions.is_empty(), "{:?}", c.cautions);
}

/// Health checks that probe more than 10 000 times a second in all (checked backends over
/// their intervals, every VIP together) are accepted with a caution at the check of the VIP
/// that probes most: each probe is a connection from this node and an event the controller
/// takes in. Over 50 000 a second they are refused: at 100 000 the controller fell behind and
/// stopped answering `stop` while its memory grew.
#[test]
fn a_very_high_health_probe_rate_is_cautioned() {
    let vip = |name: &str, port: u16, backends: usize, interval: u64| {
        let pool: String = (0..backends)
            .map(|i| format!("{{ address = \"198.18.{}.{}\" }},", 2 + i / 250, 1 + i % 250))
            .collect();
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"198.18.1.1\"\nport = {port}\nforwarding = \"l7\"\nbackends = [{pool}]\n[vip.health]\ninterval_ms = {interval}\n"
        )
    };
    // 1100 backends every 100 ms: 11 000 probes a second.
    let t = format!("{NODE}{}", vip("busy", 80, 1100, 100));
    let c = parse(&t).unwrap_or_else(|e| panic!("{e}"));
    let [caution] = c.cautions.as_slice() else { panic!("one caution: {:?}", c.cautions) };
    assert!(caution.starts_with(&at(&t, "100\n")), "{caution}");
    assert!(
        caution.contains("VIP `busy`") && caution.contains("11000 probes a second"),
        "{caution}"
    );
    // Every VIP together: 600 every 100 ms and 1000 every 200 ms, 11 000 a second; the caution
    // is at the check of the VIP that probes most (6000 a second).
    let t = format!("{NODE}{}{}", vip("a", 80, 1000, 200), vip("b", 81, 600, 100));
    let [caution]: [String; 1] =
        parse(&t).unwrap().cautions.try_into().unwrap_or_else(|c| panic!("one caution: {c:?}"));
    assert!(caution.starts_with(&at_last(&t, "100\n")) && caution.contains("VIP `b`"), "{caution}");
    // 1100 every 200 ms: 5500 a second, no caution.
    assert!(parse(&format!("{NODE}{}", vip("calm", 80, 1100, 200))).unwrap().cautions.is_empty());
    // Over 50 000 a second, refused, at the same place: 1000 every 10 ms is 100 000.
    let t = format!("{NODE}{}{}", vip("a", 80, 100, 200), vip("flood", 81, 1000, 10));
    refused_at(
        &t,
        "10\n",
        "VIP `flood`: the health checks of every VIP together make about 100500 probes a second, more than 50000",
    );
}
