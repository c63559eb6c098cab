//! What the kernel says of the attached interfaces that the config must agree with, looked at
//! at a start, at each reload and while edgelb runs: each interface's MTU against `node.mtu`
//! ([`mtu_mismatches`], every sample), GRO under generic XDP ([`gro_warnings`], at a start and
//! each reload), and `node.gateway_mac` against the MAC the
//! kernel's neighbour table gives the gateway of the route to the backends out of each
//! interface ([`LinkWatch::judge_gateways`], every [`GATEWAY_EVERY`]). Both can change under a running edgelb (`ip link set ... mtu`; a
//! router replaced, a failover without a virtual MAC), and nothing else would tell: the packets
//! are lost past the node (too big, or sent to a MAC nobody has) while the health checks,
//! through the kernel, stay green. Asked over netlink, in edgelb's own network namespace: sysfs
//! shows the namespace of whoever mounted it, which under `nsenter --net` is not edgelb's.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use super::Controller;
use crate::{
    config::{Config, Forwarding},
    dataplane::netlink,
};

/// How often `node.gateway_mac` is compared with the gateways' MACs: each look asks the
/// kernel a route and a neighbour entry per interface and address family (no table is read
/// whole), cheap, but a gateway's MAC seldom changes.
const GATEWAY_EVERY: Duration = Duration::from_secs(10);

/// A gateway's MAC the neighbour table gave: that of the route to the backends of one address
/// family out of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GatewaySeen {
    interface: String,
    /// The route is to an IPv6 backend (else an IPv4 one).
    v6: bool,
    /// The gateway's address.
    address: IpAddr,
    /// Its MAC, as last known.
    mac: [u8; 6],
}

/// What one look found of the route to a backend of one family out of one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GatewayLook {
    /// The route goes through the gateway of this address, whose MAC the neighbour table
    /// gives, if it holds one it goes by.
    Via(IpAddr, Option<[u8; 6]>),
    /// The route has no gateway out of this interface (the backends on the link, or reached
    /// by another interface): nothing to compare.
    NoGateway,
}

/// A mismatch as logged: (interface, `node.gateway_mac`, the gateways' MACs it is not).
type GatewayMismatch = (String, [u8; 6], Vec<[u8; 6]>);

/// What the controller last saw of the attached interfaces.
#[derive(Debug, Default)]
pub(super) struct LinkWatch {
    /// The GRO warnings of the last start or reload ([`gro_warnings`]): GRO is not
    /// looked at in between, and they are logged with the MTU ones.
    pub(super) gro: Vec<String>,
    /// (interface, MTU) as last read ([`link_mtus`]), for `edgelb_interface_mtu`.
    pub(super) mtus: Vec<(String, u32)>,
    /// Per (interface, address family), the gateway of the route to the backends and its last
    /// known MAC. A look that finds no MAC for the same gateway (its entry expired, or being
    /// resolved again), or that could not ask, keeps it: an entry missing for a moment says
    /// nothing of the gateway, and the error must not come and go with it.
    gateway_seen: Vec<GatewaySeen>,
    /// The mismatches last logged.
    gateway_reported: Vec<GatewayMismatch>,
    /// When the gateways are next looked at; `None`: at the next sample (a start, a reload).
    gateway_due: Option<Instant>,
}

impl LinkWatch {
    /// What a start saw: the interfaces' MTUs (read before the controller exists, to warn
    /// before anything is attached); the gateways are looked at at the first sample.
    pub(super) fn new(mtus: Vec<(String, u32)>) -> LinkWatch {
        LinkWatch { mtus, ..Default::default() }
    }

    /// Has the gateways looked at again at the next sample: a reload may have changed
    /// `node.gateway_mac`, and the operator who fixed it waits for the error to clear.
    pub(super) fn look_at_gateways_now(&mut self) {
        self.gateway_due = None;
    }

    /// `edgelb_gateway_mac_mismatch`: (interface, whether `node.gateway_mac` is none of its
    /// gateways' MACs) for every interface of `cfg`, when its ipip VIPs use the gateway MAC
    /// ([`gateway_in_use`]); none otherwise.
    pub(super) fn gateway_mismatches(&self, cfg: &Config) -> Vec<(String, bool)> {
        if gateway_in_use(cfg).is_none() {
            return Vec::new();
        }
        let mismatched = |i: &String| self.gateway_reported.iter().any(|(r, ..)| r == i);
        cfg.node.interfaces.iter().map(|i| (i.clone(), mismatched(i))).collect()
    }

    /// Takes in a look at the gateways (`looks`: (interface, IPv6, what was found), none for
    /// a route or entry that could not be asked) and returns the mismatches to log (new ones)
    /// and the interfaces whose mismatch is gone. A gateway whose MAC is not known this time
    /// keeps its last one; another gateway, or none, replaces it. Only the families `used`
    /// sends to `node.gateway_mac` are compared: with VRRP, the IPv4 and IPv6 virtual MACs
    /// differ, and IPv4 backends say nothing of the IPv6 gateway.
    pub(super) fn judge_gateways(
        &mut self,
        interfaces: &[String],
        used: &GatewayUse,
        looks: Vec<(String, bool, GatewayLook)>,
    ) -> (Vec<GatewayMismatch>, Vec<String>) {
        for (interface, v6, look) in looks {
            let seen = &mut self.gateway_seen;
            let at = seen.iter().position(|s| s.interface == interface && s.v6 == v6);
            match (look, at) {
                (GatewayLook::Via(address, Some(mac)), Some(at)) => {
                    (seen[at].address, seen[at].mac) = (address, mac)
                }
                (GatewayLook::Via(address, Some(mac)), None) => {
                    seen.push(GatewaySeen { interface, v6, address, mac })
                }
                (GatewayLook::Via(address, None), Some(at)) if seen[at].address == address => {}
                (_, Some(at)) => drop(seen.remove(at)),
                (_, None) => {}
            }
        }
        let families = [used.v4.is_some(), used.v6.is_some()];
        let now: Vec<GatewayMismatch> = interfaces
            .iter()
            .filter_map(|i| {
                let mut macs: Vec<[u8; 6]> = self
                    .gateway_seen
                    .iter()
                    .filter(|s| &s.interface == i && families[usize::from(s.v6)])
                    .map(|s| s.mac)
                    .filter(|m| *m != used.mac)
                    .collect();
                macs.sort_unstable();
                macs.dedup();
                (!macs.is_empty()).then(|| (i.clone(), used.mac, macs))
            })
            .collect();
        let new = now.iter().filter(|m| !self.gateway_reported.contains(m)).cloned().collect();
        let gone = self
            .gateway_reported
            .iter()
            .filter(|(r, ..)| !now.iter().any(|(i, ..)| i == r))
            .map(|(r, ..)| r.clone())
            .collect();
        self.gateway_reported = now;
        (new, gone)
    }
}

/// `node.gateway_mac` and the backends that send to it: one IPv4 and one IPv6 address (when
/// there are such) of the ipip VIPs' backends without a `mac` of their own, whose routes'
/// gateways it is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GatewayUse {
    /// `node.gateway_mac`.
    mac: [u8; 6],
    /// An IPv4 backend that goes to it.
    v4: Option<IpAddr>,
    /// An IPv6 backend that goes to it.
    v6: Option<IpAddr>,
}

/// `node.gateway_mac`, when some packets go to it (those of an ipip VIP's backend without a
/// `mac` of its own), with a backend of each family that does.
fn gateway_in_use(cfg: &Config) -> Option<GatewayUse> {
    let mut backends = cfg
        .vips
        .iter()
        .filter(|v| v.forwarding == Forwarding::Ipip)
        .flat_map(|v| v.backends.iter().filter(|b| b.mac.is_none()).map(|b| b.address));
    let v4 = backends.clone().find(IpAddr::is_ipv4);
    let v6 = backends.find(IpAddr::is_ipv6);
    let mac = cfg.node.gateway_mac?;
    (v4.is_some() || v6.is_some()).then_some(GatewayUse { mac, v4, v6 })
}

/// What the kernel gives of the route to `backend` out of the interface of index `ifindex`:
/// its gateway, and the MAC the neighbour table holds for it.
fn look_at_gateway(backend: IpAddr, ifindex: u32) -> std::io::Result<GatewayLook> {
    let Some(gateway) = netlink::gateway_to(backend, ifindex)? else {
        return Ok(GatewayLook::NoGateway);
    };
    let neighbour = netlink::neighbour(ifindex, gateway.address)?;
    Ok(GatewayLook::Via(gateway.address, neighbour.map(|n| n.lladdr)))
}

/// A MAC as `ip` and the config write it.
fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The error logged when `node.gateway_mac` (`configured`) is not the MACs (`seen`) the
/// kernel gives the gateways of the routes to the backends out of `interface`.
pub(super) fn gateway_mismatch_message(
    interface: &str,
    configured: &[u8; 6],
    seen: &[[u8; 6]],
) -> String {
    let seen: Vec<String> = seen.iter().map(mac_text).collect();
    let fix = match seen.as_slice() {
        [one] => format!("node.gateway_mac = \"{one}\""),
        _ => "node.gateway_mac to the gateway's MAC".to_owned(),
    };
    format!(
        "node.gateway_mac is {}, but the kernel's neighbour table gives the gateway of the route to the backends on {interface} {}: ipip packets to backends without a `mac` of their own go to a MAC that is not the gateway's (a router replaced, a failover without a virtual MAC?) and are lost past the node, while the health checks, which go through the kernel, stay up. If the gateway is right, set {fix} and `edgelb reload` (edgelb does not rewrite it itself)",
        mac_text(configured),
        seen.join(", ")
    )
}

/// The MTU of each interface of `node.interfaces`, as the kernel gives it in this network
/// namespace ([`netlink::link_info`]). One that is not there (deleted, renamed) is left out;
/// one that could not be asked (out of descriptors) keeps its MTU in `last`: a failed lookup
/// says nothing of the interface, and the warnings must not come and go with it.
pub(super) fn link_mtus(cfg: &Config, last: &[(String, u32)]) -> Vec<(String, u32)> {
    cfg.node
        .interfaces
        .iter()
        .filter_map(|i| match netlink::link_info(i) {
            Ok(info) => Some((i.clone(), info?.mtu)),
            Err(_) => last.iter().find(|(l, _)| l == i).cloned(),
        })
        .collect()
}

/// The interfaces where GRO on stalls uploads (see [`gro_warnings`]), from their GRO now.
pub(super) fn gro_warnings_now(cfg: &Config, attached: &[(String, &'static str)]) -> Vec<String> {
    let gro_on = |i: &str| crate::dataplane::netlink::gro_on(i).unwrap_or(false);
    gro_warnings(cfg, attached, gro_on)
}

/// Whether the warnings `new` are those `last` logged, in whatever order: a reload then logs
/// nothing again (a start logs them all).
fn same_warnings(last: &[String], new: &[String]) -> bool {
    last.iter().collect::<BTreeSet<_>>() == new.iter().collect::<BTreeSet<_>>()
}

/// The interfaces where XDP runs in generic mode with GRO on, when some VIP encapsulates, each
/// with what to do. Generic XDP runs after the kernel's software GRO, which the kernel leaves on
/// when it installs a generic program: TCP segments merged into one packet larger than the MTU
/// no longer fit the path once encapsulated, and each merged upload is refused again. Without an
/// encapsulating VIP nothing grows past the MTU, and turning GRO off would only cost the L7
/// proxy (whose sockets take merged segments whole) throughput.
fn gro_warnings(
    cfg: &Config,
    attached: &[(String, &'static str)],
    gro_on: impl Fn(&str) -> bool,
) -> Vec<String> {
    if !cfg.vips.iter().any(|v| v.forwarding == Forwarding::Ipip) {
        return Vec::new();
    }
    attached
        .iter()
        .filter(|(interface, mode)| *mode == "generic" && gro_on(interface))
        .map(|(interface, _)| {
            format!(
                "XDP runs in generic mode on {interface}, after the kernel merges received TCP segments (GRO): merged packets pass node.mtu once encapsulated and are refused, which stalls uploads through ipip VIPs; turn GRO off: `ethtool -K {interface} gro off`"
            )
        })
        .collect()
}

/// Why `node.mtu` is wrong for the interfaces' own MTUs (`links`), if it is, when some VIP
/// encapsulates (which makes packets larger): above an interface's MTU, or 0 (no check), a
/// full-size client packet is encapsulated past what the NIC sends, and it is dropped
/// silently (by the driver, or the next hop) instead of answered with frag-needed /
/// packet-too-big so that the client sends smaller ones.
pub(super) fn mtu_mismatches(cfg: &Config, links: &[(String, u32)]) -> Vec<String> {
    if !cfg.vips.iter().any(|v| v.forwarding == Forwarding::Ipip) {
        return Vec::new();
    }
    let mtu = cfg.node.mtu;
    links
        .iter()
        .filter(|&&(_, link)| mtu == 0 || mtu > link)
        .map(|(name, link)| {
            let now = if mtu == 0 { "0 (no check)".to_owned() } else { mtu.to_string() };
            format!(
                "node.mtu is {now}, and interface {name} carries at most {link} bytes: an encapsulated packet above {link} bytes is dropped without an ICMP error, so clients never learn to send smaller ones; set node.mtu = {link} (or the smaller path MTU towards the backends)"
            )
        })
        .collect()
}

impl Controller {
    /// At each sample (and at a reload): reads the interfaces' MTUs again, and logs the MTU
    /// and GRO warnings when they differ from those last logged ([`Controller::log_link_warnings`]):
    /// an MTU lowered under a running edgelb below `node.mtu` is said within a second.
    pub(super) fn watch_links(&mut self) {
        self.links.mtus = link_mtus(&self.cfg, &self.links.mtus);
        let mut now = mtu_mismatches(&self.cfg, &self.links.mtus);
        now.extend(self.links.gro.iter().cloned());
        self.log_link_warnings(now);
        let at = Instant::now();
        if self.links.gateway_due.is_none_or(|due| at >= due) {
            self.links.gateway_due = Some(at + GATEWAY_EVERY);
            self.watch_gateway();
        }
    }

    /// Compares `node.gateway_mac`, when it is used ([`gateway_in_use`]), with the MAC the
    /// kernel gives the gateway of the route to the backends out of each interface, per
    /// address family ([`LinkWatch::judge_gateways`]): logs an error once when it differs (and
    /// again when the MACs change), and that it is the gateways' again when it is. Nothing is
    /// rewritten: the MAC in the file is the operator's to fix (a neighbour entry can be
    /// spoofed; a rewrite would follow it). A backend on the link (a route without a gateway)
    /// is not compared: each such backend has a MAC of its own, which one gateway MAC cannot
    /// be.
    fn watch_gateway(&mut self) {
        let Some(used) = gateway_in_use(&self.cfg) else {
            self.links.gateway_seen.clear();
            self.links.gateway_reported.clear();
            return;
        };
        let mut looks = Vec::new();
        for interface in &self.cfg.node.interfaces {
            let Ok(Some(link)) = netlink::link_info(interface) else { continue };
            for backend in [used.v4, used.v6].into_iter().flatten() {
                match look_at_gateway(backend, link.index) {
                    Ok(look) => looks.push((interface.clone(), backend.is_ipv6(), look)),
                    // No route out of it, or out of descriptors: the last look stands.
                    Err(e) => {
                        debug!(%interface, %backend, error = %e, "asking the kernel the route to a backend and its gateway's MAC to check node.gateway_mac")
                    }
                }
            }
        }
        let (new, gone) = self.links.judge_gateways(&self.cfg.node.interfaces, &used, looks);
        for (interface, configured, seen) in &new {
            error!(%interface, "{}", gateway_mismatch_message(interface, configured, seen));
        }
        for interface in gone {
            info!(%interface, gateway_mac = %mac_text(&used.mac), "node.gateway_mac is the MAC the kernel gives the gateway of the route to the backends on this interface again");
        }
    }

    /// Logs the MTU and GRO warnings `now`, when they are not those last logged
    /// ([`same_warnings`]): all of them, so that the last ones in the log are those in force,
    /// or that none is left. Hundreds of reloads, or a sample every second, do not fill the log
    /// with the same lines.
    pub(super) fn log_link_warnings(&mut self, now: Vec<String>) {
        if same_warnings(&self.link_warnings, &now) {
            return;
        }
        for w in &now {
            warn!("{w}");
        }
        if now.is_empty() {
            info!("the MTU and GRO warnings logged before no longer apply");
        }
        self.link_warnings = now;
    }

    /// Logs the MTU and GRO warnings of a reload (GRO looked at again, the MTUs read again),
    /// when they are not those last logged, and compares `node.gateway_mac` with the gateways'
    /// MACs again ([`Controller::watch_links`]).
    pub(super) fn warn_of_links(&mut self) {
        self.links.gro = gro_warnings_now(&self.cfg, self.dp.attached());
        self.links.look_at_gateways_now();
        self.watch_links();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::tests::{NODE, l7};

    fn parse(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("t.toml")).expect("valid test config")
    }

    /// With VRRP the IPv4 and IPv6 gateways have different virtual MACs. A look that finds
    /// the IPv4 gateway's neighbour entry missing (expired, or in PROBE before NUD_PROBE
    /// counted) logs nothing new and keeps the gauge: the gateway keeps its last MAC (the
    /// error used to fire, the set then holding the IPv6 MAC only). The IPv6 gateway's MAC is
    /// not compared while only IPv4 backends use `node.gateway_mac`; with IPv6 ones too, it is.
    /// Another gateway, or a MAC that changes, is judged anew; one that is right again clears.
    #[test]
    fn a_gateway_entry_missing_for_a_look_or_of_an_unused_family_says_nothing() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let node = "[node]\ninterfaces = [\"eth0\"]\nencap_source_v4 = \"198.19.0.0/16\"\nencap_source_v6 = \"2001:2:0:ff::/96\"\ngateway_mac = \"00:00:5e:00:01:07\"\n";
        let vip = |address: &str, backend: &str| {
            format!(
                "[[vip]]\nname = \"v{}\"\naddress = \"{address}\"\nbackends = [{{ address = \"{backend}\" }}]\n",
                address.len()
            )
        };
        let v4_only = parse(&format!("{node}{}", vip("198.18.1.1", "198.18.0.11")));
        let used = gateway_in_use(&v4_only).unwrap();
        assert_eq!((used.v4, used.v6), (Some(ip("198.18.0.11")), None));
        let (gw4, gw6) = (ip("198.18.64.1"), ip("fe80::1"));
        let (mac4, mac6) = ([0, 0, 0x5e, 0, 1, 7], [0, 0, 0x5e, 0, 2, 7]);
        let eth0 = vec!["eth0".to_owned()];
        let look = |v4: Option<[u8; 6]>, v6: Option<[u8; 6]>| {
            vec![
                ("eth0".to_owned(), false, GatewayLook::Via(gw4, v4)),
                ("eth0".to_owned(), true, GatewayLook::Via(gw6, v6)),
            ]
        };
        let mut watch = LinkWatch::default();
        let nothing = (Vec::new(), Vec::new());
        assert_eq!(watch.judge_gateways(&eth0, &used, look(Some(mac4), Some(mac6))), nothing);
        assert_eq!(watch.judge_gateways(&eth0, &used, look(None, Some(mac6))), nothing);
        assert_eq!(watch.gateway_mismatches(&v4_only), [("eth0".to_owned(), false)]);
        // The IPv4 gateway's MAC changes: said, and kept while its entry is missing.
        let other = [2, 0, 0, 0, 0, 9];
        let said = vec![("eth0".to_owned(), used.mac, vec![other])];
        assert_eq!(
            watch.judge_gateways(&eth0, &used, look(Some(other), Some(mac6))),
            (said, vec![])
        );
        assert_eq!(watch.judge_gateways(&eth0, &used, look(None, None)), nothing);
        assert_eq!(watch.gateway_mismatches(&v4_only), [("eth0".to_owned(), true)]);
        // Another gateway with no known MAC yet: the old one's says nothing of it.
        let moved = vec![("eth0".to_owned(), false, GatewayLook::Via(ip("198.18.64.9"), None))];
        assert_eq!(watch.judge_gateways(&eth0, &used, moved), (vec![], eth0.clone()));
        assert_eq!(watch.judge_gateways(&eth0, &used, look(Some(mac4), None)), nothing);
        // IPv6 backends too: the IPv6 gateway's MAC is compared, and kept when missing.
        let dual = parse(&format!(
            "{node}{}{}",
            vip("198.18.1.1", "198.18.0.11"),
            vip("2001:2::1", "2001:2::11")
        ));
        let both = gateway_in_use(&dual).unwrap();
        assert_eq!(both.v6, Some(ip("2001:2::11")));
        let said = vec![("eth0".to_owned(), used.mac, vec![mac6])];
        assert_eq!(watch.judge_gateways(&eth0, &both, look(None, None)), (said, vec![]));
        assert_eq!(watch.judge_gateways(&eth0, &both, look(Some(mac4), None)), nothing);
        // On the link (no gateway): nothing to compare.
        let on_link = vec![("eth0".to_owned(), true, GatewayLook::NoGateway)];
        assert_eq!(watch.judge_gateways(&eth0, &both, on_link), (vec![], eth0.clone()));
    }

    /// The gateway MAC is checked only while some ipip backend goes to it; the error names
    /// both MACs, the interface, and the line to write when there is one gateway MAC.
    #[test]
    fn the_gateway_mac_is_checked_when_used_and_the_error_names_both() {
        let node = "[node]\ninterfaces = [\"eth0\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:01\"\n";
        let vip = |backend: &str| {
            format!("[[vip]]\nname = \"v\"\naddress = \"198.18.1.1\"\nbackends = [{backend}]\n")
        };
        let used = parse(&format!("{node}{}", vip("{ address = \"198.18.0.11\" }")));
        assert_eq!(gateway_in_use(&used).map(|u| u.mac), Some([2, 0, 0, 0, 0, 1]));
        let own = "{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:11\" }";
        assert_eq!(gateway_in_use(&parse(&format!("{node}{}", vip(own)))), None);
        let watch = LinkWatch::default();
        assert_eq!(watch.gateway_mismatches(&used), [("eth0".to_owned(), false)]);
        let m = gateway_mismatch_message("eth0", &[2, 0, 0, 0, 0, 1], &[[2, 0xab, 0, 0, 0, 0xfe]]);
        assert!(
            m.starts_with("node.gateway_mac is 02:00:00:00:00:01")
                && m.contains("route to the backends on eth0 02:ab:00:00:00:fe")
                && m.contains("set node.gateway_mac = \"02:ab:00:00:00:fe\" and `edgelb reload`"),
            "{m}"
        );
        let m = gateway_mismatch_message(
            "eth0",
            &[2, 0, 0, 0, 0, 1],
            &[[2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]],
        );
        assert!(
            m.contains("02:00:00:00:00:02, 02:00:00:00:00:03")
                && m.contains("to the gateway's MAC"),
            "{m}"
        );
    }

    /// A `node.mtu` above an interface's MTU, or 0, is said, naming the interface and the
    /// value to set; only when some VIP encapsulates (nothing else grows packets).
    #[test]
    fn an_mtu_the_interfaces_cannot_carry_is_said() {
        let ipip = |mtu: u32| {
            parse(&format!(
                "{NODE}mtu = {mtu}\ngateway_mac = \"02:00:00:00:00:01\"\n[[vip]]\nname = \"v\"\naddress = \"198.18.1.1\"\nbackends = [{{ address = \"198.18.0.11\" }}]\n"
            ))
        };
        let links = [("eth0".to_owned(), 1500), ("eth1".to_owned(), 9000)];
        assert!(mtu_mismatches(&ipip(1500), &links).is_empty());
        let w = mtu_mismatches(&ipip(9000), &links);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("interface eth0 carries at most 1500")
                && w[0].contains("node.mtu = 1500"),
            "{w:?}"
        );
        assert_eq!(mtu_mismatches(&ipip(0), &links).len(), 2);
        // Without encapsulation, packets leave no larger than they came.
        let l7_only = parse(&format!("{NODE}mtu = 9000\n{}", l7("a", 8001, "http")));
        assert!(mtu_mismatches(&l7_only, &links).is_empty());
    }

    /// Generic mode with GRO on is said only where it hurts: on a generic-mode interface with
    /// GRO on, when some VIP encapsulates. A node of L7 VIPs only is not told to turn GRO off,
    /// which would cost its proxy throughput for nothing.
    #[test]
    fn gro_is_said_only_when_some_vip_encapsulates() {
        let ipip = parse(&format!(
            "{NODE}gateway_mac = \"02:00:00:00:00:01\"\n[[vip]]\nname = \"v\"\naddress = \"198.18.1.1\"\nbackends = [{{ address = \"198.18.0.11\" }}]\n{}",
            l7("a", 8001, "http")
        ));
        let l7_only = parse(&format!("{NODE}{}", l7("a", 8001, "http")));
        let attached = [("eth0".to_owned(), "generic"), ("eth1".to_owned(), "native")];
        let w = gro_warnings(&ipip, &attached, |_| true);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("generic mode on eth0") && w[0].contains("ethtool -K eth0 gro off"));
        assert!(gro_warnings(&ipip, &attached, |_| false).is_empty(), "GRO off: nothing to say");
        assert_eq!(gro_warnings(&l7_only, &attached, |_| true), Vec::<String>::new());
    }

    /// A reload logs the MTU and GRO warnings again only when they change: the same ones (in
    /// whatever order) are not logged at each of hundreds of reloads; one more, one fewer, one
    /// reworded (another MTU) or none left are.
    #[test]
    fn a_reload_logs_link_warnings_only_when_they_change() {
        let w = |ws: &[&str]| ws.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
        let (mtu, gro) = ("node.mtu is 9000, and interface eth0", "generic mode on eth1");
        assert!(same_warnings(&w(&[mtu, gro]), &w(&[mtu, gro])));
        assert!(same_warnings(&w(&[mtu, gro]), &w(&[gro, mtu])), "order says nothing");
        assert!(same_warnings(&[], &[]));
        assert!(!same_warnings(&w(&[mtu]), &w(&[mtu, gro])), "one more");
        assert!(!same_warnings(&w(&[mtu, gro]), &w(&[gro])), "one fewer");
        assert!(!same_warnings(&w(&[mtu]), &[]), "none left");
        assert!(!same_warnings(&[], &w(&[gro])), "a first one");
        let other = "node.mtu is 0 (no check), and interface eth0";
        assert!(!same_warnings(&w(&[mtu]), &w(&[other])), "another value");
    }
}
