//! The addresses a file writes: MAC addresses, and the IP addresses of VIPs and backends. An
//! address that parses may still be one no packet can use (IPv4-mapped, link-local, not
//! unicast, loopback where XDP forwards, a backend that is its own VIP); one that does not
//! parse is often an address written another common way (with a port, a zone id, in
//! brackets). Each is refused saying what to write, and [`AddressOf`] says whose address it is,
//! so that the advice fits (where a port goes) and never leads to an address refused next.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
};

use super::{
    Forwarding,
    message::{Invalid, bad, quoted},
    raw,
};

/// A MAC address frames are sent to or from: six pairs of hex digits, one unicast station's
/// address. A group address (multicast, broadcast) would flood the segment and the router
/// would not take its frames as its own; all zeros is no station's.
pub(super) fn parse_mac(s: &raw::Sp<String>) -> Result<[u8; 6], Invalid> {
    let parts: Vec<&str> = s.get_ref().split(':').collect();
    let mut mac = [0u8; 6];
    let not_mac = || {
        Invalid(
            s.span(),
            format!("`{}` is not a MAC address (aa:bb:cc:dd:ee:ff)", quoted(s.get_ref())),
        )
    };
    if parts.len() != 6 {
        return Err(not_mac());
    }
    for (i, p) in parts.iter().enumerate() {
        // Two hex digits each: from_str_radix alone would take `+2` or `2`.
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_mac());
        }
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| not_mac())?;
    }
    if mac[0] & 1 == 1 {
        return bad(
            s.span(),
            format!(
                "`{}` is a group (multicast or broadcast) MAC address: frames are sent to one station, write its unicast address",
                quoted(s.get_ref())
            ),
        );
    }
    if mac == [0; 6] {
        return bad(s.span(), "00:00:00:00:00:00 is no station's MAC address: write the real one");
    }
    Ok(mac)
}

/// Whose address a file's `address` is: its errors say where a port written into it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AddressOf {
    /// A VIP's, forwarded so, whose port is the VIP's `port`.
    Vip(Forwarding),
    /// A backend of a VIP XDP forwards, which takes no port (the client's is kept).
    XdpBackend,
    /// A backend of an `l7` VIP or route, whose port is the backend's `port`.
    L7Backend,
}

impl AddressOf {
    /// A backend's address, of a VIP forwarded so.
    pub(super) fn backend(forwarding: Forwarding) -> AddressOf {
        match forwarding {
            Forwarding::L7 => AddressOf::L7Backend,
            _ => AddressOf::XdpBackend,
        }
    }

    /// The address's name in errors.
    fn what(self) -> &'static str {
        match self {
            AddressOf::Vip(_) => "VIP address",
            AddressOf::XdpBackend | AddressOf::L7Backend => "backend address",
        }
    }

    /// What to write instead of `a` with its port `port` in one string.
    fn port_advice(self, a: IpAddr, port: u16) -> String {
        match self {
            AddressOf::Vip(_) => {
                format!("the port is the VIP's own key: write address = \"{a}\" and port = {port}")
            }
            AddressOf::L7Backend => format!(
                "the port is the backend's own key: write {{ address = \"{a}\", port = {port} }}"
            ),
            AddressOf::XdpBackend => format!(
                "XDP forwarding keeps the client's destination port, so its backends take none: write address = \"{a}\" (a backend `port` applies to l7 VIPs)"
            ),
        }
    }

    /// Why `a`, an address that parses and is usable on the wire ([`ipv6_usable`]), cannot be
    /// this one, if it cannot: not unicast, or loopback where XDP forwards (nothing arrives on
    /// the wire for it, or leaves for it). Said after [`AddressOf::what`] by the checks that
    /// follow [`parse_ip`], and by its advice, which must not lead to an address refused next.
    /// (A backend that is its own VIP is refused by [`backend_address_ok`] alone.)
    pub(super) fn refusal(self, a: IpAddr) -> Option<String> {
        let xdp = |forwarding| forwarding != Forwarding::L7;
        match self {
            AddressOf::Vip(forwarding) => {
                if let Some(what) = not_unicast(a) {
                    Some(format!(
                        "{a} is {what}: a VIP is one unicast address clients connect to; write that address (one [[vip]] per address)"
                    ))
                } else if xdp(forwarding) && a.to_canonical().is_loopback() {
                    // XDP sees what arrives on the wire, and nothing arrives for a loopback
                    // address: such a VIP could only balance forged packets. A local proxy is
                    // what serves loopback.
                    Some(format!(
                        "{a} is a loopback address, which no packet on the wire is sent to: XDP would balance only forged packets; write the address clients reach this node at (loopback suits forwarding = \"l7\")"
                    ))
                } else {
                    None
                }
            }
            AddressOf::XdpBackend | AddressOf::L7Backend => {
                let l7 = self == AddressOf::L7Backend;
                if let Some(what) = not_unicast(a) {
                    let example = if l7 { " (127.0.0.1 for this node)" } else { "" };
                    Some(format!("{a} is {what}: write the backend's own address{example}"))
                } else if !l7 && a.to_canonical().is_loopback() {
                    Some(format!(
                        "{a} is a loopback address: packets XDP encapsulates to it never leave this node; write the backend's address on the network (loopback backends suit forwarding = \"l7\")"
                    ))
                } else {
                    None
                }
            }
        }
    }
}

/// A VIP or backend address. Refuses the IPv6 forms that parse but cannot be used: an
/// IPv4-mapped address, which never appears on the wire (an IPv6 VIP that IPv4 packets never
/// match, 4in6 packets nothing routes, and a backend a dual-stack health check still finds up),
/// an IPv4-compatible one (`::a.b.c.d`, deprecated, for the same reasons),
/// and a link-local one, which needs an interface to be reached (every connect and bind to it
/// without one fails with EINVAL, and zone ids are not taken). What does not parse but is an
/// address written another common way (in brackets, with a zone id, with a port) is refused
/// saying what to write instead. Other addresses `of` cannot be are refused by the checks after
/// it ([`AddressOf::refusal`]).
pub(super) fn parse_ip(s: &raw::Sp<String>, of: AddressOf) -> Result<IpAddr, Invalid> {
    let what = of.what();
    let a: IpAddr = s.get_ref().parse().or_else(|_| {
        let text = s.get_ref();
        let why = match address_advice(text, of) {
            Some(advice) => format!("`{}` is not an IP address ({what}): {advice}", quoted(text)),
            None => format!("`{}` is not an IP address ({what})", quoted(text)),
        };
        bad(s.span(), why)
    })?;
    if let IpAddr::V6(v6) = a
        && let Some(e) = ipv6_refusal(v6, of)
    {
        return bad(s.span(), format!("{what} {e}"));
    }
    Ok(a)
}

/// What to write instead of `text`, an address written with a port (`198.18.0.11:8080`,
/// `[2001:db8::11]:8080`), with a zone id (`fe80::1%eth0`) or in brackets (`[2001:db8::10]`);
/// none for anything else. A port written is always said where it goes (without it a VIP takes
/// every port, an l7 backend its VIP's). An address edgelb refuses anyway (link-local, not
/// unicast, loopback where XDP forwards, or the IPv4 address an IPv4-mapped one stands for
/// that is one of those) says so at once, not after the operator fixed the spelling.
fn address_advice(text: &str, of: AddressOf) -> Option<String> {
    // The address written, with the port or zone id written with it.
    let (written, port, zone) = if let Ok(sa) = text.parse::<std::net::SocketAddr>() {
        (sa.ip(), Some(sa.port()), None)
    } else if let Some((host, port)) = text.strip_prefix('[').and_then(|r| r.split_once("]:"))
        && let Ok(port) = port.parse::<u16>()
    {
        // `[v6%zone]:port`, which the socket address parser does not take with a zone name.
        let (a, zone) = host.split_once('%').map_or((host, None), |(a, z)| (a, Some(z)));
        (IpAddr::V6(a.parse().ok()?), Some(port), zone)
    } else {
        let unbracketed = text.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        let bare = unbracketed.unwrap_or(text);
        let (a, zone) = match bare.split_once('%') {
            Some((a, zone)) => (a, Some(zone)),
            None => (unbracketed?, None),
        };
        (IpAddr::V6(a.parse().ok()?), None, zone)
    };
    let zone_said =
        zone.map_or(String::new(), |z| format!("zone ids (`%{}`) are not taken, and ", quoted(z)));
    // What is written for it: an IPv4-mapped or -compatible address as its IPv4 one.
    let meant = match written {
        IpAddr::V6(a) => ipv4_meant(a).map_or(written, |(v4, _)| IpAddr::V4(v4)),
        v4 => v4,
    };
    let refused = |a: IpAddr| match a {
        IpAddr::V6(v6) => ipv6_refusal(v6, of).or_else(|| of.refusal(a)),
        IpAddr::V4(_) => of.refusal(a),
    };
    let mut advice = Vec::new();
    if let Some(why) = refused(written) {
        if meant == written || refused(meant).is_some() {
            return Some(format!("{zone_said}{why}"));
        }
        // An IPv4-mapped address: its IPv4 address is taken.
        advice.push(format!("{zone_said}{why}"));
    } else if zone.is_some() {
        advice.push(format!("{zone_said}{written} is reached without one: write \"{written}\""));
    }
    match port {
        Some(port) => advice.push(of.port_advice(meant, port)),
        None if advice.is_empty() => {
            advice.push(format!("write the IPv6 address without brackets: \"{written}\""));
        }
        None => {}
    }
    Some(advice.join("; "))
}

/// Why `a`, written as `of`'s address, is refused for what it is in IPv6 ([`ipv6_usable`]), if
/// it is: an IPv4-mapped or -compatible address whose IPv4 address would be refused as well
/// ([`AddressOf::refusal`]) says that refusal, so that the IPv4 address is not advised in vain.
fn ipv6_refusal(a: Ipv6Addr, of: AddressOf) -> Option<String> {
    if let Some((v4, what)) = ipv4_meant(a)
        && let Some(why) = of.refusal(v4.into())
    {
        return Some(format!("{what}, and the IPv4 address it stands for is refused too: {why}"));
    }
    ipv6_usable(a).err()
}

/// The IPv4 address an IPv4-mapped (`::ffff:a.b.c.d`) or IPv4-compatible IPv6 address `a`
/// stands for, if it is one, with what `a` is (for [`ipv6_usable`]'s refusal).
fn ipv4_meant(a: Ipv6Addr) -> Option<(Ipv4Addr, String)> {
    if let Some(v4) = a.to_ipv4_mapped() {
        let what = format!("{a} is an IPv4-mapped IPv6 address, which never appears on the wire");
        return Some((v4, what));
    }
    // ::/96 but for :: and ::1: IPv4-compatible addresses, deprecated (RFC 4291 2.5.5.1) and
    // no longer on the wire (the automatic tunnels that used them are gone from Linux): refused
    // as the mapped ones are, saying the IPv4 address meant.
    (a.segments()[..6] == [0; 6] && !a.is_unspecified() && !a.is_loopback()).then(|| {
        let v4 = Ipv4Addr::from_bits(a.to_bits() as u32);
        let what = format!(
            "{a} (::{v4}) is an IPv4-compatible IPv6 address, deprecated and never on the wire"
        );
        (v4, what)
    })
}

/// Why `a` cannot stand for a host on the wire, if it cannot: see [`parse_ip`].
pub(super) fn ipv6_usable(a: Ipv6Addr) -> Result<(), String> {
    if let Some((v4, what)) = ipv4_meant(a) {
        return Err(format!("{what}: write the IPv4 address {v4}"));
    }
    if a.is_unicast_link_local() {
        return Err(format!(
            "{a} is a link-local address: it is reached only through an interface, which edgelb cannot be told (no zone ids); write a global or unique-local (fd00::/8) address"
        ));
    }
    Ok(())
}

/// What `a` is if no unicast traffic can be addressed to it: the unspecified address, a
/// multicast one, the broadcast one.
fn not_unicast(a: IpAddr) -> Option<&'static str> {
    let a = a.to_canonical();
    if a.is_unspecified() {
        Some("the unspecified address")
    } else if a.is_multicast() {
        Some("a multicast address")
    } else if a == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// Refuses a backend its VIP's traffic can never reach or that loops: an address that is not
/// unicast; for a VIP XDP forwards, a loopback address (encapsulated to it, packets never leave
/// the node) or the VIP's own; for an l7 VIP (`vip` is its address and port), its own listen
/// address and port: the proxy would connect to itself, each connection opening another.
/// (Another L7 VIP's listen address is a chain, refused only when it loops:
/// [`L7Links`](super::l7::L7Links).)
pub(super) fn backend_address_ok(
    span: Range<usize>,
    address: IpAddr,
    port: u16,
    (vip_addr, vip_port): (IpAddr, u16),
    forwarding: Forwarding,
) -> Result<(), Invalid> {
    if let Some(why) = AddressOf::backend(forwarding).refusal(address) {
        return bad(span, format!("backend address {why}"));
    }
    let same = address.to_canonical() == vip_addr.to_canonical();
    if forwarding == Forwarding::L7 {
        if same && port == vip_port {
            return bad(
                span,
                format!(
                    "backend {} is the VIP's own listen address: the proxy would connect to itself in a loop; write the backend's own address or port",
                    std::net::SocketAddr::new(address, port)
                ),
            );
        }
    } else if same {
        return bad(
            span,
            format!(
                "backend {address} is the VIP's own address: XDP would send the VIP's flows back to the VIP; write the backend's real address"
            ),
        );
    }
    Ok(())
}
